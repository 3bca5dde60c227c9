"""blues.probe.estimate_memory: the analytical model follows ZeRO's stages and checkpointing.
(Its accuracy against measured peaks is bounded in test_probe_cli.py, on real trials.)"""
import pytest

from blues.config import get_preset
from blues.probe import estimate_memory


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
