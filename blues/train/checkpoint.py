"""Training checkpoints on DeepSpeed's save_checkpoint/load_checkpoint, made safe to interrupt.

Layout under <out_dir>/checkpoints/:
    step_00000100/          one DeepSpeed checkpoint (model, optimizer partitions, experts)
        blues_complete.json written by rank 0 after every rank has finished writing
    latest                  the tag of the newest complete checkpoint (DeepSpeed's file name)

Protocol: engine.save_checkpoint(save_latest=False) on every rank; a barrier; then rank 0 writes
blues_complete.json (with the size of every file of the checkpoint) and moves `latest` with an
atomic rename; then deletes complete checkpoints beyond keep_last. A save killed at any point leaves
`latest` on the previous complete checkpoint, and a folder without blues_complete.json is never
resumed from.

Where a run starts (find_resume):
- --resume auto (the default) or --resume FOLDER resumes from the folder's newest complete checkpoint.
  `latest` normally names it. When `latest` is missing, names a folder that is gone or incomplete,
  or names an older checkpoint than the newest complete one (a save killed between its marker and
  `latest`), one line says so and the newest complete checkpoint is used: starting from step 0
  instead would overwrite the complete checkpoints one by one.
- With no complete checkpoint, auto starts from step 0; an explicit folder is a ValueError that
  says what `latest` names there.
- A run never overwrites or deletes a complete checkpoint of a later step than its start (keep_last
  removes only older ones): a start that would (--resume none, or an older step_* folder, in an
  out_dir that holds later complete checkpoints) is refused with a message naming them.
- A checkpoint whose files differ from the sizes its marker records (truncated, missing), or that
  DeepSpeed cannot read, is a ValueError naming the file.
- A checkpoint written at another ep_size or world size resumes through blues.train.reshard (ZeRO 1/2
  at both ends; converted to DeepSpeed's universal layout on the fly); resume() lists what it refuses.

client_state (DeepSpeed's, in the checkpoint) carries {"blues": ...}: step, tokens seen, the
loader's state, every rank's python/numpy/torch(/cuda) RNG state, the Blues config, the
tokenizer's sha256, the balancing selection bias (blues.train.balance; None when off) and the
dead-expert counters (blues.train.revival; None when off).
blues_complete.json repeats the small part (no RNG) so a resume can check compatibility before
building anything.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import time
import zipfile
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from blues.common import atomic_write, atomic_write_json
from blues.train import balance, reshard, revival
from blues.train.distributed import barrier
from blues.train.ep_checkpoint import after_load, expert_group, full_state_dict, save_local_experts
from blues.train.resume_check import check_resume

if TYPE_CHECKING:
    from blues.train.engine import Run

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "blues_complete.json"
TAG_RE = re.compile(r"^step_(\d{8,})$")


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
    return sorted(tags, key=_step_of)


def _step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def _latest_name(ckpt_dir: str) -> Optional[str]:
    """What `latest` holds ('' when empty), None when there is no such file."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def latest_tag(ckpt_dir: str) -> Optional[str]:
    """The tag `latest` names, if that checkpoint is complete."""
    tag = _latest_name(ckpt_dir)
    return tag if tag and is_complete(os.path.join(ckpt_dir, tag)) else None


def _pick(ckpt_dir: str) -> tuple[Optional[str], Optional[str]]:
    """(tag to resume from in ckpt_dir or None, a note when that is not simply what `latest` names)."""
    named, tags = _latest_name(ckpt_dir), complete_tags(ckpt_dir)
    newest = tags[-1] if tags else None
    if named and is_complete(os.path.join(ckpt_dir, named)):
        if newest is None or not TAG_RE.match(named) or _step_of(named) >= _step_of(newest):
            return named, None
        why = f"`latest` names {named} but a later checkpoint is complete (its save ended before `latest` moved)"
    elif named is None:
        why = "there is no `latest` file"
    elif not named:
        why = "`latest` is empty"
    elif not os.path.isdir(os.path.join(ckpt_dir, named)):
        why = f"`latest` names {named}, which does not exist"
    else:
        why = f"`latest` names {named}, which is incomplete (no {COMPLETE}: its save was interrupted)"
    if newest is None:
        return None, f"{why}, and no checkpoint there is complete"
    return newest, (f"{why}; resuming from the newest complete checkpoint {newest} (complete: {', '.join(tags)})")


def find_resume(resume: Optional[str], out_dir: str,
                say: Optional[Callable[[str], None]] = None) -> Optional[tuple[str, str]]:
    """(checkpoints dir, tag) to resume from, or None to start fresh; see the module docstring.

    resume: None/"none" -> fresh; "auto" -> out_dir/checkpoints (fresh when nothing there is
    complete); a path -> an out_dir, a checkpoints dir or one step_* folder. ValueError for a path
    without a complete checkpoint, a checkpoint whose files are damaged, and a start that would
    overwrite a complete checkpoint in out_dir. say: where the one-line notes go (default: log)."""
    where = _find(resume, out_dir, say or log.warning)
    start = 0
    if where is not None:
        tag_dir = os.path.join(*where)
        bad = damaged_files(tag_dir)
        if bad:
            raise ValueError(f"checkpoint {tag_dir!r} is damaged: {'; '.join(bad)}: resume from another checkpoint")
        start = int(read_meta(tag_dir).get("step", _step_of(where[1]) if TAG_RE.match(where[1]) else 0))
    _refuse_overwrite(out_dir, start, where)
    return where


def _find(resume: Optional[str], out_dir: str, say: Callable[[str], None]) -> Optional[tuple[str, str]]:
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        d = checkpoint_dir(out_dir)
        tag, note = _pick(d)
        if note and (tag or _latest_name(d) is not None):  # a fresh out_dir needs no note
            say(f"--resume auto: {note}" + ("" if tag else ": starting from step 0"))
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
    d = next((d for d in (path, checkpoint_dir(path))
              if _latest_name(d) is not None or complete_tags(d)), checkpoint_dir(path))
    tag, note = _pick(d)
    if tag is None:
        raise ValueError(f"--resume {resume!r}: no complete checkpoint there ({note}; a complete checkpoint is a "
                         f"step_* folder with {COMPLETE}): pass an output dir of a run that saved, or --resume auto "
                         "to start fresh")
    if note:
        say(f"--resume {resume}: {note}")
    return d, tag


def _refuse_overwrite(out_dir: str, start: int, where: Optional[tuple[str, str]]) -> None:
    """ValueError when out_dir holds complete checkpoints of steps after `start`: this run would
    write its own over them (and keep_last would delete the rest)."""
    d = checkpoint_dir(out_dir)
    later = [t for t in complete_tags(d) if _step_of(t) > start]
    if later:
        src = f"resuming from {os.path.join(*where)}" if where else "starting from step 0 (--resume none)"
        raise ValueError(f"{src} would overwrite or delete the complete checkpoint(s) {', '.join(later)} in {d}: "
                         f"resume from the newest (--resume auto), move them away, or set out_dir to another folder")


def damaged_files(tag_dir: str, deep: bool = False) -> list[str]:
    """'file: what is wrong' for each file of the checkpoint whose size differs from what its marker
    records (or that is gone); deep=True also reads every .pt file's zip records (CRC checks)."""
    problems = []
    try:
        files = read_meta(tag_dir).get("files") or {}
    except ValueError:
        files = {}
    for rel, size in sorted(files.items()):
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{path} is truncated or damaged ({os.path.getsize(path):,} bytes; {size:,} were written)")
    if deep:
        for rel in sorted(_files_of(tag_dir)):
            path = os.path.join(tag_dir, rel)
            if rel.endswith(".pt") and not any(p.startswith(path + " ") for p in problems):
                why = _unreadable(path)
                if why:
                    problems.append(f"{path} is damaged ({why})")
    return problems


def _unreadable(path: str) -> Optional[str]:
    """Why torch.load could not read `path` (a zip file since torch 1.6), or None."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return f"record {bad} fails its CRC check" if bad else None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a readable torch file: {e}"


def _files_of(tag_dir: str) -> dict[str, int]:
    """relative path -> size of every file under tag_dir except the marker."""
    out = {}
    for root, _, names in os.walk(tag_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), tag_dir)
            if rel != COMPLETE:
                out[rel] = os.path.getsize(os.path.join(root, n))
    return out


# --------------------------------------------------------------------------- save / load

def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def save(engine, out_dir: str, step: int, blues_state: dict[str, Any], meta: dict[str, Any],
         keep_last: int, _before_commit=None, write_extra: Optional[Callable[[str], None]] = None) -> str:
    """Save a checkpoint of `engine` at `step` (collective: every rank calls it). Returns its folder.

    blues_state: this rank's part of client_state["blues"] except the RNG (gathered here from every
    rank). meta: the JSON-able summary written to blues_complete.json (with "files" added here).
    write_extra(tag_dir): called on every rank after DeepSpeed's writes, before the commit (its files
    are then part of the checkpoint). ValueError if a complete checkpoint of this step exists: it is
    never overwritten.
    """
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    world = dist.get_world_size() if dist else 1
    d = checkpoint_dir(out_dir)
    tag = tag_for(step)
    if is_complete(os.path.join(d, tag)):
        raise ValueError(f"refusing to overwrite the complete checkpoint {os.path.join(d, tag)!r}")
    rngs: list[Any] = [None] * world
    if dist:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs[0] = rng_state()
    state = dict(blues_state, rng=rngs)
    engine.save_checkpoint(d, tag=tag, client_state={"blues": state}, save_latest=False)
    if write_extra is not None:
        write_extra(os.path.join(d, tag))
    if _before_commit is not None:
        _before_commit()  # tests: die here, with the files written and nothing committed
    if dist:
        dist.barrier()  # every rank has returned from its writes
    if rank == 0:
        files = _files_of(os.path.join(d, tag))
        atomic_write_json(os.path.join(d, tag, COMPLETE), dict(meta, files=files), sort_keys=True)
        atomic_write(os.path.join(d, LATEST), tag)
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
    """Load weights and optimizer state into `engine`; returns client_state["blues"] (every rank).
    A file DeepSpeed cannot read is a ValueError naming it (not a traceback from inside DeepSpeed)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    try:
        path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    except Exception as e:
        bad = damaged_files(tag_dir, deep=True)
        if not bad:
            raise
        raise ValueError(f"checkpoint {tag_dir!r} cannot be loaded: {'; '.join(bad)} (DeepSpeed raised "
                         f"{type(e).__name__}): resume from another checkpoint") from None
    if path is None or not client or "blues" not in client:
        bad = damaged_files(tag_dir)
        raise ValueError(f"checkpoint {tag_dir!r} could not be loaded by DeepSpeed or holds no Blues state"
                         + (f" ({'; '.join(bad)})" if bad else ""))
    return client["blues"]


def restore_rng(blues_state: dict[str, Any], rank: int) -> None:
    rngs = blues_state["rng"]
    if rank >= len(rngs):
        raise ValueError(f"checkpoint holds RNG states of {len(rngs)} ranks; this is rank {rank}")
    set_rng_state(rngs[rank])


# --------------------------------------------------------------------------- a Run's checkpoints and export

def _blues_state(run: "Run") -> dict:
    return {"step": run.step, "tokens_seen": run.tokens_seen, "skipped_steps": run.skipped_steps,
            "loader": run.loader.state_dict() if run.loader is not None else None,
            "config": run.cfg.to_dict(), "tokenizer_sha256": run.tokenizer.sha256 if run.tokenizer else None,
            "balance_bias": balance.get_bias(run.model),  # (L, E) fp32, the same on every rank; None when off
            "dead_steps": revival.get_dead_steps(run.model)}  # (L, E) int64, the same on every rank; None when off


def save_checkpoint(run: "Run") -> str:
    """Save `run` at its current step (collective); returns the checkpoint folder."""
    meta = {"step": run.step, "tokens_seen": run.tokens_seen, "config": run.cfg.to_dict(),
            "tokenizer_sha256": run.tokenizer.sha256 if run.tokenizer else None,
            "world_size": run.dist.world_size, "zero_stage": run.stage, "time": time.time(),
            "expert_group": expert_group(run.cfg)}  # the experts' optimizer group (None: in the dense ones)
    kill = None
    if run.debug.kill_in_save_step == run.step and run.dist.rank == 1:
        kill = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731  test-only: a rank dies mid-save
    return save(run.engine, run.cfg.train.out_dir, run.step, _blues_state(run), meta, run.cfg.train.keep_last,
                _before_commit=kill, write_extra=lambda tag_dir: save_local_experts(run, tag_dir))


def resume(run: "Run", where: tuple[str, str]) -> list[str]:
    """Load the checkpoint (ckpt_dir, tag) into run; returns the compatible config changes."""
    d, tag = where
    meta = read_meta(os.path.join(d, tag))
    changes = check_resume(meta, run.cfg, run.tokenizer.sha256 if run.tokenizer else None,
                           run.dist.world_size, run.stage)
    same_world = meta.get("world_size") == run.dist.world_size
    if reshard.needs_reshard(meta, run.cfg, run.dist.world_size):  # another ep_size or world size
        with reshard.universal_copy(run, d, tag, meta, checkpoint_dir(run.cfg.train.out_dir)) as (ud, utag):
            state = load(run.engine, ud, utag)
    else:
        state = load(run.engine, d, tag)
    after_load(run, os.path.join(d, tag))  # expert parallelism: each EP rank's own experts back
    run.step, run.tokens_seen = int(state["step"]), int(state["tokens_seen"])
    run.skipped_steps = int(state.get("skipped_steps", 0))
    balance.restore_bias(run.model, state.get("balance_bias"))
    revival.restore_dead_steps(run.model, state.get("dead_steps"))
    if not same_world:
        return changes + reshard.restore_stream(run, state)  # the loader's position and the RNG, moved
    if run.loader is not None and state.get("loader") is not None:
        run.loader.load_state_dict(state["loader"])
    restore_rng(state, run.dist.rank)
    return changes


def export_weights(run: "Run", directory: str) -> Optional[str]:
    """save_pretrained into `directory` with every expert present (collective; rank 0 writes).

    ZeRO 3 partitions are gathered; experts are gathered from their expert-parallel ranks (stacked
    ones, and DeepSpeed MoE ones written in the stacked layout). The result loads with
    Blues.from_pretrained."""
    from blues.model import Blues
    model = run.model
    if run.cfg.moe.moe_backend != "deepspeed":
        sd = full_state_dict(run)
    else:
        from blues.moe.deepspeed_moe import stacked_state_dict
        sd = stacked_state_dict(model)
        if run.cfg.model.tie_embeddings:
            sd.pop("lm_head.weight", None)
    out = None
    if run.dist.rank == 0:
        export_cfg = run.cfg.replace(moe_backend="auto" if run.cfg.moe.moe_backend == "deepspeed"
                                     else run.cfg.moe.moe_backend, ep_size=1)
        fresh = Blues(export_cfg)
        fresh.load_weights({k: v.float() for k, v in sd.items()}, source="the trained model")
        fresh.save_pretrained(directory, tokenizer=run.tokenizer)
        out = directory
    barrier()
    return out
