"""Tests that start real processes: SIGKILL + resume, SIGTERM, two-process DDP, the CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from trainchild import Metrics
from trainhelp import TinyModel, ddp_config, flat_params, invoke, tiny_images

from genkit.registry import make_plugin_manager
from genkit.training import Trainer
from genkit.training import checkpoint as ckpt

HERE = Path(__file__).parent
CHILD = HERE / "trainchild.py"


def child_env(**extra):
    """This environment, one thread, no inherited torchrun variables, then ``extra``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return {**env, **extra}


def run_child(*args, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, str(CHILD), *map(str, args)],
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_sigkill_then_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    def start(*args):
        return subprocess.Popen(
            [sys.executable, str(CHILD), *map(str, args)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    full = start("--run-dir", tmp_path / "full", "--steps", 30)
    killed = start("--run-dir", tmp_path / "cut", "--steps", 30, "--kill-at", 14)
    for proc, code in ((full, 0), (killed, -signal.SIGKILL)):
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == code, err[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut")] == ["step-00000010.pt"]
    assert not (tmp_path / "cut" / "final.pt").exists()
    run_child("--run-dir", tmp_path / "cut", "--steps", 30, "--resume")
    full = torch.load(tmp_path / "full" / "final.pt")
    resumed = torch.load(tmp_path / "cut" / "final.pt")
    assert torch.equal(full["params"], resumed["params"])
    assert torch.equal(full["ema"], resumed["ema"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_on_the_combined_batch(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(CHILD), "--run-dir", str(tmp_path), "--ddp-step"],
            env=child_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    assert ddp["world_size"] == 2  # the processes really formed one group

    rec = Metrics()
    torch.manual_seed(0)
    model = TinyModel()
    start = flat_params(model).clone()
    x = tiny_images(32, seed=3)
    cfg = ddp_config()  # what each rank of the child processes ran
    trainer = Trainer(model, cfg, x, catalog=make_plugin_manager(plugins=[rec]), progress=False)
    trainer.start()  # opens the (here file-less) logger
    trainer.train_step(x)
    trainer.train_step(torch.cat([x[:16].flip(0), x[16:].flip(0)]))
    trainer._flush_metrics()
    single = flat_params(trainer.model)
    assert not torch.allclose(single, start)  # the steps moved the parameters
    torch.testing.assert_close(ddp["params"], single, rtol=1e-5, atol=1e-6)
    # rank 0 logs the terms of the global batch (averaged over the ranks), not its own half
    assert set(ddp["metrics"]) == set(rec.logged)
    for name, value in rec.logged.items():
        assert ddp["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def write_tiny_h5(path: Path) -> Path:
    from genkit.data import DatasetArrays, SplitArrays, write_h5

    rng = np.random.default_rng(0)
    k = ((tiny_images(160) + 1) * 127.5).round().to(torch.uint8).numpy()
    labels = rng.integers(0, 10, 160)
    arrays = DatasetArrays(
        splits={
            "train": SplitArrays(images=k[:128], labels=labels[:128]),
            "test": SplitArrays(images=k[128:], labels=labels[128:]),
        },
        attrs={"source": "genkit tests"},
    )
    return write_h5(arrays, path)


def genkit_cli(*args, check=True, timeout=180):
    """Run ``python -m genkit ARGS`` in a child process."""
    proc = subprocess.run(
        [sys.executable, "-m", "genkit", *map(str, args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"genkit {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


FEW = [
    "--set",
    "steps=6",
    "--set",
    "batch_size=16",
    "--set",
    "eval_every=3",
    "--set",
    "log_every=3",
    "--set",
    "num_samples=4",
]


def test_cli_train_eval_sample_end_to_end(tmp_path):
    from PIL import Image

    data = write_tiny_h5(tmp_path / "tiny.h5")
    run = tmp_path / "run"
    out = invoke(
        "train",
        "--model",
        "vae",
        "--data",
        data,
        "--out",
        run,
        *FEW,
        "--set",
        "model.latent_dim=3",
        "--set",
        "model.hidden=16",
        "--set",
        "objective_weights={prior_matching=0.5}",
    )
    assert "reconstruction" in out and "bits/dim" in out and "step 6" in out
    info = json.loads((run / "config.json").read_text())
    assert {k: info["model"][k] for k in ("name", "params")} == {
        "name": "vae",
        "params": {"latent_dim": 3, "hidden": 16},
    }
    # and every parameter resolved, so a later change of a default keeps this run's model
    assert info["model"]["config"]["latent_dim"] == 3 and info["model"]["config"]["depth"] == 2
    assert info["data"] == str(data.resolve()) and info["data_shape"] == [1, 8, 8]
    assert info["train"]["objective_weights"] == {"prior_matching": 0.5}
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000006.pt"]

    ev = invoke("eval", run, "--json", tmp_path / "eval.json")
    assert "32 examples" in ev and "±" in ev and "mc_se" in ev.splitlines()[1]
    *table, budget = ev.splitlines()[2:]
    lines = {ln.split()[0]: ln.split() for ln in table}
    assert set(lines) == {"reconstruction", "prior_matching", "elbo"}
    total = float(lines["reconstruction"][1]) + float(lines["prior_matching"][1])
    assert float(lines["elbo"][1]) == pytest.approx(total, abs=2e-4)
    # name, nats, ±, se, bits/dim, ±, se, mc_se: bits/dim = -nats / (D ln 2), and so its error
    _, nats, _, se, bits, pm, bits_se, mc = lines["elbo"]
    d_ln2 = 64 * np.log(2.0)
    assert pm == "±" and float(se) > 0 and 0 < float(mc) < float(bits_se) * 4
    assert float(bits) == pytest.approx(-float(nats) / d_ln2, abs=1e-4)
    assert float(bits_se) == pytest.approx(float(se) / d_ln2, abs=1e-4)
    assert budget.startswith("bits/dim") and "network evaluations per example" in budget
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["bits_per_dim"]["mean"] == pytest.approx(float(bits), abs=1e-4)
    assert saved["bits_per_dim"]["mc_se"] == pytest.approx(float(mc), abs=1e-4)
    assert {"terms", "nfe_per_example", "seconds", "estimator", "params", "checkpoint"} <= set(
        saved
    )
    assert saved["checkpoint"].endswith("step-00000006.pt") and saved["estimator"] == "elbo"
    iw = invoke("eval", run, "--estimator", "iwae", "--param", "k=8")
    assert "importance_weighted" in iw and "estimator iwae" in iw

    invoke("sample", run, "-n", "6", "--out", tmp_path / "grid.png")
    image = Image.open(tmp_path / "grid.png")
    # 3 x 2 tiles of 8x8 digits upscaled 4x to 32 px, 2 px of padding between and around them
    assert image.size == (3 * 34 + 2, 2 * 34 + 2) and image.mode == "L"

    bad = invoke(
        "train",
        "--model",
        "vae",
        "--data",
        data,
        "--out",
        tmp_path / "r2",
        "--set",
        "stpes=3",
        code=1,
    )
    assert "Error: --set: unknown key 'stpes'; did you mean 'steps'" in bad
    missing = invoke("eval", tmp_path / "nowhere", code=1)
    assert "is not a genkit run dir" in missing

    blocker = tmp_path / "blocker"  # a file where a folder is needed
    blocker.write_text("")
    out = invoke("sample", run, "-n", "4", "--out", blocker / "grid.png", code=1)
    assert out.startswith(f"Error: cannot write image {blocker / 'grid.png'}")
    assert len(out.strip().splitlines()) == 1
    out = invoke("train", "--model", "vae", "--data", data, "--out", blocker / "run", code=1)
    assert out.startswith(f"Error: cannot create output folder {blocker / 'run'}: Not a directory")


def test_cli_sample_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    """A write that fails midway (disk full) leaves no file at --out and no temporary one."""
    data = write_tiny_h5(tmp_path / "tiny.h5")
    run = tmp_path / "run"
    invoke("train", "--model", "vae", "--data", data, "--out", run, "-q", *FEW[:4])
    invoke("sample", run, "-n", "3", "--out", tmp_path / "s" / "ok.npy")
    assert np.load(tmp_path / "s" / "ok.npy").shape == (3, 1, 8, 8)

    def disk_full(file, arr, *args, **kwargs):
        file.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    out = invoke("sample", run, "-n", "3", "--out", tmp_path / "s" / "bad.npy", code=1)
    assert "No space left on device" in out
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["ok.npy"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = write_tiny_h5(tmp_path / "tiny.h5")
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "genkit",
            "train",
            "--model",
            "vae",
            "--data",
            str(data),
            "--out",
            str(run),
            "--set",
            "steps=100000",
            "--set",
            "batch_size=16",
            "--set",
            "checkpoint_every=5",
            "--set",
            "model.hidden=16",
            "--quiet",
        ],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ckpt.list_checkpoints(run) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.list_checkpoints(run), (
        proc.stderr.read() if proc.poll() is not None else "no checkpoint"
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "SIGTERM at step" in out
    stopped = int(out.split("SIGTERM at step ")[1].split(":")[0])
    latest = ckpt.latest_checkpoint(run)
    assert latest.name == f"step-{stopped:08d}.pt"
    assert ckpt.load(latest)["step"] == stopped
    resumed = genkit_cli("train", "--out", run, "--resume", "--set", f"steps={stopped + 2}")
    assert f"step {stopped + 2}" in resumed.stdout
