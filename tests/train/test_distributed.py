"""blues-train through the real `deepspeed` launcher: 2 CPU ranks, gloo.

Each launch costs about 15-25 s on 2 cores (imports and process-group set-up dominate; the steps
of the 64-wide model take ~0.1 s), so launches are shared between assertions where that is
honest, and each test says which launch it reads. The first launch of a CI run JIT-builds
DeepSpeed's comm op (~50 s, cached in ~/.cache/torch_extensions).

Every launch here leaves none of DeepSpeed's /dev/shm allreduce buffers (66 MB per rank) behind,
whatever its exit: normal, by SIGUSR1, a rank SIGKILLed mid-save, non-finite losses (exit 3).
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from blues.common import free_port
from blues.train.ds_config import DS_CONFIG_DIR

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DEEPSPEED = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
DS = DS_CONFIG_DIR
# 64 wide, 32 tokens, 4 sequences per rank: a 2-layer, 4-expert top-2 model (tiny preset otherwise)
SMALL = ["n_embd=64", "block_size=32", "num_experts=4", "micro_batch_size=4", "log_interval=1", "warmup_steps=5"]


def _cmd(args: list[str], port: int) -> list[str]:
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "--module", "blues.train",
            "--progress", "off", *args]


def shm_buffers(port: int) -> list[str]:
    """DeepSpeed's /dev/shm allreduce buffers of the launch whose master port is `port` (any rank)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n)


def launch(args: list[str], cwd, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one launch to its end; its ranks' /dev/shm buffers must be gone by then."""
    e = dict(os.environ, **(env or {}))
    port = free_port()
    assert shm_buffers(port) == []
    p = subprocess.run(_cmd(args, port), cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    assert shm_buffers(port) == [], f"launch exited {p.returncode} and left {shm_buffers(port)}"
    return p


def start(args: list[str], cwd, env: dict | None = None) -> subprocess.Popen:
    """A launch in its own session, with USR1 ignored by the launcher processes (the workers set
    their own handler): how a batch script must start deepspeed to deliver USR1 (see facts notes)."""
    e = dict(os.environ, **(env or {}))
    port = free_port()
    cmd = "trap '' USR1; exec " + " ".join(_cmd(args, port))
    p = subprocess.Popen(["bash", "-c", cmd], cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    p.master_port = port  # for shm_buffers() once it has ended
    return p


def losses(out_dir) -> dict[int, float]:
    """step -> loss from DeepSpeed's CSV monitor (a resumed run appends a new header; later rows win)."""
    path = os.path.join(out_dir, "monitor", "blues", "Train_loss.csv")
    out = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if row and row[0] != "step":
                out[int(row[0])] = float(row[1])
    return out


def latest(out_dir) -> str:
    with open(os.path.join(out_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


def ok(p: subprocess.CompletedProcess) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from blues.data.prepare import prepare
    d = tmp_path_factory.mktemp("data")
    prepare(str(d), progress=False)
    return str(d)


# ----------------------------------------------------------------------------- ZeRO 2, EP=2, DeepSpeed MoE

@pytest.fixture(scope="module")
def ep2_reference(tmp_path_factory, data_dir):
    """30 uninterrupted steps, moe_backend=deepspeed, ep_size=2, ZeRO 2; saves at 10, 20, 30."""
    out = tmp_path_factory.mktemp("ep2_ref")
    p = launch(["--deepspeed_config", f"{DS}/zero2.json", *SMALL, f"data_dir={data_dir}", f"out_dir={out}",
                "moe_backend=deepspeed", "balance_bias_rate=0", "ep_size=2",
                "max_steps=30", "lr_decay_steps=30", "save_interval=10",
                "eval_interval=10", "keep_last=5"], cwd=out)
    return str(out), ok(p)


def test_ep2_zero2_loss_falls_and_experts_are_split(ep2_reference):
    out, log = ep2_reference
    loss = losses(out)
    assert sorted(loss) == list(range(1, 31))
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(26, 31)) / 5
    assert last < first - 0.5, (first, last)
    # 2 MoE layers x 4 experts x 3 matrices of 64x256 (tiny: expert_ffn_size=256); 2 experts per rank
    per_rank = 2 * 2 * 3 * 64 * 256
    for rank in (0, 1):
        assert f"rank {rank}/2: " in log
        line = next(l for l in log.splitlines() if l.startswith(f"rank {rank}/2: "))
        assert f"{per_rank:,} of them expert parameters" in line, line


def test_ep2_export_holds_every_expert(ep2_reference):
    """The exported stacked weights hold all 4 experts per layer: experts 2-3 came from rank 1."""
    import torch
    from safetensors.torch import load_file

    out, _ = ep2_reference
    w = load_file(os.path.join(out, "model", "model.safetensors"))
    tag = os.path.join(out, "checkpoints", "step_00000030")
    for layer in (0, 1):
        assert w[f"blocks.{layer}.mlp.experts.w_gate"].shape == (4, 64, 256)
        assert w[f"blocks.{layer}.mlp.router.weight"].shape == (4, 64)
        for e in range(4):
            # DeepSpeed writes each expert to its own file, named by the global expert id
            sd = torch.load(os.path.join(tag, f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"),
                            map_location="cpu", weights_only=False)
            key = f"blocks.{layer}.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{e}.w_down"
            assert torch.equal(w[f"blocks.{layer}.mlp.experts.w_down"][e], sd[key])


def test_ep2_zero2_exact_resume(ep2_reference, tmp_path, data_dir):
    """Resume from the step-10 checkpoint the reference wrote (the state a 10-step run saves, by the
    same save_checkpoint) in a new launch, 10 more steps: every loss equals the reference's bit for
    bit. max_steps changes 30 -> 20 (compatible, logged); lr_decay_steps=30 keeps the schedule."""
    ref_out, _ = ep2_reference
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    shutil.copytree(os.path.join(ref_out, "checkpoints", "step_00000010"), ck / "step_00000010")
    (ck / "latest").write_text("step_00000010")
    p = launch(["--deepspeed_config", f"{DS}/zero2.json", *SMALL, f"data_dir={data_dir}", f"out_dir={tmp_path}",
                "moe_backend=deepspeed", "balance_bias_rate=0", "ep_size=2",
                "max_steps=20", "lr_decay_steps=30", "save_interval=10",
                "eval_interval=10", "--no_export"], cwd=tmp_path)
    log = ok(p)
    assert "at step 10" in log and "max_steps: 30 -> 20" in log, log[-3000:]
    ref, got = losses(ref_out), losses(tmp_path)
    assert sorted(got) == list(range(11, 21))
    assert [got[s] for s in range(11, 21)] == [ref[s] for s in range(11, 21)]


# ----------------------------------------------------------------------------- ZeRO 3, stacked experts

ZERO3 = ["--deepspeed_config", f"{DS}/zero3.json", *SMALL, "moe_backend=torch", "max_steps=20", "lr_decay_steps=20",
         "eval_interval=10", "save_interval=100"]


@pytest.fixture(scope="module")
def zero3_reference(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("z3_ref")
    p = launch([*ZERO3, f"data_dir={data_dir}", f"out_dir={out}"], cwd=out)
    return str(out), ok(p)


def test_zero3_trains_exports_every_expert_and_generates(zero3_reference):
    import torch
    from safetensors.torch import load_file

    out, log = zero3_reference
    loss = losses(out)
    assert sum(loss[s] for s in range(16, 21)) / 5 < sum(loss[s] for s in range(1, 6)) / 5 - 0.3
    assert "ZeRO 3 | moe_backend=torch" in log
    w = load_file(os.path.join(out, "model", "model.safetensors"))
    for layer in (0, 1):
        experts = w[f"blocks.{layer}.mlp.experts.w_up"]
        assert experts.shape == (4, 64, 256)  # gathered from the ZeRO 3 partitions, all 4 experts
        assert all(not torch.equal(experts[i], experts[j]) for i in range(4) for j in range(i + 1, 4))
    g = subprocess.run(["blues-generate", "--model", os.path.join(out, "model"), "--prompt", "The",
                        "--max_new_tokens", "8", "--seed", "0"], capture_output=True, text=True, timeout=120)
    assert g.returncode == 0 and g.stdout.strip(), g.stderr[-2000:]


def test_sigusr1_saves_exits_0_and_zero3_resume_is_exact(zero3_reference, tmp_path, data_dir):
    """USR1 to the launcher's process group mid-run: the step finishes, a checkpoint is written, exit 0.
    A new launch resumes at the next step and reproduces the uninterrupted ZeRO 3 run bit for bit."""
    ref_out, _ = zero3_reference
    args = [*ZERO3, f"data_dir={data_dir}", f"out_dir={tmp_path}"]
    p = start(args, cwd=tmp_path, env={"BLUES_TEST_STEP_SLEEP": "0.3"})
    csv_path = os.path.join(tmp_path, "monitor", "blues", "Train_loss.csv")
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(csv_path) and len(losses(tmp_path)) >= 4:
            break
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGUSR1)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-4000:]
    assert shm_buffers(p.master_port) == []  # stopped by a signal: each rank removed its buffer
    stopped = [l for l in out.splitlines() if l.startswith("stopped by a signal after step")]
    assert stopped, out[-3000:]
    k = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 4 <= k < 20
    assert latest(tmp_path) == f"step_{k:08d}"
    assert os.path.isfile(os.path.join(tmp_path, "checkpoints", f"step_{k:08d}", "blues_complete.json"))

    p2 = launch([*args, "--no_export"], cwd=tmp_path)
    log = ok(p2)
    assert f"at step {k} " in log, log[-3000:]
    ref, got = losses(ref_out), losses(tmp_path)
    assert sorted(got) == list(range(1, 21))
    assert [got[s] for s in range(1, 21)] == [ref[s] for s in range(1, 21)]


# ----------------------------------------------------------------------------- failures

def test_rank_killed_mid_save_no_hang_resume_from_last_complete(tmp_path, data_dir):
    """ZeRO 1 with the expert-parallel DeepSpeed MoE (EP=2), so that stage trains and resumes here too.
    Launch 1: rank 0's loss is NaN at step 3 (both ranks skip it, no hang); rank 1 SIGKILLs itself
    while the step-10 checkpoint is being written (files written, not committed). The launcher exits
    non-zero within 60 s; `latest` still names step 5; step 10 has no completion marker.
    Launch 2: resumes from step 5; NaN at steps 7 and 8 with max_bad_steps=2 stops the run (exit 3)
    without saving, so the step-5 checkpoint stays the latest."""
    args = ["--deepspeed_config", f"{DS}/zero1.json", *SMALL, f"data_dir={data_dir}", f"out_dir={tmp_path}",
            "moe_backend=deepspeed", "balance_bias_rate=0", "ep_size=2", "max_steps=30", "save_interval=5",
            "eval_interval=100",
            "--no_export"]
    p = start(args, cwd=tmp_path, env={"BLUES_FAULT_NAN_STEPS": "3", "BLUES_FAULT_KILL_IN_SAVE": "10"})
    lines, t_step10 = [], None
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step 10/30") and t_step10 is None:
            t_step10 = time.time()
    p.wait(timeout=120)
    out = "".join(lines)
    assert shm_buffers(p.master_port) == []  # rank 1 SIGKILLed, rank 0 killed by the launcher
    assert t_step10 is not None, out[-3000:]
    assert p.returncode != 0
    assert time.time() - t_step10 < 60, "the launcher took more than 60 s to give up after the kill"
    assert "step 3/30 | SKIPPED: non-finite loss" in out
    assert "step 4/30 | loss" in out  # training went on after the skipped step
    assert latest(tmp_path) == "step_00000005"
    assert os.path.isdir(tmp_path / "checkpoints" / "step_00000010")
    assert not os.path.exists(tmp_path / "checkpoints" / "step_00000010" / "blues_complete.json")

    p2 = launch([*args, "max_bad_steps=2"], cwd=tmp_path, env={"BLUES_FAULT_NAN_STEPS": "7,8"})
    log = p2.stdout + p2.stderr
    assert p2.returncode == 3, log[-3000:]
    assert "step_00000005 at step 5 " in log
    assert "stopping: 2 non-finite losses in a row" in log
    assert latest(tmp_path) == "step_00000005"


def test_ep_size_not_dividing_world_size_under_launcher(tmp_path):
    p = launch(["ep_size=4", "moe_backend=deepspeed", "balance_bias_rate=0", f"out_dir={tmp_path}"], cwd=tmp_path,
               timeout=120)
    assert p.returncode != 0
    err = p.stderr
    assert "blues-train: error: ep_size=4 is invalid: must divide the world size 2" in err, err[-2000:]
    assert "Traceback" not in err
