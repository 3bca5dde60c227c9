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


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (rotate-half convention), always fp32.

    Built on the ambient device (torch.get_default_device()), so `with torch.device("meta"):
    Blues(cfg)` builds a model without memory; moving off the meta device (model.to_empty, or
    reset_tables) computes the real tables."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
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
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device="cpu")
                                         / self.head_dim))
        freqs = torch.outer(torch.arange(self.max_len, dtype=torch.float64, device="cpu"), inv_freq)  # (max_len, Dh/2)
        return freqs.cos().float().to(device), freqs.sin().float().to(device)

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
                     is_causal: bool = True) -> torch.Tensor:
    """q (B, H, T, Dh); k, v (B, G, S, Dh) with S >= T; query i sits at position S - T + i.
    Returns (B, H, T, Dh). is_causal=False lets every query see every key (the vision encoder's
    bidirectional blocks)."""
    B, H, T, Dh = q.shape
    G, S = k.shape[1], k.shape[2]
    if backend == "flash":
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                              causal=is_causal)  # bottom-right aligned causal mask when S > T
        return out.transpose(1, 2)
    if backend == "sdpa":
        if not is_causal:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=True)
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=True)
        # SDPA's is_causal aligns the mask top-left when T != S; decoding needs it bottom-right.
        mask = None if T == 1 else _bottom_right_mask(T, S, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True)
    assert backend == "math", backend
    k = k.repeat_interleave(H // G, dim=1)  # (B, H, S, Dh)
    v = v.repeat_interleave(H // G, dim=1)
    att = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(Dh))  # (B, H, T, S)
    if is_causal:
        att = att.masked_fill(~_bottom_right_mask(T, S, q.device), float("-inf"))
    att = torch.softmax(att, dim=-1)
    if dropout_p > 0:
        att = F.dropout(att, p=dropout_p)
    return (att @ v.float()).to(q.dtype)


def _bottom_right_mask(T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool, True where query i (at position S-T+i) may see key j."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + (S - T)


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
        y = causal_attention(q, k, v, backend, self.dropout if self.training else 0.0, self.is_causal)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.wo(y))
