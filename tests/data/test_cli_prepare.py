"""blues-prepare: the built-in corpus end to end, one-line errors (exit 2) that leave nothing behind,
--check, and the --data_dir flag with its old name --cache_dir."""
import os
import subprocess
import sys
import time

import pytest

from blues.cli.prepare import main
from blues.common import EXIT_USAGE
from blues.data.data_dir import load_meta
from blues.data.loader import TokenLoader
from blues.data.sources import builtin_corpus
from blues.data.tokenizer import Tokenizer, check_vocab, train_tokenizer
from blues.presets import tiny


def run_cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments):
    assert rc == EXIT_USAGE
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


# ----------------------------------------------------------------------------- the built-in corpus

def test_builtin_end_to_end_cli_offline(tmp_path, split_documents):
    cache = tmp_path / "cache"
    # The timeout only guards against a hang (offline, a stalled download would wait forever): this
    # takes about 1.5 s on an idle machine, but the test machines' 2 cores are shared, so a speed bound
    # here would fail for others' load. benchmarks/prepare.py measures the speed (builtin_cli_s).
    r = subprocess.run([sys.executable, "-m", "blues.cli.prepare", "--data_dir", str(cache)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = load_meta(str(cache))
    assert meta["source"]["kind"] == "builtin" and meta["source"]["corpus"] == "stdlib+pydoc_data.topics"
    assert meta["vocab_size"] == 4096 and meta["dtype"] == "uint16"
    assert meta["num_tokens"] == sum(s["num_tokens"] for s in meta["splits"].values())
    corpus = [d for d in builtin_corpus() if d]  # a few empty __init__.py files are counted, not written
    assert meta["num_documents"] == len(corpus) == len(builtin_corpus()) - meta["num_empty_documents"]
    assert meta["splits"]["val"]["num_documents"] >= 1
    # the built-in pipeline fits the tiny preset, the default the training entry uses
    check_vocab(Tokenizer.load(str(cache)), tiny().model.vocab_size, what="tiny preset", exact=True)
    # train + val decode back to the corpus, each split joined by <|endoftext|>
    train_docs = split_documents(cache, "train")
    val_docs = split_documents(cache, "val")
    assert sorted(train_docs + val_docs) == sorted(corpus)
    assert len(val_docs) == meta["splits"]["val"]["num_documents"]
    # val_fraction=0.05 of the text, as whole documents, overshooting by at most 25%
    val_chars = sum(len(d) for d in val_docs)
    assert 0.05 <= val_chars / meta["num_chars"] <= 0.0625


def test_corpus_pydoc_prepares_the_small_corpus(tmp_path, capsys):
    rc, out, err = run_cli(["--corpus", "pydoc", "--data_dir", str(tmp_path / "c")], capsys)
    assert rc == 0, err
    meta = load_meta(str(tmp_path / "c"))
    assert meta["source"]["corpus"] == "pydoc_data.topics" and meta["num_documents"] == len(builtin_corpus("pydoc"))
    assert f"from {meta['num_documents']} documents" in out


# ----------------------------------------------------------------------------- --data_dir and its old name

def test_help_names_data_dir_and_not_its_old_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--data_dir DATA_DIR" in out and "--cache_dir" not in out


def test_cache_dir_is_still_accepted_for_data_dir(tmp_path, capsys, write_inputs, monkeypatch):
    src = write_inputs(tmp_path / "in")
    monkeypatch.chdir(tmp_path)  # were the old name ignored, the default ./data_cache would appear here
    rc, out, err = run_cli(["--input_dir", str(src), "--cache_dir", str(tmp_path / "old")], capsys)
    assert rc == 0, err
    assert load_meta(str(tmp_path / "old"))["source"]["kind"] == "input_dir"
    assert out.rstrip().endswith(f"-> {tmp_path / 'old'}")
    rc, out, err = run_cli(["--cache_dir", str(tmp_path / "old"), "--check"], capsys)
    assert rc == 0 and "complete" in out, err
    assert not (tmp_path / "data_cache").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--num_proc", "two"], "argument --num_proc: invalid int value: 'two'"),
    (["--input_dir", "a", "--dataset", "b"], "argument --dataset: not allowed with argument --input_dir"),
    (["--input_dir", "a", "--corpus", "pydoc"], "argument --corpus: not allowed with argument --input_dir"),
    (["--corpus", "tiny"], "argument --corpus: invalid choice: 'tiny'"),
    (["--num_proc", "0"], "num_proc=0 is invalid: expected an integer >= 1"),
])
def test_usage_mistakes_exit_2_with_one_line(argv, fragment, tmp_path):
    # both kinds of user error: one argparse rejects and one prepare() rejects, through the real entry point
    r = subprocess.run([sys.executable, "-m", "blues.cli.prepare", *argv, "--data_dir", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_USAGE == 2 and r.stdout == ""
    assert r.stderr.startswith("blues-prepare: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert fragment in r.stderr
    assert_nothing_complete(tmp_path / "c")


# ----------------------------------------------------------------------------- bad inputs: one line, nothing left

def test_empty_folder(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    rc, _, err = run_cli(["--input_dir", str(tmp_path / "in"), "--data_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "is empty")
    assert_nothing_complete(tmp_path / "c")


def test_no_matching_files(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "table.csv").write_text("a,b\n")
    rc, _, err = run_cli(["--input_dir", str(tmp_path / "in"), "--data_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "has no .txt, .md, .jsonl, .json, .parquet files", "'table.csv'")
    assert_nothing_complete(tmp_path / "c")


def test_missing_input_dir(tmp_path, capsys):
    rc, _, err = run_cli(["--input_dir", str(tmp_path / "nope"), "--data_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "does not exist")
    assert_nothing_complete(tmp_path / "c")


def test_jsonl_line_without_the_text_field_names_file_and_line(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.txt").write_text("fine")
    (src / "rows.jsonl").write_text('{"text": "ok"}\n{"body": "no text here", "id": 2}\n')
    rc, _, err = run_cli(["--input_dir", str(src), "--data_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "rows.jsonl line 2 has no field 'text' (fields: body, id)", "--text_field")
    assert_nothing_complete(tmp_path / "c")


def test_invalid_json_names_file_and_line(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "rows.jsonl").write_text('{"text": "ok"}\n{"text": "also ok"}\n{"text": "broken\n')
    rc, _, err = run_cli(["--input_dir", str(src), "--data_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "rows.jsonl line 3 is not valid JSON")
    assert_nothing_complete(tmp_path / "c")
    (src / "rows.jsonl").unlink()
    (src / "list.json").write_text('[{"text": "a"},\n {"text": "b"\n]')
    rc, _, err = run_cli(["--input_dir", str(src), "--data_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "list.json is not valid JSON", "line 3")
    assert_nothing_complete(tmp_path / "c")


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, capsys, split_documents):
    src = tmp_path / "in"
    src.mkdir()
    raw = b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd kept"  # 3 invalid sequences; the last U+FFFD is real text
    (src / "latin1.txt").write_bytes(raw)
    (src / "rows.jsonl").write_bytes(b'{"text": "bad \x80 byte"}\n{"text": "clean"}\n')
    rc, _, err = run_cli(["--input_dir", str(src), "--data_dir", str(tmp_path / "c"), "--val_fraction", "0"], capsys)
    assert rc == 0, err
    assert "replaced 4 invalid UTF-8 sequence(s) with U+FFFD in 2 file(s)" in err
    meta = load_meta(str(tmp_path / "c"))
    assert meta["invalid_utf8_replaced"] == 4
    assert split_documents(tmp_path / "c", "train")[0] == raw.decode("utf-8", "replace")


def test_dataset_that_cannot_be_reached_offline(tmp_path, capsys, no_network):
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    t0 = time.perf_counter()
    rc, _, err = run_cli(["--dataset", "nobody-here/no-such-dataset", "--data_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "'nobody-here/no-such-dataset' cannot be reached offline", "HF_HUB_OFFLINE=1")
    assert time.perf_counter() - t0 < 30  # no stall on requests (the datasets import is most of it)
    assert_nothing_complete(tmp_path / "c")
    assert {k: os.environ.get(k) for k in env_before} == env_before


def test_dataset_without_the_text_field(tmp_path, capsys):
    src = tmp_path / "ds"
    src.mkdir()
    (src / "part.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    rc, _, err = run_cli(["--dataset", str(src), "--data_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "has no field 'text' (fields: body)")
    assert_nothing_complete(tmp_path / "c")


def test_vocab_size_the_corpus_cannot_reach(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("a small corpus " * 20)
    (src / "b.txt").write_text("another small document")
    rc, _, err = run_cli(["--input_dir", str(src), "--data_dir", str(tmp_path / "c"), "--vocab_size", "50000"],
                         capsys)
    assert_one_line_error(rc, err, "vocab_size=50000 cannot be reached", "supports only")
    assert_nothing_complete(tmp_path / "c")


def test_unwritable_data_dir(tmp_path, capsys, write_inputs):
    src = write_inputs(tmp_path / "in")
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    rc, _, err = run_cli(["--input_dir", str(src), "--data_dir", str(blocker / "cache")], capsys)
    assert_one_line_error(rc, err, "is not writable", "pass a --data_dir you can write to")
    if os.geteuid() != 0:  # root writes anywhere, so a read-only folder only tests an ordinary user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        rc, _, err = run_cli(["--input_dir", str(src), "--data_dir", str(ro / "cache")], capsys)
        assert_one_line_error(rc, err, "is not writable")


def test_single_document_cannot_be_split(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "book.txt").write_text("one long book")
    rc, _, err = run_cli(["--input_dir", str(src), "--data_dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(rc, err, "needs at least 2", "--val_fraction 0")
    assert_nothing_complete(tmp_path / "c")


def test_tokenizer_that_does_not_match_the_prepared_shards(tmp_path, capsys, builtin_cache):
    other = tmp_path / "other"
    train_tokenizer(builtin_corpus("pydoc")[:10], 700, "other-700").save(str(other))
    rc, out, err = run_cli(["--data_dir", builtin_cache, "--check"], capsys)
    assert rc == 0 and "matches 'default'" in out
    rc, _, err = run_cli(["--data_dir", builtin_cache, "--check", "--tokenizer", str(other)], capsys)
    assert_one_line_error(rc, err, "tokenizer 'other-700' (700 ids",
                          "prepared with tokenizer 'blues-default-4096' (4096 ids")
    with pytest.raises(ValueError, match="does not match the data"):
        TokenLoader(builtin_cache, "train", 16, 2, tokenizer=str(other))
    rc, _, err = run_cli(["--data_dir", str(tmp_path / "empty"), "--check"], capsys)
    assert_one_line_error(rc, err, "does not exist")


def test_cli_error_through_the_real_entry_point_has_no_traceback(tmp_path):
    (tmp_path / "in").mkdir()
    r = subprocess.run([sys.executable, "-m", "blues.cli.prepare", "--input_dir", str(tmp_path / "in"),
                        "--data_dir", str(tmp_path / "c")], capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_USAGE and r.stdout == ""
    assert r.stderr.startswith("blues-prepare: error: ") and r.stderr.count("\n") == 1, r.stderr

