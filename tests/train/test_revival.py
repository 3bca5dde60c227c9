"""blues.train.revival: the counter rule, the donor choice, the state, and revival inside real DeepSpeed
engines (one process; ZeRO 0/1/2, fp32 and bf16) and inside the training loop with an exact resume.

An expert is forced dead with the public forced-routing context (blues.moe.forced_routing): with no
capacity limit it sends every token to experts 0 and 1 (the top-2 "hot" experts), so experts 2 and 3 of
every layer are chosen by no token for as long as the block lasts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from blues.model import Blues
from blues.presets import tiny
from blues.train import revival

SMALL = dict(n_embd=64, n_head=2, block_size=32, num_experts=4, expert_ffn_size=64, micro_batch_size=4)


# ----------------------------------------------------------------------------- the rule and the state

def test_counter_rule_counts_consecutive_dead_steps_only():
    dead = torch.tensor([[0, 2, 5, 1]])
    got = revival.next_dead_steps(dead, torch.tensor([[3.0, 0.0, 0.0, 7.0]]))
    assert got.tolist() == [[0, 3, 6, 0]] and got.dtype == torch.int64


def test_donor_is_the_most_loaded_lowest_on_a_tie():
    """Row 0: expert 2 reached N=3, donor the max (expert 1). Row 1: experts 0 and 3 tie for the max, the
    lowest wins; both dead experts are revived. Row 2: no token at all (no donor), nothing revived."""
    dead = torch.tensor([[0, 0, 3, 1], [0, 4, 3, 0], [3, 3, 3, 3]])
    selected = torch.tensor([[5.0, 9.0, 0.0, 0.0], [8.0, 0.0, 0.0, 8.0], [0.0, 0.0, 0.0, 0.0]])
    assert revival.choose_revivals(dead, selected, 3) == [(0, 2, 1), (1, 1, 0), (1, 2, 0)]


def test_dead_steps_round_trip_and_shape_error():
    m = Blues(tiny().replace(**SMALL, revive_dead_experts_after=3))
    assert revival.get_dead_steps(m).tolist() == [[0] * 4] * 2  # fresh model: all zero
    want = torch.tensor([[0, 1, 2, 0], [3, 0, 0, 1]])
    revival.set_dead_steps(m, want)
    assert torch.equal(revival.get_dead_steps(m), want)
    with pytest.raises(ValueError, match=r"dead-step counters of shape \(1, 4\) do not fit this model's 2 reviving"):
        revival.set_dead_steps(m, torch.zeros(1, 4, dtype=torch.int64))
    off = Blues(tiny().replace(**SMALL))
    assert revival.get_dead_steps(off) is None
    revival.restore_dead_steps(off, want)  # revival switched off since the save: ignored
    assert revival.get_dead_steps(off) is None


def test_noise_is_bounded_and_fixed_by_its_seed_alone():
    row = torch.randn(1000)
    a = revival._noise(row, 0, 5, 1, 2, 0)
    rms = row.pow(2).mean().sqrt()
    assert a.abs().max() <= revival.REVIVAL_NOISE * rms
    assert a.abs().max() > 0.9 * revival.REVIVAL_NOISE * rms  # uniform over [-a, a]: 1000 draws reach 0.9a
    assert torch.equal(a, revival._noise(row, 0, 5, 1, 2, 0))
    for other in ((1, 5, 1, 2, 0), (0, 6, 1, 2, 0), (0, 5, 0, 2, 0), (0, 5, 1, 3, 0), (0, 5, 1, 2, 1)):
        assert not torch.equal(a, revival._noise(row, *other)), other


def test_events_per_layer_and_total():
    rev = [revival.Revival(1, 2, 0, 7), revival.Revival(1, 3, 0, 7), revival.Revival(3, 0, 1, 7)]
    assert revival.revival_events(rev, [1, 3], 7) == [("moe/layer_1/revived_experts", 2.0, 7),
                                                      ("moe/layer_3/revived_experts", 1.0, 7),
                                                      ("moe/revived_experts", 3.0, 7)]
    assert revival.revival_events([], [1, 3], 7) == []
    assert revival.format_revival(rev[2], 5) == (
        "step 7: revived expert 0 of layer 3 (chosen by no token for 5 steps) from expert 1")


def test_zero3_is_refused_before_the_first_step():
    from blues.train import Run
    cfg = tiny().replace(**SMALL, revive_dead_experts_after=3)
    with pytest.raises(ValueError, match=r"revive_dead_experts_after=3 needs ZeRO stage 0, 1 or 2"):
        revival.check_revival(Run(cfg=cfg, ds_config={}, engine=None, model=None, dist=None, stage=3))
    revival.check_revival(Run(cfg=cfg.replace(revive_dead_experts_after=0), ds_config={}, engine=None, model=None,
                              dist=None, stage=3))  # off: nothing to refuse


# ----------------------------------------------------------------------------- real engines, one process

ENGINES = r'''
import json, os, sys
import torch
torch.set_num_threads(1)
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from blues import train as T
from blues.presets import tiny
from blues.moe import forced_routing
from blues.train.ds_config import DS_CONFIG_DIR, load_ds_config
from blues.train.revival import get_dead_steps, link_optimizer_state, master_copy, revival_layers, revive_dead_experts

out = sys.argv[1]
dist = T.init_distributed()
NAMES = ("w_gate", "w_up", "w_down", "router")
R = {}
for case, ds, dtype in (("0fp32", "zero0", "fp32"), ("0bf16", "zero0", "bf16"), ("1bf16", "zero1", "bf16"),
                        ("2fp32", "zero2", "fp32"), ("2offload", "zero2_offload", "fp32")):
    cfg = tiny().replace(**json.loads(sys.argv[2]), revive_dead_experts_after=3, warmup_steps=0, dtype=dtype,
                         out_dir=os.path.join(out, case))
    run = T.build_engine(cfg, load_ds_config(os.path.join(DS_CONFIG_DIR, f"{ds}.json")), dist=dist, with_data=False)
    layers = revival_layers(run.model)
    tensors = lambda m: [m.experts.w_gate, m.experts.w_up, m.experts.w_down, m.router.weight]

    def master(p):  # the fp32 weights the optimizer updates
        v = safe_get_full_fp32_param(p)
        return (master_copy(run.engine, p).detach().float() if v is None else v).clone()

    def state(p, key):
        if hasattr(p, "_hp_mapping"):
            link_optimizer_state(run.engine)
            return safe_get_full_optimizer_state(p, key).clone()
        opt = run.engine.optimizer
        return getattr(opt, "optimizer", opt).state[master_copy(run.engine, p)][key].clone()

    rec = {"optimizer": type(run.engine.optimizer).__name__, "steps": []}

    def step():
        r = T.train_step(run)
        rev = revive_dead_experts(run, r)
        rec["steps"].append({"selected": r.expert_selected.tolist(), "revived": [list(x) for x in rev],
                             "dead": get_dead_steps(run.model).tolist()})

    for _ in range(2):
        step()
    # the dead-to-be rows have Adam state to reset (they were chosen in steps 1-2)
    rec["state_before"] = min(state(p, k)[2:].abs().max().item() for m in layers for p in tensors(m)
                              for k in ("exp_avg", "exp_avg_sq"))
    with forced_routing(run.model):
        for _ in range(3):
            step()
    chk = {}
    for l, m in enumerate(layers):
        for n, p in zip(NAMES, tensors(m)):
            w = master(p)
            chk[f"{l}/{n}/module_vs_master"] = (p.detach().float() - w.to(p.dtype).float()).abs().max().item()
            chk[f"{l}/{n}/noise"] = [((w[g] - w[0]).abs().max() / w[0].pow(2).mean().sqrt()).item() for g in (2, 3)]
            chk[f"{l}/{n}/live_rows_differ"] = ((w[1] - w[0]).abs().max() / w[0].pow(2).mean().sqrt()).item()
            for k in ("exp_avg", "exp_avg_sq"):
                s = state(p, k)
                chk[f"{l}/{n}/{k}/revived"] = s[2:].abs().max().item()
                chk[f"{l}/{n}/{k}/live"] = s[:2].reshape(2, -1).abs().max(dim=1).values.min().item()
        b = m.selection_bias
        chk[f"{l}/bias"] = [str(b.dtype), b[2].item() == b[0].item(), b[3].item() == b[0].item()]
    rec["check"] = chk
    for _ in range(2):
        step()
    R[case] = rec
print("RESULT " + json.dumps(R))
'''


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    p = subprocess.run([sys.executable, "-c", ENGINES, str(tmp), json.dumps(SMALL)], cwd=tmp, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))[7:])


CASES = ("0fp32", "0bf16", "1bf16", "2fp32", "2offload")  # ZeRO stage and dtype; ds_configs/zero2_offload.json


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_forced_dead_expert_is_revived_once_and_chosen_again(engines, case):
    """Steps 1-2 real routing, 3-5 forced (experts 2 and 3 dead), 6-7 real again, N=3: experts 2 and 3 of
    both layers are revived at the end of step 5 and at no other step, from expert 0 (0 and 1 tie under
    forcing: the lowest index), their counters back at 0; in steps 6 and 7 the router chooses them."""
    steps = engines[case]["steps"]
    assert [s["revived"] for s in steps] == [[]] * 4 + [[[l, g, 0, 5] for l in (0, 1) for g in (2, 3)]] + [[]] * 2
    assert [s["dead"] for s in steps[2:5]] == [[[0, 0, 1, 1]] * 2, [[0, 0, 2, 2]] * 2, [[0] * 4] * 2]
    assert all(s["selected"][l][g] == 0 for s in steps[2:5] for l in (0, 1) for g in (2, 3))  # really forced
    assert all(s["selected"][l][g] > 0 for s in steps[5:] for l in (0, 1) for g in (2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_revived_weights_are_the_donors_plus_bounded_noise_and_state_reset(engines, case):
    """Right after the revival, in the fp32 weights the optimizer updates (DeepSpeed's partitions at ZeRO 1/2
    and in bf16): every revived row differs from the donor's by at most REVIVAL_NOISE x the donor row's rms
    (1e-6 relative slack for the float rounding of donor + noise) and by more than half of it (the max of
    64+ uniform draws; a copy without noise would give 0); the module parameter the next forward reads
    holds the same values; Adam's exp_avg and exp_avg_sq are 0 on the revived rows, which had state
    before, and not on the live ones; the selection bias is the donor's, in fp32."""
    rec = engines[case]
    assert rec["state_before"] > 0
    a = revival.REVIVAL_NOISE
    for l in (0, 1):
        for n in ("w_gate", "w_up", "w_down", "router"):
            c = lambda k, pre=f"{l}/{n}/": rec["check"][pre + k]  # noqa: E731
            assert all(0.5 * a < x <= a * (1 + 1e-6) for x in c("noise")), (n, c("noise"))
            assert c("live_rows_differ") > 10 * a  # the same measure between two live experts: far above the noise
            assert c("module_vs_master") == 0.0
            for k in ("exp_avg", "exp_avg_sq"):
                assert c(f"{k}/revived") == 0.0 and c(f"{k}/live") > 0, (n, k)
        assert rec["check"][f"{l}/bias"] == ["torch.float32", True, True]
    assert rec["optimizer"] == {"0fp32": "AdamW", "0bf16": "FP16_UnfusedOptimizer"}.get(case, "DeepSpeedZeroOptimizer")


# ----------------------------------------------------------------------------- the loop, and an exact resume

LOOP = r'''
import json, os, shutil, sys
import torch
torch.set_num_threads(1)
from blues import train as T
from blues.presets import tiny
from blues.moe import forced_routing
from blues.train.checkpoint import find_resume

root, data, small = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
dist = T.init_distributed()
cfg = lambda out: tiny().replace(**small, revive_dead_experts_after=3, warmup_steps=0, max_steps=8, save_interval=4,
                                 eval_interval=100, log_interval=100, data_dir=data, out_dir=out)
ref, again = os.path.join(root, "ref"), os.path.join(root, "again")
run = T.build_engine(cfg(ref), None, dist=dist)
with forced_routing(run.model):
    assert T.train(run, prompt=None, export=False) == 0
os.makedirs(os.path.join(again, "checkpoints"))
shutil.copytree(os.path.join(ref, "checkpoints", "step_00000004"), os.path.join(again, "checkpoints", "step_00000004"))
open(os.path.join(again, "checkpoints", "latest"), "w").write("step_00000004")
run = T.build_engine(cfg(again), None, dist=dist)
T.resume(run, find_resume("auto", again))
print("RESUMED at step", run.step)
with forced_routing(run.model):
    assert T.train(run, prompt=None, export=False) == 0
'''


def _csv(path) -> dict[int, float]:
    rows = path.read_text().splitlines()
    return {int(r.split(",")[0]): float(r.split(",")[1]) for r in rows if r and not r.startswith("step")}


@pytest.mark.slow
def test_loop_revives_logs_and_resumes_exactly(tmp_path):
    """blues.train.train (ZeRO 2, the built-in config) with experts 2 and 3 forced dead throughout, N=3,
    8 steps, checkpoints at 4 and 8: they are revived at steps 3 and 6 (one revival per dead stretch: the
    counter restarts at 0), each time a console line per expert and a monitor event. A run resumed from the
    step-4 checkpoint (counters at 1, saved in client_state) revives at 6 too and repeats steps 5-8's losses
    and the step-8 weights bit for bit. Checked by hand: with the counters not restored, the resumed run
    revives at step 7 instead, and this test fails on its console lines."""
    from blues.data.prepare import prepare
    prepare(str(tmp_path / "data"), progress=False)
    p = subprocess.run([sys.executable, "-c", LOOP, str(tmp_path), str(tmp_path / "data"), json.dumps(SMALL)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    first, second = p.stdout.split("RESUMED at step 4")
    line = "step {s}: revived expert {g} of layer {l} (chosen by no token for 3 steps) from expert 0"
    for text, steps in ((first, (3, 6)), (second, (6,))):
        got = [x for x in text.splitlines() if "revived expert" in x]
        assert got == [line.format(s=s, g=g, l=l) for s in steps for l in (0, 1) for g in (2, 3)], got
    ref, again = tmp_path / "ref", tmp_path / "again"
    assert _csv(ref / "monitor" / "blues" / "moe_revived_experts.csv") == {3: 4.0, 6: 4.0}
    assert _csv(ref / "monitor" / "blues" / "moe_layer_1_revived_experts.csv") == {3: 2.0, 6: 2.0}
    a, b = _csv(ref / "monitor" / "blues" / "Train_loss.csv"), _csv(again / "monitor" / "blues" / "Train_loss.csv")
    assert sorted(b) == [5, 6, 7, 8] and [b[s] for s in b] == [a[s] for s in b]
    load = lambda d: torch.load(d / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt",  # noqa: E731
                                weights_only=False)
    sa, sb = load(ref), load(again)
    assert sa["module"].keys() == sb["module"].keys()
    assert all(torch.equal(sa["module"][k], sb["module"][k]) for k in sa["module"])
    assert torch.equal(sa["blues"]["dead_steps"], sb["blues"]["dead_steps"])
    assert load(ref)["blues"]["dead_steps"].tolist() == [[0, 0, 2, 2]] * 2  # dead at 7 and 8 since the revival at 6
    shutil.rmtree(tmp_path / "data")
