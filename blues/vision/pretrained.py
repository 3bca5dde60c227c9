"""A pretrained CLIP or SigLIP vision tower from a local Hugging Face folder, in place of Blues' own ViT.

Shapes: M images, S image side (the folder's image_size), N = (S / P)^2 patches, Dv the folder's
hidden_size.

    pixels (M, 3, S, S) in [0, 1] -> (x - mean) / std per channel -> the Hugging Face vision model
    -> last_hidden_state (M, [CLS] + N, Dv) -> the N patch tokens (M, N, Dv)

The same interface as blues.vision.encoder.VisionEncoder, so the projector and the placeholders do
not change. Choices, and why:
- The last hidden layer (CLIP's before its post_layernorm, which only its pooled token uses; SigLIP's
  after its post_layernorm, which its last_hidden_state includes). LLaVA takes the penultimate layer;
  that would leave the last layer without gradients (DeepSpeed then has parameters that never get one),
  so it is not offered.
- CLIP's class token is dropped: the N patch tokens map one to one onto the <|image|> placeholders.
- SigLIP's attention-pooling head and CLIP's post_layernorm are left out of the module (nothing reads
  them): no parameter without a gradient.
- Pixels: Blues resizes every image to S x S itself (blues.vision.images); only the mean and std of
  the folder's image processor (preprocessor_config.json) are used, else CLIP's / SigLIP's documented
  defaults.

The tower is built from a config dict alone (vision_pretrained_config, recorded by blues-train when
training starts): a saved model rebuilds it with no folder, then its own weights load. The folder's
weights are copied in by load_vision_pretrained (blues.train.engine calls it after build_model:
Blues.__init__ re-initialises every Linear and Embedding, so weights loaded earlier would be lost).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from blues.vision.config import VisionConfig

PREPROCESSOR_NAME = "preprocessor_config.json"
# Keys of a Hugging Face config that describe the file, not the network: not recorded.
FILE_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "id2label",
             "label2id")


class Kind(NamedTuple):
    """One supported family: its transformers classes, its default pixel statistics, its class token."""
    config_class: str
    model_class: str
    vision_type: str  # model_type of its vision-only config
    mean_std: str  # the transformers.utils.constants pair its image processor defaults to
    class_token: bool


KINDS = {
    "clip": Kind("CLIPVisionConfig", "CLIPVisionModel", "clip_vision_model", "OPENAI_CLIP", True),
    "siglip": Kind("SiglipVisionConfig", "SiglipVisionModel", "siglip_vision_model", "IMAGENET_STANDARD", False),
}
MODEL_TYPES = {t: name for name, k in KINDS.items() for t in (name, k.vision_type)}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("vision_pretrained needs the transformers package (pip install transformers) to build a "
                         "CLIP or SigLIP tower") from None
    return transformers


def kind_of(vision_config: dict) -> Kind:
    """The family of a vision config dict by its model_type; ValueError naming it when it is neither."""
    t = vision_config.get("model_type")
    if t not in MODEL_TYPES:
        raise ValueError(f"vision config has model_type={t!r}: expected one of {', '.join(sorted(MODEL_TYPES))} "
                         "(a CLIP or SigLIP model)")
    return KINDS[MODEL_TYPES[t]]


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} is not a readable JSON file: {e}") from None


def hf_config(kind: Kind, d: dict, source: str):
    """The transformers config of `kind` from the dict `d` (defaults filled); ValueError naming `source`
    when transformers refuses it (its strict dataclass checks raise their own exception types)."""
    cls = getattr(_transformers(), kind.config_class)
    try:
        return cls.from_dict(d)
    except Exception as e:  # noqa: BLE001 - StrictDataclassError, TypeError, ValueError: all a bad config
        raise ValueError(f"{source}: not a valid {kind.config_class}: {' '.join(str(e).split())}") from None


def pixel_stats(folder: str, kind: Kind) -> tuple[list[float], list[float]]:
    """(mean, std) per RGB channel: the folder's image processor's, else the family's default."""
    path = os.path.join(folder, PREPROCESSOR_NAME)
    if not os.path.isfile(path):
        from transformers.utils import constants
        return getattr(constants, kind.mean_std + "_MEAN"), getattr(constants, kind.mean_std + "_STD")
    d = _read_json(path)
    out = []
    for key in ("image_mean", "image_std"):
        v = d.get(key) if isinstance(d, dict) else None
        if isinstance(v, (int, float)):
            v = [v] * 3
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
                and (key == "image_mean" or min(v) > 0)):
            raise ValueError(f"{path!r} has {key}={v!r}: expected 3 numbers (one per RGB channel, std > 0)")
        out.append([float(x) for x in v])
    return out[0], out[1]


def read_vision_config(folder: str) -> dict:
    """The vision config of a local CLIP / SigLIP folder (a vision model's or a full model's config.json)
    as a JSON-plain dict, with the pixel statistics as image_mean / image_std: what
    vision_pretrained_config records. ValueError for a missing folder or one that is not CLIP or SigLIP."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise ValueError(f"vision_pretrained={folder!r} is not a folder: expected a local Hugging Face CLIP or "
                         "SigLIP folder (config.json and weights, e.g. written by save_pretrained)")
    if not os.path.isfile(path):
        raise ValueError(f"vision_pretrained={folder!r} has no config.json: expected a Hugging Face CLIP or SigLIP "
                         "folder")
    d = _read_json(path)
    t = d.get("model_type") if isinstance(d, dict) else None
    if t not in MODEL_TYPES:
        raise ValueError(f"vision_pretrained={folder!r} holds model_type={t!r}: expected a CLIP or SigLIP model "
                         f"({', '.join(sorted(MODEL_TYPES))})")
    kind = KINDS[MODEL_TYPES[t]]
    sub = d if t == kind.vision_type else d.get("vision_config") or {}
    config = hf_config(kind, sub, f"vision_pretrained={folder!r}")
    out = {k: v for k, v in config.to_dict().items() if k not in FILE_KEYS}
    out["model_type"] = kind.vision_type
    out["image_mean"], out["image_std"] = pixel_stats(folder, kind)
    return json.loads(json.dumps(out))  # JSON-plain: equal to itself after a checkpoint's round trip


def vision_config_of(v: VisionConfig) -> dict:
    """The recorded vision_pretrained_config, else the one read from the vision_pretrained folder."""
    if v.vision_pretrained_config is not None:
        return v.vision_pretrained_config
    return read_vision_config(v.vision_pretrained)


def _side(value: Any) -> Any:
    """A Hugging Face size (an int or a square [h, w]) as one int; anything else as it is."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def check_sizes(vision_config: dict, v: VisionConfig) -> None:
    """ValueError naming both pairs when image_size / patch_size differ from the tower's."""
    size, patch = _side(vision_config.get("image_size")), _side(vision_config.get("patch_size"))
    if (size, patch) != (v.image_size, v.patch_size):
        where = v.vision_pretrained or "vision_pretrained_config"
        raise ValueError(f"image_size={v.image_size} and patch_size={v.patch_size}, but the pretrained tower "
                         f"{where!r} takes image_size={size} and patch_size={patch}: set image_size={size} "
                         f"patch_size={patch}")


class PretrainedEncoder(nn.Module):
    """A CLIP or SigLIP vision model as a Blues encoder: pixels (M, 3, S, S) in [0, 1] -> patch
    features (M, N, Dv). Built from a vision config dict (random weights; load_vision_pretrained or a
    saved model fills them)."""

    def __init__(self, vision_config: dict, v: VisionConfig):
        super().__init__()
        kind = kind_of(vision_config)
        check_sizes(vision_config, v)
        hf = {k: val for k, val in vision_config.items() if k not in ("image_mean", "image_std")}
        config = hf_config(kind, hf, "vision_pretrained_config")
        if kind.model_class == "SiglipVisionModel":
            config.vision_use_head = False  # the attention-pooling head: nothing reads it
        self.model = getattr(_transformers(), kind.model_class)(config)
        if hasattr(self.model, "post_layernorm") and kind.class_token:
            self.model.post_layernorm = nn.Identity()  # CLIP's: only its pooled class token goes through it
        self.class_token = kind.class_token
        self.hidden_size = config.hidden_size
        mean = torch.tensor(vision_config["image_mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(vision_config["image_std"], dtype=torch.float32).view(1, 3, 1, 1)
        # Not saved with the weights: they come from the config dict, which a saved model keeps.
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.model, "is_gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        """Blues._set_gradient_checkpointing sets this on whatever encoder the tower holds."""
        if on:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.gradient_checkpointing:
            self.model.gradient_checkpointing_disable()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        x = (pixels.to(dtype) - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)  # (M, 3, S, S)
        h = self.model(pixel_values=x).last_hidden_state  # (M, [1 +] N, Dv)
        return h[:, 1:] if self.class_token else h  # (M, N, Dv)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load report lists a full model's text weights as unexpected and draws a progress
    bar: noise here, where load_vision_pretrained checks the keys itself."""
    from transformers.utils import logging as hf_logging
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_vision_pretrained(model: nn.Module) -> None:
    """Copy the vision_pretrained folder's tower weights into a Blues model built with that tower
    (model.vision.encoder, a PretrainedEncoder). ValueError naming the folder and the tensors when its
    weights do not cover the tower or have other shapes; nothing is copied then."""
    v = model.config.vision
    encoder = model.vision.encoder
    assert isinstance(encoder, PretrainedEncoder), type(encoder)
    folder = v.vision_pretrained
    read_vision_config(folder)  # the clear errors for a missing or foreign folder
    kind = kind_of(vision_config_of(v))
    cls = getattr(_transformers(), kind.model_class)
    with _quiet_transformers():
        try:
            # Mismatched shapes come back in the loading info (named below) instead of a RuntimeError
            # that points at the report silenced here.
            loaded, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                               ignore_mismatched_sizes=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"vision_pretrained={folder!r}: its weights do not load: {e}") from None
    source = loaded.state_dict()
    not_loaded = set(info.get("missing_keys") or ()) | {m[0] for m in info.get("mismatched_keys") or ()}
    own = encoder.model.state_dict()
    problems = [f"{k!r} missing or of another shape in the folder" for k in own if k not in source or k in not_loaded]
    problems += [f"{k!r} has shape {tuple(source[k].shape)}, the tower {tuple(t.shape)}" for k, t in own.items()
                 if k in source and tuple(source[k].shape) != tuple(t.shape)]
    if problems:
        raise ValueError(f"vision_pretrained={folder!r}: its weights do not fit the tower: {'; '.join(problems[:5])}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(source[k])
