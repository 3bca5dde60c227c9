"""Tokenizers for Blues: a thin layer on tiktoken.

Three kinds load through one call, `Tokenizer.load(name_or_path)`:
- "default": the byte-level BPE shipped in blues/assets (4095 merges + <|endoftext|> = 4096 ids),
  trained by `python -m blues.cli.tokenizer train --out blues/assets` on the built-in corpus (the
  standard library's source + pydoc text). 4096 rather than 8192: on the tiny preset 8192 ids gave
  3.5% less validation loss per character at equal steps (1.434 vs 1.486 nats/char after 300 steps)
  but cost 1.7x the CPU time per step (0.47 vs 0.27 s), so less per second (about 1.51 at the time
  4096 reached 1.486); and 4096 fills the tiny preset exactly.
- a tiktoken encoding by name (gpt2, cl100k_base, o200k_base, ...): found in TIKTOKEN_CACHE_DIR
  or downloaded; offline and missing, the error says which file to place where.
- a trained tokenizer: a folder holding tokenizer.json + tokenizer.tiktoken, or either file.
- a Hugging Face tokenizer.json (a folder holding one, or the file): read by content, not by name
  (blues.data.hf_tokenizer.HFTokenizer, through the `tokenizers` library).

Files written by `Tokenizer.save(directory)`:
- tokenizer.tiktoken: one line per token, "<base64 bytes> <rank>", ranks 0..n-1 (tiktoken's format)
- tokenizer.json: {"name", "pattern", "special_tokens", "n_vocab", "sha256" (of tokenizer.tiktoken), ...}

We parse tokenizer.tiktoken ourselves instead of calling tiktoken.load.load_tiktoken_bpe: that
function caches even local paths by a hash of the path and returns the stale copy after the file
changes (see tests/data/test_tokenizer.py::test_load_is_never_stale).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
from typing import Iterable, Optional, Sequence

import tiktoken

from blues.common import atomic_write
from blues.data.sources import builtin_corpus, builtin_corpus_info, network_available

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
# blues/assets, next to this package: the shipped default tokenizer
ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_NAME = "blues-default-4096"
DEFAULT_VOCAB_SIZE = 4096
VOCAB_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer.json"
FORMAT = "blues-tokenizer"
FORMAT_VERSION = 1

# Source files of tiktoken's named encodings, as tiktoken_ext/openai_public.py (tiktoken 0.14)
# downloads them; tests/data/test_tokenizer.py checks this table against the installed tiktoken.
# tiktoken caches a download at $TIKTOKEN_CACHE_DIR/<sha1 of the URL>, and finds it there offline.
_OPENAI = "https://openaipublic.blob.core.windows.net"
NAMED_ENCODING_FILES = {
    "gpt2": (f"{_OPENAI}/gpt-2/encodings/main/vocab.bpe", f"{_OPENAI}/gpt-2/encodings/main/encoder.json"),
    "r50k_base": (f"{_OPENAI}/encodings/r50k_base.tiktoken",),
    "p50k_base": (f"{_OPENAI}/encodings/p50k_base.tiktoken",),
    "p50k_edit": (f"{_OPENAI}/encodings/p50k_base.tiktoken",),
    "cl100k_base": (f"{_OPENAI}/encodings/cl100k_base.tiktoken",),
    "o200k_base": (f"{_OPENAI}/encodings/o200k_base.tiktoken",),
    "o200k_harmony": (f"{_OPENAI}/encodings/o200k_base.tiktoken",),
}


# ----------------------------------------------------------------------------- file format

def ranks_to_bytes(ranks: dict[bytes, int]) -> bytes:
    """The .tiktoken file content of `ranks`: "<base64 token> <rank>\\n" in rank order."""
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
                    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def parse_tiktoken_file(path: str) -> tuple[dict[bytes, int], str]:
    """Read a .tiktoken file: (ranks, sha256 of the file). No cache, so never a stale copy."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"tokenizer vocabulary file {path!r} cannot be read: {e.strerror}") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except ValueError:
            raise ValueError(f"tokenizer vocabulary file {path!r} line {lineno} is {line[:60]!r}: "
                             f"expected '<base64 token> <rank>'") from None
    if not ranks:
        raise ValueError(f"tokenizer vocabulary file {path!r} holds no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"tokenizer vocabulary file {path!r} has {len(ranks)} tokens whose ranks are not "
                         f"0..{len(ranks) - 1} each once (duplicate tokens or gaps)")
    return ranks, hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- Tokenizer

class Tokenizer:
    """A tiktoken Encoding plus the facts Blues checks: name, n_vocab, eot_id, sha256.

    encode() treats special-token text as plain text ("<|endoftext|>" inside a document is
    several ordinary tokens), so decode(encode(s)) == s for every string without lone surrogates.
    """

    def __init__(self, name: str, pattern: str, ranks: dict[bytes, int], special_tokens: dict[str, int],
                 sha256: Optional[str] = None, source: Optional[str] = None, extra: Optional[dict] = None):
        if ENDOFTEXT not in special_tokens:
            raise ValueError(f"tokenizer {name!r} has special tokens {sorted(special_tokens)}: "
                             f"Blues needs {ENDOFTEXT!r} among them")
        ids = set(ranks.values())
        clash = sorted(t for t, i in special_tokens.items() if i in ids)
        if clash:
            raise ValueError(f"tokenizer {name!r}: special token(s) {clash} reuse ids of ordinary tokens; "
                             f"special ids must differ from the {len(ranks)} ordinary ones")
        self.name = name
        self.pattern = pattern
        self.special_tokens = dict(special_tokens)
        self.source = source  # where it was loaded from (a path or a tiktoken name), for messages
        self.extra = dict(extra or {})  # e.g. requested_vocab_size, trained_on
        self._ranks = ranks
        self._sha256 = sha256
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.n_vocab: int = self.enc.n_vocab  # max id + 1: the rows an embedding needs
        self.eot_id: int = special_tokens[ENDOFTEXT]

    # -- identity
    @property
    def sha256(self) -> str:
        """sha256 of the vocabulary file (ranks in .tiktoken form); computed on first use
        (0.16 s here for 200k tokens, the size of o200k_base)."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(ranks_to_bytes(self._ranks)).hexdigest()
        return self._sha256

    @property
    def fingerprint(self) -> str:
        """sha256 over everything that decides the ids: vocabulary, split pattern, special tokens."""
        blob = json.dumps([self.sha256, self.pattern, sorted(self.special_tokens.items())])
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def num_merged(self) -> int:
        """Ordinary (mergeable) tokens, 256 byte tokens included."""
        return len(self._ranks)

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id}, "
                f"sha256={self.sha256[:12]}...)")

    # -- encode / decode
    def encode(self, text: str, allowed_special: bool = False) -> list[int]:
        """Token ids of `text`. allowed_special=True turns "<|endoftext|>" etc. into their special ids."""
        if allowed_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_to_numpy(self, text: str):
        """encode(text) as a uint32 numpy array, without building a Python list (faster for data prep)."""
        try:
            return self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: tiktoken's encode_ordinary repairs them
            import numpy as np
            return np.array(self.enc.encode_ordinary(text), dtype=np.uint32)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        """Text of `ids` (a list, numpy array or tensor); invalid UTF-8 across a cut becomes U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.enc.decode(ids)

    # -- persistence
    def save(self, directory: str) -> None:
        """Write tokenizer.tiktoken and tokenizer.json into `directory` (created if missing)."""
        os.makedirs(directory, exist_ok=True)
        data = ranks_to_bytes(self._ranks)
        sha = hashlib.sha256(data).hexdigest()
        if self._sha256 is not None and sha != self._sha256:
            raise AssertionError(f"tokenizer {self.name!r}: ranks serialise to sha256 {sha}, not {self._sha256}")
        self._sha256 = sha
        config = {
            "format": FORMAT, "version": FORMAT_VERSION, "name": self.name, "vocab_file": VOCAB_FILE,
            "sha256": sha, "n_vocab": self.n_vocab, "num_merged": self.num_merged, "eot_id": self.eot_id,
            "pattern": self.pattern, "special_tokens": self.special_tokens, **self.extra,
        }
        # vocabulary first, config last: a folder with tokenizer.json is complete
        atomic_write(os.path.join(directory, VOCAB_FILE), data)
        atomic_write(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=1) + "\n")

    def __getstate__(self):  # picklable, for prepare's worker processes
        return {"name": self.name, "pattern": self.pattern, "ranks": self._ranks,
                "special_tokens": self.special_tokens, "sha256": self._sha256, "source": self.source,
                "extra": self.extra}

    def __setstate__(self, state):
        self.__init__(state["name"], state["pattern"], state["ranks"], state["special_tokens"],
                      sha256=state["sha256"], source=state["source"], extra=state["extra"])

    @classmethod
    def load(cls, name_or_path: str = "default") -> "Tokenizer":
        """A named tiktoken encoding, "default", a folder holding tokenizer.json, or a .json/.tiktoken file."""
        from blues.data.hf_tokenizer import HFTokenizer
        if isinstance(name_or_path, (Tokenizer, HFTokenizer)):
            return name_or_path
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise ValueError(f"tokenizer={name_or_path!r} must be a name or a path")
        spec = os.fspath(name_or_path)
        if spec == "default":
            return _load_files(os.path.join(ASSETS_DIR, CONFIG_FILE), None)
        if os.path.isdir(spec):
            config = os.path.join(spec, CONFIG_FILE)
            if not os.path.isfile(config):
                raise ValueError(f"tokenizer folder {spec!r} holds no {CONFIG_FILE}: expected the files written "
                                 f"by Tokenizer.save (tokenizer.json + tokenizer.tiktoken)")
            return _load_files(config, None)
        if os.path.isfile(spec):
            if spec.endswith(".json"):
                return _load_files(spec, None)
            if spec.endswith(".tiktoken"):
                stem_json = spec[: -len(".tiktoken")] + ".json"
                sibling = os.path.join(os.path.dirname(spec), CONFIG_FILE)
                for config in (stem_json, sibling):
                    if os.path.isfile(config):
                        return _load_files(config, spec)
                return _load_files(None, spec)
            raise ValueError(f"tokenizer file {spec!r} is neither a .json nor a .tiktoken file")
        if spec in _named_encodings():
            return _load_named(spec)
        raise ValueError(f"tokenizer {spec!r} is neither 'default', a tiktoken encoding "
                         f"({', '.join(sorted(_named_encodings()))}) nor an existing file or folder")


def _load_files(config_path: Optional[str], vocab_path: Optional[str]) -> Tokenizer:
    """From tokenizer.json (+ its vocab file), or a bare .tiktoken with the rustbpe defaults."""
    config: dict = {}
    if config_path is not None:
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except OSError as e:
            raise ValueError(f"tokenizer config {config_path!r} cannot be read: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer config {config_path!r} is not valid JSON: {e}") from None
        from blues.data.hf_tokenizer import is_hf_tokenizer_json, load_hf_tokenizer
        if is_hf_tokenizer_json(config) and vocab_path is None:
            return load_hf_tokenizer(config_path)
        if not isinstance(config, dict) or "pattern" not in config or "special_tokens" not in config:
            raise ValueError(f"tokenizer config {config_path!r} lacks 'pattern' or 'special_tokens': "
                             f"expected a tokenizer.json written by Tokenizer.save, or a Hugging Face one")
        if vocab_path is None:
            vocab_path = os.path.join(os.path.dirname(config_path), config.get("vocab_file", VOCAB_FILE))
    assert vocab_path is not None
    ranks, sha = parse_tiktoken_file(vocab_path)
    if config.get("sha256") not in (None, sha):
        raise ValueError(f"tokenizer vocabulary {vocab_path!r} has sha256 {sha[:12]}... but {config_path!r} "
                         f"expects {config['sha256'][:12]}...: the two files come from different tokenizers")
    if config:
        name, pattern, specials = config.get("name", "unnamed"), config["pattern"], config["special_tokens"]
        extra = {k: config[k] for k in ("requested_vocab_size", "trained_on") if k in config}
    else:
        # a bare .tiktoken file: rustbpe's default split pattern and <|endoftext|> after the ranks
        name, pattern, specials, extra = os.path.basename(vocab_path), RUSTBPE_PATTERN, {ENDOFTEXT: len(ranks)}, {}
    return Tokenizer(name, pattern, ranks, specials, sha256=sha, source=config_path or vocab_path, extra=extra)


# rustbpe 0.1.0's default split pattern (GPT-4's cl100k pattern less some possessive quantifiers and
# its \s++$ branch); a test checks that rustbpe still uses it, so that a bare .tiktoken trained by
# rustbpe loads with the pattern it was trained with.
RUSTBPE_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                   r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=1)
def _named_encodings() -> tuple[str, ...]:
    return tuple(tiktoken.list_encoding_names())


def tiktoken_cache_dir() -> str:
    """Where tiktoken looks for downloaded files (tiktoken/load.py: read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    import tempfile
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def tiktoken_cache_path(url: str) -> str:
    """The file tiktoken reads for `url` without a download: <cache dir>/<sha1 of the URL>."""
    return os.path.join(tiktoken_cache_dir(), hashlib.sha1(url.encode()).hexdigest())


def _load_named(name: str) -> Tokenizer:
    urls = NAMED_ENCODING_FILES.get(name, ())
    cache_off = tiktoken_cache_dir() == ""  # TIKTOKEN_CACHE_DIR="" turns tiktoken's cache off
    missing = [u for u in urls if cache_off or not os.path.isfile(tiktoken_cache_path(u))]
    if missing:
        host = missing[0].split("/")[2]
        # probe first: tiktoken's download (requests.get without a timeout) can hang offline
        if not network_available(host):
            if cache_off:
                raise ValueError(f"tokenizer {name!r} needs a download but {host} cannot be reached (offline) "
                                 f"and TIKTOKEN_CACHE_DIR is empty (cache off): set TIKTOKEN_CACHE_DIR to a "
                                 f"folder holding {', '.join(missing)} saved under the sha1 of its URL")
            where = "; ".join(f"{u} as {tiktoken_cache_path(u)}" for u in missing)
            raise ValueError(f"tokenizer {name!r} needs a download but {host} cannot be reached (offline): "
                             f"fetch {where} (the file name is the sha1 of its URL), or set TIKTOKEN_CACHE_DIR "
                             f"to a folder holding it")
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # requests' ConnectionError, a hash mismatch, ...
        raise ValueError(f"tokenizer {name!r} could not be loaded by tiktoken: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    # NOTE: tiktoken has no public accessor for the ranks of a named encoding; _mergeable_ranks is
    # the dict it was built from (tiktoken/core.py).
    return Tokenizer(name, enc._pat_str, enc._mergeable_ranks, enc._special_tokens, source=name)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The tokenizer shipped in blues/assets: 4095 ordinary tokens + <|endoftext|> = 4096 ids."""
    return Tokenizer.load("default")


# ----------------------------------------------------------------------------- checks

def check_vocab(tokenizer: Tokenizer, vocab_size: int, what: str = "model", exact: bool = False) -> None:
    """Raise ValueError unless `vocab_size` (of a model, or of prepared data with exact=True) fits the tokenizer.

    A model may have more rows than the tokenizer has ids (padding), never fewer.
    """
    n = tokenizer.n_vocab
    ok = vocab_size == n if exact else vocab_size >= n
    if not ok:
        need = f"exactly {n}" if exact else f">= {n}"
        raise ValueError(f"tokenizer {tokenizer.name!r} has {n} ids (incl. {len(tokenizer.special_tokens)} "
                         f"special) but the {what} has vocab_size={vocab_size}: expected vocab_size {need}, "
                         f"or the tokenizer the {what} was made with")


# ----------------------------------------------------------------------------- training

def train_tokenizer(texts: Iterable[str], vocab_size: int, name: str,
                    special_tokens: Sequence[str] = (ENDOFTEXT,), allow_smaller: bool = False,
                    pattern: Optional[str] = None) -> Tokenizer:
    """Train a byte-level BPE with rustbpe; `vocab_size` counts the special tokens too.

    rustbpe stops early when the corpus has no pair left to merge (the 465 KB of the pydoc corpus
    reaches 10027 of 32768). That raises ValueError naming the size reached, or with allow_smaller=True
    returns the smaller tokenizer (n_vocab tells, extra["requested_vocab_size"] keeps the ask).
    """
    import rustbpe

    special_tokens = list(dict.fromkeys(special_tokens))
    if ENDOFTEXT not in special_tokens:
        special_tokens.insert(0, ENDOFTEXT)
    n_special = len(special_tokens)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs the 256 byte tokens "
                         f"plus {n_special} special token(s), so at least {256 + n_special}")
    stats = {"bytes": 0, "documents": 0}

    def counted(it):
        for t in it:
            stats["bytes"] += len(t.encode("utf-8", "surrogatepass"))
            stats["documents"] += 1
            yield t

    bpe = rustbpe.Tokenizer()
    if pattern is None:
        bpe.train_from_iterator(counted(iter(texts)), vocab_size=vocab_size - n_special)
    else:
        bpe.train_from_iterator(counted(iter(texts)), vocab_size=vocab_size - n_special, pattern=pattern)
    ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
    reached = len(ranks) + n_special
    if reached < vocab_size:
        msg = (f"vocab_size={vocab_size} cannot be reached: the corpus ({stats['documents']} documents, "
               f"{stats['bytes']:,} bytes) supports only {reached} tokens incl. {n_special} special")
        if not allow_smaller:
            raise ValueError(msg + f": pass vocab_size <= {reached}, more text, or allow_smaller")
        log.warning("%s; keeping %d", msg, reached)
    specials = {tok: len(ranks) + i for i, tok in enumerate(special_tokens)}
    extra = {"requested_vocab_size": vocab_size,
             "trained_on": {"documents": stats["documents"], "bytes": stats["bytes"]}}
    return Tokenizer(name, bpe.get_pattern(), ranks, specials, source="trained", extra=extra)


def train_default(vocab_size: int = DEFAULT_VOCAB_SIZE, name: str = DEFAULT_NAME) -> Tokenizer:
    """The default tokenizer: rustbpe on the built-in corpus "stdlib" (deterministic for a given Python
    version: 2-5 s for its 10.6 MB on Python 3.11 here)."""
    tok = train_tokenizer(builtin_corpus(), vocab_size, name)
    tok.extra["trained_on"] = builtin_corpus_info()
    return tok
