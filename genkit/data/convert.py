"""Converters from common formats into genkit's HDF5 layout (``genkit data convert``).

Sources (every input is opened read-only):

- MNIST-style IDX: a folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``; ``-``, ``.``
  or ``_`` separators), or one ``*images*idx3-ubyte[.gz]`` file (its ``labels`` sibling is
  used when present).
- CIFAR-10 python batches: the extracted folder (``data_batch_1..5``, ``test_batch``) or the
  ``.tar.gz`` itself.
- ``.npy`` (one array) and ``.npz`` (``x_train``/``y_train``/``x_test``/``y_test``,
  ``train_images``/``train_labels``/..., or ``images``|``data``|``x``|``arr_0`` with optional
  ``labels``|``y``). Rank 4 is NHWC or NCHW (``layout``, inferred from where a 1/3/4-channel
  axis is), rank 3 is (N, H, W) grey images, rank 2 is (N, D) vectors.
- A folder of images (Pillow): one sub-folder per class (sorted names give labels 0, 1, ...),
  or loose files (no labels); ``train/`` and ``test/`` sub-folders give the splits.
- ``builtin:NAME``: a registered built-in dataset.

When the source has no test split, ``test_fraction`` (default 0.1) of the rows, drawn with
``seed``, are held out as ``test``. Rows are stored in a random order drawn from ``seed`` (so
chunk-wise shuffling mixes classes) unless ``keep_order``.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import pickle
import re
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from genkit.data.errors import (
    CorruptFileError,
    DataFileNotFoundError,
    LayoutError,
    MissingSplitError,
    SourceFormatError,
)
from genkit.data.layout import (
    DatasetArrays,
    SplitArrays,
    check_output,
    validate_split,
    write_h5,
)
from genkit.data.reader import (
    corrupt_file_errors,
    describe_split,
    open_h5,
    plain_value,
    split_names,
)
from genkit.errors import InvalidParameterError

LAYOUTS = ("auto", "nhwc", "nchw")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_TEST_FRACTION = 0.1

# -- IDX ---------------------------------------------------------------------------------
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAME = re.compile(
    r"^(?P<split>train|t10k|test)[-_.](?P<what>images|labels)[-_.]idx(?P<rank>\d)[-_.]ubyte(\.gz)?$"
)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        how = " as gzip" if path.name.endswith(".gz") else ""
        raise SourceFormatError(f"'{path}' cannot be read{how}: {exc}") from None


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (plain or .gz) as an array of the shape and dtype its header gives.

    Header: two zero bytes, a type byte (0x08 uint8 ... 0x0E float64), the rank, then one
    big-endian uint32 per dimension.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(f"IDX file '{path}' does not exist")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise SourceFormatError(f"'{path}' is not an IDX file: only {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise SourceFormatError(
            f"'{path}' is not an IDX file: bad magic number 0x{magic:08x} "
            "(expected 0x0000TTRR, type TT in 08..0e, rank RR >= 1)"
        )
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise SourceFormatError(f"'{path}': IDX header of rank {rank} is cut short")
    dims = struct.unpack(f">{rank}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        shape = "x".join(map(str, dims))
        raise SourceFormatError(
            f"'{path}': the IDX header says {shape} of {dtype.name} ({expected} bytes) but the "
            f"file holds {len(raw) - header} bytes of data"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


def _idx_files(folder: Path) -> dict[tuple[str, str], Path]:
    found: dict[tuple[str, str], Path] = {}
    for p in sorted(folder.iterdir()):
        m = _IDX_NAME.match(p.name)
        if m and p.is_file():
            split = "train" if m["split"] == "train" else "test"
            key = (split, m["what"])
            if key not in found or found[key].name.endswith(".gz"):  # prefer the plain file
                found[key] = p
    return found


def _idx_images(path: Path) -> np.ndarray:
    x = read_idx(path)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise LayoutError(
            f"'{path}': IDX images must be uint8 of rank 3 (N, H, W), got {x.dtype} {x.shape}"
        )
    return x[:, None]  # (N, 1, H, W)


def from_idx(source: Path) -> tuple[dict[str, SplitArrays], dict[str, Any]]:
    """MNIST-style IDX files (a folder, or one images file)."""
    if source.is_dir():
        files = _idx_files(source)
        if ("train", "images") not in files:
            raise SourceFormatError(
                f"no train-images-idx3-ubyte[.gz] in '{source}'; IDX files found: "
                f"{', '.join(p.name for p in files.values()) or 'none'}"
            )
    else:
        files = {("train", "images"): source}
        sibling = source.with_name(source.name.replace("images", "labels").replace("idx3", "idx1"))
        if sibling != source and sibling.is_file():
            files["train", "labels"] = sibling
    splits = {}
    for split in ("train", "test"):
        if (split, "images") not in files:
            continue
        images = _idx_images(files[split, "images"])
        labels = None
        if (split, "labels") in files:
            labels = read_idx(files[split, "labels"])
            if labels.ndim != 1:
                raise LayoutError(f"'{files[split, 'labels']}': IDX labels must have rank 1")
            if len(labels) != len(images):
                raise LayoutError(
                    f"'{files[split, 'labels']}' holds {len(labels)} labels for the "
                    f"{len(images)} images of '{files[split, 'images']}'"
                )
        splits[split] = SplitArrays(images=images, labels=labels)
    return splits, {"source": f"idx:{source.resolve()}"}


# -- CIFAR-10 ----------------------------------------------------------------------------
_CIFAR_BATCH = re.compile(r"^(data_batch_\d+|test_batch)$")
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only: a CIFAR batch cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):
            # CIFAR-10's batches name numpy.core (numpy 1); numpy 2 moved it to numpy._core
            # and deprecated the old name; numpy < 1.26 has only the old one.
            try:
                return getattr(importlib.import_module(module.replace("core", "_core", 1)), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def _load_batch(blob: bytes, where: str) -> dict:
    try:
        batch = _ArraysOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:
        raise SourceFormatError(f"'{where}' is not a CIFAR python batch: {exc}") from None
    if not isinstance(batch, dict):
        raise SourceFormatError(f"'{where}' is not a CIFAR python batch (not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_split(batches: list[tuple[str, dict]]) -> SplitArrays:
    images, labels = [], []
    for where, batch in batches:
        if "data" not in batch or not ({"labels", "fine_labels"} & set(batch)):
            raise SourceFormatError(
                f"'{where}' lacks b'data' or b'labels'; keys: {', '.join(map(str, batch))}"
            )
        x = np.asarray(batch["data"])
        y = np.asarray(batch.get("labels", batch.get("fine_labels")))
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.dtype != np.uint8:
            raise LayoutError(f"'{where}': data must be uint8 (N, 3072), got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise LayoutError(
                f"'{where}': labels must be a list of integers, got {y.dtype} {y.shape}"
            )
        if len(y) != len(x):
            raise LayoutError(f"'{where}': {len(y)} labels for {len(x)} images")
        images.append(x.reshape(-1, 3, 32, 32))
        labels.append(y.astype(np.int64))
    return SplitArrays(images=np.concatenate(images), labels=np.concatenate(labels))


def _batch_order(name: str) -> tuple[int, int]:
    return (1, 0) if name == "test_batch" else (0, int(name.rsplit("_", 1)[1]))


def from_cifar(source: Path) -> tuple[dict[str, SplitArrays], dict[str, Any]]:
    """CIFAR-10 python batches: the extracted folder or the .tar.gz."""
    blobs: dict[str, tuple[str, bytes]] = {}
    meta: bytes | None = None
    if source.is_dir():
        folder = (
            source / "cifar-10-batches-py" if (source / "cifar-10-batches-py").is_dir() else source
        )
        try:
            for p in folder.iterdir():
                if _CIFAR_BATCH.match(p.name):
                    blobs[p.name] = (str(p), p.read_bytes())
                elif p.name == "batches.meta":
                    meta = p.read_bytes()
        except OSError as exc:
            raise SourceFormatError(f"cannot read the CIFAR batches in '{folder}': {exc}") from None
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar.getmembers():
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and (_CIFAR_BATCH.match(base) or base == "batches.meta"):
                        data = tar.extractfile(member).read()
                        if base == "batches.meta":
                            meta = data
                        else:
                            blobs[base] = (f"{source}:{member.name}", data)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise SourceFormatError(f"'{source}' is not a readable tar archive: {exc}") from None
    train = sorted((n for n in blobs if n != "test_batch"), key=_batch_order)
    if not train:
        raise SourceFormatError(f"no CIFAR batches (data_batch_1..5, test_batch) in '{source}'")
    splits = {
        "train": _cifar_split([(blobs[n][0], _load_batch(blobs[n][1], blobs[n][0])) for n in train])
    }
    if "test_batch" in blobs:
        where, blob = blobs["test_batch"]
        splits["test"] = _cifar_split([(where, _load_batch(blob, where))])
    attrs: dict[str, Any] = {"source": f"cifar10:{source.resolve()}"}
    if meta is not None:
        names = _load_batch(meta, "batches.meta").get("label_names")
        if names:
            attrs["classes"] = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return splits, attrs


# -- numpy ---------------------------------------------------------------------------------
def to_split(x: np.ndarray, labels: np.ndarray | None, layout: str, where: str) -> SplitArrays:
    """An array as a split: rank 4 images (NHWC/NCHW by ``layout``), rank 3 grey images,
    rank 2 vectors."""
    x = np.asarray(x)
    if x.ndim == 2:
        if x.dtype.kind not in "fiub":
            raise LayoutError(f"'{where}': vector data must be numeric, got {x.dtype}")
        return SplitArrays(data=x.astype(np.float32), labels=labels)
    if x.ndim not in (3, 4):
        raise LayoutError(
            f"'{where}': expected rank 4 images (NHWC or NCHW), rank 3 grey images (N, H, W) "
            f"or rank 2 vectors (N, D), got shape {x.shape}"
        )
    if x.dtype != np.uint8:
        if x.dtype.kind in "iu" and x.size and x.min() >= 0 and x.max() <= 255:
            x = x.astype(np.uint8)
        else:
            values = (
                f" with values {x.min()}..{x.max()}" if x.size and x.dtype.kind in "iuf" else ""
            )
            raise LayoutError(
                f"'{where}': images must be 8-bit values 0..255 (uint8, or integers in that "
                f"range), got {x.dtype}{values}; give float data as rank 2 vectors (N, D) instead"
            )
    if x.ndim == 3:
        return SplitArrays(images=x[:, None], labels=labels)
    if layout == "auto":
        first, last = x.shape[1] in (1, 3, 4), x.shape[3] in (1, 3, 4)
        if first == last:
            raise SourceFormatError(
                f"'{where}': cannot tell NHWC from NCHW for shape {x.shape}; pass --layout"
            )
        layout = "nchw" if first else "nhwc"
    if layout == "nhwc":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return SplitArrays(images=x, labels=labels)


_NPZ_SPLIT_KEYS = {
    "values": ("x_{s}", "{s}_images", "{s}_data", "{s}_x", "X_{s}"),
    "labels": ("y_{s}", "{s}_labels", "{s}_y", "Y_{s}"),
}
_NPZ_PLAIN = {"values": ("images", "data", "x", "X", "arr_0"), "labels": ("labels", "y", "Y")}


def _first_key(keys: list[str], names: tuple[str, ...], split: str = "") -> str | None:
    for name in names:
        key = name.format(s=split)
        if key in keys:
            return key
    return None


#: The first bytes of a .npy file (NumPy's format) and of a .npz archive (a zip file).
_NUMPY_MAGIC = {".npy": (b"\x93NUMPY", "NumPy"), ".npz": (b"PK", "zip")}


def from_numpy(source: Path, layout: str) -> tuple[dict[str, SplitArrays], dict[str, Any]]:
    """A .npy array or a .npz archive (see the module docstring for the key names)."""
    attrs = {"source": f"numpy:{source.resolve()}"}
    magic, kind = _NUMPY_MAGIC[source.suffix.lower()]
    try:
        with open(source, "rb") as f:
            head = f.read(len(magic))
    except OSError as exc:
        raise SourceFormatError(f"'{source}' cannot be read: {exc.strerror or exc}") from None
    if head != magic:
        raise SourceFormatError(
            f"'{source}' is not a NumPy {source.suffix} file (it does not start with the "
            f"{kind} signature); write it with {'numpy.save' if kind == 'NumPy' else 'numpy.savez'}"
        )
    try:
        loaded = np.load(source, allow_pickle=False)
    except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise SourceFormatError(f"'{source}' cannot be read by numpy.load: {exc}") from None
    if isinstance(loaded, np.ndarray):
        return {"train": to_split(loaded, None, layout, str(source))}, attrs
    with loaded as npz:
        keys = list(npz.keys())
        splits = {}
        try:
            for split in ("train", "test"):
                key = _first_key(keys, _NPZ_SPLIT_KEYS["values"], split)
                if key is not None:
                    lkey = _first_key(keys, _NPZ_SPLIT_KEYS["labels"], split)
                    labels = npz[lkey] if lkey else None
                    splits[split] = to_split(npz[key], labels, layout, f"{source}:{key}")
            if not splits:
                key = _first_key(keys, _NPZ_PLAIN["values"])
                if key is None:
                    raise SourceFormatError(
                        f"'{source}' holds {', '.join(keys) or 'no arrays'}; expected x_train/"
                        "y_train/x_test/y_test, train_images/train_labels/..., or images|data|x"
                        " with labels|y"
                    )
                lkey = _first_key(keys, _NPZ_PLAIN["labels"])
                splits["train"] = to_split(
                    npz[key], npz[lkey] if lkey else None, layout, f"{source}:{key}"
                )
        except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
            raise SourceFormatError(f"'{source}' cannot be read by numpy.load: {exc}") from None
    return splits, attrs


# -- image folders -------------------------------------------------------------------------
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _listing(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, label) pairs under ``root``; label -1 for loose files."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if _is_image(p))
    if dirs and loose:
        raise SourceFormatError(
            f"'{root}' mixes image files ({loose[0].name}, ...) and class folders "
            f"({dirs[0].name}, ...); use one or the other"
        )
    if loose:
        return [], [(p, -1) for p in loose]
    classes = [d.name for d in dirs]
    files = [(p, i) for i, d in enumerate(dirs) for p in sorted(d.iterdir()) if _is_image(p)]
    return classes, files


def from_image_folder(source: Path) -> tuple[dict[str, SplitArrays], dict[str, Any]]:
    """A folder of images, one sub-folder per class (or ``train/`` and ``test/`` of those)."""
    from PIL import Image, UnidentifiedImageError

    subdirs = {p.name for p in source.iterdir() if p.is_dir()}
    roots = {s: source / s for s in ("train", "test")} if "train" in subdirs else {"train": source}
    roots = {s: r for s, r in roots.items() if r.is_dir()}
    listings = {s: _listing(r) for s, r in roots.items()}
    classes = listings["train"][0]
    for split, (names, files) in listings.items():
        if not files:
            raise SourceFormatError(
                f"no image files ({', '.join(IMAGE_SUFFIXES)}) in '{roots[split]}'"
            )
        if split != "train" and names:
            missing = sorted(set(names) - set(classes))
            if missing:
                raise SourceFormatError(
                    f"'{roots[split]}' has classes not in train: {', '.join(missing)}"
                )
        if split != "train" and bool(names) != bool(classes):
            raise SourceFormatError(
                f"'{roots['train']}' and '{roots[split]}' must both hold class folders or both not"
            )
    grey_modes = {"1", "L", "LA", "I", "I;16", "F"}
    opened: dict[Path, str] = {}
    for _, files in listings.values():
        for p, _ in files:
            try:
                with Image.open(p) as im:
                    opened[p] = im.mode
            except (UnidentifiedImageError, OSError) as exc:
                raise SourceFormatError(f"'{p}' is not an image Pillow can read: {exc}") from None
    grey = all(m in grey_modes for m in opened.values())
    splits = {}
    size = None
    for split, (names, files) in listings.items():
        arrays, labels = [], []
        for p, label in files:
            try:
                with Image.open(p) as im:
                    im = im.convert("L" if grey else "RGB")  # decodes: a cut file fails here
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise CorruptFileError(f"'{p}' is truncated or corrupt: {exc}") from None
            if size is None:
                size, first = im.size, p
            elif im.size != size:
                raise LayoutError(
                    f"'{p}' is {im.size[0]}x{im.size[1]} but '{first}' is "
                    f"{size[0]}x{size[1]}; every image must have the same size"
                )
            a = np.asarray(im, dtype=np.uint8)
            arrays.append(a[None] if grey else a.transpose(2, 0, 1))  # (C, H, W)
            labels.append(classes.index(names[label]) if label >= 0 else -1)
        y = np.asarray(labels, dtype=np.int64) if classes else None
        splits[split] = SplitArrays(images=np.stack(arrays), labels=y)
    attrs: dict[str, Any] = {"source": f"image-folder:{source.resolve()}"}
    if classes:
        attrs["classes"] = classes
    return splits, attrs


# -- the dispatcher ------------------------------------------------------------------------
def _kind_of(source: Path) -> str:
    name = source.name.lower()
    if source.is_dir():
        entries = {p.name for p in source.iterdir()}
        if any(_IDX_NAME.match(n) for n in entries):
            return "idx"
        if "cifar-10-batches-py" in entries or any(_CIFAR_BATCH.match(n) for n in entries):
            return "cifar"
        return "images"
    if name.endswith((".npy", ".npz")):
        return "numpy"
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return "cifar"
    if "idx" in name and "ubyte" in name:
        return "idx"
    raise SourceFormatError(
        f"cannot tell the format of '{source}'; give an IDX folder or file, a CIFAR-10 folder or "
        ".tar.gz, a .npy/.npz file, a folder of images, or builtin:NAME"
    )


def read_source(source: str | Path, *, layout: str = "auto") -> DatasetArrays:
    """Read any supported source into arrays (no splitting or reordering)."""
    if layout not in LAYOUTS:
        raise InvalidParameterError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    text = str(source)
    if text.startswith("builtin:"):
        from genkit.data.builtin import builtin_arrays

        return builtin_arrays(text.removeprefix("builtin:"))
    path = Path(source).expanduser()
    if not path.exists():
        raise DataFileNotFoundError(f"source '{path}' does not exist")
    kind = _kind_of(path)
    if kind == "idx":
        splits, attrs = from_idx(path)
    elif kind == "cifar":
        splits, attrs = from_cifar(path)
    elif kind == "numpy":
        splits, attrs = from_numpy(path, layout)
    else:
        splits, attrs = from_image_folder(path)
    return DatasetArrays(splits=splits, attrs=attrs)


def _take(split: SplitArrays, rows: np.ndarray) -> SplitArrays:
    labels = split.labels[rows] if split.labels is not None else None
    if split.images is not None:
        return SplitArrays(images=split.images[rows], labels=labels)
    return SplitArrays(data=split.data[rows], labels=labels)


def split_and_order(
    arrays: DatasetArrays,
    *,
    test_fraction: float | None = None,
    seed: int = 0,
    keep_order: bool = False,
) -> DatasetArrays:
    """Hold out ``test_fraction`` of ``train`` as ``test`` when there is no test split, and
    store rows in a random order drawn from ``seed`` (unless ``keep_order``)."""
    source = str(arrays.attrs.get("source", ""))
    splits = {name: validate_split(name, s, source) for name, s in arrays.splits.items()}
    attrs = dict(arrays.attrs)
    if "train" not in splits:
        raise LayoutError(f"the source has no train split; it has: {', '.join(splits) or 'none'}")
    rng = np.random.default_rng(seed)
    if "test" in splits:
        if test_fraction:
            raise InvalidParameterError(
                f"the source already has a test split; drop --test-fraction ({test_fraction})"
            )
    else:
        fraction = DEFAULT_TEST_FRACTION if test_fraction is None else float(test_fraction)
        if not 0.0 <= fraction < 1.0:
            raise InvalidParameterError(f"test fraction must be in [0, 1), got {fraction}")
        n = len(splits["train"].values)
        n_test = round(fraction * n)
        if test_fraction is None and n_test == 0:
            pass  # too few examples for the default held-out split: train only
        elif fraction > 0 and not 1 <= n_test < n:
            raise InvalidParameterError(
                f"test fraction {fraction} of {n} examples leaves an empty split"
            )
        if n_test:
            perm = rng.permutation(n)
            test_rows, train_rows = perm[:n_test], perm[n_test:]
            if keep_order:
                test_rows, train_rows = np.sort(test_rows), np.sort(train_rows)
            train = splits["train"]
            splits["train"], splits["test"] = _take(train, train_rows), _take(train, test_rows)
            attrs["split_rule"] = f"held out test fraction {fraction} with seed {seed}"
            keep_order = True  # already in the drawn order
    if not keep_order:
        for name in sorted(splits):
            splits[name] = _take(splits[name], rng.permutation(len(splits[name].values)))
    attrs["seed"] = int(seed)
    return DatasetArrays(splits=splits, attrs=attrs)


def convert(
    source: str | Path,
    out: str | Path,
    *,
    test_fraction: float | None = None,
    seed: int = 0,
    layout: str = "auto",
    force: bool = False,
    keep_order: bool = False,
    compression: str | None = None,
) -> Path:
    """Convert ``source`` (see the module docstring) to ``out`` in genkit's layout; returns
    ``out``. Refuses an existing ``out`` unless ``force``; writes atomically."""
    check_output(Path(out), force)  # fail before the (possibly long) read
    arrays = read_source(source, layout=layout)
    arrays = split_and_order(arrays, test_fraction=test_fraction, seed=seed, keep_order=keep_order)
    return write_h5(arrays, out, force=force, compression=compression)


def describe(path: str | Path) -> str:
    """A human-readable summary: splits, shapes, dtypes, value ranges, labels, attributes,
    and a ``problems:`` section when the file breaks the layout (:func:`inspect_file`)."""
    text, problems = inspect_file(path)
    if problems:
        text += "\nproblems:\n" + "\n".join(f"  {p}" for p in problems)
    return text


def inspect_file(path: str | Path) -> tuple[str, list[str]]:
    """:func:`describe`'s summary, and the problems that make the file unusable for training:
    splits whose items differ in shape or dtype, NaN or infinite values."""
    with corrupt_file_errors(path):
        return _describe(path)


def _describe(path: str | Path) -> tuple[str, list[str]]:
    lines, problems, items = [f"{path}"], [], {}
    with open_h5(path) as f:
        lines.append("attributes:")
        for key in sorted(f.attrs):
            lines.append(f"  {key}: {json.dumps(plain_value(f.attrs[key]), default=str)}")
        splits = split_names(f)
        if not splits:
            raise MissingSplitError(
                f"'{path}' holds no split groups (expected 'train', 'test'); top level: "
                f"{', '.join(map(str, f)) or 'nothing'}"
            )
        for split in splits:
            values, labels = describe_split(f, split, path)
            lo, hi, bad = _range(values)
            if bad:
                problems.append(f"split '{split}': {bad} NaN or infinite value(s)")
            items[split] = (tuple(values.shape[1:]), values.dtype)
            chunks = values.chunks[0] if values.chunks else "contiguous"
            lines.append(f"{split}:")
            lines.append(
                f"  {values.name.rsplit('/', 1)[-1]}: shape {tuple(values.shape)} {values.dtype}, "
                f"range [{_fmt(lo)}, {_fmt(hi)}], chunk rows {chunks}"
                + (f", {values.compression}" if values.compression else "")
            )
            if labels is None:
                lines.append("  labels: none")
            else:
                y = labels[()]
                classes, counts = np.unique(y, return_counts=True)
                shown = ", ".join(
                    f"{c}:{n}" for c, n in list(zip(classes, counts, strict=True))[:20]
                )
                more = f", ... ({len(classes)} classes)" if len(classes) > 20 else ""
                lines.append(
                    f"  labels: shape {tuple(labels.shape)} {labels.dtype}, counts {shown}{more}"
                )
    first, *others = items
    for split in others:
        if items[split] != items[first]:
            (shape, dtype), (shape0, dtype0) = items[split], items[first]
            problems.append(
                f"split '{split}' holds items of shape {shape} {dtype}, split '{first}' of "
                f"{shape0} {dtype0}: every split must hold one shape and dtype"
            )
    return "\n".join(lines), problems


def _range(values: Any) -> tuple[float, float, int]:
    """The smallest and largest finite value of ``values``, and how many are not finite."""
    lo, hi, bad = np.inf, -np.inf, 0
    step = max(1, (64 * 2**20) // max(1, int(np.prod(values.shape[1:])) * values.dtype.itemsize))
    for start in range(0, values.shape[0], step):
        block = values[start : start + step]
        if block.dtype.kind == "f":
            finite = np.isfinite(block)
            bad += int(block.size - finite.sum())
            block = block[finite]
        if block.size:
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return lo, hi, bad


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"
