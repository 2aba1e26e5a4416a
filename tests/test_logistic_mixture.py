"""The discretized mixture of logistics (PixelCNN++) and its likelihood layout, against
independent computations: torch's own logistic CDF, brute-force loops and counts of draws."""

import itertools
import math

import pytest
import torch
from einops import rearrange
from torch.distributions import (
    AffineTransform,
    Independent,
    SigmoidTransform,
    TransformedDistribution,
    Uniform,
)

from genkit import InvalidParameterError
from genkit.distributions import sample, to_pixels
from genkit.likelihoods import likelihood, num_outputs
from genkit.logistic import (
    DiscretizedLogisticMixture,
    DiscretizedLogisticMixtureRGB,
    discretized_logistic_log_prob,
)

BINS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 bin centres on [-1, 1]
MIX = "discretized_logistic_mixture"


def _torch_logistic_cdf(x, loc, scale):
    """torch's own logistic CDF: loc + scale * logit(u), u ~ U(0, 1) (it clips to
    [eps, 1 - eps], so it is exact only for values well above eps)."""
    base = Uniform(torch.zeros_like(loc), torch.ones_like(loc), validate_args=False)
    transforms = [SigmoidTransform().inv, AffineTransform(loc, scale)]
    return TransformedDistribution(base, transforms, validate_args=False).cdf(x)


def _sigmoid_cdf(x, loc, scale):
    return torch.sigmoid((x - loc) / scale)


def _reference_mass(x, loc, scale, cdf=_sigmoid_cdf):
    """P(bin x) of one discretized logistic as a CDF difference (float64), edge bins open.
    Bins above ``loc`` are scored in the mirror image (x -> -x, loc -> -loc), so that the
    difference is always of the two small CDF values, which keep their digits."""
    sign = torch.where(x > loc, -1.0, 1.0).to(loc.dtype)
    y, m = sign * x, sign * loc
    upper = torch.where(y > 1 - 1e-6, torch.ones_like(m), cdf(y + 1 / 255, m, scale))
    lower = torch.where(y < -1 + 1e-6, torch.zeros_like(m), cdf(y - 1 / 255, m, scale))
    return upper - lower


def _extreme_params(n, k, dtype, seed=0):
    """Mixture parameters (n, k) with locs far outside [-1, 1] and log-scales in [-7, 7]."""
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(n, k, generator=g, dtype=dtype)
    far = torch.tensor([-1e4, -50.0, -3.0, -1.0, 1.0, 3.0, 50.0, 1e4], dtype=dtype)
    near = torch.rand(n, k, generator=g, dtype=dtype) * 2.2 - 1.1
    loc = torch.where(torch.rand(n, k, generator=g) < 0.3, far[torch.randint(0, 8, (n, k))], near)
    log_scale = torch.rand(n, k, generator=g, dtype=dtype) * 14 - 7
    return logits, loc, log_scale


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_the_256_bins_carry_all_the_mass(dtype, atol):
    logits, loc, log_scale = _extreme_params(300, 4, dtype)
    d = DiscretizedLogisticMixture.from_log_scale(logits, loc, log_scale)
    bins = d.enumerate_support()
    assert bins.shape == (256, 300) and bins.dtype == dtype
    total = d.log_prob(bins).exp().sum(0)
    torch.testing.assert_close(total, torch.ones_like(total), atol=atol, rtol=0)


def test_one_component_is_the_discretized_logistic():
    g = torch.Generator().manual_seed(1)
    n = 400
    x = BINS[torch.randint(0, 256, (n,), generator=g)]
    x[:20], x[20:40] = -1.0, 1.0  # the open edge bins, surely
    loc = torch.rand(n, generator=g, dtype=torch.float64) * 3 - 1.5
    scale = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * 9 - 7)
    want = _reference_mass(x, loc, scale, cdf=_torch_logistic_cdf)
    ok = want > 1e-8  # where torch's clipped CDF is exact to 1e-7 relative
    assert ok.sum() > 200
    d = DiscretizedLogisticMixture(torch.zeros(n, 1), loc.unsqueeze(-1), scale.unsqueeze(-1))
    got = d.log_prob(x)
    torch.testing.assert_close(got[ok], want[ok].log(), rtol=1e-7, atol=1e-9)


def test_mixture_is_the_weighted_sum_of_component_masses():
    g = torch.Generator().manual_seed(2)
    n, k = 60, 5
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    loc = torch.rand(n, k, generator=g, dtype=torch.float64) * 2.4 - 1.2
    scale = torch.exp(torch.rand(n, k, generator=g, dtype=torch.float64) * 4 - 5)
    x = BINS[torch.randint(0, 256, (n,), generator=g)]
    got = DiscretizedLogisticMixture(logits, loc, scale).log_prob(x)
    for i in range(n):  # one element at a time, in probability space
        weights = [math.exp(v) for v in logits[i].tolist()]
        p = sum(
            w / sum(weights) * _reference_mass(x[i], loc[i, j], scale[i, j]).item()
            for j, w in enumerate(weights)
        )
        assert got[i].item() == pytest.approx(math.log(p), rel=1e-9, abs=1e-9)


def test_float32_is_right_for_scales_wide_against_a_bin():
    # where a Gaussian's CDF difference cancels in float32 (it needs its midpoint rule); the
    # reference is the plain sigmoid difference in float64, accurate to ~1e-10 relative here
    g = torch.Generator().manual_seed(3)
    x = BINS[torch.randint(1, 255, (300,), generator=g)]
    loc = torch.rand(300, generator=g, dtype=torch.float64) * 2 - 1
    log_scale = torch.rand(300, generator=g, dtype=torch.float64) * 7
    s = log_scale.exp()
    want = torch.log(
        torch.sigmoid((x + 1 / 255 - loc) / s) - torch.sigmoid((x - 1 / 255 - loc) / s)
    )
    got = discretized_logistic_log_prob(x.float(), loc.float(), log_scale.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0.0)


def test_values_and_gradients_are_finite_for_extreme_parameters_in_float32():
    locs = torch.tensor([-1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4])
    grid = list(itertools.product(locs.tolist(), [-7.0, 0.0, 7.0], [-30.0, 0.0, 30.0]))
    loc, log_scale, logits = (torch.tensor(v) for v in zip(*grid, strict=True))
    shape = (256, len(grid), 2)  # every bin, every setting, two components
    loc = torch.stack([loc, -loc], -1).expand(shape).clone().requires_grad_(True)
    log_scale = torch.stack([log_scale, log_scale.flip(0)], -1).expand(shape)
    log_scale = log_scale.clone().requires_grad_(True)
    logits = torch.stack([logits, torch.zeros_like(logits)], -1).expand(shape)
    logits = logits.clone().requires_grad_(True)
    x = BINS.float().view(256, 1).expand(shape[:-1])
    lp = DiscretizedLogisticMixture.from_log_scale(logits, loc, log_scale).log_prob(x)
    lp.sum().backward()
    assert torch.isfinite(lp).all()
    for grad in (logits.grad, loc.grad, log_scale.grad):
        assert torch.isfinite(grad).all()
    # and the float32 values are the float64 ones, far tails included
    lp64 = DiscretizedLogisticMixture.from_log_scale(
        logits.double(), loc.double(), log_scale.double()
    ).log_prob(x.double())
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-5, atol=1e-4)


def _mixture_for_sampling():
    """Three elements: a tight two-peak mixture, one leaning on the right edge bin, a wide one."""
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, -5.0], [0.0, 0.0, 0.0]])
    loc = torch.tensor([[-0.5, 0.2, 0.9], [1.02, -0.3, 0.0], [0.0, 0.5, -2.0]])
    scale = torch.tensor([[0.02, 0.01, 0.05], [0.03, 0.1, 1.0], [1.0, 0.3, 0.5]])
    return DiscretizedLogisticMixture(logits, loc, scale)


def _total_variation(draws, d):
    """Half the L1 distance between the bins' frequencies and their masses, per element."""
    counts = torch.stack(
        [torch.bincount(to_pixels(c).long(), minlength=256) for c in draws.unbind(-1)], -1
    )
    freq = counts.double() / draws.shape[0]
    probs = d.log_prob(d.enumerate_support()).exp().double()
    return 0.5 * (freq - probs).abs().sum(0)


@pytest.mark.parametrize("with_generator", [True, False])
def test_sampling_matches_the_mass_function(with_generator):
    d, n = _mixture_for_sampling(), 100_000
    if with_generator:
        draws = sample(Independent(d, 1), (n,), torch.Generator().manual_seed(4))
        again = d.sample((n,), generator=torch.Generator().manual_seed(4))
        assert torch.equal(draws, again)
    else:
        torch.manual_seed(4)
        draws = d.sample((n,))
    assert draws.shape == (n, 3) and d.support.check(draws).all()
    # expected TV from counting noise ~ 0.5 sqrt(2 bins / (pi n)) < 0.01 for <= 60 live bins
    assert (_total_variation(draws, d) < 0.02).all()


def test_mode_is_the_most_probable_bin_and_mean_the_bins_average():
    logits, loc, log_scale = _extreme_params(200, 3, torch.float32, seed=5)
    d = DiscretizedLogisticMixture.from_log_scale(logits, loc, log_scale)
    bins = d.enumerate_support()
    probs = d.log_prob(bins).exp()
    assert d.mode.shape == (200,)
    torch.testing.assert_close(d.mode, bins[probs.argmax(0), torch.arange(200)], atol=0, rtol=0)
    assert (d.mode == 1.0).any() and (d.mode == -1.0).any()  # the edge bins win sometimes
    torch.testing.assert_close(d.mean, (bins * probs).sum(0), atol=1e-5, rtol=0)


def test_expand_and_validation():
    d = DiscretizedLogisticMixture(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3, 2))
    e = d.expand((4, 3))
    assert e.batch_shape == (4, 3) and e.log_prob(torch.zeros(4, 3) + 1 / 255).shape == (4, 3)
    checked = DiscretizedLogisticMixture(
        torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), validate_args=True
    )
    with pytest.raises(InvalidParameterError, match=r"1 value\(s\) are off that grid, e\.g\. 0\.5"):
        checked.log_prob(torch.tensor([1 / 255, 0.5]))


# -- PixelCNN++'s coupled RGB mixture ---------------------------------------------------------


def _rgb(seed=0, k=3, h=2, w=2, b=2, scale=(0.005, 0.2)):
    g = torch.Generator().manual_seed(seed)
    f64 = {"generator": g, "dtype": torch.float64}
    logits = torch.randn(b, h, w, k, **f64)
    loc = torch.rand(b, 3, h, w, k, **f64) * 2.2 - 1.1
    lo, hi = scale
    sc = lo + (hi - lo) * torch.rand(b, 3, h, w, k, **f64)
    coeffs = torch.tanh(2 * torch.randn(b, 3, h, w, k, **f64))
    return DiscretizedLogisticMixtureRGB(logits, loc, sc, coeffs)


def test_rgb_log_prob_is_the_coupled_means_channel_by_channel():
    d = _rgb()
    g = torch.Generator().manual_seed(6)
    x = BINS[torch.randint(0, 256, (4, 2, 3, 2, 2), generator=g)]  # (sample, batch, 3, H, W)
    got = d.log_prob(x)
    assert got.shape == (4, 2) and d.event_shape == (3, 2, 2)
    want = torch.zeros(4, 2, dtype=torch.float64)
    for s, i, h, w in itertools.product(range(4), range(2), range(2), range(2)):
        r, g_, b_ = x[s, i, :, h, w]
        pixel = 0.0
        weights = torch.softmax(d.logits[i, h, w], 0)
        for k in range(3):
            mu_r, mu_g, mu_b = d.loc[i, :, h, w, k]
            alpha, beta, gamma = d.coeffs[i, :, h, w, k]
            s_r, s_g, s_b = d.scale[i, :, h, w, k]
            pixel += (
                weights[k]
                * _reference_mass(r, mu_r, s_r)
                * _reference_mass(g_, mu_g + alpha * r, s_g)
                * _reference_mass(b_, mu_b + beta * r + gamma * g_, s_b)
            )
        want[s, i] += torch.log(pixel)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_generator", [True, False])
def test_rgb_sampling_matches_the_joint_mass(with_generator):
    # one pixel, sharp components: the draws fill a few hundred (r, g, b) cells, each of
    # which is scored exactly; TV = half the L1 distance over those cells plus the mass missed
    d = _rgb(seed=7, k=2, h=1, w=1, b=1, scale=(0.01, 0.02))
    n = 100_000
    if with_generator:
        draws = sample(Independent(d, 0), (n,), torch.Generator().manual_seed(8))
    else:
        torch.manual_seed(8)
        draws = d.sample((n,))
    assert draws.shape == (n, 1, 3, 1, 1) and d.support.check(draws).all()
    cells, counts = torch.unique(draws.view(n, 3), dim=0, return_counts=True)
    probs = d.log_prob(cells.view(-1, 1, 3, 1, 1)).exp().squeeze(1)
    tv = 0.5 * ((counts / n - probs).abs().sum() + (1 - probs.sum()))
    assert len(cells) < 2000 and tv < 0.05


def test_rgb_expand_keeps_the_event():
    d = _rgb(b=1)
    e = d.expand((5,))
    assert e.batch_shape == (5,) and e.event_shape == (3, 2, 2)
    assert e.sample().shape == (5, 3, 2, 2)


# -- the layout of network outputs in genkit.likelihoods ----------------------------------------


def test_number_of_outputs():
    assert num_outputs(MIX, 1, 10) == 30 and num_outputs(MIX, 2, 5) == 30
    assert num_outputs(MIX, 3, 10) == 100  # PixelCNN++: K + 9K
    assert num_outputs("discretized_gaussian", 3) == 6 and num_outputs("bernoulli", 4) == 4


def test_independent_layout_is_parameter_then_component_then_channel():
    g = torch.Generator().manual_seed(9)
    b, k, c, h, w = 2, 4, 2, 3, 3
    logits, loc, log_scale = torch.randn(3, b, c, h, w, k, generator=g)
    log_scale = log_scale - 2
    params = rearrange(
        torch.stack([logits, loc, log_scale]), "p b c h w k -> b (p k c) h w", p=3
    )  # block p, then component k, then channel c along dim 1
    assert params.shape[1] == num_outputs(MIX, c, k)
    d = likelihood(MIX, params, 3, components=k)
    base = d.base_dist
    assert isinstance(base, DiscretizedLogisticMixture) and d.event_shape == (c, h, w)
    torch.testing.assert_close(base.logits, logits)
    torch.testing.assert_close(base.loc, loc)
    torch.testing.assert_close(base.scale, log_scale.exp())
    # an MLP's (B, P*H*W) output, viewed as (B, P, H, W), gives the same distribution
    flat = likelihood(MIX, params.reshape(b, -1).view(b, -1, h, w), 3, components=k)
    torch.testing.assert_close(flat.base_dist.loc, loc)


def test_rgb_layout_shares_the_logits_and_squashes_the_coefficients():
    g = torch.Generator().manual_seed(10)
    b, k, h, w = 2, 3, 2, 2
    logits = torch.randn(b, k, h, w, generator=g)
    loc, log_scale, raw = torch.randn(3, b, 3, h, w, k, generator=g)
    rest = rearrange(torch.stack([loc, log_scale, raw]), "p b c h w k -> b (p k c) h w")
    params = torch.cat([logits, rest], 1)
    assert params.shape[1] == num_outputs(MIX, 3, k) == 10 * k
    d = likelihood(MIX, params, 3, components=k)
    base = d.base_dist
    assert isinstance(base, DiscretizedLogisticMixtureRGB) and d.event_shape == (3, h, w)
    torch.testing.assert_close(base.logits, rearrange(logits, "b k h w -> b h w k"))
    torch.testing.assert_close(base.loc, loc)
    torch.testing.assert_close(base.scale, log_scale.clamp(-7, 7).exp())
    torch.testing.assert_close(base.coeffs, torch.tanh(raw))
    x = BINS.float()[torch.randint(0, 256, (b, 3, h, w), generator=g)]
    assert d.log_prob(x).shape == (b,)


def test_layout_errors_and_bf16():
    with pytest.raises(InvalidParameterError, match=r"with 10 components needs 3\*10\*C"):
        likelihood(MIX, torch.zeros(1, 20, 2, 2), 3)
    with pytest.raises(InvalidParameterError, match=r"100 \(10\*10\) for RGB images"):
        likelihood(MIX, torch.zeros(1, 90, 2, 2), 3)  # 3 channels uncoupled: not a layout
    d = likelihood(MIX, torch.randn(2, 30, 4, 4, dtype=torch.bfloat16), 3)
    assert d.base_dist.loc.dtype == torch.float32
    assert d.base_dist.support.check(d.sample()).all()
