"""The trainer's checkpoint handling: what a checkpoint of a run holds and how it resumes.

:class:`CheckpointMixin` gives :class:`~genkit.training.trainer.Trainer` ``state_dict``,
``save_checkpoint``, ``resume`` and ``load_state_dict``; the file format, atomic writes and
pruning are :mod:`genkit.training.checkpoint`'s. A checkpoint holds, besides the weights, the
EMA, the optimizer and scheduler, the position in the data order and every rank's random
state: the step-time calibration of a ``minutes`` budget (so a resumed run keeps its
``total_steps``), the evaluation history and, with ``keep_best``, the best EMA weights, so
that a resumed run continues exactly. Under DDP ``save_checkpoint`` is collective (it gathers
every rank's random state) and rank 0 writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genkit.errors import CheckpointError
from genkit.training import checkpoint as ckpt
from genkit.training.config import config_dict

if TYPE_CHECKING:
    from torch import nn

    from genkit.training.config import TrainConfig
    from genkit.training.distributed import DistInfo
    from genkit.training.logging import RunLogger


class CheckpointMixin:
    """Saving and restoring a :class:`~genkit.training.trainer.Trainer`'s whole state.

    It reads and sets the trainer's attributes below and uses its ``is_main``,
    ``_raise_if_nonfinite``, ``_seed_everything`` and ``_call_hook``.
    """

    config: TrainConfig
    dist: DistInfo
    model: nn.Module
    ema_model: nn.Module
    optimizer: Any
    scheduler: Any
    run_dir: Path | None
    run_info: dict[str, Any]
    logger: RunLogger | None
    step: int
    epoch: int
    batch_in_epoch: int
    total_steps: int | None
    train_seconds: float
    eval_history: list[dict[str, Any]]
    best: dict[str, Any] | None
    _first_step_seconds: float | None
    _recalibrate_at: int | None
    _calibration: tuple[int, float]
    _last_checkpoint: Path | None
    _checkpointed_step: int
    _iter: Any

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors and plain values only)."""
        return {
            "format": ckpt.FORMAT,
            "step": self.step,
            "total_steps": self.total_steps,
            "train_seconds": self.train_seconds,
            "first_step_seconds": self._first_step_seconds,
            "calibration": {
                "again_at": self._recalibrate_at,
                "step": self._calibration[0],
                "seconds": self._calibration[1],
            },
            "eval_history": list(self.eval_history),
            "best": self.best,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "model": self.model.state_dict(),
            "ema": self.ema_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self._gather_rng(),
            "config": config_dict(self.config),
            "run_info": json.loads(json.dumps(self.run_info, default=str)),
            "data_shape": list(self.model.data_shape),
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-NNNNNNNN.pt`` atomically, keep the newest
        ``keep_checkpoints``, call ``on_checkpoint``. Collective under DDP; rank 0 writes."""
        self._raise_if_nonfinite()
        state = self.state_dict()  # gathers every rank's RNG state
        self._checkpointed_step = self.step
        if not self.is_main or self.run_dir is None:
            return None
        path = ckpt.save_atomic(state, ckpt.checkpoint_path(self.run_dir, self.step))
        ckpt.prune(self.run_dir, self.config.keep_checkpoints)
        self._last_checkpoint = path
        if self.logger is not None:
            self.logger.flush()
        self._call_hook("on_checkpoint", trainer=self, step=self.step, path=path)
        return path

    def resume(self, path: str | Path | None = None) -> Path:
        """Restore ``path`` (default: the run dir's latest checkpoint)."""
        older: list[Path] = []
        if path is None:
            if self.run_dir is None:
                raise CheckpointError("resume needs a run dir or a checkpoint path")
            *older, path = ckpt.list_checkpoints(self.run_dir) or [None]
            if path is None:
                raise CheckpointError(
                    f"--resume: no checkpoint in {ckpt.checkpoint_dir(self.run_dir)}"
                )
        try:
            # on the CPU: load_state_dict copies into the model's and optimizer's devices, and
            # the RNG states must be CPU tensors
            state = ckpt.load(path, map_location="cpu")
        except CheckpointError as exc:
            if not older:
                raise
            raise CheckpointError(
                f"{exc}; to resume from an older checkpoint ({', '.join(p.name for p in older)}) "
                "move this file out of the way"
            ) from None
        self.load_state_dict(state, path=Path(path))
        self._last_checkpoint = Path(path)
        self._checkpointed_step = self.step
        return Path(path)

    def load_state_dict(self, state: Mapping[str, Any], *, path: Path) -> None:
        """Restore what :meth:`state_dict` returned; a mismatch is a :class:`CheckpointError`
        naming ``path``."""
        saved_model = (state.get("run_info") or {}).get("model", {}).get("name")
        mine = self.run_info.get("model", {}).get("name")
        if saved_model and mine and saved_model != mine:
            raise CheckpointError(
                f"checkpoint {path} holds model '{saved_model}', but this run trains '{mine}'"
            )
        if list(state.get("data_shape", [])) != list(self.model.data_shape):
            raise CheckpointError(
                f"checkpoint {path} is for data of shape {tuple(state.get('data_shape', []))}, "
                f"this model's is {tuple(self.model.data_shape)}"
            )
        ckpt.load_module_state(self.model, state["model"], path, "model")
        ckpt.load_module_state(self.ema_model, state["ema"], path, "model's EMA")
        # the optimisation settings of this run's config (lr, lr_multipliers' values, betas,
        # weight_decay), which a resumed run keeps over the checkpoint's
        settings = [
            {k: group[k] for k in ("initial_lr", "betas", "weight_decay")}
            for group in self.optimizer.param_groups
        ]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            step, epoch, batch = (
                int(state["step"]),
                int(state["epoch"]),
                int(state["batch_in_epoch"]),
            )
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this run: {exc}") from None
        self.step, self.epoch, self.batch_in_epoch = step, epoch, batch
        self.train_seconds = float(state.get("train_seconds", 0.0))
        first = state.get("first_step_seconds")
        self._first_step_seconds = None if first is None else float(first)
        calibration = state.get("calibration") or {}
        again = calibration.get("again_at")
        self._recalibrate_at = None if again is None else int(again)
        self._calibration = (int(calibration.get("step", 0)), float(calibration.get("seconds", 0)))
        self.eval_history = [dict(e) for e in state.get("eval_history", [])]
        self.best = state.get("best")
        if self.config.minutes is not None and state.get("total_steps") is not None:
            self.total_steps = int(state["total_steps"])  # the calibrated budget, kept
            if self.logger is not None:
                self.logger.set_total(self.total_steps)
        self._apply_settings(settings)  # after total_steps: the schedule's factor needs it
        self._iter = None
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            ckpt.set_rng_state(rng[self.dist.rank])
        else:  # another world size: a fresh, still deterministic stream per rank
            self._seed_everything(self.config.seed + self.dist.rank + 7 * step)

    def _apply_settings(self, settings: list[dict[str, Any]]) -> None:
        """Put the config's rates, betas and weight decay back into the restored optimizer
        (``settings``: one dict per parameter group, taken before the restore, which has
        already refused another number of groups) and its schedule: ``lr = base *
        factor(step)`` as the schedule computes it, so an unchanged config restores the very
        same floats (and the run stays exact)."""
        groups = self.optimizer.param_groups
        step = self.scheduler.last_epoch
        for i, (group, mine) in enumerate(zip(groups, settings, strict=True)):
            group.update(mine)
            self.scheduler.base_lrs[i] = mine["initial_lr"]
            group["lr"] = mine["initial_lr"] * self.scheduler.lr_lambdas[i](step)

    def _gather_rng(self) -> list[dict[str, Any]]:
        """Every rank's random state, by rank (a collective under DDP)."""
        mine = ckpt.rng_state()
        if self.dist.world_size == 1:
            return [mine]
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(everyone, mine)
        return everyone
