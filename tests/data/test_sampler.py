"""The chunk-wise sampler: exact coverage, rank sharding, determinism and resume."""

from __future__ import annotations

import numpy as np
import pytest

from genkit.data import ChunkBatchSampler, epoch_order, make_loader
from genkit.errors import InvalidParameterError


def test_epoch_order_is_a_permutation_shuffled_by_chunk():
    n, chunk, window = 103, 10, 3
    order = epoch_order(n, chunk, window, seed=1, epoch=0)
    assert sorted(order.tolist()) == list(range(n))
    # with whole chunks, each stretch of `window` chunks' rows comes from exactly `window` chunks
    order = epoch_order(120, chunk, window, seed=1, epoch=0)
    for start in range(0, 120, chunk * window):
        stretch = order[start : start + chunk * window]
        assert len(set((stretch // chunk).tolist())) == window
        assert not np.array_equal(stretch, np.sort(stretch))  # rows mixed within the window
    assert not np.array_equal(order, epoch_order(120, chunk, window, seed=1, epoch=1))
    np.testing.assert_array_equal(order, epoch_order(120, chunk, window, seed=1, epoch=0))


@pytest.mark.parametrize("chunk_len", [1, 7])
def test_every_index_exactly_once_per_epoch(chunk_len):
    s = ChunkBatchSampler(50, 8, chunk_len=chunk_len, window=2, drop_last=False, seed=3)
    seen = [i for b in s for i in b]
    assert sorted(seen) == list(range(50)) and len(s) == 7
    s.set_epoch(1)
    again = [i for b in s for i in b]
    assert sorted(again) == list(range(50)) and again != seen


def test_ranks_are_disjoint_and_complete_with_equal_counts():
    n, b, w = 96, 4, 3
    per_rank = [
        list(ChunkBatchSampler(n, b, chunk_len=5, rank=r, world_size=w, seed=2)) for r in range(w)
    ]
    assert {len(p) for p in per_rank} == {8}
    flat = [i for p in per_rank for batch in p for i in batch]
    assert sorted(flat) == list(range(n))  # disjoint and complete


def test_ranks_get_equal_batch_counts_on_uneven_data():
    n, b, w = 50, 4, 3
    drop = [ChunkBatchSampler(n, b, rank=r, world_size=w) for r in range(w)]
    assert {len(s) for s in drop} == {4}  # 12 full batches, 4 each
    flat = [i for s in drop for batch in s for i in batch]
    assert len(flat) == len(set(flat)) == 48
    pad = [ChunkBatchSampler(n, b, rank=r, world_size=w, drop_last=False) for r in range(w)]
    assert {len(s) for s in pad} == {5}
    assert {i for s in pad for batch in s for i in batch} == set(range(n))


def test_start_batch_resumes_exactly():
    full = list(ChunkBatchSampler(60, 5, chunk_len=4, seed=9, epoch=2))
    resumed = list(ChunkBatchSampler(60, 5, chunk_len=4, seed=9, epoch=2, start_batch=5))
    assert resumed == full[5:]
    with pytest.raises(InvalidParameterError, match="start_batch must be in"):
        ChunkBatchSampler(60, 5, start_batch=13)


def test_loader_order_is_a_function_of_seed_and_epoch(tmp_path, helpers):
    path = helpers.write_h5_images(tmp_path / "x.h5", n=40, chunk_len=6)
    from genkit.data import H5Dataset

    ds = H5Dataset(path, in_memory=False)
    a = [t.clone() for t in make_loader(ds, 4, seed=1, epoch=3)]
    b = [t.clone() for t in make_loader(H5Dataset(path, in_memory=False), 4, seed=1, epoch=3)]
    c = [t.clone() for t in make_loader(ds, 4, seed=1, epoch=4)]
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any((x != y).any() for x, y in zip(a, c, strict=True))
    resumed = list(make_loader(ds, 4, seed=1, epoch=3, start_batch=6))
    assert len(resumed) == len(a) - 6
    assert all((x == y).all() for x, y in zip(a[6:], resumed, strict=True))
    rank1 = make_loader(ds, 4, rank=1, world_size=2)
    assert len(rank1) == 5 and next(iter(rank1)).shape == (4, 1, 6, 5)


def test_bad_sampler_parameters():
    with pytest.raises(InvalidParameterError, match="rank must be in"):
        ChunkBatchSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(InvalidParameterError, match="no full batch"):
        ChunkBatchSampler(10, 8, world_size=2)
