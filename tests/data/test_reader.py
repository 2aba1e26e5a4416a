"""The reader: model-ready tensors, chunk-wise batched reads, workers, bounded cache."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest
import torch

from genkit.data import H5Dataset, make_loader, open_dataset
from genkit.distributions import to_model_scale


@pytest.fixture
def h5file(tmp_path, helpers):
    return helpers.write_h5_images(tmp_path / "x.h5", n=50, chunk_len=7)


def raw(path, split="train"):
    with h5py.File(path, "r") as f:
        return f[f"{split}/images"][()]


@pytest.mark.parametrize("in_memory", [True, False])
def test_items_and_batches_are_model_scale(h5file, in_memory):
    ds = H5Dataset(h5file, in_memory=in_memory)
    x = raw(h5file)
    assert (len(ds), ds.data_shape, ds.kind, ds.chunk_len) == (50, (1, 6, 5), "images", 7)
    assert ds[3].dtype == torch.float32 and ds[3].shape == (1, 6, 5)
    torch.testing.assert_close(ds[3], torch.from_numpy(x[3].astype(np.float32)) / 127.5 - 1)
    torch.testing.assert_close(ds[-1], to_model_scale(torch.from_numpy(x[-1])))
    order = [41, 2, 9, 8, 40, 2, 0, 49]  # several chunks, out of order, a repeat
    batch = ds.__getitems__(order)
    torch.testing.assert_close(batch, to_model_scale(torch.from_numpy(x[order])))
    assert float(batch.min()) >= -1 and float(batch.max()) <= 1
    np.testing.assert_array_equal(ds.labels, np.arange(50) % 7)
    with pytest.raises(IndexError, match="out of range"):
        ds.__getitems__([50])


def test_streaming_cache_is_bounded(h5file):
    # one chunk is 7 * 30 bytes; a 500-byte cache holds two of them
    ds = H5Dataset(h5file, in_memory=False, cache_bytes=500)
    assert ds.cache_chunks == 2
    for start in range(0, 50, 5):
        ds.__getitems__(list(range(start, start + 5)))
        assert len(ds._cache) <= 2
    assert sum(a.nbytes for a in ds._cache.values()) <= 500


def test_default_in_memory_for_small_splits(h5file):
    assert open_dataset(h5file).in_memory
    assert not open_dataset(h5file, in_memory=False).in_memory


def test_pickle_drops_the_handle_and_reopens(h5file):
    ds = H5Dataset(h5file, in_memory=False)
    first = ds[5]
    assert ds._file is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._file is None and clone._values is None
    torch.testing.assert_close(clone[5], first)


@pytest.mark.parametrize("in_memory", [False, True])
def test_loader_with_two_workers_matches_single_process(h5file, in_memory):
    ds = H5Dataset(h5file, in_memory=in_memory)
    ds[0]  # open a handle in the parent: workers must not use it
    kw = dict(batch_size=8, seed=4, epoch=1, drop_last=False)
    single = torch.cat(list(make_loader(ds, **kw)))
    multi = torch.cat(list(make_loader(ds, num_workers=2, **kw)))
    torch.testing.assert_close(multi, single)
    everything = to_model_scale(torch.from_numpy(raw(h5file)))
    key = lambda t: sorted(r.numpy().tobytes() for r in t)  # noqa: E731
    assert key(multi) == key(everything)  # each example exactly once


def test_vectors_come_out_as_stored(tmp_path):
    from genkit.data import DatasetArrays, SplitArrays, write_h5

    v = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    path = write_h5(
        DatasetArrays(splits={"train": SplitArrays(data=v)}), tmp_path / "v.h5", chunk_len=6
    )
    ds = H5Dataset(path, in_memory=False)
    assert ds.kind == "vectors" and ds.labels is None
    np.testing.assert_array_equal(ds.__getitems__([19, 0, 7]).numpy(), v[[19, 0, 7]])


def test_plain_dataloader_and_subset_with_collate_batch(h5file):
    from torch.utils.data import DataLoader, Subset

    from genkit.data import collate_batch

    ds = H5Dataset(h5file, in_memory=False)
    x = to_model_scale(torch.from_numpy(raw(h5file)))
    batches = list(DataLoader(ds, batch_size=16, collate_fn=collate_batch))
    assert [b.shape[0] for b in batches] == [16, 16, 16, 2]
    torch.testing.assert_close(torch.cat(batches), x)
    sub = Subset(ds, [4, 40, 11])
    got = next(iter(DataLoader(sub, batch_size=3, collate_fn=collate_batch)))
    torch.testing.assert_close(got, x[[4, 40, 11]])


def test_plain_dataloader_workers_do_not_use_the_parents_handle(h5file):
    """A plain DataLoader (no make_loader, so nothing closes the parent's handle first): each
    forked worker opens the file itself and reads the same values."""
    from torch.utils.data import DataLoader

    from genkit.data import collate_batch

    class Spy(H5Dataset):
        def __getitems__(self, indices):
            x = super().__getitems__(indices)
            # the handle this read used belongs to this process (a worker, not the parent)
            assert self._pid == os.getpid() and self._file.id.valid
            return torch.cat([x.flatten(1), torch.full((len(x), 1), float(os.getpid()))], 1)

    ds = Spy(h5file, in_memory=False)
    ds[0]  # the parent holds an open handle when the workers fork
    parent = os.getpid()
    loader = DataLoader(
        ds, batch_size=10, num_workers=2, collate_fn=collate_batch, multiprocessing_context="fork"
    )
    got = torch.cat(list(loader))
    pids = set(got[:, -1].long().tolist())
    assert len(pids) == 2 and parent not in pids
    torch.testing.assert_close(
        got[:, :-1], to_model_scale(torch.from_numpy(raw(h5file))).flatten(1)
    )
