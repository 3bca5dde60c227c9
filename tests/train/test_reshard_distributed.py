"""Resume at another ep_size and world size (blues.train.reshard) through blues-train: 2 CPU ranks on the
real `deepspeed` launcher (gloo), ZeRO 2, fp32, router noise off.

One chain of runs, each resumed from a checkpoint the previous one wrote, compared with one
uninterrupted run (ref, ep_size=2 on 2 ranks, checkpoints at steps 7 and 14):
    ep2_to_ep1     ref's step 7 -> ep_size=1 on 2 ranks, to step 14 (saves an ep_size=1 checkpoint)
    ep1_to_ep2     ep2_to_ep1's step 14 -> ep_size=2 on 2 ranks, to step 20
    two_to_one     ref's step 7 -> ep_size=1 on ONE rank with micro_batch_size 8, to step 14: the same
                   global batch of 8 sequences (the data stream moves to one rank without a gap), so
                   the same losses
Every loss of a resumed run is within 1e-5 of ref's at the same step: ep_size=2 and ep_size=1 differ
only in summation order (issue 10's parity bound), one rank and two only in how the data-parallel mean
is summed. aux_loss_coef=0 because the Switch loss is not linear in the batch (a mean of two ranks' losses
is not the loss of their union); balance_bias_rate > 0 so the selection bias crosses every reshard too.
A wrong expert order, a stale expert, lost Adam moments or a lost bias move the next losses by 1e-3 or
more at this learning rate.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import pytest

from blues.common import free_port
from blues.train.ds_config import DS_CONFIG_DIR

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DEEPSPEED = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
COMMON = ["--deepspeed_config", os.path.join(DS_CONFIG_DIR, "zero2.json"), "--progress", "off", "n_embd=64",
          "block_size=32", "log_interval=1", "warmup_steps=5", "router_noise_std=0", "aux_loss_coef=0",
          "balance_bias_rate=0.01", "moe_backend=torch", "lr_decay_steps=20", "save_interval=7",
          "eval_interval=100", "keep_last=5", "--no_export"]


def run(args: list[str], cwd, ranks: int = 2) -> str:
    """blues-train on `ranks` processes (the launcher for 2); its output. It must exit 0 and leave
    none of DeepSpeed's /dev/shm buffers of its port behind."""
    port = free_port()
    if ranks == 2:
        cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "--module", "blues.train", *args]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "blues-train"), *args]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, MASTER_PORT=str(port)))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n]
    return out


def losses(out_dir) -> dict[int, float]:
    out = {}
    with open(os.path.join(out_dir, "monitor", "blues", "Train_loss.csv"), newline="") as f:
        for row in csv.reader(f):
            if row and row[0] != "step":
                out[int(row[0])] = float(row[1])
    return out


def start_from(src_out, step: int, dst_out) -> None:
    """dst_out/checkpoints holds a copy of src_out's step-`step` checkpoint, named by `latest`."""
    tag = f"step_{step:08d}"
    os.makedirs(os.path.join(dst_out, "checkpoints"))
    shutil.copytree(os.path.join(src_out, "checkpoints", tag), os.path.join(dst_out, "checkpoints", tag))
    with open(os.path.join(dst_out, "checkpoints", "latest"), "w") as f:
        f.write(tag)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from blues.data.prepare import prepare
    d = tmp_path_factory.mktemp("reshard")
    prepare(str(d / "data"), progress=False)
    data = f"data_dir={d / 'data'}"
    logs = {"ref": run([*COMMON, data, f"out_dir={d / 'ref'}", "micro_batch_size=4", "ep_size=2", "max_steps=20"], d)}
    start_from(d / "ref", 7, d / "ep2_to_ep1")
    logs["ep2_to_ep1"] = run([*COMMON, data, f"out_dir={d / 'ep2_to_ep1'}", "micro_batch_size=4", "ep_size=1",
                              "max_steps=14"], d)
    start_from(d / "ep2_to_ep1", 14, d / "ep1_to_ep2")
    logs["ep1_to_ep2"] = run([*COMMON, data, f"out_dir={d / 'ep1_to_ep2'}", "micro_batch_size=4", "ep_size=2",
                              "max_steps=20"], d)
    start_from(d / "ref", 7, d / "two_to_one")
    logs["two_to_one"] = run([*COMMON, data, f"out_dir={d / 'two_to_one'}", "micro_batch_size=8", "ep_size=1",
                              "max_steps=14"], d, ranks=1)
    return d, logs


def _close(got: dict[int, float], ref: dict[int, float], steps: range) -> float:
    assert sorted(got) == list(steps), sorted(got)
    worst = max(abs(got[s] - ref[s]) for s in steps)
    assert worst <= 1e-5, (worst, {s: (got[s], ref[s]) for s in steps})
    return worst


def test_ep2_to_ep1_and_back_continue_like_the_uninterrupted_run(chain):
    d, logs = chain
    ref = losses(d / "ref")
    assert sorted(ref) == list(range(1, 21))
    assert "at step 7" in logs["ep2_to_ep1"] and "ep_size: 2 -> 1" in logs["ep2_to_ep1"]
    _close(losses(d / "ep2_to_ep1"), ref, range(8, 15))
    assert "at step 14" in logs["ep1_to_ep2"] and "ep_size: 1 -> 2" in logs["ep1_to_ep2"]
    _close(losses(d / "ep1_to_ep2"), ref, range(15, 21))
    for name in ("ep2_to_ep1", "ep1_to_ep2"):  # the converted copy served the load only
        assert not [n for n in os.listdir(d / name / "checkpoints") if n.endswith(".universal")]


def test_two_ranks_to_one_continues_like_the_uninterrupted_run(chain):
    d, logs = chain
    log = logs["two_to_one"]
    assert "at step 7" in log and "micro_batch_size: 4 -> 8" in log and "ep_size: 2 -> 1" in log
    assert "served a second time" not in log  # 7 steps x 4 windows x 2 ranks: the stream moves exactly
    _close(losses(d / "two_to_one"), losses(d / "ref"), range(8, 15))
