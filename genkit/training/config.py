"""The trainer's configuration (:class:`TrainConfig`) and ``--set key=value`` overrides.

Values of ``--set`` are TOML literals (``lr=1e-3``, ``betas=[0.9, 0.99]``,
``objective_weights={prior_matching=0.5}``); a bare word that is not valid TOML is read as a
string (``precision=bf16``). ``model.NAME=VALUE`` sets a parameter of the model, and
``objective_weights.NAME=VALUE`` (or any other table field) sets one entry of that table.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from attrs import validators as v

from genkit.config import did_you_mean, field_names, structure, unstructure
from genkit.errors import ConfigError


def positive_or_none(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    """An attrs validator: ``value`` is ``None`` or a number > 0 (not a bool)."""
    if value is not None and (isinstance(value, bool) or not value > 0):
        raise ValueError(f"'{attribute.name}' must be > 0 or None, got {value!r}")


def _choice(*options: str):
    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in options:
            raise ValueError(
                f"'{attribute.name}' must be one of {', '.join(options)}, got {value!r}"
            )

    return check


def _betas(_inst: Any, _attribute: attrs.Attribute, value: tuple[float, float]) -> None:
    if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
        raise ValueError(f"'betas' must be two numbers in [0, 1), got {list(value)!r}")


def _weights(_inst: Any, _attribute: attrs.Attribute, value: Mapping[str, float]) -> None:
    bad = {k: w for k, w in value.items() if not math.isfinite(w)}
    if bad:
        raise ValueError(f"'objective_weights' must be finite numbers, got {bad!r}")


def _multipliers(_inst: Any, _attribute: attrs.Attribute, value: Mapping[str, float]) -> None:
    bad = {k: m for k, m in value.items() if not (math.isfinite(m) and m >= 0)}
    if bad:
        raise ValueError(f"'lr_multipliers' must be finite numbers >= 0, got {bad!r}")


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Everything the :class:`~genkit.training.Trainer` needs besides a model and data.

    Step counts are optimisation steps. ``0`` for ``eval_every``, ``checkpoint_every`` or
    ``log_every`` turns that periodic action off (training still ends with a checkpoint and a
    test evaluation).
    """

    #: Optimisation steps in total (ignored when ``epochs`` or ``minutes`` is set).
    steps: int = attrs.field(default=2000, validator=v.ge(1))
    #: Train for this many passes over the training split instead of ``steps``.
    epochs: int | None = attrs.field(default=None, validator=positive_or_none)
    #: Train for this many minutes of optimisation steps (evaluation and checkpoints not
    #: counted) instead of ``steps``: the step count is fixed after ``CALIBRATION_STEPS``
    #: (20) steps from their measured time, and kept on resume.
    minutes: float | None = attrs.field(default=None, validator=positive_or_none)
    #: Global batch size (split evenly over the processes under ``torchrun``). 16: on a CPU
    #: more, smaller steps turn minutes into bits faster (VAE, MHVAE and VDM; docs/vdm.md).
    batch_size: int = attrs.field(default=16, validator=v.ge(1))
    # -- AdamW ---------------------------------------------------------------------------
    lr: float = attrs.field(default=2e-3, validator=v.gt(0.0))
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), validator=_betas)
    weight_decay: float = attrs.field(default=0.0, validator=v.ge(0.0))
    #: Learning-rate multipliers by parameter name: a parameter whose name (in
    #: ``model.named_parameters()``) is ``KEY`` or starts with ``KEY.`` trains at
    #: ``lr * multiplier`` (the longest matching key wins; ``0`` freezes it), e.g.
    #: ``{"encoder.schedule" = 0.1}`` for a VDM's learned noise schedule.
    lr_multipliers: dict[str, float] = attrs.field(factory=dict, validator=_multipliers)
    # -- learning-rate schedule: linear warm-up over ``lr_warmup_steps``, then ``schedule``
    schedule: str = attrs.field(default="cosine", validator=_choice("cosine", "constant"))
    lr_warmup_steps: int = attrs.field(default=100, validator=v.ge(0))
    #: The cosine decays towards ``min_lr_ratio * lr``, reached at ``step == total_steps``
    #: (just after the last step).
    min_lr_ratio: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.le(1.0)])
    #: Clip the global gradient norm to this value (``0`` or ``None``: no clipping, the
    #: default; the norm is logged either way). The objective is the ELBO in nats per example,
    #: summed over its dimensions, so norms run into the thousands: a threshold of 1 rescales
    #: every step (docs/vdm.md measures what that costs).
    grad_clip: float | None = attrs.field(default=0.0, validator=v.optional(v.ge(0.0)))
    # -- exponential moving average of the weights (used for evaluation and sampling)
    ema_decay: float = attrs.field(default=0.995, validator=[v.ge(0.0), v.lt(1.0)])
    #: Up to and including this step the EMA simply copies the weights.
    ema_start: int = attrs.field(default=0, validator=v.ge(0))
    #: Correct the EMA's bias towards the weights it started from, as Adam corrects its
    #: moments: the EMA is ``sum_j d^(k-j) (1 - d) w_j / (1 - d^k)`` over the ``k`` updates after
    #: ``ema_start``, the same horizon ``1 / (1 - d)`` with no share of the random initial
    #: weights (without it ``0.998 ** 333 = 0.51`` of a 333-step run's EMA is its start).
    ema_debias: bool = True
    # -- hardware ------------------------------------------------------------------------
    precision: str = attrs.field(default="fp32", validator=_choice("fp32", "bf16"))
    device: str = attrs.field(default="auto", validator=_choice("auto", "cpu", "cuda"))
    compile: bool = False
    #: Image models and batches in ``torch.channels_last`` (NHWC) memory format, faster for
    #: convolutions on CPU and CUDA; no effect on vector data.
    channels_last: bool = True
    num_workers: int = attrs.field(default=0, validator=v.ge(0))
    #: ``torch.set_num_threads`` for this process (``None``: torch's default, one per core).
    num_threads: int | None = attrs.field(default=None, validator=positive_or_none)
    #: DDP's ``find_unused_parameters`` (for models whose ELBO skips some parameters).
    find_unused_parameters: bool = False
    # -- evaluation, checkpoints, logging ------------------------------------------------
    eval_every: int = attrs.field(default=500, validator=v.ge(0))
    #: Instead of ``eval_every``: this many periodic evaluations spread evenly over the run
    #: (at steps ``round(k total / eval_points)``, k = 1..eval_points - 1; the last one is the
    #: final evaluation), placed once ``total_steps`` is known (after the calibration of a
    #: ``minutes`` budget).
    eval_points: int | None = attrs.field(default=None, validator=positive_or_none)
    #: Batches of the test split per periodic evaluation (``None``: all of it).
    eval_batches: int | None = attrs.field(default=None, validator=positive_or_none)
    eval_batch_size: int = attrs.field(default=256, validator=v.ge(1))
    #: Estimator for evaluation (a registered name; ``None``: the model's default).
    eval_estimator: str | None = None
    eval_estimator_params: dict[str, Any] = attrs.field(factory=dict)
    #: The evaluation at the end of training draws until the Monte-Carlo standard error of
    #: the test bits/dim is at most ``eval_mc_se`` (``None``: two draws), within
    #: ``eval_max_nfe`` network evaluations per example (``None``: no limit). Periodic
    #: evaluations take two draws.
    eval_mc_se: float | None = attrs.field(default=0.01, validator=positive_or_none)
    eval_max_nfe: float | None = attrs.field(default=1000.0, validator=positive_or_none)
    #: Hold out this fraction of the train split (its last rows, a random subset in genkit's
    #: files) as a validation split, never trained on: periodic evaluations use it instead of
    #: the test split.
    validation_fraction: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.lt(1.0)])
    #: Early stopping: keep the EMA weights of the periodic evaluation with the lowest
    #: validation bits/dim (the last step's included) and evaluate and sample those at the
    #: end. Needs ``validation_fraction > 0``.
    keep_best: bool = False
    #: Number of samples drawn into the image grid at each evaluation (image data only).
    num_samples: int = attrs.field(default=64, validator=v.ge(0))
    #: Keyword arguments of ``model.sample`` for those grids (e.g. ``{steps = 50}`` for a VDM).
    sample_params: dict[str, Any] = attrs.field(factory=dict)
    checkpoint_every: int = attrs.field(default=500, validator=v.ge(0))
    keep_checkpoints: int = attrs.field(default=3, validator=v.ge(1))
    log_every: int = attrs.field(default=50, validator=v.ge(0))
    seed: int = attrs.field(default=0, validator=[v.ge(0), v.lt(2**32)])
    # -- the objective -------------------------------------------------------------------
    #: The estimator training calls (a registered name, e.g. a plugin's) and its parameters;
    #: ``None`` and ``{}``: the model's own ``elbo(x)``.
    estimator: str | None = None
    estimator_params: dict[str, Any] = attrs.field(factory=dict)
    #: ``ELBOTerms.objective`` weights: name -> weight (terms default 1, extras 0).
    objective_weights: dict[str, float] = attrs.field(factory=dict, validator=_weights)
    #: Terms whose weight ramps linearly from 0 to its value over ``warmup_steps``.
    warmup_terms: list[str] = attrs.field(factory=list)
    warmup_steps: int = attrs.field(default=0, validator=v.ge(0))

    def __attrs_post_init__(self) -> None:
        if self.keep_best and self.validation_fraction == 0:
            raise ValueError(
                "keep_best picks weights by validation bits/dim: set validation_fraction > 0 "
                "(e.g. 0.1), never the test split"
            )
        if self.keep_best and not self.eval_every and (self.eval_points or 0) < 2:
            raise ValueError(
                "keep_best needs periodic evaluations to choose from: set eval_every > 0 or "
                "eval_points >= 2"
            )
        if self.epochs is not None and self.minutes is not None:
            raise ValueError(
                "give one budget: 'epochs' or 'minutes' (or 'steps'), not both epochs and minutes"
            )

    def term_weights(self, step: int) -> dict[str, float]:
        """The objective weights at ``step`` (steps done so far): ``w_k * min(1, step /
        warmup_steps)`` for each of ``warmup_terms``, ``objective_weights`` otherwise."""
        weights = dict(self.objective_weights)
        if self.warmup_terms and self.warmup_steps > 0:
            ramp = min(1.0, step / self.warmup_steps)
            for name in self.warmup_terms:
                weights[name] = ramp * weights.get(name, 1.0)
        return weights

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of ``lr`` at ``step``: ``(step + 1) / lr_warmup_steps`` during warm-up,
        then constant 1 or the cosine ``r + (1 - r) (1 + cos(pi p)) / 2`` with ``p`` the
        fraction of the post-warm-up steps done and ``r = min_lr_ratio``."""
        if step < self.lr_warmup_steps:
            return (step + 1) / self.lr_warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, total_steps - self.lr_warmup_steps)
        progress = min(1.0, (step - self.lr_warmup_steps) / span)
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parse_value(text: str) -> Any:
    """A ``--set`` value as a TOML literal (``1e-3``, ``true``, ``[0.9, 0.99]``,
    ``{prior_matching=0.5}``, ``"text"``), or the text itself when it is not valid TOML."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_pairs(pairs: Iterable[str], *, option: str = "--set") -> list[tuple[str, Any]]:
    """``["a=1", "b.c=x"]`` -> ``[("a", 1), ("b.c", "x")]``; a pair without ``=`` is a
    :class:`ConfigError`."""
    out = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} expects KEY=VALUE, got {pair!r}")
        out.append((key.strip(), parse_value(text.strip())))
    return out


def apply_overrides(
    train: Mapping[str, Any],
    model: Mapping[str, Any],
    pairs: Iterable[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge ``--set`` pairs into plain train-config and model-parameter mappings.

    ``model.NAME=V`` goes to the model's parameters, ``TABLE.NAME=V`` sets one entry of a
    table field such as ``objective_weights``, ``NAME=V`` sets a field of
    :class:`TrainConfig`. An unknown name is a :class:`ConfigError` with "did you mean".
    """
    train, model = dict(train), dict(model)
    valid = field_names(TrainConfig)
    tables = (
        "objective_weights",
        "lr_multipliers",
        "estimator_params",
        "eval_estimator_params",
        "sample_params",
    )
    for key, value in parse_pairs(pairs):
        head, _, rest = key.partition(".")
        if head == "model" and rest:
            model[rest] = value
        elif rest and head in tables:
            train[head] = {**dict(train.get(head) or {}), rest: value}
        elif key in valid:
            train[key] = value
        else:
            raise ConfigError(
                f"--set: unknown key '{key}'{did_you_mean(key, [*valid, 'model.'])} "
                f"(valid keys: {', '.join(valid)}, or model.PARAM)"
            )
    return train, model


#: The TrainConfig fields a model may give a default of its own
#: (:attr:`genkit.LatentVariableModel.train_defaults`): how it is optimised, not where or on
#: what it runs.
MODEL_DEFAULT_FIELDS = (
    "lr",
    "betas",
    "weight_decay",
    "lr_warmup_steps",
    "schedule",
    "min_lr_ratio",
    "batch_size",
    "grad_clip",
    "ema_decay",
    "lr_multipliers",
)


def with_model_defaults(model: Any, given: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``given`` (the train settings the user set) over ``model.train_defaults``: the model's
    own defaults fill the keys the user left out. A default outside
    :data:`MODEL_DEFAULT_FIELDS` is a :class:`~genkit.errors.PluginError` naming the model."""
    from genkit.errors import PluginError

    defaults = dict(getattr(model, "train_defaults", None) or {})
    bad = sorted(set(defaults) - set(MODEL_DEFAULT_FIELDS))
    if bad:
        raise PluginError(
            f"model '{name}' declares train_defaults for '{bad[0]}'; a model may give only "
            f"{', '.join(MODEL_DEFAULT_FIELDS)}"
        )
    return {**defaults, **given}


def make_config(data: Mapping[str, Any], *, where: str = "train config") -> TrainConfig:
    """:func:`genkit.config.structure` into :class:`TrainConfig` (clear errors)."""
    return structure(TrainConfig, data, where=where)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The plain-data form of ``config`` (JSON- and checkpoint-safe)."""
    out = unstructure(config)
    out["betas"] = list(out["betas"])
    return out
