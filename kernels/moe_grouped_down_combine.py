"""moe_grouped_down_combine: the experts' down projection and the weighted combine, in one op.

Shapes: S = T*K rows in expert order, E experts, F expert hidden width, D model width, T tokens,
K top-k.

Contract (reference `moe_grouped_down_combine_ref`, the specification):
    h               (S, F) rows in expert order (moe_grouped_swiglu's output, after any dropout)
    expert_offsets  (E+1,) int64   expert e owns rows [expert_offsets[e], expert_offsets[e+1])
    w_down          (E, F, D), h's dtype
    inverse, topk_weights          as for moe_unpermute_combine: (S,) int64, (T, K) float
  returns (T, D) in h's dtype: out[t] = sum_k topk_weights[t, k] * (h[p] @ w_down[e_p]) with
  p = inverse[t*K + k], summed in fp32; by definition moe_unpermute_combine(moe_grouped_gemm(h,
  expert_offsets, w_down), inverse, topk_weights). Gradients flow to h, w_down and topk_weights.
"""
from __future__ import annotations

import torch

from .moe_grouped_gemm import (
    _check_gemm_args,
    _empty_except_zero_experts,
    _expert_groups,
    _expert_rows,
    _MoEGroupedGemm,
    moe_grouped_gemm_ref,
)
from .moe_permute import _inverse_ref, moe_unpermute_combine, moe_unpermute_combine_ref
from .triton_utils import check_triton_inputs


class _GroupedDownCombineRef(torch.autograd.Function):
    """On CPU, group of experts by group of experts: y = h @ w_down[e] is a cache-sized temporary,
    scaled by the routing weights and added to its tokens, so the (S, D) expert output is never
    stored. The routing weights' gradient <g[t], y[p]> is taken as <g[t] @ w_down[e]^T, h[p]>, which
    the backward computes anyway (dL/dh[p] = w_p * g[t] @ w_down[e]^T), so y is not recomputed."""

    @staticmethod
    def forward(ctx, h, expert_offsets, w_down, inverse, topk_weights):
        T, K = topk_weights.shape
        D = w_down.shape[2]
        acc = torch.promote_types(h.dtype, torch.float32)
        w = topk_weights.to(acc)
        blocks, dropped = _expert_rows(expert_offsets)
        groups = _expert_groups(blocks, max(D, h.shape[1]), torch.finfo(acc).bits // 8)
        sorted_slots = _inverse_ref(inverse)
        token_of_row = torch.div(sorted_slots, K, rounding_mode="floor")  # (S,)
        w_of_row = w.reshape(-1)[sorted_slots]  # (S,)
        out = torch.zeros(T, D, dtype=acc, device=h.device)
        for a, b, members in groups:
            yg = torch.empty(b - a, D, dtype=acc, device=h.device)
            for e, ea, eb in members:
                if acc == h.dtype:
                    torch.mm(h[ea:eb], w_down[e], out=yg[ea - a:eb - a])
                else:
                    yg[ea - a:eb - a] = torch.mm(h[ea:eb], w_down[e])
            out.index_add_(0, token_of_row[a:b], yg.mul_(w_of_row[a:b, None]))
        ctx.save_for_backward(h, w_down, inverse, token_of_row, w_of_row)
        ctx.blocks, ctx.groups, ctx.dropped, ctx.w_dtype, ctx.TK = blocks, groups, dropped, topk_weights.dtype, (T, K)
        return out.to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, w_down, inverse, token_of_row, w_of_row = ctx.saved_tensors
        T, K = ctx.TK
        need_dh, need_dwd, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        acc = w_of_row.dtype
        g = g.to(acc)
        dh = h.new_empty(h.shape) if need_dh else None
        if need_dh:
            dh[ctx.dropped:].zero_()
        dwd = _empty_except_zero_experts(w_down, ctx.blocks) if need_dwd else None
        dw_of_row = torch.zeros_like(w_of_row) if need_dw else None  # dropped rows: weight 0, gradient 0
        for a, b, members in ctx.groups:
            gg = g.index_select(0, token_of_row[a:b])  # (rows, D) each row's token's gradient
            gh = gg.to(h.dtype)
            if need_dh or need_dw:
                dz = h.new_empty(b - a, h.shape[1])  # (rows, F) = g[t] @ w_down[e]^T
                for e, ea, eb in members:
                    torch.mm(gh[ea - a:eb - a], w_down[e].t(), out=dz[ea - a:eb - a])
                if need_dw:  # dL/dw_p = <g[t], h[p] @ w_down[e]> = <dz_p, h[p]>
                    dw_of_row[a:b] = torch.bmm(dz.to(acc).unsqueeze(1), h[a:b].to(acc).unsqueeze(2)).view(-1)
                if need_dh:
                    torch.mul(dz, w_of_row[a:b, None], out=dh[a:b])
            if need_dwd:  # dL/dw_down[e] = h_e^T (w * g)_e
                wg_rows = gg.mul_(w_of_row[a:b, None]).to(h.dtype)
                for e, ea, eb in members:
                    torch.mm(h[ea:eb].t(), wg_rows[ea - a:eb - a], out=dwd[e])
        dw = dw_of_row[inverse].view(T, K).to(ctx.w_dtype) if need_dw else None
        return dh, None, dwd, None, dw


def moe_grouped_down_combine_ref(h: torch.Tensor, expert_offsets: torch.Tensor, w_down: torch.Tensor,
                                 inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * (h[p] @ w_down[e_p]) with p = inverse[t*K + k]: the experts'
    down projection and the weighted combine in one op. By definition:
    moe_unpermute_combine_ref(moe_grouped_gemm_ref(h, expert_offsets, w_down), inverse, topk_weights),
    which is what runs off the CPU."""
    _check_gemm_args("moe_grouped_down_combine_ref", h, expert_offsets, w_down)
    if h.device.type != "cpu":
        return moe_unpermute_combine_ref(moe_grouped_gemm_ref(h, expert_offsets, w_down), inverse, topk_weights)
    return _GroupedDownCombineRef.apply(h, expert_offsets, w_down, inverse, topk_weights)


def moe_grouped_down_combine(h: torch.Tensor, expert_offsets: torch.Tensor, w_down: torch.Tensor,
                             inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Triton launcher with `moe_grouped_down_combine_ref`'s contract. On the GPU it is the two kernels
    in sequence (grouped GEMM, then the atomic-free gather-sum combine): the combine needs the
    (S, D) expert output in memory to stay deterministic without atomics."""
    _check_gemm_args("moe_grouped_down_combine", h, expert_offsets, w_down)
    check_triton_inputs("moe_grouped_down_combine", h, expert_offsets, w_down, inverse, topk_weights)
    return moe_unpermute_combine(_MoEGroupedGemm.apply(h, expert_offsets, w_down), inverse, topk_weights)
