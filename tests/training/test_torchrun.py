"""``genkit run`` and ``genkit eval`` across processes (issue 22): torchrun with gloo on the
CPU, a test split that does not divide by the number of processes, every example counted
once, rank 0 alone writing, and one rank's error stopping every rank."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_processes import child_env
from test_recipes import synthetic_h5, tiny_recipe
from trainhelp import invoke


def _env() -> dict[str, str]:
    return child_env(GENKIT_DIST_TIMEOUT="90", PYTHONPATH=os.pathsep.join(sys.path))


def _torchrun(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "genkit", *map(str, args),
    ]  # fmt: skip
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_train_and_evaluate_every_example_once(tmp_path):
    recipe = tiny_recipe(tmp_path)
    synthetic_h5(tmp_path / "odd.h5", n_train=48, n_test=13)  # 13 = 6 + 7 examples
    out = tmp_path / "out"
    proc = _torchrun(
        "run", recipe, "--only", "vae", "--quiet", "--set", f'data="{tmp_path / "odd.h5"}"'
    )
    assert proc.stdout.count("runs in") == 1  # rank 0 alone reports
    row = json.loads((out / "runs" / "vae" / "result.json").read_text())
    assert row["examples"] == 13 and row["steps"] == 4
    assert [point["examples"] for point in row["curve"]] == [13, 13]  # periodic, then final
    report = json.loads((out / "results.json").read_text())
    assert report["recipe"]["processes"] == 2
    # rank 0 alone writes: one TensorBoard log, one config, no stray temporary files
    run = out / "runs" / "vae"
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    assert not [p for p in out.rglob("*.tmp")]

    sharded = tmp_path / "two.json"
    proc = _torchrun("eval", run, "--mc-se", "0", "--json", sharded)
    assert "13 examples, 2 processes" in proc.stdout
    assert proc.stdout.count("bits/dim") == 2  # one table (header and last line), rank 0's
    single = tmp_path / "one.json"
    invoke("eval", run, "--mc-se", "0", "--json", single)
    two, one = json.loads(sharded.read_text()), json.loads(single.read_text())
    assert two["examples"] == one["examples"] == 13
    assert two["processes"] == 2 and one["processes"] == 1
    a, b = two["bits_per_dim"], one["bits_per_dim"]
    # the same test set: the means differ by Monte-Carlo noise alone
    assert abs(a["mean"] - b["mean"]) <= 4 * math.hypot(a["mc_se"], b["mc_se"])
    assert math.isclose(a["se"], b["se"], rel_tol=0.2)  # the spread of the same 13 examples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_with_bad_input_stops_every_rank_with_its_line(tmp_path):
    """Rank 1 is given a broken recipe, rank 0 a good one: both stop at once (well within
    the collectives' timeout) with rank 1's one line, and nothing is trained or written."""
    good = tiny_recipe(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text() + "\n[budgett]\nsteps = 2\n")
    port = _free_port()
    procs = []
    began = time.monotonic()
    for rank, recipe in enumerate((good, bad)):
        env = {
            **_env(),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "genkit", "run", str(recipe), "--quiet"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=120) for p in procs]
    assert time.monotonic() - began < 90  # no rank waited out the timeout
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 1, err[-2000:]
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "unknown key 'budgett'; did you mean 'budget'" in err
    assert not (tmp_path / "out").exists()
