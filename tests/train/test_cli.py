"""blues-train on one process: bad inputs refused before anything starts (one line, exit 2), where a
run resumes (and what it refuses to overwrite), the no-argument default run, non-finite losses.
(The learning-rate schedule is in test_step.py, every ds_configs/*.json in test_engine.py.)"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from blues.cli.train import main
from blues.presets import tiny
from blues.train.ds_config import DS_CONFIG_DIR

# ----------------------------------------------------------------------------- bad inputs (in-process: they
# are refused before deepspeed is imported or a process group exists)

def _err(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    lines = [l for l in err.splitlines() if l.startswith("blues-train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_deepspeed_config(capsys, tmp_path):
    line = _err(capsys, ["--deepspeed_config", str(tmp_path / "nope.json"), f"out_dir={tmp_path}"])
    assert "nope.json' does not exist" in line and "zero2.json" in line


def test_zero3_with_deepspeed_backend_names_the_alternative(capsys, tmp_path):
    line = _err(capsys, ["--deepspeed_config", os.path.join(DS_CONFIG_DIR, "zero3.json"), "moe_backend=deepspeed",
                         "balance_bias_rate=0", f"out_dir={tmp_path}"])
    assert "cannot run under ZeRO stage 3" in line and "use moe_backend=torch" in line


def test_ep_size_not_dividing_num_experts(capsys, tmp_path):
    line = _err(capsys, ["moe_backend=deepspeed", "balance_bias_rate=0", "ep_size=3", f"out_dir={tmp_path}"])
    assert f"ep_size=3 is invalid: must divide num_experts={tiny().moe.num_experts}" in line


def test_ep_size_not_dividing_world_size(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as the launcher would set it for 3 ranks
    line = _err(capsys, ["moe_backend=deepspeed", "balance_bias_rate=0", "ep_size=2", f"out_dir={tmp_path}"])
    assert "ep_size=2 is invalid: must divide the world size 3" in line


def test_inconsistent_batch_fields(capsys, tmp_path):
    ds = json.load(open(os.path.join(DS_CONFIG_DIR, "zero2.json")))
    ds.update(train_batch_size=32, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    line = _err(capsys, ["--deepspeed_config", str(p), "micro_batch_size=8", "grad_accum=2", f"out_dir={tmp_path}"])
    assert "train_batch_size=32 contradicts micro_batch_size=8 * grad_accum=2 * world size 1 = 16" in line


def test_batch_field_contradicting_blues(capsys, tmp_path):
    ds = json.load(open(os.path.join(DS_CONFIG_DIR, "zero1.json")))
    ds["train_micro_batch_size_per_gpu"] = 2
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    line = _err(capsys, ["--deepspeed_config", str(p), "micro_batch_size=8", f"out_dir={tmp_path}"])
    assert "train_micro_batch_size_per_gpu=2 contradicts micro_batch_size=8" in line


def test_resume_from_folder_without_checkpoint(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    line = _err(capsys, ["--resume", str(tmp_path / "empty"), f"out_dir={tmp_path}"])
    assert "no complete checkpoint there" in line


def test_resume_incompatible_checkpoint_lists_fields(capsys, tmp_path):
    tag = tmp_path / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    (tag / "blues_complete.json").write_text(json.dumps({"config": tiny().to_dict(), "step": 10}))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010")
    line = _err(capsys, ["n_layer=3", "num_experts=8", f"out_dir={tmp_path}"])
    assert "cannot resume" in line and "n_layer: 2 -> 3" in line
    assert f"num_experts: {tiny().moe.num_experts} -> 8" in line


def test_fp16_on_cpu(capsys, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("fp16 is fine on CUDA")
    line = _err(capsys, ["dtype=fp16", f"out_dir={tmp_path}"])
    assert "dtype=fp16 needs a GPU" in line


def test_unknown_override_and_preset(capsys, tmp_path):
    assert "unknown config field(s): 'lrr'" in _err(capsys, ["lrr=1", f"out_dir={tmp_path}"])
    assert "preset 'huge' is unknown" in _err(capsys, ["--preset", "huge"])


def test_validation_runs_once_per_start(capsys, tmp_path, monkeypatch):
    """blues-train validates before it starts anything and hands the resolved DeepSpeed config to
    build_engine, which does not validate again (issue 9: validate ran twice, check_parallelism 4 times)."""
    import blues.cli.train as cli
    import blues.train.ds_config as dsc
    calls = {"validate": 0, "check_parallelism": 0}
    real_validate, real_check = cli.validate, dsc.check_parallelism

    def validate(*a, **k):
        calls["validate"] += 1
        return real_validate(*a, **k)

    def check_parallelism(*a, **k):
        calls["check_parallelism"] += 1
        return real_check(*a, **k)

    def build_engine(cfg, ds_config, *, validated=False, **kw):
        assert validated and ds_config["train_batch_size"] == tiny().train.micro_batch_size  # "auto" filled
        raise ValueError("stopped before DeepSpeed starts")

    monkeypatch.setattr(cli, "validate", validate)
    monkeypatch.setattr(dsc, "check_parallelism", check_parallelism)
    monkeypatch.setattr(cli, "build_engine", build_engine)
    assert "stopped before DeepSpeed starts" in _err(capsys, [f"out_dir={tmp_path}"])
    assert calls == {"validate": 1, "check_parallelism": 1}


# ----------------------------------------------------------------------------- where a run starts (issue 9:
# each test builds the checkpoint folder on disk; the refusals come before anything starts)

def _checkpoint(out_dir, step, config=None, shard_bytes=b"x" * 1000, **meta):
    """A complete checkpoint as save() leaves it: one shard, the marker with the shard's size (and `meta`)."""
    tag = out_dir / "checkpoints" / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(shard_bytes)
    (tag / "blues_complete.json").write_text(json.dumps({
        "config": (config or tiny()).to_dict(), "step": step,
        "files": {"mp_rank_00_model_states.pt": len(shard_bytes)}, **meta}))
    (out_dir / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    return tag


def _refused(capsys, argv) -> tuple[str, str]:
    """(the error line, all of stderr) of a blues-train that must exit 2."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("blues-train: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0], err


def test_auto_with_dangling_latest_resumes_from_the_newest_complete(capsys, tmp_path):
    """`latest` names a folder that is gone: blues-train takes the newest complete checkpoint (and then
    refuses it here only because it was saved with n_layer=3, which stops the test before any engine)."""
    _checkpoint(tmp_path, 10, tiny().replace(n_layer=3))
    _checkpoint(tmp_path, 20, tiny().replace(n_layer=3))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000030")
    line, err = _refused(capsys, [f"out_dir={tmp_path}", f"data_dir={tmp_path / 'data'}", "max_steps=1",
                                  "--no_export"])
    assert ("blues-train: --resume auto: `latest` names step_00000030, which does not exist; resuming from the "
            "newest complete checkpoint step_00000020 (complete: step_00000010, step_00000020)") in err, err
    assert "cannot resume" in line and "n_layer: 3 -> 2" in line


def test_fresh_start_over_complete_checkpoints_is_refused(capsys, tmp_path):
    _checkpoint(tmp_path, 10)
    line, _ = _refused(capsys, ["--resume", "none", f"out_dir={tmp_path}", f"data_dir={tmp_path / 'data'}",
                                "max_steps=1", "--no_export"])
    assert "starting from step 0 (--resume none) would overwrite or delete the complete checkpoint(s) " \
           "step_00000010" in line


def test_resume_the_converter_cannot_do_is_refused_before_the_engine(capsys, tmp_path):
    """A DeepSpeed-backend checkpoint of 2 ranks at ep_size=2, resumed on 1 rank at ep_size=1: the
    reshard converter cannot read DeepSpeed's per-expert files, and blues-train says so before it builds
    an engine (the test runs in-process with no process group: an engine build would need one)."""
    _checkpoint(tmp_path, 10, tiny().replace(moe_backend="deepspeed", balance_bias_rate=0.0, ep_size=2), world_size=2,
                zero_stage=2,
                tokenizer_sha256="a" * 64)
    line, _ = _refused(capsys, [f"out_dir={tmp_path}", f"data_dir={tmp_path / 'data'}", "max_steps=11",
                                "moe_backend=deepspeed", "balance_bias_rate=0", "--no_export"])
    assert "cannot resume: ep_size 2 -> 1, world size 2 -> 1 with moe_backend=deepspeed" in line, line


def test_truncated_shard_is_one_line_naming_the_file(capsys, tmp_path):
    tag = _checkpoint(tmp_path, 10)
    shard = tag / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"x" * 400)
    line, _ = _refused(capsys, [f"out_dir={tmp_path}", f"data_dir={tmp_path / 'data'}", "max_steps=11",
                                "--no_export"])
    assert f"{shard} is truncated or damaged (400 bytes; 1,000 were written)" in line


def test_cli_error_is_one_line_on_stderr(tmp_path):
    """The installed console script: exit 2 (a user error), one line, no traceback."""
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "blues-train"), "--deepspeed_config",
                        str(tmp_path / "missing.json")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("blues-train: error: "), p.stderr


# ----------------------------------------------------------------------------- the default run

def shm_buffers(port: int) -> list[str]:
    """DeepSpeed's /dev/shm allreduce buffers of the run whose MASTER_PORT is `port` (any rank)."""
    if not os.path.isdir("/dev/shm"):
        return []
    return sorted(n for n in os.listdir("/dev/shm")
                  if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`blues-train` with only max_steps lowered (200 -> 40: ~20 s of CI instead of ~60 on a quiet 2-core machine):
    the no-argument path otherwise: tiny preset, built-in corpus prepared into ./data_cache, the
    built-in ZeRO 2 DeepSpeed config, evaluation, checkpoints, export to ./out/model, a sample.
    MASTER_PORT is fixed so that its /dev/shm buffer can be found by name."""
    from blues.common import free_port
    tmp_path, port = tmp_path_factory.mktemp("default_run"), free_port()
    assert shm_buffers(port) == []
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "blues-train"), "max_steps=40",
                        "eval_interval=20", "save_interval=20"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, MASTER_PORT=str(port)))
    return tmp_path, port, p


@pytest.mark.slow
def test_blues_train_default_path(default_run):
    tmp_path, _, p = default_run
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "val_loss" in out and "sample: The" in out
    assert os.path.isfile(tmp_path / "out" / "model" / "model.safetensors")
    assert os.path.isfile(tmp_path / "data_cache" / "meta.json")
    first = next(l for l in out.splitlines() if l.startswith("step 10/"))
    last = next(l for l in out.splitlines() if l.startswith("step 40/"))
    loss = lambda l: float(l.split("| loss ")[1].split()[0])  # noqa: E731
    assert loss(last) < loss(first) - 0.5, (first, last)
    assert "step 20: checkpoint" in out and "step 40: checkpoint" in out


@pytest.mark.slow
def test_default_run_leaves_no_shm_buffer(default_run):
    """DeepSpeed's CPU comm op made a 66 MB /dev/shm file for the run's rank; blues-train removed it."""
    import torch
    _, port, p = default_run
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    if not torch.cuda.is_available():  # on CPU the op is loaded, so the file was made (CUDA uses nccl instead)
        assert "deepspeed_shm_comm_op built successfully" in p.stdout, p.stdout[-3000:]
    assert shm_buffers(port) == []


@pytest.mark.slow
def test_shard_deepspeed_cannot_read_is_one_line_naming_it(default_run, tmp_path):
    """The default run's last checkpoint, its optimizer shard truncated and the marker's file sizes
    removed (a checkpoint written before the marker recorded them): DeepSpeed's own load fails deep
    inside; blues-train says which file, in one line, exit 2 (a ValueError after the process group
    started: its /dev/shm buffer is gone too)."""
    from blues.common import free_port
    src, _, p = default_run
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    shutil.copytree(src / "out" / "checkpoints", tmp_path / "out" / "checkpoints")
    tag = tmp_path / "out" / "checkpoints" / "step_00000040"
    meta = json.loads((tag / "blues_complete.json").read_text())
    del meta["files"]
    (tag / "blues_complete.json").write_text(json.dumps(meta))
    shard = next(tag / n for n in sorted(os.listdir(tag)) if n.endswith("optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    port = free_port()
    q = subprocess.run([os.path.join(os.path.dirname(sys.executable), "blues-train"), "max_steps=41",
                        f"data_dir={src / 'data_cache'}", "--no_export", "--progress", "off"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, MASTER_PORT=str(port)))
    err = q.stderr
    lines = [l for l in err.splitlines() if l.startswith("blues-train: error:")]
    assert q.returncode == 2 and len(lines) == 1 and "Traceback" not in err, (q.returncode, err[-3000:])
    # out_dir is the relative default, so the file is named relative to the working folder
    assert f"{os.path.join('out', 'checkpoints', 'step_00000040', shard.name)} is damaged" in lines[0], lines[0]
    assert shm_buffers(port) == []


# ----------------------------------------------------------------------------- non-finite loss with accumulation

@pytest.mark.slow
@pytest.mark.parametrize("stage,nan_steps,expect_exit", [("zero2", "3.1", 0), ("zero2", "3", 0), ("zero0", "3.1", 1)],
                         ids=["zero2-micro-batch-1", "zero2-every-micro-batch", "zero0-micro-batch-1"])
def test_nan_after_accumulated_micro_batches(tmp_path, stage, nan_steps, expect_exit):
    """grad_accum=2, NaN in micro-batch 1 of step 3 (micro-batch 0 already backpropagated), or in both.
    ZeRO 2 (DeepSpeed drops the non-finite gradients; Blues runs every backward and learns of the NaN
    from the step's one all-reduce): the step is skipped and training goes on.
    ZeRO 0 in fp32 (DeepSpeed would apply them): the run stops with one error line, saving nothing."""
    from blues.data.prepare import prepare
    prepare(str(tmp_path / "data"), progress=False)
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "blues-train"), "--deepspeed_config",
                        os.path.join(DS_CONFIG_DIR, f"{stage}.json"), "n_embd=32", "n_head=2", "block_size=16",
                        "micro_batch_size=2", "grad_accum=2", "max_steps=5", "log_interval=1", "eval_interval=100",
                        "save_interval=100", f"data_dir={tmp_path / 'data'}", f"out_dir={tmp_path / 'out'}",
                        "--no_export", "--progress", "off"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, BLUES_FAULT_NAN_STEPS=nan_steps))
    out = p.stdout + p.stderr
    assert p.returncode == expect_exit, out[-3000:]
    if expect_exit == 0:
        assert "step 3/5 | SKIPPED: non-finite loss" in out and "step 4/5 | loss" in out
        assert "step 5/5 | loss" in out
    else:
        assert "error: step 3: a non-finite loss appeared after 1 accumulated micro-batches" in out
        assert not os.path.exists(tmp_path / "out" / "checkpoints" / "latest")
