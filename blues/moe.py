"""The Blues MoE layer: noisy top-k router, SwiGLU experts stored stacked, sort-based dispatch.

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

import functools
import logging
import math
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from blues.config import BluesConfig, MoEConfig
from blues.kernels import moe_grouped_gemm as _gg
from blues.kernels import moe_permute as _perm
from blues.kernels import moe_route as _route
from blues.kernels.moe_route import load_balancing_loss, z_loss

log = logging.getLogger(__name__)
_LOGGED: set = set()


class MoEOutput(NamedTuple):
    out: torch.Tensor  # (B, T, D)
    aux_loss: torch.Tensor  # scalar, unweighted Switch load-balancing loss
    z_loss: torch.Tensor  # scalar, unweighted router z-loss
    counts: torch.Tensor  # (E,) long, assignments each expert computed (after capacity)
    dropped: torch.Tensor  # scalar long, assignments dropped by capacity


TORCH_OPS = SimpleNamespace(
    route=_route.moe_route_ref,
    permute_indices=_perm.moe_permute_indices_ref,
    grouped_swiglu=_gg.moe_grouped_swiglu_ref,
    grouped_down_combine=_gg.moe_grouped_down_combine_ref,
)
_TRITON_OP_NAMES = ((_route, "moe_route", "route"), (_perm, "moe_permute_indices", "permute_indices"),
                    (_gg, "moe_grouped_swiglu", "grouped_swiglu"),
                    (_gg, "moe_grouped_down_combine", "grouped_down_combine"))


def _triton_ops() -> SimpleNamespace:
    missing = [name for mod, name, _ in _TRITON_OP_NAMES if not hasattr(mod, name)]
    if missing:
        raise ValueError(f"moe_backend='triton' is not available: kernels {', '.join(missing)} are missing; "
                         "use moe_backend='torch'")
    return SimpleNamespace(**{key: getattr(mod, name) for mod, name, key in _TRITON_OP_NAMES})


def triton_can_run(device: torch.device) -> bool:
    import os
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
            return True
        except ImportError:
            return False
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_moe_ops(requested: str, device: torch.device) -> SimpleNamespace:
    """Ops for `requested` ('auto' | 'torch' | 'triton') on this device; logs an automatic choice once."""
    if requested == "torch":
        return TORCH_OPS
    if requested == "triton":
        if not triton_can_run(device):
            raise ValueError(f"moe_backend='triton' needs CUDA (or TRITON_INTERPRET=1 for CPU testing), "
                             f"got a {device.type} tensor; use moe_backend='torch' or 'auto'")
        return _triton_ops()
    assert requested == "auto", requested
    if device.type == "cuda" and triton_can_run(device):
        try:
            ops = _triton_ops()
            if ("moe", "triton") not in _LOGGED:
                _LOGGED.add(("moe", "triton"))
                log.info("MoE backend: triton kernels (CUDA)")
            return ops
        except ValueError:
            pass
    if ("moe", device.type) not in _LOGGED:
        _LOGGED.add(("moe", device.type))
        log.info("MoE backend: torch (%s)", "no CUDA" if device.type != "cuda" else "Triton kernels unavailable")
    return TORCH_OPS


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
        # Per-layer routing hook: when set, called as route_override(route, logits, top_k, **kw) in
        # place of route(logits, top_k, **kw). The memory probe forces worst-case routing through it
        # (blues.memory_probe.RouterSkew); being per layer, it never touches other models.
        self.route_override = None

    def capacity(self, num_tokens: int) -> int | None:
        cf = self.cfg.capacity_factor
        if cf is None:
            return None
        return max(1, math.ceil(cf * num_tokens * self.cfg.top_k / self.cfg.num_experts))

    def forward(self, x: torch.Tensor) -> MoEOutput:
        B, T, D = x.shape
        m = self.cfg
        E, K = m.num_experts, m.top_k
        xf = x.reshape(B * T, D)  # (N, D)
        N = xf.shape[0]
        ops = resolve_moe_ops(m.moe_backend, x.device)

        logits = F.linear(xf.float(), self.router.weight.float())  # (N, E) fp32
        if self.training and m.router_noise_std > 0:
            logits = logits + torch.randn_like(logits) * m.router_noise_std
        route = ops.route if self.route_override is None else functools.partial(self.route_override, ops.route)
        r = route(logits, K, score_func=m.router_score_func, norm_topk_prob=m.norm_topk_prob,
                  selection_bias=self.selection_bias if self.use_selection_bias else None)
        aux = load_balancing_loss(r.counts, r.prob_sum, N, K)
        zl = z_loss(r.lse)

        topk_ids, weights = r.topk_ids, r.topk_weights  # (N, K) each
        idx = ops.permute_indices(topk_ids, E)
        cap = self.capacity(N)
        if cap is not None:
            # Position of each assignment inside its expert's block (stable: earlier tokens first);
            # assignments past the capacity are dropped: id E sorts them after every expert.
            rank = idx.inverse - idx.expert_offsets[topk_ids.reshape(-1)]  # (S,)
            keep = (rank < cap).view(N, K)
            topk_ids = torch.where(keep, topk_ids, torch.full_like(topk_ids, E))
            weights = weights * keep
            idx = ops.permute_indices(topk_ids, E)
            dropped = (~keep).sum()
        else:
            dropped = torch.zeros((), dtype=torch.long, device=x.device)

        ex = self.experts
        # Token rows are gathered inside the up-projection (no (S, D) copy of x), and the down
        # projection sums each token's K weighted rows itself (no (S, D) expert output).
        h = ops.grouped_swiglu(xf, idx.expert_offsets, ex.w_gate, ex.w_up, idx.sorted_slots, K)  # (S, F)
        if self.training and m.expert_dropout > 0:
            h = F.dropout(h, p=m.expert_dropout)
        out = ops.grouped_down_combine(h, idx.expert_offsets, ex.w_down, idx.inverse, weights)  # (N, D)
        if self.shared is not None:
            out = out + self.shared(xf)
        counts = idx.expert_offsets[1:] - idx.expert_offsets[:-1]  # (E,)
        return MoEOutput(out.view(B, T, D), aux, zl, counts, dropped)


def build_mlp(config: BluesConfig, layer_idx: int) -> nn.Module:
    """The feed-forward part of block `layer_idx`: an MoE layer, or a dense SwiGLU where configured."""
    if not config.moe.is_moe_layer(layer_idx):
        return SwiGLU(config.model.n_embd, config.moe.dense_hidden, config.model.dropout)
    if config.moe.moe_backend == "deepspeed":
        from blues.moe_deepspeed import DeepSpeedMoE
        return DeepSpeedMoE(config)
    return MoE(config)
