"""Sparse upcycling: does an MoE upcycled from a trained dense model beat that dense model trained on?

    python benchmarks/upcycle.py                      # tiny widths, 200 + 200 steps, seeds 1 2 3
    python benchmarks/upcycle.py --smoke              # 1 seed, 10 + 10 steps: the script works (~1 min)

Per seed, on the built-in corpus (the tiny preset's widths, batches and optimizer; blues.train's engine,
one CPU process):
  1. a dense model (every layer a SwiGLU of the preset's dense width, top_k * expert_ffn_size) trains
     --pretrain steps and is exported;
  2. blues.upcycle turns it into an MoE of --num_experts copies of each MLP, top --top_k (noise off:
     at step 0 it computes the dense function; the script checks that on a validation batch);
  3. both continue for --steps steps from those weights (blues-train --init_from: a fresh optimizer
     and learning-rate schedule for both), taking turns of --eval_every steps and evaluated on the same
     validation batches after each, with the same training batches (the same seed).
Upcycled experts are full copies of the MLP, so the MoE computes top_k times the dense model's MLP
FLOPs per token: the row records both models' active parameters, and the seconds each took.

Writes one JSON object (--out, default benchmarks/results/upcycle.json): per seed the dense model's
validation loss after pretraining, both curves [(step, train seconds, val loss)], the final losses and
their paired difference (upcycled - dense) with mean and std over seeds, the machine's load.
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
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from quality import param_counts, run_seed  # noqa: E402

STEP0_TOL = 1e-4  # the step-0 equality in fp32 (tests/test_upcycle.py: ~6e-7 measured)


def pretrain(cfg, seed: int, steps: int, data: str, folder: str, dist) -> float:
    """Train the dense model `steps` steps and export it to `folder`; its final validation loss."""
    from blues import train as T
    from blues.train.checkpoint import export_weights
    run = T.build_engine(cfg.replace(seed=seed, data_dir=data, max_steps=steps,
                                     out_dir=os.path.join(tempfile.gettempdir(), "blues_upcycle_pretrain")), dist=dist)
    T.train_steps(run, steps)
    loss = T.evaluate(run)["val_loss"]
    export_weights(run, folder)
    run.engine.destroy()
    return loss


def upcycled(dense_dir: str, moe_dir: str, num_experts: int, top_k: int, data: str, seed: int) -> float:
    """Upcycle the exported dense model into moe_dir; the step-0 max |logits difference| on one
    validation batch (ValueError above STEP0_TOL)."""
    import torch

    from blues.data.loader import TokenLoader
    from blues.model import Blues
    from blues.upcycle import upcycle
    dense = Blues.from_pretrained(dense_dir).eval()
    moe = upcycle(dense, num_experts, top_k, seed=seed).model.eval()
    x, _ = next(iter(TokenLoader(data, "val", dense.config.model.block_size, 4).eval_batches(1)))
    with torch.no_grad():
        diff = (moe(x).logits - dense(x).logits).abs().max().item()
    if not diff <= STEP0_TOL:
        raise ValueError(f"the upcycled model differs from the dense one at step 0 by {diff:.1e} > {STEP0_TOL}")
    moe.save_pretrained(moe_dir, tokenizer=dense.tokenizer)
    return diff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the base config")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--pretrain", type=int, default=200, help="dense steps before upcycling")
    p.add_argument("--steps", type=int, default=200, help="steps both models continue for")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--corpus", default="stdlib", help="built-in corpus (blues.data.sources.BUILTIN_CORPORA)")
    p.add_argument("--smoke", action="store_true", help="1 seed, 10 + 10 steps: a quick check")
    p.add_argument("--out", default=os.path.join(HERE, "results", "upcycle.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.pretrain, args.steps, args.eval_every = [1], 10, 10, 5
        args.set = [*args.set, "eval_steps=2"]

    import torch

    from blues import train as T
    from blues.data.prepare import prepare
    from blues.presets import load_config

    data = os.path.join(tempfile.gettempdir(), f"blues_quality_data_{args.corpus}")
    prepare(data_dir=data, corpus=args.corpus, progress=False)
    base = load_config(preset=args.preset, overrides=args.set)
    dense_cfg = base.replace(num_dense_layers=base.model.n_layer, dense_ffn_size=base.moe.dense_hidden)
    dist = T.init_distributed()
    torch.set_num_threads(1)  # one thread: see benchmarks/quality.py --threads
    load_before, t0 = os.getloadavg(), time.perf_counter()
    work = tempfile.mkdtemp(prefix="blues_upcycle_")
    per_seed, moe_cfg = {}, None
    for seed in args.seeds:
        dense_dir, moe_dir = os.path.join(work, f"dense_{seed}"), os.path.join(work, f"moe_{seed}")
        pre = pretrain(dense_cfg, seed, args.pretrain, data, dense_dir, dist)
        diff = upcycled(dense_dir, moe_dir, args.num_experts, args.top_k, data, seed)
        from blues.model import Blues
        moe_cfg = Blues.from_pretrained(moe_dir).config.replace(**{k: v for k, v in dense_cfg.to_dict().items()
                                                                  if k in dense_cfg.train.__dataclass_fields__})
        curves, load = run_seed({"dense": dense_cfg, "upcycled": moe_cfg}, seed, args.steps, args.eval_every, data,
                                dist, init_from={"dense": dense_dir, "upcycled": moe_dir})
        per_seed[seed] = {"dense_val_loss_after_pretrain": round(pre, 4), "step0_max_logit_diff": diff,
                          "curves": curves, "expert_load_last_min_max": load.get("upcycled")}
        print(f"seed {seed}: dense after {args.pretrain} steps {pre:.4f}; after {args.steps} more: dense "
              f"{curves['dense'][-1][2]:.4f}, upcycled {curves['upcycled'][-1][2]:.4f}", flush=True)
    finals = {name: [per_seed[s]["curves"][name][-1][2] for s in args.seeds] for name in ("dense", "upcycled")}
    d = [u - de for u, de in zip(finals["upcycled"], finals["dense"])]

    def ms(xs):
        return {"mean": round(statistics.fmean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
                "per_seed": [round(x, 4) for x in xs]}

    row = {
        "benchmark": "upcycle",
        "command": f"python benchmarks/upcycle.py {' '.join(sys.argv[1:] if argv is None else argv)}",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()}), 1 thread",
        "torch": torch.__version__, "corpus": args.corpus, "preset": args.preset, "overrides": args.set,
        "seeds": args.seeds, "pretrain_steps": args.pretrain, "steps": args.steps, "eval_every": args.eval_every,
        "num_experts": args.num_experts, "top_k": args.top_k,
        "tokens_per_step": base.train.micro_batch_size * base.train.grad_accum * base.model.block_size,
        "params": {"dense": param_counts(dense_cfg), "upcycled": param_counts(moe_cfg)},
        "final_val_loss": {name: ms(v) for name, v in finals.items()},
        "upcycled_minus_dense": ms(d),
        "train_seconds_mean": {name: round(statistics.fmean(per_seed[s]["curves"][name][-1][1] for s in args.seeds), 1)
                               for name in ("dense", "upcycled")},
        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "per_seed": {str(s): v for s, v in per_seed.items()},
    }
    fv, ud, pc = row["final_val_loss"], row["upcycled_minus_dense"], row["params"]
    print(f"final val loss after {args.pretrain} + {args.steps} steps, {len(args.seeds)} seeds: "
          f"dense {fv['dense']['mean']:.4f} +-{fv['dense']['std']:.4f}, "
          f"upcycled {fv['upcycled']['mean']:.4f} +-{fv['upcycled']['std']:.4f}; "
          f"upcycled - dense {ud['mean']:+.4f} (std {ud['std']:.4f}); active params "
          f"{pc['upcycled']['active_params']:,} vs {pc['dense']['active_params']:,}; "
          f"train seconds {row['train_seconds_mean']}; load {row['loadavg_1m_before_after']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(row, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from blues.train import exit_process
    exit_process(main())  # a rank's end: no interpreter teardown (blues.train.distributed says why)
