"""Vision: does a tiny vision-language Blues read the image? Caption accuracy on held-out synthetic images.

    python benchmarks/vision.py                   # blues-train on the built-in synthetic set, then captions
    python benchmarks/vision.py --smoke           # 30 steps, 32 images: the script works (~1 min)
    python benchmarks/vision.py --max_steps 600 --set lr=3e-3 --out /tmp/v.jsonl

1. blues-train's loop (_common.blues_train: blues.train.train in this process, one CPU rank, the built-in
   ZeRO 2 config) trains the tiny_vl preset: vocab_size=4099 (the default tokenizer plus the three image
   tokens), 48 px images in 16 px patches, so each of the 3 x 3 patches is one cell of the synthetic set's
   position grid (9 image tokens), block_size 32 (the span, the longest caption, eot), and its recipe
   (blues.presets.tiny_vl says why): micro-batches of 128, the contrastive stage first, then language
   modelling beside the contrastive loss. The data is the built-in synthetic set (blues.data.shapes: one
   coloured shape per image, captioned "a {colour} {shape} at the {position}"), written into a temporary
   data_dir by the run itself.
2. For --num_images held-out images (the val split, which training never sees) the exported model
   decodes greedily from the image span and "a" (CAPTION_PROMPT); the caption is parsed with
   blues.data.shapes.caption_attributes. Exact match per attribute (colour, shape, position) and on all
   three; the same with the image replaced by uniform noise (the model must read the image: near
   chance, 1/6 * 1/5 * 1/9 = 0.4 % on all three, if it guesses the commonest answers).
3. Prints the table and appends one JSON row to --out (benchmarks/results/vision.jsonl).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

ATTRIBUTES = ("colour", "shape", "position")


def held_out(data: str, num_images: int):
    """(images (3, S, S) floats, attributes) of the first num_images val samples, read back from the
    prepared data (the caption is the loss-taking tokens of y)."""
    from blues.data.images import ImageTextLoader
    from blues.data.shapes import caption_attributes
    from blues.data.tokenizer import Tokenizer
    tok = Tokenizer.load(data)
    loader = ImageTextLoader(data, "val", block_size=32, batch_size=min(num_images, 64))
    out = []
    for _, y, images in loader.eval_batches(-(-num_images // loader.batch_size)):
        for row, image in zip(y, images):
            ids = [t for t in row.tolist() if t != -1 and t != tok.eot_id]
            out.append((image, caption_attributes(tok.decode(ids))))
    return out[:num_images]


def accuracy(model, samples, noise: bool, seed: int = 0) -> dict:
    """Exact match per attribute and on all three, greedy captions from CAPTION_PROMPT."""
    import torch

    from blues.data.shapes import CAPTION_PROMPT, caption_attributes
    g = torch.Generator().manual_seed(seed)
    hits = {a: 0 for a in ATTRIBUTES + ("all",)}
    examples = []
    for image, truth in samples:
        if noise:
            image = torch.rand(image.shape, generator=g)
        text = CAPTION_PROMPT + model.generate(CAPTION_PROMPT, images=[image], temperature=0, max_new_tokens=20)
        got = caption_attributes(text)
        ok = {a: got.get(a) == truth[a] for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += ok[a]
        hits["all"] += all(ok.values())
        if len(examples) < 3:
            examples.append({"caption": text, "truth": truth})
    return {**{a: round(h / len(samples), 4) for a, h in hits.items()}, "examples": examples}


def main(argv=None) -> int:
    from _common import add_run_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max_steps", type=int, default=500, help="tiny_vl's max_steps")
    p.add_argument("--num_images", type=int, default=300)
    p.add_argument("--smoke", action="store_true", help="30 steps, 32 images: the script works")
    add_run_args(p, os.path.join(HERE, "results", "vision.jsonl"))
    args = p.parse_args(argv)
    if args.smoke:
        args.max_steps, args.num_images = 30, 32
    from _common import blues_train, run_dirs, write_rows

    from blues.model import Blues
    data, out = run_dirs(args.work, "blues_vision_")
    load_before = os.getloadavg()[0]
    items = [f"max_steps={args.max_steps}", f"data_dir={data}", f"out_dir={out}", "eval_interval=100",
             f"save_interval={args.max_steps}", "log_interval=50", *args.set]
    if args.smoke:  # the stage must fit in the run (contrastive_steps <= max_steps)
        items.insert(1, f"contrastive_steps={args.max_steps // 2}")
    seconds = blues_train("tiny_vl", items, args.threads)
    model = Blues.from_pretrained(os.path.join(out, "model")).eval()
    samples = held_out(data, args.num_images)
    t0 = time.perf_counter()
    real, noise = accuracy(model, samples, noise=False), accuracy(model, samples, noise=True)
    decode_s = time.perf_counter() - t0
    print(f"{'images':<8} {'colour':>7} {'shape':>7} {'position':>9} {'all three':>10}")
    for name, acc in (("real", real), ("noise", noise)):
        print(f"{name:<8} {acc['colour']:>7.1%} {acc['shape']:>7.1%} {acc['position']:>9.1%} {acc['all']:>10.1%}")
    print(f"blues-train {args.max_steps} steps in {seconds:.0f} s (data preparation included); {len(samples)} held-out "
          f"images; captions in {decode_s:.0f} s; load average {load_before:.2f} before on {os.cpu_count()} CPUs")
    for ex in real["examples"]:
        print(f"  {ex['caption']!r}  (truth {ex['truth']})")
    row = {"benchmark": "vision", "command": "python benchmarks/vision.py " + " ".join(argv or sys.argv[1:]),
           "preset": "tiny_vl", "max_steps": args.max_steps, "overrides": args.set, "train_seconds": round(seconds, 1),
           "num_images": len(samples), "accuracy": {k: v for k, v in real.items() if k != "examples"},
           "noise_accuracy": {k: v for k, v in noise.items() if k != "examples"}, "examples": real["examples"],
           "decode_seconds": round(decode_s, 1), "loadavg_1m_before": round(load_before, 2),
           "params": model.num_params(), "vision_params": sum(p.numel() for p in model.vision.parameters())}
    write_rows(args.out, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
