"""python -m blues.cli.tokenizer: train and info, and user errors as one line with exit 2."""
import subprocess
import sys

from blues.cli.tokenizer import main
from blues.common import EXIT_USAGE
from blues.data.sources import builtin_corpus


def test_cli_train_and_info(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text(" ".join(builtin_corpus("pydoc")[:5]))
    assert main(["train", "--out", str(tmp_path / "t"), "--vocab_size", "700", "--input_dir", str(src)]) == 0
    assert "n_vocab=700" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "t")]) == 0
    assert "n_vocab=700 eot_id=699" in capsys.readouterr().out


def test_cli_unreachable_vocab_is_one_line_error(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("tiny text " * 10)
    assert main(["train", "--out", str(tmp_path / "t"), "--vocab_size", "5000", "--input_dir", str(src)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("python -m blues.cli.tokenizer: error: vocab_size=5000 cannot be reached")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "t").exists()


def test_cli_unwritable_out_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text(" ".join(builtin_corpus("pydoc")[:5]))
    rc = main(["train", "--out", str(blocker / "t"), "--vocab_size", "300", "--input_dir", str(src)])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and err.count("\n") == 1, err
    assert f"--out '{blocker / 't'}' cannot be written" in err


def test_cli_usage_mistakes_exit_2_with_one_line():
    for argv, fragment in ((["train"], "the following arguments are required: --out"),
                           (["info", "no-such-tokenizer"], "'no-such-tokenizer' is neither 'default'"),
                           (["nope"], "invalid choice: 'nope'")):
        r = subprocess.run([sys.executable, "-m", "blues.cli.tokenizer", *argv], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == EXIT_USAGE and r.stdout == "", (argv, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert fragment in r.stderr, (fragment, r.stderr)
