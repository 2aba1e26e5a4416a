"""Feature extractors (plugins) and the sample-quality evaluation built on them.

A feature extractor is registered through the ``register_feature_extractors`` hook (see
:mod:`genkit.hookspecs`); genkit's own ``classifier`` and ``inception`` come from the built-in
plugin ``genkit_features``. :func:`sample_metrics` draws a model's samples in batches, passes
them through an extractor and computes :mod:`genkit.metrics` against the test split, together
with the floor: the same metrics for as many train examples against the same test split.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import numpy as np
import torch
from torch import Tensor

from genkit import collective
from genkit.metrics import SampleMetrics, check_metrics

#: What a report names as the reference set.
REFERENCE = "test"


class FeatureExtractor(Protocol):
    """``extractor(x) -> (B, F)`` for images ``x: (B, C, H, W)`` in [-1, 1]; ``info`` says what
    the features are (``name``, and e.g. ``test_accuracy`` for a classifier)."""

    info: Mapping[str, Any]

    def __call__(self, x: Tensor) -> Tensor: ...


@attrs.frozen(kw_only=True)
class FeatureContext:
    """What a feature extractor's factory may use.

    :param data: the data spec (``builtin:NAME`` or an HDF5 file).
    :param train: the train split (an :class:`~genkit.data.H5Dataset`), or ``None``.
    :param test: the test split, or ``None``.
    :param cache_dir: ``--cache-dir`` (the built-in datasets' folder) or ``None``.
    :param device: where the extractor runs.
    :param echo: prints one progress line.
    """

    data: str
    train: Any = None
    test: Any = None
    cache_dir: Path | None = None
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    echo: Callable[[str], None] = print


def genkit_cache(cache_dir: str | Path | None = None) -> Path:
    """genkit's cache root for things other than datasets (trained feature classifiers, ...):
    ``cache_dir`` itself when given, else ``$GENKIT_CACHE`` or ``~/.cache/genkit``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GENKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "genkit"


def available_feature_extractors() -> list[str]:
    """Names of every registered feature extractor, sorted."""
    from genkit.registry import get_catalog

    return get_catalog().names("feature_extractors")


def check_feature_extractor(name: str) -> str:
    """``name`` if a plugin registered it, else one :class:`~genkit.errors.UnknownNameError`
    line listing those that exist."""
    from genkit.registry import get_catalog

    get_catalog().get("feature_extractors", name)
    return name


def create_feature_extractor(name: str, context: FeatureContext, **params: Any) -> Any:
    """Build the feature extractor registered as ``name`` for ``context``."""
    from genkit.registry import get_catalog

    return get_catalog().build("feature_extractors", name, context, **params)


def _features(extractor: Any, x: Tensor) -> Tensor:
    with torch.no_grad():
        return extractor(x).float().reshape(x.shape[0], -1).cpu()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def _add_rows(
    metrics: SampleMetrics,
    extractor: Any,
    dataset: Any,
    rows: np.ndarray,
    real: bool,
    batch_size: int,
    device: torch.device,
) -> None:
    for start in range(0, len(rows), batch_size):
        x = dataset.__getitems__(rows[start : start + batch_size]).to(device)
        metrics.update(_features(extractor, x), real=real)


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model`` lives (``LatentVariableModel.device``; the CPU for a module with no
    parameters)."""
    return next(iter(model.parameters()), torch.zeros(())).device


def block_seed(seed: int, block: int) -> int:
    """The seed of the ``block``-th batch of samples drawn with ``seed`` (distinct for every
    pair, whatever the number of processes that draw the blocks)."""
    return int(np.random.SeedSequence([seed, block]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_metrics(
    model: torch.nn.Module,
    extractor: Any,
    *,
    train: Any,
    test: Any,
    metrics: list[str],
    samples: int,
    sample_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    floor: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """The sample-quality block of ``genkit eval``'s JSON (``sample_metrics``).

    ``samples`` images are drawn from ``model`` in batches of ``batch_size`` (batch ``b``
    from a generator seeded by ``(seed, b)``: :func:`block_seed`) and compared with the whole
    test split through ``extractor``; only the features are kept. Under ``torchrun`` every
    process calls it and draws its share of the batches; the features are gathered in batch
    order, so the figures are those of one process (on the same kind of device). With ``floor``, ``samples`` train examples (a seeded random subset; all
    of them if fewer) are compared with the same test features: data against data, the best a
    model can show with this many samples.

    Returns ``{"metrics": {name: {"value", "std", "samples", "features", "reference",
    "sample_params"}}, "floor": {name: {...}}, "features": extractor.info, "samples",
    "reference", "seconds"}``.
    """
    metrics = check_metrics(metrics)
    sample_params = dict(sample_params or {})
    device = _device_of(model)
    began = time.perf_counter()
    model_m = SampleMetrics(metrics, seed=seed)
    floor_m = SampleMetrics(metrics, seed=seed) if floor else None
    ref = np.arange(len(test))
    with _progress(len(ref), "reference features", progress) as bar:
        for start in range(0, len(ref), batch_size):
            x = test.__getitems__(ref[start : start + batch_size]).to(device)
            f = _features(extractor, x)
            model_m.update(f, real=True)
            if floor_m is not None:
                floor_m.update(f, real=True)
            bar.update(len(x))
    # Block b of batch_size samples is drawn from its own generator, seeded by (seed, b), and
    # under torchrun by rank b mod world size; the features come back in block order, so the
    # figures do not depend on how many processes drew them.
    rank, size = collective.rank_and_size()
    blocks = range(rank, math.ceil(samples / batch_size), size)
    mine: list[tuple[int, Tensor]] = []
    sample_seconds = 0.0
    with _progress(samples, "samples", progress and rank == 0) as bar:
        for b in blocks:
            n = min(batch_size, samples - b * batch_size)
            generator = torch.Generator(device).manual_seed(block_seed(seed, b))
            t0 = time.perf_counter()
            with torch.no_grad():
                x = model.sample(n, generator=generator, **sample_params)
            collective.synchronize(
                x.device
            )  # CUDA runs asynchronously: time the work, not its launch
            sample_seconds += time.perf_counter() - t0
            mine.append((b, _features(extractor, x.float().clamp(-1, 1)).double().cpu()))
            bar.update(n * size)
    gathered = collective.gather_objects((mine, sample_seconds))
    for _, features in sorted(block for part, _ in gathered for block in part):
        model_m.update(features.to(device), real=False)
    sample_seconds = sum(seconds for _, seconds in gathered)
    out_model = model_m.compute()
    out_floor = None
    if floor_m is not None:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.permutation(len(train))[: min(samples, len(train))])
        _add_rows(floor_m, extractor, train, rows, False, batch_size, device)
        out_floor = floor_m.compute()
    info = dict(extractor.info)
    common = {
        "samples": samples,
        "features": info,
        "reference": REFERENCE,
        "reference_examples": len(test),
    }
    result: dict[str, Any] = {
        "metrics": {
            n: {**v, **common, "sample_params": sample_params} for n, v in out_model.items()
        },
        "floor": None,
        "features": info,
        "samples": samples,
        "reference": REFERENCE,
        "seed": seed,
        "sample_params": sample_params,
        "sample_seconds_per_image": sample_seconds / max(samples, 1),
    }
    if out_floor is not None:
        floor_n = int(min(samples, len(train)))
        result["floor"] = {
            n: {**v, **common, "samples": floor_n, "compared": "train split"}
            for n, v in out_floor.items()
        }
    result["seconds"] = time.perf_counter() - began
    return result


def format_sample_metrics(result: Mapping[str, Any]) -> str:
    """A small table: each metric of the model, ± its std, and its floor."""
    info = result["features"]
    about = info.get("name", "?")
    if info.get("test_accuracy") is not None:
        about += f", test accuracy {info['test_accuracy']:.4f}"
    lines = [
        f"sample quality: {result['samples']} samples against the {result['reference']} split "
        f"({about})",
        f"{'metric':<12}{'model':>20}{'floor':>20}",
    ]
    floor = result.get("floor") or {}
    for name, entry in result["metrics"].items():

        def cell(e: Mapping[str, Any] | None) -> str:
            if e is None:
                return "n/a"
            text = f"{e['value']:.4g}"
            return text + (f" ± {e['std']:.2g}" if e.get("std") is not None else "")

        lines.append(f"{name:<12}{cell(entry):>20}{cell(floor.get(name)):>20}")
    return "\n".join(lines)


def parse_metric_flags(
    metrics: str | None,
    features: str,
    feature_params: dict[str, Any],
    sample_params: dict[str, Any],
) -> list[str] | None:
    """``genkit eval``'s ``--metrics a,b`` as a checked list (``None`` without it), with the
    feature extractor's name checked; flags that need ``--metrics`` are an error without it."""
    from genkit.errors import ConfigError

    if metrics is None:
        for flag, given in (("--sample-param", sample_params), ("--feature-param", feature_params)):
            if given:
                raise ConfigError(f"{flag} needs --metrics (e.g. --metrics fid,kid)")
        return None
    names = check_metrics([m for m in metrics.split(",") if m.strip()])
    check_feature_extractor(features)
    return names


def prepare_sample_metrics(
    model: torch.nn.Module,
    data: str,
    *,
    features: str,
    feature_params: Mapping[str, Any],
    cache_dir: Path | None,
    echo: Callable[[str], None] = print,
) -> Callable[..., dict[str, Any]]:
    """Open ``data``'s train and test splits and build the extractor ``features`` (training a
    classifier if its cache has none), so that a problem shows before any other work; returns
    :func:`sample_metrics` with ``model``, the extractor and the splits bound."""
    import functools

    from genkit.data import open_dataset
    from genkit.errors import DataError

    train = open_dataset(data, "train", cache_dir=cache_dir)
    test = open_dataset(data, "test", cache_dir=cache_dir)
    if tuple(test.data_shape) != tuple(model.data_shape):
        raise DataError(
            f"{data} holds items of shape {tuple(test.data_shape)}, "
            f"but the model is for {tuple(model.data_shape)}"
        )
    device = _device_of(model)
    context = FeatureContext(
        data=data, train=train, test=test, cache_dir=cache_dir, device=device, echo=echo
    )
    extractor = create_feature_extractor(features, context, **dict(feature_params))
    return functools.partial(sample_metrics, model, extractor, train=train, test=test)


def recipe_extractor(
    settings: Any,
    train: Any,
    test: Any,
    *,
    device: torch.device | None = None,
    cache_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> Any:
    """The feature extractor a recipe run's ``[eval]`` settings name (``features``,
    ``feature_params``) on the recipe's splits: ``genkit run`` builds it once before anything
    trains, so that missing weights or labels stop the recipe then (a classifier is trained
    and cached at that point, under :func:`genkit_cache` of ``cache_dir``, the recipe's
    ``--cache-dir``), and again, from the cache, for each run's metrics."""
    context = FeatureContext(
        data=str(train.path),
        train=train,
        test=test,
        cache_dir=cache_dir,
        device=device if device is not None else torch.device("cpu"),
        echo=echo,
    )
    return create_feature_extractor(settings.features, context, **settings.feature_params)


def run_sample_metrics(
    model: torch.nn.Module,
    train: Any,
    test: Any,
    settings: Any,
    *,
    sample_params: Mapping[str, Any],
    seed: int,
    cache_dir: Path | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = False,
    floor: bool = True,
) -> dict[str, Any]:
    """A recipe run's ``sample_metrics`` from its ``[eval]`` settings (``metrics``,
    ``metric_samples``, ``features``, ``feature_params``, ``batch_size``), the splits the
    recipe opened (their file is the data the classifier cache is keyed by)."""
    device = _device_of(model)
    extractor = recipe_extractor(
        settings, train, test, device=device, cache_dir=cache_dir, echo=echo
    )
    return sample_metrics(
        model,
        extractor,
        train=train,
        test=test,
        metrics=list(settings.metrics),
        samples=settings.metric_samples,
        sample_params=sample_params,
        seed=seed,
        batch_size=settings.batch_size,
        progress=progress,
        floor=floor,
    )


def quality_curve(
    model: torch.nn.Module,
    train: Any,
    test: Any,
    settings: Any,
    *,
    quality: Mapping[str, Any],
    sample_params: Mapping[str, Any],
    seed: int,
    cache_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Sample quality against sampling cost: one point per ``settings.metric_steps`` for a
    model whose ``sample()`` takes ``steps`` (each the metrics of ``metric_samples`` samples
    drawn with that many steps, and the seconds per image), or the one point ``quality`` (the
    run's own sampler) for a model with one sampler cost."""
    import inspect

    def point(steps: int | None, block: Mapping[str, Any]) -> dict[str, Any]:
        values = {name: entry["value"] for name, entry in block["metrics"].items()}
        stds = {
            f"{n}_std": e["std"] for n, e in block["metrics"].items() if e.get("std") is not None
        }
        return {
            "steps": steps,
            "seconds_per_image": block["sample_seconds_per_image"],
            **values,
            **stds,
        }

    takes_steps = "steps" in inspect.signature(model.sample).parameters
    if not settings.metric_steps or not takes_steps:
        return [point(sample_params.get("steps"), quality)]
    curve = []
    for steps in sorted(settings.metric_steps):
        if steps == sample_params.get("steps"):
            block = quality
        else:
            block = run_sample_metrics(
                model, train, test, settings,
                sample_params={**sample_params, "steps": steps}, seed=seed, cache_dir=cache_dir,
                echo=echo, floor=False,
            )  # fmt: skip
        curve.append(point(steps, block))
    return curve
