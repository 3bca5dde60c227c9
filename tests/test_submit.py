"""blues-submit without a cluster: the script it writes, the checks of --dry-run, and bad inputs.

Tests that need a running Slurm (a partition that does not exist, real jobs) are in test_slurm.py.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blues import submit

REPO = Path(__file__).resolve().parent.parent
ZERO2 = str(REPO / "ds_configs" / "zero2.json")


def run_cli(args, path=None, cwd=None):
    """blues-submit as a user runs it: a separate process, its exit code, stdout and stderr."""
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "blues.submit", *args], capture_output=True, text=True, env=env,
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
    r = dry_run(tmp_path, "--nodes", "2", "--gpus_per_node", "4", "--time", "02:00:00", "--partition", "gpu",
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
    r = dry_run(tmp_path, "--nodes", "2", "--gpus_per_node", "2", "micro_batch_size=3", "grad_accum=5",
                path=no_slurm)
    assert r.returncode == 0, r.stderr
    assert "world size 4 = 2 node(s) x 2 process(es) per node" in r.stderr
    # tiny has block_size 128: 3 x 5 x 4 = 60 sequences = 7680 tokens
    assert "global batch 60 sequences = micro_batch_size 3 x grad_accum 5 x 4 ranks = 7680 tokens" in r.stderr


def test_cpu_device_asks_cores_not_gpus(tmp_path, no_slurm):
    r = dry_run(tmp_path, "--gpus_per_node", "2", "--device", "cpu", path=no_slurm)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --cpus-per-task=2\n" in r.stdout and "gpus-per-node" not in r.stdout
    assert "PROCS_PER_NODE=2\n" in r.stdout


def test_probe_block_feeds_the_probed_config_to_training(tmp_path, no_slurm):
    r = dry_run(tmp_path, "--gpus_per_node", "2", "--device", "cpu", "--probe", "--memory_budget", "2GB",
                "--target_tokens", "4096", path=no_slurm)
    assert r.returncode == 0, r.stderr
    s = r.stdout
    assert "exec blues-probe --nnodes" in s and "--memory_budget 2GB" in s and "--target_tokens 4096" in s
    assert '--deepspeed_config "$PROBE_DIR/ds_config.json"' in s
    assert '"${PROBE_OVERRIDES[@]}" --resume auto' in s


@pytest.mark.parametrize("extra, match", [
    # one line per mistake; each names the flag or field and the value
    (["--gpus_per_node", "2", "num_experts=8", "ep_size=4", "moe_backend=deepspeed"],
     "ep_size=4 does not divide the world size 2 (--nodes 1 x --gpus_per_node 2): use a world size that is a "
     "multiple of 4 (e.g. --nodes 2)"),
    (["--gpus_per_node", "3", "num_experts=8", "ep_size=2", "moe_backend=deepspeed"],
     "ep_size=2 does not divide the world size 3"),
    (["ep_size=3"], "ep_size=3 is invalid: must divide num_experts=4"),
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
    r = run_cli(["--preset", "tiny", "--deepspeed_config", str(ds), "--gpus_per_node", "2", "--dry-run"],
                path=no_slurm)
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
                                 "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
                                 "exit 1\n")
    (fake / "sbatch").chmod(0o755)
    r = run_cli(["--preset", "tiny", "--deepspeed_config", ZERO2, f"out_dir={tmp_path / 'out'}", "--device", "cpu"],
                path=str(fake))
    assert_one_line_error(r, "Slurm refuses the job: invalid partition specified: nope; Batch job submission "
                             "failed: Invalid partition name specified")


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("1:30", 90), ("01:30:00", 5400), ("2-00:00:00", 172800),
                                           ("1-12", 129600), ("0-00:10", 600)])
def test_time_limits_parse_like_slurm(text, seconds):
    assert submit.parse_time_limit(text) == seconds


def test_the_template_ships_with_the_package_checkout():
    assert submit.TEMPLATE.is_file()
    assert shutil.which("bash")
