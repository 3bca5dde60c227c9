"""moe_grouped_gemm: one matmul per expert over its contiguous block of permuted rows, and the
grouped-GEMM machinery that moe_grouped_swiglu and moe_grouped_down_combine are built from.

Shapes: N rows in expert order, E experts, D_in / D_out widths.

Contract of moe_grouped_gemm (reference `moe_grouped_gemm_ref`, the specification):
    x               (N, D_in)
    expert_offsets  (E+1,) int64   expert e owns rows [expert_offsets[e], expert_offsets[e+1])
    w               (E, D_in, D_out), x's dtype
  returns (N, D_out): rows of expert e are x_rows @ w[e]; rows at or past expert_offsets[E]
  (dropped assignments) are zero. Gradients flow to x and w.

The Triton kernels need no host synchronisation: each program finds its (expert, row tile) from
expert_offsets on the device; the grid is sized from an upper bound on the number of row tiles
(cdiv(N, BLOCK_M) + min(E, N-1), see _row_tiles), and programs past the real count do nothing.

Tile order (issue 11, part 3): one program per (row tile, column block), numbered GROUP_M row tiles
at a time with the column blocks inside (_swizzle, Triton's matmul tutorial's grouped ordering), so
the programs in flight together share GROUP_M gathered row tiles and one expert's weight columns:
both are read from HBM about once and then from L2. Row tiles fastest, as before, streamed the
gathered rows once per column block (~128 FLOP/byte at the S2 shape, under the H100's ridge of ~295).
The weight-gradient grid is expert-major for the same reason: the programs of one expert, which read
the same rows, run together.
"""
from __future__ import annotations

import torch

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
# tests/kernels/test_moe_grouped_gemm.py checks both backwards with torch.autograd.gradcheck against
# the one-line definitions.
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


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _moe_row_tile(offsets_ptr, N, E, pid, BLOCK_M: tl.constexpr, BLOCK_SEG: tl.constexpr):
    """Row tile pid: (segment, first row, end of the segment's rows). Segments 0..E-1 are the
    experts, segment E the dropped rows [expert_offsets[E], N); segment > E means idle."""
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


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(m, n) of program pid in a num_m x num_n grid walked GROUP_M rows at a time, the columns
    inside each group (the last group may be shorter): a bijection of [0, num_m * num_n)."""
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    m = first_m + (pid % in_group) % size_m
    n = (pid % in_group) // size_m
    return m, n


@triton.jit
def _dot_loop(acc, a_ptrs, b_ptrs, rmask, cmask, K, stride_ak, stride_bk,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += A (BLOCK_M, K) @ B (K, BLOCK_N) in BLOCK_K steps: loads and one dot per step, nothing
    else in the loop, so the compiler can keep several MMAs in flight (software pipelining)."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


# Tensor contract of _moe_grouped_gemm_kernel. Program pid owns row tile m and output columns
# [n*BLOCK_N, (n+1)*BLOCK_N), (m, n) = _swizzle(pid, num_tiles, cdiv(N_OUT, BLOCK_N), GROUP_M).
#   a        rows of A, strides (stride_am, stride_ak); row r reads A[gather[r] // gather_div] when
#            GATHER, else A[r]
#   b        (E, K, N_OUT) strides (stride_be, stride_bk, stride_bn): any layout, so the backward
#            passes w transposed without a copy
#   b2       when SPLIT_K, rows [K1, K) of the B operand come from b2 (b's strides) and rows [0, K1)
#            from b: C = A[:, :K1] @ b[e] + A[:, K1:] @ b2[e], two plain K loops into one accumulator
#            (the SwiGLU input gradient [dg | du] @ [w_gate; w_up]^T, as if the two weights were one
#            (E, 2F, D) tensor). One loop that picked each B row's pointer from b or b2 with tl.where
#            made the B loads non-affine; two loops keep both streams plain and pipelined.
#   c        (N, N_OUT) row stride stride_cm, written: expert rows as above, dropped rows zero
@triton.jit
def _moe_grouped_gemm_kernel(a_ptr, gather_ptr, b_ptr, b2_ptr, c_ptr, offsets_ptr,
                             N, K, K1, N_OUT, E, gather_div, num_tiles,
                             stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm,
                             GATHER: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
                             UPCAST: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SEG: tl.constexpr):
    tile, col = _swizzle(tl.program_id(0), num_tiles, tl.cdiv(N_OUT, BLOCK_N), GROUP_M)
    seg, row0, row_end = _moe_row_tile(offsets_ptr, N, E, tile, BLOCK_M, BLOCK_SEG)
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    cols = col * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N_OUT
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
    if seg < E:
        if GATHER:
            src = tl.load(gather_ptr + rows, mask=rmask, other=0) // gather_div
        else:
            src = rows.to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        a_offs = src[:, None] * stride_am + ks[None, :] * stride_ak
        b_offs = seg.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SPLIT_K:  # two plain K loops into one accumulator: A[:, :K1] @ b[e], then A[:, K1:] @ b2[e]
            acc = _dot_loop(acc, a_ptr + a_offs, b_ptr + b_offs, rmask, cmask, K1, stride_ak, stride_bk,
                            PRECISION, UPCAST, BLOCK_K)
            acc = _dot_loop(acc, a_ptr + a_offs + K1 * stride_ak, b2_ptr + b_offs, rmask, cmask, K - K1,
                            stride_ak, stride_bk, PRECISION, UPCAST, BLOCK_K)
        else:
            acc = _dot_loop(acc, a_ptr + a_offs, b_ptr + b_offs, rmask, cmask, K, stride_ak, stride_bk,
                            PRECISION, UPCAST, BLOCK_K)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
    else:
        tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


# Tensor contract of _moe_grouped_gemm_dw_kernel (per-expert weight gradient). Program pid owns
# expert e = pid // (num_k * num_n) and the tile (i, j) = _swizzle of the rest, i.e.
# dw[e, i*BLOCK_M:, j*BLOCK_N:], and walks expert e's rows in chunks of BLOCK_R.
#   a      rows, strides (stride_am, stride_ak), gathered as in _moe_grouped_gemm_kernel when GATHER
#   dc     (N, N_OUT) row stride stride_dcm: gradient of the forward's output
#   dw     (E, K, N1) strides (stride_we, stride_wk, stride_wn): columns [0, N1) of a_rows^T @ dc_rows
#          (zero for an expert with no row); any layout, so moe_grouped_down_combine can write its
#          (E, F, D) weight gradient as the transpose of a (E, D, F) product
#   dw2    when SPLIT, (E, K, N_OUT - N1) with dw's strides: the other columns. The SwiGLU op passes
#          dc = [dg | du] (N, 2F) and N1 = F: one launch writes both weight gradients.
@triton.jit
def _moe_grouped_gemm_dw_kernel(a_ptr, gather_ptr, dc_ptr, dw_ptr, dw2_ptr, offsets_ptr,
                                K, N_OUT, N1, gather_div,
                                stride_am, stride_ak, stride_dcm, stride_we, stride_wk, stride_wn,
                                GATHER: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                                UPCAST: tl.constexpr, GROUP_M: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    num_k, num_n = tl.cdiv(K, BLOCK_M), tl.cdiv(N_OUT, BLOCK_N)
    pid = tl.program_id(0)
    e = pid // (num_k * num_n)
    kb, nb = _swizzle(pid % (num_k * num_n), num_k, num_n, GROUP_M)
    kk = kb * BLOCK_M + tl.arange(0, BLOCK_M)
    nn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = kk < K
    nmask = nn < N_OUT
    start = tl.load(offsets_ptr + e).to(tl.int32)
    end = tl.load(offsets_ptr + e + 1).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
        dc = tl.load(dc_ptr + rows[:, None].to(tl.int64) * stride_dcm + nn[None, :],
                     mask=rmask[:, None] & nmask[None, :], other=0.0)  # (BR, BN)
        if UPCAST:
            a, dc = a.to(tl.float32), dc.to(tl.float32)
        acc = tl.dot(tl.trans(a), dc, acc, input_precision=PRECISION)
    out = acc.to(dw_ptr.dtype.element_ty)
    w_offs = e.to(tl.int64) * stride_we + kk[:, None].to(tl.int64) * stride_wk
    tl.store(dw_ptr + w_offs + nn[None, :] * stride_wn, out, mask=kmask[:, None] & (nn < N1)[None, :])
    if SPLIT:
        tl.store(dw2_ptr + w_offs + (nn - N1)[None, :] * stride_wn, out,
                 mask=kmask[:, None] & ((nn >= N1) & nmask)[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers and autograd glue
# ----------------------------------------------------------------------------------------------

# Tile shapes per kernel for bf16/fp16 on sm_90, chosen by timing the whole layer on an H200 with each
# candidate in turn (benchmarks/kernel_tiles.py; rows in benchmarks/results/kernel_tiles_sweep_h200.jsonl): the
# candidate with the least geometric-mean time over S1, S2 and S3b relative to each shape's best. None
# spills registers (tests/kernels/test_moe_grouped_gemm.py::test_gpu_build_sm90 reads the cubin).
#                 BLOCK_M, BLOCK_N, BLOCK_K (BLOCK_R for dw: rows per step), num_warps, num_stages
_GPU_TILES = {
    "gemm": (128, 256, 64, 8, 4),  # 243/255 registers, 192 KiB shared; was 128x128x64x8x3: S3b 85.6 vs 90.8 ms
    "swiglu_dx": (128, 256, 64, 8, 3),  # 248 registers, 1 CTA per SM; was 128x128x32x8x4 (2 CTAs): 82.0 vs 90.1
    "swiglu": (128, 64, 64, 8, 3),  # two accumulators: every 128-wide or 4-warp 64-wide tile spills
    "dw": (128, 256, 64, 8, 3),  # also both SwiGLU weight gradients (SPLIT); on sm_90 bf16, see set_dw_backend
    "swiglu_bwd": (64, 128, 0, 4, 1),  # elementwise: no K loop
}
_GPU_TILES_FP32 = (64, 64, 32, 4, 3)
GROUP_M = 8  # row tiles per group in _swizzle (Triton's tutorial value); 2 under the interpreter


def gpu_tiles() -> dict:
    """The 16-bit GPU tile table: {kind: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)}."""
    return dict(_GPU_TILES)


def set_gpu_tiles(**tiles: tuple) -> dict:
    """Replace entries of the 16-bit GPU tile table (benchmarks/kernel_tiles.py sweeps them); returns
    the previous table, which `set_gpu_tiles(**previous)` restores. Launches after the call use it."""
    for kind, tile in tiles.items():
        if kind not in _GPU_TILES:
            raise ValueError(f"set_gpu_tiles: unknown kind {kind!r}: expected one of {', '.join(_GPU_TILES)}")
        if len(tile) != 5 or not all(isinstance(v, int) and v >= 0 for v in tile):
            raise ValueError(f"set_gpu_tiles: {kind}={tile!r}: expected (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, "
                             "num_stages), non-negative integers")
    previous = gpu_tiles()
    _GPU_TILES.update({kind: tuple(tile) for kind, tile in tiles.items()})
    return previous


def _gemm_config(kind: str, dtype: torch.dtype) -> dict:
    if interpret_mode():
        # The CPU interpreter pays per program; 32 still leaves several K chunks on the test widths,
        # and GROUP_M=2 makes the tests' few row tiles form several groups, the last one short.
        bm, bn, bk, warps, stages, group = 32, 32, 32, 4, 1, 2
    elif dtype == torch.float32:
        (bm, bn, bk, warps, stages), group = _GPU_TILES_FP32, GROUP_M
    else:
        (bm, bn, bk, warps, stages), group = _GPU_TILES[kind], GROUP_M
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)


def _dot_flags(dtype: torch.dtype) -> dict:
    """PRECISION: fp32 inputs get true fp32 products, as torch's fp32 matmul (TF32 off by default).
    UPCAST: Triton's CPU interpreter multiplies the raw bits of bf16 operands in tl.dot (it stores
    bf16 as uint16; triton-lang/triton#11584, closed unfixed), so under the interpreter bf16 operands
    are converted to fp32 first: the same exact products and fp32 sums as a tensor-core dot. fp16
    dots are right in the interpreter and run as they are: the fp16 test cases exercise the 16-bit
    dot path that the GPU takes."""
    upcast = interpret_mode() and dtype == torch.bfloat16
    return dict(PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)


def _row_tiles(N: int, E: int, block_m: int) -> int:
    """Upper bound on the row tiles of all segments, known without reading expert_offsets: since
    cdiv(a) + cdiv(b) <= cdiv(a + b) + 1, m non-empty segments (m <= E+1 and m <= N) need at most
    cdiv(N, BM) + m - 1 tiles."""
    return triton.cdiv(N, block_m) + min(E, max(N - 1, 0))


def _grouped_gemm(a, expert_offsets, b, n_out_rows, K, N_OUT, E, *, gather=None, gather_div=1,
                  b_strides=None, out_dtype=None, b2=None, k1=None):
    """C (n_out_rows, N_OUT) = per-segment A @ b[e], or A[:, :k1] @ b[e] + A[:, k1:] @ b2[e] when b2 is
    given (b2 read with b's strides; see _moe_grouped_gemm_kernel)."""
    cfg = _gemm_config("gemm" if b2 is None else "swiglu_dx", a.dtype)
    c = torch.empty((n_out_rows, N_OUT), dtype=out_dtype or a.dtype, device=a.device)
    if n_out_rows == 0 or N_OUT == 0:
        return c
    sbe, sbk, sbn = b_strides if b_strides is not None else b.stride()
    split_k = b2 is not None
    assert not split_k or (b2.stride() == b.stride() and 0 < k1 < K), "b2 must share b's strides; 0 < k1 < K"
    num_tiles = _row_tiles(n_out_rows, E, cfg["BLOCK_M"])
    grid = (num_tiles * triton.cdiv(N_OUT, cfg["BLOCK_N"]),)
    runnable(_moe_grouped_gemm_kernel)[grid](
        a, gather if gather is not None else expert_offsets, b, b2 if split_k else b, c,
        expert_offsets, n_out_rows, K, k1 if split_k else K, N_OUT, E, gather_div, num_tiles,
        a.stride(0), a.stride(1), sbe, sbk, sbn, c.stride(0),
        GATHER=gather is not None, SPLIT_K=split_k, **_dot_flags(a.dtype), BLOCK_SEG=max(2, next_pow2(E + 1)), **cfg)
    return c


# The weight gradients' GEMM (issue 11). On an H200 the Triton dw kernel reached 287 TF/s at S3b while
# the forward and input-gradient GEMMs reached 600-720: 52 % of the layer's time (the profile rows of
# benchmarks/results/kernel_tiles_sweep_h200.jsonl). torch._grouped_mm (CUTLASS's Hopper grouped GEMM,
# what torchtitan and DeepSpeed AutoEP call) computes the same per-expert a_rows^T @ dc_rows with the
# rows grouped along the reduction. "auto" uses it where it runs (CUDA sm_90, bf16, 16-byte aligned
# rows) and the Triton kernel everywhere else (fp32, fp16, other GPUs, the interpreter); "triton"
# forces the kernel (benchmarks). With "auto" the S3b layer went from 81.8 to 64.1 ms and S1 from 14.4
# to 12.0 ms, the gradients bitwise equal to the kernel's (benchmarks/results/kernel_tiles_h200.jsonl).
DW_BACKENDS = ("auto", "triton")
_DW_BACKEND = ["auto"]


def set_dw_backend(name: str) -> str:
    """Choose the weight-gradient GEMM ("auto" or "triton", see above); returns the previous choice."""
    if name not in DW_BACKENDS:
        raise ValueError(f"set_dw_backend: {name!r} is not one of {', '.join(DW_BACKENDS)}")
    previous, _DW_BACKEND[0] = _DW_BACKEND[0], name
    return previous


def _dw_by_grouped_mm(a: torch.Tensor, dc: torch.Tensor, K: int, N_OUT: int) -> bool:
    if _DW_BACKEND[0] != "auto" or interpret_mode() or not hasattr(torch, "_grouped_mm"):
        return False
    if not (a.is_cuda and a.dtype == dc.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(a.device) != (9, 0):
        return False
    return K % 8 == 0 and N_OUT % 8 == 0 and dc.stride(1) == 1 and dc.stride(0) % 8 == 0


def _grouped_dw_grouped_mm(a, expert_offsets, dc, E, *, gather, gather_div, split, dtype, transposed):
    """_grouped_dw through torch._grouped_mm. Its groups run along the rows (the reduction): expert e
    owns rows [offs[e-1], offs[e]) with offs the int32 ends, and an empty expert's gradient is zero. The
    rows past offs[E-1] (assignments the capacity dropped) hold zeros in dc in both callers (the forward
    writes zero rows there), so they add nothing however grouped_mm treats them."""
    rows = a.index_select(0, gather // gather_div) if gather is not None else a[:dc.shape[0]]  # (S, K)
    offs = expert_offsets[1:].to(torch.int32)  # (E,) end row of each expert
    if transposed:  # (E, N_OUT, K) = dc_rows^T @ a_rows: the transposed layout directly
        dw = torch._grouped_mm(dc.t(), rows, offs=offs)
    else:
        dw = torch._grouped_mm(rows.t(), dc, offs=offs)  # (E, K, N_OUT)
    dw = dw.to(dtype or a.dtype)
    if split is None:
        return dw
    return dw[..., :split], dw[..., split:]


def _grouped_dw(a, expert_offsets, dc, E, K, N_OUT, *, gather=None, gather_div=1, split=None, dtype=None,
                transposed=False):
    """Per-expert a_rows^T @ dc_rows: dw (E, K, N_OUT), or (dw (E, K, split), dw2 (E, K, N_OUT - split))
    when split is given, or its transpose dw (E, N_OUT, K) when transposed (see _moe_grouped_gemm_dw_kernel)."""
    assert not (transposed and split is not None), "a split gradient is written untransposed"
    if E > 0 and K > 0 and N_OUT > 0 and dc.shape[0] > 0 and _dw_by_grouped_mm(a, dc, K, N_OUT):
        return _grouped_dw_grouped_mm(a, expert_offsets, dc, E, gather=gather, gather_div=gather_div,
                                      split=split, dtype=dtype, transposed=transposed)
    cfg = _gemm_config("dw", a.dtype)
    n1 = N_OUT if split is None else split
    if transposed:
        dw = torch.empty((E, N_OUT, K), dtype=dtype or a.dtype, device=a.device)
        strides = (dw.stride(0), dw.stride(2), dw.stride(1))
    else:
        dw = torch.empty((E, K, n1), dtype=dtype or a.dtype, device=a.device)
        strides = dw.stride()
    dw2 = None if split is None else torch.empty((E, K, N_OUT - n1), dtype=dw.dtype, device=a.device)
    if E > 0 and K > 0 and N_OUT > 0:
        grid = (E * triton.cdiv(K, cfg["BLOCK_M"]) * triton.cdiv(N_OUT, cfg["BLOCK_N"]),)
        runnable(_moe_grouped_gemm_dw_kernel)[grid](
            a, gather if gather is not None else expert_offsets, dc, dw, dw2 if split is not None else dw,
            expert_offsets, K, N_OUT, n1, gather_div, a.stride(0), a.stride(1), dc.stride(0), *strides,
            GATHER=gather is not None, SPLIT=split is not None, **_dot_flags(a.dtype), GROUP_M=cfg["GROUP_M"],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw if split is None else (dw, dw2)


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
            dw = _grouped_dw(x, expert_offsets, dy, E, D_in, D_out)
        return dx, None, dw


def moe_grouped_gemm(x: torch.Tensor, expert_offsets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Triton launcher with `moe_grouped_gemm_ref`'s contract; backward gives dx and per-expert dw."""
    _check_gemm_args("moe_grouped_gemm", x, expert_offsets, w)
    check_triton_inputs("moe_grouped_gemm", x, expert_offsets, w)
    return _MoEGroupedGemm.apply(x, expert_offsets, w)
