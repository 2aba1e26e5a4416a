"""Structuring parameters into attrs configs: no silent coercion, one clear line per fault."""

import attrs
import pytest
from attrs import validators as v

from genkit import ConfigError
from genkit.config import structure


@attrs.frozen(kw_only=True)
class Cfg:
    width: int = attrs.field(default=4, validator=v.ge(1))
    rate: float = 0.5
    mode: str = attrs.field(default="fast", validator=v.in_(("fast", "exact")))
    flag: bool = False
    sizes: list[int] = attrs.field(factory=lambda: [1, 2])
    limit: int | None = None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"width": 3.7}, "cfg: 'width': expected int, got 3.7"),  # cattrs' int() would give 3
        ({"width": True}, "cfg: 'width': expected int, got True"),
        ({"width": "8"}, "cfg: 'width': expected int, got '8'"),
        ({"rate": "0.1"}, "cfg: 'rate': expected float, got '0.1'"),
        ({"mode": 5}, "cfg: 'mode': expected str, got 5"),  # str() would give '5'
        ({"flag": 1}, "cfg: 'flag': expected bool, got 1"),
        ({"sizes": [1, 2.5]}, "expected int, got 2.5"),
        ({"limit": 1.5}, "expected int, got 1.5"),
        (
            {"mode": "fsat"},
            "cfg: 'mode' must be one of fast, exact, got 'fsat'; did you mean 'fast'?",
        ),
        ({"width": 0}, "cfg: 'width' must be >= 1: 0"),
    ],
)
def test_bad_values_are_one_line_naming_key_and_value(data, message):
    with pytest.raises(ConfigError) as err:
        structure(Cfg, data, where="cfg")
    assert message in str(err.value)
    assert "\n" not in str(err.value) and "Attribute(" not in str(err.value)


def test_good_values_keep_their_meaning():
    cfg = structure(
        Cfg, {"width": 1e1, "rate": 2, "mode": "exact", "flag": True, "limit": None}, where="cfg"
    )
    assert (cfg.width, cfg.rate, cfg.mode, cfg.flag, cfg.limit) == (10, 2.0, "exact", True, None)
    assert type(cfg.width) is int and type(cfg.rate) is float
