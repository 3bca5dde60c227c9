"""blues-generate: continue a prompt with a Blues model folder written by save_pretrained.

    blues-generate --model out/model --prompt "The" [--max_new_tokens 100] [--temperature 0.8]
        [--top_k K] [--top_p P] [--seed S] [--no_cache] [--device cpu|cuda|cuda:1]
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from blues.common import OneLineParser, run_cli


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="blues-generate", description="Generate text from a Blues model folder written by "
                      "save_pretrained (out/model after blues-train).")
    p.add_argument("--model", required=True, help="folder with model.safetensors, config.json and the tokenizer "
                   "(blues-train writes out/model)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max_new_tokens", "--output_len", type=int, default=100, dest="max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no_cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    return p


def resolve_device(name: Optional[str]) -> torch.device:
    """The device `--device` names; ValueError when it cannot be used on this machine."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r} is not supported: expected cpu, cuda or cuda:N")
    return device


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from blues.generate import generate
        from blues.model import Blues
        device = resolve_device(args.device)
        model = Blues.from_pretrained(args.model, map_location=str(device))
        if model.tokenizer is None:
            raise ValueError(f"{args.model!r} holds no tokenizer (tokenizer.json): it cannot take a text prompt")
        for piece in generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=True,
                              use_cache=not args.no_cache):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    return run_cli("blues-generate", body)


if __name__ == "__main__":
    sys.exit(main())
