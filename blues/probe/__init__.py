"""The memory probe: the largest micro-batch per device that runs a whole training step in memory.

    estimate.py  estimate_memory: one rank's bytes for a step, by part (analytical, reported only)
    search.py    ProbeOptions, resolve_options, probe (this node's coordinators), Coordinator (the
                 ranks' lockstep search through a TCPStore), search/search_linear, probed_ds_config
    trial.py     run_trial: one rank of one trial in a fresh process; current_rss/peak_rss
    __main__.py  `python -m blues.probe coordinator|trial JSON`: the probe's own child processes

What a trial is: one micro-batch size b, run as a whole training step (forward, backward,
optimizer step; TRIAL_GRAD_ACCUM = 2 micro-steps, so gradients are held while the next forward
runs) with the real ZeRO stage, activation checkpointing and expert-parallel layout, on every rank
at once. The router is forced to its worst allowed imbalance while it runs
(blues.moe.forced_routing), so real routing cannot run out of memory later.

Each trial is a fresh process per rank, so a failed trial (an OOM, a killed rank) leaves nothing
behind for the next one. Ranks run the same trials in lockstep: growth b = 1, 2, 4, ... until a
trial does not fit, then binary search between the last fit and the first miss. A trial fits when
every rank's measured peak is within its limit (headroom x device memory, or x --memory_budget);
each rank's own answer is the largest b it fitted, and every rank takes the minimum of all ranks'.

Measured peak: on CUDA, torch's max_memory_reserved plus what the device already used before the
trial allocated anything (CUDA context, other processes); on CPU, the process's ru_maxrss (its
peak resident set, monotone per process, which is why each trial is its own process).

Result (in out_dir): ds_config.json, the DeepSpeed config with train_micro_batch_size_per_gpu,
gradient_accumulation_steps and train_batch_size filled consistently for target_tokens, and
report.json: every trial's peak per rank beside the analytical estimate and its error, the choice,
the headroom. Train with both the probed config and its batch fields:
    deepspeed ... --module blues.train --deepspeed_config OUT/probe/ds_config.json \\
        micro_batch_size=B grad_accum=A ...
(launch/train.sh does exactly this; blues-submit --probe does it inside a Slurm job.)
"""
from blues.probe.estimate import dispatch_rows, estimate_memory
from blues.probe.search import (
    DEFAULT_MAX_MICRO_BATCH,
    Coordinator,
    ProbeOptions,
    grad_accum_for,
    own_answer,
    parse_budget,
    parse_budgets,
    probe,
    probed_ds_config,
    resolve_options,
    search,
    search_linear,
)
from blues.probe.trial import (
    TRIAL_GRAD_ACCUM,
    TRIAL_STEPS,
    TrialSpec,
    current_rss,
    peak_rss,
    run_trial,
    trial_ds_config,
)

__all__ = ["dispatch_rows", "estimate_memory", "DEFAULT_MAX_MICRO_BATCH", "Coordinator", "ProbeOptions",
           "grad_accum_for", "own_answer", "parse_budget", "parse_budgets", "probe", "probed_ds_config",
           "resolve_options", "search", "search_linear", "TRIAL_GRAD_ACCUM", "TRIAL_STEPS", "TrialSpec",
           "current_rss", "peak_rss", "run_trial", "trial_ds_config"]
