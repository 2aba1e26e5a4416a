"""Ancestral (DDPM) and DDIM sampling."""

import math

import pytest
import torch
from genkit_vdm.sampling import ddim_steps
from torch import nn

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
    assert ddim_steps(10, 1) == [10]  # one jump from x_T
    with pytest.raises(InvalidParameterError, match="steps"):
        ddim_steps(10, 11)
    with pytest.raises(InvalidParameterError, match="final"):
        _vdm().sample(2, final="mean")


def test_bad_sampling_arguments_are_one_clear_error():
    m = _vdm(shape=(3,))
    for n in (0, -2, 2.5, True):
        with pytest.raises(InvalidParameterError, match="n must be an integer >= 1"):
            m.sample(n)
    for eta in (-0.5, float("nan"), "1"):
        with pytest.raises(InvalidParameterError, match="eta must be a number >= 0"):
            m.sample(2, steps=3, eta=eta)
    with pytest.raises(InvalidParameterError, match=r"integer in 1\.\.T = 12"):
        m.sample(2, steps=0)


class HalfInput(nn.Module):
    """``eps_hat = x_t / 2``; records the steps it is called at."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x_t, t):
        self.calls.append(sorted(set(t.tolist())))
        return self.scale * x_t


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_ddim_makes_one_network_call_per_step_and_one_step_is_a_jump_from_x_T(steps):
    """S network calls at tau_S = T > ... > tau_1 (= 1 for S >= 2); with S = 1 the image is the
    quantized x0_hat(x_T, T) = (x_T - sqrt(1 - ab_T) eps_hat) / sqrt(ab_T), computed by hand."""
    net = HalfInput()
    m = genkit.create_model("vdm", (1, 4, 4), timesteps=12, net=net)
    x = m.sample(3, generator=torch.Generator().manual_seed(2), steps=steps, clip=False)
    called = [c[0] for c in net.calls]
    assert all(len(c) == 1 for c in net.calls) and called == sorted(called, reverse=True)
    assert len(called) == steps and called[0] == 12 and (steps == 1 or called[-1] == 1)
    if steps == 1:
        x_T = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(2))
        ab = math.prod(1 - b for b in torch.linspace(1e-4, 0.02, 12, dtype=torch.float64).tolist())
        x0_hat = (x_T - math.sqrt(1 - ab) * 0.5 * x_T) / math.sqrt(ab)
        torch.testing.assert_close(x, quantize(x0_hat), atol=2 / 255, rtol=0)
        assert (x == quantize(x0_hat)).float().mean() > 0.9
