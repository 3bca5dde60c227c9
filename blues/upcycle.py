"""Sparse upcycling: a dense Blues model becomes an MoE whose experts start as copies of its MLPs.

Shapes: L layers, D width, F the dense MLP's hidden size (each expert's too), E experts, K top-k.

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints" (ICLR
2023); Megatron-LM's --moe-use-upcycling. Every dense SwiGLU layer becomes an MoE layer of E experts,
each a copy of that layer's MLP (w_gate, w_up (E, D, F) from the dense (F, D) weights transposed;
w_down (E, F, D) from (D, F)); attention, norms and embeddings are copied as they are; the routers
start from Blues' own initialisation (normal, init_std), as Megatron's do.

At step 0 the MoE computes exactly the dense model's function: with norm_topk_prob the k routing
weights of a token sum to 1, every expert is the same MLP, so sum_k w_k * MLP(x) = MLP(x), whatever
the router chooses (router noise included). That needs routed_scaling_factor = 1, no shared expert,
no capacity drop, and expert_dropout at the dense dropout: upcycle() sets them.

Two ways to make the copies differ (otherwise they only drift apart through the router's choices):
  noise_std   Gaussian noise of noise_std times each weight matrix's own standard deviation, added to
              every expert's copy independently (relative, so one value fits every layer's scale)
  drop_ratio  Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): in each expert, a random
              share r of the F hidden units is re-initialised: those columns of w_gate and w_up and rows
              of w_down are drawn from a normal with the mean and standard deviation of the original
              matrix; the rest stay exact copies.
With either, the step-0 equality no longer holds (by design).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from blues.model import Blues


class UpcycleResult(NamedTuple):
    model: Blues
    layers: list[int]  # the blocks that became MoE layers
    reinitialised: int  # hidden units re-initialised per expert (Drop-Upcycling), 0 without


def check_upcycle_args(num_experts: int, top_k: int, noise_std: float, drop_ratio: float) -> None:
    """ValueError naming the argument, for values upcycle() cannot take."""
    for name, v in (("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} is invalid: expected a positive integer")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is invalid: must be <= num_experts={num_experts}")
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std={noise_std!r} is invalid: expected a number >= 0 (0 = exact copies)")
    if not (isinstance(drop_ratio, (int, float)) and 0 <= drop_ratio <= 1):
        raise ValueError(f"drop_ratio={drop_ratio!r} is invalid: expected a share of the hidden units in [0, 1]")


def dense_layers_of(model: Blues) -> list[int]:
    """The blocks whose MLP is dense; ValueError when the model has MoE layers already."""
    cfg = model.config
    moe = cfg.moe_layer_ids()
    if moe:
        raise ValueError(f"the model has MoE layers already (blocks {moe}): upcycling starts from a dense model "
                         f"(every layer a SwiGLU MLP, num_dense_layers={cfg.model.n_layer})")
    return list(range(cfg.model.n_layer))


def _expert_copies(w: torch.Tensor, E: int, noise_std: float, gen: torch.Generator) -> torch.Tensor:
    """(E, *w.shape) copies of w, plus noise_std * std(w) Gaussian noise per copy."""
    out = w.unsqueeze(0).repeat(E, *([1] * w.dim()))
    if noise_std > 0:
        out += noise_std * w.std() * torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return out


def _drop_upcycle(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, dense: dict, n: int,
                  gen: torch.Generator) -> None:
    """Re-initialise n random hidden units of every expert, in place: columns of w_gate, w_up (E, D, F)
    and rows of w_down (E, F, D), from normals with the mean and std of the dense matrices (`dense`:
    w_gate, w_up (D, F), w_down (F, D))."""
    E, _, F = w_gate.shape
    for e in range(E):
        idx = torch.randperm(F, generator=gen)[:n]
        for stacked, src, dim in ((w_gate, dense["w_gate"], 1), (w_up, dense["w_up"], 1), (w_down, dense["w_down"], 0)):
            shape = list(stacked[e].shape)
            shape[dim] = n
            fresh = torch.randn(shape, generator=gen, dtype=stacked.dtype) * src.std() + src.mean()
            stacked[e].index_copy_(dim, idx, fresh)  # dim: F in (D, F) and (F, D)


@torch.no_grad()
def upcycle(model: Blues, num_experts: int, top_k: int, *, noise_std: float = 0.0, drop_ratio: float = 0.0,
            seed: int = 0, overrides: Sequence[str] = ()) -> UpcycleResult:
    """A new fp32 Blues MoE from the dense `model` (see the module docstring). `overrides` are config
    `key=value` strings for the new model (router_noise_std=0, aux_loss_coef=0.01, ...), applied after
    the upcycling ones, as blues-train's; one that breaks the step-0 equality is the caller's choice."""
    check_upcycle_args(num_experts, top_k, noise_std, drop_ratio)
    layers = dense_layers_of(model)
    cfg = model.config
    F = cfg.moe.dense_hidden
    new_cfg = cfg.replace(num_experts=num_experts, top_k=top_k, expert_ffn_size=F, dense_ffn_size=F,
                          num_dense_layers=0, dense_layers=None, moe_layer_freq=1, num_shared_experts=0,
                          norm_topk_prob=True, routed_scaling_factor=1.0, capacity_factor=None,
                          expert_dropout=cfg.model.dropout, balance_bias_rate=cfg.moe.balance_bias_rate,
                          ep_size=1).with_overrides(list(overrides))
    if new_cfg.moe.expert_ffn_size != F or new_cfg.moe.num_experts != num_experts or new_cfg.moe.top_k != top_k:
        raise ValueError("overrides must not change expert_ffn_size, num_experts or top_k: upcycling sets them "
                         "(--num_experts, --top_k; every expert has the dense MLP's hidden size)")
    gen = torch.Generator().manual_seed(seed)
    n_drop = round(drop_ratio * F)
    state = {k: v.float() for k, v in model.export_state_dict().items()}
    with torch.random.fork_rng(devices=[]):  # the routers' init must not move the caller's RNG
        torch.manual_seed(seed)
        moe = Blues(new_cfg)
    fresh = moe.export_state_dict()  # its routers (and anything else a new MoE layer adds) are kept
    for i in layers:
        p = f"blocks.{i}.mlp."
        dense = {name: state.pop(p + name + ".weight").t() for name in ("w_gate", "w_up", "w_down")}
        w_gate = _expert_copies(dense["w_gate"], num_experts, noise_std, gen)  # (E, D, F)
        w_up = _expert_copies(dense["w_up"], num_experts, noise_std, gen)  # (E, D, F)
        w_down = _expert_copies(dense["w_down"], num_experts, noise_std, gen)  # (E, F, D)
        if n_drop:
            _drop_upcycle(w_gate, w_up, w_down, dense, n_drop, gen)
        state[p + "experts.w_gate"], state[p + "experts.w_up"], state[p + "experts.w_down"] = w_gate, w_up, w_down
    state = {k: state.get(k, v) for k, v in fresh.items()}
    moe.load_weights(state, source="the upcycled weights")
    moe.tokenizer = model.tokenizer
    return UpcycleResult(moe.to(model.tok_emb.weight.device).train(model.training), layers, n_drop)
