"""Structuring plain mappings (TOML tables, ``--set`` pairs, ``**params``) into attrs config
classes with cattrs, so that a typo is one clear line naming the key, where it came from and
the closest valid key."""

from __future__ import annotations

import difflib
import numbers
import re
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from genkit.errors import ConfigError

T = TypeVar("T")

_converter = cattrs.Converter(forbid_extra_keys=True)


def _strict(kind: type, accepts: tuple[type, ...], convert: bool = False):
    """A structure hook taking only ``accepts`` (never ``bool`` for numbers) instead of
    cattrs' ``kind(value)``, which turns ``3.7`` into ``3``, ``True`` into ``1`` and ``5``
    into ``'5'``. An ``int`` field takes a float only when it is whole (TOML's ``1e4``)."""

    def hook(value: Any, _type: type) -> Any:
        ok = isinstance(value, accepts) and (kind is bool or not isinstance(value, bool))
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not ok or (kind is int and isinstance(value, float)):
            raise TypeError(f"expected {kind.__name__}, got {value!r}")
        return kind(value) if convert else value

    return hook


_converter.register_structure_hook(int, _strict(int, (numbers.Integral, float), convert=True))
_converter.register_structure_hook(float, _strict(float, (numbers.Real,), convert=True))
_converter.register_structure_hook(str, _strict(str, (str,)))
_converter.register_structure_hook(bool, _strict(bool, (bool,)))


def did_you_mean(name: str, valid: typing.Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def field_names(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls)]


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def structure(cls: type[T], data: Mapping[str, Any], *, where: str) -> T:
    """Build the attrs class ``cls`` from ``data``, or raise :class:`ConfigError`.

    ``where`` names the source for the message, e.g. ``"model 'vae'"`` or ``"recipe.toml [trainer]"``.
    Unknown keys, wrong types and failed validators each give one line.
    """
    valid = field_names(cls)
    unknown = [k for k in data if k not in valid]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{where}: unknown key '{key}'{did_you_mean(key, valid)} (valid keys: {', '.join(valid)})"
        )
    try:
        return _converter.structure(dict(data), cls)
    except (ClassValidationError, ForbiddenExtraKeysError) as exc:
        raise ConfigError(f"{where}: {_message(_first_leaf(exc))}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {_message(exc)}") from None


def _message(exc: BaseException) -> str:
    """One line for a failed structure: the key, what it needs and what it got."""
    args = exc.args
    if len(args) == 4 and isinstance(args[1], attrs.Attribute):
        name, rule, value = args[1].name, args[2], args[3]
        if isinstance(rule, re.Pattern):  # attrs' matches_re validator
            return f"'{name}' must match {rule.pattern}, got {value!r}"
        options = [str(o) for o in rule]  # attrs' in_ validator
        return (
            f"'{name}' must be one of {', '.join(options)}, got {value!r}"
            f"{did_you_mean(str(value), options)}"
        )
    if isinstance(exc, KeyError) and len(args) == 1 and isinstance(args[0], str):
        return f"missing key '{args[0]}'"  # cattrs: a required field that is absent
    text = args[0] if args and isinstance(args[0], str) else str(exc)
    notes = getattr(exc, "__notes__", None) or []
    where = re.search(r"@ attribute (\w+)", notes[0]) if notes else None
    if where is None or text.startswith(f"'{where[1]}'"):
        return text
    return f"'{where[1]}': {text}"


def unstructure(obj: Any) -> Any:
    """The plain-data form of an attrs config (for checkpoints, TOML and hparams)."""
    return _converter.unstructure(obj)
