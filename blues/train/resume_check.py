"""What a resume must agree on: the checks blues-train runs before it builds anything (from the checkpoint's
blues_complete.json) and resume() runs again with the tokenizer known.

- Architecture fields (BluesConfig.architecture_diff: the weights' shapes) and LAYOUT_FIELDS (the
  optimizer's layout: what is frozen, the dtype of the master weights) must be equal.
- DeepSpeed's own MoE layer and the stacked layers store experts differently: no resume across them.
- The contrastive heads (blues.vision.contrastive) exist on both sides or on neither.
- The tokenizer, the ZeRO stage and the expert-group layout must be equal; another ep_size or world size
  goes through blues.train.reshard, which lists what it cannot do.
Every other change of config is compatible and listed for the log.
"""
from __future__ import annotations

from typing import Any

from blues.config import BluesConfig
from blues.train import reshard
from blues.train.ep_checkpoint import check_expert_group
from blues.vision.contrastive import has_contrastive

# Settings that are not weight shapes but still fix the checkpoint's layout: DeepSpeed cannot
# load its partitions under another value. (ep_size is not one: a resume at another ep_size or world
# size goes through blues.train.reshard, refused there where it cannot work.)
LAYOUT_FIELDS = ("dtype", "freeze_router", "freeze")


def check_resume_config(saved: BluesConfig, current: BluesConfig) -> list[str]:
    """ValueError listing the fields that make the checkpoint unloadable; else the list of
    compatible changes ('name: old -> new') for the log."""
    problems = saved.architecture_diff(current)
    a, b = saved.to_dict(), current.to_dict()
    problems += [f"{k}: {a[k]!r} -> {b[k]!r}" for k in LAYOUT_FIELDS if a[k] != b[k]]
    if (a["moe_backend"] == "deepspeed") != (b["moe_backend"] == "deepspeed"):
        problems.append(f"moe_backend: {a['moe_backend']!r} -> {b['moe_backend']!r} (DeepSpeed's expert layout)")
    if has_contrastive(saved) != has_contrastive(current):
        problems.append(f"contrastive heads: {has_contrastive(saved)} -> {has_contrastive(current)} "
                        f"(contrastive_steps={b['contrastive_steps']}, contrastive_weight={b['contrastive_weight']}: "
                        "the heads exist when either is non-zero, on both sides or neither)")
    if problems:
        raise ValueError("cannot resume: the checkpoint was trained with another model layout; changed field(s): "
                         + "; ".join(problems))
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]


def check_resume(meta: dict[str, Any], current: BluesConfig, tokenizer_sha256: str, world_size: int,
                 stage: int) -> list[str]:
    """Everything a resume must agree on; returns the compatible config changes."""
    saved = BluesConfig.from_dict(meta["config"])
    changes = check_resume_config(saved, current)
    problems = []
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        problems.append(f"tokenizer sha256 {str(meta.get('tokenizer_sha256'))[:12]}... -> {tokenizer_sha256[:12]}...")
    if reshard.needs_reshard(meta, current, world_size):
        problems += reshard.reshard_problems(meta, current, world_size, stage)
    if meta.get("zero_stage") != stage:
        problems.append(f"ZeRO stage {meta.get('zero_stage')} -> {stage}")
    old_groups = check_expert_group(meta, current)
    if old_groups:
        problems.append(old_groups)
    if problems:
        raise ValueError("cannot resume: " + "; ".join(problems))
    return changes
