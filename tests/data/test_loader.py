"""TokenLoader: shifted windows, seeded, resumable in a new process, rank-disjoint, clear refusals."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from blues.data.data_dir import load_meta
from blues.data.loader import TokenLoader
from blues.data.prepare import prepare


def test_batches_are_shifted_windows_of_the_split(builtin_cache):
    loader = TokenLoader(builtin_cache, "train", block_size=32, batch_size=4, seed=3)
    tokens = np.fromfile(os.path.join(builtin_cache, "train.bin"), dtype=np.uint16)
    starts = loader._epoch_starts(0)[:4]
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 32) and str(x.dtype) == "torch.int64"
    for row, s in enumerate(starts):
        assert x[row].tolist() == tokens[s:s + 32].tolist()
        assert y[row].tolist() == tokens[s + 1:s + 33].tolist()
    assert loader.meta["vocab_size"] == 4096


def test_same_seed_same_batches_other_seed_other_batches(builtin_cache):
    a, b, c = (TokenLoader(builtin_cache, "train", 16, 4, seed=s) for s in (1, 1, 2))
    xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
    assert xa.equal(xb) and not xa.equal(xc)


RESUME = r"""
import hashlib, json, sys
from blues.data import TokenLoader
data_dir, state_file, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(state_file) as f:
    state = json.load(f)
loader = TokenLoader(data_dir, "train", block_size=64, batch_size=8, seed=5, rank=1, world_size=2)
loader.load_state_dict(state)
for _ in range(n):
    x, y = loader.next_batch()
    print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
"""


def test_state_restored_in_a_new_process_gives_identical_next_batches(builtin_cache, tmp_path):
    loader = TokenLoader(builtin_cache, "train", block_size=64, batch_size=8, seed=5, rank=1, world_size=2)
    per_epoch = len(loader._epoch_starts(0)) // 8
    for _ in range(per_epoch - 2):  # stop 2 batches before the epoch ends: the next ones cross it
        loader.next_batch()
    state = loader.state_dict()
    (tmp_path / "state.json").write_text(json.dumps(state))
    expected = []
    for _ in range(5):
        x, y = loader.next_batch()
        expected.append(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
    assert loader.epoch == 1  # the batches compared do cross an epoch boundary
    r = subprocess.run([sys.executable, "-c", RESUME, builtin_cache, str(tmp_path / "state.json"), "5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == expected


def test_two_ranks_read_disjoint_windows(builtin_cache):
    T, B = 64, 8
    ranks = [TokenLoader(builtin_cache, "train", T, B, seed=9, rank=r, world_size=2) for r in range(2)]
    per_epoch = len(ranks[0]._epoch_starts(0)) // B
    assert per_epoch == len(ranks[1]._epoch_starts(0)) // B  # ranks run in step
    seen = []
    for loader in ranks:
        positions = set()
        for _ in range(per_epoch):
            starts = loader._epoch_starts(0)[loader.pos:loader.pos + B].copy()
            x, _ = loader.next_batch()
            assert x[0].tolist() == loader.tokens[starts[0]:starts[0] + T].tolist()
            for s in starts:
                positions.update(range(s, s + T + 1))
        seen.append(positions)
    assert not seen[0] & seen[1]
    n = ranks[0].num_tokens
    assert len(seen[0] | seen[1]) > 0.97 * n  # an epoch covers nearly the whole split
    # evaluation: the same deterministic windows every call, disjoint across ranks, as many per rank
    evals = [[x for x, _ in loader.eval_batches(5)] for loader in ranks]
    assert len(evals[0]) == len(evals[1]) >= 1
    again = [x for x, _ in ranks[0].eval_batches(5)]
    assert all(a.equal(b) for a, b in zip(evals[0], again))
    rows = [{tuple(r) for x in e for r in x.tolist()} for e in evals]
    assert not rows[0] & rows[1]


def test_eval_windows_spread_over_the_whole_split(builtin_cache):
    """A few evaluation batches sample the whole validation split, not its first documents: each row is
    a whole window of the split, no window twice, the rows cover every tenth of the split, and on 2
    ranks each rank's rows come from its own windows. Asking for more batches than there are gives as
    many windows as whole batches hold, none twice."""
    T, B = 32, 4
    for W in (1, 2):
        loaders = [TokenLoader(builtin_cache, "val", T, B, rank=r, world_size=W) for r in range(W)]
        tokens, n = loaders[0].tokens, loaders[0].num_tokens
        where = {tuple(tokens[p:p + T].tolist()): p for p in range(0, n - T, T + 1)}  # whole windows
        assert len(where) == (n - T - 1) // (T + 1) + 1  # distinct windows: each row's place is unique
        per_rank = (n // (T + 1)) // W
        for loader in loaders:
            pos = [where[tuple(r)] for x, _ in loader.eval_batches(3) for r in x.tolist()]
            assert len(pos) == 12 and len(set(pos)) == 12 and pos == sorted(pos)
            assert all((p // (T + 1)) % W == loader.rank for p in pos)  # this rank's windows only
            assert {p * 10 // n for p in pos} == set(range(10))  # every tenth of the split is sampled
            every = [where[tuple(r)] for x, _ in loader.eval_batches(10 ** 6) for r in x.tolist()]
            assert len(every) == per_rank - per_rank % B and len(set(every)) == len(every)


def test_any_ranks_state_resumes_every_rank(builtin_cache):
    # ranks move in step, so a checkpoint may keep rank 0's loader state only
    r0, r1 = (TokenLoader(builtin_cache, "train", 32, 4, seed=2, rank=r, world_size=2) for r in range(2))
    for _ in range(7):
        r0.next_batch()
        r1.next_batch()
    fresh = TokenLoader(builtin_cache, "train", 32, 4, seed=2, rank=1, world_size=2)
    fresh.load_state_dict(json.loads(json.dumps(r0.state_dict())))
    for _ in range(3):
        assert fresh.next_batch()[0].equal(r1.next_batch()[0])


def test_resume_with_another_world_size_is_refused(builtin_cache):
    state = TokenLoader(builtin_cache, "train", 16, 2, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2 but this loader has world_size=4"):
        TokenLoader(builtin_cache, "train", 16, 2, world_size=4).load_state_dict(state)


def test_split_too_small_for_the_block_size(builtin_cache):
    val_tokens = load_meta(builtin_cache)["splits"]["val"]["num_tokens"]
    with pytest.raises(ValueError, match=rf"split 'val' .* has {val_tokens} tokens: too few for block_size"):
        TokenLoader(builtin_cache, "val", block_size=val_tokens, batch_size=1)


def test_empty_val_split_says_why(tmp_path, write_inputs):
    src = write_inputs(tmp_path / "in")
    prepare(data_dir=str(tmp_path / "c"), input_dir=str(src), val_fraction=0.0)
    with pytest.raises(ValueError, match=r"has 0 tokens \(prepared with val_fraction=0.0\)"):
        TokenLoader(str(tmp_path / "c"), "val", 8, 2)


def test_loader_on_an_unprepared_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no prepared data.*run blues-prepare --data_dir"):
        TokenLoader(str(tmp_path), "train", 16, 2)
