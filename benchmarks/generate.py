"""Generation speed with and without the KV cache, side by side in one run.

    python benchmarks/generate.py                       # tiny preset, 256 and 1024 new tokens, CPU
    python benchmarks/generate.py --preset blues01 --new_tokens 256

Each setting runs both paths in alternation (cache, recompute, cache, recompute, ...) so machine
noise hits both alike; the figure that matters is the ratio. Rows go to
benchmarks/results/generate.jsonl.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write_rows  # noqa: E402

from blues.model import Blues  # noqa: E402
from blues.presets import get_preset  # noqa: E402


def tokens_per_s(model, prompt, n, use_cache):
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=n, temperature=0, use_cache=use_cache)
    dt = time.perf_counter() - t0
    assert len(out) == n
    return n / dt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--new_tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "generate.jsonl"))
    args = p.parse_args()
    torch.manual_seed(0)
    block = args.prompt_len + max(args.new_tokens)
    cfg = get_preset(args.preset).replace(block_size=block, attn_backend="sdpa")
    model = Blues(cfg).to(args.device).eval()
    prompt = torch.randint(0, cfg.model.vocab_size, (args.prompt_len,)).tolist()
    tokens_per_s(model, prompt, 8, True)  # warm-up
    rows = []
    print(f"{machine()} | preset {args.preset} (block_size {block}) | greedy, batch 1")
    print(f"{'new tokens':>10} {'cache tok/s':>12} {'recompute tok/s':>16} {'ratio':>7}")
    for n in args.new_tokens:
        cached, full = [], []
        for _ in range(args.repeats):
            cached.append(tokens_per_s(model, prompt, n, True))
            full.append(tokens_per_s(model, prompt, n, False))
        c, f = max(cached), max(full)
        print(f"{n:>10} {c:>12.1f} {f:>16.1f} {c / f:>6.1f}x")
        rows.append({"bench": "generate", "preset": args.preset, "device": args.device, "new_tokens": n,
                     "prompt_len": args.prompt_len, "cache_tok_s": round(c, 2), "recompute_tok_s": round(f, 2),
                     "ratio": round(c / f, 2)})
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
