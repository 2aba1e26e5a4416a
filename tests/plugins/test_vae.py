"""The ``vae`` plugin: its ELBO terms against independent computations."""

import math

import pytest
import torch
from torch.distributions import kl_divergence

import genkit
from genkit.distributions import to_model_scale
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


def test_iwae_is_above_the_elbo_and_grows_with_k():
    model, x = _vae(), _images(n=4)
    torch.manual_seed(0)
    with torch.no_grad():
        reps = 200
        xs = x.repeat(reps, 1, 1, 1)
        elbo = model.elbo(xs).total.mean()
        bounds = {k: model.elbo(xs, "iwae", k=k).total.mean() for k in (1, 5, 50)}
    # L_1 is the ELBO (same expectation); L_k increases with k (Burda et al. 2016, Thm 1)
    assert abs(bounds[1] - elbo) < 0.05 * abs(elbo)
    assert elbo < bounds[5] < bounds[50]


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
