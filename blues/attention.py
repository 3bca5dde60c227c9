"""Grouped-query attention with RoPE and a KV cache.

Shapes: B batch, T query tokens, S key tokens (cache + new), H query heads, G = num_kv_heads
(1 = multi-query, H = multi-head), Dh = head_dim head size, D model width (H * Dh by default;
Qwen3-MoE sets head_dim so that H * Dh != D: queries and the output projection are H * Dh wide).

Backends, chosen once per (device, dtype) and logged once:
  flash  flash-attn's flash_attn_func (installed, CUDA, fp16/bf16); GQA native
  sdpa   torch's scaled_dot_product_attention with enable_gqa=True
  math   plain matmul + softmax in fp32: the reference the others are tested against
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from blues.config import ModelConfig

log = logging.getLogger(__name__)

try:  # optional extra: pip install -e .[flash]
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_func = None

_LOGGED: set = set()


def _log_once(key, msg: str) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(msg)


def resolve_attn_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs for `requested` on this device and dtype (logs the choice once)."""
    flash_ok = flash_attn_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if requested == "flash":
        if not flash_ok:
            why = ("flash-attn is not installed (pip install -e .[flash])" if flash_attn_func is None
                   else f"flash-attn needs CUDA and fp16/bf16, got {device.type} {dtype}")
            raise ValueError(f"attn_backend='flash' cannot run: {why}; use attn_backend='sdpa' or 'auto'")
        return "flash"
    if requested == "auto":
        backend = "flash" if flash_ok else "sdpa"
        if backend == "sdpa":
            reason = "flash-attn not installed" if flash_attn_func is None else f"{device.type} {dtype}"
            _log_once(("attn", device.type, dtype), f"attention backend: sdpa ({reason})")
        else:
            _log_once(("attn", device.type, dtype), "attention backend: flash-attn")
        return backend
    return requested


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension, in fp32 with eps inside the root, then scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (Dh/2,) float64 on the CPU, the factor cos and sin are scaled by).

    scaling (ModelConfig.rope_scaling, Hugging Face's rope_parameters names), for a context longer than
    the one trained at:
      linear  every frequency divided by `factor` (positions interpolated)
      llama3  Llama 3.1's: wavelengths above original_max_position_embeddings / low_freq_factor divided
              by `factor`, below original / high_freq_factor kept, a smooth blend between
      yarn    YaRN (arXiv 2309.00071): each frequency blended between kept and divided by `factor` by a
              ramp over the dimensions whose rotation count over original_max_position_embeddings lies
              between beta_slow and beta_fast; cos and sin scaled by attention_factor (default
              0.1 * ln(factor) + 1, or the mscale / mscale_all_dim ratio when both are given)."""
    dims = torch.arange(0, head_dim, 2, dtype=torch.float64)
    inv_freq = 1.0 / (theta ** (dims / head_dim))  # (Dh/2,)
    if not scaling:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, blended, scaled), 1.0
    assert kind == "yarn", kind

    def mscale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    old = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `old`
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - lo) / ((hi - lo) if hi != lo else 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1: the frequency as trained (high frequencies), 0: interpolated
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (rotate-half convention), always fp32.

    Built on the ambient device (torch.get_default_device()), so `with torch.device("meta"):
    Blues(cfg)` builds a model without memory; moving off the meta device (model.to_empty, or
    reset_tables) computes the real tables."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: Optional[dict] = None):
        super().__init__()
        self.head_dim, self.max_len, self.theta, self.scaling = head_dim, max_len, theta, scaling
        cos, sin = self._tables(torch.get_default_device())
        # Not persistent: derived from the config, so checkpoints never carry a stale table.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(max_len, Dh/2) fp32 each on `device`; computed on the CPU in float64 (the same values
        whatever the device), placeholders on the meta device."""
        if torch.device(device).type == "meta":
            shape = (self.max_len, self.head_dim // 2)
            return torch.empty(shape, device="meta"), torch.empty(shape, device="meta")
        inv_freq, attention_factor = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        freqs = torch.outer(torch.arange(self.max_len, dtype=torch.float64, device="cpu"), inv_freq)  # (max_len, Dh/2)
        cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
        return cos.float().to(device), sin.float().to(device)

    def reset_tables(self, device: Optional[torch.device] = None) -> None:
        """Recompute the tables on `device` (default: where they are; the CPU when that is meta)."""
        if device is None:
            device = torch.device("cpu") if self.cos.is_meta else self.cos.device
        self.cos, self.sin = self._tables(device)

    def _apply(self, fn, recurse=True):
        # model.half() / .bfloat16() (DeepSpeed's fp16 and bf16 engines) cast every float buffer;
        # positions past a few hundred lose their angle in bf16, so rebuild the tables in fp32.
        # Off the meta device (to_empty) the moved tables hold no values: rebuild them too.
        was_meta = self.cos.is_meta
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32 or (was_meta and not self.cos.is_meta):
            self.reset_tables()
        return self

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start:start + length], self.sin[start:start + length]  # (T, Dh/2) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, Dh); cos/sin (T, Dh/2). Rotation in fp32, result in x's dtype."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class KVCache:
    """Per-layer key/value buffers holding only the G = num_kv_heads heads.

    k, v: (n_layer, B, G, max_len, Dh). `pos` is the number of positions already filled.
    An MQA cache (G=1) is n_head times smaller than the MHA cache of the same model.
    """

    def __init__(self, n_layer: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layer, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, G, T, Dh) at the current position; return the filled prefix (B, G, pos+T, Dh)."""
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos} used, {T} more asked")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def advance(self, n: int) -> None:
        self.pos += n

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, dropout_p: float = 0.0,
                     is_causal: bool = True, window: Optional[int] = None) -> torch.Tensor:
    """q (B, H, T, Dh); k, v (B, G, S, Dh) with S >= T; query i sits at position S - T + i.
    Returns (B, H, T, Dh). is_causal=False lets every query see every key (the vision encoder's
    bidirectional blocks). window: sliding-window attention (Mistral's), each query sees the last
    `window` positions, itself included."""
    B, H, T, Dh = q.shape
    G, S = k.shape[1], k.shape[2]
    if window is not None and window >= S:
        window = None  # every key is in the window: plain causal attention
    if backend == "flash":
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                              causal=is_causal,  # bottom-right aligned causal mask when S > T
                              window_size=(window - 1, 0) if window is not None else (-1, -1))
        return out.transpose(1, 2)
    if backend == "sdpa":
        gqa = G != H
        if gqa and q.is_cuda and q.dtype == torch.float32:
            # No fused CUDA kernel takes fp32 with grouped KV heads (pytorch/pytorch#139586: SDPA falls to its
            # math kernel, silently); with K/V expanded to every head the memory-efficient kernel runs.
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)  # (B, H, S, Dh)
            gqa = False
        if not is_causal:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
        if T == S and window is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        # SDPA's is_causal aligns the mask top-left when T != S; decoding needs it bottom-right.
        mask = None if T == 1 and window is None else _bottom_right_mask(T, S, q.device, window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    assert backend == "math", backend
    k = k.repeat_interleave(H // G, dim=1)  # (B, H, S, Dh)
    v = v.repeat_interleave(H // G, dim=1)
    att = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(Dh))  # (B, H, T, S)
    if is_causal:
        att = att.masked_fill(~_bottom_right_mask(T, S, q.device, window), float("-inf"))
    att = torch.softmax(att, dim=-1)
    if dropout_p > 0:
        att = F.dropout(att, p=dropout_p)
    return (att @ v.float()).to(q.dtype)


def _bottom_right_mask(T: int, S: int, device, window: Optional[int] = None) -> torch.Tensor:
    """(T, S) bool, True where query i (at position S-T+i) may see key j: j <= S-T+i, and with a
    window also j > S-T+i - window."""
    pos = torch.arange(T, device=device)[:, None] + (S - T)
    j = torch.arange(S, device=device)[None, :]
    return (j <= pos) & (j > pos - window) if window is not None else j <= pos


class Attention(nn.Module):
    """Grouped-query attention; is_causal=False (the vision encoder) attends both ways, and a
    forward given cos=None applies no RoPE (the encoder adds learned 2-D positions instead)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, is_causal: bool = True):
        super().__init__()
        self.layer_idx, self.is_causal = layer_idx, is_causal
        self.n_head, self.num_kv_heads, self.head_dim = cfg.n_head, cfg.num_kv_heads, cfg.head_dim
        D, bias, qkv_bias = cfg.n_embd, cfg.attention_bias, cfg.attention_bias or cfg.qkv_bias
        self.wq = nn.Linear(D, self.n_head * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(self.n_head * self.head_dim, D, bias=bias)
        # QK-norm before RoPE: per head (Qwen3-MoE), one (Dh,) weight shared by all heads; or over the full
        # projection (OLMoE), weights of (H*Dh,) and (G*Dh,).
        q_width, k_width = ((self.head_dim, self.head_dim) if cfg.qk_norm == "head" else
                            (self.n_head * self.head_dim, self.num_kv_heads * self.head_dim))
        self.qk_norm = cfg.qk_norm
        self.q_norm = RMSNorm(q_width, cfg.norm_eps) if cfg.qk_norm != "none" else None
        self.k_norm = RMSNorm(k_width, cfg.norm_eps) if cfg.qk_norm != "none" else None
        self.clip_qkv = cfg.clip_qkv
        self.window = cfg.sliding_window
        self.attn_backend = cfg.attn_backend
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # (B, T, H*Dh), (B, T, G*Dh) x 2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:  # OLMoE: after the full-width norm
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, Dh)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, G, S, Dh)
        backend = resolve_attn_backend(self.attn_backend, x.device, x.dtype)
        y = causal_attention(q, k, v, backend, self.dropout if self.training else 0.0, self.is_causal,
                             self.window)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.wo(y))
