"""Slurm for Blues: the batch script of a training run, the checks before submitting it, sbatch.

    job, notes = plan(args, command)   # checks (layout, batch arithmetic, partition) -> Job
    job.render()                       # launch/blues.sbatch filled for this job
    sbatch_test_only(path); submit(path)

The script (filled from launch/blues.sbatch) writes a hostfile from the allocation, takes the first
host as master and a port derived from the job id, and runs one deepspeed launcher per node through
srun (--hostfile, --no_ssh, --node_rank $SLURM_NODEID). It asks for USR1 signal_seconds before the
time limit and --requeue: on USR1 training checkpoints and exits 0, the script requeues the job,
and the next run resumes from the latest checkpoint. nproc_per_node is GPUs per node, or on a
CPU-only partition processes per node (deepspeed's CPU accelerator, gloo). With probe=True the job
runs blues-probe first (once per job) and trains with its config and batch fields.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# In a checkout (or an editable install) the template sits in launch/; a regular install ships
# launch/ as data files under <prefix>/share/blues/launch (setup.py's data_files).
TEMPLATE = next((p for p in (Path(__file__).resolve().parent.parent / "launch" / "blues.sbatch",
                             Path(sys.prefix) / "share" / "blues" / "launch" / "blues.sbatch") if p.is_file()),
                Path(__file__).resolve().parent.parent / "launch" / "blues.sbatch")


class SubmitError(ValueError):
    """A mistake in the request; the CLI prints it as one line."""


# ----------------------------------------------------------------------------- inputs

def parse_time_limit(value: str) -> int:
    """Slurm time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise SubmitError(f"--time {value!r} is not a Slurm time limit: expected e.g. 90, 01:30:00 or 2-00:00:00")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if c is not None:  # H:M:S
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


# ----------------------------------------------------------------------------- checks

def check_layout(cfg, ds: dict, nodes: int, nproc_per_node: int) -> list[str]:
    """Expert-parallel divisibility and batch arithmetic for `nodes` x `nproc_per_node` ranks.

    Returns notes for the user; raises SubmitError naming the flag or field to change."""
    world = nodes * nproc_per_node
    t = cfg.train
    notes = [f"world size {world} = {nodes} node(s) x {nproc_per_node} process(es) per node"]
    if world % t.ep_size:
        fix = f"a world size that is a multiple of {t.ep_size}"
        if nproc_per_node % t.ep_size == 0 or t.ep_size % nproc_per_node == 0:
            need_nodes = max(1, math.ceil(t.ep_size / nproc_per_node))
            fix += f" (e.g. --nodes {need_nodes * math.ceil(nodes / need_nodes)})"
        raise SubmitError(f"ep_size={t.ep_size} does not divide the world size {world} "
                          f"(--nodes {nodes} x --nproc_per_node {nproc_per_node}): use {fix}, or a smaller ep_size")
    if t.ep_size > 1:
        notes.append(f"expert parallel: {world // t.ep_size} group(s) of {t.ep_size} ranks, "
                     f"{cfg.moe.num_experts // t.ep_size} expert(s) per rank")
    from blues.train.ds_config import resolve_ds_config, zero_stage
    try:
        # The same filling and contradiction checks training applies (batch fields, dtype, ZeRO 3 + MoE).
        resolve_ds_config(ds, cfg, world)
        stage = zero_stage(ds)
    except ValueError as e:
        raise SubmitError(str(e)) from None
    expect = t.micro_batch_size * t.grad_accum * world
    notes.append(f"global batch {expect} sequences = micro_batch_size {t.micro_batch_size} x grad_accum "
                 f"{t.grad_accum} x {world} ranks = {expect * cfg.model.block_size} tokens; ZeRO stage {stage}")
    return notes


@dataclass
class PartitionInfo:
    name: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int


def partition_info(partition: Optional[str]) -> Optional[PartitionInfo]:
    """What sinfo says about `partition` (the default one when None); None when sinfo is absent."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-o", "%P|%D|%c|%G"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 3]
    if partition is None:
        rows = [r for r in rows if r[0].endswith("*")]
    if not rows:
        if partition is not None:  # unknown: say so in Slurm's own words
            msg = subprocess.run(["scontrol", "show", "partition", partition], capture_output=True, text=True,
                                 timeout=30)
            why = " ".join((msg.stdout + msg.stderr).split()) or "sinfo lists no such partition"
            raise SubmitError(f"--partition {partition!r}: Slurm says: {why}")
        return None
    name = rows[0][0].rstrip("*")
    nodes = sum(int(r[1]) for r in rows if r[1].isdigit())
    cpus = max(int(re.sub(r"\D.*", "", r[2]) or 0) for r in rows)
    gpus = 0
    for r in rows:
        for g in r[3].split(","):
            m = re.match(r"gpu(?::[^:(]+)?:(\d+)", g)
            if m:
                gpus = max(gpus, int(m.group(1)))
    return PartitionInfo(name, nodes, cpus, gpus)


def check_allocation(part: Optional[PartitionInfo], nodes: int, nproc_per_node: int, device: str,
                     cpus_per_task: Optional[int]) -> list[str]:
    if part is None:
        return ["partition not checked: sinfo is not available here"]
    if nodes > part.nodes:
        raise SubmitError(f"--nodes {nodes} exceeds the {part.nodes} node(s) of partition {part.name!r}")
    if device == "gpu":
        if part.gpus_per_node == 0:
            raise SubmitError(f"partition {part.name!r} has no GPUs (no gpu GRES): use --device cpu to run "
                              f"{nproc_per_node} CPU process(es) per node, or a GPU partition")
        if nproc_per_node > part.gpus_per_node:
            raise SubmitError(f"--nproc_per_node {nproc_per_node} exceeds the {part.gpus_per_node} GPU(s) per node "
                              f"of partition {part.name!r}")
    else:
        need = cpus_per_task or nproc_per_node
        if need > part.cpus_per_node:
            raise SubmitError(f"{nproc_per_node} process(es) per node need {need} CPU(s), but nodes of partition "
                              f"{part.name!r} have {part.cpus_per_node}: lower --nproc_per_node or --cpus_per_task")
    return [f"partition {part.name!r}: {part.nodes} node(s), {part.cpus_per_node} CPUs"
            + (f", {part.gpus_per_node} GPUs" if part.gpus_per_node else ", no GPUs") + " per node"]


# ----------------------------------------------------------------------------- the script

@dataclass
class Job:
    config: Optional[str]
    preset: Optional[str]
    deepspeed_config: str
    overrides: list[str]
    nodes: int
    nproc_per_node: int
    time: str
    device: str  # gpu | cpu
    out_dir: str  # absolute
    workdir: str  # absolute
    job_name: str = "blues"
    partition: Optional[str] = None
    account: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    signal_seconds: int = 120
    probe: bool = False
    memory_budget: Optional[str] = None
    headroom: float = 0.9
    target_tokens: Optional[int] = None
    max_micro_batch: Optional[int] = None
    sbatch_args: list[str] = field(default_factory=list)
    train_args_extra: list[str] = field(default_factory=list)
    command: str = ""

    @property
    def script_path(self) -> str:
        return os.path.join(self.out_dir, "slurm", f"{self.job_name}.sbatch")

    def directives(self) -> list[str]:
        d = [f"--job-name={self.job_name}", f"--nodes={self.nodes}", "--ntasks-per-node=1", f"--time={self.time}"]
        if self.device == "gpu":
            d.append(f"--gpus-per-node={self.nproc_per_node}")
            if self.cpus_per_task:
                d.append(f"--cpus-per-task={self.cpus_per_task}")
        else:
            # NOTE: on a CPU node each deepspeed rank is a process; one core each unless told otherwise.
            d.append(f"--cpus-per-task={self.cpus_per_task or self.nproc_per_node}")
        if self.mem:
            d.append(f"--mem={self.mem}")
        if self.partition:
            d.append(f"--partition={self.partition}")
        if self.account:
            d.append(f"--account={self.account}")
        d += [f"--output={self.out_dir}/slurm/%x-%j.log", "--open-mode=append",
              f"--signal=B:USR1@{self.signal_seconds}", "--requeue"]
        return d + list(self.sbatch_args)

    def _config_args(self) -> list[str]:
        if self.config is not None:
            return ["--config", shlex.quote(self.config)]
        return ["--preset", shlex.quote(self.preset)] if self.preset else []

    def train_args(self) -> str:
        """blues.train's arguments, shell-quoted (the template adds the probe's overrides and --resume auto);
        with --probe the DeepSpeed config is the probed one."""
        ds = '"$PROBE_DIR/ds_config.json"' if self.probe else shlex.quote(self.deepspeed_config)
        args = self._config_args()
        # blues.train parses key=value as one run of positionals: flags first, then every override
        # (the template appends the probe's overrides right after these).
        args += ["--deepspeed_config", ds] + [shlex.quote(a) for a in self.train_args_extra]
        args += [shlex.quote(o) for o in self.overrides]
        return " ".join(args)

    def probe_block(self) -> str:
        if not self.probe:
            return ":  # no memory probe (blues-submit --probe runs one before training)"
        probe_args = ["--deepspeed_config", self.deepspeed_config, "--out_dir", "$PROBE_DIR",
                      "--headroom", str(self.headroom)]
        if self.config is not None:
            probe_args = ["--config", self.config] + probe_args
        elif self.preset:
            probe_args = ["--preset", self.preset] + probe_args
        if self.memory_budget:
            probe_args += ["--memory_budget", self.memory_budget]
        if self.target_tokens:
            probe_args += ["--target_tokens", str(self.target_tokens)]
        if self.max_micro_batch:
            probe_args += ["--max_micro_batch", str(self.max_micro_batch)]
        if self.device == "cpu":
            probe_args += ["--device", "cpu"]
        quoted = " ".join('"$PROBE_DIR"' if a == "$PROBE_DIR" else shlex.quote(a) for a in probe_args)
        over = " ".join(shlex.quote(o) for o in self.overrides)
        # A requeued run reuses its job's probe; a new job probes again.
        return f"""PROBE_DIR="$OUT_DIR/probe-$SLURM_JOB_ID"
if [ ! -f "$PROBE_DIR/ds_config.json" ]; then
    log "memory probe: largest micro-batch per device on $SLURM_JOB_NUM_NODES node(s)"
    run_step srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\
        bash -c 'trap "" USR1; exec blues-probe --nnodes "$SLURM_JOB_NUM_NODES" --node_rank "$SLURM_NODEID" \\
            --master_addr "$1" --master_port "$(($2 + 1))" "${{@:3}}"' \\
        blues-probe "$MASTER_ADDR" "$MASTER_PORT" --nproc_per_node "$NPROC_PER_NODE" {quoted} {over}
else
    log "memory probe: reusing $PROBE_DIR/ds_config.json"
fi
read -r PROBE_MICRO PROBE_GRAD_ACCUM < <(python -c 'import json, sys
r = json.load(open(sys.argv[1])); print(r["micro_batch_size"], r["grad_accum"])' "$PROBE_DIR/report.json")
PROBE_OVERRIDES=("micro_batch_size=$PROBE_MICRO" "grad_accum=$PROBE_GRAD_ACCUM")
log "memory probe: micro_batch_size=$PROBE_MICRO grad_accum=$PROBE_GRAD_ACCUM"
"""

    def render(self) -> str:
        if not TEMPLATE.is_file():
            raise SubmitError(f"the sbatch template {str(TEMPLATE)!r} is missing: blues-submit runs from a Blues "
                              "checkout (pip install -e .)")
        body = TEMPLATE.read_text(encoding="utf-8")
        body = body[body.index("{{HEADER}}"):]
        header = ["#!/bin/bash",
                  f"# Written by: {self.command}",
                  f"# Run with:   sbatch {self.script_path}"]
        header += [f"#SBATCH {d}" for d in self.directives()]
        values = {
            "HEADER": "\n".join(header),
            "WORKDIR": shlex.quote(self.workdir),
            "BIN_DIR": shlex.quote(os.path.dirname(sys.executable)),
            "OUT_DIR": shlex.quote(self.out_dir),
            "NPROC_PER_NODE": str(self.nproc_per_node),
            "SIGNAL_SECONDS": str(self.signal_seconds),
            "PROBE_BLOCK": self.probe_block(),
            "TRAIN_ARGS": self.train_args(),
        }
        for key, value in values.items():
            body = body.replace("{{" + key + "}}", value)
        left = re.findall(r"\{\{[A-Z_]+\}\}", body)
        assert not left, f"unfilled template fields {left}"
        return body


# ----------------------------------------------------------------------------- submission

def sbatch_error_line(stderr: str) -> str:
    """Slurm's own reason, one line: the most specific 'error:' message sbatch printed."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [re.sub(r"^(sbatch: )?error: ", "", ln) for ln in lines if "error" in ln.lower()]
    picked = errors or lines or ["sbatch gave no message"]
    # e.g. "invalid partition specified: nope" + "Batch job submission failed: Invalid partition name
    # specified": both are short, and together name the value and the verdict.
    return "; ".join(dict.fromkeys(picked[-2:]))


def sbatch_test_only(script_path: str) -> str:
    """`sbatch --test-only`: Slurm checks the whole request without queueing it; SubmitError with its reason."""
    out = subprocess.run(["sbatch", "--test-only", script_path], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SubmitError(f"Slurm refuses the job: {sbatch_error_line(out.stderr + out.stdout)}")
    msg = (out.stderr + out.stdout).strip().splitlines()
    return "sbatch --test-only: " + (msg[-1].replace("sbatch: ", "") if msg else "accepted")


def submit(script_path: str) -> str:
    """`sbatch --parsable`: the job id; SubmitError with Slurm's reason when it refuses."""
    out = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SubmitError(f"sbatch refused the job: {sbatch_error_line(out.stderr + out.stdout)}")
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed no job id: {out.stdout.strip()!r}")
    return job_id


# ----------------------------------------------------------------------------- the plan

def plan(args: Any, command: str) -> tuple[Job, list[str]]:
    """The Job for blues-submit's parsed arguments (`args`: its argparse namespace) and the notes of
    every check passed; SubmitError (a ValueError) naming the flag or field to change."""
    from blues.presets import load_config
    from blues.probe import parse_budget
    from blues.train.ds_config import load_ds_config
    for name in ("nodes", "nproc_per_node", "signal_seconds"):
        if getattr(args, name) < 1:
            raise SubmitError(f"--{name} {getattr(args, name)} is invalid: expected a positive integer")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise SubmitError(f"--cpus_per_task {args.cpus_per_task} is invalid: expected a positive integer")
    if not 0 < args.headroom <= 1:
        raise SubmitError(f"--headroom {args.headroom} is invalid: expected a fraction in (0, 1]")
    if args.memory_budget:
        parse_budget(args.memory_budget)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.job_name):
        raise SubmitError(f"--job_name {args.job_name!r} is invalid: letters, digits, '_', '.', '-' only")
    seconds = parse_time_limit(args.time)
    if seconds <= args.signal_seconds:
        raise SubmitError(f"--time {args.time} ({seconds} s) is not longer than --signal_seconds "
                          f"{args.signal_seconds}: the job would be told to stop as it starts")
    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    cfg = load_config(args.config, args.preset, overrides)
    ds = load_ds_config(args.deepspeed_config)
    notes = check_layout(cfg, ds, args.nodes, args.nproc_per_node)

    part = partition_info(args.partition)
    device = args.device
    if device == "auto":
        device = "gpu" if part is None or part.gpus_per_node > 0 else "cpu"
        notes.append(f"device {device} (" + ("no sinfo here" if part is None else
                                             f"partition {part.name!r} has {part.gpus_per_node} GPUs per node") + ")")
    notes += check_allocation(part, args.nodes, args.nproc_per_node, device, args.cpus_per_task)

    workdir = os.getcwd()

    def absolute(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(workdir, p)

    job = Job(config=absolute(args.config) if args.config else None, preset=args.preset,
              deepspeed_config=absolute(args.deepspeed_config), overrides=list(args.overrides),
              nodes=args.nodes, nproc_per_node=args.nproc_per_node, time=args.time, device=device,
              out_dir=absolute(cfg.train.out_dir), workdir=workdir, job_name=args.job_name,
              partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task, mem=args.mem,
              signal_seconds=args.signal_seconds, probe=args.probe, memory_budget=args.memory_budget,
              headroom=args.headroom, target_tokens=args.target_tokens, sbatch_args=args.sbatch_arg,
              train_args_extra=args.train_arg, max_micro_batch=args.max_micro_batch, command=command)
    if args.out_dir:
        job.overrides.append(f"out_dir={job.out_dir}")
    return job, notes
