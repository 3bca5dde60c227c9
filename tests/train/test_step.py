"""blues.train.step: the learning-rate schedule."""
import pytest

from blues.config import TrainConfig
from blues.train import lr_at

# ----------------------------------------------------------------------------- learning rate

def test_lr_schedule_warmup_cosine_floor():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, lr_decay_steps=110, max_steps=200)
    assert lr_at(0, t) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(9, t) == pytest.approx(1.0)  # end of warmup reaches alpha_max
    assert lr_at(10, t) == pytest.approx(1.0)  # cosine starts at alpha_max
    assert lr_at(60, t) == pytest.approx(0.55)  # half-way: (max + min) / 2
    assert lr_at(110, t) == pytest.approx(0.1)  # T_c reaches alpha_min
    assert lr_at(150, t) == 0.1  # the floor after T_c
    values = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_lr_decay_defaults_to_max_steps():
    t = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100)
    assert lr_at(0, t) == pytest.approx(1.0)
    assert lr_at(100, t) == pytest.approx(0.0)
