"""Structuring plain mappings (TOML tables, ``--set`` pairs, ``**params``) into attrs config
classes with cattrs, so that a typo is one clear line naming the key, where it came from and
the closest valid key."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from genkit.errors import ConfigError

T = TypeVar("T")

_converter = cattrs.Converter(forbid_extra_keys=True)


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
        leaf = _first_leaf(exc)
        note = next(iter(getattr(leaf, "__notes__", []) or []), "")
        raise ConfigError(f"{where}: {note + ': ' if note else ''}{leaf}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def unstructure(obj: Any) -> Any:
    """The plain-data form of an attrs config (for checkpoints, TOML and hparams)."""
    return _converter.unstructure(obj)
