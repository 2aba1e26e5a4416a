"""Ancestral (DDPM) and DDIM sampling."""

import pytest
import torch
from genkit_vdm.sampling import ddim_steps

import genkit
from genkit.distributions import quantize
from genkit.errors import InvalidParameterError


def _vdm(shape=(1, 8, 8), timesteps=12, **params):
    torch.manual_seed(0)
    m = genkit.create_model(
        "vdm", shape, timesteps=timesteps, channels=8, hidden=16, depth=1, **params
    )
    for p in m.parameters():  # a non-trivial net (the default's output layer starts at zero)
        torch.nn.init.normal_(p, std=0.2)
    return m


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_with_every_step_and_eta_1_is_the_ancestral_sampler(clip, parameterization):
    """With S = T and eta = 1, DDIM's sigma^2 is beta-tilde_t and its mean
    sqrt(ab_{t-1}) x0_hat + sqrt(1 - ab_{t-1} - sigma^2) eps_hat equals mu_q(x_t, x0_hat) once
    x_t = sqrt(ab_t) x0_hat + sqrt(1 - ab_t) eps_hat is substituted; both samplers draw x_T and
    then one normal per step from the generator in the same order, so the draws coincide."""
    m = _vdm(parameterization=parameterization)
    a = m.sample(6, generator=torch.Generator().manual_seed(5), clip=clip)
    b = m.sample(6, generator=torch.Generator().manual_seed(5), steps=12, eta=1.0, clip=clip)
    torch.testing.assert_close(a, b, atol=2 / 255, rtol=0)  # at most a bin apart (rounding)
    assert (a == b).float().mean() > 0.99
    c = m.sample(6, generator=torch.Generator().manual_seed(6), clip=clip)
    assert not torch.equal(a, c)


def test_samples_are_8bit_images_and_reproducible():
    m = _vdm()
    for params in ({}, {"steps": 4}, {"steps": 4, "eta": 0.5}, {"final": "sample"}):
        x = m.sample(5, generator=torch.Generator().manual_seed(1), **params)
        assert x.shape == (5, 1, 8, 8)
        assert x.min() >= -1 and x.max() <= 1
        torch.testing.assert_close(x, quantize(x))
        y = m.sample(5, generator=torch.Generator().manual_seed(1), **params)
        torch.testing.assert_close(x, y)


def test_ddim_eta_0_is_deterministic_given_x_t():
    m = _vdm()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = m.sample(4, generator=g1, steps=5, eta=0.0)
    b = m.sample(4, generator=g2, steps=5, eta=0.0)
    torch.testing.assert_close(a, b)
    assert g1.initial_seed() == 3 and torch.equal(g1.get_state(), g2.get_state())
    # only x_T was drawn: the generator advanced by exactly one (4, 1, 8, 8) normal draw
    g3 = torch.Generator().manual_seed(3)
    torch.randn((4, 1, 8, 8), generator=g3)
    assert torch.equal(g1.get_state(), g3.get_state())


def test_vector_samples_are_not_quantized():
    m = _vdm(shape=(3,))
    x = m.sample(7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (7, 3) and not torch.equal(x, quantize(x))


def test_ddim_step_grid():
    assert ddim_steps(10, 10) == list(range(1, 11))
    assert ddim_steps(1000, 4) == [1, 334, 667, 1000]
    assert ddim_steps(1, 1) == [1]
    with pytest.raises(InvalidParameterError, match="steps"):
        ddim_steps(10, 11)
    with pytest.raises(InvalidParameterError, match="steps >= 2"):
        ddim_steps(10, 1)
    with pytest.raises(InvalidParameterError, match="final"):
        _vdm().sample(2, final="mean")
