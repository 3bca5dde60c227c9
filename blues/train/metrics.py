"""What a training step reports: FLOPs per token, the peak FLOP/s of a rank, MFU, the console line
and the monitor events (DeepSpeed's csv_monitor / tensorboard), per-MoE-layer expert telemetry.

MFU = flops_per_token * tokens/s / (peak FLOP/s per rank * ranks), flops_per_token from
Blues.flops_per_token(): 6 * active parameters + 12 * n_layer * n_head * head_dim * block_size (forward and
backward). Peak per rank: H100/H200 989 TFLOP/s (bf16/fp16 dense), 495 (tf32); A100 312 / 156;
CPU 150 GFLOP/s for the whole machine (fp32 matmul measured on the 2-core build machines) shared
by the local ranks; override with BLUES_PEAK_FLOPS (per rank).

Expert telemetry (shapes: L MoE layers, E experts), every log interval, from c[l, e], the assignments
layer l's router chose expert e for (before any capacity drop), summed over the steps since the last
log line. The counts come from train_step's one all-reduce over the world group (every data- and
expert-parallel rank; each rank counts its own tokens over all E experts, so the sum is the global
load, the same at every ep_size). Names are NeMo Automodel's (nemo_automodel/components/moe/
load_balance_metrics.py), so dashboards carry over; i is the block number (blocks.<i>.mlp):
    moe/layer_<i>/utilization_max|min   max_e, min_e of c[l, e] / ideal, ideal = sum_e c[l, e] / E
    moe/layer_<i>/dead_expert_frac      share of experts chosen by no token
    moe/layer_<i>/expert_diversity      exp(H) / E, H the entropy of p_e = c[l, e] / sum_e c[l, e]:
                                        1 uniform, 1/E one expert takes all, 0 no token at all
    moe/layer_<i>/cv                    std_e / mean_e of c[l, e] (unbiased std, as NeMo)
    moe/layer_<i>/dropped_frac          assignments the capacity dropped / assignments chosen
    moe/layer_<i>/bias_min|max|mean     the selection bias (balance_bias_rate > 0 only)
    moe_expert_utilization/layer_<i>_expert_<j>   every expert's c / ideal (NeMo logs only the top and
                                        bottom 5 under this prefix; blues-experts plot draws them all)
    moe/expert_utilization_min|max, moe/dead_expert_frac_mean, moe/expert_diversity_mean|min
                                        over all layers
The console line shows the worst layer: the lowest expert_diversity.
A vision run adds, at each evaluation, the per-modality load of its val batches (blues.train.modality):
    moe_modality_share/layer_<i>_image|text_expert_<j>, moe/layer_<i>/modality_tv, moe/modality_tv_mean|max
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Optional

import torch

from blues.config import BluesConfig
from blues.train.balance import get_bias

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
    m = cfg.model
    return int(6 * n + 12 * m.n_layer * m.n_head * m.head_dim * m.block_size)


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


def format_step(r: "StepResult", run: "Run", tokens_per_s: float, experts: Optional[dict[str, float]] = None) -> str:
    """The console line of one step; `experts` (expert_metrics of the log window) adds its worst layer."""
    if r.skipped:
        return (f"step {r.step}/{run.cfg.train.max_steps} | SKIPPED: non-finite loss "
                f"({run.bad_in_a_row} in a row, max_bad_steps={run.cfg.train.max_bad_steps})")
    # In the contrastive stage the model runs the caption rows and the images, not the B x T language-model
    # tokens that flops_per_token counts: no MFU is shown rather than a wrong one (it read 118 % on CPU).
    m = None if r.contrastive_mode == "only" else mfu(run, tokens_per_s)
    gn = f"{r.grad_norm:.3f}" if r.grad_norm is not None else "-"
    s = (f"step {r.step}/{run.cfg.train.max_steps} | loss {r.loss:.4f} (ce {r.ce_loss:.4f} aux {r.aux_loss:.4f} "
         f"z {r.z_loss:.4f}) | lr {r.lr:.2e} | gnorm {gn} | {tokens_per_s:,.0f} tok/s | MFU "
         f"{'-' if m is None else f'{100 * m:.2f}%'}")
    if experts:
        i = worst_layer(experts)
        g = lambda name: experts[f"moe/layer_{i}/{name}"]  # noqa: E731
        s += (f" | experts worst layer {i}: util {g('utilization_min'):.2f}-{g('utilization_max'):.2f} "
              f"dead {100 * g('dead_expert_frac'):.0f}% diversity {g('expert_diversity'):.3f}")
    if run.num_moe_layers:
        s += f" | dropped {100 * r.dropped_frac:.2f}%"
    if r.contrastive_mode:  # inside the contrastive stage ("only") or beside language modelling ("add")
        s += f" | contrastive {r.contrastive_loss:.4f} ({'stage' if r.contrastive_mode == 'only' else '+ LM'})"
    return s


def step_events(r: "StepResult", tokens_per_s: float,
                elapsed_s: Optional[float] = None) -> list[tuple[str, Optional[float], int]]:
    """The monitor events of one step: (name, value, step); elapsed_s: wall-clock seconds since train() began
    (what blues-experts plot draws the losses against)."""
    return [("Train/elapsed_s", elapsed_s, r.step), ("Train/loss", r.loss, r.step), ("Train/lr", r.lr, r.step),
            ("Train/grad_norm", r.grad_norm, r.step),
            ("Train/ce_loss", r.ce_loss, r.step), ("Train/aux_loss", r.aux_loss, r.step),
            ("Train/z_loss", r.z_loss, r.step), ("Train/tokens_per_s", tokens_per_s, r.step),
            ("Train/skipped", float(r.skipped), r.step), ("Train/expert_load_min", r.expert_load_min, r.step),
            ("Train/expert_load_max", r.expert_load_max, r.step), ("Train/dropped_frac", r.dropped_frac, r.step),
            ("Train/contrastive_loss", r.contrastive_loss, r.step)]  # NaN (left out) off the contrastive steps


def eval_events(ev: dict[str, float], step: int) -> list[tuple[str, Optional[float], int]]:
    """Eval/<name> of every measure evaluate() returned: val_loss, val_ppl, and with contrastive heads
    val_contrastive_loss, i2t_top1, t2i_top1 (the candidate count is a setting, not a measure)."""
    return [(f"Eval/{k}", v, step) for k, v in ev.items() if k != "retrieval_candidates"]


def format_eval(ev: dict[str, float], step: int) -> str:
    """The console line of an evaluation; with contrastive heads the top-1 retrieval among the candidates."""
    s = f"step {step}: val_loss {ev['val_loss']:.4f} val_ppl {ev['val_ppl']:.2f}"
    if "i2t_top1" in ev:
        s += (f" | val_contrastive_loss {ev['val_contrastive_loss']:.4f} | retrieval top-1 among "
              f"{ev['retrieval_candidates']}: image->text {100 * ev['i2t_top1']:.1f}% text->image "
              f"{100 * ev['t2i_top1']:.1f}%")
    return s


def write_events(run: "Run", events: list[tuple[str, Optional[float], int]]) -> None:
    """Hand the events to DeepSpeed's monitors (rank 0; None and NaN values left out)."""
    mon = getattr(run.engine, "monitor", None)
    if mon is not None and mon.enabled and run.dist.rank == 0:
        mon.write_events([(n, v, s) for n, v, s in events if v is not None and not math.isnan(v)])


# ----------------------------------------------------------------------------- expert telemetry

def expert_metrics(selected: torch.Tensor, kept: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   layer_ids: Optional[list[int]] = None) -> dict[str, float]:
    """selected (L, E) assignments chosen per expert (before capacity), kept (L, E) those computed (after it),
    bias (L, E) the selection bias -> the telemetry of the module docstring, keyed by monitor name."""
    c = selected.double()  # (L, E)
    L, E = c.shape
    ids = layer_ids if layer_ids is not None else list(range(L))
    total = c.sum(dim=1, keepdim=True)  # (L, 1)
    util = torch.where(total > 0, c * E / total.clamp_min(1e-300), torch.zeros_like(c))  # (L, E) load / ideal
    p = c / total.clamp_min(1e-300)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=1)  # (L,) nats
    diversity = torch.where(total[:, 0] > 0, entropy.exp() / E, torch.zeros_like(entropy))  # (L,)
    dead = (c == 0).double().mean(dim=1)  # (L,)
    mean = c.mean(dim=1)
    cv = torch.where(mean > 0, c.std(dim=1) / mean.clamp_min(1e-300), torch.zeros_like(mean)) if E > 1 else mean * 0
    m: dict[str, float] = {}
    for l, i in enumerate(ids):
        pre = f"moe/layer_{i}/"
        m[pre + "utilization_max"], m[pre + "utilization_min"] = util[l].max().item(), util[l].min().item()
        m[pre + "dead_expert_frac"], m[pre + "expert_diversity"] = dead[l].item(), diversity[l].item()
        m[pre + "cv"] = cv[l].item()
        if kept is not None:
            m[pre + "dropped_frac"] = (1.0 - kept[l].double().sum() / total[l, 0]).item() if total[l, 0] > 0 else 0.0
        if bias is not None:
            b = bias[l].double()
            m[pre + "bias_min"], m[pre + "bias_max"] = b.min().item(), b.max().item()
            m[pre + "bias_mean"] = b.mean().item()
        for j in range(E):
            m[f"moe_expert_utilization/layer_{i}_expert_{j}"] = util[l, j].item()
    m["moe/expert_utilization_min"], m["moe/expert_utilization_max"] = util.min().item(), util.max().item()
    m["moe/dead_expert_frac_mean"] = dead.mean().item()
    m["moe/expert_diversity_mean"], m["moe/expert_diversity_min"] = diversity.mean().item(), diversity.min().item()
    return m


def worst_layer(metrics: dict[str, float]) -> int:
    """Block number of the layer with the lowest expert_diversity in expert_metrics' output (first on a tie)."""
    div = {int(k.split("/")[1][len("layer_"):]): v for k, v in metrics.items()
           if k.startswith("moe/layer_") and k.endswith("/expert_diversity")}
    return min(div, key=lambda i: (div[i], i))


class ExpertWindow:
    """The (L, E) selected and kept counts summed over the steps since the last log line (skipped steps
    count nothing), turned into expert_metrics when the loop logs."""

    def __init__(self, run: "Run"):
        self.run, self.layer_ids = run, run.cfg.moe_layer_ids()
        self.selected: Optional[torch.Tensor] = None
        self.kept: Optional[torch.Tensor] = None

    def add(self, r: "StepResult") -> None:
        if r.expert_selected is None:
            return
        if self.selected is None:
            self.selected = torch.zeros_like(r.expert_selected, dtype=torch.float64)
            self.kept = None if r.expert_counts is None else torch.zeros_like(self.selected)
        self.selected += r.expert_selected
        if self.kept is not None and r.expert_counts is not None:
            self.kept += r.expert_counts

    def take(self) -> Optional[dict[str, float]]:
        """The window's metrics (None when no step counted), and a new window."""
        if self.selected is None:
            return None
        ids = self.layer_ids if len(self.layer_ids) == self.selected.shape[0] else None
        m = expert_metrics(self.selected, self.kept, get_bias(self.run.model), ids)
        self.selected = self.kept = None
        return m


def expert_events(metrics: Optional[dict[str, float]], step: int) -> list[tuple[str, Optional[float], int]]:
    """expert_metrics as monitor events."""
    return [(k, v, step) for k, v in (metrics or {}).items()]
