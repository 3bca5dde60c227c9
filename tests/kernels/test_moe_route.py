"""moe_route: the Triton kernel (run by Triton's CPU interpreter) against moe_route_ref, outputs and
gradients, plus the reference's own invariants.

The kernels pick compiled or interpreted mode when they launch (kernels/triton_utils.py), so the
fixture below may set TRITON_INTERPRET per test even though other test modules imported triton and
blues.kernels first in this pytest process.
"""
import pytest
import torch

pytest.importorskip("triton")

from blues.kernels.moe_route import load_balancing_loss, moe_route, moe_route_ref, z_loss  # noqa: E402
from blues.kernels.triton_utils import (  # noqa: E402
    TritonUnavailableError,
    compile_for_gpu,
    cubin_resource_usage,
    record_launches,
    runnable,
    triton_available,
)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-5, atol=1e-6)}
# NOTE: bf16 only changes how the logits are stored; both paths read them and compute in fp32, so the
# tolerance stays fp32's.


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _check_against_ref(logits, top_k, **kw):
    """Forward equal, and gradients of all three differentiable outputs equal."""
    out = moe_route(logits, top_k, **kw)
    ref = moe_route_ref(logits, top_k, **kw)
    assert torch.equal(out.topk_ids, ref.topk_ids)
    assert torch.equal(out.counts, ref.counts)
    assert out.topk_ids.dtype == torch.int64 and out.counts.dtype == torch.int64
    assert out.topk_weights.dtype == out.prob_sum.dtype == out.lse.dtype == torch.float32
    tol = TOL[logits.dtype]
    for name in ("topk_weights", "prob_sum", "lse"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), **tol, msg=name)
    T, E = logits.shape
    gen = torch.Generator().manual_seed(1)
    gw, gp, gl = (t.to(logits.device) for t in (torch.randn(T, top_k, generator=gen), torch.randn(E, generator=gen),
                                                torch.randn(T, generator=gen)))

    def loss(r):
        return (r.topk_weights * gw).sum() + (r.prob_sum * gp).sum() + (r.lse * gl).sum()

    (g_out,) = torch.autograd.grad(loss(out), logits)
    (g_ref,) = torch.autograd.grad(loss(ref), logits)
    assert g_out.dtype == logits.dtype
    # bf16: both compute the gradient in fp32 and round it once to bf16; they may land one bf16 ulp
    # apart (2^-8..2^-7 relative, the interpreter truncating where torch rounds), hence rtol 8e-3.
    torch.testing.assert_close(g_out.float(), g_ref.float(),
                               **({"rtol": 1e-4, "atol": 1e-5} if logits.dtype == torch.float32
                                                                 else {"rtol": 8e-3, "atol": 1e-6}))
    return out


CASES = [
    # (T, E, K, score_func, norm_topk_prob, bias, dtype), and why
    pytest.param(1, 1, 1, "softmax", True, False, torch.float32, id="T1-E1-K1: one token, one expert, weight 1"),
    pytest.param(7, 7, 7, "sigmoid", False, True, torch.float32, id="T7-E7-K7: prime E, K=E, sigmoid, bias"),
    pytest.param(7, 2, 2, "softmax", True, False, torch.bfloat16, id="T7-E2-K2: K=E=2 in bf16"),
    pytest.param(128, 64, 8, "softmax", True, True, torch.float32, id="T128-E64-K8: DeepSeek-like with bias"),
    pytest.param(128, 64, 64, "softmax", False, False, torch.float32, id="T128-E64-K64: K=E, a full sort"),
    pytest.param(1000, 8, 2, "softmax", True, False, torch.bfloat16, id="T1000-E8-K2: Mixtral-like, bf16, many blocks"),
    pytest.param(1000, 2, 1, "sigmoid", True, True, torch.float32, id="T1000-E2-K1: top-1 renormalised to 1"),
]


@pytest.mark.parametrize("T,E,K,score_func,norm,bias,dtype", CASES)
def test_moe_route_matches_ref(T, E, K, score_func, norm, bias, dtype, device):
    gen = torch.Generator().manual_seed(T * 100 + E)
    logits = torch.randn(T, E, generator=gen).to(device, dtype).requires_grad_()
    selection_bias = (0.3 * torch.randn(E, generator=gen)).to(device) if bias else None
    out = _check_against_ref(logits, K, score_func=score_func, norm_topk_prob=norm, selection_bias=selection_bias)
    # invariants
    assert out.counts.sum().item() == T * K
    assert out.topk_ids.min() >= 0 and out.topk_ids.max() < E
    assert all(len(set(row)) == K for row in out.topk_ids.tolist()), "an expert chosen twice by one token"
    if norm:
        torch.testing.assert_close(out.topk_weights.sum(-1), torch.ones(T, device=device))


def test_moe_route_transposed_logits():
    # Router logits may arrive as a strided view (e.g. from a transposed matmul output).
    logits = torch.randn(16, 40).t().requires_grad_()  # (40 tokens, 16 experts), stride (1, 40)
    _check_against_ref(logits, 3)


def test_moe_route_ties_go_to_lower_index():
    # All-equal logits: the kernel and the ref must agree, and pick experts 0..K-1 in order
    # (torch.topk alone picks e.g. 6, 5 on CPU; the ref sorts stably to be deterministic).
    logits = torch.zeros(5, 8, requires_grad=True)
    out = _check_against_ref(logits, 3)
    assert out.topk_ids.tolist() == [[0, 1, 2]] * 5


def test_moe_route_all_tokens_on_one_expert():
    # A collapsed router: every token's top-1 is expert 3; expert counts show it and the Switch loss is E.
    T, E = 128, 8
    logits = torch.randn(T, E)
    logits[:, 3] += 50.0
    logits.requires_grad_()
    out = _check_against_ref(logits, 1)
    assert out.counts.tolist() == [0, 0, 0, T, 0, 0, 0, 0]
    torch.testing.assert_close(load_balancing_loss(out.counts, out.prob_sum, T, 1), torch.tensor(float(E)))


def test_moe_route_bias_changes_selection_not_weights():
    # DeepSeek-V3 balancing: the bias moves the choice, the weights stay the unbiased scores.
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 10.0])
    out = moe_route(logits, 1, selection_bias=bias, norm_topk_prob=False)
    assert out.topk_ids.tolist() == [[2]]
    torch.testing.assert_close(out.topk_weights, torch.softmax(logits, -1)[:, 2:3])


def test_moe_route_gradient_of_one_output_at_a_time():
    # Unused outputs reach the backward as None (materialize_grads off): each alone must be right.
    logits = torch.randn(33, 7, requires_grad=True)
    out, ref = moe_route(logits, 2), moe_route_ref(logits, 2)
    for name in ("topk_weights", "prob_sum", "lse"):
        g_out = torch.autograd.grad(getattr(out, name).square().sum(), logits, retain_graph=True)[0]
        g_ref = torch.autograd.grad(getattr(ref, name).square().sum(), logits, retain_graph=True)[0]
        torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-6, msg=name)


def test_moe_route_ref_equals_topk_without_ties():
    # The stable sort in the ref is torch.topk whenever there is no tie.
    logits = torch.randn(64, 64)
    ref = moe_route_ref(logits, 8)
    assert torch.equal(ref.topk_ids, torch.topk(torch.softmax(logits, -1), 8).indices)


def test_balancing_losses():
    # Uniform router: Switch loss 1; z-loss is the mean squared logsumexp.
    T, E, K = 64, 8, 2
    logits = torch.zeros(T, E)
    r = moe_route_ref(logits, K)
    counts = torch.full((E,), T * K // E)
    torch.testing.assert_close(load_balancing_loss(counts, r.prob_sum, T, K), torch.tensor(1.0))
    torch.testing.assert_close(z_loss(r.lse), torch.log(torch.tensor(float(E))) ** 2)


@pytest.mark.parametrize("fn", [moe_route, moe_route_ref])
def test_moe_route_errors_name_the_value(fn):
    logits = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"top_k=4 is invalid"):
        fn(logits, 4)
    with pytest.raises(ValueError, match=r"score_func='relu' is invalid"):
        fn(logits, 1, score_func="relu")
    with pytest.raises(ValueError, match=r"logits must be \(T, E\)"):
        fn(logits[0], 1)


def test_moe_route_needs_cuda_or_interpreter(monkeypatch):
    # Without CUDA and without TRITON_INTERPRET the launcher says what to do instead of crashing in Triton.
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_available("cpu")
    with pytest.raises(TritonUnavailableError, match=r"moe_backend='torch'.*TRITON_INTERPRET=1"):
        moe_route(torch.randn(4, 3), 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available("cpu")


def test_kernel_built_in_either_mode_runs_interpreted():
    # A kernel decorated while TRITON_INTERPRET was unset (a compiled JITFunction) still runs on CPU
    # once the variable is set: runnable() rebuilds it for the interpreter at launch, once.
    import triton

    from blues.kernels.moe_route import _moe_route_kernel

    compiled = triton.runtime.jit.JITFunction(_moe_route_kernel.fn)
    launcher = runnable(compiled)
    assert launcher is not compiled and runnable(compiled) is launcher
    T, E, K = 4, 4, 2
    logits = torch.randn(T, E)
    ids, wts = torch.empty(T, K, dtype=torch.int64), torch.empty(T, K)
    counts, psum, lse = torch.empty(1, E, dtype=torch.int32), torch.empty(1, E), torch.empty(T)
    launcher[(1,)](logits, psum, ids, wts, counts, psum, lse, T, E, E, 1, K=K, SIGMOID=False, NORM=True,
                   HAS_BIAS=False, BLOCK_T=4, BLOCK_E=4, BLOCK_K=2)
    assert torch.equal(ids, moe_route_ref(logits, K).topk_ids)


def test_moe_route_no_host_sync(monkeypatch):
    # No .item()/.tolist()/bool() on a tensor anywhere on the launch path (each is a GPU sync).
    logits = torch.randn(50, 8, requires_grad=True)
    for name in ("item", "tolist", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, _forbidden(name))
    out = moe_route(logits, 2, selection_bias=torch.zeros(8))
    (out.topk_weights.sum() + out.prob_sum.sum() + out.lse.sum()).backward()
    monkeypatch.undo()
    assert logits.grad is not None


def _forbidden(name):
    def fail(*_a, **_k):
        raise AssertionError(f"host synchronisation: Tensor.{name} called on the Triton path")
    return fail


@pytest.mark.slow
def test_moe_route_builds_for_sm90():
    # The interpreter accepts code the GPU compiler rejects; compile every launch the op makes on a
    # GPU (bf16, DeepSeek-like and Mixtral-like widths) to an sm_90 cubin and check for spills.
    launches = []
    for E, K in ((64, 8), (128, 8), (8, 2), (256, 16), (64, 64)):
        with record_launches() as rec:
            logits = torch.randn(4096, E, dtype=torch.bfloat16, requires_grad=True)
            out = moe_route(logits, K, selection_bias=torch.zeros(E))
            (out.topk_weights.sum() + out.prob_sum.sum() + out.lse.sum()).backward()
        launches += rec
    assert len(launches) == 10
    for launch in launches:
        usage = cubin_resource_usage(compile_for_gpu(launch.fn, launch.args, **launch.options))
        assert usage["STACK"] == 0, (launch.fn.__name__, usage)
