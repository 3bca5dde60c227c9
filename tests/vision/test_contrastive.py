"""Contrastive image-text alignment (blues.vision.contrastive): the loss, the heads, the caption rows,
the retrieval metric, the train step's stage through the real DeepSpeed engine, resume and export."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from blues.model import Blues
from blues.vision.contrastive import (
    MAX_SCALE,
    caption_ids,
    caption_rows,
    contrastive_mode,
    has_contrastive,
    info_nce,
    retrieval_hits,
)

from .conftest import tiny_vl

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def orthonormal(n: int, seed: int = 0) -> torch.Tensor:
    """n orthonormal rows of width n: embeddings whose pairs are exactly told apart."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def vl_batch(B: int = 4, T: int = 24, n: int = 4, caption_lengths=(9, 6, 12, 9), seed: int = 0):
    """A batch laid out as ImageTextLoader lays it out: <|image_start|> n x <|image|> <|image_end|>, a
    caption (ids below 4000), padding; y = x shifted, -1 on the span and the padding."""
    g = torch.Generator().manual_seed(seed)
    row = torch.full((B, T + 1), 50)  # the padding id
    keep = torch.zeros(B, T + 1, dtype=torch.bool)
    row[:, 0], row[:, 1:1 + n], row[:, 1 + n] = 4096, 4097, 4098
    for b, k in enumerate(caption_lengths):
        row[b, n + 2:n + 2 + k] = torch.randint(100, 4000, (k,), generator=g)
        keep[b, n + 2:n + 2 + k] = True
    y = torch.where(keep[:, 1:], row[:, 1:], torch.full_like(row[:, 1:], -1))
    return row[:, :-1], y, torch.rand(B, 3, 16, 16, generator=g)


# ----------------------------------------------------------------------------- the loss

def test_aligned_pairs_give_a_low_loss_a_wrong_pairing_a_high_one_and_no_signal_log_B():
    B = 16
    e = orthonormal(B)
    scale = torch.tensor(MAX_SCALE)
    assert info_nce(e, e, scale) < 1e-6  # each pair at cosine 1, every negative at 0: exp(-100) per negative
    wrong = e[torch.roll(torch.arange(B), 1)]  # image i's text is another pair's
    assert info_nce(e, wrong, scale) > 90  # the true pair at 0, a negative at cosine 1: about 100 nats
    # No signal (logits all but equal): log B, the loss of a uniform guess among the B candidates.
    assert info_nce(e, wrong, torch.tensor(1e-6)) == pytest.approx(math.log(B), abs=1e-5)  # fp32 rounding


def test_pairs_holding_the_same_caption_are_not_each_others_negatives():
    e = orthonormal(4)
    img, txt = e.clone(), e.clone()
    txt[1] = txt[0]  # texts 0 and 1 are the same caption; so the images 0 and 1 both match it
    img[1] = img[0]
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    scale = torch.tensor(MAX_SCALE)
    # Without the mask the duplicate is a negative as close as the positive: log 2 on 2 of the 4 rows, both ways.
    assert info_nce(img, txt, scale) == pytest.approx(math.log(2) / 2, abs=1e-5)  # fp32 rounding
    assert info_nce(img, txt, scale, same) < 1e-6


def test_the_logit_scale_starts_at_clips_temperature_and_clamps_at_100():
    model = Blues(tiny_vl(contrastive_weight=0.1))
    heads = model.contrastive
    assert heads.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        heads.logit_scale.fill_(math.log(1000.0))
    s = heads.scale()
    assert s.item() == pytest.approx(MAX_SCALE, rel=1e-6)
    s.backward()
    assert heads.logit_scale.grad.abs().max() == 0  # clamped: nothing moves it further up
    with torch.no_grad():
        heads.logit_scale.fill_(math.log(10.0))
    heads.logit_scale.grad = None
    heads.scale().backward()
    assert heads.logit_scale.grad.item() == pytest.approx(10.0, rel=1e-5)  # d exp(t) / dt below the clamp


# ----------------------------------------------------------------------------- the model

def test_gradients_reach_both_heads_the_encoder_the_decoder_and_the_scale_and_not_the_lm_head():
    torch.manual_seed(0)
    model = Blues(tiny_vl(contrastive_steps=1, max_steps=2, tie_embeddings=False))  # an LM head of its own
    x, y, images = vl_batch()
    out = model(x, y, images=images, contrastive="only")
    assert out.logits is None and math.isnan(out.ce_loss.item())  # no language-model pass in the stage
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("contrastive.image_proj.weight", "contrastive.text_proj.weight", "contrastive.logit_scale",
                 "vision.encoder.patchify.weight", "vision.encoder.blocks.0.attn.wq.weight",
                 "vision.projector.fc1.weight", "tok_emb.weight", "blocks.0.attn.wq.weight", "blocks.1.attn.wo.weight",
                 "norm.weight", "vision.modality_emb.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["lm_head.weight"] is None  # the stage trains no language modelling


def test_gradient_checkpointing_gives_the_contrastive_pass_the_same_gradients():
    """Recomputing the caption pass's blocks (and the encoder) in backward changes no gradient."""
    torch.manual_seed(0)
    model = Blues(tiny_vl(contrastive_weight=0.5))
    x, y, images = vl_batch()
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.gradient_checkpointing_enable() if on else model.gradient_checkpointing_disable()
        model(x, y, images=images, contrastive="add").loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)  # fp32 recompute order


def test_add_mode_is_the_lm_loss_plus_the_weighted_infonce_and_only_mode_the_infonce(vl_tokenizer):
    torch.manual_seed(0)
    model = Blues(tiny_vl(contrastive_weight=0.25, aux_loss_coef=0.0, z_loss_coef=0.0)).eval()
    x, y, images = vl_batch()
    lm = model(x, y, images=images, return_logits=True)
    add = model(x, y, images=images, contrastive="add", return_logits=True)
    only = model(x, y, images=images, contrastive="only")
    assert lm.contrastive is None
    assert torch.equal(add.ce_loss, lm.ce_loss) and torch.equal(add.logits, lm.logits)
    assert add.contrastive.loss == only.contrastive.loss  # the caption pass does not see the LM pass
    assert add.loss.item() == pytest.approx(lm.loss.item() + 0.25 * only.contrastive.loss.item(), rel=1e-6)
    assert only.loss == only.contrastive.loss


def test_the_caption_pass_does_not_see_the_image():
    """Changing the images moves the image embeddings, never the text embeddings."""
    torch.manual_seed(0)
    model = Blues(tiny_vl(contrastive_weight=0.1)).eval()
    x, y, images = vl_batch()
    a = model(x, y, images=images, contrastive="only").contrastive
    b = model(x, y, images=torch.rand_like(images), contrastive="only").contrastive
    assert torch.equal(a.text_emb, b.text_emb)
    assert not torch.allclose(a.image_emb, b.image_emb)


def test_only_a_model_with_a_contrastive_setting_carries_the_heads_and_they_save_and_load(tmp_path):
    plain = Blues(tiny_vl())
    assert plain.contrastive is None and not any(k.startswith("contrastive.") for k in plain.state_dict())
    model = Blues(tiny_vl(contrastive_steps=3, max_steps=5))
    assert has_contrastive(model.config)
    assert sorted(k for k in model.state_dict() if k.startswith("contrastive.")) == [
        "contrastive.image_proj.weight", "contrastive.logit_scale", "contrastive.text_proj.weight"]
    with torch.no_grad():
        model.contrastive.logit_scale.fill_(3.5)
    model.save_pretrained(str(tmp_path))
    back = Blues.from_pretrained(str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_contrastive_mode_follows_the_stage_then_the_weight():
    stage_then_add = tiny_vl(contrastive_steps=2, contrastive_weight=0.5, max_steps=5)
    assert [contrastive_mode(stage_then_add, t) for t in range(4)] == ["only", "only", "add", "add"]
    stage_only = tiny_vl(contrastive_steps=2, max_steps=5)
    assert [contrastive_mode(stage_only, t) for t in range(4)] == ["only", "only", None, None]
    assert [contrastive_mode(tiny_vl(contrastive_weight=0.5), t) for t in range(2)] == ["add", "add"]
    assert contrastive_mode(tiny_vl(), 0) is None


def test_bad_contrastive_requests_name_what_is_missing():
    x, y, images = vl_batch()
    with pytest.raises(ValueError, match=r"contrastive='only' but this model has no contrastive heads: build it "
                                         r"with contrastive_steps > 0 or contrastive_weight > 0"):
        Blues(tiny_vl())(x, y, images=images, contrastive="only")
    model = Blues(tiny_vl(contrastive_weight=0.5))
    with pytest.raises(ValueError, match=r"contrastive='both' is invalid: expected None or one of only, add"):
        model(x, y, images=images, contrastive="both")
    with pytest.raises(ValueError, match=r"contrastive='add' needs targets .* and one image per row, without a KV "
                                         r"cache: got images=none for 4 rows"):
        model(x, y, contrastive="add")


# ----------------------------------------------------------------------------- caption rows

def test_caption_rows_are_exactly_the_caption_tokens_left_aligned_with_a_mask():
    x, y, _ = vl_batch(caption_lengths=(9, 6, 12, 9))
    rows, mask, same = caption_rows(y, pad_id=0)
    assert rows.shape == (4, 12) and mask.shape == (4, 12)  # the longest caption's width, no more
    for b, k in enumerate((9, 6, 12, 9)):
        caption = x[b, 6:6 + k]  # the caption as the batch row holds it, after <|image_end|>
        assert torch.equal(rows[b, :k], caption) and mask[b, :k].all()
        assert not mask[b, k:].any() and (rows[b, k:] == 0).all()
    assert torch.equal(same, torch.eye(4, dtype=torch.bool))  # four different random captions


def test_caption_rows_of_the_real_loader_are_its_captions_and_their_endoftext(tmp_path, vl_tokenizer):
    from blues.data.images import ImageTextLoader, prepare_images
    from blues.data.shapes import synthetic_sample
    data = str(tmp_path / "data")
    prepare_images(data, "builtin", image_size=16, num_image_tokens=4, num_samples={"train": 4, "val": 40},
                   progress=False)
    x, y, _ = next(ImageTextLoader(data, "val", block_size=24, batch_size=40).eval_batches(1))
    rows, mask, same = caption_rows(y)
    captions = [synthetic_sample(1337, "val", i, 16)[1] for i in range(40)]
    for b, text in enumerate(captions):
        want = vl_tokenizer.encode(text) + [vl_tokenizer.eot_id]
        assert rows[b][mask[b]].tolist() == want, text
    want_same = torch.tensor([[a == b for b in captions] for a in captions])
    assert torch.equal(same, want_same)
    ids = caption_ids([y[:15], y[15:]])  # numbered across batches: equal exactly where the captions are
    assert torch.equal(ids[:, None] == ids[None, :], want_same)
    assert len(set(captions)) < 40  # the set repeats captions (270 triples), so the check above has teeth


def test_a_caption_embedding_is_the_mean_of_its_tokens_whatever_the_padding_holds():
    from blues.vision.contrastive import pool_caption
    x, y, _ = vl_batch(caption_lengths=(9, 6, 12, 9))
    _, mask, _ = caption_rows(y)
    h = torch.randn(4, 12, 8)
    pooled = pool_caption(h, mask)
    h2 = h.masked_fill(~mask[..., None], 1e6)  # anything in the padding
    torch.testing.assert_close(pool_caption(h2, mask), pooled, rtol=0, atol=0)
    torch.testing.assert_close(pooled[1], h[1, :6].mean(dim=0))  # row 1: 6 caption tokens


# ----------------------------------------------------------------------------- retrieval

def test_retrieval_of_matched_embeddings_is_perfect_and_of_reversed_ones_zero():
    e = orthonormal(64)
    ids = torch.arange(64)
    assert retrieval_hits(e, e, ids) == {"i2t_hits": 64, "t2i_hits": 64, "queries": 64, "candidates": 64}
    reversed_ = e.flip(0)  # image i's best text is text 63 - i, never its own (64 is even: no middle)
    assert retrieval_hits(e, reversed_, ids) == {"i2t_hits": 0, "t2i_hits": 0, "queries": 64, "candidates": 64}


def test_retrieval_counts_a_pick_with_the_true_captions_text_as_correct():
    e = orthonormal(64)
    ids = torch.arange(64)
    ids[63 - torch.arange(5)] = torch.arange(5)  # pairs i and 63 - i (i < 5) carry the same caption
    h = retrieval_hits(e, e.flip(0), ids)
    assert (h["i2t_hits"], h["t2i_hits"]) == (10, 10)  # the 10 images of those captions, both ways


def test_retrieval_groups_are_consecutive_64s_or_one_smaller_group():
    e = orthonormal(130)
    h = retrieval_hits(e, e, torch.arange(130))
    assert (h["queries"], h["candidates"]) == (128, 64)  # two groups; the last 2 pairs left out
    h = retrieval_hits(e[:10], e[:10], torch.arange(10))
    assert (h["queries"], h["candidates"]) == (10, 10)
    # A group is its own world: pair 0's text is the best match of image 64, but they are in different groups.
    img, txt = e[:128].clone(), e[:128].clone()
    img[64] = txt[0]
    assert retrieval_hits(img, txt, torch.arange(128))["i2t_hits"] == 127


# ----------------------------------------------------------------------------- through the engine

SCRIPT = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from vision.conftest import tiny_vl
from blues import train as T
from blues.model import Blues
data, out = sys.argv[1], sys.argv[2]
dist = T.init_distributed()

def config(name, **kw):
    # no balance terms and no weight decay: the stage's loss is the InfoNCE exactly, and a weight without
    # a gradient stays put; an LM head of its own (not tied to the embedding, which the caption pass trains)
    return tiny_vl(tie_embeddings=False, image_token_id=None, data_dir=data, out_dir=os.path.join(out, name),
                   lr=1e-2, warmup_steps=0, micro_batch_size=8, grad_accum=2, eval_steps=8, max_steps=4,
                   contrastive_steps=2, contrastive_weight=0.5, aux_loss_coef=0.0, z_loss_coef=0.0,
                   weight_decay=0.0, **kw)

res = {"steps": []}
run = T.build_engine(config("main"), dist=dist)
head = lambda: run.model.lm_head.weight.detach().clone()
w = head()
for _ in range(4):
    r = T.train_step(run)
    w2 = head()
    res["steps"].append({"mode": r.contrastive_mode, "loss": r.loss, "ce": r.ce_loss, "con": r.contrastive_loss,
                         "lm_head_moved": float((w2 - w).abs().max())})
    w = w2
res["eval"] = T.evaluate(run)
T.export_weights(run, os.path.join(out, "model"))
m = Blues.from_pretrained(os.path.join(out, "model"))
res["exported_scale_equal"] = torch.equal(m.contrastive.logit_scale, run.model.contrastive.logit_scale.detach())

# resume across the stage's end: 1 step, save, a new engine resumes and takes 3 (1 in the stage, 2 after)
straight = [r.loss for r in T.train_steps(T.build_engine(config("straight"), dist=dist), 4)]
first = T.build_engine(config("resumed"), dist=dist)
before = [r.loss for r in T.train_steps(first, 1)]
T.save_checkpoint(first)
second = T.build_engine(config("resumed"), dist=dist)
T.resume(second, (os.path.join(out, "resumed", "checkpoints"), "step_00000001"))
res["straight"], res["resumed"] = straight, before + [r.loss for r in T.train_steps(second, 3)]
print("RESULTS " + json.dumps(res))
T.exit_process(0)  # a rank's end: no interpreter teardown (blues.train.distributed says why)
"""


@pytest.mark.slow
def test_the_stage_then_the_sum_through_the_engine_resumes_exactly_and_exports(tmp_path):
    """The tiny vision model with contrastive_steps=2, contrastive_weight=0.5 in one process through
    deepspeed.initialize (the built-in ZeRO 2): steps 1-2 train the InfoNCE alone (the LM head does not
    move), steps 3-4 the LM loss + 0.5 * InfoNCE; evaluation reports retrieval among 64 held-out pairs;
    a run resumed inside the stage equals a straight one across the stage's end; the export carries
    the heads."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(tmp_path / "out"),
                        os.path.dirname(HERE)], capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    stage, after = r["steps"][:2], r["steps"][2:]
    for s in stage:
        assert s["mode"] == "only" and math.isnan(s["ce"])
        assert s["loss"] == pytest.approx(s["con"], rel=1e-6)  # fp32 sums of the same values in float64
        assert s["lm_head_moved"] == 0.0  # no language-model gradient inside the stage
    for s in after:
        assert s["mode"] == "add" and math.isfinite(s["ce"])
        assert s["loss"] == pytest.approx(s["ce"] + 0.5 * s["con"], rel=1e-6)  # the sum, in fp32
        assert s["lm_head_moved"] > 0
    ev = r["eval"]
    assert ev["retrieval_candidates"] == 64  # eval_steps 8 x micro_batch_size 8 held-out pairs: one group
    for k in ("i2t_top1", "t2i_top1"):
        assert 0.0 <= ev[k] <= 1.0
    assert math.isfinite(ev["val_contrastive_loss"]) and math.isfinite(ev["val_loss"])
    assert r["exported_scale_equal"]
    assert r["resumed"] == r["straight"]  # exact: the same batches, RNG, optimizer state and stage


@pytest.mark.slow
def test_the_benchmark_smoke_runs_and_writes_its_row(tmp_path):
    """benchmarks/vision_contrastive.py --smoke: 10 contrastive steps through blues-train's loop, then
    retrieval among 64 held-out pairs, real and noise images; one JSON row."""
    out = tmp_path / "rows.jsonl"
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "vision_contrastive.py"), "--smoke",
                        "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "retrieval top-1 among 64" in p.stdout  # the loop's evaluation line
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["benchmark"] == "vision_contrastive" and row["contrastive_steps"] == 10
    for k in ("accuracy", "noise_accuracy"):
        assert row[k]["candidates"] == 64 and row[k]["groups"] == 1
        assert 0.0 <= row[k]["i2t_top1"] <= 1.0 and 0.0 <= row[k]["t2i_top1"] <= 1.0


# ----------------------------------------------------------------------------- ZeRO 3 on 2 CPU ranks

@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_on_two_ranks_runs_the_stage_then_the_sum_and_reports_retrieval(tmp_path):
    """deepspeed --num_gpus 2 (two CPU ranks, gloo), ZeRO 3: the contrastive pass goes through the engine's
    forward, so every partitioned parameter (heads, scale, encoder, decoder) is gathered; blues-train runs
    5 stage steps then 5 summed ones, the monitor has the contrastive loss of every step, no LM loss inside
    the stage, and retrieval at each evaluation; the export carries the heads."""
    import csv
    import shutil

    from blues.common import free_port
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    out = tmp_path / "out"
    overrides = ["vision_enabled=true", "vocab_size=4099", "image_size=16", "patch_size=4", "merge_patches=true",
                 "vision_n_embd=32", "vision_n_head=2", "vision_ffn_size=32", "n_embd=32", "n_head=2",
                 "expert_ffn_size=32", "num_experts=4", "block_size=48", "micro_batch_size=8", "lr=1e-2",
                 "warmup_steps=0", "log_interval=1", "eval_interval=5", "eval_steps=4", "save_interval=5",
                 "max_steps=10", "contrastive_steps=5", "contrastive_weight=0.5", "moe_backend=torch"]
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "blues.train",
           "--progress", "off", "--prompt", "", "--deepspeed_config", os.path.join(REPO, "ds_configs", "zero3.json"),
           *overrides, f"data_dir={tmp_path / 'data'}", f"out_dir={out}"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "ZeRO 3" in p.stdout and "(stage)" in p.stdout and "(+ LM)" in p.stdout

    def series(name):
        with open(out / "monitor" / "blues" / f"{name}.csv", newline="") as f:
            return {int(row[0]): float(row[1]) for row in csv.reader(f) if row and row[0] != "step"}
    assert sorted(series("Train_contrastive_loss")) == list(range(1, 11))
    assert sorted(series("Train_ce_loss")) == list(range(6, 11))  # NaN inside the stage: not written
    for name in ("Eval_i2t_top1", "Eval_t2i_top1", "Eval_val_contrastive_loss"):
        assert sorted(series(name)) == [5, 10], name
    model = Blues.from_pretrained(str(out / "model"))
    assert model.contrastive is not None


def test_a_resume_that_switches_the_heads_on_or_off_is_refused_naming_them():
    """The heads are parameters with optimizer state: a checkpoint with them does not resume without them,
    nor the reverse; changing the weight while the heads stay is a compatible change."""
    from blues.train.resume_check import check_resume_config
    plain, staged = tiny_vl(), tiny_vl(contrastive_steps=2)
    for saved, current in ((plain, staged), (staged, plain)):
        with pytest.raises(ValueError, match="contrastive heads: .* -> .*contrastive_steps"):
            check_resume_config(saved, current)
    assert check_resume_config(staged, tiny_vl(contrastive_steps=2, contrastive_weight=0.5)) == [
        "contrastive_weight: 0.0 -> 0.5"]


def test_a_contrastive_run_seeds_a_language_model_run_and_the_reverse(tmp_path):
    """blues-train --init_from between runs with and without heads (MoE-LLaVA's stages as separate runs):
    the heads are training-only, so the folder's are not read where the model has none, and a model with
    heads keeps its initial ones where the folder has none; every other tensor is the folder's."""
    from blues.hf.load import load_weights_into
    torch.manual_seed(0)
    staged = Blues(tiny_vl(contrastive_steps=2))
    staged.save_pretrained(str(tmp_path / "staged"))
    plain = Blues(tiny_vl())
    load_weights_into(plain, str(tmp_path / "staged"))
    want = staged.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in plain.state_dict().items())
    plain.save_pretrained(str(tmp_path / "plain"))
    torch.manual_seed(1)
    again = Blues(tiny_vl(contrastive_steps=2))
    heads = {k: v.clone() for k, v in again.state_dict().items() if k.startswith("contrastive.")}
    load_weights_into(again, str(tmp_path / "plain"))
    for k, v in again.state_dict().items():
        assert torch.equal(v, heads[k] if k in heads else want[k]), k
