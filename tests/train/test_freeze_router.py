"""freeze_router: the routers keep their weights through real DeepSpeed steps (ZeRO 2, both MoE backends)
while the experts train; the refusals name the field; a resume that changes it is refused."""
import json
import subprocess
import sys

import pytest

from blues.config import BluesConfig
from blues.presets import tiny
from blues.train.resume_check import check_resume_config

SCRIPT = r"""
import json, sys, torch
from blues.presets import tiny
from blues import train as T
dist = T.init_distributed()
out = {}
for backend in ("torch", "deepspeed"):
    cfg = tiny().replace(n_embd=32, n_head=2, block_size=16, micro_batch_size=2, expert_ffn_size=32, num_experts=4,
                         balance_bias_rate=0.0, moe_backend=backend, freeze_router=True, warmup_steps=0, lr=1e-2,
                         out_dir=sys.argv[1] + "/" + backend)
    run = T.build_engine(cfg, None, dist=dist, with_data=False)
    named = dict(run.model.named_parameters())
    routers = {n: p.detach().clone() for n, p in named.items() if n.endswith(("router.weight", "gate.wg.weight"))}
    experts = {n: p.detach().clone() for n, p in named.items() if "expert" in n}
    res = T.train_steps(run, 3)
    out[backend] = {
        "routers": len(routers), "experts": len(experts),
        "routers_same": all(torch.equal(named[n].detach(), v) for n, v in routers.items()),
        "routers_frozen": all(not named[n].requires_grad for n in routers),
        "experts_moved": all(not torch.equal(named[n].detach(), v) for n, v in experts.items()),
        "finite": all(r.loss == r.loss for r in res)}
    run.engine.destroy()
print("RESULTS " + json.dumps(out))
"""


@pytest.mark.slow
def test_frozen_routers_keep_their_weights_while_the_experts_train(tmp_path):
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    results = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    for backend, r in results.items():
        assert r["routers"] == 2 and r["experts"] > 0, (backend, r)  # the tiny preset's 2 MoE layers
        assert r["routers_same"] and r["routers_frozen"] and r["experts_moved"] and r["finite"], (backend, r)


@pytest.mark.parametrize("field,value", [("balance_bias_rate", 0.001), ("revive_dead_experts_after", 5)])
def test_freeze_router_refuses_what_moves_the_routing(field, value):
    with pytest.raises(ValueError, match=f"freeze_router=True is invalid: keeps the routing fixed, but {field}="):
        tiny().replace(freeze_router=True, **{"balance_bias_rate": 0.0, field: value})


def test_a_resume_that_changes_freeze_router_is_refused():
    # The router leaves the optimizer when frozen: the saved partitions would not fit.
    saved = tiny().replace(balance_bias_rate=0.0)
    with pytest.raises(ValueError, match=r"freeze_router: False -> True"):
        check_resume_config(saved, saved.replace(freeze_router=True))
    assert isinstance(saved, BluesConfig)
