"""``vamp_vae``: the mixture prior and the Monte-Carlo prior matching against independent
computations, training, sampling, and parameter errors."""

import math

import pytest
import torch
from genkit_example import sample_mixture
from torch.distributions import MixtureSameFamily, kl_divergence

import genkit
from genkit.distributions import eight_bit, to_model_scale

SHAPE = (1, 8, 8)
TINY = {"latent_dim": 3, "hidden": 16, "channels": 4, "prior_components": 5}


def _model(**params):
    torch.manual_seed(0)
    return genkit.create_model("vamp_vae", SHAPE, **{**TINY, **params})


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return to_model_scale(torch.randint(0, 256, (n, *SHAPE), generator=g))


def _log_normal(z, mu, sigma):
    """``sum_l log N(z_l; mu_l, sigma_l^2)`` written out (no torch.distributions)."""
    return (-0.5 * ((z - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)


def _mixture_log_prob(z, mu, sigma):
    """``log (1/K) sum_k N(z; mu_k, sigma_k^2)`` by logsumexp; ``z: (..., L)``, ``mu: (K, L)``."""
    per_k = _log_normal(z.unsqueeze(-2), mu, sigma)  # (..., K)
    return torch.logsumexp(per_k, dim=-1) - math.log(mu.shape[0])


def _components(model):
    """``(mu_k, sigma_k)``, each ``(K, L)``: the encoder's outputs for the pseudo-inputs (vamp)
    or the learned Gaussians (mog)."""
    if model.config.prior == "vamp":
        q_u = model.encoder(model.prior.pseudo_inputs)
        return q_u.base_dist.loc, q_u.base_dist.scale
    return model.prior.loc, model.prior.log_scale.exp()


@pytest.mark.parametrize("prior", ["vamp", "mog"])
def test_prior_is_a_uniform_mixture_of_its_components(prior):
    model = _model(prior=prior)
    p = model.prior()
    assert isinstance(p, MixtureSameFamily)
    assert p.batch_shape == () and p.event_shape == (3,)
    z = torch.randn(4, 7, 3)
    mu, sigma = _components(model)
    torch.testing.assert_close(p.log_prob(z), _mixture_log_prob(z, mu, sigma))


def test_vamp_prior_is_trained_through_the_pseudo_inputs():
    model = _model()
    assert model.prior.pseudo_inputs.shape == (5, *SHAPE)
    assert model.prior.encoder is model.encoder  # one encoder, two roles
    model.elbo(_images()).objective().mean().backward()
    assert model.prior.pseudo_inputs.grad.abs().sum() > 0


@pytest.mark.parametrize("prior", ["vamp", "mog"])
def test_prior_matching_is_the_monte_carlo_estimate_on_the_same_draws(prior):
    model, x = _model(prior=prior, samples=4), _images()
    torch.manual_seed(7)
    got = model.elbo(x).terms["prior_matching"]
    torch.manual_seed(7)
    q = model.encoder(x)
    loc, scale = q.base_dist.loc, q.base_dist.scale
    z = loc + scale * torch.randn(4, *loc.shape)  # what rsample draws, in the same order
    mu, sigma = _components(model)
    direct = (_mixture_log_prob(z, mu, sigma) - _log_normal(z, loc, scale)).mean(0)
    torch.testing.assert_close(got, direct)


def test_one_pseudo_input_is_a_gaussian_prior_and_the_estimate_is_unbiased():
    model, x = _model(prior_components=1, samples=4000), _images(n=3)
    q_u = model.encoder(model.prior.pseudo_inputs)  # batch (1,)
    z = torch.randn(10, 3)
    torch.testing.assert_close(model.prior().log_prob(z), q_u.log_prob(z))
    with torch.no_grad():
        torch.manual_seed(1)
        mc = model.elbo(x).terms["prior_matching"]
        q = model.encoder(x)
        exact = -kl_divergence(q, q_u)  # two diagonal Gaussians: closed form
        # the per-draw spread of log p(z) - log q(z|x), for a 5-sigma tolerance
        zs = q.rsample((4000,))
        se = (model.prior().log_prob(zs) - q.log_prob(zs)).std(0) / math.sqrt(4000)
    assert ((mc - exact).abs() < 5 * se + 1e-4).all(), (mc, exact, se)


def test_a_few_adamw_steps_raise_the_elbo():
    model, x = _model(), _images(n=16)

    def elbo():
        torch.manual_seed(3)
        with torch.no_grad():
            return model.elbo(x, "elbo", samples=8).total.mean().item()

    before, pseudo = elbo(), model.prior.pseudo_inputs.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        model.elbo(x).objective().mean().backward()
        opt.step()
    after = elbo()
    # a small margin: on uniform noise (log-likelihood -64 ln 256 = -354.9 nats, the ELBO
    # starts near -370) there is little to learn beyond the decoder scale
    assert after > before + 5.0, (before, after)
    assert not torch.equal(model.prior.pseudo_inputs, pseudo)  # the prior was learned


@pytest.mark.parametrize("prior", ["vamp", "mog"])
def test_sample_is_reproducible_under_a_generator_and_on_the_8_bit_grid(prior):
    model = _model(prior=prior)
    a = model.sample(5, generator=torch.Generator().manual_seed(11))
    b = model.sample(5, generator=torch.Generator().manual_seed(11))
    c = model.sample(5, generator=torch.Generator().manual_seed(12))
    assert a.shape == (5, *SHAPE)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert eight_bit.check(a).all()


def test_sample_mixture_picks_components_by_their_weights():
    model = _model(prior="mog", prior_components=2, latent_dim=1)
    with torch.no_grad():
        model.prior.loc.copy_(torch.tensor([[-10.0], [10.0]]))
        model.prior.log_scale.zero_()
    z = sample_mixture(model.prior(), 4000, torch.Generator().manual_seed(0))
    assert z.shape == (4000, 1)
    right = z[:, 0] > 0
    assert abs(right.float().mean().item() - 0.5) < 0.05  # weights 1/2 (5 sigma: 0.04)
    torch.testing.assert_close(z[right].mean(), torch.tensor(10.0), atol=0.1, rtol=0)
    assert torch.equal(z, sample_mixture(model.prior(), 4000, torch.Generator().manual_seed(0)))


def test_parameter_errors_are_clear():
    with pytest.raises(
        genkit.ConfigError, match="unknown key 'prior_component'; did you mean 'prior_components'"
    ):
        genkit.create_model("vamp_vae", SHAPE, prior_component=3)
    with pytest.raises(genkit.ConfigError, match="prior"):
        genkit.create_model("vamp_vae", SHAPE, prior="gmm")
    with pytest.raises(genkit.ConfigError, match="prior_components"):
        genkit.create_model("vamp_vae", SHAPE, prior_components=0)
    with pytest.raises(genkit.InvalidParameterError, match="model 'vamp_vae': net='conv'"):
        genkit.create_model("vamp_vae", (5,), net="conv")
    with pytest.raises(genkit.InvalidParameterError, match="n must be an integer >= 1"):
        _model().sample(0)
