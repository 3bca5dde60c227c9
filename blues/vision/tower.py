"""VisionTower: everything Blues adds for images (encoder, projector, modality-type embedding), and
where the image tokens enter the text sequence.

Shapes: M images, S image side, n image tokens per image, D language width, B batch, T tokens.

The encoder is Blues' ViT (blues.vision.encoder), or with vision_pretrained (or a recorded
vision_pretrained_config) a CLIP or SigLIP tower (blues.vision.pretrained) whose width Dv sizes the
projector.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from blues.config import BluesConfig
from blues.vision.config import num_image_tokens
from blues.vision.encoder import Projector, VisionEncoder


class VisionTower(nn.Module):
    """Everything Blues adds for images: the encoder, the projector and the modality-type embedding
    (text 0, image 1). `forward` turns token embeddings into the decoder's input."""

    def __init__(self, config: BluesConfig):
        super().__init__()
        v = config.vision
        if v.image_token_id is None:
            raise ValueError("image_token_id=None: a vision model needs the id of the <|image|> placeholder; set "
                             "image_token_id from the tokenizer (blues.data.images.with_image_tokens adds it)")
        self.image_token_id = v.image_token_id
        self.tokens_per_image = num_image_tokens(v)
        self.pixel_shape = (3, v.image_size, v.image_size)
        if v.vision_pretrained is not None or v.vision_pretrained_config is not None:
            from blues.vision.pretrained import PretrainedEncoder, vision_config_of
            self.encoder = PretrainedEncoder(vision_config_of(v), v)
            # The projector reads the encoder width from vision_n_embd: the tower's hidden size here
            # (vision_n_head=1 only keeps VisionConfig's head check true; the projector has no heads).
            config = dataclasses.replace(config, vision=dataclasses.replace(
                v, vision_n_embd=self.encoder.hidden_size, vision_n_head=1))
        else:
            self.encoder = VisionEncoder(config)
        self.projector = Projector(config)
        self.modality_emb = nn.Embedding(2, config.model.n_embd)  # row 0 text, row 1 image

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (M, 3, S, S) in [0, 1] -> image tokens (M, n, D)."""
        return self.projector(self.encoder(pixels))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images (M, 3, S, S) in [0, 1] -> image tokens (M, n, D); ValueError for another image shape."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.pixel_shape:
            want = ", ".join(map(str, self.pixel_shape))
            raise ValueError(f"images have shape {tuple(images.shape)}: expected (M, {want}), image_size from the "
                             "config (blues.vision.images.to_pixels resizes)")
        return self.encode(images)

    def forward(self, input_ids: torch.Tensor, x: torch.Tensor, images: Optional[torch.Tensor],
                image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, T), token embeddings x (B, T, D), images (M, 3, S, S) or None -> (B, T, D);
        image_tokens (M, n, D): image_tokens(images) already computed (the contrastive pass shares them).

        The image tokens replace the embeddings at the <|image|> placeholders, image after image in
        row-major order of the placeholders (so images[i] fills the i-th span); the modality embedding
        is added at every position. ValueError when the placeholders do not match the images' tokens."""
        if image_tokens is None and images is not None:
            image_tokens = self.image_tokens(images)  # (M, n, D)
        is_image = input_ids == self.image_token_id  # (B, T)
        num_placeholders = int(is_image.sum())  # one host read per forward: the count decides the error
        num_images = 0 if image_tokens is None else image_tokens.shape[0]
        if num_placeholders != num_images * self.tokens_per_image:
            raise ValueError(f"prompt has {num_placeholders} image placeholders but {num_images} image(s): each "
                             f"image fills {self.tokens_per_image} <|image|> placeholders (expected "
                             f"{num_images * self.tokens_per_image}); give one image per image span")
        if num_images:
            feats = image_tokens.to(x.dtype)  # (M, n, D)
            x = x.masked_scatter(is_image[..., None], feats.reshape(-1, feats.shape[-1]))
        return x + self.modality_emb(is_image.long()).to(x.dtype)
