"""moe_grouped_swiglu: the experts' gate and up projections and the SwiGLU between them, in one op.

Shapes: N rows in expert order, E experts, D model width, F expert hidden width, T tokens, K top-k,
S = T*K.

Contract (reference `moe_grouped_swiglu_ref`, the specification):
    x               (N, D), or (T, D) token rows when sorted_slots is given
    expert_offsets  (E+1,) int64   expert e owns rows [expert_offsets[e], expert_offsets[e+1])
    w_gate, w_up    (E, D, F), x's dtype
    sorted_slots    (S,) int64, optional: from moe_permute_indices; row p of the input is then
                    x[sorted_slots[p] // top_k] (moe_permute fused into the loads), and N = S
  returns h (N, F) = silu(x_rows @ w_gate[e]) * (x_rows @ w_up[e]); rows at or past
  expert_offsets[E] are zero. Gradients flow to x, w_gate and w_up.

The Triton backward computes the SwiGLU gradient once (issue 11, part 2): one elementwise pass
writes dgu = [dg | du] (N, 2F) from dh, g, u; then two plain grouped GEMMs, dx = [dg | du] @
[w_gate; w_up]^T (one K loop of 2F, each B row read from w_gate or w_up) and [dw_gate | dw_up] =
x_rows^T @ dgu (one launch, both weight gradients). Before, both GEMMs recomputed the SwiGLU gradient from three
operand streams inside their K loops, which kept their MMAs from overlapping the loads and read
dh, g, u once per column block of D: (2 + 2) * D / BLOCK reads of three (N, F) tensors at the S2
shape against one read and one (N, 2F) write now.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .moe_grouped_gemm import (
    _check_gemm_args,
    _dot_flags,
    _empty_except_zero_experts,
    _expert_groups,
    _expert_rows,
    _gemm_config,
    _grouped_dw,
    _grouped_gemm,
    _moe_row_tile,
    _row_tiles,
    _swizzle,
)
from .moe_permute import _combine, _gather_sum, _inverse_of, _inverse_ref
from .triton_utils import check_triton_inputs, interpret_mode, next_pow2, round_bf16_rtne, runnable, tl, triton

# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification, and Blues' CPU path (see moe_grouped_gemm.py on why
# the backward is written out).
# ----------------------------------------------------------------------------------------------

class _GroupedSwiGLURef(torch.autograd.Function):
    """Group of experts by group of experts (_expert_groups), so that the gathered rows, silu(g) and
    the SwiGLU gradients are cache-sized temporaries (see moe_permute.py on why large fresh tensors
    are what costs on CPU): the forward allocates g, u (kept for the backward) and h; the backward
    dx, dw_gate, dw_up."""

    @staticmethod
    def forward(ctx, x, expert_offsets, w_gate, w_up, sorted_slots, top_k):
        blocks, dropped = _expert_rows(expert_offsets)
        token_of_row = None if sorted_slots is None else torch.div(sorted_slots, top_k, rounding_mode="floor")
        N, Fh = (x.shape[0] if sorted_slots is None else sorted_slots.numel()), w_gate.shape[2]
        g, u, h = x.new_empty(N, Fh), x.new_empty(N, Fh), x.new_empty(N, Fh)
        groups = _expert_groups(blocks, max(x.shape[1], Fh), x.element_size())
        for a, b, members in groups:
            xg = x[a:b] if token_of_row is None else x.index_select(0, token_of_row[a:b])  # (rows, D)
            for e, ea, eb in members:
                torch.mm(xg[ea - a:eb - a], w_gate[e], out=g[ea:eb])
                torch.mm(xg[ea - a:eb - a], w_up[e], out=u[ea:eb])
            torch.mul(F.silu(g[a:b]), u[a:b], out=h[a:b])
        for t in (g, u, h):
            t[dropped:].zero_()
        ctx.save_for_backward(x, w_gate, w_up, g, u, sorted_slots, token_of_row)
        ctx.blocks, ctx.groups, ctx.dropped, ctx.top_k = blocks, groups, dropped, top_k
        return h

    @staticmethod
    def backward(ctx, dh):
        x, w_gate, w_up, g, u, sorted_slots, token_of_row = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        gathered = token_of_row is not None
        # On CPU a gathered row's gradient is added straight to its token (index_add_ is serial
        # there); elsewhere it is atomic, so rows go to a buffer that _gather_sum reduces.
        add_to_tokens = gathered and x.device.type == "cpu"
        dx = dx_rows = dwg = dwu = None
        if need_dx:
            if add_to_tokens:
                dx = torch.zeros_like(x)
            else:
                dx_rows = x.new_empty(g.shape[0], x.shape[1])  # (N, D)
                dx_rows[ctx.dropped:].zero_()  # dropped rows: no expert, no gradient
        if need_dw:
            dwg, dwu = _empty_except_zero_experts(w_gate, ctx.blocks), _empty_except_zero_experts(w_up, ctx.blocks)
        for a, b, members in ctx.groups:
            ge, dhe = g[a:b], dh[a:b]
            dg = torch.ops.aten.silu_backward(dhe * u[a:b], ge)  # dL/dg = dh * u * silu'(g)
            du = F.silu(ge).mul_(dhe)  # dL/du = dh * silu(g)
            if need_dx:
                dxg = x.new_empty(b - a, x.shape[1]) if add_to_tokens else dx_rows[a:b]
                for e, ea, eb in members:
                    r = slice(ea - a, eb - a)
                    torch.mm(dg[r], w_gate[e].t(), out=dxg[r])
                    dxg[r].addmm_(du[r], w_up[e].t())
                if add_to_tokens:
                    dx.index_add_(0, token_of_row[a:b], dxg)
            if need_dw:
                xg = x[a:b] if not gathered else x.index_select(0, token_of_row[a:b])
                for e, ea, eb in members:
                    r = slice(ea - a, eb - a)
                    torch.mm(xg[r].t(), dg[r], out=dwg[e])
                    torch.mm(xg[r].t(), du[r], out=dwu[e])
        if need_dx and not add_to_tokens:
            dx = dx_rows if not gathered else _gather_sum(dx_rows, _inverse_ref(sorted_slots), x.shape[0], ctx.top_k)
        return dx, None, dwg, dwu, None, None


def moe_grouped_swiglu_ref(x: torch.Tensor, expert_offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                           sorted_slots: Optional[torch.Tensor] = None, top_k: int = 1) -> torch.Tensor:
    """h = silu(x_rows @ w_gate[e]) * (x_rows @ w_up[e]), x_rows = x[sorted_slots // top_k] when given.
    Written by autograd it would be: F.silu(moe_grouped_gemm_ref(xp, offsets, w_gate)) *
    moe_grouped_gemm_ref(xp, offsets, w_up) with xp = moe_permute_ref(x, sorted_slots, top_k)."""
    _check_gemm_args("moe_grouped_swiglu_ref", x, expert_offsets, w_gate, w_up)
    return _GroupedSwiGLURef.apply(x, expert_offsets, w_gate, w_up, sorted_slots, int(top_k))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

# Tensor contract of _moe_grouped_swiglu_kernel (forward of the gate and up projections). Program pid
# owns row tile m and columns [n*BLOCK_N, (n+1)*BLOCK_N) of F, (m, n) = _swizzle(pid, num_tiles, ...).
#   x          rows, strides (stride_xm, stride_xk); gathered through sorted_slots // gather_div
#              when GATHER, as in _moe_grouped_gemm_kernel
#   w_gate     (E, D, F), w_up (E, D, F), strides (stride_we, stride_wk, stride_wn) shared
#   g, u, h    (N, F) contiguous, x's dtype, written: g = x@w_gate[e], u = x@w_up[e] (kept for the
#              backward), h = silu(g) * u computed from the fp32 accumulators; zero on dropped rows
@triton.jit
def _moe_grouped_swiglu_kernel(x_ptr, gather_ptr, wg_ptr, wu_ptr, g_ptr, u_ptr, h_ptr, offsets_ptr,
                               N, D, F, E, gather_div, num_tiles,
                               stride_xm, stride_xk, stride_we, stride_wk, stride_wn,
                               GATHER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                               GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SEG: tl.constexpr):
    tile, col = _swizzle(tl.program_id(0), num_tiles, tl.cdiv(F, BLOCK_N), GROUP_M)
    seg, row0, row_end = _moe_row_tile(offsets_ptr, N, E, tile, BLOCK_M, BLOCK_SEG)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    cols = col * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    mask = rmask[:, None] & cmask[None, :]
    out_offs = rows[:, None].to(tl.int64) * F + cols[None, :]
    if seg < E:
        if GATHER:
            src = tl.load(gather_ptr + rows, mask=rmask, other=0) // gather_div
        else:
            src = rows.to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk
        w_offs = seg.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kmask = (k0 + ks) < D
            a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            bmask = kmask[:, None] & cmask[None, :]
            bg = tl.load(wg_ptr + w_offs, mask=bmask, other=0.0)
            bu = tl.load(wu_ptr + w_offs, mask=bmask, other=0.0)
            if UPCAST:
                a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_offs += BLOCK_K * stride_wk
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(g_ptr + out_offs, acc_g.to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(u_ptr + out_offs, acc_u.to(u_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + out_offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    else:
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=h_ptr.dtype.element_ty)
        tl.store(g_ptr + out_offs, zero, mask=mask)
        tl.store(u_ptr + out_offs, zero, mask=mask)
        tl.store(h_ptr + out_offs, zero, mask=mask)


# Tensor contract of _moe_swiglu_bwd_kernel (elementwise). Program (i, j) owns rows
# [i*BLOCK_M, ...) and columns [j*BLOCK_N, ...) of F.
#   dh, g, u   (N, F) contiguous: gradient of h and the forward's saved projections
#   dgu        (N, 2F) contiguous, written: [:, :F] = dL/dg = dh * u * silu'(g),
#              [:, F:] = dL/du = dh * silu(g), computed in fp32 and rounded once to dgu's dtype (the
#              GEMM operand dtype). Dropped rows have g = u = 0, so both are 0 there.
# ROUND: the interpreter's bf16 stores truncate; round to nearest even first, as a GPU store does.
@triton.jit
def _moe_swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dgu_ptr, N, F, ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    offs = rows[:, None].to(tl.int64) * F + cols[None, :]
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    dg = dh * u * sg * (1.0 + g * (1.0 - sg))
    du = dh * g * sg
    if ROUND:
        dg, du = round_bf16_rtne(dg), round_bf16_rtne(du)
    out = rows[:, None].to(tl.int64) * (2 * F) + cols[None, :]
    tl.store(dgu_ptr + out, dg.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + out + F, du.to(dgu_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher and autograd glue
# ----------------------------------------------------------------------------------------------

def _swiglu_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """dgu (N, 2F) = [dL/dg | dL/du] of h = silu(g) * u (see _moe_swiglu_bwd_kernel)."""
    N, Fh = g.shape
    dgu = torch.empty((N, 2 * Fh), dtype=g.dtype, device=g.device)
    if N > 0 and Fh > 0:
        cfg = _gemm_config("swiglu_bwd", g.dtype)
        grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(Fh, cfg["BLOCK_N"]))
        runnable(_moe_swiglu_bwd_kernel)[grid](
            dh, g, u, dgu, N, Fh, ROUND=interpret_mode() and g.dtype == torch.bfloat16,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return dgu


class _MoEGroupedSwiGLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, expert_offsets, w_gate, w_up, sorted_slots, top_k):
        E, D, Fh = w_gate.shape
        N = sorted_slots.numel() if sorted_slots is not None else x.shape[0]
        cfg = _gemm_config("swiglu", x.dtype)
        g = torch.empty((N, Fh), dtype=x.dtype, device=x.device)
        u = torch.empty_like(g)
        h = torch.empty_like(g)
        if N > 0 and Fh > 0:
            num_tiles = _row_tiles(N, E, cfg["BLOCK_M"])
            grid = (num_tiles * triton.cdiv(Fh, cfg["BLOCK_N"]),)
            runnable(_moe_grouped_swiglu_kernel)[grid](
                x, sorted_slots if sorted_slots is not None else expert_offsets, w_gate, w_up, g, u, h,
                expert_offsets, N, D, Fh, E, top_k, num_tiles, x.stride(0), x.stride(1),
                w_gate.stride(0), w_gate.stride(1), w_gate.stride(2),
                GATHER=sorted_slots is not None, **_dot_flags(x.dtype),
                BLOCK_SEG=max(2, next_pow2(E + 1)), **cfg)
        ctx.save_for_backward(x, expert_offsets, w_gate, w_up, sorted_slots, g, u)
        ctx.top_k = top_k
        return h

    @staticmethod
    def backward(ctx, dh):
        x, expert_offsets, w_gate, w_up, sorted_slots, g, u = ctx.saved_tensors
        E, D, Fh = w_gate.shape
        N = g.shape[0]
        dgu = _swiglu_bwd(dh.contiguous(), g, u)  # (N, 2F) = [dg | du], x's dtype
        dx = dwg = dwu = None
        if ctx.needs_input_grad[0]:
            # dx = dg @ w_gate[e]^T + du @ w_up[e]^T: the weights read transposed through their strides
            if w_up.stride() != w_gate.stride():
                w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
            wt = (w_gate.stride(0), w_gate.stride(2), w_gate.stride(1))
            dx_rows = _grouped_gemm(dgu, expert_offsets, w_gate, N, 2 * Fh, D, E, b_strides=wt,
                                    b2=w_up, k1=Fh)  # (N, D)
            if sorted_slots is not None:
                # The gather's backward: each token sums its K rows, through the inverse (no atomics).
                dx = _combine(dx_rows, _inverse_of(sorted_slots), None, x.shape[0], ctx.top_k, x.dtype)
            else:
                dx = dx_rows
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dwg, dwu = _grouped_dw(x, expert_offsets, dgu, E, D, 2 * Fh, gather=sorted_slots, gather_div=ctx.top_k,
                                   split=Fh, dtype=w_gate.dtype)
        return dx, None, dwg, dwu, None, None


def moe_grouped_swiglu(x: torch.Tensor, expert_offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                       sorted_slots: Optional[torch.Tensor] = None, top_k: int = 1) -> torch.Tensor:
    """Triton launcher with `moe_grouped_swiglu_ref`'s contract: gate and up projections in one
    grouped GEMM (shared loads of x, optionally gathered through sorted_slots), SwiGLU in the epilogue."""
    _check_gemm_args("moe_grouped_swiglu", x, expert_offsets, w_gate, w_up)
    check_triton_inputs("moe_grouped_swiglu", x, expert_offsets, w_gate, w_up, sorted_slots)
    return _MoEGroupedSwiGLU.apply(x, expert_offsets, w_gate, w_up, sorted_slots, int(top_k))
