"""``genkit run``: a tiny recipe end to end, the checks made before anything trains, skipping
finished runs, resuming an interrupted one, and every recipe shipped in ``recipes/``."""

import csv
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from genkit.data import DatasetArrays, SplitArrays, write_h5
from genkit.recipes.report import columns
from genkit.recipes.schema import load_recipe

sys.path.insert(0, str(Path(__file__).parent / "training"))
from trainhelp import invoke

RECIPES = Path(__file__).parents[1] / "recipes"
#: The data shape each shipped recipe is written for (a new recipe must be added here).
SHAPES = {
    "compare_vae_vdm.toml": (1, 8, 8),
    "mnist_cpu.toml": (1, 28, 28),
    "mnist_gpu.toml": (1, 28, 28),
    "cifar10_gpu.toml": (3, 32, 32),
}


def synthetic_h5(path: Path, shape=(1, 8, 8), n_train=48, n_test=12) -> Path:
    """Random 8-bit images of ``shape`` in genkit's HDF5 layout."""
    rng = np.random.default_rng(0)

    def split(n):
        return SplitArrays(images=rng.integers(0, 256, (n, *shape), dtype=np.uint8))

    write_h5(
        DatasetArrays({"train": split(n_train), "test": split(n_test)}, {"source": "test"}), path
    )
    return path


TINY = """
name = "tiny"
data = "{data}"
out = "{out}"

[train]
batch_size = 16
lr_warmup_steps = 1
checkpoint_every = 2

[budget]
steps = 4

[eval]
mc_se = 10.0
max_nfe = 60
points = 2
samples = 4

[[runs]]
name = "vae"
model = "vae"
params = {{ latent_dim = 3, hidden = 16, net = "mlp" }}

[[runs]]
name = "vdm"
model = "vdm"
params = {{ timesteps = 10, denoiser = "mlp", hidden = 16, depth = 1 }}
sample_params = {{ steps = 3 }}
"""


def tiny_recipe(tmp_path: Path, extra: str = "") -> Path:
    """:data:`TINY` on a fresh synthetic file, with ``extra`` TOML appended."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = synthetic_h5(tmp_path / "tiny.h5")
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(data=data, out=tmp_path / "out") + extra)
    return path


def test_a_tiny_recipe_end_to_end_writes_every_output(tmp_path):
    recipe = tiny_recipe(tmp_path)
    text = invoke("run", recipe, "--quiet")
    out = tmp_path / "out"
    # the table is printed with --quiet: quiet silences progress, not results
    assert "bits/dim" in text and "vae" in text and "vdm" in text and "training" not in text
    for name in ("results.md", "results.csv", "results.json", "bits_per_dim_vs_time.png"):
        assert (out / name).is_file(), name
    for run in ("vae", "vdm"):
        assert (out / "samples" / f"{run}.png").is_file()
        assert list((out / "runs" / run / "tb").glob("events.out.tfevents.*"))
        assert (out / "runs" / run / "result.json").is_file()
    doc = json.loads((out / "results.json").read_text())
    rows = doc["runs"]
    assert [r["run"] for r in rows] == ["vae", "vdm"]
    with open(out / "results.csv") as f:
        header = next(csv.reader(f))
    assert header == columns(rows)
    expected = ["run", "model", "decoder", "parameters", "steps", "train_seconds"]
    assert header[:6] == expected
    assert header[-5:] == ["bits_per_dim", "se", "mc_se", "nfe_per_example", "sample_images_per_second"]  # fmt: skip
    for term in ("reconstruction", "prior_matching", "denoising_matching"):
        assert f"{term} (bits/dim)" in header
    for row in rows:
        assert row["steps"] == 4 and row["se"] > 0 and row["mc_se"] > 0
        assert row["nfe_per_example"] > 0 and row["sample_images_per_second"] > 0
        terms = sum(row["terms_bits_per_dim"].values())
        assert terms == pytest.approx(row["bits_per_dim"], rel=1e-6)
        assert len(row["curve"]) == 2  # one periodic evaluation, then the final one
    md = (out / "results.md").read_text()
    assert md.count("\n| vae |") == 1 and "mc_se" in md


BAD = [
    ("[budgett]\nsteps = 2\n", "unknown key 'budgett'; did you mean 'budget'"),
    ('\n[[runs]]\nname = "x"\nmodel = "vea"\n', "'vea'"),
    ('\n[[runs]]\nname = "x"\nmodel = "vae"\nparams = { latent_dim = "big" }\n', "latent_dim"),
    ('\n[[runs]]\nname = "x"\nmodel = "vae"\nparams = { latent_dimm = 3 }\n', "latent_dim"),
    ('\n[[runs]]\nname = "x"\nmodel = "vae"\ntrain = { lr = "fast" }\n', "lr"),
    ('\n[[runs]]\nname = "x"\nmodel = "vae"\nobjective_weights = { recon = 0.5 }\n', "recon"),
    (
        '\n[[runs]]\nname = "x"\nmodel = "vdm"\nsample_params = { stepz = 3 }\n',
        "did you mean 'steps'",
    ),
    # the evaluation estimator's parameters are checked too, though no estimator is named
    ('\n[[runs]]\nname = "x"\nmodel = "vdm"\neval = { params = { t_sample = 3 } }\n', "t_sample"),
    # what [budget] and [eval] set cannot hide in [train]
    ('\n[[runs]]\nname = "x"\nmodel = "vae"\ntrain = { eval_every = 5 }\n', "[eval]"),
    ('\n[[runs]]\nname = "x"\nmodel = "vae"\ntrain = { steps = 5 }\n', "[budget]"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_a_bad_recipe_is_one_line_before_anything_trains(tmp_path, extra, message):
    recipe = tiny_recipe(tmp_path, extra)
    text = invoke("run", recipe, code=1)
    assert message in text and "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_unknown_model_lists_the_models_and_missing_data_is_one_line(tmp_path):
    recipe = tiny_recipe(tmp_path, '\n[[runs]]\nname = "x"\nmodel = "vea"\n')
    assert "vae" in invoke("run", recipe, code=1) and "vdm" in invoke("run", recipe, code=1)
    missing = tmp_path / "missing.toml"
    missing.write_text(TINY.format(data=tmp_path / "nowhere.h5", out=tmp_path / "out"))
    text = invoke("run", missing, code=1)
    assert "nowhere.h5" in text and len(text.strip().splitlines()) == 1
    assert "does not exist" in invoke("run", tmp_path / "no_such.toml", code=1)
    other = tiny_recipe(tmp_path / "other")
    assert "no run named 'vea'" in invoke("run", other, "--only", "vea", code=1)


def test_a_second_run_skips_finished_runs(tmp_path):
    recipe = tiny_recipe(tmp_path)
    invoke("run", recipe, "--quiet")
    result = tmp_path / "out" / "runs" / "vae" / "result.json"
    before = result.read_text(), result.stat().st_mtime_ns
    text = invoke("run", recipe)
    assert "vae: finished before, skipped" in text and "vdm: finished before, skipped" in text
    assert (result.read_text(), result.stat().st_mtime_ns) == before


def test_an_interrupted_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    from genkit.training.trainer import Trainer

    recipe = tiny_recipe(tmp_path)
    step = Trainer.train_step

    def interrupted(self, x):
        step(self, x)
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)  # as a Ctrl-C: checkpoint, then stop

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    text = invoke("run", recipe, "--only", "vae")
    assert "stopped by a signal" in text
    run = tmp_path / "out" / "runs" / "vae"
    assert (run / "checkpoints").is_dir() and not (run / "result.json").exists()
    monkeypatch.setattr(Trainer, "train_step", step)
    text = invoke("run", recipe, "--only", "vae")
    assert "vae: resuming vae" in text
    resumed = json.loads((run / "result.json").read_text())
    fresh = tiny_recipe(tmp_path / "again")
    invoke("run", fresh, "--only", "vae", "--quiet")
    straight = json.loads((tmp_path / "again" / "out" / "runs" / "vae" / "result.json").read_text())
    assert resumed["steps"] == straight["steps"] == 4
    assert resumed["bits_per_dim"] == straight["bits_per_dim"]  # bit for bit


def test_set_and_out_override_the_recipe(tmp_path):
    recipe = tiny_recipe(tmp_path)
    other = tmp_path / "elsewhere"
    invoke(
        "run", recipe, "--out", other, "--only", "vae", "--quiet",
        "--set", "budget={steps=2}", "--set", "runs.vae.params.latent_dim=2",
    )  # fmt: skip
    row = json.loads((other / "runs" / "vae" / "result.json").read_text())
    assert row["steps"] == 2 and row["params"]["latent_dim"] == 2
    assert "unknown key 'budgte'" in invoke("run", recipe, "--set", "budgte.steps=2", code=1)
    assert "no run named 'vea'" in invoke("run", recipe, "--set", "runs.vea.params.x=1", code=1)


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.toml")))
def test_every_shipped_recipe_validates_and_runs_two_steps_per_run(tmp_path, name):
    """On random data of the recipe's shape: every run built, trained two steps, evaluated
    and sampled, with the recipe's own models and settings (budgets and evaluation cut)."""
    assert name in SHAPES, f"add {name}'s data shape to SHAPES"
    recipe = load_recipe(RECIPES / name)
    assert recipe.description and recipe.runs
    data = synthetic_h5(tmp_path / "data.h5", SHAPES[name], n_train=8, n_test=4)
    sets = [
        f"data={json.dumps(str(data))}",
        "budget={steps=2}",
        "eval.mc_se=100.0",
        "eval.max_nfe=100",
        "eval.points=2",
        "eval.samples=2",
        "train.batch_size=4",
        "train.num_threads=1",
        "train.num_workers=0",
        "eval.metrics=[]",  # random data has no labels for the classifier (tested elsewhere)
    ]
    for run in recipe.runs:
        if run.budget:
            sets.append(f"runs.{run.name}.budget={{steps=2}}")
        if "steps" in run.sample_params:
            sets.append(f"runs.{run.name}.sample_params.steps=2")
    args = [a for s in sets for a in ("--set", s)]
    text = invoke("run", RECIPES / name, "--out", tmp_path / "out", "--quiet", *args)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["run"] for r in rows] == [r.name for r in recipe.runs]
    assert all(r["steps"] == 2 for r in rows), text


@pytest.mark.parametrize(
    "path",
    sorted(
        [
            *(RECIPES.parent / "benchmarks").glob("*.toml"),
            RECIPES.parent / "examples" / "genkit-example-plugin" / "recipe.toml",
        ],
        key=str,
    ),
    ids=lambda p: p.name if p.parent.name == "benchmarks" else "example",
)
def test_the_other_recipes_in_the_repository_parse(path):
    """The benchmark recipes and the example plugin's (run in full by their commands and by
    the plugin's own test) at least parse and name known tables."""
    recipe = load_recipe(path)
    assert recipe.description and recipe.runs
