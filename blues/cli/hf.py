"""blues-import and blues-export: move models between Hugging Face (Mixtral, Qwen3-MoE) and Blues folders.

    blues-import HF_DIR OUT_DIR [--dtype fp32|bf16|fp16]   # a Blues folder (save_pretrained) for
                                                            # blues-generate --model OUT_DIR
    blues-export MODEL_DIR --hf OUT_DIR [--dtype ...] [--max_shard_size 5GB]
    python -m blues.cli.hf import ... | export ...          # the same, as subcommands

Exit codes: 0 done, 2 a user error (one line on stderr naming the field, file or tensor).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from blues.common import EXIT_USAGE, OneLineParser, run_cli

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def _refuse_non_empty(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path!r} exists and is not an empty folder: choose a new output folder")


def build_import_parser(prog: str = "blues-import") -> OneLineParser:
    p = OneLineParser(prog=prog, description="Import a Hugging Face Mixtral or Qwen3-MoE folder (config.json and "
                      "safetensors, sharded or not) as a Blues model folder.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new Blues model folder (must not exist, or be empty)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="dtype of the weights written")
    return p


def build_export_parser(prog: str = "blues-export") -> OneLineParser:
    p = OneLineParser(prog=prog, description="Export a Blues model folder (save_pretrained) as a Hugging Face "
                      "Mixtral folder (Qwen3-MoE where Mixtral cannot express the model) that transformers loads "
                      "with no custom code.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Blues model folder (blues-train writes out/model)")
    p.add_argument("--hf", required=True, dest="out_dir", metavar="OUT_DIR",
                   help="new Hugging Face folder (must not exist, or be empty)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="dtype of the weights written "
                   "(default fp32, the dtype Blues.from_pretrained loads in)")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors file before sharding (e.g. 5GB)")
    return p


def import_main(argv: Optional[list[str]] = None, prog: str = "blues-import") -> int:
    args = build_import_parser(prog).parse_args(argv)

    def body() -> int:
        from blues.hf import load_hf
        _refuse_non_empty(args.out_dir)
        model = load_hf(args.hf_dir, dtype=args.dtype)
        model.save_pretrained(args.out_dir)
        print(f"{prog}: wrote {args.out_dir} ({model.num_params():,} parameters, {args.dtype})")
        return 0

    return run_cli(prog, body)


def export_main(argv: Optional[list[str]] = None, prog: str = "blues-export") -> int:
    args = build_export_parser(prog).parse_args(argv)

    def body() -> int:
        from blues.hf import save_hf
        from blues.model import Blues
        _refuse_non_empty(args.out_dir)  # before loading the model: the cheap check first
        model = Blues.from_pretrained(args.model_dir)
        save_hf(model, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size)
        print(f"{prog}: wrote {args.out_dir}")
        return 0

    return run_cli(prog, body)


COMMANDS = {"import": import_main, "export": export_main}


def main(argv: Optional[list[str]] = None) -> int:
    """python -m blues.cli.hf import|export ...: the two console scripts as subcommands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m blues.cli.hf"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} {{import,export}} ...\n\n{__doc__}", file=sys.stderr if not argv else sys.stdout)
        return EXIT_USAGE if not argv else 0
    if argv[0] not in COMMANDS:
        print(f"{prog}: error: unknown command {argv[0]!r}: expected import or export", file=sys.stderr)
        return EXIT_USAGE
    return COMMANDS[argv[0]](argv[1:], prog=f"{prog} {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
