"""moe_route: router logits -> top-k expert ids, weights, and the sums the balancing losses need.

Shapes: T tokens, E experts, K top-k.

Contract (reference `moe_route_ref`, the specification; `moe_route` is the Triton launcher):
    logits          (T, E)  any float dtype; scores are computed in fp32
    selection_bias  (E,)    optional; added to the scores for *selection only* (DeepSeek-V3's
                            auxiliary-loss-free balancing), never to the returned weights
  returns RouteOutput:
    topk_ids      (T, K) int64   experts chosen per token, ordered by descending (biased) score;
                                 equal scores go to the lower expert index
    topk_weights  (T, K) fp32    their scores, renormalised to sum to 1 when norm_topk_prob
    counts        (E,)   int64   assignments per expert (sum = T*K), before any capacity drop
    prob_sum      (E,)   fp32    sum over tokens of each expert's score (the Switch loss's P_e * T)
    lse           (T,)   fp32    logsumexp of each token's logits (the z-loss's input)
Gradients flow to `logits` through topk_weights, prob_sum and lse.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .triton_utils import check_triton_inputs, interpret_mode, next_pow2, runnable, tl, triton

SCORE_FUNCS = ("softmax", "sigmoid")


class RouteOutput(NamedTuple):
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    counts: torch.Tensor
    prob_sum: torch.Tensor
    lse: torch.Tensor


def _check_route_args(logits: torch.Tensor, top_k: int, score_func: str,
                      selection_bias: Optional[torch.Tensor]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (T, E), got shape {tuple(logits.shape)}")
    E = logits.shape[1]
    if not (isinstance(top_k, int) and 1 <= top_k <= E):
        raise ValueError(f"top_k={top_k!r} is invalid: expected an integer in [1, num_experts={E}]")
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func={score_func!r} is invalid: expected softmax or sigmoid")
    if selection_bias is not None and tuple(selection_bias.shape) != (E,):
        raise ValueError(f"selection_bias must have shape ({E},), got {tuple(selection_bias.shape)}")


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification, and Blues' CPU path.
# ----------------------------------------------------------------------------------------------

def moe_route_ref(logits: torch.Tensor, top_k: int, *, score_func: str = "softmax", norm_topk_prob: bool = True,
                  selection_bias: Optional[torch.Tensor] = None) -> RouteOutput:
    _check_route_args(logits, top_k, score_func, selection_bias)
    E = logits.shape[1]
    logits32 = logits.float()
    if score_func == "softmax":
        scores = torch.softmax(logits32, dim=-1)  # (T, E)
    else:
        scores = torch.sigmoid(logits32)  # (T, E)
    select = scores if selection_bias is None else scores + selection_bias.float()
    # NOTE: torch.topk does NOT break ties towards the lower index on CPU (measured: all-equal scores
    # with E=8, k=2 pick experts 6 and 5). A stable descending sort does, and so do the kernels.
    if top_k == 1:
        topk_ids = torch.argmax(select.detach(), dim=-1, keepdim=True)  # (T, 1) first maximum
    else:
        topk_ids = torch.sort(select.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]  # (T, K)
    topk_weights = scores.gather(1, topk_ids)  # (T, K)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    counts = torch.bincount(topk_ids.flatten(), minlength=E)  # (E,)
    prob_sum = scores.sum(dim=0)  # (E,)
    lse = torch.logsumexp(logits32, dim=-1)  # (T,)
    return RouteOutput(topk_ids, topk_weights, counts, prob_sum, lse)


def load_balancing_loss(counts: torch.Tensor, prob_sum: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer balancing loss E * sum_e f_e * P_e, with f_e the fraction of the T*K
    assignments sent to e and P_e the mean router score of e. Equals 1 for a uniform router
    (f_e = P_e = 1/E) and E for one collapsed onto a single expert."""
    E = counts.numel()
    f = counts.float() / (num_tokens * top_k)  # (E,)
    p = prob_sum / num_tokens  # (E,)
    return E * (f * p).sum()


def z_loss(lse: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared logsumexp of the router logits."""
    return (lse * lse).mean()


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

# Tensor contract of _moe_route_kernel. One program owns BLOCK_T tokens and all E experts.
#   logits        (T, E)        any float, strides (stride_t, stride_e); read once
#   bias          (E,) fp32     read only when HAS_BIAS
#   topk_ids      (T, K) int64  written, contiguous
#   topk_weights  (T, K) fp32   written, contiguous
#   counts_part   (P, E) int32  row pid = this block's assignments per expert (P = programs)
#   psum_part     (P, E) fp32   row pid = this block's sum of scores per expert
#   lse           (T,) fp32     written
# The launcher sums the partial rows with torch: deterministic, no float atomics.
@triton.jit
def _moe_route_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, counts_part_ptr, psum_part_ptr, lse_ptr,
                      T, E, stride_t, stride_e,
                      K: tl.constexpr, SIGMOID: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    cols = tl.arange(0, BLOCK_E)  # (BE,)
    kcols = tl.arange(0, BLOCK_K)  # (BK,)
    rmask = rows < T
    cmask = cols < E
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :] * stride_e,
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    # Padding columns are -inf so they never win; padding rows are 0 so nothing turns into NaN.
    x = tl.where(cmask[None, :], x, float("-inf"))  # (BT, BE)
    m = tl.max(x, axis=1)  # (BT,)
    ex = tl.exp(x - m[:, None])  # (BT, BE)
    z = tl.sum(ex, axis=1)  # (BT,)
    tl.store(lse_ptr + rows, m + tl.log(z), mask=rmask)
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        scores = ex / z[:, None]
    scores = tl.where(cmask[None, :], scores, 0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        select = tl.where(cmask[None, :], scores + bias[None, :], float("-inf"))
    else:
        select = tl.where(cmask[None, :], scores, float("-inf"))
    valid = rmask[:, None] & cmask[None, :]
    tl.store(psum_part_ptr + pid * E + cols, tl.sum(tl.where(valid, scores, 0.0), axis=0), mask=cmask)

    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    wts = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    # Top-k by K rounds of argmax; tie_break_left gives the lower index on equal scores, as the ref.
    for k in tl.static_range(K):
        best = tl.argmax(select, axis=1, tie_break_left=True).to(tl.int32)  # (BT,)
        hit = cols[None, :] == best[:, None]  # (BT, BE)
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)  # (BT,)
        ids = tl.where(kcols[None, :] == k, best[:, None], ids)
        wts = tl.where(kcols[None, :] == k, w[:, None], wts)
        counts += tl.sum((hit & rmask[:, None]).to(tl.int32), axis=0)
        select = tl.where(hit, float("-inf"), select)
    if NORM:
        denom = tl.maximum(tl.sum(wts, axis=1), 1e-20)  # padding k-columns hold 0
        wts = wts / denom[:, None]
    out_offs = rows[:, None].to(tl.int64) * K + kcols[None, :]
    out_mask = rmask[:, None] & (kcols[None, :] < K)
    tl.store(ids_ptr + out_offs, ids.to(tl.int64), mask=out_mask)
    tl.store(weights_ptr + out_offs, wts, mask=out_mask)
    tl.store(counts_part_ptr + pid * E + cols, counts, mask=cmask)


# Tensor contract of _moe_route_bwd_kernel. One program owns BLOCK_T tokens.
#   logits        (T, E)        as in the forward (scores are recomputed, not stored)
#   topk_ids      (T, K) int64  from the forward
#   topk_weights  (T, K) fp32   from the forward (normalised when NORM)
#   g_weights     (T, K) fp32   read when HAS_GW
#   g_psum        (E,)   fp32   read when HAS_GP
#   g_lse         (T,)   fp32   read when HAS_GL
#   d_logits      (T, E)        written, contiguous, logits' dtype
@triton.jit
def _moe_route_bwd_kernel(logits_ptr, ids_ptr, weights_ptr, gw_ptr, gp_ptr, gl_ptr, dlogits_ptr,
                          T, E, stride_t, stride_e,
                          K: tl.constexpr, SIGMOID: tl.constexpr, NORM: tl.constexpr,
                          HAS_GW: tl.constexpr, HAS_GP: tl.constexpr, HAS_GL: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    valid = rmask[:, None] & cmask[None, :]
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :] * stride_e,
                mask=valid, other=0.0).to(tl.float32)
    x = tl.where(cmask[None, :], x, float("-inf"))
    m = tl.max(x, axis=1)
    ex = tl.exp(x - m[:, None])
    p = ex / tl.sum(ex, axis=1)[:, None]  # softmax, (BT, BE)
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        scores = p
    ds = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)  # dL/dscores
    if HAS_GP:
        ds += tl.load(gp_ptr + cols, mask=cmask, other=0.0)[None, :]
    if HAS_GW:
        kmask = rmask[:, None] & (kcols[None, :] < K)
        koffs = rows[:, None].to(tl.int64) * K + kcols[None, :]
        gw = tl.load(gw_ptr + koffs, mask=kmask, other=0.0)  # (BT, BK)
        ids = tl.load(ids_ptr + koffs, mask=kmask, other=0).to(tl.int32)  # (BT, BK)
        if NORM:
            # w_k = r_k / max(sum_j r_j, 1e-20) with r the raw selected scores:
            # dL/dr_k = (g_k - sum_j g_j w_j) / denom (the second term vanishes when clamped).
            wts = tl.load(weights_ptr + koffs, mask=kmask, other=0.0)
            raw = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
            for k in tl.static_range(K):
                idk = tl.sum(tl.where(kcols[None, :] == k, ids, 0), axis=1)
                rk = tl.sum(tl.where(cols[None, :] == idk[:, None], scores, 0.0), axis=1)
                raw = tl.where(kcols[None, :] == k, rk[:, None], raw)
            rsum = tl.sum(raw, axis=1)
            denom = tl.maximum(rsum, 1e-20)
            gdot = tl.where(rsum >= 1e-20, tl.sum(gw * wts, axis=1), 0.0)
            gr = (gw - gdot[:, None]) / denom[:, None]
        else:
            gr = gw
        for k in tl.static_range(K):
            idk = tl.sum(tl.where(kcols[None, :] == k, ids, 0), axis=1)
            grk = tl.sum(tl.where(kcols[None, :] == k, gr, 0.0), axis=1)
            ds += tl.where(cols[None, :] == idk[:, None], grk[:, None], 0.0)
    if SIGMOID:
        dx = ds * scores * (1.0 - scores)
    else:
        dx = p * (ds - tl.sum(ds * p, axis=1)[:, None])
    if HAS_GL:
        gl = tl.load(gl_ptr + rows, mask=rmask, other=0.0)
        dx += gl[:, None] * p
    tl.store(dlogits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], dx.to(dlogits_ptr.dtype.element_ty),
             mask=valid)


def _route_blocks(E: int, K: int):
    BLOCK_E = max(2, next_pow2(E))
    BLOCK_K = max(2, next_pow2(K))
    if interpret_mode():  # the CPU interpreter pays per program: few, large blocks
        return max(1, min(128, 4096 // BLOCK_E)), BLOCK_E, BLOCK_K
    # About 1024 scores per program, fewer when K is large (the top-k rounds are unrolled): sizes that
    # compile without register spills on sm_90 at E in {8, 64, 128, 256}, K in {2, 8, 16, 64} with
    # both triton 3.6 (the GPU image's) and 3.9 (tests/kernels/test_moe_route.py::
    # test_moe_route_builds_for_sm90). 2048 spilled under 3.6 at E=64, K=8 (8 B) and E=256, K=16 (64 B).
    BLOCK_T = max(1, min(128, 1024 // BLOCK_E, 256 // BLOCK_K))
    return BLOCK_T, BLOCK_E, BLOCK_K


class _MoERoute(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, top_k, sigmoid, norm, selection_bias):
        T, E = logits.shape
        BLOCK_T, BLOCK_E, BLOCK_K = _route_blocks(E, top_k)
        P = triton.cdiv(T, BLOCK_T) if T > 0 else 0
        dev = logits.device
        topk_ids = torch.empty((T, top_k), dtype=torch.int64, device=dev)
        topk_weights = torch.empty((T, top_k), dtype=torch.float32, device=dev)
        counts_part = torch.zeros((max(P, 1), E), dtype=torch.int32, device=dev)
        psum_part = torch.zeros((max(P, 1), E), dtype=torch.float32, device=dev)
        lse = torch.empty((T,), dtype=torch.float32, device=dev)
        bias = selection_bias.float().contiguous() if selection_bias is not None else psum_part
        if P > 0:
            runnable(_moe_route_kernel)[(P,)](
                logits, bias, topk_ids, topk_weights, counts_part, psum_part, lse,
                T, E, logits.stride(0), logits.stride(1),
                K=top_k, SIGMOID=sigmoid, NORM=norm, HAS_BIAS=selection_bias is not None,
                BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K)
        counts = counts_part.sum(dim=0, dtype=torch.int64)  # (E,)
        prob_sum = psum_part.sum(dim=0)  # (E,)
        ctx.save_for_backward(logits, topk_ids, topk_weights)
        ctx.cfg = (top_k, sigmoid, norm)
        ctx.mark_non_differentiable(topk_ids, counts)
        ctx.set_materialize_grads(False)
        return topk_ids, topk_weights, counts, prob_sum, lse

    @staticmethod
    def backward(ctx, _g_ids, g_weights, _g_counts, g_psum, g_lse):
        logits, topk_ids, topk_weights = ctx.saved_tensors
        top_k, sigmoid, norm = ctx.cfg
        if g_weights is None and g_psum is None and g_lse is None:
            return None, None, None, None, None
        T, E = logits.shape
        BLOCK_T, BLOCK_E, BLOCK_K = _route_blocks(E, top_k)
        d_logits = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
        gw = g_weights.float().contiguous() if g_weights is not None else topk_weights
        gp = g_psum.float().contiguous() if g_psum is not None else topk_weights
        gl = g_lse.float().contiguous() if g_lse is not None else topk_weights
        if T > 0:
            runnable(_moe_route_bwd_kernel)[(triton.cdiv(T, BLOCK_T),)](
                logits, topk_ids, topk_weights, gw, gp, gl, d_logits,
                T, E, logits.stride(0), logits.stride(1),
                K=top_k, SIGMOID=sigmoid, NORM=norm,
                HAS_GW=g_weights is not None, HAS_GP=g_psum is not None, HAS_GL=g_lse is not None,
                BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K)
        return d_logits, None, None, None, None


def moe_route(logits: torch.Tensor, top_k: int, *, score_func: str = "softmax", norm_topk_prob: bool = True,
              selection_bias: Optional[torch.Tensor] = None) -> RouteOutput:
    """Triton launcher with `moe_route_ref`'s contract: one fused pass over the logits (fp32 scores,
    top-k, renormalisation, selection bias, per-expert counts and score sums, logsumexp)."""
    _check_route_args(logits, top_k, score_func, selection_bias)
    check_triton_inputs("moe_route", logits, selection_bias)
    out = _MoERoute.apply(logits, top_k, score_func == "sigmoid", bool(norm_topk_prob), selection_bias)
    return RouteOutput(*out)
