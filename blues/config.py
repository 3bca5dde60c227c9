"""Blues configuration: one root `BluesConfig` composed of small dataclasses.

Each part validates itself in `__post_init__` and raises `ValueError` naming the
field, the value and what would be right. A config file (YAML or JSON) and CLI
`key=value` overrides use the flat field names below; `from_dict` routes each
name to the part that owns it, so nothing is configured twice.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from blues.common import non_negative, positive_int, probability, require
from blues.vision.config import VisionConfig, num_image_tokens

ATTN_BACKENDS = ("auto", "flash", "sdpa", "math")
MOE_BACKENDS = ("auto", "torch", "triton", "deepspeed")
ROUTER_SCORE_FUNCS = ("softmax", "sigmoid")
QK_NORMS = ("none", "head", "full")
FREEZE_CHOICES = ("none", "encoder", "all_but_projector", "all_but_moe")
# rope_scaling's rope_type -> the keys it needs (blues.attention.rope_inv_freq); Hugging Face's names
ROPE_TYPES = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "yarn": ("factor", "original_max_position_embeddings")}
DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    """Vocabulary size; must match the tokenizer and the prepared data."""
    block_size: int = 512
    """Longest sequence the model attends over (context length)."""
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    """Model width D."""
    num_kv_heads: int = 2
    """Key/value heads: 1 is multi-query, n_head is multi-head, between is grouped-query."""
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    fused_loss: bool = True
    """Training loss by blues.loss's fused, chunked linear + cross-entropy: no (B, T, V) logits (16 MB
    less per micro-batch of 1024 tokens at V=4096; Blues EP=2 went from 0.92x to 1.09x AutoEP on 2 CPU
    ranks). false: the logits and F.cross_entropy over them (the same loss within fp32 rounding;
    3 fp32 V-wide buffers per token)."""
    attn_backend: str = "auto"
    """auto | flash | sdpa | math. auto: flash-attn on CUDA in fp16/bf16 when installed, else SDPA."""
    init_std: float = 0.02
    head_dim: Optional[int] = None
    """Width of one attention head; None = n_embd // n_head. Queries and outputs are n_head * head_dim
    wide, which need not be n_embd (Qwen3-MoE). Read back it is always the number: a None given is
    resolved here, and to_dict writes None again where it equals n_embd // n_head, so that a config
    with another n_embd derives its own."""
    qk_norm: str = "none"
    """none | head | full, before RoPE. head: RMSNorm (a weight of head_dim) on each query and key head
    (Qwen3-MoE); full: RMSNorm over the whole query and key projections (OLMoE)."""
    rope_scaling: Optional[dict] = None
    """RoPE frequencies for a longer context than trained at: {"rope_type": "linear" | "llama3" | "yarn",
    "factor": ..., and the type's other keys (Hugging Face's rope_parameters names)}; None = plain RoPE."""
    sliding_window: Optional[int] = None
    """Each query attends to the last sliding_window positions, itself included (Mistral/Mixtral); None =
    the whole context. The KV cache keeps every position; the mask does the windowing."""
    clip_qkv: Optional[float] = None
    """Clamp the q, k, v projections to [-clip_qkv, clip_qkv] (OLMoE; after a full-width QK-norm)."""
    attention_bias: bool = False
    """Biases on the q, k, v and o projections (Qwen3-MoE's and Llama's attention_bias)."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections only (Qwen2-MoE's qkv_bias); attention_bias covers it."""

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "num_kv_heads"):
            positive_int(name, getattr(self, name))
        if self.head_dim is None:
            require(self.n_embd % self.n_head == 0, "n_embd", self.n_embd,
                    f"must be divisible by n_head={self.n_head} (or set head_dim)")
            self.head_dim = self.n_embd // self.n_head
        positive_int("head_dim", self.head_dim)
        require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even for RoPE")
        require(self.qk_norm in QK_NORMS, "qk_norm", self.qk_norm, f"expected one of {', '.join(QK_NORMS)}")
        if self.sliding_window is not None:
            positive_int("sliding_window", self.sliding_window)
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type") if isinstance(rs, dict) else None
            require(kind in ROPE_TYPES, "rope_scaling", rs,
                    f"expected null or a mapping with rope_type one of {', '.join(ROPE_TYPES)}")
            missing = [k for k in ROPE_TYPES[kind] if not isinstance(rs.get(k), (int, float)) or rs[k] <= 0]
            require(not missing, "rope_scaling", rs, f"rope_type {kind!r} needs {', '.join(missing)} (numbers > 0)")
        if self.clip_qkv is not None:
            require(isinstance(self.clip_qkv, (int, float)) and self.clip_qkv > 0, "clip_qkv", self.clip_qkv,
                    "expected a number > 0, or null for no clamp")
        for name in ("attention_bias", "qkv_bias"):
            require(isinstance(getattr(self, name), bool), name, getattr(self, name), "expected true or false")
        require(not (self.qkv_bias and self.attention_bias), "qkv_bias", self.qkv_bias,
                "attention_bias=true biases q, k and v already: set qkv_bias=false")
        require(self.num_kv_heads <= self.n_head and self.n_head % self.num_kv_heads == 0, "num_kv_heads",
                self.num_kv_heads, f"must divide n_head={self.n_head} (1 = MQA, n_head = MHA)")
        probability("dropout", self.dropout)
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "expected a number > 0")
        require(self.norm_eps > 0, "norm_eps", self.norm_eps, "expected a number > 0")
        require(self.init_std > 0, "init_std", self.init_std, "expected a number > 0")
        require(self.attn_backend in ATTN_BACKENDS, "attn_backend", self.attn_backend,
                f"expected one of {', '.join(ATTN_BACKENDS)}")

    def to_dict(self) -> dict[str, Any]:
        """The fields, with head_dim None where it is derived (n_embd // n_head)."""
        d = dataclasses.asdict(self)
        if self.head_dim == self.n_embd // self.n_head and self.n_embd % self.n_head == 0:
            d["head_dim"] = None
        return d


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_ffn_size: int = 1024
    """Hidden size F of each SwiGLU expert."""
    router_noise_std: float = 0.1
    """Std of the Gaussian noise added to router logits in training only (exploration)."""
    router_score_func: str = "softmax"
    """softmax (probabilities over experts, fp32) or sigmoid (independent scores)."""
    norm_topk_prob: bool = True
    """Renormalise the k selected weights to sum to 1."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch load-balancing loss."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss (mean squared logsumexp of router logits)."""
    capacity_factor: Optional[float] = None
    """Capacity per expert = ceil(capacity_factor * tokens * top_k / num_experts); None drops no token."""
    num_shared_experts: int = 0
    """Always-active SwiGLU experts added to every MoE layer's output (one SwiGLU of their total width)."""
    shared_expert_ffn_size: Optional[int] = None
    """Hidden size of the shared experts' SwiGLU; None = num_shared_experts * expert_ffn_size (Qwen2-MoE's
    shared_expert_intermediate_size)."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(x @ w) per token, w a learned (D,) vector (Qwen2-MoE)."""
    expert_dropout: float = 0.0
    """Dropout on the experts' hidden activations (training only)."""
    moe_layer_freq: int = 1
    """Every moe_layer_freq-th layer (after the first num_dense_layers) is MoE, the others dense."""
    num_dense_layers: int = 0
    """The first k layers use a dense SwiGLU MLP (DeepSeek's first-k-dense)."""
    dense_ffn_size: Optional[int] = None
    """Hidden size of dense MLP layers; None = expert_ffn_size * top_k (same active parameters)."""
    moe_backend: str = "auto"
    """auto | torch | triton | deepspeed. auto: Triton on CUDA, torch elsewhere."""
    routed_scaling_factor: float = 1.0
    """Multiplies every routed expert's routing weight (DeepSeek-V2/V3's routed_scaling_factor). With
    norm_topk_prob the k weights sum to 1, so the routed output is about 1/k of a dense SwiGLU of
    top_k * expert_ffn_size at the same init (each expert is a 1/k slice of that width); top_k puts it
    back on the dense twin's scale (benchmarks/quality.py measured it; see the tiny preset)."""
    balance_bias_rate: float = 0.0
    """gamma of DeepSeek-V3's auxiliary-loss-free balancing; 0 = off. After each applied optimizer
    step every MoE layer's selection bias moves by gamma * sign(mean_count - count) per expert; the
    bias changes which experts are selected, never their weights (blues.train.balance)."""
    revive_dead_experts_after: int = 0
    """Re-initialise an expert that no token chose for this many consecutive optimizer steps from a
    live expert of its layer (plus noise), resetting its optimizer state; 0 = off (blues.train.revival)."""

    dense_layers: Optional[list[int]] = None
    """Indices of layers with a dense SwiGLU MLP, besides those num_dense_layers and moe_layer_freq
    make dense (Qwen3-MoE's mlp_only_layers); None or [] for none."""

    def __post_init__(self):
        for name in ("num_experts", "top_k", "expert_ffn_size", "moe_layer_freq"):
            positive_int(name, getattr(self, name))
        require(self.top_k <= self.num_experts, "top_k", self.top_k,
                f"must be <= num_experts={self.num_experts}")
        for name in ("router_noise_std", "aux_loss_coef", "z_loss_coef"):
            non_negative(name, getattr(self, name))
        require(self.router_score_func in ROUTER_SCORE_FUNCS, "router_score_func", self.router_score_func,
                f"expected one of {', '.join(ROUTER_SCORE_FUNCS)}")
        if self.capacity_factor is not None:
            require(isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0,
                    "capacity_factor", self.capacity_factor, "expected a number > 0, or None for no token dropping")
        require(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0, "num_shared_experts",
                self.num_shared_experts, "expected an integer >= 0")
        if self.shared_expert_ffn_size is not None:
            positive_int("shared_expert_ffn_size", self.shared_expert_ffn_size)
        require(self.num_shared_experts > 0 or (self.shared_expert_ffn_size is None and not self.shared_expert_gate),
                "num_shared_experts", self.num_shared_experts,
                "must be >= 1 when shared_expert_ffn_size or shared_expert_gate is set")
        require(isinstance(self.num_dense_layers, int) and self.num_dense_layers >= 0, "num_dense_layers",
                self.num_dense_layers, "expected an integer >= 0")
        probability("expert_dropout", self.expert_dropout)
        if self.dense_ffn_size is not None:
            positive_int("dense_ffn_size", self.dense_ffn_size)
        require(self.moe_backend in MOE_BACKENDS, "moe_backend", self.moe_backend,
                f"expected one of {', '.join(MOE_BACKENDS)}")
        require(isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0,
                "routed_scaling_factor", self.routed_scaling_factor, "expected a number > 0 (1 = unscaled)")
        non_negative("balance_bias_rate", self.balance_bias_rate)
        require(isinstance(self.revive_dead_experts_after, int) and not isinstance(
            self.revive_dead_experts_after, bool) and self.revive_dead_experts_after >= 0,
            "revive_dead_experts_after", self.revive_dead_experts_after, "expected an integer >= 0 (0 = off)")
        if self.dense_layers is not None:
            require(isinstance(self.dense_layers, (list, tuple)) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.dense_layers)
                and len(set(self.dense_layers)) == len(self.dense_layers), "dense_layers", self.dense_layers,
                "expected a list of distinct layer indices >= 0, or null")
            self.dense_layers = sorted(self.dense_layers)
        require(self.balance_bias_rate == 0 or self.moe_backend != "deepspeed", "balance_bias_rate",
                self.balance_bias_rate, "needs moe_backend=auto|torch|triton (DeepSpeed's gate has no selection "
                "bias): set moe_backend=torch or balance_bias_rate=0")
        require(self.revive_dead_experts_after == 0 or self.moe_backend != "deepspeed", "revive_dead_experts_after",
                self.revive_dead_experts_after, "needs moe_backend=auto|torch|triton (DeepSpeed's experts are not "
                "stacked tensors): set moe_backend=torch or revive_dead_experts_after=0")

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Most assignments one expert computes for a batch of `num_tokens` tokens, or None (no drop).

        ceil(capacity_factor * N * K / E), at least 1. The one definition in Blues: the stacked layer,
        the DeepSpeed adapter (which hands DeepSpeed's gate this value) and the memory probe all call
        it. Computed as an exact fraction: float orders of arithmetic disagree at the rounding edge
        (cf=1.1, N=45, E=3, K=2 gave 34 one way and 33 the other)."""
        if self.capacity_factor is None:
            return None
        from fractions import Fraction
        cap = Fraction(str(self.capacity_factor)) * num_tokens * self.top_k / self.num_experts
        return max(1, math.ceil(cap))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` is MoE: the one rule (num_dense_layers, moe_layer_freq, dense_layers)."""
        if layer_idx < self.num_dense_layers or (self.dense_layers and layer_idx in self.dense_layers):
            return False
        return (layer_idx - self.num_dense_layers) % self.moe_layer_freq == 0

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the shared experts' SwiGLU (0: none)."""
        if not self.num_shared_experts:
            return 0
        return self.shared_expert_ffn_size or self.num_shared_experts * self.expert_ffn_size

    @property
    def dense_hidden(self) -> int:
        return self.dense_ffn_size if self.dense_ffn_size is not None else self.expert_ffn_size * self.top_k


@dataclass
class TrainConfig:
    data_dir: str = "data_cache"
    """Prepared data (blues-prepare output); prepared from the built-in corpus when empty."""
    out_dir: str = "out"
    """Checkpoints, monitor logs and exported weights."""
    micro_batch_size: int = 8
    """Sequences per device per micro-step (DeepSpeed's train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (DeepSpeed's gradient_accumulation_steps)."""
    max_steps: int = 300
    lr: float = 1e-3
    """Peak learning rate (alpha_max) reached after warmup."""
    min_lr: float = 1e-4
    """Floor of the cosine decay (alpha_min)."""
    warmup_steps: int = 30
    """Linear warmup length (T_w)."""
    lr_decay_steps: Optional[int] = None
    """Step at which the cosine reaches min_lr (T_c); None = max_steps."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    dtype: str = "fp32"
    """fp32 | bf16 | fp16; must agree with the DeepSpeed config."""
    ep_size: int = 1
    """Expert-parallel group size: experts are split over this many ranks."""
    gradient_checkpointing: bool = False
    freeze_router: bool = False
    """Keep every MoE layer's router weights as they are (fine-tuning a trained MoE: the experts adapt,
    the routing does not move); they leave the optimizer. Refused with balance_bias_rate > 0 or dead-expert
    revival, which move the routing themselves."""
    freeze: str = "none"
    """Parameters kept as they are (they leave the optimizer), MoE-LLaVA's training stages: "none";
    "encoder" (the vision encoder; stage II: projector and language model train); "all_but_projector"
    (stage I: only the vision projector trains); "all_but_moe" (stage III: only the MoE layers' experts
    and routers train). The first two need vision_enabled."""
    seed: int = 1337
    eval_interval: int = 100
    eval_steps: int = 20
    log_interval: int = 10
    save_interval: int = 100
    keep_last: int = 3
    """Checkpoints kept in out_dir; older ones are deleted after a newer one is complete."""
    max_bad_steps: int = 5
    """Consecutive non-finite losses after which the run stops."""

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum", "max_steps", "ep_size", "eval_interval", "eval_steps",
                     "log_interval", "save_interval", "keep_last", "max_bad_steps"):
            positive_int(name, getattr(self, name))
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            non_negative(name, getattr(self, name))
        require(self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be <= lr={self.lr}")
        require(self.freeze in FREEZE_CHOICES, "freeze", self.freeze, f"expected one of {', '.join(FREEZE_CHOICES)}")
        require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", self.warmup_steps,
                "expected an integer >= 0")
        if self.lr_decay_steps is not None:
            positive_int("lr_decay_steps", self.lr_decay_steps)
        for name in ("beta1", "beta2"):
            probability(name, getattr(self, name))
        require(self.dtype in DTYPES, "dtype", self.dtype, f"expected one of {', '.join(DTYPES)}")


def _coerce(name: str, value: Any, type_name: str) -> Any:
    """YAML 1.1 reads `3e-4` as a string: turn numeric strings into the field's declared number type."""
    if isinstance(value, str) and ("float" in type_name or "int" in type_name):
        try:
            number = float(value)
        except ValueError:
            return value  # the part's validation names the field and the bad value
        if "float" in type_name:
            return number
        return int(number) if number.is_integer() else value
    if isinstance(value, int) and not isinstance(value, bool) and type_name.startswith(("float", "Optional[float]")):
        return float(value)
    return value


# Names accepted in files for compatibility (Blues-01 and Hugging Face spellings).
ALIASES = {
    "num_key_value_heads": "num_kv_heads",
    "d_model": "n_embd",
    "num_layers": "n_layer",
    "num_heads": "n_head",
    "max_seq_len": "block_size",
    "first_k_dense": "num_dense_layers",
    "mlp_only_layers": "dense_layers",
    "shared_expert_intermediate_size": "shared_expert_ffn_size",
    "batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
}

# Fields that fix the shape of the weights: a checkpoint resumed under a config that
# changes any of these cannot be loaded.
ARCHITECTURE_FIELDS = (
    "vocab_size", "n_layer", "n_head", "n_embd", "num_kv_heads", "tie_embeddings",
    "num_experts", "expert_ffn_size", "num_shared_experts", "moe_layer_freq", "num_dense_layers",
    "dense_ffn_size", "head_dim", "qk_norm", "attention_bias", "qkv_bias", "dense_layers", "shared_expert_ffn_size",
    "shared_expert_gate",
    "vision_enabled", "image_size", "patch_size", "vision_n_layer", "vision_n_head", "vision_n_embd",
    "vision_ffn_size", "merge_patches", "vision_pretrained_config",
)


@dataclass
class BluesConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Off by default (blues.vision.config): a text-only config reads and builds as before."""

    PARTS = ("model", "moe", "train", "vision")
    PART_CLASSES = (ModelConfig, MoEConfig, TrainConfig, VisionConfig)

    @classmethod
    def field_owner(cls) -> dict[str, str]:
        """Flat field name -> part that owns it."""
        owner = {}
        for part, part_cls in zip(cls.PARTS, cls.PART_CLASSES):
            for f in fields(part_cls):
                assert f.name not in owner, f"field {f.name} defined twice"
                owner[f.name] = part
        return owner

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BluesConfig":
        """Build from flat names (a config file) or nested {'model': {...}, ...}; unknown names are refused."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a mapping of field names to values, got {type(d).__name__}")
        owner = cls.field_owner()
        types = {f.name: f.type for c in cls.PART_CLASSES for f in fields(c)}
        parts: dict[str, dict[str, Any]] = {p: {} for p in cls.PARTS}
        flat: dict[str, Any] = {}
        for key, value in d.items():
            if key in cls.PARTS and isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        unknown = []
        for key, value in flat.items():
            name = ALIASES.get(key, key)
            if name not in owner:
                unknown.append(key)
                continue
            if name in parts[owner[name]]:
                raise ValueError(f"config field {name!r} is given twice (as {key!r} and an alias)")
            parts[owner[name]][name] = _coerce(name, value, types[name])
        if unknown:
            import difflib
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, list(owner) + list(ALIASES), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown config field(s): {', '.join(hints)}")
        return cls(**{p: c(**parts[p]) for p, c in zip(cls.PARTS, cls.PART_CLASSES)})

    @classmethod
    def from_file(cls, path: str) -> "BluesConfig":
        """Load a YAML (.yaml/.yml) or JSON file of flat field names."""
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml
                d = yaml.safe_load(text) or {}
            else:
                d = json.loads(text)
        except Exception as e:  # parse errors of either format
            kind = 'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'
            raise ValueError(f"config file {path!r} is not valid {kind}: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """Flat field names -> values; `from_dict(to_dict())` gives an equal config."""
        out: dict[str, Any] = self.model.to_dict()
        for part in ("moe", "train", "vision"):
            out.update(dataclasses.asdict(getattr(self, part)))
        return out

    def moe_layer_ids(self) -> list[int]:
        """Block number of each MoE layer (MoEConfig.is_moe_layer over the n_layer blocks), in order."""
        return [i for i in range(self.model.n_layer) if self.moe.is_moe_layer(i)]

    def replace(self, **overrides: Any) -> "BluesConfig":
        """A new config with flat-named fields replaced (validated)."""
        d = self.to_dict()
        for key, value in overrides.items():
            d[ALIASES.get(key, key)] = value
        return BluesConfig.from_dict(d)

    def with_overrides(self, items: list[str]) -> "BluesConfig":
        """Apply CLI `key=value` strings; values are parsed as YAML scalars (3, 1e-3, true, null)."""
        import yaml
        overrides = {}
        for item in items:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value")
            key, raw = item.split("=", 1)
            overrides[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        return self.replace(**overrides)

    def architecture_diff(self, other: "BluesConfig") -> list[str]:
        """Fields that change the weights' shapes: 'name: mine -> other' for each that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in ARCHITECTURE_FIELDS if a[k] != b[k]]

    def __post_init__(self):
        assert isinstance(self.model, ModelConfig) and isinstance(self.moe, MoEConfig)
        require(self.moe.num_experts % self.train.ep_size == 0, "ep_size", self.train.ep_size,
                f"must divide num_experts={self.moe.num_experts}")
        n = self.model.n_layer
        require(not self.moe.dense_layers or max(self.moe.dense_layers) < n, "dense_layers", self.moe.dense_layers,
                f"expected layer indices below n_layer={n}")
        if self.train.freeze_router:
            for name in ("balance_bias_rate", "revive_dead_experts_after"):
                require(not getattr(self.moe, name), "freeze_router", True,
                        f"keeps the routing fixed, but {name}={getattr(self.moe, name)} moves it: set {name}=0 or "
                        "freeze_router=false")
        if self.vision.vision_enabled:
            self._check_vision()
        else:
            require(self.train.freeze not in ("encoder", "all_but_projector"), "freeze", self.train.freeze,
                    "freezes around the vision tower, but vision_enabled=false: set vision_enabled=true or "
                    "freeze=none|all_but_moe")
            for name in ("contrastive_steps", "contrastive_weight"):
                require(not getattr(self.vision, name), name, getattr(self.vision, name),
                        "aligns images with captions, but vision_enabled=false: set vision_enabled=true or 0")

    def _check_vision(self) -> None:
        """What the vision part needs of the text model: a placeholder id inside the vocabulary, and
        room in block_size for one image span (<|image_start|>, the image tokens, <|image_end|>)."""
        v, V = self.vision, self.model.vocab_size
        require(v.image_token_id is None or v.image_token_id < V, "image_token_id", v.image_token_id,
                f"must be below vocab_size={V} (the tokenizer with its image specials decides both)")
        require(v.contrastive_steps <= self.train.max_steps, "contrastive_steps", v.contrastive_steps,
                f"must be <= max_steps={self.train.max_steps} (the stage is the first contrastive_steps steps)")
        n = num_image_tokens(v)
        require(n + 2 <= self.model.block_size, "image_size", v.image_size,
                f"gives {n} image tokens (+2 for start/end) but block_size={self.model.block_size}: raise "
                "block_size or patch_size, or set merge_patches=true")
