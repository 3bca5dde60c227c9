"""Balancing without an auxiliary loss: the expert load with and without the selection bias.

    python benchmarks/balance.py                      # tiny preset at MEASURED, 300 steps, gamma 0.01, windows of 50
    python benchmarks/balance.py --small --steps 100  # the faster setting tests/train/test_balance.py runs

Both runs train through blues.train.build_engine / train_steps (DeepSpeed engine, the built-in ZeRO 2
config, one process) on the built-in corpus with the auxiliary loss off (aux_loss_coef=0): one with
balance_bias_rate=0, one with balance_bias_rate=gamma, from the same seed. For each window of steps the
row holds max/mean load, the largest over MoE layers of max_e c[l, e] / mean_e c[l, e] with c the
assignments chosen per expert in the window (before any capacity): 1.0 is even, E/K the most (2.0 for
the tiny preset's 4 experts top-2: every token on the same two experts). Prints a table and writes
benchmarks/results/balance.json with the machine and its load.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# The shape benchmarks/results/balance.json and the test were measured at: the tiny preset as it was before
# issue 15 retuned it (4 experts top-2, 8 sequences a step, no routed scale, lr 2e-3 with 20 warmup steps).
MEASURED = dict(num_experts=4, micro_batch_size=8, routed_scaling_factor=1.0, router_noise_std=0.1, lr=2e-3,
                min_lr=2e-4, warmup_steps=20)
SMALL = dict(n_embd=64, block_size=32, micro_batch_size=4)  # 128 tokens a step: ~15 steps/s on one core


def run_one(gamma: float, args, data: str, dist) -> dict:
    """Train `args.steps` steps at balance_bias_rate=gamma; max/mean load per window of `args.window` steps."""
    import torch

    from blues import train as T
    from blues.presets import get_preset
    from blues.train.balance import get_bias, max_over_mean
    from blues.train.ds_config import BUILTIN_DS_CONFIG

    cfg = get_preset(args.preset).replace(**{**MEASURED, **(SMALL if args.small else {})}, aux_loss_coef=0.0,
                                          balance_bias_rate=gamma, max_steps=args.steps, data_dir=data,
                                          out_dir=os.path.join(data, f"out_{gamma}"))
    run = T.build_engine(cfg, BUILTIN_DS_CONFIG, dist=dist)
    ratios, losses, t0 = [], [], time.perf_counter()
    for _ in range(args.steps // args.window):
        window = torch.zeros(run.num_moe_layers, cfg.moe.num_experts, dtype=torch.float64)  # (L, E)
        for r in T.train_steps(run, args.window):
            window += r.expert_selected
            losses.append(r.loss)
        ratios.append(round(max_over_mean(window), 4))
    bias = get_bias(run.model)
    return {"balance_bias_rate": gamma, "max_over_mean": ratios, "loss_first": losses[0],
            "loss_last_window_mean": sum(losses[-args.window:]) / args.window,
            "bias_abs_max": None if bias is None else float(bias.abs().max()),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--small", action="store_true", help="64 wide, 32 tokens, 4 sequences a step (the test's setting)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window", type=int, default=50, help="steps per max/mean load figure")
    p.add_argument("--gamma", type=float, default=0.01, help="balance_bias_rate of the balanced run")
    p.add_argument("--out", default=os.path.join(HERE, "results", "balance.json"))
    args = p.parse_args(argv)
    if args.steps % args.window:
        p.error(f"--steps {args.steps} must be a multiple of --window {args.window}")

    import torch

    from blues import train as T
    from blues.data.prepare import prepare

    dist = T.init_distributed()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="blues_balance_") as data:
        prepare(data_dir=data, progress=False)
        runs = [run_one(g, args, data, dist) for g in (0.0, args.gamma)]
    load_after = os.getloadavg()
    row = {"benchmark": "balance", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                      else f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})"),
           "torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__, "preset": args.preset,
           "small": args.small, "steps": args.steps, "window": args.window, "aux_loss_coef": 0.0,
           "loadavg_before_after": [load_before[0], load_after[0]], "runs": runs}
    ends = [args.window * (i + 1) for i in range(args.steps // args.window)]
    print(f"max/mean expert load per window of {args.window} steps (aux_loss_coef=0; 1.0 = even)")
    print(f"{'steps':>12} " + " ".join(f"{e - args.window + 1:>5}-{e:<5}" for e in ends))
    for r in runs:
        print(f"{'gamma ' + str(r['balance_bias_rate']):>12} " + " ".join(f"{x:>11.3f}" for x in r["max_over_mean"])
              + f"   loss {r['loss_last_window_mean']:.3f} (last window), {r['seconds']} s")
    print(f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(row, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from blues.train import exit_process
    exit_process(main())  # a rank's end: no interpreter teardown (blues.train.distributed says why)
