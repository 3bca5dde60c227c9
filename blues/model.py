"""The Blues model: a decoder-only MoE transformer.

Shapes: B batch, T tokens, D = n_embd, V vocabulary, E experts, L_moe MoE layers, M images.

tok_emb -> n_layer x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> lm_head
where attn is grouped-query attention with RoPE (heads of head_dim, optionally QK-normed and
with biases) and mlp is an MoE layer, or a dense SwiGLU where MoEConfig.is_moe_layer says so.
With vision_enabled, a vision tower (blues.vision.encoder) puts image tokens at the <|image|>
placeholders of tok_emb's output and adds a modality embedding; they go through the same blocks.
With contrastive_steps or contrastive_weight, contrastive heads (blues.vision.contrastive) align
pooled image and caption embeddings; forward(..., contrastive="only" | "add") computes that loss.
"""
from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from blues.attention import Attention, KVCache, RMSNorm, RotaryEmbedding
from blues.common import atomic_write, atomic_write_json
from blues.config import BluesConfig
from blues.loss import LMHead
from blues.moe import Experts, MoE, SwiGLU
from blues.moe.expert_parallel import checkpoint_contexts
from blues.vision.contrastive import MODES as CONTRASTIVE_MODES
from blues.vision.contrastive import ContrastiveHeads, ContrastiveOutput, caption_rows, has_contrastive

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def build_mlp(config: BluesConfig, layer_idx: int) -> nn.Module:
    """The feed-forward part of block `layer_idx`: an MoE layer (stacked, or DeepSpeed's with
    moe_backend=deepspeed), or a dense SwiGLU where the MoE pattern says so."""
    if not config.moe.is_moe_layer(layer_idx):
        return SwiGLU(config.model.n_embd, config.moe.dense_hidden, config.model.dropout)
    if config.moe.moe_backend == "deepspeed":
        from blues.moe.deepspeed_moe import DeepSpeedMoE
        return DeepSpeedMoE(config)
    return MoE(config)


def keep_shapes(config: BluesConfig, new: BluesConfig) -> BluesConfig:
    """`new`, a saved model's `config` with overrides applied, unless an override changes a weight's
    shape (ValueError naming each such field): the one rule of Blues.from_pretrained, blues.hf.load_hf
    and blues-train --init_from."""
    changed = config.architecture_diff(new)
    if changed:
        raise ValueError(f"overrides change the weights' shapes: {'; '.join(changed)}")
    return new


class BluesOutput(NamedTuple):
    logits: Optional[torch.Tensor]  # (B, T, V); None with fused_loss and targets, and with contrastive="only"
    loss: Optional[torch.Tensor]  # ce_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss (+ contrastive)
    ce_loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor  # unweighted, mean over MoE layers
    z_loss: torch.Tensor  # unweighted, mean over MoE layers
    expert_counts: Optional[torch.Tensor]  # (L_moe, E) long, assignments kept per expert
    dropped: torch.Tensor  # long scalar, assignments dropped by capacity, all layers
    expert_selected: Optional[torch.Tensor]  # (L_moe, E) long, assignments chosen per expert (before capacity)
    contrastive: Optional[ContrastiveOutput] = None  # forward(..., contrastive=...) only: loss, embeddings


class Block(nn.Module):
    def __init__(self, config: BluesConfig, layer_idx: int):
        super().__init__()
        mc = config.model
        self.attn_norm = RMSNorm(mc.n_embd, mc.norm_eps)
        self.attn = Attention(mc, layer_idx)
        self.mlp_norm = RMSNorm(mc.n_embd, mc.norm_eps)
        self.mlp = build_mlp(config, layer_idx)
        self.is_moe = not isinstance(self.mlp, SwiGLU)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache)
        h = self.mlp(self.mlp_norm(x))
        if self.is_moe:
            return (x + h.out, h.aux_loss, h.z_loss, h.counts, h.dropped, h.selected)
        return (x + h,)


class Blues(nn.Module):
    def __init__(self, config: BluesConfig):
        super().__init__()
        self.config = config
        mc = config.model
        self.tok_emb = nn.Embedding(mc.vocab_size, mc.n_embd)
        self.drop = nn.Dropout(mc.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(mc.n_layer)])
        self.norm = RMSNorm(mc.n_embd, mc.norm_eps)
        self.lm_head = LMHead(mc.n_embd, mc.vocab_size, bias=False)  # nn.Linear; lm_head(h, targets): the fused loss
        if mc.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rope = RotaryEmbedding(mc.head_dim, mc.block_size, mc.rope_theta, mc.rope_scaling)
        # Registered last, and only when on: a text-only model's parameters, their init and its
        # state dict are what they were before vision existed.
        self.vision = None
        if config.vision.vision_enabled:
            from blues.vision.tower import VisionTower
            self.vision = VisionTower(config)
        self.contrastive = None  # the same rule: only when contrastive_steps or contrastive_weight is set
        if has_contrastive(config):
            self.contrastive = ContrastiveHeads(config)
        self.gradient_checkpointing = False
        self.tokenizer = None  # set by from_pretrained when the folder holds one
        self.apply(self._init_weights)
        # Residual projections scaled by 1/sqrt(2 * n_layer) (GPT-2): keeps the residual stream's
        # variance independent of depth at init.
        resid_std = mc.init_std / (2 * mc.n_layer) ** 0.5
        for name, p in self.named_parameters():
            if name.endswith("experts.w_down"):  # the whole (E, F, D) draw, whatever ep_size
                self.get_submodule(name.rpartition(".")[0]).normal_("w_down", resid_std)
            elif name.endswith(("attn.wo.weight", "w_down.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.model.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:  # attention_bias
            nn.init.zeros_(module.bias)
        if isinstance(module, Experts):  # stacked expert weights: the whole (E, ...) draw, whatever ep_size
            for name, _ in module.named_parameters(recurse=False):
                module.normal_(name, std)

    # ------------------------------------------------------------------ forward
    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block (the vision encoder's too) in backward instead of keeping its activations."""
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        """Keep activations again (the default)."""
        self._set_gradient_checkpointing(False)

    def _set_gradient_checkpointing(self, on: bool) -> None:
        self.gradient_checkpointing = on
        if self.vision is not None:
            self.vision.encoder.gradient_checkpointing = on

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, images: Optional[torch.Tensor] = None,
                contrastive: Optional[str] = None, return_logits: bool = False) -> BluesOutput:
        """input_ids (B, T); targets (B, T), -1 where no loss is taken; images (M, 3, S, S) in [0, 1],
        one per <|image|> span in row-major order (vision_enabled only).

        contrastive (a model with contrastive heads, blues.vision.contrastive; needs targets and one
        image per row): None, language modelling alone; "only", the InfoNCE loss alone (the contrastive
        stage: no language-model pass, logits None, ce_loss NaN); "add", the language-model loss +
        contrastive_weight * InfoNCE. The MoE balance terms are in the loss in every mode.

        With fused_loss (ModelConfig) and targets, the language-model loss comes from lm_head's fused,
        chunked linear + cross-entropy (blues.loss) and logits is None: the (B, T, V) logits never
        exist (the same loss and gradients within fp32 rounding, tests/test_loss.py; with every target
        -1 its ce_loss is 0 where the unfused one is NaN). return_logits=True computes the logits and
        the loss over them in any case."""
        B, T = input_ids.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.model.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.model.block_size}")
        if contrastive is not None:
            self._check_contrastive(contrastive, targets, images, kv_cache)
        passes: list[list[tuple]] = []  # per decoder pass, per MoE layer: (aux, z, counts, dropped, selected)
        logits = ce = loss = con = None
        # (M, n, D) once: the language-model pass places them, the contrastive pass pools them
        image_tokens = self.vision.image_tokens(images) if contrastive is not None else None
        if contrastive != "only":
            cos, sin = self.rope(start, T)
            x = self.tok_emb(input_ids)  # (B, T, D)
            if self.vision is not None:
                x = self.vision(input_ids, x, images, image_tokens)  # (B, T, D): image tokens at the placeholders
            elif images is not None:
                raise ValueError("images were given to a text-only model (vision_enabled=false): load or train a "
                                 "vision model, or leave images out")
            x = self._decode(self.drop(x), cos, sin, kv_cache, passes)
            if kv_cache is not None:
                kv_cache.advance(T)
            h = self.norm(x)  # (B, T, D)
            if targets is None or return_logits or not self.config.model.fused_loss:
                logits = self.lm_head(h)  # (B, T, V)
            else:
                ce = self.lm_head(h, targets)  # fp32 scalar, fused: no (B, T, V) logits
        if contrastive is not None:
            con = self._contrastive(targets, image_tokens, passes)

        zero = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        layers = [s for p in passes for s in p]
        aux_loss = torch.stack([s[0] for s in layers]).mean() if layers else zero
        z = torch.stack([s[1] for s in layers]).mean() if layers else zero
        # (L_moe, E): summed over the passes (with contrastive, the caption pass routes tokens too)
        expert_counts = sum(torch.stack([s[2] for s in p]) for p in passes) if layers else None
        selected = sum(torch.stack([s[4] for s in p]) for p in passes) if layers else None
        n_dropped = (torch.stack([s[3] for s in layers]).sum() if layers
                     else torch.zeros((), dtype=torch.long, device=input_ids.device))
        if targets is not None:
            mo = self.config.moe
            balance = mo.aux_loss_coef * aux_loss + mo.z_loss_coef * z
            if logits is not None:
                ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            if ce is not None:
                loss = ce + balance
            else:
                ce = zero + float("nan")  # no language-model pass in the contrastive stage
                loss = con.loss + balance
            if contrastive == "add":
                loss = loss + self.config.vision.contrastive_weight * con.loss
        return BluesOutput(logits, loss, ce, aux_loss, z, expert_counts, n_dropped, selected, con)

    def _decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: Optional[KVCache],
                passes: list) -> torch.Tensor:
        """The blocks: x (B, T, D) -> (B, T, D); appends this pass's MoE statistics to `passes`."""
        stats = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and kv_cache is None:
                outs = checkpoint(block, x, cos, sin, use_reentrant=False,
                                  context_fn=functools.partial(checkpoint_contexts, block))
            else:
                outs = block(x, cos, sin, kv_cache)
            x = outs[0]
            if len(outs) > 1:
                stats.append(outs[1:])
        if stats:
            passes.append(stats)
        return x

    def _check_contrastive(self, contrastive: str, targets, images, kv_cache) -> None:
        """ValueError naming what forward(..., contrastive=...) lacks."""
        if contrastive not in CONTRASTIVE_MODES:
            raise ValueError(f"contrastive={contrastive!r} is invalid: expected None or one of "
                             f"{', '.join(CONTRASTIVE_MODES)}")
        if self.contrastive is None:
            raise ValueError(f"contrastive={contrastive!r} but this model has no contrastive heads: build it with "
                             "contrastive_steps > 0 or contrastive_weight > 0")
        if targets is None or images is None or kv_cache is not None or images.shape[0] != targets.shape[0]:
            got = "none" if images is None else images.shape[0]
            raise ValueError(f"contrastive={contrastive!r} needs targets (the captions are their loss-taking tokens) "
                             f"and one image per row, without a KV cache: got images={got} for "
                             f"{'no targets' if targets is None else f'{targets.shape[0]} rows'}")

    def _contrastive(self, targets: torch.Tensor, image_tokens: torch.Tensor, passes: list) -> ContrastiveOutput:
        """The InfoNCE loss of the batch: the decoder runs on the caption rows alone (no image span, the
        text modality embedding), against the image tokens (M, n, D) the language-model pass placed."""
        rows, mask, same = caption_rows(targets)  # (B, Tc) each, same (B, B)
        cos, sin = self.rope(0, rows.shape[1])
        x = self.vision(rows, self.tok_emb(rows), None)  # (B, Tc, D)
        h = self.norm(self._decode(self.drop(x), cos, sin, None, passes))  # (B, Tc, D)
        return self.contrastive(image_tokens, h, mask, same)

    # ------------------------------------------------------------------ accounting
    def num_params(self, active_only: bool = False, non_embedding: bool = False) -> int:
        """Parameter count; active_only counts top_k of the num_experts experts (what one token uses)."""
        total = 0
        m = self.config.moe
        for name, p in self.named_parameters():  # tied weights are yielded once
            n = p.numel()
            if active_only and ".experts." in name:
                n = n * m.top_k // m.num_experts
            if non_embedding and name == "tok_emb.weight" and not self.config.model.tie_embeddings:
                continue
            total += n
        return total

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward): 6 * N_active + 12 * n_layer * n_head * head_dim * T.

        N_active counts the matmul weights one token uses (top_k experts, the router, attention,
        the LM head; not the embedding lookup). 12 * L * n_head * head_dim * T is attention's score and
        value matmuls (PaLM appendix B; n_head * head_dim = n_embd unless head_dim is set); T defaults to block_size.
        """
        mc = self.config.model
        T = seq_len or mc.block_size
        n_active = self.num_params(active_only=True)
        n_active -= sum(p.numel() for n, p in self.named_parameters() if "norm" in n)
        if not mc.tie_embeddings:
            n_active -= self.tok_emb.weight.numel()
        return 6 * n_active + 12 * mc.n_layer * mc.n_head * mc.head_dim * T

    def new_kv_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        mc = self.config.model
        p = self.tok_emb.weight
        return KVCache(mc.n_layer, batch_size, mc.num_kv_heads, max_len or mc.block_size, mc.head_dim,
                       p.dtype, p.device)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt, max_new_tokens: Optional[int] = None, **kwargs):
        """Sample a continuation; see blues.generate.generate for the arguments."""
        from blues.generate import generate
        return generate(self, prompt, max_new_tokens=max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ weights
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save: contiguous CPU copies; a tied head is stored once (as tok_emb.weight). With
        balance_bias_rate > 0 each MoE layer's selection bias too (blocks.<i>.mlp.selection_bias, fp32):
        generation selects experts with it, as training did (blues.train.balance says why)."""
        sd = {}
        for name, t in self.state_dict().items():
            if name == "lm_head.weight" and self.config.model.tie_embeddings:
                continue
            sd[name] = t.detach().to("cpu").contiguous()
        for name, m in self.named_modules():
            if getattr(m, "use_selection_bias", False):
                sd[f"{name}.selection_bias"] = m.selection_bias.detach().float().cpu().contiguous()  # (E,)
        return sd

    def save_pretrained(self, directory: str, tokenizer=None) -> None:
        """Write model.safetensors + config.json (+ the tokenizer's files) into `directory`."""
        from safetensors.torch import save
        os.makedirs(directory, exist_ok=True)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        cfg = self.config.to_dict()
        # Each file appears whole or not at all (a save killed midway never leaves a truncated file
        # under the final name); the weights go in memory first, ~2x their size at peak.
        atomic_write(os.path.join(directory, WEIGHTS_NAME), save(self.export_state_dict(), metadata={"format": "pt"}))
        atomic_write_json(os.path.join(directory, CONFIG_NAME), cfg, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str = "cpu", **overrides) -> "Blues":
        """Load a folder written by save_pretrained. Never unpickles. `overrides` replace config fields
        that do not change weight shapes (e.g. attn_backend, moe_backend, dropout)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        cfg_path = os.path.join(directory, CONFIG_NAME)
        w_path = os.path.join(directory, WEIGHTS_NAME)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise ValueError(f"{p!r} does not exist: a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                                 "written by save_pretrained")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg_dict = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path!r} is not valid JSON: {e}") from None
        config = BluesConfig.from_dict(cfg_dict)
        if overrides:
            config = keep_shapes(config, config.replace(**overrides))
        if config.moe.moe_backend == "deepspeed":
            # Exported weights are always in the stacked layout; inference runs the local backends.
            config = config.replace(moe_backend="auto")
        try:
            state = load_file(w_path, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{w_path!r} is not a readable safetensors file: {e}") from None
        model = cls(config)
        model.load_weights(state, source=w_path)
        tok_file = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(tok_file):
            from blues.data.tokenizer import Tokenizer, check_vocab
            tok = Tokenizer.load(directory)
            check_vocab(tok, config.model.vocab_size, what=f"model in {directory}")
            model.tokenizer = tok
        return model.to(map_location)

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Copy `state` into the model, checking every name and shape first (nothing is half-loaded)."""
        expected = self.export_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        problems = []
        for name in sorted(set(expected) & set(state)):
            if tuple(state[name].shape) != tuple(expected[name].shape):
                what = " (vocabulary size mismatch)" if name in ("tok_emb.weight", "lm_head.weight") else ""
                problems.append(f"tensor {name!r} has shape {tuple(state[name].shape)} in {source} but the model "
                                f"expects {tuple(expected[name].shape)}{what}")
        if missing:
            problems.append(f"{source} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"{source} has unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if problems:
            raise ValueError("; ".join(problems))
        with torch.no_grad():
            own = dict(self.named_parameters())
            own.update(dict(self.named_buffers()))
            for name, t in state.items():
                own[name].copy_(t)
