"""Per-modality expert load (blues.train.modality, issue 14 part 7): the counts, forced routing, the
metrics, a real engine's monitor files, and the pictures and table of blues-experts."""
import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from blues.train.modality import (
    PADDING,
    modality_counts,
    modality_events,
    modality_metrics,
    record_modality,
    token_kinds,
)

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vl_tokenizer():
    """The default tokenizer plus the three image tokens (<|image|> = 4097), as the vision tests use."""
    from blues.data.images import with_image_tokens
    return with_image_tokens("default")


@functools.cache
def _vision_conftest():
    """tests/vision/conftest.py loaded from its path under a name of its own: in a whole-suite run the name
    `vision` may already be taken (a sys.path import of vision.conftest failed there in CI)."""
    spec = importlib.util.spec_from_file_location("_blues_tests_vision_conftest",
                                                  os.path.join(TESTS, "vision", "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_vl(**overrides):
    """tests/vision/conftest.py's tiny vision model (4 experts, 2 MoE layers, 4 image tokens per image)."""
    return _vision_conftest().tiny_vl(**overrides)


def vl_model(**overrides):
    from blues.model import Blues
    torch.manual_seed(0)
    return Blues(tiny_vl(**overrides)).eval()


def image_text_batch(tok, rows: int, T: int = 48, seed: int = 0, image_first: bool = False):
    """x (rows, T) laid out as ImageTextLoader does (<|image_start|> <|image|> * 4 <|image_end|>, random text
    of a random length, <|endoftext|>, padding with <|endoftext|>) and images (rows, 3, 16, 16); image_first:
    the image tokens at positions 0-3 instead (forced routing forces the first tokens)."""
    g = torch.Generator().manual_seed(seed)
    s = tok.special_tokens
    x = torch.full((rows, T), tok.eot_id, dtype=torch.long)
    for b in range(rows):
        span = [s["<|image|>"]] * 4 if image_first else [s["<|image_start|>"]] + [s["<|image|>"]] * 4 + [
            s["<|image_end|>"]]
        n = int(torch.randint(3, T - len(span) - 1, (1,), generator=g))
        text = torch.randint(0, 4000, (n,), generator=g)  # below every special id
        x[b, :len(span)] = torch.tensor(span)
        x[b, len(span):len(span) + n] = text
    return x, torch.rand(rows, 3, 16, 16, generator=g)


def test_token_kinds_image_text_and_padding():
    # 7 = <|image|>, 9 = pad: the first 9 after text is the sample's own end (text), the rest padding
    ids = torch.tensor([[5, 7, 7, 6, 1, 2, 9, 9, 9], [9, 7, 7, 6, 1, 9, 3, 9, 9]])
    kinds = token_kinds(ids, image_token_id=7, pad_id=9)
    P = PADDING
    assert kinds.tolist() == [[1, 0, 0, 1, 1, 1, 1, P, P], [1, 0, 0, 1, 1, 1, 1, 1, P]]
    assert token_kinds(ids, 7, None).tolist() == torch.where(ids == 7, 0, 1).tolist()  # no pad id: no padding


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["no_drop", "capacity"])  # counts are before the cut
def test_counts_are_top_k_per_token_of_each_modality(vl_tokenizer, capacity_factor):
    """Each layer's image counts sum to top_k * image tokens, its text counts to top_k * text tokens
    (padding left out); without padding left out, image + text equal the layers' own selected counts."""
    model = vl_model(capacity_factor=capacity_factor)
    K = model.config.moe.top_k
    batches = [image_text_batch(vl_tokenizer, 3, seed=s) for s in (0, 1)]
    c = modality_counts(model, [(x, None, im) for x, im in batches], pad_id=vl_tokenizer.eot_id)  # (2, L, E)
    assert c.shape == (2, 2, 4) and c.dtype == torch.int64
    kinds = torch.cat([token_kinds(x, 4097, vl_tokenizer.eot_id) for x, _ in batches])
    n_img, n_txt, n_pad = (int((kinds == k).sum()) for k in (0, 1, PADDING))
    assert n_img == 6 * 4 and n_pad > 0, "the batches hold images and padding"
    assert c[0].sum(dim=1).tolist() == [K * n_img] * 2
    assert c[1].sum(dim=1).tolist() == [K * n_txt] * 2
    everything = modality_counts(model, [(x, None, im) for x, im in batches])  # pad_id None: padding is text
    with torch.no_grad():
        selected = sum(model(x, images=im).expert_selected for x, im in batches)  # (L, E)
    assert torch.equal(everything.sum(dim=0), selected)
    assert torch.equal(everything[0], c[0])  # padding is never an image token


@pytest.mark.parametrize("top_k", [1, 2])
def test_forced_routing_sends_the_image_tokens_to_the_first_experts(vl_tokenizer, top_k):
    """forced_routing(model, skew) forces the first round(skew * N) tokens onto experts 0..top_k-1; with the
    image tokens first in a one-row batch and skew = their share, the image counts show exactly that."""
    from blues.moe.routing import forced_routing
    model = vl_model(top_k=top_k)
    x, images = image_text_batch(vl_tokenizer, 1, image_first=True)
    with forced_routing(model, skew=4 / x.numel()) as n:
        assert n == 2
        c = modality_counts(model, [(x, None, images)], pad_id=vl_tokenizer.eot_id)
    want = [4] * top_k + [0] * (4 - top_k)  # every image token on experts 0..K-1, once each
    assert c[0].tolist() == [want, want]
    n_txt = int((token_kinds(x, 4097, vl_tokenizer.eot_id) == 1).sum())
    assert c[1].sum(dim=1).tolist() == [top_k * n_txt] * 2
    free = modality_counts(model, [(x, None, images)], pad_id=vl_tokenizer.eot_id)  # out of the block: real routing
    assert free[0].tolist() != [want, want], "the random router does not send all image tokens to 0..K-1 itself"


@pytest.mark.parametrize("positional", [False, True], ids=["keyword", "positional"])
def test_only_the_language_model_pass_is_counted_with_contrastive_heads(vl_tokenizer, positional):
    """forward(..., contrastive="add") runs the caption rows through the MoE layers a second time: the counts
    are those of the language-model pass alone (as without contrastive), and "only" (no LM pass) counts none."""
    model = vl_model(contrastive_weight=0.5)
    x, images = image_text_batch(vl_tokenizer, 4, seed=3)
    kinds = token_kinds(x, 4097, vl_tokenizer.eot_id)
    nxt = torch.cat([x[:, 1:], x[:, -1:]], dim=1)  # (B, T) the next token
    y = torch.where(torch.cat([kinds[:, 1:], kinds[:, -1:]], dim=1) == 1, nxt, -1)  # loss on the next text token
    plain = modality_counts(model, [(x, y, images)], pad_id=vl_tokenizer.eot_id)
    for mode, want in (("add", plain), ("only", torch.zeros_like(plain))):
        with torch.no_grad(), record_modality(model, vl_tokenizer.eot_id) as rec:
            out = model(x, y, None, images, mode) if positional else model(x, y, images=images, contrastive=mode)
        assert out.contrastive is not None, "the caption pass ran"
        assert torch.equal(rec.counts, want), mode
    assert plain[0].sum() > 0 and plain[1].sum() > 0


def test_a_text_only_model_records_nothing():
    from blues.model import Blues
    from blues.presets import tiny
    model = Blues(tiny().replace(n_embd=32, n_head=2, num_experts=4, expert_ffn_size=32, block_size=16))
    with record_modality(model) as rec:
        model(torch.zeros(1, 8, dtype=torch.long))
    assert rec is None
    assert modality_events(None, 10) == []
    with pytest.raises(ValueError, match=r"vision model with stacked MoE layers \(vision_enabled=False"):
        modality_counts(model, [torch.zeros(1, 8, dtype=torch.long)])


def test_deepspeed_moe_layers_are_not_measured_and_say_so_once(caplog):
    """moe_backend=deepspeed keeps DeepSpeed's gate, which routing_recorder cannot recompute: no counts, one line."""
    import logging

    from blues.common import _LOGGED
    from blues.model import Blues
    _LOGGED.discard("modality_deepspeed")  # log_once remembers per process
    model = Blues(tiny_vl(moe_backend="deepspeed"))
    with caplog.at_level(logging.INFO, logger="blues.train.modality"):
        for _ in range(2):
            with record_modality(model) as rec:
                assert rec is None
    assert [r.getMessage() for r in caplog.records].count(
        "per-modality expert load is not measured with moe_backend=deepspeed (DeepSpeed's gate is not recomputed): "
        "use moe_backend=auto, torch or triton for it") == 1


def test_metrics_shares_and_total_variation():
    c = torch.tensor([[[6, 2, 0, 0], [3, 3, 0, 0], [0, 0, 0, 0]],  # image, 3 layers of 4 experts
                      [[0, 0, 4, 4], [3, 3, 0, 0], [1, 1, 1, 1]]])  # text
    m = modality_metrics(c, [1, 2, 4])
    img = [m[f"moe_modality_share/layer_1_image_expert_{j}"] for j in range(4)]
    assert img == [0.75, 0.25, 0.0, 0.0]
    assert m["moe/layer_1/modality_tv"] == 1.0  # disjoint experts
    assert m["moe/layer_2/modality_tv"] == 0.0  # the same distribution
    assert "moe/layer_4/modality_tv" not in m and "moe_modality_share/layer_4_image_expert_0" not in m  # no image
    assert m["moe_modality_share/layer_4_text_expert_3"] == 0.25
    assert m["moe/modality_tv_mean"] == 0.5 and m["moe/modality_tv_max"] == 1.0
    assert modality_events(m, 7)[0][2] == 7 and len(modality_events(m, 7)) == len(m)


# ----------------------------------------------------------------------------- a real engine, its monitor, pictures

SCRIPT = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from vision.conftest import tiny_vl
from blues import train as T
from blues.presets import tiny
from blues.train.metrics import eval_events, step_events, write_events
from blues.train.modality import (format_modality, modality_counts, modality_events, modality_load,
                                  record_eval_modality)
data, out = sys.argv[1], sys.argv[2]
dist = T.init_distributed()
res = {}
cfg = tiny_vl(image_token_id=None, data_dir=data, out_dir=os.path.join(out, "vl"), lr=1e-2, warmup_steps=0,
              micro_batch_size=4, eval_steps=2, max_steps=4)
run = T.build_engine(cfg, dist=dist)
for r in T.train_steps(run, 4):  # what train() writes, then what its evaluation adds for a vision run
    write_events(run, step_events(r, 1.0, float(r.step)))
with record_eval_modality(run) as rec:
    ev = T.evaluate(run)
mod = modality_load(run, rec)
write_events(run, eval_events(ev, run.step) + modality_events(mod, run.step))
res["line"] = format_modality(mod, run.step)
res["counts"] = rec.counts.tolist()
res["again"] = modality_counts(run.model, run.val_loader.eval_batches(2), run.tokenizer.eot_id).tolist()
res["blocks"], res["top_k"], res["eot"] = rec.blocks, run.cfg.moe.top_k, run.tokenizer.eot_id
res["metrics"] = mod
T.export_weights(run, os.path.join(out, "vl", "model"))
text = T.build_engine(tiny().replace(n_embd=32, n_head=2, num_experts=4, expert_ffn_size=32, block_size=32,
                                     micro_batch_size=2, eval_steps=1, data_dir=os.path.join(out, "text_data"),
                                     out_dir=os.path.join(out, "text")), dist=dist)
T.train_steps(text, 1)
with record_eval_modality(text) as rec:
    T.evaluate(text)
res["text_rec"], res["text_load"] = rec is None, modality_load(text, rec)
print("RESULTS " + json.dumps(res))
T.exit_process(0)  # a rank's end: no interpreter teardown (blues.train.distributed says why)
"""


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory):
    """4 steps of the tiny vision model through deepspeed.initialize (ZeRO 2, the built-in synthetic set),
    its step events and an evaluation with the per-modality load written to the monitor; then a text-only
    engine evaluated under the same recorder."""
    tmp = tmp_path_factory.mktemp("modality")
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp / "data"), str(tmp / "out"), TESTS],
                       capture_output=True, text=True, timeout=900, cwd=tmp, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    return tmp, r


@pytest.mark.slow  # one engine build and 4 steps, ~30 s
def test_an_evaluation_writes_the_modality_events_to_the_monitor(vl_run):
    from blues.cli.experts import read_series
    from blues.data.images import ImageTextLoader
    tmp, r = vl_run
    c = torch.tensor(r["counts"])  # (2, L, E)
    assert r["again"] == r["counts"], "the recorder inside evaluate counts what a separate pass over the batches does"
    # the val batches' tokens: every image token and every text token makes top_k assignments per layer
    kinds = torch.cat([token_kinds(x, 4097, r["eot"]) for x, _, _ in
                       ImageTextLoader(str(tmp / "data"), "val", 48, 4).eval_batches(2)])
    for m, kind in ((0, 0), (1, 1)):
        assert c[m].sum(dim=1).tolist() == [r["top_k"] * int((kinds == kind).sum())] * len(r["blocks"])
    mon = tmp / "out" / "vl" / "monitor" / "blues"
    for i in r["blocks"]:
        for name in ("image", "text"):
            shares = [read_series(str(mon / f"moe_modality_share_layer_{i}_{name}_expert_{j}.csv")) for j in range(4)]
            assert all(list(s) == [4] for s in shares), "one row, at the evaluation's step"
            assert sum(s[4] for s in shares) == pytest.approx(1.0, abs=1e-12)
        tv = read_series(str(mon / f"moe_layer_{i}_modality_tv.csv"))[4]
        assert tv == pytest.approx(r["metrics"][f"moe/layer_{i}/modality_tv"]) and 0 <= tv <= 1
        assert f"block {i} tv {tv:.2f}" in r["line"]
    assert r["line"].startswith("step 4: expert load image vs text: ")
    assert r["text_rec"] is True and r["text_load"] is None  # a text-only run: no modality events


def _check_png(path, name, layers):
    from PIL import Image

    from blues.cli.experts import DPI, figure_size
    w, h = figure_size(name, layers)
    with Image.open(path) as im:
        im.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (round(w * DPI), round(h * DPI)), im.size
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 20, f"{path} looks blank"


@pytest.mark.slow  # shares the engine run above
def test_plot_draws_the_modality_load_of_a_vision_run(vl_run, tmp_path, capsys):
    from blues.cli.experts import main, read_modality
    tmp, r = vl_run
    assert main(["plot", str(tmp / "out" / "vl"), "--out", str(tmp_path)]) == 0
    printed = sorted(os.path.basename(p) for p in capsys.readouterr().out.split())
    assert printed == ["loss.png", "modality_load.png"], printed  # no log line: no per-expert load over steps
    _check_png(tmp_path / "modality_load.png", "modality_load", 2)
    layers, experts, step, share, tv = read_modality(str(tmp / "out" / "vl" / "monitor" / "blues"))
    assert (layers, experts, step) == (r["blocks"], [0, 1, 2, 3], 4)
    want = torch.tensor(r["counts"]).double()
    assert torch.allclose(torch.tensor(share, dtype=torch.float64), want / want.sum(dim=2, keepdim=True), atol=1e-12)


@pytest.mark.slow  # shares the engine run above
def test_report_of_a_vision_model_has_the_modality_picture_and_table(vl_run, tmp_path, capsys):
    from blues.cli.experts import main
    tmp, _ = vl_run
    model_dir, data = tmp / "out" / "vl" / "model", tmp / "data"
    assert main(["report", str(model_dir), "--data", str(data), "--batches", "2", "--batch_size", "4",
                 "--out", str(tmp_path)]) == 0
    printed = sorted(os.path.basename(p) for p in capsys.readouterr().out.split())
    assert printed == ["modality_load.png", "token_experts_block_0.png", "token_experts_block_1.png",
                       "top_tokens.md"], printed
    _check_png(tmp_path / "modality_load.png", "modality_load", 2)
    table = (tmp_path / "top_tokens.md").read_text()
    part = table.split("# Image tokens and text tokens\n")[1]
    for b in (0, 1):
        section = part.split(f"## block {b}\n")[1].split("## block")[0]
        assert "image tokens prefer experts " in section
        rows = [x for x in section.splitlines() if x.startswith("| ") and x[2].isdigit()]
        img = [float(x.split("|")[2].strip().rstrip("%")) for x in rows]
        txt = [float(x.split("|")[3].strip().rstrip("%")) for x in rows]
        assert len(rows) == 4 and sum(img) == pytest.approx(100, abs=0.2) and sum(txt) == pytest.approx(100, abs=0.2)
        preferred = [int(e) for e in section.split("image tokens prefer experts ")[1].split("\n")[0].split(", ")]
        assert preferred and all(img[e] >= txt[e] for e in preferred)


EP_SCRIPT = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
data, out, tests = sys.argv[-3:]  # the launcher puts --local_rank=N first
sys.path.insert(0, tests)
from vision.conftest import tiny_vl
from blues import train as T
from blues.train.modality import modality_load, record_eval_modality
dist = T.init_distributed()
run = T.build_engine(tiny_vl(image_token_id=None, data_dir=data, out_dir=out, micro_batch_size=4, eval_steps=2,
                             ep_size=2), dist=dist)
with record_eval_modality(run) as rec:
    T.evaluate(run)
mod = modality_load(run, rec)  # collective
T.export_weights(run, os.path.join(out, "model"))
if dist.rank == 0:
    print("RESULTS " + json.dumps(mod))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_ranks_report_the_load_of_all_their_val_batches(tmp_path):
    """deepspeed --num_gpus 2 (two CPU ranks, gloo), ep_size=2: each rank evaluates its own val samples (0, 2, ..
    and 1, 3, ..) with half the experts; the all-reduced metrics equal one process's over the same 16 samples
    with the exported model (every expert). Routing is per token and eval has no capacity, so counts are equal."""
    import shutil

    from blues.common import free_port
    from blues.data.images import ImageTextLoader
    from blues.model import Blues
    script = tmp_path / "ep_modality.py"
    script.write_text(EP_SCRIPT)
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    p = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), str(script),
                        str(tmp_path / "data"), str(tmp_path / "out"), TESTS], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    got = json.loads(next(line for line in p.stdout.splitlines() if "RESULTS " in line).split("RESULTS ", 1)[1])
    model = Blues.from_pretrained(str(tmp_path / "out" / "model"))
    batches = ImageTextLoader(str(tmp_path / "data"), "val", 48, 8).eval_batches(2)  # samples 0..15
    want = modality_metrics(modality_counts(model, batches, pad_id=model.tokenizer.eot_id), [0, 1])
    assert got.keys() == want.keys()
    for k in want:  # ratios of equal integer counts; 1e-12: the order of a float sum
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
