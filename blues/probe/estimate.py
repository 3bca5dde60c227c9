"""The analytical estimate of one rank's memory for a training step (a model, not a measurement).

The probe reports it beside every measured trial, so a user sees where the memory goes; the search
itself decides on measurements only. Shapes: B micro-batch, T block_size, N = B*T tokens, D n_embd,
L n_layer, V vocab, E experts, K top_k, F expert hidden.
"""
from __future__ import annotations

from blues.config import BluesConfig, MoEConfig
from blues.loss import CHUNK_BYTES


def dispatch_rows(moe: MoEConfig, num_tokens: int) -> int:
    """Rows per expert of DeepSpeed's dispatch buffer (E, C, D) for N tokens.

    C is MoEConfig.capacity(N) (the one capacity definition), clamped to N as the DeepSpeed adapter
    clamps it; without a capacity C is the busiest expert's count, all N tokens under forced routing."""
    cap = moe.capacity(num_tokens)
    return num_tokens if cap is None else min(cap, num_tokens)


def ep_received_rows(moe: MoEConfig, num_tokens: int, ep_size: int) -> int:
    """The most token rows one EP rank's experts receive in a layer of the stacked backends under expert
    parallelism, N tokens per rank: every rank's tokens on its experts (what forced routing does,
    blues.moe.routing.hot_experts), min(K, E_loc) of each token's K choices, at most E_loc * C from
    each rank under a capacity C (dropped at the source)."""
    E_loc = moe.num_experts // ep_size
    per_source = num_tokens * min(moe.top_k, E_loc)
    cap = moe.capacity(num_tokens)
    if cap is not None:
        per_source = min(per_source, E_loc * cap)
    return ep_size * per_source


def estimate_memory(cfg: BluesConfig, ds: dict, world_size: int, micro_batch: int) -> dict[str, float]:
    """Bytes one rank needs for a training step at `micro_batch`, by part, and their "total".

    Model states (ZeRO paper, Rajbhandari et al. 2020), with Psi parameters on this rank (the
    experts split over ep_size ranks), dp ranks sharing the dense parameters and dp/ep_size the
    experts: weights p bytes each (4 fp32, 2 bf16/fp16), gradients p bytes, fp32 master weights 4
    (ZeRO 1-3 keep a fp32 partition even in fp32) and Adam's two moments 8. Stage 1 divides the
    optimizer states (master + moments) by the data-parallel size, stage 2 the gradients too,
    stage 3 the weights too. The DeepSpeed buckets (reduce/allgather) are added once.

    Activations kept for backward, per token and layer, in elements (x activation bytes):
    attention ~ 10 D + 3 kv_dim + n_head, the MoE layer ~ K (3 D + 4 F) + 3 E on the stacked
    backends, or E * C (3 D + 4 F) / N on DeepSpeed's (its dispatch buffer is (E, C, D), C from
    `dispatch_rows`); under expert parallelism the stacked layer's experts see the rows they receive,
    R (3 D + 4 F) / N with R from `ep_received_rows` (the worst case), plus 2 K D for the rows sent
    out and back. The head ~ 3 V fp32 per token (logits, their fp32 copy, log-softmax); with
    fused_loss (blues.loss's chunked linear + cross-entropy) the fp32 gradients of h (N, D) and of
    the weight (V, D) and one chunk of fp32 logits at a time, at most max(CHUNK_BYTES, 4 N D) bytes
    (the GPU's rule; a CPU's chunk is CHUNK_BYTES); in 16 bits also the chunk's 16-bit softmax
    gradient (half a chunk) and a 16-bit (V, D) part of the weight's gradient. Activation
    checkpointing keeps D per layer plus one recomputed layer. One more layer's worth is added for
    the backward's temporaries.

    Not counted: the runtime underneath (allocator arenas, DeepSpeed's communication buffers), a
    fixed cost, so the estimate reads low at small micro-batches and its growth per added sequence
    is the part to trust (tests/probe bound both).
    """
    from blues.train.ds_config import zero_stage

    m, moe, t = cfg.model, cfg.moe, cfg.train
    D, L, V, T = m.n_embd, m.n_layer, m.vocab_size, m.block_size
    E, K, Fh = moe.num_experts, moe.top_k, moe.expert_ffn_size
    kv = m.num_kv_heads * m.head_dim
    p = 4 if t.dtype == "fp32" else 2
    stage = zero_stage(ds)
    ep = t.ep_size  # both MoE backends split the experts over ep_size ranks
    dp, dp_exp = world_size, max(1, world_size // ep)
    moe_layers = cfg.moe_layer_ids()
    n_moe, n_dense = len(moe_layers), L - len(moe_layers)
    q = m.n_head * m.head_dim  # query width (n_embd unless head_dim is set)
    attn = 2 * D * q + 2 * D * kv + 2 * D  # wq + wo, wk + wv, two norms
    dense_mlp = 3 * D * moe.dense_hidden
    expert = 3 * D * Fh
    shared = 3 * D * moe.shared_hidden + (D if moe.shared_expert_gate else 0)
    psi_dense = V * D * (1 if m.tie_embeddings else 2) + D + L * attn + n_dense * dense_mlp \
        + n_moe * (E * D + shared)
    psi_exp = n_moe * E * expert / ep  # this rank's experts

    def states(psi: float, dpn: int) -> dict[str, float]:
        weights = psi * p / (dpn if stage >= 3 else 1)
        grads = psi * p / (dpn if stage >= 2 else 1)
        master = 0.0 if (stage == 0 and p == 4) else psi * 4 / (dpn if stage >= 1 else 1)
        moments = psi * 8 / (dpn if stage >= 1 else 1)
        return {"weights": weights, "grads": grads, "master": master, "moments": moments}

    sd, se = states(psi_dense, dp), states(psi_exp, dp_exp)
    out = {k: sd[k] + se[k] for k in sd}
    zo = ds.get("zero_optimization") or {}
    if stage >= 1:
        bucket = min(float(zo.get("reduce_bucket_size", 5e8)), psi_dense + psi_exp)
        out["buckets"] = bucket * 4
    else:
        out["buckets"] = 0.0

    N = micro_batch * T
    a = p  # activation bytes
    per_tok_attn = 10 * D + 3 * kv + m.n_head
    if moe.moe_backend == "deepspeed":
        per_tok_moe = E * dispatch_rows(moe, N) * (3 * D + 4 * Fh) / N + 3 * E + 2 * D
    elif ep > 1:
        per_tok_moe = ep_received_rows(moe, N, ep) * (3 * D + 4 * Fh) / N + 2 * K * D + 3 * E + 2 * D
    else:
        per_tok_moe = K * (3 * D + 4 * Fh) + 3 * E + 2 * D
    per_tok_dense = 4 * moe.dense_hidden + 2 * D
    per_tok_shared = 4 * moe.shared_hidden
    layer_elems = [per_tok_attn + (per_tok_moe + per_tok_shared if i in moe_layers else per_tok_dense)
                   for i in range(L)]
    if t.gradient_checkpointing:
        kept = N * (L * D + max(layer_elems)) * a
    else:
        kept = N * sum(layer_elems) * a
    out["activations"] = kept + N * max(layer_elems) * a  # + one layer of backward temporaries
    if m.fused_loss:
        chunk = max(CHUNK_BYTES, 4 * N * D)
        out["head"] = N * D * (4 + a) + (V * D * (4 + 2) + chunk * 3 // 2 if a == 2 else V * D * 4 + chunk)
    else:
        out["head"] = N * (3 * V * 4 + V * a)
    out["total"] = sum(out.values())
    return out
