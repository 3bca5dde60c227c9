"""Balancing without an auxiliary loss (blues.train.balance): the update rule, the bias in the model and in
exported weights, the same bias on every rank, its exact resume, and its effect on the expert load."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from blues.model import Blues
from blues.presets import tiny
from blues.train import balance

SMALL = dict(n_embd=64, n_head=2, block_size=32, num_experts=4, expert_ffn_size=64, micro_batch_size=4)


# ----------------------------------------------------------------------------- the rule

def test_rule_sign_gamma_and_ties():
    """Above the mean -gamma, below +gamma, at the mean 0; each layer against its own mean."""
    bias = torch.tensor([[0.5, 0.0, -0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    counts = torch.tensor([[10, 30, 20, 20], [1, 2, 3, 6]], dtype=torch.float64)  # means 20 and 3
    new = balance.next_bias(bias, counts, 0.125)
    assert new.dtype == torch.float32
    assert torch.equal(new, torch.tensor([[0.625, -0.125, -0.25, 0.0], [0.125, 0.125, 0.0, -0.125]]))


def test_rule_ties_are_exact_where_float_means_are_not():
    """Counts c - 1, c, c + 1 with 3c = 2^53 + 1: the float64 sum rounds, its mean is c - 0.5, and a float
    comparison gives the middle expert -gamma (measured: [1, -1, -1]); compared in integers it is the tie
    it is."""
    c = 3002399751580331
    counts = torch.tensor([[c - 1, c, c + 1]], dtype=torch.int64)
    assert torch.equal(balance.next_bias(torch.zeros(1, 3), counts, 1.0), torch.tensor([[1.0, 0.0, -1.0]]))


def test_bias_state_round_trip_and_shape_error():
    torch.manual_seed(0)
    m = Blues(tiny().replace(**SMALL, balance_bias_rate=0.01))
    assert [type(x).__name__ for x in balance.biased_layers(m)] == ["MoE", "MoE"]
    bias = torch.randn(2, 4)
    balance.set_bias(m, bias)
    assert torch.equal(balance.get_bias(m), bias)
    with pytest.raises(ValueError, match=r"balance bias of shape \(3, 4\) does not fit this model's 2 biased MoE "
                                         r"layers of 4 experts"):
        balance.set_bias(m, torch.zeros(3, 4))
    off = Blues(tiny().replace(**SMALL, balance_bias_rate=0.0))  # no layer selects with a bias
    assert balance.biased_layers(off) == [] and balance.get_bias(off) is None


def test_update_keeps_the_bias_fp32_in_a_bf16_model():
    """A bf16 engine casts buffers to bf16 (8 mantissa bits: 0.5 + 1e-3 rounds back to 0.5); update_bias
    reassigns them in fp32, so every step's gamma counts."""
    m = Blues(tiny().replace(**SMALL, balance_bias_rate=1e-3)).bfloat16()
    balance.set_bias(m, torch.full((2, 4), 0.5))
    counts = torch.tensor([[1, 1, 1, 5]] * 2, dtype=torch.float64)
    for _ in range(3):
        balance.update_bias(m, counts, 1e-3)
    for layer in balance.biased_layers(m):
        assert layer.selection_bias.dtype == torch.float32
    want = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float32)
    for _ in range(3):
        want = want + 1e-3 * torch.tensor([1.0, 1.0, 1.0, -1.0])
    assert torch.equal(balance.get_bias(m), torch.stack([want, want]))


def test_selected_counts_are_before_the_capacity_cut():
    """What the rule reads: every assignment the router made (N * K per layer), not only the kept ones."""
    torch.manual_seed(0)
    m = Blues(tiny().replace(**SMALL, capacity_factor=0.5))  # at most ceil(0.5 * 64 * 2 / 4) = 16 per expert
    out = m(torch.randint(0, 4096, (2, 32)))
    assert out.expert_selected.sum(dim=1).tolist() == [64 * 2] * 2
    assert (out.expert_selected >= out.expert_counts).all() and int(out.dropped) > 0
    assert torch.equal(out.expert_selected - out.expert_counts, (out.expert_selected - 16).clamp(min=0))


@pytest.mark.parametrize("fields, match", [
    ({"balance_bias_rate": -0.1}, r"balance_bias_rate=-0.1 is invalid: expected a number >= 0"),
    ({"balance_bias_rate": 0.01, "moe_backend": "deepspeed"},
     r"balance_bias_rate=0.01 is invalid: needs moe_backend=auto\|torch\|triton \(DeepSpeed's gate has no selection "
     r"bias\): set moe_backend=torch or balance_bias_rate=0"),
])
def test_config_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        tiny().replace(**fields)


# ----------------------------------------------------------------------------- generation keeps the bias

def test_export_keeps_the_bias_and_from_pretrained_routes_the_same(tmp_path):
    """A bias large enough to change which experts are chosen: the reloaded model's logits equal the
    trained model's; without the bias they differ (so the equality is the bias's doing). With
    balance_bias_rate=0 nothing is added to the weights file (older exports load as before)."""
    from safetensors.torch import load_file
    torch.manual_seed(0)
    cfg = tiny().replace(**SMALL, balance_bias_rate=0.01, router_noise_std=0.0)
    m = Blues(cfg).eval()
    bias = torch.tensor([[0.3, -0.3, 0.0, 0.1], [-0.2, 0.0, 0.2, 0.0]])
    balance.set_bias(m, bias)
    m.save_pretrained(str(tmp_path / "m"))
    w = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert torch.equal(torch.stack([w["blocks.0.mlp.selection_bias"], w["blocks.1.mlp.selection_bias"]]), bias)
    back = Blues.from_pretrained(str(tmp_path / "m")).eval()
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(ids)
        got = back(ids)
        balance.set_bias(back, torch.zeros(2, 4))
        unbiased = back(ids)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.expert_selected, want.expert_selected)
    assert not torch.equal(unbiased.expert_selected, want.expert_selected)
    Blues(cfg.replace(balance_bias_rate=0.0)).save_pretrained(str(tmp_path / "off"))
    assert not [k for k in load_file(str(tmp_path / "off" / "model.safetensors")) if "selection_bias" in k]


# ----------------------------------------------------------------------------- the same bias on every rank

RANKS = r'''
import json, os, sys
import torch
from blues import train as T
from blues.presets import tiny
from blues.train.balance import get_bias, next_bias
from blues.train.ds_config import BUILTIN_DS_CONFIG
out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
dist = T.init_distributed()
rec = {}
for ep in (1, 2):
    # 2 ranks x 3 x 33 tokens x top-2 = 396 assignments a layer over 8 experts: a mean of 49.5 that no count
    # equals, so each of the 5 updates is +-gamma and no entry of the bias can come back to 0
    cfg = tiny().replace(n_embd=64, n_head=2, block_size=33, num_experts=8, expert_ffn_size=64, micro_batch_size=3,
                         ep_size=ep, moe_backend="torch", balance_bias_rate=0.05, aux_loss_coef=0.0, out_dir=out,
                         warmup_steps=0)
    run = T.build_engine(cfg, BUILTIN_DS_CONFIG, dist=dist, with_data=False)  # random tokens, other on each rank
    res = T.train_steps(run, 5)
    want = torch.zeros(2, 8)
    for r in res:  # the rule on the counts every rank reports
        want = next_bias(want, r.expert_selected, 0.05)
    bias = get_bias(run.model)
    both = [torch.empty_like(bias) for _ in range(2)]
    torch.distributed.all_gather(both, bias)
    rec[ep] = {"bias": bias.tolist(), "same": torch.equal(both[0], both[1]), "rule": torch.equal(bias, want),
               "totals": [r.expert_selected.sum(dim=1).tolist() for r in res]}
json.dump(rec, open(os.path.join(out, f"rank{dist.rank}.json"), "w"))
T.exit_process(0)  # a rank's end: no interpreter teardown (blues.train.distributed says why)
'''


@pytest.mark.distributed
@pytest.mark.slow
def test_every_rank_holds_the_same_bias(tmp_path):
    """2 ranks on the real launcher, each on its own random tokens (their own counts), at ep_size 1 and
    2: after 5 steps both ranks' biases are bit-identical and equal the rule applied to the all-reduced
    counts, which hold both ranks' assignments (2 ranks x 99 tokens x top-2 per layer)."""
    from blues.common import free_port
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    (tmp_path / "ranks.py").write_text(RANKS)
    port = free_port()
    p = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(port), str(tmp_path / "ranks.py"),
                        str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n]
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for ep in ("1", "2"):
        for rec in recs:
            assert rec[ep]["same"] and rec[ep]["rule"]
            assert rec[ep]["totals"] == [[2 * 99 * 2] * 2] * 5
        assert recs[0][ep]["bias"] == recs[1][ep]["bias"]
        assert all(v != 0 for row in recs[0][ep]["bias"] for v in row)


# ----------------------------------------------------------------------------- exact resume

def _train(args, cwd):
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "blues-train"), "--progress", "off", *args],
                       cwd=cwd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr


def _losses(out_dir) -> dict[int, float]:
    rows = (out_dir / "monitor" / "blues" / "Train_loss.csv").read_text().splitlines()
    return {int(r.split(",")[0]): float(r.split(",")[1]) for r in rows if r and not r.startswith("step")}


def _client_bias(tag_dir):
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["blues"]["balance_bias"]


@pytest.mark.slow
def test_bias_resumes_exactly(tmp_path):
    """blues-train (one process, ZeRO 2): 10 steps with checkpoints at 5 and 10; then a second run resumed
    from the step-5 checkpoint. Steps 6-10 give the same losses bit for bit, and the step-10 bias is
    bit-identical; the exported model holds that bias. Saved after 5 (an odd number of) updates of
    +-gamma (no tie is possible at these counts, see args), every entry of the step-5 bias is an odd
    multiple of gamma = 0.05, never 0, so a bias lost on resume shows in the step-10 bias, and in the
    losses (checked by hand: with the restore removed, the resumed losses differ)."""
    from safetensors.torch import load_file

    from blues.data.prepare import prepare
    prepare(str(tmp_path / "data"), progress=False)
    # 3 sequences of 33 tokens: 198 assignments a step over 4 experts, a mean of 49.5 that no integer count
    # equals, so every update is +-gamma (no tie gives 0) and 5 of them can never sum to 0
    args = [f"{k}={v}" for k, v in {**SMALL, "micro_batch_size": 3, "block_size": 33}.items()] + [
        "balance_bias_rate=0.05", "aux_loss_coef=0", "max_steps=10", "save_interval=5", "eval_interval=100",
        "warmup_steps=2", f"data_dir={tmp_path / 'data'}"]
    ref = tmp_path / "ref"
    _train([*args, f"out_dir={ref}", "--prompt", ""], tmp_path)
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000005", again / "checkpoints" / "step_00000005")
    (again / "checkpoints" / "latest").write_text("step_00000005")
    log = _train([*args, f"out_dir={again}", "--no_export"], tmp_path)
    assert "at step 5" in log
    a, b = _losses(ref), _losses(again)
    assert sorted(b) == list(range(6, 11)) and [b[s] for s in b] == [a[s] for s in b]
    bias5 = _client_bias(ref / "checkpoints" / "step_00000005")
    bias10 = _client_bias(ref / "checkpoints" / "step_00000010")
    assert bias5.dtype == torch.float32 and bias5.shape == (2, 4) and (bias5 != 0).all(), bias5
    assert torch.equal(_client_bias(again / "checkpoints" / "step_00000010"), bias10)
    w = load_file(str(ref / "model" / "model.safetensors"))
    assert torch.equal(torch.stack([w[f"blocks.{i}.mlp.selection_bias"] for i in (0, 1)]), bias10)


# ----------------------------------------------------------------------------- the effect

@pytest.mark.slow
def test_bias_balances_the_load_without_the_aux_loss(tmp_path):
    """Guards the point of the feature (issue 10's acceptance, at a smaller, faster setting than
    benchmarks/balance.py's tiny preset): with aux_loss_coef=0 the router collapses, two experts take
    nearly every token in a layer (max/mean load over steps 21-40 measured here: 1.995; 2.0 is the
    ceiling for 4 experts top-2), while gamma=0.01 holds it at 1.12. The thresholds 1.5 and 1.3 sit
    between the two with room on both sides for another machine's float summation order."""
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "balance.py"),
                        "--small", "--steps", "40", "--window", "20", "--out", str(tmp_path / "balance.json")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    off, on = json.loads((tmp_path / "balance.json").read_text())["runs"]
    assert off["balance_bias_rate"] == 0 and on["balance_bias_rate"] == 0.01
    assert off["max_over_mean"][-1] > 1.5, off
    assert on["max_over_mean"][-1] < 1.3, on
