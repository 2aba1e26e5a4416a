"""``genkit eval RUN --metrics ...``: the ``sample_metrics`` JSON end to end on a tiny VAE
trained on builtin:digits, its floor, its reproducibility by seed, and one clear line for each
bad flag."""

import json

import pytest
from trainhelp import invoke

TINY = ["--set", "steps=1", "--set", "batch_size=16", "--set", "eval_every=0"]
TINY += ["--set", "model.hidden=16", "--set", "model.latent_dim=2", "-q"]
#: a classifier trained for a few steps: enough to tell data from an untrained model
FEATURES = ["--feature-param", "steps=40"]
FAST_BITS = ["--mc-se", "0", "--max-nfe", "2", "--batch-size", "512"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmetrics")
    mp = pytest.MonkeyPatch()
    mp.setenv("GENKIT_CACHE", str(root / "cache"))
    invoke("train", "--model", "vae", "--data", "builtin:digits", "--out", root / "run", *TINY)
    yield root / "run"
    mp.undo()


def eval_json(run, out, *extra):
    invoke(
        "eval", run, *FAST_BITS, "--metrics", "fid,kid,precision,recall", "--samples", "120",
        *FEATURES, "--json", out, *extra,
    )  # fmt: skip
    return json.loads(out.read_text())


def test_sample_metrics_json_floor_and_seed(run, tmp_path):
    doc = eval_json(run, tmp_path / "a.json")
    assert "bits_per_dim" in doc  # the likelihood evaluation is still there
    block = doc["sample_metrics"]
    assert list(block["metrics"]) == ["fid", "kid", "precision", "recall"]
    for name, entry in block["metrics"].items():
        assert entry["samples"] == 120 and entry["reference"] == "test"
        assert entry["features"]["name"] == "classifier"
        assert 0.0 <= entry["features"]["test_accuracy"] <= 1.0
        assert entry["sample_params"] == {}
        assert (entry["std"] is not None) == (name == "kid")
    floor = block["floor"]
    assert set(floor) == set(block["metrics"]) and floor["fid"]["samples"] == 120
    # data against data beats a model trained for one step
    assert floor["fid"]["value"] < block["metrics"]["fid"]["value"]
    assert floor["kid"]["value"] < block["metrics"]["kid"]["value"]
    # the same seed, the same figures (the classifier now comes from its cache)
    again = eval_json(run, tmp_path / "b.json")["sample_metrics"]
    assert again["features"]["cached"] is True
    for name in block["metrics"]:
        assert again["metrics"][name]["value"] == block["metrics"][name]["value"]
        assert again["floor"][name]["value"] == floor[name]["value"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--metrics", "fid,fdi"], "unknown metric 'fdi'"),
        (["--metrics", "fid", "--features", "clip"], "unknown feature_extractor 'clip'"),
        (["--sample-param", "steps=3"], "--sample-param needs --metrics"),
        (["--metrics", "fid", "--sample-param", "stpes=3"], "has no parameter 'stpes'"),
        (["--metrics", "fid", "--feature-param", "weights"], "--feature-param"),
        (
            ["--metrics", "fid", "--features", "inception", "--feature-param", "weights=/no/w.pth"],
            "Inception weights not found at /no/w.pth",
        ),
    ],
)
def test_bad_flags_are_one_line(run, flags, message):
    out = invoke("eval", run, *FAST_BITS, *flags, code=1)
    assert message in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1
