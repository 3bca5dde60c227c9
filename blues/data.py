"""Data pipeline: raw text -> token files -> training batches.

    blues-prepare --input_dir DIR --cache_dir DIR        # .txt .md .jsonl .json .parquet under DIR
    blues-prepare --dataset NAME [--subset S] [--split S] --cache_dir DIR   # Hugging Face datasets
    blues-prepare --cache_dir DIR                        # the built-in corpus (pydoc_data), offline

A prepared cache_dir holds:
    train.bin, val.bin    tokens as a flat numpy memmap (uint16 when the vocabulary fits, else uint32);
                          the documents of each split in source order, joined by <|endoftext|>
    tokenizer.tiktoken/.json   the tokenizer that made them (Tokenizer.load(cache_dir) gives it back)
    meta.json             written last; a folder without it is not a prepared cache
    hf_cache/             the Hugging Face cache, when --dataset was used

Documents: a .txt/.md file is one; a .jsonl line, a .json list item (or the file's one object) and
a .parquet row are one each, their text in --text_field (default "text"). Files are read in sorted
path order; names starting with "." are skipped. Invalid UTF-8 becomes U+FFFD and is counted.

prepare() reads everything twice: pass 1 checks every document (a bad line fails before any
tokenizing) and decides the train/val split; pass 2 tokenizes and writes into a temp folder that
is moved into place at the end. Same inputs (by content), tokenizer and split settings: the cache
is reused. TokenLoader then serves seeded, resumable, rank-disjoint batches from it.

Shapes: B batch, T block_size (tokens per training sequence).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import sys
import time
import uuid
from array import array
from collections import deque
from typing import Iterator, Optional, Union

import numpy as np

from blues.tokenizer import Tokenizer, network_available

log = logging.getLogger("blues.data")

FORMAT = "blues-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
INPUT_EXTENSIONS = (".txt", ".md", ".jsonl", ".json", ".parquet")
DEFAULT_SEED = 1337
HF_CACHE = "hf_cache"
# A chunk of documents sent to one worker: big enough that pickling and scheduling cost little
# next to tokenizing (about 13 MB/s per process here, so ~0.1 s per chunk), small enough to
# keep 2 per process in flight without much memory.
CHUNK_BYTES = 1 << 20
CHUNK_DOCS = 1024
FLUSH_TOKENS = 1 << 20


# ----------------------------------------------------------------------------- built-in corpus

def builtin_corpus() -> list[str]:
    """CPython's pydoc topics (pydoc_data.topics): ~465 KB of English in 79 documents on Python 3.11,
    present wherever Python is; its size varies by Python version."""
    from pydoc_data import topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def builtin_corpus_info() -> dict:
    docs = builtin_corpus()
    blob = json.dumps(docs).encode()
    return {"corpus": "pydoc_data.topics", "python": platform.python_version(), "documents": len(docs),
            "bytes": sum(len(d.encode()) for d in docs), "sha256": hashlib.sha256(blob).hexdigest()}


# ----------------------------------------------------------------------------- reading documents

def _decode_utf8(data: bytes) -> tuple[str, int]:
    """(text, number of invalid UTF-8 sequences replaced by U+FFFD)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # U+FFFD already in the input is b"\xef\xbf\xbd"; every other one in `text` is a replacement
        return text, text.count("\ufffd") - data.count(b"\xef\xbf\xbd")


def _clean_str(text: str) -> tuple[str, int]:
    """Lone surrogates (JSON can hold "\\ud800") become U+FFFD, as tiktoken would encode them."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed, fixed.count("\ufffd") - text.count("\ufffd")


def _doc_text(value, text_field: str, where: str) -> str:
    """The text of one record: a str, or a dict with `text_field` holding a str (None counts as empty)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if text_field not in value:
            fields = ", ".join(list(value)[:8]) or "none"
            raise ValueError(f"{where} has no field {text_field!r} (fields: {fields}): pass --text_field")
        text = value[text_field]
        if text is None:
            return ""
        if not isinstance(text, str):
            raise ValueError(f"{where} field {text_field!r} is a {type(text).__name__}, expected a string")
        return text
    raise ValueError(f"{where} is a JSON {type(value).__name__}: expected an object with a {text_field!r} "
                     f"field or a string")


def _iter_json_lines(lines, rel: str, text_field: str, bad_bytes) -> Iterator[tuple[str, str]]:
    """Documents of JSON Lines (bytes or str lines); blank lines are skipped."""
    for lineno, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            line, n_bad = _decode_utf8(raw)
            bad_bytes(n_bad)
        else:
            line = raw
        if not line.strip():
            continue
        where = f"{rel} line {lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e.msg} (column {e.colno})") from None
        text, n_bad = _clean_str(_doc_text(value, text_field, where))
        bad_bytes(n_bad)
        yield text, where


def _iter_file(path: str, rel: str, text_field: str, stats: dict) -> Iterator[tuple[str, str]]:
    """(text, where) for each document of one file; `stats` counts invalid UTF-8 replaced."""
    ext = os.path.splitext(path)[1].lower()

    def bad_bytes(n: int) -> None:
        if n:
            stats["invalid_utf8"] = stats.get("invalid_utf8", 0) + n
            stats.setdefault("invalid_utf8_files", [])
            if rel not in stats["invalid_utf8_files"]:
                stats["invalid_utf8_files"].append(rel)

    if ext in (".txt", ".md"):
        with open(path, "rb") as f:
            text, n_bad = _decode_utf8(f.read())
        bad_bytes(n_bad)
        yield text, rel
    elif ext == ".jsonl":
        with open(path, "rb") as f:
            yield from _iter_json_lines(f, rel, text_field, bad_bytes)
    elif ext == ".json":
        with open(path, "rb") as f:
            text, n_bad = _decode_utf8(f.read())
        bad_bytes(n_bad)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and e.lineno > 1:  # JSON Lines in a .json file, as datasets accepts
                yield from _iter_json_lines(text.splitlines(True), rel, text_field, bad_bytes)
                return
            raise ValueError(f"{rel} is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            where = f"{rel} item {i}" if isinstance(value, list) else rel
            text, n_bad = _clean_str(_doc_text(item, text_field, where))
            bad_bytes(n_bad)
            yield text, where
    elif ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends for a damaged file
            raise ValueError(f"{rel} is not a readable parquet file: {e}") from None
        names = pf.schema_arrow.names
        if text_field not in names:
            raise ValueError(f"{rel} has no column {text_field!r} (columns: {', '.join(names[:8])}): "
                             f"pass --text_field")
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                yield _doc_text({text_field: value}, text_field, f"{rel} row {row}"), f"{rel} row {row}"
                row += 1
    else:  # pragma: no cover - the file list holds only INPUT_EXTENSIONS
        raise AssertionError(path)


def list_input_files(input_dir: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every INPUT_EXTENSIONS file under `input_dir`, sorted; hidden names and `exclude` folders skipped."""
    if not os.path.exists(input_dir):
        raise ValueError(f"input_dir {input_dir!r} does not exist")
    if os.path.isfile(input_dir):
        if input_dir.lower().endswith(INPUT_EXTENSIONS):
            return [os.path.abspath(input_dir)]
        raise ValueError(f"input_dir {input_dir!r} is a file of a kind not read: expected a folder or a "
                         f"{', '.join(INPUT_EXTENSIONS)} file")
    exclude = tuple(os.path.abspath(e) for e in exclude)
    found, others = [], []
    for root, dirs, files in os.walk(os.path.abspath(input_dir)):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(root, d) not in exclude)
        for name in sorted(files):
            if name.startswith("."):
                continue
            (found if name.lower().endswith(INPUT_EXTENSIONS) else others).append(os.path.join(root, name))
    if not found and not others:
        raise ValueError(f"input_dir {input_dir!r} is empty: expected {', '.join(INPUT_EXTENSIONS)} files")
    if not found:
        example = os.path.relpath(others[0], input_dir)
        raise ValueError(f"input_dir {input_dir!r} has no {', '.join(INPUT_EXTENSIONS)} files "
                         f"({len(others)} other file(s), e.g. {example!r})")
    return sorted(found, key=lambda p: os.path.relpath(p, input_dir))


def iter_input_dir(input_dir: str, text_field: str = "text", stats: Optional[dict] = None,
                   exclude: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    """(text, where) for each document under `input_dir`, in a fixed order; empty documents included."""
    stats = {} if stats is None else stats
    base = input_dir if os.path.isdir(input_dir) else os.path.dirname(os.path.abspath(input_dir))
    for path in list_input_files(input_dir, exclude):
        yield from _iter_file(path, os.path.relpath(path, base), text_field, stats)


# ----------------------------------------------------------------------------- sources

class _BuiltinSource:
    kind = "builtin"

    def describe(self) -> dict:
        return {"kind": self.kind, **builtin_corpus_info()}

    def fingerprint(self) -> str:
        return builtin_corpus_info()["sha256"]

    def documents(self, stats: dict) -> Iterator[tuple[str, str]]:
        from pydoc_data import topics

        for key in sorted(topics.topics):
            yield topics.topics[key], f"pydoc_data.topics[{key!r}]"

    def environment(self):
        return contextlib.nullcontext()


class _DirSource:
    kind = "input_dir"

    def __init__(self, input_dir: str, text_field: str, exclude: tuple[str, ...]):
        self.input_dir = os.path.abspath(input_dir)
        self.text_field = text_field
        self.exclude = exclude
        self.files = list_input_files(input_dir, exclude)
        self.base = self.input_dir if os.path.isdir(self.input_dir) else os.path.dirname(self.input_dir)

    def describe(self) -> dict:
        return {"kind": self.kind, "input_dir": self.input_dir, "num_files": len(self.files),
                "bytes": sum(os.path.getsize(p) for p in self.files), "text_field": self.text_field}

    def fingerprint(self) -> str:
        """Content, not mtimes: a copied or touched folder keeps its cache. Hashing reads ~1 GB/s,
        about 100x faster than tokenizing, so checking a cache costs little next to building one."""
        h = hashlib.sha256()
        for path in self.files:
            fh = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    fh.update(block)
            h.update(json.dumps([os.path.relpath(path, self.base), fh.hexdigest()]).encode())
        return h.hexdigest()

    def documents(self, stats: dict) -> Iterator[tuple[str, str]]:
        for path in self.files:
            yield from _iter_file(path, os.path.relpath(path, self.base), self.text_field, stats)

    def environment(self):
        return contextlib.nullcontext()


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def _hf_environment(hf_cache: str, offline: bool):
    """Keep the Hugging Face caches in `hf_cache` and, offline, set HF_DATASETS_OFFLINE=1 and
    HF_HUB_OFFLINE=1 so nothing waits on a request. Both libraries read these variables once, at
    import, so we set their module constants too (the variables reach child processes); all is
    restored on exit."""
    # imported here, before any change, so that what they read at import is this process's own
    # setting and is what gets restored
    import datasets.config  # noqa: F401
    import huggingface_hub.constants  # noqa: F401

    env = {"HF_HUB_CACHE": os.path.join(hf_cache, "hub"), "HF_DATASETS_CACHE": hf_cache}
    if offline:
        env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    saved_env = {k: os.environ.get(k) for k in env}
    saved_attrs = []
    os.environ.update(env)
    try:
        patches = [("huggingface_hub.constants", "HF_HUB_CACHE", env["HF_HUB_CACHE"])]
        if offline:
            patches += [("huggingface_hub.constants", "HF_HUB_OFFLINE", True),
                        ("datasets.config", "HF_HUB_OFFLINE", True),
                        ("datasets.config", "HF_DATASETS_OFFLINE", True)]
        for module_name, attr, value in patches:
            module = sys.modules[module_name]
            if hasattr(module, attr):
                saved_attrs.append((module, attr, getattr(module, attr)))
                setattr(module, attr, value)
        yield
    finally:
        for module, attr, value in reversed(saved_attrs):
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _DatasetSource:
    kind = "dataset"

    def __init__(self, name: str, subset: Optional[str], split: str, text_field: str, hf_cache: str):
        self.name, self.subset, self.split, self.text_field, self.hf_cache = name, subset, split, text_field, hf_cache
        self.local = os.path.exists(name)
        if not self.local and name.startswith(("/", "./", "../", "~")):
            raise ValueError(f"dataset {name!r} looks like a path but does not exist")
        if self.local:
            self.offline = True  # nothing to fetch; offline mode also skips the hub lookup
        elif _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE")):
            self.offline = True
        else:
            host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
            self.offline = not network_available(host.split(":")[0])
        with self.environment():
            self.ds = self._load()
        if text_field not in self.ds.column_names:
            raise ValueError(f"dataset {name!r} split {split!r} has no field {text_field!r} "
                             f"(fields: {', '.join(self.ds.column_names[:8])}): pass --text_field")

    def environment(self):
        return _hf_environment(self.hf_cache, self.offline)

    def _load(self):
        import datasets

        # progress bars only on a terminal (datasets draws them on any stderr)
        quiet = not sys.stderr.isatty() and not datasets.are_progress_bars_disabled()
        if quiet:
            datasets.disable_progress_bars()
        try:
            return self._load_dataset(datasets)
        finally:
            if quiet:
                datasets.enable_progress_bars()

    def _load_dataset(self, datasets):
        name = self.name
        try:
            if self.local and os.path.isdir(name) and any(
                    os.path.isfile(os.path.join(name, f)) for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
                ds = datasets.load_from_disk(name)  # a folder written by save_to_disk
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise ValueError(f"dataset {name!r} has no split {self.split!r} (splits: {', '.join(ds)})")
                    ds = ds[self.split]
                return ds
            return datasets.load_dataset(name, self.subset, split=self.split, cache_dir=self.hf_cache)
        except ValueError as e:  # unknown subset / split
            raise ValueError(f"dataset {name!r}: {' '.join(str(e).split())}") from None
        except (ConnectionError, FileNotFoundError, OSError) as e:
            first = " ".join(str(e).split())[:300]
            if self.offline and not self.local:
                raise ValueError(f"dataset {name!r} cannot be reached offline: no network, so "
                                 f"HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 were set, and it is not in "
                                 f"{self.hf_cache} ({first}); run once with network or pass a local folder") from None
            raise ValueError(f"dataset {name!r} cannot be loaded: {first}") from None
        except Exception as e:  # datasets' own errors (DatasetNotFoundError, ...) derive from Exception
            raise ValueError(f"dataset {name!r} cannot be loaded: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}") from None

    def describe(self) -> dict:
        return {"kind": self.kind, "dataset": self.name, "subset": self.subset, "split": self.split,
                "text_field": self.text_field, "num_rows": len(self.ds)}

    def fingerprint(self) -> str:
        # datasets' own fingerprint of the table (a hash of its files and of the transforms applied)
        fp = getattr(self.ds, "_fingerprint", None) or json.dumps(sorted(str(c) for c in self.ds.cache_files))
        return hashlib.sha256(json.dumps([self.subset, self.split, self.text_field, fp]).encode()).hexdigest()

    def documents(self, stats: dict) -> Iterator[tuple[str, str]]:
        row = 0
        for batch in self.ds.select_columns([self.text_field]).iter(batch_size=1000):
            for value in batch[self.text_field]:
                where = f"dataset {self.name!r} row {row}"
                text, n_bad = _clean_str(_doc_text({self.text_field: value}, self.text_field, where))
                if n_bad:
                    stats["invalid_utf8"] = stats.get("invalid_utf8", 0) + n_bad
                yield text, where
                row += 1


# ----------------------------------------------------------------------------- tokenizing

_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_docs(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of `texts` back to back (uint32) and each one's length (int64)."""
    arrays = [tokenizer.encode_to_numpy(t) for t in texts]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint32)
    return flat.astype(np.uint32, copy=False), lengths


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_TOKENIZER is not None
    return _encode_docs(_WORKER_TOKENIZER, texts)


def _chunks(docs: Iterator[tuple[str, str]]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text, _ in docs:
        if not text:
            continue
        chunk.append(text)
        size += len(text)
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(tokenizer: Tokenizer, chunks: Iterator[list[str]], num_proc: int):
    """(texts, flat, lengths) in input order; with num_proc > 1 from spawned worker processes
    (spawn, not fork: tiktoken keeps threads), at most 2 chunks per process in flight."""
    if num_proc == 1:
        for texts in chunks:
            yield (texts, *_encode_docs(tokenizer, texts))
        return
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,))
    try:
        pending: deque = deque()
        for texts in chunks:
            pending.append((texts, pool.apply_async(_worker_encode, (texts,))))
            if len(pending) >= 2 * num_proc:
                texts0, res = pending.popleft()
                yield (texts0, *res.get())
        while pending:
            texts0, res = pending.popleft()
            yield (texts0, *res.get())
        pool.close()
        pool.join()
    finally:
        pool.terminate()


class _SplitWriter:
    """Appends documents to one split's token file, <|endoftext|> between documents."""

    def __init__(self, path: str, dtype, eot_id: int):
        self.path, self.dtype, self.eot = path, dtype, np.array([eot_id], dtype=dtype)
        self.f = open(path, "wb")
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.num_tokens = 0
        self.num_documents = 0

    def add(self, ids: np.ndarray) -> None:
        if self.num_documents:
            self.buf.append(self.eot)
        self.buf.append(ids.astype(self.dtype, copy=False))
        self.buffered += len(ids) + (1 if self.num_documents else 0)
        self.num_documents += 1
        if self.buffered >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            block = np.concatenate(self.buf)
            self.f.write(block.tobytes())
            self.num_tokens += len(block)
        self.buf, self.buffered = [], 0

    def close(self) -> None:
        self.flush()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


# ----------------------------------------------------------------------------- cache bookkeeping

def token_dtype(n_vocab: int):
    """uint16 holds ids < 65536: half the disk and memory of uint32."""
    return np.uint16 if n_vocab <= 1 << 16 else np.uint32


def _read_meta(cache_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(cache_dir, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _incomplete_reason(cache_dir: str, meta: dict) -> Optional[str]:
    """Why the files do not match meta.json, or None when the cache is complete."""
    if meta.get("version") != FORMAT_VERSION:
        return f"meta.json has format version {meta.get('version')!r}, this Blues reads {FORMAT_VERSION}"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, info in meta["splits"].items():
        path = os.path.join(cache_dir, info["file"])
        want = info["num_tokens"] * itemsize
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have != want:
            return (f"{path} has {'no file' if have is None else f'{have} bytes'} but meta.json says "
                    f"{info['num_tokens']} {meta['dtype']} tokens = {want} bytes")
    return None


def load_meta(data_dir: str) -> dict:
    """meta.json of a complete prepared cache, or ValueError saying what to run."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir!r} does not exist: run blues-prepare --cache_dir {data_dir}")
    meta = _read_meta(data_dir)
    if meta is None:
        raise ValueError(f"data_dir {data_dir!r} holds no prepared data ({META_FILE} missing or unreadable): "
                         f"run blues-prepare --cache_dir {data_dir}")
    reason = _incomplete_reason(data_dir, meta)
    if reason:
        raise ValueError(f"data_dir {data_dir!r} is damaged: {reason}; re-run blues-prepare --cache_dir "
                         f"{data_dir} --force")
    return meta


def check_tokenizer(tokenizer: Union[Tokenizer, str], data: Union[str, dict]) -> None:
    """ValueError unless `tokenizer` is the one the prepared data (a data_dir or its meta) was made with."""
    tok = Tokenizer.load(tokenizer)
    meta = load_meta(data) if isinstance(data, str) else data
    where = data if isinstance(data, str) else meta.get("cache_dir", "the prepared data")
    m = meta["tokenizer"]
    if tok.fingerprint != m["fingerprint"]:
        raise ValueError(
            f"tokenizer {tok.name!r} ({tok.n_vocab} ids, sha256 {tok.sha256[:12]}...) does not match the data in "
            f"{where!r}, prepared with tokenizer {m['name']!r} ({m['n_vocab']} ids, sha256 {m['sha256'][:12]}...): "
            f"re-run blues-prepare with this tokenizer, or use the one saved there (Tokenizer.load({where!r}))")


def _hostname() -> str:
    return socket.gethostname().replace("-", "_")


def _remove_stale_tmp(cache_dir: str) -> None:
    """Temp folders of runs on this host that died (their process is gone)."""
    prefix = f".tmp-prepare-{_hostname()}-"
    for name in os.listdir(cache_dir):
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
        except (ValueError, PermissionError):
            pass


@contextlib.contextmanager
def _locked(cache_dir: str):
    """One prepare per cache_dir at a time (ranks of one job may all call prepare)."""
    import fcntl

    with open(os.path.join(cache_dir, ".prepare.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another blues-prepare on %s", cache_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _split_value(text: str, key: bytes) -> float:
    """A uniform number in [0, 1) from the document's content: duplicates land in the same split and
    the order of files does not matter."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


# ----------------------------------------------------------------------------- prepare

def prepare(cache_dir: str = "data_cache", input_dir: Optional[str] = None, dataset: Optional[str] = None,
            subset: Optional[str] = None, split: str = "train", text_field: str = "text",
            tokenizer: Union[str, Tokenizer] = "default", num_proc: int = 1, val_fraction: float = 0.05,
            seed: int = DEFAULT_SEED, vocab_size: Optional[int] = None, allow_smaller: bool = False,
            force: bool = False, progress: Optional[bool] = None) -> dict:
    """Tokenize a folder, a Hugging Face dataset or (neither given) the built-in corpus into `cache_dir`.

    Returns the meta dict (also in cache_dir/meta.json), with "reused": True when the cache already
    held these inputs prepared this way (same fingerprint) and nothing was tokenized.
    vocab_size: train a new tokenizer of this size on the train split instead of using `tokenizer`.
    A run that fails or dies leaves no meta.json for its inputs: the cache never looks complete.
    """
    t_start = time.perf_counter()
    if input_dir is not None and dataset is not None:
        raise ValueError(f"input_dir={input_dir!r} and dataset={dataset!r} are both given: pass one of them")
    if not isinstance(num_proc, int) or isinstance(num_proc, bool) or num_proc < 1:
        raise ValueError(f"num_proc={num_proc!r} is invalid: expected an integer >= 1")
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: expected a number in [0, 1)")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field={text_field!r} is invalid: expected a field name")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} is invalid: expected an integer")
    if vocab_size is not None and not (isinstance(tokenizer, str) and tokenizer == "default"):
        raise ValueError(f"vocab_size={vocab_size!r} trains a new tokenizer, so tokenizer={tokenizer!r} would be "
                         f"ignored: pass one of them")
    cache_dir = os.path.abspath(cache_dir)
    tok = None if vocab_size is not None else Tokenizer.load(tokenizer)

    source: Union[_BuiltinSource, _DirSource, _DatasetSource]
    if input_dir is not None:
        source = _DirSource(input_dir, text_field, exclude=(cache_dir,))
    elif dataset is None:
        source = _BuiltinSource()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        open(os.path.join(cache_dir, ".prepare.lock"), "a").close()
    except OSError as e:
        raise ValueError(f"cache_dir {cache_dir!r} is not writable ({e.strerror}): pass a --cache_dir you "
                         f"can write to") from None

    with _locked(cache_dir):
        if dataset is not None:
            source = _DatasetSource(dataset, subset, split, text_field, os.path.join(cache_dir, HF_CACHE))
        with source.environment():
            tok_id = ({"train_vocab_size": vocab_size, "allow_smaller": allow_smaller} if tok is None
                      else tok.fingerprint)
            fingerprint = hashlib.sha256(json.dumps(
                [FORMAT, FORMAT_VERSION, source.kind, source.fingerprint(),
                 text_field if source.kind != "builtin" else None, tok_id, val_fraction, seed]).encode()).hexdigest()
            old = _read_meta(cache_dir)
            if (not force and old is not None and old.get("fingerprint") == fingerprint
                    and _incomplete_reason(cache_dir, old) is None):
                log.info("reusing %s: prepared from the same inputs (fingerprint %s)", cache_dir, fingerprint[:12])
                return {**old, "reused": True}
            _remove_stale_tmp(cache_dir)
            meta = _build(cache_dir, source, tok, fingerprint, text_field=text_field, num_proc=num_proc,
                          val_fraction=val_fraction, seed=seed, vocab_size=vocab_size,
                          allow_smaller=allow_smaller, progress=progress)
    meta["build_seconds"] = round(time.perf_counter() - t_start, 3)
    return {**meta, "reused": False}


def ensure_prepared(data_dir: str, **kwargs) -> dict:
    """The meta of the data already prepared in `data_dir`, whatever its inputs; when there is none,
    prepare it (by default from the built-in corpus). For a training entry: prepare(data_dir) alone
    would replace a user's prepared folder with the built-in corpus, whose fingerprint differs."""
    try:
        return {**load_meta(data_dir), "reused": True}
    except ValueError:
        return prepare(cache_dir=data_dir, **kwargs)


def _build(cache_dir: str, source, tok: Optional[Tokenizer], fingerprint: str, *, text_field: str,
           num_proc: int, val_fraction: float, seed: int, vocab_size: Optional[int], allow_smaller: bool,
           progress: Optional[bool]) -> dict:
    t0 = time.perf_counter()
    key = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()  # any int as a blake2b key
    # Pass 1: read and check every document before anything is tokenized, decide the split.
    # 16 bytes a document (typed arrays, not lists of Python numbers): 100M documents fit in 1.6 GB.
    stats: dict = {}
    values, sizes, num_empty = array("d"), array("q"), 0
    for text, _where in source.documents(stats):
        if not text:
            num_empty += 1
            continue
        values.append(_split_value(text, key))
        sizes.append(len(text))
    num_docs = len(values)
    if num_docs == 0:
        raise ValueError(f"the input has no non-empty documents ({num_empty} empty)")
    if val_fraction > 0 and num_docs < 2:
        raise ValueError("the input has 1 document but a train/val split by document needs at least 2: add "
                         "documents (files, or lines of a .jsonl) or pass val_fraction=0 (--val_fraction 0)")
    # Validation: whole documents, taken in the order of their content hash until they hold
    # val_fraction of the text, skipping any that would overshoot it by more than 25%. On the
    # built-in corpus (79 documents of 0.2 to 62 KB) over 200 seeds this holds out 5.0% to 6.2% of
    # the text; holding out 5% of the documents instead gave 0.2% to 26%.
    is_val = np.zeros(num_docs, dtype=bool)
    target, held = val_fraction * float(sum(sizes)), 0
    order = np.argsort(np.asarray(values), kind="stable")
    if val_fraction > 0:
        for i in order:
            if held >= target:
                break
            if held + sizes[i] <= 1.25 * target:
                is_val[i] = True
                held += sizes[i]
        if not is_val.any():
            is_val[order[0]] = True  # every document is bigger than the share: still one
    if is_val.all():
        is_val[order[-1]] = False  # keep one document to train on
    if stats.get("invalid_utf8"):
        files = stats.get("invalid_utf8_files", [])
        log.warning("replaced %d invalid UTF-8 sequence(s) with U+FFFD%s", stats["invalid_utf8"],
                    f" in {len(files)} file(s): {', '.join(files[:5])}" if files else "")

    read_seconds = time.perf_counter() - t0
    tmp = os.path.join(cache_dir, f".tmp-prepare-{_hostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    writers: dict[str, _SplitWriter] = {}
    try:
        os.makedirs(tmp)
        if tok is None:
            from blues.tokenizer import train_tokenizer

            train_docs = (t for i, t in enumerate(t for t, _ in source.documents({}) if t) if not is_val[i])
            tok = train_tokenizer(train_docs, vocab_size, name=f"trained-{vocab_size}-{fingerprint[:8]}",
                                  allow_smaller=allow_smaller)
            log.info("trained tokenizer %s: n_vocab=%d (asked %d)", tok.name, tok.n_vocab, vocab_size)
        dtype = token_dtype(tok.n_vocab)
        writers = {s: _SplitWriter(os.path.join(tmp, f"{s}.bin"), dtype, tok.eot_id) for s in SPLITS}

        from tqdm import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        t_tokenize = time.perf_counter()
        total_chars = int(sum(sizes))
        doc_index = 0
        with tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing", disable=not show,
                  file=sys.stderr) as bar:
            # Pass 2: tokenize (in num_proc processes) and append each document to its split.
            encoded = _encoded_chunks(tok, _chunks(source.documents({})), num_proc)
            with contextlib.closing(encoded):  # the worker pool ends on errors too
                for texts, flat, lengths in encoded:
                    ends = np.cumsum(lengths)
                    for j, text in enumerate(texts):
                        if doc_index >= num_docs or sizes[doc_index] != len(text):
                            raise ValueError("the input changed while it was being prepared: run again")
                        a = int(ends[j] - lengths[j])
                        writers["val" if is_val[doc_index] else "train"].add(flat[a:int(ends[j])])
                        doc_index += 1
                    bar.update(sum(len(t) for t in texts))
        if doc_index != num_docs:
            raise ValueError("the input changed while it was being prepared: run again")
        for w in writers.values():
            w.close()
        tokenize_seconds = time.perf_counter() - t_tokenize
        tok.save(tmp)
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint,
            "build_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cache_dir": cache_dir,
            "source": source.describe(),
            "tokenizer": {"name": tok.name, "sha256": tok.sha256, "fingerprint": tok.fingerprint,
                          "n_vocab": tok.n_vocab, "eot_id": tok.eot_id, "files": ["tokenizer.tiktoken", "tokenizer.json"]},
            "vocab_size": tok.n_vocab,
            "dtype": np.dtype(dtype).name,
            "separator": "<|endoftext|> between documents",
            "val_fraction": val_fraction, "seed": seed,
            "num_documents": num_docs, "num_empty_documents": num_empty,
            "num_chars": total_chars,
            "num_tokens": sum(w.num_tokens for w in writers.values()),
            "invalid_utf8_replaced": int(stats.get("invalid_utf8", 0)),
            "splits": {s: {"file": f"{s}.bin", "num_tokens": w.num_tokens, "num_documents": w.num_documents}
                       for s, w in writers.items()},
            "num_proc": num_proc,
            "read_seconds": round(read_seconds, 3),  # pass 1: read and check every document
            "tokenize_seconds": round(tokenize_seconds, 3),  # pass 2: read again, tokenize, write
        }
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        _commit(tmp, cache_dir)
        return meta
    finally:
        for w in writers.values():
            w.f.close()  # a no-op after close(); on errors, before the folder goes
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: str, cache_dir: str) -> None:
    """Move the finished files into cache_dir: meta.json goes first out and last in, so that a run
    killed in between leaves a folder that does not look prepared."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(cache_dir, META_FILE))
    for name in sorted(os.listdir(tmp)):
        if name != META_FILE:
            os.replace(os.path.join(tmp, name), os.path.join(cache_dir, name))
    os.replace(os.path.join(tmp, META_FILE), os.path.join(cache_dir, META_FILE))
    fd = os.open(cache_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- loader

class TokenLoader:
    """Batches of windows of block_size + 1 tokens from one split of a prepared cache.

    Training (next_batch): each epoch cuts the split into windows of T + 1 tokens at a random offset,
    shuffles them (seeded by seed and epoch) and deals them to ranks like cards: rank r takes
    windows r, r + W, r + 2W, ... of the shuffled list, so ranks never share a token in an epoch
    and all ranks run the same number of batches per epoch. The state is (epoch, position):
    load_state_dict(state_dict()) resumes exactly, in any process, on any rank (ranks move in step).
    Evaluation (eval_batches): windows from the start of the split, dealt to ranks the same way.
    """

    def __init__(self, data_dir: str, split: str, block_size: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, tokenizer: Union[None, str, Tokenizer] = None):
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} is invalid: expected 0 <= rank < world_size={world_size}")
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: expected one of {', '.join(SPLITS)}")
        self.data_dir, self.split = data_dir, split
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.meta = load_meta(data_dir)
        if tokenizer is not None:
            check_tokenizer(tokenizer, self.meta)
        info = self.meta["splits"][split]
        self.num_tokens = n = info["num_tokens"]
        window = block_size + 1
        if n < window * world_size:
            hint = (f" (prepared with val_fraction={self.meta['val_fraction']})" if n == 0 else "")
            raise ValueError(f"split {split!r} of {data_dir!r} has {n} tokens{hint}: too few for "
                             f"block_size={block_size} on {world_size} rank(s), which needs (block_size + 1) * "
                             f"world_size = {window * world_size}; prepare more data or lower block_size")
        self.tokens = np.memmap(os.path.join(data_dir, info["file"]), dtype=self.meta["dtype"], mode="r")
        self.epoch, self.pos, self.batches = 0, 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_starts(self, epoch: int) -> np.ndarray:
        """Start offsets of this rank's windows in `epoch`, in the order they are served."""
        if self._order_epoch != epoch:
            T1, W, n = self.block_size + 1, self.world_size, self.num_tokens
            rng = np.random.default_rng([self.seed, epoch, SPLITS.index(self.split)])
            offset = int(rng.integers(0, min(T1 - 1, n - T1 * W) + 1))
            num = (n - offset) // T1
            perm = rng.permutation(num)
            mine = perm[self.rank::W][: num // W]  # equal length on every rank
            self._order, self._order_epoch = offset + mine.astype(np.int64) * T1, epoch
        return self._order

    def _gather(self, starts: np.ndarray):
        import torch

        idx = starts[:, None] + np.arange(self.block_size + 1)  # (B, T+1)
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))  # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:]  # x (B, T), y (B, T)

    def next_batch(self):
        """(x, y) int64 of shape (batch_size, block_size), y = x shifted left by one token."""
        starts: list[np.ndarray] = []
        need = self.batch_size
        while need:
            order = self._epoch_starts(self.epoch)
            take = order[self.pos: self.pos + need]
            starts.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        self.batches += 1
        return self._gather(np.concatenate(starts))

    def state_dict(self) -> dict:
        """Plain ints and strings (JSON-able): where the stream is, and what it must be resumed with."""
        return {"epoch": self.epoch, "pos": self.pos, "batches": self.batches, "seed": self.seed,
                "split": self.split, "block_size": self.block_size, "world_size": self.world_size,
                "data_fingerprint": self.meta["fingerprint"]}

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "split", "block_size", "world_size"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"loader state has {name}={state.get(name)!r} but this loader has "
                                 f"{name}={getattr(self, name)!r}: the stream cannot be resumed exactly; "
                                 f"use the saved {name}")
        if state.get("data_fingerprint") != self.meta["fingerprint"]:
            raise ValueError(f"loader state was saved on data with fingerprint {str(state.get('data_fingerprint'))[:12]} "
                             f"but {self.data_dir!r} holds {self.meta['fingerprint'][:12]}: the data was re-prepared "
                             f"from other inputs, so the stream cannot be resumed exactly")
        self.epoch, self.pos, self.batches = int(state["epoch"]), int(state["pos"]), int(state.get("batches", 0))

    def num_eval_batches(self, num_batches: int) -> int:
        per_rank = (self.num_tokens // (self.block_size + 1)) // self.world_size
        return max(1, min(num_batches, per_rank // self.batch_size))

    def eval_batches(self, num_batches: int):
        """Up to `num_batches` batches of consecutive windows from the start of the split, the same
        every call, as many on every rank (when fewer windows than one batch, one smaller batch)."""
        T1, W = self.block_size + 1, self.world_size
        per_rank = (self.num_tokens // T1) // W
        starts = (self.rank + W * np.arange(per_rank, dtype=np.int64)) * T1
        for b in range(self.num_eval_batches(num_batches)):
            yield self._gather(starts[b * self.batch_size: (b + 1) * self.batch_size])


# ----------------------------------------------------------------------------- CLI

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="blues-prepare",
        description="Tokenize text into a cache folder for blues-train: a folder of files, a Hugging Face "
                    "dataset, or (with neither) the built-in corpus.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input_dir", help=f"read every {', '.join(INPUT_EXTENSIONS)} file under this folder")
    src.add_argument("--dataset", help="a Hugging Face dataset: a hub name, or a local folder")
    p.add_argument("--subset", default=None, help="dataset configuration name")
    p.add_argument("--split", default="train", help="dataset split to read (default: train)")
    p.add_argument("--text_field", default="text", help="field holding the text in .jsonl/.json/.parquet and datasets")
    p.add_argument("--cache_dir", default="data_cache", help="where the prepared data goes (default: data_cache)")
    p.add_argument("--tokenizer", default="default",
                   help="'default', a tiktoken name (gpt2, cl100k_base, o200k_base) or a tokenizer folder/file")
    p.add_argument("--vocab_size", type=int, default=None, help="train a tokenizer of this size on the train split instead")
    p.add_argument("--allow_smaller", action="store_true", help="with --vocab_size: keep what the corpus reaches")
    p.add_argument("--num_proc", type=int, default=1, help="tokenizing processes (default: 1)")
    p.add_argument("--val_fraction", type=float, default=0.05,
                   help="share of the text held out for validation, as whole documents (default: 0.05)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the train/val split")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache matches the inputs")
    p.add_argument("--check", action="store_true",
                   help="build nothing: check that cache_dir is complete and was made with --tokenizer")
    args = p.parse_args(argv)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("blues-prepare: %(message)s"))
    root = logging.getLogger("blues")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        if args.check:
            meta = load_meta(args.cache_dir)
            check_tokenizer(args.tokenizer, args.cache_dir)
            print(f"{args.cache_dir}: complete, {meta['num_tokens']:,} tokens, tokenizer "
                  f"{meta['tokenizer']['name']} ({meta['vocab_size']} ids) matches {args.tokenizer!r}")
            return 0
        meta = prepare(cache_dir=args.cache_dir, input_dir=args.input_dir, dataset=args.dataset,
                       subset=args.subset, split=args.split, text_field=args.text_field,
                       tokenizer=args.tokenizer, num_proc=args.num_proc, val_fraction=args.val_fraction,
                       seed=args.seed, vocab_size=args.vocab_size, allow_smaller=args.allow_smaller,
                       force=args.force)
        sp = meta["splits"]
        what = "reused" if meta["reused"] else f"prepared in {meta['build_seconds']:.2f} s"
        print(f"{what}: {meta['num_tokens']:,} tokens ({sp['train']['num_tokens']:,} train / "
              f"{sp['val']['num_tokens']:,} val) from {meta['num_documents']:,} documents, tokenizer "
              f"{meta['tokenizer']['name']} ({meta['vocab_size']} ids, {meta['dtype']}) -> {meta['cache_dir']}")
        return 0
    except ValueError as e:
        print(f"blues-prepare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions mid-run, ...
        print(f"blues-prepare: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("blues-prepare: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
