"""Inputs and readers shared by the tests of blues/data (fixtures: pytest imports test files by path,
so helpers are handed out as fixtures rather than imported)."""
import json
import os

import numpy as np
import pytest

from blues.data.data_dir import load_meta
from blues.data.prepare import prepare
from blues.data.tokenizer import ENDOFTEXT, Tokenizer

EOT = ENDOFTEXT

# A small input of every kind; DOCS is what reading it must give, in this order (sorted paths).
DOCS = [
    "First document.\nWith unicode: caf\u00e9 \u65e5\u672c \U0001f3b5\n",  # a.txt
    "jsonl one",  # c.jsonl line 1
    f"jsonl two with {EOT} inside",  # c.jsonl line 3: special-token text stays plain text
    "json item zero",  # d.json item 0
    "json item one, a bare string",  # d.json item 1
    "parquet row zero",  # e.parquet row 0
    "parquet row one",  # e.parquet row 1
    "# Title\n\nSome *markdown*.\r\nA Windows line ending.\n",  # sub/b.md
]


def _write_inputs(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_bytes(DOCS[0].encode())
    (root / "c.jsonl").write_text(json.dumps({"text": DOCS[1], "id": 1}) + "\n\n" + json.dumps({"text": DOCS[2]})
                                  + "\n" + json.dumps({"text": ""}) + "\n", encoding="utf-8")
    (root / "d.json").write_text(json.dumps([{"text": DOCS[3]}, DOCS[4]]), encoding="utf-8")
    pq.write_table(pa.table({"text": DOCS[5:7], "n": [0, 1]}), str(root / "e.parquet"))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "b.md").write_bytes(DOCS[7].encode())
    (root / "notes.csv").write_text("ignored,file\n")
    (root / ".hidden.txt").write_text("hidden files are skipped")
    return root


def _decode_split(data_dir, split):
    meta = load_meta(str(data_dir))
    ids = np.fromfile(os.path.join(data_dir, meta["splits"][split]["file"]), dtype=meta["dtype"])
    return Tokenizer.load(str(data_dir)).decode(ids)


def _split_documents(data_dir, split):
    """The documents of a split, cut at the <|endoftext|> id (not its text, which a document may hold)."""
    meta = load_meta(str(data_dir))
    ids = np.fromfile(os.path.join(data_dir, meta["splits"][split]["file"]), dtype=meta["dtype"])
    if len(ids) == 0:
        return []
    tok = Tokenizer.load(str(data_dir))
    cuts = np.flatnonzero(ids == tok.eot_id)
    return [tok.decode(part) for part in np.split(ids, cuts)[:1] + [p[1:] for p in np.split(ids, cuts)[1:]]]


@pytest.fixture
def docs():
    """The documents write_inputs writes, in reading order (a fresh list: tests may not change it)."""
    return list(DOCS)


@pytest.fixture
def write_inputs():
    """write_inputs(root): a .txt, .jsonl, .json, .parquet and .md file (plus files not read) under root."""
    return _write_inputs


@pytest.fixture
def decode_split():
    """decode_split(data_dir, split): the text of one split's token file."""
    return _decode_split


@pytest.fixture
def split_documents():
    """split_documents(data_dir, split): the documents of one split, in order."""
    return _split_documents


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """The small built-in corpus (pydoc, 110k tokens) prepared once for every test that only reads it."""
    data_dir = tmp_path_factory.mktemp("builtin")
    prepare(data_dir=str(data_dir), corpus="pydoc")
    return str(data_dir)
