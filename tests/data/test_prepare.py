"""prepare() and ensure_prepared(): exact shards, reuse, splits, atomicity, dying midway, concurrency."""
import json
import os
import signal
import subprocess
import sys

import pytest

import blues.data.prepare as bprep
from blues.data.data_dir import load_meta
from blues.data.prepare import ensure_prepared, prepare
from blues.data.sources import builtin_corpus
from blues.data.tokenizer import ENDOFTEXT, Tokenizer, default_tokenizer, train_tokenizer

EOT = ENDOFTEXT


# ----------------------------------------------------------------------------- the built-in corpus

def test_rerun_reuses_the_cache_without_tokenizing(tmp_path, monkeypatch, no_network):
    first = prepare(data_dir=str(tmp_path), corpus="pydoc")
    assert first["reused"] is False

    def must_not_run(*a, **k):
        raise AssertionError("tokenized again although the inputs did not change")

    monkeypatch.setattr(bprep, "_encode_docs", must_not_run)
    second = prepare(data_dir=str(tmp_path), corpus="pydoc")
    assert second["reused"] is True
    assert (second["fingerprint"], second["build_id"]) == (first["fingerprint"], first["build_id"])
    assert no_network == []


def test_cache_dir_is_still_accepted_as_the_old_name_of_data_dir(tmp_path, monkeypatch):
    first = prepare(data_dir=str(tmp_path / "c"), progress=False, corpus="pydoc")
    monkeypatch.setattr(bprep, "_encode_docs", lambda *a: pytest.fail("the old name reached another folder"))
    again = prepare(cache_dir=str(tmp_path / "c"), progress=False, corpus="pydoc")
    assert again["reused"] is True and again["build_id"] == first["build_id"]
    assert again["data_dir"] == str(tmp_path / "c")
    with pytest.raises(ValueError, match=r"data_dir='a' and cache_dir='b' \(its old name\) are both given"):
        prepare(data_dir="a", cache_dir="b")


# ----------------------------------------------------------------------------- a folder

def test_split_is_by_whole_document_and_deterministic(tmp_path, write_inputs, docs, split_documents):
    src = write_inputs(tmp_path / "in")
    meta = prepare(data_dir=str(tmp_path / "c"), input_dir=str(src), val_fraction=0.4, seed=7)
    train = split_documents(tmp_path / "c", "train")
    val = split_documents(tmp_path / "c", "val")
    # every document whole in exactly one split, source order kept inside each split
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]
    assert 1 <= len(val) < len(docs)
    again = prepare(data_dir=str(tmp_path / "c2"), input_dir=str(src), val_fraction=0.4, seed=7)
    assert again["splits"] == meta["splits"]
    other = [prepare(data_dir=str(tmp_path / f"s{s}"), input_dir=str(src), val_fraction=0.4, seed=s)["splits"]
             for s in range(4)]
    assert len({json.dumps(o) for o in other}) > 1  # the seed does move documents


def test_changed_inputs_rebuild_and_untouched_content_reuses(tmp_path, write_inputs, docs, split_documents):
    src = write_inputs(tmp_path / "in")
    cache = str(tmp_path / "c")
    base = prepare(data_dir=cache, input_dir=str(src))
    os.utime(src / "a.txt", (1, 1))  # new mtime, same content: still the same inputs
    assert prepare(data_dir=cache, input_dir=str(src))["reused"] is True
    (src / "a.txt").write_text("a changed first document")
    changed = prepare(data_dir=cache, input_dir=str(src))
    assert changed["reused"] is False and changed["fingerprint"] != base["fingerprint"]
    found = split_documents(cache, "train") + split_documents(cache, "val")
    assert "a changed first document" in found and docs[0] not in found
    for kwargs in ({"val_fraction": 0.3}, {"seed": 1}, {"tokenizer": str(tmp_path / "tok")}):
        if "tokenizer" in kwargs:
            train_tokenizer(builtin_corpus("pydoc")[:10], 700, "other").save(kwargs["tokenizer"])
        assert prepare(data_dir=cache, input_dir=str(src), **kwargs)["reused"] is False, kwargs


def test_num_proc_2_writes_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(bprep, "CHUNK_DOCS", 8)  # several chunks, so order across workers matters
    a = prepare(data_dir=str(tmp_path / "p1"), num_proc=1, corpus="pydoc")
    b = prepare(data_dir=str(tmp_path / "p2"), num_proc=2, corpus="pydoc")
    assert a["fingerprint"] == b["fingerprint"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path, write_inputs, docs, decode_split):
    d = default_tokenizer()
    big = Tokenizer("big", d.pattern, d._ranks, {EOT: 70000})  # ids up to 70000 need uint32
    src = write_inputs(tmp_path / "in")
    meta = prepare(data_dir=str(tmp_path / "c"), input_dir=str(src), tokenizer=big, val_fraction=0.0)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70001
    assert decode_split(tmp_path / "c", "train") == EOT.join(docs)


def test_vocab_size_and_a_tokenizer_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=512 trains a new tokenizer, so tokenizer='gpt2' would be ignored"):
        prepare(data_dir=str(tmp_path), vocab_size=512, tokenizer="gpt2")


def test_training_a_tokenizer_on_the_train_split(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, doc in enumerate(builtin_corpus("pydoc")[:20]):
        (src / f"{i:02d}.txt").write_text(doc)
    meta = prepare(data_dir=str(tmp_path / "c"), input_dir=str(src), vocab_size=1024)
    tok = Tokenizer.load(str(tmp_path / "c"))
    assert tok.n_vocab == meta["vocab_size"] == 1024
    assert meta["tokenizer"]["sha256"] == tok.sha256


# ----------------------------------------------------------------------------- ensure_prepared

def test_ensure_prepared_keeps_a_users_cache_and_builds_when_empty(tmp_path, monkeypatch, write_inputs):
    src = write_inputs(tmp_path / "in")
    mine = prepare(data_dir=str(tmp_path / "c"), input_dir=str(src))
    monkeypatch.setattr(bprep, "_encode_docs", lambda *a: pytest.fail("rebuilt a prepared folder"))
    assert ensure_prepared(str(tmp_path / "c"))["build_id"] == mine["build_id"]
    monkeypatch.undo()
    built = ensure_prepared(str(tmp_path / "empty"), corpus="pydoc")
    assert built["source"]["kind"] == "builtin" and built["reused"] is False


def test_ensure_prepared_builds_in_a_folder_holding_only_hidden_entries(tmp_path):
    # what a prepare killed before its first commit leaves: the lock file and its temp folder
    d = tmp_path / "d"
    (d / ".tmp-prepare-otherhost-1-abcd").mkdir(parents=True)
    (d / ".prepare.lock").write_text("")
    meta = ensure_prepared(str(d), progress=False, corpus="pydoc")
    assert meta["reused"] is False and meta["source"]["kind"] == "builtin"
    assert load_meta(str(d))["build_id"] == meta["build_id"]


def test_ensure_prepared_refuses_a_folder_with_other_content_and_writes_nothing(tmp_path):
    # a user who points data_dir at their raw texts must not get the built-in corpus mixed into them
    d = tmp_path / "texts"
    d.mkdir()
    (d / "novel.txt").write_text("my own text")
    with pytest.raises(ValueError, match=r"holds no prepared data .*run blues-prepare --data_dir .*it is not empty "
                                         r"\(it holds 'novel\.txt'\)"):
        ensure_prepared(str(d))
    assert sorted(os.listdir(d)) == ["novel.txt"]  # not even a lock file


def test_ensure_prepared_refuses_damaged_data_and_leaves_it_for_the_user(tmp_path):
    d = tmp_path / "c"
    prepare(data_dir=str(d), progress=False, corpus="pydoc")
    with open(d / "train.bin", "r+b") as f:
        f.truncate(10)  # a copy cut short
    before = sorted(os.listdir(d))
    with pytest.raises(ValueError, match=r"is damaged: .*train\.bin has 10 bytes.*--force"):
        ensure_prepared(str(d))
    assert sorted(os.listdir(d)) == before and (d / "train.bin").stat().st_size == 10


def test_ensure_prepared_refuses_meta_of_another_format_version(tmp_path):
    d = tmp_path / "c"
    prepare(data_dir=str(d), progress=False, corpus="pydoc")
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="meta.json has format version 99, this Blues reads 1"):
        ensure_prepared(str(d))
    assert json.loads((d / "meta.json").read_text())["version"] == 99


# ----------------------------------------------------------------------------- dying midway

def test_failure_midway_leaves_the_previous_cache_and_no_temp_files(tmp_path, monkeypatch, write_inputs):
    src = write_inputs(tmp_path / "in")
    cache = str(tmp_path / "c")
    old = prepare(data_dir=cache, input_dir=str(src))
    (src / "a.txt").write_text("new content")
    monkeypatch.setattr(bprep, "CHUNK_DOCS", 2)
    real, calls = bprep._encode_docs, []

    def fail_on_second_chunk(tok, texts):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(tok, texts)

    monkeypatch.setattr(bprep, "_encode_docs", fail_on_second_chunk)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(data_dir=cache, input_dir=str(src))
    assert load_meta(cache)["build_id"] == old["build_id"]  # still complete, still the old inputs' data
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp-")]
    monkeypatch.setattr(bprep, "_encode_docs", real)
    assert prepare(data_dir=cache, input_dir=str(src))["reused"] is False  # not mistaken for the new inputs


KILL_IN_COMMIT = r"""
import os, signal, sys
from blues.data.prepare import prepare
cache, src = sys.argv[1], sys.argv[2]
real = os.replace
def dying_replace(a, b):
    real(a, b)
    if os.path.dirname(os.path.abspath(b)) == os.path.abspath(cache):
        os.kill(os.getpid(), signal.SIGKILL)  # dies after moving the first file into place
os.replace = dying_replace
prepare(data_dir=cache, input_dir=src)
"""


def test_killed_during_commit_leaves_no_complete_looking_cache(tmp_path, write_inputs):
    src = write_inputs(tmp_path / "in")
    cache = str(tmp_path / "c")
    prepare(data_dir=cache, corpus="pydoc")  # a complete cache of other inputs (the small built-in corpus)
    r = subprocess.run([sys.executable, "-c", KILL_IN_COMMIT, cache, str(src)], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    with pytest.raises(ValueError, match="holds no prepared data"):
        load_meta(cache)
    assert [n for n in os.listdir(cache) if n.startswith(".tmp-")]  # the dead run's temp folder
    meta = prepare(data_dir=cache, input_dir=str(src))
    assert meta["reused"] is False and meta["source"]["kind"] == "input_dir"
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp-")]  # cleaned: its process is gone


def test_concurrent_prepares_of_one_cache_both_succeed(tmp_path):
    cache = str(tmp_path / "c")
    code = ("import sys; from blues.data.prepare import prepare; m = prepare(data_dir=sys.argv[1], corpus='pydoc'); "
            "print(m['reused'])")
    procs = [subprocess.Popen([sys.executable, "-c", code, cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(o[0].strip() for o in outs) in (["False", "True"], ["False", "False"])
    assert load_meta(cache)["num_tokens"] > 0
