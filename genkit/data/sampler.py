"""Chunk-wise shuffled batches, deterministic in (seed, epoch), sharded across ranks.

An epoch's order: the chunks (runs of ``chunk_len`` consecutive rows, the HDF5 chunks) are
put in a random order; consecutive groups of ``window`` chunks are pooled and their rows
shuffled; the result is cut into batches of ``batch_size``. Rank ``r`` of ``world_size``
takes batches ``r, r + world_size, ...``, so ranks are disjoint and, together, cover the epoch.
Every rank sees the same number of batches: with ``drop_last`` the incomplete tail is
dropped; without it the order is padded by wrapping to its start (only when
``world_size > 1``; a single rank gets a short last batch instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from genkit.errors import DataError, InvalidParameterError


def epoch_order(
    n: int, chunk_len: int, window: int, seed: int, epoch: int, shuffle: bool = True
) -> np.ndarray:
    """The permutation of ``range(n)`` for one epoch: chunk order shuffled, rows shuffled
    within each window of ``window`` chunks. A pure function of its arguments."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])
    num_chunks = -(-n // chunk_len)
    chunks = rng.permutation(num_chunks)  # chunk order
    starts = chunks * chunk_len
    lengths = np.minimum(n, starts + chunk_len) - starts
    offsets = np.cumsum(lengths) - lengths
    rows = np.arange(n) - np.repeat(offsets - starts, lengths)  # the chunks' rows, in order
    window_of = np.repeat(np.arange(num_chunks) // window, lengths)
    return rows[np.lexsort((rng.random(n), window_of))].astype(np.int64)  # shuffle in windows


class ChunkBatchSampler(Sampler[list[int]]):
    """Batches of indices for one rank; see the module docstring for the order.

    :param n: examples in the dataset.
    :param chunk_len: rows per chunk (1 shuffles row by row, as for in-memory data).
    :param window: chunks pooled before shuffling rows (bounded by the reader's cache).
    :param start_batch: batches of this epoch to skip (exact resume); reset by
        :meth:`set_epoch`.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        chunk_len: int = 1,
        window: int = 8,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        start_batch: int = 0,
    ) -> None:
        if batch_size < 1:
            raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidParameterError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        if chunk_len < 1 or window < 1:
            raise InvalidParameterError(
                f"chunk_len and window must be >= 1, got {chunk_len}, {window}"
            )
        self.n, self.batch_size = int(n), int(batch_size)
        self.chunk_len, self.window = int(chunk_len), int(window)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.rank, self.world_size = int(rank), int(world_size)
        if self.batches_per_rank() == 0:
            raise InvalidParameterError(
                f"{n} training examples make no full batch of {batch_size} on each of "
                f"{world_size} process(es); use a batch_size of at most {n // world_size}"
            )
        self.epoch = int(epoch)
        self.start_batch = 0
        self._set_start(start_batch)

    def _set_start(self, start_batch: int) -> None:
        if not 0 <= start_batch <= self.batches_per_rank():
            raise InvalidParameterError(
                f"start_batch must be in [0, {self.batches_per_rank()}], got {start_batch}"
            )
        self.start_batch = int(start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch the next iteration yields (and where in it to start)."""
        self.epoch = int(epoch)
        self._set_start(start_batch)

    def batches_per_rank(self) -> int:
        """Batches each rank sees in a whole epoch."""
        total = self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
        return total // self.world_size if self.drop_last else -(-total // self.world_size)

    def rank_batches(self) -> list[np.ndarray]:
        """This rank's batches for the current epoch, from batch 0."""
        order = epoch_order(
            self.n, self.chunk_len, self.window, self.seed, self.epoch, self.shuffle
        )
        per_rank, b, w = self.batches_per_rank(), self.batch_size, self.world_size
        if self.drop_last:
            order = order[: per_rank * w * b]
        elif w > 1:
            order = np.resize(order, per_rank * w * b)  # wraps around to the start
        batches = [order[i : i + b] for i in range(0, len(order), b)]
        return batches[self.rank :: w]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.rank_batches()[self.start_batch :]:
            yield batch.tolist()

    def __len__(self) -> int:
        return self.batches_per_rank() - self.start_batch


def collate_batch(batch: Any) -> Tensor:
    """The ``collate_fn`` for an :class:`H5Dataset` in a DataLoader: its ``__getitems__``
    already returns the stacked batch (B, ...), which torch's default collate cannot take."""
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start_batch: int = 0,
    window: int = 8,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of float tensors (B, ...) over ``dataset`` (an :class:`H5Dataset`).

    The order is a pure function of ``(seed, epoch)``, shuffled at chunk granularity
    (in-memory data row by row); ``start_batch`` skips this epoch's first batches;
    ``rank``/``world_size`` shard every epoch disjointly with equal batch counts.
    ``len(loader)`` is the number of batches this rank sees. For the next epoch call
    ``loader.batch_sampler.set_epoch(epoch)`` or make a new loader.
    """
    in_memory = getattr(dataset, "in_memory", True)
    chunk_len = 1 if in_memory else int(getattr(dataset, "chunk_len", 1))
    cache_chunks = int(getattr(dataset, "cache_chunks", window))
    sampler = ChunkBatchSampler(
        len(dataset),
        batch_size,
        chunk_len=chunk_len,
        window=max(1, min(window, cache_chunks)),
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        start_batch=start_batch,
    )
    if num_workers > 0 and hasattr(dataset, "close"):
        dataset.close()  # the parent's handle (if any) is not carried into forked workers
    has_batched_read = hasattr(dataset, "__getitems__")
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_batch if has_batched_read else None,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def batch_tensor(batch: Any) -> Tensor:
    """A loader's batch as one tensor ``(B, ...)``; of an ``(x, label)`` batch, ``x``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch:
        return batch_tensor(batch[0])
    raise DataError(f"a batch must be a tensor (B, ...), got {type(batch).__name__}")


def _collate(items: Any) -> Tensor:
    if isinstance(items, Tensor):  # __getitems__ already returned the whole batch
        return items
    return torch.stack([batch_tensor(i) for i in items])


def make_eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Every example of ``dataset`` once, in order, in batches of ``batch_size``."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=_collate,
    )
