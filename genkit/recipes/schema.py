"""The recipe format: TOML data (never code), read with ``tomllib`` and structured with cattrs
into the attrs classes below, unknown keys rejected with "did you mean". ``docs/recipes.md``
is the reference::

    name = "compare_vae_vdm"            # optional: the file's stem
    description = "..."
    data = "builtin:digits"             # or an HDF5 file (genkit data convert), relative to
                                        # the working directory or absolute
    out = "runs/compare_vae_vdm"        # relative to the working directory

    [train]                             # TrainConfig fields shared by every run
    batch_size = 64

    [budget]                            # per run: steps = N or minutes = M (training time)
    minutes = 1.0

    [eval]                              # the final test evaluation of every run
    mc_se = 0.01                        # draw until the Monte-Carlo error of bits/dim <= this
    max_nfe = 1000                      # ... or this many network evaluations per example
    points = 8                          # periodic evaluations for the learning curve
    samples = 64                        # images in each run's sample grid
    metrics = ["fid", "kid"]            # sample quality (docs/metrics.md), with the floor
    metric_samples = 1000               # ... of this many samples
    features = "classifier"             # ... on this feature extractor's features

    [[runs]]
    name = "vae"
    model = "vae"
    params = { latent_dim = 16, likelihood = "discretized_logistic_mixture" }
    objective_weights = {}              # ELBOTerms.objective weights
    train = { lr = 1e-3 }               # overrides of [train]
    budget = { steps = 3000 }           # overrides of [budget]
    eval = { estimator = "iwae", params = { k = 64 } }   # overrides of [eval]
    sample_params = { steps = 50 }      # keyword arguments of model.sample
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import attrs
from attrs import validators as v

from genkit.config import did_you_mean, field_names, structure
from genkit.errors import ConfigError
from genkit.training.config import parse_pairs, positive_or_none


@attrs.frozen(kw_only=True)
class Budget:
    """A run's training budget: ``steps`` optimisation steps or ``minutes`` of training time
    (evaluations excluded), exactly one of them."""

    steps: int | None = attrs.field(default=None, validator=positive_or_none)
    minutes: float | None = attrs.field(default=None, validator=positive_or_none)

    def __attrs_post_init__(self) -> None:
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("a budget needs exactly one of 'steps' or 'minutes'")

    def train_fields(self) -> dict[str, Any]:
        """The :class:`~genkit.training.TrainConfig` fields this budget sets."""
        if self.minutes is not None:
            return {"minutes": self.minutes}
        return {"steps": self.steps, "minutes": None}


def _metric_names(_instance: Any, _attribute: Any, value: list[str]) -> None:
    from genkit.metrics import check_metrics

    if value:
        check_metrics(value, where="metrics")


@attrs.frozen(kw_only=True)
class EvalSettings:
    """How a run is evaluated on the test split (:func:`genkit.evaluation.evaluate`)."""

    #: A registered estimator; ``None``: the model's own evaluation estimator.
    estimator: str | None = None
    params: dict[str, Any] = attrs.field(factory=dict)
    #: The final evaluation draws until ``mc_se`` of bits/dim is reached (``None``: two draws)
    #: or ``max_nfe`` network evaluations per example are spent (``None``: no limit).
    mc_se: float | None = attrs.field(default=0.01, validator=positive_or_none)
    max_nfe: float | None = attrs.field(default=1000.0, validator=positive_or_none)
    #: Periodic evaluations during training (a learning curve), each of two draws on the
    #: first ``curve_batches`` batches of the validation split (``[train] validation_fraction``)
    #: or else of the test split; 0: none (``keep_best`` needs at least 2).
    points: int = attrs.field(default=8, validator=v.ge(0))
    curve_batches: int | None = attrs.field(default=None, validator=positive_or_none)
    batch_size: int = attrs.field(default=256, validator=v.ge(1))
    #: Images in the run's sample grid, and the grid's timing of sampling.
    samples: int = attrs.field(default=64, validator=v.ge(0))
    #: Sample-quality metrics (``fid``, ``kid``, ``precision``, ``recall``; docs/metrics.md) of
    #: ``metric_samples`` samples against the test split, on the features of the registered
    #: extractor ``features`` (with ``feature_params``), each with its floor; ``[]``: none.
    metrics: list[str] = attrs.field(factory=list, validator=_metric_names)
    metric_samples: int = attrs.field(default=1000, validator=v.ge(4))
    features: str = "classifier"
    feature_params: dict[str, Any] = attrs.field(factory=dict)
    #: Quality against sampling cost (the DDIM paper's plot): for a model whose ``sample()``
    #: takes ``steps`` (a VDM), the metrics again at each of these step counts, with the
    #: seconds per image; a model with one sampler cost (VAE, MHVAE) gives one point.
    metric_steps: list[int] = attrs.field(factory=list, validator=v.deep_iterable(v.ge(1)))


#: A run's name is a folder's name (``OUT/runs/NAME``): letters, digits, ``_``, ``.``, ``-``.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _run_name(_instance: Any, _attribute: attrs.Attribute, value: str) -> None:
    if not RUN_NAME.fullmatch(value):
        raise ValueError(
            f"run name {value!r} names a folder: use 1 to 100 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


@attrs.frozen(kw_only=True)
class RunSpec:
    """One run: a model plugin with its parameters, and overrides of the shared settings."""

    name: str = attrs.field(validator=_run_name)
    model: str
    params: dict[str, Any] = attrs.field(factory=dict)
    objective_weights: dict[str, float] = attrs.field(factory=dict)
    train: dict[str, Any] = attrs.field(factory=dict)
    budget: dict[str, Any] = attrs.field(factory=dict)
    eval: dict[str, Any] = attrs.field(factory=dict)
    sample_params: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Recipe:
    """A whole recipe (module docstring)."""

    name: str
    description: str = ""
    data: str
    #: the output folder; ``None``: ``genkit run --out`` must give one
    out: str | None = None
    train: dict[str, Any] = attrs.field(factory=dict)
    budget: Budget
    eval: EvalSettings = attrs.field(factory=EvalSettings)
    runs: list[RunSpec]
    #: where the recipe came from (for messages and relative data paths)
    source: str = ""

    def run(self, name: str) -> RunSpec:
        """The run called ``name``; an unknown one is a :class:`ConfigError` listing them."""
        for spec in self.runs:
            if spec.name == name:
                return spec
        names = [r.name for r in self.runs]
        raise ConfigError(
            f"{self.source}: no run named '{name}'{did_you_mean(name, names)} "
            f"(runs: {', '.join(names)})"
        )

    def budget_for(self, spec: RunSpec) -> Budget:
        """The recipe's budget with the run's overrides (one of steps/minutes replaces the
        other)."""
        if not spec.budget:
            return self.budget
        return structure(Budget, spec.budget, where=f"{self.source} [runs.{spec.name}.budget]")

    def eval_for(self, spec: RunSpec) -> EvalSettings:
        """The recipe's evaluation settings with the run's overrides."""
        merged = {**attrs.asdict(self.eval), **spec.eval}
        return structure(EvalSettings, merged, where=f"{self.source} [runs.{spec.name}.eval]")


TOP_LEVEL = field_names(Recipe)


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The TOML of ``path`` as a mapping; a missing or malformed file is one :class:`ConfigError`
    line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"recipe {path} is a folder; give a recipe file, e.g. {path / 'NAME.toml'} "
            "(recipes/ holds the shipped ones)"
        )
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist (recipes/ holds the shipped ones)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text: {exc}") from None


def apply_sets(data: dict[str, Any], pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``--set key=value`` on the raw recipe: dotted keys into its tables (``train.lr=1e-3``,
    ``budget.minutes=0.5``, ``eval.mc_se=0.02``, ``out=runs/x``), and ``runs.NAME.key...`` into
    the run called NAME (``runs.vae.params.latent_dim=8``). Values are TOML literals."""
    data = copy.deepcopy(data)
    for key, value in parse_pairs(pairs, option="--set"):
        parts = key.split(".")
        if parts[0] == "runs":
            if len(parts) < 3:
                raise ConfigError(f"--set {key}: use runs.NAME.KEY=VALUE")
            runs = data.get("runs") or []
            match = [r for r in runs if isinstance(r, dict) and r.get("name") == parts[1]]
            if not match:
                names = [str(r.get("name")) for r in runs if isinstance(r, dict)]
                raise ConfigError(
                    f"--set {key}: no run named '{parts[1]}'{did_you_mean(parts[1], names)} "
                    f"(runs: {', '.join(names)})"
                )
            target, parts = match[0], parts[2:]
        else:
            if parts[0] not in TOP_LEVEL or parts[0] == "source":
                valid = [f for f in TOP_LEVEL if f != "source"]
                raise ConfigError(
                    f"--set {key}: unknown key '{parts[0]}'{did_you_mean(parts[0], valid)} "
                    f"(recipe keys: {', '.join(valid)})"
                )
            target = data
        for part in parts[:-1]:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a table")
            target = child
        target[parts[-1]] = value
    return data


@attrs.frozen(kw_only=True)
class _Header:
    """The recipe's top-level scalars (structured apart from its tables)."""

    name: str
    description: str = ""
    data: str
    out: str | None = None
    train: dict[str, Any] = attrs.field(factory=dict)


def parse_recipe(data: dict[str, Any], *, source: str) -> Recipe:
    """Structure the raw TOML ``data`` into a :class:`Recipe` (every table, every run); a
    relative ``data`` path is made absolute from the working directory."""
    data = dict(data)
    data.setdefault("name", Path(source).stem or "recipe")
    where = source or f"recipe '{data['name']}'"
    valid = [f for f in TOP_LEVEL if f != "source"]
    for key in data:
        if key not in valid:
            raise ConfigError(
                f"{where}: unknown key '{key}'{did_you_mean(key, valid)} "
                f"(valid keys: {', '.join(valid)})"
            )
    runs = data.pop("runs", None)
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{where}: a recipe needs at least one [[runs]] table")
    parsed = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise ConfigError(f"{where}: runs[{i}] must be a table, got {type(run).__name__}")
        label = run.get("name", i)
        parsed.append(structure(RunSpec, run, where=f"{where} [runs.{label}]"))
    names = [r.name for r in parsed]
    duplicate = sorted({n for n in names if names.count(n) > 1})
    if duplicate:
        raise ConfigError(f"{where}: two runs are named '{duplicate[0]}'")
    tables: dict[str, Any] = {}
    for key, cls in (("budget", Budget), ("eval", EvalSettings)):
        value = data.pop(key, None)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{key}] must be a table")
        tables[key] = structure(cls, value, where=f"{where} [{key}]")
    if "budget" not in tables:
        raise ConfigError(f"{where}: a recipe needs a [budget] table (steps = N or minutes = M)")
    header = structure(_Header, data, where=where)
    spec = header.data
    if not spec.startswith("builtin:"):
        spec = str(Path(spec).expanduser().resolve())
    recipe = Recipe(
        **{**attrs.asdict(header), "data": spec},
        runs=parsed,
        source=where,
        **tables,
    )
    for run in recipe.runs:  # the overrides parse on their own too
        recipe.budget_for(run)
        recipe.eval_for(run)
    return recipe


def load_recipe(path: Path, sets: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override (``--set``) and structure the recipe at ``path``."""
    path = Path(path)
    raw = apply_sets(read_recipe_file(path), sets)
    return parse_recipe(raw, source=str(path))
