"""Reading documents: every file kind, in path order, hidden and unknown files skipped, Hugging Face
datasets offline; and what prepare() makes of them."""
import json
import os

from blues.data.prepare import prepare
from blues.data.sources import builtin_corpus, builtin_corpus_info, iter_input_dir, network_available
from blues.data.tokenizer import ENDOFTEXT

EOT = ENDOFTEXT


def test_iter_input_dir_yields_every_document_in_path_order(tmp_path, write_inputs, docs):
    src = write_inputs(tmp_path / "in")
    stats = {}
    found = list(iter_input_dir(str(src), stats=stats))
    # the one empty document (c.jsonl line 4) is yielded too: prepare counts it, then skips it
    assert [t for t, _ in found] == docs[:3] + [""] + docs[3:]
    assert [w for _, w in found][:5] == ["a.txt", "c.jsonl line 1", "c.jsonl line 3", "c.jsonl line 4",
                                         "d.json item 0"]
    assert found[-1][1] == os.path.join("sub", "b.md") and stats == {}


def test_builtin_corpus_info_describes_the_corpus():
    info = builtin_corpus_info()
    assert info["documents"] == len(builtin_corpus()) > 0
    assert info["bytes"] == sum(len(d.encode()) for d in builtin_corpus())


def test_network_available_answers_false_offline_without_raising(no_network):
    assert network_available("huggingface.co") is False
    assert no_network  # it did try, once


def test_multi_file_shards_decode_to_the_documents_joined_by_eot(tmp_path, write_inputs, docs, decode_split):
    src = write_inputs(tmp_path / "in")
    meta = prepare(data_dir=str(tmp_path / "c"), input_dir=str(src), val_fraction=0.0)
    assert decode_split(tmp_path / "c", "train") == EOT.join(docs)
    assert meta["splits"]["val"]["num_tokens"] == 0
    assert meta["num_documents"] == len(docs) and meta["num_empty_documents"] == 1
    assert meta["source"]["num_files"] == 5  # notes.csv and .hidden.txt are not read


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path, split_documents):
    src = tmp_path / "in"
    src.mkdir()
    (src / "rows.json").write_text('{"text": "one"}\n{"text": "two"}\n')
    (src / "more.json").write_text('{"text": "three"}')  # a single object is one document
    prepare(data_dir=str(tmp_path / "c"), input_dir=str(src), val_fraction=0.0)
    assert split_documents(tmp_path / "c", "train") == ["three", "one", "two"]


def test_local_hf_dataset_offline_keeps_its_cache_inside(tmp_path, no_network, docs, decode_split):
    src = tmp_path / "ds"
    src.mkdir()
    (src / "part.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    cache = tmp_path / "c"
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE")}
    import datasets.config
    import huggingface_hub.constants
    hub_offline_before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    meta = prepare(data_dir=str(cache), dataset=str(src), text_field="body", val_fraction=0.0)
    assert meta["source"]["kind"] == "dataset" and meta["source"]["num_rows"] == len(docs)
    assert decode_split(cache, "train") == EOT.join(docs)
    assert os.listdir(cache / "hf_cache")  # the datasets cache went inside the cache dir
    assert no_network == []  # a local folder is read in offline mode: not even a probe
    assert {k: os.environ.get(k) for k in env_before} == env_before  # the offline flags are set only meanwhile
    import datasets.config
    import huggingface_hub.constants
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == hub_offline_before
    assert prepare(data_dir=str(cache), dataset=str(src), text_field="body", val_fraction=0.0)["reused"]
