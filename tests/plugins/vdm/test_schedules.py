"""Noise schedules: the tables against independent formulas, and the ``register_schedules`` hook."""

import math
import types

import pytest
import torch
from genkit_vdm.schedules import DiscreteSchedule

import genkit
import genkit.registry
from genkit.errors import InvalidParameterError, UnknownNameError


def _alpha_bars(betas):
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return out


def test_linear_table_matches_ho_et_al_for_t_1000():
    m = genkit.create_model("vdm", (2,), timesteps=1000, schedule="linear", hidden=8, depth=1)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]  # linspace by hand
    ab = _alpha_bars(betas)
    assert ab[-1] == pytest.approx(4.0358e-5, rel=1e-3)  # the value diffusers' table ends on
    torch.testing.assert_close(m.encoder.betas[1:], torch.tensor(betas, dtype=torch.float64))
    for t in (1, 2, 500, 1000):
        assert m.encoder.alpha_bar(t).item() == pytest.approx(ab[t - 1], rel=1e-9)
        expected = math.log(ab[t - 1] / (1 - ab[t - 1]))
        assert m.encoder.log_snr(t).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert m.encoder.alpha_bar(0).item() == 1.0


def test_linear_keeps_its_end_points_for_other_t_as_diffusers_does():
    m = genkit.create_model("vdm", (2,), timesteps=10, hidden=8, depth=1)
    assert m.encoder.betas[1].item() == pytest.approx(1e-4)
    assert m.encoder.betas[10].item() == pytest.approx(0.02)
    # so with T = 10 the last latent is far from N(0, I): alpha_bar_T = prod(1 - beta) ~ 0.9
    assert m.encoder.alpha_bar(10).item() == pytest.approx(
        _alpha_bars(torch.linspace(1e-4, 0.02, 10).tolist())[-1]
    )


@pytest.mark.parametrize("timesteps", [1000, 50])
def test_cosine_table_matches_nichol_and_dhariwal(timesteps):
    m = genkit.create_model("vdm", (2,), timesteps=timesteps, schedule="cosine", hidden=8, depth=1)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / timesteps) / f(i / timesteps), 0.999) for i in range(timesteps)]
    torch.testing.assert_close(m.encoder.betas[1:], torch.tensor(betas, dtype=torch.float64))
    assert betas[-1] == 0.999  # the cap acts at the last step
    # before the cap, alpha_bar_t = f(t/T) / f(0)
    t = timesteps // 2
    assert m.encoder.alpha_bar(t).item() == pytest.approx(f(t / timesteps) / f(0), rel=1e-9)


def test_the_time_kind_and_the_schedule_kind_must_agree():
    """``timesteps=0`` is continuous time (a log-SNR schedule), ``timesteps >= 1`` discrete time
    (a table of betas): a schedule of the other kind is a clear error either way."""
    from genkit_vdm.continuous import ContinuousVDM
    from genkit_vdm.model import VDM

    for name in ("linear", "cosine"):
        with pytest.raises(InvalidParameterError, match=rf"'{name}' is a discrete-time schedule"):
            genkit.create_model("vdm", (2,), timesteps=0, schedule=name, hidden=8, depth=1)
    for name in ("learned", "fixed_linear"):
        with pytest.raises(InvalidParameterError, match=rf"'{name}' .* needs timesteps=0, got 10"):
            genkit.create_model("vdm", (2,), timesteps=10, schedule=name, hidden=8, depth=1)
    continuous = genkit.create_model("vdm", (2,), timesteps=0, hidden=8, depth=1)
    assert type(continuous) is ContinuousVDM and type(continuous.schedule).__name__ == "Learned"
    fixed = genkit.create_model(
        "vdm", (2,), timesteps=0, schedule="fixed_linear", hidden=8, depth=1
    )
    assert type(fixed) is ContinuousVDM and type(fixed.schedule).__name__ == "FixedLinear"
    assert type(genkit.create_model("vdm", (2,), timesteps=3, hidden=8, depth=1)) is VDM
    # the discrete-time estimator settings are refused in continuous time
    for params in ({"t_proposal": "uniform"}, {"reconstruction_every_step": True}):
        with pytest.raises(InvalidParameterError, match="discrete time only"):
            genkit.create_model("vdm", (2,), timesteps=0, hidden=8, depth=1, **params)


def test_unknown_schedule_lists_the_registered_ones():
    with pytest.raises(UnknownNameError, match="cosine, diffusers, fixed_linear, learned, linear"):
        genkit.create_model("vdm", (2,), schedule="cosin")


def test_schedule_parameters_reach_the_factory_and_are_checked():
    m = genkit.create_model(
        "vdm", (2,), timesteps=5, schedule_params={"beta_end": 0.5}, hidden=8, depth=1
    )
    assert m.encoder.betas[5].item() == pytest.approx(0.5)
    with pytest.raises(InvalidParameterError, match="beta_start"):
        genkit.create_model(
            "vdm", (2,), timesteps=5, schedule_params={"beta_start": 0.9, "beta_end": 0.5}
        )
    with pytest.raises(InvalidParameterError, match="valid parameters"):
        genkit.create_model("vdm", (2,), timesteps=5, schedule_params={"bogus": 1.0})


def test_a_plugin_schedule_is_used_through_the_catalogue(monkeypatch):
    def constant(timesteps: int, beta: float = 0.1) -> DiscreteSchedule:
        """Every beta_t = beta."""
        return DiscreteSchedule(torch.full((timesteps,), beta), name="constant")

    plugin = types.SimpleNamespace(
        register_schedules=genkit.hookimpl(lambda register: register("constant", constant)),
        __name__="constant_schedule",
    )
    catalog = genkit.make_plugin_manager(plugins=[plugin])
    assert {"linear", "cosine", "constant"} <= set(catalog.names("schedules"))
    monkeypatch.setattr(genkit.registry, "get_catalog", lambda: catalog)
    m = genkit.create_model("vdm", (2,), timesteps=4, schedule="constant", hidden=8, depth=1)
    assert m.encoder.alpha_bar(4).item() == pytest.approx(0.9**4)
