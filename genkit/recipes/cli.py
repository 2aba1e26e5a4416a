"""``genkit run RECIPE``: compare models as a recipe says, and report."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import attrs
import click

from genkit.training.cli import CACHE_DIR


@click.command("run")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option(
    "--out", type=click.Path(path_type=Path), help="Output folder (default: the recipe's)."
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe key: train.lr=1e-3, budget.minutes=0.5, runs.vae.params.latent_dim=8.",
)
@click.option("--only", multiple=True, metavar="RUN", help="Run only these runs (repeatable).")
@click.option(
    "--rerun-changed",
    is_flag=True,
    help="Train again the runs whose folder was made by other settings or data (their old "
    "files move to OUT/replaced/); without it such a run is an error.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress output; the results still print.")
@CACHE_DIR
def run(
    recipe_path: Path,
    out: Path | None,
    sets: tuple[str, ...],
    only: tuple[str, ...],
    rerun_changed: bool,
    quiet: bool,
    cache_dir: Path | None,
) -> None:
    """Train and evaluate every run of RECIPE, then write results.md/.csv/.json, a bits/dim
    vs. training time plot and a sample grid per run into the output folder.

    Everything in the recipe is checked before anything trains. Running it again skips
    finished runs and resumes an interrupted one, when the run folder was made by the same
    settings, data and genkit version; one process writes to an output folder at a time.
    Under torchrun each run trains with DDP and is evaluated by every process, each on its
    share of the test examples; rank 0 writes.

    \b
    genkit run recipes/compare_vae_vdm.toml
    genkit run recipes/compare_vae_vdm.toml --only vdm_continuous --set budget.minutes=5
    torchrun --nproc_per_node=4 -m genkit run recipes/cifar10_gpu.toml
    """
    from genkit import collective
    from genkit.data.identity import data_identity
    from genkit.data.reader import check_splits
    from genkit.errors import ConfigError, GenkitError
    from genkit.files import output_lock
    from genkit.recipes.report import plain, write_report
    from genkit.recipes.runner import finished_rows, plan, prepare, run_one
    from genkit.recipes.schema import load_recipe
    from genkit.training import distributed
    from genkit.training.cli import open_split

    began = time.perf_counter()
    try:  # the process group's backend follows the recipe's device (nccl for CUDA)
        device = str(load_recipe(recipe_path, sets).train.get("device", "auto"))
    except GenkitError:
        device = "auto"  # the error is reported below, by every rank alike
    dist_info = distributed.init_from_env(device)
    main = dist_info.is_main
    echo = (lambda _text: None) if quiet or not main else (lambda text: click.echo(text, err=True))

    def setup():
        recipe = load_recipe(recipe_path, sets)
        if out is None and recipe.out is None:
            raise ConfigError(
                f'{recipe.source} names no output folder: add out = "runs/{recipe.name}" to '
                "it, or pass --out DIR"
            )
        train_ds = open_split(recipe.data, "train", cache_dir=cache_dir)
        test_ds = open_split(recipe.data, "test", cache_dir=cache_dir)
        check_splits(train_ds, test_ds)
        data = data_identity(recipe.data, cache_dir)
        prepared = prepare(recipe, train_ds, test_ds, list(only) or None, data)
        built = set()
        for item in prepared:  # feature extractors (weights, labels) before anything trains
            key = (item.eval.features, repr(sorted(item.eval.feature_params.items())))
            if item.eval.metrics and key not in built:
                from genkit.features import recipe_extractor

                try:
                    recipe_extractor(item.eval, train_ds, test_ds, cache_dir=cache_dir, echo=echo)
                except GenkitError as exc:
                    raise type(exc)(f"{recipe.source} [runs.{item.spec.name}]: {exc}") from None
                built.add(key)
        return (
            recipe,
            Path(out if out is not None else recipe.out),
            train_ds,
            test_ds,
            data,
            prepared,
        )

    try:
        # every rank checks the recipe; one rank's error stops all with its line
        recipe, out, train_ds, test_ds, data, prepared = collective.agreed(setup)
        with contextlib.ExitStack() as held:
            # rank 0 holds the lock and decides what to do with each run; the others follow
            collective.agreed(
                lambda: held.enter_context(output_lock(out, "genkit run")) if main else None
            )
            actions = collective.broadcast(
                collective.agreed(lambda: plan(prepared, out, rerun_changed) if main else None)
            )
            echo(f"{recipe.name}: {len(prepared)} runs on {recipe.data}, output in {out}")
            for item in prepared:
                row = run_one(
                    recipe,
                    item,
                    out,
                    train_ds,
                    test_ds,
                    action=actions[item.spec.name],
                    quiet=quiet or not main,
                    echo=echo,
                    cache_dir=cache_dir,
                )
                if row is None:
                    if main:
                        click.echo(
                            f"{item.spec.name} stopped by a signal; run the recipe again to resume"
                        )
                    return
            if not main:
                return
            # every finished run of the recipe, --only or not, made by its present settings
            rows = finished_rows(recipe, out, data, echo, prepared, tuple(train_ds.data_shape))
            seconds = time.perf_counter() - began
            info = {k: v for k, v in attrs.asdict(recipe).items() if k not in ("runs", "source")}
            info["source"] = recipe.source
            info["data_identity"] = data
            info["processes"] = dist_info.world_size
            paths = write_report(out, rows, info, seconds)
    finally:
        distributed.shutdown()
    click.echo(plain(rows))
    click.echo(f"{len(rows)} runs in {seconds:.0f} s; report: {', '.join(str(p) for p in paths)}")
