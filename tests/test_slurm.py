"""blues-submit on a real one-node Slurm cluster (launch/slurm_setup.sh starts one; CI runs it first).

Each job trains a small model with 2 CPU processes (deepspeed --hostfile --no_ssh on the CPU
accelerator). State comes from `scontrol show job` (kept for MinJobAge) and the job's own files;
no accounting database is needed.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ZERO2 = str(REPO / "ds_configs" / "zero2.json")
SMALL = ["n_embd=64", "n_layer=1", "n_head=4", "num_kv_heads=1", "block_size=32", "micro_batch_size=2",
         "eval_steps=1", "log_interval=1"]


def _cluster_state() -> str:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed here (bash launch/slurm_setup.sh installs and starts a one-node cluster)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s: no Slurm controller is up (bash launch/slurm_setup.sh starts one)"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in states):
        return (f"no Slurm node is up (sinfo: {(out.stdout + out.stderr).strip() or 'nothing'}); "
                "bash launch/slurm_setup.sh starts a one-node cluster")
    return ""


_WHY_NOT = _cluster_state()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT)]


def job(job_id: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


def wait_for(what, predicate, timeout, job_id=None, log=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = predicate()
        if got:
            return got
        time.sleep(1)
    state = job(job_id) if job_id else {}
    text = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; job state "
                         f"{state.get('JobState')} restarts {state.get('Restarts')}; log tail:\n{text}")


def submit(tmp_path, data_dir, *extra):
    out_dir = tmp_path / "out"
    args = [sys.executable, "-m", "blues.submit", "--preset", "tiny", "--deepspeed_config", ZERO2,
            "--gpus_per_node", "2", "--device", "cpu", "--time", "15", "--job_name", "blues-test",
            "--train_arg=--no_export", f"out_dir={out_dir}", f"data_dir={data_dir}", *SMALL, *extra]
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert job_id.isdigit(), r.stdout
    return job_id, out_dir, out_dir / "slurm" / f"blues-test-{job_id}.log"


def finished(job_id):
    def check():
        s = job(job_id)
        return s if s["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else None
    return check


def latest_step(out_dir: Path) -> int:
    tag = (out_dir / "checkpoints" / "latest").read_text().strip()
    return int(re.fullmatch(r"step_(\d+)", tag).group(1))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Prepared once by the first job's rank 0 (the built-in corpus), shared by the others."""
    return tmp_path_factory.mktemp("slurm_data") / "data"


@pytest.fixture(autouse=True)
def cancel_leftovers():
    submitted = []
    yield submitted
    for j in submitted:
        subprocess.run(["scancel", j], capture_output=True)


def test_submitted_job_probes_trains_with_two_processes_and_writes_checkpoints(tmp_path, data_dir, cancel_leftovers):
    # The probe runs first in the job (srun, one blues-probe per node): capped at 2 sequences, and
    # 256 tokens per step / (2 sequences x 32 tokens x 2 ranks) = 2 micro-steps.
    job_id, out_dir, log = submit(tmp_path, data_dir, "max_steps=4", "save_interval=2", "eval_interval=4",
                                  "--probe", "--memory_budget", "8GB", "--max_micro_batch", "2",
                                  "--target_tokens", "256")
    cancel_leftovers.append(job_id)
    state = wait_for("the job to finish", finished(job_id), 300, job_id, log)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-4000:]
    assert "memory probe: micro_batch_size=2 grad_accum=2" in text
    run_config = json.loads((out_dir / "run_config.json").read_text())
    assert run_config["deepspeed"]["train_micro_batch_size_per_gpu"] == 2
    assert run_config["deepspeed"]["gradient_accumulation_steps"] == 2
    assert run_config["deepspeed"]["train_batch_size"] == 8
    assert "512 tokens/step" not in text and "256 tokens/step" in text
    # Two ranks on the allocated node, from the hostfile; the master is the node itself, not 127.0.0.1.
    host = subprocess.run(["scontrol", "show", "hostnames", state["NodeList"]], capture_output=True,
                          text=True).stdout.split()[0]
    assert (out_dir / "slurm" / f"hostfile-{job_id}").read_text() == f"{host} slots=2\n"
    assert f"master {host}:" in text
    assert "rank 0/2:" in text and "rank 1/2:" in text
    assert "step 4/4" in text
    ckpts = sorted(p.name for p in (out_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000002", "step_00000004"]
    assert latest_step(out_dir) == 4
    assert all((out_dir / "checkpoints" / c / "blues_complete.json").exists() for c in ckpts)


def test_usr1_checkpoints_requeues_and_the_second_run_resumes(tmp_path, data_dir, cancel_leftovers):
    job_id, out_dir, log = submit(tmp_path, data_dir, "max_steps=300", "save_interval=1000", "eval_interval=1000")
    cancel_leftovers.append(job_id)
    # Wait until training runs (its USR1 handler is installed once steps are printed) ...
    wait_for("training to start", lambda: log.exists() and re.search(r"step [3-9]/300", log.read_text()), 240,
             job_id, log)
    # ... then preempt it the way Slurm's --signal=B:USR1@N does: USR1 to the batch shell only.
    r = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stopped = wait_for("the checkpoint on USR1", lambda: re.search(r"stopped by a signal after step (\d+)",
                                                                   log.read_text()), 120, job_id, log)
    saved = int(stopped.group(1))
    assert 3 <= saved < 300
    wait_for("the requeue", lambda: int(job(job_id).get("Restarts", 0)) >= 1, 120, job_id, log)
    assert (out_dir / "checkpoints" / f"step_{saved:08d}" / "blues_complete.json").exists()
    state = wait_for("the requeued run to finish", finished(job_id), 400, job_id, log)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-4000:]
    assert state["Restarts"] == "1"
    assert "requeueing job" in text and "run 2 on" in text
    # The second run resumed at the saved step by itself (--resume auto) and finished.
    assert f"at step {saved} (" in text, text[-4000:]
    assert re.search(rf"resumed from \S*step_{saved:08d} at step {saved} ", text)
    assert "step 300/300" in text
    second = text[text.index("run 2 on"):]
    assert f"step {saved}/300 " not in second and f"step {saved + 1}/300 " in second
    assert latest_step(out_dir) == 300
