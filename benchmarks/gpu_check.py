"""The one prepared GPU check (issue 11, part 7): the MoE kernels right and timed on a borrowed H100/H200.

    python benchmarks/gpu_check.py --out DIR [--budget_s 420]     # on the GPU machine (launch/gpu_check.sh)
    python benchmarks/gpu_check.py --out DIR --smoke              # CPU, tiny shapes, Triton's interpreter (CI)

Made for a machine with no network and no install: torch, triton and transformers but no deepspeed,
pydantic, datasets or rustbpe, and Blues not pip-installed (the device tool copies the repository and runs
from its root). Blues is imported from this checkout (`blues_from_tree`); deepspeed is never imported.

Steps, in order; each writes JSON rows to DIR/gpu_check.jsonl and one printed line per row, and a failure
is recorded (with its traceback) without stopping the next step:
  a env           GPU, capability, SMs, memory, driver, torch/triton versions
  b layer_ops     Triton route, permute indices, grouped SwiGLU, grouped down-combine against the torch
                  references: outputs and every gradient, awkward shapes, fp32/fp16/bf16
  c permutation   moe_permute_indices exactly equal to the reference up to E=256, with capacity drops
  d no_host_sync  the MoE layer and the whole model forward+backward under set_sync_debug_mode("error")
  e int64_index   outputs beyond 2^31 elements (permute, grouped SwiGLU), on a GPU with the memory
  f determinism   the Triton layer ops twice: outputs and gradients bitwise equal
  g backends      what resolve_moe_ops and resolve_attn_backend pick here, which SDPA kernels take GQA
  h model         a small Blues model in bf16, moe_backend triton against torch: loss and gradient norms
  i timing        S1, S2, S3a, S3b: blues_triton, blues_torch, grouped_mm and the dense floor through
                  benchmarks/moe_layer.py's functions, outputs checked first; profiler breakdown at S2
  j loss          the fused, chunked loss (blues.loss, the default head) against the unfused one in
                  bf16 at N=16384, D=2048, V=32768: loss and gradients, then time and peak memory
A timing shape is skipped (and recorded so) when less of --budget_s is left than it needs; the correctness
steps always run. --smoke runs every step
on tiny shapes on the CPU (TRITON_INTERPRET=1, set here before triton is imported); steps that need CUDA
are rows with status "skipped" and a reason starting "needs CUDA". Exit 0 when every correctness row
passed, 1 otherwise; timing targets are reported, not asserted.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback

# Triton reads TRITON_INTERPRET when a kernel is decorated: it must be set before triton is imported.
if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blues_from_tree(root: str) -> None:
    """Make `blues` and `blues.kernels` importable from this checkout without pip. setup.py installs the
    top-level kernels/ folder as blues.kernels (package_dir); here that folder is registered under the
    same name. Must run before anything imports blues.kernels."""
    if root not in sys.path:
        sys.path.insert(0, root)
    import blues
    if "blues.kernels" in sys.modules:
        return
    folder = os.path.join(root, "kernels")
    spec = importlib.util.spec_from_file_location("blues.kernels", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["blues.kernels"] = module
    spec.loader.exec_module(module)
    blues.kernels = module


blues_from_tree(ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moe_layer as ml  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from blues.config import BluesConfig, ModelConfig, MoEConfig  # noqa: E402
from blues.kernels import moe_grouped_down_combine as down  # noqa: E402
from blues.kernels import moe_grouped_swiglu as swiglu  # noqa: E402
from blues.kernels import moe_permute as perm  # noqa: E402
from blues.kernels import moe_route as route  # noqa: E402

DTYPES = ml.DTYPES
TOL = ml.OUTPUT_TOL  # per dtype, with its reasons in benchmarks/moe_layer.py
ROUTE_TOL = 1e-5  # routing weights, prob sums and lse are fp32 on both sides from the same fp32 logits
NEEDS_CUDA = "needs CUDA"

# ------------------------------------------------------------------------------------------ rows


class Check:
    """The JSONL file, the printed lines, the clock and the verdict."""

    def __init__(self, out_dir: str, budget_s: float, smoke: bool, name: str = "gpu_check"):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, f"{name}.jsonl")
        open(self.path, "w").close()
        self.budget_s, self.smoke, self.t0 = budget_s, smoke, time.monotonic()
        self.device = "cpu" if smoke else "cuda"
        self.failed: list[str] = []
        self.rows: list[dict] = []

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def row(self, step: str, name: str, status: str, kind: str = "correctness", **data) -> dict:
        """status: pass | fail | error | skipped | info. A correctness row that is fail or error fails the run."""
        row = dict(step=step, name=name, status=status, kind=kind, elapsed_s=round(time.monotonic() - self.t0, 2),
                   **data)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
        self.rows.append(row)
        if kind == "correctness" and status in ("fail", "error"):
            self.failed.append(f"{step}/{name}")
        brief = {k: v for k, v in data.items() if k != "traceback"}
        print(f"[{row['elapsed_s']:7.1f}s] {status:7s} {step}/{name} {json.dumps(brief, default=str)[:400]}",
              flush=True)
        if "traceback" in data:
            print(data["traceback"], flush=True)
        return row

    def skip_cuda(self, step: str, name: str, why: str) -> None:
        self.row(step, name, "skipped", reason=f"{NEEDS_CUDA}: {why}")

    def guarded(self, step: str, name: str, fn, kind: str = "correctness") -> None:
        """Run fn(); an exception becomes an error row (with its traceback) and what follows still runs."""
        try:
            fn()
        except Exception as e:
            self.row(step, name, "error", kind, error=repr(e)[:500], traceback=traceback.format_exc())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in fp32 (0 for two empty or all-zero tensors; NaN never passes)."""
    if want.numel() == 0:
        return 0.0
    diff = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    return diff / scale if scale > 0 else diff


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()

# ------------------------------------------------------------------------------------------ a. environment


def step_env(c: Check) -> None:
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=_version("triton"), transformers=_version("transformers"),
                TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"), threads=torch.get_num_threads(),
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32, cpu_count=os.cpu_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), driver=_nvidia_smi("driver_version"),
                    clocks_mhz=_nvidia_smi("clocks.sm,clocks.max.sm"), power=_nvidia_smi("power.draw,power.limit"))
    else:
        info.update(gpu=None, machine=ml.machine())
    c.row("a_env", "environment", "info", kind="info", **info)


def _version(name: str):
    try:
        return __import__(name).__version__
    except Exception as e:  # recorded, not fatal: the check says what the machine lacks
        return f"unavailable ({e.__class__.__name__})"


def _nvidia_smi(query: str):
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e.__class__.__name__})"

# ------------------------------------------------------------------------------------------ b. layer ops


ALL = tuple(DTYPES)


def layer_cases(smoke: bool) -> list:
    """(name, T, E, K, D, F, routing, dtypes, why). Widths are not powers of two (on the GPU not 16-divisible,
    T*K neither). On the GPU every case but one has E in {5, 7}: the kernels' BLOCK_SEG = next_pow2(E+1) = 8
    is a compile-time constant, so each dtype compiles one set of kernels (Triton compiles take most of
    this step's time on a fresh machine)."""
    if smoke:
        return [("T1-E1-K1", 1, 1, 1, 24, 40, "random", ALL, "one token, one expert"),
                ("T7-E2-K2", 7, 2, 2, 40, 24, "random", ALL, "K=E, T not a power of two"),
                ("T50-E7-K2-empty", 50, 7, 2, 40, 24, "empty", ALL, "prime E, expert 0 gets no token"),
                ("T33-E8-K2-one", 33, 8, 2, 24, 40, "one", ALL, "expert 7 takes every token"),
                ("T50-E7-K2-drops", 50, 7, 2, 40, 24, "drops", ALL, "capacity drops 25 % of the assignments")]
    return [("T1-E7-K2", 1, 7, 2, 264, 200, "random", ALL, "one token"),
            ("T999-E5-K5", 999, 5, 5, 264, 200, "random", ALL, "K=E, prime E, T not a power of two"),
            ("T4095-E7-K2-empty", 4095, 7, 2, 264, 200, "empty", ALL, "prime E, expert 0 gets no token"),
            ("T2049-E7-K2-one", 2049, 7, 2, 264, 200, "one", ALL, "expert 6 takes every token"),
            ("T777-E64-K8", 777, 64, 8, 264, 200, "random", ("bf16",), "fine-grained experts, many nearly empty"),
            ("T999-E7-K2-drops", 999, 7, 2, 264, 200, "drops", ALL, "capacity drops 25 % of the assignments")]


def case_inputs(T, E, K, D, Fh, routing, dtype, device, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)  # (T, E) fp32
    if routing == "one":
        logits[:, E - 1] += 20.0  # every token's first choice
    elif routing == "empty":
        logits[:, 0] -= 20.0  # never among the top K < E
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)  # noqa: E731
    # "drops": each expert keeps 3/4 of its balanced share, as a capacity factor of 0.75 would
    capacity = (3 * T * K) // (4 * E) if routing == "drops" else None
    return dict(logits=logits.to(device), x=r(T, D), wg=r(E, D, Fh, scale=D ** -0.5), wu=r(E, D, Fh, scale=D ** -0.5),
                wd=r(E, Fh, D, scale=Fh ** -0.5), dy=r(T, D), K=K, capacity=capacity)


def run_layer_ops(inp: dict, triton: bool, upcast: bool = False) -> dict:
    """Blues' MoE op sequence (blues/moe/layer.py, no capacity) forward and backward; returns every
    intermediate and the gradients of x, logits and the three expert weights."""
    sfx = "" if triton else "_ref"
    op = lambda mod, name: getattr(mod, name + sfx)  # noqa: E731
    leaves = {k: (inp[k].float() if upcast else inp[k]).detach().clone().requires_grad_()
              for k in ("x", "logits", "wg", "wu", "wd")}
    x, logits, wg, wu, wd = (leaves[k] for k in ("x", "logits", "wg", "wu", "wd"))
    K, E = inp["K"], wg.shape[0]
    r = op(route, "moe_route")(logits, K)
    idx = op(perm, "moe_permute_indices")(r.topk_ids, E)
    if inp["capacity"] is not None:  # the layer's capacity cut: dropped assignments sort after every expert
        idx = op(perm, "moe_permute_indices")(drop_over_capacity(r.topk_ids, idx, inp["capacity"], E), E)
    h = op(swiglu, "moe_grouped_swiglu")(x, idx.expert_offsets, wg, wu, idx.sorted_slots, K)  # (S, F)
    out = op(down, "moe_grouped_down_combine")(h, idx.expert_offsets, wd, idx.inverse, r.topk_weights)  # (T, D)
    loss = ((out.float() * inp["dy"].float()).sum() + route.load_balancing_loss(r.counts, r.prob_sum, x.shape[0], K)
            + route.z_loss(r.lse))
    loss.backward()
    res = dict(topk_ids=r.topk_ids, counts=r.counts, sorted_slots=idx.sorted_slots, expert_offsets=idx.expert_offsets,
               inverse=idx.inverse, topk_weights=r.topk_weights, prob_sum=r.prob_sum, lse=r.lse, h=h, out=out)
    res.update({f"d_{k}": v.grad for k, v in leaves.items()})
    return res


EXACT = ("topk_ids", "counts", "sorted_slots", "expert_offsets", "inverse")
ROUTE = ("topk_weights", "prob_sum", "lse")


def compare(got: dict, want: dict, tol: float) -> tuple[dict, list]:
    """Errors per name and the names out of tolerance (exact names must be equal)."""
    errs, bad = {}, []
    for k in got:
        if k in EXACT:
            ok = torch.equal(got[k].cpu(), want[k].cpu())
            errs[k] = "equal" if ok else "DIFFERENT"
        else:
            e = rel_err(got[k], want[k])
            errs[k] = float(f"{e:.3g}")
            ok = e <= (ROUTE_TOL if k in ROUTE else tol)
        if not ok:
            bad.append(k)
    return errs, bad


def step_layer_ops(c: Check) -> None:
    for name, T, E, K, D, Fh, routing, dtypes, why in layer_cases(c.smoke):
        for dname in dtypes:
            c.guarded("b_layer_ops", f"{name}-{dname}",
                      lambda a=(f"{name}-{dname}", T, E, K, D, Fh, routing, dname, why): layer_case(c, *a))


def layer_case(c: Check, name, T, E, K, D, Fh, routing, dname, why) -> None:
    inp = case_inputs(T, E, K, D, Fh, routing, DTYPES[dname], c.device)
    got = run_layer_ops(inp, triton=True)
    want = run_layer_ops(inp, triton=False, upcast=True)
    errs, bad = compare(got, want, TOL[dname])
    c.row("b_layer_ops", name, "fail" if bad else "pass", why=why, tol=TOL[dname], out_of_tolerance=bad, errors=errs)

# ------------------------------------------------------------------------------------------ c. permutation


def drop_over_capacity(ids: torch.Tensor, idx, cap: int, E: int) -> torch.Tensor:
    """blues/moe/layer.py's capacity cut: an assignment ranked past `cap` in its expert's block becomes id E."""
    rank = idx.inverse - idx.expert_offsets[ids.reshape(-1)]  # (S,)
    return torch.where((rank < cap).view(ids.shape), ids, torch.full_like(ids, E))


def step_permutation(c: Check) -> None:
    T = 257 if c.smoke else 16383
    for E, K in ((8, 2), (64, 8), (128, 8), (256, 8), (256, 2)):
        c.guarded("c_permutation", f"E{E}-K{K}", lambda E=E, K=K: permutation_case(c, T, E, K))


def permutation_case(c: Check, T: int, E: int, K: int) -> None:
    """Before and after the capacity cut, as the layer runs it: Triton indices equal the reference's."""
    gen = torch.Generator().manual_seed(E * 31 + K)
    logits = ml.routing_logits(T, E, "zipf", 1.2, gen).to(c.device)  # skewed, so the capacity drops
    ids = torch.topk(logits, K, dim=-1).indices  # (T, K)
    cap = MoEConfig(num_experts=E, top_k=K, capacity_factor=1.0).capacity(T)
    first = perm.moe_permute_indices(ids, E)  # before the cut, then after it, as the layer does
    kept = drop_over_capacity(ids, first, cap, E)
    got = perm.moe_permute_indices(kept, E)
    pairs = ((first, perm.moe_permute_indices_ref(ids, E)), (got, perm.moe_permute_indices_ref(kept, E)))
    same = {f: all(torch.equal(getattr(a, f), getattr(b, f)) for a, b in pairs)
            for f in ("sorted_slots", "expert_offsets", "inverse")}
    S, dropped = T * K, int((kept == E).sum())
    ss, inv = got.sorted_slots, got.inverse
    ar = torch.arange(S, device=c.device)
    invariants = dict(inverts=bool(torch.equal(inv[ss], ar)), kept_first=int(got.expert_offsets[-1]) == S - dropped,
                      grouped=bool(torch.all(kept.reshape(-1)[ss].diff() >= 0)))
    x = torch.randn(T, 40, device=c.device)
    copy_exact = torch.equal(perm.moe_permute(x, ss, K), perm.moe_permute_ref(x, ss, K))
    ok = all(same.values()) and all(invariants.values()) and copy_exact and dropped > 0
    c.row("c_permutation", f"E{E}-K{K}", "pass" if ok else "fail", T=T, capacity=cap, dropped=dropped,
          equal=same, invariants=invariants, permute_copy_exact=copy_exact)

# ------------------------------------------------------------------------------------------ d. host syncs


MODEL_WIDTH = 256  # steps d and h share one config, so the GPU compiles its kernels once for both


def small_config(backend: str, width: int, capacity_factor=None) -> BluesConfig:
    """2 layers, 8 experts top-2, vocabulary 512: the whole model in a few milliseconds on a GPU."""
    return BluesConfig(model=ModelConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=width,
                                         num_kv_heads=2),
                       moe=MoEConfig(num_experts=8, top_k=2, expert_ffn_size=width // 2, router_noise_std=0.0,
                                     moe_backend=backend, capacity_factor=capacity_factor))


def step_no_host_sync(c: Check) -> None:
    names = ("layer", "layer-capacity", "model")
    if c.smoke:
        for name in names:
            c.skip_cuda("d_no_host_sync", name, "torch.cuda.set_sync_debug_mode")
        return
    for name in names:
        c.guarded("d_no_host_sync", name, lambda name=name: _sync_case(c, name))


def _sync_case(c: Check, name: str) -> None:
    status, details = _under_sync_error(_training_step(name, c.device))
    c.row("d_no_host_sync", name, status, **details)


def _training_step(name: str, device: str):
    """A bf16 forward+backward on the Triton backend: the MoE layer (with a capacity cut or without) or the
    whole small model with its loss."""
    from blues.model import Blues
    from blues.moe import MoE
    if name == "model":
        model = Blues(small_config("triton", MODEL_WIDTH)).to(device, torch.bfloat16).train()
        ids = torch.randint(0, 512, (4, 128), device=device)
        return lambda: model(ids, ids).loss.backward()
    layer = MoE(small_config("triton", MODEL_WIDTH, 1.25 if name == "layer-capacity" else None))
    layer = layer.to(device, torch.bfloat16).train()
    x = torch.randn(4, 128, MODEL_WIDTH, device=device, dtype=torch.bfloat16, requires_grad=True)

    def layer_step():
        o = layer(x)
        (o.out.float().sum() + o.aux_loss + o.z_loss).backward()
    return layer_step


def _under_sync_error(fn) -> tuple:
    """(status, details): fn once to compile, then again with every host sync raising."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        return "fail", dict(sync=str(e).splitlines()[0][:300], traceback=traceback.format_exc())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return "pass", {}

# ------------------------------------------------------------------------------------------ e. 2^31 elements


def step_int64_index(c: Check) -> None:
    if c.smoke:
        c.skip_cuda("e_int64_index", "permute-swiglu", "outputs beyond 2^31 elements need ~25 GB of GPU memory")
        return
    free = torch.cuda.mem_get_info()[0]
    if free < 40 * 2**30:
        c.row("e_int64_index", "permute-swiglu", "skipped", reason=f"needs 40 GiB free, {free / 2**30:.0f} GiB free")
        return
    T, K, E, D, Fh = 2**20 + 1, 2, 8, 1024, 1024  # S * D = S * F = 2^31 + 2048 elements
    gen = torch.Generator(device="cuda").manual_seed(3)
    ids = torch.randint(0, E, (T, K), device="cuda", generator=gen)
    idx = perm.moe_permute_indices(ids, E)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    sample = torch.cat([torch.randint(0, T * K, (2048,), device="cuda", generator=gen),
                        torch.arange(T * K - 2048, T * K, device="cuda")])  # random rows and the last ones
    details = {}
    with torch.no_grad():
        xp = perm.moe_permute(x, idx.sorted_slots, K)  # (S, D), 2^31 + 2048 elements
        tok = idx.sorted_slots[sample] // K
        details["permute_rows_exact"] = bool(torch.equal(xp[sample], x[tok]))
        del xp
        xs = x[:, :64].contiguous()  # (T, 64)
        wg = torch.randn(E, 64, Fh, device="cuda", dtype=torch.bfloat16, generator=gen) / 8
        wu = torch.randn(E, 64, Fh, device="cuda", dtype=torch.bfloat16, generator=gen) / 8
        h = swiglu.moe_grouped_swiglu(xs, idx.expert_offsets, wg, wu, idx.sorted_slots, K)  # (S, F), 2^31 + 2048
        e = torch.searchsorted(idx.expert_offsets, sample, right=True) - 1  # expert of each sampled row
        xr = xs[tok].float().unsqueeze(1)  # (n, 1, 64)
        want = (F.silu(torch.bmm(xr, wg[e].float())) * torch.bmm(xr, wu[e].float())).squeeze(1)
        details["swiglu_rel_err"] = rel_err(h[sample], want)
        del h
    torch.cuda.empty_cache()
    ok = details["permute_rows_exact"] and details["swiglu_rel_err"] <= TOL["bf16"]
    c.row("e_int64_index", "permute-swiglu", "pass" if ok else "fail", elements=T * K * D, **details)

# ------------------------------------------------------------------------------------------ f. determinism


def step_determinism(c: Check) -> None:
    T, E, K, D, Fh = (64, 8, 2, 32, 24) if c.smoke else (4095, 7, 2, 264, 200)  # b's bf16 kernels, compiled
    inp = case_inputs(T, E, K, D, Fh, "random", torch.bfloat16, c.device, seed=5)
    a, b = run_layer_ops(inp, triton=True), run_layer_ops(inp, triton=True)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    c.row("f_determinism", f"T{T}-E{E}-K{K}-bf16", "fail" if differ else "pass", differ=differ, compared=len(a))

# ------------------------------------------------------------------------------------------ g. backends


def step_backends(c: Check) -> None:
    from blues.attention import resolve_attn_backend
    from blues.moe import TRITON_OPS, resolve_moe_ops
    dev = torch.device(c.device)
    moe = "triton" if resolve_moe_ops("auto", dev) is TRITON_OPS else "torch"
    want = "triton" if c.device == "cuda" else "torch"
    c.row("g_backends", "moe_auto", "pass" if moe == want else "fail", picked=moe, expected=want)
    attn = {d: resolve_attn_backend("auto", dev, DTYPES[d]) for d in ("bf16", "fp32")}
    c.row("g_backends", "attention_auto", "info", kind="info", picked=attn)
    if c.device != "cuda":
        c.row("g_backends", "sdpa_gqa_kernels", "skipped", kind="info", reason=f"{NEEDS_CUDA}: SDPA's fused kernels")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    takes = {}
    for d in ("bf16", "fp32"):
        q = torch.randn(2, 8, 256, 64, device="cuda", dtype=DTYPES[d])
        kv = torch.randn(2, 2, 256, 64, device="cuda", dtype=DTYPES[d])
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(be):
                    F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
                takes[f"{d}-{be.name}"] = True
            except RuntimeError:
                takes[f"{d}-{be.name}"] = False
    c.row("g_backends", "sdpa_gqa_kernels", "info", kind="info", accepts=takes)

# ------------------------------------------------------------------------------------------ h. model


def step_model(c: Check) -> None:
    from blues.model import Blues
    width, B, T = (64, 2, 32) if c.smoke else (MODEL_WIDTH, 8, 128)
    models = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        models[backend] = Blues(small_config(backend, width)).to(c.device, torch.bfloat16).train()
    ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(7)).to(c.device)
    res = {}
    for backend, m in models.items():
        loss = m(ids, ids).loss
        loss.backward()
        norms = {n: p.grad.float().norm().item() for n, p in m.named_parameters() if p.grad is not None}
        res[backend] = (loss.item(), norms)
    (lt, nt), (lr, nr) = res["triton"], res["torch"]
    total = lambda n: sum(v * v for v in n.values()) ** 0.5  # noqa: E731
    d = dict(loss_triton=lt, loss_torch=lr, loss_rel=abs(lt - lr) / abs(lr), grad_norm_triton=total(nt),
             grad_norm_torch=total(nr), grad_norm_rel=abs(total(nt) - total(nr)) / total(nr),
             worst_param_norm_rel=max(abs(nt[k] - nr[k]) / max(nr[k], 1e-12) for k in nr), params=len(nr))
    # bf16 everywhere: two layers' roundings in another order; routing may flip for near-tied tokens
    ok = d["loss_rel"] <= 1e-2 and d["grad_norm_rel"] <= 5e-2 and sorted(nt) == sorted(nr)
    c.row("h_model", f"bf16-width{width}", "pass" if ok else "fail", tol=dict(loss_rel=1e-2, grad_norm_rel=5e-2), **d)

# ------------------------------------------------------------------------------------------ i. timing

TIMING_IMPLS = ["blues_triton", "blues_torch", "grouped_mm", "floor"]
# Seconds each shape's timing needs on an H100 (estimate: compiles, outputs check, warm-up, reps).
SHAPE_NEED_S = {"S1": 40, "S2": 45, "S3a": 40, "S3b": 70, "tiny": 5}
TARGETS = dict(S2_fwd_bwd_ms=5.0, S2_stretch_ms=4.1, x_grouped_mm=1.2, S3_tflops=400.0)


def step_timing(c: Check) -> None:
    shapes = ["tiny"] if c.smoke else ["S2", "S1", "S3a", "S3b"]  # S2 first: the layer's headline target
    dtype = "fp32" if c.smoke else "bf16"
    reps, warmup = (2, 1) if c.smoke else (10, 2)
    for shape in shapes:
        if c.left_s() < SHAPE_NEED_S[shape]:
            c.row("i_timing", shape, "skipped", kind="timing", reason=f"budget: {c.left_s():.0f} s left")
            continue
        try:
            time_shape(c, shape, dtype, reps, warmup)
        except Exception as e:
            c.row("i_timing", shape, "error", kind="timing", error=repr(e)[:500], traceback=traceback.format_exc())
        if c.device == "cuda":
            torch.cuda.empty_cache()


LAYER_FLOPS_PER = 18  # x T K D F: forward 6 T K D F (three GEMMs), backward 12 T K D F


def round_robin_medians(impls: list, dy: torch.Tensor, clock, reps: int, warmup: int) -> dict:
    """{name: {"fwd", "bwd", "fwd_bwd": median seconds}}: `warmup` rounds, then `reps` rounds that take
    the implementations in turn (as benchmarks/moe_layer.py), so that the machine's drift hits all alike."""
    for _ in range(warmup):
        for impl in impls:
            ml.measure_once(impl, dy, clock)
    samples = {impl.name: [] for impl in impls}
    for _ in range(reps):
        for impl in impls:
            samples[impl.name].append(ml.measure_once(impl, dy, clock))
    return {n: {k: sorted(s[k] for s in v)[len(v) // 2] for k in ("fwd", "bwd", "fwd_bwd")} for n, v in samples.items()}


def time_shape(c: Check, shape: str, dtype: str, reps: int, warmup: int) -> None:
    T, D, Fh, E, K = ml.SHAPES[shape]
    p = ml.make_problem(shape, "balanced", DTYPES[dtype], c.device, 1.2)
    impls = []
    for name in TIMING_IMPLS:
        try:
            impls.append(ml.build_impl(name, p))
        except ml.ImplUnavailable as e:
            c.row("i_timing", f"{shape}-{name}", "info", kind="timing", available=False, reason=str(e))
    errs = ml.check_outputs(impls, p)  # blues_triton too: in the interpreter on a CPU
    for name, e in errs.items():
        ok = ml.output_ok(name, e, dtype)
        c.row("i_timing", f"{shape}-{name}-output", "pass" if ok else "fail", rel_err=e, tol=ml.OUTPUT_TOL[dtype])
    if c.device != "cuda":  # interpreter timings mean nothing
        c.row("i_timing", f"{shape}-blues_triton", "skipped", kind="timing", reason=f"{NEEDS_CUDA}: CUDA timings")
        impls = [i for i in impls if i.name != "blues_triton"]
    med = round_robin_medians(impls, p["dy"], ml.Clock(c.device), reps, warmup)
    flops = LAYER_FLOPS_PER * T * K * D * Fh
    for impl in impls:
        m = med[impl.name]
        row = dict(T=T, D=D, F=Fh, E=E, K=K, dtype=dtype, reps=reps, fwd_ms=m["fwd"] * 1e3, bwd_ms=m["bwd"] * 1e3,
                   fwd_bwd_ms=m["fwd_bwd"] * 1e3, fwd_bwd_tflops=flops / m["fwd_bwd"] / 1e12,
                   x_floor=m["fwd_bwd"] / med["floor"]["fwd_bwd"] if "floor" in med else None,
                   peak_bytes=ml.peak_memory(impl, p["dy"], c.device) if c.device == "cuda" else None)
        c.row("i_timing", f"{shape}-{impl.name}", "info", kind="timing", **row)
    if "blues_triton" in med:
        c.row("i_timing", f"{shape}-targets", "info", kind="timing", **targets(shape, med, flops))
    if shape in ("S2", "tiny"):  # the per-kernel breakdown; on CPU the ops of the torch paths
        profiled = ("blues_triton", "grouped_mm") if c.device == "cuda" else ("blues_torch", "grouped_mm")
        for impl in impls:
            if impl.name in profiled:
                c.row("i_timing", f"{shape}-{impl.name}-profile", "info", kind="timing",
                      top_kernels=profile(impl, p["dy"], c.device))


def targets(shape: str, med: dict, flops: float) -> dict:
    """Issue 11's acceptance targets for this shape, met or not (reported, never asserted)."""
    ms = med["blues_triton"]["fwd_bwd"] * 1e3
    out = dict(blues_triton_ms=ms)
    if "grouped_mm" in med:
        out["x_grouped_mm"] = med["grouped_mm"]["fwd_bwd"] * 1e3 / ms
        if shape in ("S1", "S2"):
            out["met_x_grouped_mm"] = out["x_grouped_mm"] >= TARGETS["x_grouped_mm"]
    if shape == "S2":
        out.update(met_5ms=ms < TARGETS["S2_fwd_bwd_ms"], met_stretch=ms < TARGETS["S2_stretch_ms"])
    if shape.startswith("S3"):
        out["tflops"] = flops / ms * 1e3 / 1e12
        out["met_400tflops"] = out["tflops"] >= TARGETS["S3_tflops"]
    return out


def profile(impl, dy: torch.Tensor, device: str, top: int = 12) -> list:
    """The top kernels (CUDA) or ops (CPU) by self time over one forward+backward."""
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        impl.forward().backward(dy)
        sync(device)
    averages = list(prof.key_averages())
    attr = "self_cpu_time_total"
    if device == "cuda":  # renamed from self_cuda_time_total in torch 2.4
        attr = "self_device_time_total" if averages and hasattr(averages[0], "self_device_time_total") \
            else "self_cuda_time_total"
    events = sorted(averages, key=lambda e: getattr(e, attr, 0), reverse=True)
    total = sum(getattr(e, attr, 0) for e in events) or 1
    return [dict(name=e.key[:120], calls=e.count, ms=getattr(e, attr, 0) / 1e3,
                 share=round(getattr(e, attr, 0) / total, 3)) for e in events[:top] if getattr(e, attr, 0) > 0]

# ------------------------------------------------------------------------------------------ j. loss

LOSS_SHAPE = dict(N=16384, D=2048, V=32768)  # 8 x 2048 tokens of a 2048-wide model, a 32k vocabulary


def step_loss(c: Check) -> None:
    """blues.loss's fused, chunked loss (the default head, with the GPU chunk rule) against the unfused
    head in bf16: loss and gradients, then forward+backward time and peak memory of each."""
    import torch.nn.functional as F

    from blues.loss import fused_linear_cross_entropy
    N, D, V = (96, 32, 53) if c.smoke else (LOSS_SHAPE["N"], LOSS_SHAPE["D"], LOSS_SHAPE["V"])
    g = torch.Generator().manual_seed(11)
    h0 = torch.randn(N, D, generator=g).to(c.device, torch.bfloat16)
    w0 = (torch.randn(V, D, generator=g) * D ** -0.5).to(c.device, torch.bfloat16)
    t = torch.randint(0, V, (N,), generator=g).to(c.device)
    fns = {"fused": lambda h, w: fused_linear_cross_entropy(h, w, t),
           "unfused": lambda h, w: F.cross_entropy((h @ w.T).float(), t)}
    runs = {}
    for name, fn in fns.items():
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        loss = fn(h, w)
        loss.backward()
        runs[name] = (loss.item(), h.grad, w.grad)
    (lf, hf, wf), (lu, hu, wu) = runs["fused"], runs["unfused"]
    d = dict(N=N, D=D, V=V, loss_rel=abs(lf - lu) / abs(lu), grad_h_rel=rel_err(hf, hu), grad_w_rel=rel_err(wf, wu))
    # The same bf16 logits (fp32 sums in another order); each path rounds the gradients to bf16 once, at
    # another point: within two bf16 ulps (2^-7) of the largest gradient (tests/test_loss.py)
    tol = dict(loss_rel=1e-4, grad_h_rel=2 * 2 ** -7, grad_w_rel=2 * 2 ** -7)
    ok = all(d[k] <= v for k, v in tol.items())
    c.row("j_loss", f"bf16-N{N}-D{D}-V{V}", "pass" if ok else "fail", tol=tol, **d)
    clock, reps = ml.Clock(c.device), (2 if c.smoke else 10)
    times = {name: [] for name in fns}
    for i in range(reps + 1):  # the first round warms up, the rest alternate
        for name, fn in fns.items():
            h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            if c.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if c.device == "cuda" else 0
            dt = clock.time(lambda fn=fn, h=h, w=w: fn(h, w).backward())
            if i:
                times[name].append(dt)
            if c.device == "cuda" and i == reps:
                d[f"{name}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    for name, ts in times.items():
        d[f"{name}_fwd_bwd_ms"] = sorted(ts)[len(ts) // 2] * 1e3
    d["x_unfused"] = d["unfused_fwd_bwd_ms"] / d["fused_fwd_bwd_ms"]
    c.row("j_loss", "timing", "info", kind="timing", **{k: v for k, v in d.items() if k not in tol})

# ------------------------------------------------------------------------------------------ main

def print_summary(c: Check) -> None:
    """The table the device tool's reply shows last: timings, targets, and every row that did not pass."""
    heads = ("fwd ms", "bwd ms", "f+b ms", "TFLOP/s", "x floor", "peak GB")
    print("\n" + f"{'timing':24s} " + " ".join(f"{h:>9s}" for h in heads))
    for r in c.rows:
        if "fwd_bwd_ms" in r:
            print(f"{r['name']:24s} {r['fwd_ms']:9.3f} {r['bwd_ms']:9.3f} {r['fwd_bwd_ms']:9.3f} "
                  f"{r['fwd_bwd_tflops']:9.1f} {r['x_floor'] or float('nan'):9.2f} {(r['peak_bytes'] or 0) / 1e9:9.2f}")
        elif r["name"].endswith("-targets"):
            print(f"{r['name']:24s} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in r.items() if k not in ("step", "name", "status", "kind")))
    for r in c.rows:
        if r["status"] not in ("pass", "info"):
            why = r.get("reason") or r.get("error") or r.get("sync") or r.get("out_of_tolerance") or ""
            print(f"{r['status']:7s} {r['step']}/{r['name']}: {why}")


STEPS = [  # (name, function, kind of its error rows). Only timing is cut by the budget: the correctness
    # steps always run (launch/gpu_check.sh's hard timeout is the backstop).
    ("a_env", step_env, "correctness"),
    ("b_layer_ops", step_layer_ops, "correctness"),
    ("c_permutation", step_permutation, "correctness"),
    ("d_no_host_sync", step_no_host_sync, "correctness"),
    ("e_int64_index", step_int64_index, "correctness"),
    ("f_determinism", step_determinism, "correctness"),
    ("g_backends", step_backends, "correctness"),
    ("h_model", step_model, "correctness"),
    ("i_timing", step_timing, "timing"),
    ("j_loss", step_loss, "correctness"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.jsonl (created)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton's interpreter (what CI runs)")
    ap.add_argument("--budget_s", type=float, default=420.0, help="seconds after which remaining steps are skipped")
    ap.add_argument("--steps", nargs="+", default=None, metavar="STEP",
                    help=f"run only these steps, by name or letter (default all: {' '.join(n for n, _, _ in STEPS)})")
    args = ap.parse_args(argv)
    names = [n for n, _, _ in STEPS]
    wanted = set(names) if args.steps is None else {n for n in names for s in args.steps if n == s or n[0] == s}
    if args.steps is not None and len(wanted) < len(set(args.steps)):
        raise ValueError(f"--steps {' '.join(args.steps)}: expected step names or letters from {' '.join(names)}")
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--smoke needs TRITON_INTERPRET=1 before triton is imported: run this file as a script")
    if not args.smoke and not torch.cuda.is_available():
        raise ValueError("no CUDA device here: the full check needs a GPU; on a CPU run it with --smoke")
    if args.smoke:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    c = Check(args.out, args.budget_s, args.smoke)
    for name, fn, kind in STEPS:
        if name in wanted:
            c.guarded(name, "*", lambda fn=fn: fn(c), kind)
    leaked = sorted(m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed."))
    c.row("imports", "no_deepspeed", "fail" if leaked else "pass", deepspeed_modules=leaked[:5])
    print_summary(c)
    print(f"gpu_check: {len(c.failed)} correctness failure(s){': ' + ', '.join(c.failed) if c.failed else ''}; "
          f"rows in {c.path}; {time.monotonic() - c.t0:.0f} s", flush=True)
    return 1 if c.failed else 0


if __name__ == "__main__":
    from blues.common import run_cli
    sys.exit(run_cli("gpu_check", main))
