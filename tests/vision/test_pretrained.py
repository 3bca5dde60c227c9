"""vision_pretrained: a CLIP or SigLIP tower from a local Hugging Face folder in place of Blues' ViT.

The folders are real transformers models built from tiny configs and written by save_pretrained
(vision-only and full CLIP / SigLIP models; no download). Hidden size 24 differs from the Blues
config's vision_n_embd=32, so a projector built for the wrong width fails."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from blues.model import Blues
from blues.train.engine import record_vision_pretrained
from blues.vision.pretrained import load_vision_pretrained, read_vision_config

from .conftest import tiny_vl

transformers = pytest.importorskip("transformers", reason="vision_pretrained builds its tower with transformers")

# 16 px images in 4 px patches, like tiny_vl; odd MLP width (awkward shapes).
TOWER = dict(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=16,
             patch_size=4)
TEXT = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
            bos_token_id=1, eos_token_id=2)
KINDS = ("clip_vision", "clip", "siglip_vision", "siglip")


def write_folder(kind: str, path: str) -> str:
    """A tiny transformers model of `kind`, seeded, saved with save_pretrained into `path`."""
    t = transformers
    torch.manual_seed(0)
    if kind == "clip_vision":
        model = t.CLIPVisionModel(t.CLIPVisionConfig(**TOWER))
    elif kind == "clip":
        model = t.CLIPModel(t.CLIPConfig(vision_config=TOWER, text_config=TEXT, projection_dim=8))
    elif kind == "siglip_vision":
        model = t.SiglipVisionModel(t.SiglipVisionConfig(**TOWER))
    else:
        model = t.SiglipModel(t.SiglipConfig(vision_config=TOWER, text_config=TEXT))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: write_folder(k, str(root / k)) for k in KINDS}


def reference(folder: str):
    """The folder's vision model as transformers loads it (the fact the tower must equal)."""
    cls = transformers.SiglipVisionModel if "siglip" in os.path.basename(folder) else transformers.CLIPVisionModel
    return cls.from_pretrained(folder).eval()


def built(folder: str, **overrides) -> Blues:
    """A tiny vision Blues with the folder's tower and its weights, as the engine builds it."""
    model = Blues(record_vision_pretrained(tiny_vl(vision_pretrained=folder, **overrides)))
    load_vision_pretrained(model)
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_patch_features_equal_the_hf_models_last_hidden_state(folders, kind):
    model = built(folders[kind])
    ref = reference(folders[kind])
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # (M, 3, S, S) in [0, 1]
    rec = model.config.vision.vision_pretrained_config
    mean = torch.tensor(rec["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(rec["image_std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref(pixel_values=(pixels - mean) / std).last_hidden_state  # (M, [CLS] + 16, 24)
        got = model.vision.encoder(pixels)  # (M, 16, 24)
    if kind.startswith("clip"):
        assert want.shape == (3, 17, 24)
        want = want[:, 1:]  # the class token is dropped
    assert got.shape == (3, 16, 24)
    # Same modules, weights and inputs: only the pixel normalisation is computed on another line.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # The projector takes the tower's width: 2 (token, image max) x 4 (2x2 merge) x 24.
    assert model.vision.projector.fc1.in_features == 2 * 4 * 24


@pytest.mark.parametrize("kind,mean,std", [("clip", [0.48145466, 0.4578275, 0.40821073],
                                             [0.26862954, 0.26130258, 0.27577711]),
                                            ("siglip", [0.5] * 3, [0.5] * 3)])
def test_pixel_statistics_are_the_processors_else_the_documented_defaults(folders, tmp_path, kind, mean, std):
    assert (read_vision_config(folders[kind])["image_mean"], read_vision_config(folders[kind])["image_std"]) == \
        (mean, std)
    folder = shutil.copytree(folders[kind], tmp_path / kind)
    with open(folder / "preprocessor_config.json", "w") as f:
        json.dump({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.6, 0.7, 0.8]}, f)
    rec = read_vision_config(str(folder))
    assert (rec["image_mean"], rec["image_std"]) == ([0.1, 0.2, 0.3], [0.6, 0.7, 0.8])
    model, ref = built(str(folder)), reference(str(folder))
    pixels = torch.rand(2, 3, 16, 16)
    x = (pixels - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.6, 0.7, 0.8]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
        torch.testing.assert_close(model.vision.encoder(pixels), want[:, 1:] if kind == "clip" else want,
                                   rtol=0, atol=1e-6)  # as above


def test_a_saved_model_rebuilds_its_tower_after_the_folder_is_deleted(folders, tmp_path):
    folder = str(shutil.copytree(folders["siglip"], tmp_path / "siglip"))
    model = built(folder)
    ids = torch.tensor([[5, 4096, 4097, 4097, 4097, 4097, 4098, 7, 9]])  # start, 4 image tokens, end
    image = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = model(ids, images=image).logits
    model.save_pretrained(str(tmp_path / "model"))
    shutil.rmtree(folder)
    loaded = Blues.from_pretrained(str(tmp_path / "model")).eval()
    assert loaded.config.vision.vision_pretrained == folder  # still named, no longer read
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, images=image).logits, want, rtol=0, atol=0)  # the same weights


def test_gradient_checkpointing_reaches_the_pretrained_tower(folders):
    model = built(folders["clip"]).train()
    ids = torch.tensor([[5, 4096, 4097, 4097, 4097, 4097, 4098, 7, 9]])
    image = torch.rand(1, 3, 16, 16)

    def grads():
        model.zero_grad()
        model(ids, targets=ids, images=image).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("vision.encoder.")}
    plain = grads()
    model.gradient_checkpointing_enable()
    hf_layers = [m for m in model.vision.encoder.model.modules() if hasattr(m, "gradient_checkpointing")]
    assert model.vision.encoder.gradient_checkpointing and hf_layers
    assert all(m.gradient_checkpointing for m in hf_layers)
    recomputed = grads()
    for n, g in plain.items():
        torch.testing.assert_close(recomputed[n], g, rtol=0, atol=1e-7)  # the same ops run again, no dropout
    model.gradient_checkpointing_disable()
    assert not model.vision.encoder.gradient_checkpointing


@pytest.mark.parametrize("build", [Blues, record_vision_pretrained])  # a model; blues-train before the data
def test_sizes_that_differ_from_the_folders_are_refused_naming_both(folders, build):
    with pytest.raises(ValueError, match=r"image_size=32 and patch_size=8, but the pretrained tower .* takes "
                                         r"image_size=16 and patch_size=4: set image_size=16 patch_size=4"):
        build(tiny_vl(vision_pretrained=folders["clip"], image_size=32, patch_size=8))


def test_a_missing_folder_or_one_that_is_not_clip_or_siglip_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"vision_pretrained='.*nowhere' is not a folder: expected a local Hugging "
                                         r"Face CLIP or SigLIP folder"):
        record_vision_pretrained(tiny_vl(vision_pretrained=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"has no config.json"):
        read_vision_config(str(tmp_path))
    other = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=20, vocab_size=50)).save_pretrained(str(other))
    with pytest.raises(ValueError, match=r"holds model_type='bert': expected a CLIP or SigLIP model"):
        Blues(tiny_vl(vision_pretrained=str(other)))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 25,
                                                 "num_attention_heads": 2}))
    with pytest.raises(ValueError, match=r"vision_pretrained='.*bad': not a valid CLIPVisionConfig: .*hidden size "
                                         r"\(25\) is not a multiple"):
        read_vision_config(str(bad))
    (bad / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    (bad / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5, 0, 1]}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json' has image_std=\[0.5, 0, 1\]: expected 3 "
                                         r"numbers \(one per RGB channel, std > 0\)"):
        read_vision_config(str(bad))


def test_weights_that_do_not_fit_the_tower_are_refused(folders, tmp_path):
    # A folder whose config.json was edited after saving: its weights are 24 wide, its config says 32.
    folder = shutil.copytree(folders["clip_vision"], tmp_path / "edited")
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    with open(folder / "config.json", "w") as f:
        json.dump(dict(cfg, hidden_size=32), f)
    model = Blues(record_vision_pretrained(tiny_vl(vision_pretrained=str(folder))))
    with pytest.raises(ValueError, match=r"vision_pretrained='.*edited': its weights do not"):
        load_vision_pretrained(model)


# ----------------------------------------------------------------------------- through blues.train

SCRIPT = r"""
import json, os, shutil, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from safetensors.torch import load_file
from transformers import CLIPVisionModel
from vision.conftest import tiny_vl
from blues import train as T
from blues.data.images import ImageTextLoader
from blues.model import Blues
from blues.train.ds_config import DS_CONFIG_DIR, load_ds_config
folder, out, ds = sys.argv[1], sys.argv[2], sys.argv[4]
dist = T.init_distributed()
cfg = tiny_vl(image_token_id=None, vision_pretrained=folder, freeze="encoder", data_dir=os.path.join(out, "data"),
              out_dir=os.path.join(out, "run"), lr=1e-2, warmup_steps=0, micro_batch_size=8, max_steps=30)
run = T.build_engine(cfg, load_ds_config(os.path.join(DS_CONFIG_DIR, ds)), dist=dist)
res = {"recorded": run.cfg.vision.vision_pretrained_config}
res["losses"] = [r.loss for r in T.train_steps(run, 30)]
# resume: a new engine from the checkpoint takes the same 2 steps as the run that goes on
again = T.build_engine(cfg, load_ds_config(os.path.join(DS_CONFIG_DIR, ds)), dist=dist)
T.resume(again, os.path.split(T.save_checkpoint(run)))
res["continued"] = [r.loss for r in T.train_steps(run, 2)]
res["resumed"] = [r.loss for r in T.train_steps(again, 2)]
T.export_weights(run, os.path.join(out, "model"))  # gathers ZeRO 3 partitions
saved = load_file(os.path.join(out, "model", "model.safetensors"))
hf = CLIPVisionModel.from_pretrained(folder).state_dict()
prefix = "vision.encoder.model."
tower = {k[len(prefix):]: t for k, t in saved.items() if k.startswith(prefix)}
res["not_in_tower"] = sorted(set(hf) - set(tower))
res["encoder_is_the_folders"] = set(tower) <= set(hf) and all(torch.equal(t, hf[k]) for k, t in tower.items())
x, y, images = ImageTextLoader(cfg.train.data_dir, "val", 48, 2).next_batch()
run.model.eval()
with torch.no_grad():
    want = run.model(x, images=images).logits
shutil.rmtree(folder)
m = Blues.from_pretrained(os.path.join(out, "model")).eval()
with torch.no_grad():
    res["max_diff"] = (m(x, images=images).logits - want).abs().max().item()
res["caption"] = m.generate("a", images=[images[0]], temperature=0, max_new_tokens=4)
print("RESULTS " + json.dumps(res))
"""


@pytest.mark.slow
@pytest.mark.parametrize("ds", ["zero2.json", "zero3.json"])
def test_a_vision_model_with_a_frozen_clip_tower_trains_exports_and_reloads_without_the_folder(folders, tmp_path, ds):
    """blues.train's engine (ZeRO 2 and 3, one process) with a full CLIP folder and freeze=encoder on the
    built-in synthetic set: the config records the folder's vision config, the exported tower holds the
    folder's weights (loaded, then kept frozen), the loss falls, a resume is exact; after the folder is
    deleted the export reloads with the same logits and blues-generate --image runs."""
    folder = str(shutil.copytree(folders["clip"], tmp_path / "clip"))
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", SCRIPT, folder, str(tmp_path / "out"), tests, ds], capture_output=True,
                       text=True, timeout=900, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert r["recorded"]["model_type"] == "clip_vision_model" and r["recorded"]["hidden_size"] == 24
    assert r["encoder_is_the_folders"]  # loaded from the folder, then frozen: every tensor as the folder has it
    assert r["not_in_tower"] == ["post_layernorm.bias", "post_layernorm.weight"]  # only CLIP's pooled token uses it
    first, last = sum(r["losses"][:5]) / 5, sum(r["losses"][-5:]) / 5
    assert last < 0.7 * first, r["losses"]  # captions of a tiny grammar: the loss falls far, not by noise
    assert r["resumed"] == r["continued"]  # exact: the same batches, RNG, optimizer state and frozen tower
    assert r["max_diff"] == 0.0  # the same weights, rebuilt from the recorded config alone
    assert isinstance(r["caption"], str)
    from PIL import Image
    Image.new("RGB", (20, 12), (200, 30, 30)).save(tmp_path / "red.png")  # resized to 16 x 16 on the way in
    g = subprocess.run([sys.executable, "-m", "blues.cli.generate", "--model", str(tmp_path / "out" / "model"),
                        "--image", str(tmp_path / "red.png"), "--prompt", "a", "--max_new_tokens", "4",
                        "--temperature", "0"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert g.returncode == 0 and "Traceback" not in g.stderr, g.stderr[-2000:]


def test_a_resume_under_another_tower_is_refused(folders):
    """blues-train records the tower's config before it checks a resume: a checkpoint of a CLIP tower
    does not resume under a SigLIP one (other weights, other normalisation), and the same tower resumes."""
    from blues.train.resume_check import check_resume_config
    clip = record_vision_pretrained(tiny_vl(vision_pretrained=folders["clip_vision"]))
    siglip = record_vision_pretrained(tiny_vl(vision_pretrained=folders["siglip_vision"]))
    with pytest.raises(ValueError, match="cannot resume.*vision_pretrained_config"):
        check_resume_config(clip, siglip)
    assert check_resume_config(clip, record_vision_pretrained(tiny_vl(vision_pretrained=folders["clip_vision"]))) == []
