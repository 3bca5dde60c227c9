"""Dense Hugging Face folders (Llama) into Blues, and upcycled from there (blues.hf, blues-upcycle).

The reference is transformers' own LlamaForCausalLM (eager attention, fp32), built from a tiny config
with no download and saved with its own save_pretrained."""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the references are transformers' own Llama and Qwen2 "
                                   "(pip install -e .[dev]; CI has it, where a skip fails)")

from blues.cli.upcycle import main as upcycle_main  # noqa: E402
from blues.hf import config_from_hf, load_hf  # noqa: E402
from blues.hf.load import load_model  # noqa: E402
from blues.model import Blues  # noqa: E402
from blues.upcycle import upcycle  # noqa: E402

ATOL = 1e-4  # fp32 both sides, another order of operations (SDPA vs eager): measured ~2e-6
VOCAB = 211


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny_llama(**kw):
    # initializer_range 0.1: logits of order 1, so a wrong mapping moves them far past ATOL
    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, bos_token_id=None,
               eos_token_id=None, pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def saved(tmp_path, name="llama", **kw) -> str:
    path = str(tmp_path / name)
    tiny_llama(**kw).save_pretrained(path)
    return path


def hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("kw", [pytest.param({}, id="plain"), pytest.param({"attention_bias": True}, id="qkvo bias"),
                                pytest.param({"tie_word_embeddings": True}, id="tied")])
def test_llama_import_equals_transformers(tmp_path, kw):
    path = saved(tmp_path, **kw)
    hf, model = hf_load(path), load_hf(path).eval()
    assert model.config.moe_layer_ids() == [] and model.config.moe.dense_hidden == 40
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for B, T in ((2, 1), (3, 7), (2, 33)):
            x = torch.randint(0, VOCAB, (B, T), generator=g)
            torch.testing.assert_close(model(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=g)
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 5:]
    assert model.generate(prompt, max_new_tokens=20, temperature=0) == ref.tolist()


def test_qwen2_import_equals_transformers(tmp_path):
    # Qwen2 is Llama with biases on q, k and v only (Blues' qkv_bias).
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))  # biases start at zero: move them, so a dropped one shows
    hf.save_pretrained(tmp_path / "qwen2")
    model = load_hf(str(tmp_path / "qwen2")).eval()
    assert model.config.model.qkv_bias and model.blocks[0].attn.wo.bias is None
    x = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf_load(tmp_path / "qwen2")(x).logits, atol=ATOL, rtol=0)
        moe = upcycle(model, 4, 2).model.eval()
        torch.testing.assert_close(moe(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_llama_mlp_bias_is_refused_by_name(tmp_path):
    with open(os.path.join(saved(tmp_path), "config.json")) as f:
        d = json.load(f)
    d["mlp_bias"] = True
    with pytest.raises(ValueError, match="mlp_bias=true cannot be expressed"):
        config_from_hf(d)


def test_upcycled_llama_computes_the_llama_function(tmp_path):
    path = saved(tmp_path)
    hf = hf_load(path)
    moe = upcycle(load_model(path), 4, 2).model.eval()
    x = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, hf(x).logits, atol=ATOL, rtol=0)


def test_cli_upcycles_a_hugging_face_folder(tmp_path, capsys):
    path, out = saved(tmp_path), str(tmp_path / "moe")
    assert upcycle_main([path, out, "--num_experts", "4", "--top_k", "2"]) == 0
    text = capsys.readouterr().out
    assert "upcycled blocks 0-1: 4 experts of 40 hidden units each, top-2" in text and "(no tokenizer" in text
    moe, hf = Blues.from_pretrained(out).eval(), hf_load(path)
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, hf(x).logits, atol=ATOL, rtol=0)
