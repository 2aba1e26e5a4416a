"""Registers the ``hvae`` model, and logs what researchers of hierarchical VAEs watch while
training one: the KL of each level and the active latent units of each level."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Subset

import genkit
from genkit.markov import active_units
from genkit_hvae.model import HVAE, HVAEConfig

#: Test examples used to count active units after each evaluation.
ACTIVE_UNITS_EXAMPLES = 1000
ACTIVE_UNITS_BATCH = 250
#: Seed of the private random stream the active-unit count draws from (plus the step), so
#: the count neither disturbs nor depends on the training randomness.
ACTIVE_UNITS_SEED = 20160601


@genkit.hookimpl
def register_models(register) -> None:
    register(
        "hvae",
        HVAE,
        config=HVAEConfig,
        description="Markovian hierarchical VAE: learned Gaussian q(z_t|z_{t-1}), p(z_{t-1}|z_t)",
    )


def _unwrap(model: Any) -> Any:
    """The model inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    for attr in ("module", "_orig_mod"):
        while isinstance(getattr(model, attr, None), torch.nn.Module):
            model = getattr(model, attr)
    return model


def level_kl(metrics: Mapping[str, float], num_latents: int) -> dict[int, float] | None:
    """The KL of each level t = 1..T from the ELBO's terms, or ``None`` if they are missing.

    ``KL(q(z_{1:T}|x) || p(z_{1:T})) = reconstruction - ELBO = sum_t KL_t`` with
    ``KL_t = E_q[log q(z_t|z_{t-1}) - log p(z_t|z_{t+1})] = -consistency/level_t`` for t < T
    and ``KL_T = E_q[log q(z_T|z_{T-1}) - log p(z_T)] = -prior_matching``. With T = 1 it is the
    VAE's KL(q(z_1|x) || p(z_1)); for t < T a level's share may be negative.
    """
    names = [f"consistency/level_{t}" for t in range(1, num_latents)] + ["prior_matching"]
    if not all(name in metrics for name in names):
        return None
    return {t: -float(metrics[name]) for t, name in enumerate(names, start=1)}


def _log_level_kl(trainer: Any, split: str, step: int, metrics: Mapping[str, float]) -> None:
    """``{split}/kl/level_t`` and their sum ``{split}/kl`` for an hvae."""
    model = _unwrap(trainer.model)
    if not isinstance(model, HVAE):
        return
    kl = level_kl(metrics, model.num_latents)
    if kl is None:  # another estimator (e.g. iwae) or per-level extras turned off
        return
    for level, value in kl.items():
        trainer.log_scalar(f"{split}/kl/level_{level}", value, step)
    trainer.log_scalar(f"{split}/kl", sum(kl.values()), step)


def _first_batches(dataset: Any, limit: int, batch_size: int) -> Iterator[Tensor]:
    """The first ``limit`` examples of ``dataset`` in order, in batches ``(B, *data_shape)``
    (read as the trainer's evaluation reads them: ``__getitems__``, ``(x, label)`` items)."""
    from genkit.data import batch_tensor, make_eval_loader

    subset = Subset(dataset, range(min(len(dataset), limit)))
    for batch in make_eval_loader(subset, batch_size):
        yield batch_tensor(batch)


@genkit.hookimpl
def on_step_end(trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
    """Log ``train/kl/level_t`` and ``train/kl`` for an hvae (see :func:`level_kl`)."""
    _log_level_kl(trainer, "train", step, metrics)


@genkit.hookimpl
def on_eval_end(trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
    """Log ``eval/kl/level_t`` and ``eval/kl``, and ``eval/active_units/level_t`` with their
    sum ``eval/active_units``, for an hvae.

    Active units are counted on the evaluated weights (the EMA's, ``trainer.ema_model``, where
    the trainer has one), on the first :data:`ACTIVE_UNITS_EXAMPLES` test examples, drawing
    from a private random stream.
    """
    _log_level_kl(trainer, "eval", step, metrics)
    evaluated = getattr(trainer, "ema_model", None)
    model = _unwrap(evaluated if evaluated is not None else trainer.model)
    dataset = getattr(trainer, "test_dataset", None)
    if not isinstance(model, HVAE) or dataset is None or len(dataset) == 0:
        return
    batches = _first_batches(dataset, ACTIVE_UNITS_EXAMPLES, ACTIVE_UNITS_BATCH)
    device = model.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(ACTIVE_UNITS_SEED + step)
        counts = active_units(model, batches)
    for level, count in counts.items():
        trainer.log_scalar(f"eval/active_units/level_{level}", count, step)
    trainer.log_scalar("eval/active_units", sum(counts.values()), step)
