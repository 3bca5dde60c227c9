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
from blues.config import tiny
from blues.train.ds_config import load_ds_config
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
