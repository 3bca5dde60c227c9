"""BluesConfig: validation names the field, files and overrides map onto the same fields."""
import json

import pytest

from blues.config import BluesConfig, ModelConfig, MoEConfig, TrainConfig
from blues.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips(name):
    cfg = get_preset(name)
    assert BluesConfig.from_dict(cfg.to_dict()) == cfg


def test_blues01_preset_matches_the_spec():
    c = get_preset("blues01")
    m = c.model
    assert (m.n_layer, m.n_head, m.n_embd, m.num_kv_heads, m.block_size) == (6, 8, 512, 2, 512)
    assert (c.moe.num_experts, c.moe.top_k) == (8, 2)


@pytest.mark.parametrize("fields, match", [
    ({"n_head": 8, "num_kv_heads": 3}, r"num_kv_heads=3 is invalid: must divide n_head=8"),
    ({"num_experts": 4, "top_k": 5}, r"top_k=5 is invalid: must be <= num_experts=4"),
    ({"dropout": -0.1}, r"dropout=-0.1 is invalid"),
    ({"expert_dropout": 1.5}, r"expert_dropout=1.5 is invalid"),
    ({"attn_backend": "xformers"}, r"attn_backend='xformers' is invalid: expected one of auto, flash, sdpa, math"),
    ({"moe_backend": "megablocks"},
     r"moe_backend='megablocks' is invalid: expected one of auto, torch, triton, deepspeed"),
    ({"n_embd": 100, "n_head": 8}, r"n_embd=100 is invalid: must be divisible by n_head=8"),
    ({"capacity_factor": 0}, r"capacity_factor=0(\.0)? is invalid"),
    ({"num_experts": 6, "ep_size": 4}, r"ep_size=4 is invalid: must divide num_experts=6"),
    ({"dtype": "fp8"}, r"dtype='fp8' is invalid"),
    ({"min_lr": 1.0, "lr": 0.1}, r"min_lr=1.0 is invalid: must be <= lr=0.1"),
    ({"n_layr": 4}, r"unknown config field\(s\): 'n_layr' \(did you mean 'n_layer'\?\)"),
    ({"head_dim": 15}, r"head_dim=15 is invalid: must be even for RoPE"),
    ({"head_dim": 0}, r"head_dim=0 is invalid: expected a positive integer"),
    ({"qk_norm": "layer"}, r"qk_norm='layer' is invalid: expected one of none, head, full"),
    ({"attention_bias": "yes"}, r"attention_bias='yes' is invalid: expected true or false"),
    ({"dense_layers": [1, 1]}, r"dense_layers=\[1, 1\] is invalid: expected a list of distinct layer indices"),
    ({"dense_layers": [-1]}, r"dense_layers=\[-1\] is invalid"),
    ({"n_layer": 4, "dense_layers": [4]}, r"dense_layers=\[4\] is invalid: expected layer indices below n_layer=4"),
])
def test_config_mistakes_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        BluesConfig.from_dict(fields)


def test_unknown_field_in_a_file_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("n_layer: 2\nnum_expertz: 4\n")
    with pytest.raises(ValueError, match=r"unknown config field\(s\): 'num_expertz'"):
        BluesConfig.from_file(str(p))


def test_blues01_names_and_aliases_load_from_yaml_and_json(tmp_path):
    d = {"n_layer": 3, "n_head": 4, "n_embd": 64, "num_key_value_heads": 1, "num_experts": 4, "top_k": 1,
         "expert_ffn_size": 96, "vocab_size": 300, "block_size": 32, "dropout": 0.1, "capacity_factor": 1.25,
         "first_k_dense": 1, "tie_embeddings": False}
    (tmp_path / "c.json").write_text(json.dumps(d))
    (tmp_path / "c.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in d.items()))
    a = BluesConfig.from_file(str(tmp_path / "c.json"))
    b = BluesConfig.from_file(str(tmp_path / "c.yaml"))
    assert a == b
    assert a.model.num_kv_heads == 1 and a.moe.num_dense_layers == 1 and a.moe.capacity_factor == 1.25
    assert not a.moe.is_moe_layer(0) and a.moe.is_moe_layer(1)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        BluesConfig.from_file(str(tmp_path / "missing.yaml"))
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json' is not valid JSON"):
        BluesConfig.from_file(str(p))


def test_cli_overrides_parse_values_and_validate():
    c = get_preset("tiny").with_overrides(["lr=5e-3", "capacity_factor=null", "n_layer=3", "tie_embeddings=false"])
    assert c.train.lr == 5e-3 and c.moe.capacity_factor is None and c.model.n_layer == 3
    assert c.model.tie_embeddings is False
    with pytest.raises(ValueError, match="must look like key=value"):
        get_preset("tiny").with_overrides(["lr"])
    with pytest.raises(ValueError, match=r"top_k=9 is invalid: must be <= num_experts=4"):
        get_preset("tiny").with_overrides(["num_experts=4", "top_k=9"])


def test_architecture_diff_lists_shape_fields_only():
    a = get_preset("tiny")
    b = a.replace(lr=1e-2, max_steps=5, n_embd=64, num_experts=8)
    # head_dim stays derived (None in to_dict), so a new n_embd changes it without a line of its own
    assert a.architecture_diff(b) == [f"n_embd: {a.model.n_embd} -> 64", f"num_experts: {a.moe.num_experts} -> 8"]
    c = a.replace(head_dim=a.model.head_dim * 2, qk_norm="head", attention_bias=True, dense_layers=[0])
    assert a.architecture_diff(c) == [f"head_dim: None -> {a.model.head_dim * 2}", "qk_norm: 'none' -> 'head'",
                                      "attention_bias: False -> True", "dense_layers: None -> [0]"]


def test_parts_validate_on_their_own():
    with pytest.raises(ValueError, match="n_layer=0"):
        ModelConfig(n_layer=0)
    with pytest.raises(ValueError, match="top_k=0"):
        MoEConfig(top_k=0)
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        TrainConfig(micro_batch_size=0)


def test_head_dim_is_derived_unless_given():
    a = get_preset("tiny")
    assert a.model.head_dim == a.model.n_embd // a.model.n_head and a.to_dict()["head_dim"] is None
    assert a.replace(n_embd=64, n_head=2).model.head_dim == 32  # derived again, not carried over
    b = a.replace(n_embd=48, n_head=4, head_dim=16)  # Qwen3-MoE style: 4 * 16 != 48
    assert b.model.head_dim == 16 and b.to_dict()["head_dim"] == 16
    assert b.replace(lr=1e-3).model.head_dim == 16 and BluesConfig.from_dict(b.to_dict()) == b
    # n_embd need not divide by n_head when head_dim is given
    assert ModelConfig(n_embd=100, n_head=8, head_dim=16).head_dim == 16


def test_one_rule_decides_dense_layers():
    # dense_layers adds to num_dense_layers and moe_layer_freq: Qwen3-MoE's decoder_sparse_step s is
    # num_dense_layers = s - 1 with moe_layer_freq = s; its mlp_only_layers is dense_layers (an alias).
    m = BluesConfig.from_dict({"n_layer": 6, "num_dense_layers": 1, "moe_layer_freq": 2,
                               "mlp_only_layers": [3]}).moe
    assert [m.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert MoEConfig(dense_layers=[2, 0]).dense_layers == [0, 2]
