"""The whole Blues MoE layer (blues.moe.MoE) with moe_backend="triton" equals moe_backend="torch":
output, losses, counts and every gradient. The Triton kernels run in Triton's CPU interpreter."""
import pytest
import torch

pytest.importorskip("triton")

from blues.config import BluesConfig, ModelConfig, MoEConfig  # noqa: E402
from blues.moe import MoE  # noqa: E402

FIELDS = ("out", "aux_loss", "z_loss")


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _layer_pair(**moe_kw):
    """Two layers with the same weights, one per backend."""
    model = ModelConfig(n_embd=40, n_head=4, num_kv_heads=2)  # width 40: not a power of two
    layers = []
    for backend in ("torch", "triton"):
        cfg = BluesConfig(model=model, moe=MoEConfig(moe_backend=backend, **moe_kw))
        torch.manual_seed(0)
        layer = MoE(cfg)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.2)
        layers.append(layer)
    layers[1].load_state_dict(layers[0].state_dict())
    return layers


def _run(layer, x, train, seed):
    layer.train(train)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # router noise and expert dropout draw the same numbers in both runs
    out = layer(x)
    probe = torch.linspace(-1, 1, out.out.numel()).view_as(out.out)
    loss = (out.out * probe).sum() + 0.3 * out.aux_loss + 0.2 * out.z_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out, x.grad, grads


@pytest.mark.parametrize("moe_kw,train", [
    pytest.param(dict(num_experts=7, top_k=2, expert_ffn_size=56), False,
                 id="E7-K2: eval, no drops"),
    pytest.param(dict(num_experts=8, top_k=2, expert_ffn_size=48, capacity_factor=1.0, router_noise_std=0.5,
                      expert_dropout=0.1), True, id="E8-K2: training, capacity 1.0 drops, noise, dropout"),
    pytest.param(dict(num_experts=4, top_k=4, expert_ffn_size=24, router_score_func="sigmoid", norm_topk_prob=False,
                      num_shared_experts=1), False, id="E4-K4: K=E, sigmoid, no renorm, a shared expert"),
    pytest.param(dict(num_experts=2, top_k=1, expert_ffn_size=32), False, id="E2-K1: top-1"),
])
def test_triton_layer_equals_torch_layer(moe_kw, train):
    torch_layer, triton_layer = _layer_pair(**moe_kw)
    x = torch.randn(2, 24, 40, generator=torch.Generator().manual_seed(1))
    a, dx_a, g_a = _run(torch_layer, x, train, seed=7)
    b, dx_b, g_b = _run(triton_layer, x, train, seed=7)
    for name in FIELDS:
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(b.counts, a.counts) and torch.equal(b.dropped, a.dropped)
    if moe_kw.get("capacity_factor"):
        assert a.dropped > 0, "the capacity case should drop something"
    torch.testing.assert_close(dx_b, dx_a, rtol=1e-4, atol=1e-5)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    # moe_backend="auto" never runs the interpreter on CPU, even when TRITON_INTERPRET is set.
    from blues.moe import TORCH_OPS, resolve_moe_ops
    assert resolve_moe_ops("auto", torch.device("cpu")) is TORCH_OPS
