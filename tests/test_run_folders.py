"""A run folder knows what made it (issue 18): no stale or mixed results, one writer at a
time, and the checks made before anything trains."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "training"))
from test_recipes import synthetic_h5, tiny_recipe
from trainhelp import invoke

from genkit.files import FolderLockedError, output_lock, replaced_atomically
from genkit.training import checkpoint as ckpt

ROOT = Path(__file__).parents[1]


def _one_line(text: str) -> str:
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    return text


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny recipe's ``vae`` run, finished once for the module; copy before changing."""
    root = tmp_path_factory.mktemp("finished")
    recipe = tiny_recipe(root)
    invoke("run", recipe, "--only", "vae", "--quiet")
    return root


def _copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished folder whose recipe points at the copy's data and output."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    for path in [tmp_path / "tiny.toml", *(tmp_path / "out").rglob("*.json")]:
        path.write_bytes(path.read_bytes().replace(bytes(finished), bytes(tmp_path)))
    return tmp_path / "tiny.toml"


def _rewrite(path: Path, **sizes) -> Path:
    """``path`` written anew with other content (same name)."""
    path.unlink()
    return synthetic_h5(path, **sizes)


def _fingerprint_of(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.parametrize(
    ("sets", "change"),
    [
        (["--set", "runs.vae.params.latent_dim=2"], "params.latent_dim: 3 -> 2"),
        (
            [
                "--set",
                'runs.vae.model="vdm"',
                "--set",
                'runs.vae.params={timesteps=10,denoiser="mlp",hidden=16,depth=1}',
            ],
            'model: "vae" -> "vdm"',
        ),
        (["--set", "train.lr=0.01"], "train.lr:"),
        (["--set", "eval.mc_se=5.0"], "eval.mc_se: 10.0 -> 5.0"),
    ],
    ids=["params", "model", "train", "eval"],
)
def test_a_finished_run_of_other_settings_is_not_reused(finished, tmp_path, sets, change):
    recipe = _copy(finished, tmp_path)
    result = tmp_path / "out" / "runs" / "vae" / "result.json"
    before = _fingerprint_of(result)
    text = _one_line(invoke("run", recipe, "--only", "vae", *sets, code=1))
    assert "'vae'" in text and change in text and "--rerun-changed" in text
    assert _fingerprint_of(result) == before  # nothing written


def test_other_data_is_not_reused_and_rerun_changed_moves_the_old_run_aside(finished, tmp_path):
    recipe = _copy(finished, tmp_path)
    other = synthetic_h5(tmp_path / "other.h5", n_train=40)
    old = json.loads((tmp_path / "out" / "runs" / "vae" / "result.json").read_text())
    text = _one_line(invoke("run", recipe, "--only", "vae", "--set", f'data="{other}"', code=1))
    assert "data fingerprint" in text and "data spec" in text
    text = invoke(
        "run", recipe, "--only", "vae", "--set", f'data="{other}"', "--rerun-changed", "--quiet"
    )
    moved = list((tmp_path / "out" / "replaced").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("vae-")
    assert json.loads((moved[0] / "result.json").read_text()) == old  # kept whole, aside
    assert (moved[0] / "samples.png").is_file()
    new = json.loads((tmp_path / "out" / "runs" / "vae" / "result.json").read_text())
    assert new["made_by"]["data"]["spec"] == str(other.resolve())
    assert new["made_by"]["data"]["fingerprint"] != old["made_by"]["data"]["fingerprint"]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["made_by"]["data"]["spec"] for r in report["runs"]] == [str(other.resolve())]
    # the same again: finished on the same settings and data, skipped
    again = invoke("run", recipe, "--only", "vae", "--set", f'data="{other}"')
    assert "vae: finished before, skipped" in again


def test_a_changed_data_file_is_seen_by_its_content(finished, tmp_path):
    """The same path, other bytes: the fingerprint tells."""
    recipe = _copy(finished, tmp_path)
    _rewrite(tmp_path / "tiny.h5", n_train=40)
    text = _one_line(invoke("run", recipe, "--only", "vae", code=1))
    assert "data fingerprint" in text and "data spec" not in text


def test_the_report_leaves_out_results_made_by_other_settings(finished, tmp_path):
    """``--only vdm`` after vae's settings changed: vae's old row is not reported as if it
    were made by the recipe as it is now."""
    recipe = _copy(finished, tmp_path)
    text = invoke("run", recipe, "--only", "vdm", "--set", "runs.vae.params.latent_dim=2")
    assert "vae: its result" in text and "left out of the report" in text
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["run"] for r in rows] == ["vdm"]


def test_an_interrupted_run_resumes_only_on_the_same_data(tmp_path, monkeypatch):
    from genkit.training.trainer import Trainer

    recipe = tiny_recipe(tmp_path)
    step = Trainer.train_step

    def interrupted(self, x):
        step(self, x)
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert "stopped by a signal" in invoke("run", recipe, "--only", "vae")
    monkeypatch.setattr(Trainer, "train_step", step)
    run = tmp_path / "out" / "runs" / "vae"
    files = {p: _fingerprint_of(p) for p in run.rglob("*") if p.is_file()}
    small = synthetic_h5(tmp_path / "small.h5", n_train=20)
    text = _one_line(invoke("run", recipe, "--only", "vae", "--set", f'data="{small}"', code=1))
    assert "data fingerprint" in text
    assert {p: _fingerprint_of(p) for p in files} == files  # config.json included
    assert "vae: resuming" in invoke("run", recipe, "--only", "vae")


def test_a_folder_without_a_record_is_not_reused(finished, tmp_path):
    """A run folder of an older genkit records nothing: it is not taken as matching."""
    recipe = _copy(finished, tmp_path)
    config = tmp_path / "out" / "runs" / "vae" / "config.json"
    info = json.loads(config.read_text())
    del info["made_by"]
    config.write_text(json.dumps(info))
    text = _one_line(invoke("run", recipe, "--only", "vae", code=1))
    assert "records nothing of what made it" in text


def test_a_second_writer_gets_the_holders_pid_and_a_dead_holder_blocks_nothing(tmp_path):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "out"
    with output_lock(out):
        text = _one_line(invoke("run", recipe, "--only", "vae", code=1))
        assert f"PID {os.getpid()}" in text and "another process" in text
        with pytest.raises(FolderLockedError), output_lock(out):
            pass
    # a holder killed with SIGKILL leaves its files, not its lock
    code = (
        "import os, signal, sys; from genkit.files import output_lock\n"
        "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL and "held" in proc.stdout
    assert (out / ".genkit.lock.json").is_file()  # the stale holder's note ...
    with output_lock(out):  # ... blocks nothing
        assert json.loads((out / ".genkit.lock.json").read_text())["pid"] == os.getpid()


def test_two_processes_racing_for_one_folder(tmp_path):
    """The second fails fast with the lock's message; the first finishes unharmed."""
    recipe = tiny_recipe(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "genkit", "run", str(recipe), "--only", "vae", "--quiet"]
    # the first trains for 10 s, well past the second's start
    first = subprocess.Popen(
        [*command, "--set", "budget={minutes=0.17}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    holder = tmp_path / "out" / ".genkit.lock.json"
    deadline = time.monotonic() + 120
    while not holder.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder.exists(), first.communicate()
    second = subprocess.run(
        [*command, "--set", "train.seed=1"], env=env, capture_output=True, text=True, timeout=120
    )
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert (
        f"PID {first.pid}" in second.stderr and "being written by another process" in second.stderr
    )
    row = json.loads((tmp_path / "out" / "runs" / "vae" / "result.json").read_text())
    config = json.loads((tmp_path / "out" / "runs" / "vae" / "config.json").read_text())
    assert row["train_config"]["seed"] == config["train"]["seed"] == 0  # one writer's files


# -- checks before anything trains ----------------------------------------------------------
def _mixed_shapes(path: Path) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["layout_version"] = 1
        f.create_dataset("train/images", data=rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8))
        f.create_dataset("test/images", data=rng.integers(0, 256, (6, 1, 16, 16), dtype=np.uint8))
    return path


def test_splits_of_other_shapes_stop_every_command_before_anything_is_written(tmp_path):
    data = _mixed_shapes(tmp_path / "mixed.h5")
    info = invoke("data", "info", data, code=1)
    *described, error = info.strip().splitlines()
    assert "test:" in described and "train:" in described  # the description, then the error
    assert error.startswith("Error: ") and "cannot be trained on" in error
    assert (
        "split 'test' holds items of shape (1, 16, 16) uint8, split 'train' of (1, 8, 8)" in error
    )
    recipe = tiny_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "tiny.h5"), str(data)))
    text = _one_line(invoke("run", recipe, code=1))
    assert "split 'test'" in text and "split 'train'" in text and "mixed.h5" in text
    assert not (tmp_path / "out").exists()
    text = _one_line(
        invoke("train", "--model", "vae", "--data", data, "--out", tmp_path / "r", code=1)
    )
    assert "split 'test'" in text and not (tmp_path / "r").exists()


def test_data_info_reports_non_finite_values_with_a_non_zero_status(tmp_path):
    path = tmp_path / "nan.h5"
    data = np.ones((10, 3), dtype=np.float32)
    data[2, 1], data[5, 0] = np.nan, np.inf
    with h5py.File(path, "w") as f:
        f.attrs["layout_version"] = 1
        f.create_dataset("train/data", data=data)
        f.create_dataset("test/data", data=np.ones((4, 3), dtype=np.float32))
    text = invoke("data", "info", path, code=1)
    assert "range [1, 1]" in text and "split 'train': 2 NaN or infinite value(s)" in text
    assert "inf, -inf" not in text


@pytest.mark.parametrize("name", ["my run", "../escape", "a/b", ".hidden"])
def test_a_run_name_that_is_not_a_safe_folder_name_is_one_line(tmp_path, name):
    recipe = tiny_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace('name = "vae"', f"name = {json.dumps(name)}"))
    text = _one_line(invoke("run", recipe, code=1))
    assert "letters, digits" in text and repr(name) in text
    assert not (tmp_path / "out").exists()


def test_out_missing_from_the_recipe_and_a_folder_as_recipe(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe.write_text(
        "\n".join(ln for ln in recipe.read_text().splitlines() if not ln.startswith("out ="))
    )
    text = _one_line(invoke("run", recipe, code=1))
    assert "names no output folder" in text and "--out" in text
    assert "'out': out" not in text
    invoke("run", recipe, "--out", tmp_path / "given", "--only", "vae", "--quiet")
    assert (tmp_path / "given" / "runs" / "vae" / "result.json").is_file()
    text = _one_line(invoke("run", tmp_path, code=1))
    assert "is a folder" in text and "does not exist" not in text


def test_a_text_file_named_npy_is_named_as_not_numpy(tmp_path):
    fake = tmp_path / "x.npy"
    fake.write_text("1,2,3\n4,5,6\n")
    text = _one_line(invoke("data", "convert", fake, tmp_path / "x.h5", code=1))
    assert "not a NumPy .npy file" in text and "pickle" not in text
    assert not (tmp_path / "x.h5").exists()


# -- small ones ---------------------------------------------------------------------------
def test_leftover_temporary_files_of_dead_writers_are_removed_at_the_next_write(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    with replaced_atomically(tmp_path / "probe") as tmp:
        tmp.write_text("")
    host = tmp.name.split(".")[-3].rsplit("-", 1)[0]  # .probe.HOST-PID.HEX.tmp
    leftover = tmp_path / f".result.json.{host}-{pid}.0123456789ab.tmp"
    live = tmp_path / f".config.json.{host}-{os.getpid()}.0123456789ab.tmp"
    other = tmp_path / ".notes.tmp"
    for p in (leftover, live, other):
        p.write_text("partial")
    ckpt.write_atomic(tmp_path / "result.json", lambda f: f.write(b"{}"))
    assert not leftover.exists()  # a dead writer's
    assert live.exists() and other.exists()  # a live writer's, and not ours


def test_eval_names_the_older_checkpoints_when_the_latest_is_corrupt(finished, tmp_path):
    _copy(finished, tmp_path)
    run = tmp_path / "out" / "runs" / "vae"
    found = ckpt.list_checkpoints(run)
    assert len(found) >= 2
    found[-1].write_bytes(b"not a checkpoint")
    text = _one_line(invoke("eval", run, code=1))
    assert "is not a checkpoint" in text and found[-2].name in text and "--checkpoint" in text


def test_eval_uses_the_runs_data_and_says_when_data_overrides_it(finished, tmp_path):
    _copy(finished, tmp_path)
    run = tmp_path / "out" / "runs" / "vae"
    data = tmp_path / "tiny.h5"
    text = invoke("eval", run, "--mc-se", "0")
    assert "12 examples" in text and "(--data)" not in text
    other = synthetic_h5(tmp_path / "other.h5", n_test=5)
    text = invoke("eval", run, "--mc-se", "0", "--data", other)
    assert "5 examples" in text and f"evaluating on {other.resolve()} (--data)" in text
    _rewrite(data, n_test=7)  # the run's own file, rewritten since training
    text = _one_line(invoke("eval", run, "--mc-se", "0", code=1))
    assert "changed since it was trained" in text and f"--data {data.resolve()}" in text
    text = invoke("eval", run, "--mc-se", "0", "--data", data)
    assert "7 examples" in text


def test_train_resume_on_changed_data_writes_nothing(tmp_path):
    data = synthetic_h5(tmp_path / "d.h5")
    run = tmp_path / "run"
    invoke("train", "--model", "vae", "--data", data, "--out", run, "-q",
           "--set", "steps=2", "--set", "batch_size=16", "--set", "model.hidden=16")  # fmt: skip
    config = _fingerprint_of(run / "config.json")
    _rewrite(data, n_train=30)
    text = _one_line(invoke("train", "--out", run, "--resume", "--set", "steps=4", code=1))
    assert "--resume: the data" in text and "data fingerprint" in text
    assert _fingerprint_of(run / "config.json") == config
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002.pt"]


def test_sample_writes_the_format_its_suffix_names(finished, tmp_path):
    _copy(finished, tmp_path)
    run = tmp_path / "out" / "runs" / "vae"
    invoke("sample", run, "-n", "4", "--out", tmp_path / "grid.jpg")
    assert (tmp_path / "grid.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG
    invoke("sample", run, "-n", "4", "--out", tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    text = _one_line(invoke("sample", run, "-n", "4", "--out", tmp_path / "grid.xyz", code=1))
    assert "'.xyz' is not an image format" in text and not (tmp_path / "grid.xyz").exists()


# -- found by a sweep of bad inputs ----------------------------------------------------------
def test_genkit_run_locks_the_run_folder_it_trains(tmp_path, monkeypatch):
    """`genkit train --resume --out OUT/runs/NAME` cannot write into a run that `genkit run`
    is training."""
    from genkit.training.trainer import Trainer

    recipe = tiny_recipe(tmp_path)
    step, seen = Trainer.train_step, []

    def probe(self, x):
        step(self, x)
        if self.step == 2:
            text = invoke("train", "--out", self.run_dir, "--resume", code=1)
            seen.append(text)

    monkeypatch.setattr(Trainer, "train_step", probe)
    invoke("run", recipe, "--only", "vae", "--quiet")
    assert seen and "being written by another process" in _one_line(seen[0])


def test_a_run_continued_by_genkit_train_is_named_so(finished, tmp_path):
    recipe = _copy(finished, tmp_path)
    run = tmp_path / "out" / "runs" / "vae"
    invoke("train", "--out", run, "--resume", "--set", "steps=6", "-q")
    text = _one_line(invoke("run", recipe, "--only", "vae", code=1))
    assert "made by `genkit train`, not `genkit run`" in text and "train.steps: 6 -> 4" in text
    assert "budget" not in text and "(none)" not in text


def test_resuming_with_other_model_parameters_is_one_line(finished, tmp_path):
    _copy(finished, tmp_path)
    run = tmp_path / "out" / "runs" / "vae"
    text = _one_line(
        invoke("train", "--out", run, "--resume", "--set", "model.latent_dim=5", code=1)
    )
    assert "model.latent_dim=5 differs from the run's 3" in text


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999"])
def test_a_seed_out_of_range_is_one_line(tmp_path, seed):
    data = synthetic_h5(tmp_path / "d.h5")
    text = _one_line(
        invoke(
            "train",
            "--model",
            "vae",
            "--data",
            data,
            "--out",
            tmp_path / "r",
            "--set",
            f"seed={seed}",
            code=1,
        )
    )
    assert "seed" in text and not (tmp_path / "r").exists()
    np.save(tmp_path / "x.npy", np.zeros((10, 8, 8), dtype=np.uint8))
    text = invoke("data", "convert", tmp_path / "x.npy", tmp_path / "x.h5", "--seed", seed, code=2)
    assert "Invalid value for '--seed'" in text and "Traceback" not in text


def test_a_batch_larger_than_the_train_split_stops_before_training(tmp_path):
    recipe = tiny_recipe(tmp_path)
    text = _one_line(invoke("run", recipe, "--set", "train.batch_size=1000", code=1))
    assert "batch_size 1000 is more than the 48 training examples" in text
    assert "at most 48" in text and not (tmp_path / "out").exists()
    text = _one_line(
        invoke(
            "run",
            recipe,
            "--set",
            "train.batch_size=40",
            "--set",
            "train.validation_fraction=0.5",
            code=1,
        )
    )
    assert "the 24 training examples (24 of 48 held out for validation)" in text


def test_a_file_that_is_no_checkpoint_is_named_so(finished, tmp_path):
    _copy(finished, tmp_path)
    run = tmp_path / "out" / "runs" / "vae"
    text = _one_line(invoke("eval", run, "--checkpoint", tmp_path / "tiny.toml", code=1))
    assert "is not a checkpoint" in text and "weights_only set to False" not in text


def test_images_out_of_the_8_bit_range_name_the_range(tmp_path):
    np.save(tmp_path / "neg.npy", np.arange(-5, 635).reshape(10, 8, 8))
    text = _one_line(invoke("data", "convert", tmp_path / "neg.npy", tmp_path / "n.h5", code=1))
    assert "with values -5..634" in text


def test_running_out_of_memory_is_one_line(finished, tmp_path, monkeypatch):
    import torch

    _copy(finished, tmp_path)

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] can't allocate memory: you tried")

    monkeypatch.setattr(torch, "randn", no_memory)
    monkeypatch.setattr(torch.Tensor, "normal_", no_memory)
    text = _one_line(
        invoke(
            "sample",
            tmp_path / "out" / "runs" / "vae",
            "-n",
            "4",
            "--out",
            tmp_path / "s.png",
            code=1,
        )
    )
    assert text.startswith("Error: out of memory") and "-n" in text


def test_a_run_rebuilds_the_model_it_recorded_whatever_the_defaults_are_now(tmp_path):
    """A run records its model's resolved config, and eval/resume build from it; a run recorded
    before runs held one (only the params it was given) is rebuilt over the defaults of then
    (``VDMConfig.LEGACY_DEFAULTS``): the U-Net defaults changed in issue #21, and such a
    folder must still load, evaluate and resume."""
    from genkit_vdm.base import VDMConfig

    from genkit.registry import create_run_model

    data = synthetic_h5(tmp_path / "d.h5")
    run = tmp_path / "run"
    old = {f"model.{k}": v for k, v in VDMConfig.LEGACY_DEFAULTS.items()}
    sets = [f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in old.items()]
    args = ["--set", "model.timesteps=0", "--set", "eval_every=0", "--set", "num_samples=0"]
    for s in sets:
        args += ["--set", s]
    invoke("train", "--model", "vdm", "--data", data, "--out", run, "--set", "steps=2", *args, "-q")
    config = json.loads((run / "config.json").read_text())
    recorded = config["model"]["config"]
    assert recorded["channels"] == 32 and recorded["attention_resolution"] == 8
    # the folder as genkit wrote it before: only the params given, and those were none of
    # the U-Net's (it was trained with the defaults of then)
    config["model"] = {"name": "vdm", "params": {"timesteps": 0}}
    (run / "config.json").write_text(json.dumps(config))
    model = create_run_model(config["model"], (1, 8, 8))
    assert (model.config.channels, model.config.channel_mults) == (32, (1, 2))
    assert "bits/dim" in invoke("eval", run, "--mc-se", "0")
    invoke("train", "--out", run, "--resume", "--set", "steps=3", "-q")
    assert json.loads((run / "config.json").read_text())["model"]["config"]["channels"] == 32
    # and a run of today's defaults records them, so it is rebuilt as trained
    new = tmp_path / "new"
    invoke(
        "train", "--model", "vdm", "--data", data, "--out", new, "--set", "steps=2", *args[:6], "-q"
    )
    recorded = json.loads((new / "config.json").read_text())["model"]
    assert recorded["config"]["channels"] == VDMConfig().channels
    assert create_run_model(recorded, (1, 8, 8)).config == VDMConfig(timesteps=0)
