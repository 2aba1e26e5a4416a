"""``genkit train/eval --cache-dir``: where ``builtin:NAME`` is converted, as for
``genkit data info --cache-dir`` and ``$GENKIT_CACHE``."""

import json

import h5py
from trainhelp import invoke

TINY = [
    "--set",
    "steps=2",
    "--set",
    "batch_size=16",
    "--set",
    "eval_every=0",
    "--set",
    "model.hidden=16",
    "--set",
    "model.latent_dim=2",
    "-q",
]


def test_train_and_eval_convert_the_builtin_dataset_into_cache_dir(tmp_path, monkeypatch):
    env_cache = tmp_path / "env"
    monkeypatch.setenv("GENKIT_CACHE", str(env_cache))  # what --cache-dir must override
    cache = tmp_path / "given" / "cache"
    run = tmp_path / "run"
    invoke(
        "train",
        "--model",
        "vae",
        "--data",
        "builtin:digits",
        "--out",
        run,
        *TINY,
        "--cache-dir",
        cache,
    )
    converted = cache / "digits.h5"
    assert converted.is_file()
    with h5py.File(converted, "r") as f:
        assert set(f) == {"train", "test"} and f["train/images"].shape[1:] == (1, 8, 8)
    assert not env_cache.exists()
    info = json.loads((run / "config.json").read_text())
    assert info["data"] == "builtin:digits"  # the cache is this machine's, not the run's

    stamp = converted.stat().st_mtime_ns
    out = invoke("eval", run, "--cache-dir", cache, "--batch-size", "512")
    assert "test split" in out and "elbo" in out
    assert converted.stat().st_mtime_ns == stamp  # reused, not converted again
    assert not env_cache.exists()

    invoke("eval", run, "--batch-size", "512")  # without it: $GENKIT_CACHE/datasets
    assert (env_cache / "datasets" / "digits.h5").is_file()


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = invoke(
        "train",
        "--model",
        "vae",
        "--data",
        "builtin:digits",
        "--out",
        tmp_path / "run",
        *TINY,
        "--cache-dir",
        blocker,
        code=2,
    )
    assert "--cache-dir" in out and "is a file" in out
    assert not (tmp_path / "run").exists()
    out = invoke(
        "train",
        "--model",
        "vae",
        "--data",
        "builtin:digits",
        "--out",
        tmp_path / "run",
        *TINY,
        "--cache-dir",
        blocker / "sub",
        code=1,
    )
    assert out.startswith(f"Error: cannot create the dataset cache folder '{blocker / 'sub'}'")
    assert len(out.strip().splitlines()) == 1
