"""The Blues MoE layer (stacked backends): noisy top-k router, SwiGLU experts stored stacked, sort-based dispatch.

Shapes: B batch, T tokens per sequence, N = B*T tokens, D width, E experts, K top-k,
S = N*K assignments, F expert hidden size.

Under expert parallelism (ep_size > 1) a rank holds E_loc = E / ep_size experts and the token rows
travel to the rank of their expert and back through all-to-all exchanges (blues.moe.expert_parallel);
routing, the capacity cut and the losses stay local, as with data parallelism.

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
from blues.moe.expert_parallel import EPGroups, PlanReplay, ep_experts_forward, ep_groups
from blues.moe.ops import resolve_moe_ops
from blues.moe.routing import forced_route


class MoEOutput(NamedTuple):
    out: torch.Tensor  # (B, T, D)
    aux_loss: torch.Tensor  # scalar, unweighted Switch load-balancing loss
    z_loss: torch.Tensor  # scalar, unweighted router z-loss
    counts: torch.Tensor  # (E,) long, assignments each expert computed (after capacity)
    dropped: torch.Tensor  # scalar long, assignments dropped by capacity
    selected: torch.Tensor  # (E,) long, assignments each expert was chosen for (before capacity)


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
    expert with the module whatever the routing, and grouped kernels see one tensor.

    Under expert parallelism EP rank r holds the E_loc = E / ep_size experts [r*E_loc, (r+1)*E_loc)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, ep_size: int = 1, ep_rank: int = 0):
        super().__init__()
        E_loc = num_experts // ep_size
        self.num_experts, self.first = num_experts, ep_rank * E_loc
        self.w_gate = nn.Parameter(torch.empty(E_loc, d_model, hidden))  # (E_loc, D, F)
        self.w_up = nn.Parameter(torch.empty(E_loc, d_model, hidden))  # (E_loc, D, F)
        self.w_down = nn.Parameter(torch.empty(E_loc, hidden, d_model))  # (E_loc, F, D)

    @torch.no_grad()
    def normal_(self, name: str, std: float) -> None:
        """N(0, std^2) init of weight `name`: every rank draws the whole (E, ...) stack from the same
        seeded stream and keeps its slice, so expert g gets the same values at every ep_size and the
        stream after it is the same too (EP=1 and EP=2 start from equal weights)."""
        p = getattr(self, name)
        full = torch.empty((self.num_experts,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
        p.copy_(full.normal_(0.0, std)[self.first:self.first + p.shape[0]])


def build_shared_experts(m: MoEConfig, D: int) -> tuple[Optional[nn.Module], Optional[nn.Linear]]:
    """The shared experts of an MoE layer: one SwiGLU of m.shared_hidden, and with shared_expert_gate its
    (1, D) sigmoid gate (Qwen2-MoE); (None, None) without shared experts."""
    if not m.num_shared_experts:
        return None, None
    return SwiGLU(D, m.shared_hidden), (nn.Linear(D, 1, bias=False) if m.shared_expert_gate else None)


def shared_experts_output(shared: nn.Module, gate: Optional[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """shared(x), scaled per token by sigmoid(gate(x)) when gated. x (N, D) -> (N, D)."""
    y = shared(x)
    return y if gate is None else torch.sigmoid(gate(x)) * y


class MoE(nn.Module):
    def __init__(self, config: BluesConfig):
        super().__init__()
        m: MoEConfig = config.moe
        self.cfg = m
        D = config.model.n_embd
        self.router = nn.Linear(D, m.num_experts, bias=False)  # weight (E, D)
        # Expert parallelism: DeepSpeed's groups, created before the model (blues-train does).
        self.ep: Optional[EPGroups] = ep_groups(config.train.ep_size) if config.train.ep_size > 1 else None
        self.experts = Experts(m.num_experts, D, m.expert_ffn_size, config.train.ep_size,
                               self.ep.ep_rank if self.ep is not None else 0)
        # Under activation checkpointing the recompute reuses the forward's split plan (one host read per step).
        self.plan_replay: Optional[PlanReplay] = PlanReplay() if self.ep is not None else None
        self.shared, self.shared_gate = build_shared_experts(m, D)
        # Selection-only bias (DeepSeek-V3 balancing); zero unless a training loop adjusts it.
        self.register_buffer("selection_bias", torch.zeros(m.num_experts), persistent=False)
        # On whenever balance_bias_rate > 0, in training and generation alike; blues.train.balance moves
        # it after each optimizer step and reassigns the buffer (kept fp32), so hold no reference to it.
        self.use_selection_bias = m.balance_bias_rate > 0
        # Forced routing (blues.moe.routing.forced_routing): the share of tokens sent to the fewest
        # experts the capacity allows, or None for the router's own choice.
        self.forced_skew: Optional[float] = None

    def set_forced_routing(self, skew: Optional[float]) -> None:
        """Part of the forced-routing protocol (blues.moe.routing): route like the worst allowed
        imbalance for `skew` of the tokens from the next forward on; None restores real routing.
        Under expert parallelism every rank's forced tokens go to EP rank 0's experts (the most rows
        one rank can receive)."""
        self.forced_skew = skew

    def route(self, xf: torch.Tensor):
        """The routing of token rows xf (N, D): fp32 router logits (+ noise in training), the op table's
        route op (forced under blues.moe.routing.forced_routing), the selection bias; the route op's result
        (topk_ids (N, K), topk_weights, counts (E,) before capacity, ...). What forward runs, and what
        blues-experts, blues-prune and the per-modality telemetry recompute from a layer's input (in eval
        mode: training-time noise cannot be recomputed)."""
        m = self.cfg
        route = resolve_moe_ops(m.moe_backend, xf.device).moe_route
        logits = F.linear(xf.float(), self.router.weight.float())  # (N, E) fp32
        if self.training and m.router_noise_std > 0:
            logits = logits + torch.randn_like(logits) * m.router_noise_std
        kw = dict(score_func=m.router_score_func, norm_topk_prob=m.norm_topk_prob,
                  selection_bias=self.selection_bias if self.use_selection_bias else None)
        if self.forced_skew is None:
            return route(logits, m.top_k, **kw)
        return forced_route(route, logits, m.top_k, m.capacity(xf.shape[0]), self.forced_skew,
                            ep_size=self.ep.ep_size if self.ep is not None else 1, **kw)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        B, T, D = x.shape
        m = self.cfg
        E, K = m.num_experts, m.top_k
        xf = x.reshape(B * T, D)  # (N, D)
        N = xf.shape[0]
        ops = resolve_moe_ops(m.moe_backend, x.device)
        cap = m.capacity(N)

        r = self.route(xf)
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

        if m.routed_scaling_factor != 1.0:
            weights = weights * m.routed_scaling_factor  # (N, K), still fp32
        ex = self.experts
        p_drop = m.expert_dropout if self.training else 0.0
        if self.ep is not None:
            out = ep_experts_forward(xf, idx, weights, ex, ops, self.ep, p_drop, self.plan_replay)  # (N, D)
        else:
            # Token rows are gathered inside the up-projection (no (S, D) copy of x), and the down
            # projection sums each token's K weighted rows itself (no (S, D) expert output).
            h = ops.moe_grouped_swiglu(xf, idx.expert_offsets, ex.w_gate, ex.w_up, idx.sorted_slots, K)  # (S, F)
            if p_drop > 0:
                h = F.dropout(h, p=p_drop)
            out = ops.moe_grouped_down_combine(h, idx.expert_offsets, ex.w_down, idx.inverse, weights)  # (N, D)
        if self.shared is not None:
            out = out + shared_experts_output(self.shared, self.shared_gate, xf)
        counts = idx.expert_offsets[1:] - idx.expert_offsets[:-1]  # (E,)
        return MoEOutput(out.view(B, T, D), aux, zl, counts, dropped, r.counts)

