"""Expert pruning: score each MoE layer's experts on calibration data, keep the best, drop the rest.

Shapes: L MoE layers (blocks whose MLP is MoE, in block order), E experts, N = B*T tokens, K top-k,
D width, F expert hidden size, n_e tokens routed to expert e in a batch.

Two scores, (L, E) each, from one instrumented pass (a forward hook on every blues.moe.layer.MoE):
    frequency  the share of a layer's top-k assignments that go to each expert (sums to 1 per layer)
    reap       REAP's saliency (Lasby et al., "REAP the Experts: Why Pruning Prevails for One-Shot MoE
               compression", arXiv 2510.13999, eq. 9; llm-compressor PR #2864; CerebrasResearch/reap's
               observer): S_e = (1 / |X_e|) * sum over tokens x in X_e of g_e(x) * ||f_e(x)||_2,
               X_e the tokens whose top-k holds e, g_e(x) the gate value, f_e(x) the expert's output.
               Here g_e(x) is the weight the layer itself puts on f_e(x) (moe_route's topk_weights:
               renormalised over the k chosen when norm_topk_prob, as REAP's renormalize_router_weights
               option; the raw scores otherwise). An expert no token chooses scores 0.

Routing is taken before the capacity cut (what the router chose, as MoEOutput.selected counts), in
eval mode (no router noise), with the layer's selection bias when it has one. The hook recomputes
the layer's routing from its input with the layer's own op and checks that its counts equal the
layer's `selected` output, so the scores describe the routing the model really ran.

Blues' config has one num_experts for every MoE layer, so prune_experts keeps the same number
round(keep * E) (halves up) in every layer: each layer's highest-scored, in their original order.
Kept experts' weights, router rows and selection-bias entries are copied exactly; shared experts,
attention and dense layers are untouched. With norm_topk_prob (the default) a token whose k chosen
experts are all kept gets exactly the output it had before: dropping experts changes the softmax's
denominator only, and the renormalisation over the k chosen cancels it.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F

from blues.model import Blues
from blues.moe.layer import MoE

METHODS = ("frequency", "reap")


def moe_layers(model: Blues) -> list[tuple[int, MoE]]:
    """(block index, layer) of every MoE layer, in block order; ValueError when there is none, or when
    a layer is not the stacked blues.moe.layer.MoE (DeepSpeed's layer keeps experts as separate modules)."""
    out = []
    for i in model.config.moe_layer_ids():
        mlp = model.blocks[i].mlp
        if not isinstance(mlp, MoE):
            raise ValueError(f"block {i} runs moe_backend={model.config.moe.moe_backend!r}: pruning needs the "
                             "stacked layer; load the model with Blues.from_pretrained (moe_backend=auto)")
        out.append((i, mlp))
    if not out:
        raise ValueError(f"the model has no MoE layer (n_layer={model.config.model.n_layer}, num_dense_layers="
                         f"{model.config.moe.num_dense_layers}, dense_layers={model.config.moe.dense_layers}): "
                         "there are no experts to prune")
    if model.config.train.ep_size != 1:
        raise ValueError(f"the model was built with ep_size={model.config.train.ep_size}: each rank holds a "
                         "slice of the experts; load it with ep_size=1 to prune it")
    return out


def check_keep(keep: float) -> None:
    """ValueError unless keep, the share of each layer's experts to keep, is in (0, 1]."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep={keep!r} is outside (0, 1]: give the share of experts to keep, e.g. 0.75")


def num_kept(num_experts: int, keep: float, top_k: int) -> int:
    """round(keep * num_experts), halves up; ValueError for keep outside (0, 1] or fewer than top_k kept."""
    check_keep(keep)
    n = math.floor(keep * num_experts + 0.5)
    if n < top_k:
        raise ValueError(f"keep={keep} keeps {n} of {num_experts} experts per MoE layer, fewer than top_k={top_k} "
                         f"(each token needs top_k experts): keep at least {math.ceil(top_k / num_experts * 100)}% "
                         "of them")
    return n


class _LayerStats:
    """Sums over calibration batches for one MoE layer."""

    def __init__(self, num_experts: int):
        self.counts = torch.zeros(num_experts, dtype=torch.long)  # (E,) top-k assignments per expert
        self.saliency_sum = torch.zeros(num_experts, dtype=torch.float64)  # (E,) sum of g * ||f|| (REAP)


def _expert_output(layer: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of `layer` on token rows x (n_e, D) -> (n_e, D), unweighted: the SwiGLU the grouped ops run."""
    ex = layer.experts
    h = F.silu(x @ ex.w_gate[e]) * (x @ ex.w_up[e])  # (n_e, F)
    return h @ ex.w_down[e]  # (n_e, D)


def _hook(layer: MoE, stats: _LayerStats, method: str):
    @torch.no_grad()
    def observe(module, args, output):
        x = args[0]
        xf = x.reshape(-1, x.shape[-1])  # (N, D)
        r = layer.route(xf)  # eval mode: the routing the layer ran, checked below
        assert torch.equal(r.counts, output.selected), (r.counts, output.selected)
        stats.counts += r.counts.cpu()
        if method != "reap":
            return
        for e in torch.nonzero(r.counts).flatten().tolist():
            tok, slot = torch.nonzero(r.topk_ids == e, as_tuple=True)  # (n_e,) each
            g = r.topk_weights[tok, slot].double()  # (n_e,)
            norm = _expert_output(layer, e, xf[tok]).double().norm(dim=-1)  # (n_e,)
            stats.saliency_sum[e] += (g * norm).sum().cpu()
    return observe


@torch.no_grad()
def expert_scores(model: Blues, batches: Iterable[torch.Tensor], method: str) -> torch.Tensor:
    """(L, E) float64 scores of every MoE layer's experts over calibration `batches` (token ids, each (B, T)),
    higher = more worth keeping: method "frequency" (share of the layer's top-k assignments) or "reap"
    (REAP saliency; see the module docstring). The model runs in eval mode; its mode is restored after."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {', '.join(METHODS)}")
    layers = moe_layers(model)
    stats = [_LayerStats(layer.cfg.num_experts) for _, layer in layers]
    handles = [layer.register_forward_hook(_hook(layer, s, method)) for (_, layer), s in zip(layers, stats)]
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    seen = 0
    try:
        for x in batches:
            model(x.to(device))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("no calibration batch: expert scores need at least one batch of token ids")
    counts = torch.stack([s.counts for s in stats]).double()  # (L, E)
    if method == "frequency":
        return counts / counts.sum(dim=1, keepdim=True)
    return torch.stack([s.saliency_sum for s in stats]) / counts.clamp_min(1)  # never chosen: 0


def experts_to_keep(scores: torch.Tensor, keep: float, top_k: int) -> list[list[int]]:
    """Per MoE layer, the indices (ascending) of its num_kept highest-scored experts; ties keep the lower index."""
    n = num_kept(scores.shape[1], keep, top_k)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]  # (L, n)
    return [sorted(row) for row in order.tolist()]


class PruneResult(NamedTuple):
    model: Blues
    removed: list[list[int]]  # per MoE layer, the original indices of the experts removed
    blocks: list[int]  # the block index of each MoE layer


@torch.no_grad()
def prune_experts(model: Blues, scores: torch.Tensor, keep: float) -> PruneResult:
    """A new Blues model whose every MoE layer keeps its round(keep * E) highest-`scores` experts
    ((L, E), from expert_scores), with the original indices of the experts each layer lost.

    The new config is the old one with num_experts = round(keep * E); the model is fp32 on the old one's
    device, carries its tokenizer, and saves and loads like any Blues model (save_pretrained)."""
    layers = moe_layers(model)
    cfg = model.config
    E, K = cfg.moe.num_experts, cfg.moe.top_k
    if tuple(scores.shape) != (len(layers), E):
        raise ValueError(f"scores have shape {tuple(scores.shape)} but the model has {len(layers)} MoE layers of "
                         f"{E} experts: expected ({len(layers)}, {E}), as expert_scores returns")
    kept = experts_to_keep(scores, keep, K)
    state = model.export_state_dict()
    for (i, _), rows in zip(layers, kept):
        idx = torch.tensor(rows, dtype=torch.long)
        for name in ("router.weight", "experts.w_gate", "experts.w_up", "experts.w_down", "selection_bias"):
            key = f"blocks.{i}.mlp.{name}"
            if key in state:  # selection_bias only with balance_bias_rate > 0
                state[key] = state[key].index_select(0, idx)  # (E, ...) -> (n, ...)
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the caller's RNG
        pruned = Blues(cfg.replace(num_experts=len(kept[0])))
    pruned.load_weights(state, source="the pruned weights")
    pruned.tokenizer = model.tokenizer
    removed = [sorted(set(range(E)) - set(rows)) for rows in kept]
    return PruneResult(pruned.to(model.tok_emb.weight.device).train(model.training), removed, [i for i, _ in layers])


@torch.no_grad()
def validation_loss(model: Blues, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over (x, y) batches (each (B, T)), weighted by tokens, in eval mode."""
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    total, tokens = 0.0, 0
    try:
        for x, y in batches:
            out = model(x.to(device), y.to(device))
            total += out.ce_loss.item() * y.numel()
            tokens += y.numel()
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no validation batch: the loss needs at least one batch")
    return total / tokens

