"""Sparse upcycling (blues.upcycle, blues-upcycle): the step-0 equality, the copies, noise,
Drop-Upcycling, the CLI and its refusals. Real Blues models from tiny configs (torch, 1 thread)."""
import pytest
import torch

from blues.cli.upcycle import main
from blues.config import BluesConfig
from blues.model import Blues
from blues.upcycle import upcycle

torch.set_num_threads(1)

# a dense model: 2 SwiGLU layers of 48 hidden units, vocabulary of 101
CFG = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32, num_kv_heads=2, num_dense_layers=2,
           dense_ffn_size=48)


def dense_model(**kw) -> Blues:
    torch.manual_seed(0)
    return Blues(BluesConfig.from_dict({**CFG, **kw})).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG["vocab_size"], (3, CFG["block_size"]), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("E,K", [pytest.param(8, 2, id="E8-K2"), pytest.param(4, 4, id="K=E"),
                                 pytest.param(1, 1, id="one expert")])
def test_step0_output_equals_the_dense_model(E, K):
    # Every expert the same MLP, the k weights renormalised to sum 1: sum_k w_k MLP(x) = MLP(x).
    dense = dense_model()
    moe = upcycle(dense, E, K).model
    x = tokens()
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=0, atol=1e-5)  # fp32, another sum order
    assert moe.config.moe.num_experts == E and moe.config.moe_layer_ids() == [0, 1]


def test_step0_equality_holds_in_training_mode_with_router_noise():
    # Noise changes which experts are chosen, not the sum of their weights: still the dense function.
    dense = dense_model()
    moe = upcycle(dense, 8, 2, overrides=["router_noise_std=1.0"]).model.train()
    x = tokens()
    torch.manual_seed(5)
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=0, atol=1e-5)


def test_experts_are_exact_copies_and_other_weights_are_unchanged():
    dense = dense_model()
    moe = upcycle(dense, 4, 2).model
    for i in range(2):
        d, ex = dense.blocks[i].mlp, moe.blocks[i].mlp.experts
        for name in ("w_gate", "w_up", "w_down"):
            w = getattr(d, name).weight.t()  # (D, F) or (F, D)
            assert all(torch.equal(getattr(ex, name)[e], w) for e in range(4)), name
    dsd, msd = dense.export_state_dict(), moe.export_state_dict()
    for k, v in dsd.items():
        if ".mlp." not in k:
            assert torch.equal(msd[k], v), k


def test_noise_is_relative_to_each_matrix_and_independent_per_expert():
    dense = dense_model()
    moe = upcycle(dense, 8, 2, noise_std=0.1, seed=3).model
    w = dense.blocks[0].mlp.w_up.weight.t()  # (D, F)
    copies = moe.blocks[0].mlp.experts.w_up  # (E, D, F)
    rel = (copies - w) / w.std()
    assert abs(rel.std().item() - 0.1) < 0.01  # 8 * 32 * 48 draws: the sample std is within 1% of 0.1
    assert not torch.equal(copies[0], copies[1])


def test_drop_upcycling_reinitialises_exactly_that_share_of_each_experts_hidden_units():
    dense = dense_model()
    res = upcycle(dense, 4, 2, drop_ratio=0.25, seed=7)
    assert res.reinitialised == 12  # round(0.25 * 48)
    d, ex = dense.blocks[1].mlp, res.model.blocks[1].mlp.experts
    chosen = []
    for e in range(4):
        changed_gate = (ex.w_gate[e] != d.w_gate.weight.t()).any(dim=0)  # (F,) columns
        changed_up = (ex.w_up[e] != d.w_up.weight.t()).any(dim=0)
        changed_down = (ex.w_down[e] != d.w_down.weight.t()).any(dim=1)  # (F,) rows
        assert torch.equal(changed_gate, changed_up) and torch.equal(changed_gate, changed_down)
        assert int(changed_gate.sum()) == 12
        chosen.append(tuple(torch.nonzero(changed_gate).flatten().tolist()))
    assert len(set(chosen)) > 1, "every expert re-initialised the same units"


def test_upcycling_is_seeded_and_leaves_the_callers_rng_alone():
    dense = dense_model()
    torch.manual_seed(11)
    before = torch.rand(1)
    torch.manual_seed(11)
    a = upcycle(dense, 4, 2, noise_std=0.05, seed=2).model
    after = torch.rand(1)
    b = upcycle(dense, 4, 2, noise_std=0.05, seed=2).model
    assert torch.equal(before, after)
    for (k, va), vb in zip(a.export_state_dict().items(), b.export_state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("kw,match", [
    pytest.param(dict(num_experts=2, top_k=3), "top_k=3 is invalid: must be <= num_experts=2", id="top_k > E"),
    pytest.param(dict(num_experts=4, top_k=2, drop_ratio=1.5), "drop_ratio=1.5 is invalid", id="drop_ratio"),
    pytest.param(dict(num_experts=4, top_k=2, noise_std=-1.0), "noise_std=-1.0 is invalid", id="noise"),
    pytest.param(dict(num_experts=4, top_k=2, overrides=["expert_ffn_size=8"]), "must not change expert_ffn_size",
                 id="override of a field upcycling sets"),
])
def test_refusals_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        upcycle(dense_model(), **kw)


def test_a_model_with_moe_layers_is_refused():
    with pytest.raises(ValueError, match=r"has MoE layers already \(blocks \[1\]\)"):
        upcycle(dense_model(num_dense_layers=1, num_experts=4, top_k=2, expert_ffn_size=16), 4, 2)


# ----------------------------------------------------------------------------- the CLI

def saved_dense(tmp_path) -> str:
    from blues.data.tokenizer import default_tokenizer
    tok = default_tokenizer()
    path = str(tmp_path / "dense")
    dense_model(vocab_size=tok.n_vocab).save_pretrained(path, tokenizer=tok)
    return path


def test_cli_upcycles_checks_step0_and_saves(tmp_path, capsys):
    src, out = saved_dense(tmp_path), str(tmp_path / "moe")
    assert main([src, out, "--num_experts", "4", "--top_k", "2", "router_noise_std=0"]) == 0
    text = capsys.readouterr().out
    assert "upcycled blocks 0-1: 4 experts of 48 hidden units each, top-2" in text
    assert "step-0 check: max |logits - dense logits| = " in text and f"saved {out}" in text
    moe, dense = Blues.from_pretrained(out).eval(), Blues.from_pretrained(src).eval()
    assert moe.tokenizer is not None and moe.config.moe.router_noise_std == 0
    x = torch.randint(0, dense.config.model.vocab_size, (2, 16))
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=0, atol=1e-5)
    moe.generate("The", max_new_tokens=4, temperature=0)


def test_cli_step0_failure_exits_1_and_saves_nothing(tmp_path, capsys):
    # A capacity of 1 slot per expert drops most assignments: not the dense function any more.
    src, out = saved_dense(tmp_path), tmp_path / "moe"
    assert main([src, str(out), "--num_experts", "4", "--top_k", "2", "capacity_factor=0.01"]) == 1
    assert "does not compute the dense model's function" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("extra,match", [
    pytest.param(["--num_experts", "2", "--top_k", "3"], "top_k=3 is invalid", id="top_k > E"),
    pytest.param(["--num_experts", "4", "--top_k", "2", "--drop_ratio", "2"], "drop_ratio=2.0 is invalid",
                 id="drop_ratio"),
])
def test_cli_refusals_are_one_line_exit_2(tmp_path, capsys, extra, match):
    src = saved_dense(tmp_path)
    assert main([src, str(tmp_path / "moe"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err and err.startswith("blues-upcycle: error:")


def test_cli_refuses_a_non_empty_out(tmp_path, capsys):
    src, out = saved_dense(tmp_path), tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([src, str(out), "--num_experts", "4", "--top_k", "2"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
