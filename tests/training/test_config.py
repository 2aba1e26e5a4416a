import math

import pytest

from genkit.errors import ConfigError
from genkit.training.config import (
    TrainConfig,
    apply_overrides,
    config_dict,
    make_config,
    parse_value,
)


def test_values_are_toml_literals_with_bare_words_as_strings():
    assert parse_value("1e-3") == 1e-3
    assert parse_value("true") is True
    assert parse_value("[0.9, 0.99]") == [0.9, 0.99]
    assert parse_value("{prior_matching=0.5}") == {"prior_matching": 0.5}
    assert parse_value("bf16") == "bf16"
    assert parse_value('"3"') == "3"


def test_overrides_split_train_model_and_table_entries():
    train, model = apply_overrides(
        {"objective_weights": {"reconstruction": 2.0}},
        {"hidden": 16},
        [
            "lr=1e-3",
            "betas=[0.8, 0.9]",
            "objective_weights.prior_matching=0.5",
            "lr_multipliers.encoder.schedule=0.1",
            "model.latent_dim=8",
            "precision=bf16",
        ],
    )
    cfg = make_config(train)
    assert cfg.lr == 1e-3 and cfg.betas == (0.8, 0.9) and cfg.precision == "bf16"
    assert cfg.objective_weights == {"reconstruction": 2.0, "prior_matching": 0.5}
    assert cfg.lr_multipliers == {"encoder.schedule": 0.1}  # the key is the rest, dots and all
    assert model == {"hidden": 16, "latent_dim": 8}


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown key 'lrr'; did you mean 'lr'"):
        apply_overrides({}, {}, ["lrr=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, {}, ["steps"])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"precision": "fp16"}, "precision' must be one of fp32, bf16"),
        ({"steps": 0}, "steps"),
        ({"betas": [1.0, 0.5]}, "betas"),
        ({"objective_weights": {"kl": float("nan")}}, "finite"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"eval_every": -1}, "eval_every"),
    ],
)
def test_validators_give_config_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        make_config(data)


def test_lr_schedule_warms_up_then_cosine_decays():
    cfg = TrainConfig(lr_warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert cfg.lr_factor(0, 110) == pytest.approx(0.1)
    assert cfg.lr_factor(9, 110) == pytest.approx(1.0)
    assert cfg.lr_factor(10, 110) == pytest.approx(1.0)
    # halfway through the cosine: r + (1 - r) / 2
    assert cfg.lr_factor(60, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert cfg.lr_factor(110, 110) == pytest.approx(0.1)
    const = TrainConfig(lr_warmup_steps=0, schedule="constant")
    assert const.lr_factor(0, 10) == const.lr_factor(9, 10) == 1.0


def test_term_weights_ramp_linearly():
    cfg = TrainConfig(
        objective_weights={"prior_matching": 0.5}, warmup_terms=["prior_matching"], warmup_steps=4
    )
    assert cfg.term_weights(0) == {"prior_matching": 0.0}
    assert cfg.term_weights(2) == {"prior_matching": 0.25}
    assert cfg.term_weights(10) == {"prior_matching": 0.5}
    assert TrainConfig(warmup_terms=["x"], warmup_steps=2).term_weights(1) == {"x": 0.5}


def test_config_round_trips_through_plain_data():
    cfg = TrainConfig(betas=(0.8, 0.95), objective_weights={"a": 2.0}, eval_estimator="iwae")
    assert make_config(config_dict(cfg)) == cfg
