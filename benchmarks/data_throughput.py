"""Throughput of genkit's HDF5 reader against an in-memory tensor loader and a naive reader.

On a generated file of N (default 60,000) 28x28 uint8 images in a temporary folder, one
shuffled epoch through a DataLoader for each of:

- ``stream``: ``H5Dataset(in_memory=False)`` + ``make_loader`` (chunk-wise batched reads);
- ``in_memory``: ``H5Dataset(in_memory=True)`` + ``make_loader``;
- ``tensor``: ``TensorDataset`` of the same images as float32 model-scale tensors,
  ``DataLoader(batch_size, shuffle=True)``;
- ``tensor_batched``: the same ``TensorDataset`` indexed once per batch (a ``BatchSampler``
  as the sampler, ``batch_size=None``): the fastest in-memory loader, shown for reference;
- ``naive``: a Dataset that reads one h5py index per item (``DataLoader(shuffle=True)``),
  timed over the first ``--naive-batches`` batches.

Then the peak resident memory (VmHWM) of a fresh process streaming the same file, and one
four times larger, through a reader whose cache is ``--cache-mb``: both files are many times
larger than that cache, and the growth stays small and nearly the same (what grows with N is
the epoch's index order, 8 bytes per example).

Prints images/s and the ratios from this one run::

    python benchmarks/data_throughput.py [--n 60000] [--batch-size 256] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, TensorDataset

from genkit.data import DatasetArrays, H5Dataset, SplitArrays, make_loader, write_h5
from genkit.distributions import to_model_scale


class NaiveH5(Dataset):
    """One ``h5py`` read per item: the baseline a chunk-wise reader must beat."""

    def __init__(self, path: Path) -> None:
        self.path, self.values = path, None
        with h5py.File(path, "r") as f:
            self.n = len(f["train/images"])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.values is None:
            self.values = h5py.File(self.path, "r")["train/images"]
        return to_model_scale(torch.from_numpy(self.values[i]))


def images_per_second(loader, max_batches: int | None = None, passes: int = 2) -> float:
    """Examples per second over one epoch (after one warm-up batch); the best of ``passes``
    epochs, so that a burst of load from other processes on the machine counts less."""
    best = 0.0
    for _ in range(passes):
        it = iter(loader)
        next(it)
        count, start = 0, time.perf_counter()
        for i, batch in enumerate(it):
            count += len(batch[0] if isinstance(batch, list | tuple) else batch)
            if max_batches is not None and i + 1 >= max_batches:
                break
        best = max(best, count / (time.perf_counter() - start))
    return best


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: this process's peak RSS (unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(path: str, cache_mb: float, batch_size: int) -> None:
    """Run in a fresh process: stream every batch of an epoch; print RSS figures as JSON."""
    ds = H5Dataset(path, in_memory=False, cache_bytes=int(cache_mb * 2**20))
    loader = make_loader(ds, batch_size, seed=1)
    next(iter(loader))
    base = rss_bytes()
    seen = sum(len(b) for b in loader)
    peak = peak_rss_bytes()
    print(
        json.dumps(
            {
                "base": base,
                "peak": peak,
                "seen": seen,
                "cache": ds.cache_bytes,
                "chunk_bytes": ds.chunk_bytes,
                "cache_chunks": ds.cache_chunks,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--naive-batches", type=int, default=60)
    parser.add_argument("--cache-mb", type=float, default=4.0)
    parser.add_argument(
        "--measure-memory", nargs=3, metavar=("FILE", "CACHE_MB", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.measure_memory:
        path, cache_mb, batch = args.measure_memory
        measure_memory(path, float(cache_mb), int(batch))
        return

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.n, 1, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=args.n)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_h5(
            DatasetArrays(
                splits={"train": SplitArrays(images=images, labels=labels)},
                attrs={"source": "benchmark"},
            ),
            Path(tmp) / "bench.h5",
        )
        size = path.stat().st_size
        b, w = args.batch_size, args.workers
        stream = H5Dataset(path, in_memory=False)
        memory = H5Dataset(path, in_memory=True)
        tensor = TensorDataset(to_model_scale(torch.from_numpy(images)))
        rates = {
            "stream": images_per_second(make_loader(stream, b, seed=0, num_workers=w)),
            "in_memory": images_per_second(make_loader(memory, b, seed=0, num_workers=w)),
            "tensor": images_per_second(DataLoader(tensor, b, shuffle=True, num_workers=w)),
            "tensor_batched": images_per_second(
                DataLoader(
                    tensor,
                    batch_size=None,
                    sampler=BatchSampler(RandomSampler(tensor), b, drop_last=False),
                    num_workers=w,
                )
            ),
            "naive": images_per_second(
                DataLoader(NaiveH5(path), b, shuffle=True, num_workers=w), args.naive_batches
            ),
        }
        print(
            f"file: {args.n} images (1, 28, 28) uint8, {size / 2**20:.1f} MiB, chunk "
            f"{stream.chunk_len} rows; batch {b}, workers {w}, torch threads 1"
        )
        for name, rate in rates.items():
            print(f"  {name:>14}: {rate:12,.0f} images/s")
        print(
            f"stream / tensor (in-memory TensorDataset): {rates['stream'] / rates['tensor']:.2f}x"
            "  (target >= 0.8x)"
        )
        print(
            f"stream / naive (one h5py read per item):   {rates['stream'] / rates['naive']:.1f}x"
            "  (target >= 10x)"
        )
        print(
            f"stream / tensor_batched (one index op per batch, reference): "
            f"{rates['stream'] / rates['tensor_batched']:.2f}x"
        )
        print(
            f"in_memory / tensor: {rates['in_memory'] / rates['tensor']:.2f}x, "
            f"in_memory / naive: {rates['in_memory'] / rates['naive']:.1f}x"
        )

        # memory: the same file, and one four times larger, each in a fresh process
        big = write_h5(
            DatasetArrays(splits={"train": SplitArrays(images=np.tile(images, (4, 1, 1, 1)))}),
            Path(tmp) / "bench4x.h5",
        )
        del images, tensor, memory
        for p in (path, big):
            out = subprocess.run(
                [sys.executable, __file__, "--measure-memory", str(p), str(args.cache_mb), str(b)],
                check=True,
                capture_output=True,
                text=True,
            )
            m = json.loads(out.stdout.strip().splitlines()[-1])
            mib, size = 2**20, p.stat().st_size
            print(
                f"memory: streamed {m['seen']} images of a {size / mib:.1f} MiB file through a "
                f"{m['cache'] / mib:.1f} MiB cache ({m['cache_chunks']} chunks of "
                f"{m['chunk_bytes'] / mib:.2f} MiB): RSS after the first batch "
                f"{m['base'] / mib:.1f} MiB, peak {m['peak'] / mib:.1f} MiB, growth "
                f"{(m['peak'] - m['base']) / mib:.1f} MiB"
            )


if __name__ == "__main__":
    main()
