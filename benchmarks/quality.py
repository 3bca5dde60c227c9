"""Quality: does the MoE earn its experts? Validation loss of the MoE against dense models, per step
and per second, on the built-in corpus.

    python benchmarks/quality.py                    # tiny preset, its 300 steps, seeds 1 2 3 (~1 h on 1 core)
    python benchmarks/quality.py --smoke            # 2 models, 1 seed, 20 steps: the script works (~1 min)
    python benchmarks/quality.py --models moe dense_active --set router_noise_std=0 --out /tmp/q.json
    python benchmarks/quality.py --models moe --variant nonoise:router_noise_std=0 --variant e16:num_experts=16
    python benchmarks/quality.py --seeds 1 --out q1.json & python benchmarks/quality.py --seeds 2 3 --out q23.json
    python benchmarks/quality.py --merge q1.json q23.json      # one row and PNG from runs on two cores
    python benchmarks/quality.py --merge a.json b.json --compare e16_aux0 e8_aux0   # + that paired difference

Models (all from the base config: --preset plus --set overrides; same steps, same batches per seed):
- moe:          the base config as it is
- dense_active: every layer a SwiGLU of (top_k + num_shared_experts) * expert_ffn_size
                (num_dense_layers = n_layer): the MoE's active parameters per token, less the router
- dense_total:  every layer a SwiGLU of (num_experts + num_shared_experts) * expert_ffn_size: the
                MoE's total parameters, less the router
- moe_e8, moe_e16: the base with 8 and 16 experts, top_k and expert_ffn_size unchanged: the same
                active parameters, twice the expert parameters
- --variant NAME:KEY=VALUE,KEY=VALUE: the base with these overrides (how the preset was tuned)
A model whose config equals one already run (moe_e8 when the base has 8 experts) is not run twice.

For each seed every model is built (blues.train.build_engine: DeepSpeed engine, built-in ZeRO 2,
AdamW, one CPU process) and the models take --eval_every steps in turn, each then evaluated on the
same first --eval_steps validation batches: drift of a shared machine hits every model alike, so
the per-second curves can be compared. Seconds are training seconds only (evaluation excluded).

Writes one JSON object (--out, default benchmarks/results/quality.json): per model and seed the
curve [(step, train seconds, val loss, mean training cross-entropy over the steps since the last
point; None at step 0)] (compared across models, a gap between the two that grows faster for one
shows it learning its training data rather than the language: the built-in corpus is ~2.8M training
tokens, a 1000-step run 1.5 epochs; the gap itself also holds the split's own difference: 0.27-0.30
nats after 1500 steps of stdlib_full, where no token is seen twice), the final
val loss mean and sample std over seeds, the differences that the issue asks for (MoE -
dense_active, moe_e16 - moe_e8, and A - B for each --compare A B) with their std over seeds (paired:
the same seed, so the same batches), and the machine's load. Plus a PNG (--png,
default next to --out): val loss against steps and against seconds, mean over seeds, a band of
+-1 std. Exit code 0; the verdict is in the printed table and the JSON.
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
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODELS = ("moe", "dense_active", "dense_total", "moe_e8", "moe_e16")
SHOWN = ("n_layer", "n_embd", "vocab_size", "micro_batch_size", "num_experts", "top_k", "expert_ffn_size",
         "num_shared_experts", "num_dense_layers", "dense_ffn_size", "router_noise_std", "aux_loss_coef",
         "z_loss_coef", "routed_scaling_factor", "balance_bias_rate", "lr", "min_lr", "warmup_steps")


def model_configs(base, names, variants=()):
    """name -> config for each requested model and variant, skipping one equal to a model listed
    before it (returned as an alias: name -> the name it equals)."""
    n_layer, m = base.model.n_layer, base.moe
    F, S = m.expert_ffn_size, m.num_shared_experts  # a shared expert is a SwiGLU of F every token uses
    make = {
        "moe": lambda: base,
        "dense_active": lambda: base.replace(num_dense_layers=n_layer, dense_ffn_size=(m.top_k + S) * F),
        "dense_total": lambda: base.replace(num_dense_layers=n_layer, dense_ffn_size=(m.num_experts + S) * F),
        "moe_e8": lambda: base.replace(num_experts=8),
        "moe_e16": lambda: base.replace(num_experts=16),
    }
    for spec in variants:
        name, _, items = spec.partition(":")
        if not name or name in make or not items:
            raise ValueError(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] with a new NAME")
        make[name] = lambda items=items: base.with_overrides(items.split(","))
    configs, aliases = {}, {}
    for name in [*names, *(v.partition(":")[0] for v in variants)]:
        cfg = make[name]()
        same = next((other for other, c in configs.items() if c == cfg), None)
        if same is None:
            configs[name] = cfg
        else:
            aliases[name] = same
    return configs, aliases


def param_counts(cfg) -> dict:
    import torch

    from blues.model import Blues
    with torch.device("cpu"):
        ref = Blues(cfg.replace(moe_backend="torch"))
    return {"params": ref.num_params(), "active_params": ref.num_params(active_only=True),
            "non_embedding_active": ref.num_params(active_only=True) - ref.tok_emb.weight.numel()}


def run_seed(configs: dict, seed: int, steps: int, eval_every: int, data: str, dist,
             init_from: Optional[dict] = None) -> tuple[dict, dict]:
    """Train every model for `steps` steps, in turns of eval_every steps: (name -> curve, name -> the
    expert load of the last eval_every steps: min and max over layers and experts of an expert's share).
    init_from: name -> a model folder whose weights that model starts from (blues-train --init_from)."""
    import torch

    from blues import train as T
    runs, curves, seconds, load = {}, {}, {}, {}
    for name, cfg in configs.items():
        cfg = cfg.replace(seed=seed, data_dir=data, max_steps=steps,
                          out_dir=os.path.join(tempfile.gettempdir(), f"blues_quality_{name}"))
        runs[name] = T.build_engine(cfg, dist=dist, init_from=(init_from or {}).get(name))
        curves[name] = [(0, 0.0, T.evaluate(runs[name])["val_loss"], None)]
        seconds[name] = 0.0
    done = 0
    while done < steps:
        n = min(eval_every, steps - done)
        for name, run in runs.items():
            t0 = time.perf_counter()
            results = T.train_steps(run, n)
            seconds[name] += time.perf_counter() - t0
            if results[-1].expert_selected is not None:
                counts = torch.stack([r.expert_selected for r in results if r.expert_selected is not None]).sum(0)
                share = counts / counts.sum(dim=1, keepdim=True)  # (L, E)
                load[name] = [round(share.min().item(), 4), round(share.max().item(), 4)]
            taken = [r.ce_loss for r in results if not r.skipped]  # a skipped step's loss is NaN
            train_ce = statistics.fmean(taken) if taken else float("nan")
            curves[name].append((done + n, round(seconds[name], 3), T.evaluate(run)["val_loss"], round(train_ce, 4)))
        done += n
        print(f"  seed {seed} step {done}: " + "  ".join(f"{k} {v[-1][2]:.4f} (train {v[-1][3]:.4f})"
                                                           for k, v in curves.items()),
              flush=True)
    for run in runs.values():
        run.engine.destroy()
    return curves, load


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(curves: dict, seeds: list[int], compare: tuple = ()) -> dict:
    """name -> final val loss mean/std over seeds; plus paired differences (the issue's, and A - B for
    each (A, B) in compare)."""
    out = {}
    for name, per_seed in curves.items():
        finals = [per_seed[s][-1][2] for s in seeds]
        mean, std = mean_std(finals)
        secs = [per_seed[s][-1][1] for s in seeds]
        out[name] = {"final_val_loss_mean": round(mean, 4), "final_val_loss_std": round(std, 4),
                     "final_val_loss_per_seed": [round(f, 4) for f in finals],
                     "train_seconds_mean": round(statistics.fmean(secs), 1)}
    for a, b in compare:
        if a not in curves or b not in curves:
            raise ValueError(f"--compare {a} {b}: no model named {a if a not in curves else b}; "
                             f"the models are {', '.join(curves)}")
    diffs = {}
    pairs = [(a, "dense_active") for a in curves if not a.startswith("dense")]
    pairs += [("moe", "dense_total"), ("moe_e16", "moe_e8"), *map(tuple, compare)]
    for a, b in dict.fromkeys(pairs):
        if a in curves and b in curves:
            d = [curves[a][s][-1][2] - curves[b][s][-1][2] for s in seeds]
            mean, std = mean_std(d)
            diffs[f"{a} - {b}"] = {"mean": round(mean, 4), "std": round(std, 4), "per_seed": [round(x, 4) for x in d]}
    return {"models": out, "differences": diffs}


def plot(path: str, curves: dict, seeds: list[int], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, per_seed in curves.items():
        steps = np.array([p[0] for p in per_seed[seeds[0]]])
        loss = np.array([[p[2] for p in per_seed[s]] for s in seeds])  # (seeds, points)
        secs = np.array([[p[1] for p in per_seed[s]] for s in seeds]).mean(axis=0)
        mean, std = loss.mean(axis=0), loss.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(loss.shape[1])
        for ax, x in ((axes[0], steps), (axes[1], secs)):
            line, = ax.plot(x[1:], mean[1:], label=name)  # step 0 (ln V) would squash the scale
            ax.fill_between(x[1:], (mean - std)[1:], (mean + std)[1:], color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training seconds (CPU, mean over seeds)")
    axes[0].set_ylabel("validation loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the base config")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="another model: the base config with these overrides")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=None, help="default: the preset's max_steps")
    p.add_argument("--eval_every", type=int, default=None, help="default: the preset's eval_interval")
    p.add_argument("--eval_steps", type=int, default=None, help="validation batches per evaluation (default: "
                                                                 "the preset's eval_steps)")
    p.add_argument("--corpus", default="stdlib", help="built-in corpus (blues.data.sources.BUILTIN_CORPORA)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on 2 shared cores under load 8, 2 threads took 2-5 s a "
                        "step where 1 took 0.28 s, OpenMP threads waiting on each other)")
    p.add_argument("--smoke", action="store_true", help="moe and dense_active, 1 seed, 20 steps: a quick check")
    p.add_argument("--out", default=os.path.join(HERE, "results", "quality.json"))
    p.add_argument("--png", default=None, help="default: --out with .png")
    p.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="also report the paired difference A - B of two models' final val losses")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="train nothing: combine rows of runs that differ only in --seeds, or only in their "
                        "models (one per core)")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.seeds, args.steps, args.eval_every, args.eval_steps = ["moe", "dense_active"], [1], 20, 10, 4

    if args.merge:
        row = merge_rows(args.merge, args.compare)
    else:
        row = run_all(args, " ".join(sys.argv[1:] if argv is None else argv))
    report(row, args.out, args.png)
    return 0


def run_all(args, command: str) -> dict:
    import torch

    from blues import train as T
    from blues.data.prepare import prepare
    from blues.presets import load_config

    data = os.path.join(tempfile.gettempdir(), f"blues_quality_data_{args.corpus}")
    prepare(data_dir=data, corpus=args.corpus, progress=False)
    base = load_config(preset=args.preset, overrides=args.set)
    t = base.train
    args.steps, args.eval_every = args.steps or t.max_steps, args.eval_every or t.eval_interval
    args.eval_steps = args.eval_steps or t.eval_steps
    base = base.replace(eval_steps=args.eval_steps)
    configs, aliases = model_configs(base, args.models, args.variant)
    dist = T.init_distributed()
    torch.set_num_threads(args.threads)  # after init_distributed, which sets cores / ranks
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    curves: dict = {name: {} for name in configs}
    load: dict = {}
    for seed in args.seeds:
        seed_curves, seed_load = run_seed(configs, seed, args.steps, args.eval_every, data, dist)
        for name, curve in seed_curves.items():
            curves[name][seed] = curve
        for name, minmax in seed_load.items():
            load.setdefault(name, {})[str(seed)] = minmax
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    for alias, same in aliases.items():
        curves[alias] = curves[same]
    return {
        "benchmark": "quality", "commands": [f"python benchmarks/quality.py {command}"],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()}), "
                  f"{torch.get_num_threads()} threads",
        "torch": torch.__version__, "python": platform.python_version(),
        "loadavg_1m_before_after": [[round(load_before[0], 2), round(load_after[0], 2)]],
        "wall_seconds": [round(wall, 1)], "corpus": args.corpus, "preset": args.preset, "overrides": args.set,
        "steps": args.steps, "seeds": args.seeds, "eval_every": args.eval_every, "eval_steps": args.eval_steps,
        "tokens_per_step": base.train.micro_batch_size * base.train.grad_accum * base.model.block_size,
        "aliases": aliases,
        "configs": {name: {k: v for k, v in configs[aliases.get(name, name)].to_dict().items() if k in SHOWN}
                    for name in curves},
        "params": {name: param_counts(configs[aliases.get(name, name)]) for name in curves},
        **summarize(curves, args.seeds, args.compare),
        # share of an expert in the assignments of the last eval_every steps, min and max over layers
        # and experts (1 / num_experts when even; 0 is an expert that no token chose)
        "expert_load_last_min_max": {name: load[aliases.get(name, name)] for name in curves
                                     if aliases.get(name, name) in load},
        "curves": {name: {str(s): c for s, c in per_seed.items()} for name, per_seed in curves.items()},
    }


def merge_rows(paths: list[str], compare: tuple = ()) -> dict:
    """One row from the rows of runs side by side (one per core) that differ only in their seeds (the
    same models) or only in their models (the same seeds)."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            rows.append(json.load(f))
    same = ("corpus", "preset", "overrides", "steps", "eval_every", "eval_steps")
    for r in rows[1:]:
        for k in same:
            if r[k] != rows[0][k]:
                raise ValueError(f"--merge: {k} differs between {paths[0]} and the others: {rows[0][k]} vs {r[k]}")
    if all(r["configs"] == rows[0]["configs"] for r in rows):  # other seeds of the same models
        seeds = [s for r in rows for s in r["seeds"]]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--merge: seeds {seeds} repeat across the files")
    else:  # other models, the same seeds
        names = [n for r in rows for n in r["configs"]]
        if len(set(names)) != len(names):
            raise ValueError(f"--merge: models {names} repeat across the files: merge runs of the same models "
                             f"with other seeds, or of other models with the same seeds")
        seeds = rows[0]["seeds"]
        if any(r["seeds"] != seeds for r in rows):
            raise ValueError(f"--merge: runs of other models must have the same seeds: "
                             f"{[r['seeds'] for r in rows]}")
    names = list(dict.fromkeys(n for r in rows for n in r["curves"]))
    curves = {name: {int(s): c for r in rows for s, c in r["curves"].get(name, {}).items()} for name in names}
    row = dict(rows[0])
    for k in ("commands", "loadavg_1m_before_after", "wall_seconds"):
        row[k] = [x for r in rows for x in r[k]]
    for k in ("aliases", "configs", "params"):
        row[k] = {n: v for r in rows for n, v in r[k].items()}
    loads = [r["expert_load_last_min_max"] for r in rows]
    row["expert_load_last_min_max"] = {name: {s: v for ld in loads for s, v in ld.get(name, {}).items()}
                                       for name in names if any(name in ld for ld in loads)}
    row.update(seeds=seeds, **summarize(curves, seeds, compare),
               curves={name: {str(s): c for s, c in per_seed.items()} for name, per_seed in curves.items()})
    return row


def report(row: dict, out: str, png: Optional[str]) -> None:
    """Print the table, write the JSON row and the PNG."""
    seeds = row["seeds"]
    print(f"{'model':<13} {'params':>10} {'active':>10} {'final val loss':>16} {'train s':>8}")
    for name, s in row["models"].items():
        c = row["params"][name]
        print(f"{name:<13} {c['params']:>10,} {c['active_params']:>10,} "
              f"{s['final_val_loss_mean']:>9.4f} +-{s['final_val_loss_std']:.4f} {s['train_seconds_mean']:>8.1f}")
    for k, d in row["differences"].items():
        print(f"{k}: {d['mean']:+.4f} nats (std {d['std']:.4f} over {len(seeds)} seeds, per seed {d['per_seed']})")
    print(f"load average (1 min) before/after each run: {row['loadavg_1m_before_after']} on {os.cpu_count()} CPUs, "
          f"wall seconds {row['wall_seconds']}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(row, f, indent=1)
        f.write("\n")
    png = png or os.path.splitext(out)[0] + ".png"
    curves = {name: {int(s): c for s, c in per_seed.items()} for name, per_seed in row["curves"].items()}
    plot(png, curves, seeds, f"{row['preset']} {' '.join(row['overrides'])}: {row['steps']} steps, seeds {seeds}, "
                             f"{row['tokens_per_step']} tokens/step, {row['corpus']} corpus")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    from blues.train import exit_process
    exit_process(main())  # a rank's end: no interpreter teardown (blues.train.distributed says why)
