"""Export: a Blues model as a Hugging Face folder (Mixtral, or Qwen3-MoE where Mixtral cannot
express the model) that transformers loads with no custom code."""
from __future__ import annotations

import logging
import os
import shutil
from typing import Callable, Optional, Union

import torch

from blues.common import atomic_write, atomic_write_json, fsync_dir, parse_bytes
from blues.hf.families import HF_CONFIG_NAME, QWEN2_MOE, Family, config_to_hf, export_family, tensor_map
from blues.hf.load import HF_INDEX_NAME, HF_WEIGHTS_NAME, resolve_dtype
from blues.model import Blues

log = logging.getLogger(__name__)


def _export_tensors(model: Blues, family: Family,
                    dtype: torch.dtype) -> list[tuple[str, Callable[[], torch.Tensor], int]]:
    """(HF name, a function giving the tensor, its size in bytes) for every tensor save_hf writes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    # routed_scaling_factor s (the families have none): s * w * down(h) = w * (s * down)(h), folded into w_down.
    scale = model.config.moe.routed_scaling_factor
    # An ungated shared expert in Qwen2-MoE's gated layout: a zero gate gives it sigmoid(0) = 1/2, so its
    # down projection is doubled (exact in binary floating point).
    ungated_qwen2 = family is QWEN2_MOE and not model.config.moe.shared_expert_gate
    out = []
    for t in tensor_map(model, family):
        p = params[t.blues_name] if t.expert is None else params[t.blues_name][t.expert]
        s = scale if t.blues_name.endswith("experts.w_down") else 1.0
        if ungated_qwen2 and t.blues_name.endswith("mlp.shared.w_down.weight"):
            s = 2.0

        def make(p=p, t=t, s=s):
            x = p.detach().T if t.transpose else p.detach()
            x = x.to("cpu", torch.float32) * s if s != 1.0 else x
            return x.to("cpu", dtype).contiguous()

        n = 1
        for s in t.hf_shape:
            n *= s
        out.append((t.hf_name, make, n * torch.finfo(dtype).bits // 8))
    if ungated_qwen2:
        D = model.config.model.n_embd
        for i in model.config.moe_layer_ids():
            out.append((f"model.layers.{i}.mlp.shared_expert_gate.weight",
                        lambda: torch.zeros(1, D, dtype=dtype), D * torch.finfo(dtype).bits // 8))
    return out


def _shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each under max_bytes (a bigger tensor gets its own)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(sizes):
        if groups[-1] and total + n > max_bytes:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def save_hf(model: Blues, out_dir: str, dtype: Union[torch.dtype, str, None] = None,
            max_shard_size: Union[int, str] = "5GB", family: Optional[Family] = None) -> None:
    """Write `model` as a Hugging Face folder that transformers.AutoModelForCausalLM.from_pretrained
    loads with no custom code: config.json, and model.safetensors or shards under max_shard_size
    with model.safetensors.index.json, in `dtype` (default: the model's). `family` (default
    export_family's choice): Mixtral where it expresses the model, else Qwen3-MoE (QK-norm,
    attention biases, dense layers, top-k weights not renormalised).

    Refuses (ValueError naming the field) what the family cannot express (shared experts, a sigmoid
    router, a selection bias; see blues.hf.families), experts split over EP ranks or held by
    DeepSpeed's layer. capacity_factor is accepted: transformers drops no token, so outputs
    agree wherever Blues drops none either (Blues applies its capacity in evaluation too).
    The folder appears whole or not at all (written beside it, then renamed); an existing
    non-empty out_dir is refused. The model's tokenizer is written when it is a Hugging Face one
    (tokenizer.json and tokenizer_config.json, as it was imported); Blues' own tiktoken tokenizer has no
    Hugging Face form here and is left out, with one log line."""
    config = model.config
    if config.train.ep_size != 1:
        raise ValueError(f"ep_size={config.train.ep_size} cannot be exported: this model holds 1/{config.train.ep_size}"
                         " of the experts; load the saved folder with Blues.from_pretrained and export that")
    if config.moe.moe_backend == "deepspeed":
        raise ValueError("moe_backend='deepspeed' cannot be exported: load the saved folder with "
                         "Blues.from_pretrained (it loads DeepSpeed's experts in the stacked layout) and export that")
    dtype = resolve_dtype(dtype) if dtype is not None else model.tok_emb.weight.dtype
    family = family or export_family(config)
    hf_config = config_to_hf(config, dtype, family)
    max_bytes = parse_bytes(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir!r} exists and is not an empty folder: choose a new output folder")
    tensors = _export_tensors(model, family, dtype)
    groups = _shards([n for _, _, n in tensors], max_bytes)
    tmp = f"{os.path.abspath(out_dir).rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_weights(tmp, tensors, groups)
        atomic_write_json(os.path.join(tmp, HF_CONFIG_NAME), hf_config, indent=2, sort_keys=True)
        _write_tokenizer(model.tokenizer, tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above): the rename below takes its place
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(out_dir)))


def _write_tokenizer(tokenizer, folder: str) -> None:
    from blues.data.hf_tokenizer import HFTokenizer
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(folder)
    elif tokenizer is not None:
        log.info("tokenizer %r not exported: Blues' tiktoken tokenizer has no Hugging Face tokenizer.json form "
                 "here; the folder holds the weights and config only", tokenizer.name)


def _write_weights(folder: str, tensors: list[tuple[str, Callable[[], torch.Tensor], int]],
                   groups: list[list[int]]) -> None:
    """One safetensors file per group (only that group's tensors in memory at a time), and the
    index when there is more than one."""
    from safetensors.torch import save
    n = len(groups)
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        fname = HF_WEIGHTS_NAME if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        shard = {tensors[i][0]: tensors[i][1]() for i in group}
        atomic_write(os.path.join(folder, fname), save(shard, metadata={"format": "pt"}))
        weight_map.update({name: fname for name in shard})
        del shard
    if n > 1:
        total = sum(size for _, _, size in tensors)
        atomic_write_json(os.path.join(folder, HF_INDEX_NAME),
                          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                          indent=2)
