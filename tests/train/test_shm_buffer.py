"""blues.train.distributed names DeepSpeed's /dev/shm allreduce buffer as DeepSpeed does (the runs
that remove it are in test_distributed.py and test_cli.py), destroys its process groups at exit, and
ends a rank with exit_process."""
import os
import re

import pytest

from blues.train.distributed import remove_shm_buffer, shm_buffer_path


def test_name_matches_deepspeeds_format():
    import deepspeed
    src = os.path.join(os.path.dirname(deepspeed.__file__), "ops", "csrc", "cpu", "comm", "shm.cpp")
    if not os.path.isfile(src):
        pytest.skip(f"DeepSpeed's sources are not installed ({src})")
    text = open(src, encoding="utf-8").read()
    # the two snprintf formats the path is built from: prefix_uid_addr_port, then _rank
    assert '#define SHM_BUFFER_NAME "deepspeed_allreduce_buffer"' in text
    assert re.search(r'"%s_%d_%s_%s",\s*SHM_BUFFER_NAME,\s*getuid\(\),\s*addr_string,\s*port_string', text)
    assert re.search(r'snprintf\(shm_name, NAME_BUF_SIZE, "%s_%d", shm_name_prefix, rank\)', text)
    path = shm_buffer_path(1, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"})
    assert path == f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29511_1"


def test_remove_is_idempotent_and_touches_only_its_file(tmp_path):
    mine, other = tmp_path / "a_29511_0", tmp_path / "a_29511_1"
    mine.write_bytes(b"x")
    other.write_bytes(b"x")
    remove_shm_buffer(str(mine))
    remove_shm_buffer(str(mine))  # the atexit hook repeats it: no error
    assert not mine.exists() and other.exists()


def test_the_process_group_is_destroyed_before_the_interpreter_exits(tmp_path):
    """init_distributed's exit hook destroys every process group (NCCL's communicators are shut down
    there). A hook registered before init_distributed runs after init's hooks (atexit is last-in,
    first-out) and sees no process group left."""
    import subprocess
    import sys
    script = tmp_path / "exit.py"
    script.write_text(
        "import atexit, torch\n"
        "atexit.register(lambda: print('initialized at exit:', torch.distributed.is_initialized(), flush=True))\n"
        "from blues.train.distributed import init_distributed\n"
        "init_distributed()\n"
        "print('initialized in main:', torch.distributed.is_initialized(), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "initialized in main: True" in p.stdout and "initialized at exit: False" in p.stdout, p.stdout


EXIT_SCRIPT = r"""
import atexit, os, sys, threading, time
import torch
out = sys.argv[1]

class Teardown:  # a module global: the interpreter's teardown frees it, and its __del__ leaves a file
    def __del__(self, path=os.path.join(out, "teardown"), open=open):  # bound now: teardown clears globals
        open(path, "w").write("ran")

KEEP = Teardown()
atexit.register(lambda: open(os.path.join(out, "atexit"), "w").write(str(torch.distributed.is_initialized())))
from blues.train import exit_process, init_distributed
init_distributed()

def work():  # a non-daemon thread still working when the script ends
    time.sleep(0.5)
    open(os.path.join(out, "thread"), "w").write("joined")

threading.Thread(target=work).start()
sys.stdout.write("written, not flushed")  # stdout is a pipe here: block-buffered
if sys.argv[2] == "exit_process":
    exit_process(3)
sys.exit(3)
"""


@pytest.mark.parametrize("end", ["exit_process", "sys.exit"])
def test_exit_process_runs_the_exit_hooks_and_skips_the_teardown(tmp_path, end):
    """exit_process(3): exit status 3, the non-daemon thread joined, every atexit hook run (the
    process groups destroyed before the script's own hook), stdout flushed, and the interpreter's
    teardown (where gloo ranks aborted with -6) skipped: a module global's __del__ never runs. sys.exit(3)
    is the control: the same script, and there the teardown runs."""
    import subprocess
    import sys
    script = tmp_path / "end.py"
    script.write_text(EXIT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    p = subprocess.run([sys.executable, str(script), str(tmp_path), end], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 3, p.stderr[-3000:]
    assert p.stdout.endswith("\nwritten, not flushed"), p.stdout[-500:]  # after DeepSpeed's own lines
    assert (tmp_path / "thread").read_text() == "joined"
    assert (tmp_path / "atexit").read_text() == "False"
    assert (tmp_path / "teardown").exists() == (end == "sys.exit")
