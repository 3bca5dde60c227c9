"""blues.moe.deepspeed_moe on one process (ep_size=1, no process group): same function as the stacked
backend where DeepSpeed allows, and the stacked-layout conversion both ways."""
import pytest
import torch

from blues.model import Blues
from blues.moe import deepspeed_moe as md
from blues.presets import tiny


def _cfg(**kw):
    # num_experts 4 keeps it quick; DeepSpeed's gate has no selection bias, so none (the preset has one)
    base = dict(moe_backend="deepspeed", router_noise_std=0.0, n_embd=64, block_size=16, expert_ffn_size=96,
                num_experts=4, balance_bias_rate=0.0, routed_scaling_factor=1.0)
    base.update(kw)
    return tiny().replace(**base)


def _pair(cfg):
    """A DeepSpeed-backend model and a torch-backend model with the same weights."""
    torch.manual_seed(0)
    ds = Blues(cfg)
    ref = Blues(cfg.replace(moe_backend="torch"))
    sd = md.stacked_state_dict(ds)
    sd.pop("lm_head.weight")  # tied
    ref.load_weights(sd)
    return ds, ref


@pytest.mark.parametrize("kw", [
    {},                                   # top-2 of 4, no capacity
    {"routed_scaling_factor": 2.0},       # the tiny preset's scale, applied to DeepSpeed's combined output
    {"num_experts": 5, "top_k": 3},       # k > 2 takes DeepSpeed's generic top-k gate; prime E
    {"top_k": 1, "norm_topk_prob": False},  # DeepSpeed's top-1 weights by the probability
    {"num_shared_experts": 1},            # shared experts are added outside DeepSpeed's layer
])
def test_same_function_as_stacked_backend(kw):
    ds, ref = _pair(_cfg(**kw))
    x = torch.randint(0, 4096, (3, 16))
    a, b = ds(x, x), ref(x, x)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.z_loss, b.z_loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(a.expert_counts, b.expert_counts)
    assert torch.equal(a.expert_selected, b.expert_selected) and torch.equal(a.expert_selected, a.expert_counts)
    assert int(a.dropped) == int(b.dropped) == 0
    a.loss.backward()
    b.loss.backward()
    gds = dict(ds.named_parameters())
    gref = dict(ref.named_parameters())
    torch.testing.assert_close(gds["blocks.0.mlp.moe.deepspeed_moe.gate.wg.weight"].grad,
                               gref["blocks.0.mlp.router.weight"].grad, rtol=1e-4, atol=1e-6)
    for e in range(ds.config.moe.num_experts):
        torch.testing.assert_close(gds[f"blocks.1.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{e}.w_down"].grad,
                                   gref["blocks.1.mlp.experts.w_down"].grad[e], rtol=1e-4, atol=1e-6)


def test_capacity_counts_kept_and_dropped():
    # capacity ceil(0.5 * 48 * 2 / 4) = 12 per expert: some assignments must drop, none beyond capacity is kept
    cfg = _cfg(capacity_factor=0.5)
    torch.manual_seed(0)
    m = Blues(cfg)
    x = torch.randint(0, 4096, (3, 16))
    out = m(x, x)
    cap = cfg.moe.capacity(48)
    assert cap == 12
    assert int(out.expert_counts.max()) <= cap
    assert int(out.expert_counts.sum()) + int(out.dropped) == 2 * 48 * 2  # kept + dropped = layers * N * K
    assert int(out.dropped) > 0
    # selected counts every assignment before the cut (what balancing reads): each layer's N * K
    assert out.expert_selected.sum(dim=1).tolist() == [48 * 2] * 2 and (out.expert_selected >= out.expert_counts).all()


def test_noise_only_in_training():
    cfg = _cfg(router_noise_std=1.0)
    torch.manual_seed(0)
    m = Blues(cfg).eval()
    x = torch.randint(0, 4096, (2, 16))
    torch.manual_seed(1)
    a = m(x).logits
    torch.manual_seed(2)
    assert torch.equal(a, m(x).logits)  # no sampling in eval
    layer = m.blocks[0].mlp
    m.train()
    m(x)
    assert layer.moe.deepspeed_moe.gate.top2_2nd_expert_sampling is True


def test_round_trip_stacked_and_back():
    cfg = _cfg()
    torch.manual_seed(0)
    a = Blues(cfg)
    torch.manual_seed(1)
    b = Blues(cfg)
    sd = md.stacked_state_dict(a)
    md.load_stacked_state_dict(b, sd)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_load_stacked_refuses_wrong_expert_count():
    a = Blues(_cfg())
    sd = md.stacked_state_dict(a)
    sd["blocks.0.mlp.experts.w_gate"] = sd["blocks.0.mlp.experts.w_gate"][:3]
    with pytest.raises(ValueError, match="holds 3 experts, the model has 4"):
        md.load_stacked_state_dict(a, sd)


def test_experts_are_distinct_at_init():
    # DeepSpeed deep-copies one template expert; we draw each global expert separately
    m = Blues(_cfg())
    ex = m.blocks[0].mlp.local_experts()
    assert not torch.equal(ex[0].w_gate, ex[1].w_gate)


@pytest.mark.parametrize("kw,match", [
    ({"router_score_func": "sigmoid"}, "router_score_func='sigmoid' is not available with moe_backend='deepspeed'"),
    ({"top_k": 1}, "norm_topk_prob=True with top_k=1 is not available"),
    ({"norm_topk_prob": False}, "norm_topk_prob=False with top_k=2 is not available"),
])
def test_refuses_what_deepspeed_cannot_do(kw, match):
    with pytest.raises(ValueError, match=match):
        Blues(_cfg(**kw))
