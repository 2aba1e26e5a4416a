"""``free_bits``: the true ELBO's terms, the free-bits extra against a computation by hand, the
objective it feeds, and its errors."""

import pytest
import torch

import genkit
from genkit.distributions import to_model_scale

SHAPE = (1, 8, 8)


def _images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return to_model_scale(torch.randint(0, 256, (n, *SHAPE), generator=g))


def _vamp(**params):
    torch.manual_seed(0)
    return genkit.create_model(
        "vamp_vae", SHAPE, latent_dim=4, hidden=16, channels=4, prior_components=5, **params
    )


def _far_mog():
    """A ``mog`` prior whose Gaussians sit 3 units from the posteriors: every KL is clearly > 0."""
    model = _vamp(prior="mog")
    with torch.no_grad():
        model.prior.loc.add_(3.0)
    return model


def _vae():
    torch.manual_seed(0)
    return genkit.create_model("vae", SHAPE, latent_dim=4, hidden=16, channels=4)


@pytest.mark.parametrize("make", [_vamp, _vae], ids=["vamp_vae", "vae"])
@pytest.mark.parametrize("samples", [1, 3])
def test_terms_are_the_standard_elbo_for_the_same_draws(make, samples):
    model, x = make(), _images()
    torch.manual_seed(5)
    standard = model.elbo(x, "elbo", samples=samples)
    torch.manual_seed(5)
    free = model.elbo(x, "free_bits", free_nats=0.5, samples=samples)
    assert list(free.terms) == ["reconstruction", "prior_matching"]
    for name in free.terms:
        assert torch.equal(free.terms[name], standard.terms[name]), name
    assert list(free.extras) == ["free_bits_prior_matching"]


def _kl_and_extra(model, x, **params):
    torch.manual_seed(5)
    out = model.elbo(x, "free_bits", **params)
    return -out.terms["prior_matching"].detach(), out.extras["free_bits_prior_matching"].detach()


def test_per_sample_extra_is_minus_max_lambda_kl():
    model, x = _far_mog(), _images()
    kl, _ = _kl_and_extra(model, x, free_nats=0.0)
    lam = kl.median().item()  # some samples under the floor, some over
    kl, extra = _kl_and_extra(model, x, free_nats=lam, per="sample")
    by_hand = torch.tensor([-max(lam, k) for k in kl.tolist()])
    torch.testing.assert_close(extra, by_hand)
    assert (extra == -lam).any() and (extra != -lam).any()


def test_per_batch_extra_floors_the_batch_mean_kl():
    model, x = _far_mog(), _images()
    kl, _ = _kl_and_extra(model, x, free_nats=0.0)
    mean = kl.mean().item()
    assert mean > 1.0
    _, over = _kl_and_extra(model, x, free_nats=mean + 1.0)  # the floor binds: -lambda each
    torch.testing.assert_close(over, torch.full_like(kl, -(mean + 1.0)))
    _, under = _kl_and_extra(model, x, free_nats=mean - 1.0)  # it does not: -KL each
    torch.testing.assert_close(under, -kl)
    # either way the batch mean is -max(lambda, mean KL)
    for lam, extra in [(mean + 1.0, over), (mean - 1.0, under)]:
        torch.testing.assert_close(extra.mean().item(), -max(lam, mean), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per", ["sample", "batch"])
def test_groups_floor_the_analytic_kl_of_each_group(per):
    model, x = _vae(), _images()
    q = model.encoder(x)
    mu, s = q.base_dist.loc.detach(), q.base_dist.scale.detach()
    kl_dims = 0.5 * (mu**2 + s**2 - 1 - torch.log(s**2))  # KL(N(mu, s^2) || N(0, 1)) per dim
    kl = kl_dims.view(len(x), 2, 2).sum(-1)  # (B, groups)
    lam = kl.mean().item()  # between the groups' batch means: one group floored, one not
    if per == "sample":
        floored = kl.clamp(min=lam)
    else:
        floored = torch.where(kl.mean(0) >= lam, kl, torch.full_like(kl, lam))
    assert (floored == lam).any() and (floored != lam).any()
    extra = model.elbo(x, "free_bits", free_nats=lam, per=per, groups=2).extras
    torch.testing.assert_close(extra["free_bits_prior_matching"], -floored.sum(-1))


def test_objective_trains_on_the_surrogate_and_the_floor_stops_the_prior_gradient():
    model, x = _vamp(), _images()
    weights = {"prior_matching": 0.0, "free_bits_prior_matching": 1.0}
    torch.manual_seed(5)
    out = model.elbo(x, "free_bits", free_nats=1e3)  # far above any KL: the floor binds
    torch.testing.assert_close(
        out.objective(weights),
        -(out.terms["reconstruction"] + out.extras["free_bits_prior_matching"]),
    )
    out.objective(weights).mean().backward()
    pseudo = model.prior.pseudo_inputs.grad  # only prior matching reaches the pseudo-inputs
    assert pseudo is None or pseudo.abs().sum() == 0
    model.zero_grad()
    # no floor per sample: the samples whose (Monte-Carlo) KL is over 0 carry the prior's gradient
    model.elbo(x, "free_bits", free_nats=0.0, per="sample").objective(weights).mean().backward()
    assert model.prior.pseudo_inputs.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"free_nats": -1.0}, "free_nats must be a finite number >= 0"),
        ({"free_nats": float("nan")}, "free_nats must be a finite number >= 0"),
        ({"free_nats": True}, "free_nats must be a finite number >= 0"),
        ({"free_nats": "1"}, "free_nats must be a finite number >= 0"),
        ({"per": "minibatch"}, "per must be one of batch, sample, got 'minibatch'"),
        ({"groups": 0}, "groups must be an integer >= 1"),
        ({"samples": 1.5}, "samples must be an integer >= 1"),
        ({"lam": 1.0}, "valid parameters: free_nats, per, groups, samples"),
    ],
)
def test_bad_parameters_are_one_clear_error(params, message):
    with pytest.raises(genkit.InvalidParameterError, match=message):
        genkit.create_estimator("free_bits", **params)


def test_groups_that_the_model_cannot_split_are_refused():
    x = _images()
    with pytest.raises(
        genkit.InvalidParameterError, match="groups=3 must divide the latent size 4"
    ):
        _vae().elbo(x, "free_bits", groups=3)
    with pytest.raises(genkit.IncompatibleEstimatorError, match="mixture prior does not factorise"):
        _vamp().elbo(x, "free_bits", groups=2)


def test_models_without_one_latent_are_incompatible():
    torch.manual_seed(0)
    hvae = genkit.create_model("hvae", SHAPE, levels=2, latent_dims=[4, 2], hidden=16, channels=4)
    with pytest.raises(genkit.IncompatibleEstimatorError, match="chain of 2 latents"):
        hvae.elbo(_images(), "free_bits")

    class NoParts(genkit.LatentVariableModel):
        def sample(self, n, generator=None):
            return torch.zeros(n, *self.data_shape)

    with pytest.raises(genkit.IncompatibleEstimatorError, match="no usable 'encoder'"):
        NoParts(SHAPE).elbo(_images(), "free_bits")
