"""Training on DeepSpeed: build an engine for a Blues config, take steps, checkpoint, export.

    engine.py       Run, validate, and build_engine's ordered steps:
                    init_distributed -> validate (once per start) -> prepare_data -> build_model
                    -> apply_ac -> apply_zero3_leaf -> build_optimizer -> deepspeed.initialize
                    -> seed_ranks -> build_loaders
    step.py         lr_at (warmup + cosine), train_step, train_steps, evaluate
    loop.py         train(): log, evaluate, save, stop on a signal or non-finite losses, export, sample
    checkpoint.py   crash-safe checkpoints, where a run resumes, save_checkpoint / resume / export_weights
    resume_check.py what a resume must agree on (check_resume, check_resume_config, LAYOUT_FIELDS)
    modality.py     which experts image and text tokens use: the routing recorder, per-modality counts, events
    balance.py      balancing without an auxiliary loss: the selection bias rule (DeepSeek-V3), its state
    reshard.py      resume at another ep_size or world size: ZeRO 1/2 files -> DeepSpeed's universal layout
    ds_config.py    DeepSpeed JSON: load, fill its "auto" fields from the Blues config, refuse contradictions
    distributed.py  DistInfo, init_distributed, all_reduce / barrier, DeepSpeed's /dev/shm buffer removed,
                    exit_process (a rank's end, without the interpreter's teardown)
    metrics.py      FLOPs per token, peak FLOP/s, MFU, the console line, monitor events
    debug.py        DebugConfig: test-only fault injection, read once from the environment

`python -m blues.train` (what `deepspeed --module blues.train` runs) is blues-train (blues.cli.train).
deepspeed itself is imported only inside the functions that need it.
"""
from blues.train.checkpoint import export_weights, resume, save_checkpoint
from blues.train.debug import DebugConfig
from blues.train.distributed import DistInfo, exit_process, init_distributed
from blues.train.engine import Run, build_engine, validate
from blues.train.loop import train
from blues.train.step import StepResult, evaluate, lr_at, train_step, train_steps

__all__ = ["build_engine", "train_step", "train_steps", "evaluate", "init_distributed", "exit_process", "Run",
           "DistInfo", "validate", "lr_at", "export_weights", "save_checkpoint", "resume", "train", "StepResult",
           "DebugConfig"]
