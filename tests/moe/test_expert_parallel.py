"""blues.moe.expert_parallel: the exchange, the split plan and the EP layer against a one-process reference.

The two-rank checks run in one job of 2 gloo processes (torch.multiprocessing, ~7 s on a quiet machine:
process start, imports, DeepSpeed's comm set-up): each rank writes what it measured, the tests below
assert on it.
The reference for every EP case is the same MoE layer with all E experts on one process (ep_size=1),
applied to each rank's tokens separately: expert parallelism must not change any output, and an
expert's gradient on its EP rank must be the sum of what the reference gives for every rank's tokens.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from blues.common import free_port
from blues.moe import TORCH_OPS, TRITON_OPS
from blues.moe.layer import Experts
from blues.moe.routing import hot_experts

pytestmark = pytest.mark.distributed

# fp32 tolerance of the EP-vs-reference comparisons, relative to the largest entry (at least 1): the
# same products, summed per expert over other row blocks (a rank's grouped GEMM sees both ranks'
# rows, an expert's gradient sums both ranks' tokens at once), so only the summation order differs.
TOL = 1e-5

WORKER = r'''
import contextlib, json, os, sys
import torch

CASES = {
    # why each case is here
    "natural routing, K=3 > E_loc=2": dict(K=3),
    "every token to the other rank's experts": dict(K=2, bias=[[0, 0, 9, 9], [9, 9, 0, 0]]),
    "rank 1 receives no token (and sends none to itself)": dict(K=2, bias=[[9, 9, 0, 0], [9, 9, 0, 0]]),
    "capacity drops at the source, skewed": dict(K=2, cf=1.0, bias=[[9, 9, 0, 0], [9, 0, 0, 9]]),
    "top-1, shared expert, ragged token count": dict(K=1, shared=1, T=13),
}


def layer_cfg(K, ep, cf=None, shared=0, backend="torch"):
    from blues.config import BluesConfig
    return BluesConfig.from_dict(dict(n_embd=24, n_head=2, num_kv_heads=1, num_experts=4, top_k=K,
                                      expert_ffn_size=40, router_noise_std=0.0, capacity_factor=cf,
                                      num_shared_experts=shared, moe_backend=backend, ep_size=ep))


def run(layer, x, bias, probe):
    layer.use_selection_bias = bias is not None
    if bias is not None:
        layer.selection_bias.copy_(torch.tensor(bias, dtype=torch.float32))
    x = x.clone().requires_grad_()
    res = layer(x)
    loss = (res.out * probe).sum() + 0.3 * res.aux_loss + 0.2 * res.z_loss
    params = [x, layer.router.weight, layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down]
    return res, torch.autograd.grad(loss, params)


def maxdiff(a, b):
    """max |a - b| relative to the largest |b| (gradients here reach ~1e2: fp32 rounding is relative)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0)) if a.numel() else 0.0


def ep_cases(rank, g):
    from blues.moe import MoE
    out = {}
    for name, c in CASES.items():
        K, T = c["K"], c.get("T", 16)
        torch.manual_seed(0)
        ref = MoE(layer_cfg(K, 1, c.get("cf"), c.get("shared", 0)))
        for p in ref.parameters():
            torch.nn.init.normal_(p, std=0.3)
        ep = MoE(layer_cfg(K, 2, c.get("cf"), c.get("shared", 0)))
        sd = ref.state_dict()
        first = g.ep_rank * 2
        for k in [k for k in sd if ".w_" in k and k.startswith("experts.")]:
            sd[k] = sd[k][first:first + 2]
        ep.load_state_dict(sd)
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(1, T, 24, generator=gen) for _ in range(2)]
        probes = [torch.randn(1, T, 24, generator=gen) for _ in range(2)]
        bias = c.get("bias") or [None, None]
        refs = [run(ref, xs[r], bias[r], probes[r]) for r in range(2)]
        res, grads = run(ep, xs[rank], bias[rank], probes[rank])
        rres, rgrads = refs[rank]
        expert_ref = [refs[0][1][i] + refs[1][1][i] for i in (2, 3, 4)]  # every rank's tokens
        counts = res.counts.clone()
        dropped = res.dropped.clone()
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(dropped)
        out[name] = {
            "out": maxdiff(res.out, rres.out), "aux": maxdiff(res.aux_loss, rres.aux_loss),
            "dx": maxdiff(grads[0], rgrads[0]), "drouter": maxdiff(grads[1], rgrads[1]),
            "dexperts": max(maxdiff(grads[i], expert_ref[i - 2][first:first + 2]) for i in (2, 3, 4)),
            "expert_grad_abs": float(sum(grads[i].abs().sum() for i in (2, 3, 4))),
            "counts": res.counts.tolist(), "ref_counts": rres.counts.tolist(),
            "dropped": int(res.dropped), "ref_dropped": int(rres.dropped),
            "counts_all": counts.tolist(), "dropped_all": int(dropped),
            "ref_counts_all": (refs[0][0].counts + refs[1][0].counts).tolist(),
            "ref_dropped_all": int(refs[0][0].dropped + refs[1][0].dropped),
        }
    return out


def exchange(rank, g):
    """all_to_all_v on hand-made splits: values and gradients against the definition."""
    from blues.moe.expert_parallel import all_to_all_v
    out = {}
    plans = {  # send_splits per rank; a rank's receive splits follow
        "ragged": [[2, 0], [3, 1]],  # rank 0 sends nothing to rank 1
        "rank 1 receives nothing": [[1, 0], [2, 0]],
        "rank 0 sends nothing at all": [[0, 0], [1, 3]],
    }
    for name, sends in plans.items():
        send = sends[rank]
        recv = [sends[s][rank] for s in range(2)]
        base = 100 * rank
        x = (torch.arange(sum(send), dtype=torch.float64) + base).view(-1, 1).repeat(1, 3).requires_grad_()
        y = all_to_all_v(x, send, recv, g.ep_group)
        want = []
        for s in range(2):
            first = sum(sends[s][:rank])
            want += [100 * s + first + i for i in range(sends[s][rank])]
        w = torch.arange(1, y.shape[0] * 3 + 1, dtype=torch.float64).view(-1, 3)
        (y * w).sum().backward()
        # x's row i went to rank d = its block; its gradient is the weight it met there
        out[name] = {"y": y[:, 0].tolist(), "want": [float(v) for v in want], "shape": list(y.shape),
                     "grad_rows": x.grad.sum(1).tolist()}
    return out


@contextlib.contextmanager
def spy_host_reads():
    """Yields the list of host reads (Tensor.item/tolist/cpu/numpy/__bool__/__int__/__index__/__float__)
    made inside the block, in order."""
    seen = []
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    def spy(n):
        def f(self, *a, **k):
            seen.append(n)
            return saved[n](self, *a, **k)
        return f
    for n in names:
        setattr(torch.Tensor, n, spy(n))
    try:
        yield seen
    finally:
        for n in names:
            setattr(torch.Tensor, n, saved[n])


def host_reads(rank, g):
    """Host reads (Tensor.item/tolist/cpu/numpy/__bool__/__int__/__index__/__float__) in one forward of
    the EP layer on the Triton ops (under the CPU interpreter)."""
    from blues.moe import MoE
    torch.manual_seed(0)
    layer = MoE(layer_cfg(2, 2, backend="triton"))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 16, 24)
    with spy_host_reads() as seen:
        layer(x)
    return seen


def checkpointed(rank, g):
    """Host reads in forward + backward of the EP layer (Triton ops, CPU interpreter), plain and under
    activation checkpointing with Blues' context_fn; and the input and weight gradients of both."""
    from torch.utils.checkpoint import checkpoint
    from blues.moe import MoE
    from blues.moe.expert_parallel import checkpoint_contexts
    torch.manual_seed(0)
    layer = MoE(layer_cfg(2, 2, backend="triton"))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x0 = torch.randn(1, 16, 24)
    out = {}
    for mode in ("plain", "checkpointed"):
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        with spy_host_reads() as seen:
            if mode == "plain":
                y = layer(x).out
            else:
                y = checkpoint(lambda t: layer(t).out, x, use_reentrant=False,
                               context_fn=lambda: checkpoint_contexts(layer))
            (y * torch.arange(24.0)).sum().backward()
        out[mode] = {"reads": seen, "grads": [x.grad.flatten().tolist()] + [p.grad.flatten().tolist()
                                                                          for p in layer.parameters()]}
    return out


def forced(rank, g):
    """Forced routing under EP: every rank's tokens on EP rank 0's experts."""
    from blues.moe import MoE, forced_routing
    torch.manual_seed(0)
    layer = MoE(layer_cfg(2, 2))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    holder = torch.nn.Sequential(layer)
    with forced_routing(holder):
        res = layer(torch.randn(1, 16, 24))
    counts = res.counts.clone()
    torch.distributed.all_reduce(counts)
    return counts.tolist()


def worker(rank, out_dir, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_SIZE="2", TRITON_INTERPRET="1")
    from blues.train.distributed import init_distributed
    from blues.moe.expert_parallel import ensure_ep_groups
    init_distributed()
    g = ensure_ep_groups(2)
    again = ensure_ep_groups(2)  # a second call finds the groups: no second set of groups
    res = {"ep_rank": g.ep_rank, "edp_size": g.edp_size, "same_groups": again.ep_group is g.ep_group,
           "exchange": exchange(rank, g), "cases": ep_cases(rank, g), "host_reads": host_reads(rank, g),
           "forced_counts": forced(rank, g), "checkpointed": checkpointed(rank, g)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    from blues.train import exit_process
    exit_process(0)  # a rank's end: no interpreter teardown (blues.train.distributed says why)


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
'''


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' measurements from one 2-process gloo job (killed, and failed, after 300 s: a
    collective that one rank skips would otherwise hang forever)."""
    d = tmp_path_factory.mktemp("ep")
    script = d / "ep_worker.py"
    script.write_text(WORKER)
    port = free_port()
    p = subprocess.Popen([sys.executable, str(script), str(d), str(port)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"the 2-rank EP job hung (a collective mismatch?):\n{out[-3000:]}")
    assert p.returncode == 0, out[-4000:]
    left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n]
    assert left == [], left
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(2)]


def test_groups_are_deepspeeds_consecutive_layout(ranks):
    assert [r["ep_rank"] for r in ranks] == [0, 1]
    assert all(r["edp_size"] == 1 and r["same_groups"] for r in ranks)


@pytest.mark.parametrize("plan", ["ragged", "rank 1 receives nothing", "rank 0 sends nothing at all"])
def test_all_to_all_v_values_and_gradients(ranks, plan):
    sends = {"ragged": [[2, 0], [3, 1]], "rank 1 receives nothing": [[1, 0], [2, 0]],
             "rank 0 sends nothing at all": [[0, 0], [1, 3]]}[plan]
    for r, res in enumerate(ranks):
        got = res["exchange"][plan]
        assert got["y"] == got["want"]
        assert got["shape"] == [sum(sends[s][r] for s in range(2)), 3]  # (0, 3) when nothing arrives
    # The gradient of row i of rank s is the weight its copy met on the destination rank: rows received
    # there are weighted 1, 2, 3, ... (3 columns) in arrival order; the backward sends them home.
    for s in range(2):
        want = []
        for d in range(2):
            before = sum(sends[q][d] for q in range(s))  # rows rank d got from earlier sources
            for i in range(sends[s][d]):
                row = before + i
                want.append(float(sum(3 * row + c + 1 for c in range(3))))
        assert ranks[s]["exchange"][plan]["grad_rows"] == want


CASE_NAMES = ["natural routing, K=3 > E_loc=2", "every token to the other rank's experts",
              "rank 1 receives no token (and sends none to itself)", "capacity drops at the source, skewed",
              "top-1, shared expert, ragged token count"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_ep_layer_equals_the_one_process_layer(ranks, case):
    """Output, aux loss, input and router gradients equal the reference on the rank's own tokens; the
    expert gradients equal the reference's summed over both ranks' tokens (no 2x, no 0.5x)."""
    for res in ranks:
        c = res["cases"][case]
        for key in ("out", "aux", "dx", "drouter", "dexperts"):
            assert c[key] <= TOL, (key, c[key])
        assert c["counts"] == c["ref_counts"] and c["dropped"] == c["ref_dropped"]
        # what the train step reports: the all-reduced counts, the same on both ranks
        assert c["counts_all"] == c["ref_counts_all"] and c["dropped_all"] == c["ref_dropped_all"]


def test_skewed_cases_really_skew(ranks):
    """The routing cases do what their names say (else the comparisons above test less)."""
    cross = [r["cases"]["every token to the other rank's experts"]["counts"] for r in ranks]
    assert cross[0][:2] == [0, 0] and cross[1][2:] == [0, 0]  # nothing stays home
    starve = ranks[1]["cases"]["rank 1 receives no token (and sends none to itself)"]
    assert starve["counts_all"][2:] == [0, 0]
    assert starve["expert_grad_abs"] == 0.0  # rank 1's experts: in the graph, gradient exactly zero
    cap = [r["cases"]["capacity drops at the source, skewed"] for r in ranks]
    assert cap[0]["dropped"] > 0 and cap[1]["dropped"] > 0
    assert cap[0]["dropped_all"] == cap[1]["dropped_all"] == cap[0]["dropped"] + cap[1]["dropped"]


def test_forced_routing_sends_every_rank_to_ep_rank_0(ranks):
    for res in ranks:
        assert res["forced_counts"][2:] == [0, 0] and sum(res["forced_counts"]) == 2 * 16 * 2


def test_one_host_read_per_ep_layer_forward(ranks):
    """What is counted: Tensor.item / tolist / cpu / numpy / __bool__ / __int__ / __index__ / __float__
    calls during one forward of the EP layer on the Triton ops (CPU interpreter; the torch reference
    ops read expert_offsets on the host by design, their loop bounds, which is not a device sync on
    the CPU they run on). The one read is the split plan's (2, ep) sums; on CUDA it is one non-blocking
    copy into pinned memory, waited on just before the first exchange."""
    for res in ranks:
        assert res["host_reads"] == ["tolist"], res["host_reads"]


def test_checkpoint_recompute_reuses_the_split_plan(ranks):
    """Under activation checkpointing the layer's forward runs twice; the recompute replays the
    forward's split plan (PlanReplay), so forward + backward read the host exactly as often as
    without checkpointing (the one split-plan read, plus what the backward itself reads), and the
    gradients are identical (the same routing and exchanges, recomputed in the same order)."""
    for res in ranks:
        plain, ckpt = res["checkpointed"]["plain"], res["checkpointed"]["checkpointed"]
        assert plain["reads"].count("tolist") >= 1
        assert ckpt["reads"] == plain["reads"], (ckpt["reads"], plain["reads"])
        assert ckpt["grads"] == plain["grads"]


@pytest.fixture
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_no_host_read_without_ep(triton_interpreter):
    """The same count on one process without expert parallelism: none."""
    from blues.config import BluesConfig
    from blues.moe import MoE
    torch.manual_seed(0)
    cfg = BluesConfig.from_dict(dict(n_embd=24, n_head=2, num_kv_heads=1, num_experts=4, top_k=2,
                                     expert_ffn_size=40, router_noise_std=0.0, capacity_factor=1.0,
                                     moe_backend="triton"))
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 16, 24)
    seen = []
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def spy(n):
        def f(self, *a, **k):
            seen.append(n)
            return saved[n](self, *a, **k)
        return f
    try:
        for n in names:
            setattr(torch.Tensor, n, spy(n))
        layer(x)
    finally:
        for n in names:
            setattr(torch.Tensor, n, saved[n])
    assert seen == []


# ----------------------------------------------------------------------------- one process, no group

def test_experts_keep_their_slice_of_the_full_draw():
    """Rank r's Experts hold experts [r*E_loc, (r+1)*E_loc) of the same seeded (E, ...) draw that
    ep_size=1 makes, and leave the generator where ep_size=1 leaves it."""
    full = Experts(4, 6, 5)
    torch.manual_seed(3)
    full.normal_("w_down", 0.1)
    after = torch.rand(1)
    for rank in (0, 1):
        part = Experts(4, 6, 5, ep_size=2, ep_rank=rank)
        torch.manual_seed(3)
        part.normal_("w_down", 0.1)
        assert part.w_down.shape == (2, 5, 6)
        assert torch.equal(part.w_down, full.w_down[2 * rank:2 * rank + 2])
        assert torch.equal(torch.rand(1), after)


def test_an_ep_layer_needs_its_groups():
    from blues.config import BluesConfig
    from blues.moe import MoE
    cfg = BluesConfig.from_dict(dict(num_experts=4, ep_size=2, moe_backend="torch"))
    with pytest.raises(ValueError, match=r"ep_size=2 needs its expert-parallel process groups"):
        MoE(cfg)


@pytest.mark.parametrize("E, K, cap, N, ep, hot", [
    (8, 2, None, 128, 2, 2),  # no capacity: the K experts 0..K-1, all on EP rank 0
    (8, 2, 16, 128, 2, 4),  # capacity needs all 8; EP rank 0 has 4: they overflow (the most it can get)
    (8, 2, 64, 128, 2, 4),  # 4 needed, 4 on EP rank 0
    (4, 3, 16, 32, 2, 3),  # K=3 > E_loc=2: a token's choices are distinct, so 3
])
def test_hot_experts_under_ep_stay_on_ep_rank_0(E, K, cap, N, ep, hot):
    assert hot_experts(E, K, cap, N, ep) == hot
    assert hot_experts(E, K, cap, N) == (K if cap is None else min(E, max(K, math.ceil(N * K / cap))))


def test_op_tables_are_symmetric():
    """Each Triton op has its reference under the same name + _ref (kernels/ naming)."""
    for name in TORCH_OPS._fields:
        assert getattr(TORCH_OPS, name).__name__ == name + "_ref"
        assert getattr(TRITON_OPS, name).__name__ == name


@pytest.mark.parametrize("recv_counts", [
    [[3, 0, 2, 1], [0, 0, 4, 2]],  # empty blocks, an expert with no row from either source
    [[0, 0], [0, 0]],  # this rank receives nothing
    [[5, 1], [0, 0], [2, 3]],  # ep=3, a source that sends nothing
    [[7]],  # one source, one local expert
])
def test_local_expert_indices_equal_a_stable_sort_of_the_received_rows(recv_counts):
    """The block move of local_expert_indices is the stable grouping the op table's sort gives:
    the same sorted slots, offsets and inverse."""
    from blues.kernels.moe_permute import moe_permute_indices_ref
    from blues.moe.expert_parallel import local_expert_indices
    rc = torch.tensor(recv_counts)
    ep, E_loc = rc.shape
    R = int(rc.sum())
    ids = torch.repeat_interleave(torch.arange(E_loc).repeat(ep), rc.reshape(-1))  # (R,) received order
    want = moe_permute_indices_ref(ids.view(R, 1), E_loc)
    got = local_expert_indices(rc, R)
    for name, a, b in zip(want._fields, got, want):
        assert torch.equal(a, b), (name, a, b)
