"""blues.checkpoint without a process group: the commit protocol, finding what to resume,
compatibility checks, RNG round trips. A fake engine stands in for DeepSpeed's save."""
import os
import random

import numpy as np
import pytest
import torch

from blues import checkpoint as ck
from blues.config import tiny


class FakeEngine:
    """Writes one file per save, like DeepSpeed's engine would write its shards."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at
        self.saved = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # the commit is ours, never DeepSpeed's
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(client_state, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))
        if tag == self.fail_at:
            raise KeyboardInterrupt("killed mid-write")
        self.saved.append(tag)


def _save(engine, out, step, keep_last=3):
    return ck.save(engine, str(out), step, {"step": step}, {"step": step, "config": tiny().to_dict()}, keep_last)


def test_latest_moves_only_after_the_commit(tmp_path):
    eng = FakeEngine(fail_at=ck.tag_for(20))
    _save(eng, tmp_path, 10)
    d = ck.checkpoint_dir(str(tmp_path))
    assert ck.latest_tag(d) == "step_00000010"
    with pytest.raises(KeyboardInterrupt):
        _save(eng, tmp_path, 20)
    # the interrupted save left files but no marker: latest still names step 10, resume finds step 10
    assert os.path.isfile(os.path.join(d, "step_00000020", "mp_rank_00_model_states.pt"))
    assert not ck.is_complete(os.path.join(d, "step_00000020"))
    assert ck.latest_tag(d) == "step_00000010"
    assert ck.find_resume("auto", str(tmp_path)) == (d, "step_00000010")
    with pytest.raises(ValueError, match="incomplete"):
        ck.find_resume(os.path.join(d, "step_00000020"), str(tmp_path))
    # the next complete save removes the dead folder
    _save(FakeEngine(), tmp_path, 30)
    assert not os.path.exists(os.path.join(d, "step_00000020"))


def test_latest_naming_an_incomplete_folder_is_not_trusted(tmp_path):
    d = tmp_path / "checkpoints"
    (d / "step_00000005").mkdir(parents=True)
    (d / "latest").write_text("step_00000005")
    assert ck.latest_tag(str(d)) is None
    assert ck.find_resume("auto", str(tmp_path)) is None


def test_keep_last(tmp_path):
    eng = FakeEngine()
    for s in (1, 2, 3, 4, 5):
        _save(eng, tmp_path, s, keep_last=2)
    assert ck.complete_tags(ck.checkpoint_dir(str(tmp_path))) == ["step_00000004", "step_00000005"]


def test_client_state_carries_rng(tmp_path):
    _save(FakeEngine(), tmp_path, 7)
    state = torch.load(os.path.join(tmp_path, "checkpoints", "step_00000007", "mp_rank_00_model_states.pt"),
                       weights_only=False)
    assert state["blues"]["step"] == 7
    assert len(state["blues"]["rng"]) == 1 and set(state["blues"]["rng"][0]) >= {"python", "numpy", "torch"}
    meta = ck.read_meta(os.path.join(tmp_path, "checkpoints", "step_00000007"))
    assert meta["step"] == 7


def test_rng_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    s = ck.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ck.set_rng_state(s)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_find_resume_variants(tmp_path):
    assert ck.find_resume(None, str(tmp_path)) is None
    assert ck.find_resume("none", str(tmp_path)) is None
    assert ck.find_resume("auto", str(tmp_path)) is None  # nothing saved yet: fresh start
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint there"):
        ck.find_resume(str(empty), str(tmp_path))
    with pytest.raises(ValueError, match="no such folder"):
        ck.find_resume(str(tmp_path / "nope"), str(tmp_path))
    _save(FakeEngine(), tmp_path / "run", 3)
    d = os.path.join(tmp_path, "run", "checkpoints")
    for arg in (str(tmp_path / "run"), d, os.path.join(d, "step_00000003")):
        assert ck.find_resume(arg, "elsewhere") == (d, "step_00000003")


def test_incompatible_resume_lists_the_fields():
    saved = tiny()
    with pytest.raises(ValueError, match=r"n_layer: 2 -> 3; n_embd: 128 -> 256; num_experts: 4 -> 8"):
        ck.check_resume_config(saved, saved.replace(n_layer=3, n_embd=256, num_experts=8))
    with pytest.raises(ValueError, match=r"vocab_size: 4096 -> 8192"):
        ck.check_resume_config(saved, saved.replace(vocab_size=8192))
    with pytest.raises(ValueError, match=r"ep_size: 1 -> 2"):
        ck.check_resume_config(saved.replace(moe_backend="deepspeed"),
                               saved.replace(moe_backend="deepspeed", ep_size=2))
    with pytest.raises(ValueError, match=r"moe_backend: 'torch' -> 'deepspeed'"):
        ck.check_resume_config(saved.replace(moe_backend="torch"), saved.replace(moe_backend="deepspeed"))


def test_compatible_changes_are_listed():
    saved = tiny()
    changes = ck.check_resume_config(saved, saved.replace(lr=5e-3, max_steps=999))
    assert changes == ["max_steps: 200 -> 999", "lr: 0.002 -> 0.005"]


def test_check_resume_world_stage_tokenizer():
    meta = {"config": tiny().to_dict(), "tokenizer_sha256": "a" * 64, "world_size": 2, "zero_stage": 2}
    assert ck.check_resume(meta, tiny(), "a" * 64, 2, 2) == []
    with pytest.raises(ValueError, match=r"tokenizer sha256 aaaaaaaaaaaa\.\.\. -> bbbbbbbbbbbb\.\.\."):
        ck.check_resume(meta, tiny(), "b" * 64, 2, 2)
    with pytest.raises(ValueError, match=r"world size 2 -> 4 \(ranks\); ZeRO stage 2 -> 3"):
        ck.check_resume(meta, tiny(), "a" * 64, 4, 3)
