"""Generation with images: model.generate(prompt, images=[...]) and blues-generate --image."""
import numpy as np
import pytest
import torch

from blues.cli.generate import main
from blues.model import Blues
from blues.presets import tiny
from blues.vision.images import to_pixels

from .conftest import tiny_vl

N = 4  # image tokens per image in tiny_vl


@pytest.fixture
def model(vl_tokenizer):
    torch.manual_seed(0)
    m = Blues(tiny_vl(init_std=0.3)).eval()  # a wide init: greedy decoding then varies from token to token
    m.tokenizer = vl_tokenizer
    return m


def picture(seed=0, size=16):
    """An HxWx3 uint8 array."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def span(tok):
    s = tok.special_tokens
    return [s["<|image_start|>"]] + [s["<|image|>"]] * N + [s["<|image_end|>"]]


# ----------------------------------------------------------------------------- decoding

def test_cached_decoding_equals_recomputing_with_an_image(model, vl_tokenizer):
    ids = torch.tensor([[5] + span(vl_tokenizer) + [64, 65, 66, 67, 68, 69, 70]])  # (1, 14)
    images = to_pixels(picture(), 16)[None]  # (1, 3, 16, 16)
    P = 8  # prefill the first token, the span and one more; then one token at a time
    with torch.no_grad():
        full = model(ids, images=images).logits
        cache = model.new_kv_cache(1)
        steps = [model(ids[:, :P], kv_cache=cache, images=images).logits]
        steps += [model(ids[:, t:t + 1], kv_cache=cache).logits for t in range(P, ids.shape[1])]
    # the same sums in another grouping (a cached key block vs one matrix): float32 rounding only
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    kw = dict(images=[picture()], max_new_tokens=12)
    greedy = model.generate("a", temperature=0, **kw)
    assert greedy == model.generate("a", temperature=0, use_cache=False, **kw)
    assert model.generate("a", temperature=1.0, seed=1, **kw) == \
        model.generate("a", temperature=1.0, seed=1, use_cache=False, **kw)
    assert len(set(vl_tokenizer.encode(greedy))) > 2  # not one token repeated: the comparison has teeth


def test_text_after_the_image_is_causal(model, vl_tokenizer):
    ids = torch.tensor([[5] + span(vl_tokenizer) + [64, 65, 66, 67]])
    later = ids.clone()
    later[0, -1] = 99
    images = to_pixels(picture(), 16)[None]
    with torch.no_grad():
        a, b = model(ids, images=images).logits, model(later, images=images).logits
    # A changed token may route to other experts, which regroups every expert's rows: the matmuls'
    # blocking then rounds float32 differently (2e-6 measured); a leak of the future would be O(1).
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=1e-5, rtol=0)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-2


def test_the_span_goes_before_the_text_or_at_the_marker(model, vl_tokenizer):
    img = picture()
    a_ids = vl_tokenizer.encode("a")
    as_text = model.generate("a", images=[img], temperature=0, max_new_tokens=6)
    as_ids = model.generate(span(vl_tokenizer) + a_ids, images=[img], temperature=0, max_new_tokens=6)
    assert as_text == vl_tokenizer.decode(as_ids)
    # a marker puts the span where it stands; the token ids without a span get it first
    x, y = vl_tokenizer.encode("x "), vl_tokenizer.encode(" y")
    marked = model.generate("x <|image|> y", images=[img], temperature=0, max_new_tokens=6)
    assert marked == vl_tokenizer.decode(model.generate(x + span(vl_tokenizer) + y, images=[img], temperature=0,
                                                        max_new_tokens=6))
    assert model.generate(a_ids, images=[img], temperature=0, max_new_tokens=6) == as_ids


def test_every_image_form_gives_the_same_pixels():
    from PIL import Image
    arr = picture(size=32)  # not 16 x 16: resized
    want = to_pixels(arr, 16)
    assert want.shape == (3, 16, 16) and want.dtype == torch.float32 and 0 <= want.min() and want.max() <= 1
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    for form in (Image.fromarray(arr), Image.fromarray(arr).convert("RGBA"), chw, chw.float() / 255):
        torch.testing.assert_close(to_pixels(form, 16), want, atol=0, rtol=0)
    same = to_pixels(picture(size=16), 16)
    assert torch.equal(same, torch.from_numpy(picture(size=16)).permute(2, 0, 1).float() / 255)  # no resize


@pytest.mark.parametrize("prompt, images, match", [
    ("<|image|> a", None, r"prompt has an image placeholder \(<\|image\|>\) but no image"),
    ([4096, 4097, 4097, 4097, 4097, 4098], None, r"prompt has an image placeholder \(<\|image\|>\) but no image"),
    ("<|image|> a", [picture(0), picture(1)], r"prompt has 1 <\|image\|> marker\(s\) but 2 image\(s\)"),
    ([4096, 4097, 4097, 4098, 5], [picture()], r"prompt has 2 image placeholders but 1 image\(s\)"),
    (["a", "b"], [picture()], r"images= goes with one prompt, got 2 prompts"),
    ("a", [np.zeros((16, 16), dtype=np.uint8)], r"an image array must be HxWx3 uint8, got shape \(16, 16\)"),
    ("a", ["cat.png"], r"an image must be a PIL image, an HxWx3 uint8 array or a \(3, H, W\) tensor, got str"),
    ("a", [], r"images must be a non-empty list"),
])
def test_bad_image_prompts_are_one_clear_error(model, prompt, images, match):
    with pytest.raises(ValueError, match=match):
        model.generate(prompt, images=images, max_new_tokens=2)


def test_images_for_a_text_only_model_are_refused():
    torch.manual_seed(0)
    model = Blues(tiny().replace(n_embd=32, n_head=2, expert_ffn_size=32, num_experts=4, block_size=16))
    with pytest.raises(ValueError, match=r"images were given but the model is text-only"):
        model.generate([1, 2], images=[picture()], max_new_tokens=2)


# ----------------------------------------------------------------------------- blues-generate --image

def test_blues_generate_with_an_image(model, vl_tokenizer, tmp_path, capsys):
    from PIL import Image
    model.save_pretrained(str(tmp_path / "m"))
    Image.fromarray(picture(size=40)).save(tmp_path / "pic.png")
    args = ["--model", str(tmp_path / "m"), "--prompt", "a", "--max_new_tokens", "6", "--temperature", "0"]
    assert main(args + ["--image", str(tmp_path / "pic.png")]) == 0
    expected = model.generate("a", images=[Image.open(tmp_path / "pic.png")], max_new_tokens=6, temperature=0)
    assert capsys.readouterr().out == expected + "\n"

    (tmp_path / "not_an_image.png").write_text("hello")
    for bad in ("missing.png", "not_an_image.png"):
        assert main(args + ["--image", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"blues-generate: error: image file {str(tmp_path / bad)!r} named on --image cannot "
                              "be read") and err.count("\n") == 1 and "Traceback" not in err


def test_blues_generate_image_with_a_text_only_model_is_one_line(tmp_path, capsys):
    from blues.data.tokenizer import default_tokenizer
    tok = default_tokenizer()
    torch.manual_seed(0)
    Blues(tiny().replace(n_embd=32, n_head=2, expert_ffn_size=32, num_experts=4, block_size=16)).save_pretrained(
        str(tmp_path), tokenizer=tok)
    assert main(["--model", str(tmp_path), "--prompt", "a", "--image", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "--image needs a vision model" in err and err.count("\n") == 1
