"""blues-train on one process: bad inputs refused before anything starts (one line, non-zero exit),
the learning-rate schedule, every ds_configs/*.json exercised, and the no-argument default run."""
import json
import os
import subprocess
import sys

import pytest

from blues.config import TrainConfig, tiny
from blues.ds_config import DS_CONFIG_DIR
from blues.train import lr_at, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- learning rate

def test_lr_schedule_warmup_cosine_floor():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, lr_decay_steps=110, max_steps=200)
    assert lr_at(0, t) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(9, t) == pytest.approx(1.0)  # end of warmup reaches alpha_max
    assert lr_at(10, t) == pytest.approx(1.0)  # cosine starts at alpha_max
    assert lr_at(60, t) == pytest.approx(0.55)  # half-way: (max + min) / 2
    assert lr_at(110, t) == pytest.approx(0.1)  # T_c reaches alpha_min
    assert lr_at(150, t) == 0.1  # the floor after T_c
    values = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_lr_decay_defaults_to_max_steps():
    t = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100)
    assert lr_at(0, t) == pytest.approx(1.0)
    assert lr_at(100, t) == pytest.approx(0.0)


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
                         f"out_dir={tmp_path}"])
    assert "cannot run under ZeRO stage 3" in line and "use moe_backend=torch" in line


def test_ep_size_not_dividing_num_experts(capsys, tmp_path):
    line = _err(capsys, ["moe_backend=deepspeed", "ep_size=3", f"out_dir={tmp_path}"])
    assert "ep_size=3 is invalid: must divide num_experts=4" in line


def test_ep_size_not_dividing_world_size(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as the launcher would set it for 3 ranks
    line = _err(capsys, ["moe_backend=deepspeed", "ep_size=2", f"out_dir={tmp_path}"])
    assert "ep_size=2 is invalid: must divide the world size 3" in line


def test_inconsistent_batch_fields(capsys, tmp_path):
    ds = json.load(open(os.path.join(DS_CONFIG_DIR, "zero2.json")))
    ds.update(train_batch_size=32, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    line = _err(capsys, ["--deepspeed_config", str(p), "grad_accum=2", f"out_dir={tmp_path}"])
    assert "train_batch_size=32 contradicts micro_batch_size=8 * grad_accum=2 * world size 1 = 16" in line


def test_batch_field_contradicting_blues(capsys, tmp_path):
    ds = json.load(open(os.path.join(DS_CONFIG_DIR, "zero1.json")))
    ds["train_micro_batch_size_per_gpu"] = 2
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    line = _err(capsys, ["--deepspeed_config", str(p), f"out_dir={tmp_path}"])
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
    assert "cannot resume" in line and "n_layer: 2 -> 3" in line and "num_experts: 4 -> 8" in line


def test_fp16_on_cpu(capsys, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("fp16 is fine on CUDA")
    line = _err(capsys, ["dtype=fp16", f"out_dir={tmp_path}"])
    assert "dtype=fp16 needs a GPU" in line


def test_unknown_override_and_preset(capsys, tmp_path):
    assert "unknown config field(s): 'lrr'" in _err(capsys, ["lrr=1", f"out_dir={tmp_path}"])
    assert "preset 'huge' is unknown" in _err(capsys, ["--preset", "huge"])


def test_cli_error_is_one_line_on_stderr(tmp_path):
    """The installed console script: exit 1, one line, no traceback."""
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "blues-train"), "--deepspeed_config",
                        str(tmp_path / "missing.json")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("blues-train: error: "), p.stderr


# ----------------------------------------------------------------------------- every ds_configs file, for real

EXERCISE = r"""
import glob, json, os, sys
from blues.config import tiny
from blues.ds_config import load_ds_config
from blues import train as T
data, out = sys.argv[1], sys.argv[2]
dist = T.init_distributed()
results = {}
for path in sorted(glob.glob(os.path.join(sys.argv[3], "*.json"))):
    for dtype in ("fp32", "bf16"):
        cfg = tiny().replace(n_embd=32, n_head=2, block_size=16, micro_batch_size=2, expert_ffn_size=64, dtype=dtype,
                             data_dir=data, out_dir=os.path.join(out, os.path.basename(path), dtype), lr=1e-2,
                             warmup_steps=0, grad_accum=2)
        run = T.build_engine(cfg, load_ds_config(path), dist=dist)
        res = T.train_steps(run, 3)
        T.save_checkpoint(run)
        results[f"{os.path.basename(path)}:{dtype}"] = {
            "losses": [r.loss for r in res], "lr": run.engine.get_lr()[0], "expected_lr": T.lr_at(2, cfg.train),
            "stage": run.stage, "bf16": run.ds_config["bf16"]["enabled"],
            "latest": open(os.path.join(cfg.train.out_dir, "checkpoints", "latest")).read()}
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.slow
def test_every_ds_config_trains_and_saves(tmp_path):
    """Each ds_configs/*.json, in fp32 and bf16 (fp16 needs CUDA: see the gpu test), builds an engine
    through DeepSpeed's own parser, takes 3 optimizer steps of 2 micro-batches and saves a checkpoint."""
    from blues.data import prepare
    prepare(cache_dir=str(tmp_path / "data"), progress=False)
    p = subprocess.run([sys.executable, "-c", EXERCISE, str(tmp_path / "data"), str(tmp_path / "out"), DS_CONFIG_DIR],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    results = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULTS "))[8:])
    files = sorted(f for f in os.listdir(DS_CONFIG_DIR) if f.endswith(".json"))
    assert sorted({k.split(":")[0] for k in results}) == files
    for key, r in results.items():
        name, dtype = key.split(":")
        assert all(x == x for x in r["losses"]), key  # finite (NaN != NaN)
        assert r["losses"][-1] < r["losses"][0], key
        assert r["lr"] == pytest.approx(r["expected_lr"]), key  # our schedule reaches DeepSpeed's optimizer
        assert r["bf16"] is (dtype == "bf16")
        assert r["stage"] == (3 if name == "zero3.json" else int(name[4]))
        assert r["latest"] == "step_00000003"


@pytest.mark.gpu
def test_fp16_trains_on_cuda(tmp_path):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: DeepSpeed's CPU accelerator refuses fp16")
    from blues.data import prepare
    prepare(cache_dir=str(tmp_path / "data"), progress=False)
    code = EXERCISE.replace('("fp32", "bf16")', '("fp16",)')
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data"), str(tmp_path / "out"), DS_CONFIG_DIR],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


# ----------------------------------------------------------------------------- the default run

@pytest.mark.slow
def test_blues_train_default_path(tmp_path):
    """`blues-train` with only max_steps lowered (200 -> 40: ~20 s of CI instead of ~60 on a quiet 2-core machine):
    the no-argument path otherwise: tiny preset, built-in corpus prepared into ./data_cache, the
    built-in ZeRO 2 DeepSpeed config, evaluation, checkpoints, export to ./out/model, a sample."""
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "blues-train"), "max_steps=40",
                        "eval_interval=20", "save_interval=20"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
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


# ----------------------------------------------------------------------------- non-finite loss with accumulation

@pytest.mark.slow
@pytest.mark.parametrize("stage,expect_exit", [("zero2", 0), ("zero0", 1)])
def test_nan_after_accumulated_micro_batches(tmp_path, stage, expect_exit):
    """grad_accum=2, NaN only in micro-batch 1 of step 3 (micro-batch 0 already backpropagated).
    ZeRO 2 (DeepSpeed drops the non-finite gradients): the step is skipped and training goes on.
    ZeRO 0 in fp32 (DeepSpeed would apply them): the run stops with one error line, saving nothing."""
    from blues.data import prepare
    prepare(cache_dir=str(tmp_path / "data"), progress=False)
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "blues-train"), "--deepspeed_config",
                        os.path.join(DS_CONFIG_DIR, f"{stage}.json"), "n_embd=32", "n_head=2", "block_size=16",
                        "micro_batch_size=2", "grad_accum=2", "max_steps=5", "log_interval=1", "eval_interval=100",
                        "save_interval=100", f"data_dir={tmp_path / 'data'}", f"out_dir={tmp_path / 'out'}",
                        "--no_export", "--progress", "off"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, BLUES_FAULT_NAN_STEPS="3.1"))
    out = p.stdout + p.stderr
    assert p.returncode == expect_exit, out[-3000:]
    if expect_exit == 0:
        assert "step 3/5 | SKIPPED: non-finite loss" in out and "step 4/5 | loss" in out
        assert "step 5/5 | loss" in out
    else:
        assert "error: step 3: a non-finite loss appeared after 1 accumulated micro-batches" in out
        assert not os.path.exists(tmp_path / "out" / "checkpoints" / "latest")
