"""One capacity, four users: MoEConfig.capacity(N) = ceil(cf * N * K / E) (at least 1) is what the
stacked layer keeps, what DeepSpeed's gate is given by the adapter, and what the probe's estimate
sizes DeepSpeed's dispatch buffer with.

Before, each computed it itself in floating point, in two orders of arithmetic, and they disagreed
at rounding edges. The grid below holds, for each old copy, cases where it was wrong (values from
the old formulas, computed once by hand and kept here so the claim can be checked):
    stacked layer (blues/moe.py)       ceil(cf * N * K / E), float64
    probe estimate, DeepSpeed backend  ceil(N / E * cf * K), float64
    DeepSpeed's gate (given cf)        ceil((N / E) * float32(cf * K)), float32
Shapes: N tokens, E experts, K top-k, D width.
"""
import pytest
import torch

from blues.moe import MoE
from blues.presets import tiny
from blues.probe.estimate import dispatch_rows, estimate_memory

D = 32

GRID = [
    # (cf, N, E, K)        exact | old stacked, old estimate, old DeepSpeed gate
    (1.1, 45, 3, 2),     # 33 | 34, 33, 33: the case
    (1.1, 90, 3, 1),     # 33 | 34, 33, 33: top-1
    (1.1, 75, 3, 2),     # 55 | 55, 56, 55: the old estimate alone was off
    (1.1, 100, 2, 1),    # 55 | 56, 56, 55: top-1, stacked and estimate both off
    (0.3, 35, 3, 2),     # 7  |  7,  7,  8: DeepSpeed's float32 alone was off
    (1.2, 50, 8, 2),     # 15 | 15, 15, 16: DeepSpeed's float32 again, E=8
    (1.25, 37, 7, 3),    # 20 | 20, 20, 20: prime E, K=3 (DeepSpeed's generic top-k gate)
    (2.0, 64, 8, 2),     # 32: an exact quotient
    (0.01, 40, 4, 2),    # 1: the floor of one assignment per expert
    (4.0, 16, 4, 2),     # 32 > N: no expert can get more than N of one token's distinct choices
]


def _cfg(cf, N, E, K, backend):
    # K=1: DeepSpeed's top-1 weighs the one expert by its probability (norm_topk_prob=False).
    return tiny().replace(n_embd=D, n_layer=1, block_size=N, num_experts=E, top_k=K, expert_ffn_size=16,
                          capacity_factor=cf, router_noise_std=0.0, norm_topk_prob=K > 1, moe_backend=backend,
                          gradient_checkpointing=False, balance_bias_rate=0.0)  # DeepSpeed's gate has no bias


def _all_tokens_to_the_first_k(layer, router_weight, N):
    """Every token identical, the router preferring expert 0, then 1, ... (distinct logits, no ties):
    experts 0..K-1 each get all N tokens, and keep exactly min(capacity, N) of them."""
    v = torch.ones(D) / D**0.5  # unit vector
    E = router_weight.shape[0]
    with torch.no_grad():
        router_weight.copy_(torch.arange(E, 0, -1, dtype=torch.float32).unsqueeze(1) * v)  # (E, D): logit_e = E - e
    layer.eval()
    return layer(v.expand(1, N, D).contiguous())  # x (B=1, T=N, D)


@pytest.mark.parametrize("cf, N, E, K", GRID)
def test_config_capacity_is_the_exact_ceiling(cf, N, E, K):
    from fractions import Fraction
    cap = _cfg(cf, N, E, K, "torch").moe.capacity(N)
    assert cap == max(1, -(-Fraction(str(cf)) * N * K // E))  # ceil by exact rationals


@pytest.mark.parametrize("cf, N, E, K", GRID)
def test_stacked_layer_keeps_the_capacity(cf, N, E, K):
    cfg = _cfg(cf, N, E, K, "torch")
    layer = MoE(cfg)
    out = _all_tokens_to_the_first_k(layer, layer.router.weight, N)
    want = min(cfg.moe.capacity(N), N)
    assert out.counts.tolist() == [want] * K + [0] * (E - K)
    assert int(out.dropped) == K * (N - want)


@pytest.mark.parametrize("cf, N, E, K", GRID)
def test_deepspeed_gate_uses_the_capacity(cf, N, E, K):
    """The capacity DeepSpeed's gate itself used (its output[1]), in one process with ep_size=1."""
    pytest.importorskip("deepspeed")
    from blues.moe.deepspeed_moe import DeepSpeedMoE
    cfg = _cfg(cf, N, E, K, "deepspeed")
    layer = DeepSpeedMoE(cfg)
    used = []
    gate = layer.moe.deepspeed_moe.gate
    handle = gate.register_forward_hook(lambda module, args, output: used.append(int(output[1])))
    out = _all_tokens_to_the_first_k(layer, layer.router_weight, N)
    handle.remove()
    want = min(cfg.moe.capacity(N), N)
    assert used == [want]
    assert out.counts.tolist() == [want] * K + [0] * (E - K)  # and it kept that many per hot expert


@pytest.mark.parametrize("cf, N, E, K", GRID)
def test_probe_estimate_sizes_deepspeed_dispatch_with_the_capacity(cf, N, E, K):
    """The estimate is linear in the dispatch buffer's rows C per expert: read the C it used off its
    activations, against two references whose C is certain (cf=None: C=N; a tiny cf: C=1)."""
    ds = {"zero_optimization": {"stage": 2}}

    def activations(capacity_factor):
        return estimate_memory(_cfg(capacity_factor, N, E, K, "deepspeed"), ds, 1, 1)["activations"]

    at_one, at_n = activations(1e-9), activations(None)
    used = 1 + (N - 1) * (activations(cf) - at_one) / (at_n - at_one)
    want = min(_cfg(cf, N, E, K, "deepspeed").moe.capacity(N), N)
    assert used == pytest.approx(want, abs=1e-6)
    assert dispatch_rows(_cfg(cf, N, E, K, "deepspeed").moe, N) == want
