"""Which experts image tokens use and which text tokens use: per-modality expert load (issue 14, part 7).

Shapes: L MoE layers (stacked blues.moe.layer.MoE, in block order), E experts, K top-k, B batch,
T tokens, N = B*T tokens of one forward.

`routing_recorder(model, observe)` is the one place that watches a model route: a forward pre-hook on the
model keeps the forward's input ids, and a forward hook on each MoE layer recomputes the layer's routing
from its input with the layer's own route op (the forced one under blues.moe.routing.forced_routing,
the selection bias when it has one, before any capacity cut), checks that its per-expert counts equal
the layer's `selected` output (so what is observed is the routing the model ran), and calls
observe(l, ids (B, T), topk_ids (N, K)). Only the language-model pass over the input ids is observed:
a forward's first call of each layer (a model with contrastive heads runs a second, caption-only pass
through the same layers under forward(..., contrastive=...); contrastive="only" runs no LM pass at all).
blues-experts report counts token-to-expert with it, and `record_modality` below counts by modality with
it. Eval mode only: router noise cannot be recomputed.

The kind of each position (token_kinds): image where input id == image_token_id (as VisionTower), padding
where an <|endoftext|> follows another (ImageTextLoader pads a row with it after the sample's own
<|endoftext|>; padding would otherwise outweigh the captions of a short-text set), text otherwise.
Counts c[m, l, e], m = 0 image, 1 text: the top-k assignments of modality m's tokens to expert e in
layer l; each layer's c[m, l].sum() is top_k times modality m's tokens.

Monitor events at each evaluation of a vision run (i the block number, as blues.train.metrics):
    moe_modality_share/layer_<i>_image_expert_<j>   share of the image tokens' assignments on expert j
    moe_modality_share/layer_<i>_text_expert_<j>    share of the text tokens' assignments on expert j
    moe/layer_<i>/modality_tv                       total-variation distance between the two shares,
                                                    1/2 sum_j |image_j - text_j|: 0 the same experts,
                                                    1 disjoint experts
    moe/modality_tv_mean|max                        over layers
A layer whose image (or text) tokens number 0 has no share events for that modality and no tv.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from blues.common import log_once
from blues.moe.layer import MoE
from blues.train.step import split_batch

if TYPE_CHECKING:
    from blues.train.engine import Run

log = logging.getLogger(__name__)
MODALITIES = ("image", "text")
PADDING = -1  # token_kinds' value for padding; 0 image, 1 text (MODALITIES' order)


def stacked_moe_layers(model: torch.nn.Module) -> list[tuple[int, MoE]]:
    """(block number, layer) of every MoE layer, in block order; [] when a layer is not the stacked
    blues.moe.layer.MoE (moe_backend=deepspeed: its gate is DeepSpeed's, not recomputed here) or none is MoE."""
    layers = [(i, model.blocks[i].mlp) for i in model.config.moe_layer_ids()]
    return layers if all(isinstance(mlp, MoE) for _, mlp in layers) else []


def recompute_route(layer: MoE, x: torch.Tensor):
    """The routing `layer` ran on its input x (B, T, D): MoE.route on its rows, in eval mode."""
    assert not (layer.training and layer.cfg.router_noise_std > 0), "router noise cannot be recomputed: use eval mode"
    return layer.route(x.reshape(-1, x.shape[-1]))


@contextlib.contextmanager
def routing_recorder(model: torch.nn.Module, layers: list[tuple[int, MoE]],
                     observe: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, every forward of `model` calls observe(l, ids (B, T), topk_ids (N, K)) for each MoE
    layer l of `layers` (index into the list), ids the forward's input ids. Hooks removed on exit."""
    current: dict = {"ids": None, "seen": set()}

    def keep_ids(module, args, kwargs) -> None:
        # contrastive="only" runs no language-model pass: nothing of that forward is observed
        only = kwargs.get("contrastive", args[4] if len(args) > 4 else None) == "only"
        current["ids"] = None if only else (args[0] if args else kwargs["input_ids"])  # (B, T)
        current["seen"] = set()

    def hook(l: int):
        @torch.no_grad()
        def observed(layer, args, output) -> None:
            # Only the forward's first pass through layer l: the language-model pass over the input ids. A
            # later one (the contrastive caption pass, an activation-checkpointing recompute) is not counted.
            if current["ids"] is None or l in current["seen"]:
                return
            current["seen"].add(l)
            assert args[0].shape[:2] == current["ids"].shape, (args[0].shape, current["ids"].shape)
            r = recompute_route(layer, args[0])
            assert torch.equal(r.counts, output.selected), (r.counts, output.selected)
            observe(l, current["ids"], r.topk_ids)
        return observed

    handles = [model.register_forward_pre_hook(keep_ids, with_kwargs=True)]
    handles += [layer.register_forward_hook(hook(l)) for l, (_, layer) in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def token_kinds(ids: torch.Tensor, image_token_id: int, pad_id: Optional[int]) -> torch.Tensor:
    """ids (..., T) -> (..., T) long: 0 image (== image_token_id), 1 text, PADDING where pad_id follows
    pad_id in the same row (pad_id None: no padding)."""
    kinds = torch.where(ids == image_token_id, 0, 1)
    if pad_id is not None:
        pad = (ids == pad_id) & F.pad(ids[..., :-1] == pad_id, (1, 0), value=False)
        kinds = kinds.masked_fill(pad, PADDING)
    return kinds


class ModalityCounts:
    """c (2, L, E) int64 summed over the forwards seen inside `record_modality`: the top-k assignments of
    image (m = 0) and text (m = 1) tokens to each expert of each MoE layer; `blocks` their block numbers."""

    def __init__(self, blocks: list[int], num_experts: int):
        self.blocks = blocks
        self.counts = torch.zeros(2, len(blocks), num_experts, dtype=torch.int64)  # (2, L, E)


@contextlib.contextmanager
def record_modality(model: torch.nn.Module, pad_id: Optional[int] = None) -> Iterator[Optional[ModalityCounts]]:
    """Count, by modality, the routing of every forward of the vision `model` inside the block (token ids
    (B, T), as rows; see token_kinds for pad_id). Yields None, and counts nothing, for a text-only model or
    one without stacked MoE layers."""
    v = model.config.vision
    layers = stacked_moe_layers(model)
    if v.vision_enabled and not layers and model.config.moe_layer_ids():
        log_once(log, "modality_deepspeed", "per-modality expert load is not measured with moe_backend=%s (DeepSpeed's "
                 "gate is not recomputed): use moe_backend=auto, torch or triton for it", model.config.moe.moe_backend)
    if not v.vision_enabled or not layers:
        yield None
        return
    rec = ModalityCounts([i for i, _ in layers], model.config.moe.num_experts)
    E = rec.counts.shape[2]
    kinds: dict[str, torch.Tensor] = {}

    def observe(l: int, ids: torch.Tensor, topk_ids: torch.Tensor) -> None:
        if l == 0:  # the first MoE layer of a forward: classify its tokens once
            kinds["flat"] = token_kinds(ids, v.image_token_id, pad_id).reshape(-1)  # (N,)
        k = kinds["flat"].unsqueeze(1).expand_as(topk_ids)  # (N, K): the kind of each assignment
        keep = k >= 0
        idx = (k[keep] * E + topk_ids[keep]).cpu()  # (assignments,) modality-major
        rec.counts[:, l] += torch.bincount(idx, minlength=2 * E).view(2, E)

    with routing_recorder(model, layers, observe):
        yield rec


def run_batches(model: torch.nn.Module, batches: Iterable) -> int:
    """Forward `model` over `batches` in eval mode under no_grad (its mode restored after): each batch token
    ids x (B, T), or a loader's (x, y) / (x, y, images) with images (M, 3, S, S) or None. Returns the count."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                x, _, images = (batch, None, None) if torch.is_tensor(batch) else split_batch(batch)
                model(x.to(device), images=None if images is None else images.to(device))
                seen += 1
    finally:
        model.train(was_training)
    return seen


def modality_counts(model: torch.nn.Module, batches: Iterable, pad_id: Optional[int] = None) -> torch.Tensor:
    """(2, L, E) int64 per-modality counts (record_modality) over image-text `batches` (as run_batches takes
    them). ValueError for a text-only model or one without stacked MoE layers."""
    with record_modality(model, pad_id) as rec:
        if rec is None:
            raise ValueError(f"per-modality expert load needs a vision model with stacked MoE layers "
                             f"(vision_enabled={model.config.vision.vision_enabled}, moe_backend="
                             f"{model.config.moe.moe_backend!r}, MoE blocks {model.config.moe_layer_ids()})")
        run_batches(model, batches)
    return rec.counts


# ----------------------------------------------------------------------------- telemetry

def modality_shares(counts: torch.Tensor) -> torch.Tensor:
    """counts (2, L, E) -> (2, L, E) float64: each modality's share of a layer's assignments per expert
    (a row sums to 1; all 0 where the modality has no token)."""
    c = counts.double()
    return c / c.sum(dim=2, keepdim=True).clamp_min(1)


def modality_metrics(counts: torch.Tensor, blocks: list[int]) -> dict[str, float]:
    """counts (2, L, E) -> the monitor values of the module docstring, keyed by name."""
    total = counts.sum(dim=2, keepdim=True)  # (2, L, 1)
    share = modality_shares(counts)  # (2, L, E)
    m: dict[str, float] = {}
    tvs = []
    for l, i in enumerate(blocks):
        for mod, name in enumerate(MODALITIES):
            if total[mod, l, 0] > 0:
                for j in range(share.shape[2]):
                    m[f"moe_modality_share/layer_{i}_{name}_expert_{j}"] = share[mod, l, j].item()
        if total[0, l, 0] > 0 and total[1, l, 0] > 0:
            tv = 0.5 * (share[0, l] - share[1, l]).abs().sum().item()
            m[f"moe/layer_{i}/modality_tv"] = tv
            tvs.append(tv)
    if tvs:
        m["moe/modality_tv_mean"], m["moe/modality_tv_max"] = sum(tvs) / len(tvs), max(tvs)
    return m


def record_eval_modality(run: "Run"):
    """record_modality for a training run's model, padding = its tokenizer's <|endoftext|> after another."""
    return record_modality(run.model, getattr(run.tokenizer, "eot_id", None))


def modality_load(run: "Run", rec: Optional[ModalityCounts]) -> Optional[dict[str, float]]:
    """The counts of a record_modality block summed over every rank (collective: call it on all ranks, each
    having recorded its own val batches) -> modality_metrics; None for a text-only run."""
    if rec is None:
        return None
    from blues.train.distributed import all_reduce
    total = all_reduce(rec.counts.to(run.dist.device)).cpu()  # int64 sums: exact
    return modality_metrics(total, rec.blocks)


def modality_events(metrics: Optional[dict[str, float]], step: int) -> list[tuple[str, Optional[float], int]]:
    """modality_metrics as monitor events (none for a text-only run)."""
    return [(k, v, step) for k, v in (metrics or {}).items()]


def format_modality(metrics: dict[str, float], step: int) -> str:
    """The console line: per MoE layer, the image-text total variation and the expert image tokens use most."""
    parts = []
    for k, tv in metrics.items():
        if k.startswith("moe/layer_") and k.endswith("/modality_tv"):
            i = k.split("/")[1][len("layer_"):]
            pre = f"moe_modality_share/layer_{i}_image_expert_"
            img = {int(n[len(pre):]): v for n, v in metrics.items() if n.startswith(pre)}
            top = max(img, key=lambda j: (img[j], -j))
            parts.append(f"block {i} tv {tv:.2f} (image top expert {top} {100 * img[top]:.0f}%)")
    return f"step {step}: expert load image vs text: " + ("; ".join(parts) or "no image or no text tokens")


def modality_table(counts: torch.Tensor, blocks: list[int]) -> str:
    """Markdown: per MoE layer, each expert's share of the image tokens' and of the text tokens' top-k
    assignments, their difference, and the experts image tokens prefer (image share above text share, most
    first), for blues-experts report's top_tokens.md. counts (2, L, E), m 0 image, 1 text."""
    metrics = modality_metrics(counts, blocks)
    share = modality_shares(counts)  # (2, L, E)
    n_img, n_txt = (int(counts[m, 0].sum()) for m in (0, 1))
    lines = ["# Image tokens and text tokens", "",
             f"Per MoE layer and expert: the share of the image tokens' top-k assignments ({n_img} in each layer) and "
             f"of the text tokens' ({n_txt}; padding left out) on the held-out batches; tv is the total-variation "
             "distance between the two (0 the same experts, 1 disjoint ones).", ""]
    for l, block in enumerate(blocks):
        tv = metrics.get(f"moe/layer_{block}/modality_tv")
        diff = share[0, l] - share[1, l]  # (E,)
        prefer = [e for e in sorted(range(diff.numel()), key=lambda e: (-diff[e].item(), e)) if diff[e] > 0]
        lines += [f"## block {block}", "",
                  f"tv {'-' if tv is None else f'{tv:.3f}'}; image tokens prefer experts "
                  f"{', '.join(map(str, prefer)) or '(none)'}", "",
                  "| expert | image | text | image - text |", "| ---: | ---: | ---: | ---: |"]
        for e in range(diff.numel()):
            lines.append(f"| {e} | {100 * share[0, l, e]:.1f}% | {100 * share[1, l, e]:.1f}% | {100 * diff[e]:+.1f} |")
        lines.append("")
    return "\n".join(lines)
