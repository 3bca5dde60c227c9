"""The Blues MoE layer and everything that chooses how it runs.

    layer.py          MoE (stacked experts, router, capacity), SwiGLU, Experts, MoEOutput
    ops.py            MoEOps: the op table (torch references or Triton kernels), chosen once per device
    routing.py        forced_routing: worst-case routing for the memory probe, on every backend
    expert_parallel.py  ep_size > 1 on the stacked layer: DeepSpeed's groups, the all-to-all exchange,
                      the split plan, marking the experts for DeepSpeed's engine
    deepspeed_moe.py  moe_backend=deepspeed: DeepSpeed's expert-parallel MoE behind the same interface

deepspeed_moe imports DeepSpeed only when such a layer is built; it is not imported here.
"""
from blues.moe.layer import Experts, MoE, MoEOutput, SwiGLU
from blues.moe.ops import TORCH_OPS, TRITON_OPS, MoEOps, resolve_moe_ops
from blues.moe.routing import forced_routing

__all__ = ["Experts", "MoE", "MoEOutput", "SwiGLU", "MoEOps", "TORCH_OPS", "TRITON_OPS",
           "resolve_moe_ops", "forced_routing"]
