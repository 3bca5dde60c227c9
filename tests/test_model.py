"""Facts about the Blues model: causality, backend agreement, checkpointing, the KV cache, learning."""
import pytest
import torch

from blues.attention import Attention, RotaryEmbedding
from blues.config import BluesConfig
from blues.model import Blues

HEADS = {"MHA": 8, "GQA": 2, "MQA": 1}


def small(num_kv_heads=2, attn_backend="math", **kw):
    d = dict(vocab_size=97, block_size=64, n_layer=2, n_head=8, n_embd=64, num_kv_heads=num_kv_heads,
             num_experts=4, top_k=2, expert_ffn_size=48, attn_backend=attn_backend, moe_backend="torch")
    d.update(kw)
    torch.manual_seed(0)
    return Blues(BluesConfig.from_dict(d))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("kind", list(HEADS))
def test_future_tokens_never_change_past_logits(backend, kind):
    model = small(HEADS[kind], backend).eval()
    x = torch.randint(0, 97, (2, 40))
    y = x.clone()
    y[:, 25:] = torch.randint(0, 97, (2, 15))
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :25], b[:, :25], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 25:], b[:, 25:]), "changed tokens must change their own logits"


def test_capacity_keeps_causality_within_a_sequence():
    # Earlier tokens win an expert's capacity, so a later token can never displace an earlier one.
    model = small(2, "sdpa", capacity_factor=0.5).eval()
    x = torch.randint(0, 97, (1, 40))
    y = x.clone()
    y[:, 30:] = (x[:, 30:] + 1) % 97
    out = model(x)
    assert int(out.dropped) > 0
    torch.testing.assert_close(out.logits[:, :30], model(y).logits[:, :30], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(HEADS))
def test_sdpa_and_math_agree_outputs_and_gradients(kind):
    cfg = BluesConfig.from_dict(dict(n_head=8, n_embd=64, num_kv_heads=HEADS[kind], block_size=64))
    torch.manual_seed(0)
    attn = {b: Attention(cfg.model, 0) for b in ("math", "sdpa")}
    attn["sdpa"].load_state_dict(attn["math"].state_dict())
    attn["math"].attn_backend, attn["sdpa"].attn_backend = "math", "sdpa"
    rope = RotaryEmbedding(cfg.model.head_dim, 64, 10000.0)
    cos, sin = rope(0, 33)
    x = torch.randn(3, 33, 64)
    outs, grads = {}, {}
    for b, m in attn.items():
        xi = x.clone().requires_grad_(True)
        out = m(xi, cos, sin)
        out.square().sum().backward()
        outs[b], grads[b] = out, [xi.grad] + [p.grad for p in m.parameters()]
    torch.testing.assert_close(outs["sdpa"], outs["math"], rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


def test_flash_backend_refuses_clearly_without_flash_attn():
    model = small(2, "flash")
    with pytest.raises(ValueError, match="attn_backend='flash' cannot run"):
        model(torch.randint(0, 97, (1, 8)))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = small(2, "sdpa", router_noise_std=0.5, num_shared_experts=1).train()
    x = torch.randint(0, 97, (2, 48))
    results = []
    for ckpt in (False, True):
        model.zero_grad()
        if ckpt:
            model.gradient_checkpointing_enable()
        torch.manual_seed(123)  # same router noise in both runs; checkpointing replays the RNG state
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-6, msg=name)


def test_gradient_checkpointing_recomputes_each_block_once_and_disable_stops_it():
    model = small(2, "sdpa").train()
    calls = []
    block, forward = model.blocks[0], model.blocks[0].forward

    def counted(*args, **kwargs):  # torch's checkpoint replays forward() without running forward hooks
        calls.append(1)
        return forward(*args, **kwargs)

    block.forward = counted
    x = torch.randint(0, 97, (2, 17))

    def forwards_per_step() -> int:
        calls.clear()
        model(x[:, :-1], x[:, 1:]).loss.backward()
        return len(calls)

    assert forwards_per_step() == 1
    model.gradient_checkpointing_enable()
    assert forwards_per_step() == 2  # the forward, and its replay in backward
    model.gradient_checkpointing_disable()
    assert forwards_per_step() == 1


@pytest.mark.parametrize("kind", ["MQA", "GQA"])
def test_kv_cache_cache_is_smaller_by_the_head_ratio(kind):
    mqa = small(HEADS[kind]).new_kv_cache(2)
    mha = small(8).new_kv_cache(2)
    assert mha.nbytes == mqa.nbytes * 8 // HEADS[kind]


@pytest.mark.parametrize("kind", ["MQA", "GQA"])
def test_decoding_with_the_cache_equals_recomputing(kind):
    model = small(HEADS[kind], "sdpa", block_size=128).eval()
    prompt = torch.randint(0, 97, (1, 11))
    cached = model.generate(prompt[0].tolist(), max_new_tokens=64, temperature=0)
    full = model.generate(prompt[0].tolist(), max_new_tokens=64, temperature=0, use_cache=False)
    assert len(cached) == 64 and cached == full
    # Logits of every step: cached decoding against the full forward of the same sequence.
    seq = torch.cat([prompt, torch.tensor([cached])], dim=1)  # (1, 75)
    with torch.no_grad():
        full_logits = model(seq).logits  # (1, 75, V)
        cache = model.new_kv_cache(1)
        step_logits = [model(prompt, kv_cache=cache).logits[:, -1]]
        for t in range(11, 74):
            step_logits.append(model(seq[:, t:t + 1], kv_cache=cache).logits[:, -1])
    torch.testing.assert_close(torch.stack(step_logits, 1), full_logits[:, 10:74], rtol=1e-5, atol=1e-5)


def test_a_tiny_model_memorises_a_repeated_text():
    torch.manual_seed(0)
    model = small(1, "sdpa", vocab_size=50, n_layer=1, n_head=4, n_embd=32, expert_ffn_size=32, block_size=24,
                  router_noise_std=0.0)
    pattern = torch.randint(0, 50, (12,))
    data = pattern.repeat(10)  # 120 tokens of a 12-token cycle
    starts = torch.arange(0, 90, 11)
    x = torch.stack([data[s:s + 24] for s in starts])  # (9, 24)
    y = torch.stack([data[s + 1:s + 25] for s in starts])
    untrained = model(x, y).ce_loss.item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = model(x, y).ce_loss.item()
    # An untrained model sits near ln(50) = 3.9 nats; memorising the cycle takes it near 0.
    assert untrained > 3.0
    assert trained < 0.2, trained


def test_sequence_longer_than_block_size_is_refused():
    model = small(2)
    with pytest.raises(ValueError, match="exceeds block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_active_parameters_count_top_k_of_the_experts():
    model = small(2)
    ex = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert model.num_params() - model.num_params(active_only=True) == ex - ex * 2 // 4


def test_rope_tables_stay_fp32_when_the_model_is_cast():
    model = small(2).to(torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32 and model.tok_emb.weight.dtype == torch.bfloat16
    ref = small(2).rope
    torch.testing.assert_close(model.rope.cos, ref.cos, rtol=0, atol=0)
    assert model(torch.randint(0, 97, (1, 16))).logits.dtype == torch.bfloat16


def test_a_model_builds_on_the_meta_device_and_its_rope_tables_come_back_on_the_cpu():
    # blues.hf builds on the meta device (no memory) and then loads the weights; the RoPE tables
    # are derived from the config, so leaving the meta device must recompute them exactly.
    cfg = small(2).config
    with torch.device("meta"):
        model = Blues(cfg)
    assert all(p.is_meta for p in model.parameters()) and model.rope.cos.is_meta
    model.to_empty(device="cpu")
    ref = small(2).rope
    assert not model.rope.cos.is_meta
    torch.testing.assert_close(model.rope.cos, ref.cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope.sin, ref.sin, rtol=0, atol=0)


def qwen_style(backend="sdpa", **kw):
    """head_dim 12 for 8 heads on a width of 64 (queries 96 wide), per-head QK-norm, attention
    biases, layer 1 dense; the 1-D weights (norms at one, biases at zero) moved off their init so
    that each one matters."""
    model = small(2, backend, head_dim=12, qk_norm="head", attention_bias=True, dense_layers=[1], **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_qwen3_style_attention_has_its_shapes():
    model = qwen_style()
    attn = model.blocks[0].attn
    assert attn.wq.weight.shape == (96, 64) and attn.wo.weight.shape == (64, 96) and attn.wk.bias.shape == (24,)
    assert attn.q_norm.weight.shape == (12,) and model.rope.cos.shape == (64, 6)
    assert [b.is_moe for b in model.blocks] == [True, False]
    assert model.new_kv_cache(1).k.shape[-1] == 12


def test_qwen3_style_attention_sdpa_and_math_agree_and_stay_causal():
    model = qwen_style("math").eval()
    x = torch.randint(0, 97, (2, 40))
    ref = model(x).logits
    for block in model.blocks:
        block.attn.attn_backend = "sdpa"
    torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)  # fp32, another summation order
    y = x.clone()
    y[:, 25:] = (x[:, 25:] + 1) % 97
    torch.testing.assert_close(model(y).logits[:, :25], ref[:, :25], rtol=0, atol=1e-5)


def test_qwen3_style_decoding_with_the_cache_equals_recomputing():
    model = qwen_style(block_size=128).eval()
    prompt = torch.randint(0, 97, (1, 11))
    cached = model.generate(prompt[0].tolist(), max_new_tokens=40, temperature=0)
    assert cached == model.generate(prompt[0].tolist(), max_new_tokens=40, temperature=0, use_cache=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the fp32 GQA path of SDPA on a GPU")
def test_sdpa_fp32_grouped_kv_runs_a_fused_kernel_and_equals_math():
    # fp32 with grouped KV heads: expanded K/V let SDPA's memory-efficient kernel run (pytorch#139586);
    # with the math kernel disabled the call must still succeed, and equal the math path.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from blues.attention import causal_attention
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 33, 16, device="cuda", generator=g)
    k, v = (torch.randn(2, 2, 33, 16, device="cuda", generator=g) for _ in range(2))
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        fused = causal_attention(q, k, v, "sdpa")
    torch.testing.assert_close(fused, causal_attention(q, k, v, "math"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_the_fused_loss_equals_the_loss_over_the_logits_and_so_do_all_gradients(tie):
    # With fused_loss, Blues.forward with targets takes the loss from lm_head's chunked linear +
    # cross-entropy (no logits); return_logits=True is the unfused path. Tied or not, the same loss
    # and gradients. fused_loss is the default; off, the logits are there.
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert small()(ids, ids).logits is None and small(fused_loss=False)(ids, ids).logits is not None
    model = small(tie_embeddings=tie)
    x = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    y[0, 10:] = -1  # ignored targets
    runs = []
    for return_logits in (True, False):
        model.zero_grad()
        torch.manual_seed(3)  # the same router noise and dropout draws in both passes
        out = model(x, y, return_logits=return_logits)
        out.loss.backward()
        runs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = runs
    assert plain.logits.shape == (3, 40, 97) and fused.logits is None
    torch.testing.assert_close(fused.ce_loss, plain.ce_loss, rtol=1e-6, atol=0)  # fp32, another summation order
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-6, atol=0)
    assert fused_grads.keys() == plain_grads.keys() and ("lm_head.weight" in fused_grads) != tie
    for n, g in fused_grads.items():
        torch.testing.assert_close(g, plain_grads[n], rtol=1e-4, atol=1e-7, msg=n)  # fp32, backprop of reordered sums


def test_training_with_the_fused_loss_follows_the_unfused_one():
    # 10 AdamW steps from the same start: the fused loss trains the model the same way.
    x = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(2))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for return_logits in (True, False):
        model = small()  # seeds: the same start and the same random draws in both runs
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        run = []
        for _ in range(10):
            loss = model(x, y, return_logits=return_logits).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[1][-1] < losses[1][0] - 0.5
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)  # fp32 rounding, grown over 10 Adam steps
