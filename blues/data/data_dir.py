"""A prepared data_dir on disk: its files, its meta.json, and the rules that keep it whole.

A prepared data_dir holds:
    train.bin, val.bin    tokens as a flat numpy memmap (uint16 when the vocabulary fits, else uint32);
                          the documents of each split in source order, joined by <|endoftext|>
    tokenizer.tiktoken/.json   the tokenizer that made them (Tokenizer.load(data_dir) gives it back)
    meta.json             written last; a folder without it is not prepared data
    hf_cache/             the Hugging Face cache, when a dataset was read
    .prepare.lock         held while a prepare runs (one at a time per folder)
    .tmp-prepare-*        a running (or dead) prepare's files before they are moved into place

A reader trusts a folder only through load_meta(), which checks that meta.json is there, of this
format version, and that every token file has the size meta.json gives.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import uuid
from typing import Optional, Union

import numpy as np

from blues.common import fsync_dir
from blues.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "blues-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
LOCK_FILE = ".prepare.lock"
TMP_PREFIX = ".tmp-prepare-"
SPLITS = ("train", "val")


def token_dtype(n_vocab: int):
    """uint16 holds ids < 65536: half the disk and memory of uint32."""
    return np.uint16 if n_vocab <= 1 << 16 else np.uint32


# ----------------------------------------------------------------------------- meta.json

def read_meta(data_dir: str, fmt: str = FORMAT) -> Optional[dict]:
    """meta.json of `data_dir` when it holds data of format `fmt` (complete or not), else None."""
    try:
        with open(os.path.join(data_dir, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) and meta.get("format") == fmt else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def incomplete_reason(data_dir: str, meta: dict) -> Optional[str]:
    """Why the files do not match meta.json, or None when the prepared data is complete."""
    if meta.get("version") != FORMAT_VERSION:
        return f"meta.json has format version {meta.get('version')!r}, this Blues reads {FORMAT_VERSION}"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for info in meta["splits"].values():
        path = os.path.join(data_dir, info["file"])
        want = info["num_tokens"] * itemsize
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have != want:
            return (f"{path} has {'no file' if have is None else f'{have} bytes'} but meta.json says "
                    f"{info['num_tokens']} {meta['dtype']} tokens = {want} bytes")
    return None


def make_writable(data_dir: str) -> None:
    """Create `data_dir` and its lock file, or ValueError saying it cannot be written."""
    try:
        os.makedirs(data_dir, exist_ok=True)
        open(os.path.join(data_dir, LOCK_FILE), "a").close()
    except OSError as e:
        raise ValueError(f"data_dir {data_dir!r} is not writable ({e.strerror}): pass a --data_dir you "
                         f"can write to") from None


def load_meta(data_dir: str) -> dict:
    """meta.json of complete prepared data, or ValueError saying what to run."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir!r} does not exist: run blues-prepare --data_dir {data_dir}")
    meta = read_meta(data_dir)
    if meta is None:
        raise ValueError(f"data_dir {data_dir!r} holds no prepared data ({META_FILE} missing or unreadable): "
                         f"run blues-prepare --data_dir {data_dir}")
    reason = incomplete_reason(data_dir, meta)
    if reason:
        raise ValueError(f"data_dir {data_dir!r} is damaged: {reason}; re-run blues-prepare --data_dir "
                         f"{data_dir} --force")
    return meta


def check_tokenizer(tokenizer: Union[Tokenizer, str], data: Union[str, dict]) -> None:
    """ValueError unless `tokenizer` is the one the prepared data (a data_dir or its meta) was made with."""
    tok = Tokenizer.load(tokenizer)
    meta = load_meta(data) if isinstance(data, str) else data
    where = data if isinstance(data, str) else meta.get("data_dir", "the prepared data")
    m = meta["tokenizer"]
    if tok.fingerprint != m["fingerprint"]:
        raise ValueError(
            f"tokenizer {tok.name!r} ({tok.n_vocab} ids, sha256 {tok.sha256[:12]}...) does not match the data in "
            f"{where!r}, prepared with tokenizer {m['name']!r} ({m['n_vocab']} ids, sha256 {m['sha256'][:12]}...): "
            f"re-run blues-prepare with this tokenizer, or use the one saved there (Tokenizer.load({where!r}))")


# ----------------------------------------------------------------------------- writing one

def _hostname() -> str:
    return socket.gethostname().replace("-", "_")


def new_tmp_dir(data_dir: str) -> str:
    """A fresh temp folder inside data_dir, named by host and pid so that a later run can tell
    whether its maker is dead (remove_stale_tmp)."""
    tmp = os.path.join(data_dir, f"{TMP_PREFIX}{_hostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    return tmp


def remove_stale_tmp(data_dir: str) -> None:
    """Temp folders of runs on this host that died (their process is gone)."""
    prefix = f"{TMP_PREFIX}{_hostname()}-"
    for name in os.listdir(data_dir):
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(data_dir, name), ignore_errors=True)
        except (ValueError, PermissionError):
            pass


@contextlib.contextmanager
def locked(data_dir: str):
    """One prepare per data_dir at a time (ranks of one job may all call prepare). The folder must
    exist; the lock file is created in it."""
    import fcntl

    with open(os.path.join(data_dir, LOCK_FILE), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another blues-prepare on %s", data_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def commit(tmp: str, data_dir: str) -> None:
    """Move the finished files into data_dir: meta.json goes first out and last in, so that a run
    killed in between leaves a folder that does not look prepared."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(data_dir, META_FILE))
    for name in sorted(os.listdir(tmp)):
        if name != META_FILE:
            os.replace(os.path.join(tmp, name), os.path.join(data_dir, name))
    os.replace(os.path.join(tmp, META_FILE), os.path.join(data_dir, META_FILE))
    fsync_dir(data_dir)
