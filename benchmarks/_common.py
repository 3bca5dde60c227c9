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
