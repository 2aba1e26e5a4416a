"""The ``vae`` plugin: its ELBO terms against independent computations."""

import math

import pytest
import torch
from torch.distributions import kl_divergence

import genkit
from genkit.distributions import (
    DiscretizedLogisticMixture,
    DiscretizedLogisticMixtureRGB,
    to_model_scale,
)
from genkit.elbo import IWAE


def _images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return to_model_scale(torch.randint(0, 256, (n, 1, 8, 8), generator=g))


def _vae(**params):
    torch.manual_seed(0)
    return genkit.create_model("vae", (1, 8, 8), latent_dim=4, hidden=32, channels=8, **params)


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_prior_matching_is_minus_the_analytic_kl(net):
    model, x = _vae(net=net), _images()
    terms = model.elbo(x).terms
    q = model.encoder(x)
    torch.testing.assert_close(terms["prior_matching"], -kl_divergence(q, model.prior()))
    # and against the closed form 1/2 sum(mu^2 + s^2 - 1 - log s^2), independent of torch's KL table
    mu, s = q.base_dist.loc, q.base_dist.scale
    closed = 0.5 * (mu**2 + s**2 - 1 - torch.log(s**2)).sum(-1)
    torch.testing.assert_close(terms["prior_matching"], -closed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("samples", [1, 5])
def test_reconstruction_is_the_monte_carlo_average_of_decoder_log_probs(samples):
    model, x = _vae(samples=samples), _images()
    torch.manual_seed(123)
    got = model.elbo(x).terms["reconstruction"]
    torch.manual_seed(123)
    q = model.encoder(x)
    eps = torch.randn(samples, *q.base_dist.loc.shape)  # what rsample draws, in the same order
    z = q.base_dist.loc + q.base_dist.scale * eps
    direct = torch.stack([model.decoder(z[s]).log_prob(x) for s in range(samples)]).mean(0)
    torch.testing.assert_close(got, direct)


def _sharp_vector_vae(seed: int = 0):
    """A VAE on (4,) data with one latent whose decoder is sharp (scale e^-1, mean 3x as
    sensitive to z as at initialisation): the untrained q(z|x) then misses the narrow true
    posterior, so the ELBO sits nats below log p(x) and IWAE_k closes the gap visibly."""
    torch.manual_seed(seed)
    model = genkit.create_model("vae", (4,), latent_dim=1, hidden=16, depth=1)
    with torch.no_grad():
        head = model.decoder.net[-1]  # rows 0..3: mean, rows 4..7: log-scale
        head.weight[:4].mul_(3.0)
        head.weight[4:].zero_()
        head.bias[4:].fill_(-1.0)
    return model


def _mean_and_stderr(values):
    """Mean over ``(reps, B)`` draws and its standard error (independent reps and samples)."""
    reps, b = values.shape
    return values.mean().item(), (values.var(0) / reps).mean().sqrt().item() / math.sqrt(b)


def test_iwae_is_above_the_elbo_and_grows_with_k():
    # one latent, so log p(x) = log int p(x|z) p(z) dz and the exact ELBO are brute-force
    # sums on a grid of z: ELBO <= L_5 <= L_50 <= log p(x), L_k -> log p(x) (Burda et al. Thm 1)
    model = _sharp_vector_vae()
    with torch.no_grad():
        x = model.decoder(torch.randn(4, 1)).sample()
        z = torch.linspace(-10, 10, 20001).unsqueeze(1)
        dz = 20 / 20000
        log_joint = model.decoder(z).log_prob(x.unsqueeze(1)) - 0.5 * (
            z.T**2 + math.log(2 * math.pi)
        )  # (B, grid): log p(x|z) + log N(z; 0, 1)
        log_px = (torch.logsumexp(log_joint, 1) + math.log(dz)).mean().item()
        log_q = model.encoder(x).log_prob(z.unsqueeze(1)).T  # (B, grid)
        elbo_exact = (log_q.exp() * (log_joint - log_q)).sum(1).mul(dz).mean().item()
        reps = 200
        xs = x.repeat(reps, 1)
        elbo, se_e = _mean_and_stderr(model.elbo(xs).total.view(reps, 4))
        l5, se5 = _mean_and_stderr(model.elbo(xs, "iwae", k=5).total.view(reps, 4))
        l50, se50 = _mean_and_stderr(model.elbo(xs, "iwae", k=50).total.view(reps, 4))
        l2k, se2k = _mean_and_stderr(model.elbo(x.repeat(10, 1), "iwae", k=2000).total.view(10, 4))
    assert log_px - elbo_exact > 3.0  # the setting makes the gap wide
    assert abs(elbo - elbo_exact) < 4 * se_e
    assert elbo + 3 * math.hypot(se_e, se5) < l5
    assert l5 + 3 * math.hypot(se5, se50) < l50
    assert l50 < log_px + 3 * se50
    assert abs(l2k - log_px) < max(0.1, 4 * se2k)


@pytest.mark.parametrize("k", [1, 3])
def test_iwae_is_the_log_mean_importance_weight_from_the_same_noise(k):
    model, x = _vae(), _images(n=4)
    torch.manual_seed(11)
    got = model.elbo(x, "iwae", k=k)
    torch.manual_seed(11)
    q = model.encoder(x)
    mu, s = q.base_dist.loc, q.base_dist.scale
    z = mu + s * torch.randn(k, *mu.shape)  # what rsample((k,)) draws: (k, B, latent)
    log_n01 = -0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)  # log p(z), written out
    log_q = (-0.5 * ((z - mu) / s) ** 2 - s.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_w = torch.stack([model.decoder(z[j]).log_prob(x) for j in range(k)]) + log_n01 - log_q
    want = torch.logsumexp(log_w, 0) - math.log(k)  # log (1/k) sum_j p(x, z_j) / q(z_j | x)
    assert set(got.terms) == {"importance_weighted"}
    torch.testing.assert_close(got.total, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(genkit.InvalidParameterError, match=r"parameters \['k'\] with an estimator"):
        model.elbo(x, IWAE(k), k=k)


def test_likelihood_choices():
    x = _images()
    bern = _vae(likelihood="bernoulli")
    xb = torch.where(x > 0, 1.0, -1.0)
    assert torch.isfinite(bern.elbo(xb).total).all()
    vec = genkit.create_model("vae", (6,), latent_dim=2, hidden=16)
    assert vec.elbo(torch.randn(3, 6)).terms["reconstruction"].shape == (3,)
    with pytest.raises(genkit.InvalidParameterError, match="net='conv' needs image data"):
        genkit.create_model("vae", (6,), net="conv")


def test_sample_shape_scale_and_determinism():
    model = _vae()
    a = model.sample(5, generator=torch.Generator().manual_seed(3))
    b = model.sample(5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (5, 1, 8, 8) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.allclose(
        (a + 1) * 127.5, ((a + 1) * 127.5).round(), atol=1e-3
    )  # on the 8-bit grid


def test_bits_per_dim_is_minus_elbo_over_d_ln2():
    model, x = _vae(), _images()
    t = model.elbo(x)
    torch.testing.assert_close(t.bits_per_dim(), -t.total / (64 * math.log(2)))
    # an untrained model cannot beat 8 bits/dim by much nor be absurd on the 8-bit scale
    assert 4.0 < t.bits_per_dim().mean().item() < 20.0


def test_a_few_optimisation_steps_raise_the_elbo():
    model, x = _vae(), _images(n=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    with torch.no_grad():
        before = model.elbo(x.repeat(8, 1, 1, 1)).total.mean()
    for _ in range(30):
        opt.zero_grad()
        model.elbo(x).objective().mean().backward()
        opt.step()
    with torch.no_grad():
        after = model.elbo(x.repeat(8, 1, 1, 1)).total.mean()
    assert after > before + 5  # nats per image; Monte-Carlo noise of these means is < 1


def test_bernoulli_likelihood_refuses_data_that_is_not_binarized():
    model, x = _vae(likelihood="bernoulli"), _images()
    with pytest.raises(genkit.InvalidParameterError, match=r"needs binarized data in \{-1, \+1\}"):
        model.elbo(x)  # 8-bit grey levels: the Bernoulli "likelihood" would bound nothing


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_sample_count_must_be_a_positive_int(n):
    with pytest.raises(genkit.InvalidParameterError, match=r"n must be an integer >= 1"):
        _vae().sample(n)


def test_elbo_of_uint8_pixels_says_to_map_them_to_the_model_scale():
    pixels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(genkit.InvalidParameterError, match=r"x = k / 127\.5 - 1.*torch\.uint8"):
        _vae().elbo(pixels)


MIXTURE = {"likelihood": "discretized_logistic_mixture", "mixture_components": 3}


def _mixture_log_prob_direct(base, x):
    """log p(x|z) of a per-channel logistic mixture, summed over the pixels, computed in float64
    in probability space: sum_k pi_k (sigmoid(upper_k) - sigmoid(lower_k)), open edge bins."""
    x, mu, s = x.double().unsqueeze(-1), base.loc.double(), base.scale.double()
    upper = torch.where(x > 1 - 1e-6, 1.0, torch.sigmoid((x + 1 / 255 - mu) / s))
    lower = torch.where(x < -1 + 1e-6, 0.0, torch.sigmoid((x - 1 / 255 - mu) / s))
    p = (torch.softmax(base.logits.double(), -1) * (upper - lower)).sum(-1)
    return p.log().flatten(1).sum(1)


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_logistic_mixture_reconstruction_is_the_decoder_log_prob(net):
    model, x = _vae(net=net, **MIXTURE), _images()
    torch.manual_seed(21)
    got = model.elbo(x).terms["reconstruction"]
    torch.manual_seed(21)
    q = model.encoder(x)
    z = q.base_dist.loc + q.base_dist.scale * torch.randn(q.base_dist.loc.shape)
    base = model.decoder(z).base_dist
    assert isinstance(base, DiscretizedLogisticMixture) and base.loc.shape == (8, 1, 8, 8, 3)
    torch.testing.assert_close(got.double(), _mixture_log_prob_direct(base, x), rtol=1e-5, atol=0)


def test_logistic_mixture_training_raises_the_elbo_and_samples_are_8_bit():
    model, x = _vae(**MIXTURE), _images(n=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    with torch.no_grad():
        before = model.elbo(x.repeat(8, 1, 1, 1)).total.mean()
    for _ in range(20):
        opt.zero_grad()
        model.elbo(x).objective().mean().backward()
        opt.step()
    with torch.no_grad():
        after = model.elbo(x.repeat(8, 1, 1, 1)).total.mean()
    assert after > before + 2  # nats per image (4.2 here); the means' noise is < 0.5
    s = model.sample(6, generator=torch.Generator().manual_seed(1))
    assert s.shape == (6, 1, 8, 8) and model.decoder(torch.zeros(1, 4)).support.check(s).all()


def test_logistic_mixture_on_rgb_couples_the_channels_and_refuses_vectors():
    torch.manual_seed(0)
    model = genkit.create_model("vae", (3, 8, 8), latent_dim=4, channels=8, **MIXTURE)
    assert model.decoder.net(torch.zeros(1, 4)).shape == (1, 30, 8, 8)  # K + 9K outputs
    p = model.decoder(torch.zeros(2, 4))
    assert isinstance(p.base_dist, DiscretizedLogisticMixtureRGB) and p.event_shape == (3, 8, 8)
    x = to_model_scale(torch.randint(0, 256, (2, 3, 8, 8)))
    assert torch.isfinite(model.elbo(x).total).all()
    assert p.support.check(model.sample(2)).all()
    with pytest.raises(genkit.InvalidParameterError, match=r"mass over 8-bit pixels.*\(6,\)"):
        genkit.create_model("vae", (6,), likelihood="discretized_logistic_mixture")
    with pytest.raises(genkit.ConfigError, match="mixture_components"):
        genkit.create_model("vae", (1, 8, 8), mixture_components=0)
