"""generate(): sampling arguments, stopping, batching, streaming, and the errors it gives."""
import pytest
import torch

from blues.config import BluesConfig
from blues.generate import sample_next
from blues.model import Blues


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = BluesConfig.from_dict(dict(vocab_size=61, block_size=32, n_layer=1, n_head=4, n_embd=32, num_kv_heads=1,
                                     num_experts=4, top_k=2, expert_ffn_size=32, attn_backend="sdpa"))
    return Blues(cfg).eval()


def test_seeded_sampling_repeats_and_seeds_differ(model):
    a = model.generate([1, 2, 3], max_new_tokens=20, seed=7)
    b = model.generate([1, 2, 3], max_new_tokens=20, seed=7)
    c = model.generate([1, 2, 3], max_new_tokens=20, seed=8)
    assert a == b and a != c


def test_top_k_1_is_greedy_and_output_len_is_accepted(model):
    greedy = model.generate([5, 6], max_new_tokens=12, temperature=0)
    assert model.generate([5, 6], output_len=12, top_k=1, seed=3) == greedy


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_next(logits, 1.0, None, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there


def test_generation_stops_at_eos_and_excludes_it(model):
    free = model.generate([1, 2, 3], max_new_tokens=10, temperature=0)
    eos = free[4]
    stopped = model.generate([1, 2, 3], max_new_tokens=10, temperature=0, eos_token_id=eos)
    assert stopped == free[:free.index(eos)]


def test_a_batch_equals_its_prompts_one_by_one(model):
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8]]
    batch = model.generate(prompts, max_new_tokens=8, temperature=0)
    assert batch == [model.generate(p, max_new_tokens=8, temperature=0) for p in prompts]


def test_stream_yields_the_same_tokens(model):
    assert list(model.generate([3, 4], max_new_tokens=9, temperature=0, stream=True)) == \
        model.generate([3, 4], max_new_tokens=9, temperature=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_continues_past_block_size(model, monkeypatch, use_cache):
    # The prompt (29) plus 10 new tokens passes block_size=32: every step's logits must be those of a
    # forward over the last block_size tokens (the cache before the window fills, a recompute after).
    import blues.generate as bg
    seen = []
    real = bg.sample_next

    def recording(logits, *args, **kwargs):
        seen.append(logits.detach().clone())  # (B, V)
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(bg, "sample_next", recording)
    prompt = list(range(1, 30))
    out = model.generate(prompt, max_new_tokens=10, temperature=0, use_cache=use_cache)
    assert len(out) == 10 and len(seen) == 10
    seq = list(prompt)
    block = model.config.model.block_size
    with torch.no_grad():
        for step, token in enumerate(out):
            want = model(torch.tensor([seq[-block:]])).logits[:, -1]  # (1, V)
            # fp32; the KV-cached steps sum attention in another order than the full forward (~1e-6)
            torch.testing.assert_close(seen[step], want, rtol=1e-5, atol=1e-5, msg=f"step {step}")
            assert token == int(want.argmax())
            seq.append(token)
    assert len(seq) > block


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=list(range(40))), r"prompt has 40 tokens, more than block_size=32"),
    (dict(top_p=0.0), r"top_p=0.0 is invalid: expected a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 is invalid"),
    (dict(temperature=-1.0), r"temperature=-1.0 is invalid"),
    (dict(prompt=[]), r"prompt is empty"),
    (dict(prompt=[1, 99]), r"prompt token id 99 is outside the vocabulary \[0, 61\)"),
    (dict(prompt="hello"), r"a string prompt needs a tokenizer"),
    (dict(max_new_tokens=4, output_len=5), r"disagree"),
])
def test_bad_arguments_raise_clear_errors(model, kwargs, match):
    kwargs.setdefault("prompt", [1, 2])
    with pytest.raises(ValueError, match=match):
        model.generate(**kwargs)


def test_string_prompts_decode_and_stream_as_text():
    from blues.data.tokenizer import default_tokenizer
    tok = default_tokenizer()
    torch.manual_seed(0)
    m = Blues(BluesConfig.from_dict(dict(vocab_size=tok.n_vocab, block_size=64, n_layer=1, n_head=4, n_embd=32,
                                         num_kv_heads=1, num_experts=2, top_k=1, expert_ffn_size=32))).eval()
    text = m.generate("import os", tokenizer=tok, max_new_tokens=12, temperature=0)
    ids = m.generate(tok.encode("import os"), max_new_tokens=12, temperature=0, eos_token_id=tok.eot_id)
    assert text == tok.decode(ids)
    assert "".join(m.generate("import os", tokenizer=tok, max_new_tokens=12, temperature=0, stream=True)) == text
    assert m.generate(["a b", "import os"], tokenizer=tok, max_new_tokens=12, temperature=0)[1] == text


def test_on_token_sees_each_new_token_while_streaming(model):
    """on_token is called once per new token, in order, before the piece that holds it is yielded, and
    never for the eos token that ends generation; without stream=True it is refused."""
    greedy = model.generate([5, 6], max_new_tokens=12, temperature=0)
    seen, yielded = [], []
    for tok in model.generate([5, 6], max_new_tokens=12, temperature=0, stream=True, on_token=seen.append):
        assert seen[-1] == tok  # already counted when its piece arrives
        yielded.append(tok)
    assert seen == yielded == greedy
    eos = greedy[3]  # stop at the fourth token: it is neither yielded nor counted
    seen = []
    out = list(model.generate([5, 6], max_new_tokens=12, temperature=0, stream=True, eos_token_id=eos,
                              on_token=seen.append))
    assert seen == out == greedy[:greedy.index(eos)]
    with pytest.raises(ValueError, match="on_token is called while streaming: pass stream=True with it"):
        model.generate([5, 6], max_new_tokens=2, on_token=seen.append)
