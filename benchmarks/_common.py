"""Shared by the benchmark scripts: machine description and the machine-readable row."""
import json
import os
import platform
import time

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def write_rows(path: str, rows: list[dict]) -> None:
    """Append one JSON object per line to `path` (benchmarks/results/...jsonl)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"time": stamp, "machine": machine(), **row}) + "\n")


def blues_train(preset: str, overrides: list[str], threads: int) -> float:
    """blues-train --preset PRESET OVERRIDES, as its own loop (blues.train.train: steps, evaluation, checkpoint,
    export to out_dir/model) in this process; returns its wall seconds (data preparation included, once per
    data_dir). SystemExit when training stops with an error code.

    In-process rather than the console script only to set the thread count after init_distributed (which
    gives one rank every core: on a shared 2-core machine two threads ran 20x slower)."""
    from blues import train as T
    from blues.presets import load_config
    print(f"blues-train --preset {preset}", " ".join(overrides), flush=True)
    t0 = time.perf_counter()
    dist = T.init_distributed()
    torch.set_num_threads(threads)
    run = T.build_engine(load_config(preset=preset, overrides=overrides), dist=dist)
    rc = T.train(run, progress=False, prompt=None)
    if rc != 0:
        raise SystemExit(f"training stopped with exit code {rc}")
    return time.perf_counter() - t0


def add_run_args(p, out: str) -> None:
    """The flags of a benchmark that trains through blues_train: --set, --threads, --work, --out."""
    p.add_argument("--set", nargs="*", default=[], help="more blues-train overrides key=value")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    p.add_argument("--work", default=None, help="folder for the data and the run (default: a temporary one)")
    p.add_argument("--out", default=out, help="the JSON rows are appended here")


def run_dirs(work, prefix: str) -> tuple[str, str]:
    """(data_dir, out_dir) under `work`, or under a new temporary folder when it is None."""
    import tempfile
    work = work or tempfile.mkdtemp(prefix=prefix)
    return os.path.join(work, "data"), os.path.join(work, "run")
