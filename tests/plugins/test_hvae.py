"""The ``hvae`` plugin: T = 1 is the VAE, sampling, training, active units and the eval hook."""

import types

import pytest
import torch
from genkit_hvae import HVAE, level_kl
from genkit_hvae import plugin as hvae_plugin
from torch.distributions import Independent, Normal

import genkit
from genkit.distributions import DiscretizedLogisticMixture, to_model_scale
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
def test_one_level_is_the_vae_term_for_term(net):
    vae, hvae = _vae_and_t1_hvae(net)
    x = _images()
    torch.manual_seed(5)
    want = vae.elbo(x)
    torch.manual_seed(5)
    got = hvae.elbo(x)  # the default: analytic prior matching, as the VAE's
    for name in ("reconstruction", "prior_matching"):
        torch.testing.assert_close(got.terms[name], want.terms[name])
    assert torch.equal(got.terms["consistency"], torch.zeros(8)) and not got.extras
    torch.testing.assert_close(got.total, want.total)
    # the same with the estimator asked for by name and option
    torch.manual_seed(5)
    by_name = hvae.elbo(x, "consistency", analytic_prior=True)
    torch.testing.assert_close(by_name.total, want.total)


def test_one_level_in_the_lectures_form_samples_the_prior_term():
    vae, hvae = _vae_and_t1_hvae("mlp")
    x = _images()
    torch.manual_seed(9)
    got = hvae.elbo(x, ConsistencyELBO())  # log p(z_1) - log q(z_1|x) at the sampled z_1
    torch.manual_seed(9)
    q = vae.encoder(x)
    z = q.rsample()
    torch.testing.assert_close(got.terms["reconstruction"], vae.decoder(z).log_prob(x))
    torch.testing.assert_close(got.terms["prior_matching"], vae.prior().log_prob(z) - q.log_prob(z))
    # lecture form against the analytic KL: equal in expectation over z_1 (1000 draws each)
    many = x[:2].repeat(500, 1, 1, 1)
    sampled = hvae.elbo(many, ConsistencyELBO()).terms["prior_matching"].view(500, 2)
    exact = -torch.distributions.kl_divergence(vae.encoder(x[:2]), vae.prior())
    se = sampled.std(0) / 500**0.5
    assert ((sampled.mean(0) - exact).abs() < 5 * se).all()


@pytest.mark.parametrize("transitions", ["mlp", "conv"])
def test_elbo_is_log_p_minus_log_q_of_the_models_own_transitions(transitions):
    """Brute force on the model itself: replay the noise, walk the chain by hand through the
    modules, and sum log p(x, z_{1:3}) - log q(z_{1:3}|x) level by level."""
    model = _hvae(levels=3, latent_dims=[4, 3, 2], transitions=transitions)
    x = _images(n=4)
    torch.manual_seed(3)
    got = model.elbo(x, ConsistencyELBO())
    torch.manual_seed(3)
    q = [None, model.encoder(x)]
    z = [x, q[1].rsample()]
    for step in model.q_steps:  # q(z_2|z_1), q(z_3|z_2)
        q.append(step(z[-1]))
        z.append(q[-1].rsample())
    log_q = [None] + [q[t].log_prob(z[t]) for t in (1, 2, 3)]
    log_p_down = [None, model.decoder(z[1]).log_prob(x)]  # log p(z_{t-1}|z_t), t = 1..3
    log_p_down += [model.p_steps[t - 2](z[t]).log_prob(z[t - 1]) for t in (2, 3)]
    log_prior = model.prior().log_prob(z[3])
    assert z[3].shape[1:] == model.latent_shapes[2]
    torch.testing.assert_close(got.terms["reconstruction"], log_p_down[1])
    torch.testing.assert_close(got.terms["prior_matching"], log_prior - log_q[3])
    torch.testing.assert_close(got.extras["consistency/level_1"], log_p_down[2] - log_q[1])
    torch.testing.assert_close(got.extras["consistency/level_2"], log_p_down[3] - log_q[2])
    joint = log_prior + sum(log_p_down[1:])
    torch.testing.assert_close(got.total, joint - sum(log_q[1:]))
    # the default estimator: prior matching is -KL(q(z_3|z_2) || N(0, I)) at the same z_2
    torch.manual_seed(3)
    analytic = model.elbo(x)
    kl = torch.distributions.kl_divergence(q[3], model.prior())
    torch.testing.assert_close(analytic.terms["prior_matching"], -kl)
    torch.testing.assert_close(analytic.terms["consistency"], got.terms["consistency"])


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
    # options without an estimator configure the default one, keeping analytic_prior
    torch.manual_seed(4)
    by_option = model.elbo(x, levels=1)
    torch.manual_seed(4)
    by_instance = model.elbo(x, ConsistencyELBO(levels=1, analytic_prior=True))
    for name, value in by_instance.terms.items():
        torch.testing.assert_close(by_option.terms[name], value)
    with pytest.raises(genkit.InvalidParameterError, match="valid parameters: levels"):
        model.elbo(x, levelz=1)
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
    with pytest.raises(genkit.ConfigError, match="transitions"):
        genkit.create_model("hvae", (1, 8, 8), transitions="resnet")
    with pytest.raises(genkit.InvalidParameterError, match="transitions='conv' needs image data"):
        genkit.create_model("hvae", (6,), transitions="conv")
    with pytest.raises(genkit.InvalidParameterError, match="net='mlp' cannot encode"):
        genkit.create_model("hvae", (1, 8, 8), transitions="conv", net="mlp")


def test_conv_transitions_make_feature_map_latents_and_convolutional_steps():
    model = _hvae(levels=3, latent_dims=[4, 3, 2], transitions="conv")
    assert model.latent_shapes == ((4, 2, 2), (3, 2, 2), (2, 2, 2))  # 8x8 halved twice
    x = _images(n=2)
    z = [model.encoder(x).rsample()]
    for step in model.q_steps:
        z.append(step(z[-1]).rsample())
    assert [tuple(t.shape[1:]) for t in z] == list(model.latent_shapes)
    assert model.prior().event_shape == (2, 2, 2)
    for step in [*model.q_steps, *model.p_steps]:
        assert all(not isinstance(m, torch.nn.Linear) for m in step.modules())
        assert any(isinstance(m, torch.nn.Conv2d) for m in step.modules())
    # a 3x3 convolution is local: z_1 at one corner does not move q(z_2|z_1)'s mean at the
    # opposite corner when the latent map is wide enough (here 16x16 from 64x64 images)
    wide = genkit.create_model(
        "hvae", (1, 64, 64), levels=2, latent_dims=2, transitions="conv", channels=4, depth=1
    )
    z1 = torch.randn(1, 2, 16, 16)
    moved = z1.clone()
    moved[..., 0, 0] += 5.0
    mean, mean_moved = wide.q_steps[0](z1).mean, wide.q_steps[0](moved).mean
    torch.testing.assert_close(mean[..., 8:, 8:], mean_moved[..., 8:, 8:])
    assert not torch.allclose(mean[..., 0, 0], mean_moved[..., 0, 0])


@pytest.mark.parametrize("transitions", ["mlp", "conv"])
def test_sample_shape_scale_and_determinism(transitions):
    model = _hvae(levels=3, latent_dims=[4, 3, 2], transitions=transitions)
    a = model.sample(5, generator=torch.Generator().manual_seed(3))
    b = model.sample(5, generator=torch.Generator().manual_seed(3))
    c = model.sample(5, generator=torch.Generator().manual_seed(4))
    assert a.shape == (5, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.allclose((a + 1) * 127.5, ((a + 1) * 127.5).round(), atol=1e-3)
    # ancestral sampling written out: z_3 ~ N(0, I), z_2 ~ p(z_2|z_3), z_1 ~ p(z_1|z_2), x ~ p(x|z_1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        z = torch.randn(5, *model.latent_shapes[2], generator=g)
        for t in (3, 2):
            p = model.p_steps[t - 2](z).base_dist
            z = p.loc + p.scale * torch.randn(p.loc.shape, generator=g)
        px = model.decoder(z).base_dist
        x = px.loc + px.scale * torch.randn(px.loc.shape, generator=g)
    torch.testing.assert_close(a, to_model_scale(((x + 1) * 127.5).round().clamp(0, 255)))
    with pytest.raises(genkit.InvalidParameterError, match="n must be an integer >= 1, got 0"):
        model.sample(0)


@pytest.mark.parametrize("transitions", ["mlp", "conv"])
def test_a_few_optimisation_steps_raise_the_elbo(transitions):
    model, x = _hvae(transitions=transitions), _images(n=16)
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


def _fake_trainer(model, dataset, ema_model=None):
    logged = []
    trainer = types.SimpleNamespace(
        model=model,
        ema_model=ema_model,
        test_dataset=dataset,
        log_scalar=lambda tag, value, step: logged.append((tag, value, step)),
    )
    return trainer, logged


def _catalog(*plugins):
    return genkit.make_plugin_manager(
        load_entrypoints=False, plugins=[hvae_plugin, *plugins], core=False
    )


def test_eval_hook_logs_level_kl_and_active_units_of_the_evaluated_weights():
    def encoder_head(model):
        return [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]

    ema, raw = _hvae(), _hvae()
    with torch.no_grad():
        encoder_head(ema).weight.mul_(100.0)  # means that vary with x: active units
        ema.q_steps[0].net[-1].weight.mul_(30.0)
        encoder_head(raw).weight.zero_()  # an encoder that ignores x: no unit is active
    images = _images(n=300)
    data = [(x, 0) for x in images]  # (x, label) items, as a labelled dataset gives
    trainer, logged = _fake_trainer(_Wrapped(raw), data, ema_model=_Wrapped(ema))
    metrics = {"consistency/level_1": -3.0, "prior_matching": -1.5, "reconstruction": -100.0}
    torch.manual_seed(1)
    _catalog().pm.hook.on_eval_end(trainer=trainer, step=7, metrics=metrics)
    after_hook = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after_hook, torch.rand(3))  # the training randomness is untouched
    torch.manual_seed(hvae_plugin.ACTIVE_UNITS_SEED + 7)
    want = active_units(ema, [images[:250], images[250:]])
    assert want[1] > 0 and want[2] > 0
    assert active_units(raw, [images]) == {1: 0, 2: 0}
    assert logged == [
        ("eval/kl/level_1", 3.0, 7),
        ("eval/kl/level_2", 1.5, 7),
        ("eval/kl", 4.5, 7),
        ("eval/active_units/level_1", want[1], 7),
        ("eval/active_units/level_2", want[2], 7),
        ("eval/active_units", want[1] + want[2], 7),
    ]
    vae = genkit.create_model("vae", (1, 8, 8), latent_dim=4, hidden=32, channels=8)
    for other in (_fake_trainer(vae, data), _fake_trainer(ema, None)):
        _catalog().pm.hook.on_eval_end(trainer=other[0], step=7, metrics={})
        assert other[1] == []  # not an hvae; no test data and no per-level terms


def test_level_kl_sums_to_reconstruction_minus_elbo():
    model, x = _hvae(levels=3, latent_dims=[4, 3, 2]), _images()
    terms = model.elbo(x).mean()
    kl = level_kl(terms, 3)
    assert set(kl) == {1, 2, 3} and kl[3] > 0  # level 3: an analytic KL
    want = terms["reconstruction"] - terms["elbo"]  # float32 means of ~400 nats: abs 1e-3
    assert sum(kl.values()) == pytest.approx(want, abs=1e-3)
    assert level_kl({"prior_matching": -2.0}, 1) == {1: 2.0}  # T = 1: the VAE's KL
    assert level_kl({"importance_weighted": -9.0}, 1) is None


def test_training_with_kl_warm_up_logs_the_unweighted_elbo_and_the_level_kls():
    from genkit.training import TrainConfig, Trainer

    class Recorder:
        def __init__(self):
            self.steps = []

        @genkit.hookimpl
        def on_step_end(self, trainer, step, metrics):
            self.steps.append(dict(metrics))

    recorder = Recorder()
    cfg = TrainConfig(
        steps=2,
        batch_size=8,
        log_every=1,
        eval_every=2,
        eval_batch_size=16,
        checkpoint_every=0,
        num_samples=0,
        device="cpu",
        warmup_terms=["prior_matching", "consistency"],
        warmup_steps=4,
    )
    model, data = _hvae(), _images(n=16)
    trainer = Trainer(model, cfg, data, data, catalog=_catalog(recorder), progress=False)
    logged = []
    trainer.log_scalar = lambda tag, value, step: logged.append((tag, value, step))
    trainer.fit()
    first, second = recorder.steps
    for m in (first, second):  # the logged ELBO is the unweighted sum of the terms
        parts = m["reconstruction"] + m["prior_matching"] + m["consistency"]
        assert m["elbo"] == pytest.approx(parts, rel=1e-5)
    assert first["objective"] == pytest.approx(-first["reconstruction"], rel=1e-5)  # w = 0
    latent = second["prior_matching"] + second["consistency"]  # w = 1/4 at the second step
    assert second["objective"] == pytest.approx(-(second["reconstruction"] + latent / 4), rel=1e-4)
    tags = {tag for tag, _, _ in logged}
    assert {"train/kl/level_1", "train/kl/level_2", "train/kl"} <= tags
    assert {"eval/kl/level_1", "eval/kl/level_2", "eval/active_units/level_2"} <= tags
    level_2 = [value for tag, value, step in logged if tag == "train/kl/level_2" and step == 1]
    assert level_2 == [pytest.approx(-first["prior_matching"])]


def test_registered_through_the_entry_point():
    assert "hvae" in genkit.available_models()
    assert isinstance(_hvae(), HVAE)


MIXTURE = {"likelihood": "discretized_logistic_mixture", "mixture_components": 3}


@pytest.mark.parametrize("transitions", ["mlp", "conv"])
def test_logistic_mixture_reconstruction_is_the_decoder_log_prob(transitions):
    model, x = _hvae(transitions=transitions, **MIXTURE), _images()
    torch.manual_seed(13)
    got = model.elbo(x).terms["reconstruction"]
    torch.manual_seed(13)
    z1 = model.encoder(x).rsample()  # the chain's first draw
    base = model.decoder(z1).base_dist
    assert isinstance(base, DiscretizedLogisticMixture) and base.loc.shape == (8, 1, 8, 8, 3)
    # log p(x|z_1) in float64, in probability space: sum_k pi_k (sigmoid(u_k) - sigmoid(l_k))
    xs, mu, s = x.double().unsqueeze(-1), base.loc.double(), base.scale.double()
    upper = torch.where(xs > 1 - 1e-6, 1.0, torch.sigmoid((xs + 1 / 255 - mu) / s))
    lower = torch.where(xs < -1 + 1e-6, 0.0, torch.sigmoid((xs - 1 / 255 - mu) / s))
    p = (torch.softmax(base.logits.double(), -1) * (upper - lower)).sum(-1)
    torch.testing.assert_close(got.double(), p.log().flatten(1).sum(1), rtol=1e-5, atol=0)


def test_logistic_mixture_one_level_is_the_vae():
    torch.manual_seed(0)
    vae = genkit.create_model("vae", (1, 8, 8), latent_dim=4, hidden=32, channels=8, **MIXTURE)
    hvae = _hvae(levels=1, latent_dims=4, **MIXTURE)
    hvae.load_state_dict(vae.state_dict())  # the same decoder head: 3K outputs per pixel
    x = _images()
    torch.manual_seed(5)
    want = vae.elbo(x).total
    torch.manual_seed(5)
    torch.testing.assert_close(hvae.elbo(x).total, want)


@pytest.mark.parametrize("transitions", ["mlp", "conv"])
def test_logistic_mixture_training_raises_the_elbo_and_samples_are_8_bit(transitions):
    model, x = _hvae(transitions=transitions, **MIXTURE), _images(n=16)
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
    assert after > before + 2  # nats per image (4.3 and 6.4 here); the means' noise is < 0.5
    a = model.sample(6, generator=torch.Generator().manual_seed(1))
    b = model.sample(6, generator=torch.Generator().manual_seed(1))
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, b)
    k = (a + 1) * 127.5
    assert a.min() >= -1 and a.max() <= 1 and torch.allclose(k, k.round(), atol=1e-3)
