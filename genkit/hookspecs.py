"""The hooks a genkit plugin can implement. The docstrings here are the whole contract.

A plugin is a module (or object) with functions decorated by ``genkit.hookimpl`` whose names
are those below, made known through the entry-point group ``genkit`` in its packaging::

    [project.entry-points.genkit]
    my_plugin = "my_package.plugin"

Registration hooks receive a ``register`` callable and call it once per thing they add. The
core checks each registration (a bad or duplicate name is an error naming both plugins), and a
plugin that fails to import or raises in a hook is reported with its name while the others keep
working.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from genkit.evaluation import EvalResult

hookspec = pluggy.HookspecMarker("genkit")
hookimpl = pluggy.HookimplMarker("genkit")


class Register(Protocol):
    """The ``register`` callable a registration hook receives."""

    def __call__(
        self, name: str, factory: Any, *, config: type | None = None, description: str = ""
    ) -> None: ...


@hookspec
def register_models(register: Register) -> None:
    """Register latent-variable models.

    :param register: call ``register(name, factory, config=None, description="")`` once per
        model. ``factory(data_shape, cfg)`` builds a
        :class:`~genkit.model.LatentVariableModel` when ``config`` (an attrs class) is given:
        ``create_model``'s keyword parameters are structured into ``config`` first, so unknown
        keys and bad values are clear errors. Without ``config``, it is called as
        ``factory(data_shape, **params)``.
    """


@hookspec
def register_estimators(register: Register) -> None:
    """Register ELBO estimators (implementations of :class:`genkit.elbo.ELBO`).

    :param register: call ``register(name, factory, config=None, description="")`` once per
        estimator; ``factory(**params)`` (or ``factory(cfg)`` with a ``config`` class) returns
        the estimator, which is then called as ``estimator(model, x) -> ELBOTerms``.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register built-in datasets, usable as ``builtin:NAME`` wherever a data file is expected.

    :param register: call ``register(name, factory, description="")`` once per dataset.
        ``factory()`` takes no arguments and returns a :class:`genkit.data.DatasetArrays`
        (``splits``: ``{"train": SplitArrays(images=(N, C, H, W) uint8 or data=(N, D) float,
        labels=(N,) int or None), "test": ...}``, ``attrs``: file attributes such as
        ``description`` and ``split_rule``) or the plain mapping ``{split: {"images" or
        "data": array, "labels": array}}``. The factory fixes (and documents) the split.
        genkit converts the arrays once into its HDF5 layout in the cache folder
        (``--cache-dir``, ``$GENKIT_CACHE/datasets`` or ``~/.cache/genkit/datasets``), see
        :mod:`genkit.data.builtin`.
    """


@hookspec
def register_schedules(register: Register) -> None:
    """Register noise schedules for diffusion models (``create_model("vdm", schedule=NAME)``).

    :param register: call ``register(name, factory, config=None, description="")`` once per
        schedule; ``factory(**params)`` returns the schedule object the VDM plugin documents.
    """


@hookspec
def register_feature_extractors(register: Register) -> None:
    """Register feature extractors for the sample-quality metrics (``genkit eval --metrics``,
    ``--features NAME``; :mod:`genkit.metrics`).

    :param register: call ``register(name, factory, config=None, description="")`` once per
        extractor. ``factory(context, **params)`` receives a
        :class:`genkit.features.FeatureContext` (the data spec and its train/test splits, the
        cache folder, the device, an ``echo`` for progress lines) and returns a
        :class:`genkit.features.FeatureExtractor`: a callable ``extractor(x) -> (B, F)`` on
        images ``x: (B, C, H, W)`` in [-1, 1], with an ``info`` mapping (its name and what a
        reader needs beside each figure, such as a classifier's ``test_accuracy``). It raises
        a :class:`genkit.errors.GenkitError` with one clear line when it cannot work (missing
        weights, no labels).
    """


@hookspec
def on_train_start(trainer: Any) -> None:
    """Called once when a training run starts (after a resume has been restored), on the
    process that logs (rank 0).

    Trainer hooks are called one plugin at a time: one that raises is reported once as a
    ``RuntimeWarning`` naming the plugin and the hook, and training goes on.

    :param trainer: the :class:`genkit.training.Trainer`; ``trainer.model``,
        ``trainer.config``, ``trainer.run_dir``, ``trainer.step`` and
        ``trainer.log_scalar(tag, value, step)`` are available.
    """


@hookspec
def on_step_end(trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
    """Called every ``config.log_every`` optimisation steps (and at the last step), on the
    process that logs (rank 0), when the step metrics are synchronised to the CPU.

    :param trainer: the running trainer.
    :param step: the number of optimisation steps done so far (1 after the first).
    :param metrics: means over the steps since the last call: every ELBO term and extra by
        name, ``elbo`` (the unweighted sum of the terms), ``bits_per_dim``, ``objective``
        (the weighted loss minimised), ``grad_norm`` (before clipping) and ``lr``. Under DDP
        (``torchrun``) every value is also averaged over the processes, so the terms are
        those of the global batch, not rank 0's share. ``lr`` is the learning rate the last
        of those steps used (not the one the scheduler has since moved on to).
    """


@hookspec
def on_eval_end(trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
    """Called after each periodic evaluation on the test split (rank 0).

    :param trainer: the running trainer.
    :param step: the optimisation step the evaluation was made at.
    :param metrics: mean test ELBO terms and extras (EMA weights), ``elbo`` and
        ``bits_per_dim``.
    """


@hookspec
def on_checkpoint(trainer: Any, step: int, path: Path) -> None:
    """Called after a checkpoint has been written (atomically) to ``path`` (rank 0).

    :param trainer: the running trainer.
    :param step: the step the checkpoint holds.
    :param path: the checkpoint file.
    """


@hookspec
def on_train_end(trainer: Any, step: int, result: EvalResult | None) -> None:
    """Called once when ``Trainer.fit()`` ends, on the process that logs (rank 0), before the
    trainer closes its TensorBoard writer: the place for a logger plugin to flush and close.

    It is called however the run ends: after the final checkpoint and test evaluation; after
    the checkpoint of a run stopped by SIGINT/SIGTERM (``trainer.interrupted`` names the
    signal); and, before the error propagates, when the run stops on an error such as a
    non-finite loss (:class:`genkit.errors.NonFiniteError`). Not called if ``fit()`` failed
    before ``on_train_start``, nor on a second SIGINT (``KeyboardInterrupt``, which stops at
    once).

    :param trainer: the trainer; ``trainer.log_scalar`` still writes.
    :param step: the number of optimisation steps done (``trainer.step``). A non-finite value
        is caught before its update on the CPU, so ``step`` is then that of the last good
        step; on a GPU it is found at the next sync, and ``step`` counts up to that sync.
    :param result: the final test :class:`genkit.evaluation.EvalResult` (EMA weights); ``None``
        when there is no test split, the run was stopped by a signal, or it ended on an error.
    """
