"""blues-prune: remove the least useful experts of a trained Blues model, scored on calibration data.

    blues-prune MODEL_DIR OUT --keep 0.75 --method frequency|reap [--data_dir DIR] [--batches N]
        [--batch_size B] [--device cpu|cuda|cuda:N]

MODEL_DIR is a folder written by save_pretrained (blues-train's out/model). The first --batches batches
of the validation split of a prepared data_dir (default: the model's data_dir, as blues-train used)
calibrate the scores (blues.prune: "frequency", the share of top-k assignments; "reap", REAP's
router-weighted expert activation norm) and measure the validation loss before and after. Every MoE
layer keeps round(keep * num_experts) of its experts (Blues has one num_experts for all layers). OUT
gets the pruned model and the tokenizer, in the same format. Calibration and loss use the same
windows, so the loss after is the best case for those windows, not a held-out estimate.

Output (stdout):
    calibration: N batches of B x T tokens, split val of DIR, method M
    val_loss before: 4.3123 (16 experts per MoE layer)
    block 0: removed experts 2 7 11 14
    ...
    val_loss after: 4.3570 (12 experts per MoE layer, +0.0447)
    saved OUT

Exit codes: 0 saved; 2 a user error, one line on stderr (keep outside (0, 1], a model without MoE
layers, an OUT that exists and is not empty, top_k more than the experts kept, missing data).
"""
from __future__ import annotations

import os
from typing import Optional

from blues.common import OneLineParser, run_cli

PROG = "blues-prune"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a Blues model folder (save_pretrained; out/model)")
    p.add_argument("out", metavar="OUT", help="folder for the pruned model (must not exist, or be empty)")
    p.add_argument("--keep", type=float, required=True, help="share of each MoE layer's experts to keep, in (0, 1]")
    p.add_argument("--method", choices=("frequency", "reap"), default="reap",
                   help="frequency: how often the router chooses an expert; reap: gate value times the norm of "
                        "the expert's output (default)")
    p.add_argument("--data_dir", default=None, help="prepared data (blues-prepare); default: the model's data_dir")
    p.add_argument("--batches", type=int, default=8, help="validation batches for calibration and loss")
    p.add_argument("--batch_size", type=int, default=8, help="sequences of block_size tokens per batch")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    return p


def check_out(out: str) -> None:
    """ValueError unless OUT is absent or an empty folder: pruning never overwrites a file."""
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"OUT {out!r} exists and is not empty: give a new folder (pruning overwrites nothing)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"OUT {out!r} is a file: give a new folder")


def prune_main(args) -> None:
    from blues.cli.generate import resolve_device
    from blues.data.loader import TokenLoader
    from blues.model import Blues
    from blues.prune import check_keep, expert_scores, moe_layers, num_kept, prune_experts, validation_loss

    check_keep(args.keep)
    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} is invalid: expected a positive integer")
    check_out(args.out)
    device = resolve_device(args.device)
    model = Blues.from_pretrained(args.model_dir, map_location=str(device), ep_size=1)
    moe_layers(model)  # no MoE layer: refused before any data is read
    cfg = model.config
    E, K = cfg.moe.num_experts, cfg.moe.top_k
    num_kept(E, args.keep, K)  # top_k > kept: refused before calibration
    data_dir = args.data_dir or cfg.train.data_dir
    loader = TokenLoader(data_dir, "val", cfg.model.block_size, args.batch_size, tokenizer=model.tokenizer)
    batches = list(loader.eval_batches(args.batches))  # [(x, y)], each (B, T)
    B, T = batches[0][0].shape
    print(f"calibration: {len(batches)} batches of {B} x {T} tokens, split val of {data_dir}, method {args.method}",
          flush=True)
    before = validation_loss(model, batches)
    print(f"val_loss before: {before:.4f} ({E} experts per MoE layer)", flush=True)
    scores = expert_scores(model, [x for x, _ in batches], args.method)  # (L, E)
    res = prune_experts(model, scores, args.keep)
    for block, removed in zip(res.blocks, res.removed):
        print(f"block {block}: removed experts {' '.join(map(str, removed)) or '(none)'}")
    after = validation_loss(res.model, batches)
    print(f"val_loss after: {after:.4f} ({res.model.config.moe.num_experts} experts per MoE layer, "
          f"{after - before:+.4f})")
    res.model.save_pretrained(args.out, tokenizer=model.tokenizer)
    print(f"saved {args.out}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: prune_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
