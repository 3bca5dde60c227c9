"""moe_route: router logits -> top-k expert ids, weights, and the sums the balancing losses need.

Shapes: T tokens, E experts, K top-k.

Contract (reference `moe_route_ref`, the specification):
    logits          (T, E)  any float dtype; scores are computed in fp32
    selection_bias  (E,)    optional; added to the scores for *selection only* (DeepSeek-V3's
                            auxiliary-loss-free balancing), never to the returned weights
  returns RouteOutput:
    topk_ids      (T, K) int64   experts chosen per token, ordered by descending (biased) score
    topk_weights  (T, K) fp32    their scores, renormalised to sum to 1 when norm_topk_prob
    counts        (E,)   int64   assignments per expert (sum = T*K), before any capacity drop
    prob_sum      (E,)   fp32    sum over tokens of each expert's score (the Switch loss's P_e * T)
    lse           (T,)   fp32    logsumexp of each token's logits (the z-loss's input)
Gradients flow to `logits` through topk_weights, prob_sum and lse.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class RouteOutput(NamedTuple):
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    counts: torch.Tensor
    prob_sum: torch.Tensor
    lse: torch.Tensor


def moe_route_ref(logits: torch.Tensor, top_k: int, *, score_func: str = "softmax", norm_topk_prob: bool = True,
                  selection_bias: Optional[torch.Tensor] = None) -> RouteOutput:
    assert logits.dim() == 2, f"logits must be (T, E), got {tuple(logits.shape)}"
    T, E = logits.shape
    assert 1 <= top_k <= E
    logits32 = logits.float()
    if score_func == "softmax":
        scores = torch.softmax(logits32, dim=-1)  # (T, E)
    elif score_func == "sigmoid":
        scores = torch.sigmoid(logits32)  # (T, E)
    else:
        raise ValueError(f"score_func={score_func!r} is invalid: expected softmax or sigmoid")
    select = scores if selection_bias is None else scores + selection_bias.float()
    # torch.topk breaks ties towards the lower index on CPU and CUDA alike; the kernels do the same.
    topk_ids = torch.topk(select.detach(), top_k, dim=-1).indices  # (T, K)
    topk_weights = scores.gather(1, topk_ids)  # (T, K)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    counts = torch.bincount(topk_ids.flatten(), minlength=E)  # (E,)
    prob_sum = scores.sum(dim=0)  # (E,)
    lse = torch.logsumexp(logits32, dim=-1)  # (T,)
    return RouteOutput(topk_ids, topk_weights, counts, prob_sum, lse)


def load_balancing_loss(counts: torch.Tensor, prob_sum: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer balancing loss E * sum_e f_e * P_e, with f_e the fraction of the T*K
    assignments sent to e and P_e the mean router score of e. Equals 1 for a uniform router
    (f_e = P_e = 1/E) and E for one collapsed onto a single expert."""
    E = counts.numel()
    f = counts.float() / (num_tokens * top_k)  # (E,)
    p = prob_sum / num_tokens  # (E,)
    return E * (f * p).sum()


def z_loss(lse: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared logsumexp of the router logits."""
    return (lse * lse).mean()
