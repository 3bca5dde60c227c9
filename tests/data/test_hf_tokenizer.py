"""A Hugging Face tokenizer.json as Blues' tokenizer (blues.data.hf_tokenizer): loading by content,
the same ids as transformers' fast tokenizer, data preparation with it, and a model folder that keeps it.

The tokenizer is trained here, offline, with the `tokenizers` library (byte-level BPE, as Llama 3,
Qwen and Mixtral's successors use), and saved the way transformers saves one."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers", reason="HFTokenizer reads tokenizer.json through it "
                                 "(installed with transformers by .[dev]; CI has it, where a skip fails)")

from blues.data.hf_tokenizer import HFTokenizer  # noqa: E402
from blues.data.prepare import prepare  # noqa: E402
from blues.data.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["def main():\n    return 0\n", "The quick brown fox jumps over the lazy dog.", "naive cafe, 3.14 * 2"] * 50


def train_hf_tokenizer(folder, eos="</s>", with_config=True) -> str:
    """A byte-level BPE of 300 ids with <s>, </s>, <pad> specials, saved as transformers does."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    if with_config:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": eos, "bos_token": "<s>", "model_max_length": 64}, f)
    return str(folder)


def test_a_hugging_face_tokenizer_json_loads_by_content(tmp_path):
    folder = train_hf_tokenizer(tmp_path / "hf")
    for spec in (folder, os.path.join(folder, "tokenizer.json")):
        tok = Tokenizer.load(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.eot_id == 1 and tok.special_tokens["</s>"] == 1 and tok.n_vocab == 300
    assert not isinstance(Tokenizer.load("default"), HFTokenizer)  # Blues' own tokenizer.json is Blues'


def test_ids_equal_transformers_fast_tokenizer_and_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the reference ids are its fast tokenizer's")
    folder = train_hf_tokenizer(tmp_path / "hf")
    tok = Tokenizer.load(folder)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    for text in ("def main(): return 42", "héllo wörld 🙂", ""):
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text  # byte-level: every string round-trips
        assert np.array_equal(tok.encode_to_numpy(text), np.array(ids, dtype=np.uint32))
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_special_token_text_is_plain_text_unless_allowed(tmp_path):
    tok = Tokenizer.load(train_hf_tokenizer(tmp_path / "hf"))
    assert tok.eot_id not in tok.encode("end</s>")  # as Blues' own: a document cannot end itself
    assert tok.encode("end</s>", allowed_special=True)[-1] == tok.eot_id


def test_eot_from_the_special_tokens_without_a_config(tmp_path):
    tok = Tokenizer.load(train_hf_tokenizer(tmp_path / "hf", with_config=False))
    assert tok.eot_id == tok.special_tokens["</s>"]


def test_no_end_of_text_token_is_one_clear_error(tmp_path):
    folder = train_hf_tokenizer(tmp_path / "hf", with_config=False)
    path = os.path.join(folder, "tokenizer.json")
    d = json.load(open(path))
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != "</s>"]
    d["model"]["vocab"].pop("</s>")
    json.dump(d, open(path, "w"))
    with pytest.raises(ValueError, match="names no end-of-text token Blues can use: add a tokenizer_config.json"):
        Tokenizer.load(folder)


def test_a_corrupt_hugging_face_tokenizer_json_is_one_clear_error(tmp_path):
    folder = train_hf_tokenizer(tmp_path / "hf")
    path = os.path.join(folder, "tokenizer.json")
    d = json.load(open(path))
    d["model"]["type"] = "NoSuchModel"
    json.dump(d, open(path, "w"))
    with pytest.raises(ValueError, match="is not a valid Hugging Face tokenizer.json"):
        Tokenizer.load(folder)


def test_save_load_and_pickle_keep_the_ids(tmp_path):
    tok = Tokenizer.load(train_hf_tokenizer(tmp_path / "hf"))
    tok.save(str(tmp_path / "copy"))
    again = Tokenizer.load(str(tmp_path / "copy"))
    assert again.fingerprint == tok.fingerprint and again.eot_id == tok.eot_id
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("fox dog") == tok.encode("fox dog") and clone.fingerprint == tok.fingerprint


def test_prepare_with_a_hugging_face_tokenizer(tmp_path):
    folder = train_hf_tokenizer(tmp_path / "hf")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i}.txt").write_text(TEXTS[i % 3] * 3)
    meta = prepare(data_dir=str(tmp_path / "data"), input_dir=str(docs), tokenizer=folder, progress=False)
    tok = Tokenizer.load(folder)
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["tokenizer"]["eot_id"] == tok.eot_id
    saved = Tokenizer.load(str(tmp_path / "data"))  # the data folder keeps the tokenizer it was made with
    assert isinstance(saved, HFTokenizer) and saved.fingerprint == tok.fingerprint
    train = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16)
    assert train.max() < tok.n_vocab and (train == tok.eot_id).sum() > 0  # documents joined by eot
