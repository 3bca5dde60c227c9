"""blues-probe: the largest micro-batch per device that runs a whole training step in memory.

    blues-probe --config CFG --deepspeed_config ds_configs/zero2.json --nproc_per_node 8 \\
        [--headroom 0.9] [--target_tokens 524288] [--out_dir OUT/probe] [key=value ...]
    blues-probe ... --device cpu --memory_budget 3GB        # CPU: a budget in bytes per process

Each trial runs a whole training step (ZeRO, activation checkpointing, expert parallelism) at one
micro-batch size, in a fresh process per rank, with the router forced to its worst allowed
imbalance; growth 1, 2, 4, ... then binary search. Writes <out_dir>/ds_config.json (the batch
fields filled for --target_tokens) and <out_dir>/report.json (every trial, the estimate beside the
measurement). Train with both: deepspeed ... --module blues.train --deepspeed_config
OUT/probe/ds_config.json micro_batch_size=B grad_accum=A (launch/train.sh does exactly this).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from blues.common import EXIT_FAILURE, OneLineParser, add_alias, run_cli


def build_parser() -> OneLineParser:
    from blues.probe.search import DEFAULT_MAX_MICRO_BATCH, DEVICES, SEARCHES
    p = OneLineParser(prog="blues-probe", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Blues config overrides (as for training)")
    p.add_argument("--config", help="a YAML/JSON file of Blues config fields (as for blues-train)")
    p.add_argument("--preset", help="tiny (default) or blues01, instead of --config")
    p.add_argument("--deepspeed_config", required=True, help="the DeepSpeed JSON training will use")
    p.add_argument("--nproc_per_node", type=int, default=None,
                   help="ranks on this node (default: the visible GPUs, or 1 on CPU)")
    add_alias(p, "--num_gpus", "nproc_per_node", type=int)  # the old spelling, hidden from --help
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node_rank", type=int, default=0)
    p.add_argument("--master_addr", default="127.0.0.1")
    p.add_argument("--master_port", type=int, default=None, help="the probe's store; trials use the ports above it")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--memory_budget", help="bytes per rank instead of the device's memory (required meaning on "
                                           "CPU): 3GB, 2.5GiB, ...; or one per rank, comma-separated")
    p.add_argument("--headroom", type=float, default=0.9, help="fraction of the budget a trial may use")
    p.add_argument("--target_tokens", type=int, help="global batch in tokens (default: the config's)")
    p.add_argument("--router_skew", type=float, default=1.0,
                   help="fraction of tokens forced onto the fewest experts the capacity allows (1 = all, "
                        "0 = real routing)")
    p.add_argument("--search", choices=SEARCHES, default="bisect",
                   help="bisect: growth 1, 2, 4, ... then binary search; linear: every size from 1 (the true "
                        "maximum, slow; for benchmarks)")
    p.add_argument("--max_micro_batch", type=int, default=DEFAULT_MAX_MICRO_BATCH)
    p.add_argument("--trial_timeout", type=int, default=900, help="seconds before a trial counts as failed")
    p.add_argument("--out_dir", help="where report.json and ds_config.json go (default: <out_dir>/probe)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from blues.probe import ProbeOptions, probe, resolve_options
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        opts = resolve_options(ProbeOptions(**vars(args)))
        rc = probe(opts)
        if rc != 0:
            print(f"blues-probe: error: the probe failed (exit {rc}); trials' logs are in {opts.out_dir}/trials",
                  file=sys.stderr)
            return EXIT_FAILURE
        return 0

    return run_cli("blues-probe", body)


if __name__ == "__main__":
    sys.exit(main())
