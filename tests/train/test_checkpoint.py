"""blues.train.checkpoint without a process group: the commit protocol, finding what to resume,
compatibility checks, RNG round trips. A fake engine stands in for DeepSpeed's save."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from blues.presets import tiny
from blues.train import checkpoint as ck
from blues.train import resume_check as rc


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

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
        # as DeepSpeed does: torch.load of the shard, whatever is wrong with it raises from in there
        path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
        return path, torch.load(path, weights_only=False)


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
    saved = tiny().replace(num_experts=4)
    with pytest.raises(ValueError, match=r"n_layer: 2 -> 3; n_embd: 128 -> 256; num_experts: 4 -> 8"):
        rc.check_resume_config(saved, saved.replace(n_layer=3, n_embd=256, num_experts=8))
    with pytest.raises(ValueError, match=r"vocab_size: 4096 -> 8192"):
        rc.check_resume_config(saved, saved.replace(vocab_size=8192))
    with pytest.raises(ValueError, match=r"dtype: 'fp32' -> 'bf16'"):  # ep_size may change: test_reshard.py
        rc.check_resume_config(saved, saved.replace(dtype="bf16"))
    with pytest.raises(ValueError, match=r"moe_backend: 'torch' -> 'deepspeed'"):
        rc.check_resume_config(saved.replace(moe_backend="torch"),
                               saved.replace(moe_backend="deepspeed", balance_bias_rate=0.0))


def test_compatible_changes_are_listed():
    saved = tiny().replace(lr=2e-3, max_steps=200)
    changes = rc.check_resume_config(saved, saved.replace(lr=5e-3, max_steps=999))
    assert changes == ["max_steps: 200 -> 999", "lr: 0.002 -> 0.005"]


def test_check_resume_world_stage_tokenizer():
    meta = {"config": tiny().to_dict(), "tokenizer_sha256": "a" * 64, "world_size": 2, "zero_stage": 2,
            "expert_group": "ep_size_1"}
    assert rc.check_resume(meta, tiny(), "a" * 64, 2, 2) == []
    with pytest.raises(ValueError, match=r"tokenizer sha256 aaaaaaaaaaaa\.\.\. -> bbbbbbbbbbbb\.\.\."):
        rc.check_resume(meta, tiny(), "b" * 64, 2, 2)
    with pytest.raises(ValueError, match=r"world size 2 -> 4 needs ZeRO 1 or 2 at both ends .*; ZeRO stage 2 -> 3"):
        rc.check_resume(meta, tiny(), "a" * 64, 4, 3)


def test_checkpoint_without_the_expert_group_is_refused():
    """A checkpoint written before issue 10 keeps the stacked experts in the dense decay group (its marker
    has no expert_group); the optimizer now has the group ep_size_N, so DeepSpeed would load the wrong
    partitions: refused, with what to do. moe_backend=deepspeed kept its groups: not refused."""
    meta = {"config": tiny().to_dict(), "tokenizer_sha256": "a" * 64, "world_size": 2, "zero_stage": 2}
    with pytest.raises(ValueError, match=r"cannot resume: the checkpoint keeps the expert weights in the dense "
                                         r"optimizer group .* own group 'ep_size_1': start a new run"):
        rc.check_resume(meta, tiny(), "a" * 64, 2, 2)
    ds = tiny().replace(moe_backend="deepspeed", balance_bias_rate=0.0)
    assert rc.check_resume(dict(meta, config=ds.to_dict()), ds, "a" * 64, 2, 2) == []


# ----------------------------------------------------------------------------- where a run starts (issue 9)

def _run_with(tmp_path, steps):
    for s in steps:
        _save(FakeEngine(), tmp_path, s, keep_last=10)
    return ck.checkpoint_dir(str(tmp_path))


def test_auto_without_latest_resumes_from_the_newest_complete(tmp_path):
    """`latest` gone but complete checkpoints there: starting from step 0 would later overwrite them."""
    d = _run_with(tmp_path, (10, 20))
    os.remove(os.path.join(d, "latest"))
    notes = []
    assert ck.find_resume("auto", str(tmp_path), say=notes.append) == (d, "step_00000020")
    assert len(notes) == 1 and "there is no `latest` file" in notes[0], notes
    assert "resuming from the newest complete checkpoint step_00000020" in notes[0]


def test_auto_with_dangling_latest_resumes_from_the_newest_complete(tmp_path):
    d = _run_with(tmp_path, (10, 20, 30))
    shutil.rmtree(os.path.join(d, "step_00000030"))  # `latest` still names it
    notes = []
    assert ck.find_resume("auto", str(tmp_path), say=notes.append) == (d, "step_00000020")
    assert "`latest` names step_00000030, which does not exist" in notes[0]
    assert "(complete: step_00000010, step_00000020)" in notes[0]


def test_auto_prefers_a_later_complete_checkpoint_than_latest(tmp_path):
    """A save killed between its marker and moving `latest` left a complete checkpoint `latest` does
    not name yet: resuming from `latest` would overwrite it."""
    d = _run_with(tmp_path, (10, 20))
    with open(os.path.join(d, "latest"), "w") as f:
        f.write("step_00000010")
    notes = []
    assert ck.find_resume("auto", str(tmp_path), say=notes.append) == (d, "step_00000020")
    assert "`latest` names step_00000010 but a later checkpoint is complete" in notes[0]


def test_auto_in_a_fresh_out_dir_says_nothing(tmp_path):
    notes = []
    assert ck.find_resume("auto", str(tmp_path), say=notes.append) is None
    assert notes == []


def test_resume_folder_with_dangling_latest(tmp_path):
    """--resume DIR whose `latest` names a missing tag: the newest complete one, the note names the
    dangling tag and the complete ones; with none complete, the error names the dangling tag."""
    d = _run_with(tmp_path / "run", (10, 20))
    with open(os.path.join(d, "latest"), "w") as f:
        f.write("step_00000030")
    notes = []
    assert ck.find_resume(str(tmp_path / "run"), str(tmp_path / "new"), say=notes.append) == (d, "step_00000020")
    assert "`latest` names step_00000030, which does not exist" in notes[0]
    assert "(complete: step_00000010, step_00000020)" in notes[0]
    empty = tmp_path / "other" / "checkpoints"
    empty.mkdir(parents=True)
    (empty / "latest").write_text("step_00000007")
    with pytest.raises(ValueError, match=r"no complete checkpoint there \(`latest` names step_00000007, which does "
                                         r"not exist, and no checkpoint there is complete"):
        ck.find_resume(str(tmp_path / "other"), str(tmp_path / "new"))


def test_a_start_that_would_overwrite_complete_checkpoints_is_refused(tmp_path):
    d = _run_with(tmp_path, (10, 20, 30))
    with pytest.raises(ValueError, match=r"starting from step 0 \(--resume none\) would overwrite or delete the "
                                         r"complete checkpoint\(s\) step_00000010, step_00000020, step_00000030"):
        ck.find_resume("none", str(tmp_path))
    with pytest.raises(ValueError, match=r"step_00000010 would overwrite or delete the complete checkpoint\(s\) "
                                         r"step_00000020, step_00000030"):
        ck.find_resume(os.path.join(d, "step_00000010"), str(tmp_path))
    assert ck.find_resume("none", str(tmp_path / "elsewhere")) is None  # another out_dir: nothing to lose
    assert ck.find_resume(os.path.join(d, "step_00000010"), str(tmp_path / "elsewhere")) == (d, "step_00000010")


def test_save_never_overwrites_a_complete_checkpoint(tmp_path):
    _save(FakeEngine(), tmp_path, 10)
    eng = FakeEngine()
    with pytest.raises(ValueError, match="refusing to overwrite the complete checkpoint"):
        _save(eng, tmp_path, 10)
    assert eng.saved == []


def _shard(tmp_path, step):
    return os.path.join(ck.checkpoint_dir(str(tmp_path)), ck.tag_for(step), "mp_rank_00_model_states.pt")


def test_marker_records_every_file_size(tmp_path):
    _save(FakeEngine(), tmp_path, 10)
    meta = ck.read_meta(os.path.dirname(_shard(tmp_path, 10)))
    assert meta["files"] == {"mp_rank_00_model_states.pt": os.path.getsize(_shard(tmp_path, 10))}


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_damaged_shard_is_refused_before_anything_starts(tmp_path, damage):
    _save(FakeEngine(), tmp_path, 10)
    path = _shard(tmp_path, 10)
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        os.remove(path)
    what = "is truncated or damaged" if damage == "truncate" else "is missing"
    with pytest.raises(ValueError, match=f"{path} {what}"):
        ck.find_resume("auto", str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_unreadable_shard_names_the_file_on_load(tmp_path, damage):
    """A checkpoint whose marker records no sizes (written before it did), damaged: DeepSpeed's
    torch.load fails deep inside; load() names the file instead."""
    _save(FakeEngine(), tmp_path, 10)
    path = _shard(tmp_path, 10)
    tag_dir = os.path.dirname(path)
    meta = ck.read_meta(tag_dir)
    del meta["files"]
    with open(os.path.join(tag_dir, ck.COMPLETE), "w") as f:
        json.dump(meta, f)
    data = open(path, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # same size, the middle overwritten: only the zip records' CRCs notice
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
    with open(path, "wb") as f:
        f.write(data)
    assert ck.find_resume("auto", str(tmp_path)) is not None  # nothing recorded to compare with
    with pytest.raises(ValueError, match=f"cannot be loaded: {path} is damaged"):
        ck.load(FakeEngine(), ck.checkpoint_dir(str(tmp_path)), "step_00000010")
