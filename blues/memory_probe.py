"""blues-probe: the largest micro-batch per device that runs a whole training step in memory.

    blues-probe --config CFG --deepspeed_config ds_configs/zero2.json --nproc_per_node 8 \
        [--headroom 0.9] [--target_tokens 524288] [--out_dir OUT/probe] [key=value ...]
    blues-probe ... --device cpu --memory_budget 3GB        # CPU: a budget in bytes per process

What a trial is: one micro-batch size b, run as a whole training step (forward, backward,
optimizer step; two micro-steps of gradient accumulation, so gradients are held while the next
forward runs) with the real ZeRO stage, activation checkpointing and expert-parallel layout, on
every rank at once. The router is forced to its worst allowed imbalance while it runs (see
`install_router_skew`), so real routing cannot run out of memory later.

Each trial is a fresh process per rank, so a failed trial (an OOM, a killed rank) leaves nothing
behind for the next one: no fragmented allocator, no half-built process group. Ranks run the same
trials in lockstep (coordinated through a TCPStore): growth b = 1, 2, 4, ... until a trial does not
fit, then binary search between the last fit and the first miss. A trial fits when every rank's
measured peak is within its limit (headroom x device memory, or x --memory_budget); each rank's own
answer is the largest b it fitted, and every rank takes the minimum of all ranks' answers.

Measured peak: on CUDA, torch's max_memory_reserved plus what the device already used before the
trial allocated anything (CUDA context, other processes); on CPU, the process's ru_maxrss (its
peak resident set, monotone per process, which is why each trial is its own process).

Result (in --out_dir): ds_config.json, the DeepSpeed config with train_micro_batch_size_per_gpu,
gradient_accumulation_steps and train_batch_size filled consistently for --target_tokens, and
report.json: every trial's peak per rank beside the analytical estimate (`estimate_memory`) and its
error, the choice, the headroom. Train with both the probed config and its batch fields:
    deepspeed ... --module blues.train --deepspeed_config OUT/probe/ds_config.json \
        micro_batch_size=B grad_accum=A ...
(launch/train.sh does exactly this.)

Shapes: B micro-batch, T block_size, N = B*T tokens, D n_embd, E experts, K top_k, F expert hidden.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

log = logging.getLogger("blues.memory_probe")

TRIAL_ACCUM = 2  # micro-steps per trial step: the second forward runs while the first's gradients are held
TRIAL_STEPS = 2  # optimizer steps per trial: the first allocates the optimizer states, the second runs with them
DEFAULT_MAX_MICRO_BATCH = 1024
EXIT_OOM = 3


# ----------------------------------------------------------------------------- sizes

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'3GB' (10^9), '2.5GiB' (2^30), '800M', '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory budget {text!r} is not a size: expected e.g. 3GB, 2.5GiB, 800MB or a byte count")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"memory budget {text!r} must be positive")
    return value


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_budgets(text: Optional[str], world_size: int) -> Optional[list[int]]:
    """One budget for every rank, or a comma-separated list with one per rank."""
    if text is None:
        return None
    parts = [parse_bytes(p) for p in str(text).split(",")]
    if len(parts) == 1:
        return parts * world_size
    if len(parts) != world_size:
        raise ValueError(f"--memory_budget lists {len(parts)} budgets for a world size of {world_size}: "
                         "give one for all ranks or one per rank")
    return parts


# ----------------------------------------------------------------------------- forced imbalance

def hot_experts(num_experts: int, top_k: int, capacity: Optional[int], num_tokens: int) -> int:
    """The fewest experts that can take every one of the N*K assignments under the capacity.

    Without a capacity nothing is dropped, and the worst case is every token on the same K experts
    (the busiest expert then gets all N tokens). With a capacity C an expert keeps at most C, so
    the assignments need ceil(N*K / C) experts; fewer would only drop tokens (less work)."""
    if capacity is None:
        return top_k
    return min(num_experts, max(top_k, math.ceil(num_tokens * top_k / capacity)))


def skew_assignment(num_tokens: int, num_experts: int, top_k: int, hot: int, skew: float):
    """(forced (N,) bool, targets (N, K) long): the first round(skew*N) tokens are forced; forced
    token i goes to K consecutive experts of the `hot` lowest-numbered ones, taken round-robin so
    that each hot expert gets an equal share (as near to its capacity as the capacity allows)."""
    import torch
    n_forced = round(skew * num_tokens)
    forced = torch.zeros(num_tokens, dtype=torch.bool)
    forced[:n_forced] = True
    groups = max(1, math.ceil(hot / top_k))
    i = torch.arange(num_tokens)
    targets = ((i % groups) * top_k).unsqueeze(1) + torch.arange(top_k).unsqueeze(0)  # (N, K)
    return forced, targets % max(hot, top_k) % num_experts


def _forcing_bias(logits, capacity: Optional[int], top_k: int, skew: float):
    """A (N, E) bias that puts the forced tokens' top-k on their target experts, whatever the logits."""
    import torch
    N, E = logits.shape
    forced, targets = skew_assignment(N, E, top_k, hot_experts(E, top_k, capacity, N), skew)
    bias = torch.zeros(N, E, dtype=torch.float32, device=logits.device)
    big = 1e4  # softmax/sigmoid scores are in [0, 1] and logits of a trained router are O(10)
    bias[forced.to(logits.device)] = bias[forced.to(logits.device)].scatter(
        1, targets[forced].to(logits.device), big)
    return bias


class RouterSkew:
    """Forces every MoE layer of a model to route like the worst allowed imbalance.

    Stacked backends (blues.moe.MoE): each layer's `route_override` hook wraps its route op so the
    forced tokens' logits get a large bias on their target experts (the selection follows;
    gradients still flow). The hook is per layer: other models in the process are untouched.
    DeepSpeed backend (blues.moe_deepspeed.DeepSpeedMoE): a forward pre-hook on DeepSpeed's gate
    shifts each forced token's gate input by a vector u with W u = +1 on its target experts and -1
    elsewhere (u from the pseudo-inverse of the router weight W, (E, D) with E <= D), scaled to
    dominate; a forward hook hands the layer's aux/z-loss recomputation the real gate input.
    Only the choice of experts is forced: the losses keep their training values (so fp16 loss
    scaling is not thrown off). `remove()` undoes both.
    """

    def __init__(self, model, skew: float = 1.0):
        import blues.moe as bm
        if not 0.0 < skew <= 1.0:
            raise ValueError(f"router_skew={skew!r} is invalid: expected a fraction in (0, 1]")
        self.skew = skew
        self.layers = 0
        self._stacked = []
        self._handles = []
        stacked = [m for m in model.modules() if isinstance(m, bm.MoE)]
        if stacked:
            self.layers += len(stacked)
            self._patch_stacked(stacked)
        try:
            from blues.moe_deepspeed import DeepSpeedMoE
        except ImportError:  # no deepspeed: no such layers either
            DeepSpeedMoE = None
        if DeepSpeedMoE is not None:
            for layer in model.modules():
                if isinstance(layer, DeepSpeedMoE):
                    self.layers += 1
                    gate = layer.moe.deepspeed_moe.gate
                    self._handles.append(gate.register_forward_pre_hook(self._gate_pre_hook(layer)))
                    self._handles.append(gate.register_forward_hook(self._gate_post_hook(layer)))

    def _patch_stacked(self, layers) -> None:
        skew = self.skew

        def make_override(layer):
            top_k, capacity = layer.cfg.top_k, layer.capacity

            def skewed_route(route, logits, k, *, score_func="softmax", norm_topk_prob=True, selection_bias=None):
                # logits (N, E). Only the choice of experts is forced; weights, the balancing loss's
                # score sums and the z-loss's lse come from the real logits, so the loss (and fp16 loss
                # scaling) behaves as in training.
                import torch
                real = route(logits, k, score_func=score_func, norm_topk_prob=norm_topk_prob,
                             selection_bias=selection_bias)
                with torch.no_grad():
                    biased = logits.detach().float() + _forcing_bias(logits, capacity(logits.shape[0]), top_k, skew)
                    ids = route(biased, k, score_func=score_func, norm_topk_prob=norm_topk_prob,
                                selection_bias=selection_bias).topk_ids  # (N, K)
                lf = logits.float()
                scores = torch.softmax(lf, dim=-1) if score_func == "softmax" else torch.sigmoid(lf)  # (N, E)
                weights = scores.gather(1, ids)  # (N, K)
                if norm_topk_prob:
                    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
                counts = torch.bincount(ids.reshape(-1), minlength=logits.shape[1])
                return real._replace(topk_ids=ids, topk_weights=weights, counts=counts)

            return skewed_route

        for layer in layers:
            layer.route_override = make_override(layer)
        self._stacked = list(layers)

    def _gate_pre_hook(self, layer):
        E, K, cf, skew = layer.num_experts, layer.cfg.top_k, layer.cfg.capacity_factor, self.skew

        def pre_hook(module, args):
            import torch
            x = args[0]  # (N, D)
            N = x.shape[0]
            cap = None if cf is None else max(1, math.ceil(N / E * cf * K))  # DeepSpeed's, min_capacity=1
            forced, targets = skew_assignment(N, E, K, hot_experts(E, K, cap, N), skew)
            with torch.no_grad():
                W = layer.router_weight.detach().float()  # (E, D)
                t = -torch.ones(N, E, device=x.device)
                t.scatter_(1, targets.to(x.device), 1.0)  # (N, E): +1 on the targets, -1 elsewhere
                u = t @ torch.linalg.pinv(W).T  # (N, D): W u_i = t_i
                scale = 100.0 * (x.detach().float().abs().amax() * W.abs().sum(1).amax() + 1.0)
                shift = (u * scale * forced.to(x.device).unsqueeze(1)).to(x.dtype)
            layer._probe_real_gate_input = x
            return (x + shift,) + tuple(args[1:])

        return pre_hook

    @staticmethod
    def _gate_post_hook(layer):
        def post_hook(module, args, output):
            # DeepSpeedMoE's own forward hook (registered first, so run first) kept the gate's input to
            # recompute the aux and z losses; give it the real input, so those stay training's values.
            seen = getattr(layer, "_gate_seen", None)
            real = getattr(layer, "_probe_real_gate_input", None)
            if seen is not None and real is not None:
                layer._gate_seen = (real,) + tuple(seen[1:])
            layer._probe_real_gate_input = None

        return post_hook

    def remove(self) -> None:
        for layer in self._stacked:
            layer.route_override = None
        self._stacked = []
        for h in self._handles:
            h.remove()
        self._handles = []


def install_router_skew(model, skew: float = 1.0) -> RouterSkew:
    """Force `model`'s MoE layers to their worst allowed imbalance until `.remove()`."""
    return RouterSkew(model, skew)


# ----------------------------------------------------------------------------- analytical estimate

def estimate_memory(cfg, ds: dict, world_size: int, micro_batch: int) -> dict[str, float]:
    """Bytes one rank needs for a training step at `micro_batch`, by part (a model, not a measurement).

    Model states (ZeRO paper, Rajbhandari et al. 2020), with Psi parameters on this rank (the
    experts split over ep_size ranks), dp ranks sharing the dense parameters and dp/ep_size the
    experts: weights p bytes each (4 fp32, 2 bf16/fp16), gradients p bytes, fp32 master weights 4
    (ZeRO 1-3 keep a fp32 partition even in fp32) and Adam's two moments 8. Stage 1 divides the
    optimizer states (master + moments) by the data-parallel size, stage 2 the gradients too,
    stage 3 the weights too. The DeepSpeed buckets (reduce/allgather) are added once.

    Activations kept for backward, per token and layer, in elements (x activation bytes):
    attention ~ 10 D + 3 kv_dim + n_head, the MoE layer ~ K (3 D + 4 F) + 3 E on the stacked
    backends, or E * capacity (3 D + 4 F) / N on DeepSpeed's (its dispatch buffer is [E, C, D],
    and with no capacity C is the busiest expert's count, all N tokens under the forced skew);
    the head ~ 3 V fp32 (logits, their fp32 copy, log-softmax). Activation checkpointing keeps D
    per layer plus one recomputed layer. One more layer's worth is added for the backward's
    temporaries.
    """
    m, moe, t = cfg.model, cfg.moe, cfg.train
    D, L, V, T = m.n_embd, m.n_layer, m.vocab_size, m.block_size
    E, K, Fh = moe.num_experts, moe.top_k, moe.expert_ffn_size
    kv = m.num_kv_heads * m.head_dim
    p = 4 if t.dtype == "fp32" else 2
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    ep = t.ep_size if moe.moe_backend == "deepspeed" else 1
    dp, dp_exp = world_size, max(1, world_size // ep)
    moe_layers = [i for i in range(L) if moe.is_moe_layer(i)]
    n_moe, n_dense = len(moe_layers), L - len(moe_layers)
    attn = D * D + 2 * D * kv + D * D + 2 * D  # wq, wk+wv, wo, two norms
    dense_mlp = 3 * D * moe.dense_hidden
    expert = 3 * D * Fh
    shared = 3 * D * moe.num_shared_experts * Fh
    psi_dense = V * D * (1 if m.tie_embeddings else 2) + D + L * attn + n_dense * dense_mlp \
        + n_moe * (E * D + shared)
    psi_exp = n_moe * E * expert / ep  # this rank's experts

    def states(psi: float, dpn: int) -> dict[str, float]:
        weights = psi * p / (dpn if stage >= 3 else 1)
        grads = psi * p / (dpn if stage >= 2 else 1)
        master = 0.0 if (stage == 0 and p == 4) else psi * 4 / (dpn if stage >= 1 else 1)
        moments = psi * 8 / (dpn if stage >= 1 else 1)
        return {"weights": weights, "grads": grads, "master": master, "moments": moments}

    sd, se = states(psi_dense, dp), states(psi_exp, dp_exp)
    out = {k: sd[k] + se[k] for k in sd}
    zo = ds.get("zero_optimization") or {}
    if stage >= 1:
        bucket = min(float(zo.get("reduce_bucket_size", 5e8)), psi_dense + psi_exp)
        out["buckets"] = bucket * 4
    else:
        out["buckets"] = 0.0

    N = micro_batch * T
    a = p  # activation bytes
    per_tok_attn = 10 * D + 3 * kv + m.n_head
    if moe.moe_backend == "deepspeed":
        cap = N if moe.capacity_factor is None else max(1, math.ceil(N / E * moe.capacity_factor * K))
        per_tok_moe = E * cap * (3 * D + 4 * Fh) / N + 3 * E + 2 * D
    else:
        per_tok_moe = K * (3 * D + 4 * Fh) + 3 * E + 2 * D
    per_tok_dense = 4 * moe.dense_hidden + 2 * D
    per_tok_shared = 4 * moe.num_shared_experts * Fh if moe.num_shared_experts else 0
    layer_elems = [per_tok_attn + (per_tok_moe + per_tok_shared if i in moe_layers else per_tok_dense)
                   for i in range(L)]
    if t.gradient_checkpointing:
        kept = N * (L * D + max(layer_elems)) * a
    else:
        kept = N * sum(layer_elems) * a
    out["activations"] = kept + N * max(layer_elems) * a  # + one layer of backward temporaries
    out["head"] = N * (3 * V * 4 + V * a)
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- measurement

def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class TrialSpec:
    micro_batch: int
    config: Optional[str]
    preset: Optional[str]
    overrides: list[str]
    deepspeed_config: str
    device: str  # cuda | cpu
    router_skew: float
    result: str  # where this rank writes its JSON


def trial_ds_config(ds: dict) -> dict:
    """The user's DeepSpeed config for one trial: the batch fields "auto" (filled from the trial's
    micro-batch by build_engine), the monitors off (a trial writes nothing into out_dir)."""
    from blues.ds_config import MONITORS
    ds = copy.deepcopy(ds)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        ds[key] = "auto"
    for name in MONITORS:
        if isinstance(ds.get(name), dict):
            ds[name] = {"enabled": False}
    return ds


def run_trial(spec: TrialSpec) -> int:
    """One rank of one trial (its own process): build, force the skew, run TRIAL_STEPS optimizer steps
    of TRIAL_ACCUM micro-steps on random tokens, write {"ok", "peak", ...} to spec.result."""
    import torch

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    result: dict[str, Any] = {"rank": rank, "micro_batch": spec.micro_batch, "ok": False}

    def write(res: dict) -> None:
        tmp = spec.result + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, spec.result)

    cuda = spec.device == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        result["device_total"] = total
        result["baseline"] = total - free  # CUDA context and anything else already on the device
    else:
        result["baseline"] = current_rss()
    t0 = time.perf_counter()
    try:
        import deepspeed  # noqa: F401  (imported before the CPU baseline: the runtime is not the model)
        from blues import train
        from blues.ds_config import load_ds_config
        from blues.submit import load_blues_config
        if not cuda:
            result["baseline"] = current_rss()
        cfg = load_blues_config(spec.config, spec.preset, spec.overrides)
        cfg = cfg.replace(micro_batch_size=spec.micro_batch, grad_accum=TRIAL_ACCUM)
        # The same build as training (ordered apply_* steps, ZeRO, activation checkpointing, expert
        # parallelism), without the corpus: train_steps feeds random tokens.
        run = train.build_engine(cfg, trial_ds_config(load_ds_config(spec.deepspeed_config)), with_data=False)
        if spec.router_skew > 0:
            result["skewed_layers"] = install_router_skew(run.model, spec.router_skew).layers
        else:  # router_skew 0: real routing (benchmarks compare against it)
            result["skewed_layers"] = 0
        steps = train.train_steps(run, TRIAL_STEPS)
        result["loss"] = steps[-1].loss
        if cuda:
            torch.cuda.synchronize()
            result["peak"] = torch.cuda.max_memory_reserved() + result["baseline"]
            result["peak_allocated"] = torch.cuda.max_memory_allocated()
        else:
            result["peak"] = peak_rss()
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 -- every failure of a trial is a result, reported and survived
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        result.update(ok=False, oom=oom, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if cuda:
            result["peak"] = torch.cuda.max_memory_reserved() + result["baseline"]
        else:
            result["peak"] = peak_rss()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    write(result)
    sys.stdout.flush()
    sys.stderr.flush()
    # NOTE: skip interpreter teardown: a rank whose peer failed can block in process-group shutdown.
    os._exit(0 if result["ok"] else (EXIT_OOM if result.get("oom") else 1))


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


class Coordinator:
    """One per rank: runs the search in lockstep with the other ranks; each trial is a fresh process."""

    def __init__(self, args: argparse.Namespace):
        from torch.distributed import TCPStore
        self.args = args
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.addr = os.environ["MASTER_ADDR"]
        self.port = int(os.environ["MASTER_PORT"])
        self.store = TCPStore(self.addr, self.port, self.world, self.rank == 0,
                              timedelta(seconds=args.trial_timeout + 120))
        budgets = parse_budgets(args.memory_budget, self.world)
        self.budget = budgets[self.rank] if budgets else None
        self.trials_dir = os.path.join(args.out_dir, "trials")
        os.makedirs(self.trials_dir, exist_ok=True)
        self.trials: list[dict] = []
        self.count = 0
        self.t0 = time.perf_counter()
        from blues.ds_config import load_ds_config
        from blues.submit import load_blues_config
        self.cfg = load_blues_config(args.config, args.preset, args.overrides)
        self.ds = load_ds_config(args.deepspeed_config)

    def _limit(self, res: dict) -> int:
        budget = self.budget if self.budget is not None else res.get("device_total")
        if budget is None:  # CPU without a budget: this machine's memory shared by its local ranks
            budget = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // int(os.environ.get("LOCAL_SIZE", 1))
        return int(self.args.headroom * budget)

    def _run_local(self, i: int, b: int) -> dict:
        result = os.path.join(self.trials_dir, f"b{b:05d}.rank{self.rank}.json")
        logf = os.path.join(self.trials_dir, f"b{b:05d}.rank{self.rank}.log")
        for p in (result,):
            if os.path.exists(p):
                os.remove(p)
        spec = TrialSpec(b, self.args.config, self.args.preset, self.args.overrides, self.args.deepspeed_config, self.args.device,
                         self.args.router_skew, result)
        env = dict(os.environ, MASTER_PORT=str(self.port + 1 + i))
        cmd = [sys.executable, "-m", "blues.memory_probe", "--_trial", json.dumps(spec.__dict__)]
        t0 = time.monotonic()
        with open(logf, "w") as lf:
            proc = subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
            why = None
            while proc.poll() is None:
                time.sleep(0.2)
                if self.store.check([f"t{i}/failed"]):
                    why = "stopped: another rank's trial failed"
                elif time.monotonic() - t0 > self.args.trial_timeout:
                    why = f"timed out after {self.args.trial_timeout} s"
                if why:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        res: dict[str, Any] = {"rank": self.rank, "micro_batch": b, "ok": False}
        if os.path.exists(result):
            with open(result) as f:
                res = json.load(f)
        elif why is None:
            tail = ""
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
                trial["marginal"] = {"from_micro_batch": prev["micro_batch"], "measured": d_meas, "estimate": int(d_est),
                                     "error": round((d_est - d_meas) / d_meas, 4) if d_meas > 0 else None}
        self.trials.append(trial)
        if self.rank == 0:
            self._print_trial(trial)
        return trial["fits"]

    def _print_trial(self, trial: dict) -> None:
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

    def run(self) -> int:
        answer = (search_linear if self.args.search == "linear" else search)(self.fits, self.args.max_micro_batch)
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
        cfg, args = self.cfg, self.args
        T = cfg.model.block_size
        if answer == 0:
            first = self.trials[0]
            why = "; ".join(f"rank {r['rank']}: " + (f"peak {format_bytes(r['peak'])} > limit {format_bytes(r['limit'])}"
                                                      if r["ok"] else r.get("error", "failed")) for r in first["ranks"])
            report = {"micro_batch_size": 0, "error": f"micro_batch_size=1 does not fit: {why}",
                      "trials": self.trials, "headroom": args.headroom}
            _write_json(os.path.join(args.out_dir, "report.json"), report)
            print(f"blues-probe: error: micro_batch_size=1 does not fit ({why}); see {args.out_dir}/report.json",
                  file=sys.stderr, flush=True)
            return
        target = args.target_tokens or cfg.train.micro_batch_size * cfg.train.grad_accum * self.world * T
        accum = grad_accum_for(target, answer, T, self.world)
        ds_out = probed_ds_config(self.ds, answer, accum, self.world)
        # Check the written config the way training will read it.
        from blues.ds_config import resolve_ds_config
        resolve_ds_config(ds_out, cfg.replace(micro_batch_size=answer, grad_accum=accum), self.world)
        chosen = next(t for t in self.trials if t["micro_batch"] == answer)
        above = [t for t in self.trials if t["micro_batch"] > answer]
        report = {
            "micro_batch_size": answer,
            "grad_accum": accum,
            "train_batch_size": answer * accum * self.world,
            "global_batch_tokens": answer * accum * self.world * T,
            "target_tokens": target,
            "world_size": self.world,
            "device": args.device,
            "headroom": args.headroom,
            "limits_by_rank": [r["limit"] for r in chosen["ranks"]],
            "budget": args.memory_budget,
            "router_skew": args.router_skew,
            "search": args.search,
            "answers_by_rank": answers,
            "agreed_by_rank": agreed_by_rank,
            "capped_at_max_micro_batch": answer >= args.max_micro_batch,
            "next_larger_tried": min((t["micro_batch"] for t in above), default=None),
            "seconds": round(time.perf_counter() - self.t0, 1),
            "ds_config": os.path.join(args.out_dir, "ds_config.json"),
            "config": args.config,
            "overrides": args.overrides,
            "trials": self.trials,
        }
        _write_json(os.path.join(args.out_dir, "ds_config.json"), ds_out)
        _write_json(os.path.join(args.out_dir, "report.json"), report)
        print(f"blues-probe: micro_batch_size={answer} grad_accum={accum} (global batch "
              f"{report['global_batch_tokens']} tokens for a target of {target}; {len(self.trials)} trials in "
              f"{report['seconds']} s); wrote {report['ds_config']} and {args.out_dir}/report.json", flush=True)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- CLI

class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (and --help for the rest)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="blues-probe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Blues config overrides (as for training)")
    p.add_argument("--config", help="a YAML/JSON file of Blues config fields (as for blues-train)")
    p.add_argument("--preset", help="tiny (default) or blues01, instead of --config")
    p.add_argument("--deepspeed_config", required=True, help="the DeepSpeed JSON training will use")
    p.add_argument("--nproc_per_node", "--num_gpus", dest="nproc_per_node", type=int, default=None,
                   help="ranks on this node (default: the visible GPUs, or 1 on CPU)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node_rank", type=int, default=0)
    p.add_argument("--master_addr", default="127.0.0.1")
    p.add_argument("--master_port", type=int, default=None, help="the probe's store; trials use the ports above it")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--memory_budget", help="bytes per rank instead of the device's memory (required meaning on "
                                           "CPU): 3GB, 2.5GiB, ...; or one per rank, comma-separated")
    p.add_argument("--headroom", type=float, default=0.9, help="fraction of the budget a trial may use")
    p.add_argument("--target_tokens", type=int, help="global batch in tokens (default: the config's)")
    p.add_argument("--router_skew", type=float, default=1.0,
                   help="fraction of tokens forced onto the fewest experts the capacity allows (1 = all, "
                        "0 = real routing)")
    p.add_argument("--search", choices=("bisect", "linear"), default="bisect",
                   help="bisect: growth 1, 2, 4, ... then binary search; linear: every size from 1 (the true "
                        "maximum, slow; for benchmarks)")
    p.add_argument("--max_micro_batch", type=int, default=DEFAULT_MAX_MICRO_BATCH)
    p.add_argument("--trial_timeout", type=int, default=900, help="seconds before a trial counts as failed")
    p.add_argument("--out_dir", help="where report.json and ds_config.json go (default: <out_dir>/probe)")
    p.add_argument("--_coordinator", action="store_true", help=argparse.SUPPRESS)
    return p


def validate(args: argparse.Namespace) -> None:
    """Everything a user can get wrong, before any process starts: ValueError naming it."""
    from blues.ds_config import load_ds_config, resolve_ds_config
    from blues.submit import load_blues_config
    for name in ("nnodes", "max_micro_batch", "trial_timeout"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} is invalid: expected a positive integer")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise ValueError(f"--nproc_per_node {args.nproc_per_node} is invalid: expected a positive integer")
    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node_rank {args.node_rank} is invalid: expected 0 .. {args.nnodes - 1}")
    if not 0 < args.headroom <= 1:
        raise ValueError(f"--headroom {args.headroom} is invalid: expected a fraction in (0, 1]")
    if not 0 <= args.router_skew <= 1:
        raise ValueError(f"--router_skew {args.router_skew} is invalid: expected a fraction in [0, 1]")
    if args.target_tokens is not None and args.target_tokens < 1:
        raise ValueError(f"--target_tokens {args.target_tokens} is invalid: expected a positive integer")
    # The config first: it needs no torch (a second to import), and it is where most mistakes are.
    cfg = load_blues_config(args.config, args.preset, args.overrides)
    ds = load_ds_config(args.deepspeed_config)
    if args.device != "cpu":
        import torch
        cuda = torch.cuda.is_available()
        if args.device == "cuda" and not cuda:
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu with --memory_budget")
        args.device = "cuda" if cuda else "cpu"
        if cuda and (args.nproc_per_node or 0) > torch.cuda.device_count():
            raise ValueError(f"--nproc_per_node {args.nproc_per_node} exceeds the {torch.cuda.device_count()} "
                             "visible GPU(s)")
        if args.nproc_per_node is None:
            args.nproc_per_node = torch.cuda.device_count() if cuda else 1
    elif args.nproc_per_node is None:
        args.nproc_per_node = 1
    world = args.nnodes * args.nproc_per_node
    parse_budgets(args.memory_budget, world)
    if cfg.train.ep_size > 1 and world % cfg.train.ep_size:
        raise ValueError(f"ep_size={cfg.train.ep_size} does not divide the probe's world size {world} "
                         f"({args.nnodes} node(s) x {args.nproc_per_node}): probe with the layout training uses")
    resolve_ds_config(ds, cfg, world)
    if args.out_dir is None:
        args.out_dir = os.path.join(cfg.train.out_dir, "probe")
    args.out_dir = os.path.abspath(args.out_dir)
    if args.config is not None and os.path.isfile(args.config):
        args.config = os.path.abspath(args.config)
    args.deepspeed_config = os.path.abspath(args.deepspeed_config)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def coordinator_argv(args: argparse.Namespace) -> list[str]:
    """The resolved arguments, for the coordinators: every rank sees the same choices."""
    out = []
    for name in ("config", "preset", "deepspeed_config", "nproc_per_node", "nnodes", "node_rank", "master_addr", "device",
                 "memory_budget", "headroom", "target_tokens", "router_skew", "search", "max_micro_batch", "trial_timeout",
                 "out_dir"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name}", str(value)]
    return out + list(args.overrides)


def launch_local(args: argparse.Namespace, argv: list[str]) -> int:
    """Start this node's coordinators (one per rank, like torchrun) and wait for them."""
    os.makedirs(args.out_dir, exist_ok=True)
    world = args.nnodes * args.nproc_per_node
    port = args.master_port or _free_port()
    procs = []
    for i in range(args.nproc_per_node):
        env = dict(os.environ, RANK=str(args.node_rank * args.nproc_per_node + i), LOCAL_RANK=str(i),
                   WORLD_SIZE=str(world), LOCAL_SIZE=str(args.nproc_per_node), MASTER_ADDR=args.master_addr,
                   MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "blues.memory_probe", "--_coordinator", *argv]
        procs.append(subprocess.Popen(cmd, env=env))

    def stop(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.terminate()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rc = 0
    while procs and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            for p in procs:  # a coordinator died: the others would wait for it forever
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.2)
    for p in procs:
        rc = max(rc, p.wait())
    return rc


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_trial"]:
        return run_trial(TrialSpec(**json.loads(argv[1])))
    args = build_parser().parse_intermixed_args(argv)
    try:
        validate(args)
        if args._coordinator:
            return Coordinator(args).run()
        rc = launch_local(args, coordinator_argv(args))
    except ValueError as e:
        print(f"blues-probe: error: {e}", file=sys.stderr)
        return 2
    if rc != 0:
        print(f"blues-probe: error: the probe failed (exit {rc}); trials' logs are in {args.out_dir}/trials",
              file=sys.stderr)
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
