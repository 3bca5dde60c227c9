"""blues-submit: write a Slurm batch script for a Blues training run, check it, and submit it.

    blues-submit --config CFG --deepspeed_config ds_configs/zero2.json --nodes 2 --nproc_per_node 8 \\
        --time 12:00:00 --partition gpu [--account A] [--probe] [key=value ...] [--dry-run]

The script (filled from launch/blues.sbatch) runs one deepspeed launcher per node through srun,
asks for USR1 --signal_seconds before the time limit and --requeue: training checkpoints on USR1,
the job requeues itself and the next run resumes. On a CPU-only partition --nproc_per_node means
processes per node. --dry-run prints the script and checks it without submitting: expert-parallel
divisibility, the batch arithmetic, the world size against the partition (sinfo) and the whole
request (sbatch --test-only) when Slurm is reachable.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from typing import Optional

from blues.common import OneLineParser, add_alias, run_cli


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="blues-submit", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides passed to training")
    p.add_argument("--config", help="a YAML/JSON file of Blues config fields (as for blues-train)")
    p.add_argument("--preset", help="tiny (default) or blues01, instead of --config")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nproc_per_node", type=int, default=1,
                   help="training ranks per node: GPUs per node; on a CPU partition, processes per node")
    add_alias(p, "--gpus_per_node", "nproc_per_node", type=int)  # the old spelling, hidden from --help
    p.add_argument("--time", default="01:00:00", help="time limit (Slurm format)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job_name", default="blues")
    p.add_argument("--cpus_per_task", type=int, help="CPUs for each node's task (all its processes)")
    p.add_argument("--mem", help="memory per node, Slurm format (e.g. 64G)")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: gpu when the partition has gpu GRES (or sinfo is absent), else cpu")
    p.add_argument("--signal_seconds", type=int, default=120,
                   help="USR1 this long before the time limit: checkpoint, requeue, resume")
    p.add_argument("--probe", action="store_true", help="run blues-probe in the job before training")
    p.add_argument("--memory_budget", help="probe: bytes per process (CPU), e.g. 4GB")
    p.add_argument("--headroom", type=float, default=0.9, help="probe: fraction of device memory to use")
    p.add_argument("--target_tokens", type=int, help="probe: global batch in tokens (sets grad_accum)")
    p.add_argument("--max_micro_batch", type=int, help="probe: the largest micro-batch tried (default 1024)")
    p.add_argument("--out_dir", help="override the config's out_dir (checkpoints, logs, the script)")
    p.add_argument("--sbatch_arg", action="append", default=[], help="extra #SBATCH option, repeatable")
    p.add_argument("--train_arg", action="append", default=[],
                   help="extra blues-train flag, repeatable (e.g. --train_arg=--no_export)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print and check the script; do not submit")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_intermixed_args(argv)
    command = "blues-submit " + " ".join(shlex.quote(a) for a in argv)

    def body() -> int:
        from blues.common import atomic_write
        from blues.slurm import SubmitError, plan, sbatch_test_only, submit
        if not args.dry_run and shutil.which("sbatch") is None:
            raise SubmitError("sbatch is not on the PATH: run blues-submit on a Slurm login node, "
                              "or use --dry-run to write and check the script without submitting")
        job, notes = plan(args, command)
        script = job.render()
        os.makedirs(os.path.dirname(job.script_path), exist_ok=True)
        atomic_write(job.script_path, script)
        if shutil.which("sbatch") is not None:
            notes.append(sbatch_test_only(job.script_path))
        if args.dry_run:
            sys.stdout.write(script)
            for n in notes:
                print(f"blues-submit: ok: {n}", file=sys.stderr)
            print(f"blues-submit: dry run: wrote {job.script_path}; not submitted", file=sys.stderr)
            return 0
        job_id = submit(job.script_path)
        for n in notes:
            print(f"blues-submit: ok: {n}", file=sys.stderr)
        print(f"blues-submit: submitted job {job_id}: {job.script_path}; log "
              f"{job.out_dir}/slurm/{job.job_name}-{job_id}.log", file=sys.stderr)
        print(job_id)
        return 0

    return run_cli("blues-submit", body, user_errors=(ValueError, OSError, subprocess.TimeoutExpired))


if __name__ == "__main__":
    sys.exit(main())
