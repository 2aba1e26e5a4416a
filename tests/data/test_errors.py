"""Every bad input is one clear error of a specific class, and never leaves a partial file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from genkit.data import (
    CorruptFileError,
    DataFileNotFoundError,
    H5Dataset,
    LayoutError,
    MissingSplitError,
    NotHDF5Error,
    OutputError,
    SourceFormatError,
    convert,
    describe,
    open_dataset,
    read_idx,
)
from genkit.errors import DataError


def raw_h5(path: Path, **datasets) -> Path:
    """An HDF5 file with the given ``"group/name": array`` datasets, written by h5py alone."""
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return path


def only_file(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_missing_file(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"data file '.*nope.h5' does not exist"):
        open_dataset(tmp_path / "nope.h5")
    with pytest.raises(DataFileNotFoundError, match=r"source '.*nope' does not exist"):
        convert(tmp_path / "nope", tmp_path / "o.h5")


def test_not_an_hdf5_file(tmp_path):
    (tmp_path / "a.h5").write_text("hello")
    with pytest.raises(NotHDF5Error, match=r"'.*a.h5' is not an HDF5 file"):
        open_dataset(tmp_path / "a.h5")


def test_truncated_file(tmp_path, helpers):
    path = helpers.write_h5_images(tmp_path / "x.h5", n=400)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="is truncated or corrupt"):
        open_dataset(path)


def test_corrupt_compressed_chunk(tmp_path, helpers):
    path = helpers.write_h5_images(
        tmp_path / "x.h5", n=400, shape=(1, 16, 16), compression="gzip", chunk_len=50
    )
    with h5py.File(path, "r") as f:
        offset = f["train/images"].id.get_chunk_info(3).byte_offset
    blob = bytearray(path.read_bytes())
    blob[offset : offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(blob))
    ds = H5Dataset(path, in_memory=False)
    ds.__getitems__(list(range(50)))  # chunk 0 is intact
    with pytest.raises(CorruptFileError, match="is truncated or corrupt"):
        ds.__getitems__([160])
    with pytest.raises(CorruptFileError, match="is truncated or corrupt"):
        H5Dataset(path, in_memory=True)


def test_missing_split_names_the_existing_ones(tmp_path, helpers):
    path = helpers.write_h5_images(tmp_path / "x.h5")
    with pytest.raises(MissingSplitError, match=r"split 'valid' not in .*; splits: train, test"):
        open_dataset(path, "valid")


def test_missing_dataset_names_what_is_there(tmp_path):
    path = raw_h5(tmp_path / "x.h5", **{"train/pixels": np.zeros((3, 1, 2, 2), np.uint8)})
    with pytest.raises(
        MissingSplitError, match="has no 'images' or 'data' dataset; it holds: pixels"
    ):
        open_dataset(path)


def test_a_file_without_split_groups_is_refused_by_info(tmp_path):
    path = raw_h5(tmp_path / "x.h5", images=np.zeros((3, 1, 2, 2), np.uint8))
    with pytest.raises(MissingSplitError, match=r"holds no split groups .*; top level: images"):
        describe(path)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "train/images",
            np.zeros((3, 2, 2), np.uint8),
            r"must be uint8 of rank 4 .* got uint8 \(3, 2, 2\)",
        ),
        (
            "train/images",
            np.zeros((3, 1, 2, 2), np.float32),
            "must be uint8 of rank 4 .* got float32",
        ),
        ("train/data", np.zeros((3, 2), np.int32), r"must be float of rank 2 .* got int32"),
        ("train/images", np.zeros((0, 1, 2, 2), np.uint8), "split 'train' of .* is empty"),
    ],
)
def test_wrong_rank_dtype_or_empty(tmp_path, name, value, message):
    with pytest.raises(LayoutError, match=message):
        open_dataset(raw_h5(tmp_path / "x.h5", **{name: value}))


def test_non_finite_vectors(tmp_path):
    v = np.ones((6, 2), np.float32)
    v[4, 1] = np.inf
    with pytest.raises(LayoutError, match=r"NaN or infinite values \(first in row 4\)"):
        open_dataset(raw_h5(tmp_path / "x.h5", **{"train/data": v}))
    v[4, 1] = np.nan
    np.save(tmp_path / "v.npy", v)
    with pytest.raises(LayoutError, match=r"1 NaN or infinite value\(s\) \(first in row 4\)"):
        convert(tmp_path / "v.npy", tmp_path / "v.h5", test_fraction=0, keep_order=True)
    assert only_file(tmp_path) == ["v.npy", "x.h5"]  # nothing half-written


def test_label_count_mismatch(tmp_path, idx_folder, helpers):
    path = raw_h5(
        tmp_path / "x.h5",
        **{"train/images": np.zeros((4, 1, 2, 2), np.uint8), "train/labels": np.zeros(3, np.int64)},
    )
    with pytest.raises(LayoutError, match="3 labels for 4 examples"):
        open_dataset(path)
    np.savez(tmp_path / "a.npz", x_train=np.zeros((4, 2, 2), np.uint8), y_train=np.zeros(5))
    with pytest.raises(LayoutError, match="labels must be integers"):
        convert(tmp_path / "a.npz", tmp_path / "a.h5")
    np.savez(tmp_path / "b.npz", x_train=np.zeros((4, 2, 2), np.uint8), y_train=np.zeros(5, int))
    with pytest.raises(LayoutError, match="5 labels for 4 examples"):
        convert(tmp_path / "b.npz", tmp_path / "b.h5")
    folder, _ = idx_folder
    helpers.write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(LayoutError, match="holds 5 labels for the 12 images"):
        convert(folder, tmp_path / "m.h5")


def test_output_exists_is_refused_unless_forced(tmp_path, idx_folder):
    out = tmp_path / "m.h5"
    out.write_text("keep me")
    with pytest.raises(OutputError, match=r"already exists .*--force"):
        convert(idx_folder[0], out)
    assert out.read_text() == "keep me"
    convert(idx_folder[0], out, force=True)
    assert h5py.is_hdf5(out)


def test_output_folder_missing_or_not_writable(tmp_path, idx_folder, monkeypatch):
    with pytest.raises(OutputError, match=r"output folder '.*nowhere' does not exist"):
        convert(idx_folder[0], tmp_path / "nowhere" / "m.h5")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not a folder"):
        convert(idx_folder[0], tmp_path / "file" / "m.h5")
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if Path(p) == tmp_path else real_access(p, m)
    )
    with pytest.raises(OutputError, match=r"output folder '.*' is not writable"):
        convert(idx_folder[0], tmp_path / "m.h5")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path, idx_folder):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            convert(idx_folder[0], ro / "m.h5")
    finally:
        ro.chmod(0o700)


def test_idx_bad_magic_and_size(tmp_path, helpers):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
    with pytest.raises(SourceFormatError, match="not an IDX file: bad magic number 0x12340803"):
        read_idx(bad)
    path = helpers.write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 3, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(
        SourceFormatError, match=r"header says 4x3x3 of uint8 \(36 bytes\) but the file holds 31"
    ):
        convert(tmp_path, tmp_path / "m.h5")
    assert "m.h5" not in only_file(tmp_path)


def test_bad_gzip_and_bad_sources(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(SourceFormatError, match="cannot be read as gzip"):
        read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(SourceFormatError, match="cannot tell the format"):
        convert(tmp_path / "x.csv", tmp_path / "o.h5")
    np.save(tmp_path / "f.npy", np.zeros((3, 4, 4, 4), np.uint8))
    with pytest.raises(SourceFormatError, match=r"cannot tell NHWC from NCHW .* pass --layout"):
        convert(tmp_path / "f.npy", tmp_path / "o.h5")
    np.save(tmp_path / "r.npy", np.zeros(5, np.float32))
    with pytest.raises(LayoutError, match=r"got shape \(5,\)"):
        convert(tmp_path / "r.npy", tmp_path / "o.h5")
    np.savez(tmp_path / "k.npz", foo=np.zeros(3))
    with pytest.raises(SourceFormatError, match="holds foo; expected x_train"):
        convert(tmp_path / "k.npz", tmp_path / "o.h5")
    (tmp_path / "c.tar.gz").write_bytes(b"garbage")
    with pytest.raises(SourceFormatError, match="not a readable tar archive"):
        convert(tmp_path / "c.tar.gz", tmp_path / "o.h5")


def test_truncated_image_in_a_folder_is_one_clear_error(tmp_path):
    from PIL import Image

    source = tmp_path / "images"
    for label in ("a", "b"):
        (source / label).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(i).integers(0, 256, (64, 64), dtype=np.uint8)
            Image.fromarray(pixels).save(source / label / f"{i}.png")
    whole = (source / "a" / "1.png").read_bytes()
    (source / "a" / "1.png").write_bytes(whole[: len(whole) // 2])  # the header still opens
    with pytest.raises(CorruptFileError, match=r"1\.png' is truncated or corrupt"):
        convert(source, tmp_path / "o.h5")
    assert only_file(tmp_path) == ["images"]


def test_malicious_pickle_is_refused(tmp_path):
    import pickle

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": os.system}))
    with pytest.raises(SourceFormatError, match="refusing to load"):
        convert(tmp_path, tmp_path / "o.h5")


def test_inputs_are_not_modified(tmp_path, idx_folder):
    folder, _ = idx_folder
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    for p in folder.iterdir():
        p.chmod(0o444)
    convert(folder, tmp_path / "m.h5")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()} == before


def test_every_error_is_a_data_error():
    for cls in (
        CorruptFileError,
        DataFileNotFoundError,
        LayoutError,
        MissingSplitError,
        NotHDF5Error,
        OutputError,
        SourceFormatError,
    ):
        assert issubclass(cls, DataError)


def corruptions(blob: bytes, count: int, seed: int):
    """``count`` damaged copies of ``blob``: cut at a random length, or a random run of 1, 8
    or 64 bytes overwritten with random values (both seeded)."""
    rng = np.random.default_rng(seed)
    for trial in range(count):
        if trial % 2 == 0:
            yield blob[: int(rng.integers(len(blob)))]
        else:
            damaged = bytearray(blob)
            start, size = int(rng.integers(len(blob))), int(rng.choice([1, 8, 64]))
            run = damaged[start : start + size]
            damaged[start : start + len(run)] = rng.integers(0, 256, len(run), np.uint8).tobytes()
            yield bytes(damaged)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_any_damage_is_a_data_error(tmp_path, helpers, compression):
    """Wherever a file is damaged (superblock, B-trees, object headers, heaps, chunks), opening,
    reading and describing it either work or raise a DataError; never h5py's RuntimeError,
    KeyError, ValueError or an AttributeError."""
    path = helpers.write_h5_images(
        tmp_path / "x.h5", n=120, shape=(1, 4, 4), chunk_len=20, compression=compression
    )
    blob, damaged = path.read_bytes(), tmp_path / "damaged.h5"
    for data in corruptions(blob, 150, seed=1):
        damaged.write_bytes(data)
        for read in (
            lambda: open_dataset(damaged, in_memory=True),
            lambda: open_dataset(damaged, "test", in_memory=False).__getitems__(range(5)),
            lambda: describe(damaged),
        ):
            with contextlib.suppress(DataError):
                read()


def test_a_group_or_type_where_a_dataset_belongs(tmp_path):
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_group("train/images")
    with pytest.raises(LayoutError, match="train/images must be a dataset, got an HDF5 Group"):
        open_dataset(tmp_path / "g.h5")
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["train/data"] = np.zeros((3, 2), np.float32)
        f["train/labels"] = np.dtype("int64")  # a named (committed) type, not a dataset
    with pytest.raises(LayoutError, match="train/labels must be a dataset, got an HDF5 Datatype"):
        describe(tmp_path / "t.h5")


def test_member_names_that_are_not_utf8_are_listed(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_group("train").create_dataset(b"pix\xffels", data=np.zeros(3))
    with pytest.raises(MissingSplitError, match="it holds: pix\ufffdels"):
        describe(tmp_path / "x.h5")


def test_a_write_that_fails_midway_leaves_nothing_and_keeps_the_old_output(
    tmp_path, idx_folder, monkeypatch
):
    out = tmp_path / "m.h5"
    out.write_text("the previous output")
    real = h5py.Group.create_dataset
    calls = []

    def disk_full(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:  # train/images and train/labels are written, test/images fails
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", disk_full)
    with pytest.raises(OutputError, match=r"cannot write '.*m\.h5': .*No space left on device"):
        convert(idx_folder[0], out, force=True)
    assert len(calls) == 3
    assert out.read_text() == "the previous output"  # not replaced by a partial file
    assert only_file(tmp_path) == ["m.h5", "mnist"]  # and no temporary left behind


def test_converter_refuses_float_images_and_empty_splits(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((4, 3, 5, 5), np.float32))
    with pytest.raises(LayoutError, match=r"images must be 8-bit values 0\.\.255 .* got float32"):
        convert(tmp_path / "f.npy", tmp_path / "o.h5")
    np.save(tmp_path / "w.npy", np.full((4, 5, 5), 300, np.int32))
    with pytest.raises(
        LayoutError, match=r"images must be 8-bit .* got int32 with values 300\.\.300"
    ):
        convert(tmp_path / "w.npy", tmp_path / "o.h5")
    np.savez(
        tmp_path / "e.npz",
        x_train=np.zeros((4, 5, 5), np.uint8),
        x_test=np.zeros((0, 5, 5), np.uint8),
    )
    with pytest.raises(LayoutError, match=r"split 'test' is empty \(0 examples\)"):
        convert(tmp_path / "e.npz", tmp_path / "o.h5")
    assert "o.h5" not in only_file(tmp_path)


def test_cifar_batch_with_text_labels(tmp_path):
    import pickle

    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["cat", "dog"]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(LayoutError, match="labels must be a list of integers, got <U3"):
        convert(tmp_path, tmp_path / "o.h5")


def test_unreadable_plain_idx_file_is_not_called_gzip(tmp_path, monkeypatch):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(SourceFormatError, match=r"ubyte' cannot be read: .*Permission denied"):
        read_idx(path)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_truncated_or_damaged_npz(tmp_path, save):
    save(tmp_path / "a.npz", x_train=np.zeros((40, 6, 6), np.uint8), y_train=np.arange(40))
    whole = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])  # no central directory
    with pytest.raises(SourceFormatError, match=r"cut\.npz' cannot be read by numpy.load"):
        convert(tmp_path / "cut.npz", tmp_path / "o.h5")
    damaged = bytearray(whole)
    start = whole.index(b"x_train.npy") + 200  # inside x_train's data: its CRC-32 fails
    damaged[start : start + 8] = b"\xff" * 8
    (tmp_path / "bad.npz").write_bytes(bytes(damaged))
    with pytest.raises(SourceFormatError, match=r"bad\.npz' cannot be read by numpy.load"):
        convert(tmp_path / "bad.npz", tmp_path / "o.h5")
    assert "o.h5" not in only_file(tmp_path)
