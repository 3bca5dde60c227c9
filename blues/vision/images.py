"""Images as the encoder takes them: to_pixels turns what a user holds into (3, S, S) floats in [0, 1].

Accepted: a PIL image (any mode: converted to RGB), an HxWx3 uint8 array, or a (3, H, W) tensor
(uint8, or floats in [0, 1]). Anything not S x S is resized with Pillow's bicubic filter, as
blues.data.image_sources.load_image resizes image files, so that generation sees images as the
prepared data did. Files are read by that function (blues-generate --image).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

RESAMPLE = "BICUBIC"  # Pillow's Image.Resampling member used for every resize


def resize_rgb(array: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8 (Pillow, bicubic); unchanged when it already is that size."""
    if array.shape[:2] == (size, size):
        return array
    from PIL import Image
    resample = getattr(Image.Resampling, RESAMPLE)
    return np.asarray(Image.fromarray(array).resize((size, size), resample=resample))


def to_pixels(image: Any, size: int) -> torch.Tensor:
    """A PIL image, an HxWx3 uint8 array or a (3, H, W) tensor -> (3, size, size) float32 in [0, 1].

    ValueError naming the type or shape when it is none of those."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W), got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            image = image.permute(1, 2, 0).cpu().numpy()  # HxWx3 uint8: resized below
        elif tuple(image.shape[1:]) == (size, size):
            return image.float().clamp(0, 1)
        else:
            image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"an image must be a PIL image, an HxWx3 uint8 array or a (3, H, W) tensor, got "
                         f"{type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"an image array must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
    rgb = resize_rgb(np.ascontiguousarray(image), size)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255)  # (3, S, S)
