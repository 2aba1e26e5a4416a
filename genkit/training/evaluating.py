"""The trainer's evaluation: periodic and final likelihood evaluations, samples, best weights.

:class:`EvaluationMixin` gives :class:`~genkit.training.trainer.Trainer` ``evaluate``,
``evaluate_detailed``, ``evaluate_and_log`` and ``sample``. Evaluation uses the EMA weights,
in fp32, through :func:`genkit.evaluation.evaluate` (every term with ``se`` and ``mc_se``),
under the process-wide torch.distributions default, with a random stream of its own so that it
neither disturbs nor depends on the training randomness. Periodic evaluations (``eval_every``
or ``eval_points``) use the validation split when one is held out, else the test split; with
``keep_best`` they keep the best EMA weights by validation bits/dim, which the final test
evaluation then uses. Every evaluation is appended to ``eval_history``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from genkit.errors import DataError
from genkit.evaluation import EvalResult, evaluate
from genkit.training.logging import image_grid

if TYPE_CHECKING:
    from torch import nn

    from genkit.training.config import TrainConfig
    from genkit.training.logging import RunLogger


class EvaluationMixin:
    """Evaluating and sampling a :class:`~genkit.training.trainer.Trainer`'s model.

    It reads the trainer's attributes below, appends to ``eval_history``, sets ``best`` and
    uses its ``is_main`` and ``_call_hook``.
    """

    config: TrainConfig
    device: torch.device
    model: nn.Module
    ema_model: nn.Module
    test_dataset: Dataset | None
    validation_dataset: Dataset | None
    logger: RunLogger | None
    step: int
    total_steps: int | None
    train_seconds: float
    eval_history: list[dict[str, Any]]
    best: dict[str, Any] | None
    _channels_last: bool

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Mean test ELBO terms (EMA weights), with ``elbo`` and ``bits_per_dim``."""
        return self.evaluate_detailed(max_batches=max_batches).means

    @torch.no_grad()
    def evaluate_detailed(
        self,
        max_batches: int | None = None,
        *,
        dataset: Dataset | None = None,
        estimator: str | None = None,
        estimator_params: Mapping[str, Any] | None = None,
        use_ema: bool = True,
        mc_se: float | None = None,
        max_nfe: float | None = None,
    ) -> EvalResult:
        """Every ELBO term on ``dataset`` (default: the test split) with ``se`` and ``mc_se``
        (:func:`genkit.evaluation.evaluate`): two draws per example, or draws until the
        ``mc_se`` target or the ``max_nfe`` budget.

        Uses ``config.eval_estimator``/``eval_estimator_params`` unless given, in fp32, with
        a random stream of its own (seeded by ``seed`` and the step) so evaluation neither
        disturbs nor depends on the training randomness.
        """
        dataset = dataset if dataset is not None else self.test_dataset
        if dataset is None:
            raise DataError("evaluation needs a test dataset; none was given to the Trainer")
        estimator = estimator if estimator is not None else self.config.eval_estimator
        params = (
            estimator_params if estimator_params is not None else self.config.eval_estimator_params
        )
        with self._private_rng(self.config.seed + 1_000_003 * (self.step + 1)):
            return evaluate(
                self.ema_model if use_ema else self.model,
                dataset,
                estimator=estimator,
                params=params,
                mc_se=mc_se,
                max_nfe=max_nfe,
                batch_size=self.config.eval_batch_size,
                max_batches=max_batches,
                channels_last=self._channels_last,
            )

    def evaluate_and_log(self) -> dict[str, float]:
        """The periodic evaluation: the terms on the validation split to ``val/*`` (else on
        the test split to ``eval/*``), the best weights kept with ``keep_best``, a sample
        grid for image data, then ``on_eval_end``. Under DDP every rank evaluates its share
        of the examples (:func:`genkit.evaluation.evaluate`) and so knows the result and the
        best weights; rank 0 logs, samples and calls the hook."""
        validation = self.validation_dataset is not None
        result = self.evaluate_detailed(
            max_batches=self.config.eval_batches, dataset=self._periodic_dataset()
        )
        self._record_eval(result, "validation" if validation else "test")
        if self.config.keep_best:
            self._consider_best(result)
        if not self.is_main:
            return result.means
        self.logger.scalars("val" if validation else "eval", result.means, self.step)
        if len(self.model.data_shape) == 3 and self.config.num_samples > 0:
            self.logger.image(
                "samples", image_grid(self.sample(self.config.num_samples)), self.step
            )
        self._call_hook("on_eval_end", trainer=self, step=self.step, metrics=dict(result.means))
        return result.means

    @torch.no_grad()
    def sample(self, n: int, *, seed: int | None = None, use_ema: bool = True) -> Tensor:
        """``n`` draws from the (EMA) model, ``(n, *data_shape)``, from a private random
        stream (``seed``, default the config's seed and the step)."""
        model = self.ema_model if use_ema else self.model
        seed = self.config.seed + 7919 * (self.step + 1) if seed is None else seed
        with self._private_rng(seed):
            generator = torch.Generator(self.device).manual_seed(seed)
            return model.sample(n, generator=generator, **self.config.sample_params)

    # -- internals -------------------------------------------------------------------------
    def _last_validation(self) -> None:
        """With ``keep_best``, a periodic evaluation of the last step (every rank) unless
        there was one at this step: the last weights compete for the best too."""
        if self.config.keep_best and (self.best is None or not self._evaluated_now()):
            self.evaluate_and_log()

    def _final_evaluation(self) -> EvalResult | None:
        """Load the best weights into the EMA model (with ``keep_best``), then evaluate the
        test split with them (every rank its share), logged to ``eval/*`` with
        ``on_eval_end``; ``None`` without a test split."""
        if self.best is not None:  # evaluate and sample the best weights from here on
            self.ema_model.load_state_dict(self.best["ema"])
        if self.test_dataset is None:
            return None
        cfg = self.config
        result = self.evaluate_detailed(mc_se=cfg.eval_mc_se, max_nfe=cfg.eval_max_nfe)
        self._record_eval(result, "test")
        if self.is_main:
            self.logger.scalars("eval", result.means, self.step)
            self._call_hook("on_eval_end", trainer=self, step=self.step, metrics=result.means)
        return result

    def _periodic_dataset(self) -> Dataset | None:
        """What periodic evaluations use: the validation split if held out, else the test split."""
        return self.validation_dataset if self.validation_dataset is not None else self.test_dataset

    def _consider_best(self, result: EvalResult) -> None:
        """Keep the EMA weights if ``result`` (on the validation split) is the best so far."""
        bits = result.bits()["mean"]
        if self.best is None or bits < self.best["bits_per_dim"]:
            state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.ema_model.state_dict().items()
            }
            self.best = {"step": self.step, "bits_per_dim": bits, "ema": state}

    def _record_eval(self, result: EvalResult, split: str) -> None:
        """Append an evaluation to ``eval_history``, the learning curve kept in checkpoints."""
        bits = result.bits()
        self.eval_history.append(
            {
                "split": split,
                "step": self.step,
                "train_seconds": self.train_seconds,
                "bits_per_dim": bits["mean"],
                "se": bits["se"],
                "mc_se": bits["mc_se"],
                "examples": result.count,
            }
        )

    def _evaluated_now(self) -> bool:
        """Whether the last periodic evaluation was made at this step."""
        periodic = [e for e in self.eval_history if e.get("split") != "test"]
        return bool(periodic) and periodic[-1]["step"] == self.step

    def _eval_due(self, step: int) -> bool:
        """Whether a periodic evaluation falls on ``step`` (``eval_points`` or ``eval_every``)."""
        points = self.config.eval_points
        if points is None:
            return bool(self.config.eval_every) and step % self.config.eval_every == 0
        if self.total_steps is None or step >= self.total_steps:
            return False
        return any(round(k * self.total_steps / points) == step for k in range(1, points))

    @contextlib.contextmanager
    def _private_rng(self, seed: int) -> Iterator[None]:
        """Run the block on a fork of the torch random state seeded with ``seed`` (CPU and
        this process's GPU), leaving the training stream as it was."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
