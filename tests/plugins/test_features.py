"""The feature extractors of the built-in plugin genkit_features: the classifier's cache
(trained once, reused, keyed by the data file's content), the Inception network loaded from a
random-weights file of its architecture, and the clear lines for missing labels or weights."""

from pathlib import Path

import genkit_features.classifier as clf
import genkit_features.inception as inc
import numpy as np
import pytest
import torch

from genkit.data import DatasetArrays, SplitArrays, open_dataset, write_h5
from genkit.errors import DataError, UnknownNameError
from genkit.features import FeatureContext, available_feature_extractors, create_feature_extractor


def labelled_h5(path: Path, seed: int = 0, labels: bool = True) -> Path:
    """8x8 grey images of two classes (a bright top or bottom half), 40 train / 12 test."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)

    def split(n):
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 60, (n, 1, 8, 8), dtype=np.uint8)
        for i, c in enumerate(y):
            x[i, 0, 4 * c : 4 * c + 4] += 180
        return SplitArrays(images=x, labels=y if labels else None)

    write_h5(DatasetArrays({"train": split(40), "test": split(12)}, {"source": "test"}), path)
    return path


def context(path: Path) -> FeatureContext:
    return FeatureContext(
        data=str(path), train=open_dataset(path, "train"), test=open_dataset(path, "test")
    )


def test_both_extractors_are_registered_through_the_plugin():
    assert {"classifier", "inception"} <= set(available_feature_extractors())
    with pytest.raises(UnknownNameError, match="unknown feature_extractor 'clasifier'"):
        create_feature_extractor("clasifier", FeatureContext(data="builtin:digits"))


def test_classifier_is_trained_once_and_keyed_by_content(tmp_path, monkeypatch):
    data = labelled_h5(tmp_path / "a.h5")
    cache = tmp_path / "cache"
    first = create_feature_extractor("classifier", context(data), steps=3, cache=str(cache))
    assert first.info["cached"] is False
    assert 0.0 <= first.info["test_accuracy"] <= 1.0
    x = open_dataset(data, "test").__getitems__([0, 1, 2])
    feats = first(x)
    assert feats.shape == (3, clf.WIDTH)
    files = sorted((cache / "classifiers").glob("*.pt"))
    assert len(files) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(clf, "train_classifier", no_training)
    again = create_feature_extractor("classifier", context(data), steps=3, cache=str(cache))
    assert again.info["cached"] is True
    assert again.info["test_accuracy"] == first.info["test_accuracy"]
    torch.testing.assert_close(again(x), feats)
    # the same file name, other content: a new classifier
    other = labelled_h5(tmp_path / "b" / "a.h5", seed=1)
    with pytest.raises(AssertionError, match="trained again"):
        create_feature_extractor("classifier", context(other), steps=3, cache=str(cache))
    monkeypatch.undo()
    create_feature_extractor("classifier", context(other), steps=3, cache=str(cache))
    assert len(list((cache / "classifiers").glob("*.pt"))) == 2


def test_classifier_without_labels_names_both_options(tmp_path, monkeypatch):
    monkeypatch.setattr(inc, "default_weights_path", lambda: tmp_path / "none" / inc.WEIGHTS_FILE)
    data = labelled_h5(tmp_path / "u.h5", labels=False)
    with pytest.raises(DataError) as err:
        create_feature_extractor("classifier", context(data), steps=3, cache=str(tmp_path))
    line = str(err.value)
    assert "\n" not in line
    assert "labels" in line and "--features inception" in line and inc.WEIGHTS_URL in line


def test_inception_loads_a_weights_file_of_its_architecture(tmp_path):
    torch.manual_seed(0)
    net = inc.FIDInceptionV3().eval()
    path = tmp_path / "random_inception.pth"
    torch.save(net.state_dict(), path)
    data = labelled_h5(tmp_path / "d.h5")
    extractor = create_feature_extractor("inception", context(data), weights=str(path))
    loaded = extractor.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    x = open_dataset(data, "test").__getitems__([0, 1])
    with torch.no_grad():
        f = extractor(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    assert extractor.info["name"] == "inception"


def test_inception_without_weights_says_how_to_get_them(tmp_path):
    data = labelled_h5(tmp_path / "d.h5")
    missing = tmp_path / "nothing.pth"
    with pytest.raises(inc.MissingWeightsError) as err:
        create_feature_extractor("inception", context(data), weights=str(missing))
    assert str(missing) in str(err.value) and inc.WEIGHTS_URL in str(err.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(inc.MissingWeightsError, match="not the FID Inception-v3"):
        create_feature_extractor("inception", context(data), weights=str(wrong))
