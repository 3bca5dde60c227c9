"""What a training step reports: FLOPs per token, the peak FLOP/s of a rank, MFU, the console line
and the monitor events (DeepSpeed's csv_monitor / tensorboard).

MFU = flops_per_token * tokens/s / (peak FLOP/s per rank * ranks), flops_per_token from
Blues.flops_per_token(): 6 * active parameters + 12 * n_layer * n_embd * block_size (forward and
backward). Peak per rank: H100/H200 989 TFLOP/s (bf16/fp16 dense), 495 (tf32); A100 312 / 156;
CPU 150 GFLOP/s for the whole machine (fp32 matmul measured on the 2-core build machines) shared
by the local ranks; override with BLUES_PEAK_FLOPS (per rank).
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Optional

import torch

from blues.config import BluesConfig

if TYPE_CHECKING:
    from blues.train.distributed import DistInfo
    from blues.train.engine import Run
    from blues.train.step import StepResult

# GPU name fragment -> (bf16/fp16 dense, tf32) peak FLOP/s
GPU_PEAK_FLOPS = {"H100": (989e12, 495e12), "H200": (989e12, 495e12), "GH200": (989e12, 495e12),
                  "A100": (312e12, 156e12), "L40S": (362e12, 183e12), "A10": (125e12, 62.5e12)}
CPU_PEAK_FLOPS = 150e9  # the whole machine


def flops_per_token(model: torch.nn.Module, cfg: BluesConfig) -> int:
    """Blues.flops_per_token's formula, counted so that ZeRO 3 partitions (ds_numel) and expert-parallel
    experts (E_loc of E per rank, DeepSpeed's or stacked; top_k of E active) give the same figure as the
    whole stacked model on one rank."""
    from blues.moe.deepspeed_moe import DS_EXPERT_RE
    K, E = cfg.moe.top_k, cfg.moe.num_experts
    E_loc = E // cfg.train.ep_size
    n = 0.0
    for name, p in model.named_parameters():
        numel = getattr(p, "ds_numel", p.numel())
        if "norm" in name or (name == "tok_emb.weight" and not cfg.model.tie_embeddings):
            continue
        if DS_EXPERT_RE.match(name) or ".experts." in name:  # this rank's E_loc experts stand for all E
            n += numel * K / E_loc
        else:
            n += numel
    return int(6 * n + 12 * cfg.model.n_layer * cfg.model.n_embd * cfg.model.block_size)


def peak_flops_per_rank(dist: "DistInfo", dtype: str) -> float:
    """Peak FLOP/s of one rank; 0.0 for an unknown GPU (MFU is then not reported)."""
    env = os.environ.get("BLUES_PEAK_FLOPS")
    if env:
        return float(env)
    if dist.device.type == "cuda":
        name = torch.cuda.get_device_name(dist.device)
        half = dtype in ("bf16", "fp16")
        for key, (p16, p32) in GPU_PEAK_FLOPS.items():
            if key in name:
                return p16 if half else p32
        return 0.0
    return CPU_PEAK_FLOPS / max(1, dist.nproc_per_node)


def mfu(run: "Run", tokens_per_s: float) -> Optional[float]:
    """Model FLOPs utilisation over all ranks; None when the peak is unknown."""
    if not run.peak_flops:
        return None
    return run.flops_per_token * tokens_per_s / (run.peak_flops * run.dist.world_size)


def format_step(r: "StepResult", run: "Run", tokens_per_s: float) -> str:
    """The console line of one step."""
    if r.skipped:
        return (f"step {r.step}/{run.cfg.train.max_steps} | SKIPPED: non-finite loss "
                f"({run.bad_in_a_row} in a row, max_bad_steps={run.cfg.train.max_bad_steps})")
    m = mfu(run, tokens_per_s)
    gn = f"{r.grad_norm:.3f}" if r.grad_norm is not None else "-"
    s = (f"step {r.step}/{run.cfg.train.max_steps} | loss {r.loss:.4f} (ce {r.ce_loss:.4f} aux {r.aux_loss:.4f} "
         f"z {r.z_loss:.4f}) | lr {r.lr:.2e} | gnorm {gn} | {tokens_per_s:,.0f} tok/s | MFU "
         f"{'-' if m is None else f'{100 * m:.2f}%'}")
    if run.num_moe_layers:
        s += (f" | experts min {r.expert_load_min:.3f} max {r.expert_load_max:.3f} "
              f"dropped {100 * r.dropped_frac:.2f}%")
    return s


def step_events(r: "StepResult", tokens_per_s: float) -> list[tuple[str, Optional[float], int]]:
    """The monitor events of one step: (name, value, step)."""
    return [("Train/loss", r.loss, r.step), ("Train/lr", r.lr, r.step), ("Train/grad_norm", r.grad_norm, r.step),
            ("Train/ce_loss", r.ce_loss, r.step), ("Train/aux_loss", r.aux_loss, r.step),
            ("Train/z_loss", r.z_loss, r.step), ("Train/tokens_per_s", tokens_per_s, r.step),
            ("Train/skipped", float(r.skipped), r.step), ("Train/expert_load_min", r.expert_load_min, r.step),
            ("Train/expert_load_max", r.expert_load_max, r.step), ("Train/dropped_frac", r.dropped_frac, r.step)]


def eval_events(ev: dict[str, float], step: int) -> list[tuple[str, Optional[float], int]]:
    return [("Eval/val_loss", ev["val_loss"], step), ("Eval/val_ppl", ev["val_ppl"], step)]


def write_events(run: "Run", events: list[tuple[str, Optional[float], int]]) -> None:
    """Hand the events to DeepSpeed's monitors (rank 0; None and NaN values left out)."""
    mon = getattr(run.engine, "monitor", None)
    if mon is not None and mon.enabled and run.dist.rank == 0:
        mon.write_events([(n, v, s) for n, v, s in events if v is not None and not math.isnan(v)])
