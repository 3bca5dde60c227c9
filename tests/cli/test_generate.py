"""blues-generate: the CLI over Blues.from_pretrained and generate(), and its --interactive prompt loop."""
import os
import pty
import re
import select
import sys
import time

import pytest
import torch

from blues.cli.generate import main
from blues.config import BluesConfig
from blues.data.tokenizer import default_tokenizer
from blues.model import Blues

# the model of tests/test_weights.py, which this test came from
CFG = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32, num_kv_heads=2, num_experts=4, top_k=2,
           expert_ffn_size=24, num_shared_experts=1, num_dense_layers=1)


def build(**kw) -> Blues:
    torch.manual_seed(0)
    return Blues(BluesConfig.from_dict({**CFG, **kw})).eval()


def test_blues_generate_cli(tmp_path, capsys):
    tok = default_tokenizer()
    model = build(vocab_size=tok.n_vocab)
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    assert main(["--model", str(tmp_path), "--prompt", "def f", "--max_new_tokens", "6", "--temperature", "0"]) == 0
    expected = model.generate("def f", tokenizer=tok, max_new_tokens=6, temperature=0)
    assert capsys.readouterr().out == expected + "\n"
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blues-generate: error:") and "config.json' does not exist" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line_exit_2(tmp_path, capsys, device):
    tok = default_tokenizer()
    build(vocab_size=tok.n_vocab).save_pretrained(str(tmp_path), tokenizer=tok)
    assert main(["--model", str(tmp_path), "--prompt", "x", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err == f"blues-generate: error: --device {device!r}: this machine has no CUDA device; use --device cpu\n"


def test_a_device_that_is_not_one_is_refused(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--prompt", "x", "--device", "gpu7"]) == 2
    err = capsys.readouterr().err
    assert "--device 'gpu7' is not a device" in err and "Traceback" not in err


def test_help_names_the_folder_training_writes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "out/model" in capsys.readouterr().out


# ----------------------------------------------------------------------------- --interactive through a terminal

def _spawn_repl(model_dir):
    """blues-generate --interactive as the child of a real pseudo-terminal (its controlling terminal: Ctrl-C and
    Ctrl-D typed into it act as on a console). Returns (pid, master fd)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the CLI
        os.environ["OMP_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "blues.cli.generate", "--model", str(model_dir),
                                  "--interactive", "--temperature", "0.8"])
    return pid, fd


def _read_until(fd, marker: bytes, seen: bytearray, timeout: float = 120.0) -> str:
    """Read the terminal until `marker` appears in `seen` (the bytes read and not yet consumed); consume and
    return the text up to the marker, line ends as written (the terminal turns \n into \r\n)."""
    start, deadline = 0, time.monotonic() + timeout
    while marker not in seen[start:]:
        left = deadline - time.monotonic()
        shown = bytes(seen).decode(errors="replace")
        assert left > 0, f"no {marker!r} within {timeout} s; the terminal showed:\n{shown}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            assert chunk, f"the terminal closed before {marker!r}:\n{bytes(seen).decode(errors='replace')}"
            seen += chunk
    end = seen.index(marker, start) + len(marker)
    text = bytes(seen[start:end]).decode(errors="replace")
    del seen[:end]
    return text.replace("\r\n", "\n")


def _wait_reading(pid, timeout: float = 30.0) -> None:
    """Wait until the REPL, its prompt printed, sleeps in its read of the terminal. CPython runs a Python
    signal handler between bytecodes: a SIGINT landing after the prompt is printed but before the read
    blocks is only acted on when the read returns (measured: 3 runs in 4 hung here on a loaded machine).
    A person types Ctrl-C long after the prompt; a test has to wait for that moment."""
    stat = f"/proc/{pid}/stat"
    if not os.path.exists(stat):  # no procfs: give the child a moment instead
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(stat) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "S":  # state of the main thread: sleeping
                return
        time.sleep(0.05)
    raise AssertionError(f"the REPL did not wait for input within {timeout} s")


def _exit_code(pid, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError(f"the REPL did not exit within {timeout} s")


@pytest.mark.slow  # two interpreter starts that import torch: ~10-30 s on 2 loaded cores
def test_interactive_repl_through_a_pseudo_terminal(tmp_path):
    """A prompt, setting changes (good and bad), an answer streamed with its tokens/s line, a long answer stopped
    by Ctrl-C (the loop goes on), then Ctrl-D: exit 0. The answer is the greedy continuation generate() gives,
    and the token count is its number of new tokens."""
    tok = default_tokenizer()
    model = build(vocab_size=tok.n_vocab)
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    expected_ids = model.generate(tok.encode("def f"), max_new_tokens=6, temperature=0)
    expected = model.generate("def f", tokenizer=tok, max_new_tokens=6, temperature=0)
    pid, fd = _spawn_repl(tmp_path)
    seen = bytearray()
    try:
        assert "temperature=0.8" in _read_until(fd, b"> ", seen)
        os.write(fd, b"/temp -1\n")
        assert "error: /temp -1: temperature=-1.0 is invalid" in _read_until(fd, b"> ", seen)
        os.write(fd, b"/temp 0\n")
        assert "temperature=0.0" in _read_until(fd, b"> ", seen)
        os.write(fd, b"/max 6\n")
        assert "max_new_tokens=6" in _read_until(fd, b"> ", seen)
        os.write(fd, b"def f\n")
        text = _read_until(fd, b"tokens/s]", seen)
        m = re.search(r"\n\[(\d+) tokens in [\d.]+ s, ([\d.]+) tokens/s\]$", text)
        assert m, text
        assert int(m.group(1)) == len(expected_ids) and float(m.group(2)) > 0
        assert text[:m.start()] == "def f\n" + expected.replace("\r\n", "\n"), text  # the echo, then the answer
        _read_until(fd, b"> ", seen)
        os.write(fd, b"/max 100000\n")  # minutes of tokens: only Ctrl-C ends this answer in time
        _read_until(fd, b"> ", seen)
        os.write(fd, b"def f\n")
        _read_until(fd, b"def f\r\n", seen)  # the echo
        _read_until(fd, b" f", seen)  # the answer has begun
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process
        assert re.search(r"\[\d+ tokens in [\d.]+ s, [\d.]+ tokens/s, stopped\]$", _read_until(fd, b"stopped]", seen))
        _read_until(fd, b"> ", seen)  # the loop goes on
        os.write(fd, b"\x04")  # Ctrl-D on an empty line: end of input
        assert _exit_code(pid) == 0
    finally:
        os.close(fd)
    assert b"Traceback" not in seen


@pytest.mark.slow
def test_interactive_repl_ctrl_c_at_the_prompt_exits_cleanly(tmp_path):
    tok = default_tokenizer()
    build(vocab_size=tok.n_vocab).save_pretrained(str(tmp_path), tokenizer=tok)
    pid, fd = _spawn_repl(tmp_path)
    seen = bytearray()
    try:
        _read_until(fd, b"> ", seen)
        _wait_reading(pid)
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process
        assert _exit_code(pid) == 0
        rest = bytearray()
        try:
            while chunk := os.read(fd, 4096):
                rest += chunk
        except OSError:
            pass
    finally:
        os.close(fd)
    assert b"Traceback" not in seen + rest and b"KeyboardInterrupt" not in seen + rest


def test_interactive_and_prompt_are_one_or_the_other(tmp_path, capsys):
    for argv in (["--model", str(tmp_path)], ["--model", str(tmp_path), "--prompt", "x", "--interactive"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "give --prompt TEXT or --interactive (one of them)" in capsys.readouterr().err


def test_repl_commands_change_settings_or_say_why_not():
    from blues.cli.generate import apply_command
    s = dict(temperature=0.8, top_k=None, top_p=None, max_new_tokens=100)
    assert apply_command(s, "/temp 0.7")["temperature"] == 0.7
    assert apply_command(s, "/top_p 0.9")["top_p"] == 0.9
    assert apply_command({**s, "top_p": 0.9}, "/top_p off")["top_p"] is None
    assert apply_command(s, "/max 200")["max_new_tokens"] == 200 and apply_command(s, "/top_k 5")["top_k"] == 5
    for line, msg in [("/temp", "/temp takes one value (a number), got 0"),
                      ("/temp warm", "/temp 'warm': expected a number"),
                      ("/temp nan", "temperature=nan is invalid"),
                      ("/top_p 1.5", "/top_p 1.5: top_p=1.5 is invalid: expected a number in (0, 1]"),
                      ("/max 2.5", "/max '2.5': expected an integer"),
                      ("/top_k 0", "top_k=0 is invalid"),
                      ("/tmp 1", "unknown command '/tmp'")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            apply_command(s, line)
