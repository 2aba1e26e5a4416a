"""The plugin manager (pluggy) and the catalogue of what plugins register.

Plugins are found through the entry-point group ``genkit`` (built-ins included: nothing here
imports them by name). Loading is isolated per plugin: one that fails to import, fails pluggy's
validation or raises inside a registration hook is recorded as a :class:`PluginFailure`
(``plugin 'x' (package y): reason``) and the others keep working.

``GENKIT_LOAD_PLUGINS`` (comma-separated entry-point names; empty for none) restricts which
entry points load, as datasette does for its tests.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import inspect
import json
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import pluggy

from genkit import hookspecs
from genkit.config import did_you_mean, structure, unstructure
from genkit.errors import InvalidParameterError, PluginError, UnknownModelError, UnknownNameError

ENTRYPOINT_GROUP = "genkit"
KINDS = ("models", "estimators", "datasets", "schedules", "feature_extractors")
_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")
#: Plugins that ship inside genkit itself (its core estimators), registered like any other.
_CORE_PLUGINS = ("genkit.core_plugin",)


@attrs.frozen
class Registration:
    """One named thing a plugin registered."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    config: type | None = None
    description: str = ""


@attrs.frozen
class PluginFailure:
    """A plugin that failed to load or to register."""

    plugin: str
    package: str
    reason: str

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' (package {self.package}): {self.reason}"


@attrs.frozen
class PluginInfo:
    name: str
    package: str
    version: str
    registered: dict[str, list[str]] = attrs.field(factory=dict)


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    return (dist.name, dist.version) if dist is not None else ("?", "?")


def _selected() -> set[str] | None:
    env = os.environ.get("GENKIT_LOAD_PLUGINS")
    if env is None:
        return None
    return {n.strip() for n in env.split(",") if n.strip()}


class Catalog:
    """A plugin manager plus everything its plugins registered, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager, sources: dict[str, tuple[str, str]]) -> None:
        self.pm = pm
        self.sources = sources  # plugin name -> (package, version)
        self.failures: list[PluginFailure] = []
        self.entries: dict[str, dict[str, Registration]] = {k: {} for k in KINDS}

    # -- loading -------------------------------------------------------------------------
    def fail(self, plugin: str, reason: str, package: str | None = None) -> None:
        package = package or self.sources.get(plugin, ("?", "?"))[0]
        self.failures.append(PluginFailure(plugin, package, reason))

    def _register_fn(self, kind: str, plugin: str) -> Callable[..., None]:
        def register(
            name: str,
            factory: Callable[..., Any],
            *,
            config: type | None = None,
            description: str = "",
        ) -> None:
            if not isinstance(name, str) or not _NAME.match(name):
                raise PluginError(
                    f"bad {kind[:-1]} name {name!r}: use lower case letters, digits, '_', '-', '.'"
                )
            if not callable(factory):
                raise PluginError(f"{kind[:-1]} '{name}': factory {factory!r} is not callable")
            if config is not None and not attrs.has(config):
                raise PluginError(f"{kind[:-1]} '{name}': config must be an attrs class")
            existing = self.entries[kind].get(name)
            if existing is not None:
                raise PluginError(
                    f"{kind[:-1]} '{name}' is registered by both plugin '{existing.plugin}' "
                    f"and plugin '{plugin}'"
                )
            self.entries[kind][name] = Registration(
                kind, name, factory, plugin, config, description or _first_line(factory)
            )

        return register

    def collect(self) -> None:
        """Call every registration hook, one plugin at a time, isolating failures."""
        for kind in KINDS:
            caller = getattr(self.pm.hook, f"register_{kind}")
            for impl in reversed(caller.get_hookimpls()):  # registration order
                before = {k: dict(v) for k, v in self.entries.items()}
                try:
                    impl.function(register=self._register_fn(kind, impl.plugin_name))
                except Exception as exc:  # a plugin's bug must not hide the others
                    self.entries = before
                    self.fail(impl.plugin_name, f"register_{kind} raised {_describe(exc)}")

    # -- lookups -------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Registration:
        try:
            return self.entries[kind][name]
        except KeyError:
            valid = self.names(kind)
            error = UnknownModelError if kind == "models" else UnknownNameError
            hint = did_you_mean(name, valid)
            broken = f" ({len(self.failures)} plugin(s) failed to load: see `genkit plugins`)"
            raise error(
                f"unknown {kind[:-1]} '{name}'{hint}; available: {', '.join(valid) or 'none'}"
                + (broken if self.failures else "")
            ) from None

    def build(self, kind: str, name: str, *args: Any, **params: Any) -> Any:
        """Call the factory registered as ``name``, structuring ``params`` into its config."""
        reg = self.get(kind, name)
        where = f"{kind[:-1]} '{name}'"
        if reg.config is not None:
            return reg.factory(*args, structure(reg.config, params, where=where))
        try:
            inspect.signature(reg.factory).bind(*args, **params)
        except TypeError as exc:
            valid = [
                p.name
                for p in list(inspect.signature(reg.factory).parameters.values())[len(args) :]
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            raise InvalidParameterError(
                f"{where}: {exc}; valid parameters: {', '.join(valid) or 'none'}"
            ) from None
        return reg.factory(*args, **params)

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin with its package, version and what it registered."""
        out = []
        for name, plugin in self.pm.list_name_plugin():
            package, version = self.sources.get(name, ("?", "?"))
            registered = {
                kind: sorted(r.name for r in self.entries[kind].values() if r.plugin == name)
                for kind in KINDS
            }
            # the trainer hooks it implements (the register_* hooks show as what they added)
            callers = self.pm.get_hookcallers(plugin) or []
            registered["hooks"] = sorted(
                c.name for c in callers if not c.name.startswith("register_")
            )
            out.append(
                PluginInfo(name, package, version, {k: v for k, v in registered.items() if v})
            )
        return sorted(out, key=lambda p: p.name)


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def make_plugin_manager(
    load_entrypoints: bool = True, plugins: Iterable[Any] = (), *, core: bool = True
) -> Catalog:
    """A fresh plugin manager with genkit's hookspecs, its plugins loaded and collected.

    :param load_entrypoints: load the entry points of the group ``genkit`` (honouring
        ``GENKIT_LOAD_PLUGINS``).
    :param plugins: extra plugin objects or modules to register (tests use this).
    :param core: register genkit's own core plugin (the generic ELBO estimators).
    """
    pm = pluggy.PluginManager("genkit")
    pm.add_hookspecs(hookspecs)
    version = md.version("genkit") if _installed("genkit") else "?"
    sources: dict[str, tuple[str, str]] = {}
    catalog = Catalog(pm, sources)

    def add(obj: Any, name: str, package: str, version: str) -> None:
        sources[name] = (package, version)
        try:
            pm.register(obj, name=name)
        except Exception as exc:
            catalog.fail(name, _describe(exc))

    if core:
        for module_name in _CORE_PLUGINS:
            add(__import__(module_name, fromlist=["_"]), module_name, "genkit", version)
    if load_entrypoints:
        wanted = _selected()
        for ep in md.entry_points(group=ENTRYPOINT_GROUP):
            if wanted is not None and ep.name not in wanted:
                continue
            package, ep_version = _dist_of(ep)
            if ep.name in sources:  # two packages chose one entry-point name: keep the first
                first = sources[ep.name][0]
                if first != package:
                    catalog.fail(
                        ep.name,
                        f"entry point '{ep.name} = {ep.value}' not loaded: package {first} "
                        f"already uses the name '{ep.name}'; rename one of them",
                        package=package,
                    )
                continue
            sources[ep.name] = (package, ep_version)
            try:
                obj = ep.load()
            except Exception as exc:
                catalog.fail(ep.name, f"failed to import {ep.value}: {_describe(exc)}")
                continue
            add(obj, ep.name, package, ep_version)
    for i, obj in enumerate(plugins):
        name = getattr(obj, "__name__", None) or f"{type(obj).__name__}-{i}"
        add(obj, name, getattr(obj, "__package__", None) or "(registered in code)", "?")
    while True:  # a misspelt hook name: report that plugin, keep the rest
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or "?"
            pm.unregister(exc.plugin)
            catalog.fail(name, _describe(exc))
    catalog.collect()
    return catalog


def _installed(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


@functools.cache
def get_catalog() -> Catalog:
    """The process-wide catalogue (entry points loaded once; cached)."""
    return make_plugin_manager()


def reset_catalog() -> None:
    """Forget the cached catalogue (after installing a plugin, or in tests)."""
    get_catalog.cache_clear()


def available_models() -> list[str]:
    """Names of every registered model, sorted."""
    return get_catalog().names("models")


def create_model(name: str, data_shape: tuple[int, ...], **params: Any):
    """Build the model registered as ``name`` for data of ``data_shape`` (e.g. ``(1, 28, 28)``).

    Raises :class:`~genkit.errors.UnknownModelError` (listing the names that exist) or
    :class:`~genkit.errors.InvalidParameterError` (naming the bad parameter and the valid ones).
    """
    from genkit.model import LatentVariableModel

    catalog = get_catalog()
    model = catalog.build("models", name, _data_shape(data_shape), **params)
    if not isinstance(model, LatentVariableModel):
        reg = catalog.get("models", name)
        package = catalog.sources.get(reg.plugin, ("?", "?"))[0]
        raise PluginError(
            f"plugin '{reg.plugin}' (package {package}): model '{name}' returned "
            f"{type(model).__name__}, not a genkit.LatentVariableModel"
        )
    return model


def resolved_params(model: Any) -> dict[str, Any] | None:
    """Every parameter of a built model, defaults filled in, as JSON-ready values: its
    ``config`` (an attrs instance, as every built-in model keeps) unstructured. A run records
    it, so that a later change of a default cannot change the model its folder rebuilds.
    ``None`` for a model without such a ``config`` or with values JSON cannot hold."""
    config = getattr(model, "config", None)
    if not attrs.has(type(config)):
        return None
    try:
        return json.loads(json.dumps(unstructure(config)))
    except (TypeError, ValueError):
        return None


def create_run_model(model_info: Mapping[str, Any], data_shape: tuple[int, ...]) -> Any:
    """The model of a run's ``config.json`` ``model`` entry (``{"name", "params", "config"}``):
    built from the resolved ``config`` it recorded; a run recorded before runs held one has
    only the ``params`` it was given, which are applied over its config class's
    ``LEGACY_DEFAULTS`` (the defaults of then, where they have changed since)."""
    name = model_info["name"]
    if model_info.get("config") is not None:
        return create_model(name, data_shape, **model_info["config"])
    params = dict(model_info.get("params") or {})
    model = create_model(name, data_shape, **params)
    legacy = getattr(type(getattr(model, "config", None)), "LEGACY_DEFAULTS", None) or {}
    missing = {k: v for k, v in legacy.items() if k not in params}
    return create_model(name, data_shape, **missing, **params) if missing else model


def _data_shape(data_shape: Any) -> tuple[int, ...]:
    """``data_shape`` as a tuple of positive ints (numpy ints and ``torch.Size`` welcome), or
    one :class:`~genkit.errors.InvalidParameterError` line."""
    dims = tuple(data_shape) if isinstance(data_shape, Iterable) else ()
    if not dims or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims
    ):
        raise InvalidParameterError(
            f"data_shape must be a tuple of positive ints such as (1, 28, 28) or (D,), "
            f"got {data_shape!r}"
        )
    return tuple(int(d) for d in dims)


def available_estimators() -> list[str]:
    """Names of every registered ELBO estimator, sorted."""
    return get_catalog().names("estimators")


def create_estimator(name: str, **params: Any):
    """Build the ELBO estimator registered as ``name`` (e.g. ``create_estimator("iwae", k=64)``)."""
    return get_catalog().build("estimators", name, **params)
