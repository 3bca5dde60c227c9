"""Tile sweep of the grouped-GEMM kernels on a GPU (issue 11, part 5): which (BLOCK_M, BLOCK_N, BLOCK_K,
num_warps, num_stages) each kernel kind should launch with, chosen by timing the whole MoE layer.

    python benchmarks/kernel_tiles.py --out DIR [--budget_s 300] [--shapes S3b S2 S1]   # on the GPU
    python benchmarks/kernel_tiles.py --smoke --out DIR     # CPU, tiny shape, Triton's interpreter (CI)

Runs where benchmarks/gpu_check.py runs (a borrowed machine, no install: Blues from the tree, no deepspeed).
For each shape, each kind of blues.kernels.moe_grouped_gemm's tile table ('swiglu': gate/up forward with
the gather and SwiGLU; 'gemm': the down projection and its input gradient; 'swiglu_dx': the SwiGLU input
gradient; 'dw': every weight gradient) and each candidate tile, the layer's forward+backward is timed with
that one entry changed and the rest at the table in the code (`set_gpu_tiles`; weight gradients by the
Triton kernel). The kinds are separate kernels, so their effects add up. Then:
  chosen     per kind, the candidate with the least geometric-mean time relative to the best of each shape
  per_shape  per kind and shape, the fastest candidate (what a shape-keyed table would give)
and a side-by-side timing at every shape (round-robin, median of 10) of Blues with the table in the code
and the Triton weight-gradient kernel (`triton_dw`), the same with `set_dw_backend("auto")` (`auto_dw`:
torch._grouped_mm for the weight gradients where it runs, what an H100/H200 gets), `chosen` and
`per_shape` when a sweep ran, torch._grouped_mm's layer and the dense-GEMM floor, each output and every
gradient checked against the first's; then a per-kernel profile of `auto_dw` at S2 and S3b. Rows go to
DIR/kernel_tiles.jsonl (one JSON row each). `--shapes` with no shape runs only the final timing.

The candidates are those of each kind that compile for sm_90 without spilling registers (cuobjdump on
the cubin, checked on a CPU machine with triton 3.9 and 3.6; registers in the comments). Interpreter
timings mean nothing, so --smoke only shows the script runs end to end (the interpreter ignores tiles).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see gpu_check.py)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check as gc  # noqa: E402  (registers blues.kernels from this checkout)
import moe_layer as ml  # noqa: E402
import torch  # noqa: E402

from blues.kernels import moe_grouped_gemm as gg  # noqa: E402

# kind: candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the table's entry first.
# Registers per thread in bf16 on sm_90 (two numbers: the kind's two launches), CTAs per SM.
CANDIDATES = {
    "swiglu": [
        (128, 64, 64, 8, 3),  # 125 regs, 96 KiB, 2 CTAs
        (128, 64, 64, 8, 4),  # 125 regs, 128 KiB, 1 CTA
        (64, 64, 64, 4, 4),  # 128 regs, 96 KiB, 2 CTAs
        # 128x128 and 64x128 tiles spill (two fp32 accumulators): left out
    ],
    "gemm": [
        (128, 128, 64, 8, 3),  # 121/150 regs, 96 KiB
        (128, 128, 64, 8, 4),  # 121/150, 128 KiB
        (128, 256, 64, 8, 3),  # 230/255, 144 KiB
        (128, 256, 64, 8, 4),  # 243/255, 192 KiB
        (256, 128, 64, 8, 3),  # 230/254, 144 KiB
        (128, 128, 128, 8, 3),  # 151/164, 192 KiB
        (64, 128, 64, 4, 4),  # 140/164, 96 KiB, 2 CTAs
    ],
    "swiglu_dx": [
        (128, 128, 32, 8, 4),  # 127 regs, 64 KiB, 2 CTAs
        (128, 128, 64, 8, 3),  # 167, 96 KiB, 1 CTA
        (128, 128, 64, 8, 4),  # 168, 128 KiB
        (128, 256, 64, 8, 3),  # 248, 144 KiB
        (64, 128, 64, 4, 4),  # 192, 96 KiB, 2 CTAs
    ],
    "dw": [  # BLOCK_K is the rows per step
        (128, 128, 64, 8, 3),  # 118/112 regs, 64 KiB, 2 CTAs
        (128, 128, 64, 8, 4),  # 118/112, 64 KiB
        (128, 128, 32, 8, 4),  # 110/106, 32 KiB
        (128, 256, 64, 8, 3),  # 200, 96 KiB, 1 CTA
        (256, 128, 64, 8, 3),  # 198/195, 96 KiB
        (128, 128, 128, 8, 3),  # 126/124, 129 KiB
        (64, 128, 64, 4, 4),  # 128, 48 KiB, 4 CTAs
    ],
}


class TiledImpl(ml.Impl):
    """Blues-Triton's layer with a given tile table and weight-gradient backend (`set_dw_backend`): set
    on each forward, which the backward that follows (before any other implementation runs) also uses."""

    def __init__(self, p: dict, name: str, tiles: dict, dw_backend: str = "triton"):
        self.inner, self.name = ml.BluesImpl(p, triton=True, fused=True), name
        self.tiles, self.dw_backend = tiles, dw_backend

    def forward(self):
        gg.set_gpu_tiles(**self.tiles)
        gg.set_dw_backend(self.dw_backend)
        return self.inner.forward()

    def params(self):
        return self.inner.params()


def layer_ms(impl: TiledImpl, dy: torch.Tensor, clock: ml.Clock, reps: int, warmup: bool = True) -> float:
    if warmup:  # compiles
        impl.forward().backward(dy)
        ml._zero(impl)
    times = []
    for _ in range(reps):
        times.append(clock.time(lambda: impl.forward().backward(dy)))
        ml._zero(impl)
    return sorted(times)[len(times) // 2] * 1e3


def sweep_shape(c: gc.Check, shape: str, table: dict, reps: int) -> dict:
    """{kind: {tile: ms}} for one shape; one row per measurement."""
    p = ml.make_problem(shape, "balanced", torch.float32 if c.smoke else torch.bfloat16, c.device, 1.2)
    clock = ml.Clock(c.device)
    out = {}
    for kind, cands in CANDIDATES.items():
        out[kind] = {}
        for tile in cands[:2] if c.smoke else cands:  # the interpreter ignores tiles: two show the loop works
            try:
                impl = TiledImpl(p, f"{kind}={tile}", {**table, kind: tile})
                ms = layer_ms(impl, p["dy"], clock, reps, warmup=not c.smoke)
                out[kind][tile] = ms
                c.row("sweep", f"{shape}-{kind}-{'x'.join(map(str, tile))}", "info", kind="timing", shape=shape,
                      tile_kind=kind, tile=tile, fwd_bwd_ms=ms)
            except Exception as e:  # a tile that does not launch here (shared memory, ...) is recorded
                c.row("sweep", f"{shape}-{kind}-{'x'.join(map(str, tile))}", "error", kind="timing", shape=shape,
                      tile_kind=kind, tile=tile, error=repr(e)[:300])
            finally:
                gg.set_gpu_tiles(**table)
    del p
    if c.device == "cuda":
        torch.cuda.empty_cache()
    return out


def choose(results: dict, table: dict) -> tuple[dict, dict]:
    """(chosen, per_shape): see the module docstring."""
    chosen, per_shape = {}, {}
    for kind in CANDIDATES:
        scores = {}
        for shape, by_kind in results.items():
            times = by_kind.get(kind, {})
            if not times:
                continue
            best = min(times.values())
            per_shape.setdefault(shape, {})[kind] = min(times, key=times.get)
            for tile, ms in times.items():
                scores.setdefault(tile, []).append(math.log(ms / best))
        n = max((len(v) for v in scores.values()), default=0)
        complete = {t: sum(v) / n for t, v in scores.items() if len(v) == n}  # measured at every shape
        chosen[kind] = min(complete, key=complete.get) if complete else table[kind]
    return chosen, per_shape


def tile_grad_errors(impls: list, dy: torch.Tensor) -> dict:
    """Largest max|g - g_table| / max|g_table| over the layer's input, router and weight gradients of
    each tiled implementation against the first (the table in the code): a tile changes only the order
    of fp32 sums, so these stay within the dtype's output tolerance (benchmarks/moe_layer.py)."""
    grads = {}
    for impl in impls:
        ml._zero(impl)
        impl.forward().backward(dy)
        grads[impl.name] = [prm.grad.float().clone() for prm in impl.params()]
        ml._zero(impl)
    base = grads[impls[0].name]
    return {name: max(((g - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for g, b in zip(gs, base))
            for name, gs in grads.items()}


def final_timing(c: gc.Check, shape: str, table: dict, chosen: dict, per_shape: dict, reps: int) -> None:
    T, D, Fh, E, K = ml.SHAPES[shape]
    dtype = "fp32" if c.smoke else "bf16"
    p = ml.make_problem(shape, "balanced", ml.DTYPES[dtype], c.device, 1.2)
    impls = [TiledImpl(p, "triton_dw", table), TiledImpl(p, "auto_dw", table, "auto")]
    if chosen:  # a sweep ran
        impls += [TiledImpl(p, "chosen", {**table, **chosen}), TiledImpl(p, "per_shape", {**table, **per_shape[shape]})]
    tiled = len(impls)
    for name in ("grouped_mm", "floor"):
        try:
            impls.append(ml.build_impl(name, p))
        except ml.ImplUnavailable as e:
            c.row("final", f"{shape}-{name}", "info", kind="timing", available=False, reason=str(e))
    errs = ml.check_outputs([i for i in impls if i.name != "floor"], p)
    med = gc.round_robin_medians(impls, p["dy"], ml.Clock(c.device), reps, warmup=1)
    grad_errs = tile_grad_errors(impls[:tiled], p["dy"])
    flops = gc.LAYER_FLOPS_PER * T * K * D * Fh
    for impl in impls:
        m = med[impl.name]
        row = dict(shape=shape, T=T, D=D, F=Fh, E=E, K=K, dtype=dtype, reps=reps, fwd_ms=m["fwd"] * 1e3,
                   bwd_ms=m["bwd"] * 1e3, fwd_bwd_ms=m["fwd_bwd"] * 1e3, fwd_bwd_tflops=flops / m["fwd_bwd"] / 1e12)
        if "floor" in med:
            row["x_floor"] = m["fwd_bwd"] / med["floor"]["fwd_bwd"]
        if "grouped_mm" in med and impl.name != "floor":
            row["x_grouped_mm"] = med["grouped_mm"]["fwd_bwd"] / m["fwd_bwd"]  # > 1: faster than grouped_mm
        if impl.name in errs:
            row["rel_err"] = errs[impl.name]
            row["output_ok"] = ml.output_ok(impl.name, errs[impl.name], dtype)
        if isinstance(impl, TiledImpl):
            row["tiles"] = {k: impl.tiles[k] for k in CANDIDATES}
            row["dw_backend"] = impl.dw_backend
            row["grad_rel_err"] = grad_errs[impl.name]
            if row["grad_rel_err"] > ml.OUTPUT_TOL[dtype]:
                row["output_ok"] = False
        ok = row.get("output_ok", True) is not False
        c.row("final", f"{shape}-{impl.name}", "info" if ok else "fail", kind="timing" if ok else "correctness", **row)
    if c.device == "cuda" and shape in ("S2", "S3b"):  # what runs on an H100/H200: the table, "auto"
        c.row("final", f"{shape}-auto_dw-profile", "info", kind="timing",
              top_kernels=gc.profile(impls[1], p["dy"], c.device, top=14))
    gg.set_gpu_tiles(**table)  # what the code ships, for whatever runs next
    gg.set_dw_backend("auto")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget_s", type=float, default=300.0)
    ap.add_argument("--shapes", nargs="*", default=None,
                    help="sweep shapes (default S3b S2 S1; tiny with --smoke; none: only the final timing)")
    ap.add_argument("--final_shapes", nargs="+", default=None, help="default S2 S1 S3a S3b; tiny with --smoke")
    args = ap.parse_args(argv)
    c = gc.Check(args.out, args.budget_s, args.smoke, name="kernel_tiles")
    if not args.smoke and not torch.cuda.is_available():
        print("kernel_tiles: needs CUDA (or --smoke)", file=sys.stderr)
        return 2
    gc.step_env(c)
    # S3b first: the furthest from its target
    shapes = args.shapes if args.shapes is not None else (["tiny"] if args.smoke else ["S3b", "S2", "S1"])
    final_shapes = args.final_shapes or (["tiny"] if args.smoke else ["S2", "S1", "S3a", "S3b"])
    sweep_reps, final_reps = (1, 1) if args.smoke else (3, 10)
    # seconds a shape's sweep and its final timing need on an H200, compiles included (estimates from the
    # first gpu_check run there, 2026-11-28: S3b's layer takes 90 ms forward+backward, S2's 6 ms)
    sweep_need = {"tiny": 0, "S2": 40, "S1": 45, "S3b": 70}
    final_need = {"tiny": 0, "S2": 10, "S1": 10, "S3a": 10, "S3b": 20}
    table = gg.gpu_tiles()
    c.row("sweep", "table", "info", kind="timing", tiles=table)
    results = {}
    for shape in shapes:
        if c.left_s() < sweep_need[shape] + sum(final_need[s] for s in final_shapes):
            c.row("sweep", shape, "skipped", kind="timing", reason=f"budget: {c.left_s():.0f} s left")
            continue
        t0 = time.monotonic()
        try:
            results[shape] = sweep_shape(c, shape, table, sweep_reps)
        except Exception as e:
            c.row("sweep", shape, "error", kind="timing", error=repr(e)[:300], traceback=traceback.format_exc())
        c.row("sweep", f"{shape}-seconds", "info", kind="timing", seconds=round(time.monotonic() - t0, 1))
    chosen, per_shape = choose(results, table) if results else ({}, {})
    c.row("choose", "chosen", "info", kind="timing", tiles=chosen, per_shape=per_shape)
    for shape in final_shapes:
        if c.left_s() < final_need[shape]:
            c.row("final", shape, "skipped", kind="timing", reason=f"budget: {c.left_s():.0f} s left")
            continue
        try:
            final_timing(c, shape, table, chosen, per_shape, final_reps)
        except Exception as e:
            c.row("final", shape, "error", kind="timing", error=repr(e)[:300], traceback=traceback.format_exc())
        if c.device == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'final':24s} {'fwd ms':>9s} {'bwd ms':>9s} {'f+b ms':>9s} {'TFLOP/s':>9s} {'x floor':>8s} {'x gmm':>7s}")
    for r in c.rows:
        if r["step"] == "final" and "fwd_bwd_ms" in r:
            print(f"{r['name']:24s} {r['fwd_ms']:9.3f} {r['bwd_ms']:9.3f} {r['fwd_bwd_ms']:9.3f} "
                  f"{r['fwd_bwd_tflops']:9.1f} {r.get('x_floor') or 0:8.2f} {r.get('x_grouped_mm') or 0:7.2f}")
    print(f"chosen: {chosen}\nper shape: {per_shape}")
    print(f"kernel_tiles: {len(c.failed)} failure(s); rows in {c.path}; {time.monotonic() - c.t0:.0f} s")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
