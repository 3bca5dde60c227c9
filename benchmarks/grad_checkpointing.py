"""Peak memory of one training step with and without gradient checkpointing.

    python benchmarks/grad_checkpointing.py             # Blues-01 shape, batch 8 x 512, fp32, CPU

On CPU the peak is the process's maximum resident set (ru_maxrss) in a fresh process per setting,
minus the resident set after the model and a warm-up-free optimizer-less setup; on CUDA it is
torch.cuda.max_memory_allocated. Rows go to benchmarks/results/grad_checkpointing.jsonl.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write_rows  # noqa: E402


def one_step(preset: str, batch: int, ckpt: bool, device: str) -> dict:
    from blues.model import Blues
    from blues.presets import get_preset
    torch.manual_seed(0)
    cfg = get_preset(preset).replace(attn_backend="sdpa")
    model = Blues(cfg).to(device).train()
    if ckpt:
        model.gradient_checkpointing_enable()
    T = cfg.model.block_size
    x = torch.randint(0, cfg.model.vocab_size, (batch, T + 1), device=device)
    for p in model.parameters():  # allocate gradients up front so the peak measures activations
        p.grad = torch.zeros_like(p)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = model(x[:, :-1], x[:, 1:]).loss
    loss.backward()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"base_bytes": base, "peak_bytes": peak, "step_bytes": peak - base, "loss": loss.item()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="blues01")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "grad_checkpointing.jsonl"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_step(args.preset, args.batch, args.child == "on", args.device)))
        return
    res = {}
    for mode in ("off", "on"):  # a fresh process each: ru_maxrss never goes down
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--preset", args.preset, "--batch",
                              str(args.batch), "--device", args.device], check=True, capture_output=True, text=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    off, on = res["off"]["step_bytes"], res["on"]["step_bytes"]
    assert abs(res["off"]["loss"] - res["on"]["loss"]) < 1e-5
    print(f"{machine()} | {args.preset}, batch {args.batch}, fp32, forward+backward")
    print(f"step memory without checkpointing: {off / 2**20:8.1f} MiB")
    print(f"step memory with checkpointing:    {on / 2**20:8.1f} MiB  ({off / max(on, 1):.2f}x less)")
    write_rows(args.out, [{"bench": "grad_checkpointing", "preset": args.preset, "batch": args.batch,
                           "device": args.device, "off_mib": round(off / 2**20, 1), "on_mib": round(on / 2**20, 1),
                           "saving_ratio": round(off / max(on, 1), 2)}])


if __name__ == "__main__":
    main()
