"""blues.probe.estimate_memory: the analytical model follows ZeRO's stages and checkpointing.
(Its accuracy against measured peaks is bounded in test_probe_cli.py, on real trials.)"""
import pytest

from blues.presets import get_preset
from blues.probe import estimate_memory
from blues.probe.estimate import ep_received_rows


def test_estimate_follows_zero_stages_and_checkpointing():
    cfg = get_preset("blues01")
    ds = lambda stage: {"zero_optimization": {"stage": stage}}  # noqa: E731
    e = {s: estimate_memory(cfg, ds(s), 8, 4) for s in (0, 1, 2, 3)}
    states = lambda d: d["weights"] + d["grads"] + d["master"] + d["moments"]  # noqa: E731
    assert states(e[0]) > states(e[1]) > states(e[2]) > states(e[3])
    assert e[2]["grads"] == pytest.approx(e[0]["grads"] / 8)
    assert e[3]["weights"] == pytest.approx(e[0]["weights"] / 8)
    plain = estimate_memory(cfg, ds(2), 8, 4)["activations"]
    ac = estimate_memory(cfg.replace(gradient_checkpointing=True), ds(2), 8, 4)["activations"]
    assert ac < plain / 2
    # activations grow linearly with the micro-batch
    a1, a2 = (estimate_memory(cfg, ds(2), 8, b)["activations"] for b in (1, 2))
    assert a2 == pytest.approx(2 * a1)


@pytest.mark.parametrize("cf, rows", [
    (None, 2 * 512 * 2),  # dropless: both ranks' 512 tokens, K=2 of them on EP rank 0's 4 experts
    (1.0, 2 * 4 * 128),  # capacity 128 per expert: EP rank 0's 4 experts keep 512 of each rank's 1024
    (0.25, 2 * 4 * 32),  # capacity 32: 128 of each rank's 1024
])
def test_ep_received_rows_is_the_forced_worst_case(cf, rows):
    moe = get_preset("blues01").replace(capacity_factor=cf).moe  # E=8, K=2
    assert ep_received_rows(moe, 512, 2) == rows


def test_stacked_ep_halves_the_expert_states_and_receives_the_worst_case():
    cfg = get_preset("blues01").replace(moe_backend="torch")
    ds = {"zero_optimization": {"stage": 2}}
    one, two = estimate_memory(cfg, ds, 8, 4), estimate_memory(cfg.replace(ep_size=2), ds, 8, 4)
    # E=8, K=2, E_loc=4 >= K: a rank may receive both ranks' every assignment, twice ep=1's rows
    assert two["activations"] > one["activations"]
    assert two["weights"] < one["weights"]  # half the experts on this rank


def test_the_fused_loss_keeps_no_logits_per_token():
    # Unfused, the head costs 3 fp32 V-wide buffers and one in the activation dtype per token; fused
    # (blues.loss), the fp32 gradient of h and its cast per token, and a chunk of logits that grows
    # only once 4 N D passes CHUNK_BYTES (the GPU's rule), half again in bf16 for the chunk's 16-bit
    # softmax gradient.
    from blues.loss import CHUNK_BYTES
    cfg = get_preset("blues01").replace(dtype="bf16")
    ds = {"zero_optimization": {"stage": 2}}
    T, V, D = cfg.model.block_size, cfg.model.vocab_size, cfg.model.n_embd
    plain = [estimate_memory(cfg.replace(fused_loss=False), ds, 8, b)["head"] for b in (1, 2)]
    fused = [estimate_memory(cfg.replace(fused_loss=True), ds, 8, b)["head"] for b in (1, 2)]
    assert plain[1] - plain[0] == T * (3 * V * 4 + V * 2)
    chunk = [max(CHUNK_BYTES, 4 * b * T * D) for b in (1, 2)]
    assert fused[1] - fused[0] == T * D * (4 + 2) + (chunk[1] - chunk[0]) * 3 // 2
    assert fused[0] == T * D * 6 + V * D * 6 + chunk[0] * 3 // 2  # + the (V, D) fp32 gradient and a bf16 part
    fp32 = estimate_memory(cfg.replace(dtype="fp32", fused_loss=True), ds, 8, 1)["head"]
    assert fp32 == T * D * 8 + V * D * 4 + chunk[0]  # fp32: no 16-bit copies
