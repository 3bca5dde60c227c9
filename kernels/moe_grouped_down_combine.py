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

Neither path keeps the (S, D) expert output y for the backward (issue 11, part 4: ~0.5 GB per layer in
bf16 at S1). The routing weights' gradient <g[t], y[p]> is taken as <dz[p], h[p]> with
dz[p] = g[t] @ w_down[e]^T, the product that the input gradient dh[p] = w_p * dz[p] needs anyway.
"""
from __future__ import annotations

import torch

from .moe_grouped_gemm import (
    _check_gemm_args,
    _empty_except_zero_experts,
    _expert_groups,
    _expert_rows,
    _grouped_dw,
    _grouped_gemm,
    moe_grouped_gemm_ref,
)
from .moe_permute import _combine, _inverse_of, _inverse_ref, moe_unpermute_combine_ref
from .triton_utils import check_triton_inputs, interpret_mode, next_pow2, round_bf16_rtne, runnable, tl, triton


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



# ----------------------------------------------------------------------------------------------
# Triton kernel, launcher and autograd glue
# ----------------------------------------------------------------------------------------------

# Tensor contract of _moe_down_combine_bwd_kernel (rowwise, after dz = g_rows @ w_down[e]^T). Program i
# owns rows [i*BLOCK_R, (i+1)*BLOCK_R) of the S rows in expert order.
#   dz      (S, F) fp32 contiguous: row p = g[sorted_slots[p] // K] @ w_down[e_p]^T, zero on dropped rows
#   h       (S, F) contiguous: the forward's input
#   slots, w   sorted_slots (S,) and the routing weights (T*K,) fp32: row p's weight is w[slots[p]]
#   dh      (S, F), h's dtype, written when NEED_DH: w_p * dz[p]
#   hw      (S, F), h's dtype, written when NEED_DWD: w_p * h[p] (the weight gradient's operand)
#   dw_row  (S,) fp32, written when NEED_DW: <dz[p], h[p]> = dL/dw_p
# ROUND: the interpreter's bf16 stores truncate; round to nearest even first, as a GPU store does.
@triton.jit
def _moe_down_combine_bwd_kernel(dz_ptr, h_ptr, slots_ptr, w_ptr, dh_ptr, hw_ptr, dw_row_ptr, S, F,
                                 NEED_DH: tl.constexpr, NEED_DWD: tl.constexpr, NEED_DW: tl.constexpr,
                                 ROUND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < S
    w = tl.load(w_ptr + tl.load(slots_ptr + rows, mask=rmask, other=0), mask=rmask, other=0.0)  # (BR,)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = rmask[:, None] & (cols < F)[None, :]
        offs = rows[:, None].to(tl.int64) * F + cols[None, :]
        dz = tl.load(dz_ptr + offs, mask=mask, other=0.0)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_DH:
            dh = w[:, None] * dz
            if ROUND:
                dh = round_bf16_rtne(dh)
            tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
        if NEED_DWD:
            hw = w[:, None] * h
            if ROUND:
                hw = round_bf16_rtne(hw)
            tl.store(hw_ptr + offs, hw.to(hw_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            acc += tl.sum(dz * h, axis=1)
    if NEED_DW:
        tl.store(dw_row_ptr + rows, acc, mask=rmask)


class _MoEGroupedDownCombine(torch.autograd.Function):
    """Forward: y = h @ w_down[e] per expert (a transient (S, D)), then the fp32 gather-sum combine.
    Backward, with y not kept: dz = g_rows @ w_down[e]^T (the rows of g gathered through sorted_slots,
    fp32 out), one rowwise pass for dh, w * h and the routing weights' gradient, and dw_down[e] =
    (w * h)_e^T g_rows_e computed as its transpose g_rows_e^T (w * h)_e so that the gather is on the
    operand the weight-gradient kernel gathers."""

    @staticmethod
    def forward(ctx, h, expert_offsets, w_down, inverse, topk_weights):
        T, K = topk_weights.shape
        E, Fh, D = w_down.shape
        w32 = topk_weights.float().contiguous()
        y = _grouped_gemm(h, expert_offsets, w_down, h.shape[0], Fh, D, E)  # (S, D), freed on return
        ctx.save_for_backward(h, expert_offsets, w_down, inverse, w32)
        ctx.w_dtype = topk_weights.dtype
        return _combine(y, inverse, w32, T, K, h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, expert_offsets, w_down, inverse, w32 = ctx.saved_tensors
        T, K = w32.shape
        E, Fh, D = w_down.shape
        S = h.shape[0]
        need_dh, need_dwd, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        g = g.contiguous()
        sorted_slots = _inverse_of(inverse)  # (S,) row p <- assignment slot, token slot // K
        dz = _grouped_gemm(g, expert_offsets, w_down, S, D, Fh, E, gather=sorted_slots, gather_div=K,
                           b_strides=(w_down.stride(0), w_down.stride(2), w_down.stride(1)),
                           out_dtype=torch.float32)  # (S, F)
        dh = torch.empty_like(h) if need_dh else None
        hw = torch.empty_like(h) if need_dwd else None
        dw_row = torch.empty(S, dtype=torch.float32, device=h.device) if need_dw else None
        if S > 0 and Fh > 0:
            BLOCK_F = min(128, max(16, next_pow2(Fh)))
            BLOCK_R = max(1, 4096 // BLOCK_F)
            runnable(_moe_down_combine_bwd_kernel)[(triton.cdiv(S, BLOCK_R),)](
                dz, h, sorted_slots, w32, dh if need_dh else dz, hw if need_dwd else dz,
                dw_row if need_dw else w32, S, Fh, NEED_DH=need_dh, NEED_DWD=need_dwd, NEED_DW=need_dw,
                ROUND=interpret_mode() and h.dtype == torch.bfloat16, BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F)
        elif need_dw:
            dw_row.zero_()
        dwd = None
        if need_dwd:  # (E, D, F) product written transposed into w_down's (E, F, D) layout
            dwd = _grouped_dw(g, expert_offsets, hw, E, D, Fh, gather=sorted_slots, gather_div=K,
                              dtype=w_down.dtype, transposed=True)
        dw = dw_row[inverse].view(T, K).to(ctx.w_dtype) if need_dw else None
        return dh, None, dwd, None, dw


def moe_grouped_down_combine(h: torch.Tensor, expert_offsets: torch.Tensor, w_down: torch.Tensor,
                             inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Triton launcher with `moe_grouped_down_combine_ref`'s contract. The forward is the two kernels in
    sequence (grouped GEMM, then the atomic-free gather-sum combine: deterministic without atomics, so
    the (S, D) expert output exists for a moment); the backward does not need it (_MoEGroupedDownCombine)."""
    _check_gemm_args("moe_grouped_down_combine", h, expert_offsets, w_down)
    check_triton_inputs("moe_grouped_down_combine", h, expert_offsets, w_down, inverse, topk_weights)
    if topk_weights.dim() != 2 or inverse.numel() != topk_weights.numel() or h.shape[0] != inverse.numel():
        raise ValueError(f"moe_grouped_down_combine: expected h (S, F), inverse (S,), topk_weights (T, K) with "
                         f"S = T*K, got {tuple(h.shape)}, {tuple(inverse.shape)}, {tuple(topk_weights.shape)}")
    return _MoEGroupedDownCombine.apply(h.contiguous(), expert_offsets, w_down, inverse, topk_weights)
