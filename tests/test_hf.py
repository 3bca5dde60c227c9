"""Hugging Face interop (blues.hf, blues.cli.hf): Mixtral and Qwen3-MoE folders written by transformers itself.

The reference is transformers' own MixtralForCausalLM / Qwen3MoeForCausalLM (eager attention, fp32),
built from a tiny config with no download and saved with its own save_pretrained (one file, and
sharded with an index); blues-train --init_from from such a folder on 2 ranks with EP=2.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the references are transformers' own models "
                                   "(pip install -e .[dev]; CI has it, where a skip fails)")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from blues.config import BluesConfig, ModelConfig, MoEConfig  # noqa: E402
from blues.hf import config_from_hf, load_hf, save_hf  # noqa: E402
from blues.model import Blues  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32 on both sides, but a different order of operations (SDPA vs eager attention, a grouped
# expert sum vs transformers' per-expert index_add): measured up to 1.1e-6 on logits of size 3.5.
ATOL = 1e-4
VOCAB = 211  # not a power of two
LENGTHS = (1, 7, 33)  # one token, a short and a longer batch (block 64)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _move_vectors(model) -> None:
    """Norms start at one and biases at zero: move every 1-D parameter, so that a dropped bias or a swapped
    q/k norm shows in the logits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))


def tiny_mixtral(**kw):
    # initializer_range 0.1 (not 0.02): logits of order 1 and clear routing margins, so a wrong
    # mapping (gate/up swapped, a missing transpose) moves the logits far past ATOL.
    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
               initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**cfg)
    return transformers.MixtralForCausalLM(config).eval()


def hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def folder_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder (one file or shards), by name."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{layout: folder} of one untied tiny Mixtral (plus a tied one), in every layout import reads."""
    root = tmp_path_factory.mktemp("hf")
    model = tiny_mixtral()
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    # transformers 5's in-memory layout (fused gate_up_proj, `mlp` names), as a raw state_dict save.
    shutil.copytree(root / "single", root / "fused")
    os.remove(root / "fused" / "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "fused" / "model.safetensors",
              metadata={"format": "pt"})
    tiny_mixtral(tie_word_embeddings=True).save_pretrained(root / "tied")
    hf_word_tokenizer(root / "single")  # a Hugging Face tokenizer.json beside the weights: import reads it
    return {p.name: str(p) for p in root.iterdir()}


def hf_word_tokenizer(folder, extra_tokens: int = 0) -> None:
    """A word-level BPE (Whitespace split, no byte alphabet: fewer ids than VOCAB) with </s> as its
    eos, saved as transformers saves one: tokenizer.json and tokenizer_config.json."""
    tk = pytest.importorskip("tokenizers", reason="the folder's tokenizer.json is trained with it")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    trainer = tk.trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "</s>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["def f(x): return x * 2"] * 20,
                            trainer=trainer)
    tok.add_tokens([f"word{i}" for i in range(extra_tokens)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>"}, f)


def test_the_layouts_are_what_they_claim(hf_dirs):
    single = folder_tensors(hf_dirs["single"])
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in single  # what transformers saves
    assert "model.layers.0.mlp.experts.gate_up_proj" in folder_tensors(hf_dirs["fused"])
    assert len([f for f in os.listdir(hf_dirs["sharded"]) if f.endswith(".safetensors")]) > 2
    assert "lm_head.weight" not in folder_tensors(hf_dirs["tied"])


@pytest.mark.parametrize("layout", ["single", "sharded", "fused", "tied"])
def test_import_equals_transformers(hf_dirs, layout):
    hf, model = hf_load(hf_dirs[layout]), load_hf(hf_dirs[layout]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for B, T in zip((2, 3, 2), LENGTHS):
            x = torch.randint(0, VOCAB, (B, T), generator=g)
            torch.testing.assert_close(model(x).logits, hf(x).logits, atol=ATOL, rtol=0)
        x = torch.randint(0, VOCAB, (2, 33), generator=g)
        ce = model(x[:, :-1], targets=x[:, 1:]).ce_loss
        torch.testing.assert_close(ce, hf(x, labels=x).loss, atol=1e-5, rtol=0)  # a mean of 64 such logits
    prompt = torch.randint(0, VOCAB, (2, 5), generator=g)
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 5:]
    assert model.generate(prompt, max_new_tokens=20, temperature=0) == ref.tolist()


def test_import_config_maps_every_field(hf_dirs):
    with open(os.path.join(hf_dirs["single"], "config.json")) as f:
        hf = json.load(f)
    cfg = config_from_hf(hf)
    mc, m = cfg.model, cfg.moe
    assert (mc.vocab_size, mc.n_embd, mc.n_layer, mc.n_head, mc.num_kv_heads, mc.block_size) == (VOCAB, 48, 3, 4, 2, 64)
    assert (m.num_experts, m.top_k, m.expert_ffn_size) == (4, 2, 40)
    assert mc.rope_theta == hf["rope_parameters"]["rope_theta"] and mc.norm_eps == hf["rms_norm_eps"]
    assert mc.tie_embeddings is False and mc.init_std == 0.1
    # HF's balancing loss is top_k times Blues' per layer (see config_from_hf).
    assert m.aux_loss_coef == pytest.approx(hf["router_aux_loss_coef"] * 2)
    assert (m.router_noise_std, m.z_loss_coef, m.capacity_factor, m.norm_topk_prob) == (0.0, 0.0, None, True)


def test_balancing_loss_is_top_k_times_blues_per_layer(tmp_path):
    # The fact behind aux_loss_coef = router_aux_loss_coef * top_k (config_from_hf); with one layer
    # HF's pooling over layers changes nothing. top_k 3 of 5 experts: a factor that is not 2.
    tiny_mixtral(num_hidden_layers=1, num_local_experts=5, num_experts_per_tok=3).save_pretrained(tmp_path / "hf")
    hf, model = hf_load(tmp_path / "hf"), load_hf(str(tmp_path / "hf")).eval()
    x = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(x, output_router_logits=True).aux_loss
        torch.testing.assert_close(3 * model(x).aux_loss, ref, atol=1e-6, rtol=0)  # fp32 sums of 34 tokens


def test_an_imported_model_trains(hf_dirs):
    model = load_hf(hf_dirs["fused"]).train()
    x = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    model(x[:, :-1], targets=x[:, 1:]).loss.backward()
    for name, p in model.named_parameters():
        assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # every expert of this batch's 32 tokens x 3 layers is chosen


def test_import_in_bf16_keeps_the_values(hf_dirs):
    model = load_hf(hf_dirs["sharded"], dtype="bf16")
    ref = folder_tensors(hf_dirs["sharded"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    w2 = model.blocks[1].mlp.experts.w_down[3]  # (F, D)
    assert torch.equal(w2, ref["model.layers.1.block_sparse_moe.experts.3.w2.weight"].T.bfloat16())
    assert model.rope.cos.dtype == torch.float32  # RoPE tables stay fp32 (built, not loaded)


def test_a_bf16_checkpoint_imports_in_fp32(tmp_path):
    tiny_mixtral(num_hidden_layers=1).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    model = load_hf(str(tmp_path / "hf"))
    ref = folder_tensors(tmp_path / "hf")
    assert {t.dtype for t in ref.values()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    w1 = ref["model.layers.0.block_sparse_moe.experts.1.w1.weight"]  # (F, D) bf16
    assert torch.equal(model.blocks[0].mlp.experts.w_gate[1], w1.T.float())


def blues_model(**moe) -> Blues:
    torch.manual_seed(0)
    cfg = BluesConfig(model=ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=48,
                                        num_kv_heads=2, init_std=0.1, rope_theta=10000.0),
                      moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=40, **moe))
    return Blues(cfg).eval()


@pytest.mark.parametrize("shard", [None, "12KB"])
def test_export_loads_in_transformers(tmp_path, shard):
    model = blues_model()
    save_hf(model, str(tmp_path / "hf"), **({"max_shard_size": shard} if shard else {}))
    hf = hf_load(tmp_path / "hf")
    assert hf.config.tie_word_embeddings is True and hf.lm_head.weight is hf.model.embed_tokens.weight
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json") == (shard is not None)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for B, T in zip((2, 3, 2), LENGTHS):
            x = torch.randint(0, VOCAB, (B, T), generator=g)
            torch.testing.assert_close(hf(x).logits, model(x).logits, atol=ATOL, rtol=0)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=g)
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 5:]
    assert model.generate(prompt, max_new_tokens=20, temperature=0) == ref.tolist()


def test_routed_scaling_factor_is_folded_into_the_exported_down_projections(tmp_path):
    """Mixtral has no routed_scaling_factor: save_hf multiplies each expert's down projection by it
    (exact: the combine is linear in the routing weights), so transformers computes the same logits."""
    model = blues_model(routed_scaling_factor=2.0)
    save_hf(model, str(tmp_path / "hf"))
    hf = hf_load(tmp_path / "hf")
    x = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unscaled = Blues(model.config.replace(routed_scaling_factor=1.0)).eval()
        unscaled.load_state_dict(model.state_dict())
        assert (unscaled(x).logits - model(x).logits).abs().max() > 10 * ATOL  # the factor matters here
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["sharded", "fused", "tied"])
def test_round_trip_gives_the_same_tensors(hf_dirs, tmp_path, layout):
    save_hf(load_hf(hf_dirs[layout]), str(tmp_path / "out"))
    src, out = folder_tensors(hf_dirs[layout]), folder_tensors(tmp_path / "out")
    if layout == "fused":  # written back in the per-expert layout transformers saves
        src = folder_tensors(hf_dirs["single"])
    assert sorted(out) == sorted(src)
    for name in src:
        assert torch.equal(out[name], src[name]), name
    with open(os.path.join(hf_dirs[layout], "config.json")) as f:
        src_cfg = json.load(f)
    with open(tmp_path / "out" / "config.json") as f:
        out_cfg = json.load(f)
    same = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
            "rope_parameters", "tie_word_embeddings", "num_local_experts", "num_experts_per_tok",
            "router_aux_loss_coef", "initializer_range", "sliding_window", "hidden_act")
    assert {k: out_cfg[k] for k in same} == {k: src_cfg[k] for k in same}


def test_import_takes_overrides_that_keep_the_shapes(hf_dirs):
    assert load_hf(hf_dirs["single"], block_size=16, attn_backend="math").config.model.block_size == 16
    with pytest.raises(ValueError, match=r"overrides change the weights' shapes: num_experts: 4 -> 8"):
        load_hf(hf_dirs["single"], num_experts=8)
    with pytest.raises(ValueError, match=r"moe_backend='deepspeed', ep_size=1 cannot be imported into"):
        load_hf(hf_dirs["single"], moe_backend="deepspeed")


# ----------------------------------------------------------------------------- refusals

def _edited_copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config_changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type='gpt2' in config.json is not supported: expected one of mixtral, "
                             "qwen3_moe, qwen2_moe, olmoe, llama, qwen2"),
    ({"model_type": "qwen3_moe", "use_sliding_window": True, "sliding_window": 16, "num_experts": 4,
      "moe_intermediate_size": 40}, "use_sliding_window with sliding_window=16 cannot be expressed"),
    # Blues has an explicit head_dim now: a config that names another one than the weights' is a shape error
    ({"head_dim": 16}, "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (24, 48) in"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' cannot be expressed"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0}},
     "rope_parameters.rope_type='dynamic' cannot be expressed"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
     "rope_type 'yarn' needs original_max_position_embeddings"),
    ({"intermediate_size": 41}, "tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape (40, 48)"),
    ({"num_local_experts": 3}, "has unexpected tensors ['model.layers.0.block_sparse_moe.experts.3.w1.weight'"),
])
def test_import_refuses_with_the_thing_named(hf_dirs, tmp_path, change, message):
    bad = _edited_copy(hf_dirs["single"], tmp_path / "bad", **change)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_hf(bad)


def test_import_refuses_a_shard_missing_from_the_index(hf_dirs, tmp_path):
    bad = _edited_copy(hf_dirs["sharded"], tmp_path / "bad")
    with open(os.path.join(bad, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["model.layers.2.self_attn.q_proj.weight"]
    os.remove(os.path.join(bad, shard))
    with pytest.raises(ValueError, match=f"shard '{shard}' named in .*index.json' does not exist"):
        load_hf(bad)


def test_import_refuses_an_index_that_points_to_the_wrong_shard(hf_dirs, tmp_path):
    bad = _edited_copy(hf_dirs["sharded"], tmp_path / "bad")
    path = os.path.join(bad, "model.safetensors.index.json")
    with open(path) as f:
        index = json.load(f)
    name = "model.norm.weight"
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][name])
    index["weight_map"][name] = wrong
    with open(path, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=f"tensor '{name}' is not in .*{wrong}', where the index says it is"):
        load_hf(bad)


def test_import_refuses_a_missing_tensor(hf_dirs, tmp_path):
    bad = _edited_copy(hf_dirs["single"], tmp_path / "bad")
    tensors = folder_tensors(bad)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensors \['model.layers.1.block_sparse_moe.experts.2.w3.weight'\]"):
        load_hf(bad)


# Without QK-norm Qwen3-MoE is no way out: each message names what Mixtral lacks, then what Qwen3-MoE lacks.
QWEN_NO = "Qwen3-MoE cannot express qk_norm='none' (Qwen3-MoE always norms each head)"


@pytest.mark.parametrize("moe, message", [
    ({"num_shared_experts": 1, "router_score_func": "sigmoid"},
     "Mixtral cannot express router_score_func='sigmoid' (its router is a softmax), num_shared_experts=1 (it has no "
     "shared expert); Qwen3-MoE cannot express router_score_func='sigmoid' (its router is a softmax), "
     "num_shared_experts=1 (it has no shared expert), qk_norm='none' (Qwen3-MoE always norms each head); "
     "Qwen2-MoE cannot express router_score_func='sigmoid' (its router is a softmax)"),
    ({"num_dense_layers": 1}, "Mixtral cannot express dense layers=[0] (every Mixtral layer is MoE); " + QWEN_NO),
    ({"moe_layer_freq": 2}, "Mixtral cannot express dense layers=[1] (every Mixtral layer is MoE); " + QWEN_NO),
    ({"router_score_func": "sigmoid"}, "Mixtral cannot express router_score_func='sigmoid' (its router is a softmax)"),
    ({"norm_topk_prob": False}, "Mixtral cannot express norm_topk_prob=False (Mixtral renormalises the top-k "
                                "weights); " + QWEN_NO),
])
def test_export_refuses_what_no_family_can_express(tmp_path, moe, message):
    with pytest.raises(ValueError, match=re.escape("cannot be exported: " + message)):
        save_hf(blues_model(**moe), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_export_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        save_hf(blues_model(), str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


# ----------------------------------------------------------------------------- CLI

def run_module(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "blues.cli.hf", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def test_cli_import_of_a_bad_folder_is_one_line(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = run_module("import", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "model_type='gpt2'" in r.stderr and not os.path.exists(tmp_path / "out")


def test_cli_import_then_export(hf_dirs, tmp_path):
    r = run_module("import", hf_dirs["sharded"], str(tmp_path / "blues"))
    assert r.returncode == 0, r.stderr
    model = Blues.from_pretrained(str(tmp_path / "blues")).eval()
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x).logits, load_hf(hf_dirs["sharded"]).eval()(x).logits)
    r = run_module("export", str(tmp_path / "blues"), "--hf", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    src, out = folder_tensors(hf_dirs["sharded"]), folder_tensors(tmp_path / "hf")
    assert sorted(out) == sorted(src) and all(torch.equal(out[k], src[k]) for k in src)
    r = run_module("export", str(tmp_path / "blues"), "--hf", str(tmp_path / "hf"))
    assert r.returncode == 2 and "exists and is not an empty folder" in r.stderr


def test_import_reads_the_folders_tokenizer(hf_dirs):
    from blues.data.hf_tokenizer import HFTokenizer
    model = load_hf(hf_dirs["single"]).eval()
    tok = model.tokenizer
    assert isinstance(tok, HFTokenizer) and tok.decode([tok.eot_id]) == "</s>"
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf_dirs["single"], "tokenizer.json"))
    assert tok.encode("the lazy fox jumps") == ref.encode("the lazy fox jumps", add_special_tokens=False)
    assert isinstance(model.generate("the quick", max_new_tokens=5, temperature=0), str)  # a text prompt works
    assert load_hf(hf_dirs["sharded"]).tokenizer is None  # no tokenizer.json there


def test_cli_import_keeps_the_tokenizer_and_export_writes_it(hf_dirs, tmp_path):
    assert run_module("import", hf_dirs["single"], str(tmp_path / "blues")).returncode == 0
    src = load_hf(hf_dirs["single"]).tokenizer
    model = Blues.from_pretrained(str(tmp_path / "blues"))
    assert model.tokenizer.fingerprint == src.fingerprint
    r = run_module("export", str(tmp_path / "blues"), "--hf", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    assert ref.encode("def f(x)", add_special_tokens=False) == src.encode("def f(x)")
    with open(tmp_path / "hf" / "tokenizer_config.json") as f:
        assert json.load(f)["eos_token"] == "</s>"


def test_import_refuses_a_tokenizer_larger_than_the_vocabulary(hf_dirs, tmp_path):
    shutil.copytree(hf_dirs["single"], tmp_path / "hf")
    hf_word_tokenizer(tmp_path / "hf", extra_tokens=300)  # more ids than the model's 211 rows
    with pytest.raises(ValueError, match=r"has \d+ ids .* but the model in .* has vocab_size=211"):
        load_hf(str(tmp_path / "hf"))


# ----------------------------------------------------------------------------- memory

_PEAK_SCRIPT = """
import json, re, sys, torch
torch.set_num_threads(1)
from blues.hf import load_hf
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
# The first meta-device op imports torch's meta kernels (about 900 modules, 80-150 MB here), once per
# process whatever the model's size: paid before the baseline, and reported apart.
start = status("VmRSS")
torch.empty(1, device="meta").normal_()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
    f.write("5")
model = load_hf(sys.argv[1], dtype=torch.bfloat16)
print(json.dumps({"growth": status("VmHWM") - before, "meta_import": before - start,
                  "bf16": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def test_bf16_import_peak_memory_is_near_one_bf16_copy(tmp_path):
    # ~150 MiB in fp32: large enough that the import's fixed costs (allocator arenas, first-use kernels: 10-20 MiB
    # measured) do not decide the comparison (at 42 MiB a CI run measured 39 MiB of growth).
    model = tiny_mixtral(vocab_size=2000, hidden_size=256, intermediate_size=2048, num_local_experts=8,
                         num_hidden_layers=3, num_attention_heads=8, initializer_range=0.02)
    model.save_pretrained(tmp_path / "hf")
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    del model
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "hf")], capture_output=True, text=True,
                       cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"fp32 size {fp32 / 2**20:.1f} MiB, bf16 copy {got['bf16'] / 2**20:.1f} MiB, "
          f"peak RSS growth {got['growth'] / 2**20:.1f} MiB (after torch's meta kernels, "
          f"{got['meta_import'] / 2**20:.0f} MiB once per process)")
    assert fp32 > 120 * 2**20
    # One bf16 copy is half the fp32 size; an import that went through fp32 (or kept the whole
    # file's pages mapped) would need at least the fp32 size. 0.75 leaves a quarter for the one
    # tensor being read and the allocator.
    assert got["growth"] < 0.75 * fp32


# ----------------------------------------------------------------------------- blues-train --init_from

@pytest.mark.slow
@pytest.mark.distributed
def test_an_imported_mixtral_trains_with_expert_parallelism_and_exports_back(tmp_path):
    """The issue's acceptance point: a Mixtral folder written by transformers, `blues-train --init_from`
    under ZeRO 2 with ep_size=2 on 2 CPU ranks (the real deepspeed launcher) for 20 steps, then
    blues-export back to a folder transformers loads. Each EP rank loads only its own experts before
    DeepSpeed takes the model: the first step's loss (the mean of both ranks') is the imported
    model's on the same two batches."""
    from blues.common import free_port
    from blues.data.loader import TokenLoader
    from blues.data.prepare import prepare
    from blues.data.tokenizer import Tokenizer
    from blues.train.ds_config import DS_CONFIG_DIR
    prepare(str(tmp_path / "data"), progress=False)
    vocab = Tokenizer.load(str(tmp_path / "data")).n_vocab
    tiny_mixtral(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                 max_position_embeddings=32).save_pretrained(tmp_path / "hf")
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    p = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "blues.train",
                        "--init_from", str(tmp_path / "hf"), "--deepspeed_config",
                        os.path.join(DS_CONFIG_DIR, "zero2.json"), "ep_size=2", "moe_backend=torch",
                        f"data_dir={tmp_path / 'data'}", f"out_dir={tmp_path / 'out'}", "micro_batch_size=4",
                        "max_steps=20", "warmup_steps=0", "lr=3e-3", "min_lr=3e-4", "log_interval=1",
                        "eval_interval=100", "save_interval=100", "--progress", "off", "--prompt", ""],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert "ZeRO 2 | moe_backend=torch ep_size=2" in out, out[-3000:]
    losses = [float(line.split("| loss ")[1].split()[0]) for line in out.splitlines() if "| loss " in line
              and line.split("] ")[-1].startswith("step ")]
    assert len(losses) == 20, out[-3000:]

    imported = load_hf(str(tmp_path / "hf")).train()  # router noise and dropout are off in an import
    with torch.no_grad():
        ref = sum(imported(*TokenLoader(str(tmp_path / "data"), "train", block_size=32, batch_size=4, seed=1337,
                                        rank=r, world_size=2).next_batch()).loss.item() for r in (0, 1)) / 2
    print(f"EP=2 ZeRO 2 from an imported Mixtral: step 1 loss {losses[0]:.4f} (imported model: {ref:.6f}), "
          f"step 20 loss {losses[-1]:.4f}")
    assert losses[0] == pytest.approx(ref, abs=1e-4), (losses[0], ref)  # printed to 4 places; EP sums in another order
    assert min(losses[-5:]) < losses[0] - 0.1, losses

    r = run_module("export", str(tmp_path / "out" / "model"), "--hf", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    trained = Blues.from_pretrained(str(tmp_path / "out" / "model")).eval()
    hf = hf_load(tmp_path / "back")
    x = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(trained(x).logits, hf(x).logits, atol=ATOL, rtol=0)
    before, after = folder_tensors(tmp_path / "hf"), folder_tensors(tmp_path / "back")
    for e in (0, 3):  # one expert of each EP rank trained and came back
        name = f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"
        assert not torch.equal(before[name], after[name]), name


# ----------------------------------------------------------------------------- Qwen3-MoE

# Two configs between them cover every Qwen3-MoE difference from Mixtral: head_dim 16 with 4 heads
# on a width of 48 (queries 64 wide), per-head QK-norm, attention biases, dense layers by
# mlp_only_layers and by decoder_sparse_step (size intermediate_size, not the experts'), and
# norm_topk_prob both ways (Qwen3MoeConfig's default is false).
QWEN_CASES = {
    "bias_dense1_unnormalised": dict(attention_bias=True, mlp_only_layers=[1], norm_topk_prob=False),
    "step2_normalised": dict(decoder_sparse_step=2, norm_topk_prob=True, num_hidden_layers=4),
}


def tiny_qwen3_moe(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=56, moe_intermediate_size=40, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
               max_position_embeddings=64, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**cfg)).eval()
    _move_vectors(model)
    return model


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    for name, kw in QWEN_CASES.items():
        tiny_qwen3_moe(**kw).save_pretrained(root / name)
    return {p.name: str(p) for p in root.iterdir()}


def _agrees_with_transformers(model, hf, vocab=VOCAB):
    """Logits at several lengths within ATOL, CE equal, 20 greedy tokens equal (both fp32, eval)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for B, T in zip((2, 3, 2), LENGTHS):
            x = torch.randint(0, vocab, (B, T), generator=g)
            torch.testing.assert_close(model(x).logits, hf(x).logits, atol=ATOL, rtol=0)
        x = torch.randint(0, vocab, (2, 33), generator=g)
        ce = model(x[:, :-1], targets=x[:, 1:]).ce_loss
        torch.testing.assert_close(ce, hf(x, labels=x).loss, atol=1e-5, rtol=0)  # a mean of 64 such logits
    prompt = torch.randint(0, vocab, (2, 5), generator=g)
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 5:]
    assert model.generate(prompt, max_new_tokens=20, temperature=0) == ref.tolist()


@pytest.mark.parametrize("case", list(QWEN_CASES))
def test_qwen3_moe_import_equals_transformers(qwen_dirs, case):
    model = load_hf(qwen_dirs[case]).eval()
    mc, m = model.config.model, model.config.moe
    assert (mc.head_dim, mc.qk_norm, mc.attention_bias) == (16, "head", case.startswith("bias"))
    assert m.dense_layers == ([1] if case.startswith("bias") else [0, 2])  # step 2: layers 1 and 3 are MoE
    assert m.norm_topk_prob is QWEN_CASES[case]["norm_topk_prob"] and m.dense_hidden == 56
    _agrees_with_transformers(model, hf_load(qwen_dirs[case]))


@pytest.mark.parametrize("case", list(QWEN_CASES))
def test_qwen3_moe_round_trip_gives_the_same_tensors(qwen_dirs, tmp_path, case):
    save_hf(load_hf(qwen_dirs[case]), str(tmp_path / "out"))
    src, out = folder_tensors(qwen_dirs[case]), folder_tensors(tmp_path / "out")
    assert sorted(out) == sorted(src)
    for name in src:
        assert torch.equal(out[name], src[name]), name
    hf = hf_load(tmp_path / "out")  # transformers reads the written config back as the same model
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    for key in ("head_dim", "attention_bias", "norm_topk_prob", "intermediate_size", "moe_intermediate_size",
                "num_experts"):
        assert getattr(hf.config, key) == getattr(hf_load(qwen_dirs[case]).config, key), key
    assert [type(layer.mlp).__name__ for layer in hf.model.layers] == \
        [type(layer.mlp).__name__ for layer in hf_load(qwen_dirs[case]).model.layers]


def test_a_blues_model_with_qwen3_features_exports_as_qwen3_moe(tmp_path):
    torch.manual_seed(0)
    cfg = BluesConfig(model=ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=3, n_head=4, n_embd=48,
                                        num_kv_heads=2, init_std=0.1, head_dim=20, qk_norm="head",
                                        attention_bias=True),
                      moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=40, norm_topk_prob=False,
                                    num_dense_layers=1, dense_ffn_size=56))
    model = Blues(cfg).eval()
    _move_vectors(model)
    save_hf(model, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.config.mlp_only_layers == [0]
    _agrees_with_transformers(model, hf)


def test_qwen3_moe_refusals_name_the_field(qwen_dirs, tmp_path):
    bad = _edited_copy(qwen_dirs["step2_normalised"], tmp_path / "bad", use_sliding_window=True, sliding_window=8)
    with pytest.raises(ValueError, match=re.escape("sliding_window=8 cannot be expressed")):
        load_hf(bad)
    # a window that is off (Qwen3MoeConfig's default use_sliding_window false) is no refusal
    ok = _edited_copy(qwen_dirs["step2_normalised"], tmp_path / "ok", use_sliding_window=False, sliding_window=8)
    assert load_hf(ok).config.model.qk_norm == "head"
    m = load_hf(qwen_dirs["step2_normalised"])
    m.config.moe.num_shared_experts = 1  # what a Qwen2-MoE-style model would need (not exportable yet)
    with pytest.raises(ValueError, match=re.escape("Qwen3-MoE cannot express num_shared_experts=1")):
        save_hf(m, str(tmp_path / "out"))


def test_load_weights_into_reads_a_blues_folder_and_refuses_other_shapes(tmp_path):
    from blues.hf import load_weights_into
    src = blues_model(balance_bias_rate=0.01)
    src.blocks[0].mlp.selection_bias = torch.tensor([0.5, -0.5, 0.0, 0.25])  # what balancing left
    src.save_pretrained(str(tmp_path / "m"))
    dst = Blues(src.config.replace(init_std=0.5)).eval()  # another draw (the seed moved on)
    load_weights_into(dst, str(tmp_path / "m"))
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(dst.blocks[0].mlp.selection_bias, src.blocks[0].mlp.selection_bias)
    off = Blues(src.config.replace(balance_bias_rate=0.0))  # balancing off: the saved bias is not needed
    load_weights_into(off, str(tmp_path / "m"))
    assert torch.equal(off.tok_emb.weight, src.tok_emb.weight)
    with pytest.raises(ValueError, match=r"differs from .* in the weights' shapes: expert_ffn_size: 40 -> 24"):
        load_weights_into(Blues(src.config.replace(expert_ffn_size=24)), str(tmp_path / "m"))


def test_export_refuses_a_vision_model(tmp_path):
    model = Blues(blues_model().config.replace(vision_enabled=True, vocab_size=VOCAB, image_token_id=VOCAB - 1,
                                               image_size=16, patch_size=8))
    with pytest.raises(ValueError, match=r"vision_enabled=True \(it is a text-only model\)"):
        save_hf(model, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


# ----------------------------------------------------------------------------- Qwen2-MoE
# A gated shared expert, biases on q, k, v only, dense layers, top-k weights not renormalised.

def tiny_qwen2_moe(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=56, moe_intermediate_size=40,
               shared_expert_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.1,
               mlp_only_layers=[1], norm_topk_prob=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**cfg)).eval()
    _move_vectors(model)
    return model


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2") / "hf"
    tiny_qwen2_moe().save_pretrained(path)
    return str(path)


def test_qwen2_moe_import_equals_transformers(qwen2_dir):
    model = load_hf(qwen2_dir).eval()
    mc, m = model.config.model, model.config.moe
    assert (mc.qkv_bias, mc.attention_bias, mc.qk_norm) == (True, False, "none")
    assert (m.num_shared_experts, m.shared_hidden, m.shared_expert_gate) == (1, 24, True)
    assert m.dense_layers == [1] and m.norm_topk_prob is False and model.blocks[0].attn.wo.bias is None
    _agrees_with_transformers(model, hf_load(qwen2_dir))


def test_qwen2_moe_round_trip_gives_the_same_tensors(qwen2_dir, tmp_path):
    save_hf(load_hf(qwen2_dir), str(tmp_path / "out"))
    src, out = folder_tensors(qwen2_dir), folder_tensors(tmp_path / "out")
    assert sorted(out) == sorted(src)
    for name in src:
        assert torch.equal(out[name], src[name]), name
    hf = hf_load(tmp_path / "out")
    assert type(hf).__name__ == "Qwen2MoeForCausalLM" and hf.config.shared_expert_intermediate_size == 24


@pytest.mark.parametrize("gated", [pytest.param(True, id="gated (Qwen2-MoE's own)"),
                                   pytest.param(False, id="ungated: a zero gate and a doubled down projection")])
def test_blues_shared_experts_export_as_qwen2_moe(tmp_path, gated):
    torch.manual_seed(0)
    cfg = BluesConfig(model=ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=48,
                                        num_kv_heads=2, init_std=0.1, qkv_bias=True),
                      moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=40, num_shared_experts=2,
                                    shared_expert_gate=gated))
    model = Blues(cfg).eval()
    _move_vectors(model)
    save_hf(model, str(tmp_path / "hf"))
    hf = hf_load(tmp_path / "hf")
    assert type(hf).__name__ == "Qwen2MoeForCausalLM" and hf.config.shared_expert_intermediate_size == 80
    _agrees_with_transformers(model, hf)
    if not gated:
        assert torch.equal(hf.model.layers[0].mlp.shared_expert_gate.weight, torch.zeros(1, 48))


def test_qwen2_moe_refuses_what_it_cannot_express(tmp_path):
    torch.manual_seed(0)
    cfg = BluesConfig(model=ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=48,
                                        num_kv_heads=2, attention_bias=True),
                      moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=40, num_shared_experts=1))
    with pytest.raises(ValueError, match=r"Qwen2-MoE cannot express attention_bias=True \(Qwen2-MoE's o projection"):
        save_hf(Blues(cfg), str(tmp_path / "hf"))


def test_config_validation_names_the_shared_expert_fields():
    with pytest.raises(ValueError, match="num_shared_experts=0 is invalid: must be >= 1 when shared_expert_ffn_size"):
        MoEConfig(shared_expert_ffn_size=32)
    with pytest.raises(ValueError, match="qkv_bias=True is invalid: attention_bias=true biases q, k and v already"):
        ModelConfig(attention_bias=True, qkv_bias=True)


# ----------------------------------------------------------------------------- OLMoE
# QK-norm over the whole q and k projections, clip_qkv, biases on every projection, every layer MoE.

def tiny_olmoe(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
               initializer_range=0.1, attention_bias=True, clip_qkv=0.6, norm_topk_prob=False, bos_token_id=None,
               eos_token_id=None, pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**cfg)).eval()
    _move_vectors(model)
    return model


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("olmoe") / "hf"
    tiny_olmoe().save_pretrained(path)
    return str(path)


def test_olmoe_import_equals_transformers(olmoe_dir):
    model = load_hf(olmoe_dir).eval()
    mc, m = model.config.model, model.config.moe
    assert (mc.qk_norm, mc.clip_qkv, mc.attention_bias, m.expert_ffn_size, m.norm_topk_prob) == \
        ("full", 0.6, True, 40, False)
    assert model.blocks[0].attn.k_norm.weight.shape == (2 * 12,)  # over the whole key projection
    x = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # the clamp bites here: without it the logits move past ATOL
        unclipped = Blues(model.config.replace(clip_qkv=None)).eval()
        unclipped.load_state_dict(model.state_dict())
        assert (unclipped(x).logits - model(x).logits).abs().max() > 10 * ATOL
    _agrees_with_transformers(model, hf_load(olmoe_dir))


def test_olmoe_round_trip_gives_the_same_tensors(olmoe_dir, tmp_path):
    save_hf(load_hf(olmoe_dir), str(tmp_path / "out"))
    src, out = folder_tensors(olmoe_dir), folder_tensors(tmp_path / "out")
    assert sorted(out) == sorted(src)
    for name in src:
        assert torch.equal(out[name], src[name]), name
    hf = hf_load(tmp_path / "out")
    assert type(hf).__name__ == "OlmoeForCausalLM" and hf.config.clip_qkv == 0.6


# ----------------------------------------------------------------------------- RoPE scaling and sliding window
# Against transformers' Mixtral configured with each, at lengths past the original context (16) and the
# window (8); and Blues' cached decoding against its own recomputation.

def _cached_decoding_equals_recomputing(model, vocab=VOCAB):
    x = torch.randint(0, vocab, (2, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_kv_cache(2)
        parts = [model(x[:, :10], kv_cache=cache).logits]  # a prefill, then one token at a time
        parts += [model(x[:, i:i + 1], kv_cache=cache).logits for i in range(10, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)  # fp32, another sum order


@pytest.mark.parametrize("rope", [
    pytest.param({"rope_type": "linear", "factor": 2.0}, id="linear"),
    pytest.param({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}, id="llama3: every branch at head_dim 12"),
    pytest.param({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, id="yarn"),
    pytest.param({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8,
                  "mscale": 1.0, "mscale_all_dim": 0.5}, id="yarn with mscale"),
])
def test_rope_scaling_equals_transformers(tmp_path, rope):
    # head_dim given: transformers 5.22's yarn reads config.head_dim, None unless set (a TypeError there)
    tiny_mixtral(rope_parameters={"rope_theta": 1e4, **rope}, head_dim=12).save_pretrained(tmp_path / "hf")
    model = load_hf(str(tmp_path / "hf")).eval()
    assert model.config.model.rope_scaling["rope_type"] == rope["rope_type"]
    _agrees_with_transformers(model, hf_load(tmp_path / "hf"))
    _cached_decoding_equals_recomputing(model)
    plain = Blues(model.config.replace(rope_scaling=None)).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, VOCAB, (1, 33), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():  # the scaling matters at these lengths
        assert (plain(x).logits - model(x).logits).abs().max() > 10 * ATOL


def test_sliding_window_equals_transformers(tmp_path):
    tiny_mixtral(sliding_window=8).save_pretrained(tmp_path / "hf")
    model = load_hf(str(tmp_path / "hf")).eval()
    assert model.config.model.sliding_window == 8
    _agrees_with_transformers(model, hf_load(tmp_path / "hf"))  # 33 tokens, and 25 generated: past the window
    _cached_decoding_equals_recomputing(model)
    for backend in ("math", "sdpa"):  # the two CPU attention paths build the same mask
        m = Blues(model.config.replace(attn_backend=backend)).eval()
        m.load_state_dict(model.state_dict())
        x = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            torch.testing.assert_close(m(x).logits, model(x).logits, atol=1e-5, rtol=0)
    save_hf(model, str(tmp_path / "out"))  # Mixtral expresses the window: it goes back out
    assert hf_load(tmp_path / "out").config.sliding_window == 8
