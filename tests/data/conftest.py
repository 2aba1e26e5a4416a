"""Writers of small conversion sources (IDX, CIFAR batches, npz, PNG folders) for the tests."""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from genkit.data import DatasetArrays, SplitArrays, write_h5

_IDX_CODE = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """An IDX file as the MNIST distribution writes it (big-endian header and values)."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, _IDX_CODE[np.dtype(dtype)], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(dtype).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)
    return path


def make_images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


class Helpers:
    """The writers above, for test modules (conftest is not importable under importlib mode)."""

    write_idx = staticmethod(write_idx)
    make_images = staticmethod(make_images)
    write_h5_images = staticmethod(lambda *a, **k: write_h5_images(*a, **k))


@pytest.fixture
def helpers() -> type[Helpers]:
    return Helpers


@pytest.fixture
def idx_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "mnist"
    folder.mkdir()
    arrays = {
        "train_x": make_images(30, (7, 5), 1),
        "train_y": np.arange(30, dtype=np.uint8) % 10,
        "test_x": make_images(12, (7, 5), 2),
        "test_y": (np.arange(12, dtype=np.uint8) * 3) % 10,
    }
    write_idx(folder / "train-images-idx3-ubyte", arrays["train_x"], gz=True)
    write_idx(folder / "train-labels-idx1-ubyte", arrays["train_y"], gz=True)
    write_idx(folder / "t10k-images-idx3-ubyte", arrays["test_x"])
    write_idx(folder / "t10k-labels-idx1-ubyte", arrays["test_y"])
    return folder, arrays


def cifar_batch(n: int, seed: int) -> dict:
    x = make_images(n, (3 * 32 * 32,), seed)
    return {b"batch_label": b"b", b"data": x, b"labels": [(seed + i) % 10 for i in range(n)]}


@pytest.fixture
def cifar_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 3):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(cifar_batch(4, i), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(cifar_batch(3, 9), protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


@pytest.fixture
def cifar_tar(cifar_folder: Path) -> Path:
    out = cifar_folder.parent / "cifar-10-python.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(cifar_folder, arcname="cifar-10-batches-py")
    return out


def write_h5_images(path: Path, n: int = 50, shape=(1, 6, 5), labels: bool = True, **kw) -> Path:
    """A genkit file with ``n`` random train images (labels ``i % 7``) and 5 test images."""
    x = make_images(n, shape, 3)
    y = np.arange(n) % 7 if labels else None
    arrays = DatasetArrays(
        splits={"train": SplitArrays(images=x, labels=y), "test": SplitArrays(images=x[:5])},
        attrs={"source": "test"},
    )
    return write_h5(arrays, path, **kw)
