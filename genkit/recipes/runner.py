"""``genkit run``: validate a whole recipe, train each run with the shared trainer, evaluate it
with :func:`genkit.evaluation.evaluate`, draw its samples, and write the report.

Layout of the output folder::

    OUT/runs/NAME/           the run dir of each run (config.json, checkpoints/, tb/, result.json)
    OUT/samples/NAME.png     each run's sample grid
    OUT/results.{md,csv,json}, OUT/bits_per_dim_vs_time.png     (genkit.recipes.report)

Each run folder records what made it (:mod:`genkit.provenance`: the run's resolved recipe
entry, the data's identity, the genkit version). When the recipe runs again, a run with
``result.json`` made by the same is skipped, one with checkpoints but no result resumes from
the latest (exactly: see the trainer); a run made by anything else is an error, or with
``--rerun-changed`` moved to ``OUT/replaced/`` and trained again (:func:`plan`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from genkit import collective, provenance
from genkit.elbo import LN2
from genkit.errors import ConfigError, GenkitError
from genkit.files import output_lock
from genkit.recipes.schema import Budget, EvalSettings, Recipe, RunSpec
from genkit.training.config import TrainConfig, config_dict, make_config, with_model_defaults

#: Train settings a recipe sets from its other tables: in ``[train]`` they are an error.
OWNED_ELSEWHERE = {
    **dict.fromkeys(("steps", "epochs", "minutes"), "[budget]"),
    **dict.fromkeys(
        (
            "eval_estimator",
            "eval_estimator_params",
            "eval_mc_se",
            "eval_max_nfe",
            "eval_batch_size",
            "eval_batches",
            "eval_points",
            "eval_every",
            "num_samples",
        ),
        "[eval]",
    ),
}


@attrs.frozen
class PreparedRun:
    """A run whose every setting has been checked: its train config and evaluation, and the
    record of what makes it (:mod:`genkit.provenance`)."""

    spec: RunSpec
    config: TrainConfig
    budget: Budget
    eval: EvalSettings
    decoder: str
    made_by: dict[str, Any]
    #: the model's own training defaults, under the recipe's settings in ``config``
    train_defaults: dict[str, Any] = attrs.field(factory=dict)


def _where(recipe: Recipe, spec: RunSpec | None = None) -> str:
    return recipe.source + (f" [runs.{spec.name}]" if spec is not None else "")


def _reraise(exc: GenkitError, where: str) -> GenkitError:
    """``exc`` with ``where`` in front of its message, same class."""
    message = str(exc)
    if message.startswith(where):
        return exc
    new = type(exc)(f"{where}: {message}")
    return new


def describe_decoder(model: torch.nn.Module) -> str:
    """The decoder likelihood a model ends in, for the report (``discretized_gaussian``, ...):
    the decoder's own ``description`` when it has one (a string), else its likelihood's name."""
    decoder = getattr(model, "decoder", None)
    if isinstance(getattr(decoder, "description", None), str):
        return decoder.description
    for attr in ("likelihood", "lik"):
        kind = getattr(decoder, attr, None)
        if isinstance(kind, str):
            components = getattr(getattr(model, "config", None), "mixture_components", None)
            if kind == "discretized_logistic_mixture" and components:
                return f"{kind} (K={components})"
            return kind
    return "?"


def resolve(
    recipe: Recipe, spec: RunSpec, model_defaults: Mapping[str, Any] | None = None
) -> tuple[Budget, EvalSettings, TrainConfig]:
    """The budget, evaluation settings and merged train config of the run ``spec``: the
    recipe's tables with the run's overrides, over ``model_defaults`` (the model's own
    :attr:`~genkit.LatentVariableModel.train_defaults`, :func:`model_train_defaults`). A bad
    one is a :class:`GenkitError`."""
    budget, settings = recipe.budget_for(spec), recipe.eval_for(spec)
    shared = {**recipe.train, **spec.train}
    owned = sorted(set(shared) & set(OWNED_ELSEWHERE))
    if owned:
        raise ConfigError(
            f"train key '{owned[0]}' is set by the recipe's {OWNED_ELSEWHERE[owned[0]]}; "
            "set it there"
        )
    fields = {
        **(model_defaults or {}),
        **shared,
        **budget.train_fields(),
        "objective_weights": {
            **shared.get("objective_weights", {}),
            **spec.objective_weights,
        },
        "eval_estimator": settings.estimator,
        "eval_estimator_params": dict(settings.params),
        "eval_mc_se": settings.mc_se,
        "eval_max_nfe": settings.max_nfe,
        "eval_batch_size": settings.batch_size,
        "eval_batches": settings.curve_batches,
        "eval_points": settings.points or None,
        "eval_every": 0,
        "num_samples": settings.samples,
        "sample_params": {**shared.get("sample_params", {}), **spec.sample_params},
    }
    where = "[train]" + (f" with [runs.{spec.name}] train" if spec.train else "")
    return budget, settings, make_config(fields, where=f"train settings ({where})")


def model_train_defaults(model: Any, spec: RunSpec) -> dict[str, Any]:
    """The training defaults the run's model declares (checked fields only)."""
    return with_model_defaults(model, {}, spec.model)


def record(
    recipe: Recipe,
    spec: RunSpec,
    data: dict[str, Any],
    model_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What makes the run ``spec`` of ``recipe`` on the data identified by ``data``: its
    resolved recipe entry (model, parameters, objective weights, train config over the
    model's ``model_defaults``, budget, evaluation, sampling) and the data's identity and
    genkit's version."""
    budget, settings, config = resolve(recipe, spec, model_defaults)
    entry = {
        "model": spec.model,
        "params": spec.params,
        "objective_weights": spec.objective_weights,
        "train": config_dict(config),
        "budget": attrs.asdict(budget),
        "eval": attrs.asdict(settings),
        "sample_params": spec.sample_params,
    }
    return provenance.made_by(entry, data, command="genkit run")


def prepare(
    recipe: Recipe, train_ds: Any, test_ds: Any, only: list[str] | None, data: dict[str, Any]
) -> list[PreparedRun]:
    """Check every run of ``recipe`` (those in ``only``, if given) before any training: the
    model and its parameters (built once and run on two training examples), the merged train
    config, the objective weights (against the terms the model returns), the evaluation
    estimator and the sampling parameters. The first problem is one
    :class:`~genkit.errors.GenkitError` line naming the recipe and the run. ``data`` is the
    identity of the recipe's data (:func:`genkit.data.identity.data_identity`)."""
    from genkit.data import batch_tensor
    from genkit.model import check_sample_params
    from genkit.registry import create_model

    specs = [recipe.run(name) for name in only] if only else list(recipe.runs)
    shape = tuple(train_ds.data_shape)
    x = torch.stack([batch_tensor(train_ds[i]) for i in range(min(2, len(train_ds)))])
    prepared = []
    for spec in specs:
        where = _where(recipe, spec)
        try:
            budget, settings, config = resolve(recipe, spec)
            torch.manual_seed(config.seed)
            model = create_model(spec.model, shape, **spec.params)
            defaults = model_train_defaults(model, spec)
            if defaults:  # the recipe's settings over the model's own
                budget, settings, config = resolve(recipe, spec, defaults)
            _check_batches(config, len(train_ds))
            check_sample_params(model, config.sample_params, spec.model)
            if settings.metrics:
                from genkit.features import check_feature_extractor

                check_feature_extractor(settings.features)
            model.eval()
            with torch.no_grad():
                training = None
                if config.estimator is not None or config.estimator_params:
                    training = model.estimator(config.estimator, **config.estimator_params)
                terms = model.elbo(x) if training is None else model.elbo(x, training)
                terms.objective(config.objective_weights)
                evaluation = model.estimator(
                    settings.estimator, evaluation=settings.estimator is None, **settings.params
                )
                model.elbo(x, evaluation)
            decoder = describe_decoder(model)
        except GenkitError as exc:
            raise _reraise(exc, where) from None
        made = record(recipe, spec, data, defaults)
        prepared.append(PreparedRun(spec, config, budget, settings, decoder, made, defaults))
    return prepared


def _check_batches(config: TrainConfig, n: int) -> None:
    """The train split, less the validation rows held out, holds at least one batch (the
    global ``batch_size``, which the processes share), as the trainer's loader needs."""
    import math

    from genkit.collective import rank_and_size

    held = math.ceil(config.validation_fraction * n) if config.validation_fraction else 0
    left, processes = n - held, rank_and_size()[1]
    if left < config.batch_size:  # the global batch: each process takes its share of it
        kept = f" ({held} of {n} held out for validation)" if held else ""
        raise ConfigError(
            f"batch_size {config.batch_size} is more than the {left} training examples"
            f"{kept}; use a batch_size of at most {left - left % processes}"
        )


#: What :func:`plan` decides for a run.
TRAIN, RESUME, SKIP, REPLACE = "train", "resume", "skip", "replace"


def run_dir_of(out: Path, name: str) -> Path:
    return Path(out) / "runs" / name


def recorded(run_dir: Path) -> dict[str, Any] | None:
    """The ``made_by`` record of ``run_dir`` (``None``: none), from its ``config.json``."""
    path = run_dir / "config.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path} is not a readable run config ({exc}); move {run_dir} aside to run it again"
        ) from None
    made = info.get(provenance.KEY) if isinstance(info, dict) else None
    return made if isinstance(made, dict) else None


def _holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything of a run (hidden files, such as a lock or a killed
    write's temporary file, are nothing)."""
    if not run_dir.is_dir():
        return False
    return any(not p.name.startswith(".") for p in run_dir.iterdir())


def plan(prepared: list[PreparedRun], out: Path, rerun_changed: bool) -> dict[str, str]:
    """What to do with each run, decided before anything trains or is written: ``train`` (a
    new run), ``resume`` (an interrupted run of the same settings and data), ``skip`` (a
    finished one) or ``replace`` (made by other settings or data; only with
    ``rerun_changed``, else one :class:`ConfigError` line that lists what changed)."""
    actions, changed = {}, []
    for run in prepared:
        run_dir = run_dir_of(out, run.spec.name)
        if not _holds_run(run_dir):
            actions[run.spec.name] = TRAIN
            continue
        differences = provenance.changes(recorded(run_dir), run.made_by)
        if differences:
            actions[run.spec.name] = REPLACE
            changed.append(f"'{run.spec.name}' ({provenance.summary(differences)})")
        elif (run_dir / "result.json").is_file():
            actions[run.spec.name] = SKIP
        else:
            actions[run.spec.name] = RESUME if _has_checkpoint(run_dir) else TRAIN
    if changed and not rerun_changed:
        raise ConfigError(
            f"{out}: {len(changed)} run(s) were made by other settings or data: "
            f"{'; '.join(changed)}. Run with --rerun-changed to train them again (their "
            f"files move to {Path(out) / 'replaced'}), or use another --out"
        )
    return actions


def _has_checkpoint(run_dir: Path) -> bool:
    from genkit.training import checkpoint as ckpt

    return ckpt.latest_checkpoint(run_dir) is not None


def move_aside(out: Path, name: str) -> Path:
    """Move the run ``name``'s folder and sample grid to ``OUT/replaced/NAME-TIME/``, so that
    nothing of it mixes with the run that replaces it; returns where they went."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = Path(out) / "replaced" / f"{name}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = Path(out) / "replaced" / f"{name}-{stamp}-{n}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(run_dir_of(out, name), target)
    grid = Path(out) / "samples" / f"{name}.png"
    if grid.is_file():
        os.replace(grid, target / "samples.png")
    return target


def run_one(
    recipe: Recipe,
    run: PreparedRun,
    out: Path,
    train_ds: Any,
    test_ds: Any,
    *,
    action: str,
    quiet: bool,
    echo: Callable[[str], None],
    cache_dir: Path | None = None,
) -> dict[str, Any] | None:
    """Train, evaluate and sample one run as :func:`plan` decided (``action``); its report
    row (also written to ``runs/NAME/result.json``), or ``None`` if a signal stopped it (after
    its checkpoint). Under ``torchrun`` every rank calls it: the run trains with DDP and its
    evaluation is sharded (:func:`genkit.evaluation.evaluate`); rank 0 alone moves, samples
    and writes files. ``cache_dir`` (``--cache-dir``) roots the feature classifier's cache."""
    from genkit.registry import create_model, create_run_model, resolved_params
    from genkit.training import checkpoint as ckpt
    from genkit.training.cli import read_run_config
    from genkit.training.logging import image_grid, save_png
    from genkit.training.trainer import Trainer

    spec = run.spec
    run_dir = run_dir_of(out, spec.name)
    result_path = run_dir / "result.json"
    if action == SKIP:
        echo(f"{spec.name}: finished before, skipped (same settings and data: {result_path})")
        return read_result(result_path)
    main = collective.is_main()
    if action == REPLACE:  # rank 0 moves; the others wait, and stop with it if it fails
        moved = collective.agreed(lambda: move_aside(out, spec.name) if main else None)
        echo(f"{spec.name}: made by other settings or data; moved to {moved}")
    resume = action == RESUME
    echo(f"{spec.name}: {'resuming' if resume else 'training'} {spec.model} ({_budget(run)})")
    torch.manual_seed(run.config.seed)
    shape = tuple(train_ds.data_shape)
    if resume:  # the model the run recorded, whatever today's defaults
        recorded = read_run_config(run_dir)["model"]
        model = create_run_model({**recorded, "params": spec.params}, shape)
    else:
        model = create_model(spec.model, shape, **spec.params)
    info = {
        "model": {"name": spec.model, "params": spec.params, "config": resolved_params(model)},
        "data": recipe.data,
        "recipe": {"name": recipe.name, "source": recipe.source, "run": spec.name},
        provenance.KEY: run.made_by,
    }
    trainer = Trainer(
        model, run.config, train_ds, test_ds, run_dir, run_info=info, progress=not quiet
    )
    # the run folder is locked too, so that `genkit train --out` it waits its turn
    with contextlib.ExitStack() as held:
        collective.agreed(
            lambda: held.enter_context(output_lock(run_dir, "genkit run")) if main else None
        )
        result = trainer.fit(resume=resume)
    if trainer.interrupted or result is None:
        return None

    quality, curve = None, None
    if run.eval.metrics:  # every rank draws its share of the samples
        from genkit.features import quality_curve, run_sample_metrics

        quality = run_sample_metrics(
            trainer.ema_model,
            train_ds,
            test_ds,
            run.eval,
            sample_params=run.config.sample_params,
            seed=run.config.seed,
            cache_dir=cache_dir,
            echo=echo,
            progress=not quiet,
        )
        curve = quality_curve(
            trainer.ema_model,
            train_ds,
            test_ds,
            run.eval,
            quality=quality,
            sample_params=run.config.sample_params,
            seed=run.config.seed,
            cache_dir=cache_dir,
            echo=echo,
        )
    if not main:  # rank 0 draws the grid and writes; the others have done their share
        return {"run": spec.name}
    images_per_second, grid = None, None
    if run.eval.samples > 0:
        began = time.perf_counter()
        x = trainer.sample(run.eval.samples, seed=run.config.seed)
        collective.synchronize(x.device)
        images_per_second = run.eval.samples / (time.perf_counter() - began)
        if x.dim() == 4:
            grid = save_png(image_grid(x.float().cpu()), out / "samples" / f"{spec.name}.png")
    bits = result.bits()
    scale = result.num_dims * LN2
    row = {
        "run": spec.name,
        "model": spec.model,
        "decoder": run.decoder,
        "params": spec.params,
        "objective_weights": spec.objective_weights,
        "steps": trainer.step,
        "best_step": trainer.best["step"] if trainer.best is not None else None,
        "train_seconds": trainer.train_seconds,
        "terms_bits_per_dim": {n: -result.means[n] / scale for n in result.terms},
        "terms_mc_se": {n: result.mc_se.get(n, float("nan")) / scale for n in result.terms},
        "bits_per_dim": bits["mean"],
        "se": bits["se"],
        "mc_se": bits["mc_se"],
        "nfe_per_example": result.nfe_per_example,
        "eval_draws": result.draws,
        "draw_sd": result.draw_sd,
        "eval_stop": result.stop,
        "eval_seconds": result.seconds,
        "estimator": result.estimator,
        "examples": result.count,
        "sample_images_per_second": images_per_second,
        "sample_params": spec.sample_params,
        "sample_grid": str(grid) if grid is not None else None,
        "sample_metrics": quality,
        "quality_curve": curve,
        "curve": trainer.eval_history,
        "train_config": config_dict(run.config),
        provenance.KEY: run.made_by,
    }
    text = json.dumps(row, indent=2, default=_json_default) + "\n"
    ckpt.write_atomic(result_path, lambda f: f.write(text.encode()), what="run result")
    echo(
        f"{spec.name}: {bits['mean']:.4f} ± {bits['se']:.4f} (se) ± {bits['mc_se']:.4f} "
        f"(mc_se) bits/dim after {trainer.step} steps, {trainer.train_seconds:.0f} s of training"
    )
    return row


def read_result(path: Path) -> dict[str, Any]:
    """A finished run's ``result.json``; an unreadable one is one :class:`ConfigError` line."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path} is not a readable run result ({exc}); delete it to run that run again"
        ) from None


def finished_rows(
    recipe: Recipe,
    out: Path,
    data: dict[str, Any],
    echo: Callable[[str], None],
    prepared: Sequence[PreparedRun] = (),
    data_shape: tuple[int, ...] | None = None,
) -> list[dict[str, Any]]:
    """The report rows of every finished run of ``recipe`` in ``out``, in the recipe's order:
    those made by the recipe's settings on the data identified by ``data``. A result made by
    other settings (a run left out by ``--only``) is left out of the report, with a line.
    A run's model defaults come from ``prepared``; one not prepared (left out by ``--only``)
    has its model built on ``data_shape`` to read them."""
    from genkit.registry import create_model

    known = {item.spec.name: item.train_defaults for item in prepared}
    rows = []
    for spec in recipe.runs:
        path = run_dir_of(out, spec.name) / "result.json"
        if not path.is_file():
            continue
        row = read_result(path)
        defaults = known.get(spec.name)
        if defaults is None and data_shape is not None:
            try:
                model = create_model(spec.model, data_shape, **spec.params)
                defaults = model_train_defaults(model, spec)
            except GenkitError:  # the comparison below then names what changed
                defaults = None
        current = record(recipe, spec, data, defaults)
        differences = provenance.changes(row.get(provenance.KEY), current)
        if differences:
            echo(
                f"{spec.name}: its result in {path} was made by other settings or data "
                f"({provenance.summary(differences, 2)}); left out of the report"
            )
            continue
        rows.append(row)
    return rows


def _budget(run: PreparedRun) -> str:
    if run.budget.minutes is not None:
        return f"{run.budget.minutes:g} minutes of training"
    return f"{run.budget.steps} steps"


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
