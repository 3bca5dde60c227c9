"""blues.vision and Blues with vision_enabled: the config, the tower, and a text-only model unchanged."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from blues.config import BluesConfig
from blues.model import Blues
from blues.presets import tiny
from blues.vision.config import VisionConfig, num_image_tokens

from .conftest import tiny_vl

BEFORE_VISION = os.path.join(os.path.dirname(__file__), "data", "text_only_before_vision")
IMG = 4097  # <|image|> in tiny_vl
N = 4  # image tokens per image in tiny_vl: (16 / 4)^2 / 4


def span_ids(prefix, suffix):
    """(1, T) ids: prefix, <|image_start|> <|image|>*N <|image_end|>, suffix."""
    return torch.tensor([list(prefix) + [4096] + [IMG] * N + [4098] + list(suffix)])


@pytest.fixture
def vl_model():
    torch.manual_seed(0)
    return Blues(tiny_vl()).eval()


# ----------------------------------------------------------------------------- a text-only model is unchanged

def test_a_checkpoint_from_before_vision_loads_and_generates_unchanged():
    # The folder was written by save_pretrained at git HEAD c13dce4, before blues.vision existed.
    expected = json.load(open(os.path.join(BEFORE_VISION, "expected.json")))
    model = Blues.from_pretrained(BEFORE_VISION)
    assert model.vision is None and not any("vision" in k for k in model.state_dict())
    with torch.no_grad():
        logits = model(torch.tensor([expected["prompt"]])).logits[0]
    # stored rounded to 6 decimals: 1e-5 covers the rounding, nothing else
    torch.testing.assert_close(logits, torch.tensor(expected["prompt_logits"]), atol=1e-5, rtol=0)
    assert model.generate(expected["prompt"], max_new_tokens=20, temperature=0) == expected["greedy_20"]
    assert model.generate(expected["prompt"], max_new_tokens=20, temperature=1.0, seed=3) == \
        expected["sampled_20_seed3"]


def test_vision_is_off_by_default_and_old_config_files_read_as_before():
    old = json.load(open(os.path.join(BEFORE_VISION, "config.json")))
    cfg = BluesConfig.from_dict(old)
    assert cfg.vision == VisionConfig() and not cfg.vision.vision_enabled
    assert BluesConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    keys = set(Blues(tiny()).state_dict())
    assert not any(k.startswith("vision") for k in keys)


# ----------------------------------------------------------------------------- the config

def test_num_image_tokens():
    assert num_image_tokens(VisionConfig(image_size=32, patch_size=8)) == 16
    assert num_image_tokens(VisionConfig(image_size=32, patch_size=8, merge_patches=True)) == 4
    assert num_image_tokens(tiny_vl().vision) == N


@pytest.mark.parametrize("overrides, match", [
    (dict(image_size=30), r"image_size=30 is invalid: must be a multiple of patch_size=4"),
    (dict(image_size=12), r"merge_patches=True is invalid: needs an even number of patches per side, got .*=3"),
    (dict(vision_n_embd=34), r"vision_n_embd=34 is invalid: must be divisible by 2 \* vision_n_head=4"),
    (dict(image_token_id=5000), r"image_token_id=5000 is invalid: must be below vocab_size=4099"),
    (dict(image_token_id=-1), r"image_token_id=-1 is invalid: expected a token id >= 0"),
    (dict(block_size=5), r"image_size=16 is invalid: gives 4 image tokens \(\+2 for start/end\) but block_size=5"),
    (dict(vision_enabled="yes"), r"vision_enabled='yes' is invalid: expected true or false"),
    (dict(patch_size=0), r"patch_size=0 is invalid: expected a positive integer"),
])
def test_bad_vision_config_values_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_vl(**overrides)


def test_a_vision_model_without_the_placeholder_id_says_how_to_get_it():
    with pytest.raises(ValueError, match="image_token_id=None: a vision model needs the id of the <|image|>"):
        Blues(tiny_vl(image_token_id=None))


# ----------------------------------------------------------------------------- the tower in the model

def test_image_tokens_replace_the_placeholders_and_change_only_what_follows(vl_model):
    ids = span_ids([5, 6, 7], [8, 9, 10])
    a, b = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        la, lb = vl_model(ids, images=a).logits, vl_model(ids, images=b).logits
        # the <|image|> row of the embedding is never read: the image tokens replace it
        vl_model.tok_emb.weight[IMG].add_(1.0)
        la2 = vl_model(ids, images=a).logits
    start = 4  # the first placeholder
    # causal: nothing before the image sees it (1e-5: another image may regroup the MoE's rows, which
    # changes float32 rounding by ~1e-6; a leak would be O(1))
    torch.testing.assert_close(la[:, :start], lb[:, :start], atol=1e-5, rtol=0)
    assert (la[:, start:] - lb[:, start:]).abs().amax(-1).min() > 1e-4  # every later position sees the image
    other = torch.arange(la.shape[-1]) != IMG  # the head is tied: the <|image|> logit itself moves
    torch.testing.assert_close(la[..., other], la2[..., other], atol=0, rtol=0)


def test_the_images_fill_the_spans_in_order(vl_model):
    # two samples, one span each: images[i] belongs to row i, so swapping both swaps the rows' logits
    ids = torch.cat([span_ids([5], [8, 9]), span_ids([5], [8, 9])])
    a, b = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ab = vl_model(ids, images=torch.cat([a, b])).logits
        ba = vl_model(ids, images=torch.cat([b, a])).logits
    torch.testing.assert_close(ab[0], ba[1], atol=1e-6, rtol=0)  # same computation, batch order only
    torch.testing.assert_close(ab[1], ba[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("images, ids, match", [
    (None, span_ids([5], [6]), r"prompt has 4 image placeholders but 0 image\(s\)"),
    (torch.rand(2, 3, 16, 16), span_ids([5], [6]), r"prompt has 4 image placeholders but 2 image\(s\)"),
    (torch.rand(1, 3, 16, 16), torch.tensor([[5, 6, 7]]), r"prompt has 0 image placeholders but 1 image\(s\)"),
    (torch.rand(1, 3, 8, 8), span_ids([5], [6]), r"images have shape \(1, 3, 8, 8\): expected \(M, 3, 16, 16\)"),
])
def test_placeholders_and_images_must_agree(vl_model, images, ids, match):
    with pytest.raises(ValueError, match=match):
        vl_model(ids, images=images)


def test_images_for_a_text_only_model_are_refused():
    torch.manual_seed(0)
    model = Blues(tiny().replace(n_embd=32, n_head=2, expert_ffn_size=32, num_experts=4, block_size=16))
    with pytest.raises(ValueError, match=r"images were given to a text-only model \(vision_enabled=false\)"):
        model(torch.tensor([[1, 2]]), images=torch.rand(1, 3, 16, 16))


def test_the_loss_is_on_the_text_targets_only_and_trains_the_encoder(vl_model):
    vl_model.train()
    ids = span_ids([5], [8, 9, 10, 11])  # (1, 11)
    targets = ids[:, 1:].clone()
    x = ids[:, :-1]
    targets[:, :N + 1] = -1  # the placeholders and <|image_end|> are no targets
    out = vl_model(x, targets, images=torch.rand(1, 3, 16, 16), return_logits=True)
    keep = targets[0] != -1
    want = F.cross_entropy(out.logits[0][keep].float(), targets[0][keep])
    torch.testing.assert_close(out.ce_loss, want)
    out.loss.backward()
    tower = vl_model.vision
    for p in (tower.encoder.patchify.weight, tower.encoder.row_emb, tower.projector.fc1.weight,
              tower.modality_emb.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_gradient_checkpointing_covers_the_encoder(vl_model):
    ids, images = span_ids([5], [8, 9, 10]), torch.rand(1, 3, 16, 16)
    calls = []
    for blk in vl_model.vision.encoder.blocks:  # the attention: recomputation stops once it has what backward needs
        blk.attn.register_forward_hook(lambda *a: calls.append(1))

    def grads(on: bool):
        vl_model.zero_grad()
        vl_model.train()
        (vl_model.gradient_checkpointing_enable if on else vl_model.gradient_checkpointing_disable)()
        calls.clear()
        vl_model(ids, ids, images=images).loss.backward()
        return {n: p.grad.clone() for n, p in vl_model.named_parameters() if p.grad is not None}, len(calls)

    plain, n_plain = grads(False)
    ckpt, n_ckpt = grads(True)
    assert n_plain == 2 and n_ckpt == 4  # each encoder block runs again in backward
    assert plain.keys() == ckpt.keys()
    for name in plain:  # recomputation is the same arithmetic on CPU
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-6, rtol=0, msg=name)


def test_save_and_load_carry_the_vision_tower(vl_model, vl_tokenizer, tmp_path):
    vl_model.save_pretrained(str(tmp_path), tokenizer=vl_tokenizer)
    loaded = Blues.from_pretrained(str(tmp_path)).eval()
    assert loaded.config == vl_model.config
    assert any(k.startswith("vision.encoder.blocks.1.") for k in loaded.state_dict())
    ids, images = span_ids([5], [8, 9]), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, images=images).logits, vl_model(ids, images=images).logits,
                                   atol=0, rtol=0)
