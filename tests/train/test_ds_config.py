"""blues.train.ds_config: every ds_configs/*.json loads and resolves; "auto" is filled from the Blues config;
contradictions name both values."""
import glob
import json
import os

import pytest

from blues.presets import tiny
from blues.train.ds_config import (
    BUILTIN_DS_CONFIG,
    DS_CONFIG_DIR,
    check_parallelism,
    load_ds_config,
    resolve_ds_config,
    zero_stage,
)

DS_FILES = sorted(glob.glob(os.path.join(DS_CONFIG_DIR, "*.json")))


def test_ship_with_configs_exist():
    # the five configs the README promises; a missing one would make this list shorter
    names = {os.path.basename(p) for p in DS_FILES}
    assert {"zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero2_offload.json"} <= names


@pytest.mark.parametrize("path", DS_FILES, ids=os.path.basename)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_every_config_resolves(path, dtype, tmp_path):
    cfg = tiny().replace(dtype=dtype, micro_batch_size=4, grad_accum=3, grad_clip=0.5, out_dir=str(tmp_path),
                         moe_backend="torch")
    ds = resolve_ds_config(load_ds_config(path), cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is (dtype == "bf16")
    assert ds["fp16"]["enabled"] is (dtype == "fp16")
    assert ds["csv_monitor"]["output_path"].startswith(os.path.join(str(tmp_path), "monitor"))
    assert "auto" not in json.dumps(ds)


def test_builtin_equals_zero2_file():
    assert BUILTIN_DS_CONFIG == load_ds_config(os.path.join(DS_CONFIG_DIR, "zero2.json"))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_ds_config(str(tmp_path / "nope.json"))


def test_not_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{stage: 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_ds_config(str(p))


@pytest.mark.parametrize("key,value,blues", [
    ("train_micro_batch_size_per_gpu", 4, "micro_batch_size=8"),
    ("gradient_accumulation_steps", 2, "grad_accum=1"),
    ("gradient_clipping", 0.3, "grad_clip=1.0"),
])
def test_contradiction_names_both_values(key, value, blues):
    ds = dict(BUILTIN_DS_CONFIG, **{key: value})
    with pytest.raises(ValueError, match=f"{key}={value!r} contradicts {blues}"):
        resolve_ds_config(ds, tiny().replace(micro_batch_size=8), world_size=1)


def test_train_batch_size_contradiction():
    # 8 * 1 * 2 ranks = 16, not 32
    ds = dict(BUILTIN_DS_CONFIG, train_batch_size=32)
    with pytest.raises(ValueError, match=r"train_batch_size=32 contradicts micro_batch_size=8 \* grad_accum=1 \* "
                                         r"world size 2 = 16"):
        resolve_ds_config(ds, tiny().replace(micro_batch_size=8), world_size=2)


def test_explicit_values_that_agree_are_kept():
    ds = dict(BUILTIN_DS_CONFIG, train_batch_size=16, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1)
    out = resolve_ds_config(ds, tiny().replace(micro_batch_size=8), world_size=2)
    assert out["train_batch_size"] == 16


@pytest.mark.parametrize("section,dtype", [("bf16", "fp32"), ("fp16", "bf16")])
def test_precision_contradiction(section, dtype):
    ds = dict(BUILTIN_DS_CONFIG, **{section: {"enabled": True}})
    with pytest.raises(ValueError, match=f"{section}.enabled=True contradicts dtype='{dtype}'"):
        resolve_ds_config(ds, tiny().replace(dtype=dtype), world_size=1)


def test_precision_disabled_but_requested():
    ds = dict(BUILTIN_DS_CONFIG, bf16={"enabled": False})
    with pytest.raises(ValueError, match="bf16.enabled=False contradicts dtype='bf16'"):
        resolve_ds_config(ds, tiny().replace(dtype="bf16"), world_size=1)


def test_precision_section_added_when_absent():
    ds = {k: v for k, v in BUILTIN_DS_CONFIG.items() if k not in ("bf16", "fp16")}
    out = resolve_ds_config(ds, tiny().replace(dtype="bf16"), world_size=1)
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_sections_refused(section):
    ds = dict(BUILTIN_DS_CONFIG, **{section: {"type": "Adam"}})
    with pytest.raises(ValueError, match=f"has an '{section}' section"):
        resolve_ds_config(ds, tiny(), world_size=1)


def test_leftover_auto_refused():
    ds = json.loads(json.dumps(BUILTIN_DS_CONFIG))
    ds["zero_optimization"]["reduce_bucket_size"] = "auto"
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size"):
        resolve_ds_config(ds, tiny(), world_size=1)


def test_zero3_with_deepspeed_backend_names_the_alternative():
    ds = load_ds_config(os.path.join(DS_CONFIG_DIR, "zero3.json"))
    with pytest.raises(ValueError, match="moe_backend=deepspeed cannot run under ZeRO stage 3.*use moe_backend=torch"):
        resolve_ds_config(ds, tiny().replace(moe_backend="deepspeed", balance_bias_rate=0.0), world_size=2)


def test_ep_size_must_divide_experts_and_world():
    with pytest.raises(ValueError, match="ep_size=2 is invalid: must divide the world size 3"):
        check_parallelism(tiny().replace(moe_backend="deepspeed", balance_bias_rate=0.0, ep_size=2), world_size=3,
                          stage=2)
    # tiny has 16 experts: BluesConfig itself refuses ep_size=3
    with pytest.raises(ValueError, match="ep_size=3 is invalid: must divide num_experts=16"):
        tiny().replace(moe_backend="deepspeed", balance_bias_rate=0.0, ep_size=3)


@pytest.mark.parametrize("backend", ["torch", "triton", "deepspeed"])
@pytest.mark.parametrize("name", ["zero0.json", "zero1.json", "zero2.json", "zero2_offload.json", "zero3.json"])
def test_ep_size_2_runs_on_every_backend_and_stage(backend, name):
    """Expert parallelism is the stacked backends' too (issue 10); ZeRO 0 needs grad_clip=0 with it
    (tested below), ZeRO 3 refuses DeepSpeed's own MoE layer (tested above)."""
    ds = load_ds_config(os.path.join(DS_CONFIG_DIR, name))
    if backend == "deepspeed" and name == "zero3.json":
        return
    cfg = tiny().replace(moe_backend=backend, ep_size=2, grad_clip=0.0 if name == "zero0.json" else 1.0,
                         balance_bias_rate=0.0)  # DeepSpeed's gate has no selection bias
    check_parallelism(cfg, world_size=2, stage=zero_stage(ds), ds=ds)


@pytest.mark.parametrize("zero, field", [
    ({"stage": 2, "contiguous_gradients": False}, "zero_optimization.contiguous_gradients=false"),
    ({"stage": 1, "reduce_scatter": False}, "zero_optimization.reduce_scatter=false"),
])
@pytest.mark.parametrize("ep", [1, 2])
def test_stacked_experts_need_deepspeeds_moe_reduction_settings(zero, field, ep):
    # at every ep_size: the stacked experts are DeepSpeed MoE parameters at ep_size=1 too
    with pytest.raises(ValueError, match=f"{field} cannot run the MoE layer at ZeRO {zero['stage']}.*set "):
        check_parallelism(tiny().replace(moe_backend="torch", ep_size=ep), world_size=2, stage=zero["stage"],
                          ds={"zero_optimization": zero})


def test_zero0_ep_refuses_grad_clip():
    with pytest.raises(ValueError, match=r"grad_clip=1.0 is not available with ep_size=2 under ZeRO 0.*grad_clip=0"):
        check_parallelism(tiny().replace(moe_backend="torch", ep_size=2, grad_clip=1.0), world_size=2, stage=0)
    check_parallelism(tiny().replace(moe_backend="torch", ep_size=1, grad_clip=1.0), world_size=2, stage=0)


@pytest.mark.parametrize("zero, named", [
    ({"zero_hpz_partition_size": 2}, "zero_hpz_partition_size=2"),
    ({"zero_quantized_gradients": True}, "zero_quantized_gradients"),
    ({"offload_param": {"device": "cpu"}}, "offload_param.device='cpu'"),
    ({"offload_optimizer": {"device": "cpu"}}, "offload_optimizer.device='cpu'"),
])
def test_zero3_ep_refuses_what_deepspeed_does_not_support_there(zero, named):
    with pytest.raises(ValueError, match=f"ep_size=2 under ZeRO 3 does not support zero_optimization .*{named}"):
        check_parallelism(tiny().replace(moe_backend="torch", ep_size=2), world_size=2, stage=3,
                          ds={"zero_optimization": dict(stage=3, **zero)})


def test_data_before_expert_parallelism_is_refused():
    with pytest.raises(ValueError, match="use_data_before_expert_parallelism=true is not supported"):
        check_parallelism(tiny().replace(moe_backend="torch", ep_size=2), world_size=2, stage=2,
                          ds={"use_data_before_expert_parallelism": True})


def test_zero_stage():
    assert zero_stage({}) == 0
    assert zero_stage({"zero_optimization": {"stage": 3}}) == 3
    with pytest.raises(ValueError, match="zero_optimization.stage=4"):
        zero_stage({"zero_optimization": {"stage": 4}})
