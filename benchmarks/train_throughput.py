"""Training throughput: an MoE (8 experts, top-2) against a dense model with the same active parameters.

    python benchmarks/train_throughput.py                 # CPU: the tiny preset, one process, fp32
    python benchmarks/train_throughput.py --gpu           # CUDA: ~125M active parameters, bf16 (not run on
                                                          # the CPU build machines)

Both models train through blues.train.build_engine / train_steps (DeepSpeed engine, the built-in
ZeRO 2 config, AdamW), on the built-in corpus. The dense model makes every layer a SwiGLU of hidden
size top_k * expert_ffn_size (num_dense_layers = n_layer): the same active parameters per token, minus
the router. The two are measured in alternating rounds in one process, so drift of a shared machine
hits both; the row reports the best and the median round of each. Prints a table and writes
benchmarks/results/train_throughput[_gpu].json.

MFU = flops_per_token * tokens/s / peak, flops_per_token = 6 * active params + 12 * n_layer *
n_embd * block_size (Blues.flops_per_token); peak as in blues.train (CPU: 150 GFLOP/s measured).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def configs(gpu: bool):
    from blues.presets import get_preset
    if gpu:
        base = get_preset("blues01").replace(
            vocab_size=32768, n_layer=12, n_embd=768, n_head=12, num_kv_heads=4, block_size=1024,
            num_experts=8, top_k=2, expert_ffn_size=1536, micro_batch_size=16, dtype="bf16")
    else:
        base = get_preset("tiny").replace(num_experts=8, top_k=2)
    base = base.replace(warmup_steps=0, lr=base.train.lr)
    dense = base.replace(num_dense_layers=base.model.n_layer)  # every layer a SwiGLU of top_k * F
    return {"moe": base, "dense": dense}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the ~125M-active bf16 configuration on CUDA")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON row path (default benchmarks/results/train_throughput[_gpu].json)")
    args = p.parse_args(argv)

    import torch
    if args.gpu and not torch.cuda.is_available():
        print("train_throughput: error: --gpu needs CUDA", file=sys.stderr)
        return 1
    from blues import train as T
    from blues.data.prepare import prepare
    from blues.train.ds_config import BUILTIN_DS_CONFIG

    data = os.path.join(tempfile.gettempdir(), "blues_bench_data")
    prepare(data_dir=data, progress=False)
    dist = T.init_distributed()
    runs, info = {}, {}
    for name, cfg in configs(args.gpu).items():
        cfg = cfg.replace(data_dir=data, out_dir=os.path.join(tempfile.gettempdir(), f"blues_bench_{name}"),
                          max_steps=10 ** 6)
        run = T.build_engine(cfg, BUILTIN_DS_CONFIG, dist=dist)
        T.train_steps(run, args.warmup)
        runs[name] = run
        from blues.model import Blues
        with torch.device("cpu"):
            ref = Blues(cfg.replace(moe_backend="torch"))
        info[name] = {"params": ref.num_params(), "active_params": ref.num_params(active_only=True),
                      "flops_per_token": run.flops_per_token}
        del ref
    tps: dict[str, list[float]] = {n: [] for n in runs}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, run in runs.items():
            if run.dist.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            T.train_steps(run, args.steps)
            if run.dist.device.type == "cuda":
                torch.cuda.synchronize()
            tps[name].append(args.steps * run.tokens_per_step / (time.perf_counter() - t0))
    load_after = os.getloadavg()

    peak = runs["moe"].peak_flops
    row = {"benchmark": "train_throughput", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": (torch.cuda.get_device_name() if args.gpu
                      else f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})"),
           "torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__,
           "dtype": runs["moe"].cfg.train.dtype, "steps_per_round": args.steps, "rounds": args.rounds,
           "tokens_per_step": runs["moe"].tokens_per_step, "loadavg_before_after": [load_before[0], load_after[0]],
           "peak_flops": peak}
    print(f"{'model':<6} {'params':>12} {'active':>12} {'FLOPs/token':>12} {'best tok/s':>11} "
          f"{'median tok/s':>13} {'MFU':>7}")
    for name in runs:
        best, med = max(tps[name]), statistics.median(tps[name])
        mfu = info[name]["flops_per_token"] * best / peak if peak else None
        row[name] = dict(info[name], tokens_per_s_best=round(best, 1), tokens_per_s_median=round(med, 1),
                         tokens_per_s_rounds=[round(x, 1) for x in tps[name]], mfu_best=mfu,
                         config={k: v for k, v in runs[name].cfg.to_dict().items()
                                 if k in ("n_layer", "n_embd", "block_size", "num_experts", "top_k", "expert_ffn_size",
                                          "num_dense_layers", "micro_batch_size", "moe_backend")})
        print(f"{name:<6} {info[name]['params']:>12,} {info[name]['active_params']:>12,} "
              f"{info[name]['flops_per_token']:>12,} {best:>11,.0f} {med:>13,.0f} "
              f"{'-' if mfu is None else f'{100 * mfu:.1f}%':>7}")
    row["moe_over_dense_best"] = row["moe"]["tokens_per_s_best"] / row["dense"]["tokens_per_s_best"]
    row["moe_over_dense_median"] = row["moe"]["tokens_per_s_median"] / row["dense"]["tokens_per_s_median"]
    print(f"MoE / dense tokens/s: {row['moe_over_dense_best']:.2f} (best rounds), "
          f"{row['moe_over_dense_median']:.2f} (medians); load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    out = args.out or os.path.join(HERE, "results", f"train_throughput{'_gpu' if args.gpu else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(row, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from blues.train import exit_process
    exit_process(main())  # a rank's end: no interpreter teardown (blues.train.distributed says why)
