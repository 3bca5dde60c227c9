"""Forced routing: make every MoE layer route like the worst imbalance its capacity allows.

The memory probe runs its trials under `forced_routing(model)`, so that real routing can never
need more memory later. Only the choice of experts is forced: the weights, the balancing loss and
the z-loss keep their real values (so fp16 loss scaling behaves as in training).

The protocol: an MoE layer class that supports it has `set_forced_routing(skew)` (None restores the
router's own choice). The stacked layer (blues.moe.layer.MoE) calls `forced_route` below in place of
its route op; the DeepSpeed adapter (blues.moe.deepspeed_moe.DeepSpeedMoE) steers DeepSpeed's gate
input the same way. Both use `skew_assignment` for the targets, and the one capacity definition,
MoEConfig.capacity.

Shapes: N tokens, E experts, K top-k.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch

# The forcing bias on a target expert's logit: softmax/sigmoid scores lie in [0, 1] and a trained
# router's logits are O(10), so 1e4 wins every top-k whatever the real logits.
FORCING_LOGIT = 1e4


def hot_experts(num_experts: int, top_k: int, capacity: Optional[int], num_tokens: int, ep_size: int = 1) -> int:
    """The fewest experts that can take every one of the N*K assignments under the capacity.

    Without a capacity nothing is dropped, and the worst case is every token on the same K experts
    (the busiest expert then gets all N tokens). With a capacity C an expert keeps at most C, so
    the assignments need ceil(N*K / C) experts; fewer would only drop tokens (less work).
    Under expert parallelism (ep_size > 1) the worst case is every rank's tokens on one EP rank's
    experts (it then receives ep * N * min(K, E_loc) rows, or ep * E_loc * C under a capacity): the hot
    experts are the lowest-numbered, EP rank 0's, so they are capped at its E_loc = E / ep_size (but
    never below K: a token's K choices are distinct experts)."""
    if capacity is None:
        return top_k
    hot = math.ceil(num_tokens * top_k / capacity)
    if ep_size > 1:
        hot = min(hot, num_experts // ep_size)
    return min(num_experts, max(top_k, hot))


def skew_assignment(num_tokens: int, num_experts: int, top_k: int, hot: int,
                    skew: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(forced (N,) bool, targets (N, K) long): the first round(skew*N) tokens are forced; forced
    token i goes to K consecutive experts of the `hot` lowest-numbered ones, taken round-robin so
    that each hot expert gets an equal share (as near to its capacity as the capacity allows)."""
    n_forced = round(skew * num_tokens)
    forced = torch.zeros(num_tokens, dtype=torch.bool)
    forced[:n_forced] = True
    groups = max(1, math.ceil(hot / top_k))
    i = torch.arange(num_tokens)
    targets = ((i % groups) * top_k).unsqueeze(1) + torch.arange(top_k).unsqueeze(0)  # (N, K)
    return forced, targets % max(hot, top_k) % num_experts


def forced_targets(num_tokens: int, num_experts: int, top_k: int, capacity: Optional[int],
                   skew: float, ep_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """skew_assignment for the worst imbalance `capacity` allows (the hot experts it implies)."""
    return skew_assignment(num_tokens, num_experts, top_k,
                           hot_experts(num_experts, top_k, capacity, num_tokens, ep_size), skew)


def forced_route(route: Callable, logits: torch.Tensor, top_k: int, capacity: Optional[int], skew: float, *,
                 score_func: str = "softmax", norm_topk_prob: bool = True,
                 selection_bias: Optional[torch.Tensor] = None, ep_size: int = 1):
    """`route(logits, top_k, ...)` with the forced tokens' top-k on their target experts.

    logits (N, E). The selection follows a large bias on the targets; the weights are the real
    scores of the chosen experts (renormalised as configured), and the balancing loss's score sums
    and the z-loss's lse come from the real logits, so gradients flow as in training. ep_size: the
    layer's expert parallelism (the hot experts all on EP rank 0, see hot_experts)."""
    N, E = logits.shape
    real = route(logits, top_k, score_func=score_func, norm_topk_prob=norm_topk_prob,
                 selection_bias=selection_bias)
    with torch.no_grad():
        forced, targets = forced_targets(N, E, top_k, capacity, skew, ep_size)
        # FORCING_LOGIT on each forced token's targets, 0 elsewhere; no boolean indexing (a nonzero: a
        # device sync on CUDA, and four more (N, E) ops on a CPU).
        bias = torch.zeros(N, E, dtype=torch.float32, device=logits.device).scatter_(
            1, targets.to(logits.device), FORCING_LOGIT)
        bias.mul_(forced.to(logits.device).unsqueeze(1))  # (N, E)
        ids = route(logits.detach().float() + bias, top_k, score_func=score_func, norm_topk_prob=norm_topk_prob,
                    selection_bias=selection_bias).topk_ids  # (N, K)
    lf = logits.float()
    scores = torch.softmax(lf, dim=-1) if score_func == "softmax" else torch.sigmoid(lf)  # (N, E)
    weights = scores.gather(1, ids)  # (N, K)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    return real._replace(topk_ids=ids, topk_weights=weights, counts=counts)


def moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module of `model` that takes part in the forced-routing protocol."""
    return [m for m in model.modules() if callable(getattr(m, "set_forced_routing", None))]


@contextlib.contextmanager
def forced_routing(model: torch.nn.Module, skew: float = 1.0) -> Iterator[int]:
    """Within the block, every MoE layer of `model` sends `skew` of its tokens (the first ones) to
    the fewest experts its capacity allows; yields the number of layers forced. Other models in
    the process are untouched; leaving the block restores real routing, also after an error."""
    if not (isinstance(skew, (int, float)) and 0.0 < skew <= 1.0):
        raise ValueError(f"router_skew={skew!r} is invalid: expected a fraction in (0, 1]")
    layers = moe_layers(model)
    for layer in layers:
        layer.set_forced_routing(float(skew))
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.set_forced_routing(None)
