"""Image-text data on disk: the image special tokens, a sample's tokens, the files of a prepared folder.

A prepared image-text data_dir holds, per split s (train, val):
    s.images.bin    uint8 (N, 3, S, S): every sample's image, RGB, channels first
    s.tokens.bin    every sample's text tokens back to back, each text ending in <|endoftext|>
    s.loss.bin      uint8, one per token: 1 where the token is a target the loss is taken on
    s.offsets.bin   int64 (N + 1,): sample i's tokens are tokens[offsets[i]:offsets[i + 1]]
plus the tokenizer (with the image tokens) and meta.json (format "blues-image-text", kind
"image_text"), written last, as in blues.data.data_dir, whose lock, temp folder and commit
blues.data.images reuses. The image span is not stored: the loader writes it before each text
(its length is meta's num_image_tokens).

Shapes: N samples, S image side.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np

from blues.data.data_dir import SPLITS, read_meta
from blues.data.tokenizer import Tokenizer
from blues.vision.config import IMAGE, IMAGE_END, IMAGE_START

IMAGE_FORMAT = "blues-image-text"
IMAGE_FORMAT_VERSION = 1
KIND = "image_text"
IMAGE_TOKENS = (IMAGE_START, IMAGE, IMAGE_END)

# ----------------------------------------------------------------------------- tokens

def with_image_tokens(tok: Union[str, Tokenizer]) -> Tokenizer:
    """`tok` plus the three image tokens, given the ids after its own (n_vocab, n_vocab + 1, ...);
    the same tokenizer when it has them already. Its fingerprint differs from `tok`'s."""
    tok = Tokenizer.load(tok)
    if not isinstance(tok, Tokenizer):
        raise ValueError(f"tokenizer {tok.name!r} is a Hugging Face tokenizer.json: image tokens are added to "
                         "Blues' own tokenizers only (blues-prepare --images with --tokenizer default or a Blues one)")
    missing = [t for t in IMAGE_TOKENS if t not in tok.special_tokens]
    if not missing:
        return tok
    specials = {**tok.special_tokens, **{t: tok.n_vocab + i for i, t in enumerate(missing)}}
    return Tokenizer(tok.name, tok.pattern, tok._ranks, specials, sha256=tok._sha256, source=tok.source,
                     extra=tok.extra)


def image_token_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """Ids of <|image_start|>, <|image|>, <|image_end|>; ValueError when `tok` lacks them."""
    missing = [t for t in IMAGE_TOKENS if t not in tok.special_tokens]
    if missing:
        raise ValueError(f"tokenizer {tok.name!r} has no {', '.join(missing)}: use with_image_tokens(tokenizer), "
                         f"or the tokenizer saved with the image-text data (Tokenizer.load(data_dir))")
    return tuple(tok.special_tokens[t] for t in IMAGE_TOKENS)  # type: ignore[return-value]


def image_span_ids(tok: Tokenizer, num_image_tokens: int) -> list[int]:
    """<|image_start|> <|image|> * N <|image_end|>: what goes before a sample's text (and a prompt's)."""
    start, image, end = image_token_ids(tok)
    return [start] + [image] * num_image_tokens + [end]


def encode_segments(tok: Tokenizer, segments) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (uint32) of (text, loss) segments followed by <|endoftext|>, and per token 1 where the
    loss is taken (the segment's flag; <|endoftext|> takes the last segment's)."""
    ids = [tok.encode_to_numpy(text) for text, _ in segments] + [np.array([tok.eot_id], dtype=np.uint32)]
    loss = [np.full(len(a), flag, dtype=np.uint8) for a, (_, flag) in zip(ids, segments)]
    loss.append(np.array([segments[-1][1]], dtype=np.uint8))
    return np.concatenate(ids).astype(np.uint32), np.concatenate(loss)


# ----------------------------------------------------------------------------- the folder

def split_files(split: str) -> dict[str, str]:
    """The four files of a split, by the array they hold."""
    return {a: f"{split}.{a}.bin" for a in ("images", "tokens", "loss", "offsets")}


def _sizes(meta: dict, split: str) -> dict[str, int]:
    """Bytes each file of `split` must have."""
    info, S = meta["splits"][split], meta["image_size"]
    n, t = info["num_samples"], info["num_tokens"]
    return {"images": n * 3 * S * S, "tokens": t * np.dtype(meta["dtype"]).itemsize, "loss": t,
            "offsets": (n + 1) * 8}


def read_image_meta(data_dir: str) -> Optional[dict]:
    """meta.json of `data_dir` when it is image-text data (complete or not), else None."""
    return read_meta(data_dir, IMAGE_FORMAT)


def image_incomplete_reason(data_dir: str, meta: dict) -> Optional[str]:
    """Why the files do not match meta.json, or None when the prepared data is complete."""
    if meta.get("version") != IMAGE_FORMAT_VERSION:
        return f"meta.json has format version {meta.get('version')!r}, this Blues reads {IMAGE_FORMAT_VERSION}"
    for split in SPLITS:
        for array, want in _sizes(meta, split).items():
            path = os.path.join(data_dir, meta["splits"][split]["files"][array])
            have = os.path.getsize(path) if os.path.isfile(path) else None
            if have != want:
                return f"{path} has {'no file' if have is None else f'{have} bytes'} but meta.json says {want} bytes"
    return None


def load_image_meta(data_dir: str) -> dict:
    """meta.json of complete image-text data, or ValueError saying what to run."""
    meta = read_image_meta(data_dir)
    run = f"blues-prepare --images SRC|builtin --data_dir {data_dir}"
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir!r} does not exist: run {run}")
    if meta is None:
        what = "text data (blues-prepare without --images)" if read_meta(data_dir) else "no image-text data"
        raise ValueError(f"data_dir {data_dir!r} holds {what}: run {run}")
    reason = image_incomplete_reason(data_dir, meta)
    if reason:
        raise ValueError(f"data_dir {data_dir!r} is damaged: {reason}; re-run {run} --force")
    return meta


class SplitWriter:
    """Appends samples (image, tokens, loss flags) to one split's four files."""

    def __init__(self, folder: str, split: str, dtype):
        self.dtype = dtype
        self.f = {a: open(os.path.join(folder, name), "wb") for a, name in split_files(split).items()}
        self.f["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
        self.num_samples = self.num_tokens = 0

    def add(self, image: np.ndarray, ids: np.ndarray, loss: np.ndarray) -> None:
        self.f["images"].write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        self.f["tokens"].write(ids.astype(self.dtype).tobytes())
        self.f["loss"].write(loss.astype(np.uint8).tobytes())
        self.num_samples += 1
        self.num_tokens += len(ids)
        self.f["offsets"].write(np.array([self.num_tokens], dtype=np.int64).tobytes())

    def close(self) -> None:
        for f in self.f.values():
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()
