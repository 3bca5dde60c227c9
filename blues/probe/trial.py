"""One trial of the memory probe: one rank, one micro-batch size, one fresh process.

A trial is a whole training step (forward, backward, optimizer step) at micro-batch b, built the
way training builds it (blues.train.build_engine: ZeRO stage, activation checkpointing, expert
parallelism), with the router forced to its worst allowed imbalance (blues.moe.forced_routing).
Being its own process, a failed trial (an OOM, a killed rank) leaves nothing behind for the next:
no fragmented allocator, no half-built process group, and the CPU peak (ru_maxrss, monotone per
process) belongs to this trial alone.

Run by the coordinator as `python -m blues.probe trial SPEC_JSON`.
"""
from __future__ import annotations

import contextlib
import copy
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from blues.common import atomic_write_json

# Micro-steps per trial step: the second forward runs while the first's gradients are held.
TRIAL_GRAD_ACCUM = 2
# Optimizer steps per trial: the first allocates the optimizer states, the second runs with them.
TRIAL_STEPS = 2
EXIT_OOM = 3  # a trial process's exit code when it ran out of memory (the result file says so too)


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
    router_skew: float  # 0: real routing (benchmarks compare against it)
    result: str  # where this rank writes its JSON

    def to_json(self) -> dict:
        return asdict(self)


def trial_ds_config(ds: dict) -> dict:
    """The user's DeepSpeed config for one trial: the batch fields "auto" (filled from the trial's
    micro-batch by build_engine), the monitors off (a trial writes nothing into out_dir)."""
    from blues.train.ds_config import MONITORS
    ds = copy.deepcopy(ds)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        ds[key] = "auto"
    for name in MONITORS:
        if isinstance(ds.get(name), dict):
            ds[name] = {"enabled": False}
    return ds


def run_trial(spec: TrialSpec) -> int:
    """One rank of one trial (its own process): build, force the routing, run TRIAL_STEPS optimizer
    steps of TRIAL_GRAD_ACCUM micro-steps on random tokens, write {"ok", "peak", ...} to spec.result.

    Does not return: the process ends with os._exit (0 ok, EXIT_OOM, or 1)."""
    import torch

    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    result: dict[str, Any] = {"rank": rank, "micro_batch": spec.micro_batch, "ok": False}
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

        from blues.moe import forced_routing
        from blues.presets import load_config
        from blues.train import build_engine, train_steps
        from blues.train.ds_config import load_ds_config
        if not cuda:
            result["baseline"] = current_rss()
        cfg = load_config(spec.config, spec.preset, spec.overrides)
        cfg = cfg.replace(micro_batch_size=spec.micro_batch, grad_accum=TRIAL_GRAD_ACCUM)
        # The same build as training, without the corpus: train_steps feeds random tokens.
        run = build_engine(cfg, trial_ds_config(load_ds_config(spec.deepspeed_config)), with_data=False)
        forcing = forced_routing(run.model, spec.router_skew) if spec.router_skew > 0 else contextlib.nullcontext(0)
        with forcing as layers:
            result["skewed_layers"] = layers
            steps = train_steps(run, TRIAL_STEPS)
        result["loss"] = steps[-1].loss
        if cuda:
            torch.cuda.synchronize()
            result["peak_allocated"] = torch.cuda.max_memory_allocated()
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 -- every failure of a trial is a result, reported and survived
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        result.update(ok=False, oom=oom, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    result["peak"] = torch.cuda.max_memory_reserved() + result["baseline"] if cuda else peak_rss()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(spec.result, result)
    sys.stdout.flush()
    sys.stderr.flush()
    # NOTE: skip interpreter teardown: a rank whose peer failed can block in process-group shutdown.
    os._exit(0 if result["ok"] else (EXIT_OOM if result.get("oom") else 1))
