"""Dead-expert revival: re-initialise an expert that no token chose for N consecutive optimizer steps.

Shapes: L MoE layers, E experts, E_loc = E / ep_size experts held by one EP rank, D width, F expert
hidden size.

With MoEConfig.revive_dead_experts_after = N > 0, after each applied optimizer step (a step skipped
for a non-finite loss or a loss-scale overflow counts nothing and resets nothing), with c[l, e] the
assignments layer l's router chose expert e for during the step, before any capacity drop, summed over
the step's micro-batches and every data- and expert-parallel rank (train_step's one all-reduce, the
counts balance.py uses):

    dead[l, e] = dead[l, e] + 1  if c[l, e] == 0  else 0

and every expert with dead[l, e] == N is revived, its counter set back to 0 (so one dead stretch
revives it exactly once). The donor is the layer's most loaded expert in that step (argmax_e c[l, e],
the lowest index on a tie). The revived expert g of donor d gets:
  - w_gate[g], w_up[g], w_down[g] = the donor's + noise, router.weight[g] = the donor's + noise, the
    noise uniform in [-a, a], a = REVIVAL_NOISE * rms of the donor's row of that tensor, drawn from a
    generator seeded by (seed, step, layer, expert, tensor): every rank draws the same values without a
    broadcast, and a resumed run draws those of the uninterrupted one;
  - selection_bias[g] = selection_bias[d] (with its router row it then competes with the donor on
    equal terms, the noise deciding; a bias that grew while the expert was dead would overshoot);
  - Adam's exp_avg and exp_avg_sq rows of those four tensors set to 0 (Adam's step count is one per
    tensor and goes on: the first update of a revived row is then (1 - beta1) / sqrt(1 - beta2) = 3.2x
    lr at the default betas, sign-like, as for any freshly zeroed Adam state late in training).

Where the weights live: at ZeRO 0 in fp32 the module parameters are the weights the optimizer updates.
At ZeRO 0 in bf16/fp16 DeepSpeed's FP16_UnfusedOptimizer keeps one fp32 copy per parameter (master_copy).
Under ZeRO 1/2 the optimizer updates fp32 master copies kept in flat partitions (a rank holds a slice).
Both copy the masters into the module's parameters after each step, so a revival written only into the
module would be undone by the next step. DeepSpeed's
deepspeed.utils.safe_get/set_full_fp32_param and safe_get/set_full_optimizer_state reach those
partitions (deepspeed/utils/tensor_fragment.py: get gathers the whole tensor with an all-reduce over the
parameter's data-parallel group, the expert-data-parallel one for expert parameters; set writes this
rank's fragment of a whole value); revival writes the module parameter too, for the next forward.
ZeRO 3 is refused (check_revival): its set_full_hp_param writes the fp32 partition but not the
partitioned module parameter the next forward gathers.

Expert parallelism: EP rank r holds experts [r*E_loc, (r+1)*E_loc); the donor's rows travel from their
EP rank to the others of its EP group by a broadcast, and each rank writes the revived experts it holds.
Every rank takes the same decisions from the same all-reduced counts, so they all run the same
collectives in the same order.

State: the (L, E) counters live on each MoE layer (`dead_steps`, an int64 CPU tensor, like balance.py's
bias a per-layer attribute that is not part of the module's state dict). Checkpoints carry them in
client_state["blues"]["dead_steps"] (blues.train.checkpoint), so a resumed run revives at the same step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
import torch.distributed as torch_dist
import torch.nn as nn

if TYPE_CHECKING:
    from blues.moe import MoE
    from blues.train.engine import Run
    from blues.train.step import StepResult

# Half-width of the uniform noise relative to the donor row's rms: enough to break the tie between the
# revived expert and its donor in the router's top-k and to let their gradients differ, small next to
# the weights themselves (1% of a row's scale).
REVIVAL_NOISE = 0.01
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")  # Experts' stacked (E_loc, ...) parameters
ADAM_STATE = ("exp_avg", "exp_avg_sq")


class Revival(NamedTuple):
    """One revived expert: block number (blocks.<layer>.mlp), the expert, its donor, the step."""
    layer: int
    expert: int
    donor: int
    step: int


# ----------------------------------------------------------------------------- the counters (state)

def revival_layers(model: nn.Module) -> list["MoE"]:
    """The stacked MoE layers that revive their experts, in block order (the rows of expert_selected)."""
    from blues.moe import MoE  # here, so that `import blues.train` does not build the op tables
    return [m for m in model.modules() if isinstance(m, MoE) and m.cfg.revive_dead_experts_after > 0]


def get_dead_steps(model: nn.Module) -> Optional[torch.Tensor]:
    """(L, E) int64 CPU copy of every layer's dead-step counters, or None when revival is off."""
    layers = revival_layers(model)
    if not layers:
        return None
    return torch.stack([_dead_steps(m) for m in layers]).clone()


def set_dead_steps(model: nn.Module, dead: torch.Tensor) -> None:
    """Put (L, E) counters (from get_dead_steps or a checkpoint) into the model's layers."""
    layers = revival_layers(model)
    E = layers[0].cfg.num_experts if layers else 0
    if tuple(dead.shape) != (len(layers), E):
        raise ValueError(f"dead-step counters of shape {tuple(dead.shape)} do not fit this model's {len(layers)} "
                         f"reviving MoE layers of {E} experts: the checkpoint belongs to another model layout")
    for m, d in zip(layers, dead):
        m.dead_steps = d.detach().to(device="cpu", dtype=torch.int64).clone()


def restore_dead_steps(model: nn.Module, dead: Optional[torch.Tensor]) -> None:
    """The counters a checkpoint saved, back in the model. A checkpoint without them (revival was off)
    leaves them at zero; a model without revival ignores saved ones (a compatible change)."""
    if dead is not None and revival_layers(model):
        set_dead_steps(model, dead)


def _dead_steps(m: "MoE") -> torch.Tensor:
    if getattr(m, "dead_steps", None) is None:
        m.dead_steps = torch.zeros(m.cfg.num_experts, dtype=torch.int64)
    return m.dead_steps


def next_dead_steps(dead: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """The counter rule: dead (L, E) int64, selected (L, E) counts of one step -> the new (L, E) counters."""
    return torch.where(selected.to(torch.float64) == 0, dead + 1, torch.zeros_like(dead))


def choose_revivals(dead: torch.Tensor, selected: torch.Tensor, after: int) -> list[tuple[int, int, int]]:
    """(row l, expert g, donor d) for every counter that reached `after`, in (l, g) order; the donor is
    row l's most selected expert (the lowest index on a tie). A row where no expert was chosen (no token
    at all) has no donor and revives nothing."""
    out = []
    for l, g in (dead >= after).nonzero().tolist():
        if selected[l].max() > 0:
            out.append((l, g, int(torch.argmax(selected[l].to(torch.float64)))))
    return out


# ----------------------------------------------------------------------------- the hook

def check_revival(run: "Run") -> None:
    """ValueError when revival is on where it cannot work (ZeRO 3); called once before training."""
    if run.cfg.moe.revive_dead_experts_after > 0 and run.stage == 3:
        raise ValueError(f"revive_dead_experts_after={run.cfg.moe.revive_dead_experts_after} needs ZeRO stage 0, 1 "
                         "or 2 (ZeRO 3's partitioned module parameters are not written): use a ZeRO 0-2 DeepSpeed "
                         "config or revive_dead_experts_after=0")


def revive_dead_experts(run: "Run", r: "StepResult") -> list[Revival]:
    """After train_step: count the step's dead experts and revive those dead for N steps (collective:
    every rank calls it after every step). Returns what was revived (the same list on every rank)."""
    after = run.cfg.moe.revive_dead_experts_after
    if after <= 0:
        return []
    layers = revival_layers(run.model)
    if not layers or r.skipped or r.expert_selected is None or not run.engine.was_step_applied():
        return []
    selected = r.expert_selected  # (L, E) float64 sums of whole numbers, the same on every rank
    dead = next_dead_steps(torch.stack([_dead_steps(m) for m in layers]), selected)
    chosen = choose_revivals(dead, selected, after)
    ids = run.cfg.moe_layer_ids()
    done = []
    if chosen:
        link_optimizer_state(run.engine)
    for l in sorted({l for l, _, _ in chosen}):
        pairs = [(g, d) for ll, g, d in chosen if ll == l]
        revive_experts(run, layers[l], ids[l], pairs, r.step)
        for g, d in pairs:
            dead[l, g] = 0
            done.append(Revival(ids[l], g, d, r.step))
    for m, d in zip(layers, dead):
        m.dead_steps = d.clone()
    return done


def revival_events(revived: list[Revival], layer_ids: list[int], step: int) -> list[tuple[str, float, int]]:
    """Monitor events of one step's revivals: per layer that revived any, how many; and the total."""
    if not revived:
        return []
    per = {i: sum(1 for x in revived if x.layer == i) for i in layer_ids}
    return [(f"moe/layer_{i}/revived_experts", float(n), step) for i, n in per.items() if n] + [
        ("moe/revived_experts", float(len(revived)), step)]


def format_revival(x: Revival, after: int) -> str:
    return (f"step {x.step}: revived expert {x.expert} of layer {x.layer} (chosen by no token for {after} steps) "
            f"from expert {x.donor}")


# ----------------------------------------------------------------------------- writing the weights

def revive_experts(run: "Run", layer: "MoE", layer_id: int, pairs: list[tuple[int, int]], step: int) -> None:
    """Revive experts g from donors d, (g, d) in `pairs`, in one MoE layer (collective, see the module
    docstring): expert and router rows, selection bias, Adam state."""
    ex, seed = layer.experts, run.cfg.train.seed
    E_loc = ex.w_gate.shape[0]
    own = [(g, d) for g, d in pairs if ex.first <= g < ex.first + E_loc]  # revived experts this rank holds
    for t, name in enumerate(EXPERT_WEIGHTS):
        p = getattr(ex, name)
        full = _full_fp32(run, p)  # (E_loc, ...) this rank's experts
        donors = {d: _donor_row(full, d, ex.first, layer) for d in sorted({d for _, d in pairs})}
        for g, d in own:
            full[g - ex.first] = donors[d] + _noise(donors[d], seed, step, layer_id, g, t)
        _write_rows(run, p, full, [g - ex.first for g, _ in own])
    w = layer.router.weight  # (E, D), whole on every rank
    full = _full_fp32(run, w)
    for g, d in pairs:
        full[g] = full[d] + _noise(full[d], seed, step, layer_id, g, len(EXPERT_WEIGHTS))
    _write_rows(run, w, full, [g for g, _ in pairs])
    bias = layer.selection_bias.float().clone()  # kept fp32 (balance.py), reassigned as balance.py does
    for g, d in pairs:
        bias[g] = bias[d]
    layer.selection_bias = bias


def link_optimizer_state(engine) -> None:
    """Link every parameter group's fp32 Adam state to its parameters' fragments, which is what
    safe_get/set_full_optimizer_state read and write.

    DeepSpeed 0.19.8's ZeRO 1/2 optimizer steps its parameter groups one at a time and links the state
    once, after the first group's step (stage_1_and_2.py, _optimizer_step -> _lazy_init_hp_params_
    optimizer_state), when the other groups (no_decay, the experts' ep_size_N) have no state yet: their
    parameters are left with no state fragment ("exp_avg_sq not found in optimizer state fragment",
    measured). Linking again once every group has stepped makes the views; it only narrows the existing
    flat state tensors, so it is cheap and changes no value. A private contract (pin DeepSpeed):
    tests/train/test_revival.py reads the state back after a revival under ZeRO 1 and 2."""
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked") and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _full_fp32(run: "Run", p: nn.Parameter) -> torch.Tensor:
    """The fp32 weights the optimizer updates, whole as this rank holds the parameter (a new tensor).
    Collective over p's data-parallel group where DeepSpeed keeps fp32 partitions."""
    if _has_fp32_partitions(p):
        from deepspeed.utils import safe_get_full_fp32_param
        return safe_get_full_fp32_param(p).float().clone()
    return master_copy(run.engine, p).detach().float().clone()


def _has_fp32_partitions(p: nn.Parameter) -> bool:
    """ZeRO 1/2 (and DeepSpeed's BF16_Optimizer, ZeRO 3) keep p's fp32 weights and state in flat partitions."""
    return hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")


def master_copy(engine, p: nn.Parameter) -> torch.Tensor:
    """Without partitions, the tensor the optimizer updates for p: DeepSpeed's fp32 copy under ZeRO 0 in
    bf16/fp16 (FP16_UnfusedOptimizer, the wrapper DeepSpeed 0.19.8 picks for torch's AdamW: fp32_groups[i][j]
    stands for fp16_groups[i][j], and Adam's state is keyed by it), else p itself (ZeRO 0 in fp32)."""
    opt = engine.optimizer
    for low, high in zip(getattr(opt, "fp16_groups", ()), getattr(opt, "fp32_groups", ())):
        for a, b in zip(low, high):
            if a is p:
                return b
    return p


def _donor_row(full: torch.Tensor, d: int, first: int, layer: "MoE") -> torch.Tensor:
    """Expert d's row of a stacked expert tensor on every rank: read where it is held, broadcast over the
    EP group under expert parallelism."""
    E_loc = full.shape[0]
    if layer.ep is None:
        return full[d].clone()
    owner = d // E_loc
    row = full[d - first].clone() if owner == layer.ep.ep_rank else torch.empty_like(full[0])
    torch_dist.broadcast(row, src=torch_dist.get_global_rank(layer.ep.ep_group, owner), group=layer.ep.ep_group)
    return row


def _noise(row: torch.Tensor, seed: int, step: int, layer_id: int, expert: int, tensor: int) -> torch.Tensor:
    """Uniform noise in [-a, a], a = REVIVAL_NOISE * rms(row), from a stream fixed by its arguments alone."""
    g = torch.Generator().manual_seed(_noise_seed(seed, step, layer_id, expert, tensor))
    u = torch.rand(row.shape, generator=g, dtype=torch.float32)
    a = REVIVAL_NOISE * row.float().pow(2).mean().sqrt()
    return ((2 * u - 1) * a).to(row.device)


def _noise_seed(*parts: int) -> int:
    s = 0x9E3779B97F4A7C15
    for x in parts:
        s = (s * 1_000_003 + int(x) + 1) % (1 << 63)
    return s


def _write_rows(run: "Run", p: nn.Parameter, full: torch.Tensor, rows: list[int]) -> None:
    """Write `full` (p's whole fp32 value as this rank holds it) where the optimizer keeps p's weights
    and into the module parameter, and zero Adam's state in `rows` (collective like _full_fp32)."""
    from deepspeed.utils import safe_get_full_optimizer_state as get_state
    from deepspeed.utils import safe_set_full_fp32_param
    from deepspeed.utils import safe_set_full_optimizer_state as set_state
    partitioned = _has_fp32_partitions(p)
    master = None if partitioned else master_copy(run.engine, p)
    with torch.no_grad():
        if partitioned:
            safe_set_full_fp32_param(p, full)
        elif master is not p:
            master.copy_(full.to(device=master.device, dtype=master.dtype))
        p.data.copy_(full.to(device=p.device, dtype=p.dtype))
    for key in ADAM_STATE:
        if partitioned:
            s = get_state(p, key)
            s[rows] = 0
            set_state(p, s, key)
        else:
            opt = run.engine.optimizer
            s = getattr(opt, "optimizer", opt).state.get(master, {}).get(key)
            if s is not None:
                s[rows] = 0
