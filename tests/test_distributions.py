"""The discretized Gaussian and the other distributions genkit adds to torch."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from genkit import InvalidParameterError
from genkit.distributions import (
    DiscretizedGaussian,
    SignedBernoulli,
    discretized_gaussian_log_prob,
    quantize,
    sample,
    to_model_scale,
    to_pixels,
)

BINS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 bin centres on [-1, 1]


@pytest.mark.parametrize(
    ("loc", "scale"),
    [(0.0, 0.1), (0.3, 1e-3), (-0.97, 0.02), (1.5, 0.2), (-3.0, 0.5), (0.0, 50.0), (0.999, 1e-4)],
)
def test_probabilities_over_all_bins_sum_to_one(loc, scale):
    d = DiscretizedGaussian(
        torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64)
    )
    total = d.log_prob(BINS.double()).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-9)


def test_log_prob_matches_direct_cdf_difference():
    torch.manual_seed(0)
    loc = torch.rand(200, dtype=torch.float64) * 2 - 1
    scale = torch.rand(200, dtype=torch.float64) * 0.3 + 0.01
    x = BINS.double()[torch.randint(0, 256, (200,))]
    n = Normal(loc, scale)
    upper = torch.where(x > 1 - 1e-6, torch.ones_like(x), n.cdf(x + 1 / 255))
    lower = torch.where(x < -1 + 1e-6, torch.zeros_like(x), n.cdf(x - 1 / 255))
    direct = torch.log(upper - lower)
    ok = (upper - lower) > 1e-8  # where the direct computation is itself trustworthy
    assert ok.sum() > 100
    got = DiscretizedGaussian(loc, scale).log_prob(x)
    torch.testing.assert_close(got[ok], direct[ok], rtol=1e-7, atol=1e-9)


def test_log_prob_is_finite_and_right_in_the_far_tails():
    # a sharp decoder far from the data: Phi differences underflow, log space must not
    x = BINS[[128, 191, 0, 255]]
    loc = torch.tensor([0.9, -0.5, 0.5, -0.5], dtype=torch.float64)
    scale = torch.full((4,), 1e-2, dtype=torch.float64)
    lp = DiscretizedGaussian(loc, scale).log_prob(x)
    assert torch.isfinite(lp).all()
    # deep in a tail, log(Phi(b) - Phi(a)) ~ log pdf at the nearer edge + log(1 - e^{-...}):
    # compare with the asymptotic log-density at the bin's nearer edge times nothing more than 1
    z_near = ((x - loc).abs() - 1 / 255) / scale
    upper_bound = torch.special.log_ndtr(-z_near)  # P(bin) <= P(beyond the nearer edge)
    assert (lp <= upper_bound + 1e-9).all()
    assert (lp > upper_bound - 10).all()


def test_wide_scale_uses_midpoint_rule_without_underflow():
    x, loc, log_scale = torch.tensor([1 / 255]), torch.tensor([1 / 255]), torch.tensor([6.0])
    got = discretized_gaussian_log_prob(x, loc, log_scale)
    expected = Normal(0.0, math.exp(6.0)).log_prob(torch.tensor(0.0)) + math.log(2 / 255)
    assert got.item() == pytest.approx(expected.item(), abs=1e-3)


def test_float32_stays_right_for_wide_scales():
    # the CDF difference of a bin much narrower than the scale cancels in float32 (at s = 1e6 it
    # gave -69.8 instead of -19.6); compare with the float64 difference, accurate to ~1e-7 here
    g = torch.Generator().manual_seed(0)
    x = BINS[torch.randint(1, 255, (300,), generator=g)]  # interior bins
    loc = torch.rand(300, generator=g, dtype=torch.float64) * 2 - 1
    log_scale = torch.rand(300, generator=g, dtype=torch.float64) * math.log(1e6)
    n = Normal(loc, log_scale.exp())
    direct = torch.log(n.cdf(x + 1 / 255) - n.cdf(x - 1 / 255))
    log_scale32 = log_scale.float().requires_grad_(True)
    got = discretized_gaussian_log_prob(x.float(), loc.float(), log_scale32)
    torch.testing.assert_close(got.double(), direct.detach(), rtol=2e-5, atol=0.0)
    got.sum().backward()
    assert torch.isfinite(log_scale32.grad).all()


def test_sampling_matches_the_mass_function():
    d = DiscretizedGaussian(torch.tensor(0.98), torch.tensor(0.02))
    draws = d.sample((200_000,), generator=torch.Generator().manual_seed(1))
    assert d.support.check(draws).all()
    counts = torch.bincount(to_pixels(draws).long(), minlength=256).double() / draws.numel()
    probs = d.log_prob(BINS.float()).exp().double()
    assert (counts - probs).abs().max() < 5e-3
    assert counts[255] > 0.1  # the open edge bin collects the tail mass


def test_validation_rejects_values_off_the_8bit_grid():
    d = DiscretizedGaussian(torch.zeros(2), torch.ones(2), validate_args=True)
    on_grid = BINS[128].float()  # 1/255: a bin centre (0.0 is not one, it lies between two)
    off = torch.stack([on_grid, torch.tensor(0.5)])  # 0.5 is not a bin centre
    with pytest.raises(ValueError):
        d.log_prob(off)
    # one line naming the fault, not torch's dump of the whole tensor
    with pytest.raises(
        InvalidParameterError, match=r"1 value\(s\) are off that grid, e\.g\. 0\.5\b"
    ):
        d.log_prob(off)
    d.log_prob(BINS[[0, 255]].float())


def test_quantize_round_trip():
    k = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_pixels(to_model_scale(k)), k)
    assert torch.equal(quantize(to_model_scale(k) + 0.003), to_model_scale(k))


def test_signed_bernoulli_is_bernoulli_on_minus_one_plus_one():
    logits = torch.randn(10)
    x = torch.randint(0, 2, (10,)).float()
    torch.testing.assert_close(
        SignedBernoulli(logits=logits).log_prob(2 * x - 1), Bernoulli(logits=logits).log_prob(x)
    )
    s = sample(SignedBernoulli(logits=logits), (5,), torch.Generator().manual_seed(0))
    assert set(s.unique().tolist()) <= {-1.0, 1.0}


def test_generator_sampling_is_reproducible():
    d = torch.distributions.Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    a = sample(d, (4,), torch.Generator().manual_seed(7))
    b = sample(d, (4,), torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (4, 3)
