"""genkit's HDF5 layout, and the one function that writes it (atomically).

A file holds one group per split (``train``, ``test``). In an image file each group has
``images`` (N, C, H, W) uint8, chunked along N, and optionally ``labels`` (N,) int64; in a
vector file ``data`` (N, D) float32 takes the place of ``images``. File attributes:
``layout_version``, ``source``, ``kind`` ("images" or "vectors") and ``value_range``
([0, 255] for images, [min, max] over every split for vectors), plus whatever the source adds
(``classes``, ``description``, ``split_rule``, ...). See ``docs/data.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import h5py
import numpy as np

from genkit.data.errors import LayoutError, OutputError
from genkit.files import replaced_atomically

#: Bumped when the on-disk layout changes incompatibly.
LAYOUT_VERSION = 1
#: Splits in the order they are written and listed.
SPLITS = ("train", "test")
IMAGES, DATA, LABELS = "images", "data", "labels"
#: Target bytes per HDF5 chunk: large enough for fast sequential reads, small enough to
#: shuffle at chunk granularity.
CHUNK_BYTES = 1 << 20


@attrs.frozen
class SplitArrays:
    """One split's arrays: ``images`` (N, C, H, W) uint8 or ``data`` (N, D) float32, and
    optional ``labels`` (N,) integer."""

    images: np.ndarray | None = None
    data: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def values(self) -> np.ndarray:
        return self.images if self.images is not None else self.data

    @property
    def kind(self) -> str:
        return "images" if self.images is not None else "vectors"


@attrs.frozen
class DatasetArrays:
    """What a converter or a built-in dataset factory produces: ``splits`` by name and the
    file ``attrs`` to store (strings, numbers, or lists of them; anything else as JSON)."""

    splits: Mapping[str, SplitArrays]
    attrs: Mapping[str, Any] = attrs.field(factory=dict)


def validate_split(name: str, split: SplitArrays, where: str = "") -> SplitArrays:
    """Check one split against the layout and return it with canonical dtypes.

    Raises :class:`LayoutError` for wrong rank or dtype, an empty split, NaN or infinite
    vector values and a label count that does not match.
    """
    at = f"{where}: " if where else ""
    if (split.images is None) == (split.data is None):
        raise LayoutError(f"{at}split '{name}' needs exactly one of 'images' or 'data'")
    if split.images is not None:
        x = np.asarray(split.images)
        if x.ndim != 4:
            raise LayoutError(
                f"{at}split '{name}': images must have rank 4 (N, C, H, W), got shape {x.shape}"
            )
        if x.dtype != np.uint8:
            raise LayoutError(f"{at}split '{name}': images must be uint8 (0..255), got {x.dtype}")
    else:
        x = np.asarray(split.data)
        if x.ndim != 2:
            raise LayoutError(
                f"{at}split '{name}': data must have rank 2 (N, D), got shape {x.shape}"
            )
        if x.dtype.kind not in "fiu":
            raise LayoutError(f"{at}split '{name}': data must be numeric, got {x.dtype}")
        x = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise LayoutError(
                f"{at}split '{name}': data holds {int(bad.sum())} NaN or infinite value(s) "
                f"(first in row {row})"
            )
    if x.shape[0] == 0:
        raise LayoutError(f"{at}split '{name}' is empty (0 examples)")
    if 0 in x.shape[1:]:
        raise LayoutError(f"{at}split '{name}' has an empty dimension: shape {x.shape}")
    labels = None
    if split.labels is not None:
        labels = np.asarray(split.labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise LayoutError(
                f"{at}split '{name}': labels must be integers of shape (N,), got "
                f"{labels.dtype} {labels.shape}"
            )
        if len(labels) != len(x):
            raise LayoutError(f"{at}split '{name}': {len(labels)} labels for {len(x)} examples")
        labels = labels.astype(np.int64, copy=False)
    if split.images is not None:
        return SplitArrays(images=x, labels=labels)
    return SplitArrays(data=x, labels=labels)


def ordered_splits(names) -> list[str]:
    """Split names with ``train``, ``test`` first, then the rest alphabetically."""
    return sorted(names, key=lambda g: (SPLITS.index(g) if g in SPLITS else len(SPLITS), g))


def chunk_rows(item_shape: tuple[int, ...], itemsize: int, n: int) -> int:
    """Rows per chunk so that one chunk holds about :data:`CHUNK_BYTES`."""
    per_item = max(1, int(np.prod(item_shape)) * itemsize)
    return int(max(1, min(n, CHUNK_BYTES // per_item)))


def check_output(out: Path, force: bool = False) -> Path:
    """Refuse an existing output (unless ``force``) and a folder that is missing or not one."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"output '{out}' already exists (use --force to overwrite)")
    if out.is_dir():
        raise OutputError(f"output '{out}' is a folder; give a file name such as '{out}/data.h5'")
    parent = out.parent
    if not parent.exists():
        raise OutputError(f"output folder '{parent}' does not exist")
    if not parent.is_dir():
        raise OutputError(f"output folder '{parent}' is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder '{parent}' is not writable")
    return out


def _attr_value(value: Any) -> Any:
    """An HDF5 attribute value: numbers and strings as they are, lists or arrays of numbers as
    arrays, lists of strings as string arrays, anything else as its JSON text."""
    if isinstance(value, str | int | float | np.integer | np.floating):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return value
        value = value.tolist()
    if isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
        return np.asarray(value)
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return np.asarray(value, dtype=h5py.string_dtype())
    return json.dumps(value, default=str)


def write_h5(
    arrays: DatasetArrays,
    out: str | Path,
    *,
    force: bool = False,
    compression: str | None = None,
    chunk_len: int | None = None,
) -> Path:
    """Validate ``arrays`` and write them to ``out`` in genkit's layout.

    ``chunk_len`` rows per HDF5 chunk (default: about 1 MiB per chunk); ``compression``
    ``None``, ``"gzip"`` or ``"lzf"``.

    The file is written under a temporary name in the same folder and renamed with
    :func:`os.replace`, so ``out`` is either absent or complete, and two processes writing
    the same file race safely (the last rename wins; both files are whole).
    """
    out = check_output(Path(out), force)
    if not arrays.splits:
        raise LayoutError("no splits to write")
    splits = {name: validate_split(name, s) for name, s in arrays.splits.items()}
    kinds = {s.kind for s in splits.values()}
    if len(kinds) > 1:
        raise LayoutError("every split must hold the same kind (all images or all data)")
    shapes = {s.values.shape[1:] for s in splits.values()}
    if len(shapes) > 1:
        raise LayoutError(f"splits disagree on the item shape: {sorted(shapes)}")
    kind = kinds.pop()
    if kind == "images":
        value_range = [0, 255]
    else:
        value_range = [
            float(min(s.data.min() for s in splits.values())),
            float(max(s.data.max() for s in splits.values())),
        ]
    try:
        with replaced_atomically(out) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["layout_version"] = LAYOUT_VERSION
            f.attrs["kind"] = kind
            f.attrs["value_range"] = np.asarray(value_range)
            f.attrs["source"] = str(arrays.attrs.get("source", "unknown"))
            for key, value in arrays.attrs.items():
                if key not in ("layout_version", "kind", "value_range", "source"):
                    f.attrs[key] = _attr_value(value)
            for name in ordered_splits(splits):
                split = splits[name]
                group = f.create_group(name)
                x = split.values
                rows = chunk_len or chunk_rows(x.shape[1:], x.itemsize, len(x))
                rows = max(1, min(int(rows), len(x)))
                group.create_dataset(
                    IMAGES if kind == "images" else DATA,
                    data=x,
                    chunks=(rows, *x.shape[1:]),
                    compression=compression,
                )
                if split.labels is not None:
                    group.create_dataset(LABELS, data=split.labels)
    except PermissionError as exc:
        raise OutputError(
            f"output folder '{out.parent}' is not writable ({exc.strerror})"
        ) from None
    except OSError as exc:
        raise OutputError(f"cannot write '{out}': {exc}") from None
    return out
