"""Train or inspect a tokenizer.

    python -m blues.cli.tokenizer train --out blues/assets      # regenerate the shipped default
    python -m blues.cli.tokenizer train --out DIR --vocab_size N --input_dir TEXTS
    python -m blues.cli.tokenizer info [default | gpt2 | DIR]

A mistake in the input (an unreachable vocab_size, a bad folder) is one line on stderr and exit 2.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from blues.common import EXIT_FAILURE, OneLineParser, run_cli
from blues.data.sources import iter_input_dir
from blues.data.tokenizer import (
    CONFIG_FILE,
    DEFAULT_NAME,
    DEFAULT_VOCAB_SIZE,
    Tokenizer,
    train_default,
    train_tokenizer,
)

PROG = "python -m blues.cli.tokenizer"


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Train a byte-level BPE tokenizer (rustbpe) or print one's identity.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    t = sub.add_parser("train", help="train a byte-level BPE and save it (the default: --out blues/assets)")
    t.add_argument("--out", required=True, help="folder to write tokenizer.tiktoken + tokenizer.json into")
    t.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help="ids incl. special tokens")
    t.add_argument("--input_dir", default=None, help="train on these files (as blues-prepare reads them); "
                                                     "default: the built-in corpus")
    t.add_argument("--text_field", default="text")
    t.add_argument("--name", default=None, help=f"default: {DEFAULT_NAME} on the built-in corpus, else the folder name")
    t.add_argument("--allow_smaller", action="store_true", help="keep a smaller vocabulary when the corpus stops early")
    i = sub.add_parser("info", help="load a tokenizer and print its name, size and sha256")
    i.add_argument("tokenizer", nargs="?", default="default")
    return p


def _run(args) -> int:
    t0 = time.perf_counter()
    if args.cmd == "info":
        tok = Tokenizer.load(args.tokenizer)
        print(f"{tok.name}: n_vocab={tok.n_vocab} eot_id={tok.eot_id} sha256={tok.sha256} "
              f"(loaded in {time.perf_counter() - t0:.3f} s from {tok.source})")
        return 0
    if args.input_dir is None:
        tok = train_default(args.vocab_size, args.name or DEFAULT_NAME)
    else:
        name = args.name or os.path.basename(os.path.abspath(args.input_dir))
        docs = (text for text, _ in iter_input_dir(args.input_dir, args.text_field))
        tok = train_tokenizer(docs, args.vocab_size, name, allow_smaller=args.allow_smaller)
    try:
        tok.save(args.out)
    except OSError as e:  # the folder the user named: their input, so exit 2
        raise ValueError(f"--out {args.out!r} cannot be written ({e.strerror}): pass a folder you can "
                         f"write to") from None
    print(f"trained {tok.name}: n_vocab={tok.n_vocab} (asked {args.vocab_size}) sha256={tok.sha256} "
          f"in {time.perf_counter() - t0:.2f} s -> {os.path.join(args.out, CONFIG_FILE)}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        try:
            return _run(args)
        except ValueError as e:  # some messages quote a library's own, which may span lines
            raise ValueError(" ".join(str(e).split())) from None
        except OSError as e:  # an unreadable input file, a full disk: one line, not a traceback
            print(f"{PROG}: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
            return EXIT_FAILURE

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
