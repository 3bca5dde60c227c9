"""blues-prepare and TokenLoader: exact shards, reuse, atomicity, bad inputs, resumable rank-disjoint batches."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from blues import data as bdata
from blues.config import tiny
from blues.data import TokenLoader, builtin_corpus, load_meta, main, prepare
from blues.tokenizer import ENDOFTEXT, Tokenizer, check_vocab, default_tokenizer, train_tokenizer

EOT = ENDOFTEXT


def run_cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments):
    assert rc == 1
    assert err.startswith("blues-prepare: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)


def assert_nothing_complete(cache_dir):
    """No meta.json, no token file, no temp folder: nothing that looks prepared or half-written."""
    if not os.path.exists(cache_dir):
        return
    names = os.listdir(cache_dir)
    assert "meta.json" not in names, names
    assert not [n for n in names if n.endswith(".bin") or n.startswith(".tmp-")], names


def decode_split(cache_dir, split):
    meta = load_meta(str(cache_dir))
    ids = np.fromfile(os.path.join(cache_dir, meta["splits"][split]["file"]), dtype=meta["dtype"])
    return Tokenizer.load(str(cache_dir)).decode(ids)


def split_documents(cache_dir, split):
    """The documents of a split, cut at the <|endoftext|> id (not its text, which a document may hold)."""
    meta = load_meta(str(cache_dir))
    ids = np.fromfile(os.path.join(cache_dir, meta["splits"][split]["file"]), dtype=meta["dtype"])
    if len(ids) == 0:
        return []
    tok = Tokenizer.load(str(cache_dir))
    cuts = np.flatnonzero(ids == tok.eot_id)
    return [tok.decode(part) for part in np.split(ids, cuts)[:1] + [p[1:] for p in np.split(ids, cuts)[1:]]]


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


def write_inputs(root):
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


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("builtin")
    prepare(cache_dir=str(cache))
    return str(cache)


# ----------------------------------------------------------------------------- prepare: the built-in corpus

def test_builtin_end_to_end_cli_under_60s_offline(tmp_path):
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "blues.data", "--cache_dir", str(cache)],
                       capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert elapsed < 60, f"blues-prepare on the built-in corpus took {elapsed:.1f} s"
    meta = load_meta(str(cache))
    assert meta["source"]["kind"] == "builtin" and meta["vocab_size"] == 4096 and meta["dtype"] == "uint16"
    assert meta["num_tokens"] == sum(s["num_tokens"] for s in meta["splits"].values())
    assert meta["num_documents"] == len(builtin_corpus())
    assert meta["splits"]["val"]["num_documents"] >= 1
    # the built-in pipeline fits the tiny preset, the default the training entry uses
    check_vocab(Tokenizer.load(str(cache)), tiny().model.vocab_size, what="tiny preset", exact=True)
    # train + val decode back to the corpus, each split joined by <|endoftext|>
    train_docs = split_documents(cache, "train")
    val_docs = split_documents(cache, "val")
    assert sorted(train_docs + val_docs) == sorted(builtin_corpus())
    assert len(val_docs) == meta["splits"]["val"]["num_documents"]
    # val_fraction=0.05 of the text, as whole documents, overshooting by at most 25%
    val_chars = sum(len(d) for d in val_docs)
    assert 0.05 <= val_chars / meta["num_chars"] <= 0.0625


def test_rerun_reuses_the_cache_without_tokenizing(tmp_path, monkeypatch, no_network):
    first = prepare(cache_dir=str(tmp_path))
    assert first["reused"] is False

    def must_not_run(*a, **k):
        raise AssertionError("tokenized again although the inputs did not change")

    monkeypatch.setattr(bdata, "_encode_docs", must_not_run)
    second = prepare(cache_dir=str(tmp_path))
    assert second["reused"] is True
    assert (second["fingerprint"], second["build_id"]) == (first["fingerprint"], first["build_id"])
    assert no_network == []


# ----------------------------------------------------------------------------- prepare: a folder

def test_multi_file_shards_decode_to_the_documents_joined_by_eot(tmp_path):
    src = write_inputs(tmp_path / "in")
    meta = prepare(cache_dir=str(tmp_path / "c"), input_dir=str(src), val_fraction=0.0)
    assert decode_split(tmp_path / "c", "train") == EOT.join(DOCS)
    assert meta["splits"]["val"]["num_tokens"] == 0
    assert meta["num_documents"] == len(DOCS) and meta["num_empty_documents"] == 1
    assert meta["source"]["num_files"] == 5  # notes.csv and .hidden.txt are not read


def test_split_is_by_whole_document_and_deterministic(tmp_path):
    src = write_inputs(tmp_path / "in")
    meta = prepare(cache_dir=str(tmp_path / "c"), input_dir=str(src), val_fraction=0.4, seed=7)
    train = split_documents(tmp_path / "c", "train")
    val = split_documents(tmp_path / "c", "val")
    # every document whole in exactly one split, source order kept inside each split
    assert sorted(train + val) == sorted(DOCS)
    assert train == [d for d in DOCS if d in train] and val == [d for d in DOCS if d in val]
    assert 1 <= len(val) < len(DOCS)
    again = prepare(cache_dir=str(tmp_path / "c2"), input_dir=str(src), val_fraction=0.4, seed=7)
    assert again["splits"] == meta["splits"]
    other = [prepare(cache_dir=str(tmp_path / f"s{s}"), input_dir=str(src), val_fraction=0.4, seed=s)["splits"]
             for s in range(4)]
    assert len({json.dumps(o) for o in other}) > 1  # the seed does move documents


def test_changed_inputs_rebuild_and_untouched_content_reuses(tmp_path):
    src = write_inputs(tmp_path / "in")
    cache = str(tmp_path / "c")
    base = prepare(cache_dir=cache, input_dir=str(src))
    os.utime(src / "a.txt", (1, 1))  # new mtime, same content: still the same inputs
    assert prepare(cache_dir=cache, input_dir=str(src))["reused"] is True
    (src / "a.txt").write_text("a changed first document")
    changed = prepare(cache_dir=cache, input_dir=str(src))
    assert changed["reused"] is False and changed["fingerprint"] != base["fingerprint"]
    docs = split_documents(cache, "train") + split_documents(cache, "val")
    assert "a changed first document" in docs and DOCS[0] not in docs
    for kwargs in ({"val_fraction": 0.3}, {"seed": 1}, {"tokenizer": str(tmp_path / "tok")}):
        if "tokenizer" in kwargs:
            train_tokenizer(builtin_corpus()[:10], 700, "other").save(kwargs["tokenizer"])
        assert prepare(cache_dir=cache, input_dir=str(src), **kwargs)["reused"] is False, kwargs


def test_num_proc_2_writes_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(bdata, "CHUNK_DOCS", 8)  # several chunks, so order across workers matters
    a = prepare(cache_dir=str(tmp_path / "p1"), num_proc=1)
    b = prepare(cache_dir=str(tmp_path / "p2"), num_proc=2)
    assert a["fingerprint"] == b["fingerprint"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    d = default_tokenizer()
    big = Tokenizer("big", d.pattern, d._ranks, {EOT: 70000})  # ids up to 70000 need uint32
    src = write_inputs(tmp_path / "in")
    meta = prepare(cache_dir=str(tmp_path / "c"), input_dir=str(src), tokenizer=big, val_fraction=0.0)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70001
    assert decode_split(tmp_path / "c", "train") == EOT.join(DOCS)


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "rows.json").write_text('{"text": "one"}\n{"text": "two"}\n')
    (src / "more.json").write_text('{"text": "three"}')  # a single object is one document
    prepare(cache_dir=str(tmp_path / "c"), input_dir=str(src), val_fraction=0.0)
    assert split_documents(tmp_path / "c", "train") == ["three", "one", "two"]


def test_ensure_prepared_keeps_a_users_cache_and_builds_when_empty(tmp_path, monkeypatch):
    src = write_inputs(tmp_path / "in")
    mine = prepare(cache_dir=str(tmp_path / "c"), input_dir=str(src))
    monkeypatch.setattr(bdata, "_encode_docs", lambda *a: pytest.fail("rebuilt a prepared folder"))
    assert bdata.ensure_prepared(str(tmp_path / "c"))["build_id"] == mine["build_id"]
    monkeypatch.undo()
    built = bdata.ensure_prepared(str(tmp_path / "empty"))
    assert built["source"]["kind"] == "builtin" and built["reused"] is False


def test_vocab_size_and_a_tokenizer_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=512 trains a new tokenizer, so tokenizer='gpt2' would be ignored"):
        prepare(cache_dir=str(tmp_path), vocab_size=512, tokenizer="gpt2")


def test_training_a_tokenizer_on_the_train_split(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, doc in enumerate(builtin_corpus()[:20]):
        (src / f"{i:02d}.txt").write_text(doc)
    meta = prepare(cache_dir=str(tmp_path / "c"), input_dir=str(src), vocab_size=1024)
    tok = Tokenizer.load(str(tmp_path / "c"))
    assert tok.n_vocab == meta["vocab_size"] == 1024
    assert meta["tokenizer"]["sha256"] == tok.sha256


def test_local_hf_dataset_offline_keeps_its_cache_inside(tmp_path, no_network):
    src = tmp_path / "ds"
    src.mkdir()
    (src / "part.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS), encoding="utf-8")
    cache = tmp_path / "c"
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE")}
    import datasets.config
    import huggingface_hub.constants
    hub_offline_before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    meta = prepare(cache_dir=str(cache), dataset=str(src), text_field="body", val_fraction=0.0)
    assert meta["source"]["kind"] == "dataset" and meta["source"]["num_rows"] == len(DOCS)
    assert decode_split(cache, "train") == EOT.join(DOCS)
    assert os.listdir(cache / "hf_cache")  # the datasets cache went inside the cache dir
    assert no_network == []  # a local folder is read in offline mode: not even a probe
    assert {k: os.environ.get(k) for k in env_before} == env_before  # the offline flags are set only meanwhile
    import datasets.config
    import huggingface_hub.constants
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == hub_offline_before
    assert prepare(cache_dir=str(cache), dataset=str(src), text_field="body", val_fraction=0.0)["reused"]


# ----------------------------------------------------------------------------- bad inputs: one line, nothing left

def test_empty_folder(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    rc, _, err = run_cli(["--input_dir", str(tmp_path / "in"), "--cache_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "is empty")
    assert_nothing_complete(tmp_path / "c")


def test_no_matching_files(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "table.csv").write_text("a,b\n")
    rc, _, err = run_cli(["--input_dir", str(tmp_path / "in"), "--cache_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "has no .txt, .md, .jsonl, .json, .parquet files", "'table.csv'")
    assert_nothing_complete(tmp_path / "c")


def test_missing_input_dir(tmp_path, capsys):
    rc, _, err = run_cli(["--input_dir", str(tmp_path / "nope"), "--cache_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "does not exist")
    assert_nothing_complete(tmp_path / "c")


def test_jsonl_line_without_the_text_field_names_file_and_line(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.txt").write_text("fine")
    (src / "rows.jsonl").write_text('{"text": "ok"}\n{"body": "no text here", "id": 2}\n')
    rc, _, err = run_cli(["--input_dir", str(src), "--cache_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "rows.jsonl line 2 has no field 'text' (fields: body, id)", "--text_field")
    assert_nothing_complete(tmp_path / "c")


def test_invalid_json_names_file_and_line(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "rows.jsonl").write_text('{"text": "ok"}\n{"text": "also ok"}\n{"text": "broken\n')
    rc, _, err = run_cli(["--input_dir", str(src), "--cache_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "rows.jsonl line 3 is not valid JSON")
    assert_nothing_complete(tmp_path / "c")
    (src / "rows.jsonl").unlink()
    (src / "list.json").write_text('[{"text": "a"},\n {"text": "b"\n]')
    rc, _, err = run_cli(["--input_dir", str(src), "--cache_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "list.json is not valid JSON", "line 3")
    assert_nothing_complete(tmp_path / "c")


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    raw = b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd kept"  # 3 invalid sequences; the last U+FFFD is real text
    (src / "latin1.txt").write_bytes(raw)
    (src / "rows.jsonl").write_bytes(b'{"text": "bad \x80 byte"}\n{"text": "clean"}\n')
    rc, _, err = run_cli(["--input_dir", str(src), "--cache_dir", str(tmp_path / "c"), "--val_fraction", "0"], capsys)
    assert rc == 0, err
    assert "replaced 4 invalid UTF-8 sequence(s) with U+FFFD in 2 file(s)" in err
    meta = load_meta(str(tmp_path / "c"))
    assert meta["invalid_utf8_replaced"] == 4
    assert split_documents(tmp_path / "c", "train")[0] == raw.decode("utf-8", "replace")


def test_dataset_that_cannot_be_reached_offline(tmp_path, capsys, no_network):
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    t0 = time.perf_counter()
    rc, _, err = run_cli(["--dataset", "nobody-here/no-such-dataset", "--cache_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "'nobody-here/no-such-dataset' cannot be reached offline", "HF_HUB_OFFLINE=1")
    assert time.perf_counter() - t0 < 30  # no stall on requests (the datasets import is most of it)
    assert_nothing_complete(tmp_path / "c")
    assert {k: os.environ.get(k) for k in env_before} == env_before


def test_dataset_without_the_text_field(tmp_path, capsys):
    src = tmp_path / "ds"
    src.mkdir()
    (src / "part.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    rc, _, err = run_cli(["--dataset", str(src), "--cache_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "has no field 'text' (fields: body)")
    assert_nothing_complete(tmp_path / "c")


def test_vocab_size_the_corpus_cannot_reach(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("a small corpus " * 20)
    (src / "b.txt").write_text("another small document")
    rc, _, err = run_cli(["--input_dir", str(src), "--cache_dir", str(tmp_path / "c"), "--vocab_size", "50000"],
                         capsys)
    assert_one_line_error(rc, err, "vocab_size=50000 cannot be reached", "supports only")
    assert_nothing_complete(tmp_path / "c")


def test_unwritable_cache_dir(tmp_path, capsys):
    src = write_inputs(tmp_path / "in")
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    rc, _, err = run_cli(["--input_dir", str(src), "--cache_dir", str(blocker / "cache")], capsys)
    assert_one_line_error(rc, err, "is not writable", "pass a --cache_dir you can write to")
    if os.geteuid() != 0:  # root writes anywhere, so a read-only folder only tests an ordinary user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        rc, _, err = run_cli(["--input_dir", str(src), "--cache_dir", str(ro / "cache")], capsys)
        assert_one_line_error(rc, err, "is not writable")


def test_single_document_cannot_be_split(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "book.txt").write_text("one long book")
    rc, _, err = run_cli(["--input_dir", str(src), "--cache_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "needs at least 2", "--val_fraction 0")
    assert_nothing_complete(tmp_path / "c")


def test_tokenizer_that_does_not_match_the_prepared_shards(tmp_path, capsys, builtin_cache):
    other = tmp_path / "other"
    train_tokenizer(builtin_corpus()[:10], 700, "other-700").save(str(other))
    rc, out, err = run_cli(["--cache_dir", builtin_cache, "--check"], capsys)
    assert rc == 0 and "matches 'default'" in out
    rc, _, err = run_cli(["--cache_dir", builtin_cache, "--check", "--tokenizer", str(other)], capsys)
    assert_one_line_error(rc, err, "tokenizer 'other-700' (700 ids", "prepared with tokenizer 'blues-default-4096' (4096 ids")
    with pytest.raises(ValueError, match="does not match the data"):
        TokenLoader(builtin_cache, "train", 16, 2, tokenizer=str(other))
    rc, _, err = run_cli(["--cache_dir", str(tmp_path / "empty"), "--check"], capsys)
    assert_one_line_error(rc, err, "does not exist")


def test_cli_error_through_the_real_entry_point_has_no_traceback(tmp_path):
    (tmp_path / "in").mkdir()
    r = subprocess.run([sys.executable, "-m", "blues.data", "--input_dir", str(tmp_path / "in"),
                        "--cache_dir", str(tmp_path / "c")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("blues-prepare: error: ") and r.stderr.count("\n") == 1, r.stderr


# ----------------------------------------------------------------------------- dying midway

def test_failure_midway_leaves_the_previous_cache_and_no_temp_files(tmp_path, monkeypatch):
    src = write_inputs(tmp_path / "in")
    cache = str(tmp_path / "c")
    old = prepare(cache_dir=cache, input_dir=str(src))
    (src / "a.txt").write_text("new content")
    monkeypatch.setattr(bdata, "CHUNK_DOCS", 2)
    real, calls = bdata._encode_docs, []

    def fail_on_second_chunk(tok, texts):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(tok, texts)

    monkeypatch.setattr(bdata, "_encode_docs", fail_on_second_chunk)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(cache_dir=cache, input_dir=str(src))
    assert load_meta(cache)["build_id"] == old["build_id"]  # still complete, still the old inputs' data
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp-")]
    monkeypatch.setattr(bdata, "_encode_docs", real)
    assert prepare(cache_dir=cache, input_dir=str(src))["reused"] is False  # not mistaken for the new inputs


KILL_IN_COMMIT = r"""
import os, signal, sys
import blues.data as d
cache, src = sys.argv[1], sys.argv[2]
real = os.replace
def dying_replace(a, b):
    real(a, b)
    if os.path.dirname(os.path.abspath(b)) == os.path.abspath(cache):
        os.kill(os.getpid(), signal.SIGKILL)  # dies after moving the first file into place
d.os.replace = dying_replace
d.prepare(cache_dir=cache, input_dir=src)
"""


def test_killed_during_commit_leaves_no_complete_looking_cache(tmp_path):
    src = write_inputs(tmp_path / "in")
    cache = str(tmp_path / "c")
    prepare(cache_dir=cache)  # a complete cache of other inputs (the built-in corpus)
    r = subprocess.run([sys.executable, "-c", KILL_IN_COMMIT, cache, str(src)], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    with pytest.raises(ValueError, match="holds no prepared data"):
        load_meta(cache)
    assert [n for n in os.listdir(cache) if n.startswith(".tmp-")]  # the dead run's temp folder
    meta = prepare(cache_dir=cache, input_dir=str(src))
    assert meta["reused"] is False and meta["source"]["kind"] == "input_dir"
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp-")]  # cleaned: its process is gone


def test_concurrent_prepares_of_one_cache_both_succeed(tmp_path):
    cache = str(tmp_path / "c")
    code = "import sys, blues.data as d; m = d.prepare(cache_dir=sys.argv[1]); print(m['reused'])"
    procs = [subprocess.Popen([sys.executable, "-c", code, cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(o[0].strip() for o in outs) in (["False", "True"], ["False", "False"])
    assert load_meta(cache)["num_tokens"] > 0


# ----------------------------------------------------------------------------- TokenLoader

def test_batches_are_shifted_windows_of_the_split(builtin_cache):
    loader = TokenLoader(builtin_cache, "train", block_size=32, batch_size=4, seed=3)
    tokens = np.fromfile(os.path.join(builtin_cache, "train.bin"), dtype=np.uint16)
    starts = loader._epoch_starts(0)[:4]
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 32) and str(x.dtype) == "torch.int64"
    for row, s in enumerate(starts):
        assert x[row].tolist() == tokens[s:s + 32].tolist()
        assert y[row].tolist() == tokens[s + 1:s + 33].tolist()
    assert loader.meta["vocab_size"] == 4096


def test_same_seed_same_batches_other_seed_other_batches(builtin_cache):
    a, b, c = (TokenLoader(builtin_cache, "train", 16, 4, seed=s) for s in (1, 1, 2))
    xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
    assert xa.equal(xb) and not xa.equal(xc)


RESUME = r"""
import hashlib, json, sys
from blues.data import TokenLoader
data_dir, state_file, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(state_file) as f:
    state = json.load(f)
loader = TokenLoader(data_dir, "train", block_size=64, batch_size=8, seed=5, rank=1, world_size=2)
loader.load_state_dict(state)
for _ in range(n):
    x, y = loader.next_batch()
    print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
"""


def test_state_restored_in_a_new_process_gives_identical_next_batches(builtin_cache, tmp_path):
    loader = TokenLoader(builtin_cache, "train", block_size=64, batch_size=8, seed=5, rank=1, world_size=2)
    per_epoch = len(loader._epoch_starts(0)) // 8
    for _ in range(per_epoch - 2):  # stop 2 batches before the epoch ends: the next ones cross it
        loader.next_batch()
    state = loader.state_dict()
    (tmp_path / "state.json").write_text(json.dumps(state))
    expected = []
    for _ in range(5):
        x, y = loader.next_batch()
        expected.append(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
    assert loader.epoch == 1  # the batches compared do cross an epoch boundary
    r = subprocess.run([sys.executable, "-c", RESUME, builtin_cache, str(tmp_path / "state.json"), "5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == expected


def test_two_ranks_read_disjoint_windows(builtin_cache):
    T, B = 64, 8
    ranks = [TokenLoader(builtin_cache, "train", T, B, seed=9, rank=r, world_size=2) for r in range(2)]
    per_epoch = len(ranks[0]._epoch_starts(0)) // B
    assert per_epoch == len(ranks[1]._epoch_starts(0)) // B  # ranks run in step
    seen = []
    for loader in ranks:
        positions = set()
        for _ in range(per_epoch):
            starts = loader._epoch_starts(0)[loader.pos:loader.pos + B].copy()
            x, _ = loader.next_batch()
            assert x[0].tolist() == loader.tokens[starts[0]:starts[0] + T].tolist()
            for s in starts:
                positions.update(range(s, s + T + 1))
        seen.append(positions)
    assert not seen[0] & seen[1]
    n = ranks[0].num_tokens
    assert len(seen[0] | seen[1]) > 0.97 * n  # an epoch covers nearly the whole split
    # evaluation: the same deterministic windows every call, disjoint across ranks, as many per rank
    evals = [[x for x, _ in loader.eval_batches(5)] for loader in ranks]
    assert len(evals[0]) == len(evals[1]) >= 1
    again = [x for x, _ in ranks[0].eval_batches(5)]
    assert all(a.equal(b) for a, b in zip(evals[0], again))
    rows = [{tuple(r) for x in e for r in x.tolist()} for e in evals]
    assert not rows[0] & rows[1]


def test_any_ranks_state_resumes_every_rank(builtin_cache):
    # ranks move in step, so a checkpoint may keep rank 0's loader state only
    r0, r1 = (TokenLoader(builtin_cache, "train", 32, 4, seed=2, rank=r, world_size=2) for r in range(2))
    for _ in range(7):
        r0.next_batch()
        r1.next_batch()
    fresh = TokenLoader(builtin_cache, "train", 32, 4, seed=2, rank=1, world_size=2)
    fresh.load_state_dict(json.loads(json.dumps(r0.state_dict())))
    for _ in range(3):
        assert fresh.next_batch()[0].equal(r1.next_batch()[0])


def test_resume_with_another_world_size_is_refused(builtin_cache):
    state = TokenLoader(builtin_cache, "train", 16, 2, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2 but this loader has world_size=4"):
        TokenLoader(builtin_cache, "train", 16, 2, world_size=4).load_state_dict(state)


def test_split_too_small_for_the_block_size(builtin_cache):
    val_tokens = load_meta(builtin_cache)["splits"]["val"]["num_tokens"]
    with pytest.raises(ValueError, match=rf"split 'val' .* has {val_tokens} tokens: too few for block_size"):
        TokenLoader(builtin_cache, "val", block_size=val_tokens, batch_size=1)


def test_empty_val_split_says_why(tmp_path):
    src = write_inputs(tmp_path / "in")
    prepare(cache_dir=str(tmp_path / "c"), input_dir=str(src), val_fraction=0.0)
    with pytest.raises(ValueError, match=r"has 0 tokens \(prepared with val_fraction=0.0\)"):
        TokenLoader(str(tmp_path / "c"), "val", 8, 2)


def test_loader_on_an_unprepared_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no prepared data.*run blues-prepare --cache_dir"):
        TokenLoader(str(tmp_path), "train", 16, 2)
