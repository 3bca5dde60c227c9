"""DeepSpeed JSON configs: load one, fill its "auto" fields from the Blues config, refuse contradictions.

ds_configs/*.json hold DeepSpeed keys only. What Blues already configures is written "auto" there
and filled here, so nothing is configured twice:

    train_micro_batch_size_per_gpu  <- micro_batch_size
    gradient_accumulation_steps     <- grad_accum
    train_batch_size                <- micro_batch_size * grad_accum * world_size
    gradient_clipping               <- grad_clip
    bf16.enabled / fp16.enabled     <- dtype
    csv_monitor / tensorboard       output_path <- <out_dir>/monitor, job_name <- "blues"

A number where "auto" could stand must equal the Blues value, else ValueError naming both. The
optimizer and its schedule belong to Blues (AdamW, warmup + cosine from lr/min_lr/...): a DeepSpeed
"optimizer" or "scheduler" section is refused.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

from blues.config import BluesConfig

# <repo>/ds_configs; this file is <repo>/blues/train/ds_config.py
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS_CONFIG_DIR = os.path.join(_REPO, "ds_configs")

# Used when no --deepspeed_config is given; equal to ds_configs/zero2.json (tests check it).
BUILTIN_DS_CONFIG: dict[str, Any] = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True,
                          "reduce_bucket_size": 50000000, "allgather_bucket_size": 50000000},
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
    "csv_monitor": {"enabled": True, "output_path": "auto", "job_name": "auto"},
    "tensorboard": {"enabled": True, "output_path": "auto", "job_name": "auto"},
}

MONITORS = ("csv_monitor", "tensorboard")


def load_ds_config(path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON file; ValueError if it is missing or not a JSON object."""
    if not os.path.isfile(path):
        raise ValueError(f"DeepSpeed config {path!r} does not exist (ship-with configs are in {DS_CONFIG_DIR}: "
                         f"{', '.join(sorted(os.listdir(DS_CONFIG_DIR))) if os.path.isdir(DS_CONFIG_DIR) else 'none'})")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"DeepSpeed config {path!r} must hold a JSON object, got {type(d).__name__}")
    return d


def zero_stage(ds: dict[str, Any]) -> int:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config zero_optimization.stage={stage!r} is invalid: expected 0, 1, 2 or 3")
    return stage


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)


def _fill(ds: dict, key: str, blues_value: Any, blues_name: str, where: str = "") -> None:
    """ds[key] = blues_value if "auto" or absent; ValueError if it holds something else."""
    have = ds.get(key, "auto")
    if have == "auto":
        ds[key] = blues_value
    elif have != blues_value:
        raise ValueError(f"DeepSpeed config {where}{key}={have!r} contradicts {blues_name}={blues_value!r} in the "
                         f"Blues config: write \"auto\" in the DeepSpeed config or make them equal")


def check_parallelism(cfg: BluesConfig, world_size: int, stage: int, ds: Optional[dict[str, Any]] = None) -> None:
    """The combination of MoE backend, expert parallelism, ZeRO stage, world size and the DeepSpeed
    config `ds` (its zero_optimization section). (ep_size dividing num_experts is BluesConfig's own
    check: a config cannot exist without it.)

    The stacked backends (torch|triton) mark their experts as DeepSpeed MoE parameters at every ep_size
    (blues.moe.expert_parallel), so DeepSpeed's MoE rules apply to them even at ep_size=1."""
    ep, backend = cfg.train.ep_size, cfg.moe.moe_backend
    zero = (ds or {}).get("zero_optimization") or {}
    if backend == "deepspeed" and stage == 3:
        raise ValueError("moe_backend=deepspeed cannot run under ZeRO stage 3 (DeepSpeed refuses its MoE layer "
                         "there): use moe_backend=torch (or triton on CUDA; stacked experts, expert parallelism with "
                         "ep_size > 1) with ZeRO 3, or a ZeRO 0-2 config (ds_configs/zero2.json) with "
                         "moe_backend=deepspeed")
    if world_size % ep:
        raise ValueError(f"ep_size={ep} is invalid: must divide the world size {world_size} (number of ranks)")
    if backend == "deepspeed" or not cfg.moe_layer_ids():
        return
    if (ds or {}).get("use_data_before_expert_parallelism"):
        raise ValueError("DeepSpeed config use_data_before_expert_parallelism=true is not supported with "
                         f"moe_backend={backend}: Blues' experts assume DeepSpeed's default layout (expert-parallel "
                         "groups of consecutive ranks); remove the key")
    if stage in (1, 2):
        for key in ("contiguous_gradients", "reduce_scatter"):
            if zero.get(key, True) is False:
                raise ValueError(f"DeepSpeed config zero_optimization.{key}=false cannot run the MoE layer at ZeRO "
                                 f"{stage}: DeepSpeed reduces expert gradients over their expert-data-parallel group "
                                 "only with contiguous_gradients and reduce_scatter on (Blues' experts are DeepSpeed "
                                 f"MoE parameters at every ep_size); set {key}=true (see ds_configs/zero2.json)")
    if ep == 1:
        return
    if stage == 0 and cfg.train.grad_clip > 0:
        raise ValueError(f"grad_clip={cfg.train.grad_clip} is not available with ep_size={ep} under ZeRO 0: "
                         "DeepSpeed's ZeRO 0 clipping averages each rank's own gradient norm, which is not the "
                         "global norm when ranks hold different experts; set grad_clip=0, or use ZeRO 1, 2 or 3 "
                         "(their norms are global)")
    if stage == 3:
        refused = []
        if zero.get("zero_hpz_partition_size", 1) > 1:
            refused.append(f"zero_hpz_partition_size={zero['zero_hpz_partition_size']} (hpZ: set 1)")
        if zero.get("zero_quantized_gradients") or zero.get("zero_quantized_weights"):
            refused.append("zero_quantized_gradients / zero_quantized_weights (set false)")
        for key in ("offload_param", "offload_optimizer"):
            if ((zero.get(key) or {}).get("device") or "none") != "none":
                refused.append(f"{key}.device={zero[key]['device']!r} (set \"none\")")
        if refused:
            raise ValueError(f"ep_size={ep} under ZeRO 3 does not support zero_optimization "
                             f"{'; '.join(refused)}: DeepSpeed's expert partitioning is untested with them; change "
                             "them, or use ep_size=1")


def resolve_ds_config(ds: dict[str, Any], cfg: BluesConfig, world_size: int,
                      monitor_dir: Optional[str] = None) -> dict[str, Any]:
    """A copy of `ds` with every "auto" filled from `cfg`; ValueError on any contradiction."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} is invalid: expected a positive integer")
    ds = copy.deepcopy(ds)
    t = cfg.train
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(f"DeepSpeed config has an {section!r} section: Blues builds AdamW and its warmup+cosine "
                             "schedule from lr, min_lr, warmup_steps, lr_decay_steps, weight_decay, beta1, beta2; "
                             f"remove {section!r} from the DeepSpeed config")
    check_parallelism(cfg, world_size, zero_stage(ds), ds)

    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, "grad_accum")
    expected = t.micro_batch_size * t.grad_accum * world_size
    have = ds.get("train_batch_size", "auto")
    if have == "auto":
        ds["train_batch_size"] = expected
    elif have != expected:
        raise ValueError(f"DeepSpeed config train_batch_size={have!r} contradicts micro_batch_size={t.micro_batch_size}"
                         f" * grad_accum={t.grad_accum} * world size {world_size} = {expected}: write \"auto\" in "
                         "the DeepSpeed config or change the Blues batch fields")
    _fill(ds, "gradient_clipping", float(t.grad_clip), "grad_clip")
    if isinstance(ds["gradient_clipping"], int):
        ds["gradient_clipping"] = float(ds["gradient_clipping"])

    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        if not isinstance(section, dict):
            raise ValueError(f"DeepSpeed config {name!r} must be an object like {{\"enabled\": \"auto\"}}, "
                             f"got {section!r}")
        want = t.dtype == name
        have = section.get("enabled", "auto" if want else False)
        if have != "auto" and bool(have) != want:
            raise ValueError(f"DeepSpeed config {name}.enabled={have!r} contradicts dtype={t.dtype!r} in the Blues "
                             f"config: write \"auto\" in the DeepSpeed config or set dtype={name if have else 'fp32'}")
        section["enabled"] = want

    for name in MONITORS:
        section = ds.get(name)
        if not isinstance(section, dict):
            continue
        if section.get("output_path") == "auto":
            section["output_path"] = os.path.join(monitor_dir or os.path.join(t.out_dir, "monitor"), "")
        if section.get("job_name") == "auto":
            section["job_name"] = "blues"

    left = _find_auto(ds)
    if left:
        raise ValueError(f"DeepSpeed config key(s) {', '.join(left)} are \"auto\" but Blues fills only the batch "
                         "fields, gradient_clipping, bf16/fp16.enabled and the monitors' output_path/job_name: "
                         "give them values")
    return ds


def _find_auto(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            out += _find_auto(v, f"{prefix}{k}.")
        return out
    return [prefix[:-1]] if d == "auto" else []
