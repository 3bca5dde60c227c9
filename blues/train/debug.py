"""Test-only fault injection, read once at start from the environment into a DebugConfig.

    BLUES_FAULT_NAN_STEPS="3,4,7.1"  rank 0's loss is NaN at steps 3 and 4 (every micro-batch) and in
                                     micro-batch 1 of step 7 (steps 1-based, micro-batches 0-based)
    BLUES_FAULT_KILL_IN_SAVE=N       rank 1 SIGKILLs itself in the middle of writing the step-N
                                     checkpoint (after its files, before the commit)
    BLUES_TEST_STEP_SLEEP=S          sleep S seconds after every step (to aim signals)

A bad value is a ValueError naming the variable, raised before anything starts; the training loop
only reads the parsed fields.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

NAN_STEPS = "BLUES_FAULT_NAN_STEPS"
KILL_IN_SAVE = "BLUES_FAULT_KILL_IN_SAVE"
STEP_SLEEP = "BLUES_TEST_STEP_SLEEP"


@dataclass(frozen=True)
class DebugConfig:
    nan_steps: frozenset = frozenset()
    """(step, micro) pairs whose loss rank 0 makes NaN; micro None = every micro-batch of that step."""
    kill_in_save_step: Optional[int] = None
    """Rank 1 dies while writing this step's checkpoint."""
    step_sleep: float = 0.0
    """Seconds to sleep after every step."""

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "DebugConfig":
        env = os.environ if env is None else env
        return cls(nan_steps=_nan_steps(env.get(NAN_STEPS, "")),
                   kill_in_save_step=_int(env, KILL_IN_SAVE),
                   step_sleep=_float(env, STEP_SLEEP))

    def nan_at(self, step: int, micro: int) -> bool:
        """Whether rank 0's loss is made NaN in micro-batch `micro` of step `step` (1-based)."""
        return (step, None) in self.nan_steps or (step, micro) in self.nan_steps


def _nan_steps(text: str) -> frozenset:
    out = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        step, dot, micro = item.partition(".")
        if not step.isdigit() or int(step) < 1 or (dot and not micro.isdigit()):
            raise ValueError(f"{NAN_STEPS}={text!r} is invalid: expected steps (1-based) separated by commas, a step "
                             "optionally followed by .<micro-batch>, e.g. 3,4,7.1")
        out.add((int(step), int(micro) if dot else None))
    return frozenset(out)


def _int(env: Mapping[str, str], name: str) -> Optional[int]:
    text = env.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={text!r} is invalid: expected a step number >= 1")
    return int(text)


def _float(env: Mapping[str, str], name: str) -> float:
    text = env.get(name, "").strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name}={text!r} is invalid: expected a number of seconds >= 0")
    return value
