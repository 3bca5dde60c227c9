"""Balancing without an auxiliary loss: DeepSeek-V3's per-expert selection bias (arXiv:2412.19437, 2.1.2).

Shapes: L MoE layers, E experts.

With MoEConfig.balance_bias_rate = gamma > 0, every stacked MoE layer adds its bias (E,) to the router
scores when it selects its top-k experts, and only then (kernels/moe_route.py: the combine weights,
the aux loss and the z-loss never see it). After each optimizer step that was applied (a step skipped
for a non-finite loss or a loss-scale overflow moves nothing), with c[l, e] the assignments layer l
routed to expert e during the step, before any capacity drop, summed over the step's micro-batches
and over every rank:

    bias[l, e] += gamma * sign(mean_e' c[l, e'] - c[l, e])

so an expert chosen more often than the mean becomes less attractive by gamma, one chosen less often
more attractive, and one exactly at the mean keeps its bias (sign 0; compared in integers,
sum_e' c[l, e'] against E * c[l, e], so a tie is exact).

Every rank holds the same bias without a broadcast: train_step adds the counts to the one all-reduce
it already makes for its metrics (an (L, E) block of it, over the world group: every data- and
expert-parallel rank), and each rank then applies the same fp32 update to the same fp32 bias. The
counts are per source rank, the tokens a rank routed over all E experts, so the rule is the same with
and without expert parallelism.

State: the bias lives in each layer's `selection_bias` buffer, kept in fp32 (a bf16 engine casts
buffers to bf16, whose 8 significant bits round a step of gamma = 1e-3 away entirely once |bias| >= 0.5;
each update reassigns the buffer in fp32). Checkpoints carry it in client_state["blues"]["balance_bias"], an (L, E)
fp32 tensor (blues.train.checkpoint), restored bit for bit on resume; it is not a persistent buffer
because a universal (resharded) load never reads the module state.

Generation keeps the bias. The router was trained with it: the bias is what offsets the router's lasting
preferences, so routing without it sends tokens to experts other than those they were trained with
(DeepSeek-V3 keeps it for inference too, Hugging Face's `e_score_correction_bias`). save_pretrained writes
each layer's bias as blocks.<i>.mlp.selection_bias when balance_bias_rate > 0, and from_pretrained loads
it, so a model generates with the experts its last training step would have chosen.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def biased_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE layers that select with a bias, in block order (the rows of BluesOutput.expert_selected)."""
    return [m for m in model.modules() if getattr(m, "use_selection_bias", False)]


def get_bias(model: nn.Module) -> Optional[torch.Tensor]:
    """(L, E) fp32 CPU copy of every biased layer's bias, or None when the model selects without one."""
    layers = biased_layers(model)
    if not layers:
        return None
    return torch.stack([m.selection_bias.detach().float().cpu() for m in layers]).clone()


def set_bias(model: nn.Module, bias: torch.Tensor) -> None:
    """Put an (L, E) bias (from get_bias or a checkpoint) into the model's layers, in fp32."""
    layers = biased_layers(model)
    E = layers[0].selection_bias.numel() if layers else 0
    if tuple(bias.shape) != (len(layers), E):
        raise ValueError(f"balance bias of shape {tuple(bias.shape)} does not fit this model's {len(layers)} biased "
                         f"MoE layers of {E} experts: the checkpoint belongs to another model layout")
    for m, b in zip(layers, bias):
        m.selection_bias = b.detach().to(device=m.selection_bias.device, dtype=torch.float32).clone()


def restore_bias(model: nn.Module, bias: Optional[torch.Tensor]) -> None:
    """The bias a checkpoint saved (client_state["blues"]["balance_bias"]), back in the model bit for
    bit. A checkpoint without one (balancing was off) leaves the bias at zero; a model without
    balancing ignores a saved one (balance_bias_rate changed to 0: a compatible change, listed at resume)."""
    if bias is not None and biased_layers(model):
        set_bias(model, bias)


def next_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """The update rule: bias (L, E) fp32, counts (L, E) whole numbers of any dtype -> the new (L, E) fp32 bias."""
    c = counts.to(torch.int64)  # exact: counts of one step are far below 2^53 even when summed in float64
    assert torch.equal(c.to(counts.dtype), counts), "selection counts must be whole numbers"
    direction = torch.sign(c.sum(dim=1, keepdim=True) - c * c.shape[1])  # (L, E) sign(mean - count), in integers
    # counts arrive on the CPU (train_step's all-reduced sums): only the (L, E) signs go to the bias's device
    return bias.float() + gamma * direction.to(device=bias.device, dtype=torch.float32)


def update_bias(model: nn.Module, counts: torch.Tensor, gamma: float) -> None:
    """Apply the rule to every biased layer with this step's all-reduced selection counts (L, E)."""
    layers = biased_layers(model)
    assert len(layers) == counts.shape[0], (
        f"{len(layers)} MoE layers select with a bias but the step counted {counts.shape[0]}: "
        "balance_bias_rate > 0 must switch use_selection_bias on in every stacked MoE layer")
    for m, c in zip(layers, counts):
        b = m.selection_bias.float()
        m.selection_bias = next_bias(b.view(1, -1), c.view(1, -1), gamma).view(-1)


def max_over_mean(counts: torch.Tensor) -> float:
    """Load imbalance of (L, E) counts: the largest max_e c[l, e] / mean_e c[l, e] over layers (1.0 = even)."""
    c = counts.double()
    return (c.max(dim=1).values / c.mean(dim=1).clamp_min(1e-12)).max().item()
