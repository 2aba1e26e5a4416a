"""One trainer for every genkit model: it needs only ``model.elbo(x)``.

Each step minimises the batch mean of ``ELBOTerms.objective(weights)``, the weighted negative
ELBO ``-(sum_k w_k terms_k + sum_j w_j extras_j)`` (weights from ``objective_weights``, with
``warmup_terms`` ramped linearly from 0 over ``warmup_steps``), with AdamW, a warm-up + cosine
(or constant) learning rate, optional gradient clipping (``grad_clip``, off by default) and an
EMA of the weights. What is logged and reported as the ELBO is always the unweighted ``total =
sum_k terms_k``. With a ``minutes`` budget the step count is fixed from the measured step time
(:data:`CALIBRATION_STEPS`).

The :class:`Trainer` is this loop; its evaluation and sampling (with the EMA weights) are
:class:`~genkit.training.evaluating.EvaluationMixin`'s, its checkpoints and exact resume
:class:`~genkit.training.state.CheckpointMixin`'s.

torch.distributions checks every distribution's arguments as it is built, which costs a
device-to-host sync per distribution and turns a NaN parameter into torch's ``ValueError``.
The first training step runs with those checks on (so data off a likelihood's support is a
clear :class:`~genkit.errors.InvalidParameterError`), later steps with them off
(:func:`distribution_validation`), so a NaN is the trainer's
:class:`~genkit.errors.NonFiniteError` naming the step and the term. Each step puts the
process-wide default back; evaluation runs under it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from torch.utils.data import DataLoader, Dataset

from genkit.data.sampler import batch_tensor, make_eval_loader
from genkit.elbo import LN2, ELBOTerms
from genkit.errors import ConfigError, DataError, NonFiniteError
from genkit.evaluation import EvalResult
from genkit.training import checkpoint as ckpt
from genkit.training import distributed
from genkit.training.config import TrainConfig, config_dict
from genkit.training.evaluating import EvaluationMixin
from genkit.training.logging import MetricAccumulator, RunLogger, with_totals
from genkit.training.state import CheckpointMixin

# batch_tensor, make_eval_loader and EvalResult are re-exported for plugins that read data
# as the trainer does (genkit_hvae)
__all__ = [
    "CALIBRATION_STEPS",
    "EvalResult",
    "Trainer",
    "batch_tensor",
    "bits_per_dim",
    "distribution_validation",
    "make_eval_loader",
    "make_train_loader",
]

#: With a ``minutes`` budget, the step after which the step time is measured and
#: ``total_steps`` fixed: every run takes at least this many steps.
CALIBRATION_STEPS = 20
#: Devices whose AdamW the Trainer runs fused (``torch.optim.AdamW(fused=True)``).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def distribution_validation(enabled: bool) -> Iterator[None]:
    """Inside the block, torch.distributions validates arguments by default iff ``enabled``
    (``Distribution.set_default_validate_args``); on leaving it, normally or by an exception,
    the previous default is restored."""
    before = Distribution._validate_args
    Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(before)


def make_train_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_batch: int,
    rank: int,
    world_size: int,
    num_workers: int,
) -> DataLoader:
    """The training order: :func:`genkit.data.make_loader` (a pure function of ``(seed,
    epoch)``, sharded over ranks, skipping ``start_batch`` batches)."""
    from genkit.data import make_loader

    return make_loader(
        dataset,
        batch_size,
        shuffle=True,
        seed=seed,
        drop_last=True,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        start_batch=start_batch,
    )


class Trainer(CheckpointMixin, EvaluationMixin):
    """Trains ``model`` on ``train_dataset`` by its ELBO (see the module docstring).

    :param model: any :class:`~genkit.model.LatentVariableModel`.
    :param config: a :class:`TrainConfig`.
    :param train_dataset: a dataset whose items (or ``__getitems__`` batches) are tensors.
    :param test_dataset: evaluated at the end, and periodically (``eval_every`` or
        ``eval_points``) unless ``validation_fraction`` holds out a validation split.
    :param run_dir: where ``config.json``, ``checkpoints/`` and ``tb/`` (TensorBoard) go;
        ``None`` writes nothing.
    :param catalog: the plugin catalogue whose trainer hooks are called (default: the
        process-wide one).
    :param run_info: ``{"model": {"name", "params"}, "data": spec}`` stored in
        ``config.json`` and checkpoints, so ``genkit eval``/``sample`` need only the run dir.
    :param progress: show a tqdm bar (only on a TTY, and only on rank 0).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_dataset: Dataset,
        test_dataset: Dataset | None = None,
        run_dir: str | Path | None = None,
        *,
        catalog: Any = None,
        run_info: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        #: with ``validation_fraction``, the held-out rows of the train split; periodic
        #: evaluations (and ``keep_best``) use it instead of the test split
        self.validation_dataset: Dataset | None = None
        if config.validation_fraction > 0:
            from genkit.data import hold_out

            train_dataset, self.validation_dataset = hold_out(
                train_dataset, config.validation_fraction
            )
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        #: with ``keep_best``: ``{"step", "bits_per_dim", "ema"}`` of the best validation
        #: evaluation so far (the EMA weights on the CPU); kept in checkpoints
        self.best: dict[str, Any] | None = None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_info = dict(run_info or {})
        self.show_progress = progress
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.dist = distributed.current()
        self.device = distributed.resolve_device(config.device, self.dist)
        if config.batch_size % self.dist.world_size:
            raise ConfigError(
                f"batch_size {config.batch_size} does not split evenly over "
                f"{self.dist.world_size} processes"
            )
        self.local_batch_size = config.batch_size // self.dist.world_size
        self._seed_everything(config.seed + self.dist.rank)
        if catalog is None:
            from genkit.registry import get_catalog

            catalog = get_catalog()
        self.catalog = catalog
        self._warned_hooks: set[tuple[str, str]] = set()

        # image models in channels_last (NHWC) where asked: 1.6-4x faster convolutions on CPU
        # (benchmarks/unet_speed.py), the tensor-core layout on CUDA
        self._channels_last = config.channels_last and len(tuple(model.data_shape)) == 3
        memory_format = torch.channels_last if self._channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.model.train()
        self.num_dims = int(model.num_dims)
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._ema_pairs = _matching_tensors(self.model, self.ema_model)
        self._buffer_pairs = list(zip(self.ema_model.buffers(), self.model.buffers(), strict=True))
        if config.compile:
            # compile the model's sub-networks in place: dynamo cannot trace the frozen attrs
            # ELBOTerms that elbo() builds, and in-place compilation keeps state_dict keys.
            # The first torch.compile of a process turns torch.distributions' argument
            # validation off for the whole process (dynamo's TorchPatcher): put it back.
            with distribution_validation(Distribution._validate_args):
                for child in self.model.children():
                    child.compile()
        estimator = None
        if config.estimator is not None or config.estimator_params:
            # built once: an estimator may keep state between calls (statistics, a pilot)
            estimator = self.model.estimator(config.estimator, **config.estimator_params)
        forward: nn.Module = distributed.ELBOModule(self.model, estimator)
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            forward = DDP(
                forward,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )
        self._forward = forward
        # fused: one kernel for all parameters instead of a loop over them, the same update
        # to the bit (tests/training); it pays on small nets, where the loop's per-tensor
        # overhead is a share of the step (benchmarks/vdm_step_time.py --adamw loop|fused)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, config.lr, config.lr_multipliers),
            lr=config.lr,
            betas=tuple(config.betas),
            weight_decay=config.weight_decay,
            fused=self.device.type in FUSED_ADAMW_DEVICES or None,
        )

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.batches_per_epoch = len(self._train_loader(0, 0))
        if self.batches_per_epoch < 1:
            raise DataError(
                f"the train split has {len(train_dataset)} examples, fewer than one batch of "
                f"{self.local_batch_size} per process; lower batch_size"
            )
        #: Optimisation steps in all. With ``minutes`` it is provisional (``None``) until
        #: :meth:`_calibrate` fixes it from the measured step time after ``CALIBRATION_STEPS``.
        self.total_steps: int | None = (
            None
            if config.minutes is not None
            else config.epochs * self.batches_per_epoch
            if config.epochs is not None
            else config.steps
        )
        #: Seconds spent in optimisation steps (not evaluation or checkpoints), resumed.
        self.train_seconds = 0.0
        #: Every test evaluation so far (periodic and final, rank 0): ``{"step",
        #: "train_seconds", "bits_per_dim", "se", "mc_se", "examples"}``; kept in checkpoints.
        self.eval_history: list[dict[str, float]] = []
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: config.lr_factor(s, self.total_steps or 10**9)
        )
        self._iter: Iterator[Any] | None = None
        self._first_step_seconds: float | None = None
        #: with ``minutes``: the step of the second calibration (``None``: none to come) and
        #: ``(step, train_seconds)`` at the first one
        self._recalibrate_at: int | None = None
        self._calibration: tuple[int, float] = (0, 0.0)
        self._acc: MetricAccumulator | None = None
        self._term_names: list[str] = []
        self._extra_names: list[str] = []
        self._eager_checks = self.device.type == "cpu"  # a CPU check costs no GPU sync
        self._args_validated = False  # whether a step has run with torch's argument checks
        self._train_started = False  # on_train_start was called: on_train_end is owed
        self._bad_step: Tensor | None = None
        self._bad_mask: Tensor | None = None
        self._stop_signal: int | None = None
        self._last_checkpoint: Path | None = None
        self._checkpointed_step = -1
        self._lr = self.scheduler.get_last_lr()[0]
        self.logger: RunLogger | None = None
        self.interrupted: str | None = None

    # -- public API ------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        """Write one TensorBoard scalar (rank 0 only); for plugins' extra metrics."""
        if self.logger is not None:
            self.logger.scalar(tag, float(value), step)

    def fit(self, *, resume: bool = False) -> EvalResult | None:
        """Train for ``config.steps`` (or ``epochs``), then checkpoint and evaluate the test
        split with the EMA weights. ``resume`` first restores the run dir's latest checkpoint.

        SIGINT/SIGTERM stop the run after the current step with a checkpoint
        (``self.interrupted`` names the signal) and return ``None``. However the run ends
        (finished, stopped by a signal, or raising, e.g. :class:`NonFiniteError`), plugins get
        ``on_train_end(trainer, step, result)`` before the loggers close.
        """
        self._train_started = False
        self.start(resume=resume)
        try:
            result = self._finish() if self._train_to_end() else None
        except Exception:
            self._end_hook(None)
            raise
        else:
            self._end_hook(result)
            return result
        finally:
            self.close()

    def start(self, *, resume: bool = False) -> None:
        """Open the loggers, restore the latest checkpoint when ``resume``, call
        ``on_train_start``."""
        if self.run_dir is not None and not resume:
            # every rank checks (the run dir is shared, as resuming needs), so under DDP all
            # processes stop here rather than rank 0 alone while the others wait in a step
            existing = ckpt.latest_checkpoint(self.run_dir)
            if existing is not None:
                raise ConfigError(
                    f"run dir {self.run_dir} already holds checkpoints ({existing.name}); "
                    "pass --resume (resume=True) to continue it, or choose another run dir"
                )
        if resume:
            self.resume()
        if self.is_main:
            if self.run_dir is not None:
                self._write_run_config()  # first: an unwritable run dir fails cleanly here
            self.logger = RunLogger(
                self.run_dir,
                enabled=True,
                total=self.total_steps,
                initial=self.step,
                progress=self.show_progress,
                purge_step=self.step + 1 if self.step else None,
            )
            self.logger.config(self._describe())
        self._train_started = True
        self._call_hook("on_train_start", trainer=self)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def train(self, until: int | None = None) -> None:
        """Take optimisation steps until ``self.step == until`` (default: ``total_steps``, which
        a ``minutes`` budget fixes on the way) or a stop signal."""
        cfg = self.config
        while self.step < (until if until is not None else self._total()):
            began = time.perf_counter()
            self.train_step(self._next_batch())
            elapsed = time.perf_counter() - began
            self.train_seconds += elapsed
            step = self.step
            if step == 1:  # one-off costs (first batch fetch, allocations): left out of the rate
                self._first_step_seconds = elapsed
            if (self.total_steps is None and step == CALIBRATION_STEPS) or (
                step == self._recalibrate_at
            ):
                self._calibrate()
            if cfg.log_every and step % cfg.log_every == 0:
                self._flush_metrics()
            if self._should_stop(step, until if until is not None else self._total()):
                self.interrupted = signal.Signals(self._stop_signal or signal.SIGTERM).name
                self._flush_metrics()
                self.save_checkpoint()
                if self.is_main:
                    print(
                        f"{self.interrupted} at step {step}: checkpoint saved to "
                        f"{self._last_checkpoint}; continue with --resume",
                        flush=True,
                    )
                return
            if self._eval_due(step) and self._periodic_dataset() is not None:
                self.evaluate_and_log()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        self._flush_metrics()

    def _total(self) -> int:
        """``total_steps``, or (before a ``minutes`` budget is calibrated) the step after the
        calibration."""
        return self.total_steps if self.total_steps is not None else CALIBRATION_STEPS

    def _calibrate(self) -> None:
        """Fix ``total_steps`` for a ``minutes`` budget: ``max(step, step + remaining /
        rate)``. At step ``CALIBRATION_STEPS`` the rate is the mean time of the steps so far
        but the first (which carries one-off costs); a second calibration, at a tenth of that
        estimate (at least twice ``CALIBRATION_STEPS`` steps), measures it again over the
        steps since, so that a few slow or fast steps at the start (another process busy for
        a moment) do not set the run's length. Under DDP the processes agree on the smallest
        total. Both are stored in checkpoints, so a resumed run keeps them (and stays exact)."""
        budget = self.config.minutes * 60.0
        if self._recalibrate_at is not None and self.step == self._recalibrate_at:
            since, seconds = self._calibration
            per_step = (self.train_seconds - seconds) / max(1, self.step - since)
            self._recalibrate_at = None
        else:
            per_step = self.train_seconds / max(1, self.step)
            if self._first_step_seconds is not None and self.step > 1:
                per_step = (self.train_seconds - self._first_step_seconds) / (self.step - 1)
        remaining = max(0.0, budget - self.train_seconds)
        total = self.step + int(remaining / max(per_step, 1e-9))
        if self.dist.world_size > 1:
            flag = torch.tensor(
                [-float(total)], device=self.device if self.device.type == "cuda" else "cpu"
            )
            total = int(-distributed.all_reduce_max(flag).item())
        first = self.total_steps is None
        self.total_steps = max(self.step, total)
        if first:
            again = max(2 * CALIBRATION_STEPS, self.total_steps // 10)
            self._recalibrate_at = again if again < self.total_steps else None
            self._calibration = (self.step, self.train_seconds)
        if self.logger is not None:
            self.logger.set_total(self.total_steps)

    def train_step(self, x: Tensor) -> None:
        """One optimisation step on the batch ``x: (B, *data_shape)`` (this process's share)."""
        x = x.to(self.device, non_blocking=True)
        if self._channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._argument_checks(), self._autocast():
            terms, extras = self._forward(x)
        self._args_validated = True
        out = ELBOTerms(
            terms={k: v.float() for k, v in terms.items()},
            extras={k: v.float() for k, v in extras.items()},
            num_dims=self.num_dims,
        )
        loss = out.objective(self.config.term_weights(self.step)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        values = torch.stack(
            [
                *(t.detach().mean() for t in out.terms.values()),
                *(t.detach().mean() for t in out.extras.values()),
                loss.detach(),
                grad_norm.detach(),
            ]
        )
        if self._acc is None:
            self._start_metrics(list(out.terms), list(out.extras))
        if self._eager_checks:
            if not bool(torch.isfinite(values[-2:]).all()):
                raise self._nonfinite_error(self.step + 1, ~torch.isfinite(values), values)
        else:
            self._record_nonfinite(values)
        if self.config.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self._params, self.config.grad_clip, grad_norm)
        self._lr = self.optimizer.param_groups[0]["lr"]  # this step's rate (a float, no sync)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._update_ema()
        self._acc.add(values)

    # -- internals -------------------------------------------------------------------------
    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _argument_checks(self) -> contextlib.AbstractContextManager:
        """torch.distributions' argument validation on for the first step, whatever the
        process-wide default (off-grid data is a clear error), off after it (no device sync
        per distribution; a NaN parameter reaches the non-finite check)."""
        return distribution_validation(not self._args_validated)

    def _train_to_end(self) -> bool:
        """Train to ``total_steps`` under the signal handlers; ``False`` if a signal stopped
        the run (after its checkpoint)."""
        with self._signals():
            self.train()
        return not self.interrupted

    def _finish(self) -> EvalResult | None:
        """The last checkpoint, then the test split with the EMA weights (the best ones with
        ``keep_best``) and ``on_eval_end``."""
        self._last_validation()  # with keep_best the last step competes too
        # with keep_best always: the checkpoint then holds the best weights the final
        # evaluation uses (a collective under DDP)
        if self.step != self._checkpointed_step or self.config.keep_best:
            self.save_checkpoint()
        return self._final_evaluation()

    def _end_hook(self, result: EvalResult | None) -> None:
        """``on_train_end`` once per run that called ``on_train_start``."""
        if self._train_started:
            self._train_started = False
            self._call_hook("on_train_end", trainer=self, step=self.step, result=result)

    def _train_loader(self, epoch: int, start_batch: int) -> DataLoader:
        return make_train_loader(
            self.train_dataset,
            self.local_batch_size,
            seed=self.config.seed,
            epoch=epoch,
            start_batch=start_batch,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=self.config.num_workers,
        )

    def _next_batch(self) -> Tensor:
        """The batch at (epoch, batch_in_epoch); the position then moves on by one."""
        if self._iter is None:
            # creating a DataLoader iterator draws a seed from the global generator: keep
            # that out of the training stream so resuming mid-epoch stays exact
            with torch.random.fork_rng(devices=[]):
                self._iter = iter(self._train_loader(self.epoch, self.batch_in_epoch))
        batch = next(self._iter)
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch, self._iter = self.epoch + 1, 0, None
        return batch_tensor(batch)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """``ema <- c * ema + (1 - c) * w`` (a copy up to ``ema_start``): ``c = d = ema_decay``,
        or with ``ema_debias``, at the ``k``-th update after ``ema_start``,
        ``c = d (1 - d^(k-1)) / (1 - d^k)``, which keeps ``ema`` equal to the bias-corrected
        average ``sum_j d^(k-j) (1 - d) w_j / (1 - d^k)`` of the weights since then."""
        k = self.step - self.config.ema_start
        d = self.config.ema_decay
        if k <= 0:
            weight = 1.0
        elif self.config.ema_debias:
            weight = (1.0 - d) / (1.0 - d**k)  # k >= 1, so d = 0 gives 1: a copy
        else:
            weight = 1.0 - d
        ema, live = self._ema_pairs
        if ema:
            torch._foreach_lerp_(ema, live, weight)
        for b_ema, b in self._buffer_pairs:
            b_ema.copy_(b)

    def _start_metrics(self, terms: list[str], extras: list[str]) -> None:
        self._term_names, self._extra_names = terms, extras
        names = [*terms, *extras, "objective", "grad_norm"]
        self._acc = MetricAccumulator(names, self.device)
        self._bad_step = torch.zeros((), dtype=torch.int64, device=self.device)
        self._bad_mask = torch.zeros(len(names), dtype=torch.bool, device=self.device)

    def _record_nonfinite(self, values: Tensor) -> None:
        """Remember (on the device, no sync) the first step whose loss or gradient was not
        finite and which values were not."""
        bad = ~torch.isfinite(values)
        first = bad[-2:].any() & (self._bad_step == 0)
        self._bad_step = torch.where(first, self.step + 1, self._bad_step)
        self._bad_mask = torch.where(first, bad, self._bad_mask)

    def _raise_if_nonfinite(self) -> None:
        if self._bad_step is not None and int(self._bad_step) > 0:
            raise self._nonfinite_error(int(self._bad_step), self._bad_mask, None)

    def _nonfinite_error(self, step: int, mask: Tensor, values: Tensor | None) -> NonFiniteError:
        names = [*self._term_names, *self._extra_names, "objective", "grad_norm"]
        bad = [n for n, b in zip(names, mask.tolist(), strict=True) if b]
        term = next((n for n in bad if n in self._term_names), None)
        extra = next((n for n in bad if n in self._extra_names), None)
        if term is not None:
            what = f"ELBO term '{term}'"
        elif extra is not None:
            what = f"extra '{extra}'"
        elif "objective" in bad:
            what = "objective"
        else:
            what = "gradient norm"
        shown = ""
        if values is not None:
            shown = (
                " ("
                + ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values.tolist(), strict=True))
                + ")"
            )
        keep = f"; last good checkpoint: {self._last_checkpoint}" if self._last_checkpoint else ""
        return NonFiniteError(f"non-finite {what} at step {step}{shown}{keep}")

    def _flush_metrics(self) -> None:
        """Sync the accumulated step metrics once, log them, call ``on_step_end``.

        Under DDP the sums are averaged over the ranks first (one all-reduce), so the logged
        terms are those of the global batch; ``lr`` is the rate the last step used."""
        if self._acc is None or self._acc.count == 0:
            return
        if not self._eager_checks:
            self._raise_if_nonfinite()
        steps = self._acc.count
        if self.dist.world_size > 1:  # every rank flushes at the same steps
            distributed.all_reduce_mean(self._acc.total)
        metrics = with_totals(self._acc.mean(), self._term_names, self.num_dims)
        metrics["lr"] = self._lr
        if not self.is_main:
            return
        self.logger.scalars("train", metrics, self.step)
        self.logger.progress(
            steps,
            {"loss": metrics["objective"], "bits/dim": metrics["bits_per_dim"]},
        )
        self._call_hook("on_step_end", trainer=self, step=self.step, metrics=metrics)

    def _should_stop(self, step: int, until: int) -> bool:
        """Whether a stop signal arrived; under DDP the ranks agree (an all-reduce every
        ``log_every`` steps, or 10 when that is 0), so they stop at the same step."""
        if self.dist.world_size == 1:
            return self._stop_signal is not None
        if step % (self.config.log_every or 10) and step != until:
            return False
        flag = torch.tensor(
            [float(self._stop_signal or 0)],
            device=self.device if self.device.type == "cuda" else "cpu",
        )
        distributed.all_reduce_max(flag)
        if flag.item() > 0 and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return flag.item() > 0

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to checkpoint and stop; a second SIGINT interrupts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _call_hook(self, name: str, **kwargs: Any) -> None:
        """Call each plugin's implementation of ``name`` on rank 0. One that raises is
        reported once per plugin as a ``RuntimeWarning`` naming it, and training goes on."""
        if not self.is_main:
            return
        caller = getattr(self.catalog.pm.hook, name)
        for impl in reversed(caller.get_hookimpls()):
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                continue
            try:
                impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception as exc:
                key = (impl.plugin_name, name)
                if key not in self._warned_hooks:
                    self._warned_hooks.add(key)
                    warnings.warn(
                        f"plugin '{impl.plugin_name}' raised in {name}: "
                        f"{type(exc).__name__}: {exc} (training continues)",
                        RuntimeWarning,
                        stacklevel=2,
                    )

    def _describe(self) -> dict[str, Any]:
        return {"train": config_dict(self.config), **self.run_info}

    def _write_run_config(self) -> None:
        info = {
            **json.loads(json.dumps(self.run_info, default=str)),
            "data_shape": list(self.model.data_shape),
            "train": config_dict(self.config),
        }
        text = json.dumps(info, indent=2, sort_keys=True) + "\n"
        ckpt.write_atomic(
            self.run_dir / "config.json", lambda f: f.write(text.encode()), what="run config"
        )


def _param_groups(
    model: nn.Module, lr: float, multipliers: Mapping[str, float]
) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the trainable parameters at ``lr``, and for each multiplier of
    ``lr_multipliers`` those whose name is its key or starts with ``key.`` (the longest key
    wins) at ``lr * multiplier``. A key that names no trainable parameter is a
    :class:`ConfigError`."""

    def key_of(name: str) -> str | None:
        keys = [k for k in multipliers if name == k or name.startswith(k + ".")]
        return max(keys, key=len) if keys else None

    # sorted: config.json keeps the keys sorted, and a resumed optimizer matches groups by
    # position
    groups: dict[str | None, list[nn.Parameter]] = {None: []}
    groups.update({k: [] for k in sorted(multipliers)})
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[key_of(name)].append(p)
    unused = [k for k in multipliers if not groups[k]]
    if unused:
        tops = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
        raise ConfigError(
            f"lr_multipliers: {', '.join(map(repr, unused))} names no trainable parameter of "
            f"the model; keys are parameter-name prefixes such as {', '.join(tops)} "
            "(see model.named_parameters())"
        )
    # the base group first (possibly empty), so that param_groups[0]["lr"] is the logged lr
    out = [{"params": groups.pop(None), "lr": lr}]
    return out + [{"params": ps, "lr": lr * multipliers[k]} for k, ps in groups.items()]


def _matching_tensors(model: nn.Module, ema: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The EMA's parameters and the model's, pair by pair (only trained parameters)."""
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[n], p.detach()) for n, p in model.named_parameters() if p.requires_grad]
    return [e for e, _ in pairs], [p for _, p in pairs]


def bits_per_dim(nats: float, num_dims: int) -> float:
    """``-nats / (D ln 2)``."""
    return -nats / (num_dims * LN2)
