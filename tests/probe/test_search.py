"""blues.probe's pure parts: memory budgets, the search over micro-batch sizes, the ranks' agreement,
the probed DeepSpeed config and the gradient accumulation it writes."""
from pathlib import Path

import pytest

from blues.presets import get_preset
from blues.probe import grad_accum_for, own_answer, parse_budget, parse_budgets, probed_ds_config, search, search_linear
from blues.train.ds_config import load_ds_config, resolve_ds_config

ZERO2 = str(Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json")


@pytest.mark.parametrize("text, value", [("3GB", 3 * 10**9), ("2.5GiB", int(2.5 * 2**30)), ("800MB", 8 * 10**8),
                                         ("123456", 123456), ("1 gib", 2**30)])
def test_parse_budget(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["lots", "-1GB", "3 parsecs", "0"])
def test_parse_budget_refuses_non_sizes(text):
    with pytest.raises(ValueError, match="memory budget"):
        parse_budget(text)


def test_budgets_are_one_for_all_or_one_per_rank():
    assert parse_budgets("1GB", 3) == [10**9] * 3
    assert parse_budgets("1GB,2GB", 2) == [10**9, 2 * 10**9]
    with pytest.raises(ValueError, match="lists 2 budgets for a world size of 3"):
        parse_budgets("1GB,2GB", 3)


@pytest.mark.parametrize("largest, cap", [(1, 1024), (5, 1024), (37, 1024), (64, 1024), (100, 64), (1000, 1024)])
def test_search_finds_the_largest_fit_and_tries_the_next_one(largest, cap):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= largest

    got = search(fits, cap)
    assert got == min(largest, cap)
    assert len(tried) == len(set(tried)), "no micro-batch is tried twice"
    if largest < cap:
        assert got + 1 in tried and not fits(got + 1)  # the next larger candidate was tried and missed
    # exponential growth first: 1, 2, 4, ... up to the first miss
    growth = [b for b in tried if b & (b - 1) == 0]
    assert growth[: len(growth)] == sorted(growth)
    assert len(tried) <= 2 * (largest.bit_length() + 1)


def test_search_returns_zero_when_one_sequence_does_not_fit():
    assert search(lambda b: False) == 0
    assert search_linear(lambda b: False) == 0


@pytest.mark.parametrize("largest", [1, 6, 17])
def test_linear_search_tries_every_size_up_to_the_first_miss(largest):
    tried = []
    assert search_linear(lambda b: tried.append(b) or b <= largest, 1024) == largest
    assert tried == list(range(1, largest + 2))


def test_own_answer_stops_at_the_first_miss_and_min_is_the_global_answer():
    # rank 1 has more memory: it fits at 4 where rank 0 does not
    trials = [{"micro_batch": b, "fits_by_rank": [b <= 3, b <= 5]} for b in (1, 2, 4, 3)]
    assert own_answer(trials, 0) == 3
    assert own_answer(trials, 1) == 4
    assert min(own_answer(trials, r) for r in (0, 1)) == 3


def test_probed_deepspeed_config_is_consistent_and_accepted_by_training():
    ds = load_ds_config(ZERO2)
    out = probed_ds_config(ds, micro_batch=3, grad_accum=5, world_size=4)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"],
            out["train_batch_size"]) == (3, 5, 60)
    cfg = get_preset("tiny").replace(micro_batch_size=3, grad_accum=5)
    resolve_ds_config(out, cfg, 4)  # no contradiction
    with pytest.raises(ValueError, match="contradicts"):
        resolve_ds_config(out, cfg.replace(micro_batch_size=4), 4)
    assert ds["train_micro_batch_size_per_gpu"] == "auto", "the user's config is not modified"


@pytest.mark.parametrize("target, micro, T, world, grad_accum", [(4096, 3, 256, 2, 3), (4096, 64, 32, 2, 1),
                                                                  (1 << 20, 8, 512, 8, 32), (100, 16, 128, 8, 1)])
def test_grad_accum_is_nearest_to_the_target(target, micro, T, world, grad_accum):
    assert grad_accum_for(target, micro, T, world) == grad_accum
