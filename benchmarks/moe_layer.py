"""MoE layer: Blues (Triton and torch paths) against DeepSpeed's MoE layer and a naive expert loop.

    python benchmarks/moe_layer.py                    # CPU: fp32, shapes C1 and C2 below
    python benchmarks/moe_layer.py --device cuda      # GPU: bf16, shapes S1, S2, S3a, S3b, CUDA events

Every implementation computes the same thing from the same tensors: the routed SwiGLU experts of one
MoE layer, out[t] = sum_k w[t,k] * down_e(silu(x[t] @ gate_e) * (x[t] @ up_e)), top-k of a softmax over
precomputed router logits, weights renormalised over the k choices. The router's own linear layer is
left out of all of them; its logits are an input (requires_grad, so the routing weights backpropagate).

Implementations (--impls):
  blues_triton      blues/moe.py's op sequence on the Triton kernels (CUDA only): route, permute_indices,
                    moe_grouped_swiglu (gather + gate + up + SwiGLU), moe_grouped_down_combine
  blues_torch       the same op sequence on the torch references: Blues' CPU path
  blues_triton_5ops, blues_torch_5ops  the unfused composition blues/moe.py ran first: moe_permute, three
                    moe_grouped_gemm (gate, up, down) with torch's silu and product, moe_unpermute_combine
  ds_nodrop         deepspeed.moe.layer.MoE, drop_tokens=False: every expert padded to the busiest one
  ds_cf1.0, ds_cf1.25  the same with capacity factor 1.0 / 1.25: DROPS TOKENS (different output)
  naive             a Python loop over experts, each gathering its tokens and adding back its outputs
  grouped_mm        torch._grouped_mm, torchtitan's and DeepSpeed AutoEP's grouped-experts path: routing
                    in torch, rows sorted by expert (argsort), gate/up/down as three grouped GEMMs (int32
                    cumulative end offsets per expert), combine by gather; bf16 on sm_90 runs CUTLASS, other
                    dtypes or devices torch's fallback (a loop of mm that reads the offsets on the host).
                    Where it cannot run here (no torch._grouped_mm, or it raises on this device, dtype or
                    width: sm_90 wants 16-byte-aligned strides) it is reported unavailable, not replaced
  floor             dense GEMMs doing the same FLOPs (6*T*K*D*F forward, 12*T*K*D*F backward) on
                    preallocated buffers: the floor every ratio is read against

How DeepSpeed gets the precomputed routing: its MOELayer calls `self.gate(input, used_token, True,
use_tutel)` and uses only what the gate returns. We replace `deepspeed_moe.gate` with a module that
ignores `input` and returns DeepSpeed's own gating function (sharded_moe.top2gating for k=2,
topkgating for k>2, with sparse_routes=True as TopKGate does) applied to the precomputed logits. So
DeepSpeed's routing, capacity, dispatch, expert loop and combine all run unchanged; only its gate's
linear layer is skipped (as Blues' router is), and top-2's random second-expert sampling is off
(top2_2nd_expert_sampling=False) so both layers route identically. DeepSpeed's layer needs
torch.distributed: a single-process gloo group.

Routing (--routing): `balanced`: each token's K experts are a uniform random draw without replacement
(counts are balanced up to sampling noise); `zipf`: a draw without replacement from p_e ~ 1/(e+1)^s
(s = --zipf_s, default 1.2), the skew real routers show early in training. Logits are Gumbel noise plus
log p, so their top-k is exactly that draw.

Timing: all implementations are measured side by side in one run, round-robin (every repetition times
each implementation once), and each figure is the median: forward (building the autograd graph, as in
training), backward (of a forward run untimed just before), and forward+backward in one region. CPU:
time.perf_counter; CUDA: CUDA events, 10 warm-ups, 50 repetitions. Peak memory: CUDA
max_memory_allocated during one forward+backward, minus what was allocated before; CPU the peak of
live tensor bytes over one forward+backward from torch.profiler's memory timeline, minus the bytes
live at its start. Every measurement is a JSON row in benchmarks/results/moe_layer_{cpu,cuda}.jsonl.

Correctness: before timing, every implementation's output is compared with the fp32 torch reference on
the same inputs (max |out - ref| / max |ref|, OUTPUT_TOL below); a wrong output marks its rows
(`output_ok: false`) and the run exits 1 after writing them. `--inject_wrong IMPL` (for
tests/test_gpu_check.py only) scales IMPL's output by 1.1 to show that a wrong output fails the run.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write_rows  # noqa: E402

from blues.kernels import moe_grouped_down_combine as down  # noqa: E402
from blues.kernels import moe_grouped_gemm as gg  # noqa: E402
from blues.kernels import moe_grouped_swiglu as swiglu  # noqa: E402
from blues.kernels import moe_permute as perm  # noqa: E402
from blues.kernels import moe_route as route  # noqa: E402
from blues.kernels.triton_utils import interpret_mode  # noqa: E402


def cpu_pressure() -> Optional[float]:
    """Share of the last 10 s in which some task waited for a CPU (Linux PSI): the other tenants' load."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def environment() -> dict:
    keys = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "TRITON_INTERPRET")
    return {k: os.environ.get(k) for k in keys if os.environ.get(k) is not None}

SHAPES = {
    # name: (T, D, F, E, K)
    "tiny": (64, 48, 40, 8, 2),  # smoke test of the script itself (with TRITON_INTERPRET=1 it runs the Triton path)
    "C1": (4096, 512, 1024, 8, 2),  # CPU, Mixtral-like
    "C2": (4096, 512, 256, 64, 8),  # CPU, DeepSeek-like fine-grained experts
    "S1": (16384, 2048, 1024, 64, 8),
    "S2": (24576, 1536, 256, 128, 8),
    "S3a": (4096, 4096, 14336, 8, 2),  # Mixtral 8x7B layer
    "S3b": (16384, 4096, 14336, 8, 2),
}
CPU_SHAPES = ["C1", "C2"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GPU_SHAPES = ["S1", "S2", "S3a", "S3b"]
ALL_IMPLS = ["blues_triton", "blues_triton_5ops", "blues_torch", "blues_torch_5ops", "grouped_mm", "ds_nodrop",
             "ds_cf1.0", "ds_cf1.25", "naive", "floor"]
# Largest accepted max|got - want| / max|want| against the fp32 torch reference on the same inputs, for
# the layer's output here and for every op's outputs and gradients in benchmarks/gpu_check.py.
# fp32: true fp32 products everywhere (the Triton kernels use input_precision="ieee", torch's TF32 is off):
# only the order of the sums differs (0 to 3e-9 measured at the tiny shape). fp16: the hidden activations
# and the SwiGLU gradients feeding a GEMM are rounded to 11 mantissa bits (2^-11 = 4.9e-4 relative): a few
# of those. bf16: 8 bits (2^-8); 2e-2 is the kernel tests' bf16 tolerance (tests/kernels/test_moe_grouped_gemm.py).
OUTPUT_TOL = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 2e-2}
WRONG_SCALE = 1.1  # --inject_wrong: a 10% error, far outside every tolerance above


# ----------------------------------------------------------------------------------------------
# Problem: inputs shared by every implementation
# ----------------------------------------------------------------------------------------------

def routing_logits(T: int, E: int, routing: str, zipf_s: float, gen: torch.Generator) -> torch.Tensor:
    """(T, E) fp32 CPU logits whose top-k is a draw without replacement from p: uniform (`balanced`)
    or p_e ~ 1/(e+1)^zipf_s (`zipf`). Also forces the routing of benchmarks/ep_throughput.py."""
    if routing == "balanced":
        log_p = torch.zeros(E)
    elif routing == "zipf":
        log_p = -zipf_s * torch.log(torch.arange(1, E + 1, dtype=torch.float32))
    else:
        raise ValueError(f"routing={routing!r} is invalid: expected balanced or zipf")
    gumbel = -torch.log(-torch.log(torch.rand(T, E, generator=gen).clamp(1e-20, 1 - 1e-7)))
    return log_p + gumbel


def make_problem(shape: str, routing: str, dtype: torch.dtype, device: str, zipf_s: float, seed: int = 0) -> dict:
    T, D, Fh, E, K = SHAPES[shape]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = routing_logits(T, E, routing, zipf_s, gen).to(device)  # (T, E) fp32
    x = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype)
    w_gate = (torch.randn(E, D, Fh, generator=gen) / math.sqrt(D)).to(device=device, dtype=dtype)
    w_up = (torch.randn(E, D, Fh, generator=gen) / math.sqrt(D)).to(device=device, dtype=dtype)
    w_down = (torch.randn(E, Fh, D, generator=gen) / math.sqrt(Fh)).to(device=device, dtype=dtype)
    dy = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype)
    counts = torch.bincount(torch.topk(logits, K, dim=-1).indices.flatten().cpu(), minlength=E)
    return dict(shape=shape, routing=routing, T=T, D=D, F=Fh, E=E, K=K, dtype=dtype, device=device,
                logits=logits, x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, dy=dy, counts=counts)


class Impl:
    """One implementation: `forward()` builds the graph from its own leaf tensors and returns the
    layer output; `params()` are the leaves whose .grad a backward fills."""

    name = ""

    def forward(self) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> list:
        raise NotImplementedError


def _leaves(p: dict, *names) -> list:
    return [p[n].detach().clone().requires_grad_() for n in names]


# ----------------------------------------------------------------------------------------------
# Blues: blues/moe.py's op sequence, from the logits on
# ----------------------------------------------------------------------------------------------

def blues_experts(ops, x, logits, w_gate, w_up, w_down, K, fused: bool):
    """blues.moe.MoE.forward after its router linear (capacity_factor=None, eval: no noise, no dropout):
    with `fused` (what blues/moe.py runs) moe_grouped_swiglu and moe_grouped_down_combine; without, the
    five-op composition it ran before (permute, three grouped GEMMs, combine)."""
    E = w_gate.shape[0]
    r = ops.route(logits, K)
    aux = route.load_balancing_loss(r.counts, r.prob_sum, x.shape[0], K)
    zl = route.z_loss(r.lse)
    idx = ops.permute_indices(r.topk_ids, E)
    if fused:
        h = ops.grouped_swiglu(x, idx.expert_offsets, w_gate, w_up, idx.sorted_slots, K)  # (S, F)
        out = ops.grouped_down_combine(h, idx.expert_offsets, w_down, idx.inverse, r.topk_weights)  # (T, D)
        return out, aux, zl
    xp = ops.permute(x, idx.sorted_slots, K)  # (S, D)
    h = F.silu(ops.grouped_gemm(xp, idx.expert_offsets, w_gate)) * ops.grouped_gemm(xp, idx.expert_offsets, w_up)
    y = ops.grouped_gemm(h, idx.expert_offsets, w_down)  # (S, D)
    out = ops.unpermute_combine(y, idx.inverse, r.topk_weights)  # (T, D)
    return out, aux, zl


class _Ops:
    def __init__(self, triton: bool):
        sfx = "" if triton else "_ref"
        self.route = getattr(route, "moe_route" + sfx)
        self.permute_indices = getattr(perm, "moe_permute_indices" + sfx)
        self.permute = getattr(perm, "moe_permute" + sfx)
        self.unpermute_combine = getattr(perm, "moe_unpermute_combine" + sfx)
        self.grouped_gemm = getattr(gg, "moe_grouped_gemm" + sfx)
        self.grouped_swiglu = getattr(swiglu, "moe_grouped_swiglu" + sfx)
        self.grouped_down_combine = getattr(down, "moe_grouped_down_combine" + sfx)


class BluesImpl(Impl):

    def __init__(self, p: dict, triton: bool, fused: bool):
        self.name = f"blues_{'triton' if triton else 'torch'}{'' if fused else '_5ops'}"
        self.ops, self.fused, self.K = _Ops(triton), fused, p["K"]
        self.x, self.logits, self.wg, self.wu, self.wd = _leaves(p, "x", "logits", "w_gate", "w_up", "w_down")

    def forward(self):
        return blues_experts(self.ops, self.x, self.logits, self.wg, self.wu, self.wd, self.K, self.fused)[0]

    def params(self):
        return [self.x, self.logits, self.wg, self.wu, self.wd]


def check_mirror_matches_layer() -> float:
    """blues_experts must be what blues.moe.MoE runs: compare on a small layer fed the same logits."""
    from blues.config import BluesConfig, ModelConfig, MoEConfig
    from blues.moe import MoE
    torch.manual_seed(0)
    cfg = BluesConfig(model=ModelConfig(n_embd=48, n_head=4, num_kv_heads=2),
                      moe=MoEConfig(num_experts=6, top_k=2, expert_ffn_size=40, moe_backend="torch"))
    layer = MoE(cfg).eval()
    for prm in layer.parameters():
        nn.init.normal_(prm, std=0.1)
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        want = layer(x).out.reshape(34, 48)
        logits = F.linear(x.reshape(34, 48).float(), layer.router.weight.float())
        ex = layer.experts
        got = blues_experts(_Ops(triton=False), x.reshape(34, 48), logits, ex.w_gate, ex.w_up, ex.w_down, 2,
                            fused=True)[0]
    return (got - want).abs().max().item()


# ----------------------------------------------------------------------------------------------
# DeepSpeed's layer, fed the precomputed routing through its own gating function
# ----------------------------------------------------------------------------------------------

class SwiGLUExpert(nn.Module):
    """One DeepSpeed expert: the same SwiGLU as Blues' (weights (D, F), (D, F), (F, D))."""

    def __init__(self, D: int, Fh: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(D, Fh))
        self.w_up = nn.Parameter(torch.empty(D, Fh))
        self.w_down = nn.Parameter(torch.empty(Fh, D))

    def forward(self, x):
        return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


class PrecomputedGate(nn.Module):
    """Stands in for deepspeed_moe.gate: DeepSpeed's own gating function on precomputed logits."""

    def __init__(self, k: int, capacity_factor: float, drop_tokens: bool):
        super().__init__()
        self.k, self.capacity_factor, self.drop_tokens = k, capacity_factor, drop_tokens
        self.logits: Optional[torch.Tensor] = None

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        from deepspeed.moe.sharded_moe import top2gating, topkgating
        assert sparse_routes, "DeepSpeed 0.19's MOELayer asks its gate for sparse routes"
        if self.k == 2:
            return top2gating(self.logits, self.capacity_factor, 1, self.drop_tokens, None,
                              top2_2nd_expert_sampling=False, sparse_routes=True)
        assert self.k > 2, "k=1 would need top1gating (not among the benchmark shapes)"
        return topkgating(self.logits, self.k, self.capacity_factor, 1, self.drop_tokens, None, sparse_routes=True)


_DIST_READY = False


def init_single_process_group() -> None:
    global _DIST_READY
    if _DIST_READY:
        return
    import deepspeed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    _DIST_READY = True


class DeepSpeedImpl(Impl):

    def __init__(self, p: dict, capacity_factor: Optional[float]):
        from deepspeed.moe.layer import MoE as DSMoE
        init_single_process_group()
        self.name = "ds_nodrop" if capacity_factor is None else f"ds_cf{capacity_factor}"
        D, Fh, E, K = p["D"], p["F"], p["E"], p["K"]
        drop = capacity_factor is not None
        layer = DSMoE(D, SwiGLUExpert(D, Fh), num_experts=E, ep_size=1, k=K,
                      capacity_factor=capacity_factor or 1.0, eval_capacity_factor=capacity_factor or 1.0,
                      min_capacity=1, drop_tokens=drop, use_rts=False, top2_2nd_expert_sampling=False)
        layer.set_deepspeed_parallelism()
        layer.deepspeed_moe.gate = PrecomputedGate(K, capacity_factor or 1.0, drop)
        with torch.no_grad():
            for e, ex in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
                ex.w_gate.copy_(p["w_gate"][e])
                ex.w_up.copy_(p["w_up"][e])
                ex.w_down.copy_(p["w_down"][e])
        self.layer = layer.to(device=p["device"], dtype=p["dtype"])
        self.x, self.logits = _leaves(p, "x", "logits")

    def forward(self):
        self.layer.deepspeed_moe.gate.logits = self.logits
        return self.layer(self.x)[0]

    def params(self):
        return [self.x, self.logits] + list(self.layer.parameters())


# ----------------------------------------------------------------------------------------------
# Naive loop over experts, and the dense-GEMM floor
# ----------------------------------------------------------------------------------------------

class NaiveImpl(Impl):
    """for each expert: find its tokens, run the SwiGLU on them, index_add the weighted rows back."""

    name = "naive"

    def __init__(self, p: dict):
        self.K = p["K"]
        self.x, self.logits, self.wg, self.wu, self.wd = _leaves(p, "x", "logits", "w_gate", "w_up", "w_down")

    def forward(self):
        probs = torch.softmax(self.logits.float(), dim=-1)
        w, ids = torch.topk(probs, self.K, dim=-1)  # (T, K)
        w = (w / w.sum(-1, keepdim=True)).to(self.x.dtype)
        out = torch.zeros_like(self.x)
        # unbind, not w[e]: indexing a stacked weight writes a full-size zero gradient per expert
        for e, (wg, wu, wd) in enumerate(zip(self.wg.unbind(0), self.wu.unbind(0), self.wd.unbind(0))):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            xe = self.x[tok]
            ye = (F.silu(xe @ wg) * (xe @ wu)) @ wd
            out = out.index_add(0, tok, ye * w[tok, slot, None])
        return out

    def params(self):
        return [self.x, self.logits, self.wg, self.wu, self.wd]


class ImplUnavailable(RuntimeError):
    """An implementation that cannot run on this device, dtype or shape (reported, never replaced)."""


def grouped_mm_unavailable(D: int, Fh: int, dtype: torch.dtype, device: str) -> Optional[str]:
    """Why torch._grouped_mm cannot run the layer's three products here, or None: a forward and backward
    of a two-expert problem with the layer's widths (an empty expert included) on the device."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        x = torch.randn(24, D, device=device, dtype=dtype, requires_grad=True)
        w1 = torch.randn(2, D, Fh, device=device, dtype=dtype, requires_grad=True)
        w2 = torch.randn(2, Fh, D, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([0, 24], dtype=torch.int32, device=device)
        y = torch._grouped_mm(torch._grouped_mm(x, w1, offs=offs), w2, offs=offs)  # (24, D)
        y.backward(torch.randn_like(y))
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return f"torch._grouped_mm raised on {device} {dtype} D={D} F={Fh}: {str(e).splitlines()[0][:200]}"
    return None


class GroupedMMImpl(Impl):
    """torch._grouped_mm as torchtitan's MoE and DeepSpeed AutoEP (deepspeed/moe/ep_experts.py) call it:
    mat_a (S, D_in) rows sorted by expert, mat_b (E, D_in, D_out), offs (E,) int32 cumulative END row of
    each expert (an empty expert repeats the previous end). Counts come from a scatter_add, not bincount,
    which reads its maximum on the host on CUDA."""

    name = "grouped_mm"

    def __init__(self, p: dict):
        why = grouped_mm_unavailable(p["D"], p["F"], p["dtype"], p["device"])
        if why is not None:
            raise ImplUnavailable(why)
        self.K = p["K"]
        self.x, self.logits, self.wg, self.wu, self.wd = _leaves(p, "x", "logits", "w_gate", "w_up", "w_down")

    def forward(self):
        T, D = self.x.shape
        E, K = self.wg.shape[0], self.K
        probs = torch.softmax(self.logits.float(), dim=-1)  # (T, E)
        w, ids = torch.topk(probs, K, dim=-1)  # (T, K)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)  # (S,)
        order = torch.argsort(flat, stable=True)  # (S,) slots in expert order
        counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,)
        xp = self.x[order // K]  # (S, D)
        h = F.silu(torch._grouped_mm(xp, self.wg, offs=offs)) * torch._grouped_mm(xp, self.wu, offs=offs)  # (S, F)
        y = torch._grouped_mm(h, self.wd, offs=offs)  # (S, D)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return (y[inverse].view(T, K, D).float() * w.unsqueeze(-1)).sum(1).to(self.x.dtype)  # (T, D)

    def params(self):
        return [self.x, self.logits, self.wg, self.wu, self.wd]


class FloorImpl(Impl):
    """The layer's GEMMs, dense over S = T*K rows with one expert's weights, into preallocated outputs:
    forward G = X Wg, U = X Wu, Y = H Wd; backward dH = dY Wd^T, dWd = H^T dY, dX = dG Wg^T + dU Wu^T,
    dWg = X^T dG, dWu = X^T dU."""

    name = "floor"

    def __init__(self, p: dict):
        T, D, Fh, K = p["T"], p["D"], p["F"], p["K"]
        S, kw = T * K, dict(device=p["device"], dtype=p["dtype"])
        r = lambda *s: torch.randn(*s, **kw)  # noqa: E731
        self.X, self.Wg, self.Wu, self.Wd = r(S, D), r(D, Fh), r(D, Fh), r(Fh, D)
        self.G, self.U, self.H, self.Y = r(S, Fh), r(S, Fh), r(S, Fh), r(S, D)
        self.dY, self.dH, self.dG, self.dU, self.dX = r(S, D), r(S, Fh), r(S, Fh), r(S, Fh), r(S, D)
        self.dWg, self.dWu, self.dWd = r(D, Fh), r(D, Fh), r(Fh, D)

    def run_forward(self):
        torch.mm(self.X, self.Wg, out=self.G)
        torch.mm(self.X, self.Wu, out=self.U)
        torch.mm(self.H, self.Wd, out=self.Y)

    def run_backward(self):
        torch.mm(self.dY, self.Wd.t(), out=self.dH)
        torch.mm(self.H.t(), self.dY, out=self.dWd)
        torch.mm(self.dG, self.Wg.t(), out=self.dX)
        self.dX.addmm_(self.dU, self.Wu.t())
        torch.mm(self.X.t(), self.dG, out=self.dWg)
        torch.mm(self.X.t(), self.dU, out=self.dWu)


class WrongImpl(Impl):
    """--inject_wrong: another implementation with its output scaled by WRONG_SCALE (tests only)."""

    def __init__(self, inner: Impl):
        self.inner, self.name = inner, inner.name

    def forward(self):
        return self.inner.forward() * WRONG_SCALE

    def params(self):
        return self.inner.params()


def build_impl(name: str, p: dict, wrong: bool = False) -> Impl:
    """The implementation `name` on problem p (ImplUnavailable where it cannot run); `wrong` for tests."""
    impl = _build_impl(name, p)
    if wrong:
        if isinstance(impl, FloorImpl):
            raise ValueError("--inject_wrong floor: the floor has no output to check; name another implementation")
        return WrongImpl(impl)
    return impl


def _build_impl(name: str, p: dict) -> Impl:
    if name == "grouped_mm":
        return GroupedMMImpl(p)
    if name.startswith("blues_"):
        return BluesImpl(p, triton="triton" in name, fused=not name.endswith("_5ops"))
    if name == "ds_nodrop":
        return DeepSpeedImpl(p, None)
    if name.startswith("ds_cf"):
        return DeepSpeedImpl(p, float(name[len("ds_cf"):]))
    if name == "naive":
        return NaiveImpl(p)
    if name == "floor":
        return FloorImpl(p)
    raise ValueError(f"unknown implementation {name!r}: expected one of {', '.join(ALL_IMPLS)}")


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------

class Clock:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def time(self, fn: Callable) -> float:
        """Seconds that fn() takes (CUDA events on a GPU)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _zero(impl: Impl):
    if not isinstance(impl, FloorImpl):
        for prm in impl.params():
            prm.grad = None


def measure_once(impl: Impl, dy: torch.Tensor, clock: Clock) -> dict:
    """Forward, backward and forward+backward seconds of one repetition."""
    if isinstance(impl, FloorImpl):
        fwd = clock.time(impl.run_forward)
        bwd = clock.time(impl.run_backward)
        both = clock.time(lambda: (impl.run_forward(), impl.run_backward()))
        return dict(fwd=fwd, bwd=bwd, fwd_bwd=both)
    _zero(impl)
    holder = {}
    fwd = clock.time(lambda: holder.__setitem__("out", impl.forward()))
    out = holder.pop("out")
    bwd = clock.time(lambda o=out: o.backward(dy))
    del out
    _zero(impl)
    both = clock.time(lambda: impl.forward().backward(dy))
    _zero(impl)
    return dict(fwd=fwd, bwd=bwd, fwd_bwd=both)


def peak_memory(impl: Impl, dy: torch.Tensor, device: str) -> Optional[int]:
    """Bytes allocated at the peak of one forward+backward above what was allocated before it."""
    if isinstance(impl, FloorImpl):
        return 0  # preallocated buffers only
    _zero(impl)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        impl.forward().backward(dy)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        _zero(impl)
        return peak
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            impl.forward().backward(dy)
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        totals = [sum(s) for s in sizes]
        peak = max(totals) - totals[0] if totals else None
    except Exception as e:  # private profiler API: report no figure rather than a wrong one
        print(f"  (peak memory unavailable on CPU: {e!r})")
        peak = None
    _zero(impl)
    return peak


def check_outputs(impls: list, p: dict) -> dict:
    """Max |out - blues reference output| per implementation (the drop-token DeepSpeed variants differ)."""
    ref_ops = _Ops(triton=False)
    with torch.no_grad():
        args = [p[n].float() for n in ("x", "logits", "w_gate", "w_up", "w_down")]
        want = blues_experts(ref_ops, args[0], args[1], args[2], args[3], args[4], p["K"], fused=True)[0]
        scale = want.abs().max().item()
        errs = {}
        for impl in impls:
            if isinstance(impl, FloorImpl):
                continue
            errs[impl.name] = (impl.forward().float() - want).abs().max().item() / scale
    return errs


def output_ok(name: str, rel_err: Optional[float], dtype: str) -> Optional[bool]:
    """Is `name`'s output right (rel_err within OUTPUT_TOL[dtype])? None where it is not checked: the
    floor has no output and the capacity-limited DeepSpeed variants drop tokens by design. NaN fails."""
    if rel_err is None or name.startswith("ds_cf"):
        return None
    return bool(rel_err <= OUTPUT_TOL[dtype])


def run(args) -> list:
    device = args.device
    dtype = DTYPES[args.dtype]
    clock = Clock(device)
    rows = []
    err = check_mirror_matches_layer()
    print(f"blues_experts vs blues.moe.MoE: max |diff| = {err:.2e}")
    assert err < 1e-5, "the benchmark's Blues path no longer matches blues/moe.py"
    for shape in args.shapes:
        for routing in args.routing:
            p = make_problem(shape, routing, dtype, device, args.zipf_s)
            T, D, Fh, E, K = SHAPES[shape]
            counts = p["counts"]
            print(f"\n== {shape} T={T} D={D} F={Fh} E={E} K={K} {args.dtype} {routing}: busiest expert "
                  f"{counts.max().item()} / mean {T * K / E:.0f} assignments "
                  "(DeepSpeed no-drop pads every expert to it)")
            pressure_before = cpu_pressure()
            impls = []
            for name in args.impls:
                if "triton" in name and device != "cuda" and not interpret_mode():
                    print(f"  {name}: skipped (the Triton kernels run on CUDA; on CPU only in the interpreter)")
                    continue
                if name.startswith("ds_") and (K == 1):
                    continue
                try:
                    impls.append(build_impl(name, p, wrong=name == args.inject_wrong))
                except ImplUnavailable as e:
                    print(f"  {name}: unavailable ({e})")
                    rows.append(dict(benchmark="moe_layer", impl=name, shape=shape, dtype=args.dtype, device=device,
                                     routing=routing, available=False, reason=str(e)))
            errs = check_outputs(impls, p)
            for name, e in errs.items():
                drops = '  (drops tokens)' if name.startswith('ds_cf') else ''
                ok = output_ok(name, e, args.dtype)
                verdict = "" if ok is None else ("  ok" if ok else f"  WRONG (> {OUTPUT_TOL[args.dtype]:.0e})")
                print(f"  {name:18s} max|out - blues_torch| / max|out| = {e:.1e}{drops}{verdict}")
            for _ in range(args.warmup):
                for impl in impls:
                    measure_once(impl, p["dy"], clock)
            samples = {impl.name: [] for impl in impls}
            for _ in range(args.reps):
                for impl in impls:
                    samples[impl.name].append(measure_once(impl, p["dy"], clock))
            pressure = (pressure_before, cpu_pressure())
            print(f"  CPU pressure from other processes (PSI avg10, before/after): {pressure[0]} / {pressure[1]} %")
            fl_fwd, fl_bwd = 6 * T * K * D * Fh, 12 * T * K * D * Fh
            med = {n: {k: statistics.median(s[k] for s in v) for k in ("fwd", "bwd", "fwd_bwd")}
                   for n, v in samples.items()}
            best = {n: {k: min(s[k] for s in v) for k in ("fwd", "bwd", "fwd_bwd")} for n, v in samples.items()}

            def paired(a: str, b: str, samples=samples) -> Optional[float]:
                """Median over repetitions of time(a) / time(b) within the same repetition."""
                if a not in samples or b not in samples:
                    return None
                return statistics.median(x["fwd_bwd"] / y["fwd_bwd"] for x, y in zip(samples[a], samples[b]))

            print(f"  {'impl':18s} {'fwd ms':>8s} {'bwd ms':>8s} {'f+b ms':>8s} {'min f+b':>8s} {'TFLOP/s':>8s} "
                  f"{'x floor':>8s} {'(min)':>6s} {'(pair)':>6s} {'peak MB':>8s}")
            for impl in impls:
                m, bst = med[impl.name], best[impl.name]
                mem = peak_memory(impl, p["dy"], device) if args.memory else None
                row = dict(benchmark="moe_layer", impl=impl.name, shape=shape, T=T, D=D, F=Fh, E=E, K=K,
                           dtype=args.dtype, device=device, routing=routing,
                           zipf_s=args.zipf_s if routing == "zipf" else None,
                           busiest_expert=counts.max().item(), fwd_s=m["fwd"], bwd_s=m["bwd"], fwd_bwd_s=m["fwd_bwd"],
                           min_fwd_s=bst["fwd"], min_bwd_s=bst["bwd"], min_fwd_bwd_s=bst["fwd_bwd"],
                           max_fwd_bwd_s=max(s["fwd_bwd"] for s in samples[impl.name]),
                           fwd_tflops=fl_fwd / m["fwd"] / 1e12, bwd_tflops=fl_bwd / m["bwd"] / 1e12,
                           fwd_bwd_tflops=(fl_fwd + fl_bwd) / m["fwd_bwd"] / 1e12,
                           x_floor_fwd_bwd=m["fwd_bwd"] / med["floor"]["fwd_bwd"] if "floor" in med else None,
                           x_floor_fwd_bwd_min=bst["fwd_bwd"] / best["floor"]["fwd_bwd"] if "floor" in best else None,
                           x_floor_fwd_bwd_paired=paired(impl.name, "floor"),
                           x_ds_nodrop_fwd_bwd_paired=paired("ds_nodrop", impl.name),
                           peak_bytes=mem, reps=args.reps, warmup=args.warmup, threads=torch.get_num_threads(),
                           env=environment(), cpu_pressure_pct=pressure,
                           rel_err_vs_blues_torch=errs.get(impl.name), drops_tokens=impl.name.startswith("ds_cf"),
                           output_ok=output_ok(impl.name, errs.get(impl.name), args.dtype),
                           output_tol=OUTPUT_TOL[args.dtype], available=True)
                rows.append(row)
                nan = float("nan")
                print(f"  {impl.name:18s} {m['fwd'] * 1e3:8.1f} {m['bwd'] * 1e3:8.1f} {m['fwd_bwd'] * 1e3:8.1f} "
                      f"{bst['fwd_bwd'] * 1e3:8.1f} {row['fwd_bwd_tflops']:8.3f} {row['x_floor_fwd_bwd'] or nan:8.2f} "
                      f"{row['x_floor_fwd_bwd_min'] or nan:6.2f} {row['x_floor_fwd_bwd_paired'] or nan:6.2f} "
                      f"{(mem or 0) / 1e6:8.1f}")
            blues_name = "blues_triton" if device == "cuda" else "blues_torch"
            for b in (blues_name, blues_name + "_5ops"):
                if b in med and "ds_nodrop" in med:
                    ratio = med['ds_nodrop']['fwd_bwd'] / med[b]['fwd_bwd']
                    print(f"  ds_nodrop / {b} (fwd+bwd): median {ratio:.2f}x, "
                          f"min {best['ds_nodrop']['fwd_bwd'] / best[b]['fwd_bwd']:.2f}x, "
                          f"paired {paired('ds_nodrop', b):.2f}x")
            del impls
    return rows


def main():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES))
    ap.add_argument("--routing", nargs="+", default=["balanced", "zipf"], choices=["balanced", "zipf"])
    ap.add_argument("--zipf_s", type=float, default=1.2)
    ap.add_argument("--impls", nargs="+", default=None, choices=ALL_IMPLS)
    ap.add_argument("--dtype", default=None, choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no_memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    ap.add_argument("--out", default=None)
    ap.add_argument("--inject_wrong", default=None, choices=ALL_IMPLS, metavar="IMPL",
                    help="tests only: scale IMPL's output by 1.1 to check that a wrong output fails the run")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    args.shapes = args.shapes or (GPU_SHAPES if gpu else CPU_SHAPES)
    args.impls = args.impls or [n for n in ALL_IMPLS if gpu or interpret_mode() or "triton" not in n]
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.reps = args.reps or (50 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", f"moe_layer_{args.device}.jsonl")
    print(f"{machine()}; {args.dtype}; reps {args.reps} after {args.warmup} warm-up; torch threads "
          f"{torch.get_num_threads()}; env {environment()}")
    if interpret_mode() and args.device == "cpu":
        print("TRITON_INTERPRET=1: the Triton rows time the CPU interpreter and mean nothing (smoke test only)")
    rows = run(args)
    write_rows(args.out, rows)
    print(f"\n{len(rows)} rows appended to {args.out}")
    wrong = sorted({f"{r['impl']} at {r['shape']} {r['routing']}" for r in rows if r.get("output_ok") is False})
    if wrong:
        print(f"FAILED: wrong output from {', '.join(wrong)} (rows marked output_ok=false)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from blues.train import exit_process
    exit_process(main())  # a rank's end: no interpreter teardown (blues.train.distributed says why)
