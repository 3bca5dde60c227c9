"""Raw text -> a prepared data_dir: prepare() and ensure_prepared().

    prepare(data_dir, input_dir=DIR)            # .txt .md .jsonl .json .parquet under DIR
    prepare(data_dir, dataset=NAME, subset=S, split=S)   # a Hugging Face dataset (hub or local folder)
    prepare(data_dir)                           # the built-in corpus (the stdlib's source + pydoc), offline
    prepare(data_dir, corpus="pydoc")           # the small built-in corpus (pydoc topics only)

prepare() reads everything twice: pass 1 checks every document (a bad line fails before any
tokenizing) and decides the train/val split; pass 2 tokenizes (in num_proc processes) and writes
into a temp folder that is moved into place at the end (blues.data.data_dir: the folder's layout).
Same inputs (by content), tokenizer and split settings: the prepared data is reused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from array import array
from collections import deque
from typing import Iterator, Optional, Union

import numpy as np

from blues.common import atomic_write_json
from blues.data.data_dir import (
    FORMAT,
    FORMAT_VERSION,
    LOCK_FILE,
    META_FILE,
    SPLITS,
    commit,
    incomplete_reason,
    load_meta,
    locked,
    make_writable,
    new_tmp_dir,
    read_meta,
    remove_stale_tmp,
    token_dtype,
)
from blues.data.sources import DEFAULT_CORPUS, BuiltinSource, DatasetSource, DirSource, Source
from blues.data.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

DEFAULT_SEED = 1337
HF_CACHE = "hf_cache"
# A chunk of documents sent to one worker: big enough that pickling and scheduling cost little
# next to tokenizing (about 13 MB/s per process here, so ~0.1 s per chunk), small enough to
# keep 2 per process in flight without much memory.
CHUNK_BYTES = 1 << 20
CHUNK_DOCS = 1024
FLUSH_TOKENS = 1 << 20


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


def _split_value(text: str, key: bytes) -> float:
    """A uniform number in [0, 1) from the document's content: duplicates land in the same split and
    the order of files does not matter."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


# ----------------------------------------------------------------------------- prepare

def prepare(data_dir: Optional[str] = None, input_dir: Optional[str] = None, dataset: Optional[str] = None,
            subset: Optional[str] = None, split: str = "train", text_field: str = "text",
            tokenizer: Union[str, Tokenizer] = "default", num_proc: int = 1, val_fraction: float = 0.05,
            seed: int = DEFAULT_SEED, vocab_size: Optional[int] = None, allow_smaller: bool = False,
            force: bool = False, progress: Optional[bool] = None, *, cache_dir: Optional[str] = None,
            corpus: Optional[str] = None) -> dict:
    """Tokenize a folder, a Hugging Face dataset or (neither given) a built-in corpus into `data_dir`
    (default: data_cache, as the config's data_dir).

    Returns the meta dict (also in data_dir/meta.json), with "reused": True when the folder already
    held these inputs prepared this way (same fingerprint) and nothing was tokenized.
    vocab_size: train a new tokenizer of this size on the train split instead of using `tokenizer`.
    cache_dir: the old name of data_dir, still accepted.
    corpus: which built-in corpus (blues.data.sources.BUILTIN_CORPORA; default "stdlib").
    A run that fails or dies leaves no meta.json for its inputs: the folder never looks complete.
    """
    t_start = time.perf_counter()
    if data_dir is not None and cache_dir is not None:
        raise ValueError(f"data_dir={data_dir!r} and cache_dir={cache_dir!r} (its old name) are both given: "
                         f"pass data_dir only")
    data_dir = data_dir or cache_dir or "data_cache"
    if input_dir is not None and dataset is not None:
        raise ValueError(f"input_dir={input_dir!r} and dataset={dataset!r} are both given: pass one of them")
    if corpus is not None and (input_dir is not None or dataset is not None):
        given = f"input_dir={input_dir!r}" if input_dir is not None else f"dataset={dataset!r}"
        raise ValueError(f"corpus={corpus!r} names a built-in corpus but {given} is given too: pass one of them")
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
    data_dir = os.path.abspath(data_dir)
    tok = None if vocab_size is not None else Tokenizer.load(tokenizer)

    source: Source
    if input_dir is not None:
        source = DirSource(input_dir, text_field, exclude=(data_dir,))
    elif dataset is None:
        source = BuiltinSource(corpus or DEFAULT_CORPUS)
    make_writable(data_dir)

    with locked(data_dir):
        if dataset is not None:  # inside the lock: it may download into data_dir/hf_cache
            source = DatasetSource(dataset, subset, split, text_field, os.path.join(data_dir, HF_CACHE))
        with source.environment():
            tok_id = ({"train_vocab_size": vocab_size, "allow_smaller": allow_smaller} if tok is None
                      else tok.fingerprint)
            fingerprint = hashlib.sha256(json.dumps(
                [FORMAT, FORMAT_VERSION, source.kind, source.fingerprint(),
                 text_field if source.kind != "builtin" else None, tok_id, val_fraction, seed]).encode()).hexdigest()
            old = read_meta(data_dir)
            if (not force and old is not None and old.get("fingerprint") == fingerprint
                    and incomplete_reason(data_dir, old) is None):
                log.info("reusing %s: prepared from the same inputs (fingerprint %s)", data_dir, fingerprint[:12])
                # data_dir is where it is now (the folder may have been moved since it was written)
                return {**old, "data_dir": data_dir, "reused": True}
            remove_stale_tmp(data_dir)
            meta = _build(data_dir, source, tok, fingerprint, text_field=text_field, num_proc=num_proc,
                          val_fraction=val_fraction, seed=seed, vocab_size=vocab_size,
                          allow_smaller=allow_smaller, progress=progress)
    meta["build_seconds"] = round(time.perf_counter() - t_start, 3)
    return {**meta, "reused": False}


def ensure_prepared(data_dir: str, **prepare_kwargs) -> dict:
    """The meta of the prepared data in `data_dir`, preparing it only where nothing would be lost.

    - complete prepared data: returned as it is, whatever its inputs ("reused": True). Calling
      prepare(data_dir) instead would replace a user's own data with the built-in corpus, whose
      fingerprint differs.
    - absent, or holding only hidden entries (a lock file, a dead run's temp folder): prepared with
      prepare(data_dir, **prepare_kwargs), by default from the built-in corpus.
    - anything else (other files, damaged data, meta.json of another version): ValueError saying
      what to run; nothing is written there.
    Safe to call from several processes at once (prepare takes the folder's lock).
    """
    try:
        return {**load_meta(data_dir), "data_dir": os.path.abspath(data_dir), "reused": True}
    except ValueError as e:
        refusal = e
    visible = sorted(n for n in os.listdir(data_dir) if not n.startswith(".")) if os.path.isdir(data_dir) else []
    if visible:
        if os.path.exists(os.path.join(data_dir, LOCK_FILE)):
            # a prepare may be moving its files in right now (meta.json comes last): wait for it
            with contextlib.suppress(ValueError, OSError), locked(data_dir):
                return {**load_meta(data_dir), "data_dir": os.path.abspath(data_dir), "reused": True}
        more = f" and {len(visible) - 1} more" if len(visible) > 1 else ""
        raise ValueError(f"{refusal}; it is not empty (it holds {visible[0]!r}{more}), so nothing is prepared "
                         f"into it automatically: pass an empty or new data_dir") from None
    builtin = prepare_kwargs.get("input_dir") is None and prepare_kwargs.get("dataset") is None
    log.info("data_dir %s holds no prepared data: preparing %s", data_dir, "the built-in corpus" if builtin else "it")
    return prepare(data_dir, **prepare_kwargs)


def _build(data_dir: str, source: Source, tok: Optional[Tokenizer], fingerprint: str, *, text_field: str,
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
    # val_fraction of the text, skipping any that would overshoot it by more than 25%. Over 200 seeds
    # this holds out 5.0% to 6.2% of the text of either built-in corpus (pydoc: 79 documents of 0.2
    # to 62 KB; stdlib: 742 of 38 B to 229 KB); holding out 5% of pydoc's documents gave 0.2% to 26%.
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
    tmp = new_tmp_dir(data_dir)
    writers: dict[str, _SplitWriter] = {}
    try:
        if tok is None:
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
            "data_dir": data_dir,
            "source": source.describe(),
            "tokenizer": {"name": tok.name, "sha256": tok.sha256, "fingerprint": tok.fingerprint,
                          "n_vocab": tok.n_vocab, "eot_id": tok.eot_id,
                          "files": ["tokenizer.tiktoken", "tokenizer.json"]},
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
        atomic_write_json(os.path.join(tmp, META_FILE), meta)
        commit(tmp, data_dir)
        return meta
    finally:
        for w in writers.values():
            w.f.close()  # a no-op after close(); on errors, before the folder goes
        shutil.rmtree(tmp, ignore_errors=True)

