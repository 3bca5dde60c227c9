"""blues-prepare: tokenize text into a data_dir for blues-train.

    blues-prepare --input_dir DIR --data_dir DIR        # .txt .md .jsonl .json .parquet under DIR
    blues-prepare --dataset NAME [--subset S] [--split S] --data_dir DIR   # Hugging Face datasets
    blues-prepare --data_dir DIR                        # the built-in corpus (stdlib source + pydoc), offline
    blues-prepare --data_dir DIR --corpus pydoc         # the small built-in corpus (pydoc topics only)
    blues-prepare --data_dir DIR --check                # is it complete, and made with --tokenizer?
    blues-prepare --images pairs.jsonl --data_dir DIR   # image-text pairs or LLaVA conversations (Pillow)
    blues-prepare --images --data_dir DIR               # the built-in synthetic shapes (also: --images builtin)

--cache_dir is the old name of --data_dir, still accepted. A mistake in the input (a bad file, a
missing field, an unwritable folder) is one line on stderr and exit 2; see blues/data/ for the rest.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

from blues.common import EXIT_FAILURE, OneLineParser, add_alias, run_cli
from blues.data.data_dir import check_tokenizer, load_meta
from blues.data.prepare import DEFAULT_SEED, prepare
from blues.data.sources import BUILTIN_CORPORA, DEFAULT_CORPUS, INPUT_EXTENSIONS
from blues.vision.config import VisionConfig, num_image_tokens

PROG = "blues-prepare"


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog=PROG,
        description="Tokenize text into a data_dir for blues-train: a folder of files, a Hugging Face "
                    "dataset, or (with neither) the built-in corpus.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input_dir", help=f"read every {', '.join(INPUT_EXTENSIONS)} file under this folder")
    src.add_argument("--dataset", help="a Hugging Face dataset: a hub name, or a local folder")
    src.add_argument("--corpus", choices=BUILTIN_CORPORA, default=None,
                     help=f"with neither of those: which built-in corpus (default {DEFAULT_CORPUS}: the Python "
                          f"standard library's source and pydoc text, ~12 MB; pydoc: its pydoc text only, 0.5 MB)")
    src.add_argument("--images", nargs="?", const="builtin", default=None, metavar="SRC",
                     help="image-text data instead of text: a .jsonl/.json of {\"image\": PATH, \"text\": ...} or "
                          "LLaVA-style conversations (image paths relative to it), or 'builtin' (the default "
                          "when SRC is left out): synthetic coloured shapes captioned by colour, shape and place")
    vision = VisionConfig()
    p.add_argument("--image_size", type=int, default=vision.image_size,
                   help=f"with --images: side in pixels every image is resized to (default {vision.image_size})")
    p.add_argument("--patch_size", type=int, default=vision.patch_size,
                   help=f"with --images: the vision encoder's patch side, which sets the image tokens per image "
                        f"(default {vision.patch_size})")
    p.add_argument("--merge_patches", action="store_true",
                   help="with --images: the encoder merges 2x2 patches into one image token")
    p.add_argument("--two_object_fraction", type=float, default=0.0,
                   help="with --images builtin: share of images with two shapes, captioned 'a red circle left "
                        "of a blue square' (default 0)")
    p.add_argument("--subset", default=None, help="dataset configuration name")
    p.add_argument("--split", default="train", help="dataset split to read (default: train)")
    p.add_argument("--text_field", default="text", help="field holding the text in .jsonl/.json/.parquet and datasets")
    p.add_argument("--data_dir", default="data_cache",
                   help="where the prepared data goes; blues-train's data_dir (default: data_cache)")
    add_alias(p, "--cache_dir", "data_dir")
    p.add_argument("--tokenizer", default="default",
                   help="'default', a tiktoken name (gpt2, cl100k_base, o200k_base) or a tokenizer folder/file")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="train a tokenizer of this size on the train split instead")
    p.add_argument("--allow_smaller", action="store_true", help="with --vocab_size: keep what the corpus reaches")
    p.add_argument("--num_proc", type=int, default=1, help="tokenizing processes (default: 1)")
    p.add_argument("--val_fraction", type=float, default=0.05,
                   help="share of the text held out for validation, as whole documents (default: 0.05)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the train/val split")
    p.add_argument("--force", action="store_true", help="rebuild even when the data_dir matches the inputs")
    p.add_argument("--check", action="store_true",
                   help="build nothing: check that data_dir is complete and was made with --tokenizer")
    return p


def _run_images(args) -> int:
    from blues.data.images import BUILTIN, load_image_meta, prepare_images, with_image_tokens

    if args.vocab_size is not None:
        raise ValueError(f"--vocab_size {args.vocab_size} trains a text tokenizer; with --images pass --tokenizer "
                         f"(the image tokens are added to it)")
    vcfg = VisionConfig(image_size=args.image_size, patch_size=args.patch_size, merge_patches=args.merge_patches)
    if args.check:
        meta = load_image_meta(args.data_dir)
        check_tokenizer(with_image_tokens(args.tokenizer), meta)
        print(f"{args.data_dir}: complete image-text data, {meta['num_samples']:,} images of {meta['image_size']} "
              f"px, tokenizer {meta['tokenizer']['name']} ({meta['vocab_size']} ids) matches {args.tokenizer!r}")
        return 0
    meta = prepare_images(args.data_dir, args.images, image_size=vcfg.image_size,
                          num_image_tokens=num_image_tokens(vcfg), tokenizer=args.tokenizer,
                          val_fraction=args.val_fraction, seed=args.seed,
                          two_object_fraction=args.two_object_fraction, force=args.force)
    sp = meta["splits"]
    what = "reused" if meta["reused"] else f"prepared in {meta['build_seconds']:.2f} s"
    converted = ", ".join(f"{n} {mode}" for mode, n in sorted(meta["converted_modes"].items())) or "none"
    skipped = meta["source"].get("num_text_only_skipped", 0)
    print(f"{what}: {meta['num_samples']:,} images ({sp['train']['num_samples']:,} train / "
          f"{sp['val']['num_samples']:,} val) of {meta['image_size']} px, {meta['num_image_tokens']} image tokens "
          f"each; {meta['num_resized']} resized, converted to RGB: {converted}"
          f"{f', {skipped} text-only records skipped' if skipped else ''}; "
          f"{'built-in shapes' if args.images == BUILTIN else 'from ' + meta['source']['path']}, tokenizer "
          f"{meta['tokenizer']['name']} + image tokens ({meta['vocab_size']} ids) -> {meta['data_dir']}")
    return 0


def _run(args) -> int:
    if args.images is not None:
        return _run_images(args)
    if args.check:
        meta = load_meta(args.data_dir)
        check_tokenizer(args.tokenizer, args.data_dir)
        print(f"{args.data_dir}: complete, {meta['num_tokens']:,} tokens, tokenizer "
              f"{meta['tokenizer']['name']} ({meta['vocab_size']} ids) matches {args.tokenizer!r}")
        return 0
    meta = prepare(data_dir=args.data_dir, input_dir=args.input_dir, dataset=args.dataset,
                   subset=args.subset, split=args.split, text_field=args.text_field,
                   tokenizer=args.tokenizer, num_proc=args.num_proc, val_fraction=args.val_fraction,
                   seed=args.seed, vocab_size=args.vocab_size, allow_smaller=args.allow_smaller,
                   force=args.force, corpus=args.corpus)
    sp = meta["splits"]
    what = "reused" if meta["reused"] else f"prepared in {meta['build_seconds']:.2f} s"
    print(f"{what}: {meta['num_tokens']:,} tokens ({sp['train']['num_tokens']:,} train / "
          f"{sp['val']['num_tokens']:,} val) from {meta['num_documents']:,} documents, tokenizer "
          f"{meta['tokenizer']['name']} ({meta['vocab_size']} ids, {meta['dtype']}) -> {meta['data_dir']}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        try:
            return _run(args)
        except ValueError as e:  # some messages quote a library's own, which may span lines
            raise ValueError(" ".join(str(e).split())) from None
        except OSError as e:  # disk full, permissions lost mid-run: not the input's fault, so exit 1
            print(f"{PROG}: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
            return EXIT_FAILURE

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    root = logging.getLogger("blues")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        return run_cli(PROG, body)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
