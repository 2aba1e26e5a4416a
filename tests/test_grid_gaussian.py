"""The grid Gaussian (Kingma et al.'s VDM decoder ``p(x|z_0) ∝ q(z_0|x)`` over the 256 values),
against brute force, quadrature and the bin-mass discretized Gaussian."""

import math

import pytest
import torch
from torch.distributions import Categorical

from genkit import InvalidParameterError
from genkit.distributions import DiscretizedGaussian, GridGaussian, quantize, sample

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # x_k = k / 127.5 - 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("loc", "scale"), [(0.0, 0.1), (0.3, 1e-3), (-0.97, 0.02), (1.5, 0.2), (-3.0, 0.5), (0.0, 50.0)]
)
def test_probabilities_over_the_256_values_sum_to_one(loc, scale, dtype):
    d = GridGaussian(torch.tensor(loc, dtype=dtype), torch.tensor(scale, dtype=dtype))
    total = d.log_prob(d.enumerate_support()).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-12 if dtype == torch.float64 else 1e-5)


def test_log_prob_matches_a_brute_force_loop_and_categorical():
    g = torch.Generator().manual_seed(0)
    loc = torch.rand(6, generator=g, dtype=torch.float64) * 2.4 - 1.2
    scale = torch.rand(6, generator=g, dtype=torch.float64) * 0.05 + 1e-3
    k = torch.randint(0, 256, (6,), generator=g)
    got = GridGaussian(loc, scale).log_prob(GRID[k])
    for i in range(6):
        m, s = loc[i].item(), scale[i].item()
        logits = [-((j / 127.5 - 1 - m) ** 2) / (2 * s * s) for j in range(256)]
        top = max(logits)
        log_norm = top + math.log(sum(math.exp(v - top) for v in logits))
        assert got[i].item() == pytest.approx(logits[k[i]] - log_norm, rel=1e-12, abs=1e-12)
        cat = Categorical(logits=torch.tensor(logits, dtype=torch.float64))
        assert got[i].item() == pytest.approx(cat.log_prob(k[i]).item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(
        GridGaussian(loc, scale).logits.gather(-1, k[:, None]).squeeze(-1), got
    )


def _bits_lost(decoder, k: int, log_snr: float = 13.3, points: int = 4001) -> float:
    """``-E_{z_0 ~ q(z_0|x)}[log2 p(x|z_0)]`` for the pixel ``x = k/127.5 - 1`` by the trapezoid
    rule over ``eps`` in [-12, 12] (``z_0 = alpha_0 x + sigma_0 eps``)."""
    alpha = math.sqrt(1 / (1 + math.exp(-log_snr)))
    sigma = math.sqrt(1 / (1 + math.exp(log_snr)))
    eps = torch.linspace(-12, 12, points, dtype=torch.float64)
    density = torch.exp(-0.5 * eps**2) / math.sqrt(2 * math.pi)
    x = torch.full_like(eps, k / 127.5 - 1)
    z_0 = alpha * x + sigma * eps
    log_p = decoder(z_0 / alpha, torch.full_like(eps, sigma / alpha)).log_prob(x)
    return -torch.trapezoid(density * log_p, eps).item() / math.log(2)


@pytest.mark.parametrize(
    ("k", "bin_mass", "softmax"),
    [(100, 0.051, 0.010), (0, 0.026, 0.005), (255, 0.026, 0.005)],
)
def test_quadrature_cost_at_log_snr_13_3(k, bin_mass, softmax):
    """The issue's figures: at lambda(0) = 13.3 the bin mass loses 0.051 bits on an interior
    pixel (0.026 on an edge pixel), Kingma's softmax 0.010 (0.005)."""
    assert _bits_lost(DiscretizedGaussian, k) == pytest.approx(bin_mass, abs=5e-4)
    assert _bits_lost(GridGaussian, k) == pytest.approx(softmax, abs=5e-4)
    assert _bits_lost(GridGaussian, k) < _bits_lost(DiscretizedGaussian, k) / 4


@pytest.mark.parametrize("decoder", [GridGaussian, DiscretizedGaussian])
def test_sharp_decoder_gives_log_p_zero_on_the_grid(decoder):
    """sigma_0 -> 0: z_0 / alpha_0 -> x, and both decoders put all their mass on x."""
    x = GRID[[0, 1, 77, 128, 254, 255]]
    g = torch.Generator().manual_seed(1)
    for scale in (1e-4, 1e-6):
        loc = x + scale * torch.randn(x.shape, generator=g, dtype=torch.float64)
        lp = decoder(loc, torch.full_like(x, scale)).log_prob(x)
        assert lp.abs().max().item() < 1e-6


def test_sampling_matches_the_mass_function_and_takes_a_generator():
    d = GridGaussian(torch.tensor([0.013, -0.99]), torch.tensor([0.01, 0.004]))
    draws = sample(d, (40_000,), torch.Generator().manual_seed(0))
    again = sample(d, (40_000,), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert draws.shape == (40_000, 2)
    p = d.logits.exp().double()  # (2, 256)
    for i in range(2):
        k = ((draws[:, i].double() + 1) * 127.5).round().long()
        freq = torch.bincount(k, minlength=256).double() / k.numel()
        big = p[i] > 1e-3
        se = (p[i] * (1 - p[i]) / k.numel()).sqrt()
        assert ((freq - p[i]).abs()[big] < 5 * se[big]).all()
        assert freq[~big].sum() < 0.01


def test_mode_mean_and_variance_by_enumeration():
    loc = torch.tensor([0.0131, -0.5, 1.7, -2.0], dtype=torch.float64)
    scale = torch.tensor([0.003, 0.2, 0.05, 3.0], dtype=torch.float64)
    d = GridGaussian(loc, scale)
    p = d.log_prob(d.enumerate_support()).exp()  # (256, 4)
    torch.testing.assert_close(d.mode, GRID[p.argmax(0)])
    torch.testing.assert_close(d.mode, quantize(loc))
    mean = (p * GRID[:, None]).sum(0)
    torch.testing.assert_close(d.mean, mean)
    torch.testing.assert_close(d.variance, (p * (GRID[:, None] - mean) ** 2).sum(0))


def test_validation_rejects_values_off_the_grid():
    d = GridGaussian(torch.zeros(3), torch.ones(3), validate_args=True)
    with pytest.raises(InvalidParameterError, match="grid Gaussian needs 8-bit data"):
        d.log_prob(torch.tensor([0.0, 0.001, 0.5]))


@pytest.mark.parametrize("scale", [1e-5, 1e-3, 0.0013, 0.01, 0.03, 0.1, 0.5])
def test_windowed_normaliser_equals_the_sum_over_all_256_values(scale):
    """log_normaliser sums over the 2W + 1 centres nearest loc (W from scale); against the
    plain logsumexp over the whole grid, for loc inside and beyond [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    loc = torch.rand(500, generator=g, dtype=torch.float64) * 2.6 - 1.3
    d = GridGaussian(loc, torch.full_like(loc, scale))
    energy = -0.5 * ((GRID - loc[:, None]) / scale) ** 2  # (500, 256)
    torch.testing.assert_close(
        d.log_normaliser(), torch.logsumexp(energy, -1), rtol=1e-13, atol=1e-13
    )
    # and its gradient in loc: d/dloc log Z = E_P[(x_k - loc)] / scale^2
    loc.requires_grad_(True)
    (grad,) = torch.autograd.grad(
        GridGaussian(loc, torch.full_like(loc, scale)).log_normaliser().sum(), loc
    )
    p = torch.softmax(energy, -1)
    expected = (p * (GRID - loc[:, None].detach())).sum(-1) / scale**2
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9 / scale)
