"""moe_permute: token rows into expert order and back.

Shapes: T tokens, K top-k, S = T*K assignments (flat index s = t*K + k), E experts, D width.

Three ops, each with its reference (the specification):

moe_permute_indices_ref(topk_ids (T, K) int, num_experts) -> PermuteIndices
    Ids lie in [0, E]; id == E marks a dropped assignment (over capacity): it sorts after every
    expert, so rows [expert_offsets[E], S) hold the dropped assignments.
    sorted_slots    (S,)   int64  flat assignment index of each permuted row; stable: within an
                                  expert, rows keep increasing s (deterministic)
    expert_offsets  (E+1,) int64  exclusive prefix sum of per-expert counts; expert e owns rows
                                  [expert_offsets[e], expert_offsets[e+1])
    inverse         (S,)   int64  permuted row of each flat assignment: inverse[sorted_slots] = arange(S)

moe_permute_ref(x (T, D), sorted_slots (S,), top_k) -> (S, D)
    row p = x[sorted_slots[p] // top_k]. Gradient: each token sums the gradients of its K rows.

moe_unpermute_combine_ref(y (S, D), inverse (S,), topk_weights (T, K)) -> (T, D)
    out[t] = sum_k topk_weights[t, k] * y[inverse[t*K + k]], accumulated in fp32 and returned in
    y's dtype. Deterministic: each token gathers its own K rows, no atomics. A dropped assignment
    must carry weight 0 and its row must be finite (the expert ops write zeros there).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class PermuteIndices(NamedTuple):
    sorted_slots: torch.Tensor
    expert_offsets: torch.Tensor
    inverse: torch.Tensor


def moe_permute_indices_ref(topk_ids: torch.Tensor, num_experts: int) -> PermuteIndices:
    assert topk_ids.dim() == 2, f"topk_ids must be (T, K), got {tuple(topk_ids.shape)}"
    flat = topk_ids.reshape(-1).long()  # (S,)
    S = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts + 1)[: num_experts + 1]  # (E+1,) last bin = dropped
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    expert_offsets[1:] = torch.cumsum(counts[:num_experts], dim=0)
    sorted_slots = torch.sort(flat, stable=True).indices  # (S,)
    inverse = torch.empty_like(sorted_slots)
    inverse[sorted_slots] = torch.arange(S, device=flat.device)
    return PermuteIndices(sorted_slots, expert_offsets, inverse)


def moe_permute_ref(x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int) -> torch.Tensor:
    return x.index_select(0, torch.div(sorted_slots, top_k, rounding_mode="floor"))  # (S, D)


def moe_unpermute_combine_ref(y: torch.Tensor, inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    T, K = topk_weights.shape
    rows = y.index_select(0, inverse).view(T, K, -1)  # (T, K, D)
    out = torch.bmm(topk_weights.float().unsqueeze(1), rows.float()).squeeze(1)  # (T, D) fp32
    return out.to(y.dtype)
