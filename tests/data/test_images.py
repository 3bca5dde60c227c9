"""Image-text data: the synthetic shapes and their captions, the image tokens, prepare_images from the
built-in set, a JSONL of pairs and LLaVA conversations (real Pillow files), ensure_image_data, and
ImageTextLoader (shapes, -1 targets, exact resume, ranks, text mixing)."""
import itertools
import json
import os

import numpy as np
import pytest
import torch

from blues.data.images import (
    IMAGE_TOKENS,
    ImageTextLoader,
    ensure_image_data,
    image_span_ids,
    image_token_ids,
    load_image_meta,
    prepare_images,
    with_image_tokens,
)
from blues.data.shapes import (
    CAPTION_PROMPT,
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    _coverage,
    caption,
    caption_attributes,
    synthetic_sample,
)
from blues.data.tokenizer import Tokenizer, default_tokenizer
from blues.vision.config import VisionConfig, num_image_tokens

torch.set_num_threads(1)
PIL = pytest.importorskip("PIL", reason="Pillow reads the image files of the JSONL/LLaVA layouts")
from PIL import Image  # noqa: E402

SMALL = {"train": 50, "val": 10}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """The built-in set, small: 50 train / 10 val images of 32 px, 16 image tokens each."""
    d = str(tmp_path_factory.mktemp("shapes") / "data")
    prepare_images(d, image_size=32, num_image_tokens=16, num_samples=SMALL, two_object_fraction=0.3)
    return d


def assert_nothing_half_written(data_dir):
    names = os.listdir(data_dir) if os.path.exists(data_dir) else []
    assert "meta.json" not in names and not [n for n in names if n.endswith(".bin") or n.startswith(".tmp-")], names


# ----------------------------------------------------------------------------- the generator

def test_generator_is_deterministic_and_splits_differ():
    a = synthetic_sample(7, "train", 3, 32, two_object_fraction=0.5)
    b = synthetic_sample(7, "train", 3, 32, two_object_fraction=0.5)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert a[0].shape == (3, 32, 32) and a[0].dtype == np.uint8
    train = [synthetic_sample(7, "train", i, 32)[0].tobytes() for i in range(200)]
    val = [synthetic_sample(7, "val", i, 32)[0].tobytes() for i in range(200)]
    other_seed = [synthetic_sample(8, "train", i, 32)[0].tobytes() for i in range(200)]
    assert not set(train) & set(val) and not set(train) & set(other_seed)  # held out by seed
    assert len(set(train)) == 200


def _cell_of(mask):
    """Grid cell (row-major 3 x 3) holding the centroid of a (S, S) mask."""
    ys, xs = np.nonzero(mask)
    S = mask.shape[0]
    return int(ys.mean() * 3 // S) * 3 + int(xs.mean() * 3 // S)


def test_pixels_agree_with_the_attributes():
    # The object's pixels (those far from the dark background) sit in the named cell and their mean
    # colour is nearest the named colour: the caption describes the picture, not just the draw.
    names, rgbs = list(COLOURS), np.array(list(COLOURS.values()), dtype=float)
    for i in range(100):
        image, text, attrs = synthetic_sample(0, "train", i, 32)
        assert caption_attributes(text) == attrs
        pixels = image.transpose(1, 2, 0).astype(float)  # (S, S, 3)
        solid = pixels.max(axis=2) > 120  # shape colours' brightest channel >= 150, background <= 50
        assert solid.sum() >= 6, (i, text)
        assert POSITIONS[_cell_of(solid)] == attrs["position"], (i, text)
        mean = pixels[solid].mean(axis=0)
        assert names[np.argmin(((rgbs - mean) ** 2).sum(axis=1))] == attrs["colour"], (i, text, mean)


def test_shapes_are_told_apart_by_their_pixels():
    # each pair of shapes differs on at least 15% of the pixels either covers, at the drawn size
    g = (np.arange(64) + 0.5) / 4 - 8  # a 16-pixel square, 4x supersampled, centred
    masks = {s: _coverage(s, g[None, :], g[:, None], 3.5) for s in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        assert (masks[a] ^ masks[b]).sum() >= 0.15 * (masks[a] | masks[b]).sum(), (a, b)


def test_caption_parser_round_trips_every_caption():
    for colour, shape, position in itertools.product(COLOURS, SHAPES, POSITIONS):
        attrs = {"colour": colour, "shape": shape, "position": position}
        assert caption_attributes(caption(attrs)) == attrs
        assert caption_attributes(" " + caption(attrs) + "\n") == attrs  # decoded text may carry spaces
    for c1, s1, rel, c2, s2 in itertools.product(COLOURS, SHAPES, RELATIONS, ["red", "white"], ["cross"]):
        attrs = {"colour": c1, "shape": s1, "relation": rel, "colour2": c2, "shape2": s2}
        assert caption_attributes(caption(attrs)) == attrs
    for junk in ("", "a red", "a red circle", "a red circle at the top lef", "a pink circle at the top",
                 "a red circle at the top left and more"):
        assert caption_attributes(junk) == {}, junk


def test_two_object_captions_name_the_relation_of_the_cells():
    seen = set()
    for i in range(300):
        _, text, attrs = synthetic_sample(1, "train", i, 32, two_object_fraction=1.0)
        (r1, c1), (r2, c2) = (divmod(POSITIONS.index(attrs[k]), 3) for k in ("position", "position2"))
        want = ("left of" if c1 < c2 else "right of") if c1 != c2 else ("above" if r1 < r2 else "below")
        assert attrs["relation"] == want and caption_attributes(text)["relation"] == want
        seen.add(want)
    assert seen == set(RELATIONS)


def test_the_benchmark_prompt_is_a_token_boundary():
    # prompt = image span + encode("a"); the model completes the rest: the caption's own tokens
    tok = default_tokenizer()
    for colour, shape, position in itertools.product(COLOURS, SHAPES, POSITIONS):
        text = caption({"colour": colour, "shape": shape, "position": position})
        assert tok.encode(text) == tok.encode(CAPTION_PROMPT) + tok.encode(text[len(CAPTION_PROMPT):])


# ----------------------------------------------------------------------------- image tokens

def test_with_image_tokens_appends_three_ids_idempotently(tmp_path):
    base = default_tokenizer()
    tok = with_image_tokens(base)
    assert image_token_ids(tok) == (base.n_vocab, base.n_vocab + 1, base.n_vocab + 2)
    assert tok.n_vocab == base.n_vocab + 3 and tok.fingerprint != base.fingerprint
    assert with_image_tokens(tok).fingerprint == tok.fingerprint and with_image_tokens(tok).n_vocab == tok.n_vocab
    assert with_image_tokens("default").fingerprint == tok.fingerprint
    assert tok.encode("a <|image|>") == base.encode("a <|image|>")  # their text in a document stays plain text
    assert tok.decode(image_span_ids(tok, 2)) == "<|image_start|><|image|><|image|><|image_end|>"
    tok.save(str(tmp_path))
    again = Tokenizer.load(str(tmp_path))
    assert again.fingerprint == tok.fingerprint and image_token_ids(again) == image_token_ids(tok)
    with pytest.raises(ValueError, match=r"has no <\|image_start\|>.*with_image_tokens"):
        image_token_ids(base)


# ----------------------------------------------------------------------------- the built-in set

def test_builtin_set_meta_and_reuse(shapes_dir):
    meta = load_image_meta(shapes_dir)
    assert meta["kind"] == "image_text" and meta["image_size"] == 32 and meta["num_image_tokens"] == 16
    assert {s: meta["splits"][s]["num_samples"] for s in SMALL} == SMALL
    assert meta["tokenizer"]["fingerprint"] == with_image_tokens("default").fingerprint
    assert Tokenizer.load(shapes_dir).fingerprint == meta["tokenizer"]["fingerprint"]
    again = prepare_images(shapes_dir, image_size=32, num_image_tokens=16, num_samples=SMALL,
                           two_object_fraction=0.3)
    assert again["reused"] and again["build_id"] == meta["build_id"]


def test_loader_rows_targets_and_images(shapes_dir):
    tok = Tokenizer.load(shapes_dir)
    start, image, end = image_token_ids(tok)
    loader = ImageTextLoader(shapes_dir, "val", block_size=48, batch_size=10, seed=0)
    x, y, images = next(loader.eval_batches(1))
    assert x.shape == y.shape == (10, 48) and x.dtype == y.dtype == torch.int64
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.float32
    for b in range(10):
        pixels, text, _ = synthetic_sample(1337, "val", b, 32, two_object_fraction=0.3)
        assert torch.equal(images[b], torch.from_numpy(pixels).float() / 255)  # sample b's own image
        ids = tok.encode(text) + [tok.eot_id]
        assert x[b, 0] == start and (x[b, 1:17] == image).all() and x[b, 17] == end
        assert x[b, 18:18 + len(ids) - 1].tolist() == ids[:-1]
        # a target exactly where the next token is text (the caption and its <|endoftext|>)
        taken = (y[b] != -1).nonzero().flatten().tolist()
        assert taken == list(range(17, 17 + len(ids))) and y[b, taken].tolist() == ids


def test_block_size_too_small_names_the_need(shapes_dir):
    with pytest.raises(ValueError, match=r"block_size=20 is too small .* needs block_size >= 3\d"):
        ImageTextLoader(shapes_dir, "train", block_size=20, batch_size=4)


def test_resume_is_exact_mid_epoch_and_across_epochs(shapes_dir):
    # 50 samples, batches of 7: the 8th batch crosses into epoch 1
    a = ImageTextLoader(shapes_dir, "train", block_size=40, batch_size=7, seed=3)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # it goes into a checkpoint as JSON
    want = [a.next_batch() for _ in range(6)]
    b = ImageTextLoader(shapes_dir, "train", block_size=40, batch_size=7, seed=3)
    b.load_state_dict(state)
    for (x0, y0, i0), (x1, y1, i1) in zip(want, (b.next_batch() for _ in range(6))):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(i0, i1)
    other = ImageTextLoader(shapes_dir, "train", block_size=40, batch_size=7, seed=4)
    with pytest.raises(ValueError, match="seed=3 but this loader has seed=4"):
        other.load_state_dict(state)


def test_ranks_take_disjoint_samples(shapes_dir):
    seen = []
    for rank in range(2):
        loader = ImageTextLoader(shapes_dir, "train", block_size=40, batch_size=5, seed=0, rank=rank, world_size=2)
        seen.append({im.numpy().tobytes() for _ in range(5) for im in loader.next_batch()[2]})
    assert len(seen[0]) == len(seen[1]) == 25 and not seen[0] & seen[1]


def test_text_batches_mix_in_and_resume(shapes_dir, builtin_cache):
    def run(n, state=None):
        loader = ImageTextLoader(shapes_dir, "train", block_size=40, batch_size=4, seed=0,
                                 text_data_dir=builtin_cache, text_batch_fraction=0.5)
        if state:
            loader.load_state_dict(state)
        return loader, [loader.next_batch() for _ in range(n)]

    loader, first = run(6)
    state = loader.state_dict()
    _, rest = run(10, state)
    _, whole = run(16)
    kinds = [b[2] is None for b in whole]
    assert 3 <= sum(kinds) <= 13  # both kinds occur (16 draws at 1/2: this seed gives some of each)
    for (x0, y0, i0), (x1, y1, i1) in zip(whole, first + rest):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert (i0 is None and i1 is None) or torch.equal(i0, i1)
    text = next(b for b in whole if b[2] is None)
    assert text[0].shape == (4, 40) and (text[1] >= 0).all()  # text-only: every next token is a target
    with pytest.raises(ValueError, match="text_batch_fraction=0.5 needs text_data_dir"):
        ImageTextLoader(shapes_dir, "train", 40, 4, text_batch_fraction=0.5)


# ----------------------------------------------------------------------------- ensure_image_data

def test_ensure_writes_the_builtin_set_once_and_refuses_other_folders(tmp_path, builtin_cache):
    vcfg = VisionConfig(image_size=16, patch_size=8)
    d = str(tmp_path / "d")
    meta = ensure_image_data(d, vcfg)
    assert not meta["reused"] and meta["image_size"] == 16 and meta["num_image_tokens"] == num_image_tokens(vcfg) == 4
    assert ensure_image_data(d, vcfg)["reused"]
    # built-in data of another size is the built-in set's to replace (nothing of the user's is lost)
    meta2 = ensure_image_data(d, VisionConfig(image_size=24, patch_size=8))
    assert not meta2["reused"] and meta2["image_size"] == 24 and meta2["num_image_tokens"] == 9
    with pytest.raises(ValueError, match="holds text data .* but the vision config needs image-text data"):
        ensure_image_data(builtin_cache, vcfg)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds no image-text data but is not empty \(it holds 'notes.txt'\)"):
        ensure_image_data(str(tmp_path / "other"), vcfg)
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


# ----------------------------------------------------------------------------- JSONL and LLaVA layouts

def _png(path, mode, size, seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(path)
    return arr


@pytest.fixture
def pairs(tmp_path):
    """A JSONL of 6 pairs: RGB 32 px (as is), RGB 40x20 (resized), L (converted), RGBA 32 px
    (converted), a text-only record (skipped), and a LLaVA conversation."""
    src = tmp_path / "src"
    (src / "pics").mkdir(parents=True)
    rgb = _png(src / "pics" / "rgb.png", "RGB", (32, 32), 1)
    _png(src / "pics" / "wide.png", "RGB", (40, 20), 2)
    _png(src / "pics" / "grey.png", "L", (32, 32), 3)
    _png(src / "pics" / "alpha.png", "RGBA", (32, 32), 4)
    lines = [
        {"image": "pics/rgb.png", "text": "an exact picture"},
        {"image": "pics/wide.png", "text": "a wide picture"},
        {"image": "pics/grey.png", "text": "a grey picture"},
        {"image": "pics/alpha.png", "text": "a transparent picture"},
        {"text": "no picture at all"},
        {"image": "pics/rgb.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
    ]
    path = src / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path, rgb


def _samples(data_dir, split="train"):
    """Every sample of a split as (text of its loss targets, text of the whole row, image (3, S, S) uint8)."""
    tok = Tokenizer.load(data_dir)
    meta = load_image_meta(data_dir)
    n = meta["splits"][split]["num_samples"]
    loader = ImageTextLoader(data_dir, split, block_size=64, batch_size=max(n, 1))
    x, y, images = next(loader.eval_batches(1))
    span = 2 + meta["num_image_tokens"]
    out = []
    for b in range(len(x)):
        row = x[b, span:].tolist()
        out.append((tok.decode(y[b][y[b] >= 0]), tok.decode(row[:row.index(tok.eot_id)]),
                    (images[b] * 255).round().to(torch.uint8).numpy()))
    return out


def test_prepare_pairs_converts_resizes_counts_and_keeps_pixels(tmp_path, pairs):
    path, rgb = pairs
    d = str(tmp_path / "d")
    meta = prepare_images(d, str(path), image_size=32, num_image_tokens=4, val_fraction=0.0)
    assert meta["num_samples"] == 5 and meta["splits"]["val"]["num_samples"] == 0
    assert meta["source"]["num_text_only_skipped"] == 1
    assert meta["num_resized"] == 1 and meta["converted_modes"] == {"L": 1, "RGBA": 1}
    samples = {full: (taken, img) for taken, full, img in _samples(d)}
    assert samples["an exact picture"][0] == "an exact picture<|endoftext|>"
    assert np.array_equal(samples["an exact picture"][1], rgb.transpose(2, 0, 1))  # RGB at size: untouched
    # LLaVA: the loss is on the gpt turns (with their separator) only; the <image> marker is gone
    convo = "What is it?\nNoise.\nSure?\nYes."
    assert samples[convo][0] == "Noise.\nYes.<|endoftext|>"
    assert np.array_equal(samples[convo][1], rgb.transpose(2, 0, 1))
    assert prepare_images(d, str(path), image_size=32, num_image_tokens=4, val_fraction=0.0)["reused"]
    # ensure_image_data takes the user's data as it is, and never rewrites it for another vision config
    assert ensure_image_data(d, VisionConfig(image_size=32, patch_size=16))["reused"]
    with pytest.raises(ValueError, match=r"holds images of 32 px with 4 image tokens but the vision config needs "
                                         r"image_size=16 with 16: re-run blues-prepare --images .*pairs.jsonl"):
        ensure_image_data(d, VisionConfig(image_size=16, patch_size=4))
    _png(tmp_path / "src" / "pics" / "grey.png", "L", (32, 32), 99)  # an image changed: prepared again
    assert not prepare_images(d, str(path), image_size=32, num_image_tokens=4, val_fraction=0.0)["reused"]


def test_prepare_llava_json_list_and_val_split(tmp_path):
    src = tmp_path / "llava"
    src.mkdir()
    items = []
    for i in range(20):
        _png(src / f"{i}.png", "RGB", (8, 8), i)
        items.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]})
    (src / "llava.json").write_text(json.dumps(items))
    d = str(tmp_path / "d")
    meta = prepare_images(d, str(src / "llava.json"), image_size=8, num_image_tokens=1, val_fraction=0.2, seed=1)
    sp = meta["splits"]
    assert sp["train"]["num_samples"] + sp["val"]["num_samples"] == 20 and sp["val"]["num_samples"] >= 1
    texts = [t for s in ("train", "val") for t in _samples(d, s)]
    assert sorted(full for _, full, _ in texts) == sorted(f"Question {i}?\nAnswer {i}." for i in range(20))
    assert all(taken.startswith("Answer ") and taken.endswith(".<|endoftext|>") for taken, _, _ in texts)


@pytest.mark.parametrize("case", ["missing", "corrupt", "two_markers", "no_text", "bad_json"])
def test_bad_inputs_name_the_file_and_line_and_write_nothing(tmp_path, pairs, case):
    path, _ = pairs
    lines = path.read_text().splitlines()
    if case == "missing":
        lines.insert(2, json.dumps({"image": "pics/gone.png", "text": "x"}))
        want = r"image file '.*pics/gone.png' named on .*pairs.jsonl line 3 does not exist"
    elif case == "corrupt":
        (path.parent / "pics" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        lines.insert(3, json.dumps({"image": "pics/bad.png", "text": "x"}))
        want = r"image file '.*pics/bad.png' named on .*pairs.jsonl line 4 cannot be read"
    elif case == "two_markers":
        lines.append(json.dumps({"image": "pics/rgb.png", "conversations": [
            {"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "two"}]}))
        want = r"pairs.jsonl line 7: the conversation has 2 <image> placeholders but a sample holds one image"
    elif case == "no_text":
        lines.append(json.dumps({"image": "pics/rgb.png", "caption": "wrong key"}))
        want = r"pairs.jsonl line 7 has keys \['caption', 'image'\]: expected a non-empty \"text\""
    else:
        lines.append("{not json")
        want = r"pairs.jsonl line 7 is not valid JSON"
    path.write_text("\n".join(lines) + "\n")
    d = str(tmp_path / "d")
    with pytest.raises(ValueError, match=want):
        prepare_images(d, str(path), image_size=32, num_image_tokens=4)
    assert_nothing_half_written(d)


def test_image_tokens_are_the_tokens_of_the_span(shapes_dir):
    tok = Tokenizer.load(shapes_dir)
    assert [tok.decode([i]) for i in image_token_ids(tok)] == list(IMAGE_TOKENS)
