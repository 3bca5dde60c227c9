"""Training and evaluation batches from a prepared data_dir: seeded, resumable, rank-disjoint.

Shapes: B batch_size, T block_size (tokens per training sequence).
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np

from blues.data.data_dir import SPLITS, check_tokenizer, load_meta
from blues.data.tokenizer import Tokenizer


def next_entries(stream, order_of_epoch) -> np.ndarray:
    """The next stream.batch_size entries of the per-epoch orders order_of_epoch(epoch), running into the
    next epoch when one ends; advances stream.epoch, stream.pos and stream.batches."""
    take: list[np.ndarray] = []
    need = stream.batch_size
    while need:
        order = order_of_epoch(stream.epoch)
        part = order[stream.pos: stream.pos + need]
        take.append(part)
        need -= len(part)
        stream.pos += len(part)
        if stream.pos >= len(order):
            stream.epoch, stream.pos = stream.epoch + 1, 0
    stream.batches += 1
    return np.concatenate(take)


def check_resumable(stream, state: dict, names: tuple[str, ...]) -> None:
    """ValueError unless a saved loader `state` resumes `stream` exactly: the same `names` settings and
    data of the same fingerprint."""
    for name in names:
        if state.get(name) != getattr(stream, name):
            raise ValueError(f"loader state has {name}={state.get(name)!r} but this loader has "
                             f"{name}={getattr(stream, name)!r}: the stream cannot be resumed exactly; "
                             f"use the saved {name}")
    if state.get("data_fingerprint") != stream.meta["fingerprint"]:
        saved = str(state.get("data_fingerprint"))[:12]
        raise ValueError(f"loader state was saved on data with fingerprint {saved} but {stream.data_dir!r} holds "
                         f"{stream.meta['fingerprint'][:12]}: the data was re-prepared from other inputs, so the "
                         f"stream cannot be resumed exactly")


class TokenLoader:
    """Batches of windows of block_size + 1 tokens from one split of a prepared data_dir.

    Training (next_batch): each epoch cuts the split into windows of T + 1 tokens at a random offset,
    shuffles them (seeded by seed and epoch) and deals them to ranks like cards: rank r takes
    windows r, r + W, r + 2W, ... of the shuffled list, so ranks never share a token in an epoch
    and all ranks run the same number of batches per epoch. The state is (epoch, position):
    load_state_dict(state_dict()) resumes exactly, in any process, on any rank (ranks move in step).
    Evaluation (eval_batches): windows spread evenly over the split, dealt to ranks the same way.
    """

    def __init__(self, data_dir: str, split: str, block_size: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, tokenizer: Union[None, str, Tokenizer] = None):
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} is invalid: expected 0 <= rank < world_size={world_size}")
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: expected one of {', '.join(SPLITS)}")
        self.data_dir, self.split = data_dir, split
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.meta = load_meta(data_dir)
        if tokenizer is not None:
            check_tokenizer(tokenizer, self.meta)
        info = self.meta["splits"][split]
        self.num_tokens = n = info["num_tokens"]
        window = block_size + 1
        if n < window * world_size:
            hint = (f" (prepared with val_fraction={self.meta['val_fraction']})" if n == 0 else "")
            raise ValueError(f"split {split!r} of {data_dir!r} has {n} tokens{hint}: too few for "
                             f"block_size={block_size} on {world_size} rank(s), which needs (block_size + 1) * "
                             f"world_size = {window * world_size}; prepare more data or lower block_size")
        self.tokens = np.memmap(os.path.join(data_dir, info["file"]), dtype=self.meta["dtype"], mode="r")
        self.epoch, self.pos, self.batches = 0, 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_starts(self, epoch: int) -> np.ndarray:
        """Start offsets of this rank's windows in `epoch`, in the order they are served."""
        if self._order_epoch != epoch:
            T1, W, n = self.block_size + 1, self.world_size, self.num_tokens
            rng = np.random.default_rng([self.seed, epoch, SPLITS.index(self.split)])
            offset = int(rng.integers(0, min(T1 - 1, n - T1 * W) + 1))
            num = (n - offset) // T1
            perm = rng.permutation(num)
            mine = perm[self.rank::W][: num // W]  # equal length on every rank
            self._order, self._order_epoch = offset + mine.astype(np.int64) * T1, epoch
        return self._order

    def _gather(self, starts: np.ndarray):
        import torch

        idx = starts[:, None] + np.arange(self.block_size + 1)  # (B, T+1)
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))  # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:]  # x (B, T), y (B, T)

    def next_batch(self):
        """(x, y) int64 of shape (batch_size, block_size), y = x shifted left by one token."""
        return self._gather(next_entries(self, self._epoch_starts))

    def state_dict(self) -> dict:
        """Plain ints and strings (JSON-able): where the stream is, and what it must be resumed with."""
        return {"epoch": self.epoch, "pos": self.pos, "batches": self.batches, "seed": self.seed,
                "split": self.split, "block_size": self.block_size, "world_size": self.world_size,
                "data_fingerprint": self.meta["fingerprint"]}

    def load_state_dict(self, state: dict) -> None:
        check_resumable(self, state, ("seed", "split", "block_size", "world_size"))
        self.epoch, self.pos, self.batches = int(state["epoch"]), int(state["pos"]), int(state.get("batches", 0))

    def num_eval_batches(self, num_batches: int) -> int:
        per_rank = (self.num_tokens // (self.block_size + 1)) // self.world_size
        return max(1, min(num_batches, per_rank // self.batch_size))

    def eval_batches(self, num_batches: int):
        """Up to `num_batches` batches of windows spread evenly over the whole split, the same every
        call, as many on every rank (when fewer windows than one batch, one smaller batch).

        The split is cut into windows from its start and dealt to ranks like cards; of this rank's
        windows, M evenly spaced ones are taken (all of them when M is their number).
        NOTE: consecutive windows from the start of the split (as before) put the 41k tokens of the
        tiny preset's 10 evaluation batches into the first 2-3 files of stdlib_full's 477k validation
        tokens: a loss of those files, not of the split, and a noisy one to compare models on."""
        T1, W, B = self.block_size + 1, self.world_size, self.batch_size
        per_rank = (self.num_tokens // T1) // W
        M = min(self.num_eval_batches(num_batches) * B, per_rank)
        k = np.arange(M, dtype=np.int64) * per_rank // M  # (M,) evenly spaced, distinct: M <= per_rank
        starts = (self.rank + W * k) * T1
        for b in range(0, M, B):
            yield self._gather(starts[b: b + B])

