"""blues-train: train a Blues MoE language model with DeepSpeed.

    blues-train                                   # tiny preset, built-in corpus, one CPU process, minutes
    blues-train --preset blues01 max_steps=2000 lr=6e-4
    deepspeed --num_gpus 2 --module blues.train --deepspeed_config ds_configs/zero2.json \\
        moe_backend=deepspeed ep_size=2           # expert-parallel DeepSpeed MoE under ZeRO 2
    deepspeed --num_gpus 8 launch/train.py --config run.yaml --deepspeed_config ds_configs/zero3.json
    blues-train --resume auto                     # continue from the newest complete checkpoint in out_dir
    blues-train --init_from MODEL_DIR max_steps=500 lr=1e-4   # fine-tune a model folder (Hugging Face or Blues)

--init_from MODEL_DIR starts a new run at step 0 with a fresh optimizer from the weights of a model
folder: a Blues one (save_pretrained, blues-train's out/model) or a Hugging Face one (Mixtral). The
model and MoE fields come from the folder, the training fields from their defaults; key=value overrides
may change anything but the weights' shapes (ep_size, block_size, lr, ...). A checkpoint in out_dir
wins over --init_from: --resume auto continues that run (a requeued job with the same command line
picks up where it stopped), and an explicit --resume together with --init_from is refused.

On a machine without GPUs `deepspeed --num_gpus N` starts N CPU ranks (gloo backend).

Exit codes: 0 done (or stopped by SIGTERM/SIGUSR1 after a checkpoint), 2 a user error (one line on
stderr: a config value, a file, a checkpoint), 1 a failure that is not the input's (a non-finite loss
that DeepSpeed applied), 3 max_bad_steps non-finite losses in a row, 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, Optional

from blues.common import EXIT_FAILURE, OneLineParser, add_alias, atomic_write_json, run_cli
from blues.presets import load_config
from blues.train import build_engine, exit_process, resume, train, validate
from blues.train.checkpoint import find_resume, read_meta
from blues.train.debug import DebugConfig
from blues.train.ds_config import BUILTIN_DS_CONFIG, load_ds_config, zero_stage
from blues.train.engine import describe, record_vision_pretrained
from blues.train.loop import DEFAULT_PROMPT, stop_signals
from blues.train.resume_check import check_resume

PROG = "blues-train"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="tiny (default) or blues01")
    p.add_argument("--config", default=None, help="a YAML/JSON file of Blues config fields (instead of --preset)")
    p.add_argument("--deepspeed_config", default=None, dest="deepspeed_config",
                   help="a DeepSpeed JSON (ds_configs/*.json); default: the built-in ZeRO 2 config")
    add_alias(p, "--ds_config", "deepspeed_config")
    p.add_argument("--resume", default="auto",
                   help="auto (default: the newest complete checkpoint in out_dir, if any), none, or a checkpoint "
                        "folder")
    p.add_argument("--init_from", default=None, metavar="MODEL_DIR",
                   help="start at step 0 from the weights of a model folder (Hugging Face or Blues); its config is "
                        "used, key=value overrides may change anything but the weights' shapes")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the sample printed at the end ('' for none)")
    p.add_argument("--no_export", action="store_true", help="do not export weights at the end")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bar (auto: on a tty)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="config overrides key=value (lr=1e-3 max_steps=500 ...)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before and after the options
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    root = logging.getLogger("blues")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with stop_signals():
            return run_cli(PROG, lambda: _train(args))
    finally:
        root.removeHandler(handler)


def _config(args: argparse.Namespace):
    """The run's config: --preset or --config with overrides, or with --init_from the folder's
    (blues.hf.init_from_config). ValueError for --init_from beside --preset, --config or an explicit
    --resume."""
    if args.init_from is None:
        return load_config(args.config, args.preset, args.overrides)
    for flag, value in (("--preset", args.preset), ("--config", args.config)):
        if value is not None:
            raise ValueError(f"--init_from {args.init_from} and {flag} {value} are both given: --init_from takes the "
                             "model from the folder; pass training settings as key=value overrides")
    if args.resume not in ("auto", "none", "", None):
        raise ValueError(f"--init_from {args.init_from} and --resume {args.resume} are both given: a resume "
                         "continues its own run, --init_from starts a new one at step 0; pass one of them")
    from blues.hf import init_from_config
    return init_from_config(args.init_from, args.overrides)


def _train(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))
    say = print if rank == 0 else (lambda *a, **k: None)
    # Every check that needs no process group, once, before anything starts.
    cfg = record_vision_pretrained(_config(args))  # the tower's recorded config: a resume compares it too
    ds_raw = load_ds_config(args.deepspeed_config) if args.deepspeed_config else BUILTIN_DS_CONFIG
    ds = validate(cfg, ds_raw, int(os.environ.get("WORLD_SIZE", "1")))
    debug = DebugConfig.from_env()
    where = find_resume(args.resume, cfg.train.out_dir, say=lambda msg: say(f"{PROG}: {msg}", file=sys.stderr))
    if where is not None:  # refuse an incompatible checkpoint before building the engine
        meta = read_meta(os.path.join(*where))
        # Everything but the tokenizer (known once the data is read; resume() checks it, with the rest again).
        check_resume(meta, cfg, meta.get("tokenizer_sha256"), int(os.environ.get("WORLD_SIZE", "1")),
                     zero_stage(ds))
        if args.init_from is not None:
            say(f"{PROG}: --init_from {args.init_from} is not used: resuming {os.path.join(*where)} (a resume "
                "continues its own run)", file=sys.stderr)
    init_from = args.init_from if where is None else None
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    try:
        run = build_engine(cfg, ds, validated=True, debug=debug, init_from=init_from)
        if rank == 0:
            os.makedirs(cfg.train.out_dir, exist_ok=True)
            atomic_write_json(os.path.join(cfg.train.out_dir, "run_config.json"),
                              {"blues": cfg.to_dict(), "deepspeed": run.ds_config}, default=str)
        print(describe(run), flush=True)
        if where is not None:
            changes = resume(run, where)
            say(f"resumed from {os.path.join(*where)} at step {run.step} ({run.tokens_seen:,} tokens seen)"
                + (f"; config changes: {'; '.join(changes)}" if changes else ""))
        progress = {"auto": None, "on": True, "off": False}[args.progress]
        return train(run, progress=progress, prompt=args.prompt or None, export=not args.no_export)
    except FloatingPointError as e:  # not the input's fault: one line, EXIT_FAILURE
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE


def entry_point() -> NoReturn:
    """The blues-train command as a process runs it (console script, `python -m blues.train`,
    launch/train.py): main(), then exit_process, so that a rank ends without the interpreter's teardown
    (blues.train.distributed.exit_process says why). Tests call main() in-process instead."""
    exit_process(main())


if __name__ == "__main__":
    entry_point()
