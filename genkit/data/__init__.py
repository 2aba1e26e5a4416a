"""genkit's data layer: an HDF5 layout, converters into it, and a fast PyTorch reader.

- :func:`open_dataset` / :class:`H5Dataset`: one split as model-ready float32 tensors
  (uint8 pixels ``k`` -> ``k / 127.5 - 1``), batched chunk-wise reads, worker-safe.
- :func:`make_loader`: a DataLoader shuffled at chunk granularity, deterministic in
  (seed, epoch), resumable (``start_batch``) and sharded across ranks.
- :func:`convert`: IDX, CIFAR-10 batches, .npy/.npz, image folders, ``builtin:NAME``.
- Built-in datasets (``builtin:digits``, ``builtin:mnist``) come from plugins through the
  ``register_datasets`` hook and are cached as HDF5 (see :mod:`genkit.data.builtin`).

The layout is described in :mod:`genkit.data.layout` and ``docs/data.md``.
"""

from __future__ import annotations

from genkit.data.builtin import available_datasets, builtin_path, cache_root, every_kth_split
from genkit.data.convert import convert, describe, read_idx, read_source
from genkit.data.errors import (
    CorruptFileError,
    DataFileNotFoundError,
    LayoutError,
    MissingSplitError,
    NotHDF5Error,
    OutputError,
    SourceFormatError,
)
from genkit.data.layout import LAYOUT_VERSION, DatasetArrays, SplitArrays, write_h5
from genkit.data.reader import H5Dataset, RowRange, check_splits, hold_out, open_dataset
from genkit.data.sampler import (
    ChunkBatchSampler,
    batch_tensor,
    collate_batch,
    epoch_order,
    make_eval_loader,
    make_loader,
)

__all__ = [
    "LAYOUT_VERSION",
    "ChunkBatchSampler",
    "CorruptFileError",
    "DataFileNotFoundError",
    "DatasetArrays",
    "H5Dataset",
    "LayoutError",
    "MissingSplitError",
    "NotHDF5Error",
    "OutputError",
    "RowRange",
    "SourceFormatError",
    "SplitArrays",
    "available_datasets",
    "batch_tensor",
    "builtin_path",
    "cache_root",
    "check_splits",
    "collate_batch",
    "convert",
    "describe",
    "epoch_order",
    "every_kth_split",
    "hold_out",
    "make_eval_loader",
    "make_loader",
    "open_dataset",
    "read_idx",
    "read_source",
    "write_h5",
]
