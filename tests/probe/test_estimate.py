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
