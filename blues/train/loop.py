"""The training loop: steps, console lines, monitor events, evaluation, checkpoints, export, a sample.

train() runs train_step / evaluate / save_checkpoint until max_steps, a stop signal, or too many
non-finite losses in a row, then exports the weights with save_pretrained (out_dir/model).

Signals: SIGTERM and SIGUSR1 (Slurm's warning before the time limit) set a flag; the step in flight
finishes on every rank, a checkpoint is written and train() returns EXIT_OK. stop_signals() wraps a
whole command, so that a signal arriving while the engine is still being built (data preparation,
the JIT op build, deepspeed.initialize) is remembered, not lost.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from blues.common import EXIT_OK
from blues.train.checkpoint import export_weights, save_checkpoint
from blues.train.engine import Run
from blues.train.metrics import (
    ExpertWindow,
    eval_events,
    expert_events,
    format_eval,
    format_step,
    step_events,
    write_events,
)
from blues.train.modality import format_modality, modality_events, modality_load, record_eval_modality
from blues.train.revival import check_revival, format_revival, revival_events, revive_dead_experts
from blues.train.step import evaluate, train_step

EXIT_NONFINITE = 3  # max_bad_steps non-finite losses in a row; the last checkpoint is intact
DEFAULT_PROMPT = "The"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_EARLY_SIGNALS: list[str] = []


def _note_early_signal(signum, frame) -> None:
    _EARLY_SIGNALS.append(signal.Signals(signum).name)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Remember SIGTERM/SIGUSR1 for the whole command (train() acts on them once it runs)."""
    original = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            original[sig] = signal.signal(sig, _note_early_signal)
    try:
        yield
    finally:
        # CPython resets the handlers it installed to SIG_DFL while the interpreter shuts down, so a
        # duplicate USR1 arriving then would kill a rank that already saved (exit -10, seen under
        # Slurm). After a stop by signal, ignore further ones; otherwise restore what we inherited
        # (SIG_IGN under `trap '' USR1`).
        for sig, h in original.items():
            signal.signal(sig, signal.SIG_IGN if _EARLY_SIGNALS else (h if h is not None else signal.SIG_DFL))


class _Signals:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves and exits 0."""

    def __init__(self, run: Run):
        self.run, self.old = run, {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self.old[sig] = signal.signal(sig, self._handle)
        if _EARLY_SIGNALS:
            self.run.stop_signal = _EARLY_SIGNALS[-1]
        return self

    def _handle(self, signum, frame):
        self.run.stop_signal = signal.Signals(signum).name
        _EARLY_SIGNALS.append(self.run.stop_signal)

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def train(run: Run, *, progress: Optional[bool] = None, prompt: Optional[str] = DEFAULT_PROMPT,
          export: bool = True) -> int:
    """The training loop: steps, console lines, monitor events, evaluation, checkpoints, export.
    Returns the exit code: EXIT_OK, or EXIT_NONFINITE after max_bad_steps non-finite losses in a row."""
    t, rank0 = run.cfg.train, run.dist.rank == 0
    say = print if rank0 else (lambda *a, **k: None)
    bar = None
    if rank0 and (progress if progress is not None else sys.stderr.isatty()):
        from tqdm import tqdm
        bar = tqdm(total=t.max_steps, initial=run.step, desc="train", dynamic_ncols=True, leave=False)
        say = bar.write
    window_tokens, window_seconds = 0, 0.0
    experts, t_start = ExpertWindow(run), time.perf_counter()
    last_saved = run.step if run.step else None
    check_revival(run)
    with _Signals(run):
        while run.step < t.max_steps:
            r = train_step(run)
            if run.debug.step_sleep:
                time.sleep(run.debug.step_sleep)  # test-only: widen the window for signals
            window_tokens += run.tokens_per_step
            window_seconds += r.seconds
            if bar is not None:
                bar.update(1)
            write_events(run, step_events(r, run.tokens_per_step / r.seconds, time.perf_counter() - t_start))
            experts.add(r)
            revived = revive_dead_experts(run, r)  # collective; [] unless revive_dead_experts_after > 0
            if revived:
                for x in revived:
                    say(format_revival(x, run.cfg.moe.revive_dead_experts_after))
                write_events(run, revival_events(revived, run.cfg.moe_layer_ids(), r.step))
            if r.skipped:
                say(format_step(r, run, 0.0))
                if run.bad_in_a_row >= t.max_bad_steps:
                    say(f"stopping: {run.bad_in_a_row} non-finite losses in a row (max_bad_steps={t.max_bad_steps}); "
                        f"the last checkpoint ({'step ' + str(last_saved) if last_saved else 'none'}) is intact")
                    return EXIT_NONFINITE
            elif r.step % t.log_interval == 0 or r.step == t.max_steps:
                window_experts = experts.take()
                write_events(run, expert_events(window_experts, r.step))
                say(format_step(r, run, window_tokens / max(window_seconds, 1e-9), window_experts))
                window_tokens, window_seconds = 0, 0.0
            if r.step % t.eval_interval == 0 or r.step == t.max_steps:
                with record_eval_modality(run) as by_modality:  # a vision run: which experts image/text tokens use
                    ev = evaluate(run)
                mod = modality_load(run, by_modality)  # collective (one all-reduce); None for a text-only run
                write_events(run, eval_events(ev, r.step) + modality_events(mod, r.step))
                say(format_eval(ev, r.step))
                if mod:
                    say(format_modality(mod, r.step))
            if r.stop_signal:
                path = save_checkpoint(run)
                say(f"stopped by a signal after step {r.step}: checkpoint {path} written; the run can resume "
                    f"(blues-train ... --resume auto)")
                return EXIT_OK
            if r.step % t.save_interval == 0 and r.step != t.max_steps:
                path = save_checkpoint(run)
                last_saved = r.step
                say(f"step {r.step}: checkpoint {path}")
    if bar is not None:
        bar.close()
    if last_saved != run.step:
        path = save_checkpoint(run)
        say(f"step {run.step}: checkpoint {path}")
    if export:
        model_dir = os.path.join(t.out_dir, "model")
        export_weights(run, model_dir)
        say(f"exported weights to {model_dir} (blues-generate --model {model_dir} --prompt ...)")
        if rank0 and prompt:
            from blues.model import Blues
            m = Blues.from_pretrained(model_dir).eval()
            text = m.generate(prompt, max_new_tokens=48, temperature=0.8, top_k=50, seed=t.seed)
            say(f"sample: {prompt}{text}")
    return EXIT_OK
