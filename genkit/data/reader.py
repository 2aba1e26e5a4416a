"""Reading genkit's HDF5 layout as a ``torch.utils.data.Dataset`` of model-ready tensors.

:class:`H5Dataset` reads one split. Images come out as float32 on the model scale
``x = k / 127.5 - 1`` in [-1, 1] (uint8 pixel ``k``); vectors as stored. Whole batches are read
by :meth:`H5Dataset.__getitems__`: the rows are grouped by HDF5 chunk and each chunk is read
whole, once, into a bounded LRU cache (``cache_bytes``), so memory stays flat however large
the file is. Small splits are read into memory at once (``in_memory``).

The object is picklable and holds no open HDF5 handle across processes: each DataLoader
worker (fork or spawn) opens the file itself on first use.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from genkit.data.errors import (
    CorruptFileError,
    DataFileNotFoundError,
    LayoutError,
    MissingSplitError,
    NotHDF5Error,
)
from genkit.data.layout import CHUNK_BYTES, DATA, IMAGES, LABELS, ordered_splits
from genkit.errors import DataError

#: Splits smaller than this are read into memory when ``in_memory=None``.
IN_MEMORY_BYTES = 256 * 2**20
#: Default bound on the decoded chunks a streaming reader keeps (per process).
CACHE_BYTES = 64 * 2**20
#: What h5py raises when an open file's metadata or chunks are damaged (a corrupt B-tree is a
#: RuntimeError, a corrupt object header a KeyError, a bad dataspace a ValueError).
H5_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


def _reason(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else ""
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def corrupt_file_errors(path: str | Path) -> Iterator[None]:
    """Turn what h5py raises for a damaged file into one :class:`CorruptFileError`; genkit's
    own :class:`DataError` (a missing split, a wrong dtype, ...) passes through unchanged."""
    try:
        yield
    except DataError:
        raise
    except H5_READ_ERRORS as exc:
        raise CorruptFileError(f"'{path}' is truncated or corrupt: {_reason(exc)}") from None


def open_h5(path: str | Path) -> h5py.File:
    """Open ``path`` read-only, turning every failure into one clear :class:`DataError`."""
    path = Path(path)
    if not path.exists():
        raise DataFileNotFoundError(f"data file '{path}' does not exist")
    if path.is_dir():
        raise NotHDF5Error(f"'{path}' is a folder, not an HDF5 file")
    with corrupt_file_errors(path):
        if not h5py.is_hdf5(path):
            raise NotHDF5Error(f"'{path}' is not an HDF5 file (no HDF5 signature)")
        return h5py.File(path, "r", rdcc_nbytes=CHUNK_BYTES)


def _text(name: str | bytes) -> str:
    """An HDF5 member name as text (h5py gives bytes for a name that is not UTF-8)."""
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def split_names(f: h5py.File) -> list[str]:
    """The split groups at the top level of ``f``: ``train``, ``test``, then the rest."""
    return ordered_splits(_text(k) for k in f if isinstance(f[k], h5py.Group))


def _member(group: h5py.Group, name: str, path: str | Path, split: str) -> h5py.Dataset:
    """``group[name]``, which the layout requires to be a dataset (not a group or a type)."""
    obj = group[name]
    if not isinstance(obj, h5py.Dataset):
        raise LayoutError(
            f"'{path}' {split}/{name} must be a dataset, got an HDF5 {type(obj).__name__}"
        )
    return obj


def describe_split(f: h5py.File, split: str, path: str | Path) -> tuple[h5py.Dataset, Any]:
    """The values dataset and the labels dataset (or None) of ``split``, checked against the
    layout: present, right rank and dtype, not empty, labels of matching length.

    Call it inside :func:`corrupt_file_errors` (h5py's errors for a damaged file vary)."""
    groups = split_names(f)
    if split not in groups:
        raise MissingSplitError(
            f"split '{split}' not in '{path}'; splits: {', '.join(groups) or 'none'}"
        )
    group = f[split]
    if IMAGES in group:
        values = _member(group, IMAGES, path, split)
        if values.ndim != 4 or values.dtype != np.uint8:
            raise LayoutError(
                f"'{path}' {split}/images must be uint8 of rank 4 (N, C, H, W), got "
                f"{values.dtype} {values.shape}"
            )
    elif DATA in group:
        values = _member(group, DATA, path, split)
        if values.ndim != 2 or values.dtype.kind != "f":
            raise LayoutError(
                f"'{path}' {split}/data must be float of rank 2 (N, D), got "
                f"{values.dtype} {values.shape}"
            )
    else:
        raise MissingSplitError(
            f"split '{split}' of '{path}' has no 'images' or 'data' dataset; it holds: "
            f"{', '.join(_text(k) for k in group) or 'nothing'}"
        )
    if values.shape[0] == 0:
        raise LayoutError(f"split '{split}' of '{path}' is empty (0 examples)")
    labels = _member(group, LABELS, path, split) if LABELS in group else None
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise LayoutError(
                f"'{path}' {split}/labels must be integers of shape (N,), got "
                f"{labels.dtype} {labels.shape}"
            )
        if labels.shape[0] != values.shape[0]:
            raise LayoutError(
                f"'{path}' {split}: {labels.shape[0]} labels for {values.shape[0]} examples"
            )
    return values, labels


class H5Dataset(Dataset):
    """One split of a genkit HDF5 file as model-ready float32 tensors.

    ``ds[i]``: (C, H, W) in [-1, 1] (``x = k / 127.5 - 1``) or (D,) vectors as stored;
    ``ds.__getitems__(indices)``: (B, ...) read chunk by chunk in one pass.

    :param path: the HDF5 file.
    :param split: the group to read (``train``, ``test``).
    :param in_memory: read the whole split at construction; ``None`` does so when the split
        is smaller than 256 MiB.
    :param cache_bytes: the most decoded chunk bytes a streaming reader keeps per process.
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        *,
        in_memory: bool | None = None,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.path = Path(path)
        self.split = split
        self.cache_bytes = int(cache_bytes)
        with corrupt_file_errors(self.path), open_h5(self.path) as f:
            values, labels = describe_split(f, split, self.path)
            self.kind = "images" if values.name.endswith(IMAGES) else "vectors"
            self.data_shape: tuple[int, ...] = tuple(int(d) for d in values.shape[1:])
            self.num_examples = int(values.shape[0])
            self.dtype = values.dtype
            self.nbytes = int(values.size) * values.dtype.itemsize
            self.attrs = {k: plain_value(v) for k, v in f.attrs.items()}
            item_bytes = max(1, self.nbytes // self.num_examples)
            stored = values.chunks[0] if values.chunks else max(1, CHUNK_BYTES // item_bytes)
            self.chunk_len = int(min(stored, self.num_examples))
            self.labels = labels[()].astype(np.int64) if labels is not None else None
            self.in_memory = self.nbytes < IN_MEMORY_BYTES if in_memory is None else in_memory
            self._array: np.ndarray | None = values[()] if self.in_memory else None
            if self.kind == "vectors":
                self._check_finite(values)
        self.chunk_bytes = self.chunk_len * item_bytes
        #: how many decoded chunks fit in the cache (at least one)
        self.cache_chunks = max(1, self.cache_bytes // max(1, self.chunk_bytes))
        self._file: h5py.File | None = None
        self._values: h5py.Dataset | None = None
        self._pid: int | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _check_finite(self, values: h5py.Dataset) -> None:
        """NaN or infinite vector values are an error, found chunk by chunk."""
        block = self._array if self._array is not None else values
        step = self.chunk_len * 8
        for start in range(0, self.num_examples, step):
            part = block[start : start + step]
            bad = ~np.isfinite(part)
            if bad.any():
                row = start + int(np.argwhere(bad)[0][0])
                raise LayoutError(
                    f"'{self.path}' {self.split}/data holds NaN or infinite values (first in row {row})"
                )

    # -- process-local file handle --------------------------------------------------------
    def _dataset(self) -> h5py.Dataset:
        if self._pid != os.getpid() or self._values is None:
            # A handle inherited through fork is never used: each process opens its own.
            with corrupt_file_errors(self.path):
                self._file = open_h5(self.path)
                self._values = describe_split(self._file, self.split, self.path)[0]
            self._pid = os.getpid()
            self._cache = OrderedDict()
        return self._values

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_file=None, _values=None, _pid=None, _cache=OrderedDict())
        return state

    def close(self) -> None:
        """Close this process's file handle (reopened on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._values, self._pid = None, None, None
        self._cache = OrderedDict()

    # -- reading --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_examples

    def _chunk(self, c: int) -> np.ndarray:
        """Chunk ``c`` (rows ``c * chunk_len`` onward), decoded, through the LRU cache."""
        hit = self._cache.get(c)
        if hit is not None:
            self._cache.move_to_end(c)
            return hit
        start = c * self.chunk_len
        values = self._dataset()
        with corrupt_file_errors(self.path):
            block = values[start : start + self.chunk_len]
        self._cache[c] = block
        while len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return block

    def read_raw(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored values (uint8 pixels or float vectors) of ``indices``, in that order:
        (B, ...). Rows are read chunk by chunk, each chunk once."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_examples
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"index {int(bad)} out of range for {n} examples")
        idx = np.where(idx < 0, idx + n, idx)
        if self._array is not None:
            return self._array[idx]
        out = np.empty((idx.size, *self.data_shape), dtype=self.dtype)
        chunk_of = idx // self.chunk_len
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        for group in np.split(order, bounds) if idx.size else []:
            c = int(chunk_of[group[0]])
            out[group] = self._chunk(c)[idx[group] - c * self.chunk_len]
        return out

    def _to_tensor(self, raw: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(raw))
        if self.kind == "vectors":
            return t.to(torch.float32)
        # x = k / 127.5 - 1 (as genkit.distributions.to_model_scale), in place: one buffer
        return t.to(torch.float32).div_(127.5).sub_(1.0)

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        """A whole batch: (B, C, H, W) in [-1, 1] or (B, D)."""
        return self._to_tensor(self.read_raw(indices))

    def __getitem__(self, i: int) -> Tensor:
        """One example: (C, H, W) in [-1, 1] or (D,)."""
        return self._to_tensor(self.read_raw([int(i)]))[0]

    def __repr__(self) -> str:
        mode = "in memory" if self.in_memory else f"streaming, cache {self.cache_bytes} B"
        return (
            f"H5Dataset('{self.path}', split='{self.split}', {self.kind} {self.data_shape}, "
            f"n={self.num_examples}, {mode})"
        )


def plain_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return (
            [plain_value(v) for v in value.tolist()] if value.dtype.kind == "O" else value.tolist()
        )
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


class RowRange(Dataset):
    """Rows ``start .. stop - 1`` of a dataset as a dataset of their own (a view: nothing is
    copied), with the attributes the loaders read (``data_shape``, ``in_memory``,
    ``chunk_len``, ``cache_chunks``) passed through and batched reads (``__getitems__``) kept.
    A range that starts at row 0 keeps the chunk alignment of the chunk-wise sampler."""

    def __init__(self, dataset: Any, start: int, stop: int) -> None:
        if not 0 <= start < stop <= len(dataset):
            raise ValueError(f"a row range needs 0 <= start < stop <= {len(dataset)}")
        self.dataset, self.start, self.stop = dataset, int(start), int(stop)
        for name in ("data_shape", "in_memory", "chunk_len", "cache_chunks", "kind"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.dataset[self.start + i]

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        rows = [self.start + int(i) for i in indices]
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(rows)
        return torch.stack([self.dataset[i] for i in rows])

    def close(self) -> None:
        if hasattr(self.dataset, "close"):
            self.dataset.close()


def hold_out(dataset: Any, fraction: float) -> tuple[Any, Any]:
    """``(kept, held_out)``: the last ``ceil(fraction * N)`` rows of ``dataset`` held out
    (genkit's files store each split in a random order, so they are a random subset), the
    rest kept; each a :class:`RowRange`."""
    n = len(dataset)
    held = math.ceil(fraction * n)
    if not 0 < held < n:
        raise DataError(
            f"holding out {fraction:g} of {n} examples leaves {n - held} to train on and "
            f"{held} to validate on; both must be >= 1"
        )
    return RowRange(dataset, 0, n - held), RowRange(dataset, n - held, n)


def check_splits(*datasets: H5Dataset | None) -> None:
    """Every split given holds items of one kind, shape and dtype (``None``s are skipped);
    otherwise one :class:`LayoutError` line naming the file and both splits."""
    present = [d for d in datasets if d is not None]
    for other in present[1:]:
        first = present[0]
        if (first.kind, first.data_shape, first.dtype) != (
            other.kind,
            other.data_shape,
            other.dtype,
        ):
            raise LayoutError(
                f"'{other.path}': split '{other.split}' holds {_items(other)} but split "
                f"'{first.split}' holds {_items(first)}; every split must hold items of one "
                "shape and dtype"
            )


def _items(ds: H5Dataset) -> str:
    return f"{ds.kind} of shape {ds.data_shape} {ds.dtype}"


def open_dataset(
    spec: str | Path,
    split: str = "train",
    *,
    in_memory: bool | None = None,
    cache_dir: Path | None = None,
    cache_bytes: int = CACHE_BYTES,
) -> H5Dataset:
    """Open one split of an HDF5 file, or of a built-in dataset given as ``"builtin:NAME"``
    (converted into ``cache_dir`` on first use; see :func:`genkit.data.builtin.builtin_path`).
    """
    text = str(spec)
    if text.startswith("builtin:"):
        from genkit.data.builtin import builtin_path

        path = builtin_path(text.removeprefix("builtin:"), cache_dir=cache_dir)
    else:
        path = Path(spec).expanduser()
    return H5Dataset(path, split, in_memory=in_memory, cache_bytes=cache_bytes)
