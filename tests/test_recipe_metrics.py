"""A recipe's ``[eval] metrics``: the sample-quality columns in results.md/.csv/.json, and bad
metric or feature names as one line before anything trains."""

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "training"))
from trainhelp import invoke

RECIPE = """
name = "quality"
data = "builtin:digits"
out = "{out}"

[train]
batch_size = 16
lr_warmup_steps = 1

[budget]
steps = 2

[eval]
mc_se = 10.0
max_nfe = 4
points = 0
samples = 0
metrics = {metrics}
metric_samples = 40
features = "{features}"
feature_params = {{ steps = 20 }}

[[runs]]
name = "vae"
model = "vae"
params = {{ latent_dim = 2, hidden = 16, net = "mlp" }}
{extra}"""

VDM = """
[[runs]]
name = "vdm"
model = "vdm"
params = { timesteps = 10, denoiser = "mlp", hidden = 16, depth = 1 }
sample_params = { steps = 3 }
eval = { metric_steps = [2, 5], max_nfe = 40 }
"""


def recipe(tmp_path: Path, metrics='["fid", "kid"]', features="classifier", extra="") -> Path:
    path = tmp_path / "quality.toml"
    path.write_text(
        RECIPE.format(out=tmp_path / "out", metrics=metrics, features=features, extra=extra)
    )
    return path


def test_quality_columns_in_every_report(tmp_path, monkeypatch):
    monkeypatch.setenv("GENKIT_CACHE", str(tmp_path / "cache"))
    invoke("run", recipe(tmp_path), "--quiet")
    out = tmp_path / "out"
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    want = ["fid", "fid_floor", "kid", "kid_std", "kid_floor", "features"]
    assert all(c in table[0] for c in want)
    assert float(table[0]["fid"]) > 0 and float(table[0]["kid_std"]) >= 0
    assert table[0]["features"].startswith("classifier (test accuracy 0.")
    doc = json.loads((out / "results.json").read_text())
    block = doc["runs"][0]["sample_metrics"]
    assert block["samples"] == 40 and set(block["metrics"]) == {"fid", "kid"}
    assert float(table[0]["fid_floor"]) == pytest.approx(block["floor"]["fid"]["value"], abs=1e-4)
    md = (out / "results.md").read_text()
    assert "| fid | fid_floor | kid | kid_std | kid_floor | features |" in md
    assert "not comparable with Inception" in md


@pytest.mark.parametrize(
    ("metrics", "features", "message"),
    [
        ('["fid", "isc"]', "classifier", "unknown metric 'isc'"),
        ('["fid"]', "clip", "unknown feature_extractor 'clip'"),
    ],
)
def test_bad_names_are_one_line_before_training(tmp_path, metrics, features, message):
    text = invoke("run", recipe(tmp_path, metrics, features), code=1)
    assert message in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "runs").exists()


def test_quality_against_sampling_cost(tmp_path, monkeypatch):
    """A VDM gets a point per metric_steps (and none of its own steps twice), the VAE the one
    point of its sampler; the plot and the table are written."""
    monkeypatch.setenv("GENKIT_CACHE", str(tmp_path / "cache"))
    invoke("run", recipe(tmp_path, extra=VDM), "--quiet")
    out = tmp_path / "out"
    rows = {r["run"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    vae, vdm = rows["vae"]["quality_curve"], rows["vdm"]["quality_curve"]
    assert [p["steps"] for p in vae] == [None]
    assert vae[0]["fid"] == rows["vae"]["sample_metrics"]["metrics"]["fid"]["value"]
    assert [p["steps"] for p in vdm] == [2, 5]
    assert all(p["fid"] > 0 and p["seconds_per_image"] > 0 and p["kid_std"] >= 0 for p in vdm)
    # more steps cost more time per image (5 network calls against 2)
    assert vdm[1]["seconds_per_image"] > vdm[0]["seconds_per_image"]
    assert (out / "quality_vs_sampling_cost.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "## Sample quality against sampling cost" in md
    assert "| vdm | 2 |" in md and "| vdm | 5 |" in md and "| vae | one sampler |" in md


def test_missing_weights_stop_the_recipe_before_anything_trains(tmp_path, monkeypatch):
    """The extractor is built while the recipe is checked: Inception weights that are not
    there stop it with one line before the first run trains (not after it)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no weights in the hub cache
    path = recipe(tmp_path, features="inception")
    path.write_text(path.read_text().replace("feature_params = { steps = 20 }", ""))
    text = invoke("run", path, code=1)
    assert "inception" in text.lower() and len(text.strip().splitlines()) == 1
    assert "[runs.vae]" in text and not (tmp_path / "out" / "runs").exists()


def test_the_classifier_is_cached_under_the_recipes_cache_dir(tmp_path, monkeypatch):
    """``genkit run --cache-dir D`` keeps the trained classifier in D/classifiers, as ``genkit
    eval --cache-dir D`` does, and writes nothing under $GENKIT_CACHE."""
    env_cache, cache_dir = tmp_path / "env", tmp_path / "given"
    monkeypatch.setenv("GENKIT_CACHE", str(env_cache))
    invoke("run", recipe(tmp_path, metrics='["fid"]'), "--quiet", "--cache-dir", cache_dir)
    assert len(list((cache_dir / "classifiers").glob("*.pt"))) == 1
    assert not (env_cache / "classifiers").exists()
