"""Expert parallelism for the stacked MoE layer (moe_backend=torch|triton with ep_size > 1).

Shapes: N local tokens, K top-k, S = N*K assignments, E experts, ep = ep_size, E_loc = E / ep local
experts, D width, F expert hidden size, R rows this rank receives (every source rank's assignments to
its experts).

Process groups are DeepSpeed's (deepspeed.utils.groups, named f"ep_size_{ep}"), so that ZeRO reduces
the expert gradients over the expert-data-parallel group and its checkpoints treat them as experts.
The layout is DeepSpeed's default one: EP groups are blocks of consecutive ranks, [0..ep-1],
[ep..2ep-1], ...; expert-data-parallel groups are strided, range(r % ep, world, ep). EP rank e holds
the global experts [e*E_loc, (e+1)*E_loc).

One layer's forward (ep_experts_forward), after routing and the capacity cut at the source:
 1. split plan: the per-expert counts (E,) go to their EP ranks through one fixed-split all-to-all,
    then ONE device-to-host copy of the (2, ep) send/receive sums, started at once (on CUDA into
    pinned memory, non-blocking) and read only when the row exchange needs it, so that the copy
    overlaps the permutation of the token rows;
 2. the token rows, in expert order (which is destination order: experts are contiguous per EP rank),
    go out through a variable-split all-to-all (AllToAllV: no padding, any split may be 0);
 3. the received rows, ordered (source, local expert), are grouped by local expert: the indices come
    from the received counts alone (local_expert_indices: a block move, no sort; a source's rows keep
    their order), the grouped SwiGLU gathers the rows itself, and the down projection is a plain
    grouped GEMM (the received rows carry no routing weight) whose rows go back to received order;
 4. the outputs go back through the reverse exchange and are combined with the routing weights in
    fp32 (moe_unpermute_combine), dropped assignments contributing zero.
While a profiler runs, the stages carry ranges (blues.moe:split_plan, exchange, local_experts, combine)
that benchmarks/ep_throughput.py --profile reports; otherwise nothing (_stage: a range costs ~7 us).
Every rank runs both exchanges in every MoE layer of every forward, with zero rows if need be: a rank
that skipped one would leave the others waiting forever. The expert weights are used on every rank
even when it receives no row, so they always get a (zero) gradient and ZeRO's gradient hooks fire.

The engine side (mark_expert_params, engine_moe_marker) is described on those functions, with the
DeepSpeed 0.19.8 code they rely on (private contracts: pin DeepSpeed; tests/train/
test_expert_parallel_distributed.py checks the gradient scale, the resume and the export through them).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from blues.kernels.moe_permute import PermuteIndices

# DeepSpeed's placement family for stacked experts under ZeRO 3 (AutoEP's name): with it, stage 3
# averages the expert gradients over the data-parallel world and adds the EP term to the gradient
# norm (deepspeed/runtime/zero/stage3.py:675-692, 1995-1997). Without it the expert update came out
# ep_size x too large (2.000x measured at ep_size=2: the DeepSpeed #5618 / #6545 bug again).
ZERO3_EXPERT_FAMILY = "autoep_expert"


def group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert-parallel and expert-data-parallel groups of size ep_size."""
    return f"ep_size_{ep_size}"


@dataclass(frozen=True)
class EPGroups:
    """This rank's expert-parallel (EP) and expert-data-parallel (EDP) groups and places in them."""
    name: str
    ep_group: Any
    edp_group: Any
    ep_size: int
    ep_rank: int
    edp_size: int
    edp_rank: int


def ep_groups(ep_size: int) -> EPGroups:
    """The groups ensure_ep_groups(ep_size) created (ValueError when there are none)."""
    from deepspeed.utils import groups

    name = group_name(ep_size)
    if not dist.is_initialized() or name not in groups._get_expert_parallel_group_dict():
        raise ValueError(f"ep_size={ep_size} needs its expert-parallel process groups: build the model after "
                         f"blues.moe.expert_parallel.ensure_ep_groups({ep_size}) (blues-train does), or set ep_size=1")
    ep_g, edp_g = groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)
    return EPGroups(name, ep_g, edp_g, ep_size, dist.get_rank(ep_g), dist.get_world_size(edp_g), dist.get_rank(edp_g))


def ensure_ep_groups(ep_size: int) -> EPGroups:
    """DeepSpeed's groups for ep_size, created when missing (collective: every rank calls it, in the
    same order, as gloo's new_group requires), after checking they have the consecutive layout that
    the expert slicing (EP rank = rank % ep_size) and the checkpoints assume."""
    from deepspeed.utils import groups

    assert dist.is_initialized(), "ensure_ep_groups needs the process group (init_distributed first)"
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} is invalid: must divide the world size {world} (number of ranks)")
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    first = rank - rank % ep_size
    assert list(groups._get_expert_parallel_group_ranks(name)) == list(range(first, first + ep_size)), \
        f"{name}: expert-parallel ranks {list(groups._get_expert_parallel_group_ranks(name))} are not consecutive"
    assert list(groups._get_expert_data_parallel_group_ranks(name)) == list(range(rank % ep_size, world, ep_size))
    g = ep_groups(ep_size)
    assert g.ep_rank == rank % ep_size and g.edp_rank == rank // ep_size, g
    return g


# --------------------------------------------------------------------------- the exchange

class _AllToAllV(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits,
                               group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        dx = grad.new_empty((sum(send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(dx, grad.contiguous(), output_split_sizes=send_splits, input_split_sizes=recv_splits,
                               group=ctx.group)
        return dx, None, None, None


def all_to_all_v(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """x (sum(send_splits), ...) -> (sum(recv_splits), ...): rows [sum(send_splits[:r]), ...) go to rank r
    of `group`, rows from rank r arrive in block r. Differentiable; any split may be 0."""
    assert x.shape[0] == sum(send_splits), (tuple(x.shape), send_splits)
    return _AllToAllV.apply(x, list(send_splits), list(recv_splits), group)


class SplitPlan(NamedTuple):
    send_splits: list[int]  # (ep,) rows this rank sends to each EP rank
    recv_splits: list[int]  # (ep,) rows this rank receives from each EP rank
    recv_counts: torch.Tensor  # (ep, E_loc) on the device: rows from source s for local expert j


class PendingPlan:
    """A split plan whose one device-to-host copy is in flight; wait() returns the SplitPlan."""

    def __init__(self, recv_counts: torch.Tensor, sums: torch.Tensor):
        self.recv_counts = recv_counts
        self._host, self._event = None, None
        if sums.is_cuda:
            buf = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            buf.copy_(sums, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._buf = buf
        else:
            self._host = sums.tolist()  # (2, ep): the one host read of the layer

    def wait(self) -> SplitPlan:
        if self._host is None:
            self._event.synchronize()
            self._host = self._buf.tolist()  # host memory by now: no further device sync
        send, recv = self._host
        return SplitPlan(send, recv, self.recv_counts)


def start_split_plan(counts: torch.Tensor, g: EPGroups) -> PendingPlan:
    """counts (E,) assignments this rank sends to each global expert -> the plan, its host copy started.

    One fixed-split all-to-all of the counts (E_loc numbers to each EP rank), then one device-to-host
    copy of the (2, ep) row totals: what this rank sends to and receives from each EP rank."""
    ep = g.ep_size
    send = counts.reshape(ep, -1)  # (ep, E_loc)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=g.ep_group)
    return PendingPlan(recv, torch.stack([send.sum(1), recv.sum(1)]))


class PlanReplay:
    """A layer's split plan kept for the recompute of activation checkpointing.

    Under torch.utils.checkpoint the layer's forward runs twice (once in the forward pass, once
    again in the backward), with the same inputs and the same RNG state, so the same routing and
    the same split plan. The forward records its plan; the recompute replays it: no second count
    exchange and no second host read. Outside checkpointing the mode is None and nothing is kept.
    A record overwrites the last one and a replay does not consume it (a second backward through
    retain_graph replays the same plan)."""

    def __init__(self):
        self.mode: Optional[str] = None  # None | "record" | "replay"
        self.plan: Optional[PendingPlan] = None

    def start(self, counts: torch.Tensor, g: EPGroups) -> PendingPlan:
        """The layer's plan: started from `counts` (and kept, when recording), or the kept one (when
        replaying: the forward waited on it already, so its wait() reads nothing from the device)."""
        if self.mode == "replay":
            assert self.plan is not None, "recompute of an MoE layer whose checkpointed forward recorded no plan"
            return self.plan
        pending = start_split_plan(counts, g)
        if self.mode == "record":
            self.plan = pending
        return pending


def checkpoint_contexts(module: nn.Module):
    """torch.utils.checkpoint's context_fn for `module`: (the forward's context, the recompute's): the
    forward records every EP layer's split plan (PlanReplay), the recompute replays them."""
    replays = [m.plan_replay for m in module.modules() if isinstance(getattr(m, "plan_replay", None), PlanReplay)]
    return _plan_mode(replays, "record"), _plan_mode(replays, "replay")


@contextlib.contextmanager
def _plan_mode(replays: list[PlanReplay], mode: str) -> Iterator[None]:
    for r in replays:
        r.mode = mode
    try:
        yield
    finally:
        for r in replays:
            r.mode = None


_NO_RANGE = contextlib.nullcontext()


def _stage(name: str):
    """The profiler range blues.moe:<name> while a torch profiler runs, else a no-op context (a range
    costs ~7 us a call here, the check 0.1 us)."""
    return record_function("blues.moe:" + name) if torch.autograd._profiler_enabled() else _NO_RANGE


def local_expert_indices(recv_counts: torch.Tensor, R: int) -> PermuteIndices:
    """The grouping of the R received rows by local expert, from the counts alone (no sort).

    recv_counts (ep, E_loc): the received rows come in blocks (source s, local expert j) of
    recv_counts[s, j] rows, source-major; grouped by expert they are the same blocks, expert-major, each
    block's rows in their order (what a stable sort of the rows' expert ids gives, exactly). So a row's
    grouped position is its received position shifted by its block's move, and the reverse.
    NOTE: measured at the tiny benchmark shape (R=2048, E_loc=4), one thread: the indices plus the local
    experts' forward and backward 18.3 ms against 19.7 ms with a sort and the weighted down-combine."""
    ep, E_loc = recv_counts.shape
    by_source = recv_counts.reshape(-1)  # (ep*E_loc,) block sizes in received order (s, j)
    by_expert = recv_counts.t().reshape(-1)  # (E_loc*ep,) the same blocks in grouped order (j, s)
    src_first = torch.cumsum(by_source, 0) - by_source  # first received row of block (s, j)
    dst_first = (torch.cumsum(by_expert, 0) - by_expert).view(E_loc, ep).t().reshape(-1)  # its first grouped row
    move = dst_first - src_first  # (ep*E_loc,) indexed (s, j)
    rows = torch.arange(R, device=recv_counts.device)
    inverse = rows + torch.repeat_interleave(move, by_source, output_size=R)  # received row -> grouped position
    back = (-move).view(ep, E_loc).t().reshape(-1)  # indexed (j, s)
    sorted_slots = rows + torch.repeat_interleave(back, by_expert, output_size=R)  # grouped position -> received row
    offsets = F.pad(torch.cumsum(recv_counts.sum(0), 0), (1, 0))  # (E_loc+1,)
    return PermuteIndices(sorted_slots, offsets, inverse)


def ep_experts_forward(xf: torch.Tensor, idx, weights: torch.Tensor, experts: nn.Module, ops, g: EPGroups,
                       expert_dropout: float = 0.0, replay: Optional[PlanReplay] = None) -> torch.Tensor:
    """The experts' part of an MoE layer under expert parallelism (see the module docstring).

    xf (N, D) this rank's tokens; idx: ops.moe_permute_indices of the routing (N, K) over all E experts,
    a dropped assignment carrying id E; weights (N, K) fp32 routing weights, 0 where dropped; experts:
    this rank's stacked weights w_gate, w_up (E_loc, D, F), w_down (E_loc, F, D). Returns (N, D) in
    xf's dtype, summed in fp32: sum_k weights[t, k] * expert_k(xf[t])."""
    N, K = weights.shape
    S, D = N * K, xf.shape[1]
    E_loc = experts.w_gate.shape[0]
    E = E_loc * g.ep_size
    counts = idx.expert_offsets[1:] - idx.expert_offsets[:-1]  # (E,) kept assignments per expert
    assert counts.numel() == E, (counts.numel(), E)
    with _stage("split_plan"):
        pending = replay.start(counts, g) if replay is not None else start_split_plan(counts, g)
    # Every assignment's row in expert (= destination) order; the dropped ones trail and are not sent.
    # Permuting all S rows needs no host number, so it runs while the split sums travel to the host.
    xs = ops.moe_permute(xf, idx.sorted_slots, K)  # (S, D)
    plan = pending.wait()
    n_send = sum(plan.send_splits)
    with _stage("exchange"):
        xr = all_to_all_v(xs[:n_send], plan.send_splits, plan.recv_splits, g.ep_group)  # (R, D) (source, expert)
    with _stage("local_experts"):
        lidx = local_expert_indices(plan.recv_counts, xr.shape[0])
        offsets = lidx.expert_offsets  # (E_loc+1,)
        h = ops.moe_grouped_swiglu(xr, offsets, experts.w_gate, experts.w_up, lidx.sorted_slots, 1)  # (R, F)
        if expert_dropout > 0:
            h = F.dropout(h, p=expert_dropout)
        # The received rows carry no routing weight here (it is applied at home): a plain grouped GEMM,
        # then back to received order (row r = yl[inverse[r]]).
        yl = ops.moe_grouped_gemm(h, offsets, experts.w_down)  # (R, D) grouped by expert
        yr = ops.moe_permute(yl, lidx.inverse, 1)  # (R, D) received order
    with _stage("exchange"):
        yb = all_to_all_v(yr, plan.recv_splits, plan.send_splits, g.ep_group)  # (n_send, D) in send order
    with _stage("combine"):
        # Dropped rows (capacity) are zero, with weight 0; without drops nothing is appended (no copy).
        y = yb if n_send == S else torch.cat([yb, yb.new_zeros(S - n_send, D)])  # (S, D)
        return ops.moe_unpermute_combine(y, idx.inverse, weights)  # (N, D), fp32 sums


def all_gather_experts(local: torch.Tensor, g: EPGroups) -> torch.Tensor:
    """(E_loc, ...) on every EP rank -> (E, ...) in global expert order (collective over the EP group)."""
    parts = [torch.empty_like(local) for _ in range(g.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=g.ep_group)
    return torch.cat(parts)


# --------------------------------------------------------------------------- DeepSpeed's engine

def mark_expert_params(layers: Iterable[nn.Module], g: EPGroups, zero_stage: int, num_experts: int) -> int:
    """Mark the stacked expert weights of each MoE layer in `layers` (modules with an `experts` child)
    as DeepSpeed MoE parameters of the group g.name; returns the number of layers marked.

    allreduce=False and group_name are what DeepSpeed's is_moe_param and its optimizer-group split read
    (deepspeed/moe/utils.py); the engine then broadcasts them over the EDP group at start and reduces
    their gradients over it, divided by the data-parallel world (right: through the all-to-all backward
    an expert's local gradient already sums every EP rank's tokens).
    ZeRO 0-2: DeepSpeed only does that for a model it recognises as MoE, by class
    (deepspeed/runtime/engine.py:2101-2107), so each layer also gets a parameterless engine marker.
    ZeRO 3: no marker (DeepSpeed refuses its native MoE there); the partition attributes below make the
    stage-3 optimizer partition the experts over the EDP group, average their gradients over the
    data-parallel world and count them once in the gradient norm (the family tag; see
    ZERO3_EXPERT_FAMILY for what happens without it)."""
    n = 0
    for layer in layers:
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = g.name
            if zero_stage == 3:
                p.ds_zero_partition_process_group = g.edp_group
                p.ds_zero_placement_family = ZERO3_EXPERT_FAMILY
                p.ds_zero_partition_group_name = g.name
        if zero_stage < 3:
            layer.ds_engine_marker = engine_moe_marker(g, num_experts)
        n += 1
    return n


def engine_moe_marker(g: EPGroups, num_experts: int) -> nn.Module:
    """A module DeepSpeed's engine counts as a native MoE layer, with no parameters and no local
    experts: the engine then takes its MoE paths (EDP gradient reduction, per-EP-rank optimizer files
    at ZeRO 0) for the marked stacked experts, and its checkpointing writes no expert files (it could
    not name stacked ones; blues.train.checkpoint handles them). Without it a marked model crashes
    DeepSpeed under ZeRO 0-2 (a KeyError at ZeRO 0, a TypeError at ZeRO 1/2)."""
    return _marker_class()(g, num_experts)


@functools.lru_cache(maxsize=None)
def _marker_class():
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE

    class EngineMoEMarker(_DeepSpeedMoE):
        def __init__(self, g: EPGroups, num_experts: int):
            nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no parameters
            self.ep_size = g.ep_size
            self.expert_group_name = g.name
            self.num_experts = num_experts
            self.num_local_experts = 0
            self.enable_expert_tensor_parallelism = False
            self.use_residual = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            # Called by the engine on every module that has it; the groups exist already.
            assert not use_data_before_expert_parallel_, "refused by check_parallelism"

        def forward(self, *args, **kwargs):
            raise RuntimeError("EngineMoEMarker only marks a Blues MoE layer for DeepSpeed's engine; it has no forward")

    return EngineMoEMarker
