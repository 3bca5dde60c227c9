"""The memory probe against the truth: its choice vs the largest micro-batch found by trying every size.

    python benchmarks/memory_probe.py --device cuda --nproc 1 --preset blues01 \
        --deepspeed_config ds_configs/zero2.json [key=value ...]                    # on a GPU machine
    python benchmarks/memory_probe.py --device cpu --nproc 2 --memory_budget 1.6GB  # CPU, against a budget

Three runs of blues-probe on the same model, DeepSpeed config and ranks:
1. the probe as users run it (growth 1, 2, 4, ... then binary search, router forced to its worst
   imbalance): its choice and its wall time;
2. --search linear with the same forced routing: every size from 1 to the first miss, the true
   maximum under the probe's conditions (the probe must equal it);
3. --search linear with --router_skew 0 (real routing on random tokens): what the safety margin of
   the forced routing costs (only with --real_routing; skipped by default to save time).
and the analytical estimate's error at every measured size (vs the growth over the process
baseline on CPU, vs torch's allocated peak on CUDA), overall and for the per-sample growth.

Prints a table and appends one JSON row to benchmarks/results/memory_probe.jsonl.
The CPU defaults are a model whose LM head dominates (vocab 32768, block 256, width 64): about
125 MiB per sequence, so a budget of a few GiB gives a choice in the tens of sequences.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from benchmarks._common import write_rows  # noqa: E402

CPU_MODEL = ["n_embd=64", "n_layer=1", "n_head=4", "num_kv_heads=1", "block_size=256", "vocab_size=32768",
             "num_experts=4", "expert_ffn_size=128"]


def probe(args, out_dir: str, *extra: str) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "blues.cli.probe", "--deepspeed_config", args.deepspeed_config,
           "--nproc_per_node", str(args.nproc), "--device", args.device, "--headroom", str(args.headroom),
           "--max_micro_batch", str(args.max_micro_batch), "--out_dir", out_dir, *extra]
    if args.preset:
        cmd += ["--preset", args.preset]
    if args.config:
        cmd += ["--config", args.config]
    if args.memory_budget:
        cmd += ["--memory_budget", args.memory_budget]
    cmd += args.overrides
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    sys.stdout.write(r.stdout)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"blues-probe failed ({' '.join(extra) or 'default search'}): exit {r.returncode}")
    with open(os.path.join(out_dir, "report.json")) as f:
        return json.load(f), seconds


def estimate_errors(report: dict) -> dict:
    total = [t["estimate_error"] for t in report["trials"] if t.get("estimate_error") is not None]
    marginal = [t["marginal"]["error"] for t in report["trials"]
                if t.get("marginal") and t["marginal"]["error"] is not None]
    worst = lambda xs: max(xs, key=abs) if xs else None  # noqa: E731
    at_choice = next((t["estimate_error"] for t in report["trials"]
                      if t["micro_batch"] == report["micro_batch_size"]), None)
    return {"estimate_error_worst": worst(total), "estimate_error_at_choice": at_choice,
            "marginal_error_worst": worst(marginal),
            "by_micro_batch": {t["micro_batch"]: {"estimate": t["estimate"]["total"],
                                                  "measured": t.get("measured_for_estimate"),
                                                  "peak_max_rank": max(r["peak"] for r in t["ranks"]),
                                                  "fits": t["fits"]}
                               for t in sorted(report["trials"], key=lambda t: t["micro_batch"])}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cpu")
    p.add_argument("--nproc", type=int, default=2, help="ranks (GPUs, or CPU processes)")
    p.add_argument("--preset")
    p.add_argument("--config")
    p.add_argument("--deepspeed_config", default=os.path.join(REPO, "ds_configs", "zero2.json"))
    p.add_argument("--memory_budget", help="CPU: bytes per rank (default 1.6GB); CUDA: default the device")
    p.add_argument("--headroom", type=float, default=0.9)
    p.add_argument("--max_micro_batch", type=int, default=1024)
    p.add_argument("--real_routing", action="store_true", help="also find the maximum under real routing")
    p.add_argument("--out", default=os.path.join(HERE, "results", "memory_probe.jsonl"))
    args = p.parse_args()
    if args.device == "cpu":
        args.memory_budget = args.memory_budget or "1.6GB"
        if not args.preset and not args.config and not args.overrides:
            args.overrides = list(CPU_MODEL)

    with tempfile.TemporaryDirectory(prefix="blues_probe_bench_") as tmp:
        print("== the probe (growth + binary search, forced routing)")
        rep, probe_s = probe(args, os.path.join(tmp, "probe"))
        print("== every size from 1 (forced routing): the true maximum")
        lin, linear_s = probe(args, os.path.join(tmp, "linear"), "--search", "linear")
        real = real_s = None
        if args.real_routing:
            print("== every size from 1, real routing")
            real, real_s = probe(args, os.path.join(tmp, "real"), "--search", "linear", "--router_skew", "0")

    row = {
        "bench": "memory_probe",
        "device": args.device,
        "world_size": rep["world_size"],
        "config": args.config or args.preset or "tiny",
        "overrides": args.overrides,
        "deepspeed_config": os.path.relpath(args.deepspeed_config, REPO),
        "budget": args.memory_budget or "device memory",
        "headroom": args.headroom,
        "probe_choice": rep["micro_batch_size"],
        "true_max": lin["micro_batch_size"],
        "probe_equals_true_max": rep["micro_batch_size"] == lin["micro_batch_size"],
        "probe_trials": len(rep["trials"]),
        "probe_seconds": round(probe_s, 1),
        "linear_trials": len(lin["trials"]),
        "linear_seconds": round(linear_s, 1),
        "real_routing_max": real["micro_batch_size"] if real else None,
        "real_routing_seconds": round(real_s, 1) if real_s else None,
        **{k: v for k, v in estimate_errors(lin).items()},
    }
    print()
    print(f"probe choice {row['probe_choice']} in {row['probe_seconds']} s ({row['probe_trials']} trials); "
          f"true maximum {row['true_max']} ({row['linear_trials']} trials, {row['linear_seconds']} s)"
          + (f"; real routing {row['real_routing_max']}" if real else ""))
    print(f"{'micro_batch':>11} {'estimate MiB':>13} {'measured MiB':>13} {'error':>7} {'peak MiB':>9} fits")
    for b, t in row["by_micro_batch"].items():
        err = (t["estimate"] - t["measured"]) / t["measured"] if t["measured"] else float("nan")
        print(f"{b:>11} {t['estimate'] / 2**20:>13.1f} {t['measured'] / 2**20:>13.1f} {100 * err:>6.0f}% "
              f"{t['peak_max_rank'] / 2**20:>9.1f} {'yes' if t['fits'] else 'no'}")
    print(f"estimate error: worst {row['estimate_error_worst']}, at the choice {row['estimate_error_at_choice']}; "
          f"per-sample growth: worst {row['marginal_error_worst']}")
    write_rows(args.out, [row])
    print(f"wrote a row to {args.out}")
    return 0 if row["probe_equals_true_max"] else 1


if __name__ == "__main__":
    sys.exit(main())
