"""Expert-parallel training throughput: Blues' own EP layer against DeepSpeed's two MoE paths.

    deepspeed --num_gpus 2 benchmarks/ep_throughput.py                 # CPU: 2 ranks, gloo, fp32, ZeRO 2
    deepspeed --num_gpus 2 benchmarks/ep_throughput.py --smoke         # a tiny shape, 2 steps (a script check)
    deepspeed --num_gpus 2 benchmarks/ep_throughput.py --profile tiny  # + torch.profiler of Blues EP=2
                                                                       #   and AutoEP EP=2 on that shape

(On a CPU-only machine `--num_gpus 2` starts 2 CPU ranks: DeepSpeed picks its CPU accelerator.)

Implementations (--impls), each a whole model trained by a DeepSpeed engine (ZeRO 2, fp32, AdamW,
the built-in ZeRO-2 config of blues.train, the same on every engine), on the same 2 ranks:
  blues_ep2    Blues, moe_backend=torch ep_size=2: Blues' own expert-parallel layer (its experts split
               over the 2 ranks, variable-split all-to-all), built by blues.train.build_engine
  blues_ep1    Blues, moe_backend=torch ep_size=1: every expert on every rank, data parallel 2
  ds_ep2       Blues, moe_backend=deepspeed ep_size=2: DeepSpeed's native deepspeed.moe.layer.MoE,
               no token dropping (capacity_factor=None: every expert padded to the busiest one)
  autoep_ep2   Hugging Face MixtralForCausalLM built from a config with the same shape (no download),
  autoep_ep1   its MoE blocks replaced by DeepSpeed 0.19.8's AutoEP inside deepspeed.initialize
               ("expert_parallel": {"enabled": true, "autoep_size": 2 or 1, "preset_model": "mixtral"});
               needs transformers==5.22.2 (pip install -e .[bench]) and the optimizer passed as a
               callable that splits the MoE parameter groups (see the facts file).
  dense_floor  Blues with every MoE layer replaced by one dense SwiGLU of top_k * expert_ffn_size (the
               experts' active FLOPs per token, no router, no dispatch), data parallel 2: the floor no MoE
               layer can beat on this machine. dense_floor / ds_ep2 is the most any MoE layer could gain
               over DeepSpeed's native one at the shape (the rest of the step -- attention, the LM head,
               the loss, the optimizer -- is the same for every Blues engine).
An implementation whose engine cannot be built (e.g. Blues EP before it exists) is reported as
unavailable with its error, and the others still run.

Shapes (--shapes): the tiny preset's widths (D=128, 4 heads, 1 KV head, F=256, 2 layers, block 128,
micro-batch 8) with E=8 experts top-2; `wide` D=512 (8 heads, 2 KV heads), F=1024, E=8, K=2; `e64`
D=512, F=256, E=64, K=8. Every shape: vocabulary 4096, 2 layers, block 128, micro-batch 8 per rank
(2048 tokens per step over the 2 ranks), router noise off. The Mixtral twin has the same widths,
heads, vocabulary, tied embeddings, RMSNorm eps, RoPE theta and SDPA attention; HF's Mixtral computes
no auxiliary loss (output_router_logits=False) where Blues adds its aux and z-loss (a few (N, E) ops).

Routing (--routing), the same for every implementation, forced as benchmarks/moe_layer.py forces it:
each rank draws (seed = its rank) logits = log p + Gumbel noise for its N = 1024 tokens
(moe_layer.routing_logits) and keeps their top-k as the target experts: `balanced` p uniform,
`zipf` p_e ~ 1/(e+1)^1.2 (experts 0..E/2-1 live on EP rank 0, so rank 0's experts get most of the
work). Every MoE layer of every step routes token i of a rank's micro-batch to that rank's targets[i].
How each implementation is made to follow the targets (only the choice of experts is forced; the
weights are the real router scores renormalised over the chosen experts, and the router's gradient
flows as in training):
  Blues (blues_*, ds_ep2)  the public forced-routing protocol of blues.moe.routing:
      set_forced_routing(1.0) on every MoE layer, and blues.moe.routing.forced_targets (and the name
      blues.moe.deepspeed_moe imported) replaced for the run by a function returning the drawn targets
      for every token. The stacked layer then selects by a FORCING_LOGIT (1e4) bias on the targets
      (forced_route, which also runs the real route once for the losses: one more (N, E) top-k per
      layer than unforced training); the DeepSpeed adapter shifts its gate's input (through the
      pseudo-inverse of its (E, D) router weight) so that its gate picks the targets.
  AutoEP   a forward hook on each AutoEPMoELayer's router linear (router.gate) adds FORCING_LOGIT
      to the target columns of its (N, E) output, before AutoEP's softmax and top-k.

Timing: every engine is built first; then --rounds rounds, each running --steps optimizer steps of
every implementation in turn (alternating, so drift of this shared machine hits all alike), a barrier
before and after each; tokens/s = steps * 2048 / seconds. Blues steps through blues.train.train_steps
(the training loop's step: its loss/metric all-reduces included); AutoEP through engine forward /
backward / step plus one loss all-reduce. All ranks feed one fixed random batch (no data loading).
Reported per implementation: tokens/s of every round, the median and the best; ratios from the
medians and paired (the median over rounds of the ratio within a round). The row records the load
average, the CPU pressure (PSI: the share of time some task waited for a CPU) and the busiest other
processes, before and after. Prints a table and writes benchmarks/results/ep_throughput.json.
--pause_while /tmp/ci_quiet.lock holds every timed segment while that file exists.

Profile (--profile SHAPE): after the timing rounds of SHAPE (balanced routing), every rank runs
--profile_steps steps of blues_ep2, ds_ep2, autoep_ep2 and dense_floor under torch.profiler (CPU), forward /
backward / optimizer step as marked ranges, and splits each rank's time by the op categories in
CATEGORIES: GEMMs, attention, the loss, the expert exchange (all-to-all, with the Python of the
autograd Function around it and its wait for the other rank), other collectives (ZeRO's gradient
reduction, the grad norm), permutation (index/gather/scatter/sort), the optimizer, autograd's engine,
other tensor ops, and Python outside every op; and the forward time of each stage of Blues' EP layer
(its blues.moe:* profiler ranges: split plan, exchange, local experts, combine).

NOTE (profile, tiny shape, balanced, 2 ranks on a quiet machine, 2026-11-28, the row in
results/ep_throughput_tiny.json; ms per step under the profiler, mean of the ranks, Blues EP=2 /
AutoEP EP=2 / dense floor): total 186 / 155 / 123; GEMMs 78.6 / 77.2 / 72.7; loss (log-softmax + NLL)
27.3 / 7.3 / 9.0; small tensor ops 21.5 / 16.2 / 11.4; Python outside ops 21.4 / 20.5 / 15.2; exchange
(counts + rows, both directions, with the wait for the other rank) 18.1 / 13.5 / -; attention 7.8 /
7.7 / 7.9; optimizer and ZeRO 7.9 / 8.3 / 6.0; permutation 3.0 / 3.8 / 0.1. Blues' EP stages, forward,
both layers: split plan 2.3, exchange 7.3, local experts 13.6, combine 1.1. Both run the same GEMMs and
the same collectives (6 all-to-all forward, 4 backward). What separates them is the loss: the same
(1024, 4096) fp32 log-softmax costs Blues 3x (10.1 ms forward, 10.1 backward, 7.7 zero-fill of its
gradient): glibc hands the freed 16 MB buffers back to the OS between Blues' steps (heap trim) and
they are faulted in again. With MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 in
the launcher's environment (same engines, alternating rounds) Blues EP=2 ran 12,838 tokens/s against
AutoEP EP=2's 13,047 (0.98x); with glibc's defaults 10,940 against 11,912 (0.93x). The whole script
with those two variables: Blues EP=2 / AutoEP EP=2 0.97x balanced, 1.00x Zipf (0.92x and 0.89x without).

NOTE (the fused loss, blues.loss, fused_loss=True for every Blues model here: the loss in 4 MiB row
chunks of logits, gradients in the forward, no (N, V) logits; 2026-11-28 04:00, glibc's defaults, load average
1.8 -> 2.2 (another 1-thread job running), the row in results/ep_throughput_tiny.json): Blues EP=2 /
AutoEP EP=2 1.09x balanced (13,351 / 12,290 tokens/s; paired 1.09x), 1.09x Zipf (11,995 / 11,034;
paired 1.08x); Blues EP=2 / EP=1 0.99x balanced, 0.87x Zipf. Profile, ms per step, Blues EP=2 / AutoEP
EP=2 / dense floor: total 157 / 177 / 119; the loss category (the fused loss's non-GEMM ops and its
backward node; its 3 GEMMs count as GEMMs, as lm_head's did) 6.4 / 24.5 / 6.0, against 27.3 before;
GEMMs 74.6 / 77.1 / 70.9. AutoEP's own log-softmax page-faulted in this run (24.5 ms against 7.3 in
the row above), so part of the 1.09x is AutoEP's glibc cost: with its loss at 7.3 ms its step would be
~160 ms, level with Blues' 157.

NOTE (profile, wide shape, balanced, 2 ranks, 2026-11-28 09:43, load average 0.9 -> 1.8, torch's
default AdamW; `--shapes wide --rounds 1 --routing balanced --profile wide`; ms per step under the
profiler, mean of the ranks, Blues EP=2 / AutoEP EP=2 / DeepSpeed native EP=2 / dense floor): wall 1264
/ 1226 / 1299 / 1077; forward 397 / 283 / 439 / 407; backward 572 / 674 / 633 / 571; optimizer step
210 / 269 / 227 / 99. Blues' forward + backward (969) is the dense floor's (978): at this width the
router, permutation and exchange cost no more than the floor's wider dense GEMMs save (GEMMs 690 vs
738; exchange 38, permutation 9; EP stages, forward: split plan 3.8, exchange 18.1, local experts
156.4, combine 2.5). The whole gap to the floor is the optimizer step over twice the floor's
parameters per rank (4 of 8 experts of F=1024 against one SwiGLU of 2F). 1.2x AutoEP means a step
of 1226 / 1.2 = 1022 ms: the floor's forward and backward alone take 978, which leaves 44 ms for an
optimizer step that takes 99 even on the floor's half as many parameters. Out of reach at this shape
on these ranks, whatever the MoE layer does. The default AdamW ran 94 ms of Blues' 210 (sqrt, div,
mul, addcdiv, lerp: one memory pass each); blues.train.engine.adamw is fused since (one pass; 22 vs
141 ms on the same 12.6M parameters).
The copies (aten::copy_ 117 ms a step against the floor's 34) follow the same count: ZeRO 2 copies each
gradient into this rank's fp32 partition and the updated partition back into the parameters, and a rank
of EP=2 on 2 ranks owns all of its 4 experts (expert-data-parallel group of 1: 12.6M) plus half of the
rest (1.7M), 14.3M in all, against the floor's 4.9M (9.7M / 2): 2.9x the elements, 3.4x the copy time.
AutoEP's copies are the same (119 ms). Spreading them needs expert data parallelism (ep_size < ranks).

NOTE (tiny shape with the fused AdamW, 5 alternating rounds, 2026-11-28 12:32, load 0.1 -> 2.2, nothing
else running; results/ep_throughput_tiny_fused_adamw.json): Blues EP=2 / AutoEP EP=2 0.98x balanced
(paired 1.03x), 1.04x Zipf, where the row above read 1.09x / 1.09x. Blues EP=2's rounds were bimodal
(11.0-11.3k tokens/s in three, 12.6-12.8k in two); under the profiler its step took 155 ms against
AutoEP's 208 (AutoEP's log-softmax page-faulting again: 27 ms). The two alone, 8 rounds (`--impls
blues_ep2 autoep_ep2 --rounds 8`, 13:18, load 0.8 -> 2.4; results/ep_throughput_tiny_pair.json): 1.04x
balanced (paired 1.01x), 1.06x Zipf. A quiet run of all six, 10 rounds (14:09, load 0.2 -> 2.1;
results/ep_throughput_tiny_10rounds.json): 1.09x balanced (paired 1.09x), 1.10x Zipf (paired 1.10x), Blues
EP=2's rounds not bimodal (12.4-13.8k). Over the four runs since the fused loss: 0.98-1.09x balanced,
1.04-1.10x Zipf as medians of rounds; the 1.1x target at this shape sits at the edge of these ranks' noise.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import machine  # noqa: E402
from moe_layer import cpu_pressure, environment, routing_logits  # noqa: E402

# name: model widths and micro-batch (the rest from the tiny preset), default timed steps per round
SHAPES = {
    "tiny": dict(n_embd=128, n_head=4, num_kv_heads=1, expert_ffn_size=256, num_experts=8, top_k=2, steps=30,
                 micro_batch_size=8),
    "wide": dict(n_embd=512, n_head=8, num_kv_heads=2, expert_ffn_size=1024, num_experts=8, top_k=2, steps=10,
                 micro_batch_size=8),
    "e64": dict(n_embd=512, n_head=8, num_kv_heads=2, expert_ffn_size=256, num_experts=64, top_k=8, steps=10,
                micro_batch_size=8),
    # --smoke: a script check, not a measurement
    "smoke": dict(n_embd=32, n_head=2, num_kv_heads=1, expert_ffn_size=32, num_experts=4, top_k=2, steps=2,
                  n_layer=1, block_size=32, micro_batch_size=2),
}
ALL_IMPLS = ["blues_ep2", "blues_ep1", "ds_ep2", "autoep_ep2", "autoep_ep1", "dense_floor"]
ZIPF_S = 1.2
# (numerator, denominator, routing or None for both, target) as the issue states them
TARGETS = [("blues_ep2", "ds_ep2", "balanced", 1.5), ("blues_ep2", "ds_ep2", "zipf", 3.0),
           ("blues_ep2", "blues_ep1", None, 0.95), ("blues_ep2", "autoep_ep2", None, None),
           ("autoep_ep2", "autoep_ep1", None, None), ("dense_floor", "ds_ep2", None, None),
           ("blues_ep2", "dense_floor", None, None)]
AUTOEP_TARGET = {"tiny": 1.1, "wide": 1.2, "e64": 1.2}


# ----------------------------------------------------------------------------------------------
# Forced routing: one draw per (routing, rank), read by every implementation's forcing
# ----------------------------------------------------------------------------------------------

class Draw:
    """The target experts (N, K) of this rank's tokens for the routing being measured."""
    targets: Optional[torch.Tensor] = None

    @classmethod
    def set(cls, routing: str, N: int, E: int, K: int, rank: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(rank)
        cls.targets = torch.topk(routing_logits(N, E, routing, ZIPF_S, gen), K, dim=-1).indices  # (N, K)
        return cls.targets


def drawn_targets(num_tokens, num_experts, top_k, *_capacity_skew_ep):
    """Stands in for blues.moe.routing.forced_targets (same leading arguments; capacity, skew and
    ep_size do not matter here): (forced (N,) all True, the drawn targets (N, K))."""
    t = Draw.targets
    assert t is not None and t.shape == (num_tokens, top_k) and int(t.max()) < num_experts, \
        f"drawn targets {None if t is None else tuple(t.shape)} do not fit N={num_tokens} K={top_k}"
    return torch.ones(num_tokens, dtype=torch.bool), t


@contextlib.contextmanager
def blues_forcing():
    """Every Blues forcing (forced_route, the DeepSpeed adapter) reads the drawn targets in the block."""
    import blues.moe.deepspeed_moe as dsm
    import blues.moe.routing as routing
    saved = routing.forced_targets, dsm.forced_targets
    routing.forced_targets = dsm.forced_targets = drawn_targets
    try:
        yield
    finally:
        routing.forced_targets, dsm.forced_targets = saved


def force_autoep(model) -> int:
    """Forward hooks on every AutoEP router linear: + FORCING_LOGIT on the drawn targets' logits."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    from blues.moe.routing import FORCING_LOGIT

    def hook(module, args, out):  # out (N, E) router logits
        t = Draw.targets
        assert t is not None and t.shape[0] == out.shape[0], "drawn targets do not fit the router's tokens"
        return out + torch.zeros_like(out).scatter_(1, t.to(out.device), FORCING_LOGIT)

    layers = [m for m in model.modules() if isinstance(m, AutoEPMoELayer)]
    for m in layers:
        m.router.gate.register_forward_hook(hook)
    return len(layers)


# ----------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------

@dataclass
class Bench:
    name: str
    engine: object
    model: object
    step: Callable[[int], None]  # n optimizer steps
    tokens_per_step: int
    params: int
    info: dict = field(default_factory=dict)


def blues_config(shape: str, impl: str, out_dir: str):
    from blues.presets import get_preset
    s = {k: v for k, v in SHAPES[shape].items() if k != "steps"}
    backend, ep = {"blues_ep2": ("torch", 2), "blues_ep1": ("torch", 1), "ds_ep2": ("deepspeed", 2),
                   "autoep_ep2": ("torch", 2), "autoep_ep1": ("torch", 1), "dense_floor": ("torch", 1)}[impl]
    if impl == "dense_floor":  # every layer dense, with the experts' active hidden size
        s.update(num_dense_layers=s.get("n_layer", get_preset("tiny").model.n_layer),
                 dense_ffn_size=s["top_k"] * s["expert_ffn_size"])
    # No selection bias (DeepSpeed's gate has none; the routing is forced anyway) and no routed scale: the same
    # model on every engine, whatever the tiny preset's tuning. Every Blues model takes its loss through the fused,
    # chunked linear + cross-entropy (fused_loss; the 2026-11-28 row was measured so).
    return get_preset("tiny").replace(**s, moe_backend=backend, ep_size=ep, router_noise_std=0.0,
                                      capacity_factor=None, warmup_steps=0, max_steps=10 ** 6, out_dir=out_dir,
                                      balance_bias_rate=0.0, routed_scaling_factor=1.0, fused_loss=True)


def fixed_batch(cfg, rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]  # (B, T) each


def build_blues(impl: str, shape: str, dist, root: str) -> Bench:
    from blues import train as T
    from blues.moe.routing import moe_layers
    cfg = blues_config(shape, impl, os.path.join(root, impl))
    run = T.build_engine(cfg, with_data=False, dist=dist)
    for layer in moe_layers(run.model):
        layer.set_forced_routing(1.0)
    batch = fixed_batch(cfg, dist.rank)
    return Bench(impl, run.engine, run.model, lambda n: T.train_steps(run, n, lambda: batch), run.tokens_per_step,
                 sum(p.numel() for p in run.model.parameters()), {"moe_backend": cfg.moe.moe_backend,
                                                                  "ep_size": cfg.train.ep_size})


def mixtral(cfg):
    """A randomly initialised HF MixtralForCausalLM with the Blues config's shape (no download)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    m, e = cfg.model, cfg.moe
    hf = MixtralConfig(vocab_size=m.vocab_size, hidden_size=m.n_embd, intermediate_size=e.expert_ffn_size,
                       num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.num_kv_heads,
                       head_dim=m.head_dim, max_position_embeddings=m.block_size, rms_norm_eps=m.norm_eps,
                       tie_word_embeddings=m.tie_embeddings, num_local_experts=e.num_experts,
                       num_experts_per_tok=e.top_k, output_router_logits=False, router_jitter_noise=0.0,
                       initializer_range=m.init_std, attention_dropout=0.0, use_cache=False,
                       rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta})
    hf._attn_implementation = "sdpa"
    torch.manual_seed(cfg.train.seed)
    return MixtralForCausalLM(hf)


def build_autoep(impl: str, shape: str, dist, root: str) -> Bench:
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from blues.train.distributed import all_reduce
    from blues.train.ds_config import BUILTIN_DS_CONFIG, resolve_ds_config
    from blues.train.engine import adamw
    cfg = blues_config(shape, impl, os.path.join(root, impl))
    ep = cfg.train.ep_size
    ds = resolve_ds_config(BUILTIN_DS_CONFIG, cfg, dist.world_size, monitor_dir=os.path.join(root, impl, "monitor"))
    ds["expert_parallel"] = {"enabled": True, "autoep_size": ep, "preset_model": "mixtral"}
    t = cfg.train

    def optimizer(params):
        # AdamW as blues.train.build_optimizer makes it (decay on matrices only), with DeepSpeed's MoE
        # groups split from the parameters AutoEP put in place inside deepspeed.initialize.
        params = [p for p in params if p.requires_grad]
        groups = [{"name": "decay", "params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                  {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        groups = split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])
        return adamw(groups, t)

    engine, _, _, _ = deepspeed.initialize(model=mixtral(cfg), optimizer=optimizer, config=ds)
    n_layers = force_autoep(engine.module)
    assert n_layers == cfg.model.n_layer, f"AutoEP replaced {n_layers} of {cfg.model.n_layer} MoE blocks"
    x, _ = fixed_batch(cfg, dist.rank)

    def steps(n: int) -> None:
        engine.train()
        for _ in range(n):
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            all_reduce(loss.detach().reshape(1).clone()).item()  # the loss a training loop reports

    tokens = t.micro_batch_size * t.grad_accum * dist.world_size * cfg.model.block_size
    return Bench(impl, engine, engine.module, steps, tokens, sum(p.numel() for p in engine.module.parameters()),
                 {"autoep_size": ep, "transformers": __import__("transformers").__version__})


def build(impl: str, shape: str, dist, root: str) -> Bench:
    return (build_autoep if impl.startswith("autoep") else build_blues)(impl, shape, dist, root)


# ----------------------------------------------------------------------------------------------
# Load of the shared machine
# ----------------------------------------------------------------------------------------------

def busiest_processes(n: int = 6) -> list[str]:
    """The n processes using the most CPU now (ps), as 'pcpu command': who else is running."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [" ".join(line.split()) for line in out.splitlines()[:n]]


def pause_while(path: Optional[str]) -> None:
    """Wait while `path` exists (every rank checks; the barrier after it lines them up again)."""
    while path and os.path.exists(path):
        time.sleep(10)


def load() -> dict:
    return {"loadavg_1m": os.getloadavg()[0], "cpu_pressure_avg10_pct": cpu_pressure(),
            "busiest_processes": busiest_processes()}


# ----------------------------------------------------------------------------------------------
# Profile: where the time of one step goes
# ----------------------------------------------------------------------------------------------

# Categories of an op's self time, first match wins. Where the third field is True the pattern is
# matched against the names of the ops it runs inside too (so the Python of an autograd Function that
# wraps an all-to-all, and every op below it, count as the exchange; a copy inside the cross-entropy's
# backward counts as the loss); the autograd engine's own wrappers count by their own name only.
CATEGORIES = [
    ("exchange (all-to-all)", r"all_to_all|alltoall|AllToAll", True),
    ("other collectives", r"^c10d::|^gloo|allreduce|all_reduce|reduce_scatter|allgather|all_gather|broadcast"
                          r"|barrier|record_param_comms", True),
    ("GEMMs", r"^aten::(mm|bmm|addmm_?|baddbmm|addbmm|_grouped_mm|matmul|linear|addmv|mv)$", True),
    ("attention", r"scaled_dot_product|flash_attention|ScaledDotProduct", True),
    # blues.loss's fused linear + cross-entropy: its forward range and its backward node (its GEMMs stay GEMMs)
    ("loss (log-softmax, NLL)", r"cross_entropy|log_softmax|nll_loss|LogSoftmax|NllLoss|^blues\.loss:"
                                r"|FusedLinearCrossEntropy", True),
    ("permutation", r"^aten::(index|index_select|index_add_?|index_put_?|_index_put_impl_|gather|scatter_?"
                    r"|scatter_add_?|scatter_reduce|sort|argsort|repeat_interleave|cumsum|bincount|take|nonzero"
                    r"|masked_select|masked_scatter|_unsafe_index|_unsafe_index_put|searchsorted)$"
                    r"|^autograd::engine::evaluate_function: (Index|IndexSelect|Gather|Scatter|Sort)", True),
    ("optimizer (AdamW, grad copies)", r"^Optimizer\.|_foreach_|AccumulateGrad", True),
    ("autograd engine", r"^autograd::", False),
]
PHASES = ("forward", "backward", "optimizer step")
# torch.profiler ranges of blues.moe.expert_parallel's stages (forward only; reported inclusive, per step)
STAGE_PREFIX = "blues.moe:"


def profile_steps(bench: Bench, batch, n: int) -> dict:
    """n steps of forward / backward / step under torch.profiler on every rank: this rank's seconds per
    step by phase and category. A collective's time includes its wait for the slower rank."""
    from torch.profiler import ProfilerActivity, profile, record_function
    engine = bench.engine
    x, y = batch
    hf = bench.name.startswith("autoep")

    def one():
        with record_function("ep_bench:forward"):
            out = engine(input_ids=x, labels=x) if hf else engine(x, y)
        with record_function("ep_bench:backward"):
            engine.backward(out.loss)
        with record_function("ep_bench:optimizer step"):
            engine.step()

    engine.train()
    one()  # warm
    torch.distributed.barrier()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            one()
        wall = time.perf_counter() - t0  # inside: the profiler's own processing at exit is not a step
    torch.distributed.barrier()
    events = prof.events()
    ranges = {e.name.split(":", 1)[1]: [] for e in events if e.name.startswith("ep_bench:")}
    for e in events:
        if e.name.startswith("ep_bench:"):
            ranges[e.name.split(":", 1)[1]].append((e.time_range.start, e.time_range.end))
    pats = [(c, re.compile(p), up) for c, p, up in CATEGORIES]
    out = {ph: {"total": 0.0} for ph in PHASES}
    top: dict[str, float] = {}
    stages: dict[str, float] = {}  # Blues EP stage -> seconds per step, inclusive, both layers
    for e in events:
        start = e.time_range.start
        phase = next((ph for ph, rs in ranges.items() if any(a <= start <= b for a, b in rs)), None)
        if phase is None:
            continue
        sec = e.self_cpu_time_total / 1e6 / n
        if e.name.startswith(STAGE_PREFIX):  # a stage range of Blues' EP layer: its own time is Python's
            stages[e.name[len(STAGE_PREFIX):]] = stages.get(e.name[len(STAGE_PREFIX):], 0.0) + \
                (e.time_range.end - e.time_range.start) / 1e6 / n
            cat = "python (outside every op)"
        elif e.name.startswith("ep_bench:"):
            cat = "python (outside every op)"
            out[phase]["total"] += (e.time_range.end - e.time_range.start) / 1e6 / n
        else:
            names, q = [e.name], e.cpu_parent
            while q is not None and not q.name.startswith("ep_bench:"):
                names.append(q.name)
                q = q.cpu_parent
            cat = next((c for c, p, up in pats if any(p.search(x) for x in (names if up else names[:1]))),
                       "other tensor ops")
            top[e.name] = top.get(e.name, 0.0) + sec
        out[phase][cat] = out[phase].get(cat, 0.0) + sec
    return {"steps": n, "wall_s_per_step": wall / n, "phases": out,
            "top_ops_s_per_step": dict(sorted(top.items(), key=lambda kv: -kv[1])[:15]),
            "ep_stages_forward_s_per_step": stages}


def print_profile(name: str, rank: int, p: dict) -> None:
    print(f"  profile {name}, rank {rank}: {p['wall_s_per_step'] * 1e3:.1f} ms/step (under the profiler)")
    cats = sorted({c for ph in p["phases"].values() for c in ph if c != "total"})
    tot = {c: sum(ph.get(c, 0.0) for ph in p["phases"].values()) for c in cats}
    step = sum(ph["total"] for ph in p["phases"].values())
    print(f"    {'category':28s} " + " ".join(f"{ph:>14s}" for ph in PHASES) + f" {'all ms':>8s} {'share':>6s}")
    for c in sorted(cats, key=lambda c: -tot[c]):
        print(f"    {c:28s} " + " ".join(f"{p['phases'][ph].get(c, 0.0) * 1e3:14.2f}" for ph in PHASES)
              + f" {tot[c] * 1e3:8.2f} {100 * tot[c] / step:5.1f}%")
    print(f"    {'total':28s} " + " ".join(f"{p['phases'][ph]['total'] * 1e3:14.2f}" for ph in PHASES)
          + f" {step * 1e3:8.2f}")
    if p.get("ep_stages_forward_s_per_step"):
        print("    Blues EP stages, forward ms (inclusive): " + ", ".join(
            f"{k} {v * 1e3:.2f}" for k, v in p["ep_stages_forward_s_per_step"].items()))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def ratios(tps: dict, routing: str, shape: str) -> list[dict]:
    out = []
    for a, b, only, target in TARGETS:
        if (only and only != routing) or a not in tps or b not in tps:
            continue
        if target is None and (a, b) == ("blues_ep2", "autoep_ep2"):
            target = AUTOEP_TARGET.get(shape)
        med = statistics.median(tps[a]) / statistics.median(tps[b])
        paired = statistics.median(x / y for x, y in zip(tps[a], tps[b]))
        out.append({"ratio": f"{a} / {b}", "median": round(med, 3), "paired": round(paired, 3), "target": target,
                    "met": None if target is None else bool(med >= target)})
    return out


def run_shape(shape: str, args, dist, root: str) -> dict:
    rank = dist.rank
    steps = args.steps or SHAPES[shape]["steps"]
    benches, unavailable = [], {}
    for impl in args.impls:
        if rank == 0:
            print(f"[{shape}] building {impl}", flush=True)
        t0 = time.perf_counter()
        try:
            benches.append(build(impl, shape, dist, root))
            if rank == 0:
                print(f"[{shape}] built {impl} in {time.perf_counter() - t0:.1f} s", flush=True)
        except (ValueError, ImportError, NotImplementedError) as e:
            # every rank fails alike on a config refusal or a missing package: no collective is left waiting
            unavailable[impl] = f"{type(e).__name__}: {e}"
            if rank == 0:
                print(f"[{shape}] {impl} unavailable: {unavailable[impl]}", flush=True)
    cfg = blues_config(shape, "blues_ep1", root)
    N, E, K = cfg.train.micro_batch_size * cfg.model.block_size, cfg.moe.num_experts, cfg.moe.top_k
    res = {"shape": dict(SHAPES[shape], steps=steps, n_layer=cfg.model.n_layer, block_size=cfg.model.block_size,
                         micro_batch_size=cfg.train.micro_batch_size, vocab_size=cfg.model.vocab_size),
           "params": {b.name: b.params for b in benches}, "impl_info": {b.name: b.info for b in benches},
           "unavailable": unavailable, "routings": {}}
    with blues_forcing():
        for routing in args.routing:
            targets = Draw.set(routing, N, E, K, rank)
            counts = torch.bincount(targets.reshape(-1), minlength=E).double()
            torch.distributed.all_reduce(counts)  # (E,) over the ranks
            per_ep_rank = counts.view(2, E // 2).sum(1) / counts.sum() if E % 2 == 0 else None
            before = load()
            for b in benches:
                b.step(args.warmup)
            tps = {b.name: [] for b in benches}
            for _ in range(args.rounds):
                for b in benches:
                    pause_while(args.pause_while)
                    torch.distributed.barrier()
                    t0 = time.perf_counter()
                    b.step(steps)
                    torch.distributed.barrier()
                    tps[b.name].append(steps * b.tokens_per_step / (time.perf_counter() - t0))
            r = {"busiest_expert_over_mean": round((counts.max() / counts.mean()).item(), 3),
                 "share_of_assignments_on_ep_rank": None if per_ep_rank is None else
                 [round(v, 3) for v in per_ep_rank.tolist()],
                 "load_before": before, "load_after": load(),
                 "tokens_per_s": {n: {"rounds": [round(v, 1) for v in xs], "median": round(statistics.median(xs), 1),
                                      "best": round(max(xs), 1)} for n, xs in tps.items()},
                 "ratios": ratios(tps, routing, shape)}
            res["routings"][routing] = r
            if rank == 0:
                print_routing(shape, routing, r)
        if shape in (args.profile or []):
            res["profile"] = {}
            Draw.set("balanced", N, E, K, rank)
            for b in benches:
                if b.name in ("blues_ep2", "ds_ep2", "autoep_ep2", "dense_floor"):
                    pause_while(args.pause_while)
                    p = [None] * dist.world_size
                    torch.distributed.all_gather_object(p, profile_steps(b, fixed_batch(cfg, rank),
                                                                         args.profile_steps))
                    res["profile"][b.name] = p  # one per rank
                    if rank == 0:
                        for r, pr in enumerate(p):
                            print_profile(b.name, r, pr)
    for b in benches:
        getattr(b.engine, "destroy", lambda: None)()
    benches.clear()
    gc.collect()
    return res


def print_routing(shape: str, routing: str, r: dict) -> None:
    print(f"\n== {shape} {routing}: busiest expert {r['busiest_expert_over_mean']}x the mean; assignments per "
          f"EP rank {r['share_of_assignments_on_ep_rank']}; load average {r['load_before']['loadavg_1m']:.2f} -> "
          f"{r['load_after']['loadavg_1m']:.2f}, CPU pressure {r['load_before']['cpu_pressure_avg10_pct']} -> "
          f"{r['load_after']['cpu_pressure_avg10_pct']} %")
    print(f"  {'impl':12s} {'median tok/s':>13s} {'best tok/s':>11s}   rounds")
    for n, v in r["tokens_per_s"].items():
        print(f"  {n:12s} {v['median']:13,.0f} {v['best']:11,.0f}   {', '.join(f'{x:,.0f}' for x in v['rounds'])}")
    for q in r["ratios"]:
        tgt = "" if q["target"] is None else f"  target >= {q['target']}: {'met' if q['met'] else 'NOT met'}"
        print(f"  {q['ratio']:26s} {q['median']:.2f}x (paired {q['paired']:.2f}x){tgt}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES))
    p.add_argument("--routing", nargs="+", default=["balanced", "zipf"], choices=["balanced", "zipf"])
    p.add_argument("--impls", nargs="+", default=ALL_IMPLS, choices=ALL_IMPLS)
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default: per shape)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", nargs="*", default=None, choices=list(SHAPES), help="shapes to profile")
    p.add_argument("--profile_steps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="the smoke shape, 1 round of 2 steps (a script check)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ep_throughput.json; "
                                               "--smoke: a temporary file)")
    p.add_argument("--pause_while", default=None, metavar="PATH",
                   help="before each timed segment, wait while PATH exists (a shared machine's quiet-please lock)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.rounds, args.warmup = ["smoke"], 1, 1
        args.profile = args.profile if args.profile is not None else []
    args.shapes = args.shapes or ["tiny", "wide", "e64"]
    args.profile = args.profile or []

    from blues import train as T
    dist = T.init_distributed()
    if dist.world_size != 2:
        print(f"ep_throughput: error: needs 2 ranks (deepspeed --num_gpus 2 ...), got {dist.world_size}",
              file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="blues_ep_bench_")
    if dist.rank == 0:
        print(f"{machine()}; fp32, ZeRO 2, 2 ranks x {torch.get_num_threads()} thread(s); {args.rounds} rounds; "
              f"env {environment()}", flush=True)
    row = {"benchmark": "ep_throughput", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine(), "device": f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})",
           "torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__, "world_size": 2,
           "threads_per_rank": torch.get_num_threads(), "dtype": "fp32", "zero_stage": 2, "rounds": args.rounds,
           "warmup_steps": args.warmup, "zipf_s": ZIPF_S, "smoke": args.smoke, "command": " ".join(sys.argv),
           "load_start": load(), "shapes": {}}
    t_start = time.perf_counter()
    for shape in args.shapes:
        row["shapes"][shape] = run_shape(shape, args, dist, root)
    row["load_end"] = load()
    row["wall_s"] = round(time.perf_counter() - t_start, 1)
    if dist.rank == 0:
        out = args.out or (os.path.join(root, "ep_throughput.json") if args.smoke
                           else os.path.join(HERE, "results", "ep_throughput.json"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(row, f, indent=1)
        print(f"\nwrote {out} ({row['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from blues.train import exit_process
    exit_process(main())  # a rank's end: no interpreter teardown (blues.train.distributed says why)
