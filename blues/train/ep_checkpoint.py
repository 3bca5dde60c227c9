"""Checkpoints and export of the stacked experts under expert parallelism (moe_backend=torch|triton).

DeepSpeed writes per-expert files only for its own MoE classes; for Blues' stacked experts (marked as
DeepSpeed MoE parameters, blues.moe.expert_parallel) its mp_rank_00_model_states.pt holds EP rank 0's
(E_loc, ...) stacks, and loading it gives every rank EP rank 0's experts: silently wrong on every
other EP rank (verified on 2 gloo ranks, issue 10's design note, section 3). What repairs them:
- ZeRO 1/2: the fp32 master partitions (in the zero_pp_rank_* files, per rank) are right;
  engine.optimizer.update_lp_params() copies them back into the model (after_load).
- ZeRO 0: the weights are nowhere else, so the EDP-rank-0 member of each EP rank writes its experts to
  blues_experts_ep{e:03d}.pt (save_local_experts) and every rank reads its EP rank's file back. The
  optimizer state is DeepSpeed's per-EP-rank expp_rank_* file, already right.
- ZeRO 3: the experts are partitioned over the EDP group and saved per rank by DeepSpeed: nothing to do.

Export (full_state_dict) gathers the stacks over the EP group in EP-rank order (global expert order),
after gathering ZeRO 3 partitions, so that save_pretrained writes every expert.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

import torch

from blues.config import BluesConfig

if TYPE_CHECKING:
    from blues.train.engine import Run

EXPERT_FILE = "blues_experts_ep{:03d}.pt"


def expert_group(cfg: BluesConfig) -> Optional[str]:
    """The name of the optimizer group holding the stacked experts (DeepSpeed's EP group name), or None
    when there is none (moe_backend=deepspeed, or no MoE layer)."""
    if cfg.moe.moe_backend == "deepspeed" or not cfg.moe_layer_ids():
        return None
    from blues.moe.expert_parallel import group_name
    return group_name(cfg.train.ep_size)


def check_expert_group(meta: dict[str, Any], cfg: BluesConfig) -> Optional[str]:
    """Why the checkpoint `meta` describes cannot resume into `cfg`'s optimizer groups, or None.

    Checkpoints written before issue 10 keep the stacked experts in the dense decay group (no
    'expert_group' in their marker); the optimizer now has the expert group ep_size_N, and DeepSpeed
    loads partitions group by group, so such a checkpoint would load the wrong tensors or fail."""
    want = expert_group(cfg)
    if want is None or "expert_group" in meta:
        return None
    return ("the checkpoint keeps the expert weights in the dense optimizer group (written by a Blues version "
            f"before expert parallelism on moe_backend={cfg.moe.moe_backend}); this version keeps them in their own "
            f"group {want!r}: start a new run (another out_dir, or --resume none after moving the checkpoints "
            "away), or finish this one with the Blues version that wrote it")


def _local_experts(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".experts." in n}


def _ep(run: "Run"):
    if run.cfg.train.ep_size == 1 or expert_group(run.cfg) is None:
        return None
    from blues.moe.expert_parallel import ep_groups
    return ep_groups(run.cfg.train.ep_size)


def save_local_experts(run: "Run", tag_dir: str) -> None:
    """ZeRO 0 under expert parallelism: the EDP-rank-0 member of each EP rank writes its experts."""
    g = _ep(run)
    if g is None or run.stage != 0 or g.edp_rank != 0:
        return
    state = {n: p.detach().cpu().clone() for n, p in _local_experts(run.model).items()}
    torch.save({"experts": state, "ep_size": g.ep_size, "ep_rank": g.ep_rank},
               os.path.join(tag_dir, EXPERT_FILE.format(g.ep_rank)))


def after_load(run: "Run", tag_dir: str) -> None:
    """Give every EP rank its own experts back after engine.load_checkpoint (see the module docstring)."""
    g = _ep(run)
    if g is None:
        return
    if run.stage in (1, 2):
        run.engine.optimizer.update_lp_params()
    elif run.stage == 0:
        path = os.path.join(tag_dir, EXPERT_FILE.format(g.ep_rank))
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {tag_dir!r} lacks {os.path.basename(path)} (EP rank {g.ep_rank}'s experts "
                             "under ZeRO 0): resume from another checkpoint")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        own = _local_experts(run.model)
        if saved.get("ep_rank") != g.ep_rank or set(saved["experts"]) != set(own):
            raise ValueError(f"{path} holds other experts (EP rank {saved.get('ep_rank')}, "
                             f"{len(saved['experts'])} tensors) than EP rank {g.ep_rank} of this run needs")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(saved["experts"][n])


def full_state_dict(run: "Run") -> dict[str, torch.Tensor]:
    """The model's export state dict (CPU copies, tied head once) with every expert of every EP rank
    (collective: every rank calls it). ZeRO 3 partitions are gathered first."""
    model = run.model
    if run.stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            sd = {k: v.detach().cpu().clone() for k, v in model.export_state_dict().items()}
    else:
        sd = model.export_state_dict()
    g = _ep(run)
    if g is not None:
        from blues.moe.expert_parallel import all_gather_experts
        device = run.dist.device
        for name in [n for n in sd if ".experts." in n]:
            sd[name] = all_gather_experts(sd[name].to(device), g).cpu()  # (E, ...) in global order
    return sd
