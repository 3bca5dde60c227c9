"""The Blues MoE layer (stacked backends): noisy top-k router, SwiGLU experts stored stacked, sort-based dispatch.

Shapes: B batch, T tokens per sequence, N = B*T tokens, D width, E experts, K top-k,
S = N*K assignments, F expert hidden size.

Dispatch never builds an [N, E, capacity] tensor and never loops over per-expert modules:
token copies are ordered by expert (moe_permute_indices), the gate and up projections run as one
grouped op that gathers the token rows itself (moe_grouped_swiglu, by definition moe_permute then
moe_grouped_gemm twice), and the down projection sums each token's K weighted outputs
(moe_grouped_down_combine, by definition moe_grouped_gemm then moe_unpermute_combine). The torch
backend runs the plain-torch references of those ops; the Triton backend runs the kernels of the
same names (kernels/, installed as blues.kernels).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from blues.config import BluesConfig, MoEConfig
from blues.kernels.moe_route import load_balancing_loss, z_loss
from blues.moe.ops import resolve_moe_ops
from blues.moe.routing import forced_route


class MoEOutput(NamedTuple):
    out: torch.Tensor  # (B, T, D)
    aux_loss: torch.Tensor  # scalar, unweighted Switch load-balancing loss
    z_loss: torch.Tensor  # scalar, unweighted router z-loss
    counts: torch.Tensor  # (E,) long, assignments each expert computed (after capacity)
    dropped: torch.Tensor  # scalar long, assignments dropped by capacity


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: down(silu(x @ gate) * (x @ up)). Used for dense layers and shared experts."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.dropout(F.silu(self.w_gate(x)) * self.w_up(x)))


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights: one parameter per projection, so ZeRO-3 gathers every
    expert with the module whatever the routing, and grouped kernels see one tensor."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden))  # (E, D, F)
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, hidden))  # (E, D, F)
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))  # (E, F, D)


class MoE(nn.Module):
    def __init__(self, config: BluesConfig):
        super().__init__()
        m: MoEConfig = config.moe
        self.cfg = m
        D = config.model.n_embd
        self.router = nn.Linear(D, m.num_experts, bias=False)  # weight (E, D)
        self.experts = Experts(m.num_experts, D, m.expert_ffn_size)
        self.shared = SwiGLU(D, m.num_shared_experts * m.expert_ffn_size) if m.num_shared_experts else None
        # Selection-only bias (DeepSeek-V3 balancing); zero unless a training loop adjusts it.
        self.register_buffer("selection_bias", torch.zeros(m.num_experts), persistent=False)
        self.use_selection_bias = False
        # Forced routing (blues.moe.routing.forced_routing): the share of tokens sent to the fewest
        # experts the capacity allows, or None for the router's own choice.
        self.forced_skew: Optional[float] = None

    def set_forced_routing(self, skew: Optional[float]) -> None:
        """Part of the forced-routing protocol (blues.moe.routing): route like the worst allowed
        imbalance for `skew` of the tokens from the next forward on; None restores real routing."""
        self.forced_skew = skew

    def forward(self, x: torch.Tensor) -> MoEOutput:
        B, T, D = x.shape
        m = self.cfg
        E, K = m.num_experts, m.top_k
        xf = x.reshape(B * T, D)  # (N, D)
        N = xf.shape[0]
        ops = resolve_moe_ops(m.moe_backend, x.device)
        cap = m.capacity(N)

        logits = F.linear(xf.float(), self.router.weight.float())  # (N, E) fp32
        if self.training and m.router_noise_std > 0:
            logits = logits + torch.randn_like(logits) * m.router_noise_std
        kw = dict(score_func=m.router_score_func, norm_topk_prob=m.norm_topk_prob,
                  selection_bias=self.selection_bias if self.use_selection_bias else None)
        if self.forced_skew is None:
            r = ops.moe_route(logits, K, **kw)
        else:
            r = forced_route(ops.moe_route, logits, K, cap, self.forced_skew, **kw)
        aux = load_balancing_loss(r.counts, r.prob_sum, N, K)
        zl = z_loss(r.lse)

        topk_ids, weights = r.topk_ids, r.topk_weights  # (N, K) each
        idx = ops.moe_permute_indices(topk_ids, E)
        if cap is not None:
            # Position of each assignment inside its expert's block (stable: earlier tokens first);
            # assignments past the capacity are dropped: id E sorts them after every expert.
            rank = idx.inverse - idx.expert_offsets[topk_ids.reshape(-1)]  # (S,)
            keep = (rank < cap).view(N, K)
            topk_ids = torch.where(keep, topk_ids, torch.full_like(topk_ids, E))
            weights = weights * keep
            idx = ops.moe_permute_indices(topk_ids, E)
            dropped = (~keep).sum()
        else:
            dropped = torch.zeros((), dtype=torch.long, device=x.device)

        ex = self.experts
        # Token rows are gathered inside the up-projection (no (S, D) copy of x), and the down
        # projection sums each token's K weighted rows itself (no (S, D) expert output).
        h = ops.moe_grouped_swiglu(xf, idx.expert_offsets, ex.w_gate, ex.w_up, idx.sorted_slots, K)  # (S, F)
        if self.training and m.expert_dropout > 0:
            h = F.dropout(h, p=m.expert_dropout)
        out = ops.moe_grouped_down_combine(h, idx.expert_offsets, ex.w_down, idx.inverse, weights)  # (N, D)
        if self.shared is not None:
            out = out + self.shared(xf)
        counts = idx.expert_offsets[1:] - idx.expert_offsets[:-1]  # (E,)
        return MoEOutput(out.view(B, T, D), aux, zl, counts, dropped)

