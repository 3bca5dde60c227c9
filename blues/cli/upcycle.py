"""blues-upcycle: turn a dense Blues model into an MoE whose experts start as copies of its MLPs.

    blues-upcycle DENSE_DIR OUT --num_experts E --top_k K [--noise STD] [--drop_ratio R] [--seed S]
        [key=value ...]

DENSE_DIR is a folder of a model whose every layer is a dense SwiGLU: written by save_pretrained
(blues-train's out/model with num_dense_layers = n_layer), or a Hugging Face Llama or Qwen2 folder. Every
layer becomes an MoE of E experts, each a copy of that layer's MLP (blues.upcycle: sparse upcycling,
with optional noise or Drop-Upcycling re-initialisation); key=value sets other fields of the new
config (router_noise_std=0, ...). OUT gets the MoE and the tokenizer (a Blues folder's; a Hugging
Face tokenizer.json is not read yet); train it on with `blues-train --init_from OUT`.

Output (stdout):
    upcycled blocks 0-5: 8 experts of 1024 hidden units each, top-2
    params: 61.2M total, 20.4M active per token (dense: 14.1M)
    step-0 check: max |logits - dense logits| = 6.0e-07 on 2 x 64 random tokens
    saved OUT

The step-0 check runs when the copies are exact (no --noise, no --drop_ratio): the MoE then computes
the dense model's function, and a difference above 1e-4 fails the command (exit 1).
Exit codes: 0 saved; 1 the step-0 check failed (nothing saved); 2 a user error, one line on stderr (a
model with MoE layers, top_k > num_experts, an OUT that exists and is not empty, a bad value).
"""
from __future__ import annotations

import sys
from typing import Optional

from blues.common import EXIT_FAILURE, EXIT_OK, OneLineParser, run_cli

PROG = "blues-upcycle"
STEP0_TOL = 1e-4  # fp32: the same products summed in another order (measured ~6e-7 on the tiny preset)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("dense_dir", metavar="DENSE_DIR",
                   help="a dense Blues model folder, or a Hugging Face Llama or Qwen2 one")
    p.add_argument("out", metavar="OUT", help="folder for the MoE (must not exist, or be empty)")
    p.add_argument("--num_experts", type=int, required=True, help="experts per layer")
    p.add_argument("--top_k", type=int, required=True, help="experts per token")
    p.add_argument("--noise", type=float, default=0.0, metavar="STD",
                   help="Gaussian noise added to each expert's copy, in units of each weight matrix's std (default 0)")
    p.add_argument("--drop_ratio", type=float, default=0.0, metavar="R",
                   help="Drop-Upcycling: share of each expert's hidden units re-initialised (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers' init, the noise and the re-init")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="other fields of the new config")
    return p


def upcycle_main(args) -> int:
    import torch

    from blues.cli.prune import check_out
    from blues.hf.load import load_model
    from blues.upcycle import check_upcycle_args, dense_layers_of, upcycle

    check_upcycle_args(args.num_experts, args.top_k, args.noise, args.drop_ratio)
    check_out(args.out)
    dense = load_model(args.dense_dir).eval()
    dense_layers_of(dense)  # refused before any work when the model has MoE layers
    res = upcycle(dense, args.num_experts, args.top_k, noise_std=args.noise, drop_ratio=args.drop_ratio,
                  seed=args.seed, overrides=args.overrides)
    moe, m = res.model.eval(), res.model.config.moe
    span = f"{res.layers[0]}-{res.layers[-1]}" if len(res.layers) > 1 else str(res.layers[0])
    print(f"upcycled blocks {span}: {m.num_experts} experts of {m.expert_ffn_size} hidden units each, top-{m.top_k}"
          + (f", {res.reinitialised} re-initialised per expert" if res.reinitialised else ""))
    print(f"params: {moe.num_params() / 1e6:.1f}M total, {moe.num_params(active_only=True) / 1e6:.1f}M active per "
          f"token (dense: {dense.num_params() / 1e6:.1f}M)")
    if args.noise == 0 and args.drop_ratio == 0:
        T = min(64, dense.config.model.block_size)
        x = torch.randint(0, dense.config.model.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (moe(x).logits - dense(x).logits).abs().max().item()
        print(f"step-0 check: max |logits - dense logits| = {diff:.1e} on 2 x {T} random tokens")
        if not diff <= STEP0_TOL:
            print(f"{PROG}: error: the upcycled model does not compute the dense model's function (difference "
                  f"{diff:.1e} > {STEP0_TOL:.0e}; an override such as capacity_factor or routed_scaling_factor?); "
                  f"nothing saved", file=sys.stderr)
            return EXIT_FAILURE
    moe.save_pretrained(args.out, tokenizer=dense.tokenizer)
    print(f"saved {args.out}" + ("" if dense.tokenizer is not None else
                                 " (no tokenizer: a Hugging Face tokenizer.json is not read yet)"))
    return EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value may follow the options
    return run_cli(PROG, lambda: upcycle_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
