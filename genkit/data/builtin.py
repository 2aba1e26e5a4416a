"""Built-in datasets: registered by plugins, converted once into a cache folder.

A plugin registers a dataset through the ``register_datasets`` hook::

    @genkit.hookimpl
    def register_datasets(register):
        register("digits", load_digits, description="scikit-learn's 8x8 digits")

The factory takes no arguments and returns a :class:`~genkit.data.layout.DatasetArrays`
(``splits`` by name, each a :class:`~genkit.data.layout.SplitArrays`, and file ``attrs``) or
a plain mapping ``{"train": {"images": ..., "labels": ...}, "test": {...}}``. The split is
the factory's to fix and document; :func:`every_kth_split` is the rule genkit's own datasets
use. ``builtin:NAME`` is converted on first use to ``<cache>/NAME.h5``, where ``<cache>`` is
the ``cache_dir`` argument (CLI ``--cache-dir``), else ``$GENKIT_CACHE/datasets``, else
``~/.cache/genkit/datasets``. The file is written under a temporary name and renamed, so two
processes that race both end with a whole file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from genkit.data.errors import OutputError
from genkit.data.layout import LAYOUT_VERSION, DatasetArrays, SplitArrays, write_h5
from genkit.errors import DataError

#: Every ``k``-th example (index ``i % k == k - 1``) of the source order goes to ``test``.
TEST_EVERY = 5
#: Seed of the fixed permutation in which each split's rows are stored.
ORDER_SEED = 0


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The dataset cache folder: ``cache_dir``, ``$GENKIT_CACHE/datasets`` or
    ``~/.cache/genkit/datasets``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GENKIT_CACHE")
    if env:
        return Path(env).expanduser() / "datasets"
    return Path.home() / ".cache" / "genkit" / "datasets"


def available_datasets() -> list[str]:
    """Names of every registered built-in dataset (usable as ``builtin:NAME``)."""
    from genkit.registry import get_catalog

    return get_catalog().names("datasets")


def every_kth_split(
    values: np.ndarray, labels: np.ndarray | None, *, kind: str = "images", k: int = TEST_EVERY
) -> dict[str, SplitArrays]:
    """The fixed split of genkit's built-in datasets: example ``i`` (in the source order)
    goes to ``test`` when ``i % k == k - 1`` (so 1/k of each class of a class-sorted source),
    otherwise to ``train``; each split's rows are then stored in the order of
    ``numpy.random.default_rng(0).permutation``."""
    n = len(values)
    is_test = np.arange(n) % k == k - 1
    rng = np.random.default_rng(ORDER_SEED)
    out = {}
    for name, rows in (("train", np.flatnonzero(~is_test)), ("test", np.flatnonzero(is_test))):
        rows = rows[rng.permutation(len(rows))]
        y = labels[rows] if labels is not None else None
        out[name] = (
            SplitArrays(images=values[rows], labels=y)
            if kind == "images"
            else SplitArrays(data=values[rows], labels=y)
        )
    return out


def _as_arrays(name: str, result: Any) -> DatasetArrays:
    if isinstance(result, DatasetArrays):
        arrays = result
    elif isinstance(result, Mapping):
        splits = {}
        for split, parts in result.items():
            if not isinstance(parts, Mapping):
                raise DataError(f"builtin:{name}: split '{split}' must map names to arrays")
            splits[split] = SplitArrays(**dict(parts))
        arrays = DatasetArrays(splits=splits)
    else:
        raise DataError(
            f"builtin:{name}: the factory returned {type(result).__name__}, "
            "expected DatasetArrays or {split: {'images' or 'data': ..., 'labels': ...}}"
        )
    attrs = {"source": f"builtin:{name}", **dict(arrays.attrs)}
    return DatasetArrays(splits=arrays.splits, attrs=attrs)


def builtin_arrays(name: str) -> DatasetArrays:
    """Call the factory registered as ``name`` (an unknown name lists the known ones)."""
    from genkit.registry import get_catalog

    return _as_arrays(name, get_catalog().build("datasets", name))


def _cached_ok(path: Path) -> bool:
    """Whether the cached file opens, has this layout version and whole split groups."""
    from genkit.data.reader import corrupt_file_errors, describe_split, open_h5, split_names

    try:
        with corrupt_file_errors(path), open_h5(path) as f:
            if int(f.attrs.get("layout_version", -1)) != LAYOUT_VERSION:
                return False
            splits = split_names(f)
            for split in splits:
                describe_split(f, split, path)
            return bool(splits)
    except DataError:
        return False


def builtin_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The HDF5 file of ``builtin:NAME``, converting it into the cache on first use (or when
    the cached file is unreadable or of another layout version)."""
    from genkit.registry import get_catalog

    get_catalog().get("datasets", name)  # an unknown name fails before touching the cache
    root = cache_root(cache_dir)
    path = root / f"{name}.h5"
    if path.is_file() and _cached_ok(path):
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the dataset cache folder '{root}': {exc}") from None
    write_h5(builtin_arrays(name), path, force=True)
    return path
