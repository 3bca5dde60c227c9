"""moe_grouped_gemm: one matmul per expert over its contiguous block of permuted rows.

Shapes: N rows in expert order, E experts, D_in / D_out widths; for the SwiGLU op D model width,
F expert hidden width, T tokens, K top-k, S = T*K.

Contract of moe_grouped_gemm (reference `moe_grouped_gemm_ref`, the specification):
    x               (N, D_in)
    expert_offsets  (E+1,) int64   expert e owns rows [expert_offsets[e], expert_offsets[e+1])
    w               (E, D_in, D_out), x's dtype
  returns (N, D_out): rows of expert e are x_rows @ w[e]; rows at or past expert_offsets[E]
  (dropped assignments) are zero. Gradients flow to x and w.

Contract of moe_grouped_swiglu (reference `moe_grouped_swiglu_ref`): the experts' gate and up
projections and the SwiGLU between them, in one op.
    x               (N, D), or (T, D) token rows when sorted_slots is given
    expert_offsets  (E+1,) int64   as above
    w_gate, w_up    (E, D, F), x's dtype
    sorted_slots    (S,) int64, optional: from moe_permute_indices; row p of the input is then
                    x[sorted_slots[p] // top_k] (moe_permute fused into the loads), and N = S
  returns h (N, F) = silu(x_rows @ w_gate[e]) * (x_rows @ w_up[e]); rows at or past
  expert_offsets[E] are zero. Gradients flow to x, w_gate and w_up.

Contract of moe_grouped_down_combine (reference `moe_grouped_down_combine_ref`): the experts' down
projection and the weighted combine, in one op.
    h               (S, F) rows in expert order (moe_grouped_swiglu's output, after any dropout)
    expert_offsets  (E+1,) int64   as above
    w_down          (E, F, D), h's dtype
    inverse, topk_weights          as for moe_unpermute_combine: (S,) int64, (T, K) float
  returns (T, D) in h's dtype: out[t] = sum_k topk_weights[t, k] * (h[p] @ w_down[e_p]) with
  p = inverse[t*K + k], summed in fp32; by definition moe_unpermute_combine(moe_grouped_gemm(h,
  expert_offsets, w_down), inverse, topk_weights). Gradients flow to h, w_down and topk_weights.

The Triton kernels need no host synchronisation: each program finds its (expert, row tile) from
expert_offsets on the device; the grid is sized from an upper bound on the number of row tiles
(cdiv(N, BLOCK_M) + min(E, N-1), see _row_tiles), and programs past the real count do nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .moe_permute import (
    _combine,
    _gather_sum,
    _inverse_of,
    _inverse_ref,
    moe_unpermute_combine,
    moe_unpermute_combine_ref,
)
from .triton_utils import check_triton_inputs, interpret_mode, next_pow2, runnable, tl, triton


def _check_gemm_args(op: str, x: torch.Tensor, expert_offsets: torch.Tensor, *ws: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (rows, D_in), got shape {tuple(x.shape)}")
    for w in ws:
        if w.dim() != 3 or w.shape[1] != x.shape[1]:
            raise ValueError(f"{op}: weights must be (E, D_in={x.shape[1]}, D_out), got shape {tuple(w.shape)}")
        if w.shape != ws[0].shape:
            raise ValueError(f"{op}: weights must share one shape, got {tuple(ws[0].shape)} and {tuple(w.shape)}")
        if w.dtype != x.dtype:
            raise ValueError(f"{op}: x ({x.dtype}) and the weights ({w.dtype}) must share a dtype")
    E = ws[0].shape[0]
    if expert_offsets.dim() != 1 or expert_offsets.numel() != E + 1:
        raise ValueError(f"{op}: expert_offsets must have E+1={E + 1} entries, got shape {tuple(expert_offsets.shape)}")


# ----------------------------------------------------------------------------------------------
# References (plain torch): the specification, and Blues' CPU path.
#
# Each is a per-expert loop of torch.mm with its backward written out, which autograd would derive
# from the one-line definitions in the docstrings: the same products, without the copies autograd
# adds (a torch.cat of the expert outputs and, in the backward, a cat of the input gradients and a
# stack of the weight gradients: 19% of the layer's CPU time at T=4096, D=512, F=1024, E=8, K=2).
# tests/test_moe_grouped_gemm.py checks both backwards with torch.autograd.gradcheck against the
# one-line definitions.
# NOTE: the loop bounds need expert_offsets on the host (one .tolist()); the Triton path has none.
# ----------------------------------------------------------------------------------------------

def _expert_rows(expert_offsets: torch.Tensor):
    """[(e, first row, end row)] for the experts that own rows, and the first dropped row."""
    bounds = expert_offsets.tolist()
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]], bounds[-1]


class _GroupedGemmRef(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, expert_offsets, w):
        blocks, dropped = _expert_rows(expert_offsets)
        out = x.new_empty(x.shape[0], w.shape[2])  # (N, D_out)
        for e, a, b in blocks:
            torch.mm(x[a:b], w[e], out=out[a:b])
        out[dropped:].zero_()
        ctx.save_for_backward(x, w)
        ctx.blocks, ctx.dropped = blocks, dropped
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            for e, a, b in ctx.blocks:
                torch.mm(dy[a:b], w[e].t(), out=dx[a:b])  # dx_e = dy_e w_e^T
            dx[ctx.dropped:].zero_()
        if ctx.needs_input_grad[2]:
            dw = _empty_except_zero_experts(w, ctx.blocks)
            for e, a, b in ctx.blocks:
                torch.mm(x[a:b].t(), dy[a:b], out=dw[e])  # dw_e = x_e^T dy_e
        return dx, None, dw


def moe_grouped_gemm_ref(x: torch.Tensor, expert_offsets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out[r] = x[r] @ w[e] for the rows r of expert e, zero for rows at or past expert_offsets[E].
    Written by autograd it would be: torch.cat([x_e @ w_e for each e] + [zeros])."""
    _check_gemm_args("moe_grouped_gemm_ref", x, expert_offsets, w)
    return _GroupedGemmRef.apply(x, expert_offsets, w)


def _empty_except_zero_experts(w: torch.Tensor, blocks) -> torch.Tensor:
    """A weight gradient to fill expert by expert: experts that own no row get zeros."""
    dw = torch.empty_like(w)
    for e in sorted(set(range(w.shape[0])) - {blk[0] for blk in blocks}):
        dw[e].zero_()
    return dw


_GROUP_BYTES = 4 << 20  # temporaries per group of experts: a few MiB, well inside the 32 MiB L3 here


def _expert_groups(blocks, width: int, elem_bytes: int):
    """Consecutive experts grouped into row ranges of about _GROUP_BYTES / (width * elem_bytes) rows
    (whole experts, at least one): [(first row, end row, [(e, first, end), ...])]. The GEMMs stay per
    expert; gathers, scatters and elementwise work run once per group, which at E=64 cuts the number
    of small CPU ops (each a parallel region) by the group size."""
    budget = max(1, _GROUP_BYTES // max(1, width * elem_bytes))
    groups, members = [], []
    for blk in blocks:
        members.append(blk)
        if blk[2] - members[0][1] >= budget:
            groups.append((members[0][1], blk[2], members))
            members = []
    if members:
        groups.append((members[0][1], members[-1][2], members))
    return groups


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
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _moe_row_tile(offsets_ptr, N, E, pid, BLOCK_M: tl.constexpr, BLOCK_SEG: tl.constexpr):
    """Program pid's row tile: (segment, first row, end of the segment's rows). Segments 0..E-1 are
    the experts, segment E the dropped rows [expert_offsets[E], N); segment > E means idle."""
    segs = tl.arange(0, BLOCK_SEG)
    starts = tl.load(offsets_ptr + segs, mask=segs <= E, other=0).to(tl.int32)
    ends = tl.load(offsets_ptr + segs + 1, mask=segs < E, other=N).to(tl.int32)
    ends = tl.where(segs <= E, ends, 0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # (BLOCK_SEG,) row tiles per segment
    last = tl.cumsum(tiles, axis=0)  # inclusive prefix sum
    seg = tl.sum((last <= pid).to(tl.int32), axis=0)
    here = segs == seg
    first_tile = tl.sum(tl.where(here, last - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(here, starts, 0), axis=0) + (pid - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(here, ends, 0), axis=0)
    return seg, row0, row_end


# Tensor contract of _moe_grouped_gemm_kernel. Program (i, j) owns row tile i (see _moe_row_tile)
# and output columns [j*BLOCK_N, (j+1)*BLOCK_N).
#   a        rows of A, strides (stride_am, stride_ak); row r reads A[gather[r] // gather_div] when
#            GATHER, else A[r]
#   b        (E, K, N_OUT) strides (stride_be, stride_bk, stride_bn): any layout, so the backward
#            passes w transposed without a copy
#   c        (N, N_OUT) row stride stride_cm, written: expert rows A_rows @ b[e], dropped rows zero
@triton.jit
def _moe_grouped_gemm_kernel(a_ptr, gather_ptr, b_ptr, c_ptr, offsets_ptr,
                             N, K, N_OUT, E, gather_div,
                             stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm,
                             GATHER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SEG: tl.constexpr):
    seg, row0, row_end = _moe_row_tile(offsets_ptr, N, E, tl.program_id(0), BLOCK_M, BLOCK_SEG)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N_OUT
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
    if seg < E:
        if GATHER:
            src = tl.load(gather_ptr + rows, mask=rmask, other=0) // gather_div
        else:
            src = rows.to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak
        b_ptrs = b_ptr + seg.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + ks) < K
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
    else:
        tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


# Tensor contract of _moe_grouped_swiglu_kernel (forward of the gate and up projections).
#   x          rows, strides (stride_xm, stride_xk); gathered through sorted_slots // gather_div
#              when GATHER, as in _moe_grouped_gemm_kernel
#   w_gate     (E, D, F), w_up (E, D, F), strides (stride_we, stride_wk, stride_wn) shared
#   g, u, h    (N, F) contiguous, x's dtype, written: g = x@w_gate[e], u = x@w_up[e] (kept for the
#              backward), h = silu(g) * u computed from the fp32 accumulators; zero on dropped rows
@triton.jit
def _moe_grouped_swiglu_kernel(x_ptr, gather_ptr, wg_ptr, wu_ptr, g_ptr, u_ptr, h_ptr, offsets_ptr,
                               N, D, F, E, gather_div,
                               stride_xm, stride_xk, stride_we, stride_wk, stride_wn,
                               GATHER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SEG: tl.constexpr):
    seg, row0, row_end = _moe_row_tile(offsets_ptr, N, E, tl.program_id(0), BLOCK_M, BLOCK_SEG)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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


@triton.jit
def _swiglu_grads(dh, g, u, out_dtype: tl.constexpr):
    """(dL/dg, dL/du) of h = silu(g) * u, in fp32, cast to the GEMM operand dtype."""
    g = g.to(tl.float32)
    sg = tl.sigmoid(g)
    dhf = dh.to(tl.float32)
    dg = dhf * u.to(tl.float32) * sg * (1.0 + g * (1.0 - sg))
    du = dhf * g * sg
    return dg.to(out_dtype), du.to(out_dtype)


# Tensor contract of _moe_grouped_gemm_dw_kernel (per-expert weight gradient). Program (e, i, j)
# owns dw[e, i*BLOCK_M:, j*BLOCK_N:] and walks expert e's rows in chunks of BLOCK_R.
#   a      rows, strides (stride_am, stride_ak), gathered as in _moe_grouped_gemm_kernel when GATHER
#   dc     (N, N_OUT) row stride stride_dcm: gradient of the forward's output
#   dw     (E, K, N_OUT) contiguous, written in full: a_rows^T @ dc_rows (zero for an expert with no row)
# When SWIGLU, dc is dh and (g, u) are read too: the kernel writes dw = a^T dg and dw2 = a^T du.
@triton.jit
def _moe_grouped_gemm_dw_kernel(a_ptr, gather_ptr, dc_ptr, g_ptr, u_ptr, dw_ptr, dw2_ptr, offsets_ptr,
                                K, N_OUT, gather_div,
                                stride_am, stride_ak, stride_dcm,
                                GATHER: tl.constexpr, SWIGLU: tl.constexpr, PRECISION: tl.constexpr,
                                UPCAST: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    e = tl.program_id(0)
    kk = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    nn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = kk < K
    nmask = nn < N_OUT
    start = tl.load(offsets_ptr + e).to(tl.int32)
    end = tl.load(offsets_ptr + e + 1).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + rr
        rmask = rows < end
        if GATHER:
            src = tl.load(gather_ptr + rows, mask=rmask, other=0) // gather_div
        else:
            src = rows.to(tl.int64)
        a = tl.load(a_ptr + src[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)  # (BR, BM)
        dmask = rmask[:, None] & nmask[None, :]
        d_offs = rows[:, None].to(tl.int64) * stride_dcm + nn[None, :]
        dc = tl.load(dc_ptr + d_offs, mask=dmask, other=0.0)  # (BR, BN)
        if UPCAST:
            a, dc = a.to(tl.float32), dc.to(tl.float32)
        if SWIGLU:
            g = tl.load(g_ptr + d_offs, mask=dmask, other=0.0)
            u = tl.load(u_ptr + d_offs, mask=dmask, other=0.0)
            dg, du = _swiglu_grads(dc, g, u, a.dtype)
            acc = tl.dot(tl.trans(a), dg, acc, input_precision=PRECISION)
            acc2 = tl.dot(tl.trans(a), du, acc2, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(a), dc, acc, input_precision=PRECISION)
    w_offs = e.to(tl.int64) * K * N_OUT + kk[:, None] * N_OUT + nn[None, :]
    wmask = kmask[:, None] & nmask[None, :]
    tl.store(dw_ptr + w_offs, acc.to(dw_ptr.dtype.element_ty), mask=wmask)
    if SWIGLU:
        tl.store(dw2_ptr + w_offs, acc2.to(dw2_ptr.dtype.element_ty), mask=wmask)


# Tensor contract of _moe_grouped_swiglu_bwd_dx_kernel (input gradient of the SwiGLU op, rows in
# expert order). Program (i, j) owns row tile i and columns [j*BLOCK_N, (j+1)*BLOCK_N) of D.
#   dh, g, u        (N, F) contiguous: gradient of h and the forward's saved projections
#   w_gate, w_up    (E, D, F), strides (stride_we, stride_wd, stride_wf) shared
#   dx              (N, D) contiguous, written: dg @ w_gate[e]^T + du @ w_up[e]^T, zero on dropped rows
@triton.jit
def _moe_grouped_swiglu_bwd_dx_kernel(dh_ptr, g_ptr, u_ptr, wg_ptr, wu_ptr, dx_ptr, offsets_ptr,
                                      N, D, F, E, stride_we, stride_wd, stride_wf,
                                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                                      BLOCK_N: tl.constexpr,
                                      BLOCK_K: tl.constexpr, BLOCK_SEG: tl.constexpr):
    seg, row0, row_end = _moe_row_tile(offsets_ptr, N, E, tl.program_id(0), BLOCK_M, BLOCK_SEG)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    dx_ptrs = dx_ptr + rows[:, None].to(tl.int64) * D + cols[None, :]
    if seg < E:
        ks = tl.arange(0, BLOCK_K)
        h_offs = rows[:, None].to(tl.int64) * F + ks[None, :]
        w_offs = seg.to(tl.int64) * stride_we + ks[:, None] * stride_wf + cols[None, :] * stride_wd
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            kmask = (k0 + ks) < F
            hmask = rmask[:, None] & kmask[None, :]
            dh = tl.load(dh_ptr + h_offs, mask=hmask, other=0.0)
            g = tl.load(g_ptr + h_offs, mask=hmask, other=0.0)
            u = tl.load(u_ptr + h_offs, mask=hmask, other=0.0)
            wmask = kmask[:, None] & cmask[None, :]
            bg = tl.load(wg_ptr + w_offs, mask=wmask, other=0.0)  # (BK, BN) = w_gate[e]^T tile
            bu = tl.load(wu_ptr + w_offs, mask=wmask, other=0.0)
            if UPCAST:
                bg, bu = bg.to(tl.float32), bu.to(tl.float32)
            dg, du = _swiglu_grads(dh, g, u, bg.dtype)
            acc = tl.dot(dg, bg, acc, input_precision=PRECISION)
            acc = tl.dot(du, bu, acc, input_precision=PRECISION)
            h_offs += BLOCK_K
            w_offs += BLOCK_K * stride_wf
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
    else:
        tl.store(dx_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=dx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers and autograd glue
# ----------------------------------------------------------------------------------------------

# Tile shapes per kernel for bf16/fp16 on sm_90, chosen so that no kernel spills registers (checked
# from the cubin by tests/test_moe_grouped_gemm.py::test_gpu_build_sm90). Not autotuned: no GPU was
# at hand to time them; benchmarks/moe_layer.py is where to do it.
#                 BLOCK_M, BLOCK_N, BLOCK_K (BLOCK_R for dw: rows per step), num_warps, num_stages
_GPU_TILES = {
    "gemm": (128, 128, 64, 8, 3),  # 121 registers, 96 KiB shared
    "swiglu": (128, 64, 64, 8, 3),  # two accumulators: BLOCK_N=128 spills
    "swiglu_dx": (128, 128, 32, 8, 4),  # five operand tiles per step
    "dw": (128, 128, 64, 8, 3),
    "swiglu_dw": (128, 128, 32, 8, 4),
}
_GPU_TILES_FP32 = (64, 64, 32, 4, 3)


def _gemm_config(kind: str, dtype: torch.dtype) -> dict:
    if interpret_mode():
        # The CPU interpreter pays per program; 32 still leaves several K chunks on the test widths.
        bm, bn, bk, warps, stages = 32, 32, 32, 4, 1
    elif dtype == torch.float32:
        bm, bn, bk, warps, stages = _GPU_TILES_FP32
    else:
        bm, bn, bk, warps, stages = _GPU_TILES[kind]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


def _dot_flags(dtype: torch.dtype) -> dict:
    """PRECISION: fp32 inputs get true fp32 products, as torch's fp32 matmul (TF32 off by default).
    UPCAST: Triton's CPU interpreter multiplies the raw bits of bf16 operands in tl.dot (it stores
    bf16 as uint16; triton-lang/triton#11584, closed unfixed), so under the interpreter 16-bit operands
    are converted to fp32 first: the same exact products and fp32 sums as a tensor-core dot."""
    upcast = interpret_mode() and dtype != torch.float32
    return dict(PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)


def _row_tiles(N: int, E: int, block_m: int) -> int:
    """Upper bound on the row tiles of all segments, known without reading expert_offsets: since
    cdiv(a) + cdiv(b) <= cdiv(a + b) + 1, m non-empty segments (m <= E+1 and m <= N) need at most
    cdiv(N, BM) + m - 1 tiles."""
    return triton.cdiv(N, block_m) + min(E, max(N - 1, 0))


def _grouped_gemm(a, expert_offsets, b, n_out_rows, K, N_OUT, E, *, gather=None, gather_div=1,
                  b_strides=None, out_dtype=None):
    """C (n_out_rows, N_OUT) = per-segment A @ b[e] (see _moe_grouped_gemm_kernel)."""
    cfg = _gemm_config("gemm", a.dtype)
    c = torch.empty((n_out_rows, N_OUT), dtype=out_dtype or a.dtype, device=a.device)
    if n_out_rows == 0 or N_OUT == 0:
        return c
    sbe, sbk, sbn = b_strides if b_strides is not None else b.stride()
    grid = (_row_tiles(n_out_rows, E, cfg["BLOCK_M"]), triton.cdiv(N_OUT, cfg["BLOCK_N"]))
    runnable(_moe_grouped_gemm_kernel)[grid](
        a, gather if gather is not None else expert_offsets, b, c, expert_offsets,
        n_out_rows, K, N_OUT, E, gather_div,
        a.stride(0), a.stride(1), sbe, sbk, sbn, c.stride(0),
        GATHER=gather is not None, **_dot_flags(a.dtype), BLOCK_SEG=max(2, next_pow2(E + 1)), **cfg)
    return c


def _grouped_dw(a, expert_offsets, dc, E, K, N_OUT, *, gather=None, gather_div=1, g=None, u=None, dtype=None):
    """dw (E, K, N_OUT) = per-expert a_rows^T @ dc_rows (two outputs from dh, g, u when g is given)."""
    swiglu = g is not None
    cfg = _gemm_config("swiglu_dw" if swiglu else "dw", a.dtype)
    dw = torch.empty((E, K, N_OUT), dtype=dtype or a.dtype, device=a.device)
    dw2 = torch.empty_like(dw) if swiglu else None
    if E == 0 or K == 0 or N_OUT == 0:
        return dw, dw2
    grid = (E, triton.cdiv(K, cfg["BLOCK_M"]), triton.cdiv(N_OUT, cfg["BLOCK_N"]))
    runnable(_moe_grouped_gemm_dw_kernel)[grid](
        a, gather if gather is not None else expert_offsets, dc, g if swiglu else dc, u if swiglu else dc,
        dw, dw2 if swiglu else dw, expert_offsets, K, N_OUT, gather_div,
        a.stride(0), a.stride(1), dc.stride(0),
        GATHER=gather is not None, SWIGLU=swiglu, **_dot_flags(a.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw, dw2


class _MoEGroupedGemm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, expert_offsets, w):
        E, D_in, D_out = w.shape
        ctx.save_for_backward(x, expert_offsets, w)
        return _grouped_gemm(x, expert_offsets, w, x.shape[0], D_in, D_out, E)

    @staticmethod
    def backward(ctx, dy):
        x, expert_offsets, w = ctx.saved_tensors
        E, D_in, D_out = w.shape
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx = dy @ w[e]^T: w read transposed through its strides
            dx = _grouped_gemm(dy, expert_offsets, w, x.shape[0], D_out, D_in, E,
                               b_strides=(w.stride(0), w.stride(2), w.stride(1)))
        if ctx.needs_input_grad[2]:
            dw, _ = _grouped_dw(x, expert_offsets, dy, E, D_in, D_out)
        return dx, None, dw


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
            grid = (_row_tiles(N, E, cfg["BLOCK_M"]), triton.cdiv(Fh, cfg["BLOCK_N"]))
            runnable(_moe_grouped_swiglu_kernel)[grid](
                x, sorted_slots if sorted_slots is not None else expert_offsets, w_gate, w_up, g, u, h,
                expert_offsets, N, D, Fh, E, top_k, x.stride(0), x.stride(1),
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
        dh = dh.contiguous()
        dx = dwg = dwu = None
        if ctx.needs_input_grad[0]:
            cfg = _gemm_config("swiglu_dx", x.dtype)
            dx_rows = torch.empty((N, D), dtype=x.dtype, device=x.device)
            if N > 0 and D > 0:
                grid = (_row_tiles(N, E, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_N"]))
                runnable(_moe_grouped_swiglu_bwd_dx_kernel)[grid](
                    dh, g, u, w_gate, w_up, dx_rows, expert_offsets, N, D, Fh, E,
                    w_gate.stride(0), w_gate.stride(1), w_gate.stride(2),
                    **_dot_flags(x.dtype), BLOCK_SEG=max(2, next_pow2(E + 1)), **cfg)
            if sorted_slots is not None:
                # The gather's backward: each token sums its K rows, through the inverse (no atomics).
                dx = _combine(dx_rows, _inverse_of(sorted_slots), None, x.shape[0], ctx.top_k, x.dtype)
            else:
                dx = dx_rows
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dwg, dwu = _grouped_dw(x, expert_offsets, dh, E, D, Fh, gather=sorted_slots, gather_div=ctx.top_k,
                                   g=g, u=u, dtype=w_gate.dtype)
        return dx, None, dwg, dwu, None, None


def moe_grouped_gemm(x: torch.Tensor, expert_offsets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Triton launcher with `moe_grouped_gemm_ref`'s contract; backward gives dx and per-expert dw."""
    _check_gemm_args("moe_grouped_gemm", x, expert_offsets, w)
    check_triton_inputs("moe_grouped_gemm", x, expert_offsets, w)
    return _MoEGroupedGemm.apply(x, expert_offsets, w)


def moe_grouped_swiglu(x: torch.Tensor, expert_offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                       sorted_slots: Optional[torch.Tensor] = None, top_k: int = 1) -> torch.Tensor:
    """Triton launcher with `moe_grouped_swiglu_ref`'s contract: gate and up projections in one
    grouped GEMM (shared loads of x, optionally gathered through sorted_slots), SwiGLU in the epilogue."""
    _check_gemm_args("moe_grouped_swiglu", x, expert_offsets, w_gate, w_up)
    check_triton_inputs("moe_grouped_swiglu", x, expert_offsets, w_gate, w_up, sorted_slots)
    return _MoEGroupedSwiGLU.apply(x, expert_offsets, w_gate, w_up, sorted_slots, int(top_k))


def moe_grouped_down_combine(h: torch.Tensor, expert_offsets: torch.Tensor, w_down: torch.Tensor,
                             inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Triton launcher with `moe_grouped_down_combine_ref`'s contract. On the GPU it is the two kernels
    in sequence (grouped GEMM, then the atomic-free gather-sum combine): the combine needs the
    (S, D) expert output in memory to stay deterministic without atomics."""
    _check_gemm_args("moe_grouped_down_combine", h, expert_offsets, w_down)
    check_triton_inputs("moe_grouped_down_combine", h, expert_offsets, w_down, inverse, topk_weights)
    return moe_unpermute_combine(_MoEGroupedGemm.apply(h, expert_offsets, w_down), inverse, topk_weights)
