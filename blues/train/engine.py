"""Build a DeepSpeed engine for a Blues config: small ordered steps, called from build_engine only,
in this order (torchtitan style, one place, one order):

    init_distributed -> validate (once per start) -> ensure_ep_groups -> record_vision_pretrained
    -> prepare_data -> apply_image_token_id -> build_model -> apply_vision_pretrained
    -> apply_init_from -> apply_freeze -> apply_ac -> apply_ep -> apply_zero3_leaf -> build_optimizer
    -> deepspeed.initialize -> seed_ranks -> build_loaders

The expert-parallel groups exist before the model, so that each MoE layer keeps its own experts'
slice as it is built (moe_backend=torch|triton; moe_backend=deepspeed makes its groups itself).

validate() does every check that needs no process group and returns the resolved DeepSpeed config;
blues-train calls it before it starts anything and hands its result to build_engine(validated=True),
so nothing is checked twice.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from blues.config import BluesConfig
from blues.train.debug import DebugConfig
from blues.train.distributed import DistInfo, barrier, init_distributed
from blues.train.ds_config import BUILTIN_DS_CONFIG, offloads_optimizer, resolve_ds_config, zero_stage
from blues.train.metrics import flops_per_token, peak_flops_per_rank

log = logging.getLogger(__name__)


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
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * self.dist.world_size * self.cfg.model.block_size


def validate(cfg: BluesConfig, ds_config: dict, world_size: int) -> dict:
    """Every check that needs no process group: ValueError naming the field. Returns the resolved DS config."""
    ds = resolve_ds_config(ds_config, cfg, world_size, monitor_dir=os.path.join(cfg.train.out_dir, "monitor"))
    if cfg.train.dtype == "fp16" and not torch.cuda.is_available():
        raise ValueError("dtype=fp16 needs a GPU (DeepSpeed's CPU accelerator refuses fp16): use dtype=bf16 or fp32 "
                         "on CPU")
    if cfg.moe.moe_backend == "deepspeed":
        from blues.moe.deepspeed_moe import check_deepspeed_moe_config
        check_deepspeed_moe_config(cfg)
    check_freeze(cfg, zero_stage(ds))
    return ds


def check_freeze(cfg: BluesConfig, stage: int) -> None:
    """The freeze combinations that cannot train or resume right: ValueError naming them.

    freeze=all_but_projector freezes the experts and routers too: the balancing bias and dead-expert
    revival, which move them outside the optimizer, are refused as freeze_router refuses them. With
    frozen experts DeepSpeed's engine finds MoE layers (moe_backend=deepspeed's own classes) with no MoE
    optimizer group and stops (stage_1_and_2.py's "None of the param groups are marked as MoE"; the
    stacked backends drop their engine marker then, apply_ep); and under expert parallelism at ZeRO 1/2
    a resume gives every EP rank EP rank 0's experts back and repairs them from the fp32 master
    partitions (blues.train.ep_checkpoint), which frozen experts are not in."""
    t = cfg.train
    has_moe = bool(cfg.moe_layer_ids())
    if t.freeze == "all_but_moe" and not has_moe:
        raise ValueError("freeze=all_but_moe trains only the MoE layers, but this model has none (every layer is "
                         "dense): set freeze=none|encoder|all_but_projector, or give the model MoE layers")
    if t.freeze != "all_but_projector" or not has_moe:
        return
    for name in ("balance_bias_rate", "revive_dead_experts_after"):
        if getattr(cfg.moe, name):
            raise ValueError(f"freeze=all_but_projector keeps the MoE layers as they are, but {name}="
                             f"{getattr(cfg.moe, name)} moves them (the routing bias, or dead experts re-initialised): "
                             f"set {name}=0")
    if cfg.moe.moe_backend == "deepspeed":
        raise ValueError("freeze=all_but_projector freezes the experts, but moe_backend=deepspeed needs trainable "
                         "experts (DeepSpeed's engine requires an MoE optimizer group): set moe_backend=torch|triton")
    if t.ep_size > 1 and stage in (1, 2):
        raise ValueError(f"freeze=all_but_projector freezes the experts, which a ZeRO {stage} checkpoint at "
                         f"ep_size={t.ep_size} cannot give back to each EP rank (they are not in the optimizer's "
                         "fp32 partitions): use ep_size=1, or ZeRO 0 or 3")


def prepare_data(cfg: BluesConfig, rank: int):
    """(data meta, tokenizer) of cfg.train.data_dir; rank 0 prepares the built-in corpus there when
    it holds no prepared data (with vision_enabled, the built-in synthetic image-text set), the other
    ranks wait for it."""
    from blues.data.tokenizer import Tokenizer, check_vocab

    d = cfg.train.data_dir
    if cfg.vision.vision_enabled:
        from blues.data.images import ensure_image_data

        def ensure(**kw):
            return ensure_image_data(d, cfg.vision, **kw)
    else:
        from blues.data.prepare import ensure_prepared

        def ensure(**kw):
            return ensure_prepared(d, **kw)
    meta = ensure(progress=False) if rank == 0 else None
    barrier()
    if meta is None:
        meta = ensure()  # prepared by rank 0 by now: this only reads its meta
    tok = Tokenizer.load(d)
    check_vocab(tok, cfg.model.vocab_size, what="model")
    return meta, tok


def apply_image_token_id(cfg: BluesConfig, tok) -> BluesConfig:
    """cfg with image_token_id set from the tokenizer's <|image|> when it is None (vision only);
    ValueError when the config names another id than the tokenizer's."""
    if not cfg.vision.vision_enabled or tok is None:
        return cfg
    from blues.data.images import image_token_ids
    image_id = image_token_ids(tok)[1]
    if cfg.vision.image_token_id is None:
        return cfg.replace(image_token_id=image_id)
    if cfg.vision.image_token_id != image_id:
        raise ValueError(f"image_token_id={cfg.vision.image_token_id} but the data's tokenizer has <|image|> = "
                         f"{image_id}: set image_token_id={image_id} or null")
    return cfg


def record_vision_pretrained(cfg: BluesConfig) -> BluesConfig:
    """cfg with vision_pretrained_config read from the vision_pretrained folder (vision only), so that
    the saved model and its checkpoints rebuild the tower without the folder; ValueError for a missing
    folder, one that is not CLIP or SigLIP, or image sizes that are not the tower's (checked here, before
    the data is prepared at the wrong size)."""
    v = cfg.vision
    if not v.vision_enabled or v.vision_pretrained is None:
        return cfg
    from blues.vision.pretrained import check_sizes, read_vision_config
    vision_config = read_vision_config(v.vision_pretrained)
    check_sizes(vision_config, v)
    return cfg.replace(vision_pretrained_config=vision_config)


def build_model(cfg: BluesConfig):
    """The Blues model on CPU, seeded by cfg.train.seed (the same on every rank)."""
    from blues.model import Blues

    torch.manual_seed(cfg.train.seed)
    return Blues(cfg)


def apply_vision_pretrained(model, cfg: BluesConfig) -> None:
    """The vision_pretrained folder's CLIP / SigLIP weights into the tower (after build_model, whose
    init would overwrite them; before init_from and a resume, which overwrite them in turn)."""
    if not cfg.vision.vision_enabled or cfg.vision.vision_pretrained is None:
        return
    from blues.vision.pretrained import load_vision_pretrained
    load_vision_pretrained(model)
    log.info("vision tower from %s", cfg.vision.vision_pretrained)


def apply_init_from(model, init_from: Optional[str]) -> None:
    """blues-train --init_from: the weights of a model folder (Hugging Face or Blues,
    blues.hf.load_weights_into), loaded before DeepSpeed takes the model, so that ZeRO 3 partitions
    the loaded values and each EP rank keeps its own experts' slice; training still starts at step 0
    with a fresh optimizer."""
    if init_from is None:
        return
    from blues.hf import load_weights_into
    load_weights_into(model, init_from)
    log.info("weights from %s", init_from)


ROUTER_WEIGHTS = ("mlp.router.weight", "deepspeed_moe.gate.wg.weight")  # stacked layers' router, DeepSpeed's gate


def trains(name: str, cfg: BluesConfig) -> bool:
    """Whether the parameter `name` (as model.named_parameters() names it) keeps training under
    cfg.train.freeze and freeze_router. The freeze stages (MoE-LLaVA's):
        none               every parameter
        encoder            all but the vision encoder (vision.encoder.*)               stage II
        all_but_projector  only the vision projector (vision.projector.*)              stage I
        all_but_moe        only the MoE layers (blocks.<i>.mlp.* of each MoE layer:    stage III
                           routed experts, router, shared experts and their gate)
    freeze_router freezes every router on top of that (with all_but_moe: only the experts train).
    The modality embedding and the language model's norms and embeddings train only under none and
    encoder."""
    t = cfg.train
    if t.freeze_router and name.endswith(ROUTER_WEIGHTS):
        return False
    if t.freeze == "encoder":
        return not name.startswith("vision.encoder.")
    if t.freeze == "all_but_projector":
        return name.startswith("vision.projector.")
    if t.freeze == "all_but_moe":
        return name.startswith(tuple(f"blocks.{i}.mlp." for i in cfg.moe_layer_ids()))
    return True


def apply_freeze(model, cfg: BluesConfig) -> None:
    """freeze and freeze_router (see trains): the frozen parameters stop taking gradients, and so leave
    the optimizer groups build_optimizer makes."""
    t = cfg.train
    if t.freeze == "none" and not t.freeze_router:
        return
    frozen = routers = 0
    for name, p in model.named_parameters():
        if not trains(name, cfg):
            p.requires_grad_(False)
            frozen += p.numel()
            routers += name.endswith(ROUTER_WEIGHTS)
    if t.freeze_router:
        assert routers == len(cfg.moe_layer_ids()), (routers, cfg.moe_layer_ids())
    total = sum(p.numel() for p in model.parameters())
    log.info("freeze=%s freeze_router=%s: %d of %d parameters frozen", t.freeze, t.freeze_router, frozen, total)


def apply_ac(model, cfg: BluesConfig) -> None:
    """Activation checkpointing: recompute each block in backward."""
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()


def apply_ep(model, cfg: BluesConfig, ep, stage: int) -> None:
    """Mark the stacked experts as DeepSpeed MoE parameters of their expert-parallel group `ep`
    (blues.moe.expert_parallel.mark_expert_params), at every ep_size: their gradients are then reduced
    over the expert-data-parallel group, and the optimizer groups come out the same at every ep_size
    (decay, no_decay, ep_size_N), which a checkpoint resharded to another ep_size relies on. At
    ep_size=1 the expert-data-parallel group is the whole world: the same reduction as without it."""
    if cfg.moe.moe_backend == "deepspeed":
        return
    from blues.moe import MoE
    from blues.moe.expert_parallel import mark_expert_params
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    mark_expert_params(layers, ep, stage, cfg.moe.num_experts)
    for layer in layers:
        if stage < 3 and not any(p.requires_grad for p in layer.experts.parameters()):
            # Frozen experts (freeze=all_but_projector) stay marked, so that the engine's start-up
            # broadcast keeps each EP rank's own slice, but without the engine marker: with it
            # DeepSpeed demands an MoE optimizer group, and frozen experts are in none.
            del layer.ds_engine_marker


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
    """AdamW; weight decay on matrices only; expert parameters (DeepSpeed MoE parameters) in their own
    group. The stacked backends' groups are decay, no_decay and ep_size_N ('moe': True, the decay
    settings) at every ep_size: split without a size cap (DeepSpeed's default cap would make the number
    of groups depend on E_loc, hence on ep_size) and with the empty no_decay expert group dropped.

    With ZeRO-Offload: DeepSpeedCPUAdam on CUDA machines (its C++ op JIT-builds once, ~3 min
    measured on the 2-core CPU machines, which is why CPU runs use torch's AdamW there)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    t = cfg.train
    groups = [{"name": "decay", "params": decay, "weight_decay": t.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
    if cfg.moe.moe_backend == "deepspeed":
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    elif any(is_moe_param(p) for p in decay):
        groups = split_params_into_different_moe_groups_for_optimizer(groups, max_group_size=None)
    groups = [g for g in groups if g["params"]]  # a group the freeze emptied: ZeRO 1/2 cannot flatten one
    if offloads_optimizer(ds) and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **_adam_hparams(t))
    if offloads_optimizer(ds):
        ds["zero_force_ds_cpu_optimizer"] = False
    return adamw(groups, t)


def adamw(groups: list, t) -> torch.optim.AdamW:
    """torch's AdamW with the run's hyperparameters (t: TrainConfig), fused: one pass over each tensor
    (ZeRO hands it one flat fp32 partition per group) instead of one per elementwise op.
    NOTE: measured on the 2-core CPU machine, 1 thread, one 12.6M-parameter tensor (the local experts
    of the ep_throughput wide shape): 22 ms a step fused, 141 ms with torch's default; the default ran
    94 ms of its 1.26 s training step there (benchmarks/ep_throughput.py --profile wide). The results
    differ from the default's in the last bits (6e-8 after 10 steps of a unit-scale tensor)."""
    return torch.optim.AdamW(groups, **_adam_hparams(t), fused=True)


def _adam_hparams(t) -> dict:
    """The run's Adam hyperparameters (t: TrainConfig), one place for every Adam Blues builds."""
    return dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)


def seed_ranks(cfg: BluesConfig, rank: int) -> None:
    """Routing noise and dropout differ per rank from here on; the weights were seeded alike."""
    seed = cfg.train.seed + 1000 * rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def build_loaders(run: Run) -> None:
    """Token loaders, or with vision_enabled image-text loaders ((x, y, images) batches)."""
    c, d = run.cfg, run.dist
    if c.vision.vision_enabled:
        from blues.data.images import ImageTextLoader as Loader
    else:
        from blues.data.loader import TokenLoader as Loader
    kw = dict(block_size=c.model.block_size, batch_size=c.train.micro_batch_size, seed=c.train.seed,
              rank=d.rank, world_size=d.world_size)
    run.loader = Loader(c.train.data_dir, "train", **kw)
    run.val_loader = Loader(c.train.data_dir, "val", **kw)


def build_engine(cfg: BluesConfig, ds_config: Optional[dict] = None, *, with_data: bool = True,
                 dist: Optional[DistInfo] = None, validated: bool = False,
                 debug: Optional[DebugConfig] = None, init_from: Optional[str] = None) -> Run:
    """Build the DeepSpeed engine for `cfg` from a DeepSpeed config dict (default: the built-in ZeRO 2).

    ds_config: a raw config (its "auto" fields are filled here by validate), or with validated=True
    the dict validate() returned for this world size, used as it is. with_data=False skips the corpus
    and loaders (train_steps then feeds random tokens). debug: the test-only fault injection, read
    from the environment when not given. init_from: a model folder whose weights replace the
    initialisation (apply_init_from); its architecture fields must equal cfg's
    (blues.hf.init_from_config builds such a cfg)."""
    import deepspeed

    dist = dist or init_distributed()
    if validated:
        assert ds_config is not None, "validated=True needs the ds_config that validate() returned"
        ds = ds_config
    else:
        ds = validate(cfg, ds_config if ds_config is not None else BUILTIN_DS_CONFIG, dist.world_size)
    stage = zero_stage(ds)
    ep = None
    if cfg.moe.moe_backend != "deepspeed":
        from blues.moe.expert_parallel import ensure_ep_groups
        ep = ensure_ep_groups(cfg.train.ep_size)
    cfg = record_vision_pretrained(cfg)
    meta = tok = None
    if with_data:
        meta, tok = prepare_data(cfg, dist.rank)
        cfg = apply_image_token_id(cfg, tok)
    model = build_model(cfg)
    apply_vision_pretrained(model, cfg)
    apply_init_from(model, init_from)
    apply_freeze(model, cfg)
    apply_ac(model, cfg)
    apply_ep(model, cfg, ep, stage)
    apply_zero3_leaf(model, stage)
    optimizer = build_optimizer(model, cfg, ds)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    seed_ranks(cfg, dist.rank)
    run = Run(cfg=cfg, ds_config=ds, engine=engine, model=engine.module, dist=dist, stage=stage, tokenizer=tok,
              data_meta=meta, debug=debug if debug is not None else DebugConfig.from_env())
    run.num_moe_layers = len(cfg.moe_layer_ids())
    run.flops_per_token = flops_per_token(run.model, cfg)
    run.peak_flops = peak_flops_per_rank(dist, cfg.train.dtype)
    if with_data:
        build_loaders(run)
    return run


def describe(run: Run) -> str:
    """One line of what this rank holds (tests read the expert-parameter counts)."""
    from blues.moe.deepspeed_moe import DS_EXPERT_RE

    def here(p):  # under ZeRO 3 a rank holds its partition (ds_tensor) of each parameter
        return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    named = list(run.model.named_parameters())
    n = sum(here(p) for _, p in named)
    n_exp = sum(here(p) for name, p in named if DS_EXPERT_RE.match(name) or ".experts." in name)
    c = run.cfg
    return (f"rank {run.dist.rank}/{run.dist.world_size}: {n:,} parameters here, {n_exp:,} of them expert "
            f"parameters | ZeRO {run.stage} | moe_backend={c.moe.moe_backend} ep_size={c.train.ep_size} | "
            f"dtype={c.train.dtype} | {run.tokens_per_step:,} tokens/step | {run.flops_per_token:,} FLOPs/token")
