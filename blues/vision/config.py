"""VisionConfig: the `vision` part of BluesConfig (off by default), and the image-token count.

Imports nothing of Blues but blues.common and no torch: blues.config composes it, and the data side
(blues.data.images) reads num_image_tokens from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from blues.common import non_negative, positive_int, require

IMAGE_START = "<|image_start|>"
IMAGE = "<|image|>"  # one placeholder per image token; the model puts an image feature at each
IMAGE_END = "<|image_end|>"


@dataclass
class VisionConfig:
    vision_enabled: bool = False
    """Images in: a ViT patch encoder, a projector to n_embd and a modality-type embedding. Off, the
    model, its state dict and its checkpoints are those of a text-only Blues."""
    image_size: int = 32
    """Side S of the square image the encoder sees, in pixels; every image is resized to S x S."""
    patch_size: int = 8
    """Side P of one patch (Conv2d kernel and stride); S must be a multiple of it."""
    vision_n_layer: int = 2
    """Bidirectional transformer blocks in the encoder."""
    vision_n_head: int = 4
    vision_n_embd: int = 128
    """Encoder width."""
    vision_ffn_size: int = 256
    """Hidden size of the encoder's dense SwiGLU."""
    merge_patches: bool = False
    """Merge each 2x2 of neighbouring patches into one image token (4x fewer tokens, DeepSeek-VL2's
    and Kimi-VL's pixel shuffle); needs an even number of patches per side."""
    image_token_id: Optional[int] = None
    """Id of the <|image|> placeholder; None = taken from the tokenizer's specials at train start."""
    vision_pretrained: Optional[str] = None
    """A local Hugging Face folder holding a CLIP or SigLIP vision model (config.json and weights): its
    vision tower replaces Blues' own ViT encoder (image_size and patch_size must match the folder's;
    vision_n_layer, vision_n_head, vision_n_embd and vision_ffn_size are then not used). None = Blues' ViT."""
    vision_pretrained_config: Optional[dict] = None
    """The vision config of the vision_pretrained folder (its config.json's vision part), recorded when
    training starts, so that a saved model rebuilds its tower without the folder (the weights come from
    the saved model). Set by Blues, not by hand."""
    contrastive_steps: int = 0
    """The contrastive alignment stage: the first contrastive_steps optimizer steps train only a
    temperature-scaled InfoNCE loss between pooled image and pooled caption embeddings (in-batch
    negatives, learnable logit scale), then language modelling takes over. 0 = no such stage."""
    contrastive_weight: float = 0.0
    """After the contrastive stage (or from the start without one), loss = language-model loss +
    contrastive_weight * InfoNCE: alignment beside language modelling. 0 = off."""

    def __post_init__(self):
        require(isinstance(self.vision_enabled, bool), "vision_enabled", self.vision_enabled,
                "expected true or false")
        require(isinstance(self.merge_patches, bool), "merge_patches", self.merge_patches, "expected true or false")
        for name in ("image_size", "patch_size", "vision_n_layer", "vision_n_head", "vision_n_embd",
                     "vision_ffn_size"):
            positive_int(name, getattr(self, name))
        require(self.image_size % self.patch_size == 0, "image_size", self.image_size,
                f"must be a multiple of patch_size={self.patch_size}")
        side = self.image_size // self.patch_size
        require(not self.merge_patches or side % 2 == 0, "merge_patches", self.merge_patches,
                f"needs an even number of patches per side, got image_size/patch_size={side}: change image_size "
                "or patch_size, or set merge_patches=false")
        require(self.vision_n_embd % (2 * self.vision_n_head) == 0, "vision_n_embd", self.vision_n_embd,
                f"must be divisible by 2 * vision_n_head={2 * self.vision_n_head} (heads of an even width)")
        require(isinstance(self.contrastive_steps, int) and not isinstance(self.contrastive_steps, bool)
                and self.contrastive_steps >= 0, "contrastive_steps", self.contrastive_steps,
                "expected an integer >= 0 (0 = no contrastive stage)")
        non_negative("contrastive_weight", self.contrastive_weight)
        require(self.vision_pretrained is None or (isinstance(self.vision_pretrained, str) and self.vision_pretrained),
                "vision_pretrained", self.vision_pretrained,
                "expected the path of a local Hugging Face CLIP or SigLIP folder, or null for Blues' own encoder")
        require(self.vision_pretrained_config is None or isinstance(self.vision_pretrained_config, dict),
                "vision_pretrained_config", self.vision_pretrained_config,
                "expected the recorded Hugging Face vision config (a mapping) or null")
        if self.image_token_id is not None:
            require(isinstance(self.image_token_id, int) and not isinstance(self.image_token_id, bool)
                    and self.image_token_id >= 0, "image_token_id", self.image_token_id,
                    "expected a token id >= 0, or null to take it from the tokenizer")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def num_image_tokens(vcfg: VisionConfig) -> int:
    """<|image|> placeholders per image: (image_size // patch_size) ** 2, divided by 4 with the 2x2 merge."""
    n = vcfg.patches_per_side ** 2
    return n // 4 if vcfg.merge_patches else n
