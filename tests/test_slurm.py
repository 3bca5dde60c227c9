"""blues-submit and blues.slurm: the script it writes, the checks of --dry-run and bad inputs (on a
PATH without Slurm), then the same against the real one-node Slurm cluster (launch/slurm_setup.sh
starts one; CI runs it first): a bad partition refused in Slurm's own words, and real jobs.

Each real job trains a small model with 2 CPU processes (deepspeed --hostfile --no_ssh on the CPU
accelerator). State comes from `scontrol show job` (kept for MinJobAge) and the job's own files;
no accounting database is needed. Without a usable cluster those tests skip, except under CI
(CI=true), where they fail: CI starts the cluster, so a missing one is a broken CI, not less to test.
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

from blues import slurm

REPO = Path(__file__).resolve().parent.parent
ZERO2 = str(REPO / "ds_configs" / "zero2.json")
SMALL = ["n_embd=64", "n_layer=1", "n_head=4", "num_kv_heads=1", "block_size=32", "num_experts=4", "micro_batch_size=2",
         "eval_steps=1", "log_interval=1"]


# ----------------------------------------------------------------------------- without a cluster

def run_cli(args, path=None, cwd=None):
    """blues-submit as a user runs it: a separate process, its exit code, stdout and stderr."""
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "blues.cli.submit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or REPO, timeout=120)


def assert_one_line_error(r, match):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("blues-submit: error: ") and match in lines[0], lines[0]


@pytest.fixture
def no_slurm(tmp_path):
    """A PATH without any Slurm command (the python running the CLI is given by absolute path)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    return str(empty)


def dry_run(tmp_path, *extra, path=None):
    return run_cli(["--preset", "tiny", "--deepspeed_config", ZERO2, f"out_dir={tmp_path / 'out'}", "--dry-run",
                    *extra], path=path)


def test_dry_run_writes_a_script_with_hostfile_per_node_launchers_and_requeue(tmp_path, no_slurm):
    r = dry_run(tmp_path, "--nodes", "2", "--nproc_per_node", "4", "--time", "02:00:00", "--partition", "gpu",
                "--account", "proj", "--device", "gpu", path=no_slurm)
    assert r.returncode == 0, r.stderr
    script = r.stdout
    assert script.startswith("#!/bin/bash\n# Written by: blues-submit ")
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--time=02:00:00",
                      "--partition=gpu", "--account=proj", "--signal=B:USR1@120", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {directive}\n" in script, directive
    # The deepspeed launcher replaces --master_addr with 127.0.0.1 unless it has a hostfile.
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script and 'slots=" s' in script
    assert '--hostfile "$1" --no_ssh --node_rank "$SLURM_NODEID"' in script
    assert "trap \"\" USR1; exec deepspeed" in script  # the launcher survives the USR1 meant for training
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "--resume auto" in script
    assert "{{" not in script
    # Written where the stderr says, identical to what was printed, and valid bash.
    written = Path(tmp_path / "out" / "slurm" / "blues.sbatch")
    assert written.read_text() == script
    assert subprocess.run(["bash", "-n", str(written)]).returncode == 0
    assert "not submitted" in r.stderr and "partition not checked: sinfo is not available here" in r.stderr


def test_dry_run_reports_world_and_batch_arithmetic(tmp_path, no_slurm):
    r = dry_run(tmp_path, "--nodes", "2", "--nproc_per_node", "2", "micro_batch_size=3", "grad_accum=5",
                path=no_slurm)
    assert r.returncode == 0, r.stderr
    assert "world size 4 = 2 node(s) x 2 process(es) per node" in r.stderr
    # tiny has block_size 128: 3 x 5 x 4 = 60 sequences = 7680 tokens
    assert "global batch 60 sequences = micro_batch_size 3 x grad_accum 5 x 4 ranks = 7680 tokens" in r.stderr


def test_cpu_device_asks_cores_not_gpus(tmp_path, no_slurm):
    r = dry_run(tmp_path, "--nproc_per_node", "2", "--device", "cpu", path=no_slurm)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --cpus-per-task=2\n" in r.stdout and "gpus-per-node" not in r.stdout
    assert "NPROC_PER_NODE=2\n" in r.stdout


def test_probe_block_feeds_the_probed_config_to_training(tmp_path, no_slurm):
    r = dry_run(tmp_path, "--nproc_per_node", "2", "--device", "cpu", "--probe", "--memory_budget", "2GB",
                "--target_tokens", "4096", path=no_slurm)
    assert r.returncode == 0, r.stderr
    s = r.stdout
    assert "exec blues-probe --nnodes" in s and "--memory_budget 2GB" in s and "--target_tokens 4096" in s
    assert '--deepspeed_config "$PROBE_DIR/ds_config.json"' in s
    assert '"${PROBE_OVERRIDES[@]}" --resume auto' in s


@pytest.mark.parametrize("extra, match", [
    # one line per mistake; each names the flag or field and the value
    (["--nproc_per_node", "2", "num_experts=8", "ep_size=4", "moe_backend=deepspeed", "balance_bias_rate=0"],
     "ep_size=4 does not divide the world size 2 (--nodes 1 x --nproc_per_node 2): use a world size that is a "
     "multiple of 4 (e.g. --nodes 2)"),
    (["--nproc_per_node", "3", "num_experts=8", "ep_size=2", "moe_backend=deepspeed", "balance_bias_rate=0"],
     "ep_size=2 does not divide the world size 3"),
    (["num_experts=4", "ep_size=3"], "ep_size=3 is invalid: must divide num_experts=4"),
    (["--time", "00:01:00"], "--time 00:01:00 (60 s) is not longer than --signal_seconds 120"),
    (["--time", "tomorrow"], "--time 'tomorrow' is not a Slurm time limit"),
    (["--nodes", "0"], "--nodes 0 is invalid"),
    (["--headroom", "1.5"], "--headroom 1.5 is invalid"),
    (["--memory_budget", "lots"], "memory budget 'lots'"),
    (["n_layr=3"], "unknown config field(s): 'n_layr' (did you mean 'n_layer'?)"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, no_slurm, extra, match):
    assert_one_line_error(dry_run(tmp_path, *extra, path=no_slurm), match)


def test_contradicting_deepspeed_batch_is_refused(tmp_path, no_slurm):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_batch_size": 64, "zero_optimization": {"stage": 2}}')
    r = run_cli(["--preset", "tiny", "--deepspeed_config", str(ds), "--nproc_per_node", "2", "--dry-run",
                 "micro_batch_size=8"], path=no_slurm)
    assert_one_line_error(r, "train_batch_size=64 contradicts micro_batch_size=8 * grad_accum=1 * world size 2 = 16")


def test_missing_files_are_one_line_errors(tmp_path, no_slurm):
    r = run_cli(["--config", str(tmp_path / "nope.yaml"), "--deepspeed_config", ZERO2, "--dry-run"], path=no_slurm)
    assert_one_line_error(r, f"config file '{tmp_path / 'nope.yaml'}' does not exist")
    r = run_cli(["--preset", "huge", "--deepspeed_config", ZERO2, "--dry-run"], path=no_slurm)
    assert_one_line_error(r, "preset 'huge' is unknown")
    r = run_cli(["--preset", "tiny", "--deepspeed_config", str(tmp_path / "ds.json"), "--dry-run"], path=no_slurm)
    assert_one_line_error(r, "does not exist")


def test_no_sbatch_on_the_path(tmp_path, no_slurm):
    r = run_cli(["--preset", "tiny", "--deepspeed_config", ZERO2, f"out_dir={tmp_path}"], path=no_slurm)
    assert_one_line_error(r, "sbatch is not on the PATH")


def test_sbatch_refusal_is_surfaced_in_one_line(tmp_path):
    """Slurm's own words, when sbatch itself refuses (here a stand-in printing what sbatch 22.05 prints)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\n"
                                 "echo 'sbatch: error: invalid partition specified: nope' >&2\n"
                                 "echo 'sbatch: error: Batch job submission failed: Invalid partition name "
                                 "specified' >&2\n"
                                 "exit 1\n")
    (fake / "sbatch").chmod(0o755)
    r = run_cli(["--preset", "tiny", "--deepspeed_config", ZERO2, f"out_dir={tmp_path / 'out'}", "--device", "cpu"],
                path=str(fake))
    assert_one_line_error(r, "Slurm refuses the job: invalid partition specified: nope; Batch job submission "
                             "failed: Invalid partition name specified")


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("1:30", 90), ("01:30:00", 5400), ("2-00:00:00", 172800),
                                           ("1-12", 129600), ("0-00:10", 600)])
def test_time_limits_parse_like_slurm(text, seconds):
    assert slurm.parse_time_limit(text) == seconds


def test_the_template_ships_with_the_package_checkout():
    assert slurm.TEMPLATE.is_file()
    assert shutil.which("bash")


def test_gpus_per_node_is_still_accepted_and_help_shows_nproc_per_node(tmp_path, no_slurm):
    r = dry_run(tmp_path, "--gpus_per_node", "3", "--device", "cpu", path=no_slurm)  # the old spelling
    assert r.returncode == 0, r.stderr
    assert "NPROC_PER_NODE=3\n" in r.stdout and "world size 3 = 1 node(s) x 3 process(es) per node" in r.stderr
    h = run_cli(["--help"], path=no_slurm)
    assert h.returncode == 0 and "--nproc_per_node" in h.stdout and "--gpus_per_node" not in h.stdout


def test_sbatch_test_only_is_not_a_test():
    # A library function named test_* is collected by pytest wherever a test module imports it.
    assert not hasattr(slurm, "test_only") and callable(slurm.sbatch_test_only)


# ----------------------------------------------------------------------------- the real cluster

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


def under_ci(env=os.environ) -> bool:
    return env.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(why: str, env=os.environ) -> None:
    """No usable cluster: skip on a developer's machine, fail under CI (explicitly, not only through
    tests/conftest.py's general rule: this module is where a quiet skip once went unnoticed)."""
    if under_ci(env):
        pytest.fail(f"CI=true but the Slurm cluster is not usable: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def cluster():
    why = _cluster_state()
    if why:
        skip_or_fail(why)


def needs_cluster(test):
    return pytest.mark.slurm(pytest.mark.usefixtures("cluster")(test))


def test_a_missing_cluster_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo, no sbatch
    why = _cluster_state()
    assert why.startswith("Slurm is not installed here")
    with pytest.raises(pytest.fail.Exception, match="CI=true but the Slurm cluster is not usable: Slurm is not"):
        skip_or_fail(why, {"CI": "true"})
    with pytest.raises(pytest.skip.Exception, match="Slurm is not installed here"):
        skip_or_fail(why, {})


@needs_cluster
def test_bad_partition_is_refused_by_the_real_cluster(tmp_path):
    """The refusal test_sbatch_refusal_is_surfaced_in_one_line fakes, from the real Slurm: blues-submit's
    own partition check (sinfo, scontrol), then sbatch --test-only when the partition comes in through
    --sbatch_arg, past that check. Nothing is queued."""
    base = ["--preset", "tiny", "--deepspeed_config", ZERO2, f"out_dir={tmp_path / 'out'}", "--device", "cpu",
            "--job_name", "blues-refused"]
    r = run_cli(base + ["--partition", "nope"])
    assert_one_line_error(r, "--partition 'nope': Slurm says: ")
    assert "nope not found" in r.stderr, r.stderr
    r = run_cli(base + ["--sbatch_arg=--partition=nope", "--dry-run"])
    assert_one_line_error(r, "Slurm refuses the job: invalid partition specified: nope")
    queued = subprocess.run(["squeue", "-h", "-n", "blues-refused"], capture_output=True, text=True, timeout=30)
    assert queued.returncode == 0 and queued.stdout.strip() == "", queued.stdout


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


def submit_job(tmp_path, data_dir, *extra):
    out_dir = tmp_path / "out"
    args = [sys.executable, "-m", "blues.cli.submit", "--preset", "tiny", "--deepspeed_config", ZERO2,
            "--nproc_per_node", "2", "--device", "cpu", "--time", "15", "--job_name", "blues-test",
            "--train_arg=--no_export", f"out_dir={out_dir}", f"data_dir={data_dir}", *SMALL, *extra]
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert job_id.isdigit(), r.stdout
    return job_id, out_dir, out_dir / "slurm" / f"blues-test-{job_id}.log"


def finished(job_id):
    def check():
        s = job(job_id)
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        return s if s["JobState"] in ended else None
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


@needs_cluster
def test_submitted_job_probes_trains_with_two_processes_and_writes_checkpoints(tmp_path, data_dir, cancel_leftovers):
    # The probe runs first in the job (srun, one blues-probe per node): capped at 2 sequences, and
    # 256 tokens per step / (2 sequences x 32 tokens x 2 ranks) = 2 micro-steps.
    job_id, out_dir, log = submit_job(tmp_path, data_dir, "max_steps=4", "save_interval=2", "eval_interval=4",
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


@needs_cluster
def test_usr1_checkpoints_requeues_and_the_second_run_resumes(tmp_path, data_dir, cancel_leftovers):
    job_id, out_dir, log = submit_job(tmp_path, data_dir, "max_steps=300", "save_interval=1000", "eval_interval=1000")
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
