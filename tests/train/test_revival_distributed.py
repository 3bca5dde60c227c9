"""Dead-expert revival on 2 CPU ranks under the real `deepspeed` launcher (gloo): ZeRO 1 and 2, data
parallel (ep_size=1) and expert parallel (ep_size=2).

One launch builds engine after engine in one process group (as test_expert_parallel_distributed.py does),
so the process start-up is paid once. Each engine takes 2 steps with real routing on each rank's own
random tokens, 3 with every token forced to experts 0 and 1 (blues.moe.forced_routing; under EP those are
both EP rank 0's, so the revived experts 2 and 3 live on rank 1 and their donor's rows must travel), then
2 real steps again, with revive_dead_experts_after=3.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from blues.common import free_port
from blues.train.revival import REVIVAL_NOISE

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DEEPSPEED = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")

SCRIPT = r'''
import json, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from blues import train as T
from blues.presets import tiny
from blues.moe import forced_routing
from blues.moe.expert_parallel import all_gather_experts
from blues.train.ds_config import DS_CONFIG_DIR, load_ds_config
from blues.train.revival import get_dead_steps, link_optimizer_state, revival_layers, revive_dead_experts

out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
d = T.init_distributed()
R = {}
for stage, ep in ((1, 2), (2, 1), (2, 2)):
    cfg = tiny().replace(n_embd=64, n_head=2, block_size=32, num_experts=4, expert_ffn_size=64, micro_batch_size=4,
                         ep_size=ep, moe_backend="torch", revive_dead_experts_after=3, warmup_steps=0,
                         out_dir=os.path.join(out, f"z{stage}_ep{ep}"))
    run = T.build_engine(cfg, load_ds_config(os.path.join(DS_CONFIG_DIR, f"zero{stage}.json")), dist=d,
                         with_data=False)
    layers = revival_layers(run.model)

    def whole(m, name, key=None):  # (E, ...) fp32 master (or Adam state) of every expert, on every rank
        p = getattr(m.experts, name) if name != "router" else m.router.weight
        link_optimizer_state(run.engine)
        v = (safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)).clone()
        return all_gather_experts(v, m.ep) if (name != "router" and m.ep is not None) else v

    rec = {"steps": []}

    def step():
        r = T.train_step(run)
        rev = revive_dead_experts(run, r)
        rec["steps"].append({"selected": r.expert_selected.tolist(), "revived": [list(x) for x in rev],
                             "dead": get_dead_steps(run.model).tolist()})

    for _ in range(2):
        step()
    with forced_routing(run.model):
        for _ in range(3):
            step()
    chk = {}
    for l, m in enumerate(layers):
        for n in ("w_gate", "w_up", "w_down", "router"):
            w = whole(m, n)
            rms = w[0].pow(2).mean().sqrt()
            chk[f"{l}/{n}/noise"] = [((w[g] - w[0]).abs().max() / rms).item() for g in (2, 3)]
            chk[f"{l}/{n}/pattern"] = ((w[3] - w[0]).flatten()[:8] / rms).tolist()
            for k in ("exp_avg", "exp_avg_sq"):
                s = whole(m, n, k)
                chk[f"{l}/{n}/{k}"] = [s[2:].abs().max().item(), s[:2].abs().max().item()]
        both = [torch.empty_like(m.router.weight) for _ in range(2)]
        dist.all_gather(both, m.router.weight.detach().contiguous())
        chk[f"{l}/router_same_on_both_ranks"] = torch.equal(both[0], both[1])
    rec["check"] = chk
    for _ in range(2):
        step()
    R[f"z{stage}_ep{ep}"] = rec
json.dump(R, open(os.path.join(out, f"rank{d.rank}.json"), "w"))
T.exit_process(0)  # a rank's end: no interpreter teardown (blues.train.distributed says why)
'''


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("revival")
    (tmp / "script.py").write_text(SCRIPT)
    port = free_port()
    p = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(tmp / "script.py"), str(tmp)],
                       cwd=tmp, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


CASES = ("z1_ep2", "z2_ep1", "z2_ep2")


@pytest.mark.parametrize("case", CASES)
def test_every_rank_revives_the_same_experts_once(records, case):
    """Both ranks report the same revivals: experts 2 and 3 of both layers at the end of step 5, donor 0,
    nothing else; the counts are global (2 ranks x 128 tokens x top-2 = 512 a layer while forced), and after
    the forcing the router chooses the revived experts again."""
    r0, r1 = records[0][case], records[1][case]
    assert [s["revived"] for s in r0["steps"]] == [[s for s in x["revived"]] for x in r1["steps"]]
    assert [s["revived"] for s in r0["steps"]] == [[]] * 4 + [[[l, g, 0, 5] for l in (0, 1) for g in (2, 3)]] + [[]] * 2
    assert [s["selected"] for s in r0["steps"][2:5]] == [[[256.0, 256.0, 0.0, 0.0]] * 2] * 3
    assert all(s["selected"][l][g] > 0 for s in r0["steps"][5:] for l in (0, 1) for g in (2, 3))
    assert r0["steps"][-1]["dead"] == r1["steps"][-1]["dead"] == [[0] * 4] * 2


@pytest.mark.parametrize("case", CASES)
def test_revived_rows_in_the_fp32_partitions(records, case):
    """In DeepSpeed's fp32 partitions, gathered from both ranks: revived rows = donor + noise within
    REVIVAL_NOISE x rms (1e-6 relative slack for rounding), Adam's state 0 there and not on live rows, the
    router the same on both ranks. Under EP the revived experts live on rank 1 and the donor on rank 0."""
    for rec in records:
        chk = rec[case]["check"]
        for l in (0, 1):
            for n in ("w_gate", "w_up", "w_down", "router"):
                assert all(0.5 * REVIVAL_NOISE < x <= REVIVAL_NOISE * (1 + 1e-6) for x in chk[f"{l}/{n}/noise"]), n
                for k in ("exp_avg", "exp_avg_sq"):
                    revived, live = chk[f"{l}/{n}/{k}"]
                    assert revived == 0.0 and live > 0, (n, k)
            assert chk[f"{l}/router_same_on_both_ranks"]


def test_expert_parallel_draws_the_same_noise(records):
    """The noise is fixed by (seed, step, layer, expert, tensor) alone: the revived-minus-donor pattern over the
    donor's rms is the same at ep_size 1 and 2 (1e-5 absolute on values up to 0.01: the donors differ by
    float summation order between the two runs, about 1e-6 relative)."""
    a, b = records[0]["z2_ep1"]["check"], records[0]["z2_ep2"]["check"]
    for l in (0, 1):
        for n in ("w_gate", "w_up", "w_down", "router"):
            assert a[f"{l}/{n}/pattern"] == pytest.approx(b[f"{l}/{n}/pattern"], abs=1e-5), n
