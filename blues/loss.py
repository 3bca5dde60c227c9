"""The language-model loss without the full logits: a fused, chunked linear + cross-entropy.

Shapes: N rows (B * T tokens), D = n_embd, V vocabulary, C rows per chunk.

    loss = mean over rows with target != ignore_index of  logsumexp(h W^T) - (h W^T)[target]

is F.cross_entropy(h @ W.T, targets, ignore_index=-1), computed C rows at a time: per chunk, the
(C, V) logits in fp32, their log-softmax, the chunk's loss sum and, when a gradient is wanted, the
gradients w.r.t. the chunk's h and (accumulated) W, all in the forward. The (N, V) logits never
exist; backward only scales the two saved gradients by the incoming one. The idea is
Liger-Kernel's FusedLinearCrossEntropy; this is a plain-torch version of it.

NOTE (why, measured in benchmarks/ep_throughput.py's profile, tiny shape, 2 CPU ranks): the
unfused loss over the (1024, 4096) fp32 logits took 27 ms a step (its non-GEMM ops) against 7 for
Hugging Face's, because glibc hands the freed 16 MB buffers back to the OS after each step and the
next step page-faults them in again; chunks of CHUNK_BYTES stay in the heap and are reused. Fused:
6.4 ms, and Blues EP=2 went from 0.92x to 1.09x AutoEP EP=2 (see that script's NOTE). Forward +
backward alone, 1 thread, no page faults: 44 ms fused against 47 unfused (38 of each is the GEMMs).

Memory: the saved gradients are fp32, so that a bf16 one is rounded once, after backward's scaling:
(N, D) and (V, D), 2.5 MiB at the tiny preset with micro-batch 8 (N = 1024), where the unfused loss
saves the (N, V) log-softmax, 16 MiB. Measured on one training step there: 37.1 MiB of saved tensors
against 53.1, peak RSS 387 MiB against 449. In 16 bits a chunk also holds its 16-bit copy of the
softmax gradient (half the fp32 chunk again) and the 16-bit (V, D) part of the weight's gradient.

Rows whose target is ignore_index add nothing; with every row ignored the loss is 0 and so are
the gradients (F.cross_entropy gives NaN there: 0 / 0). No device-to-host sync: the number of
counted targets stays a tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

PROFILE_RANGE = "blues.loss:fused_linear_cross_entropy"  # the forward's torch.profiler range (its ops are the loss's)
CHUNK_BYTES = 4 * 2 ** 20  # one chunk's fp32 logits: 256 rows at V=4096, in the heap, reused per chunk


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's (C, V) fp32 logits take at most chunk_bytes (at least 1 row)."""
    return max(1, chunk_bytes // (4 * vocab_size))


def default_chunk_bytes(n_rows: int, n_embd: int, device: torch.device) -> int:
    """CHUNK_BYTES on a CPU (measured, see the NOTE above). On a GPU, at least as many fp32 logits as h
    has elements (Liger-Kernel's rule: V / D chunks): 4 MiB would be 32 rows at V=32k, too few rows for
    a chunk's GEMMs to fill the device. The GPU rule has not been timed on a GPU yet."""
    if device.type == "cpu":
        return CHUNK_BYTES
    return max(CHUNK_BYTES, 4 * n_rows * n_embd)


def _chunked_loss_and_grads(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                            rows: int, need_h: bool, need_w: bool):
    """The loss (fp32 scalar, the mean over counted targets), 1 / that count (clamped at 1), and the
    fp32 gradients of h (N, D) and weight (V, D) summed over the rows (None where not needed): the
    gradients are scaled once, in backward, so that a bf16 one is rounded only once.

    The GEMMs run in the inputs' dtype, as the unfused head's do (16-bit inputs: 16-bit products
    with fp32 accumulation, a chunk's logits rounded once to 16 bits before the fp32 softmax; an
    fp32 GEMM would be ~16x slower on a GPU's tensor cores). Softmax, loss and the sum of the
    weight's gradient over chunks are fp32."""
    N = h.shape[0]
    dt = torch.promote_types(h.dtype, weight.dtype)
    w = weight.to(dt)  # (V, D); the same tensor when its dtype already is dt
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    count = torch.zeros((), dtype=torch.long, device=h.device)
    grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None  # (N, D) fp32
    new = torch.empty if N else torch.zeros  # the first chunk writes grad_w whole; no chunk: zeros
    grad_w = new(w.shape, dtype=torch.float32, device=h.device) if need_w else None  # (V, D) fp32
    for s in range(0, N, rows):
        hc = h[s:s + rows].to(dt)  # (C, D)
        tc = targets[s:s + rows]  # (C,)
        keep = (tc != ignore_index)[:, None]  # (C, 1)
        tgt = torch.where(keep, tc[:, None], 0)  # (C, 1): any valid column for ignored rows
        logits = (hc @ w.T).float()  # (C, V) fp32 (no copy when dt is fp32)
        # One exp per logit, in place (4 ms of non-GEMM work for the tiny benchmark's (1024, 4096) against
        # 9.5 with logsumexp and a second exp for the softmax, 1 thread).
        m = logits.amax(dim=-1, keepdim=True)  # (C, 1)
        picked = logits.gather(1, tgt)  # (C, 1): the target's logit
        e = logits.sub_(m).exp_()  # (C, V)
        z = e.sum(dim=-1, keepdim=True)  # (C, 1): logsumexp = m + log z
        loss += torch.where(keep, z.log() + m - picked, 0.0).sum()
        count += keep.sum()
        if need_h or need_w:
            g = e.mul_(keep / z)  # (C, V): softmax on counted rows, 0 on ignored ones
            g.scatter_add_(1, tgt, -keep.float())  # - onehot(target) on counted rows
            g = g.to(dt)  # (C, V) in the GEMMs' dtype; the same tensor in fp32
            if dt == torch.float32:  # straight into the fp32 sums
                if need_h:
                    torch.mm(g, w, out=grad_h[s:s + rows])  # (C, D)
                if need_w:
                    if s == 0:
                        torch.mm(g.T, hc, out=grad_w)  # (V, D) = (V, C) @ (C, D)
                    else:
                        grad_w.addmm_(g.T, hc)
            else:
                if need_h:
                    grad_h[s:s + rows] = g @ w  # (C, D), one rounding to 16 bits, kept in fp32
                if need_w:
                    gw = g.T @ hc  # (V, D) 16-bit: this chunk's part, summed over chunks in fp32
                    if s == 0:
                        grad_w.copy_(gw)
                    else:
                        grad_w.add_(gw)
    scale = 1.0 / count.clamp(min=1)  # every row ignored: loss 0, gradients 0 (not 0 / 0)
    return loss * scale, scale, grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, rows):
        loss, scale, grad_h, grad_w = _chunked_loss_and_grads(
            h, weight, targets, ignore_index, rows, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(scale, grad_h, grad_w)  # fp32; (N, D) and (V, D), not the (N, V) logits
        ctx.dtypes = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        scale, grad_h, grad_w = ctx.saved_tensors
        s = grad_loss.float() * scale
        gh = (grad_h * s).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * s).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -1, chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """F.cross_entropy((h @ weight.T).float(), targets, ignore_index=ignore_index) (the mean over counted
    targets; 0 when none counts) without the (N, V) logits. h (..., D), weight (V, D), targets (...)
    long; returns an fp32 scalar. chunk_bytes: a chunk's fp32 logits (default_chunk_bytes when None).
    The GEMMs run in the dtype of h and weight (fp32 accumulation); softmax, loss and the weight's
    gradient over chunks are fp32; the gradients come back in their dtypes."""
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match hidden states of shape "
                         f"{tuple(h.shape)}: one target per row of h")
    h2 = h.reshape(-1, h.shape[-1])  # (N, D)
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(h2.shape[0], h2.shape[1], h.device)
    rows = chunk_rows(weight.shape[0], chunk_bytes)
    t = targets.reshape(-1)  # (N,)
    # the inputs' dtype for the GEMMs whatever an outer autocast says (fp32 inputs: fp32 logits)
    with torch.profiler.record_function(PROFILE_RANGE), torch.autocast(h.device.type, enabled=False):
        if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
            return _chunked_loss_and_grads(h2, weight, t, ignore_index, rows, False, False)[0]
        return _FusedLinearCrossEntropy.apply(h2, weight, t, ignore_index, rows)


class LMHead(nn.Linear):
    """The language-model head, nn.Linear(D, V, bias=False) with the same weight and state-dict key,
    whose forward also takes targets: lm_head(h) is the (..., V) logits; lm_head(h, targets) is the
    fused loss above. The loss runs inside the module's own forward so that ZeRO 3's module hooks
    gather the weight for it (and a tied weight, tok_emb's, the same way as for the logits)."""

    def forward(self, h: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if targets is None:
            return F.linear(h, self.weight, self.bias)  # (..., V)
        if self.bias is not None:
            raise ValueError("LMHead's fused loss takes no bias: build it with bias=False")
        return fused_linear_cross_entropy(h, self.weight, targets)
