"""Resume at another expert-parallel size or world size (ZeRO 1/2 at both ends): an offline converter
from DeepSpeed's ZeRO 1/2 checkpoint files to its universal layout, aware of the expert group.

Shapes: E experts, ep = ep_size, E_loc = E / ep, W ranks.

Why Blues converts itself: DeepSpeed 0.19.8's universal *loader* already takes each EP rank's slice
[ep_rank*E_loc, (ep_rank+1)*E_loc) of an expert tensor stored whole (E, ...) (deepspeed/checkpoint/
universal_checkpoint.py:262-279), and re-partitions every tensor over any data-parallel world. Its
*converter* (ds_to_universal) keys fragments by data-parallel index only and reads expert state only in
AutoEP's layout, so the per-EP-rank pieces of one stacked expert weight would be joined in the wrong
order or clash (issue 10's design note, section 5).

Read (per optimizer group i; bf16 under ZeRO 1 writes the same keys into bf16_zero_pp_rank_* files):
    <src>/mp_rank_00_model_states.pt    param_shapes[i]: name -> shape (experts: (E_loc, ...) of EP rank 0,
                                        the same on every EP rank); client_state
    <src>/[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt, r < W: optimizer_state_dict with
        param_slice_mappings[i]          name -> (start, numel) of the name's piece in rank r's partition
        single_partition_of_fp32_groups[i]   rank r's partition of the fp32 master weights
        base_optimizer_state             torch state_dict: state[i] = {exp_avg, exp_avg_sq: same layout, step}
        param_groups[i]['moe']           the expert group: partitioned over the expert-data-parallel group
Rank r's piece is part r of a dense group; in the expert group it is part r // ep (its EDP rank) of
EP rank r % ep's (E_loc, ...) stacks (DeepSpeed's default layout, checked by
blues.moe.expert_parallel.ensure_ep_groups). Whole tensors are rebuilt by concatenating the pieces in
part order, experts then concatenated over EP ranks on dim 0: (E, ...) in global expert order.
Written (what engine.load_checkpoint reads with checkpoint.load_universal=true):
    <dst>/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt   {'param': whole tensor}; experts also
                                        is_expert_param=True, ep_num_experts=E
    <dst>/zero/<name>/step.pt           the group's step
    <dst>/zero/optimizer_state.pt       rank 0's global optimizer keys (loss scaler, clip, version) and
                                        param_groups without params, name and moe: the loader copies every
                                        other key into the live group at the same position, and a saved
                                        name would rename the live expert group ep_size_N
    <dst>/mp_rank_00_model_states.pt    copied: client_state, step counters
    <dst>/blues_universal.json          written last: the conversion is complete
Memory: rank 0 holds every rank's pieces of the fp32 weights and the Adam moments at once, on its CPU
(3x the model in fp32: 17 MB for the tiny preset, 1.5 GB for 125M parameters). TODO(when a model makes
that too much): write each parameter's pieces as they are read, as ds_to_universal does.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from blues.common import atomic_write_json
from blues.config import BluesConfig
from blues.train.distributed import all_reduce, barrier

if TYPE_CHECKING:
    from blues.train.engine import Run

UNIVERSAL_DONE = "blues_universal.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO_FILE = "{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def needs_reshard(meta: dict[str, Any], current: BluesConfig, world_size: int) -> bool:
    """Whether the checkpoint `meta` (its blues_complete.json) was written at another ep_size or world size."""
    saved = meta["config"]
    return saved.get("ep_size", 1) != current.train.ep_size or meta.get("world_size") != world_size


def reshard_problems(meta: dict[str, Any], current: BluesConfig, world_size: int, stage: int) -> list[str]:
    """Why a checkpoint written at another ep_size or world size cannot resume into this run, one
    reason each ([] when the converter handles it). A ZeRO stage change, a dtype change and a
    checkpoint from before the expert optimizer group are refused for every resume (checkpoint.
    check_resume); num_experts % ep_size and world_size % ep_size are refused by the config and by
    validate()."""
    saved = meta["config"]
    what = (f"ep_size {saved.get('ep_size', 1)} -> {current.train.ep_size}, world size {meta.get('world_size')} -> "
            f"{world_size}")
    problems = []
    stages = (meta.get("zero_stage"), stage)
    if any(s not in (1, 2) for s in stages):
        problems.append(f"{what} needs ZeRO 1 or 2 at both ends (the checkpoint has ZeRO {stages[0]}, this run "
                        f"ZeRO {stages[1]}; ZeRO 0 keeps its expert state in per-EP-rank files and ZeRO 3 in "
                        "per-rank parameter partitions, which the converter does not read): resume at the "
                        "checkpoint's ep_size and world size")
    if "deepspeed" in (saved.get("moe_backend"), current.moe.moe_backend):
        problems.append(f"{what} with moe_backend=deepspeed: DeepSpeed's MoE keeps one file per expert, which the "
                        "converter does not read: resume at the checkpoint's ep_size and world size, or train "
                        "with moe_backend=torch|triton")
    return problems


def zero_files(src: str, world_size: int) -> list[str]:
    """The per-rank ZeRO 1/2 optimizer files of the checkpoint folder `src`, in rank order."""
    for prefix in ("", "bf16_"):
        paths = [os.path.join(src, ZERO_FILE.format(prefix=prefix, rank=r)) for r in range(world_size)]
        if any(os.path.isfile(p) for p in paths):
            missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
            if missing:
                raise ValueError(f"checkpoint {src!r} was written by {world_size} ranks but lacks "
                                 f"{', '.join(missing)}: resume from another checkpoint")
            return paths
    raise ValueError(f"checkpoint {src!r} holds no ZeRO 1/2 optimizer files (zero_pp_rank_*_optim_states.pt): "
                     "only a ZeRO 1/2 checkpoint can be resumed at another ep_size or world size")


def convert(src: str, dst: str, ep_size: int, world_size: int) -> None:
    """Write the universal form of the ZeRO 1/2 checkpoint folder `src` (written by `world_size`
    ranks at `ep_size`) into `dst` (see the module docstring). Runs on one process; ValueError when
    the files do not fit together (a piece missing, a size that is not the parameter's)."""
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        EP_IS_EXPERT_PARAM,
        EP_NUM_EXPERTS,
        OPTIMIZER_STATE_DICT,
        PARAM,
        PARAM_SHAPES,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )
    assert world_size % ep_size == 0, (world_size, ep_size)
    files = zero_files(src, world_size)
    model_states = torch.load(os.path.join(src, MODEL_STATES), map_location="cpu", weights_only=False)
    shapes: dict[str, tuple] = {}
    for group in model_states[PARAM_SHAPES]:
        shapes.update({name: tuple(s) for name, s in group.items()})

    # (name, state key) -> {part: 1-D piece}, part = DP rank (dense) or (EP rank, EDP rank) (experts)
    pieces: dict[tuple[str, str], dict[Any, torch.Tensor]] = {}
    steps: dict[str, Any] = {}
    experts: set[str] = set()
    first: Optional[dict] = None
    for r, path in enumerate(files):
        sd = torch.load(path, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
        first = first if first is not None else sd
        groups = sd[BASE_OPTIMIZER_STATE]["param_groups"]
        for i, mapping in enumerate(sd[PARAM_SLICE_MAPPINGS]):
            fp32 = sd[SINGLE_PARTITION_OF_FP32_GROUPS][i]  # (this rank's partition of group i,)
            state = sd[BASE_OPTIMIZER_STATE]["state"].get(i, {})
            flat = {"fp32": fp32}  # and the moments laid out like it (exp_avg, exp_avg_sq for Adam)
            flat.update({k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == fp32.shape})
            moe = bool(groups[i].get("moe"))
            part = (r % ep_size, r // ep_size) if moe else r
            for name, frag in mapping.items():
                if moe:
                    experts.add(name)
                if "step" in state:
                    steps[name] = state["step"]
                for key, t in flat.items():
                    pieces.setdefault((name, key), {})[part] = t.narrow(0, frag.start, frag.numel).clone()
        del sd

    os.makedirs(os.path.join(dst, "zero"), exist_ok=True)
    for (name, key), parts in pieces.items():
        if name not in shapes:
            raise ValueError(f"checkpoint {src!r}: parameter {name!r} has optimizer state but no shape in "
                             f"{MODEL_STATES}")
        shape = shapes[name]
        if name in experts:
            local = []
            for e in range(ep_size):
                t = torch.cat([parts[p] for p in sorted(p for p in parts if p[0] == e)])
                local.append(_shaped(t, shape, f"{name} ({key}) of EP rank {e}", src))
            whole = {PARAM: torch.cat(local), EP_IS_EXPERT_PARAM: True, EP_NUM_EXPERTS: shape[0] * ep_size}  # (E, ...)
        else:
            whole = {PARAM: _shaped(torch.cat([parts[p] for p in sorted(parts)]), shape, f"{name} ({key})", src)}
        os.makedirs(os.path.join(dst, "zero", name), exist_ok=True)
        torch.save(whole, os.path.join(dst, "zero", name, f"{key}.pt"))
    for name, step in steps.items():
        torch.save(step, os.path.join(dst, "zero", name, "step.pt"))

    assert first is not None
    skip = (BASE_OPTIMIZER_STATE, SINGLE_PARTITION_OF_FP32_GROUPS, PARAM_SLICE_MAPPINGS)
    global_state = {k: v for k, v in first.items() if k not in skip}
    global_state["param_groups"] = [{k: v for k, v in g.items() if k not in ("params", "name", "moe")}
                                    for g in first[BASE_OPTIMIZER_STATE]["param_groups"]]
    torch.save(global_state, os.path.join(dst, "zero", "optimizer_state.pt"))
    shutil.copyfile(os.path.join(src, MODEL_STATES), os.path.join(dst, MODEL_STATES))
    groups = [{"name": g.get("name"), "moe": bool(g.get("moe"))} for g in first[BASE_OPTIMIZER_STATE]["param_groups"]]
    atomic_write_json(os.path.join(dst, UNIVERSAL_DONE), {"source": os.path.abspath(src), "ep_size": ep_size,
                                                         "world_size": world_size, "param_groups": groups})


def _shaped(t: torch.Tensor, shape: tuple, what: str, src: str) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    if t.numel() != n:
        raise ValueError(f"checkpoint {src!r}: the pieces of {what} hold {t.numel()} values, the parameter "
                         f"{tuple(shape)} has {n}: the optimizer files do not belong together")
    return t.view(shape)


def converted_groups(dst: str) -> list[dict]:
    """[{'name', 'moe'}] of the optimizer groups the converted checkpoint `dst` was saved with."""
    with open(os.path.join(dst, UNIVERSAL_DONE), encoding="utf-8") as f:
        return json.load(f)["param_groups"]


def check_groups(saved: list[dict], live: list[dict]) -> None:
    """ValueError unless the live optimizer groups line up with the saved ones position by position
    (DeepSpeed's universal loader pairs them by position): the same dense names, the expert group at
    the same place (its name, ep_size_N, may differ)."""
    def kinds(groups):
        return [("experts" if g.get("moe") else g.get("name")) for g in groups]
    if kinds(saved) != kinds(live):
        raise ValueError(f"cannot resume at another ep_size or world size: the checkpoint's optimizer groups "
                         f"{kinds(saved)} do not line up with this run's {kinds(live)}")


def loader_state_for_world(state: dict[str, Any], world_size: int) -> tuple[dict[str, Any], Optional[str]]:
    """A TokenLoader state saved at another world size, moved to `world_size`; and a note when the
    move is not exact.

    TokenLoader deals each epoch's shuffled windows like cards (rank r takes windows r, r + W, ...),
    and that shuffle does not depend on W, so after `pos` windows per rank the W ranks have used
    exactly the epoch's first pos * W windows. W' ranks continue with the next ones from
    pos' = pos * W / W'. When W' does not divide pos * W, pos' rounds down: up to W' - 1 windows are
    seen twice in this epoch (never skipped)."""
    old = int(state["world_size"])
    used = int(state["pos"]) * old
    new = dict(state, world_size=world_size, pos=used // world_size)
    note = None
    if used % world_size:
        note = (f"the data stream moves from {old} to {world_size} ranks inside an epoch: "
                f"{used % world_size} window(s) of this epoch are served a second time")
    return new, note


@contextmanager
def universal_copy(run: "Run", ckpt_dir: str, tag: str, meta: dict[str, Any],
                   out_ckpt_dir: str) -> Iterator[tuple[str, str]]:
    """(folder, tag) of the universal form of checkpoint (ckpt_dir, tag), with `run`'s engine set to
    load universal checkpoints (collective). Rank 0 converts into out_ckpt_dir/<tag>.universal (a name
    find_resume never picks) while the others wait; a failure there is raised on every rank; the copy
    is removed on the way out (it is rebuilt from the source if a later start needs it again)."""
    # DeepSpeed's loader cuts each EP rank's experts by the largest EP group this process made
    # (deepspeed/runtime/base_optimizer.py:21-33): it must be this run's, as it is in blues-train.
    from deepspeed.utils import groups

    from blues.moe.expert_parallel import group_name
    assert groups._get_max_expert_size_name() == group_name(run.cfg.train.ep_size), (
        f"this process has expert-parallel groups {sorted(groups._get_expert_parallel_group_dict())}; a resume at "
        f"another ep_size needs a process that made only {group_name(run.cfg.train.ep_size)}")
    utag = f"{tag}.universal"
    dst = os.path.join(out_ckpt_dir, utag)
    err: Optional[Exception] = None
    if run.dist.rank == 0:
        try:
            shutil.rmtree(dst, ignore_errors=True)  # an interrupted earlier conversion
            convert(os.path.join(ckpt_dir, tag), dst, meta["config"].get("ep_size", 1), meta["world_size"])
        except (ValueError, OSError, RuntimeError) as e:
            err = e
    failed = all_reduce(torch.tensor([1.0 if err else 0.0], device=run.dist.device), "max").item() > 0
    if err is not None:
        raise err
    if failed:
        raise ValueError(f"rank 0 could not convert checkpoint {os.path.join(ckpt_dir, tag)!r} to another ep_size or "
                         "world size (its error is above)")
    config = run.engine._config  # DeepSpeed reads the flag at load time (engine.load_universal_checkpoint())
    before = config.load_universal_checkpoint
    try:
        check_groups(converted_groups(dst), run.engine.optimizer.optimizer.param_groups)
        config.load_universal_checkpoint = True
        yield out_ckpt_dir, utag
    finally:
        config.load_universal_checkpoint = before
        barrier()
        if run.dist.rank == 0:
            shutil.rmtree(dst, ignore_errors=True)


def restore_stream(run: "Run", state: dict[str, Any]) -> list[str]:
    """After a world-size change: the loader's position moved to the new world (loader_state_for_world),
    and fresh RNG states, since the saved per-rank ones no longer map onto the ranks (each rank is
    seeded as a fresh start would be, moved on by the step so as not to replay the start's noise).
    Returns the notes for the resume line."""
    from blues.train.engine import seed_ranks
    notes = []
    if run.loader is not None and state.get("loader") is not None:
        loader, note = loader_state_for_world(state["loader"], run.dist.world_size)
        run.loader.load_state_dict(loader)
        notes += [note] if note else []
    seed_ranks(run.cfg.replace(seed=run.cfg.train.seed + run.step), run.dist.rank)
    return notes
