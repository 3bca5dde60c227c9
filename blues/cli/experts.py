"""blues-experts: pictures of a run's experts, from the monitor CSV files blues-train writes, and of a trained
model's routing on held-out data.

    blues-experts plot RUN_DIR [--out DIR]       # RUN_DIR: a blues-train out_dir; PNGs go to RUN_DIR/plots
    blues-experts report MODEL_DIR --data DATA_DIR [--batches N] [--batch_size B] [--out DIR]
                                                 # MODEL_DIR: save_pretrained's folder; files go to MODEL_DIR/report

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
and, for a vision run (blues.train.modality's events at each evaluation: moe_modality_share_layer_<i>_
image|text_expert_<j>.csv, moe_layer_<i>_modality_tv.csv),
    modality_load.png image tokens' and text tokens' share per expert and layer at the last evaluation
Each figure is drawn at a fixed size (figure_size below, at DPI), so its pixel size is known.

`report` runs the model (eval mode, the stacked MoE layer's own route op, before any capacity cut, with
the selection bias when it has one: the routing it generates with) over the first N batches of the val
split of a prepared DATA_DIR, counting c[l, v, e], the times token v went to expert e in MoE layer l
(blues.prune's forward hook, which checks its recomputed routing against the layer's own counts), and
writes
    token_experts_block_<i>.png   per MoE layer: the TOP_TOKENS most frequent tokens of the data (rows) by
                                  expert, colour = c[l, v, e] / occurrences of v (each row sums to top_k)
    top_tokens.md                 per MoE layer and expert: its share of the layer's assignments and the
                                  TOKENS_PER_EXPERT tokens sent to it most often (decoded), with counts
A vision model (val batches of prepared image-text data, images included) adds, from the same pass
(blues.train.modality: image tokens, text tokens, padding left out):
    modality_load.png             two heatmaps, image tokens and text tokens: MoE layer by expert, colour =
                                  the modality's share of the layer's assignments; tv per layer
    top_tokens.md                 a second part: per layer and expert the image and text shares, and the
                                  experts image tokens prefer

Exit codes: 0 written, 2 a user error, one line on stderr: a RUN_DIR that is missing or holds no monitor
CSV; a MODEL_DIR or DATA_DIR that is missing or not one, a model without MoE layers, a val split too
small for one window, tokenizers that differ, --batches or --batch_size below 1.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import sys
from typing import TYPE_CHECKING, Iterator, Optional

from blues.common import OneLineParser, run_cli

if TYPE_CHECKING:
    import torch

PROG = "blues-experts"
DPI = 100
UTIL_RE = re.compile(r"^moe_expert_utilization_layer_(\d+)_expert_(\d+)\.csv$")
MODALITY_RE = re.compile(r"^moe_modality_share_layer_(\d+)_(image|text)_expert_(\d+)\.csv$")


def figure_size(name: str, num_layers: int) -> tuple[float, float]:
    """(width, height) in inches of the figure `name`; the PNG is DPI times that in pixels."""
    if name == "loss":
        return (12.0, 4.5)
    if name == "token_experts":  # one layer per PNG
        return (10.0, 9.0)
    if name == "modality_load":  # one row of cells per layer
        return (12.0, 2.2 + 0.5 * num_layers)
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


def read_modality(monitor_dir: str) -> tuple[list[int], list[int], Optional[int], "list[list[list[float]]]",
                                              list[float]]:
    """-> (block numbers, experts, step, share[m][layer][expert], tv[layer]) at the last evaluation that logged
    per-modality expert load (blues.train.modality; m 0 image, 1 text); NaN where a value is missing.
    Empty lists and step None when the run logged none (a text-only run)."""
    series: dict[tuple[int, int, int], dict[int, float]] = {}
    for name in os.listdir(monitor_dir):
        m = MODALITY_RE.match(name)
        if m:
            key = (int(m.group(1)), ("image", "text").index(m.group(2)), int(m.group(3)))
            series[key] = read_series(os.path.join(monitor_dir, name))
    steps = sorted({s for v in series.values() for s in v})
    if not steps:
        return [], [], None, [], []
    layers, experts, step = sorted({i for i, _, _ in series}), sorted({j for _, _, j in series}), steps[-1]
    share = [[[series.get((i, mod, j), {}).get(step, math.nan) for j in experts] for i in layers] for mod in (0, 1)]
    tv = []
    for i in layers:
        p = os.path.join(monitor_dir, f"moe_layer_{i}_modality_tv.csv")
        tv.append(read_series(p).get(step, math.nan) if os.path.isfile(p) else math.nan)
    return layers, experts, step, share, tv


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


def plot_modality_load(layers, experts, share, tv, title: str, path: str) -> str:
    """Two heatmaps side by side, image tokens (left) and text tokens (right): MoE layer (y) by expert (x),
    colour = the share of the modality's top-k assignments on that expert (a row sums to 1); each row is
    labelled with its image-text total variation (0 the same experts, 1 disjoint). share[m][layer][expert]."""
    plt, fig, axes = _figure("modality_load", len(layers), 1, 2)
    vmax = max([v for m in share for row in m for v in row if not math.isnan(v)] + [1e-9])
    labels = [f"block {i}  tv {t:.2f}" if not math.isnan(t) else f"block {i}" for i, t in zip(layers, tv)]
    top, bottom = 1 - 0.6 / fig.get_figheight(), 0.6 / fig.get_figheight()
    fig.subplots_adjust(left=0.12, right=0.88, top=top, bottom=bottom, wspace=0.08)
    for ax, m, name in zip(axes[0], share, ("image", "text")):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")  # (L, E)
        ax.set_xticks(range(len(experts)), [str(j) for j in experts], fontsize=7 if len(experts) > 32 else 9)
        ax.set_yticks(range(len(layers)), labels if name == "image" else [], fontsize=8)
        ax.set_xlabel("expert")
        ax.set_title(f"{name} tokens", fontsize=10)
    # a colour bar of its own axes: one taken from the heatmaps' would be undone by subplots_adjust
    fig.colorbar(im, cax=fig.add_axes((0.9, bottom, 0.015, top - bottom)), label="share of assignments")
    fig.suptitle(title, fontsize=10)
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
              "logged before it existed): no expert_load.png or final_load.png", file=sys.stderr)
    mod_layers, mod_experts, step, share, tv = read_modality(mon)
    if mod_layers:  # a vision run: which experts image and text tokens used at its last evaluation
        written.append(plot_modality_load(mod_layers, mod_experts, share, tv,
                                          f"expert load of image and text tokens, validation at step {step}",
                                          os.path.join(out_dir, "modality_load.png")))
    return written


# ----------------------------------------------------------------------------- report: routing on held-out data

TOP_TOKENS = 40  # rows of the token-to-expert heatmap: the data's most frequent tokens
TOKENS_PER_EXPERT = 8  # tokens listed per expert in top_tokens.md


@contextlib.contextmanager
def token_expert_counter(model, layers) -> "Iterator[torch.Tensor]":
    """Within the block, count c[l, v, e] over every forward of `model`: yields the (L, V, E) int64 tensor it
    fills, for the MoE `layers` [(block, layer)] (blues.train.modality.routing_recorder: the routing the
    layers ran, checked against their own counts)."""
    import torch

    from blues.train.modality import routing_recorder
    V, E = model.config.model.vocab_size, model.config.moe.num_experts
    counts = torch.zeros(len(layers), V, E, dtype=torch.int64)

    def observe(l: int, ids: "torch.Tensor", topk_ids: "torch.Tensor") -> None:
        tok = ids.reshape(-1, 1).expand_as(topk_ids)  # (N, K): the token of each assignment
        counts[l].view(-1).add_(torch.bincount((tok * E + topk_ids).reshape(-1).cpu(), minlength=V * E))

    with routing_recorder(model, layers, observe):
        yield counts


def token_expert_counts(model, batches) -> "torch.Tensor":
    """(L, V, E) int64: c[l, v, e], the times token v was routed to expert e in MoE layer l (top-k, before the
    capacity cut) over `batches` (token ids (B, T), or a loader's (x, y) / (x, y, images)), in eval mode; V
    the model's vocabulary."""
    from blues.prune import moe_layers
    from blues.train.modality import run_batches
    with token_expert_counter(model, moe_layers(model)) as counts:  # ValueError without MoE layers
        run_batches(model, batches)
    return counts


def token_label(text: str, markdown: bool = False) -> str:
    """A decoded token as a printable label: quoted with escapes (spaces and newlines show), with '$'
    escaped for matplotlib's mathtext, or '|' for a Markdown table."""
    import json
    q = json.dumps(text, ensure_ascii=True)
    return q.replace("|", r"\|") if markdown else q.replace("$", r"\$")


def plot_token_experts(c: "torch.Tensor", labels: list[str], block: int, top_k: int, path: str) -> str:
    """Heatmap of one layer: c (M, E) counts of the M most frequent tokens (rows, labelled) by expert, each
    row divided by the token's occurrences (c.sum(1) / top_k), so a row sums to top_k."""
    share = (c.double() * top_k / c.sum(dim=1, keepdim=True).clamp_min(1)).numpy()  # (M, E)
    plt, fig, axes = _figure("token_experts", 1, 1)
    ax = axes[0, 0]
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    E = c.shape[1]
    ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7 if E > 32 else 9)
    ax.set_xlabel("expert")
    ax.set_title(f"block {block}: share of each token's occurrences routed to each expert (rows sum to top_k={top_k})",
                 fontsize=10)
    fig.colorbar(im, ax=ax, label="share of the token's occurrences")
    fig.subplots_adjust(left=0.16, right=0.98, top=0.95, bottom=0.07)
    return _save(plt, fig, path)


def top_tokens_table(counts: "torch.Tensor", blocks: list[int], decode) -> str:
    """Markdown: per MoE layer and expert, its share of the layer's assignments and the TOKENS_PER_EXPERT tokens
    sent to it most often (ties: lower id first), `label count` each. counts (L, V, E)."""
    import torch
    lines = ["# Top tokens per expert", "",
             "Per MoE layer and expert: its share of the layer's top-k assignments on the held-out batches, "
             f"and the {TOKENS_PER_EXPERT} tokens routed to it most often (decoded, with counts).", ""]
    for block, c in zip(blocks, counts):  # c (V, E)
        per_expert = c.sum(dim=0)  # (E,)
        total = max(1, int(per_expert.sum()))
        lines += [f"## block {block}", "", "| expert | share | top tokens |", "| ---: | ---: | :--- |"]
        for e in range(c.shape[1]):
            col = c[:, e]
            order = torch.sort(-col, stable=True).indices[:TOKENS_PER_EXPERT].tolist()  # most first, lower id on ties
            top = ", ".join(f"{token_label(decode(v), markdown=True)} {int(col[v])}" for v in order if col[v] > 0)
            top = top or "(none)"
            lines.append(f"| {e} | {100 * int(per_expert[e]) / total:.1f}% | {top} |")
        lines.append("")
    return "\n".join(lines)


def report_model(model_dir: str, data_dir: str, batches: int = 8, batch_size: int = 8,
                 out_dir: Optional[str] = None) -> list[str]:
    """blues-experts report: the per-layer token-to-expert heatmaps and top_tokens.md (a vision model: also
    modality_load.png and the image-vs-text table in top_tokens.md); returns the paths written."""
    for name, v in (("batches", batches), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name} {v!r} is invalid: expected a positive integer")
    import torch

    from blues.common import atomic_write
    from blues.data.images import ImageTextLoader
    from blues.data.loader import TokenLoader
    from blues.data.tokenizer import Tokenizer
    from blues.model import Blues
    from blues.prune import moe_layers
    from blues.train.modality import modality_metrics, modality_shares, modality_table, record_modality, run_batches
    if not os.path.isdir(model_dir):
        raise ValueError(f"MODEL_DIR {model_dir!r} does not exist: give a folder written by save_pretrained "
                         "(blues-train's out_dir/model)")
    model = Blues.from_pretrained(model_dir, ep_size=1)
    layers = moe_layers(model)  # no MoE layer: refused before any data is read
    blocks = [i for i, _ in layers]
    tok = model.tokenizer
    vision = model.config.vision.vision_enabled
    loader = (ImageTextLoader if vision else TokenLoader)(data_dir, "val", model.config.model.block_size, batch_size,
                                                          tokenizer=tok)
    tok = tok or Tokenizer.load(data_dir)
    with token_expert_counter(model, layers) as counts, record_modality(model, tok.eot_id) as by_modality:
        seen = run_batches(model, loader.eval_batches(batches))  # counts (L, V, E); by_modality None: text model
    out_dir = out_dir or os.path.join(model_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    K = model.config.moe.top_k
    freq = counts[0].sum(dim=1)  # (V,) each occurrence of a token makes top_k assignments in every layer
    top = [v for v in torch.sort(-freq, stable=True).indices[:TOP_TOKENS].tolist() if freq[v] > 0]  # most first
    labels = [token_label(tok.decode([v])) for v in top]
    written = [plot_token_experts(c[top], labels, b, K, os.path.join(out_dir, f"token_experts_block_{b}.png"))
               for b, c in zip(blocks, counts)]
    text = top_tokens_table(counts, blocks, lambda v: tok.decode([v]))
    if by_modality is not None:
        c = by_modality.counts  # (2, L, E)
        tv = [modality_metrics(c, blocks).get(f"moe/layer_{b}/modality_tv", math.nan) for b in blocks]
        share = modality_shares(c).tolist()
        written.append(plot_modality_load(blocks, list(range(c.shape[2])), share, tv,
                                          f"expert load of image and text tokens, {seen} val batches",
                                          os.path.join(out_dir, "modality_load.png")))
        text += "\n" + modality_table(c, blocks)
    table = os.path.join(out_dir, "top_tokens.md")
    atomic_write(table, text)
    return written + [table]


# ----------------------------------------------------------------------------- CLI

def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Pictures of a Blues run's experts.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    plot = sub.add_parser("plot", help="PNGs of expert load and losses from a run's monitor CSV files")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a blues-train out_dir (holds monitor/blues/*.csv)")
    plot.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/plots)")
    rep = sub.add_parser("report", help="token-to-expert heatmaps and each expert's top tokens on held-out data")
    rep.add_argument("model_dir", metavar="MODEL_DIR", help="a Blues model folder (save_pretrained; out_dir/model)")
    rep.add_argument("--data", required=True, metavar="DATA_DIR", help="prepared data (blues-prepare): its val split")
    rep.add_argument("--batches", type=int, default=8, help="val batches to run (default 8)")
    rep.add_argument("--batch_size", type=int, default=8, help="sequences of block_size tokens per batch (default 8)")
    rep.add_argument("--out", default=None, help="folder for the files (default MODEL_DIR/report)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.command == "plot":
            paths = plot_run(args.run_dir, args.out)
        else:
            paths = report_model(args.model_dir, args.data, args.batches, args.batch_size, args.out)
        for path in paths:
            print(path)
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
