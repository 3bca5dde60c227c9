"""freeze (MoE-LLaVA's stages): exactly the named parameters keep training; the frozen ones leave the
optimizer and do not move through real DeepSpeed steps while the others do (ZeRO 2 in one process; ZeRO 2
and 3 under expert parallelism on 2 ranks); the combinations that cannot work are refused by name; a
resume that changes freeze is refused."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from blues.common import free_port
from blues.model import Blues
from blues.presets import tiny_vl
from blues.train.ds_config import BUILTIN_DS_CONFIG, DS_CONFIG_DIR, load_ds_config
from blues.train.engine import apply_freeze, validate
from blues.train.resume_check import check_resume_config

SMALL = dict(n_embd=32, n_head=2, expert_ffn_size=32, num_experts=4, balance_bias_rate=0.0, image_token_id=4097,
             vision_n_embd=32, vision_n_head=2, vision_ffn_size=32, micro_batch_size=2, warmup_steps=0, lr=1e-2,
             contrastive_steps=0, contrastive_weight=0.0)  # language modelling only: the freeze sets are the point


def small_vl(**kw):
    """The tiny_vl preset narrowed for a CPU test: 2 layers, both MoE (4 experts), 9 image tokens."""
    return tiny_vl().replace(**{**SMALL, **kw})


def trainable(**kw) -> set[str]:
    torch.manual_seed(0)
    model = Blues(small_vl(**kw))
    apply_freeze(model, model.config)
    return {n for n, p in model.named_parameters() if p.requires_grad}


PROJECTOR = {f"vision.projector.{w}" for w in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
ROUTERS = {f"blocks.{i}.mlp.router.weight" for i in (0, 1)}
EXPERTS = {f"blocks.{i}.mlp.experts.{w}" for i in (0, 1) for w in ("w_gate", "w_up", "w_down")}


def test_each_freeze_keeps_exactly_its_parameters_training():
    torch.manual_seed(0)
    model = Blues(small_vl())
    everything = {n for n, _ in model.named_parameters()}
    encoder = {"vision.encoder." + n for n, _ in model.vision.encoder.named_parameters()}
    assert len(encoder) == 23 and PROJECTOR | ROUTERS | EXPERTS <= everything  # the names below exist
    assert trainable(freeze="none") == everything
    assert trainable(freeze="encoder") == everything - encoder  # stage II: projector + language model
    assert trainable(freeze="all_but_projector") == PROJECTOR  # stage I
    assert trainable(freeze="all_but_moe") == ROUTERS | EXPERTS  # stage III
    # freeze_router on top of a stage: the routers too
    assert trainable(freeze="all_but_moe", freeze_router=True) == EXPERTS
    assert trainable(freeze="encoder", freeze_router=True) == everything - encoder - ROUTERS
    assert trainable(freeze="all_but_projector", freeze_router=True) == PROJECTOR


def test_a_text_model_freezes_all_but_its_moe_layers_shared_experts_included():
    from blues.presets import tiny
    model = Blues(tiny().replace(n_embd=32, n_head=2, expert_ffn_size=32, num_experts=4, num_shared_experts=1,
                                 shared_expert_gate=True, freeze="all_but_moe"))
    apply_freeze(model, model.config)
    shared = {f"blocks.{i}.mlp.{w}" for i in (0, 1)
              for w in ("shared.w_gate.weight", "shared.w_up.weight", "shared.w_down.weight", "shared_gate.weight")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == ROUTERS | EXPERTS | shared


@pytest.mark.parametrize("kw,world,ds,match", [
    (dict(num_dense_layers=2, freeze="all_but_moe"), 1, None,
     r"freeze=all_but_moe trains only the MoE layers, but this model has none \(every layer is dense\)"),
    (dict(freeze="all_but_projector", balance_bias_rate=0.001), 1, None,
     r"freeze=all_but_projector keeps the MoE layers as they are, but balance_bias_rate=0.001 moves them .*: set "
     r"balance_bias_rate=0"),
    (dict(freeze="all_but_projector", revive_dead_experts_after=5), 1, None,
     r"but revive_dead_experts_after=5 moves them"),
    (dict(moe_backend="deepspeed", freeze="all_but_projector"), 1, None,
     r"freeze=all_but_projector freezes the experts, but moe_backend=deepspeed needs trainable experts"),
    (dict(ep_size=2, freeze="all_but_projector"), 2, None,
     r"freeze=all_but_projector freezes the experts, which a ZeRO 2 checkpoint at ep_size=2 cannot give back "
     r"to each EP rank .*: use ep_size=1, or ZeRO 0 or 3"),
])
def test_freezes_that_cannot_train_or_resume_are_refused_by_name(kw, world, ds, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        validate(small_vl(out_dir=str(tmp_path), **kw), ds or BUILTIN_DS_CONFIG, world)


def test_frozen_experts_under_expert_parallelism_are_accepted_at_zero_3(tmp_path):
    cfg = small_vl(out_dir=str(tmp_path), ep_size=2, freeze="all_but_projector")
    assert validate(cfg, load_ds_config(os.path.join(DS_CONFIG_DIR, "zero3.json")), 2)


def test_a_resume_that_changes_freeze_is_refused():
    # The frozen parameters are not in the optimizer's partitions: the saved ones would not fit.
    saved = small_vl(freeze="encoder")
    with pytest.raises(ValueError, match=r"changed field\(s\): freeze: 'encoder' -> 'all_but_projector'"):
        check_resume_config(saved, saved.replace(freeze="all_but_projector"))
    assert check_resume_config(saved, saved.replace(lr=2e-2)) == ["lr: 0.01 -> 0.02"]


# ----------------------------------------------------------------------------- real DeepSpeed steps

SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from blues.presets import tiny_vl
from blues import train as T
SMALL = json.loads(sys.argv[2])
dist = T.init_distributed()
out = {}
for backend, freeze, freeze_router in [("torch", "encoder", False), ("torch", "all_but_projector", False),
                                       ("torch", "all_but_moe", True), ("deepspeed", "all_but_moe", False),
                                       ("deepspeed", "encoder", True)]:
    cfg = tiny_vl().replace(**SMALL, moe_backend=backend, freeze=freeze, freeze_router=freeze_router,
                            out_dir=sys.argv[1] + "/" + backend + freeze)
    run = T.build_engine(cfg, None, dist=dist, with_data=False)
    named = dict(run.model.named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    in_optimizer = {name_of[id(p)] for group in run.engine.optimizer.bit16_groups for p in group}
    before = {n: p.detach().clone() for n, p in named.items()}
    res = T.train_steps(run, 3)
    trains = {n for n, p in named.items() if p.requires_grad}
    moved = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
    out[f"{backend} {freeze} {freeze_router}"] = {
        "trains": sorted(trains), "in_optimizer": sorted(in_optimizer), "moved": sorted(moved),
        "finite": all(r.loss == r.loss for r in res)}
    run.engine.destroy()
print("RESULTS " + json.dumps(out))
T.exit_process(0)  # a rank's end: no interpreter teardown (blues.train.distributed says why)
"""


@pytest.mark.slow
def test_frozen_parameters_leave_the_optimizer_and_keep_their_values(tmp_path):
    """Through deepspeed.initialize (ZeRO 2, the built-in config), both MoE backends, each stage: the
    optimizer holds exactly the parameters that require gradients, and 3 steps move exactly those."""
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(SMALL)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    results = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert len(results) == 5
    for case, r in results.items():
        assert r["finite"] and r["trains"], case
        assert r["in_optimizer"] == r["trains"], case
        assert r["moved"] == r["trains"], (case, sorted(set(r["moved"]) ^ set(r["trains"])))
    assert set(results["torch all_but_projector False"]["trains"]) == PROJECTOR
    assert set(results["torch all_but_moe True"]["trains"]) == EXPERTS
    ds_moe = results["deepspeed all_but_moe False"]["trains"]
    assert all(n.startswith(("blocks.0.mlp.moe.deepspeed_moe.", "blocks.1.mlp.moe.deepspeed_moe.")) for n in ds_moe)
    assert sum(n.endswith("gate.wg.weight") for n in ds_moe) == 2  # the routers train in stage III
    ds_enc = results["deepspeed encoder True"]["trains"]
    assert not any(n.startswith("vision.encoder.") or n.endswith("gate.wg.weight") for n in ds_enc)


DIST_SCRIPT = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
from blues.presets import tiny_vl
from blues import train as T
from blues.train.ds_config import load_ds_config
out, ds_dir, small = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
SMALL = json.loads(small)
dist = T.init_distributed()
R = {}
for ds, freeze in [("zero2.json", "all_but_moe"), ("zero3.json", "all_but_projector")]:
    cfg = tiny_vl().replace(**SMALL, ep_size=2, freeze=freeze, out_dir=os.path.join(out, ds))
    run = T.build_engine(cfg, load_ds_config(os.path.join(ds_dir, ds)), dist=dist, with_data=False)
    # what this rank holds: its partition under ZeRO 3, the whole tensor (its EP slice for experts) otherwise
    here = lambda p: (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone()
    named = dict(run.model.named_parameters())
    before = {n: here(p) for n, p in named.items()}
    res = T.train_steps(run, 3)
    R[ds] = {"trains": sorted(n for n, p in named.items() if p.requires_grad),
             "moved": sorted(n for n, p in named.items() if not torch.equal(here(p), before[n])),
             "expert_sum": float(sum(here(p).double().sum() for n, p in named.items() if ".experts." in n)),
             "finite": all(r.loss == r.loss for r in res)}
    run.engine.destroy()
with open(os.path.join(out, f"results_{dist.rank}.json"), "w") as f:  # a file each: the ranks' stdout interleaves
    json.dump(R, f)
T.exit_process(0)  # a rank's end: no interpreter teardown (blues.train.distributed says why)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_freeze_under_expert_parallelism_on_two_ranks(tmp_path):
    """deepspeed --num_gpus 2 (two CPU ranks, gloo), ep_size=2: ZeRO 2 with freeze=all_but_moe (only the
    MoE layers train, the experts through their EP group) and ZeRO 3 with freeze=all_but_projector (the
    experts frozen: each rank keeps its own half, the start-up broadcast does not overwrite it)."""
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    (tmp_path / "script.py").write_text(DIST_SCRIPT)
    port = free_port()
    p = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(port), str(tmp_path / "script.py"),
                        str(tmp_path / "out"), DS_CONFIG_DIR, json.dumps(SMALL)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n]
    assert left == [], left
    recs = {r: json.loads((tmp_path / "out" / f"results_{r}.json").read_text()) for r in (0, 1)}
    for rank, R in recs.items():
        z2, z3 = R["zero2.json"], R["zero3.json"]
        assert z2["finite"] and z3["finite"], rank
        assert set(z2["trains"]) == ROUTERS | EXPERTS and z2["moved"] == z2["trains"], (rank, z2)
        assert set(z3["trains"]) == PROJECTOR, (rank, z3)
        # A ZeRO 3 partition of a parameter can be empty on one rank (nothing to move): at most the trained ones move.
        assert set(z3["moved"]) <= PROJECTOR and z3["moved"], (rank, z3)
    # each EP rank keeps its own (different) half of the frozen experts
    assert recs[0]["zero3.json"]["expert_sum"] != recs[1]["zero3.json"]["expert_sum"]
