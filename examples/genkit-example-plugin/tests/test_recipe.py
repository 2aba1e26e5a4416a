"""The plugin's model and estimator through ``genkit run``, as a user would train them: a
tiny recipe (the shipped ``recipe.toml`` cut to a few steps on random 8-bit images)."""

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from genkit.cli import cli
from genkit.data import DatasetArrays, SplitArrays, write_h5

RECIPE = Path(__file__).parents[1] / "recipe.toml"


def test_the_plugin_trains_through_genkit_run(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "digits.h5"
    splits = {
        s: SplitArrays(images=rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8))
        for s, n in (("train", 64), ("test", 16))
    }
    write_h5(DatasetArrays(splits, {"source": "test"}), data)
    sets = [
        f"data={json.dumps(str(data))}",
        "budget={steps=3}",
        "train.batch_size=16",
        "train.num_threads=1",
        "eval.points=2",
        "eval.samples=4",
        "eval.mc_se=1.0",
    ]
    args = ["run", str(RECIPE), "--out", str(tmp_path / "out"), "--quiet"]
    args += [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["run"]: r for r in doc["runs"]}
    assert set(rows) == {"vae", "vamp_vae", "vamp_vae_free_bits"}
    for row in rows.values():
        assert row["steps"] == 3 and np.isfinite(row["bits_per_dim"]) and row["mc_se"] > 0
    # trained with free_bits, evaluated with the true ELBO: the lecture's two terms
    free = rows["vamp_vae_free_bits"]
    assert set(free["terms_bits_per_dim"]) == {"reconstruction", "prior_matching"}
    run = json.loads((tmp_path / "out" / "runs" / "vamp_vae_free_bits" / "result.json").read_text())
    assert run["train_config"]["estimator"] == "free_bits"
    assert (tmp_path / "out" / "samples" / "vamp_vae.png").is_file()
