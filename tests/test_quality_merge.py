"""benchmarks/quality.py --merge: rows of runs side by side (one per core) become one row, whether the
runs differ in their seeds or in their models; anything else that differs is refused."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("quality", os.path.join(ROOT, "benchmarks", "quality.py"))
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def row(models: dict, seeds: list, steps: int = 100) -> dict:
    """A run's row: models {name: final val loss}, the same for every seed."""
    return {"benchmark": "quality", "commands": [f"run {sorted(models)} {seeds}"], "corpus": "stdlib", "preset": "tiny",
            "overrides": [], "steps": steps, "eval_every": 50, "eval_steps": 2, "seeds": seeds,
            "loadavg_1m_before_after": [[1.0, 1.0]], "wall_seconds": [10.0], "aliases": {},
            "configs": {n: {"num_experts": 8 if n.endswith("e8") else 16} for n in models},
            "params": {n: {"params": 1, "active_params": 1} for n in models},
            "expert_load_last_min_max": {n: {str(s): [0.1, 0.2] for s in seeds} for n in models},
            "curves": {n: {str(s): [[0, 0.0, 8.0], [steps, 5.0, loss + s / 100]] for s in seeds}
                       for n, loss in models.items()}}


def write(tmp_path, name, r):
    path = tmp_path / name
    path.write_text(json.dumps(r))
    return str(path)


def test_runs_of_other_models_with_the_same_seed_merge_with_their_difference(tmp_path):
    a = write(tmp_path, "a.json", row({"moe_e8": 3.60}, [1]))
    b = write(tmp_path, "b.json", row({"moe_e16": 3.55}, [1]))
    m = quality.merge_rows([a, b])
    assert set(m["curves"]) == set(m["configs"]) == set(m["params"]) == {"moe_e8", "moe_e16"}
    assert m["seeds"] == [1] and len(m["commands"]) == len(m["wall_seconds"]) == 2
    d = m["differences"]["moe_e16 - moe_e8"]
    assert d["per_seed"] == [pytest.approx(-0.05)] and d["mean"] == pytest.approx(-0.05)


def test_runs_of_the_same_models_with_other_seeds_merge_over_the_seeds(tmp_path):
    a = write(tmp_path, "a.json", row({"moe_e8": 3.60, "moe_e16": 3.55}, [1]))
    b = write(tmp_path, "b.json", row({"moe_e8": 3.60, "moe_e16": 3.55}, [2]))
    m = quality.merge_rows([a, b])
    assert m["seeds"] == [1, 2] and m["models"]["moe_e8"]["final_val_loss_per_seed"] == [3.61, 3.62]


@pytest.mark.parametrize("rows, match", [
    ([row({"moe_e8": 3.6}, [1]), row({"moe_e8": 3.6}, [1])], r"seeds \[1, 1\] repeat"),
    ([row({"moe_e8": 3.6}, [1]), row({"moe_e8": 3.6, "moe_e16": 3.5}, [2])], r"models .* repeat"),
    ([row({"moe_e8": 3.6}, [1]), row({"moe_e16": 3.5}, [2])], "must have the same seeds"),
    ([row({"moe_e8": 3.6}, [1]), row({"moe_e16": 3.5}, [1], steps=200)], "steps differs"),
])
def test_anything_else_that_differs_is_refused(tmp_path, rows, match):
    paths = [write(tmp_path, f"{i}.json", r) for i, r in enumerate(rows)]
    with pytest.raises(ValueError, match=match):
        quality.merge_rows(paths)


def test_compare_adds_the_paired_difference_of_any_two_models_and_names_an_unknown_one(tmp_path):
    a = write(tmp_path, "a.json", row({"moe_e8": 3.60, "e8_aux0": 3.58}, [1, 2]))
    b = write(tmp_path, "b.json", row({"moe_e16": 3.55, "e16_aux0": 3.50}, [1, 2]))
    m = quality.merge_rows([a, b], [("e16_aux0", "e8_aux0"), ("e8_aux0", "moe_e8")])
    assert m["differences"]["e16_aux0 - e8_aux0"]["per_seed"] == [pytest.approx(-0.08)] * 2
    assert m["differences"]["e8_aux0 - moe_e8"]["mean"] == pytest.approx(-0.02)
    assert "moe_e16 - moe_e8" in m["differences"]  # the pair is still there
    with pytest.raises(ValueError, match="--compare e16 moe_e8: no model named e16; the models are moe_e8, "):
        quality.merge_rows([a, b], [("e16", "moe_e8")])
