"""blues-prepare --images: the built-in shapes end to end, a JSONL of pairs with conversions counted,
--check, and bad inputs as one line on stderr, exit 2, nothing half-written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from blues.cli.prepare import main
from blues.common import EXIT_USAGE
from blues.data.data_dir import load_meta
from blues.data.images import ImageTextLoader, load_image_meta, with_image_tokens
from blues.data.tokenizer import train_tokenizer
from blues.vision.config import VisionConfig, num_image_tokens

pytest.importorskip("PIL", reason="Pillow reads the image files of --images SRC")
from PIL import Image  # noqa: E402


def run_cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments):
    assert rc == EXIT_USAGE
    assert err.startswith("blues-prepare: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)


def assert_nothing_half_written(data_dir):
    names = os.listdir(data_dir) if os.path.exists(data_dir) else []
    assert "meta.json" not in names and not [n for n in names if n.endswith(".bin") or n.startswith(".tmp-")], names


def test_builtin_images_end_to_end_offline(tmp_path):
    # a subprocess, as a user runs it: --images alone means the built-in set, at the VisionConfig defaults
    d = tmp_path / "d"
    r = subprocess.run([sys.executable, "-m", "blues.cli.prepare", "--images", "--data_dir", str(d)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = load_image_meta(str(d))
    vcfg = VisionConfig()
    assert meta["image_size"] == vcfg.image_size and meta["num_image_tokens"] == num_image_tokens(vcfg)
    assert meta["source"]["kind"] == "builtin_shapes" and meta["tokenizer"]["n_vocab"] == 4099
    assert f"{meta['num_samples']:,} images" in r.stdout and "built-in shapes" in r.stdout
    x, y, images = ImageTextLoader(str(d), "train", 48, 4).next_batch()
    assert images.shape == (4, 3, vcfg.image_size, vcfg.image_size)
    r2 = subprocess.run([sys.executable, "-m", "blues.cli.prepare", "--images", "builtin", "--data_dir", str(d),
                         "--check"], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "complete image-text data" in r2.stdout, r2.stderr


def test_patch_size_and_merge_set_the_image_tokens(tmp_path, capsys):
    rc, out, err = run_cli(["--images", "--data_dir", str(tmp_path / "d"), "--image_size", "48", "--patch_size",
                            "8", "--merge_patches", "--two_object_fraction", "0.5"], capsys)
    assert rc == 0, err
    meta = load_image_meta(str(tmp_path / "d"))
    assert meta["image_size"] == 48 and meta["num_image_tokens"] == 9  # (48 / 8) ** 2 / 4
    assert meta["source"]["two_object_fraction"] == 0.5 and "9 image tokens each" in out


def _pairs(tmp_path, lines):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / "ok.png")
    Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8), "L").save(src / "grey.jpg")
    path = src / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_pairs_report_conversions(tmp_path, capsys):
    path = _pairs(tmp_path, [{"image": "ok.png", "text": "fine"}, {"image": "grey.jpg", "text": "grey"},
                             {"text": "text only"}])
    rc, out, err = run_cli(["--images", path, "--data_dir", str(tmp_path / "d"), "--val_fraction", "0"], capsys)
    assert rc == 0, err
    assert "2 images (2 train / 0 val)" in out and "1 resized, converted to RGB: 1 L" in out
    assert "1 text-only records skipped" in out
    meta = load_image_meta(str(tmp_path / "d"))
    assert meta["num_resized"] == 1 and meta["converted_modes"] == {"L": 1}
    rc, out, err = run_cli(["--images", path, "--data_dir", str(tmp_path / "d"), "--val_fraction", "0"], capsys)
    assert rc == 0 and out.startswith("reused: "), err


@pytest.mark.parametrize("case", ["missing", "unreadable", "not_a_file", "vocab_size", "text_dir"])
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, case):
    d = str(tmp_path / "d")
    argv = ["--data_dir", d]
    if case == "missing":
        argv += ["--images", _pairs(tmp_path, [{"image": "ok.png", "text": "a"}, {"image": "nope.png", "text": "b"}])]
        want = ["nope.png", "pairs.jsonl line 2", "does not exist"]
    elif case == "unreadable":
        path = _pairs(tmp_path, [{"image": "ok.png", "text": "a"}, {"image": "ok.png", "text": "b"},
                                 {"image": "junk.png", "text": "c"}])
        (tmp_path / "src" / "junk.png").write_bytes(b"GIF89a but then nothing")
        argv += ["--images", path]
        want = ["junk.png", "pairs.jsonl line 3", "cannot be read"]
    elif case == "not_a_file":
        argv += ["--images", str(tmp_path)]
        want = [f"--images {str(tmp_path)!r} is not a .jsonl or .json file"]
    elif case == "vocab_size":
        argv += ["--images", "--vocab_size", "300"]
        want = ["--vocab_size 300 trains a text tokenizer; with --images pass --tokenizer"]
    else:
        os.makedirs(d)
        assert main(["--corpus", "pydoc", "--data_dir", d]) == 0
        capsys.readouterr()
        argv += ["--images"]
        want = ["holds text data prepared by blues-prepare: pass another --data_dir"]
    rc, out, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, *want)
    if case != "text_dir":
        assert_nothing_half_written(d)
    else:  # the text data is left as it was
        assert not [n for n in os.listdir(d) if ".images." in n] and load_meta(d)["source"]["kind"] == "builtin"


def test_check_refuses_another_tokenizer(tmp_path, capsys):
    d = str(tmp_path / "d")
    assert run_cli(["--images", "--data_dir", d, "--image_size", "16"], capsys)[0] == 0
    other = train_tokenizer(["some text to learn a few merges from"] * 20, 270, "other")
    other.save(str(tmp_path / "tok"))
    rc, out, err = run_cli(["--images", "--data_dir", d, "--check", "--tokenizer", str(tmp_path / "tok")], capsys)
    assert_one_line_error(rc, err, "tokenizer 'other' (273 ids", "does not match the data")
    rc, out, err = run_cli(["--images", "--data_dir", d, "--check"], capsys)
    assert rc == 0 and f"({with_image_tokens('default').n_vocab} ids) matches 'default'" in out, err
