"""``genkit train``, ``genkit eval`` and ``genkit sample``.

A run dir holds ``config.json`` (the train config, the model's name and parameters, the data
spec and shape), ``checkpoints/`` and ``tb/`` (TensorBoard), so ``eval`` and ``sample`` need
only the dir.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import torch

from genkit import collective, provenance
from genkit.data.identity import data_identity
from genkit.data.reader import check_splits
from genkit.errors import CheckpointError, ConfigError, DataError
from genkit.files import output_lock
from genkit.training import checkpoint as ckpt
from genkit.training import distributed
from genkit.training.config import (
    apply_overrides,
    config_dict,
    make_config,
    parse_pairs,
    with_model_defaults,
)
from genkit.training.logging import format_result, image_format, image_grid, save_image


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run dir's ``config.json``; a missing or unreadable one is a :class:`ConfigError`."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a genkit run dir: {path} does not exist")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or "train" not in info or "name" not in info.get("model", {}):
        raise ConfigError(f"{path} is not a genkit run config (needs 'model.name' and 'train')")
    return info


def data_spec(data: str) -> str:
    """``builtin:NAME`` as given; a file path made absolute so the run dir can move."""
    return data if data.startswith("builtin:") else str(Path(data).expanduser().resolve())


def open_split(spec: str, split: str, required: bool = True, cache_dir: Path | None = None):
    """One split of ``spec`` (a file or ``builtin:NAME``); a missing optional one is a warning."""
    from genkit.data import open_dataset

    try:
        return open_dataset(spec, split, cache_dir=cache_dir)
    except DataError as exc:
        if required or not isinstance(exc, KeyError):
            raise
        click.echo(f"warning: no '{split}' split in {spec} ({exc}); skipping evaluation", err=True)
        return None


def open_run_data(
    info: dict[str, Any],
    data: str | None,
    split: str,
    cache_dir: Path | None,
    echo: Any = lambda line: click.echo(line, err=True),
) -> Any:
    """The split ``split`` of the data a run was trained on (``info``: its ``config.json``), or
    of ``data`` when given, which is said on stderr. Data that changed since the run was
    trained is a :class:`ConfigError` that names the change and ``--data``."""
    recorded = info.get("data")
    if data is not None:
        spec = data_spec(data)
        if spec != recorded:
            echo(f"evaluating on {spec} (--data), not the run's data {recorded}")
        return open_split(spec, split, cache_dir=cache_dir)
    if recorded is None:
        raise ConfigError("the run's config.json names no data; pass --data FILE.h5|builtin:NAME")
    dataset = open_split(recorded, split, cache_dir=cache_dir)
    made = info.get(provenance.KEY)
    if made:
        changed = provenance.data_changes(made, {"data": data_identity(recorded, cache_dir)})
        if changed:
            raise ConfigError(
                f"the run's data {recorded} changed since it was trained "
                f"({provenance.summary(changed)}); pass --data {recorded} to evaluate on it as it "
                "is now"
            )
    return dataset


#: ``--cache-dir``, as ``genkit data info`` has it: where ``builtin:NAME`` is converted to HDF5.
CACHE_DIR = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Built-in dataset cache (default $GENKIT_CACHE/datasets or ~/.cache/genkit/datasets).",
)


@click.command("train")
@click.option("--model", "model_name", metavar="NAME", help="A registered model (genkit plugins).")
@click.option("--data", metavar="FILE.h5|builtin:NAME", help="HDF5 file or built-in dataset.")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path), help="Run dir.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a TrainConfig field (VALUE is a TOML literal) or model.PARAM.",
)
@click.option(
    "--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no final table.")
@CACHE_DIR
def train(
    model_name: str | None,
    data: str | None,
    run_dir: Path,
    overrides: tuple[str, ...],
    resume: bool,
    quiet: bool,
    cache_dir: Path | None,
) -> None:
    """Train a model by its ELBO; ends with a test evaluation table.

    \b
    genkit train --model vae --data builtin:digits --out runs/vae
    genkit train --model vae --data x.h5 --out runs/b --set lr=1e-3 --set model.latent_dim=8
    torchrun --nproc_per_node=2 -m genkit train --model vae --data builtin:digits --out runs/d
    """
    from genkit.registry import create_model, create_run_model, resolved_params
    from genkit.training.trainer import Trainer

    train_cfg: dict[str, Any] = {}
    model_params: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    if resume:
        saved = read_run_config(run_dir)
        for flag, given, stored in (
            ("--model", model_name, saved["model"]["name"]),
            ("--data", data and data_spec(data), saved.get("data")),
        ):
            if given is not None and given != stored:
                raise ConfigError(f"--resume: {flag} {given} differs from the run's {stored}")
        model_name, data = saved["model"]["name"], saved.get("data")
        train_cfg, model_params = dict(saved["train"]), dict(saved["model"].get("params", {}))
    elif model_name is None or data is None:
        raise ConfigError("genkit train needs --model NAME and --data FILE.h5|builtin:NAME")
    if data is None:
        raise ConfigError(f"{run_dir}/config.json names no data; pass --data")
    spec = data_spec(data)
    saved_params = dict(model_params)
    train_cfg, model_params = apply_overrides(train_cfg, model_params, overrides)
    if resume and model_params != saved_params:
        changed = sorted(
            k for k in {*model_params, *saved_params} if model_params.get(k) != saved_params.get(k)
        )
        key = changed[0]
        raise ConfigError(
            f"--resume: model.{key}={model_params.get(key)!r} differs from the run's "
            f"{saved_params.get(key)!r}; a resumed run keeps its model (train a new run for "
            "another one)"
        )
    config = make_config(train_cfg, where="train config (--set)")

    info = distributed.init_from_env(config.device)
    try:
        train_ds = open_split(spec, "train", cache_dir=cache_dir)
        test_ds = open_split(spec, "test", required=False, cache_dir=cache_dir)
        check_splits(train_ds, test_ds)
        identity = data_identity(spec, cache_dir)

        def record() -> dict[str, Any]:
            return provenance.made_by(
                {"model": model_name, "params": model_params, "train": config_dict(config)},
                identity,
                command="genkit train",
            )

        made = record()
        if resume:  # before anything is written: the run continues on the data it began on
            changed = provenance.data_changes(saved.get(provenance.KEY), made)
            if changed:
                raise ConfigError(
                    f"--resume: the data of {run_dir} changed since it was trained "
                    f"({provenance.summary(changed)}); resume on the same data, or train a new run"
                )
        torch.manual_seed(config.seed)  # the same initial weights on every rank and run
        shape = tuple(train_ds.data_shape)
        if resume:  # the model the run recorded, whatever today's defaults
            model = create_run_model({**saved["model"], "params": model_params}, shape)
        else:  # the model's own training defaults under what --set gave
            model = create_model(model_name, shape, **model_params)
            merged = with_model_defaults(model, train_cfg, model_name)
            if merged != train_cfg:
                config = make_config(merged, where=f"train config (--set over {model_name}'s)")
                made = record()
        run_info = {
            "model": {
                "name": model_name,
                "params": model_params,
                "config": resolved_params(model),
            },
            "data": spec,
            provenance.KEY: made,
        }
        with ExitStack() as held:  # rank 0 locks; a failure stops every rank
            collective.agreed(
                lambda: (
                    held.enter_context(output_lock(run_dir, "genkit train"))
                    if info.is_main
                    else None
                )
            )
            trainer = Trainer(
                model, config, train_ds, test_ds, run_dir, run_info=run_info, progress=not quiet
            )
            result = trainer.fit(resume=resume)
        if result is not None and info.is_main and not quiet:
            click.echo(
                format_result(
                    result,
                    title=f"test split, {result.count} examples, EMA weights, step {trainer.step}",
                )
            )
    finally:
        distributed.shutdown()


def load_run(
    run_dir: Path,
    *,
    checkpoint: Path | None = None,
    use_ema: bool = True,
    device: str = "auto",
    last: bool = False,
) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """The run's model with the weights of its latest (or the given) checkpoint: the EMA
    weights unless ``use_ema`` is false; of a ``keep_best`` run, the best EMA weights by
    validation unless ``last``. Returns ``(model, run config, checkpoint path)``."""
    from genkit.registry import create_run_model

    info = read_run_config(run_dir)
    older: list[Path] = []
    if checkpoint is not None:
        path = Path(checkpoint)
    else:
        *older, path = ckpt.list_checkpoints(run_dir) or [None]
    if path is None:
        raise CheckpointError(f"no checkpoint in {ckpt.checkpoint_dir(run_dir)}")
    try:
        state = ckpt.load(path)
    except CheckpointError as exc:
        if not older:
            raise
        raise CheckpointError(
            f"{exc}; older checkpoints: {', '.join(p.name for p in reversed(older))} "
            f"(pass --checkpoint {older[-1]} to use the newest of them)"
        ) from None
    model = create_run_model(info["model"], tuple(info["data_shape"]))
    weights = state["ema" if use_ema else "model"]
    info["weights"] = "EMA" if use_ema else "raw"
    if use_ema and not last and isinstance(state.get("best"), dict):
        weights = state["best"]["ema"]
        info["weights"] = f"best EMA (step {state['best']['step']}, by validation)"
    ckpt.load_module_state(model, weights, path, "model")
    device = distributed.resolve_device(device, distributed.current())
    memory_format = torch.channels_last if channels_last(info, model) else torch.preserve_format
    model.to(device, memory_format=memory_format).eval()
    return model, info, path


def channels_last(info: dict[str, Any], model: torch.nn.Module) -> bool:
    """Whether the run trained an image model in ``channels_last`` (evaluation and sampling
    use the same, faster layout)."""
    return bool(info["train"].get("channels_last", True)) and len(model.data_shape) == 3


@click.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--estimator", default=None, help="ELBO estimator (default: the run's).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Estimator parameter.")
@click.option(
    "--mc-se",
    "mc_se",
    type=float,
    default=0.01,
    show_default=True,
    help="Draw until the Monte-Carlo standard error of the mean bits/dim is at most this "
    "(0: no target, two draws).",
)
@click.option(
    "--max-nfe",
    "max_nfe",
    type=float,
    default=1000.0,
    show_default=True,
    help="Network evaluations per example at most (0: no limit).",
)
@click.option("--split", default="test", show_default=True)
@click.option(
    "--data",
    metavar="FILE.h5|builtin:NAME",
    help="Evaluate on this data instead of the data the run was trained on (said so in the "
    "output).",
)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Default: the latest.")
@click.option("--no-ema", is_flag=True, help="Evaluate the raw weights instead of the EMA.")
@click.option("--last", is_flag=True, help="A keep_best run: the last EMA weights, not the best.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the result.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@CACHE_DIR
@click.option(
    "--metrics",
    default=None,
    metavar="fid,kid,precision,recall",
    help="Sample-quality metrics against the test split, with their floor (docs/metrics.md).",
)
@click.option("--samples", default=1000, show_default=True, type=click.IntRange(min=4))
@click.option("--features", default="classifier", show_default=True, help="Feature extractor.")
@click.option("--feature-param", "feature_params", multiple=True, metavar="KEY=VALUE")
@click.option(
    "--sample-param", "sample_params", multiple=True, metavar="KEY=VALUE", help="sample() keyword."
)
def eval_(
    run_dir: Path,
    estimator: str | None,
    params: tuple[str, ...],
    mc_se: float,
    max_nfe: float,
    split: str,
    data: str | None,
    batch_size: int,
    checkpoint: Path | None,
    no_ema: bool,
    last: bool,
    seed: int,
    json_out: Path | None,
    device: str,
    cache_dir: Path | None,
    metrics: str | None,
    samples: int,
    features: str,
    feature_params: tuple[str, ...],
    sample_params: tuple[str, ...],
) -> None:
    """Test bits/dim and every ELBO term with se (over the examples) and mc_se (Monte Carlo),
    drawing until mc_se <= --mc-se or --max-nfe network evaluations per example are spent.

    \b
    genkit eval runs/vae
    genkit eval runs/vae --estimator iwae --param k=64 --json iwae.json
    genkit eval runs/vdm --mc-se 0.005 --max-nfe 400
    genkit eval runs/vdm --estimator ode --param rtol=1e-4
    genkit eval runs/vdm --metrics fid,kid --samples 1000 --sample-param steps=50
    genkit eval diffusers:PIPELINE_DIR --data cifar10.h5 --json ddpm.json
    """
    from genkit import collective
    from genkit.evaluation import evaluate
    from genkit.features import format_sample_metrics, parse_metric_flags, prepare_sample_metrics

    dist_info = distributed.init_from_env(device)  # under torchrun: every rank its share
    main = dist_info.is_main
    echo = (lambda line: click.echo(line, err=True)) if main else (lambda _line: None)

    def setup():
        for flag, value in (("--mc-se", mc_se), ("--max-nfe", max_nfe)):
            if not value >= 0:
                raise ConfigError(f"{flag} must be a number >= 0 (0: none), got {value}")
        feature_kw = dict(parse_pairs(feature_params, option="--feature-param"))
        sample_kw = dict(parse_pairs(sample_params, option="--sample-param"))
        metric_names = parse_metric_flags(metrics, features, feature_kw, sample_kw)
        if str(run_dir).startswith("diffusers:"):  # a diffusers pipeline folder
            from genkit.diffusers_io import load_for_eval

            model, info, path = load_for_eval(str(run_dir), data and data_spec(data), device)
        else:
            model, info, path = load_run(
                run_dir, checkpoint=checkpoint, use_ema=not no_ema, device=device, last=last
            )
        estimator_params = dict(parse_pairs(params, option="--param"))
        measure = None
        if metric_names is not None:  # every rank draws its share of the samples
            from genkit.model import check_sample_params

            check_sample_params(model, sample_kw, info["model"]["name"], "--sample-param")
            measure = prepare_sample_metrics(
                model,
                data_spec(data) if data is not None else info["data"],
                features=features,
                feature_params=feature_kw,
                cache_dir=cache_dir,
                echo=echo,
            )
        name = estimator
        if name is None:
            name = info["train"].get("eval_estimator")
            if not params:
                estimator_params = dict(info["train"].get("eval_estimator_params") or {})
        dataset = open_run_data(info, data, split, cache_dir, echo)
        if tuple(dataset.data_shape) != tuple(model.data_shape):
            raise DataError(
                f"'{dataset.path}' split '{split}' holds items of shape "
                f"{tuple(dataset.data_shape)}, but the run's model is for {tuple(model.data_shape)}"
            )
        return model, info, path, name, estimator_params, dataset, metric_names, sample_kw, measure

    try:
        # one rank's bad input stops every rank with its line
        model, info, path, name, estimator_params, dataset, metric_names, sample_kw, measure = (
            collective.agreed(setup)
        )
        torch.manual_seed(seed)
        result = collective.agreed(
            lambda: evaluate(
                model,
                dataset,
                estimator=name,
                params=estimator_params,
                mc_se=mc_se or None,
                max_nfe=max_nfe or None,
                batch_size=batch_size,
                channels_last=channels_last(info, model),
            )
        )
        quality = None
        if measure is not None:
            quality = collective.agreed(
                lambda: measure(
                    metrics=metric_names,
                    samples=samples,
                    sample_params=sample_kw,
                    seed=seed,
                    batch_size=batch_size,
                    progress=main,
                )
            )
        if not main:
            return
        processes = f", {result.processes} processes" if result.processes > 1 else ""
        click.echo(
            format_result(
                result,
                title=f"{split} split, {result.count} examples{processes}, estimator "
                f"{result.estimator}, {info['weights']} weights of {path.name}",
            )
        )
        document = result.to_json(checkpoint=str(path))
        if quality is not None:
            click.echo(format_sample_metrics(quality))
            document["sample_metrics"] = quality
        if json_out is not None:
            text = json.dumps(document, indent=2) + "\n"
            ckpt.write_atomic(json_out, lambda f: f.write(text.encode()), what="evaluation JSON")
    finally:
        distributed.shutdown()


@click.command("sample")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-n", "num", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Image grid (.png, or another format by its suffix: .jpg, .webp, ...) or .npy.",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Default: the latest.")
@click.option("--no-ema", is_flag=True, help="Sample the raw weights instead of the EMA.")
@click.option("--last", is_flag=True, help="A keep_best run: the last EMA weights, not the best.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A keyword argument of the model's sample() (VALUE a TOML literal); repeatable.",
)
@click.option(
    "--padding",
    default=2,
    show_default=True,
    type=click.IntRange(min=0),
    help="PNG grid: pixels between and around the images.",
)
@click.option(
    "--upscale",
    type=click.IntRange(min=1),
    help="PNG grid: integer nearest-neighbour factor. Default: tiles of at least 32 pixels.",
)
def sample(
    run_dir: Path,
    num: int,
    out: Path,
    seed: int,
    checkpoint: Path | None,
    no_ema: bool,
    last: bool,
    device: str,
    params: tuple[str, ...],
    padding: int,
    upscale: int | None,
) -> None:
    """Draw samples from a trained run into a PNG grid (or a .npy array of the raw samples).

    --param KEY=VALUE passes KEY as a keyword argument to the model's sample(); an unknown
    KEY is an error that lists the ones it takes (a VDM: steps, eta, clip, final).

    \b
    genkit sample runs/vae -n 64 --out grid.png
    genkit sample runs/vdm -n 64 --param steps=50 --param eta=0 --out grid.png
    genkit sample runs/vdm --upscale 8 --padding 4 --out big.png
    """
    from genkit.model import check_sample_params

    if out.suffix.lower() != ".npy":
        image_format(out)  # a suffix no image format has is an error before any sampling
    model, info, _path = load_run(
        run_dir, checkpoint=checkpoint, use_ema=not no_ema, device=device, last=last
    )
    sample_params = check_sample_params(
        model, dict(parse_pairs(params, option="--param")), info["model"]["name"], "--param"
    )
    torch.manual_seed(seed)
    generator = torch.Generator(model.device).manual_seed(seed)
    with torch.no_grad():
        x = model.sample(num, generator=generator, **sample_params).float().cpu()  # (n, *shape)
    if out.suffix == ".npy":
        import numpy as np

        ckpt.write_atomic(out, lambda f: np.save(f, x.numpy()), what="samples")
    else:
        if x.dim() != 4:
            raise DataError(
                f"a PNG grid needs image data (C, H, W), this model's is {tuple(x.shape[1:])}; "
                "write --out FILE.npy instead"
            )
        save_image(image_grid(x, padding=padding, upscale=upscale), out)
    click.echo(f"wrote {num} samples to {out}")
