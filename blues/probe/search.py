"""The probe's search: ranks in lockstep over micro-batch sizes, one fresh trial process per rank.

    probe(resolve_options(ProbeOptions(...)))   # this node's coordinators, one per rank; exit code

Each rank has a coordinator process (like torchrun's workers); coordinators agree through a
TCPStore on rank 0's node. For each candidate b every coordinator starts its rank's trial
(blues.probe.trial) with a fresh MASTER_PORT, waits for it, publishes {"ok", "peak", ...} and reads
everyone's: b fits when every rank's peak is within its limit. Growth b = 1, 2, 4, ... until a miss,
then binary search between the last fit and the first miss. Each rank's own answer is the largest b
it fitted at every smaller tried size; every rank takes the minimum of all ranks' answers.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Callable, Optional

from blues.common import atomic_write_json, format_bytes, free_port, parse_bytes
from blues.probe.estimate import estimate_memory
from blues.probe.trial import TrialSpec

DEFAULT_MAX_MICRO_BATCH = 1024
SEARCHES = ("bisect", "linear")
DEVICES = ("auto", "cuda", "cpu")


# ----------------------------------------------------------------------------- options

@dataclass
class ProbeOptions:
    """What blues-probe was asked; `resolve_options` checks it and fills device, ranks and out_dir."""
    deepspeed_config: str
    config: Optional[str] = None
    preset: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    nproc_per_node: Optional[int] = None  # None: the visible GPUs, or 1 on CPU
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None  # the coordinators' store; trial i uses master_port + 1 + i
    device: str = "auto"
    memory_budget: Optional[str] = None  # bytes per rank, or one per rank comma-separated
    headroom: float = 0.9
    target_tokens: Optional[int] = None
    router_skew: float = 1.0
    search: str = "bisect"
    max_micro_batch: int = DEFAULT_MAX_MICRO_BATCH
    trial_timeout: int = 900
    out_dir: Optional[str] = None  # None: <config out_dir>/probe

    @property
    def world_size(self) -> int:
        return self.nnodes * (self.nproc_per_node or 1)


def parse_budget(text: str) -> int:
    """One memory budget in bytes ('3GB', '2.5GiB', '800MB', '123456'); ValueError naming it."""
    try:
        value = parse_bytes(text)
    except ValueError as e:
        raise ValueError(f"memory budget {e}") from None
    if value <= 0:
        raise ValueError(f"memory budget {text!r} must be positive")
    return value


def parse_budgets(text: Optional[str], world_size: int) -> Optional[list[int]]:
    """One budget for every rank, or a comma-separated list with one per rank."""
    if text is None:
        return None
    parts = [parse_budget(p) for p in str(text).split(",")]
    if len(parts) == 1:
        return parts * world_size
    if len(parts) != world_size:
        raise ValueError(f"--memory_budget lists {len(parts)} budgets for a world size of {world_size}: "
                         "give one for all ranks or one per rank")
    return parts


def resolve_options(opts: ProbeOptions) -> ProbeOptions:
    """Everything a user can get wrong, before any process starts (ValueError naming it); returns the
    options with the device, the ranks per node and absolute paths filled in. The config comes first:
    it needs no torch, and it is where most mistakes are."""
    from blues.presets import load_config
    from blues.train.ds_config import load_ds_config, resolve_ds_config

    o = copy.deepcopy(opts)
    for name in ("nnodes", "max_micro_batch", "trial_timeout"):
        if getattr(o, name) < 1:
            raise ValueError(f"--{name} {getattr(o, name)} is invalid: expected a positive integer")
    if o.nproc_per_node is not None and o.nproc_per_node < 1:
        raise ValueError(f"--nproc_per_node {o.nproc_per_node} is invalid: expected a positive integer")
    if not 0 <= o.node_rank < o.nnodes:
        raise ValueError(f"--node_rank {o.node_rank} is invalid: expected 0 .. {o.nnodes - 1}")
    if not 0 < o.headroom <= 1:
        raise ValueError(f"--headroom {o.headroom} is invalid: expected a fraction in (0, 1]")
    if not 0 <= o.router_skew <= 1:
        raise ValueError(f"--router_skew {o.router_skew} is invalid: expected a fraction in [0, 1]")
    if o.target_tokens is not None and o.target_tokens < 1:
        raise ValueError(f"--target_tokens {o.target_tokens} is invalid: expected a positive integer")
    if o.search not in SEARCHES or o.device not in DEVICES:
        raise ValueError(f"search={o.search!r} device={o.device!r}: expected one of {SEARCHES} and {DEVICES}")
    cfg = load_config(o.config, o.preset, o.overrides)
    ds = load_ds_config(o.deepspeed_config)
    if o.device != "cpu":
        import torch
        cuda = torch.cuda.is_available()
        if o.device == "cuda" and not cuda:
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu with --memory_budget")
        o.device = "cuda" if cuda else "cpu"
        if cuda and (o.nproc_per_node or 0) > torch.cuda.device_count():
            raise ValueError(f"--nproc_per_node {o.nproc_per_node} exceeds the {torch.cuda.device_count()} "
                             "visible GPU(s)")
        if o.nproc_per_node is None:
            o.nproc_per_node = torch.cuda.device_count() if cuda else 1
    elif o.nproc_per_node is None:
        o.nproc_per_node = 1
    world = o.world_size
    parse_budgets(o.memory_budget, world)
    if cfg.train.ep_size > 1 and world % cfg.train.ep_size:
        raise ValueError(f"ep_size={cfg.train.ep_size} does not divide the probe's world size {world} "
                         f"({o.nnodes} node(s) x {o.nproc_per_node}): probe with the layout training uses")
    resolve_ds_config(ds, cfg, world)
    o.out_dir = os.path.abspath(o.out_dir or os.path.join(cfg.train.out_dir, "probe"))
    if o.config is not None and os.path.isfile(o.config):
        o.config = os.path.abspath(o.config)
    o.deepspeed_config = os.path.abspath(o.deepspeed_config)
    return o


# ----------------------------------------------------------------------------- the search

def search(fits: Callable[[int], bool], max_micro_batch: int = DEFAULT_MAX_MICRO_BATCH) -> int:
    """Largest b in [1, max_micro_batch] with fits(b), assuming memory grows with b: growth 1, 2, 4, ...
    until a miss, then binary search between the last fit and the first miss. 0 if b=1 misses."""
    lo, b, hi = 0, 1, None
    while True:
        if fits(b):
            lo = b
            if b >= max_micro_batch:
                return lo
            b = min(2 * b, max_micro_batch)
        else:
            hi = b
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def search_linear(fits: Callable[[int], bool], max_micro_batch: int = DEFAULT_MAX_MICRO_BATCH) -> int:
    """Try 1, 2, 3, ... until the first miss: the true maximum (benchmarks check `search` against it)."""
    b = 0
    while b < max_micro_batch and fits(b + 1):
        b += 1
    return b


def own_answer(trials: list[dict], rank: int) -> int:
    """Rank `rank`'s answer: the largest tried b such that it fitted at every tried b' <= b."""
    best = 0
    for t in sorted(trials, key=lambda t: t["micro_batch"]):
        if not t["fits_by_rank"][rank]:
            break
        best = t["micro_batch"]
    return best


def grad_accum_for(target_tokens: int, micro_batch: int, block_size: int, world_size: int) -> int:
    """Micro-steps per optimizer step whose global batch is nearest to `target_tokens` (at least 1)."""
    per_step = micro_batch * block_size * world_size
    return max(1, round(target_tokens / per_step))


def probed_ds_config(ds: dict, micro_batch: int, grad_accum: int, world_size: int) -> dict:
    """The user's DeepSpeed config with the three batch fields written consistently."""
    ds = copy.deepcopy(ds)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = micro_batch * grad_accum * world_size
    return ds


# ----------------------------------------------------------------------------- processes

def _module_cmd(role: str, payload: dict) -> list[str]:
    """The command of a probe child process: `python -m blues.probe <role> JSON`."""
    return [sys.executable, "-m", "blues.probe", role, json.dumps(payload)]


def probe(opts: ProbeOptions) -> int:
    """Start this node's coordinators (one per rank, like torchrun) on resolved options and wait for
    them; the exit code of the worst one (0 when every rank agreed on a micro-batch >= 1)."""
    os.makedirs(opts.out_dir, exist_ok=True)
    port = opts.master_port or free_port()
    procs = []
    for i in range(opts.nproc_per_node):
        env = dict(os.environ, RANK=str(opts.node_rank * opts.nproc_per_node + i), LOCAL_RANK=str(i),
                   WORLD_SIZE=str(opts.world_size), LOCAL_SIZE=str(opts.nproc_per_node),
                   MASTER_ADDR=opts.master_addr, MASTER_PORT=str(port))
        procs.append(subprocess.Popen(_module_cmd("coordinator", asdict(opts)), env=env))

    def stop(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.terminate()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            for p in procs:  # a coordinator died: the others would wait for it forever
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.2)
    return max(p.wait() for p in procs)


class Coordinator:
    """One per rank: runs the search in lockstep with the other ranks; each trial is a fresh process."""

    def __init__(self, opts: ProbeOptions):
        from torch.distributed import TCPStore

        from blues.presets import load_config
        from blues.train.ds_config import load_ds_config
        self.opts = opts
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.port = int(os.environ["MASTER_PORT"])
        self.store = TCPStore(os.environ["MASTER_ADDR"], self.port, self.world, self.rank == 0,
                              timedelta(seconds=opts.trial_timeout + 120))
        budgets = parse_budgets(opts.memory_budget, self.world)
        self.budget = budgets[self.rank] if budgets else None
        self.trials_dir = os.path.join(opts.out_dir, "trials")
        os.makedirs(self.trials_dir, exist_ok=True)
        self.trials: list[dict] = []
        self.count = 0
        self.t0 = time.perf_counter()
        self.cfg = load_config(opts.config, opts.preset, opts.overrides)
        self.ds = load_ds_config(opts.deepspeed_config)

    def _limit(self, res: dict) -> int:
        budget = self.budget if self.budget is not None else res.get("device_total")
        if budget is None:  # CPU without a budget: this machine's memory shared by its local ranks
            budget = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // int(os.environ.get("LOCAL_SIZE", 1))
        return int(self.opts.headroom * budget)

    def _run_local(self, i: int, b: int) -> dict:
        o = self.opts
        result = os.path.join(self.trials_dir, f"b{b:05d}.rank{self.rank}.json")
        logf = os.path.join(self.trials_dir, f"b{b:05d}.rank{self.rank}.log")
        if os.path.exists(result):
            os.remove(result)
        spec = TrialSpec(b, o.config, o.preset, o.overrides, o.deepspeed_config, o.device, o.router_skew, result)
        env = dict(os.environ, MASTER_PORT=str(self.port + 1 + i))
        t0 = time.monotonic()
        with open(logf, "w") as lf:
            proc = subprocess.Popen(_module_cmd("trial", spec.to_json()), env=env, stdout=lf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            why = None
            while proc.poll() is None:
                time.sleep(0.2)
                if self.store.check([f"t{i}/failed"]):
                    why = "stopped: another rank's trial failed"
                elif time.monotonic() - t0 > o.trial_timeout:
                    why = f"timed out after {o.trial_timeout} s"
                if why:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        res: dict[str, Any] = {"rank": self.rank, "micro_batch": b, "ok": False}
        if os.path.exists(result):
            with open(result) as f:
                res = json.load(f)
        elif why is None:
            with open(logf, errors="replace") as f:
                lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
            tail = lines[-1] if lines else ""
            why = f"trial process exited with {proc.returncode}" + (f": {tail}" if tail else "")
        if why and not res.get("error"):
            res["error"] = why
        res["limit"] = self._limit(res)
        res["log"] = logf
        return res

    def fits(self, b: int) -> bool:
        i = self.count
        self.count += 1
        res = self._run_local(i, b)
        if not res["ok"]:
            self.store.set(f"t{i}/failed", str(self.rank))
        self.store.set(f"t{i}/r{self.rank}", json.dumps(res))
        keys = [f"t{i}/r{r}" for r in range(self.world)]
        self.store.wait(keys)
        by_rank = [json.loads(self.store.get(k)) for k in keys]
        fits_by_rank = [bool(r["ok"]) and r["peak"] <= r["limit"] for r in by_rank]
        trial = {"micro_batch": b, "fits": all(fits_by_rank), "fits_by_rank": fits_by_rank, "ranks": by_rank}
        est = estimate_memory(self.cfg, self.ds, self.world, b)
        trial["estimate"] = {k: int(v) for k, v in est.items()}
        # The estimate counts what the model and its step allocate, not the runtime underneath:
        # compare it with the growth over the process's baseline (CPU) or with torch's allocated
        # peak (CUDA), on the rank with the largest peak.
        worst = max((r for r in by_rank if r["ok"]), key=lambda r: r["peak"], default=None)
        if worst is not None:
            measured = worst.get("peak_allocated", worst["peak"] - worst["baseline"])
            trial["measured_for_estimate"] = measured
            trial["estimate_error"] = round((est["total"] - measured) / measured, 4) if measured > 0 else None
            # The growth from the next smaller trial isolates the per-sample part (activations), where
            # the runtime's fixed cost cancels.
            smaller = [t for t in self.trials if t["micro_batch"] < b and "measured_for_estimate" in t]
            if smaller:
                prev = max(smaller, key=lambda t: t["micro_batch"])
                d_meas = measured - prev["measured_for_estimate"]
                d_est = est["total"] - prev["estimate"]["total"]
                error = round((d_est - d_meas) / d_meas, 4) if d_meas > 0 else None
                trial["marginal"] = {"from_micro_batch": prev["micro_batch"], "measured": d_meas,
                                     "estimate": int(d_est), "error": error}
        self.trials.append(trial)
        if self.rank == 0:
            print_trial(trial)
        return trial["fits"]

    def run(self) -> int:
        searcher = search_linear if self.opts.search == "linear" else search
        answer = searcher(self.fits, self.opts.max_micro_batch)
        mine = own_answer(self.trials, self.rank)
        self.store.set(f"answer/r{self.rank}", str(mine))
        keys = [f"answer/r{r}" for r in range(self.world)]
        self.store.wait(keys)
        answers = [int(self.store.get(k)) for k in keys]
        agreed = min(answers)  # every rank takes the minimum of all ranks' answers
        assert agreed == answer, (agreed, answer, answers)
        self.store.set(f"agreed/r{self.rank}", str(agreed))
        self.store.wait([f"agreed/r{r}" for r in range(self.world)])
        if self.rank == 0:
            agreed_by_rank = [int(self.store.get(f"agreed/r{r}")) for r in range(self.world)]
            self._write_outputs(agreed, answers, agreed_by_rank)
        self.store.set(f"done/r{self.rank}", "1")
        if self.rank == 0:  # the store lives in rank 0: keep it up until every rank has read it
            self.store.wait([f"done/r{r}" for r in range(self.world)])
        return 0 if agreed > 0 else 1

    def _write_outputs(self, answer: int, answers: list[int], agreed_by_rank: list[int]) -> None:
        from blues.train.ds_config import resolve_ds_config
        cfg, o = self.cfg, self.opts
        T = cfg.model.block_size
        if answer == 0:
            first = self.trials[0]
            why = "; ".join(f"rank {r['rank']}: "
                            + (f"peak {format_bytes(r['peak'])} > limit {format_bytes(r['limit'])}" if r["ok"]
                               else r.get("error", "failed")) for r in first["ranks"])
            report = {"micro_batch_size": 0, "error": f"micro_batch_size=1 does not fit: {why}",
                      "trials": self.trials, "headroom": o.headroom}
            atomic_write_json(os.path.join(o.out_dir, "report.json"), report, indent=2)
            print(f"blues-probe: error: micro_batch_size=1 does not fit ({why}); see {o.out_dir}/report.json",
                  file=sys.stderr, flush=True)
            return
        target = o.target_tokens or cfg.train.micro_batch_size * cfg.train.grad_accum * self.world * T
        grad_accum = grad_accum_for(target, answer, T, self.world)
        ds_out = probed_ds_config(self.ds, answer, grad_accum, self.world)
        # Check the written config the way training will read it.
        resolve_ds_config(ds_out, cfg.replace(micro_batch_size=answer, grad_accum=grad_accum), self.world)
        chosen = next(t for t in self.trials if t["micro_batch"] == answer)
        above = [t for t in self.trials if t["micro_batch"] > answer]
        report = {
            "micro_batch_size": answer,
            "grad_accum": grad_accum,
            "train_batch_size": answer * grad_accum * self.world,
            "global_batch_tokens": answer * grad_accum * self.world * T,
            "target_tokens": target,
            "world_size": self.world,
            "device": o.device,
            "headroom": o.headroom,
            "limits_by_rank": [r["limit"] for r in chosen["ranks"]],
            "budget": o.memory_budget,
            "router_skew": o.router_skew,
            "search": o.search,
            "answers_by_rank": answers,
            "agreed_by_rank": agreed_by_rank,
            "capped_at_max_micro_batch": answer >= o.max_micro_batch,
            "next_larger_tried": min((t["micro_batch"] for t in above), default=None),
            "seconds": round(time.perf_counter() - self.t0, 1),
            "ds_config": os.path.join(o.out_dir, "ds_config.json"),
            "config": o.config,
            "overrides": o.overrides,
            "trials": self.trials,
        }
        atomic_write_json(os.path.join(o.out_dir, "ds_config.json"), ds_out, indent=2)
        atomic_write_json(os.path.join(o.out_dir, "report.json"), report, indent=2)
        print(f"blues-probe: micro_batch_size={answer} grad_accum={grad_accum} (global batch "
              f"{report['global_batch_tokens']} tokens for a target of {target}; {len(self.trials)} trials in "
              f"{report['seconds']} s); wrote {report['ds_config']} and {o.out_dir}/report.json", flush=True)


def print_trial(trial: dict) -> None:
    """One line per trial on stdout: each rank's peak against its limit, and the estimate's error."""
    est = None
    if trial.get("estimate_error") is not None:
        est = (f"{format_bytes(trial['estimate']['total'])} vs {format_bytes(trial['measured_for_estimate'])} "
               f"measured ({100 * trial['estimate_error']:+.0f}%)")
        mg = trial.get("marginal")
        if mg and mg["error"] is not None:
            est += (f"; growth from b={mg['from_micro_batch']}: {format_bytes(mg['estimate'])} vs "
                    f"{format_bytes(mg['measured'])} ({100 * mg['error']:+.0f}%)")
    cells = []
    for r in trial["ranks"]:
        if r["ok"]:
            cells.append(f"r{r['rank']} {format_bytes(r['peak'])}/{format_bytes(r['limit'])}")
        else:
            cells.append(f"r{r['rank']} FAILED ({r.get('error', '?')})")
    print(f"blues-probe: micro_batch {trial['micro_batch']:>5}: {'fits' if trial['fits'] else 'MISS'}  "
          + "  ".join(cells) + (f"  estimate {est}" if est else ""), flush=True)
