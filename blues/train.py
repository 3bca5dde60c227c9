"""blues-train: train a Blues MoE language model with DeepSpeed.

    blues-train                                   # tiny preset, built-in corpus, one CPU process, minutes
    blues-train --preset blues01 max_steps=2000 lr=6e-4
    deepspeed --num_gpus 2 --module blues.train --deepspeed_config ds_configs/zero2.json \
        moe_backend=deepspeed ep_size=2           # expert-parallel DeepSpeed MoE under ZeRO 2
    deepspeed --num_gpus 8 launch/train.py --config run.yaml --deepspeed_config ds_configs/zero3.json
    blues-train --resume auto                     # continue from out_dir/checkpoints/latest

On a machine without GPUs `deepspeed --num_gpus N` starts N CPU ranks (gloo backend).

The pieces, in the order build_engine applies them (torchtitan style, one place, one order):
    init_distributed -> ensure_data -> resolve_ds_config -> build_model -> apply_ac
    -> apply_zero3_leaf -> build_optimizer -> deepspeed.initialize -> build_loaders
then train() runs train_step / evaluate / checkpoint.save until max_steps, a signal, or too many
non-finite losses in a row, and exports the weights with save_pretrained.

Learning rate (alpha_max = lr, alpha_min = min_lr, T_w = warmup_steps, T_c = lr_decay_steps or
max_steps), for the optimizer step t = 0, 1, ...:
    t <  T_w:          alpha_max * (t + 1) / T_w
    T_w <= t <= T_c:   alpha_min + (alpha_max - alpha_min) * (1 + cos(pi * (t - T_w) / (T_c - T_w))) / 2
    t >  T_c:          alpha_min
A step whose loss is not finite is skipped (no update) but still consumes its data and its t.

MFU = flops_per_token * tokens/s / (peak FLOP/s per rank * ranks), flops_per_token from
Blues.flops_per_token(): 6 * active parameters + 12 * n_layer * n_embd * block_size (forward and
backward). Peak per rank: H100/H200 989 TFLOP/s (bf16/fp16 dense), 495 (tf32); A100 312 / 156;
CPU 150 GFLOP/s for the whole machine (fp32 matmul measured on the 2-core build machines) shared
by the local ranks; override with BLUES_PEAK_FLOPS (per rank).

Test-only fault injection (environment): BLUES_FAULT_NAN_STEPS="3,4,7.1" makes rank 0's loss NaN at
those steps (1-based; "7.1": only micro-batch 1 of step 7); BLUES_FAULT_KILL_IN_SAVE=N makes rank 1 SIGKILL itself in the middle of
writing the step-N checkpoint (after the files, before the commit); BLUES_TEST_STEP_SLEEP=S
sleeps S seconds after every step (to aim signals).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import threading
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from blues import checkpoint as ckpt
from blues.config import BluesConfig, TrainConfig, get_preset
from blues.ds_config import (BUILTIN_DS_CONFIG, check_parallelism, load_ds_config, offloads_optimizer,
                             resolve_ds_config, zero_stage)

log = logging.getLogger("blues.train")

EXIT_OK, EXIT_ERROR, EXIT_NONFINITE = 0, 1, 3
DEFAULT_PROMPT = "The"


# ============================================================================ learning rate

def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, cosine decay, floor."""
    T_w, T_c = t.warmup_steps, (t.lr_decay_steps if t.lr_decay_steps is not None else t.max_steps)
    if step < T_w:
        return t.lr * (step + 1) / T_w
    if step > T_c or T_c <= T_w:
        return t.min_lr
    progress = (step - T_w) / (T_c - T_w)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ============================================================================ distributed

@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the launcher's process group (or make a one-process one). nccl on CUDA, else gloo."""
    import deepspeed

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # plain `blues-train`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        # NOTE: every rank would otherwise start one thread per core: 2 ranks on 2 cores ran 2x slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_size)))
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return DistInfo(rank, world, local_rank, local_size, device)


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return t


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ============================================================================ building

def ensure_data(cfg: BluesConfig, rank: int):
    """(data meta, tokenizer) of cfg.train.data_dir; an empty/absent data_dir gets the built-in corpus."""
    from blues.data import META_FILE, load_meta, prepare
    from blues.tokenizer import Tokenizer, check_vocab

    d = cfg.train.data_dir
    if rank == 0 and not os.path.isfile(os.path.join(d, META_FILE)):
        if os.path.isdir(d) and any(not n.startswith(".") for n in os.listdir(d)):
            load_meta(d)  # a folder with other content: let data.py say what is wrong
        log.info("data_dir %s holds no prepared data: preparing the built-in corpus", d)
        prepare(cache_dir=d, progress=False)
    _barrier()
    meta = load_meta(d)
    tok = Tokenizer.load(d)
    check_vocab(tok, cfg.model.vocab_size, what="model")
    return meta, tok


def build_model(cfg: BluesConfig):
    """The Blues model on CPU, seeded by cfg.train.seed (the same on every rank)."""
    from blues.model import Blues

    torch.manual_seed(cfg.train.seed)
    return Blues(cfg)


def apply_ac(model, cfg: BluesConfig) -> None:
    """Activation checkpointing: recompute each block in backward."""
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()


def apply_zero3_leaf(model, stage: int) -> None:
    """Under ZeRO 3, fetch each stacked-experts MoE layer as one unit.

    blues.moe.MoE reads its router's and experts' weights as attributes (no submodule call), so ZeRO 3's
    per-module hooks do not fetch them; DeepSpeed then gathers each one on first access (ZeROOrderedDict)
    in code order. Marking MoE a leaf module gathers all of its parameters, every expert whatever the
    routing, on every rank before the layer runs (and again for its backward): the same collectives in
    the same order on all ranks, whatever each rank's tokens chose, so no rank waits on another."""
    if stage != 3:
        return
    from deepspeed.utils import set_z3_leaf_modules

    from blues.moe import MoE
    if any(isinstance(m, MoE) for m in model.modules()):
        set_z3_leaf_modules(model, [MoE])


def build_optimizer(model, cfg: BluesConfig, ds: dict):
    """AdamW; weight decay on matrices only; DeepSpeed MoE expert parameters in their own groups.

    With ZeRO-Offload: DeepSpeedCPUAdam on CUDA machines (its C++ op JIT-builds once, ~3 min
    measured on the 2-core CPU machines, which is why CPU runs use torch's AdamW there)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    t = cfg.train
    groups = [{"name": "decay", "params": decay, "weight_decay": t.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.moe.moe_backend == "deepspeed":
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    if offloads_optimizer(ds) and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if offloads_optimizer(ds):
        ds["zero_force_ds_cpu_optimizer"] = False
    return torch.optim.AdamW(groups, **kw)


@dataclass
class Run:
    """Everything a training loop needs; build_engine makes it."""
    cfg: BluesConfig
    ds_config: dict
    engine: Any
    model: Any
    dist: DistInfo
    stage: int
    tokenizer: Any = None
    data_meta: Optional[dict] = None
    loader: Any = None
    val_loader: Any = None
    step: int = 0
    tokens_seen: int = 0
    bad_in_a_row: int = 0
    skipped_steps: int = 0
    num_moe_layers: int = 0
    flops_per_token: int = 0
    peak_flops: float = 0.0
    stop_signal: Optional[str] = None

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * self.dist.world_size * self.cfg.model.block_size


def validate(cfg: BluesConfig, ds_config: dict, world_size: int) -> dict:
    """Every check that needs no process group: ValueError naming the field. Returns the resolved DS config."""
    stage = zero_stage(ds_config)
    check_parallelism(cfg, world_size, stage)
    if cfg.train.dtype == "fp16" and not torch.cuda.is_available():
        raise ValueError("dtype=fp16 needs a GPU (DeepSpeed's CPU accelerator refuses fp16): use dtype=bf16 or fp32 "
                         "on CPU")
    if cfg.moe.moe_backend == "deepspeed":
        from blues.moe_deepspeed import check_deepspeed_moe_config
        check_deepspeed_moe_config(cfg)
    return resolve_ds_config(ds_config, cfg, world_size, monitor_dir=os.path.join(cfg.train.out_dir, "monitor"))


def build_engine(cfg: BluesConfig, ds_config: Optional[dict] = None, *, with_data: bool = True,
                 dist: Optional[DistInfo] = None) -> Run:
    """Build the DeepSpeed engine for `cfg` from a DeepSpeed config dict (its "auto" fields are filled
    here). with_data=False skips the corpus and loaders (train_steps then feeds random tokens)."""
    import deepspeed

    dist = dist or init_distributed()
    ds = validate(cfg, ds_config if ds_config is not None else BUILTIN_DS_CONFIG, dist.world_size)
    stage = zero_stage(ds)
    meta = tok = None
    if with_data:
        meta, tok = ensure_data(cfg, dist.rank)
    model = build_model(cfg)
    apply_ac(model, cfg)
    apply_zero3_leaf(model, stage)
    optimizer = build_optimizer(model, cfg, ds)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    # Routing noise and dropout differ per rank from here on; the weights were seeded alike.
    torch.manual_seed(cfg.train.seed + 1000 * dist.rank)
    import random

    import numpy as np
    random.seed(cfg.train.seed + 1000 * dist.rank)
    np.random.seed(cfg.train.seed + 1000 * dist.rank)
    run = Run(cfg=cfg, ds_config=ds, engine=engine, model=engine.module, dist=dist, stage=stage, tokenizer=tok,
              data_meta=meta)
    run.num_moe_layers = sum(cfg.moe.is_moe_layer(i) for i in range(cfg.model.n_layer))
    run.flops_per_token = _flops_per_token(run)
    run.peak_flops = peak_flops_per_rank(dist, cfg.train.dtype)
    if with_data:
        build_loaders(run)
    return run


def _flops_per_token(run: Run) -> int:
    """Blues.flops_per_token's formula, counted so that ZeRO 3 partitions (ds_numel) and expert-parallel
    DeepSpeed experts (E_loc per rank, top_k of E active) give the same figure as the stacked model."""
    from blues.moe_deepspeed import DS_EXPERT_RE
    c = run.cfg
    K, E = c.moe.top_k, c.moe.num_experts
    E_loc = E // c.train.ep_size
    n = 0.0
    for name, p in run.model.named_parameters():
        numel = getattr(p, "ds_numel", p.numel())
        if "norm" in name or (name == "tok_emb.weight" and not c.model.tie_embeddings):
            continue
        if DS_EXPERT_RE.match(name):
            n += numel * K / E_loc
        elif ".experts." in name:
            n += numel * K // E
        else:
            n += numel
    return int(6 * n + 12 * c.model.n_layer * c.model.n_embd * c.model.block_size)


def build_loaders(run: Run) -> None:
    from blues.data import TokenLoader
    c, d = run.cfg, run.dist
    kw = dict(block_size=c.model.block_size, batch_size=c.train.micro_batch_size, seed=c.train.seed,
              rank=d.rank, world_size=d.world_size)
    run.loader = TokenLoader(c.train.data_dir, "train", **kw)
    run.val_loader = TokenLoader(c.train.data_dir, "val", **kw)


def peak_flops_per_rank(dist: DistInfo, dtype: str) -> float:
    env = os.environ.get("BLUES_PEAK_FLOPS")
    if env:
        return float(env)
    if dist.device.type == "cuda":
        name = torch.cuda.get_device_name(dist.device)
        half = dtype in ("bf16", "fp16")
        for key, (p16, p32) in {"H100": (989e12, 495e12), "H200": (989e12, 495e12), "GH200": (989e12, 495e12),
                                "A100": (312e12, 156e12), "L40S": (362e12, 183e12), "A10": (125e12, 62.5e12)}.items():
            if key in name:
                return p16 if half else p32
        return 0.0  # unknown GPU: MFU not reported
    return 150e9 / max(1, dist.local_size)


# ============================================================================ one step

@dataclass
class StepResult:
    step: int  # 1-based number of the step just taken
    loss: float  # mean over micro-batches and ranks (nan when skipped)
    ce_loss: float
    aux_loss: float
    z_loss: float
    lr: float
    grad_norm: Optional[float]
    seconds: float
    skipped: bool
    stop_signal: bool
    expert_load_min: float = float("nan")  # min over layers and experts of the share of assignments
    expert_load_max: float = float("nan")
    dropped_frac: float = 0.0


def _set_lr(engine, lr: float) -> None:
    for g in engine.optimizer.param_groups:
        g["lr"] = lr


def _fault_nan(step: int, micro: int) -> bool:
    """Test-only: BLUES_FAULT_NAN_STEPS="3,7.1" -> every micro-batch of step 3, micro-batch 1 of step 7."""
    for item in os.environ.get("BLUES_FAULT_NAN_STEPS", "").split(","):
        if item.strip():
            s, _, m = item.strip().partition(".")
            if int(s) == step and (not m or int(m) == micro):
                return True
    return False


def _random_batch(run: Run):
    c = run.cfg
    x = torch.randint(0, c.model.vocab_size, (c.train.micro_batch_size, c.model.block_size + 1))
    return x[:, :-1], x[:, 1:]


def train_step(run: Run, batch_fn: Optional[Callable] = None) -> StepResult:
    """One optimizer step over grad_accum micro-batches on every rank (collective).

    A non-finite loss on any rank (agreed by an all-reduce before backward) skips the step: with
    no backward taken yet nothing is applied; if it appears after earlier micro-batches were
    already accumulated, the step goes through DeepSpeed, which drops non-finite gradients under
    ZeRO 1/2/3 and with bf16/fp16 (measured: ZeRO 2 and 3 in fp32 skip); where it applies them
    (fp32 under ZeRO 0) training stops with an error, saving nothing."""
    engine, c, dev = run.engine, run.cfg, run.dist.device
    t0 = time.perf_counter()
    lr = lr_at(run.step, c.train)
    _set_lr(engine, lr)
    engine.train()
    get = batch_fn or (run.loader.next_batch if run.loader is not None else lambda: _random_batch(run))
    gas = c.train.grad_accum
    E, L = c.moe.num_experts, run.num_moe_layers
    sums = torch.zeros(6 + L * E, dtype=torch.float64)  # loss ce aux z dropped stop | counts
    bad_at = None
    for micro in range(gas):
        x, y = get()
        if bad_at == 0:
            continue  # skipped step: consume the data, compute nothing
        out = engine(x.to(dev), y.to(dev))
        nan_here = run.dist.rank == 0 and _fault_nan(run.step + 1, micro)
        loss = out.loss * float("nan") if nan_here else out.loss
        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0], device=dev)
        if _all_reduce(flag, "max").item() > 0 and bad_at is None:
            bad_at = micro
            if micro == 0:
                continue
        engine.backward(loss)
        engine.step()
        sums[0] += loss.detach().item()
        sums[1] += out.ce_loss.detach().item()
        sums[2] += out.aux_loss.detach().item()
        sums[3] += out.z_loss.detach().item()
        sums[4] += out.dropped.detach().item()
        if out.expert_counts is not None:
            sums[6:] += out.expert_counts.detach().double().cpu().reshape(-1)
    skipped = bad_at is not None
    if skipped and bad_at > 0 and engine.was_step_applied():
        raise FloatingPointError(
            f"step {run.step + 1}: a non-finite loss appeared after {bad_at} accumulated micro-batches and this "
            f"configuration (dtype={c.train.dtype}, ZeRO {run.stage}) applied the step anyway; stopping without "
            "saving (the last checkpoint is intact)")
    sums[5] = 1.0 if run.stop_signal else 0.0
    sums = _all_reduce(sums.to(dev)).cpu()
    n = gas * run.dist.world_size
    gn = None if skipped else engine.get_global_grad_norm()
    res = StepResult(step=run.step + 1, loss=float("nan") if skipped else sums[0].item() / n,
                     ce_loss=sums[1].item() / n, aux_loss=sums[2].item() / n, z_loss=sums[3].item() / n,
                     lr=lr, grad_norm=None if gn is None else float(gn), seconds=0.0, skipped=skipped,
                     stop_signal=sums[5].item() > 0)
    if L and not skipped:
        counts = sums[6:].view(L, E)
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        res.expert_load_min, res.expert_load_max = share.min().item(), share.max().item()
        assigned = n * c.train.micro_batch_size * c.model.block_size * c.moe.top_k * L
        res.dropped_frac = sums[4].item() / assigned
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    if skipped:
        run.bad_in_a_row += 1
        run.skipped_steps += 1
    else:
        run.bad_in_a_row = 0
    res.seconds = time.perf_counter() - t0
    return res


def train_steps(run: Run, n: int, batch_fn: Optional[Callable] = None) -> list[StepResult]:
    """Run n optimizer steps (no evaluation, logging or checkpoints): for probes and benchmarks."""
    return [train_step(run, batch_fn) for _ in range(n)]


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Validation cross-entropy (mean over eval_steps batches and ranks) and its perplexity."""
    engine = run.engine
    engine.eval()
    s = torch.zeros(2, dtype=torch.float64)
    for x, y in run.val_loader.eval_batches(run.cfg.train.eval_steps):
        out = engine(x.to(run.dist.device), y.to(run.dist.device))
        s[0] += out.ce_loss.item() * x.numel()
        s[1] += x.numel()
    engine.train()
    s = _all_reduce(s.to(run.dist.device)).cpu()
    val = s[0].item() / max(1.0, s[1].item())
    return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}


# ============================================================================ checkpoints, export

def _blues_state(run: Run) -> dict:
    return {"step": run.step, "tokens_seen": run.tokens_seen, "skipped_steps": run.skipped_steps,
            "loader": run.loader.state_dict() if run.loader is not None else None,
            "config": run.cfg.to_dict(), "tokenizer_sha256": run.tokenizer.sha256 if run.tokenizer else None}


def _fault_kill_in_save(run: Run) -> Optional[Callable]:
    if os.environ.get("BLUES_FAULT_KILL_IN_SAVE") == str(run.step) and run.dist.rank == 1:
        return lambda: os.kill(os.getpid(), signal.SIGKILL)  # test-only: a rank dies mid-save
    return None


def save_checkpoint(run: Run) -> str:
    meta = {"step": run.step, "tokens_seen": run.tokens_seen, "config": run.cfg.to_dict(),
            "tokenizer_sha256": run.tokenizer.sha256 if run.tokenizer else None,
            "world_size": run.dist.world_size, "zero_stage": run.stage, "time": time.time()}
    return ckpt.save(run.engine, run.cfg.train.out_dir, run.step, _blues_state(run), meta, run.cfg.train.keep_last,
                     _before_commit=_fault_kill_in_save(run))


def resume(run: Run, where: tuple[str, str]) -> list[str]:
    """Load the checkpoint (ckpt_dir, tag) into run; returns the compatible config changes."""
    d, tag = where
    meta = ckpt.read_meta(os.path.join(d, tag))
    changes = ckpt.check_resume(meta, run.cfg, run.tokenizer.sha256 if run.tokenizer else None,
                                run.dist.world_size, run.stage)
    state = ckpt.load(run.engine, d, tag)
    run.step, run.tokens_seen = int(state["step"]), int(state["tokens_seen"])
    run.skipped_steps = int(state.get("skipped_steps", 0))
    if run.loader is not None and state.get("loader") is not None:
        run.loader.load_state_dict(state["loader"])
    ckpt.restore_rng(state, run.dist.rank)
    return changes


def export_weights(run: Run, directory: str) -> Optional[str]:
    """save_pretrained into `directory` with every expert present (collective; rank 0 writes).

    ZeRO 3 partitions are gathered; DeepSpeed MoE experts are gathered from their expert-parallel
    ranks and written in the stacked layout. The result loads with Blues.from_pretrained."""
    from blues.model import Blues
    model = run.model
    if run.stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            sd = {k: v.detach().cpu().clone() for k, v in model.export_state_dict().items()}
    elif run.cfg.moe.moe_backend == "deepspeed":
        from blues.moe_deepspeed import stacked_state_dict
        sd = stacked_state_dict(model)
        if run.cfg.model.tie_embeddings:
            sd.pop("lm_head.weight", None)
    else:
        sd = model.export_state_dict()
    out = None
    if run.dist.rank == 0:
        export_cfg = run.cfg.replace(moe_backend="auto" if run.cfg.moe.moe_backend == "deepspeed"
                                     else run.cfg.moe.moe_backend, ep_size=1)
        fresh = Blues(export_cfg)
        fresh.load_weights({k: v.float() for k, v in sd.items()}, source="the trained model")
        fresh.save_pretrained(directory, tokenizer=run.tokenizer)
        out = directory
    _barrier()
    return out


# ============================================================================ the loop

_EARLY_SIGNALS: list[str] = []


def _note_early_signal(signum, frame) -> None:
    """Installed first thing in main(): a SIGUSR1/SIGTERM that arrives while the engine is still being
    built (data preparation, the JIT op build, deepspeed.initialize) is remembered, not lost."""
    _EARLY_SIGNALS.append(signal.Signals(signum).name)


class _Signals:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves and exits 0."""

    def __init__(self, run: Run):
        self.run, self.old = run, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
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


def format_step(r: StepResult, run: Run, tokens_per_s: float) -> str:
    if r.skipped:
        return (f"step {r.step}/{run.cfg.train.max_steps} | SKIPPED: non-finite loss "
                f"({run.bad_in_a_row} in a row, max_bad_steps={run.cfg.train.max_bad_steps})")
    mfu = (run.flops_per_token * tokens_per_s / (run.peak_flops * run.dist.world_size)) if run.peak_flops else None
    gn = f"{r.grad_norm:.3f}" if r.grad_norm is not None else "-"
    s = (f"step {r.step}/{run.cfg.train.max_steps} | loss {r.loss:.4f} (ce {r.ce_loss:.4f} aux {r.aux_loss:.4f} "
         f"z {r.z_loss:.4f}) | lr {r.lr:.2e} | gnorm {gn} | {tokens_per_s:,.0f} tok/s | MFU "
         f"{'-' if mfu is None else f'{100 * mfu:.2f}%'}")
    if run.num_moe_layers:
        s += (f" | experts min {r.expert_load_min:.3f} max {r.expert_load_max:.3f} "
              f"dropped {100 * r.dropped_frac:.2f}%")
    return s


def _monitor(run: Run, events: list[tuple[str, float, int]]) -> None:
    mon = getattr(run.engine, "monitor", None)
    if mon is not None and mon.enabled and run.dist.rank == 0:
        mon.write_events([(n, v, s) for n, v, s in events if v is not None and not math.isnan(v)])


def train(run: Run, *, progress: Optional[bool] = None, prompt: Optional[str] = DEFAULT_PROMPT,
          export: bool = True) -> int:
    """The training loop: steps, console lines, monitor events, evaluation, checkpoints, export."""
    t, rank0 = run.cfg.train, run.dist.rank == 0
    say = print if rank0 else (lambda *a, **k: None)
    bar = None
    if rank0 and (progress if progress is not None else sys.stderr.isatty()):
        from tqdm import tqdm
        bar = tqdm(total=t.max_steps, initial=run.step, desc="train", dynamic_ncols=True, leave=False)
        say = bar.write
    window_tokens, window_seconds = 0, 0.0
    step_sleep = float(os.environ.get("BLUES_TEST_STEP_SLEEP", "0"))
    last_saved = run.step if run.step else None
    with _Signals(run):
        while run.step < t.max_steps:
            r = train_step(run)
            if step_sleep:
                time.sleep(step_sleep)  # test-only: widen the window for signals
            window_tokens += run.tokens_per_step
            window_seconds += r.seconds
            tps = run.tokens_per_step / r.seconds
            if bar is not None:
                bar.update(1)
            _monitor(run, [("Train/loss", r.loss, r.step), ("Train/lr", r.lr, r.step),
                           ("Train/grad_norm", r.grad_norm, r.step), ("Train/ce_loss", r.ce_loss, r.step),
                           ("Train/aux_loss", r.aux_loss, r.step), ("Train/z_loss", r.z_loss, r.step),
                           ("Train/tokens_per_s", tps, r.step), ("Train/skipped", float(r.skipped), r.step),
                           ("Train/expert_load_min", r.expert_load_min, r.step),
                           ("Train/expert_load_max", r.expert_load_max, r.step),
                           ("Train/dropped_frac", r.dropped_frac, r.step)])
            if r.skipped:
                say(format_step(r, run, 0.0))
                if run.bad_in_a_row >= t.max_bad_steps:
                    say(f"stopping: {run.bad_in_a_row} non-finite losses in a row (max_bad_steps={t.max_bad_steps}); "
                        f"the last checkpoint ({'step ' + str(last_saved) if last_saved else 'none'}) is intact")
                    return EXIT_NONFINITE
            elif r.step % t.log_interval == 0 or r.step == t.max_steps:
                say(format_step(r, run, window_tokens / max(window_seconds, 1e-9)))
                window_tokens, window_seconds = 0, 0.0
            if r.step % t.eval_interval == 0 or r.step == t.max_steps:
                ev = evaluate(run)
                _monitor(run, [("Eval/val_loss", ev["val_loss"], r.step), ("Eval/val_ppl", ev["val_ppl"], r.step)])
                say(f"step {r.step}: val_loss {ev['val_loss']:.4f} val_ppl {ev['val_ppl']:.2f}")
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


# ============================================================================ CLI

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="blues-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="tiny (default) or blues01")
    p.add_argument("--config", default=None, help="a YAML/JSON file of Blues config fields (instead of --preset)")
    p.add_argument("--deepspeed_config", "--ds_config", default=None, dest="deepspeed_config",
                   help="a DeepSpeed JSON (ds_configs/*.json); default: the built-in ZeRO 2 config")
    p.add_argument("--resume", default="auto",
                   help="auto (default: latest checkpoint in out_dir, if any), none, or a checkpoint folder")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the sample printed at the end ('' for none)")
    p.add_argument("--no_export", action="store_true", help="do not export weights at the end")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bar (auto: on a tty)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="config overrides key=value (lr=1e-3 max_steps=500 ...)")
    return p.parse_intermixed_args(argv)  # overrides may come before and after the options


def load_config(args: argparse.Namespace) -> BluesConfig:
    if args.preset and args.config:
        raise ValueError(f"--preset {args.preset} and --config {args.config} are both given: pass one of them")
    cfg = BluesConfig.from_file(args.config) if args.config else get_preset(args.preset or "tiny")
    return cfg.with_overrides(args.overrides) if args.overrides else cfg


def _world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: Optional[list[str]] = None) -> int:
    original = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            original[sig] = signal.signal(sig, _note_early_signal)
    try:
        return _main(argv)
    finally:
        # CPython resets the handlers it installed to SIG_DFL while the interpreter shuts down, so a
        # duplicate USR1 arriving then would kill a rank that already saved (exit -10, seen under
        # Slurm). After a stop by signal, ignore further ones; otherwise restore what we inherited
        # (SIG_IGN under `trap '' USR1`).
        for sig, h in original.items():
            signal.signal(sig, signal.SIG_IGN if _EARLY_SIGNALS else (h if h is not None else signal.SIG_DFL))


def _main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("blues-train: %(message)s"))
    root = logging.getLogger("blues")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args)
        ds_raw = load_ds_config(args.deepspeed_config) if args.deepspeed_config else BUILTIN_DS_CONFIG
        validate(cfg, ds_raw, _world_size_from_env())  # refuse bad inputs before starting anything
        where = ckpt.find_resume(args.resume, cfg.train.out_dir)
        if where is not None:  # refuse an incompatible checkpoint before building the engine
            meta = ckpt.read_meta(os.path.join(*where))
            ckpt.check_resume_config(BluesConfig.from_dict(meta["config"]), cfg)
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
        run = build_engine(cfg, ds_raw)
        if rank == 0:
            os.makedirs(cfg.train.out_dir, exist_ok=True)
            with open(os.path.join(cfg.train.out_dir, "run_config.json"), "w", encoding="utf-8") as f:
                json.dump({"blues": cfg.to_dict(), "deepspeed": run.ds_config}, f, indent=1, default=str)
        _describe(run)
        if where is not None:
            changes = resume(run, where)
            if rank == 0:
                print(f"resumed from {os.path.join(*where)} at step {run.step} ({run.tokens_seen:,} tokens seen)"
                      + (f"; config changes: {'; '.join(changes)}" if changes else ""))
        progress = {"auto": None, "on": True, "off": False}[args.progress]
        return train(run, progress=progress, prompt=args.prompt or None, export=not args.no_export)
    except (ValueError, FloatingPointError) as e:
        print(f"blues-train: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("blues-train: interrupted", file=sys.stderr)
        return 130
    finally:
        root.removeHandler(handler)


def _describe(run: Run) -> None:
    """One line per rank: what it holds (tests read the expert-parameter counts)."""
    from blues.moe_deepspeed import num_local_expert_params
    # under ZeRO 3 a rank holds its partition (ds_tensor) of each parameter
    n = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in run.model.parameters())
    n_exp = num_local_expert_params(run.model)
    c = run.cfg
    line = (f"rank {run.dist.rank}/{run.dist.world_size}: {n:,} parameters here, {n_exp:,} of them DeepSpeed-expert "
            f"parameters | ZeRO {run.stage} | moe_backend={c.moe.moe_backend} ep_size={c.train.ep_size} | "
            f"dtype={c.train.dtype} | {run.tokens_per_step:,} tokens/step | {run.flops_per_token:,} FLOPs/token")
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
