"""blues-generate: continue a prompt with a Blues model folder written by save_pretrained.

    blues-generate --model out/model --prompt "The" [--max_new_tokens 100] [--temperature 0.8]
        [--top_k K] [--top_p P] [--seed S] [--no_cache] [--device cpu|cuda|cuda:1]
    blues-generate --model out/model --interactive [same settings]
    blues-generate --model out/vl_model --image cat.png --prompt "a" (a vision model; --image repeats)

--interactive is a prompt loop: each line is continued (no history: every answer starts from its own
prompt), streamed as its tokens are made, then one line gives tokens/s (the new tokens over the
answer's wall-clock time, prompt included). Lines starting with / change the settings for the next
answers: /temp 0.7, /top_p 0.9 (or off), /top_k 50 (or off), /max 200, /settings, /help; a bad value is
one line and the loop goes on. Ctrl-C stops an answer; at the prompt, Ctrl-D or Ctrl-C ends the
session with exit 0.

--image PATH (vision models): the image's span goes where the prompt says <|image|>, or before the
text; with --interactive every answer sees the images. An unreadable file is one line, exit 2.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Optional

import torch

from blues.common import OneLineParser, run_cli


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="blues-generate", description="Generate text from a Blues model folder written by "
                      "save_pretrained (out/model after blues-train).")
    p.add_argument("--model", required=True, help="folder with model.safetensors, config.json and the tokenizer "
                   "(blues-train writes out/model)")
    p.add_argument("--prompt", default=None, help="text to continue (required unless --interactive)")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image file for a vision model (repeat for several); its tokens go where the prompt "
                   "says <|image|>, else before the text")
    p.add_argument("--interactive", action="store_true", help="a prompt loop that streams answers and reports "
                   "tokens/s; /temp, /top_p, /top_k, /max change the settings; Ctrl-D quits")
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


# ----------------------------------------------------------------------------- the REPL

REPL_PROMPT = "> "
REPL_HELP = ("/temp T (0 = greedy), /top_p P or off, /top_k K or off, /max N, /settings, /help; "
             "Ctrl-C stops an answer, Ctrl-D or Ctrl-C at the prompt quits")
# command -> (generate() argument, type of its value, may be switched off)
REPL_COMMANDS = {"/temp": ("temperature", float, False), "/top_p": ("top_p", float, True),
                 "/top_k": ("top_k", int, True), "/max": ("max_new_tokens", int, False)}


def describe_settings(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={'off' if v is None else v}" for k, v in settings.items())


def apply_command(settings: dict[str, Any], line: str) -> dict[str, Any]:
    """'/temp 0.7' -> the settings with that change; ValueError naming the command, the value and what would
    be right (generate's own check decides what a setting may be)."""
    from blues.generate import check_sampling_args
    cmd, *values = line.split()
    if cmd not in REPL_COMMANDS:
        raise ValueError(f"unknown command {cmd!r}: expected one of {REPL_HELP}")
    name, kind, may_be_off = REPL_COMMANDS[cmd]
    if len(values) != 1:
        raise ValueError(f"{cmd} takes one value ({'a number' if kind is float else 'an integer'}"
                         f"{' or off' if may_be_off else ''}), got {len(values)}")
    raw = values[0]
    if may_be_off and raw.lower() in ("off", "none"):
        value = None
    else:
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"{cmd} {raw!r}: expected {'a number' if kind is float else 'an integer'}"
                             f"{' or off' if may_be_off else ''}") from None
    new = {**settings, name: value}
    try:
        check_sampling_args(new["temperature"], new["top_k"], new["top_p"], new["max_new_tokens"])
    except ValueError as e:
        raise ValueError(f"{cmd} {raw}: {e}") from None
    return new


def answer(model, prompt: str, settings: dict[str, Any], seed: Optional[int], use_cache: bool,
           images: Optional[list] = None) -> str:
    """Stream the continuation of `prompt` to stdout; returns the tokens/s line."""
    from blues.generate import generate
    n = 0

    def count(_tok: int) -> None:
        nonlocal n
        n += 1

    t0 = time.perf_counter()
    stopped = ""
    try:
        for piece in generate(model, prompt, **settings, seed=seed, stream=True, use_cache=use_cache,
                              on_token=count, images=images):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stopped = ", stopped"
    dt = time.perf_counter() - t0
    return f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tokens/s{stopped}]"


def interactive(model, settings: dict[str, Any], seed: Optional[int], use_cache: bool,
                images: Optional[list] = None) -> int:
    """The prompt loop of --interactive; returns the exit code (0: Ctrl-D or Ctrl-C at the prompt)."""
    # Ctrl-C must reach the loop even when a parent started us with SIGINT ignored (`nohup ... &`, a
    # non-interactive shell's background job: Python then keeps it ignored, and Ctrl-C would do nothing).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"blues-generate: interactive, {describe_settings(settings)}\ncommands: {REPL_HELP}", flush=True)
    while True:
        try:
            line = input(REPL_PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return 0
        if not line:
            continue
        try:
            if line in ("/help", "/settings"):
                print(REPL_HELP if line == "/help" else describe_settings(settings), flush=True)
            elif line.startswith("/"):
                settings = apply_command(settings, line)
                print(describe_settings(settings), flush=True)
            else:
                stats = answer(model, line, settings, seed, use_cache, images)
                print(f"\n{stats}", flush=True)
        except ValueError as e:  # a bad setting or prompt (too long, ...): one line, the loop goes on
            print(f"blues-generate: error: {e}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:  # Ctrl-C outside an answer's own loop (before its first token): back to the prompt
            print("\n[stopped]", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.prompt is None) == (not args.interactive):
        parser.error("give --prompt TEXT or --interactive (one of them)")

    def body() -> int:
        from blues.generate import generate
        from blues.model import Blues
        device = resolve_device(args.device)
        model = Blues.from_pretrained(args.model, map_location=str(device))
        if model.tokenizer is None:
            raise ValueError(f"{args.model!r} holds no tokenizer (tokenizer.json): it cannot take a text prompt")
        images = None
        if args.image:
            from blues.data.image_sources import load_image
            if model.vision is None:
                raise ValueError(f"--image needs a vision model; {args.model!r} is text-only (vision_enabled=false)")
            size = model.config.vision.image_size
            images = [torch.from_numpy(load_image(path, "--image", size, {})) for path in args.image]  # (3, S, S)
        if args.interactive:
            settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens)
            from blues.generate import check_sampling_args
            check_sampling_args(**settings)
            return interactive(model, settings, args.seed, not args.no_cache, images)
        for piece in generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=True,
                              use_cache=not args.no_cache, images=images):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    return run_cli("blues-generate", body)


if __name__ == "__main__":
    sys.exit(main())
