"""blues.train.metrics: the expert telemetry (NeMo Automodel's names and definitions), its log window and its
console summary."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from blues.common import free_port
from blues.data.prepare import prepare
from blues.model import Blues
from blues.presets import tiny
from blues.train.balance import set_bias
from blues.train.ds_config import DS_CONFIG_DIR
from blues.train.engine import Run
from blues.train.metrics import ExpertWindow, expert_events, expert_metrics, format_step, worst_layer
from blues.train.step import StepResult

torch.set_num_threads(1)

SMALL = dict(n_embd=64, n_head=2, block_size=32, expert_ffn_size=64, micro_batch_size=4, num_experts=4)


# ----------------------------------------------------------------------------- the math

@pytest.mark.parametrize("E", [1, 4, 7], ids=["E1: one expert is uniform and collapsed at once", "E4", "E7: prime"])
def test_collapsed_router_reads_one_over_E_and_E_minus_one_dead(E):
    """Every assignment on one expert: diversity 1/E, (E-1)/E dead, that expert carries E ideal loads."""
    m = expert_metrics(torch.tensor([[0.0] * (E - 1) + [96.0]]))
    assert m["moe/layer_0/expert_diversity"] == pytest.approx(1 / E, rel=1e-12)  # exp(0) / E, float64 math
    assert m["moe/layer_0/dead_expert_frac"] == (E - 1) / E
    assert m["moe/layer_0/utilization_max"] == pytest.approx(E, rel=1e-12)
    assert m["moe/layer_0/utilization_min"] == (0.0 if E > 1 else pytest.approx(1.0))


def test_uniform_router_reads_one_and_zero_dead():
    m = expert_metrics(torch.full((2, 8), 12.0))
    for i in (0, 1):
        assert m[f"moe/layer_{i}/expert_diversity"] == pytest.approx(1.0, rel=1e-12)
        assert m[f"moe/layer_{i}/dead_expert_frac"] == 0.0
        assert m[f"moe/layer_{i}/utilization_max"] == m[f"moe/layer_{i}/utilization_min"] == pytest.approx(1.0)
        assert m[f"moe/layer_{i}/cv"] == 0.0
    assert m["moe/expert_diversity_min"] == pytest.approx(1.0) and m["moe/dead_expert_frac_mean"] == 0.0


def test_partial_load_by_hand_and_per_expert_utilization():
    """Counts (3, 1, 0, 0): p = (3/4, 1/4), H = -(3/4 ln 3/4 + 1/4 ln 1/4), half the experts dead, ideal 1."""
    m = expert_metrics(torch.tensor([[3, 1, 0, 0]]))
    H = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert m["moe/layer_0/expert_diversity"] == pytest.approx(math.exp(H) / 4, rel=1e-12)
    assert m["moe/layer_0/dead_expert_frac"] == 0.5
    assert [m[f"moe_expert_utilization/layer_0_expert_{j}"] for j in range(4)] == [3.0, 1.0, 0.0, 0.0]
    assert m["moe/layer_0/cv"] == pytest.approx(torch.tensor([3.0, 1, 0, 0]).std().item() / 1.0)


def test_layer_with_no_token_reads_zero_diversity_all_dead():
    m = expert_metrics(torch.tensor([[0, 0, 0], [1, 1, 1]]))
    assert m["moe/layer_0/expert_diversity"] == 0.0 and m["moe/layer_0/dead_expert_frac"] == 1.0
    assert m["moe/layer_0/utilization_max"] == 0.0
    assert m["moe/expert_diversity_min"] == 0.0 and m["moe/expert_diversity_mean"] == pytest.approx(0.5)


def test_dropped_fraction_bias_summary_block_numbers_and_aggregates():
    selected = torch.tensor([[4, 4, 4, 4], [10, 2, 2, 2]])
    kept = torch.tensor([[4, 4, 4, 4], [6, 2, 2, 2]])  # layer 5 dropped 4 of its 16 assignments
    bias = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-0.3, 0.1, 0.1, 0.1]])
    m = expert_metrics(selected, kept, bias, layer_ids=[1, 5])
    assert "moe/layer_0/expert_diversity" not in m, "layers are named by block number"
    assert m["moe/layer_1/dropped_frac"] == 0.0 and m["moe/layer_5/dropped_frac"] == 0.25
    assert (m["moe/layer_5/bias_min"], m["moe/layer_5/bias_max"]) == (pytest.approx(-0.3), pytest.approx(0.1))
    assert m["moe/layer_5/bias_mean"] == pytest.approx(0.0, abs=1e-7)  # fp32 inputs: -0.3 and 0.1 are not exact
    assert m["moe/expert_utilization_max"] == 2.5 and m["moe/expert_utilization_min"] == 0.5  # 10 / 4, 2 / 4
    assert worst_layer(m) == 5
    assert expert_events(m, 7)[0][2] == 7 and len(expert_events(m, 7)) == len(m) and expert_events(None, 7) == []


# ----------------------------------------------------------------------------- window and console line

def _run(**kw):
    cfg = tiny().replace(**SMALL, **kw)
    return Run(cfg=cfg, ds_config={}, engine=None, model=Blues(cfg), dist=None, stage=0,
               num_moe_layers=len(cfg.moe_layer_ids()))


def _result(step, selected=None, kept=None):
    return StepResult(step=step, loss=1.0, ce_loss=1.0, aux_loss=0.0, z_loss=0.0, lr=1e-3, grad_norm=1.0,
                      seconds=0.1, skipped=selected is None, stop_signal=False, expert_selected=selected,
                      expert_counts=kept)


def test_window_sums_the_steps_since_the_last_log_and_reads_the_bias():
    """Two steps that each leave expert 3 of layer 1 dead, and one skipped step (no counts): the window
    reads their sum; the model's selection bias is summarised; take() starts a new window."""
    run = _run(n_layer=3, num_dense_layers=1, balance_bias_rate=0.01)  # MoE blocks 1 and 2
    set_bias(run.model, torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.02, -0.01, 0.0, 0.0]]))
    w = ExpertWindow(run)
    assert w.take() is None
    a = torch.tensor([[2.0, 2, 2, 2], [4, 4, 0, 0]])
    w.add(_result(1, a, a))
    w.add(_result(2))  # skipped
    w.add(_result(3, torch.tensor([[2.0, 2, 2, 2], [0, 4, 4, 0]]), torch.tensor([[2.0, 2, 2, 2], [0, 4, 4, 0]])))
    m = w.take()
    assert m["moe/layer_1/dead_expert_frac"] == 0.0 and m["moe/layer_2/dead_expert_frac"] == 0.25
    assert [m[f"moe_expert_utilization/layer_2_expert_{j}"] for j in range(4)] == [1.0, 2.0, 1.0, 0.0]
    assert m["moe/layer_2/bias_max"] == pytest.approx(0.02) and m["moe/layer_1/bias_max"] == 0.0
    assert w.take() is None


def test_console_line_shows_the_worst_layer():
    run = _run()
    m = expert_metrics(torch.tensor([[5.0, 5, 5, 5], [20, 0, 0, 0]]))
    line = format_step(_result(10, torch.ones(2, 4)), run, 1000.0, m)
    assert "experts worst layer 1: util 0.00-4.00 dead 75% diversity 0.250" in line
    assert "dropped 0.00%" in line
    assert "worst layer" not in format_step(_result(10, torch.ones(2, 4)), run, 1000.0)


# ----------------------------------------------------------------------------- EP=2 reports what EP=1 reports

EP_SCRIPT = r'''
import json, os, sys
import torch
from blues import train as T
from blues.presets import tiny
from blues.train.balance import get_bias
from blues.train.ds_config import load_ds_config
from blues.train.metrics import expert_metrics

data, out, ds = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank
dist = T.init_distributed()
R = {}
for ep in (1, 2):
    cfg = tiny().replace(n_embd=64, block_size=32, micro_batch_size=4, num_experts=4, expert_ffn_size=64,
                         router_noise_std=0.0, moe_backend="torch", capacity_factor=1.0, balance_bias_rate=0.01,
                         ep_size=ep, data_dir=data, out_dir=os.path.join(out, f"ep{ep}"), warmup_steps=2, max_steps=3)
    run = T.build_engine(cfg, load_ds_config(ds), dist=dist)
    R[ep] = [{"selected": r.expert_selected.tolist(), "kept": r.expert_counts.tolist(),
              "metrics": expert_metrics(r.expert_selected, r.expert_counts, get_bias(run.model), cfg.moe_layer_ids())}
             for r in T.train_steps(run, 3)]
with open(os.path.join(out, f"metrics{dist.rank}.json"), "w") as f:
    json.dump(R, f)
T.exit_process(0)  # a rank's end: no interpreter teardown (blues.train.distributed says why)
'''


@pytest.fixture(scope="module")
def ep_record(tmp_path_factory):
    """One launch of 2 CPU ranks (gloo, ZeRO 2) training ep_size=1 (data parallel 2) then ep_size=2 on the
    same batches, router noise off, capacity_factor 1 (some assignments dropped), bias balancing on."""
    d = tmp_path_factory.mktemp("ep_metrics")
    prepare(str(d / "data"), progress=False)
    (d / "script.py").write_text(EP_SCRIPT)
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = free_port()
    p = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(port), str(d / "script.py"),
                        str(d / "data"), str(d / "out"), os.path.join(DS_CONFIG_DIR, "zero2.json")], cwd=d,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n]
    assert left == [], left
    return [json.loads((d / "out" / f"metrics{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
@pytest.mark.slow
def test_ep2_reports_the_same_expert_metrics_as_ep1(ep_record):
    """Counts are the global load at both ep_size: every step's selections sum to all ranks' assignments
    (2 ranks x 4 x 32 tokens x top-2 = 512 per layer), both ranks report the same numbers, and EP=2 reads
    what EP=1 reads for the same routing."""
    r0, r1 = ep_record
    assert r0 == r1, "every rank holds the same all-reduced counts and bias"
    ep1, ep2 = r0["1"], r0["2"]
    for step in ep1 + ep2:
        assert [sum(row) for row in step["selected"]] == [512, 512]
        assert any(s > k for rs, rk in zip(step["selected"], step["kept"]) for s, k in zip(rs, rk)), \
            "capacity_factor 1 should drop something, so that dropped_frac is compared too"
    for a, b in zip(ep1, ep2):
        assert a["selected"] == b["selected"] and a["kept"] == b["kept"]
        assert a["metrics"] == b["metrics"]
