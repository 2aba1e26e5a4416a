"""What made a run folder: the resolved settings of the run, the identity of its data and the
genkit version. A run folder records it (``config.json`` key ``made_by``, and a finished
recipe run's ``result.json``); a run is reused or resumed only when what would make it now is
the same (:func:`changes`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import metadata
from typing import Any

#: The key of the record in ``config.json`` and ``result.json``.
KEY = "made_by"


def genkit_version() -> str:
    """The installed genkit's version (``0+unknown`` when it is not installed)."""
    try:
        return metadata.version("genkit")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists, paths strings), so that a
    record read from disk compares equal to one made now."""
    return json.loads(json.dumps(value, default=str))


def made_by(settings: Mapping[str, Any], data: Mapping[str, Any], command: str) -> dict[str, Any]:
    """The record of a run made by ``command`` (``genkit run``, ``genkit train``) with
    ``settings`` (model, parameters, train config, budget, evaluation: whatever decides its
    result) on the data identified by ``data`` (:func:`genkit.data.identity.data_identity`:
    spec, path, size, content fingerprint)."""
    return {
        "command": command,
        "settings": plain(dict(settings)),
        "data": plain(dict(data)),
        "genkit_version": genkit_version(),
    }


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = "(none)" if value is _MISSING else json.dumps(value, default=str)
    if isinstance(value, str) and value.startswith("sha256:"):
        text = value[:19] + "…"
    return text if len(text) <= 60 else text[:57] + "…"


_MISSING = object()
#: What identifies data: its spec and its content; where a built-in's cache lies does not.
_DATA_KEYS = ("spec", "bytes", "fingerprint")


def changes(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """What differs between the record of a run folder and the record of the run that would
    be made now, one ``key: old -> new`` line each; empty when they match. A folder with no
    record (an older genkit's) differs in every respect, as one line."""
    if not recorded:
        return ["the folder records nothing of what made it (an older genkit, or not a run)"]
    old, new = _flat(recorded.get("settings", {})), _flat(current.get("settings", {}))
    lines = []
    keys = set(old) | set(new)
    made, making = recorded.get("command"), current.get("command")
    if made != making:  # e.g. `genkit train --resume` went on with a recipe's run
        lines.append(f"made by `{made}`, not `{making}`")
        keys = set(old) & set(new)  # the other command's record has other keys
    for key in sorted(keys, key=lambda k: (k not in new, k)):
        a, b = old.get(key), new.get(key)  # an absent key is a null one
        if a != b:
            lines.append(f"{key}: {_short(_MISSING if key not in old else a)} -> {_short(b)}")
    old_data, new_data = recorded.get("data") or {}, current.get("data") or {}
    for key in _DATA_KEYS:
        a, b = old_data.get(key, _MISSING), new_data.get(key, _MISSING)
        if a != b:
            lines.append(f"data {key}: {_short(a)} -> {_short(b)}")
    if recorded.get("genkit_version") != current.get("genkit_version"):
        a, b = recorded.get("genkit_version", _MISSING), current.get("genkit_version")
        lines.append(f"genkit version: {_short(a)} -> {_short(b)}")
    return lines


def summary(lines: list[str], most: int = 4) -> str:
    """``lines`` joined for one message line, the first ``most`` of them and a count."""
    shown = "; ".join(lines[:most])
    return shown + (f"; and {len(lines) - most} more" if len(lines) > most else "")


def data_changes(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """The lines of :func:`changes` about the data alone (for ``genkit train --resume`` and
    ``genkit eval``, whose settings may change by design)."""
    if not recorded or not recorded.get("data"):
        return []
    return [line for line in changes(recorded, current) if line.startswith("data ")]
