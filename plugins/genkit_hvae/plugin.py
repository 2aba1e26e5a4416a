"""Registers the ``hvae`` model, and logs its active latent units after each evaluation."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

import genkit
from genkit.markov import active_units
from genkit_hvae.model import HVAE, HVAEConfig

#: Test examples used to count active units after each evaluation.
ACTIVE_UNITS_EXAMPLES = 1000
ACTIVE_UNITS_BATCH = 250


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


def _first_batches(dataset: Any, limit: int, batch_size: int) -> Iterator[Tensor]:
    """The first ``limit`` examples of ``dataset`` in batches ``(B, *data_shape)``, in order."""
    n = min(len(dataset), limit)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        if hasattr(dataset, "__getitems__"):
            yield torch.as_tensor(dataset.__getitems__(idx))
        else:
            yield torch.stack([torch.as_tensor(dataset[i]) for i in idx])


@genkit.hookimpl
def on_eval_end(trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
    """Log ``eval/active_units/level_t`` (and their sum ``eval/active_units``) for an hvae."""
    model = _unwrap(trainer.model)
    dataset = getattr(trainer, "test_dataset", None)
    if not isinstance(model, HVAE) or dataset is None or len(dataset) == 0:
        return
    batches = _first_batches(dataset, ACTIVE_UNITS_EXAMPLES, ACTIVE_UNITS_BATCH)
    counts = active_units(model, batches)
    for level, count in counts.items():
        trainer.log_scalar(f"eval/active_units/level_{level}", count, step)
    trainer.log_scalar("eval/active_units", sum(counts.values()), step)
