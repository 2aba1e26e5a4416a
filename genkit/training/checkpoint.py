"""Atomic checkpoints that resume a run exactly.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values, so that
it loads with ``torch.load(..., weights_only=True)``: the model, its EMA, the optimizer and
scheduler, the step, the position in the data order (epoch, batch within the epoch), every
random-number generator's state (Python, NumPy, torch CPU and CUDA) and the run's config.
Files are written to a temporary name, flushed to disk and renamed with ``os.replace``, so a
run killed at any moment leaves either the old set of checkpoints or the new one.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from genkit.errors import CheckpointError, OutputError
from genkit.files import replaced_atomically

#: Version of the checkpoint layout, stored in every file.
FORMAT = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest step first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def write_atomic(path: Path, write: Callable[[BinaryIO], None], *, what: str = "file") -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk and rename it
    to ``path`` (``os.replace``): ``path`` is then either its old self or complete, never
    half-written. A folder or file that cannot be written is a
    :class:`~genkit.errors.OutputError` naming ``path`` (the temporary file is removed)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    return path


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    """``torch.save(state)`` to ``path`` through :func:`write_atomic`."""
    return write_atomic(path, lambda f: torch.save(state, f), what="checkpoint")


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; returns what was deleted."""
    found = list_checkpoints(run_dir)
    doomed = found[: max(0, len(found) - keep)]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; anything unreadable is a
    :class:`CheckpointError` naming the file (which is left untouched)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        what = "is empty" if not head else "is not a checkpoint (not a torch.save zip archive)"
        raise CheckpointError(f"checkpoint {path} {what}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain values; genkit "
                "loads only those (weights_only=True), and this file was not written by genkit"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({exc})") from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {reason})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a genkit checkpoint of format {FORMAT} (got {got!r})"
        )
    return state


def load_module_state(
    module: torch.nn.Module, state: dict[str, Any], path: Path, what: str
) -> None:
    """``module.load_state_dict(state, strict=True)``, with a mismatch (other model, other
    shapes) reported as a :class:`CheckpointError` naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3] or lines[:1])
        raise CheckpointError(
            f"checkpoint {path} does not match this {what}: {detail[:300]}"
        ) from None


# -- random-number generators ---------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every global generator's state as tensors and plain values (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(i) for i in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    # .cpu(): a checkpoint loaded with map_location="cuda" holds these on the GPU
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
