"""The MoE layer against facts: a per-token loop reference, the dense MLP, analytic loss values."""
import math

import pytest
import torch
import torch.nn.functional as F

from blues.config import BluesConfig
from blues.moe import MoE, SwiGLU


def make_moe(E=4, K=2, D=24, Fh=40, capacity_factor=None, shared=0, seed=0, noise=0.0, norm=True):
    torch.manual_seed(seed)
    cfg = BluesConfig.from_dict(dict(n_embd=D, n_head=2, num_kv_heads=1, num_experts=E, top_k=K, expert_ffn_size=Fh,
                                     router_noise_std=noise, capacity_factor=capacity_factor,
                                     num_shared_experts=shared, norm_topk_prob=norm, moe_backend="torch"))
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def loop_reference(moe, x):
    """One token at a time, one chosen expert at a time: the definition of the layer."""
    K = moe.cfg.top_k
    ex = moe.experts
    outs = []
    for xt in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(xt.float() @ moe.router.weight.float().T, dim=-1)  # (E,)
        w, ids = torch.topk(probs, K)
        if moe.cfg.norm_topk_prob:
            w = w / w.sum()
        o = torch.zeros_like(xt)
        for k in range(K):
            e = int(ids[k])
            h = F.silu(xt @ ex.w_gate[e]) * (xt @ ex.w_up[e])
            o = o + w[k] * (h @ ex.w_down[e])
        if moe.shared is not None:
            o = o + moe.shared(xt)
        outs.append(o)
    return torch.stack(outs).view_as(x)


def grads(module, x, out):
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    params = [x] + list(module.parameters())
    return torch.autograd.grad((out * g).sum(), params)


CASES = {
    # why each case is here
    "T=37, not a power of two": dict(T=37, E=4, K=2),
    "top_k == num_experts": dict(T=10, E=3, K=3),
    "prime expert count, top-1, shared expert": dict(T=19, E=7, K=1, shared=1),
    "an expert that gets no token": dict(T=16, E=4, K=1, starve=3),
    "all tokens to one expert": dict(T=16, E=4, K=1, collapse=2),
    "unnormalised top-k weights": dict(T=12, E=5, K=2, norm=False),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_moe_equals_per_token_loop(case):
    c = dict(CASES[case])
    T, E, K = c.pop("T"), c.pop("E"), c.pop("K")
    starve, collapse = c.pop("starve", None), c.pop("collapse", None)
    moe = make_moe(E=E, K=K, **c)
    x = torch.randn(1, T, 24).abs()  # positive inputs, so a router row of one sign decides the routing
    with torch.no_grad():
        if starve is not None:
            moe.router.weight[starve] = -5.0
        if collapse is not None:
            moe.router.weight[collapse] = 5.0
    x.requires_grad_(True)
    res = moe(x)
    ref = loop_reference(moe, x)
    if starve is not None:
        assert res.counts[starve] == 0
    if collapse is not None:
        assert res.counts[collapse] == T and res.counts.sum() == T
    torch.testing.assert_close(res.out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(moe, x, res.out), grads(moe, x, ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_one_expert_top1_equals_dense_swiglu():
    moe = make_moe(E=1, K=1, D=24, Fh=40)
    dense = SwiGLU(24, 40)
    with torch.no_grad():
        dense.w_gate.weight.copy_(moe.experts.w_gate[0].T)
        dense.w_up.weight.copy_(moe.experts.w_up[0].T)
        dense.w_down.weight.copy_(moe.experts.w_down[0].T)
    x1 = torch.randn(2, 9, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out = moe(x1).out
    ref = dense(x2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moe.experts.w_gate.grad[0], dense.w_gate.weight.grad.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe.experts.w_up.grad[0], dense.w_up.weight.grad.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe.experts.w_down.grad[0], dense.w_down.weight.grad.T, rtol=1e-5, atol=1e-6)


def test_routed_scaling_by_top_k_makes_sliced_experts_equal_their_dense_twin():
    """The fact behind routed_scaling_factor=top_k: K experts that are the K column slices of one dense
    SwiGLU of width K*F, all chosen with equal weight (a zero router: renormalised weights 1/K each),
    scaled by K, are that dense SwiGLU (outputs and input gradients). Unscaled they give 1/K of it."""
    K, D, Fh = 3, 24, 40
    torch.manual_seed(0)
    dense = SwiGLU(D, K * Fh)
    out = {}
    for scale in (1.0, float(K)):
        cfg = BluesConfig.from_dict(dict(n_embd=D, n_head=2, num_kv_heads=1, num_experts=K, top_k=K, expert_ffn_size=Fh,
                                         router_noise_std=0.0, routed_scaling_factor=scale, moe_backend="torch"))
        moe = MoE(cfg)
        with torch.no_grad():
            moe.router.weight.zero_()
            for e in range(K):
                cols = slice(e * Fh, (e + 1) * Fh)
                moe.experts.w_gate[e].copy_(dense.w_gate.weight[cols].T)
                moe.experts.w_up[e].copy_(dense.w_up.weight[cols].T)
                moe.experts.w_down[e].copy_(dense.w_down.weight[:, cols].T)
        x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = moe(x).out
        y.sum().backward()
        out[scale] = (y.detach(), x.grad)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ref = dense(x)
    ref.sum().backward()
    torch.testing.assert_close(out[float(K)][0], ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[float(K)][1], x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1.0][0] * K, ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("E, K", [(4, 1), (8, 2), (5, 5)])
def test_balancing_losses_of_a_uniform_router(E, K):
    moe = make_moe(E=E, K=K)
    with torch.no_grad():
        moe.router.weight.zero_()  # every score is 1/E
    res = moe(torch.randn(2, 16, 24))
    # E * sum_e f_e * P_e with P_e = 1/E is sum_e f_e = 1, whatever the tie-breaking chose.
    assert res.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert res.z_loss.item() == pytest.approx(math.log(E) ** 2, rel=1e-6)  # logsumexp of E zeros is log E


@pytest.mark.parametrize("E", [2, 4, 8])
def test_balancing_loss_of_a_collapsed_router(E):
    moe = make_moe(E=E, K=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 50.0  # positive inputs: expert 0 takes every token with probability ~1
    res = moe(torch.rand(2, 16, 24) + 0.5)
    # f_0 = 1 and P_0 = 1: the loss is E, its maximum.
    assert res.aux_loss.item() == pytest.approx(E, rel=1e-5)


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
def test_capacity_is_never_exceeded_and_drops_are_counted(cf):
    E, K, N = 4, 2, 50
    moe = make_moe(E=E, K=K, capacity_factor=cf)
    with torch.no_grad():
        moe.router.weight[1] += 1.0  # skew the routing so some expert overflows
    x = torch.rand(1, N, 24)
    res = moe(x)
    cap = math.ceil(cf * N * K / E)
    free = make_moe(E=E, K=K, capacity_factor=None)
    free.load_state_dict(moe.state_dict())
    wanted = free(x).counts  # assignments before the capacity limit
    assert wanted.max() > cap, "the case must overflow an expert to test anything"
    assert int(res.counts.max()) <= cap
    torch.testing.assert_close(res.counts, wanted.clamp(max=cap))
    assert int(res.dropped) == int((wanted - cap).clamp(min=0).sum())


def test_dropped_tokens_pass_through_only_the_residual():
    # Capacity 1 per expert, two tokens routed identically: the second token's MoE output is zero,
    # so in a block it passes through on the residual alone.
    moe = make_moe(E=2, K=1, capacity_factor=0.5)  # ceil(0.5 * 4 * 1 / 2) = 1
    x = torch.rand(1, 1, 24).expand(1, 4, 24).contiguous()
    res = moe(x)
    assert int(res.dropped) == 3
    assert res.out[0, 0].abs().sum() > 0
    torch.testing.assert_close(res.out[0, 1:], torch.zeros(3, 24))


def test_router_noise_only_in_training():
    moe = make_moe(noise=1.0)
    x = torch.randn(1, 32, 24)
    moe.eval()
    a, b = moe(x).out, moe(x).out
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    moe.train()
    torch.manual_seed(0)
    c = moe(x).counts
    torch.manual_seed(1)
    d = moe(x).counts
    assert not torch.equal(c, d), "noise of std 1 must change some routing decisions"
