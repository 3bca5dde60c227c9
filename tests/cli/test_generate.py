"""blues-generate: the CLI over Blues.from_pretrained and generate()."""
import pytest
import torch

from blues.cli.generate import main
from blues.config import BluesConfig
from blues.data.tokenizer import default_tokenizer
from blues.model import Blues

# the model of tests/test_weights.py, which this test came from
CFG = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32, num_kv_heads=2, num_experts=4, top_k=2,
           expert_ffn_size=24, num_shared_experts=1, num_dense_layers=1)


def build(**kw) -> Blues:
    torch.manual_seed(0)
    return Blues(BluesConfig.from_dict({**CFG, **kw})).eval()


def test_blues_generate_cli(tmp_path, capsys):
    tok = default_tokenizer()
    model = build(vocab_size=tok.n_vocab)
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    assert main(["--model", str(tmp_path), "--prompt", "def f", "--max_new_tokens", "6", "--temperature", "0"]) == 0
    expected = model.generate("def f", tokenizer=tok, max_new_tokens=6, temperature=0)
    assert capsys.readouterr().out == expected + "\n"
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blues-generate: error:") and "config.json' does not exist" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line_exit_2(tmp_path, capsys, device):
    tok = default_tokenizer()
    build(vocab_size=tok.n_vocab).save_pretrained(str(tmp_path), tokenizer=tok)
    assert main(["--model", str(tmp_path), "--prompt", "x", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err == f"blues-generate: error: --device {device!r}: this machine has no CUDA device; use --device cpu\n"


def test_a_device_that_is_not_one_is_refused(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--prompt", "x", "--device", "gpu7"]) == 2
    err = capsys.readouterr().err
    assert "--device 'gpu7' is not a device" in err and "Traceback" not in err


def test_help_names_the_folder_training_writes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "out/model" in capsys.readouterr().out
