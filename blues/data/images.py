"""Image-text data: prepare_images, ensure_image_data and ImageTextLoader (the whole public API; the
tokens and the folder's files are in blues.data.image_data, re-exported here).

    with_image_tokens(tok)              the tokenizer plus <|image_start|> <|image|> <|image_end|>
    image_span_ids(tok, N)              <|image_start|> <|image|> * N <|image_end|>: before a text, or a prompt
    prepare_images(data_dir, "builtin" | "pairs.jsonl", image_size=, num_image_tokens=)
    ensure_image_data(data_dir, vision_cfg, tokenizer)   the built-in synthetic set, only where nothing is lost
    ImageTextLoader(data_dir, split, block_size, batch_size, seed)   (x, y, images) batches, exact resume

Shapes: B batch, T block_size, N image tokens per image, S image side.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from typing import Optional, Union

import numpy as np

from blues.common import atomic_write_json
from blues.data.data_dir import (
    LOCK_FILE,
    META_FILE,
    SPLITS,
    check_tokenizer,
    commit,
    locked,
    make_writable,
    new_tmp_dir,
    read_meta,
    remove_stale_tmp,
    token_dtype,
)
from blues.data.image_data import (
    IMAGE_FORMAT,
    IMAGE_FORMAT_VERSION,
    IMAGE_TOKENS,
    KIND,
    SplitWriter,
    encode_segments,
    image_incomplete_reason,
    image_span_ids,
    image_token_ids,
    load_image_meta,
    read_image_meta,
    split_files,
    with_image_tokens,
)
from blues.data.image_sources import ImagePairsSource, load_image
from blues.data.loader import TokenLoader, check_resumable, next_entries
from blues.data.prepare import DEFAULT_SEED, _split_value
from blues.data.shapes import GENERATOR_VERSION, synthetic_split
from blues.data.tokenizer import Tokenizer
from blues.vision.config import VisionConfig, num_image_tokens

__all__ = ["BUILTIN", "IMAGE_FORMAT", "IMAGE_TOKENS", "KIND", "ImageTextLoader", "ensure_image_data",
           "image_span_ids", "image_token_ids", "load_image_meta", "prepare_images", "with_image_tokens"]
log = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_NUM_SAMPLES = {"train": 10000, "val": 500}  # 31 MB at S=32


# ----------------------------------------------------------------------------- prepare

class _Shapes:
    """The built-in synthetic set (blues.data.shapes) as a source: splits drawn by seed."""

    kind = "builtin_shapes"

    def __init__(self, seed: int, num_samples: dict, two_object_fraction: float):
        self.seed, self.num_samples, self.two_object_fraction = seed, dict(num_samples), two_object_fraction

    def describe(self) -> dict:
        return {"kind": self.kind, "generator_version": GENERATOR_VERSION, "seed": self.seed,
                "two_object_fraction": self.two_object_fraction}

    def fingerprint(self) -> str:
        return json.dumps([GENERATOR_VERSION, self.seed, self.num_samples, self.two_object_fraction])

    def samples(self, image_size: int, counts: dict):
        for split in SPLITS:
            for image, text, _ in synthetic_split(self.seed, split, self.num_samples[split], image_size,
                                                  self.two_object_fraction):
                yield split, image, ((text, True),)


def _pairs_samples(source: ImagePairsSource, val_fraction: float, seed: int):
    """samples() of a file of pairs: a record's split by a hash of its content (as blues.data.prepare),
    at least one sample in each split."""
    key = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()
    values = np.array([_split_value(json.dumps([os.path.basename(r.image), r.segments]), key)
                       for r in source.records])
    is_val = values < val_fraction
    if val_fraction > 0 and not is_val.any():
        is_val[np.argmin(values)] = True
    if is_val.all() and len(values) > 1:
        is_val[np.argmax(values)] = False

    def samples(image_size: int, counts: dict):
        for split in SPLITS:
            for r, v in zip(source.records, is_val):
                if v == (split == "val"):
                    yield split, load_image(r.image, r.where, image_size, counts), r.segments
    return samples


def prepare_images(data_dir: str, images: str = BUILTIN, *, image_size: int, num_image_tokens: int,
                   tokenizer: Union[str, Tokenizer] = "default", val_fraction: float = 0.05,
                   seed: int = DEFAULT_SEED, num_samples: Optional[dict] = None, two_object_fraction: float = 0.0,
                   force: bool = False, progress: Optional[bool] = None) -> dict:
    """Write image-text data into `data_dir`: `images` is "builtin" (the synthetic shapes, num_samples
    per split, held out by seed) or a .jsonl/.json of pairs or LLaVA conversations (val_fraction
    held out by content hash). Reused when the same inputs were prepared the same way (fingerprint);
    returns the meta, with "reused". A failure leaves no meta.json and no temp folder behind."""
    for name, value in (("image_size", image_size), ("num_image_tokens", num_image_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid: expected an integer >= 0")
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: expected a number in [0, 1)")
    if not isinstance(two_object_fraction, (int, float)) or not 0 <= two_object_fraction <= 1:
        raise ValueError(f"two_object_fraction={two_object_fraction!r} is invalid: expected a number in [0, 1]")
    t0 = time.perf_counter()
    data_dir = os.path.abspath(data_dir)
    tok = with_image_tokens(tokenizer)
    if images == BUILTIN:
        num_samples = {**BUILTIN_NUM_SAMPLES, **(num_samples or {})}
        if sorted(num_samples) != sorted(SPLITS) or min(num_samples.values()) < 1:
            raise ValueError(f"num_samples={num_samples!r} is invalid: expected a positive count per split "
                             f"({', '.join(SPLITS)})")
        source = _Shapes(seed, num_samples, two_object_fraction)
        samples = source.samples
    else:
        source = ImagePairsSource(images)  # reads and checks every record (and that its image exists) first
        samples = _pairs_samples(source, val_fraction, seed)
    make_writable(data_dir)
    with locked(data_dir):
        if read_meta(data_dir) is not None:
            raise ValueError(f"data_dir {data_dir!r} holds text data prepared by blues-prepare: pass another "
                             f"--data_dir for image-text data")
        fingerprint = hashlib.sha256(json.dumps(
            [IMAGE_FORMAT, IMAGE_FORMAT_VERSION, source.kind, source.fingerprint(), tok.fingerprint, image_size,
             num_image_tokens, val_fraction if images != BUILTIN else None, seed]).encode()).hexdigest()
        old = read_image_meta(data_dir)
        if (not force and old is not None and old.get("fingerprint") == fingerprint
                and image_incomplete_reason(data_dir, old) is None):
            log.info("reusing %s: prepared from the same inputs (fingerprint %s)", data_dir, fingerprint[:12])
            return {**old, "data_dir": data_dir, "reused": True}
        remove_stale_tmp(data_dir)
        settings = {"image_size": image_size, "num_image_tokens": num_image_tokens, "seed": seed,
                    "val_fraction": val_fraction if images != BUILTIN else None}
        meta = _build(data_dir, tok, samples, source, fingerprint, settings, progress)
    return {**meta, "build_seconds": round(time.perf_counter() - t0, 3), "reused": False}


def _build(data_dir: str, tok: Tokenizer, samples, source, fingerprint: str, settings: dict,
           progress: Optional[bool]) -> dict:
    from tqdm import tqdm

    tmp = new_tmp_dir(data_dir)
    dtype = token_dtype(tok.n_vocab)
    writers = {s: SplitWriter(tmp, s, dtype) for s in SPLITS}
    counts: dict = {}
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with tqdm(unit="image", desc="preparing images", disable=not show, file=sys.stderr) as bar:
            for split, image, segments in samples(settings["image_size"], counts):
                writers[split].add(image, *encode_segments(tok, segments))
                bar.update(1)
        for w in writers.values():
            w.close()
        tok.save(tmp)
        meta = {
            "format": IMAGE_FORMAT, "version": IMAGE_FORMAT_VERSION, "kind": KIND, "fingerprint": fingerprint,
            "build_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data_dir": data_dir,
            "source": source.describe(), **settings,
            "tokenizer": {"name": tok.name, "sha256": tok.sha256, "fingerprint": tok.fingerprint,
                          "n_vocab": tok.n_vocab, "eot_id": tok.eot_id,
                          "image_token_ids": dict(zip(IMAGE_TOKENS, image_token_ids(tok)))},
            "vocab_size": tok.n_vocab, "dtype": np.dtype(dtype).name,
            "num_samples": sum(w.num_samples for w in writers.values()),
            "num_resized": counts.get("resized", 0), "converted_modes": counts.get("converted_modes", {}),
            "num_mode_converted": sum(counts.get("converted_modes", {}).values()),
            "splits": {s: {"num_samples": w.num_samples, "num_tokens": w.num_tokens, "files": split_files(s)}
                       for s, w in writers.items()},
        }
        atomic_write_json(os.path.join(tmp, META_FILE), meta)
        commit(tmp, data_dir)
        return meta
    finally:
        for w in writers.values():
            for f in w.f.values():
                f.close()  # a no-op after close(); on errors, before the folder goes
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_image_data(data_dir: str, vision_cfg: VisionConfig, tokenizer: Union[str, Tokenizer] = "default",
                      progress: Optional[bool] = None) -> dict:
    """The meta of the image-text data in `data_dir` for this vision config and tokenizer, writing
    the built-in synthetic set where that loses nothing:
    - the user's own image-text data: returned when it matches (image size, image tokens,
      tokenizer), else ValueError saying what to re-run; never overwritten.
    - absent, hidden entries only, or built-in data of other settings: the built-in set is written.
    - anything else: ValueError; nothing is written. Safe from several processes at once (the lock)."""
    n, S = num_image_tokens(vision_cfg), vision_cfg.image_size
    visible = sorted(f for f in os.listdir(data_dir) if not f.startswith(".")) if os.path.isdir(data_dir) else []
    meta = read_image_meta(data_dir)
    if meta is None and visible and os.path.exists(os.path.join(data_dir, LOCK_FILE)):
        with locked(data_dir):  # a prepare may be moving its files in right now (meta.json comes last)
            meta = read_image_meta(data_dir)
    if meta is None and read_meta(data_dir) is not None:
        raise ValueError(f"data_dir {data_dir!r} holds text data (blues-prepare without --images) but the vision "
                         f"config needs image-text data: pass another data_dir, or run blues-prepare --images "
                         f"SRC|builtin --data_dir NEW_DIR")
    if meta is not None and meta["source"]["kind"] != _Shapes.kind:
        meta = load_image_meta(data_dir)
        got = (meta["image_size"], meta["num_image_tokens"])
        if got != (S, n):
            raise ValueError(f"data_dir {data_dir!r} holds images of {got[0]} px with {got[1]} image tokens but "
                             f"the vision config needs image_size={S} with {n}: re-run blues-prepare --images "
                             f"{meta['source'].get('path', 'SRC')} --data_dir {data_dir} --image_size {S} "
                             f"--patch_size {vision_cfg.patch_size}{' --merge_patches' * vision_cfg.merge_patches} "
                             f"--force")
        check_tokenizer(with_image_tokens(tokenizer), meta)
        return {**meta, "data_dir": os.path.abspath(data_dir), "reused": True}
    if meta is None and visible:
        raise ValueError(f"data_dir {data_dir!r} holds no image-text data but is not empty (it holds "
                         f"{visible[0]!r}{f' and {len(visible) - 1} more' if len(visible) > 1 else ''}), so the "
                         f"built-in image set is not written there: pass an empty or new data_dir")
    if meta is None:
        log.info("data_dir %s holds no image-text data: writing the built-in synthetic set", data_dir)
    return prepare_images(data_dir, BUILTIN, image_size=S, num_image_tokens=n, tokenizer=tokenizer,
                          progress=progress)


# ----------------------------------------------------------------------------- loader

class ImageTextLoader:
    """(x, y, images) micro-batches from one split of a prepared image-text data_dir, one sample a row.

    A row is <|image_start|> <|image|> * N <|image_end|> then the sample's text and <|endoftext|>,
    padded with <|endoftext|> to T + 1 tokens; x = row[:T], y = row[1:] with -1 wherever no loss is
    taken: the image span, padding, and text the data marks loss-free (LLaVA's human turns).
    Training (next_batch): each epoch a seeded shuffle of the samples, dealt to ranks like cards
    (rank r takes r, r + W, ...; as many on every rank). With text_data_dir and text_batch_fraction
    f > 0, each micro-batch is text only with probability f ((x, y, None) from a TokenLoader on that
    prepared text data), the draw seeded by the batch count alone, so every rank agrees.
    state_dict / load_state_dict resume exactly (both streams). eval_batches: image-text only.
    """

    def __init__(self, data_dir: str, split: str, block_size: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, tokenizer: Union[None, str, Tokenizer] = None,
                 text_data_dir: Optional[str] = None, text_batch_fraction: float = 0.0):
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} is invalid: expected 0 <= rank < world_size={world_size}")
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: expected one of {', '.join(SPLITS)}")
        if not isinstance(text_batch_fraction, (int, float)) or not 0 <= text_batch_fraction < 1:
            raise ValueError(f"text_batch_fraction={text_batch_fraction!r} is invalid: expected a number in [0, 1)")
        if text_batch_fraction > 0 and text_data_dir is None:
            raise ValueError(f"text_batch_fraction={text_batch_fraction} needs text_data_dir (prepared text data "
                             f"to draw the text-only batches from)")
        self.data_dir, self.split = data_dir, split
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.meta = meta = load_image_meta(data_dir)
        if tokenizer is not None:
            check_tokenizer(with_image_tokens(tokenizer), meta)
        self.span = np.array(image_span_ids(Tokenizer.load(data_dir), meta["num_image_tokens"]), dtype=np.int64)
        self.pad_id = meta["tokenizer"]["eot_id"]
        info = meta["splits"][split]
        self.num_samples = n = info["num_samples"]
        if n < world_size:
            raise ValueError(f"split {split!r} of {data_dir!r} has {n} samples: too few for {world_size} ranks")
        files = {a: os.path.join(data_dir, f) for a, f in info["files"].items()}
        S = meta["image_size"]
        self.images = np.memmap(files["images"], dtype=np.uint8, mode="r", shape=(n, 3, S, S))
        self.tokens = np.memmap(files["tokens"], dtype=meta["dtype"], mode="r")
        self.loss = np.memmap(files["loss"], dtype=np.uint8, mode="r")
        self.offsets = np.fromfile(files["offsets"], dtype=np.int64)
        longest = len(self.span) + int(np.diff(self.offsets).max())
        if longest > block_size + 1:
            raise ValueError(f"block_size={block_size} is too small for split {split!r} of {data_dir!r}: its "
                             f"longest sample is {longest} tokens ({len(self.span)} of the image span, the rest "
                             f"text), which needs block_size >= {longest - 1}")
        self.text_batch_fraction = float(text_batch_fraction)
        self.text = None
        if text_data_dir is not None and text_batch_fraction > 0:
            self.text = TokenLoader(text_data_dir, split, block_size, batch_size, seed=seed, rank=rank,
                                    world_size=world_size)
            if with_image_tokens(Tokenizer.load(text_data_dir)).fingerprint != meta["tokenizer"]["fingerprint"]:
                raise ValueError(f"text data {text_data_dir!r} was made with another tokenizer than the image-text "
                                 f"data {data_dir!r} ({meta['tokenizer']['name']!r}): prepare both with one")
        self.epoch, self.pos, self.batches = 0, 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_samples(self, epoch: int) -> np.ndarray:
        """This rank's sample indices in `epoch`, in the order they are served."""
        if self._order_epoch != epoch:
            n, W = self.num_samples, self.world_size
            perm = np.random.default_rng([self.seed, epoch, SPLITS.index(self.split)]).permutation(n)
            self._order, self._order_epoch = perm[self.rank::W][: n // W].astype(np.int64), epoch
        return self._order

    def _gather(self, idx: np.ndarray):
        """x, y (B, T) int64 and images (B, 3, S, S) float32 in [0, 1] of samples `idx`."""
        import torch

        B, T1, L = len(idx), self.block_size + 1, len(self.span)
        row = np.full((B, T1), self.pad_id, dtype=np.int64)  # (B, T+1)
        keep = np.zeros((B, T1), dtype=bool)  # (B, T+1): a target the loss is taken on
        row[:, :L] = self.span
        for b, i in enumerate(idx):
            a, e = int(self.offsets[i]), int(self.offsets[i + 1])
            row[b, L:L + e - a] = self.tokens[a:e]
            keep[b, L:L + e - a] = self.loss[a:e].astype(bool)
        y = np.where(keep[:, 1:], row[:, 1:], -1)
        images = torch.from_numpy(self.images[idx].astype(np.float32))  # (B, 3, S, S)
        return torch.from_numpy(row[:, :-1]), torch.from_numpy(y), images.div_(255.0)

    def _text_turn(self) -> bool:
        """Whether micro-batch number self.batches is text only (the same draw on every rank)."""
        if self.text is None:
            return False
        return bool(np.random.default_rng([self.seed, self.batches, 1]).random() < self.text_batch_fraction)

    def next_batch(self):
        """(x, y, images): x, y (B, T) int64, images (B, 3, S, S) float32, or None on a text-only batch."""
        if self._text_turn():
            self.batches += 1
            x, y = self.text.next_batch()
            return x, y, None
        return self._gather(next_entries(self, self._epoch_samples))

    def state_dict(self) -> dict:
        """Plain ints and strings (JSON-able): where both streams are, and what they must be resumed with."""
        return {"epoch": self.epoch, "pos": self.pos, "batches": self.batches, "seed": self.seed,
                "split": self.split, "block_size": self.block_size, "world_size": self.world_size,
                "text_batch_fraction": self.text_batch_fraction, "data_fingerprint": self.meta["fingerprint"],
                "text": self.text.state_dict() if self.text is not None else None}

    def load_state_dict(self, state: dict) -> None:
        check_resumable(self, state, ("seed", "split", "block_size", "world_size", "text_batch_fraction"))
        if self.text is not None:
            self.text.load_state_dict(state["text"])
        self.epoch, self.pos, self.batches = int(state["epoch"]), int(state["pos"]), int(state["batches"])

    def num_eval_batches(self, num_batches: int) -> int:
        per_rank = self.num_samples // self.world_size
        return max(1, min(num_batches, per_rank // self.batch_size))

    def eval_batches(self, num_batches: int):
        """Up to `num_batches` image-text batches of the first samples of the split, the same every call,
        as many on every rank (when fewer samples than one batch, one smaller batch)."""
        W = self.world_size
        idx = self.rank + W * np.arange(self.num_samples // W, dtype=np.int64)
        for b in range(self.num_eval_batches(num_batches)):
            yield self._gather(idx[b * self.batch_size: (b + 1) * self.batch_size])
