"""The MoE op table: the ops the stacked layer runs, chosen once per (backend, device type).

`MoEOps` names each op by its kernel's name in blues.kernels. `TORCH_OPS` holds the plain-torch
references (the specification, and the CPU path); `TRITON_OPS` the Triton launchers of the same
names (CUDA, or the interpreter under TRITON_INTERPRET=1). `resolve_moe_ops` picks one table for
`moe_backend` on a device, logs an automatic choice once, and caches it.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, NamedTuple

import torch

from blues.common import log_once
from blues.kernels import moe_grouped_down_combine as _down
from blues.kernels import moe_grouped_gemm as _gemm
from blues.kernels import moe_grouped_swiglu as _swiglu
from blues.kernels import moe_permute as _perm
from blues.kernels import moe_route as _route
from blues.kernels import triton_available

log = logging.getLogger(__name__)


class MoEOps(NamedTuple):
    moe_route: Callable  # (logits (N, E) fp32, K, ...) -> RouteOutput
    moe_permute_indices: Callable  # (topk_ids (N, K), E) -> PermuteIndices
    moe_grouped_swiglu: Callable  # (x (N, D), offsets (E+1,), w_gate, w_up (E, D, F), slots (S,), K) -> (S, F)
    moe_grouped_down_combine: Callable  # (h (S, F), offsets, w_down (E, F, D), inverse (S,), w (N, K)) -> (N, D)
    # Expert parallelism (blues.moe.expert_parallel) sends the permuted rows out, runs the received rows'
    # down projection alone (their weights are applied at home) and combines what comes back:
    moe_permute: Callable  # (x (N, D), sorted_slots (S,), K) -> (S, D)
    moe_grouped_gemm: Callable  # (h (R, F), offsets (E+1,), w_down (E, F, D)) -> (R, D)
    moe_unpermute_combine: Callable  # (y (S, D), inverse (S,), w (N, K)) -> (N, D), fp32 sums


TORCH_OPS = MoEOps(
    moe_route=_route.moe_route_ref,
    moe_permute_indices=_perm.moe_permute_indices_ref,
    moe_grouped_swiglu=_swiglu.moe_grouped_swiglu_ref,
    moe_grouped_down_combine=_down.moe_grouped_down_combine_ref,
    moe_permute=_perm.moe_permute_ref,
    moe_grouped_gemm=_gemm.moe_grouped_gemm_ref,
    moe_unpermute_combine=_perm.moe_unpermute_combine_ref,
)

TRITON_OPS = MoEOps(
    moe_route=_route.moe_route,
    moe_permute_indices=_perm.moe_permute_indices,
    moe_grouped_swiglu=_swiglu.moe_grouped_swiglu,
    moe_grouped_down_combine=_down.moe_grouped_down_combine,
    moe_permute=_perm.moe_permute,
    moe_grouped_gemm=_gemm.moe_grouped_gemm,
    moe_unpermute_combine=_perm.moe_unpermute_combine,
)


@functools.lru_cache(maxsize=None)
def _resolve(requested: str, device_type: str) -> MoEOps:
    if requested == "torch":
        return TORCH_OPS
    can_triton = triton_available(torch.device(device_type))
    if requested == "triton":
        if not can_triton:
            raise ValueError(f"moe_backend='triton' needs CUDA (or TRITON_INTERPRET=1 for CPU testing), got a "
                             f"{device_type} tensor; use moe_backend='torch' or 'auto'")
        return TRITON_OPS
    assert requested == "auto", requested
    if device_type == "cuda" and can_triton:
        log_once(log, ("moe", "triton"), "MoE backend: triton kernels (CUDA)")
        return TRITON_OPS
    log_once(log, ("moe", device_type), "MoE backend: torch (%s)",
             "no CUDA" if device_type != "cuda" else "Triton unavailable")
    return TORCH_OPS


def resolve_moe_ops(requested: str, device: torch.device) -> MoEOps:
    """The op table for `requested` ('auto' | 'torch' | 'triton') on `device`; chosen once per device type.

    'triton' on a device where Triton cannot run is a ValueError naming the fix."""
    return _resolve(requested, torch.device(device).type)
