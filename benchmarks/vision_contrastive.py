"""Contrastive alignment: top-1 image<->text retrieval among 64 held-out pairs after the contrastive stage alone.

    python benchmarks/vision_contrastive.py            # blues-train, contrastive_steps = max_steps, then retrieval
    python benchmarks/vision_contrastive.py --smoke    # 10 steps, one group of 64: the script works (~20 s)
    python benchmarks/vision_contrastive.py --max_steps 600 --set micro_batch_size=32 --out /tmp/c.jsonl

1. blues-train's loop (blues.train.train in this process, one CPU rank, the built-in ZeRO 2 config; the
   thread count set after init_distributed, as _common.blues_train says why) trains the tiny_vl
   preset (48 px images in 16 px patches: 9 image tokens, one per cell of the synthetic set's 3 x 3
   position grid; micro_batch_size 128, blues.presets.tiny_vl says why) with contrastive_steps = max_steps:
   every step is the InfoNCE loss alone. The data is
   the built-in synthetic set (blues.data.shapes), written into a temporary data_dir by the run itself.
2. The exported model (out/model, the contrastive heads inside) embeds the held-out (val) pairs: images
   through the tower and the image head, captions through the decoder alone and the text head. Top-1
   image->text and text->image retrieval in consecutive groups of 64 pairs (chance 1/64 = 1.6 %), mean
   over the groups; a pick with the true caption's text counts as correct (blues.vision.contrastive.
   retrieval_hits says why). The same with every image replaced by uniform noise: near chance.
3. Prints the table and appends one JSON row to --out (benchmarks/results/vision_contrastive.jsonl).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

BLOCK_SIZE = 32  # tiny_vl's: the image span, the longest caption and <|endoftext|>


def embed_held_out(model, data: str, num_pairs: int, noise: bool, seed: int = 0):
    """(image_emb (N, D), text_emb (N, D), caption ids (N,)) of the first num_pairs val pairs; with
    noise, each image replaced by uniform noise (the captions unchanged)."""
    import torch

    from blues.data.images import ImageTextLoader
    from blues.vision.contrastive import caption_ids
    loader = ImageTextLoader(data, "val", block_size=BLOCK_SIZE, batch_size=64)
    g = torch.Generator().manual_seed(seed)
    imgs, txts, ys = [], [], []
    with torch.no_grad():
        for x, y, images in loader.eval_batches(-(-num_pairs // 64)):
            if noise:
                images = torch.rand(images.shape, generator=g)
            c = model(x, y, images=images, contrastive="only").contrastive
            imgs.append(c.image_emb)
            txts.append(c.text_emb)
            ys.append(y)
    ids = caption_ids(ys)
    return torch.cat(imgs)[:num_pairs], torch.cat(txts)[:num_pairs], ids[:num_pairs]


def accuracy(model, data: str, num_pairs: int, noise: bool) -> dict:
    """Top-1 retrieval among groups of 64 (fewer when num_pairs < 64): i2t, t2i, groups, candidates."""
    from blues.vision.contrastive import RETRIEVAL_CANDIDATES, retrieval_hits
    h = retrieval_hits(*embed_held_out(model, data, num_pairs, noise), candidates=RETRIEVAL_CANDIDATES)
    q = max(1, h["queries"])
    return {"i2t_top1": round(h["i2t_hits"] / q, 4), "t2i_top1": round(h["t2i_hits"] / q, 4),
            "groups": h["queries"] // max(1, h["candidates"]), "candidates": h["candidates"]}


def main(argv=None) -> int:
    from _common import add_run_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--num_pairs", type=int, default=448, help="held-out pairs (7 groups of 64 by default)")
    p.add_argument("--smoke", action="store_true", help="10 steps, 64 pairs: the script works")
    add_run_args(p, os.path.join(HERE, "results", "vision_contrastive.jsonl"))
    args = p.parse_args(argv)
    if args.smoke:
        args.max_steps, args.num_pairs = 10, 64
    import torch
    from _common import blues_train, run_dirs, write_rows

    from blues.model import Blues
    data, out = run_dirs(args.work, "blues_contrastive_")
    load_before = os.getloadavg()[0]
    items = [f"max_steps={args.max_steps}", f"contrastive_steps={args.max_steps}", f"data_dir={data}",
             f"out_dir={out}", f"eval_interval={max(1, args.max_steps // 4)}", f"save_interval={args.max_steps}",
             "log_interval=25", *args.set]
    seconds = blues_train("tiny_vl", items, args.threads)
    torch.set_num_threads(args.threads)
    model = Blues.from_pretrained(os.path.join(out, "model")).eval()
    t0 = time.perf_counter()
    real, noise = accuracy(model, data, args.num_pairs, False), accuracy(model, data, args.num_pairs, True)
    eval_s = time.perf_counter() - t0
    print(f"{'images':<8} {'image->text':>12} {'text->image':>12}   top-1 among {real['candidates']} "
          f"(chance {1 / max(1, real['candidates']):.1%}), mean of {real['groups']} groups")
    for name, acc in (("real", real), ("noise", noise)):
        print(f"{name:<8} {acc['i2t_top1']:>12.1%} {acc['t2i_top1']:>12.1%}")
    print(f"blues-train {args.max_steps} contrastive steps in {seconds:.0f} s (data preparation included); "
          f"retrieval in {eval_s:.0f} s; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, "
          f"on {os.cpu_count()} CPUs")
    row = {"benchmark": "vision_contrastive",
           "command": "python benchmarks/vision_contrastive.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "preset": "tiny_vl", "max_steps": args.max_steps, "contrastive_steps": args.max_steps,
           "overrides": args.set, "train_seconds": round(seconds, 1), "num_pairs": args.num_pairs,
           "accuracy": real, "noise_accuracy": noise, "eval_seconds": round(eval_s, 1),
           "logit_scale": round(model.contrastive.scale().item(), 2),
           "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
           "params": model.num_params()}
    write_rows(args.out, [row])
    return 0


if __name__ == "__main__":
    from blues.train import exit_process
    exit_process(main())  # a rank's end: no interpreter teardown (blues.train.distributed says why)
