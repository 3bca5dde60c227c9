"""A vision-language Blues through the real DeepSpeed engine: image batches, loss, resume, export."""
import json
import math
import subprocess
import sys

import pytest

from .conftest import tiny_vl

SCRIPT = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from vision.conftest import tiny_vl
from blues import train as T
from blues.model import Blues
data, out = sys.argv[1], sys.argv[2]
dist = T.init_distributed()

def config(name, **kw):
    # image_token_id=None: the engine takes it from the data's tokenizer
    return tiny_vl(image_token_id=None, data_dir=data, out_dir=os.path.join(out, name), lr=1e-2, warmup_steps=0,
                   micro_batch_size=8, grad_accum=2, eval_steps=2, max_steps=40, **kw)

res = {}
run = T.build_engine(config("long"), dist=dist)
res["image_token_id"] = run.cfg.vision.image_token_id
res["specials"] = run.tokenizer.special_tokens
batch = run.loader.next_batch()
res["batch_shapes"] = [list(t.shape) for t in batch]
run.loader.load_state_dict(T.build_engine(config("probe"), dist=dist).loader.state_dict())  # back to the start
res["val_before"] = T.evaluate(run)["val_loss"]
res["losses"] = [r.loss for r in T.train_steps(run, 40)]
res["val_after"] = T.evaluate(run)["val_loss"]
T.export_weights(run, os.path.join(out, "model"))
m = Blues.from_pretrained(os.path.join(out, "model"))
from blues.data.images import ImageTextLoader
x, y, images = ImageTextLoader(data, "val", 48, 1).next_batch()
res["caption"] = m.generate("a", images=[images[0]], temperature=0, max_new_tokens=8)

# resume: 2 steps, save, a new engine resumes and takes 2 more; the same 4 losses as 4 straight steps
straight = [r.loss for r in T.train_steps(T.build_engine(config("straight"), dist=dist), 4)]
first = T.build_engine(config("resumed"), dist=dist)
before = [r.loss for r in T.train_steps(first, 2)]
T.save_checkpoint(first)
second = T.build_engine(config("resumed"), dist=dist)
T.resume(second, (os.path.join(out, "resumed", "checkpoints"), "step_00000002"))
res["straight"], res["resumed"] = straight, before + [r.loss for r in T.train_steps(second, 2)]
# no data (probes, benchmarks): random tokens with one image span per sample and random images
blind = T.build_engine(tiny_vl(out_dir=os.path.join(out, "blind"), micro_batch_size=2), dist=dist, with_data=False)
res["random_batch_loss"] = T.train_steps(blind, 1)[0].loss
print("RESULTS " + json.dumps(res))
T.exit_process(0)  # a rank's end: no interpreter teardown (blues.train.distributed says why)
"""


@pytest.mark.slow
def test_a_vision_model_trains_resumes_and_exports_through_the_engine(tmp_path):
    """The tiny vision model on the built-in synthetic set, in one process through deepspeed.initialize
    (ZeRO 2, the built-in config): image batches reach the model, 40 steps cut the loss, resume is exact,
    the export generates from an image."""
    import os
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(tmp_path / "out"), tests],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert r["image_token_id"] == r["specials"]["<|image|>"]
    assert r["batch_shapes"] == [[8, 48], [8, 48], [8, 3, 16, 16]]
    first, last = sum(r["losses"][:5]) / 5, sum(r["losses"][-5:]) / 5
    assert last < 0.5 * first, r["losses"]  # captions of a tiny grammar: the loss falls far, not by noise
    assert r["val_after"] < 0.5 * r["val_before"], (r["val_before"], r["val_after"])
    assert isinstance(r["caption"], str)
    assert r["resumed"] == r["straight"]  # exact: the same batches, RNG and optimizer state
    assert math.isfinite(r["random_batch_loss"])  # the random batch's spans matched its images


def test_image_token_id_comes_from_the_tokenizer_or_must_agree_with_it(vl_tokenizer):
    from blues.train.engine import apply_image_token_id
    assert apply_image_token_id(tiny_vl(image_token_id=None), vl_tokenizer).vision.image_token_id == 4097
    assert apply_image_token_id(tiny_vl(), vl_tokenizer).vision.image_token_id == 4097
    with pytest.raises(ValueError, match=r"image_token_id=4000 but the data's tokenizer has <\|image\|> = 4097: set "
                                         r"image_token_id=4097 or null"):
        apply_image_token_id(tiny_vl(image_token_id=4000), vl_tokenizer)


# ----------------------------------------------------------------------------- EP=2 on 2 CPU ranks

VISION_OVERRIDES = ["vision_enabled=true", "vocab_size=4099", "image_size=16", "patch_size=4", "merge_patches=true",
                    "vision_n_embd=32", "vision_n_head=2", "vision_ffn_size=32", "n_embd=32", "n_head=2",
                    "expert_ffn_size=32", "num_experts=4", "block_size=48", "micro_batch_size=4", "lr=1e-2",
                    "warmup_steps=0", "log_interval=1", "eval_interval=10", "eval_steps=2", "save_interval=10"]


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_training_of_a_vision_model_on_two_ranks(tmp_path):
    """deepspeed --num_gpus 2 (two CPU ranks, gloo) with ep_size=2: each rank holds half the experts,
    image batches go through the all-to-all like text; blues-train runs to its end, the loss falls and
    the export (every expert gathered, the vision tower inside) generates from an image."""
    import csv
    import os
    import shutil

    import torch

    from blues.common import free_port
    from blues.model import Blues
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    out = tmp_path / "out"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "blues.train",
           "--progress", "off", "--prompt", "", *VISION_OVERRIDES, "ep_size=2", "max_steps=20",
           f"data_dir={tmp_path / 'data'}", f"out_dir={out}"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "ep_size=2" in p.stdout
    with open(out / "monitor" / "blues" / "Train_loss.csv", newline="") as f:
        losses = [float(row[1]) for row in csv.reader(f) if row and row[0] != "step"]
    assert len(losses) == 20 and sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    model = Blues.from_pretrained(str(out / "model"))
    assert model.vision is not None and model.config.vision.image_token_id == 4097
    assert isinstance(model.generate("a", images=[torch.rand(3, 16, 16)], max_new_tokens=4, temperature=0), str)


@pytest.mark.slow
def test_the_caption_benchmark_smoke_runs_and_writes_its_row(tmp_path):
    """benchmarks/vision.py --smoke: 30 steps of the tiny_vl preset (15 in the contrastive stage, then LM beside
    it) through blues-train's loop, greedy captions of 32 held-out images, real and noise; one JSON row."""
    import os
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "rows.jsonl"
    p = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "vision.py"), "--smoke", "--work",
                        str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=900,
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "contrastive" in p.stdout and "(+ LM)" in p.stdout  # the stage, then LM beside it
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["benchmark"] == "vision" and row["preset"] == "tiny_vl" and row["num_images"] == 32
    for k in ("accuracy", "noise_accuracy"):
        assert set(row[k]) == {"colour", "shape", "position", "all"} and all(0 <= v <= 1 for v in row[k].values())
