"""One optimizer step, n of them, and the validation loss.

Learning rate (alpha_max = lr, alpha_min = min_lr, T_w = warmup_steps, T_c = lr_decay_steps or
max_steps), for the optimizer step t = 0, 1, ...:
    t <  T_w:          alpha_max * (t + 1) / T_w
    T_w <= t <= T_c:   alpha_min + (alpha_max - alpha_min) * (1 + cos(pi * (t - T_w) / (T_c - T_w))) / 2
    t >  T_c:          alpha_min
A step whose loss is not finite is skipped (no update) but still consumes its data and its t.
With balance_bias_rate > 0 each applied step ends by moving every MoE layer's selection bias
(blues.train.balance), from the counts of the same all-reduce that gives the step's metrics.
With contrastive heads (blues.vision.contrastive), step t < contrastive_steps trains the InfoNCE loss
alone and later steps add contrastive_weight * InfoNCE (contrastive_mode); evaluate() then also
reports top-1 image->text and text->image retrieval among groups of 64 held-out pairs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from blues.config import TrainConfig
from blues.train.balance import update_bias
from blues.train.distributed import all_reduce
from blues.train.engine import Run
from blues.vision.contrastive import RETRIEVAL_CANDIDATES, caption_ids, contrastive_mode, retrieval_hits


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, cosine decay, floor."""
    T_w, T_c = t.warmup_steps, (t.lr_decay_steps if t.lr_decay_steps is not None else t.max_steps)
    if step < T_w:
        return t.lr * (step + 1) / T_w
    if step > T_c or T_c <= T_w:
        return t.min_lr
    progress = (step - T_w) / (T_c - T_w)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


FIXED = 8  # the scalar sums ahead of the expert counts: loss ce aux z dropped stop contrastive non-finite


@dataclass
class StepResult:
    step: int  # 1-based number of the step just taken
    loss: float  # mean over micro-batches and ranks (nan when skipped)
    ce_loss: float
    aux_loss: float
    z_loss: float
    lr: float
    grad_norm: Optional[float]
    seconds: float
    skipped: bool
    stop_signal: bool
    expert_load_min: float = float("nan")  # min over layers and experts of the share of assignments
    expert_load_max: float = float("nan")
    dropped_frac: float = 0.0
    expert_selected: Optional[torch.Tensor] = None  # (L_moe, E) chosen per expert, all ranks, before capacity
    expert_counts: Optional[torch.Tensor] = None  # (L_moe, E) computed per expert, all ranks, after capacity
    contrastive_loss: float = float("nan")  # the InfoNCE loss (nan on a step that does not train it)
    contrastive_mode: Optional[str] = None  # "only" (the contrastive stage), "add", or None


def _set_lr(engine, lr: float) -> None:
    for g in engine.optimizer.param_groups:
        g["lr"] = lr


def _random_batch(run: Run):
    """Random tokens (B, T) and their shift; a vision model gets one image span per sample too (after
    the first token) and random images (B, 3, S, S), so that probes see the image path's memory."""
    c = run.cfg
    x = torch.randint(0, c.model.vocab_size, (c.train.micro_batch_size, c.model.block_size + 1))  # (B, T+1)
    v = c.vision
    if not v.vision_enabled:
        return x[:, :-1], x[:, 1:]
    from blues.vision.config import num_image_tokens
    n = num_image_tokens(v)
    x[x == v.image_token_id] = 0
    x[:, 1:1 + n] = v.image_token_id
    y = x[:, 1:].clone()
    y[:, :n] = -1  # no loss on the placeholders
    return x[:, :-1], y, torch.rand(c.train.micro_batch_size, 3, v.image_size, v.image_size)


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(x, y) from a token loader or (x, y, images) from an image-text one -> (x, y, images or None)."""
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host batch tensor on `dev`: on CUDA through pinned memory and a non-blocking copy (no wait)."""
    if dev.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def _forward(run: Run, batch, contrastive: Optional[str] = None):
    """The engine's forward of one micro-batch on this rank's device (DeepSpeed passes keyword
    arguments on to the model, so ZeRO 3's hooks see the contrastive pass too). `contrastive` is
    Blues.forward's mode; a text-only batch (no images) has no pairs to align: language modelling alone."""
    x, y, images = split_batch(batch)
    dev = run.dist.device
    kw = {} if contrastive is None or images is None else {"contrastive": contrastive}
    return run.engine(_to_device(x, dev), _to_device(y, dev),
                      images=None if images is None else _to_device(images, dev), **kw)


def engine_skips_nonfinite(run: Run) -> bool:
    """Does DeepSpeed itself skip an optimizer step whose gradients are not finite? Measured under ZeRO
    2 and 3, fp32 included (tests/train/test_cli.py::test_nan_after_accumulated_micro_batches); fp16's
    loss scaler always does. Under ZeRO 0 in fp32 it applies them; ZeRO 1 and bf16 under ZeRO 0 are
    not measured, so they are treated as applying."""
    return run.stage >= 2 or run.cfg.train.dtype == "fp16"


def train_step(run: Run, batch_fn: Optional[Callable] = None) -> StepResult:
    """One optimizer step over grad_accum micro-batches on every rank (collective).

    A non-finite loss on any rank skips the step. Where DeepSpeed skips a step with non-finite
    gradients itself (engine_skips_nonfinite: ZeRO 2/3, fp16), every micro-batch runs forward and
    backward without waiting: a non-finite loss makes non-finite gradients, DeepSpeed drops the step,
    and the per-rank flags ride in the step's one all-reduce of the metric sums, which says it was
    skipped. Elsewhere each micro-batch's flag is all-reduced and read before its backward: with no
    backward taken yet nothing is applied; if it appears after earlier micro-batches were already
    accumulated, the step goes through DeepSpeed anyway. Either way, a non-finite step that DeepSpeed
    applied stops training with an error, saving nothing (the last checkpoint is intact).

    Host synchronisation (issue 11, part 6): one per step, the all-reduced sums (losses, the
    non-finite flag, the expert counts, summed on the device meanwhile); plus one per micro-batch,
    before backward, where DeepSpeed would apply non-finite gradients. Inputs are copied from pinned
    memory without waiting (tests/train/test_step_syncs.py counts them)."""
    engine, c, dev = run.engine, run.cfg, run.dist.device
    t0 = time.perf_counter()
    lr = lr_at(run.step, c.train)
    _set_lr(engine, lr)
    engine.train()
    get = batch_fn or (run.loader.next_batch if run.loader is not None else lambda: _random_batch(run))
    grad_accum = c.train.grad_accum
    E, L = c.moe.num_experts, run.num_moe_layers
    mode = contrastive_mode(c, run.step)
    deferred = engine_skips_nonfinite(run)
    # loss ce aux z dropped stop contrastive non-finite | kept counts (L*E) | selected counts (L*E, before capacity)
    sums = torch.zeros(FIXED + 2 * L * E, dtype=torch.float64, device=dev)
    bad_at = None
    for micro in range(grad_accum):
        batch = get()
        if bad_at == 0:
            continue  # skipped step: consume the data, compute nothing
        out = _forward(run, batch, mode)
        nan_here = run.dist.rank == 0 and run.debug.nan_at(run.step + 1, micro)
        loss = out.loss * float("nan") if nan_here else out.loss
        if deferred:  # counted on the device; read with the sums after the step
            sums[7] += (~torch.isfinite(loss.detach())).double()
        else:
            flag = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)  # (1,) on the device
            if all_reduce(flag, "max").item() > 0 and bad_at is None:  # the host read before backward
                bad_at = micro
                if micro == 0:
                    continue
        engine.backward(loss)
        engine.step()
        sums[:5] += torch.stack([loss.detach().double(), out.ce_loss.detach().double(), out.aux_loss.detach().double(),
                                 out.z_loss.detach().double(), out.dropped.detach().double()])
        if out.contrastive is not None:
            sums[6] += out.contrastive.loss.detach().double()
        if out.expert_counts is not None:  # (2, L, E), summed on the device
            sums[FIXED:] += torch.stack((out.expert_counts, out.expert_selected)).detach().double().reshape(-1)
    sums[5] = 1.0 if run.stop_signal else 0.0
    sums = all_reduce(sums).cpu()  # the step's one read of the metrics (and, deferred, of the skip)
    skipped = bad_at is not None or sums[7].item() > 0
    if skipped and bad_at != 0 and engine.was_step_applied():
        where = "in this step" if bad_at is None else f"after {bad_at} accumulated micro-batches"
        raise FloatingPointError(
            f"step {run.step + 1}: a non-finite loss appeared {where} and this configuration "
            f"(dtype={c.train.dtype}, ZeRO {run.stage}) applied the step anyway; stopping without saving (the last "
            "checkpoint is intact)")
    n = grad_accum * run.dist.world_size
    gn = None if skipped else engine.get_global_grad_norm()
    res = StepResult(step=run.step + 1, loss=float("nan") if skipped else sums[0].item() / n,
                     ce_loss=sums[1].item() / n, aux_loss=sums[2].item() / n, z_loss=sums[3].item() / n,
                     lr=lr, grad_norm=None if gn is None else float(gn), seconds=0.0, skipped=skipped,
                     stop_signal=sums[5].item() > 0, contrastive_mode=mode,
                     contrastive_loss=sums[6].item() / n if mode is not None else float("nan"))
    if L and not skipped:
        counts, res.expert_selected = sums[FIXED:].view(2, L, E)
        res.expert_counts = counts
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        res.expert_load_min, res.expert_load_max = share.min().item(), share.max().item()
        assigned = n * c.train.micro_batch_size * c.model.block_size * c.moe.top_k * L
        res.dropped_frac = sums[4].item() / assigned
        if c.moe.balance_bias_rate > 0 and engine.was_step_applied():  # not after a loss-scale overflow either
            update_bias(run.model, res.expert_selected, c.moe.balance_bias_rate)
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    if skipped:
        run.bad_in_a_row += 1
        run.skipped_steps += 1
    else:
        run.bad_in_a_row = 0
    res.seconds = time.perf_counter() - t0
    return res


def train_steps(run: Run, n: int, batch_fn: Optional[Callable] = None) -> list[StepResult]:
    """Run n optimizer steps (no evaluation, logging or checkpoints): for probes and benchmarks."""
    return [train_step(run, batch_fn) for _ in range(n)]


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Validation cross-entropy (mean over eval_steps batches and ranks) and its perplexity; with
    contrastive heads also the validation InfoNCE loss and the top-1 retrieval accuracies
    (retrieval(), over the same batches)."""
    engine, has_heads = run.engine, getattr(run.model, "contrastive", None) is not None
    engine.eval()
    s = torch.zeros(4, dtype=torch.float64)  # ce * tokens, tokens, contrastive loss * batches, batches with images
    pairs: list = []  # (image_emb (B, D), text_emb (B, D), targets (B, T) on the host) per batch
    for batch in run.val_loader.eval_batches(run.cfg.train.eval_steps):
        with_images = has_heads and split_batch(batch)[2] is not None
        out, n = _forward(run, batch, "add" if with_images else None), batch[0].numel()
        s[0] += out.ce_loss.item() * n
        s[1] += n
        if with_images:
            s[2] += out.contrastive.loss.item()
            s[3] += 1
            pairs.append((out.contrastive.image_emb.cpu(), out.contrastive.text_emb.cpu(), batch[1]))
    engine.train()
    s = all_reduce(s.to(run.dist.device)).cpu()
    val = s[0].item() / max(1.0, s[1].item())
    ev = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
    if has_heads:
        ev["val_contrastive_loss"] = s[2].item() / max(1.0, s[3].item())  # the same all-reduce as the CE
        ev.update(retrieval(run, pairs))
    return ev


def retrieval(run: Run, pairs: list) -> dict[str, float]:
    """Top-1 image->text and text->image accuracy among groups of RETRIEVAL_CANDIDATES held-out pairs
    (each rank groups its own; the hits are summed over ranks): {"i2t_top1", "t2i_top1",
    "retrieval_candidates"} (fewer candidates when a rank holds fewer pairs than that)."""
    if pairs:
        img, txt = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        h = retrieval_hits(img, txt, caption_ids([p[2] for p in pairs]), RETRIEVAL_CANDIDATES)
    else:
        h = {"i2t_hits": 0, "t2i_hits": 0, "queries": 0, "candidates": 0}
    t = all_reduce(torch.tensor([h["i2t_hits"], h["t2i_hits"], h["queries"]], dtype=torch.float64,
                                device=run.dist.device)).cpu()
    q = max(1.0, t[2].item())
    return {"i2t_top1": t[0].item() / q, "t2i_top1": t[1].item() / q, "retrieval_candidates": h["candidates"]}
