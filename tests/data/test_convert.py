"""Round trips through every converter, the split and label handling."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from genkit.data import convert, open_dataset, read_idx, read_source
from genkit.errors import InvalidParameterError


def stored(path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    with h5py.File(path, "r") as f:
        g = f[split]
        x = g["images"][()] if "images" in g else g["data"][()]
        return x, (g["labels"][()] if "labels" in g else None)


def same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` and ``b`` hold the same rows, in any order."""
    key = lambda x: sorted(r.tobytes() for r in x.reshape(len(x), -1))  # noqa: E731
    return len(a) == len(b) and key(a) == key(b)


def test_idx_round_trip_keeps_pairs_and_splits(idx_folder, tmp_path):
    folder, arrays = idx_folder
    out = convert(folder, tmp_path / "m.h5", keep_order=True)
    x, y = stored(out, "train")
    assert x.shape == (30, 1, 7, 5) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], arrays["train_x"])
    np.testing.assert_array_equal(y, arrays["train_y"])
    x, y = stored(out, "test")
    np.testing.assert_array_equal(x[:, 0], arrays["test_x"])
    np.testing.assert_array_equal(y, arrays["test_y"])
    with h5py.File(out, "r") as f:
        assert f.attrs["layout_version"] == 1 and f.attrs["kind"] == "images"
        assert f.attrs["source"].startswith("idx:")
        assert list(f.attrs["value_range"]) == [0, 255]
        assert f["train/images"].chunks is not None


def test_shuffled_order_keeps_image_label_pairs(idx_folder, tmp_path):
    folder, arrays = idx_folder
    out = convert(folder, tmp_path / "m.h5", seed=3)
    x, y = stored(out, "train")
    assert not np.array_equal(x[:, 0], arrays["train_x"])  # reordered ...
    pairs = {
        (r.tobytes(), int(label))
        for r, label in zip(arrays["train_x"], arrays["train_y"], strict=True)
    }
    assert {
        (r[0].tobytes(), int(label)) for r, label in zip(x, y, strict=True)
    } == pairs  # ... pairs kept


def test_idx_single_file_with_sibling_labels(idx_folder, tmp_path):
    folder, arrays = idx_folder
    out = convert(folder / "t10k-images-idx3-ubyte", tmp_path / "t.h5", test_fraction=0.25, seed=1)
    xtr, ytr = stored(out, "train")
    xte, yte = stored(out, "test")
    assert len(xtr) == 9 and len(xte) == 3
    assert same_rows(np.concatenate([xtr, xte])[:, 0], arrays["test_x"])
    assert sorted(np.concatenate([ytr, yte])) == sorted(arrays["test_y"])


def test_read_idx_decodes_big_endian_types(tmp_path, helpers):
    ints = np.arange(-3, 9, dtype=">i4").reshape(3, 4)
    floats = np.linspace(-1, 1, 6).astype(">f4")
    np.testing.assert_array_equal(
        read_idx(helpers.write_idx(tmp_path / "a-idx2-ubyte", ints)), ints
    )
    np.testing.assert_array_equal(
        read_idx(helpers.write_idx(tmp_path / "b-idx1-ubyte", floats, gz=True)), floats
    )


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_round_trip(cifar_folder, cifar_tar, tmp_path, as_tar):
    source = cifar_tar if as_tar else cifar_folder.parent
    out = convert(source, tmp_path / "c.h5", keep_order=True)
    x, y = stored(out, "train")
    assert x.shape == (8, 3, 32, 32)
    b1 = pickle.loads((cifar_folder / "data_batch_1").read_bytes())
    np.testing.assert_array_equal(x[:4].reshape(4, -1), b1[b"data"])  # channel-major rows
    np.testing.assert_array_equal(y[:4], b1[b"labels"])
    xt, yt = stored(out, "test")
    assert xt.shape == (3, 3, 32, 32) and list(yt) == [9, 0, 1]
    with h5py.File(out, "r") as f:
        assert list(f.attrs["classes"])[:2] in (["class0", "class1"], [b"class0", b"class1"])


def test_npz_nhwc_inferred_and_labels(tmp_path, helpers):
    x_train = helpers.make_images(20, (6, 5, 3))  # NHWC
    np.savez(
        tmp_path / "d.npz",
        x_train=x_train,
        y_train=np.arange(20) % 4,
        x_test=helpers.make_images(4, (6, 5, 3), 5),
        y_test=np.arange(4),
    )
    out = convert(tmp_path / "d.npz", tmp_path / "d.h5", keep_order=True)
    x, y = stored(out, "train")
    np.testing.assert_array_equal(x, x_train.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, np.arange(20) % 4)
    assert stored(out, "test")[0].shape == (4, 3, 6, 5)


def test_npy_layout_flag_and_held_out_split(tmp_path, helpers):
    x = helpers.make_images(40, (3, 4, 3))  # ambiguous: axis 1 and axis 3 could be channels
    np.save(tmp_path / "a.npy", x)
    out = convert(tmp_path / "a.npy", tmp_path / "a.h5", layout="nchw", test_fraction=0.25)
    xtr, ytr = stored(out, "train")
    xte, _ = stored(out, "test")
    assert (len(xtr), len(xte)) == (30, 10) and ytr is None
    assert same_rows(np.concatenate([xtr, xte]), x)
    out2 = convert(tmp_path / "a.npy", tmp_path / "b.h5", layout="nhwc", test_fraction=0.25)
    assert stored(out2, "train")[0].shape == (30, 3, 3, 4)


def test_held_out_split_is_fixed_by_seed(tmp_path):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(50, 3)))
    a = stored(convert(tmp_path / "v.npy", tmp_path / "a.h5", seed=7), "test")[0]
    b = stored(convert(tmp_path / "v.npy", tmp_path / "b.h5", seed=7), "test")[0]
    c = stored(convert(tmp_path / "v.npy", tmp_path / "c.h5", seed=8), "test")[0]
    assert len(a) == 5 and np.array_equal(a, b) and not np.array_equal(a, c)
    none = convert(tmp_path / "v.npy", tmp_path / "d.h5", test_fraction=0.0)
    with h5py.File(none, "r") as f:
        assert list(f) == ["train"] and f["train/data"].dtype == np.float32


def test_vectors_round_trip_through_reader(tmp_path):
    v = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    np.savez(tmp_path / "v.npz", data=v, labels=np.arange(30))
    out = convert(tmp_path / "v.npz", tmp_path / "v.h5", test_fraction=0.0, keep_order=True)
    ds = open_dataset(out)
    assert ds.kind == "vectors" and ds.data_shape == (4,)
    np.testing.assert_array_equal(ds.__getitems__(list(range(30))).numpy(), v)
    np.testing.assert_array_equal(ds.labels, np.arange(30))
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f.attrs["value_range"], [v.min(), v.max()])


def test_image_folder_classes_become_labels(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
                Image.fromarray(a).save(tmp_path / "imgs" / split / cls / f"{i}.png")
                expected[(split, cls, i)] = a
    out = convert(tmp_path / "imgs", tmp_path / "f.h5", keep_order=True)
    x, y = stored(out, "train")
    assert x.shape == (6, 3, 6, 4) and list(y) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(x[3], expected[("train", "dog", 0)].transpose(2, 0, 1))
    xt, yt = stored(out, "test")
    assert list(yt) == [0, 0, 1, 1] and xt.shape == (4, 3, 6, 4)
    with h5py.File(out, "r") as f:
        assert [c.decode() if isinstance(c, bytes) else c for c in f.attrs["classes"]] == [
            "cat",
            "dog",
        ]


def test_grey_image_folder_without_classes(tmp_path):
    (tmp_path / "g").mkdir()
    for i in range(10):
        Image.fromarray(np.full((5, 5), i * 20, np.uint8)).save(tmp_path / "g" / f"{i}.png")
    out = convert(tmp_path / "g", tmp_path / "g.h5", test_fraction=0.2, seed=0)
    xtr, ytr = stored(out, "train")
    xte, _ = stored(out, "test")
    assert xtr.shape == (8, 1, 5, 5) and ytr is None
    assert sorted(np.concatenate([xtr, xte])[:, 0, 0, 0]) == [i * 20 for i in range(10)]


def test_builtin_source_converts_to_a_file(tmp_path):
    out = convert("builtin:digits", tmp_path / "d.h5")
    x, y = stored(out, "train")
    assert (
        x.shape == (1438, 1, 8, 8)
        and sorted(set(y.tolist())) == list(range(10))
        and len(stored(out, "test")[0]) == 359
    )
    assert set(np.unique(x)) <= {round(v * 255 / 16) for v in range(17)}


def test_test_fraction_with_a_test_split_is_refused(idx_folder, tmp_path):
    with pytest.raises(InvalidParameterError, match="already has a test split"):
        convert(idx_folder[0], tmp_path / "m.h5", test_fraction=0.2)


def test_read_source_does_not_write(idx_folder):
    arrays = read_source(idx_folder[0])
    assert set(arrays.splits) == {"train", "test"}


def test_attributes_of_every_kind_are_stored(tmp_path):
    from genkit.data import DatasetArrays, SplitArrays, write_h5

    attrs = {
        "source": "test",
        "mean": np.array([0.5, 0.25]),
        "names": np.array(["a", "b"]),
        "shape": (1, 2, 2),
        "meta": {"k": [1, 2]},
    }
    x = np.zeros((3, 1, 2, 2), np.uint8)
    out = write_h5(
        DatasetArrays(splits={"train": SplitArrays(images=x)}, attrs=attrs), tmp_path / "a.h5"
    )
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f.attrs["mean"], [0.5, 0.25])
        assert [n.decode() if isinstance(n, bytes) else n for n in f.attrs["names"]] == ["a", "b"]
        assert list(f.attrs["shape"]) == [1, 2, 2]
        assert f.attrs["meta"] == '{"k": [1, 2]}'


@pytest.mark.parametrize("numpy_has_core_underscore", [True, False])
def test_cifar_batches_pickled_under_numpy_1(
    cifar_folder, tmp_path, monkeypatch, numpy_has_core_underscore
):
    """The real CIFAR-10 batches name ``numpy.core.multiarray`` (numpy 1, protocol 2); they
    load under numpy 2 (``numpy._core``) and under a numpy without ``numpy._core``."""
    import importlib
    import sys
    import types

    convert_module = sys.modules["genkit.data.convert"]  # genkit.data.convert is the function
    for p in cifar_folder.iterdir():
        blob = p.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy._core" not in blob
        p.write_bytes(blob)
    assert b"numpy.core.multiarray" in (cifar_folder / "data_batch_1").read_bytes()
    if not numpy_has_core_underscore:
        real = importlib.import_module

        def old_numpy(name, *args):
            if name.startswith("numpy._core"):
                raise ModuleNotFoundError(f"No module named '{name}'")
            return real(name, *args)

        monkeypatch.setattr(
            convert_module, "importlib", types.SimpleNamespace(import_module=old_numpy)
        )
    out = convert(cifar_folder, tmp_path / "c.h5", keep_order=True)
    x, y = stored(out, "train")
    b1 = pickle.loads((cifar_folder / "data_batch_1").read_bytes())
    np.testing.assert_array_equal(x[:4].reshape(4, -1), b1[b"data"])
    np.testing.assert_array_equal(y[:4], b1[b"labels"])


def test_held_out_split_keeps_each_image_with_its_label(tmp_path):
    # image i is filled with the value i and labelled i % 7: a wrong pairing shows at once
    x = np.broadcast_to(np.arange(60, dtype=np.uint8)[:, None, None], (60, 3, 4)).copy()
    np.savez(tmp_path / "p.npz", images=x, labels=np.arange(60) % 7)
    out = convert(tmp_path / "p.npz", tmp_path / "p.h5", test_fraction=0.25, seed=5)
    seen = []
    for split, size in (("train", 45), ("test", 15)):
        xs, ys = stored(out, split)
        assert xs.shape == (size, 1, 3, 4)
        ids = xs[:, 0, 0, 0].astype(int)
        assert (xs == ids[:, None, None, None]).all()
        np.testing.assert_array_equal(ys, ids % 7)
        seen += ids.tolist()
    assert sorted(seen) == list(range(60))
