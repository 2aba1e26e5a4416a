"""A model's own training defaults (``LatentVariableModel.train_defaults``): ``genkit train``
and ``genkit run`` put them under what the user sets; the continuous VDM declares lr 4e-3."""

import json
from pathlib import Path

import numpy as np
import pytest
from trainhelp import invoke

import genkit
from genkit.data import DatasetArrays, SplitArrays, write_h5
from genkit.errors import PluginError
from genkit.training.config import TrainConfig, with_model_defaults

SHARED_LR = TrainConfig().lr


def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)

    def split(n):
        return SplitArrays(images=rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8))

    path = tmp_path / "d.h5"
    if path.exists():
        return path
    write_h5(DatasetArrays({"train": split(32), "test": split(8)}, {"source": "test"}), path)
    return path


def trained_lr(tmp_path: Path, name: str, *args: str) -> float:
    run = tmp_path / name
    invoke(
        "train", "--data", data(tmp_path), "--out", run, "-q",
        "--set", "steps=1", "--set", "batch_size=16", "--set", "eval_every=0",
        "--set", "num_samples=0", "--set", "checkpoint_every=0", "--set", "eval_mc_se=10.0",
        "--set", "eval_max_nfe=40", *args,
    )  # fmt: skip
    return json.loads((run / "config.json").read_text())["train"]["lr"]


def test_genkit_train_puts_the_models_defaults_under_set(tmp_path):
    vdm = ["--model", "vdm", "--set", "model.timesteps=0", "--set", "model.channels=8"]
    assert trained_lr(tmp_path, "c", *vdm) == 4e-3 != SHARED_LR
    assert trained_lr(tmp_path, "s", *vdm, "--set", "lr=1e-3") == 1e-3  # --set wins
    discrete = ["--model", "vdm", "--set", "model.timesteps=10", "--set", "model.channels=8"]
    assert trained_lr(tmp_path, "d", *discrete) == SHARED_LR  # declares none
    vae = ["--model", "vae", "--set", "model.hidden=16", "--set", "model.latent_dim=2"]
    assert trained_lr(tmp_path, "v", *vae) == SHARED_LR


RECIPE = """
name = "defaults"
data = "{data}"
out = "{out}"

[train]
batch_size = 16
{lr}

[budget]
steps = 1

[eval]
mc_se = 10.0
max_nfe = 8
points = 0
samples = 0

[[runs]]
name = "vdm"
model = "vdm"
params = {{ timesteps = 0, channels = 8 }}

[[runs]]
name = "vae"
model = "vae"
params = {{ hidden = 16, latent_dim = 2 }}
"""


@pytest.mark.parametrize(
    ("lr", "want"),
    [("", {"vdm": 4e-3, "vae": SHARED_LR}), ("lr = 1e-3", {"vdm": 1e-3, "vae": 1e-3})],
)
def test_a_recipe_runs_over_the_models_defaults_and_its_own_train_wins(tmp_path, lr, want):
    out = tmp_path / "out"
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(data=data(tmp_path), out=out, lr=lr))
    invoke("run", recipe, "--quiet")
    for name, value in want.items():
        info = json.loads((out / "runs" / name / "config.json").read_text())
        assert info["train"]["lr"] == value, name
    invoke("run", recipe, "--quiet")  # the same settings again: finished runs are reused
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [r["run"] for r in rows] == ["vdm", "vae"]
    # --only vae: the vdm run is not prepared, its model is built to read its defaults, and
    # its finished result (made over them) stays in the report
    text = invoke("run", recipe, "--only", "vae")
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [r["run"] for r in rows] == ["vdm", "vae"] and "left out" not in text


def test_a_model_may_default_only_optimisation_settings():
    class Model:
        @property
        def train_defaults(self) -> dict:
            return {"device": "cuda"}

    with pytest.raises(PluginError, match="model 'm' declares train_defaults for 'device'"):
        with_model_defaults(Model(), {}, "m")
    model = genkit.create_model("vdm", (1, 8, 8), timesteps=0, channels=8)
    given = {"lr": 1.0, "steps": 3}  # the user's keys win, the others are the model's
    assert with_model_defaults(model, given, "vdm") == {**given, "lr_warmup_steps": 500}
    assert with_model_defaults(model, {}, "vdm") == {"lr": 4e-3, "lr_warmup_steps": 500}
