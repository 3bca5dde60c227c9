"""Where documents come from: the built-in corpus, a folder of files, a Hugging Face dataset.

Imports nothing else of Blues (blues.data.tokenizer and blues.data.prepare build on it).

Documents: a .txt/.md file is one; a .jsonl line, a .json list item (or the file's one object) and
a .parquet row are one each, their text in `text_field` (default "text"). Files are read in sorted
path order; names starting with "." are skipped. Invalid UTF-8 becomes U+FFFD and is counted.

A source (BuiltinSource, DirSource, DatasetSource) has `kind`, describe() (for meta.json),
fingerprint() (of its content, for reuse), documents(stats) yielding (text, where) in a fixed
order, and environment() (a context in which documents() may run).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import socket
import sys
from typing import Iterator, Optional, Union

INPUT_EXTENSIONS = (".txt", ".md", ".jsonl", ".json", ".parquet")


def network_available(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """One TCP connect with a timeout: a quick answer instead of a request that stalls offline."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- built-in corpus
# Three corpora ship with every Python, so Blues trains offline anywhere:
# - "stdlib" (the default): the standard library's own .py source by path, then the pydoc topics.
#   Python 3.11.7: 744 documents, 10.6 MB, 2.92M tokens with the default tokenizer: the tiny
#   preset's few hundred steps see each token about once, where "pydoc" alone (110k tokens) is
#   several epochs and the default run's sample never read like anything.
# - "pydoc": CPython's pydoc topics (pydoc_data.topics): 79 documents, 465 KB of English, prepared
#   in a fraction of a second: what tests use where any real text will do.
# - "stdlib_full": "stdlib" with the library's own test suites (test, tests, idle_test): Python
#   3.11.7: 1800 documents, 30 MB, 2.8x "stdlib": for runs that would see "stdlib" several times
#   over (benchmarks/quality.py: 3000 steps of 4096 tokens are 4.4 epochs of "stdlib").
CORPUS_DESCRIPTIONS = {"stdlib": "stdlib+pydoc_data.topics", "pydoc": "pydoc_data.topics",
                       "stdlib_full": "stdlib+tests+pydoc_data.topics"}  # name -> meta.json's "corpus"
BUILTIN_CORPORA = tuple(CORPUS_DESCRIPTIONS)
DEFAULT_CORPUS = "stdlib"
# Folders not read: test suites (test, tests, idle_test; read for "stdlib_full"); third-party
# packages, different on every machine (site-packages, dist-packages); pydoc_data (its topics.py is
# the pydoc text, already in as text); compiled files (__pycache__, lib-dynload). Also skipped
# below: config-* and _sysconfigdata* (one installation's build paths: two installs of one Python
# would differ).
_TEST_DIRS = frozenset(("test", "tests", "idle_test"))
_SKIP_DIRS = _TEST_DIRS | {"site-packages", "dist-packages", "pydoc_data", "__pycache__", "lib-dynload"}


def _check_corpus(corpus: str) -> None:
    if corpus not in BUILTIN_CORPORA:
        raise ValueError(f"corpus={corpus!r} is unknown: expected one of {', '.join(BUILTIN_CORPORA)}")


def _stdlib_documents(with_tests: bool) -> list[tuple[str, str]]:
    """(text, "stdlib/<path>") of every selected .py file of the standard library, sorted by path;
    with_tests: the test suites' too."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    skip = _SKIP_DIRS - _TEST_DIRS if with_tests else _SKIP_DIRS
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith((".", "config-"))]
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        found += [(name if rel_dir == "." else f"{rel_dir}/{name}", os.path.join(dirpath, name)) for name in files
                  if name.endswith(".py") and not name.startswith((".", "_sysconfigdata"))]
    docs = []
    for rel, path in sorted(found):
        with open(path, "rb") as f:
            text, _ = _decode_utf8(f.read())  # the stdlib is UTF-8 (PEP 3120); U+FFFD were it not
        # 65 codecs in encodings/ (1.2 MB on 3.11, 10% of the source) are 256-entry tables written by
        # gencodec.py ("'\x80' # 0x80 -> EURO SIGN"): lookup data, not Python worth learning
        if not (rel.startswith("encodings/") and "gencodec.py" in text[:400]):
            docs.append((text, f"stdlib/{rel}"))
    return docs


@functools.lru_cache(maxsize=len(BUILTIN_CORPORA))
def builtin_documents(corpus: str = DEFAULT_CORPUS) -> tuple[tuple[str, str], ...]:
    """(text, where) of each document of a built-in corpus, in a fixed order. Read once per process
    (0.3 s for "stdlib"): prepare() reads its source three times (fingerprint, split, tokenize)."""
    _check_corpus(corpus)
    docs = _stdlib_documents(with_tests=corpus == "stdlib_full") if corpus != "pydoc" else []
    try:
        from pydoc_data import topics
    except ImportError:  # some distributions package it apart
        topics = None
    docs += [(topics.topics[k], f"pydoc_data.topics[{k!r}]") for k in sorted(topics.topics)] if topics else []
    if not docs:
        raise ValueError(f"the built-in corpus {corpus!r} is empty on this Python (no standard library source, "
                         f"no pydoc_data): pass --input_dir or --dataset")
    return tuple(docs)


def builtin_corpus(corpus: str = DEFAULT_CORPUS) -> list[str]:
    """The texts of a built-in corpus (BUILTIN_CORPORA); its content varies by Python version."""
    return [text for text, _ in builtin_documents(corpus)]


@functools.lru_cache(maxsize=len(BUILTIN_CORPORA))
def _corpus_info(corpus: str) -> tuple:
    docs = builtin_corpus(corpus)
    return (("corpus", CORPUS_DESCRIPTIONS[corpus]),
            ("python", platform.python_version()), ("documents", len(docs)),
            ("bytes", sum(len(d.encode()) for d in docs)),
            ("sha256", hashlib.sha256(json.dumps(docs).encode()).hexdigest()))


def builtin_corpus_info(corpus: str = DEFAULT_CORPUS) -> dict:
    """What the corpus is on this Python; sha256 over its texts (as a JSON list) identifies it."""
    return dict(_corpus_info(corpus))


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

class BuiltinSource:
    kind = "builtin"

    def __init__(self, corpus: str = DEFAULT_CORPUS):
        _check_corpus(corpus)
        self.corpus = corpus

    def describe(self) -> dict:
        return {"kind": self.kind, **builtin_corpus_info(self.corpus)}

    def fingerprint(self) -> str:
        return builtin_corpus_info(self.corpus)["sha256"]

    def documents(self, stats: dict) -> Iterator[tuple[str, str]]:
        yield from builtin_documents(self.corpus)

    def environment(self):
        return contextlib.nullcontext()


class DirSource:
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
        """Content, not mtimes: a copied or touched folder keeps its prepared data. Hashing reads ~1 GB/s,
        about 100x faster than tokenizing, so checking for reuse costs little next to preparing."""
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


class DatasetSource:
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
            saved = ("dataset_info.json", "dataset_dict.json", "state.json")
            if self.local and os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in saved):
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


Source = Union[BuiltinSource, DirSource, DatasetSource]
