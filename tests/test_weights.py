"""save_pretrained / from_pretrained: identical logits, never unpickles, clear errors on bad files."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from blues.config import BluesConfig
from blues.model import Blues

CFG = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32, num_kv_heads=2, num_experts=4, top_k=2,
           expert_ffn_size=24, num_shared_experts=1, num_dense_layers=1)


def build(**kw):
    torch.manual_seed(0)
    return Blues(BluesConfig.from_dict({**CFG, **kw})).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, monkeypatch, tie):
    model = build(tie_embeddings=tie)
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]

    def no_pickle(*a, **k):
        raise AssertionError("from_pretrained must never unpickle")
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = Blues.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, 101, (2, 20))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert loaded.config == model.config
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()


def test_missing_folder_or_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"config.json' does not exist"):
        Blues.from_pretrained(str(tmp_path))


def test_corrupt_weights_file_is_named(tmp_path):
    build().save_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # a truncated download
    with pytest.raises(ValueError, match=r"model.safetensors' is not a readable safetensors file"):
        Blues.from_pretrained(str(tmp_path))


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    build().save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["blocks.1.mlp.experts.w_up"] = torch.zeros(4, 32, 25)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'blocks.1.mlp.experts.w_up' has shape \(4, 32, 25\) in .* but "
                                         r"the model expects \(4, 32, 24\)"):
        Blues.from_pretrained(str(tmp_path))


def test_vocab_mismatch_is_called_out(tmp_path):
    build().save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vocab_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'tok_emb.weight' has shape \(101, 32\) .* expects \(100, 32\) "
                                         r"\(vocabulary size mismatch\)"):
        Blues.from_pretrained(str(tmp_path))


def test_missing_and_extra_tensors_are_listed(tmp_path):
    build().save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["norm.weight"]
    sd["extra.bias"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks tensors \['norm.weight'\].*unexpected tensors \['extra.bias'\]"):
        Blues.from_pretrained(str(tmp_path))


def test_a_pickle_renamed_to_safetensors_is_refused(tmp_path):
    build().save_pretrained(str(tmp_path))
    torch.save({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Blues.from_pretrained(str(tmp_path))


def test_overrides_may_not_change_shapes(tmp_path):
    build().save_pretrained(str(tmp_path))
    m = Blues.from_pretrained(str(tmp_path), attn_backend="math")
    assert m.config.model.attn_backend == "math"
    with pytest.raises(ValueError, match=r"overrides change the weights' shapes: n_embd: 32 -> 64"):
        Blues.from_pretrained(str(tmp_path), n_embd=64)


def test_tokenizer_travels_with_the_weights_and_a_mismatch_is_refused(tmp_path):
    from blues.data.tokenizer import default_tokenizer
    tok = default_tokenizer()
    model = build(vocab_size=tok.n_vocab)
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    assert {"tokenizer.json", "tokenizer.tiktoken"} <= set(os.listdir(tmp_path))
    loaded = Blues.from_pretrained(str(tmp_path))
    assert loaded.tokenizer.sha256 == tok.sha256
    text = loaded.generate("The with statement", max_new_tokens=5, temperature=0)
    assert text == model.generate("The with statement", tokenizer=tok, max_new_tokens=5, temperature=0)

    small = build(vocab_size=1000)
    small.save_pretrained(str(tmp_path / "bad"), tokenizer=tok)
    with pytest.raises(ValueError, match=r"has 4096 ids .* vocab_size=1000"):
        Blues.from_pretrained(str(tmp_path / "bad"))

