"""The Hugging Face families Blues reads and writes: their config.json fields and tensor names.

Shapes: D model width, F expert hidden size, E experts, V vocabulary, Dh head width, H heads.

Mixtral (model_type mixtral) on disk -> Blues:
  model.embed_tokens.weight (V, D)                       tok_emb.weight (V, D)
  lm_head.weight (V, D)                                   lm_head.weight (absent when tied)
  model.norm.weight                                       norm.weight
  model.layers.i.input_layernorm.weight                   blocks.i.attn_norm.weight
  model.layers.i.post_attention_layernorm.weight          blocks.i.mlp_norm.weight
  model.layers.i.self_attn.{q,k,v,o}_proj.weight          blocks.i.attn.w{q,k,v,o}.weight (same layout)
  model.layers.i.block_sparse_moe.gate.weight (E, D)      blocks.i.mlp.router.weight (E, D)
  ...block_sparse_moe.experts.e.w1.weight (F, D)          blocks.i.mlp.experts.w_gate[e] (D, F), transposed
  ...block_sparse_moe.experts.e.w3.weight (F, D)          blocks.i.mlp.experts.w_up[e] (D, F), transposed
  ...block_sparse_moe.experts.e.w2.weight (D, F)          blocks.i.mlp.experts.w_down[e] (F, D), transposed
Qwen3-MoE (model_type qwen3_moe) differs in:
  ...self_attn.{q,k,v,o}_proj.bias (attention_bias)       blocks.i.attn.w{q,k,v,o}.bias
  ...self_attn.{q,k}_norm.weight (Dh,)                    blocks.i.attn.{q,k}_norm.weight (qk_norm=head)
  ...mlp.gate.weight (E, D)                               blocks.i.mlp.router.weight
  ...mlp.experts.e.{gate,up,down}_proj.weight             as w1, w3, w2 above
  ...mlp.{gate,up,down}_proj.weight (dense layers)        blocks.i.mlp.w_{gate,up,down}.weight (same layout)
Qwen2-MoE (model_type qwen2_moe) is Qwen3-MoE without QK-norm, with biases on q, k, v only (qkv_bias)
and a gated shared expert in every MoE layer:
  ...mlp.shared_expert.{gate,up,down}_proj.weight         blocks.i.mlp.shared.w_{gate,up,down}.weight
  ...mlp.shared_expert_gate.weight (1, D)                 blocks.i.mlp.shared_gate.weight (shared_expert_gate)
  An ungated Blues shared expert exports exactly as a zero gate (sigmoid 0 = 1/2) and a doubled down projection.
OLMoE (model_type olmoe) is Qwen3-MoE's layout with every layer MoE, experts of intermediate_size, QK-norm
over the whole q and k projections (qk_norm=full: weights (H*Dh,) and (G*Dh,)) and clip_qkv:
  ...self_attn.{q,k}_norm.weight (H*Dh,), (G*Dh,)         blocks.i.attn.{q,k}_norm.weight
Llama (model_type llama, dense) is a Mixtral whose every layer is a dense SwiGLU:
  ...mlp.{gate,up,down}_proj.weight                       blocks.i.mlp.w_{gate,up,down}.weight (same layout)
  ...self_attn.{q,k,v,o}_proj.bias (attention_bias)       blocks.i.attn.w{q,k,v,o}.bias
It is imported as a Blues model with num_dense_layers = n_layer: the start of blues-upcycle.
Qwen2 (model_type qwen2, dense) is Llama with biases on q, k and v only (qkv_bias).
transformers 5 keeps the experts fused in memory (mlp.experts.gate_up_proj (E, 2F, D), gate rows
first, and mlp.experts.down_proj (E, D, F)) and renames Mixtral's block_sparse_moe to mlp, but
saves the per-expert names above (its conversion_mapping.py); import reads both, export writes the
per-expert names, which transformers 4 and 5 both load. RoPE needs no permutation: Blues rotates
by halves, as transformers' rotate_half.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

import torch

from blues.config import ROPE_TYPES, BluesConfig, ModelConfig, MoEConfig

log = logging.getLogger(__name__)

HF_CONFIG_NAME = "config.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class Family(NamedTuple):
    """What tells one Hugging Face MoE family's checkpoint apart."""
    model_type: str
    title: str  # for messages
    architecture: str
    moe_prefix: str  # the MoE block's name on disk (transformers 5 renames Mixtral's to `mlp` in memory)
    expert_weights: tuple[tuple[str, str], ...]  # (name on disk, Blues stacked weight): gate, up, down
    default_theta: float  # its config class's rope_theta when a config names none
    dense: bool = False  # every layer a dense SwiGLU (no experts): import only, for upcycling


MIXTRAL = Family("mixtral", "Mixtral", "MixtralForCausalLM", "block_sparse_moe",
                 (("w1.weight", "w_gate"), ("w3.weight", "w_up"), ("w2.weight", "w_down")), 1e6)
QWEN3_MOE = Family("qwen3_moe", "Qwen3-MoE", "Qwen3MoeForCausalLM", "mlp",
                   (("gate_proj.weight", "w_gate"), ("up_proj.weight", "w_up"), ("down_proj.weight", "w_down")),
                   1e4)
QWEN2_MOE = Family("qwen2_moe", "Qwen2-MoE", "Qwen2MoeForCausalLM", "mlp", QWEN3_MOE.expert_weights, 1e4)
OLMOE = Family("olmoe", "OLMoE", "OlmoeForCausalLM", "mlp", QWEN3_MOE.expert_weights, 1e4)
LLAMA = Family("llama", "Llama", "LlamaForCausalLM", "mlp", (), 1e4, dense=True)
QWEN2 = Family("qwen2", "Qwen2", "Qwen2ForCausalLM", "mlp", (), 1e4, dense=True)
FAMILIES = {f.model_type: f for f in (MIXTRAL, QWEN3_MOE, QWEN2_MOE, OLMOE, LLAMA, QWEN2)}
EXPORT_ORDER = (MIXTRAL, QWEN3_MOE, QWEN2_MOE, OLMOE)  # the first that expresses a model is written
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


# ----------------------------------------------------------------------------- config

def family_of(hf_config: dict[str, Any]) -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} in {HF_CONFIG_NAME} is not supported: expected one of "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return FAMILIES[model_type]


def _expert_keys(family: Family) -> tuple[str, str]:
    """(number of experts, expert hidden size) as the family's config names them."""
    if family is MIXTRAL:
        return "num_local_experts", "intermediate_size"
    return "num_experts", ("intermediate_size" if family is OLMOE else "moe_intermediate_size")


def config_from_hf(hf_config: dict[str, Any]) -> BluesConfig:
    """The BluesConfig of a Hugging Face config.json (a dict), or one ValueError naming the field
    that Blues cannot express.

    HF's load-balancing loss is top_k times Blues' per layer (HF counts f_e per token, Blues per
    assignment) and is pooled over layers where Blues averages per-layer losses, so aux_loss_coef =
    router_aux_loss_coef * top_k gives the same weight for one layer and nearly the same for
    several. Neither family has a z-loss (z_loss_coef 0) or router noise (router_noise_std 0);
    Mixtral's router_jitter_noise (a training-time input jitter Blues lacks) and attention_dropout
    are dropped with one warning line each. Qwen3-MoE: a layer is MoE iff it is not in
    mlp_only_layers and (i + 1) % decoder_sparse_step == 0; the others (dense_layers) are dense
    SwiGLUs of intermediate_size; norm_topk_prob as the config says (its class defaults to false)."""
    fam = family_of(hf_config)
    if fam.dense:
        return _dense_config_from_hf(hf_config, fam)
    h = dict(hf_config)
    if fam in (QWEN3_MOE, QWEN2_MOE) and h.get("num_experts") is None:  # transformers 5 saves it under Mixtral's name
        h["num_experts"] = h.get("num_local_experts")
    n_exp, f_exp = _expert_keys(fam)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                n_exp, f_exp, "num_experts_per_tok", "max_position_embeddings")
    missing = [k for k in dict.fromkeys(required) if h.get(k) is None]
    if missing:
        raise ValueError(f"{HF_CONFIG_NAME} lacks {', '.join(missing)}: a {fam.title} config names each of "
                         f"{', '.join(dict.fromkeys(required))}")
    L = h["num_hidden_layers"]
    model = _model_fields(h, fam)
    top_k = h["num_experts_per_tok"]
    moe = dict(num_experts=h[n_exp], top_k=top_k, expert_ffn_size=h[f_exp], router_noise_std=0.0,
               router_score_func="softmax", norm_topk_prob=True,
               aux_loss_coef=float(h.get("router_aux_loss_coef", 0.001)) * top_k, z_loss_coef=0.0,
               capacity_factor=None)
    if fam in (QWEN3_MOE, QWEN2_MOE):
        step = h.get("decoder_sparse_step", 1)
        dense = sorted(i for i in range(L) if i in (h.get("mlp_only_layers") or []) or (i + 1) % step != 0)
        moe.update(norm_topk_prob=bool(h.get("norm_topk_prob", False)), dense_layers=dense or None,
                   dense_ffn_size=h["intermediate_size"])
    if fam is QWEN3_MOE:
        model.update(qk_norm="head", attention_bias=bool(h.get("attention_bias", False)))
    if fam is OLMOE:
        model.update(qk_norm="full", clip_qkv=h.get("clip_qkv"))
        moe.update(norm_topk_prob=bool(h.get("norm_topk_prob", False)))
    if fam is QWEN2_MOE:
        shared = h.get("shared_expert_intermediate_size") or 0
        model.update(attention_bias=False, qkv_bias=bool(h.get("qkv_bias", True)))
        if shared:
            moe.update(num_shared_experts=1, shared_expert_ffn_size=shared, shared_expert_gate=True)
    return BluesConfig(model=ModelConfig(**model), moe=MoEConfig(**moe))


def _model_fields(h: dict[str, Any], fam: Family) -> dict[str, Any]:
    """ModelConfig fields of a Hugging Face config (every family), or one ValueError naming the field
    that Blues cannot express (activation, sliding window, RoPE scaling)."""
    D, H, T, L = h["hidden_size"], h["num_attention_heads"], h["max_position_embeddings"], h["num_hidden_layers"]
    if h.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={h['hidden_act']!r} cannot be expressed: Blues' MLPs are SwiGLU (silu)")
    window = h.get("sliding_window") if fam is MIXTRAL or h.get("use_sliding_window") else None
    if window is not None and window < T and fam is not MIXTRAL:
        raise ValueError(f"use_sliding_window with sliding_window={window} cannot be expressed: {fam.title} applies "
                         "it to some layers only (max_window_layers), Blues' sliding_window to all")
    rope = dict(h.get("rope_parameters") or h.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", h.get("rope_theta", fam.default_theta))
    if rope_type not in ("default", *ROPE_TYPES):
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} cannot be expressed: Blues has plain RoPE and "
                         f"the {', '.join(ROPE_TYPES)} scalings")
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **{
        k: v for k, v in rope.items() if k in _ROPE_KEYS and v is not None}}
    for name in ("router_jitter_noise", "attention_dropout"):
        if h.get(name):
            log.warning("%s=%s in %s is dropped: Blues has no such training-time setting; inference is the same",
                        name, h[name], HF_CONFIG_NAME)
    return dict(vocab_size=h["vocab_size"], block_size=T, n_layer=L, n_head=H, n_embd=D,
                num_kv_heads=h.get("num_key_value_heads") or H, dropout=0.0, rope_theta=float(theta),
                norm_eps=float(h.get("rms_norm_eps", 1e-5 if fam is MIXTRAL else 1e-6)),
                tie_embeddings=bool(h.get("tie_word_embeddings", False)),
                init_std=float(h.get("initializer_range", 0.02)), head_dim=h.get("head_dim"), rope_scaling=scaling,
                sliding_window=window if window is not None and window < T else None,
                attention_bias=bool(h.get("attention_bias", False)) if fam in (QWEN3_MOE, OLMOE, LLAMA) else False)


# rope_parameters keys Blues reads (blues.attention.rope_inv_freq); others (partial_rotary_factor, ...) are not
# expressible and are refused by the config's validation when they matter.
_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def _dense_config_from_hf(h: dict[str, Any], fam: Family) -> BluesConfig:
    """A dense family's config.json: every layer a SwiGLU of intermediate_size (num_dense_layers =
    n_layer). The MoE fields are placeholders no layer uses (one expert of the dense width), ready for
    blues-upcycle, which replaces them."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")
    missing = [k for k in required if h.get(k) is None]
    if missing:
        raise ValueError(f"{HF_CONFIG_NAME} lacks {', '.join(missing)}: a {fam.title} config names each of "
                         f"{', '.join(required)}")
    if h.get("mlp_bias"):
        raise ValueError("mlp_bias=true cannot be expressed: Blues' SwiGLU projections have no bias")
    F = h["intermediate_size"]
    moe = MoEConfig(num_experts=1, top_k=1, expert_ffn_size=F, dense_ffn_size=F,
                    num_dense_layers=h["num_hidden_layers"], router_noise_std=0.0, aux_loss_coef=0.0,
                    z_loss_coef=0.0)
    model = _model_fields(h, fam)
    if fam is QWEN2:
        model.update(attention_bias=False, qkv_bias=True)  # transformers' Qwen2 always biases q, k, v
    return BluesConfig(model=ModelConfig(**model), moe=moe)


def _refusals(config: BluesConfig, family: Family) -> list[str]:
    """'field=value: why' for every Blues setting `family` cannot express."""
    mc, m = config.model, config.moe
    dense = [i for i in range(mc.n_layer) if not m.is_moe_layer(i)]
    checks = [
        (m.router_score_func != "softmax", "router_score_func", m.router_score_func, "its router is a softmax"),
        (m.balance_bias_rate != 0, "balance_bias_rate", m.balance_bias_rate, "it has no expert-selection bias"),
        (config.vision.vision_enabled, "vision_enabled", config.vision.vision_enabled, "it is a text-only model"),
    ]
    if family is not MIXTRAL:
        checks.append((mc.sliding_window is not None, "sliding_window", mc.sliding_window,
                       f"{family.title} windows some layers only"))
    if family is not QWEN2_MOE:
        checks += [(m.num_shared_experts != 0, "num_shared_experts", m.num_shared_experts, "it has no shared expert"),
                   (mc.qkv_bias, "qkv_bias", mc.qkv_bias, "it biases q, k and v only together with o")]
    if family in (MIXTRAL, OLMOE):
        checks.append((bool(dense), "dense layers", dense, f"every {family.title} layer is MoE"))
    if family is not OLMOE:
        checks.append((mc.clip_qkv is not None, "clip_qkv", mc.clip_qkv, f"{family.title} clamps nothing"))
    if family is MIXTRAL:
        checks += [
            (not m.norm_topk_prob, "norm_topk_prob", m.norm_topk_prob, "Mixtral renormalises the top-k weights"),
            (mc.qk_norm != "none", "qk_norm", mc.qk_norm, "Mixtral has no QK-norm"),
            (mc.attention_bias, "attention_bias", mc.attention_bias, "Mixtral's projections have no bias"),
        ]
    elif family is QWEN3_MOE:
        checks.append((mc.qk_norm != "head", "qk_norm", mc.qk_norm, "Qwen3-MoE always norms each head"))
    elif family is OLMOE:
        checks.append((mc.qk_norm != "full", "qk_norm", mc.qk_norm, "OLMoE always norms the whole q and k"))
    else:
        checks += [
            (m.num_shared_experts == 0, "num_shared_experts", m.num_shared_experts, "Qwen2-MoE always has one"),
            (mc.qk_norm != "none", "qk_norm", mc.qk_norm, "Qwen2-MoE has no QK-norm"),
            (mc.attention_bias, "attention_bias", mc.attention_bias, "Qwen2-MoE's o projection has no bias"),
        ]
    return [f"{name}={value!r} ({why})" for bad, name, value, why in checks if bad]


def export_family(config: BluesConfig) -> Family:
    """The family save_hf writes: the first of Mixtral, Qwen3-MoE, Qwen2-MoE that expresses the model;
    ValueError naming, for each, the fields it cannot express."""
    problems = {}
    for fam in EXPORT_ORDER:
        problems[fam] = _refusals(config, fam)
        if not problems[fam]:
            return fam
    raise ValueError("cannot be exported: " + "; ".join(f"{fam.title} cannot express {', '.join(p)}"
                                                          for fam, p in problems.items()))


def config_to_hf(config: BluesConfig, dtype: torch.dtype = torch.float32,
                 family: Optional[Family] = None) -> dict[str, Any]:
    """The config.json of a Blues config in `family` (default export_family's choice), or one
    ValueError naming each Blues field that the family cannot express (see config_from_hf for the
    aux-loss mapping, reversed here)."""
    fam = family or export_family(config)
    problems = _refusals(config, fam)
    if problems:
        raise ValueError(f"cannot be exported to {fam.title}: {'; '.join(problems)}")
    mc, m = config.model, config.moe
    n_exp, f_exp = _expert_keys(fam)
    out = {
        "architectures": [fam.architecture], "model_type": fam.model_type, "dtype": _DTYPE_NAMES[dtype],
        "vocab_size": mc.vocab_size, "hidden_size": mc.n_embd, "num_hidden_layers": mc.n_layer,
        "num_attention_heads": mc.n_head, "num_key_value_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
        "hidden_act": "silu", "max_position_embeddings": mc.block_size, "initializer_range": mc.init_std,
        "rms_norm_eps": mc.norm_eps, "use_cache": True,
        # No token ids: Blues' own tokenizer is not exported yet, and a default eos (Mixtral's is 2)
        # would stop transformers' generation where Blues' does not.
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
        "tie_word_embeddings": mc.tie_embeddings, "sliding_window": mc.sliding_window, "attention_dropout": 0.0,
        "num_experts_per_tok": m.top_k, n_exp: m.num_experts, f_exp: m.expert_ffn_size,
        "output_router_logits": False, "router_aux_loss_coef": m.aux_loss_coef / m.top_k,
        "rope_parameters": {"rope_theta": mc.rope_theta, "rope_type": "default", **(mc.rope_scaling or {})},
    }
    if fam is MIXTRAL:
        out["router_jitter_noise"] = 0.0
    else:
        out.update(intermediate_size=m.dense_hidden, use_sliding_window=False,
                   decoder_sparse_step=1, norm_topk_prob=m.norm_topk_prob,
                   mlp_only_layers=[i for i in range(mc.n_layer) if not m.is_moe_layer(i)])
    if fam in (QWEN3_MOE, OLMOE):
        out["attention_bias"] = mc.attention_bias
    if fam is OLMOE:
        out.update(clip_qkv=mc.clip_qkv, intermediate_size=m.expert_ffn_size)
        for k in ("use_sliding_window", "decoder_sparse_step", "mlp_only_layers"):
            out.pop(k)
    if fam is QWEN2_MOE:
        out.update(qkv_bias=mc.qkv_bias, shared_expert_intermediate_size=m.shared_hidden,
                   max_window_layers=mc.n_layer)
    return out


# ----------------------------------------------------------------------------- name map

class TensorMap(NamedTuple):
    """One tensor on disk (or one expert's slice of a fused one) and where it lives in Blues."""
    hf_name: str
    hf_shape: tuple[int, ...]  # of the whole tensor on disk
    blues_name: str  # a parameter of Blues
    expert: Optional[int] = None  # slice [expert] of a stacked Blues weight; None: the whole parameter
    hf_expert: Optional[int] = None  # slice [hf_expert] of a fused tensor on disk
    hf_rows: Optional[tuple[int, int]] = None  # rows [a, b) of that slice (gate_up_proj: gate, then up)
    transpose: bool = False


def _dense_names(config: BluesConfig, is_moe: list[bool]) -> list[tuple[str, str]]:
    """(HF name, Blues name) of every tensor stored as it is (no transpose, no stacking)."""
    mc = config.model
    out = [("model.embed_tokens.weight", "tok_emb.weight"), ("model.norm.weight", "norm.weight")]
    if not mc.tie_embeddings:
        out.append(("lm_head.weight", "lm_head.weight"))
    for i in range(mc.n_layer):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        out += [(p + "input_layernorm.weight", b + "attn_norm.weight"),
                (p + "post_attention_layernorm.weight", b + "mlp_norm.weight")]
        for x in "qkvo":
            biased = mc.attention_bias or (mc.qkv_bias and x != "o")
            out += [(f"{p}self_attn.{x}_proj.{w}", f"{b}attn.w{x}.{w}") for w in (("weight", "bias") if biased
                                                                                  else ("weight",))]
        if mc.qk_norm != "none":
            out += [(f"{p}self_attn.{x}_norm.weight", f"{b}attn.{x}_norm.weight") for x in "qk"]
        if not is_moe[i]:
            out += [(f"{p}mlp.{x}_proj.weight", f"{b}mlp.w_{x}.weight") for x in ("gate", "up", "down")]
    return out


def tensor_map(model, family: Family, hf_names: Optional[set[str]] = None) -> list[TensorMap]:
    """Every tensor of a `family` checkpoint for `model`'s config (a Blues model; meta or real),
    and where it goes.

    hf_names (the names a checkpoint holds) picks each layer's layout: fused experts where that
    layer has gate_up_proj or down_proj, else per-expert names under `mlp` or the family's MoE
    name (transformers renames Mixtral's block_sparse_moe to mlp on load, so both occur); None
    gives the layout export writes."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    is_moe = [block.is_moe for block in model.blocks]
    out = [TensorMap(h, shapes[b], b) for h, b in _dense_names(model.config, is_moe)]
    names = hf_names or set()
    E = model.config.moe.num_experts
    for i in range(model.config.model.n_layer):
        if not is_moe[i]:
            continue
        p, b = f"model.layers.{i}.", f"blocks.{i}.mlp."
        moe = "mlp" if any(n.startswith(p + "mlp.") for n in names) else family.moe_prefix
        out.append(TensorMap(f"{p}{moe}.gate.weight", shapes[b + "router.weight"], b + "router.weight"))
        if family is QWEN2_MOE and model.config.moe.num_shared_experts:
            out += [TensorMap(f"{p}mlp.shared_expert.{x}_proj.weight", shapes[f"{b}shared.w_{x}.weight"],
                              f"{b}shared.w_{x}.weight") for x in ("gate", "up", "down")]
            if model.config.moe.shared_expert_gate:  # else save_hf writes a zero gate (see the module docstring)
                out.append(TensorMap(f"{p}mlp.shared_expert_gate.weight", shapes[b + "shared_gate.weight"],
                                     b + "shared_gate.weight"))
        D, F = shapes[b + "experts.w_gate"][1:]
        if f"{p}mlp.experts.gate_up_proj" in names or f"{p}mlp.experts.down_proj" in names:
            gu, dn = f"{p}mlp.experts.gate_up_proj", f"{p}mlp.experts.down_proj"
            for e in range(E):
                out += [TensorMap(gu, (E, 2 * F, D), b + "experts.w_gate", e, e, (0, F), True),
                        TensorMap(gu, (E, 2 * F, D), b + "experts.w_up", e, e, (F, 2 * F), True),
                        TensorMap(dn, (E, D, F), b + "experts.w_down", e, e, None, True)]
            continue
        for e in range(E):
            for hf_w, blues_w in family.expert_weights:
                shape = shapes[f"{b}experts.{blues_w}"][1:][::-1]  # (F, D) or (D, F)
                out.append(TensorMap(f"{p}{moe}.experts.{e}.{hf_w}", shape, f"{b}experts.{blues_w}", e,
                                     transpose=True))
    return out
