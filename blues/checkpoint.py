"""Training checkpoints on DeepSpeed's save_checkpoint/load_checkpoint, made safe to interrupt.

Layout under <out_dir>/checkpoints/:
    step_00000100/          one DeepSpeed checkpoint (model, optimizer partitions, experts)
        blues_complete.json written by rank 0 after every rank has finished writing
    latest                  the tag of the newest complete checkpoint (DeepSpeed's file name)

Protocol: engine.save_checkpoint(save_latest=False) on every rank; a barrier; then rank 0 writes
blues_complete.json and moves `latest` with an atomic rename; then deletes complete checkpoints
beyond keep_last. A save killed at any point leaves `latest` on the previous complete checkpoint,
and a folder without blues_complete.json is never resumed from.

client_state (DeepSpeed's, in the checkpoint) carries {"blues": ...}: step, tokens seen, the
loader's state, every rank's python/numpy/torch(/cuda) RNG state, the Blues config and the
tokenizer's sha256. blues_complete.json repeats the small part (no RNG) so a resume can check
compatibility before building anything.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch

from blues.config import BluesConfig

log = logging.getLogger("blues.checkpoint")

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "blues_complete.json"
TAG_RE = re.compile(r"^step_(\d{8,})$")

# Settings that are not weight shapes but still fix the checkpoint's layout: DeepSpeed cannot
# load its partitions (or the experts' names) under another value.
LAYOUT_FIELDS = ("ep_size", "dtype")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    """This process's RNG states in plain types (numpy's array as a list) plus torch ByteTensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------- finding checkpoints

def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, CHECKPOINT_DIR)


def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, COMPLETE))


def read_meta(tag_dir: str) -> dict[str, Any]:
    path = os.path.join(tag_dir, COMPLETE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {tag_dir!r} is incomplete or damaged ({COMPLETE}: {e}): resume from another "
                         "checkpoint") from None


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete checkpoint tags in ckpt_dir, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and is_complete(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def latest_tag(ckpt_dir: str) -> Optional[str]:
    """The tag `latest` names, if that checkpoint is complete."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    return tag if tag and is_complete(os.path.join(ckpt_dir, tag)) else None


def find_resume(resume: Optional[str], out_dir: str) -> Optional[tuple[str, str]]:
    """(checkpoints dir, tag) to resume from, or None to start fresh.

    resume: None/"none" -> fresh; "auto" -> `latest` under out_dir/checkpoints (fresh when there is
    none); a path -> an out_dir, a checkpoints dir (with `latest`) or one step_* folder; a path
    without a complete checkpoint is a ValueError.
    """
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        d = checkpoint_dir(out_dir)
        tag = latest_tag(d)
        return (d, tag) if tag else None
    path = os.path.abspath(resume)
    if not os.path.isdir(path):
        raise ValueError(f"--resume {resume!r}: no such folder; pass 'auto', an output dir, its checkpoints/ folder "
                         "or one step_* checkpoint folder")
    if TAG_RE.match(os.path.basename(path)):
        if not is_complete(path):
            raise ValueError(f"--resume {resume!r}: this checkpoint is incomplete (no {COMPLETE}; its save was "
                             "interrupted): resume from the folder's `latest` instead")
        return os.path.dirname(path), os.path.basename(path)
    for d in (path, checkpoint_dir(path)):
        tag = latest_tag(d)
        if tag:
            return d, tag
    raise ValueError(f"--resume {resume!r}: no complete checkpoint there (no `latest` naming a folder with "
                     f"{COMPLETE}): pass an output dir of a run that saved, or --resume auto to start fresh")


# --------------------------------------------------------------------------- compatibility

def check_resume_config(saved: BluesConfig, current: BluesConfig) -> list[str]:
    """ValueError listing the fields that make the checkpoint unloadable; else the list of
    compatible changes ('name: old -> new') for the log."""
    problems = saved.architecture_diff(current)
    a, b = saved.to_dict(), current.to_dict()
    problems += [f"{k}: {a[k]!r} -> {b[k]!r}" for k in LAYOUT_FIELDS if a[k] != b[k]]
    if (a["moe_backend"] == "deepspeed") != (b["moe_backend"] == "deepspeed"):
        problems.append(f"moe_backend: {a['moe_backend']!r} -> {b['moe_backend']!r} (DeepSpeed's expert layout)")
    if problems:
        raise ValueError("cannot resume: the checkpoint was trained with another model layout; changed field(s): "
                         + "; ".join(problems))
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]


def check_resume(meta: dict[str, Any], current: BluesConfig, tokenizer_sha256: str, world_size: int,
                 stage: int) -> list[str]:
    """Everything a resume must agree on; returns the compatible config changes."""
    saved = BluesConfig.from_dict(meta["config"])
    changes = check_resume_config(saved, current)
    problems = []
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        problems.append(f"tokenizer sha256 {str(meta.get('tokenizer_sha256'))[:12]}... -> {tokenizer_sha256[:12]}...")
    if meta.get("world_size") != world_size:
        problems.append(f"world size {meta.get('world_size')} -> {world_size} (ranks)")
    if meta.get("zero_stage") != stage:
        problems.append(f"ZeRO stage {meta.get('zero_stage')} -> {stage}")
    if problems:
        raise ValueError("cannot resume: " + "; ".join(problems))
    return changes


# --------------------------------------------------------------------------- save / load

def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, out_dir: str, step: int, blues_state: dict[str, Any], meta: dict[str, Any],
         keep_last: int, _before_commit=None) -> str:
    """Save a checkpoint of `engine` at `step` (collective: every rank calls it). Returns its folder.

    blues_state: this rank's part of client_state["blues"] except the RNG (gathered here from every
    rank). meta: the JSON-able summary written to blues_complete.json.
    """
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    world = dist.get_world_size() if dist else 1
    rngs: list[Any] = [None] * world
    if dist:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs[0] = rng_state()
    d = checkpoint_dir(out_dir)
    tag = tag_for(step)
    state = dict(blues_state, rng=rngs)
    engine.save_checkpoint(d, tag=tag, client_state={"blues": state}, save_latest=False)
    if _before_commit is not None:
        _before_commit()  # tests: die here, with the files written and nothing committed
    if dist:
        dist.barrier()  # every rank has returned from its writes
    if rank == 0:
        _atomic_write(os.path.join(d, tag, COMPLETE), json.dumps(meta, indent=1, sort_keys=True))
        _atomic_write(os.path.join(d, LATEST), tag)
        for old in complete_tags(d)[:-keep_last]:
            if old != tag:
                shutil.rmtree(os.path.join(d, old), ignore_errors=True)
        for name in os.listdir(d):  # saves that were killed before completing: never resumed from
            m = TAG_RE.match(name)
            if m and int(m.group(1)) < step and not is_complete(os.path.join(d, name)):
                shutil.rmtree(os.path.join(d, name), ignore_errors=True)
    if dist:
        dist.barrier()
    return os.path.join(d, tag)


def load(engine, ckpt_dir: str, tag: str) -> dict[str, Any]:
    """Load weights and optimizer state into `engine`; returns client_state["blues"] (every rank)."""
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None or not client or "blues" not in client:
        raise ValueError(f"checkpoint {os.path.join(ckpt_dir, tag)!r} could not be loaded by DeepSpeed or holds no "
                         "Blues state")
    return client["blues"]


def restore_rng(blues_state: dict[str, Any], rank: int) -> None:
    rngs = blues_state["rng"]
    if rank >= len(rngs):
        raise ValueError(f"checkpoint holds RNG states of {len(rngs)} ranks; this is rank {rank}")
    set_rng_state(rngs[rank])
