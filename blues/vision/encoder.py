"""The vision encoder: a ViT patch encoder and a projector to the language width (tower.py composes them).

Shapes: M images, S image side (image_size), P patch side, N = (S / P)^2 patches per image,
Dv encoder width (vision_n_embd), D language width (n_embd), n image tokens per image (N, or N / 4
with merge_patches), B batch, T tokens.

    pixels (M, 3, S, S) in [0, 1] -> Conv2d patchify -> + row/column position -> vision_n_layer x
    [x + attn(norm(x)); x + swiglu(norm(x))] (bidirectional) -> norm -> (2x2 merge) -> [each token,
    the image's max over its tokens] -> Linear, GELU, Linear -> (M, n, D): one language-width token per
    <|image|> placeholder.

The encoder reuses Blues' Attention (is_causal=False, no RoPE), RMSNorm and dense SwiGLU.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from blues.attention import Attention, RMSNorm
from blues.config import BluesConfig, ModelConfig
from blues.moe import SwiGLU

# Pixels are normalised to [-1, 1] (mean 0.5, std 0.5 per channel, SigLIP's choice): images arrive in [0, 1].
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5


def encoder_attention_config(config: BluesConfig) -> ModelConfig:
    """The ModelConfig the encoder's Attention is built from: vision width and heads, multi-head
    (num_kv_heads = heads), the language model's attention backend and norm eps."""
    v, mc = config.vision, config.model
    return dataclasses.replace(mc, vocab_size=1, block_size=v.patches_per_side ** 2, n_layer=v.vision_n_layer,
                               n_head=v.vision_n_head, n_embd=v.vision_n_embd, num_kv_heads=v.vision_n_head,
                               head_dim=v.vision_n_embd // v.vision_n_head, qk_norm="none", attention_bias=False)


class VisionBlock(nn.Module):
    """A pre-norm transformer block that attends both ways: x + attn(norm(x)); x + swiglu(norm(x))."""

    def __init__(self, acfg: ModelConfig, ffn_size: int, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(acfg.n_embd, acfg.norm_eps)
        self.attn = Attention(acfg, layer_idx, is_causal=False)
        self.mlp_norm = RMSNorm(acfg.n_embd, acfg.norm_eps)
        self.mlp = SwiGLU(acfg.n_embd, ffn_size, acfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (M, N, Dv) -> (M, N, Dv)
        x = x + self.attn(self.attn_norm(x), None, None)
        return x + self.mlp(self.mlp_norm(x))


class VisionEncoder(nn.Module):
    """ViT patch encoder: pixels (M, 3, S, S) in [0, 1] -> patch features (M, N, Dv), row-major patches."""

    def __init__(self, config: BluesConfig):
        super().__init__()
        v = config.vision
        acfg = encoder_attention_config(config)
        self.side = v.patches_per_side
        self.patchify = nn.Conv2d(3, v.vision_n_embd, kernel_size=v.patch_size, stride=v.patch_size)
        # Learned 2-D position: one vector per patch row plus one per column (factorised, ViT's "2-D" variant).
        self.row_emb = nn.Parameter(torch.zeros(self.side, v.vision_n_embd))  # (S/P, Dv)
        self.col_emb = nn.Parameter(torch.zeros(self.side, v.vision_n_embd))  # (S/P, Dv)
        self.blocks = nn.ModuleList([VisionBlock(acfg, v.vision_ffn_size, i) for i in range(v.vision_n_layer)])
        self.norm = RMSNorm(v.vision_n_embd, acfg.norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.patchify.weight
        x = (pixels.to(w.dtype) - PIXEL_MEAN) / PIXEL_STD  # (M, 3, S, S) in [-1, 1]
        x = self.patchify(x).flatten(2).transpose(1, 2)  # (M, N, Dv), patches row by row
        pos = (self.row_emb[:, None, :] + self.col_emb[None, :, :]).reshape(self.side * self.side, -1)  # (N, Dv)
        x = x + pos.to(x.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)  # (M, N, Dv)


def merge_2x2(x: torch.Tensor, side: int) -> torch.Tensor:
    """(M, side*side, C) row-major patches -> (M, side*side/4, 4C): each 2x2 of neighbours as one token."""
    M, _, C = x.shape
    x = x.view(M, side // 2, 2, side // 2, 2, C).permute(0, 1, 3, 2, 4, 5)  # (M, s/2, s/2, 2, 2, C)
    return x.reshape(M, (side // 2) ** 2, 4 * C)


class Projector(nn.Module):
    """Patch features (M, N, Dv) -> image tokens (M, n, D): optional 2x2 merge, each token beside the
    image's max-pooled features, then Linear, GELU, Linear.

    NOTE: the max-pooled half gives every image token what the image holds, so that the decoder
    need not first learn which token to attend to. Without it the tiny model sat at the image-blind
    loss for 600 steps of blues-train on the synthetic shapes (a decoder that attends evenly
    mean-pools, and a mean-pooled linear probe of the encoder learned colour to 32 % in 40 steps
    where a max-pooled one reached 100 %); with it the colour token's loss fell to 0.3 by step 175
    from the same seed (plain AdamW, lr 2e-3, measured here)."""

    def __init__(self, config: BluesConfig):
        super().__init__()
        v, D = config.vision, config.model.n_embd
        self.side, self.merge = v.patches_per_side, v.merge_patches
        self.fc1 = nn.Linear(2 * v.vision_n_embd * (4 if self.merge else 1), D)
        self.fc2 = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge:
            x = merge_2x2(x, self.side)  # (M, N/4, 4 Dv)
        x = torch.cat([x, x.amax(dim=1, keepdim=True).expand_as(x)], dim=-1)  # (M, n, 2C): token, image max
        return self.fc2(F.gelu(self.fc1(x)))  # (M, n, D)
