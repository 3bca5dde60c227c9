"""blues.train.engine for real: every ds_configs/*.json builds an engine, trains and saves."""
import json
import os
import subprocess
import sys

import pytest

from blues.train.ds_config import DS_CONFIG_DIR

# ----------------------------------------------------------------------------- every ds_configs file, for real

EXERCISE = r"""
import glob, json, os, sys
from blues.presets import tiny
from blues.train.ds_config import load_ds_config
from blues import train as T
data, out = sys.argv[1], sys.argv[2]
dist = T.init_distributed()
results = {}
for path in sorted(glob.glob(os.path.join(sys.argv[3], "*.json"))):
    for dtype in ("fp32", "bf16"):
        cfg = tiny().replace(n_embd=32, n_head=2, block_size=16, micro_batch_size=2, expert_ffn_size=64, dtype=dtype,
                             data_dir=data, out_dir=os.path.join(out, os.path.basename(path), dtype), lr=1e-2,
                             warmup_steps=0, grad_accum=2, num_experts=4, routed_scaling_factor=1.0,
                             balance_bias_rate=0.0)  # the setting this test was written at (3 steps must cut the loss)
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
    from blues.data.prepare import prepare
    prepare(str(tmp_path / "data"), progress=False)
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
    from blues.data.prepare import prepare
    prepare(str(tmp_path / "data"), progress=False)
    code = EXERCISE.replace('("fp32", "bf16")', '("fp16",)')
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data"), str(tmp_path / "out"), DS_CONFIG_DIR],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


# ----------------------------------------------------------------------------- --init_from

INIT_FROM = r"""
import contextlib, io, json, os, sys
import torch
torch.set_num_threads(1)
from blues import train as T
from blues.cli.train import main
from blues.presets import tiny
from blues.data.loader import TokenLoader
from blues.hf import init_from_config
from blues.model import Blues
from blues.train.ds_config import load_ds_config
data, out, ds_dir = sys.argv[1:4]
folder = os.path.join(out, "saved")
cfg = tiny().replace(n_embd=32, n_head=2, block_size=16, num_experts=4, expert_ffn_size=32, router_noise_std=0.0,
                     seed=7, out_dir=os.path.join(out, "old_run"))
torch.manual_seed(123)
model = Blues(cfg)
with torch.no_grad():  # logits of order 10: a model that is not this one has another loss by far (the control)
    model.tok_emb.weight.mul_(30)
model.save_pretrained(folder)
saved = Blues.from_pretrained(folder)
run_cfg = init_from_config(folder, [f"data_dir={data}", "micro_batch_size=2", "warmup_steps=0", "lr=1e-2"])
batch = TokenLoader(data, "train", block_size=16, batch_size=2, seed=run_cfg.train.seed).next_batch()
R = {"ref": saved(*batch).loss.item(), "out_dir": run_cfg.train.out_dir}
torch.manual_seed(run_cfg.train.seed)
R["control"] = Blues(run_cfg).train()(*batch).loss.item()  # build_model's initialisation, not loaded
dist = T.init_distributed()
for stage in (0, 1, 2, 3):
    c = run_cfg.replace(out_dir=os.path.join(out, f"zero{stage}"))
    run = T.build_engine(c, load_ds_config(os.path.join(ds_dir, f"zero{stage}.json")), dist=dist, init_from=folder)
    R[f"zero{stage}"] = [r.loss for r in T.train_steps(run, 3)]
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    R["rc"] = main(["--init_from", folder, f"data_dir={data}", f"out_dir={os.path.join(out, 'cli')}",
                    "micro_batch_size=2", "warmup_steps=0", "lr=1e-2", "max_steps=3", "log_interval=1",
                    "eval_interval=100", "save_interval=100", "--no_export", "--progress", "off", "--prompt", ""])
R["stdout"] = buf.getvalue()
print("RESULTS " + json.dumps(R))
"""


@pytest.mark.slow
def test_init_from_starts_from_the_saved_weights_under_every_zero_stage(tmp_path):
    """A saved Blues model, then build_engine(init_from=...) under ZeRO 0, 1, 2, 3 and `blues-train
    --init_from` on one CPU rank: the first step's loss is the saved model's on the same batch (the
    weights are loaded before DeepSpeed partitions them), and training goes on from there."""
    from blues.data.prepare import prepare
    prepare(str(tmp_path / "data"), progress=False)
    p = subprocess.run([sys.executable, "-c", INIT_FROM, str(tmp_path / "data"), str(tmp_path / "out"),
                        DS_CONFIG_DIR], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULTS "))[8:])
    print(f"saved model's loss {r['ref']:.6f}, a fresh initialisation's {r['control']:.6f}; first steps: "
          + ", ".join(f"ZeRO {s} {r[f'zero{s}'][0]:.6f}" for s in range(4)))
    assert abs(r["control"] - r["ref"]) > 0.5, r  # a model not loaded would fail the checks below
    assert r["out_dir"] == "out"  # the training fields are the defaults, not the saved run's (old_run)
    for stage in range(4):
        losses = r[f"zero{stage}"]
        # fp32 on both sides, the same batch; DeepSpeed's flattening changes no value
        assert losses[0] == pytest.approx(r["ref"], abs=1e-5), (stage, losses, r["ref"])
        assert losses[1] != losses[0], (stage, losses)  # it trains on (another batch, updated weights)
    assert r["rc"] == 0, r["stdout"][-3000:]
    step1 = next(line for line in r["stdout"].splitlines() if line.startswith("step 1/3 |"))
    assert float(step1.split("| loss ")[1].split()[0]) == pytest.approx(r["ref"], abs=5e-5)  # printed to 4 places


def _cli_error(capsys, argv) -> str:
    from blues.cli.train import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def saved_folder(tmp_path):
    import torch

    from blues.model import Blues
    from blues.presets import tiny
    torch.manual_seed(0)
    Blues(tiny().replace(n_embd=32, n_head=2, block_size=16, num_experts=4)).save_pretrained(str(tmp_path / "m"))
    return str(tmp_path / "m")


def test_init_from_refuses_an_override_that_changes_a_shape(capsys, saved_folder, tmp_path):
    err = _cli_error(capsys, ["--init_from", saved_folder, "n_embd=64", f"out_dir={tmp_path / 'o'}"])
    assert "overrides change the weights' shapes: n_embd: 32 -> 64" in err, err


@pytest.mark.parametrize("extra,message", [
    (["--resume", "somewhere"], "a resume continues its own run, --init_from starts a new one"),
    (["--preset", "tiny"], "--init_from takes the model from the folder"),
    (["moe_backend=deepspeed", "balance_bias_rate=0"], "moe_backend='deepspeed' cannot start from --init_from"),
])
def test_init_from_refuses_what_it_cannot_combine(capsys, saved_folder, tmp_path, extra, message):
    err = _cli_error(capsys, ["--init_from", saved_folder, f"out_dir={tmp_path / 'o'}", *extra])
    assert message in err, err


def test_init_from_a_folder_without_a_config_is_one_line(capsys, tmp_path):
    err = _cli_error(capsys, ["--init_from", str(tmp_path), f"out_dir={tmp_path / 'o'}"])
    assert "config.json' does not exist" in err, err
