"""The probe's forced routing (blues.moe.forced_routing) as its trials use it: every token on the
fewest experts the capacity allows, only the choice forced, undone on leaving, per model; on the
stacked layer and on DeepSpeed's."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from blues.common import free_port
from blues.moe import forced_routing
from blues.moe.routing import hot_experts
from blues.presets import get_preset


@pytest.mark.parametrize("E, K, cap, N, hot", [
    (8, 2, None, 128, 2),  # no capacity: every token on the same K experts
    (8, 2, 64, 128, 4),  # capacity 64: 256 assignments need 4 experts
    (8, 2, 1000, 128, 2),  # a capacity above N: K experts can take everything
    (8, 2, 16, 128, 8),  # capacity 1.0: all experts needed
    (7, 3, 10, 50, 7),  # prime E, capacity below the need: never more than E
])
def test_hot_experts(E, K, cap, N, hot):
    assert hot_experts(E, K, cap, N) == hot


def tiny_model(**kw):
    from blues.model import Blues
    cfg = get_preset("tiny").replace(n_embd=64, n_layer=2, block_size=32, num_experts=8, **kw)
    torch.manual_seed(0)
    return Blues(cfg).train(), cfg


def test_forced_routing_sends_every_token_to_the_top_k_experts_and_is_undone():
    model, cfg = tiny_model()
    x = torch.randint(0, cfg.model.vocab_size, (4, 32))
    before = model(x, x)
    real = before.expert_counts
    with forced_routing(model) as layers:
        assert layers == 2
        out = model(x, x)
        assert out.expert_counts.tolist() == [[128, 128, 0, 0, 0, 0, 0, 0]] * 2  # N=128 tokens, K=2
        # Only the choice is forced: the losses keep training's scale (fp16 loss scaling is not thrown off).
        assert abs(out.loss.item() - before.loss.item()) < 0.5 and out.z_loss.item() < 2 * before.z_loss.item()
        out.loss.backward()  # gradients still flow through the forced routing
        assert model.blocks[0].mlp.router.weight.grad is not None
    assert torch.equal(model(x, x).expert_counts.sum(1), real.sum(1))
    assert (model(x, x).expert_counts > 0).sum() > 4, "real routing again after the block"


def test_forced_routing_touches_only_its_own_model():
    # The forcing is per layer: a second model in the same process (the next test, say) keeps its
    # real routing while the first is forced.
    forced, cfg = tiny_model()
    other, _ = tiny_model()
    x = torch.randint(0, cfg.model.vocab_size, (4, 32))
    other.eval()
    real = other(x).expert_counts
    with forced_routing(forced):
        assert torch.equal(other(x).expert_counts, real)
    assert (real > 0).sum() > 4


def test_forced_routing_fills_the_fewest_experts_the_capacity_allows():
    model, cfg = tiny_model(capacity_factor=2.0)  # capacity ceil(2 * 128 * 2 / 8) = 64
    x = torch.randint(0, cfg.model.vocab_size, (4, 32))
    with forced_routing(model):
        out = model(x, x)
    assert out.expert_counts.tolist() == [[64, 64, 64, 64, 0, 0, 0, 0]] * 2
    assert out.dropped.item() == 0


def test_partial_skew_forces_only_that_fraction():
    model, cfg = tiny_model()
    x = torch.randint(0, cfg.model.vocab_size, (4, 32))
    with forced_routing(model, skew=0.5):
        counts = model(x, x).expert_counts  # (L, E)
    assert (counts[:, :2] >= 64).all() and (counts[:, 2:].sum(1) > 0).all()
    with pytest.raises(ValueError, match="router_skew=0 is invalid"):
        with forced_routing(model, skew=0):
            pass


@pytest.mark.slow
def test_forced_routing_on_deepspeed_moe(tmp_path):
    """DeepSpeed's gate is steered by the adapter itself (one process, gloo, a real engine)."""
    code = textwrap.dedent("""
        import os, json, torch
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ["PORT"])
        from blues.presets import get_preset
        from blues.moe import forced_routing
        from blues.train import build_engine
        out = {}
        for cf in (None, 2.0):
            cfg = get_preset("tiny").replace(n_embd=64, n_layer=1, block_size=32, moe_backend="deepspeed",
                                             balance_bias_rate=0.0,
                                             num_experts=8, micro_batch_size=4, capacity_factor=cf)
            run = build_engine(cfg, None, with_data=False)
            x = torch.randint(0, cfg.model.vocab_size, (4, 32))
            with forced_routing(run.model) as layers:
                o = run.model(x, x)
                run.engine.backward(o.loss)
            out[str(cf)] = o.expert_counts.tolist()
            out[str(cf) + " z"] = o.z_loss.item()
            out[str(cf) + " layers"] = layers
            out[str(cf) + " removed"] = run.model(x, x).expert_counts.tolist()
        print("RESULT" + json.dumps(out))
    """)
    env = dict(os.environ, PORT=str(free_port()))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT")[1])
    assert res["None"] == [[128, 128, 0, 0, 0, 0, 0, 0]]
    assert res["None z"] < 100  # the recomputed z-loss sees the real gate input, not the shifted one
    assert res["2.0"] == [[64, 64, 64, 64, 0, 0, 0, 0]]
    assert res["None layers"] == res["2.0 layers"] == 1
    assert sum(c > 0 for c in res["None removed"][0]) > 4
