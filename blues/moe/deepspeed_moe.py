"""moe_backend="deepspeed": DeepSpeed's expert-parallel `deepspeed.moe.layer.MoE` behind the Blues
MoE interface (forward(x) -> blues.moe.layer.MoEOutput), plus conversion of its expert weights to and
from the stacked layout that blues.moe, save_pretrained and from_pretrained use.

Shapes: B batch, T tokens, N = B*T, D width, E experts (global), E_loc = E / ep_size local experts,
K top-k, F expert hidden size.

Parameter names (relative to the block's `mlp`):
    moe.deepspeed_moe.gate.wg.weight                           (E, D)  -> router.weight
    moe.deepspeed_moe.experts.deepspeed_experts.<i>.w_gate     (D, F)  -> experts.w_gate[g]  (E, D, F)
    moe.deepspeed_moe.experts.deepspeed_experts.<i>.w_up       (D, F)  -> experts.w_up[g]    (E, D, F)
    moe.deepspeed_moe.experts.deepspeed_experts.<i>.w_down     (F, D)  -> experts.w_down[g]  (E, F, D)
    shared.w_{gate,up,down}.weight                              same names in both layouts
with g = ep_rank * E_loc + i. Expert-parallel groups are consecutive ranks (DeepSpeed's layout
with tensor parallelism 1), so ep_rank = global_rank % ep_size.

Semantics, against the stacked backends (blues.moe.MoE):
- Same: softmax router in fp32 on a bias-free linear gate; top-k selection; the selected weights
  renormalised to sum to 1 for k >= 2; the capacity is MoEConfig.capacity(N), handed to DeepSpeed's
  gate as its min_capacity with capacity_factor 0 (its own float32 ceil((N / E) * cf * K) disagrees
  with the exact one at rounding edges); capacity_factor=None drops nothing (DeepSpeed's
  drop_tokens=False); the aux loss and the z-loss
  (both recomputed here from the gate's input with Blues' formulas, see below); shared experts;
  expert dropout.
- aux_loss: DeepSpeed's own l_aux is not used. Its top-2 form counts only first choices and scales
  by E^2 (mean instead of sum); Blues' is E * sum_e f_e * P_e over all N*K assignments before the
  capacity cut. We recompute Blues' loss from DeepSpeed's exp_counts (assignments before the
  capacity cut) and the softmax of the clean gate logits.
- z_loss: mean squared logsumexp of the clean gate logits (the stacked backend takes it on the
  noisy logits in training; equal when router_noise_std=0 or in eval).
- Router noise differs: Blues adds N(0, router_noise_std^2) to the logits before selection and
  weighting. DeepSpeed has no such option; router_noise_std > 0 maps to its closest policy:
  k=1 -> noisy_gate_policy='RSample' (Gumbel noise on the selection only), k=2 ->
  top2_2nd_expert_sampling (Gumbel noise on the second choice only), k>2 -> no noise (logged once).
  The selected weights always come from the clean softmax.
- Dropping under a capacity: Blues keeps the earliest tokens of each expert, first and second
  choices mixed in token order. DeepSpeed's top-1 and top-2 keep by position too but fill every
  first choice before any second choice (use_rts=False here, so no random token selection);
  its k>2 gate keeps the highest-probability assignments. min_capacity=1, as in Blues.
- Not available: router_score_func='sigmoid'; norm_topk_prob=False with k >= 2 (DeepSpeed always
  renormalises); norm_topk_prob=True with k=1 (DeepSpeed weights a single expert by its
  probability). These raise ValueError naming the field.
- DeepSpeed refuses its MoE under ZeRO stage 3; use moe_backend=torch|triton there.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from blues.common import log_once
from blues.config import BluesConfig
from blues.moe.layer import MoEOutput, build_shared_experts, shared_experts_output
from blues.moe.routing import forced_targets

log = logging.getLogger(__name__)

DS_EXPERT_RE = re.compile(r"^(?P<prefix>.*)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\."
                          r"(?P<i>\d+)\.(?P<w>w_gate|w_up|w_down)$")
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def check_deepspeed_moe_config(config: BluesConfig) -> None:
    """Raise ValueError for router settings DeepSpeed's gate cannot reproduce."""
    m = config.moe
    if m.router_score_func != "softmax":
        raise ValueError(f"router_score_func={m.router_score_func!r} is not available with moe_backend='deepspeed' "
                         "(DeepSpeed's gate is softmax only): use router_score_func=softmax or moe_backend=torch")
    if m.top_k == 1 and m.norm_topk_prob:
        raise ValueError("norm_topk_prob=True with top_k=1 is not available with moe_backend='deepspeed' (DeepSpeed's "
                         "top-1 gate weights the expert by its probability): set norm_topk_prob=false or use "
                         "moe_backend=torch")
    if m.top_k > 1 and not m.norm_topk_prob:
        raise ValueError(f"norm_topk_prob=False with top_k={m.top_k} is not available with moe_backend='deepspeed' "
                         "(DeepSpeed always renormalises the selected weights): set norm_topk_prob=true or use "
                         "moe_backend=torch")


def ep_rank_of(global_rank: int, ep_size: int) -> int:
    """Rank inside the expert-parallel group: DeepSpeed groups consecutive ranks (tensor parallel 1)."""
    return global_rank % ep_size


def _global_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class SwiGLUExpert(nn.Module):
    """One SwiGLU expert in the stacked layout's orientation: down(silu(x @ w_gate) * (x @ w_up))."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(d_model, hidden))  # (D, F)
        self.w_up = nn.Parameter(torch.empty(d_model, hidden))  # (D, F)
        self.w_down = nn.Parameter(torch.empty(hidden, d_model))  # (F, D)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        h = F.silu(x @ self.w_gate) * (x @ self.w_up)  # (..., F)
        if self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout)
        return h @ self.w_down


class DeepSpeedMoE(nn.Module):
    """Blues MoE layer on deepspeed.moe.layer.MoE; experts split over config.train.ep_size ranks."""

    def __init__(self, config: BluesConfig):
        super().__init__()
        from deepspeed.moe.layer import MoE as _DSMoE

        check_deepspeed_moe_config(config)
        m = config.moe
        D, Fh, E, K = config.model.n_embd, m.expert_ffn_size, m.num_experts, m.top_k
        self.cfg = m
        self.num_experts = E
        self.ep_size = config.train.ep_size
        self.num_local_experts = E // self.ep_size
        noise = m.router_noise_std > 0
        if noise and K > 2:
            log_once(log, ("ds-noise", K),
                     "moe_backend=deepspeed: DeepSpeed has no router noise for top_k=%d; router_noise_std ignored", K)
        self.moe = _DSMoE(
            hidden_size=D,
            expert=SwiGLUExpert(D, Fh, m.expert_dropout),
            num_experts=E,
            ep_size=self.ep_size,
            k=K,
            # The capacity is set per forward from MoEConfig.capacity (see _set_capacity).
            capacity_factor=0.0,
            eval_capacity_factor=0.0,
            min_capacity=1,
            use_residual=False,
            noisy_gate_policy="RSample" if (noise and K == 1) else None,
            drop_tokens=m.capacity_factor is not None,
            use_rts=False,
            top2_2nd_expert_sampling=noise and K == 2,
        )
        self._noise_top2 = noise and K == 2
        self.shared, self.shared_gate = build_shared_experts(m, D)
        self._init_local_experts(config)
        self._gate_seen: Optional[tuple] = None
        self.forced_skew: Optional[float] = None
        self._real_gate_input: Optional[torch.Tensor] = None
        gate = self.moe.deepspeed_moe.gate
        gate.register_forward_pre_hook(self._force_gate_input)
        gate.register_forward_hook(self._capture_gate)

    @torch.no_grad()
    def _init_local_experts(self, config: BluesConfig) -> None:
        # Draw the full (E, ...) stacks on every rank (same seed, same stream) and keep this rank's
        # slice: global expert g gets the same values whatever ep_size, and no two experts are copies
        # (DeepSpeed deep-copies one template expert E_loc times).
        std = config.model.init_std
        resid_std = std / (2 * config.model.n_layer) ** 0.5
        D, Fh, E = config.model.n_embd, config.moe.expert_ffn_size, self.num_experts
        full = {"w_gate": torch.randn(E, D, Fh) * std, "w_up": torch.randn(E, D, Fh) * std,
                "w_down": torch.randn(E, Fh, D) * resid_std}
        first = ep_rank_of(_global_rank(), self.ep_size) * self.num_local_experts
        for i, expert in enumerate(self.local_experts()):
            for w in EXPERT_WEIGHTS:
                getattr(expert, w).copy_(full[w][first + i])

    def local_experts(self) -> list[SwiGLUExpert]:
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)

    @property
    def router_weight(self) -> nn.Parameter:
        return self.moe.deepspeed_moe.gate.wg.weight  # (E, D)

    def set_forced_routing(self, skew: Optional[float]) -> None:
        """Part of the forced-routing protocol (blues.moe.routing): route like the worst allowed
        imbalance for `skew` of the tokens from the next forward on; None restores real routing."""
        self.forced_skew = skew

    def _set_capacity(self, num_tokens: int) -> None:
        """DeepSpeed's gate computes max(ceil((N / E) * cf * K) in float32, min_capacity); with cf = 0 it
        uses min_capacity, which gets the one capacity definition (clamped to N: no expert can get
        more than N of a token's distinct choices, and DeepSpeed's top-1 gate asserts N >= it)."""
        cap = self.cfg.capacity(num_tokens)
        if cap is not None:
            self.moe.deepspeed_moe.gate.min_capacity = min(cap, num_tokens)

    def _force_gate_input(self, module, args):
        """Forced routing on DeepSpeed's gate: shift each forced token's gate input x_i by a vector u_i
        with W u_i = +1 on its target experts and -1 elsewhere (u from the pseudo-inverse of the router
        weight W (E, D), E <= D), scaled to dominate. _capture_gate then hands the aux/z-loss
        recomputation the real input, so only the choice of experts is forced."""
        if self.forced_skew is None:
            return None
        x = args[0]  # (N, D)
        N, E, K = x.shape[0], self.num_experts, self.cfg.top_k
        forced, targets = forced_targets(N, E, K, self.cfg.capacity(N), self.forced_skew)
        with torch.no_grad():
            W = self.router_weight.detach().float()  # (E, D)
            t = -torch.ones(N, E, device=x.device)
            t.scatter_(1, targets.to(x.device), 1.0)  # (N, E): +1 on the targets, -1 elsewhere
            u = t @ torch.linalg.pinv(W).T  # (N, D): W u_i = t_i
            scale = 100.0 * (x.detach().float().abs().amax() * W.abs().sum(1).amax() + 1.0)
            shift = (u * scale * forced.to(x.device).unsqueeze(1)).to(x.dtype)
        self._real_gate_input = x
        return (x + shift,) + tuple(args[1:])

    def _capture_gate(self, module, args, output) -> None:
        # TopKGate(input, used_token, sparse_routes=True, use_tutel) returns
        # (l_aux, capacity, E, indices (K, N) int32 with -1 for dropped, locations, gates, exp_counts).
        gate_in = self._real_gate_input if self._real_gate_input is not None else args[0]
        self._real_gate_input = None
        self._gate_seen = (gate_in, output[3], output[6])

    def forward(self, x: torch.Tensor) -> MoEOutput:
        B, T, D = x.shape
        E, K = self.num_experts, self.cfg.top_k
        self._gate_seen = None
        self._set_capacity(B * T)
        # DeepSpeed samples the second expert whenever this is set, eval included; Blues adds noise in
        # training only.
        self.moe.deepspeed_moe.gate.top2_2nd_expert_sampling = self._noise_top2 and self.training
        out, _ds_l_aux, _ = self.moe(x)  # (B, T, D)
        assert self._gate_seen is not None, "DeepSpeed's gate did not run"
        gate_in, indices, exp_counts = self._gate_seen  # (N, D), (K, N), (E,)
        self._gate_seen = None
        N = gate_in.shape[0]
        logits = F.linear(gate_in.float(), self.router_weight.float())  # (N, E) clean logits, fp32
        probs = torch.softmax(logits, dim=-1)  # (N, E)
        f = exp_counts.float() / (N * K)  # (E,) fraction of assignments before the capacity cut
        aux = E * (f * probs.mean(dim=0)).sum()
        lse = torch.logsumexp(logits, dim=-1)  # (N,)
        zl = (lse * lse).mean()
        kept = indices.reshape(-1).long()
        counts = torch.bincount(kept[kept >= 0], minlength=E)  # (E,)
        dropped = (kept < 0).sum()
        if self.cfg.routed_scaling_factor != 1.0:  # the combine is linear in the weights: scaling its output is exact
            out = out * self.cfg.routed_scaling_factor
        if self.shared is not None:
            out = out + shared_experts_output(self.shared, self.shared_gate, x)
        selected = exp_counts.to(device=counts.device, dtype=counts.dtype)  # (E,) before the capacity cut
        return MoEOutput(out, aux, zl, counts, dropped, selected)


# ---------------------------------------------------------------------------------------------
# Conversion to and from the stacked layout
# ---------------------------------------------------------------------------------------------

def _ep_group(layer: DeepSpeedMoE):
    """(group, ep_rank) of this layer's experts; (None, 0) when not distributed or ep_size 1."""
    if layer.ep_size == 1 or not torch.distributed.is_initialized():
        return None, 0
    from deepspeed.utils import groups
    name = layer.moe.expert_group_name
    return groups._get_expert_parallel_group(name), groups._get_expert_parallel_rank(name)


def stacked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every DeepSpeedMoE layer in the stacked layout, every expert present.

    Collective under expert parallelism: every rank must call it (each contributes its experts
    through an all_gather in its expert-parallel group). Tensors are detached CPU copies.
    Parameters must be whole (ZeRO stage 0-2; DeepSpeed's MoE does not run under stage 3).
    """
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, DeepSpeedMoE)}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if any(name.startswith(p + ".moe.") for p in layers):
            continue
        out[name] = t.detach().cpu()
    for prefix, layer in layers.items():
        out[f"{prefix}.router.weight"] = layer.router_weight.detach().cpu()
        group, _ = _ep_group(layer)
        for w in EXPERT_WEIGHTS:
            local = torch.stack([getattr(e, w).detach() for e in layer.local_experts()])  # (E_loc, ...)
            if group is not None:
                parts = [torch.empty_like(local) for _ in range(layer.ep_size)]
                torch.distributed.all_gather(parts, local.contiguous(), group=group)
                local = torch.cat(parts)  # (E, ...) in ep-rank order = global expert order
            out[f"{prefix}.experts.{w}"] = local.cpu()
    return out


@torch.no_grad()
def load_stacked_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a stacked-layout state dict (as save_pretrained writes it) into a model with
    DeepSpeedMoE layers: each rank takes its own experts. Names and shapes are checked first."""
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, DeepSpeedMoE)}
    persistent = set(model.state_dict())
    own = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n in persistent}
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    problems = []
    for prefix, layer in layers.items():
        _, ep_rank = _ep_group(layer)
        if layer.ep_size > 1 and not torch.distributed.is_initialized():
            ep_rank = ep_rank_of(_global_rank(), layer.ep_size)
        n = layer.num_local_experts
        key = f"{prefix}.router.weight"
        if key not in state:
            problems.append(f"missing {key!r}")
        else:
            targets[key] = (layer.router_weight, state[key])
        for w in EXPERT_WEIGHTS:
            key = f"{prefix}.experts.{w}"
            if key not in state:
                problems.append(f"missing {key!r}")
                continue
            full = state[key]
            if full.shape[0] != layer.num_experts:
                problems.append(f"{key!r} holds {full.shape[0]} experts, the model has {layer.num_experts}")
                continue
            for i, e in enumerate(layer.local_experts()):
                targets[f"{key}[{ep_rank * n + i}]"] = (getattr(e, w), full[ep_rank * n + i])
    moe_prefixes = tuple(p + ".moe." for p in layers)
    for name, t in own.items():
        if name.startswith(moe_prefixes):
            continue
        if name == "lm_head.weight" and name not in state and "tok_emb.weight" in state:
            continue  # tied: stored once as tok_emb.weight
        if name not in state:
            problems.append(f"missing {name!r}")
        else:
            targets[name] = (t, state[name])
    for key, (dst, src) in targets.items():
        if tuple(dst.shape) != tuple(src.shape):
            problems.append(f"{key!r} has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
    if problems:
        raise ValueError("cannot load stacked weights: " + "; ".join(problems[:8]))
    for dst, src in targets.values():
        dst.copy_(src)


def num_local_expert_params(model: nn.Module) -> int:
    """Elements of the expert weights this rank holds (E_loc experts per DeepSpeedMoE layer)."""
    return sum(p.numel() for n, p in model.named_parameters() if DS_EXPERT_RE.match(n))

