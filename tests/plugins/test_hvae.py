"""The ``hvae`` plugin: T = 1 is the VAE, sampling, training, active units and the eval hook."""

import types

import pytest
import torch
from genkit_hvae import HVAE
from genkit_hvae import plugin as hvae_plugin
from torch.distributions import Independent, Normal

import genkit
from genkit.distributions import to_model_scale
from genkit.markov import ConsistencyELBO, MarkovChain, active_units


def _images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return to_model_scale(torch.randint(0, 256, (n, 1, 8, 8), generator=g))


def _hvae(**params):
    torch.manual_seed(0)
    params = {"levels": 2, "latent_dims": [4, 3], "hidden": 32, "channels": 8, **params}
    return genkit.create_model("hvae", (1, 8, 8), **params)


def _vae_and_t1_hvae(net):
    torch.manual_seed(0)
    vae = genkit.create_model("vae", (1, 8, 8), latent_dim=4, hidden=32, channels=8, net=net)
    hvae = _hvae(levels=1, latent_dims=4, net=net)
    hvae.load_state_dict(vae.state_dict())  # strict: the same modules under the same names
    return vae, hvae


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_one_level_with_analytic_prior_is_the_vae(net):
    vae, hvae = _vae_and_t1_hvae(net)
    x = _images()
    torch.manual_seed(5)
    want = vae.elbo(x)
    torch.manual_seed(5)
    got = hvae.elbo(x, ConsistencyELBO(analytic_prior=True))
    for name in ("reconstruction", "prior_matching"):
        torch.testing.assert_close(got.terms[name], want.terms[name])
    assert torch.equal(got.terms["consistency"], torch.zeros(8)) and not got.extras
    torch.testing.assert_close(got.total, want.total)
    configured = _hvae(levels=1, latent_dims=4, net=net, analytic_prior=True)
    configured.load_state_dict(vae.state_dict())
    torch.manual_seed(5)
    torch.testing.assert_close(configured.elbo(x).total, want.total)


def test_one_level_default_is_the_vae_with_a_sampled_prior_term():
    vae, hvae = _vae_and_t1_hvae("mlp")
    x = _images()
    torch.manual_seed(9)
    got = hvae.elbo(x)  # the lecture's form: log p(z_1) - log q(z_1|x) at the sampled z_1
    torch.manual_seed(9)
    q = vae.encoder(x)
    z = q.rsample()
    torch.testing.assert_close(got.terms["reconstruction"], vae.decoder(z).log_prob(x))
    torch.testing.assert_close(got.terms["prior_matching"], vae.prior().log_prob(z) - q.log_prob(z))


def test_the_model_is_a_markov_chain_with_the_documented_parts():
    model = _hvae(levels=3, latent_dims=[5, 4, 3])
    assert isinstance(model, MarkovChain) and model.num_latents == 3
    x, t = _images(n=2), torch.tensor([2, 2])
    z1 = model.encoder(x).sample()
    assert model.q_transition(z1, t).sample().shape == (2, 4)
    assert model.p_transition(torch.zeros(2, 4), t).sample().shape == (2, 5)
    assert model.prior_latent().event_shape == (3,) and model.prior().event_shape == (3,)
    assert isinstance(model.decoder(z1), torch.distributions.Distribution)
    terms = model.elbo(x)
    assert set(terms.terms) == {"reconstruction", "prior_matching", "consistency"}
    assert set(terms.extras) == {"consistency/level_1", "consistency/level_2"}
    with pytest.raises(genkit.InvalidParameterError, match=r"one level 1\.\.3 per call"):
        model.q_transition(z1, torch.tensor([2, 3]))
    sampled = model.elbo(x, "consistency", levels=1)  # walks the chain (no q_marginal)
    assert torch.isfinite(sampled.total).all()
    # KL warm-up weights: with the latent terms weighted 0 the objective is -reconstruction
    torch.testing.assert_close(
        terms.objective({"prior_matching": 0.0, "consistency": 0.0}), -terms.terms["reconstruction"]
    )


@pytest.mark.parametrize("estimator", ["elbo", "iwae"])
def test_single_latent_estimators_refuse_a_chain_of_several_latents(estimator):
    # with equal sizes per level they used to return a number bounding nothing: log p(z_1) was
    # taken under p(z_T) = N(0, I), not under the model's p(z_1) = E p(z_1|z_2)
    model, x = _hvae(levels=2, latent_dims=4), _images(n=2)
    with pytest.raises(genkit.IncompatibleEstimatorError, match="chain of 2 latents"):
        model.elbo(x, estimator)
    one = _hvae(levels=1, latent_dims=4)
    assert torch.isfinite(one.elbo(x, estimator).total).all()  # T = 1 is the VAE: allowed


def test_config_sizes_and_errors():
    assert _hvae(levels=3, latent_dims=6).latent_sizes == (6, 6, 6)
    assert genkit.create_model("hvae", (1, 8, 8), levels=3, hidden=8).latent_sizes == (32, 16, 8)
    with pytest.raises(genkit.ConfigError, match="latent_dims has 2 sizes"):
        _hvae(levels=3, latent_dims=[4, 3])
    with pytest.raises(genkit.ConfigError, match="did you mean 'levels'"):
        genkit.create_model("hvae", (1, 8, 8), level=3)
    with pytest.raises(genkit.InvalidParameterError, match="net='conv' needs image data"):
        genkit.create_model("hvae", (6,), net="conv")
    vec = genkit.create_model("hvae", (6,), latent_dims=[3, 2], hidden=16)
    assert vec.elbo(torch.randn(5, 6)).terms["reconstruction"].shape == (5,)


def test_sample_shape_scale_and_determinism():
    model = _hvae(levels=3, latent_dims=[4, 3, 2])
    a = model.sample(5, generator=torch.Generator().manual_seed(3))
    b = model.sample(5, generator=torch.Generator().manual_seed(3))
    c = model.sample(5, generator=torch.Generator().manual_seed(4))
    assert a.shape == (5, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.allclose((a + 1) * 127.5, ((a + 1) * 127.5).round(), atol=1e-3)
    # ancestral sampling written out: z_3 ~ N(0, I), z_2 ~ p(z_2|z_3), z_1 ~ p(z_1|z_2), x ~ p(x|z_1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        z = torch.randn(5, 2, generator=g)
        for t in (3, 2):
            p = model.p_steps[t - 2](z).base_dist
            z = p.loc + p.scale * torch.randn(p.loc.shape, generator=g)
        px = model.decoder(z).base_dist
        x = px.loc + px.scale * torch.randn(px.loc.shape, generator=g)
    torch.testing.assert_close(a, to_model_scale(((x + 1) * 127.5).round().clamp(0, 255)))


def test_a_few_optimisation_steps_raise_the_elbo():
    model, x = _hvae(), _images(n=16)
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
    assert after > before + 5  # nats per image; the Monte-Carlo noise of these means is < 1


class _ConstructedChain:
    """E[z_1|x] = (x_1, 0.05 x_2, 0): variances over x (1, 0.0025, 0) -> 1 active unit.
    z_2's mean is (z_1, 20 z_1, z_1^2) and z_1's third unit has scale |x_3| + 0.01, so
    E[z_2|x] = (x_1, x_2, (|x_3| + 0.01)^2): variances (1, 1, ~2) -> 3 active units (a mean
    propagated without sampling z_1 would miss the third)."""

    num_latents = 2

    def q_transition(self, z_prev, t):
        if int(t[0]) == 1:
            loc = z_prev * torch.tensor([1.0, 0.05, 0.0])
            scale = torch.stack(
                [torch.full_like(loc[:, 0], 0.01)] * 2 + [z_prev[:, 2].abs() + 0.01], 1
            )
            return Independent(Normal(loc, scale), 1)
        loc = torch.stack([z_prev[:, 0], 20 * z_prev[:, 1], z_prev[:, 2] ** 2], 1)
        return Independent(Normal(loc, 0.01), 1)

    def p_transition(self, z_t, t):
        return Independent(Normal(z_t, 1.0), 1)

    def prior_latent(self):
        return Independent(Normal(torch.zeros(3), 1.0), 1)


def test_active_units_on_a_constructed_chain():
    data = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    assert active_units(_ConstructedChain(), data.split(300)) == {1: 1, 2: 3}
    # lowering the threshold below 0.0025 activates the second unit of level 1
    assert active_units(_ConstructedChain(), [data], threshold=0.001) == {1: 2, 2: 3}
    counts = active_units(_hvae(), [_images(n=32)])
    assert set(counts) == {1, 2} and 0 <= counts[1] <= 4 and 0 <= counts[2] <= 3


class _CollapsedChain:
    """q(z_1|x) = N(0, I) whatever x, q(z_2|z_1) = N(z_1, 0.01^2): E[z_2|x] = 0 for every x, so
    no unit is active at either level, though z_2's mean varies from draw to draw of z_1."""

    num_latents = 2

    def q_transition(self, z_prev, t):
        loc = torch.zeros(z_prev.shape[0], 3) if int(t[0]) == 1 else z_prev
        return Independent(Normal(loc, 1.0 if int(t[0]) == 1 else 0.01), 1)

    def p_transition(self, z_t, t):
        return Independent(Normal(z_t, 1.0), 1)

    def prior_latent(self):
        return Independent(Normal(torch.zeros(3), 1.0), 1)


def test_active_units_discount_the_monte_carlo_noise_of_the_inner_mean():
    data = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    # the average of 8 draws of z_1 has variance 1/8 > 0.01 across x: without the correction
    # every unit of z_2 would count as active
    assert active_units(_CollapsedChain(), data.split(500)) == {1: 0, 2: 0}
    with pytest.raises(genkit.InvalidParameterError, match="samples >= 2"):
        active_units(_CollapsedChain(), [data], samples=1)


class _Wrapped(torch.nn.Module):  # what DistributedDataParallel looks like from outside
    def __init__(self, module):
        super().__init__()
        self.module = module


def _fake_trainer(model, dataset):
    logged = []
    trainer = types.SimpleNamespace(
        model=model,
        test_dataset=dataset,
        log_scalar=lambda tag, value, step: logged.append((tag, value, step)),
    )
    return trainer, logged


def test_eval_hook_logs_active_units_per_level_for_an_hvae_only():
    catalog = genkit.make_plugin_manager(load_entrypoints=False, plugins=[hvae_plugin], core=False)
    model, data = _hvae(), list(_images(n=300))  # a list is a dataset: len() and [i]
    trainer, logged = _fake_trainer(_Wrapped(model), data)
    torch.manual_seed(1)
    catalog.pm.hook.on_eval_end(trainer=trainer, step=7, metrics={})
    torch.manual_seed(1)
    want = active_units(model, [torch.stack(data[:250]), torch.stack(data[250:])])
    assert logged == [
        ("eval/active_units/level_1", want[1], 7),
        ("eval/active_units/level_2", want[2], 7),
        ("eval/active_units", want[1] + want[2], 7),
    ]
    vae = genkit.create_model("vae", (1, 8, 8), latent_dim=4, hidden=32, channels=8)
    for other in (_fake_trainer(vae, data), _fake_trainer(model, None)):
        catalog.pm.hook.on_eval_end(trainer=other[0], step=7, metrics={})
        assert other[1] == []


def test_registered_through_the_entry_point():
    assert "hvae" in genkit.available_models()
    assert isinstance(_hvae(), HVAE)
