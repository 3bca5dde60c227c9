"""Data: raw text -> token files -> training batches.

    sources.py    where documents come from: built-in corpus, a folder of files, a Hugging Face dataset
    tokenizer.py  Tokenizer (tiktoken), the shipped default, training a BPE with rustbpe, check_vocab
    data_dir.py   a prepared data_dir on disk: meta.json, load_meta, check_tokenizer, the lock
    prepare.py    prepare() (raw text -> a prepared data_dir) and ensure_prepared() (only if missing)
    loader.py     TokenLoader: seeded, resumable, rank-disjoint batches from a prepared data_dir

The console scripts are in blues/cli/ (blues-prepare; python -m blues.cli.tokenizer).

`prepare` here is the module blues.data.prepare, not the function (a package attribute cannot be
both): call blues.data.prepare.prepare(...), or `from blues.data.prepare import prepare`.
Importing the package costs ~0.15 s (numpy, tiktoken); datasets, pyarrow, torch and tqdm are
imported inside the functions that need them.
"""
from blues.data.data_dir import META_FILE, SPLITS, check_tokenizer, load_meta
from blues.data.loader import TokenLoader
from blues.data.prepare import ensure_prepared
from blues.data.sources import builtin_corpus, iter_input_dir
from blues.data.tokenizer import ENDOFTEXT, Tokenizer, check_vocab, default_tokenizer, train_tokenizer

__all__ = ["ENDOFTEXT", "META_FILE", "SPLITS", "TokenLoader", "Tokenizer", "builtin_corpus", "check_tokenizer",
           "check_vocab", "default_tokenizer", "ensure_prepared", "iter_input_dir", "load_meta", "train_tokenizer"]
