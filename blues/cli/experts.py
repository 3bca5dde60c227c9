"""blues-experts: pictures of a run's experts, from the monitor CSV files blues-train writes.

    blues-experts plot RUN_DIR [--out DIR]       # RUN_DIR: a blues-train out_dir; PNGs go to RUN_DIR/plots

DeepSpeed's csv_monitor writes one file per event name under <out_dir>/monitor/<job_name>/ (job "blues"),
the name with '/' turned into '_', rows `step,value` (a header row each time a process starts writing
it, so a resumed run adds one mid-file, and repeats the steps after its checkpoint: the last row of a
step wins). blues.train.metrics names the events; `plot` reads:
    moe_expert_utilization_layer_<i>_expert_<j>.csv   load / ideal load of expert j of block i, per log line
    Train_loss.csv, Eval_val_loss.csv, Train_elapsed_s.csv
and writes
    expert_load.png   heatmap per MoE layer: experts (rows) by logged steps (columns), load / ideal load
    loss.png          train and validation loss against steps, and against wall-clock seconds
    final_load.png    bars per MoE layer: each expert's load / ideal load at the last logged step
Each figure is drawn at a fixed size (FIGURE_SIZE below, at DPI), so its pixel size is known.

Exit codes: 0 written, 2 a RUN_DIR that is missing or holds no monitor CSV (one line on stderr).
"""
from __future__ import annotations

import csv
import math
import os
import re
import sys
from typing import Optional

from blues.common import OneLineParser, run_cli

PROG = "blues-experts"
DPI = 100
UTIL_RE = re.compile(r"^moe_expert_utilization_layer_(\d+)_expert_(\d+)\.csv$")


def figure_size(name: str, num_layers: int) -> tuple[float, float]:
    """(width, height) in inches of the figure `name`; the PNG is DPI times that in pixels."""
    if name == "loss":
        return (12.0, 4.5)
    per_layer = {"expert_load": 2.0, "final_load": 1.8}[name]
    return (10.0, 1.2 + per_layer * num_layers)


# ----------------------------------------------------------------------------- reading the monitor

def find_monitor_dir(run_dir: str) -> str:
    """The folder of a run's monitor CSV files: RUN_DIR itself, or RUN_DIR/monitor/<job_name>."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"RUN_DIR {run_dir!r} does not exist: give the out_dir of a blues-train run")
    candidates = [run_dir] + sorted(os.path.join(run_dir, "monitor", j)
                                    for j in (os.listdir(os.path.join(run_dir, "monitor"))
                                              if os.path.isdir(os.path.join(run_dir, "monitor")) else []))
    found = [d for d in candidates if os.path.isfile(os.path.join(d, "Train_loss.csv"))]
    if not found:
        raise ValueError(f"RUN_DIR {run_dir!r} holds no monitor CSV files (monitor/<job_name>/Train_loss.csv): "
                         "give the out_dir of a blues-train run with DeepSpeed's csv_monitor on (the default)")
    if len(found) > 1:
        raise ValueError(f"RUN_DIR {run_dir!r} holds monitor CSV files of {len(found)} jobs "
                         f"({', '.join(found)}): give one of those folders as RUN_DIR")
    return found[0]


def read_series(path: str) -> dict[int, float]:
    """step -> value of one monitor CSV file, in step order; header rows skipped, the last row of a step wins."""
    out: dict[int, float] = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) != 2 or row[0] == "step":
                continue
            try:
                out[int(float(row[0]))] = float(row[1])
            except ValueError:
                raise ValueError(f"{path}: row {row!r} is not `step,value`: is this a DeepSpeed csv_monitor file?") \
                    from None
    return dict(sorted(out.items()))


def read_utilization(monitor_dir: str) -> tuple[list[int], list[int], list[int], "list[list[list[float]]]"]:
    """-> (block numbers, steps, experts, util[layer][expert][step]) from the per-expert files; NaN where a
    step has no value. Empty lists when the run logged no expert telemetry."""
    series: dict[tuple[int, int], dict[int, float]] = {}
    for name in os.listdir(monitor_dir):
        m = UTIL_RE.match(name)
        if m:
            series[(int(m.group(1)), int(m.group(2)))] = read_series(os.path.join(monitor_dir, name))
    if not series:
        return [], [], [], []
    layers = sorted({i for i, _ in series})
    experts = sorted({j for _, j in series})
    steps = sorted({s for v in series.values() for s in v})
    if not steps:  # files with a header and no row yet
        return [], [], [], []
    util = [[[series.get((i, j), {}).get(s, math.nan) for s in steps] for j in experts] for i in layers]
    return layers, steps, experts, util


def monotone_clock(elapsed: dict[int, float]) -> dict[int, float]:
    """Train/elapsed_s restarts at 0 in each resumed process: add the time already spent before it."""
    out, offset, last = {}, 0.0, None
    for s, t in elapsed.items():
        if last is not None and t + offset < last:
            offset = last
        out[s] = t + offset
        last = out[s]
    return out


# ----------------------------------------------------------------------------- drawing

def _figure(name: str, num_layers: int, rows: int, cols: int = 1):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=figure_size(name, num_layers), dpi=DPI, squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: str) -> str:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays figure_size * DPI
    plt.close(fig)
    return path


def plot_expert_load(layers, steps, experts, util, path: str) -> str:
    """Heatmap per layer: expert (y) by logged step (x), colour = load / ideal load (1 = its fair share); a
    NaN (a layer or expert missing at a step) is left blank."""
    plt, fig, axes = _figure("expert_load", len(layers), len(layers))
    vmax = max(2.0, max(v for lay in util for row in lay for v in row if not math.isnan(v)))
    # A logged value sums the steps since the previous log line: its cell spans (previous step, step].
    x_edges = [steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1)] + steps  # (S + 1,)
    y_edges = [experts[0] - 0.5] + [j + 0.5 for j in experts]  # (E + 1,)
    for ax, i, lay in zip(axes[:, 0], layers, util):
        im = ax.pcolormesh(x_edges, y_edges, lay, cmap="viridis", vmin=0.0, vmax=vmax)  # lay: (E, S)
        ax.set_ylabel(f"block {i}\nexpert")
        fig.colorbar(im, ax=ax, label="load / ideal")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("expert load per MoE layer (0 = dead, 1 = ideal)")
    fig.subplots_adjust(left=0.08, right=0.97, top=1 - 0.5 / fig.get_figheight(), bottom=0.6 / fig.get_figheight(),
                        hspace=0.35)
    return _save(plt, fig, path)


def plot_final_load(layers, steps, experts, util, path: str) -> str:
    """Bars per layer: each expert's load / ideal load at the last logged step; the dashed line is ideal."""
    plt, fig, axes = _figure("final_load", len(layers), len(layers))
    for ax, i, lay in zip(axes[:, 0], layers, util):
        ax.bar(experts, [row[-1] for row in lay], color="tab:blue")
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_ylabel(f"block {i}\nload / ideal")
        ax.set_xticks(experts)
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].set_title(f"expert load at step {steps[-1]}")
    fig.subplots_adjust(left=0.08, right=0.97, top=1 - 0.5 / fig.get_figheight(), bottom=0.6 / fig.get_figheight(),
                        hspace=0.35)
    return _save(plt, fig, path)


def plot_losses(train: dict[int, float], val: dict[int, float], elapsed: dict[int, float], path: str) -> str:
    """Train and validation loss against steps (left) and wall-clock seconds (right); a validation
    point's time is the training clock at its step."""
    plt, fig, axes = _figure("loss", 0, 1, 2)
    by_step, by_time = axes[0, 0], axes[0, 1]
    by_step.plot(list(train), list(train.values()), label="train")
    if val:
        by_step.plot(list(val), list(val.values()), "o-", label="validation")
    by_step.set_xlabel("step")
    by_step.set_ylabel("loss")
    by_step.legend()
    if elapsed:
        clock = monotone_clock(elapsed)
        tr = [(clock[s], v) for s, v in train.items() if s in clock]
        by_time.plot([t for t, _ in tr], [v for _, v in tr], label="train")
        va = [(clock[s], v) for s, v in val.items() if s in clock]
        if va:
            by_time.plot([t for t, _ in va], [v for _, v in va], "o-", label="validation")
        by_time.legend()
    else:
        by_time.text(0.5, 0.5, "no Train/elapsed_s in this run's monitor", ha="center", va="center",
                     transform=by_time.transAxes)
    by_time.set_xlabel("wall-clock seconds")
    fig.subplots_adjust(left=0.07, right=0.98, top=0.92, bottom=0.13, wspace=0.2)
    return _save(plt, fig, path)


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> list[str]:
    """Every picture of a run; returns the PNG paths written (no expert telemetry: the loss curves only)."""
    mon = find_monitor_dir(run_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("plot needs matplotlib: pip install matplotlib (or blues[bench])") from None
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)

    def series(name: str) -> dict[int, float]:
        p = os.path.join(mon, name)
        return read_series(p) if os.path.isfile(p) else {}

    written = [plot_losses(series("Train_loss.csv"), series("Eval_val_loss.csv"), series("Train_elapsed_s.csv"),
                           os.path.join(out_dir, "loss.png"))]
    layers, steps, experts, util = read_utilization(mon)
    if layers:
        written.append(plot_expert_load(layers, steps, experts, util, os.path.join(out_dir, "expert_load.png")))
        written.append(plot_final_load(layers, steps, experts, util, os.path.join(out_dir, "final_load.png")))
    else:
        print(f"{PROG}: {mon} holds no per-expert telemetry (moe_expert_utilization_*.csv: a dense model, or a run "
              "logged before it existed): loss curves only", file=sys.stderr)
    return written


# ----------------------------------------------------------------------------- CLI

def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Pictures of a Blues run's experts.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    plot = sub.add_parser("plot", help="PNGs of expert load and losses from a run's monitor CSV files")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a blues-train out_dir (holds monitor/blues/*.csv)")
    plot.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/plots)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        for path in plot_run(args.run_dir, args.out):
            print(path)
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
