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


def _log_prob_reference(x, loc, log_scale):
    """log P(bin) in float64 by torch's own log_ndtr, for bins that lie wholly below ``loc``:
    the left edge bin ``log Phi(u)``, an interior bin ``log(Phi(u) - Phi(l))`` in log space."""
    s = log_scale.exp()
    u, l = (x + 1 / 255 - loc) / s, (x - 1 / 255 - loc) / s
    log_u, log_l = torch.special.log_ndtr(u), torch.special.log_ndtr(l)
    interior = log_u + torch.log(-torch.expm1(log_l - log_u))
    return torch.where(x < -1 + 1e-6, log_u, interior)


def test_float32_gradients_are_right_far_in_the_tails():
    # a sharp decoder (scale e^-7) whose mean misses a pixel by 0.3 to 30 sits 300 to 3e4
    # scales away; torch's float32 log_ndtr backward is 4% off at 1e3 and 6x off at 1e4
    g = torch.Generator().manual_seed(0)
    n = 400
    x = BINS[torch.randint(0, 255, (n,), generator=g)]  # left edge and interior bins
    log_scale = -7 + 5 * torch.rand(n, generator=g, dtype=torch.float64)
    dist = torch.exp(math.log(30) + math.log(1e3) * torch.rand(n, generator=g, dtype=torch.float64))
    loc = x + 1 / 255 + dist * log_scale.exp()  # every bin lies below loc, 30 to 3e4 scales off
    ref_loc, ref_ls = loc.clone().requires_grad_(), log_scale.clone().requires_grad_()
    want = torch.autograd.grad(_log_prob_reference(x, ref_loc, ref_ls).sum(), [ref_loc, ref_ls])
    loc32, ls32 = loc.float().requires_grad_(), log_scale.float().requires_grad_()
    got = torch.autograd.grad(
        discretized_gaussian_log_prob(x.float(), loc32, ls32).sum(), [loc32, ls32]
    )
    for g32, g64 in zip(got, want, strict=True):
        torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-3)


def test_gradients_stay_finite_for_any_mean():
    loc = torch.tensor([-1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4]).repeat_interleave(256)
    loc.requires_grad_(True)
    log_scale = torch.full_like(loc, -7.0, requires_grad=True)
    lp = discretized_gaussian_log_prob(BINS.float().repeat(7), loc, log_scale)
    lp.sum().backward()
    assert torch.isfinite(lp).all()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()


def test_enumerate_support_carries_all_the_mass_in_float32():
    loc = torch.tensor([[-1.3, -0.2, 0.0], [0.5, 0.999, 4.0]])
    scale = torch.tensor([[0.01, 1e-3, 30.0], [0.3, 2e-4, 1.0]])
    d = DiscretizedGaussian(loc, scale)
    bins = d.enumerate_support()
    assert bins.shape == (256, 2, 3)
    torch.testing.assert_close(bins[:, 1, 2], BINS.float(), atol=1e-6, rtol=0)
    assert d.enumerate_support(expand=False).shape == (256, 1, 1)
    torch.testing.assert_close(d.log_prob(bins).exp().sum(0), torch.ones(2, 3), atol=1e-5, rtol=0)


def test_mode_is_the_most_probable_bin():
    # near an edge with a wide scale the open edge bin outweighs the bin holding loc
    loc = torch.tensor([1 - 1.2 / 255, -1 + 1.2 / 255, 0.3, -0.55, 1.7, -4.0, 0.998])
    scale = torch.tensor([0.5, 0.5, 0.01, 3.0, 0.2, 1.0, 1e-3], dtype=torch.float32)
    d = DiscretizedGaussian(loc, scale)
    bins = d.enumerate_support()
    brute = bins.gather(0, d.log_prob(bins).argmax(0, keepdim=True)).squeeze(0)
    torch.testing.assert_close(d.mode, brute, atol=1e-6, rtol=0)
    assert d.mode[0] == 1.0 and quantize(loc)[0] != 1.0  # the case a nearest-bin mode gets wrong


def test_signed_bernoulli_moments_and_support():
    logits = torch.tensor([-2.0, 0.3, 1.5])
    d = SignedBernoulli(logits=logits)
    values = d.enumerate_support()
    assert values[:, 0].tolist() == [-1.0, 1.0]
    p = d.log_prob(values).exp()
    torch.testing.assert_close(p.sum(0), torch.ones(3))
    mean = (values * p).sum(0)
    torch.testing.assert_close(d.mean, mean)
    torch.testing.assert_close(d.variance, ((values - mean) ** 2 * p).sum(0))


@pytest.mark.parametrize("bad", [-3.0, 0.0, 0.5])
def test_signed_bernoulli_rejects_values_other_than_plus_minus_one(bad):
    d = SignedBernoulli(logits=torch.zeros(3), validate_args=True)
    with pytest.raises(
        InvalidParameterError, match=r"needs binarized data in \{-1, \+1\}.*1 value\(s\)"
    ):
        d.log_prob(torch.tensor([1.0, bad, -1.0]))


def test_likelihoods_from_bf16_network_outputs_work_in_float32():
    from genkit.likelihoods import likelihood

    params = torch.randn(2, 2, 4, 4, dtype=torch.bfloat16)
    dist = likelihood("discretized_gaussian", params, 3)
    assert dist.base_dist.loc.dtype == torch.float32
    k = torch.randint(0, 256, (2, 1, 4, 4))
    # every draw and the mode land exactly on the 8-bit grid (bf16 would round 0.302 off it)
    for values in (dist.sample(), dist.base_dist.mode, to_model_scale(k)):
        assert values.dtype == torch.float32 and dist.base_dist.support.check(values).all()
    assert dist.log_prob(to_model_scale(k)).dtype == torch.float32
