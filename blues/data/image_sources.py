"""Where image-text samples come from: a JSONL/JSON file of pairs or LLaVA-style conversations, read with Pillow.

Two layouts, one record per JSONL line (or per item of a .json list), mixed freely:
    {"image": "pics/1.png", "text": "a caption"}                 loss on the whole text
    {"image": "pics/1.png", "conversations": [                   LLaVA: loss on the gpt turns only
        {"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}
Image paths are relative to the JSONL file's folder (or absolute). A record without "image" is
text only: skipped and counted (text-only batches come from a text data_dir mixed in by the loader).
The "<image>" marker is removed from the turns: every sample's image span goes before its text.
Turns are joined by "\\n"; each turn's text ends with its separator, so the loss on a gpt turn also
teaches where it ends.

Pillow is imported only here, only when an image file is read (the built-in set needs none).
Shapes: S image side; images are (3, S, S) uint8, channels first.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple, Optional

import numpy as np

HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
IMAGE_MARKER = "<image>"


class ImageRecord(NamedTuple):
    image: str  # absolute path of the image file
    segments: tuple[tuple[str, bool], ...]  # (text, loss taken on its tokens), in order
    where: str  # "FILE line N" (or "item N" in a .json list): for error messages


def _records_of(path: str) -> list[tuple[object, str]]:
    """(parsed JSON value, where) of every record of a .jsonl or .json file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"image-text file {path!r} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"image-text file {path!r} is not UTF-8: {e}") from None
    if path.endswith(".json"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"image-text file {path!r} is not valid JSON: {e}") from None
        items = value if isinstance(value, list) else [value]
        return [(item, f"{path} item {i}") for i, item in enumerate(items)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{path} line {lineno}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {lineno} is not valid JSON ({e.msg}): {line[:60]!r}") from None
    return out


def _conversation_segments(turns: object, where: str) -> tuple[tuple[str, bool], ...]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: \"conversations\" is {str(turns)[:60]!r}: expected a non-empty list of "
                         f"{{\"from\": \"human\"|\"gpt\", \"value\": TEXT}}")
    segments, markers = [], 0
    for i, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role not in HUMAN_ROLES + GPT_ROLES or not isinstance(value, str):
            raise ValueError(f"{where}: conversation turn {i} is {str(turn)[:80]!r}: expected {{\"from\": one of "
                             f"{', '.join(HUMAN_ROLES + GPT_ROLES)}, \"value\": TEXT}}")
        markers += value.count(IMAGE_MARKER)
        text = value.replace(IMAGE_MARKER, "").strip("\n")
        segments.append((text + ("\n" if i < len(turns) - 1 else ""), role in GPT_ROLES))
    if markers > 1:
        raise ValueError(f"{where}: the conversation has {markers} {IMAGE_MARKER} placeholders but a sample holds "
                         f"one image: split it into one record per image")
    if not any(loss for _, loss in segments):
        raise ValueError(f"{where}: the conversation has no gpt turn, so no token would be learned: add a turn "
                         f"{{\"from\": \"gpt\", \"value\": TEXT}}")
    return tuple(segments)


def _record(value: object, where: str, base: str) -> Optional[ImageRecord]:
    """The record of one JSON value, or None for a text-only one (no "image")."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} is {str(value)[:60]!r}: expected an object with \"image\" and \"text\" "
                         f"or \"conversations\"")
    if "conversations" in value:
        segments = _conversation_segments(value["conversations"], where)
    elif isinstance(value.get("text"), str) and value["text"]:
        segments = ((value["text"], True),)
    else:
        raise ValueError(f"{where} has keys {sorted(value)[:6]}: expected a non-empty \"text\" or LLaVA "
                         f"\"conversations\" next to \"image\"")
    image = value.get("image")
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: \"image\" is {str(image)[:60]!r}: expected one image path (a string)")
    path = os.path.normpath(os.path.join(base, image))
    if not os.path.isfile(path):
        raise ValueError(f"image file {path!r} named on {where} does not exist (paths are relative to the "
                         f"file's folder {base!r})")
    return ImageRecord(path, segments, where)


class ImagePairsSource:
    """The records of one .jsonl/.json file, checked (JSON, fields, image files exist) when built."""

    kind = "image_pairs"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.exists(self.path):
            raise ValueError(f"--images {path!r} does not exist: expected a .jsonl or .json file of image-text "
                             f"records, or 'builtin'")
        if not os.path.isfile(self.path) or not self.path.endswith((".jsonl", ".json")):
            raise ValueError(f"--images {path!r} is not a .jsonl or .json file: expected a JSONL of "
                             f"{{\"image\": PATH, \"text\": TEXT}} or LLaVA-style conversations, or 'builtin'")
        base = os.path.dirname(self.path)
        records = [_record(v, w, base) for v, w in _records_of(self.path)]
        self.records = [r for r in records if r is not None]
        self.num_text_only = len(records) - len(self.records)
        if not self.records:
            raise ValueError(f"image-text file {path!r} has no record with an \"image\" ({self.num_text_only} "
                             f"text-only): expected {{\"image\": PATH, ...}} records")

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "num_records": len(self.records),
                "num_text_only_skipped": self.num_text_only}

    def fingerprint(self) -> str:
        """Content, not mtimes (as blues.data.sources.DirSource): the file and every image it names."""
        h = hashlib.sha256()
        for path in [self.path] + sorted({r.image for r in self.records}):
            fh = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    fh.update(block)
            h.update(json.dumps([os.path.relpath(path, os.path.dirname(self.path)), fh.hexdigest()]).encode())
        return h.hexdigest()


def load_image(path: str, where: str, image_size: int, counts: dict) -> np.ndarray:
    """The image file at `path` as (3, S, S) uint8 RGB: converted from another mode and resized
    (bicubic, to S x S whatever its aspect) when needed, each counted in `counts`."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("reading image files needs Pillow, which is not installed: pip install pillow") from None
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                counts.setdefault("converted_modes", {})
                counts["converted_modes"][im.mode] = counts["converted_modes"].get(im.mode, 0) + 1
                # a palette with a transparent entry goes through RGBA (Pillow warns otherwise)
                if im.mode == "P" and "transparency" in im.info:
                    im = im.convert("RGBA")
                im = im.convert("RGB")
            if im.size != (image_size, image_size):
                counts["resized"] = counts.get("resized", 0) + 1
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
            pixels = np.asarray(im, dtype=np.uint8)  # (S, S, 3)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image file {path!r} named on {where} cannot be read: "
                         f"{' '.join(str(e).split()) or type(e).__name__}") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, S, S)
