"""moe_permute: token rows into expert order and back.

Shapes: T tokens, K top-k, S = T*K assignments (flat index s = t*K + k), E experts, D width.

Three ops, each with its reference (the specification) and its Triton launcher (same signature,
no `_ref` suffix):

moe_permute_indices_ref(topk_ids (T, K) int, num_experts) -> PermuteIndices
    Ids lie in [0, E]; id == E marks a dropped assignment (over capacity): it sorts after every
    expert, so rows [expert_offsets[E], S) hold the dropped assignments.
    sorted_slots    (S,)   int64  flat assignment index of each permuted row; stable: within an
                                  expert, rows keep increasing s (deterministic)
    expert_offsets  (E+1,) int64  exclusive prefix sum of per-expert counts; expert e owns rows
                                  [expert_offsets[e], expert_offsets[e+1])
    inverse         (S,)   int64  permuted row of each flat assignment: inverse[sorted_slots] = arange(S)

moe_permute_ref(x (T, D), sorted_slots (S,), top_k) -> (S, D)
    row p = x[sorted_slots[p] // top_k]. Gradient: each token sums the gradients of its K rows.

moe_unpermute_combine_ref(y (S, D), inverse (S,), topk_weights (T, K)) -> (T, D)
    out[t] = sum_k topk_weights[t, k] * y[inverse[t*K + k]], accumulated in fp32 and returned in
    y's dtype. Deterministic: each token gathers its own K rows, no atomics. A dropped assignment
    must carry weight 0 and its row must be finite (the expert ops write zeros there).
    Gradients flow to y and topk_weights.

The Triton path builds the permutation without a sort and without a host synchronisation:
a per-block histogram, an exclusive scan over (expert, block) on the device, and a scatter in
which every assignment finds its row from its block's base and its rank among equal ids in the
block. Stable by construction, so it equals the reference exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .triton_utils import check_triton_inputs, next_pow2, runnable, tl, triton


class PermuteIndices(NamedTuple):
    sorted_slots: torch.Tensor
    expert_offsets: torch.Tensor
    inverse: torch.Tensor


# ----------------------------------------------------------------------------------------------
# References (plain torch): the specification, and Blues' CPU path.
# ----------------------------------------------------------------------------------------------

def moe_permute_indices_ref(topk_ids: torch.Tensor, num_experts: int) -> PermuteIndices:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be (T, K), got shape {tuple(topk_ids.shape)}")
    flat = topk_ids.reshape(-1).long()  # (S,)
    S = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts + 1)[: num_experts + 1]  # (E+1,) last bin = dropped
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    expert_offsets[1:] = torch.cumsum(counts[:num_experts], dim=0)
    sorted_slots = torch.sort(flat, stable=True).indices  # (S,)
    inverse = torch.empty_like(sorted_slots)
    inverse[sorted_slots] = torch.arange(S, device=flat.device)
    return PermuteIndices(sorted_slots, expert_offsets, inverse)


# The torch references are also Blues' CPU path, so they are written for the CPU: a fresh large
# tensor costs page faults there (a new 64 MiB buffer: 35 ms on these 2-core machines, about as much
# as the copy itself), so they allocate only their outputs and work through the rows in chunks of
# _CHUNK_ROWS whose temporaries stay in cache; and on CPU they sum with index_add_, which is serial
# over the index (deterministic) and reads its source once (6.6 ms for S=32768 rows of D=512 into
# 4096 tokens, against 48 ms for the gather + bmm written below as the definition). On other
# devices index_add_ is atomic, so there they run the definition itself.
_CHUNK_ROWS = 1024


def _sorted_slots_from_inverse(inverse: torch.Tensor) -> torch.Tensor:
    return _inverse_ref(inverse)  # the inverse of a permutation's inverse is the permutation


def _inverse_ref(sorted_slots: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(sorted_slots)
    inverse[sorted_slots] = torch.arange(sorted_slots.numel(), device=sorted_slots.device)
    return inverse


def _gather_sum(rows: torch.Tensor, inverse: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """out[t] = sum_k rows[inverse[t*K + k]], deterministic on every device."""
    if rows.device.type == "cpu":
        token_of_row = torch.div(_sorted_slots_from_inverse(inverse), K, rounding_mode="floor")
        return rows.new_zeros(T, rows.shape[1]).index_add_(0, token_of_row, rows)
    return rows.index_select(0, inverse).view(T, K, -1).sum(dim=1)


class _PermuteRef(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, sorted_slots, top_k):
        ctx.save_for_backward(sorted_slots)
        ctx.shape = (x.shape[0], top_k)
        return x.index_select(0, torch.div(sorted_slots, top_k, rounding_mode="floor"))  # (S, D)

    @staticmethod
    def backward(ctx, g):
        (sorted_slots,) = ctx.saved_tensors
        T, K = ctx.shape
        if g.device.type == "cpu":
            dx = g.new_zeros(T, g.shape[1]).index_add_(0, torch.div(sorted_slots, K, rounding_mode="floor"), g)
        else:
            dx = _gather_sum(g, _inverse_ref(sorted_slots), T, K)
        return dx, None, None


def moe_permute_ref(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """Row p = x[sorted_slots[p] // top_k]. By definition: x.index_select(0, sorted_slots // top_k),
    whose gradient sums each token's K rows."""
    return _PermuteRef.apply(x, sorted_slots, top_k)


def _combine_definition(y, inverse, w):
    """out[t] = sum_k w[t, k] * y[inverse[t*K + k]] (w already in the accumulation dtype)."""
    T, K = w.shape
    return torch.bmm(w.unsqueeze(1), y.index_select(0, inverse).view(T, K, -1).to(w.dtype)).squeeze(1)


class _UnpermuteCombineRef(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, inverse, topk_weights):
        T, K = topk_weights.shape
        acc = torch.promote_types(y.dtype, torch.float32)  # fp32 for 16-bit y, fp64 stays fp64
        w = topk_weights.to(acc)
        ctx.w_dtype = topk_weights.dtype
        if y.device.type != "cpu":
            ctx.save_for_backward(y, inverse, w)
            return _combine_definition(y, inverse, w).to(y.dtype)
        sorted_slots = _sorted_slots_from_inverse(inverse)
        token_of_row = torch.div(sorted_slots, K, rounding_mode="floor")  # (S,)
        w_of_row = w.reshape(-1)[sorted_slots]  # (S,) each permuted row's weight
        out = torch.zeros(T, y.shape[1], dtype=acc, device=y.device)
        for a in range(0, y.shape[0], _CHUNK_ROWS):
            b = a + _CHUNK_ROWS
            out.index_add_(0, token_of_row[a:b], y[a:b].to(acc) * w_of_row[a:b, None])
        ctx.save_for_backward(y, inverse, w, token_of_row, w_of_row)
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, g):
        y, inverse, w, *cpu = ctx.saved_tensors
        T, K = w.shape
        need_dy, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dy = dw = None
        g = g.to(w.dtype)
        if not cpu:  # the definition's gradients, with the gather's scatter written as index_copy_
            if need_dy:
                d_rows = (w.unsqueeze(2) * g.unsqueeze(1)).to(y.dtype)  # (T, K, D)
                dy = torch.empty_like(y).index_copy_(0, inverse, d_rows.view(T * K, -1))
            if need_dw:
                rows = y.index_select(0, inverse).view(T, K, -1).to(w.dtype)
                dw = torch.bmm(rows, g.unsqueeze(2)).squeeze(2).to(ctx.w_dtype)
            return dy, None, dw
        token_of_row, w_of_row = cpu
        dy = torch.empty_like(y) if need_dy else None
        dw_of_row = torch.empty_like(w_of_row) if need_dw else None
        for a in range(0, y.shape[0], _CHUNK_ROWS):
            b = a + _CHUNK_ROWS
            g_rows = g.index_select(0, token_of_row[a:b])  # (chunk, D) each row's token's gradient
            if need_dy:
                dy[a:b] = g_rows * w_of_row[a:b, None]  # dL/dy[p] = w_p * g[t_p]
            if need_dw:  # dL/dw_p = <g[t_p], y[p]>
                dw_of_row[a:b] = torch.bmm(g_rows.unsqueeze(1), y[a:b].to(w.dtype).unsqueeze(2)).view(-1)
        if need_dw:
            dw = dw_of_row[inverse].view(T, K).to(ctx.w_dtype)
        return dy, None, dw


def moe_unpermute_combine_ref(y: torch.Tensor, inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * y[inverse[t*K + k]], accumulated in fp32 (fp64 for fp64 y)
    and returned in y's dtype. By definition (`_combine_definition`): a gather of each token's K rows
    and a (1, K) x (K, D) product per token; on CPU the same sum is taken row block by row block."""
    return _UnpermuteCombineRef.apply(y, inverse, topk_weights)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

# Tensor contract of _moe_permute_indices_count_kernel. One program owns BLOCK_S assignments.
#   topk_ids      (S,) int (flat view of (T, K)), values in [0, NB) with NB = E+1
#   block_counts  (NB, P) int32  written: column pid = histogram of this block's ids. Expert-major,
#                                so the scan over blocks is an inner-dimension cumsum: torch's scan
#                                along dim 0 of (P, NB) ran one thread per column (0.29 ms, 5 % of the
#                                layer at S2 on an H200), along dim 1 it is a few microseconds
@triton.jit
def _moe_permute_indices_count_kernel(ids_ptr, block_counts_ptr, S, NB, P,
                                      BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = offs < S
    ids = tl.load(ids_ptr + offs, mask=smask, other=0).to(tl.int32)
    hist = tl.histogram(ids, BLOCK_B, mask=smask)  # (BLOCK_B,)
    bins = tl.arange(0, BLOCK_B)
    tl.store(block_counts_ptr + bins * P + pid, hist, mask=bins < NB)


# Tensor contract of _moe_permute_indices_scatter_kernel. One program owns BLOCK_S assignments.
#   topk_ids      (S,) int, as above
#   block_base    (NB, P) int64  first permuted row of each (id, block): expert_offsets[id] plus the
#                                count of id in all earlier blocks
#   sorted_slots  (S,) int64     written at the rows this block owns
#   inverse       (S,) int64     written for this block's assignments
# Within a block an assignment's rank is the number of earlier equal ids, so the order is stable.
@triton.jit
def _moe_permute_indices_scatter_kernel(ids_ptr, block_base_ptr, sorted_slots_ptr, inverse_ptr, S, P,
                                        BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK_S)
    offs = pid * BLOCK_S + local
    smask = offs < S
    ids = tl.load(ids_ptr + offs, mask=smask, other=0).to(tl.int32)
    earlier = (ids[:, None] == ids[None, :]) & (local[None, :] < local[:, None])  # (BS, BS): j before i
    rank = tl.sum(earlier.to(tl.int32), axis=1)  # (BS,)
    base = tl.load(block_base_ptr + ids.to(tl.int64) * P + pid, mask=smask, other=0)
    pos = base + rank
    tl.store(sorted_slots_ptr + pos, offs.to(tl.int64), mask=smask)
    tl.store(inverse_ptr + offs, pos.to(tl.int64), mask=smask)


# Tensor contract of _moe_permute_kernel. Program (i, j) owns BLOCK_R permuted rows, BLOCK_D columns.
#   x             (T, D)  any dtype, row stride stride_x (unit column stride)
#   sorted_slots  (S,) int64
#   out           (S, D)  contiguous, x's dtype: out[p] = x[sorted_slots[p] // K]
@triton.jit
def _moe_permute_kernel(x_ptr, sorted_slots_ptr, out_ptr, S, D, K, stride_x,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < S
    cmask = cols < D
    src = tl.load(sorted_slots_ptr + rows, mask=rmask, other=0) // K  # (BR,) int64
    mask = rmask[:, None] & cmask[None, :]
    vals = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], vals, mask=mask)


# Tensor contract of _moe_unpermute_combine_kernel. Program (i, j) owns BLOCK_T tokens, BLOCK_D columns.
#   y        (S, D)  any dtype, row stride stride_y (unit column stride)
#   inverse  (S,) int64
#   weights  (T, K)  fp32 contiguous; read only when HAS_WEIGHTS (else every weight is 1: this is
#                    also the backward of moe_permute, each token summing its K rows' gradients)
#   out      (T, D)  contiguous, out's dtype; fp32 accumulation, k in order 0..K-1 (deterministic)
@triton.jit
def _moe_unpermute_combine_kernel(y_ptr, inverse_ptr, weights_ptr, out_ptr, T, D, K, stride_y,
                                  HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = toks < T
    cmask = cols < D
    mask = tmask[:, None] & cmask[None, :]
    toks64 = toks.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(K):
        rows = tl.load(inverse_ptr + toks64 * K + k, mask=tmask, other=0)  # (BT,)
        vals = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + toks64 * K + k, mask=tmask, other=0.0)
            acc += w[:, None] * vals
        else:
            acc += vals
    tl.store(out_ptr + toks64[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# Tensor contract of _moe_unpermute_combine_bwd_kernel. Program (i, k) owns BLOCK_T tokens' k-th
# assignment and walks all D columns.
#   g_out    (T, D)  contiguous, gradient of the combine's output
#   y        (S, D)  row stride stride_y; read when NEED_DW
#   inverse  (S,) int64
#   weights  (T, K)  fp32 contiguous
#   d_y      (S, D)  contiguous, y's dtype: row inverse[t*K+k] = weights[t, k] * g_out[t]. inverse is a
#                    permutation, so every row is written exactly once: no atomics, no zero fill.
#   d_w      (T, K)  fp32: sum_d g_out[t, d] * y[inverse[t*K+k], d], accumulated in fp32
@triton.jit
def _moe_unpermute_combine_bwd_kernel(gout_ptr, y_ptr, inverse_ptr, weights_ptr, dy_ptr, dw_ptr,
                                      T, D, K, stride_y,
                                      NEED_DY: tl.constexpr, NEED_DW: tl.constexpr,
                                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.program_id(1)
    tmask = toks < T
    toks64 = toks.to(tl.int64)
    rows = tl.load(inverse_ptr + toks64 * K + k, mask=tmask, other=0)  # (BT,) int64
    w = tl.load(weights_ptr + toks64 * K + k, mask=tmask, other=0.0)  # (BT,)
    dw = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = tmask[:, None] & (cols[None, :] < D)
        g = tl.load(gout_ptr + toks64[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_DY:
            tl.store(dy_ptr + rows[:, None] * D + cols[None, :], (w[:, None] * g).to(dy_ptr.dtype.element_ty),
                     mask=mask)
        if NEED_DW:
            yv = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dw += tl.sum(g * yv, axis=1)
    if NEED_DW:
        tl.store(dw_ptr + toks64 * K + k, dw, mask=tmask)


# ----------------------------------------------------------------------------------------------
# Launchers and autograd glue
# ----------------------------------------------------------------------------------------------

_SCATTER_BLOCK = 128  # the rank test is a BLOCK x BLOCK comparison: 16k lanes, cheap in registers


def moe_permute_indices(topk_ids: torch.Tensor, num_experts: int) -> PermuteIndices:
    """Triton launcher with `moe_permute_indices_ref`'s contract: histogram, device-side exclusive
    scan, scatter. No sort, no host synchronisation."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be (T, K), got shape {tuple(topk_ids.shape)}")
    check_triton_inputs("moe_permute_indices", topk_ids)
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    S = flat.numel()
    NB = num_experts + 1
    dev = flat.device
    BLOCK_S = _SCATTER_BLOCK
    P = triton.cdiv(S, BLOCK_S)
    sorted_slots = torch.empty(S, dtype=torch.int64, device=dev)
    inverse = torch.empty(S, dtype=torch.int64, device=dev)
    if S == 0:
        return PermuteIndices(sorted_slots, torch.zeros(NB, dtype=torch.int64, device=dev), inverse)
    block_counts = torch.empty((NB, P), dtype=torch.int32, device=dev)
    runnable(_moe_permute_indices_count_kernel)[(P,)](flat, block_counts, S, NB, P,
                                                      BLOCK_S=BLOCK_S, BLOCK_B=max(2, next_pow2(NB)))
    # Exclusive scans over experts, then over blocks within each expert: small (E+1, P) device ops,
    # both along the inner dimension.
    within = torch.cumsum(block_counts, dim=1, dtype=torch.int64)  # (E+1, P) inclusive, per expert
    totals = within[:, -1]  # (E+1,)
    expert_offsets = torch.cumsum(totals, dim=0) - totals  # (E+1,) exclusive
    block_base = within - block_counts + expert_offsets[:, None]  # (E+1, P)
    runnable(_moe_permute_indices_scatter_kernel)[(P,)](flat, block_base, sorted_slots, inverse, S, P,
                                                        BLOCK_S=BLOCK_S)
    return PermuteIndices(sorted_slots, expert_offsets, inverse)


def _inverse_of(sorted_slots: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(sorted_slots)
    inverse.scatter_(0, sorted_slots, torch.arange(sorted_slots.numel(), device=sorted_slots.device))
    return inverse


def _gather_blocks(D: int):
    BLOCK_D = min(256, max(16, next_pow2(D)))
    BLOCK_R = max(1, 4096 // BLOCK_D)  # about 4096 elements per program
    return BLOCK_R, BLOCK_D


def _combine(y: torch.Tensor, inverse: torch.Tensor, weights, T: int, K: int, out_dtype) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * y[inverse[t*K+k]] (w = 1 when weights is None)."""
    D = y.shape[1]
    out = torch.empty((T, D), dtype=out_dtype, device=y.device)
    if T == 0 or D == 0:
        return out
    BLOCK_T, BLOCK_D = _gather_blocks(D)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
    runnable(_moe_unpermute_combine_kernel)[grid](
        y, inverse, weights if weights is not None else inverse, out, T, D, K, y.stride(0),
        HAS_WEIGHTS=weights is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    return out


def _permute(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    S, D = sorted_slots.numel(), x.shape[1]
    out = torch.empty((S, D), dtype=x.dtype, device=x.device)
    if S == 0 or D == 0:
        return out
    BLOCK_R, BLOCK_D = _gather_blocks(D)
    grid = (triton.cdiv(S, BLOCK_R), triton.cdiv(D, BLOCK_D))
    runnable(_moe_permute_kernel)[grid](x, sorted_slots, out, S, D, top_k, x.stride(0),
                                        BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return out


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _MoEPermute(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, sorted_slots, top_k):
        ctx.save_for_backward(sorted_slots)
        ctx.top_k = top_k
        ctx.T = x.shape[0]
        return _permute(x, sorted_slots, top_k)

    @staticmethod
    def backward(ctx, g):
        (sorted_slots,) = ctx.saved_tensors
        # Each token sums its K rows' gradients, gathered through the inverse: no atomics.
        dx = _combine(_unit_stride(g), _inverse_of(sorted_slots), None, ctx.T, ctx.top_k, g.dtype)
        return dx, None, None


class _MoEUnpermuteCombine(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, inverse, topk_weights):
        T, K = topk_weights.shape
        w32 = topk_weights.float().contiguous()
        ctx.save_for_backward(y, inverse, w32)
        ctx.w_dtype = topk_weights.dtype
        return _combine(y, inverse, w32, T, K, y.dtype)

    @staticmethod
    def backward(ctx, g):
        y, inverse, w32 = ctx.saved_tensors
        T, K = w32.shape
        S, D = y.shape
        need_dy, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        g = g.contiguous()
        dy = torch.empty((S, D), dtype=y.dtype, device=y.device) if need_dy else None
        dw = torch.empty((T, K), dtype=torch.float32, device=y.device) if need_dw else None
        if T > 0 and (need_dy or need_dw):
            BLOCK_D = min(128, max(16, next_pow2(D)))
            BLOCK_T = max(1, 2048 // BLOCK_D)
            runnable(_moe_unpermute_combine_bwd_kernel)[(triton.cdiv(T, BLOCK_T), K)](
                g, y, inverse, w32, dy if need_dy else g, dw if need_dw else w32, T, D, K, y.stride(0),
                NEED_DY=need_dy, NEED_DW=need_dw, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
        if dw is not None and dw.dtype != ctx.w_dtype:
            dw = dw.to(ctx.w_dtype)
        return dy, None, dw


def moe_permute(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """Triton launcher with `moe_permute_ref`'s contract (row p = x[sorted_slots[p] // top_k])."""
    if x.dim() != 2:
        raise ValueError(f"x must be (T, D), got shape {tuple(x.shape)}")
    check_triton_inputs("moe_permute", x, sorted_slots)
    return _MoEPermute.apply(_unit_stride(x), sorted_slots, top_k)


def moe_unpermute_combine(y: torch.Tensor, inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Triton launcher with `moe_unpermute_combine_ref`'s contract (fp32 weighted gather-sum, no atomics)."""
    if (y.dim() != 2 or topk_weights.dim() != 2 or inverse.numel() != topk_weights.numel()
            or y.shape[0] != inverse.numel()):
        raise ValueError(f"moe_unpermute_combine: expected y (S, D), inverse (S,), topk_weights (T, K) with S = T*K, "
                         f"got {tuple(y.shape)}, {tuple(inverse.shape)}, {tuple(topk_weights.shape)}")
    check_triton_inputs("moe_unpermute_combine", y, inverse, topk_weights)
    return _MoEUnpermuteCombine.apply(_unit_stride(y), inverse, topk_weights)
