"""Contrastive image-text alignment (issue 14, part 3): pooled image and caption embeddings, a
temperature-scaled InfoNCE loss with a learnable logit scale and in-batch negatives, and top-1
retrieval accuracy on held-out pairs.

Shapes: B pairs in a micro-batch (one image per row, M = B), n image tokens per image, D language
width (also the embedding width), T tokens of a batch row, Tc tokens of the longest caption, N pairs.

    image side:  VisionTower.encode(images) (B, n, D) -> the n tokens side by side (B, n D) -> image_proj
                 -> L2 norm (B, D)
    text side:   the decoder on the caption alone, no image span (the text cannot see its image)
                 -> final norm (B, Tc, D) -> mean over the caption's tokens (B, D) -> text_proj -> L2 norm
    loss:        s = exp(logit_scale) clamped at MAX_SCALE; logits = s * img @ txt.T (B, B);
                 (CE(logits, diag) + CE(logits.T, diag)) / 2, CLIP's symmetric InfoNCE

The caption is what the language model is trained on: the loss-taking targets of the batch (y != -1,
the text after <|image_end|> and its <|endoftext|>), left-aligned into rows of their own
(caption_rows). Two rows of one batch with the same caption are not each other's negatives (the
synthetic set has 270 single-object captions: a batch of 64 holds about 7 such pairs).

Negatives are the pairs of the rank's own micro-batch (no all-gather across ranks): with W ranks
each rank contrasts B pairs, not W * B, which is the simple choice and enough for the synthetic set.
B matters: on the synthetic set batch 128 reached 100 % retrieval in 300 steps where batch 32 had
87 % after 600 (benchmarks/vision_contrastive.py says why).

With contrastive_steps > 0 the first contrastive_steps optimizer steps train this loss alone
(contrastive_mode "only"); after them, or from the start without a stage, contrastive_weight > 0
adds it to the language-model loss ("add"). Blues.forward(..., contrastive=mode) computes it.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from blues.config import BluesConfig
from blues.vision.config import num_image_tokens

MAX_SCALE = 100.0  # CLIP's clamp on exp(logit_scale): beyond it the logits only sharpen, nothing is learnt
INIT_SCALE = 1 / 0.07  # CLIP's initial temperature 0.07
RETRIEVAL_CANDIDATES = 64  # the acceptance's "top-1 among 64 candidates"
MODES = ("only", "add")


def has_contrastive(config: BluesConfig) -> bool:
    """Whether the model carries the contrastive heads: contrastive_steps or contrastive_weight non-zero.
    Any other model, its state dict and its checkpoints are unchanged."""
    v = config.vision
    return v.vision_enabled and (v.contrastive_steps > 0 or v.contrastive_weight > 0)


def contrastive_mode(config: BluesConfig, step: int) -> Optional[str]:
    """What optimizer step `step` (0-based) trains: "only" (the InfoNCE loss alone, inside the stage),
    "add" (language modelling + contrastive_weight * InfoNCE), or None (language modelling alone)."""
    v = config.vision
    if not has_contrastive(config):
        return None
    if step < v.contrastive_steps:
        return "only"
    return "add" if v.contrastive_weight > 0 else None


class ContrastiveOutput(NamedTuple):
    loss: torch.Tensor  # fp32 scalar, the symmetric InfoNCE
    image_emb: torch.Tensor  # (B, D) L2-normalised
    text_emb: torch.Tensor  # (B, D) L2-normalised
    scale: torch.Tensor  # the logit scale used, exp(logit_scale) clamped at MAX_SCALE


def caption_rows(targets: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """targets (B, T), -1 where no loss is taken -> (rows (B, Tc) long, mask (B, Tc) bool, same (B, B) bool).

    rows[b] holds row b's loss-taking targets in order (its caption and <|endoftext|>), left-aligned
    and padded with pad_id to the longest caption Tc; mask marks the caption tokens; same[i, j] says
    rows i and j hold the same caption. Padding sits after every caption token, so a causal decoder's
    caption states do not depend on it. One host read (Tc)."""
    keep = targets != -1  # (B, T)
    lengths = keep.sum(dim=1)  # (B,)
    Tc = max(1, int(lengths.max()))  # the one host read: the rows' width
    B = targets.shape[0]
    pos = keep.long().cumsum(dim=1) - 1  # (B, T): each kept token's place in its caption
    rows = targets.new_full((B, Tc), pad_id)
    b_idx = torch.arange(B, device=targets.device)[:, None].expand_as(targets)
    rows[b_idx[keep], pos[keep]] = targets[keep]
    mask = torch.arange(Tc, device=targets.device)[None, :] < lengths[:, None]  # (B, Tc)
    keyed = rows.masked_fill(~mask, -1)
    same = (keyed[:, None, :] == keyed[None, :, :]).all(dim=-1)  # (B, B)
    return rows, mask, same


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
             same: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives: image_emb, text_emb (B, C) L2-normalised, pair i is
    (image i, text i); scale the logit scale; same (B, B) bool drops the off-diagonal pairs that hold
    the same caption from the negatives (they are not wrong matches). Returns an fp32 scalar."""
    logits = scale * image_emb.float() @ text_emb.float().T  # (B, B)
    B = logits.shape[0]
    diag = torch.arange(B, device=logits.device)
    if same is not None:
        logits = logits.masked_fill(same & (diag[:, None] != diag[None, :]), float("-inf"))
    return (F.cross_entropy(logits, diag) + F.cross_entropy(logits.T, diag)) / 2


def pool_caption(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, Tc, D), mask (B, Tc) -> (B, D): the mean of each caption's token states.

    NOTE: the mean, not the last token (CLIP's choice for its text tower): 600 contrastive steps of
    benchmarks/vision_contrastive.py (tiny_vl, batch 32) reached 87.1 % image->text top-1 among 64 with
    the mean and 74.8 % with the last token (one seed each; results/vision_contrastive.jsonl)."""
    m = mask[..., None].to(hidden.dtype)  # (B, Tc, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)


class ContrastiveHeads(nn.Module):
    """The parameters the alignment adds: a linear head per modality and the learnable logit scale
    (log of CLIP's 1/0.07 at init). Blues creates it only when has_contrastive(config)."""

    def __init__(self, config: BluesConfig):
        super().__init__()
        D = config.model.n_embd
        # NOTE: the image's tokens side by side, not their mean: a mean of (content + position) features
        # keeps position only through the encoder's non-linearities. With the mean, after 600 contrastive
        # steps of benchmarks/vision_contrastive.py, 62 % of the held-out retrievals named a wrong position
        # (26 % a wrong shape, 0.2 % a wrong colour): 35.5 % image->text top-1 among 64.
        self.image_proj = nn.Linear(num_image_tokens(config.vision) * D, D, bias=False)
        self.text_proj = nn.Linear(D, D, bias=False)
        # (1,), not a 0-dim tensor: DeepSpeed broadcasts each parameter as a byte view, which a 0-dim one refuses
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(INIT_SCALE)))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at MAX_SCALE (no gradient reaches logit_scale beyond it)."""
        return self.logit_scale.clamp(max=math.log(MAX_SCALE)).exp().squeeze(0)

    def forward(self, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor,
                same: Optional[torch.Tensor] = None) -> ContrastiveOutput:
        """image_tokens (B, n, D) from VisionTower.encode, text_hidden (B, Tc, D) the decoder's normed
        states of the caption rows, text_mask (B, Tc), same (B, B) -> ContrastiveOutput.

        Everything happens inside this forward, so that ZeRO 3's hooks gather the heads and the scale."""
        img = F.normalize(self.image_proj(image_tokens.flatten(1)).float(), dim=-1)  # (B, D) from (B, n D)
        txt = F.normalize(self.text_proj(pool_caption(text_hidden, text_mask)).float(), dim=-1)  # (B, D)
        scale = self.scale()
        return ContrastiveOutput(info_nce(img, txt, scale, same), img, txt, scale.detach())


def retrieval_hits(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_ids: torch.Tensor,
                   candidates: int = RETRIEVAL_CANDIDATES) -> dict[str, int]:
    """Top-1 retrieval among groups of `candidates` pairs: image_emb, text_emb (N, C), pair i is
    (image i, text i), caption_ids (N,) equal where two captions are the same text.

    The pairs are cut into consecutive groups of `candidates` (the last partial group is dropped; with
    fewer than `candidates` pairs, one group of all N). Image -> text: image i picks the text of its
    group with the highest similarity; text -> image likewise. A pick counts as correct when its
    caption equals the true caption's text: two images of the same attribute triple carry the same
    caption, and nothing in a caption tells them apart. Returns {"i2t_hits", "t2i_hits", "queries",
    "candidates"} (counts, to be summed over ranks)."""
    N = image_emb.shape[0]
    G = candidates if N >= candidates else N
    hits = {"i2t_hits": 0, "t2i_hits": 0, "queries": 0, "candidates": G}
    for a in range(0, N - G + 1, G) if G else ():
        sim = image_emb[a:a + G].float() @ text_emb[a:a + G].float().T  # (G, G): image x text
        ids = caption_ids[a:a + G]
        hits["i2t_hits"] += int((ids[sim.argmax(dim=1)] == ids).sum())
        hits["t2i_hits"] += int((ids[sim.argmax(dim=0)] == ids).sum())
        hits["queries"] += G
    return hits


def caption_ids(targets: list[torch.Tensor]) -> torch.Tensor:
    """Batches of targets (B_i, T) on the host -> (sum B_i,) long: one number per row, equal where two
    rows hold the same caption (their loss-taking targets): retrieval_hits' caption_ids."""
    numbering: dict = {}
    keys = (tuple(t for t in row if t != -1) for y in targets for row in y.tolist())
    return torch.tensor([numbering.setdefault(k, len(numbering)) for k in keys], dtype=torch.long)
