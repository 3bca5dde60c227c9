"""A Hugging Face tokenizer.json as a Blues tokenizer (through the `tokenizers` library).

Blues' own tokenizer (blues.data.tokenizer) writes a tokenizer.json too, with Blues' fields ("format":
"blues-tokenizer", "pattern", "special_tokens") beside tokenizer.tiktoken. A Hugging Face one holds
the whole tokenizer in one file ("model", "added_tokens", "pre_tokenizer", ...). The two never collide:
Tokenizer.load reads the file and hands a Hugging Face one to HFTokenizer (is_hf_tokenizer_json), so a
model folder, a data folder or `blues-prepare --tokenizer HF_DIR` takes either.

HFTokenizer has the surface the rest of Blues uses: name, n_vocab, eot_id, special_tokens, sha256,
fingerprint, source, encode / encode_to_numpy / encode_batch / decode, save, pickling. As Blues' own,
encode() treats special-token text as plain text (tokenizers' encode_special_tokens) and adds no
BOS/EOS (add_special_tokens=False): documents are joined by eot_id in data preparation.

eot_id: the eos_token of the tokenizer_config.json beside tokenizer.json, else the first special token
named like an end of text (<|endoftext|>, </s>, <|end_of_text|>, <|im_end|>, <eos>), else a ValueError
saying what to add.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

from blues.common import atomic_write

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
EOT_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>")


def is_hf_tokenizer_json(config: object) -> bool:
    """Whether a parsed tokenizer.json is Hugging Face's (a "model" section, none of Blues' fields)."""
    return isinstance(config, dict) and isinstance(config.get("model"), dict) and "pattern" not in config


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ValueError("a Hugging Face tokenizer.json needs the `tokenizers` package: pip install tokenizers "
                         "(it comes with transformers)") from None
    return tokenizers


def _eos_of(config: dict) -> Optional[str]:
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


class HFTokenizer:
    """A tokenizers.Tokenizer with Blues' tokenizer surface (see the module docstring)."""

    def __init__(self, text: str, tokenizer_config: Optional[dict] = None, source: Optional[str] = None):
        tk = _import_tokenizers()
        self._text, self.tokenizer_config, self.source = text, dict(tokenizer_config or {}), source
        self._plain = tk.Tokenizer.from_str(text)  # special-token text encodes as ordinary text
        self._plain.encode_special_tokens = True
        self._special = tk.Tokenizer.from_str(text)  # allowed_special=True: special-token text is special
        added = json.loads(text).get("added_tokens") or []
        self.special_tokens: dict[str, int] = {t["content"]: t["id"] for t in added if t.get("special")}
        vocab = self._plain.get_vocab(with_added_tokens=True)
        self.n_vocab: int = max(vocab.values()) + 1  # max id + 1: the rows an embedding needs
        self.num_merged: int = self._plain.get_vocab_size(with_added_tokens=False)
        self.name: str = self.tokenizer_config.get("name_or_path") or (
            os.path.basename(os.path.dirname(os.path.abspath(source))) if source else "hf-tokenizer")
        self.pattern = None
        self.extra: dict = {}
        eos = _eos_of(self.tokenizer_config)
        if eos is None:
            eos = next((t for t in EOT_NAMES if t in self.special_tokens), None)
        if eos is None or eos not in vocab:
            where = source or "the tokenizer"
            raise ValueError(f"{where!r} names no end-of-text token Blues can use: add a {HF_TOKENIZER_CONFIG} with "
                             f"\"eos_token\" beside it, or a special token named one of {', '.join(EOT_NAMES)}")
        self.eot_id: int = vocab[eos]
        self.special_tokens.setdefault(eos, self.eot_id)

    # -- identity
    @property
    def sha256(self) -> str:
        """sha256 of the tokenizer.json text: the whole tokenizer (vocabulary, merges, normaliser, splits)."""
        return hashlib.sha256(self._text.encode("utf-8")).hexdigest()

    @property
    def fingerprint(self) -> str:
        """sha256 over everything that decides the ids: the file, and which token ends a document."""
        return hashlib.sha256(json.dumps(["hf", self.sha256, self.eot_id]).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"

    # -- encode / decode
    def encode(self, text: str, allowed_special: bool = False) -> list[int]:
        """Token ids of `text`, no BOS/EOS added; allowed_special=True turns special-token text into its id."""
        return (self._special if allowed_special else self._plain).encode(text, add_special_tokens=False).ids

    def encode_to_numpy(self, text: str):
        import numpy as np
        return np.asarray(self.encode(text), dtype=np.uint32)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._plain.decode(list(ids), skip_special_tokens=False)

    # -- persistence
    def save(self, directory: str) -> None:
        """Write tokenizer.json (as it was read) and tokenizer_config.json (with eos_token) into `directory`."""
        os.makedirs(directory, exist_ok=True)
        config = {**self.tokenizer_config, "eos_token": self.decode([self.eot_id])}
        atomic_write(os.path.join(directory, HF_TOKENIZER_CONFIG), json.dumps(config, indent=1) + "\n")
        atomic_write(os.path.join(directory, HF_TOKENIZER_FILE), self._text)  # last: the folder is complete

    def __getstate__(self):  # picklable, for prepare's worker processes
        return {"text": self._text, "tokenizer_config": self.tokenizer_config, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["text"], state["tokenizer_config"], state["source"])


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """The Hugging Face tokenizer.json at `path` (with the tokenizer_config.json beside it, if any)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"tokenizer file {path!r} cannot be read: {e.strerror}") from None
    config_path = os.path.join(os.path.dirname(path), HF_TOKENIZER_CONFIG)
    config = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_path!r} is not readable JSON: {e}") from None
    try:
        return HFTokenizer(text, config if isinstance(config, dict) else {}, source=path)
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        if isinstance(e, ValueError) and "end-of-text" in str(e):
            raise
        raise ValueError(f"tokenizer file {path!r} is not a valid Hugging Face tokenizer.json: {e}") from None
