"""The continuous-time VDM (``timesteps=0``): its ELBO against closed forms and against a fine
discretisation of the discrete one, the schedules (monotone, exact slopes, the variance
gradient), the low-discrepancy sampler, sampling, checkpoints and precision."""

import math

import pytest
import torch
from genkit_vdm.continuous import ContinuousVDM
from genkit_vdm.continuous_elbo import diffusion_loss
from genkit_vdm.draws import draw_uniforms
from genkit_vdm.logsnr import Learned, minimise_variance
from genkit_vdm.schedules import DiscreteSchedule
from torch import nn

import genkit
from genkit.distributions import discretized_gaussian_log_prob, to_model_scale
from genkit.errors import IncompatibleEstimatorError, InvalidParameterError
from genkit.training import TrainConfig, Trainer

S, D = 0.5, 4  # Gaussian data x ~ N(0, S^2 I_D)


class OptimalEps(nn.Module):
    """The Bayes-optimal eps-prediction for x ~ N(0, S^2 I): ``E[eps | z_t] = sigma_t z_t /
    (alpha_t^2 S^2 + sigma_t^2)``; ``t`` is continuous in [0, 1] or, with ``steps``, an integer
    step ``i`` read as the time ``i / steps``."""

    def __init__(self, log_snr, steps=None):
        super().__init__()
        self.log_snr, self.steps = log_snr, steps

    def forward(self, z, t):
        t = t.double() / self.steps if self.steps else t
        lam = self.log_snr(t).double()
        a2, s2 = torch.sigmoid(lam), torch.sigmoid(-lam)
        return ((s2.sqrt() / (a2 * S**2 + s2))[:, None] * z.double()).to(z.dtype)


def _gaussian_vdm(schedule="fixed_linear"):
    m = genkit.create_model("vdm", (D,), timesteps=0, schedule=schedule, net=nn.Identity())
    m.decoder.net = OptimalEps(m.encoder.log_snr)
    return m


def _gaussian_data(n, seed=0):
    return S * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _images(n=4, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return to_model_scale(torch.randint(0, 256, (n, *shape), generator=g))


def _small(seed=0, **params):
    if seed is not None:
        torch.manual_seed(seed)
    settings = dict(timesteps=0, denoiser="mlp", hidden=16, depth=1, fourier=[])
    return genkit.create_model("vdm", (1, 4, 4), **{**settings, **params})


def test_timesteps_zero_builds_the_continuous_model_with_the_learned_schedule():
    m = genkit.create_model("vdm", (1, 8, 8), timesteps=0, channels=8)
    assert isinstance(m, ContinuousVDM) and isinstance(m.schedule, Learned)
    assert m.net.fourier == (4, 5, 6, 7) and m.net.time_scale == 1000.0  # images: on by default
    assert genkit.create_model("vdm", (3,), timesteps=0).net.time_scale == 1000.0
    assert set(m.elbo(_images(2, (1, 8, 8))).terms) == {
        "reconstruction",
        "prior_matching",
        "denoising_matching",
    }
    with pytest.raises(InvalidParameterError, match="discrete time only"):
        genkit.create_model("vdm", (2,), timesteps=0, t_proposal="uniform")
    with pytest.raises(InvalidParameterError, match="Fourier"):
        genkit.create_model("vdm", (2,), timesteps=0, fourier=[4])


def test_consistency_is_discrete_only():
    m, x = _small(), _images()
    with pytest.raises(IncompatibleEstimatorError, match="Markov chain"):
        m.elbo(x, "consistency")
    with pytest.raises(InvalidParameterError, match="discrete time only"):
        m.elbo(x, exact=True)
    with pytest.raises(InvalidParameterError, match="discrete time only"):
        m.elbo(x, "denoising_matching", proposal="uniform")


@pytest.mark.parametrize("decoder", ["softmax", "bin_mass"])
def test_terms_by_hand_with_the_noise_replayed(decoder):
    """Each term recomputed from the formulas at the draws the estimator made."""
    m, x = _small(schedule="fixed_linear", decoder=decoder), _images()
    torch.manual_seed(3)
    terms = m.elbo(x, t_samples=2, t_sampler="uniform")
    torch.manual_seed(3)
    t = torch.rand(2, 4).reshape(-1)
    lam = 13.3 - 18.3 * t.double()
    alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    rows = x.repeat(2, 1, 1, 1).double()
    eps = torch.randn(rows.shape).double()
    z = alpha.view(-1, 1, 1, 1) * rows + sigma.view(-1, 1, 1, 1) * eps
    eps_hat = m.net(z.float(), t).double()
    loss = 0.5 * 18.3 * (eps - eps_hat).square().flatten(1).sum(1)
    torch.testing.assert_close(
        terms.terms["denoising_matching"].double(), -loss.view(2, 4).mean(0), rtol=1e-4, atol=1e-3
    )
    # reconstruction: z_0 = alpha_0 x + sigma_0 eps; softmax: log_softmax over k of
    # -(z_0 - alpha_0 x_k)^2 / (2 sigma_0^2) at x's k; bin_mass: discretized
    # Gaussian(z_0/alpha_0, e^{-13.3/2})
    a0, s0 = math.sqrt(torch.sigmoid(torch.tensor(13.3)).item()), math.exp(-13.3 / 2)
    sig0 = math.sqrt(torch.sigmoid(torch.tensor(-13.3)).item())
    z0 = a0 * x.double() + sig0 * torch.randn(x.shape).double()
    if decoder == "softmax":
        grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
        logits = -((z0.unsqueeze(-1) - a0 * grid) ** 2) / (2 * sig0**2)
        k = ((x.double() + 1) * 127.5).round().long().unsqueeze(-1)
        recon = logits.log_softmax(-1).gather(-1, k).squeeze(-1).flatten(1)
    else:
        recon = discretized_gaussian_log_prob(
            x.double(), z0 / a0, torch.full_like(z0, math.log(s0))
        ).flatten(1)
    torch.testing.assert_close(
        terms.terms["reconstruction"].double(), recon.sum(1), rtol=1e-4, atol=1e-3
    )
    # prior matching: -KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) in closed form
    a1 = torch.sigmoid(torch.tensor(-5.0, dtype=torch.float64))
    kl = 0.5 * (a1 * x.double() ** 2 + (1 - a1) - 1 - torch.log(1 - a1))
    torch.testing.assert_close(
        terms.terms["prior_matching"].double(), -kl.flatten(1).sum(1), rtol=1e-5, atol=1e-5
    )
    assert terms.nfe == 2.0


def test_zero_prediction_gives_the_closed_form_half_d_times_the_log_snr_range():
    """eps_hat = 0: L = -1/2 int lambda'(t) E||eps||^2 dt = D/2 (lambda_max - lambda_min)."""
    m = _small(schedule="fixed_linear")  # the MLP's output layer starts at zero
    x = _images(1).repeat(20000, 1, 1, 1)
    with torch.no_grad():
        got = -m.elbo(x).terms["denoising_matching"].double()
    expected = 16 / 2 * (13.3 - (-5.0))
    se = got.std() / math.sqrt(got.numel())
    assert abs(got.mean().item() - expected) < 4 * se.item(), (got.mean(), expected, se)


@pytest.mark.parametrize(
    "unet",
    [
        {},
        {"channel_mults": (1, 2), "attention_resolution": 8},
        {"patch_size": 2},
        {"patch_size": 2, "channel_mults": (1, 2)},
    ],
    ids=["default", "two_levels_attention", "patch2", "patch2_two_levels"],
)
def test_a_unet_at_its_initial_zero_output_gives_the_same_closed_form(unet):
    """Every U-Net option starts with a zero output layer: eps_hat = 0 whatever its layout, so
    the loss is the closed form D/2 (lambda_max - lambda_min) with D = 64 on 8x8 images."""
    torch.manual_seed(0)
    m = genkit.create_model(
        "vdm", (1, 8, 8), timesteps=0, schedule="fixed_linear", channels=8, **unet
    )
    x = _images(1, shape=(1, 8, 8)).repeat(4000, 1, 1, 1)
    with torch.no_grad():
        got = -m.elbo(x).terms["denoising_matching"].double()
    expected = 64 / 2 * (13.3 - (-5.0))
    se = got.std() / math.sqrt(got.numel())
    assert abs(got.mean().item() - expected) < 4 * se.item(), (got.mean(), expected, se)


def test_space_to_depth_folds_the_input_and_its_fourier_features_and_unfolds_the_output():
    """patch_size=2 on 8x8: the first convolution takes (x and 4 Fourier pairs) x 4 patch
    positions at 4x4, the last gives 4 channels that unfold to 8x8, and a size the patch does
    not divide is one line."""
    m = genkit.create_model("vdm", (1, 8, 8), timesteps=0, channels=8, patch_size=2)
    net = m.net
    assert net.conv_in.in_channels == 1 * (1 + 2 * 4) * 4  # x and 4 Fourier pairs, per patch
    assert net.conv_out.out_channels == 4
    x = torch.randn(3, 1, 8, 8)
    folded = torch.nn.functional.pixel_unshuffle(x, 2)
    assert torch.equal(torch.nn.functional.pixel_shuffle(folded, 2), x)
    out = net(x, torch.full((3,), 0.5))
    assert out.shape == x.shape
    with pytest.raises(InvalidParameterError, match="patch_size=3 must divide"):
        genkit.create_model("vdm", (1, 8, 8), timesteps=0, patch_size=3)


def test_the_bayes_optimal_denoiser_on_gaussian_data_is_tight_in_continuous_time():
    """ELBO within 0.01 nats/dim of log p(x); the exact discrete sum with T = 1000 on the linear
    schedule is 0.4 nats/dim looser for the same denoiser (where discrete time loses)."""
    m, x = _gaussian_vdm(), _gaussian_data(1000)
    log_p = torch.distributions.Normal(0.0, S).log_prob(x).sum(1).double()
    torch.manual_seed(0)
    gaps = []
    with torch.no_grad():
        for _ in range(6):  # 6 M rows in all: a standard error of about 0.0025 nats/dim
            rows = m.elbo(x.repeat(1000, 1)).total.double().view(1000, -1)
            gaps.append(rows - log_p)
    gap = torch.cat(gaps)
    mean, se = gap.mean().item() / D, gap.std().item() / math.sqrt(gap.numel()) / D
    assert se < 0.003 and abs(mean) < 0.01, (mean, se)

    discrete = genkit.create_model("vdm", (D,), timesteps=1000, net=nn.Identity())
    ab = discrete.encoder.alpha_bars  # alpha_bar_t, t = 0..T: the log-SNR by step
    discrete.decoder.net = OptimalEps(
        lambda t: torch.log(ab[t.long()]) - torch.log1p(-ab[t.long()])
    )
    with torch.no_grad():
        loose = discrete.elbo(x[:200], t_samples=None).total.double() - log_p[:200]
    assert loose.mean().item() / D < -0.4, loose.mean().item() / D


def _discretised(model, steps):
    """A discrete VDM on the continuous model's schedule at ``t_i = i / steps``: alpha_bar_i =
    sigmoid(lambda(i / steps)), so its denoising sum is a Riemann sum of the continuous loss."""
    ab = torch.sigmoid(model.encoder.log_snr(torch.arange(1, steps + 1) / steps).double())
    betas = 1.0 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    discrete = genkit.create_model("vdm", (D,), timesteps=steps, net=nn.Identity())
    discrete.encoder.__init__(DiscreteSchedule(betas))  # the same tables, a fresh encoder
    discrete.decoder.net = OptimalEps(model.encoder.log_snr, steps=steps)
    return discrete


def test_the_continuous_loss_is_the_limit_of_the_discrete_sum_on_the_same_schedule():
    """Discrete sums over t = 2..T of the KLs approach the continuous diffusion loss as T grows
    (the Riemann error and the left-out interval [0, 1/T] shrink like 1/T)."""
    m, x = _gaussian_vdm(), _gaussian_data(64, seed=1)
    torch.manual_seed(0)
    with torch.no_grad():
        cont = -m.elbo(x.repeat(20000, 1)).terms["denoising_matching"].double()
        cont_mean, cont_se = cont.mean().item(), cont.std().item() / math.sqrt(cont.numel())
        gaps = {}
        for steps in (50, 200, 1000):
            disc = _discretised(m, steps)
            kl = -disc.elbo(x.repeat(20, 1), t_samples=None).terms["denoising_matching"].double()
            gaps[steps] = abs(kl.mean().item() - cont_mean)
    assert gaps[1000] < 0.02 * cont_mean + 4 * cont_se, (gaps, cont_mean, cont_se)
    assert gaps[50] > gaps[200] > gaps[1000] or gaps[1000] < 4 * cont_se, gaps


@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_parameterizations_that_describe_the_same_mean_give_the_same_elbo(parameterization):
    """The optimal eps-net read as x0 or v by hand: the same terms at the same draws."""
    base = _gaussian_vdm()
    log_snr = base.encoder.log_snr

    class Converted(nn.Module):
        def forward(self, z, t):
            eps = OptimalEps(log_snr)(z, t)
            lam = log_snr(t)
            a, s = torch.sigmoid(lam).sqrt()[:, None], torch.sigmoid(-lam).sqrt()[:, None]
            x0 = (z - s * eps) / a
            return x0 if parameterization == "x0" else a * eps - s * x0

    other = genkit.create_model(
        "vdm", (D,), timesteps=0, schedule="fixed_linear", parameterization=parameterization
    )
    other.decoder.net = Converted()
    x = _gaussian_data(16)
    for model in (base, other):
        torch.manual_seed(5)
        model.out = model.elbo(x, t_samples=3).terms
    for name in base.out:
        torch.testing.assert_close(other.out[name], base.out[name], rtol=1e-4, atol=1e-3)


def test_the_learned_schedule_is_strictly_decreasing_with_exact_slopes():
    sched = Learned(hidden=32)
    t = torch.linspace(0, 1, 201, requires_grad=True)
    out = sched(t)
    assert out.value[0].item() == pytest.approx(13.3) and out.value[-1].item() == pytest.approx(
        -5.0
    )
    assert (out.value.diff() < 0).all() and (out.slope < 0).all()
    (autograd,) = torch.autograd.grad(out.value.sum(), t)
    torch.testing.assert_close(out.slope, autograd, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lr", [1.0, 1e3])
def test_the_schedule_stays_monotone_after_training_steps_at_extreme_learning_rates(lr):
    """Adam steps of size ``lr`` on every schedule parameter (the shape by the variance
    gradient, the end points by the diffusion loss): lambda stays finite and strictly
    decreasing, whatever the parameters become."""
    m = _small()
    opt = torch.optim.Adam(m.schedule.parameters(), lr=lr)
    x = _images(16)
    for _ in range(30):
        loss, _, log_snr = diffusion_loss(m, x, torch.rand(16))
        minimise_variance(log_snr, loss)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    t = torch.linspace(0, 1, 1001)
    with torch.no_grad():
        out = m.schedule(t)
    assert torch.isfinite(out.value).all() and torch.isfinite(out.slope).all()
    assert (out.value.diff() < 0).all() and (out.slope < 0).all(), lr
    assert not torch.allclose(m.schedule.raw_weight, Learned().raw_weight)  # it did train


def test_the_shape_gradient_is_that_of_the_variance_and_the_end_points_that_of_the_elbo():
    """On a tiny case in float64: with fixed noise and times, the gradient reaching the shape
    parameters is d mean(L^2) / d theta (finite differences) and the end points' is
    d mean(L) / d theta."""
    torch.manual_seed(0)
    sched = Learned(hidden=3).double()
    x, t, eps = torch.randn(5, 2).double(), torch.rand(5).double(), torch.randn(5, 2).double()
    w = torch.randn(2, 2).double()

    def rows(schedule, hook):
        out = schedule(t)
        a, s = torch.sigmoid(out.value).sqrt()[:, None], torch.sigmoid(-out.value).sqrt()[:, None]
        z = a * x + s * eps
        loss = -0.5 * out.slope * (eps - torch.tanh(z @ w)).square().sum(1)
        if hook:
            minimise_variance(out, loss)
        return loss

    rows(sched, hook=True).mean().backward()
    shape = ["raw_slope", "raw_weight", "raw_frequency", "centre"]
    ends = ["log_snr_max", "raw_range"]
    for name, param in sched.named_parameters():
        flat = param.detach().reshape(-1)
        for i in range(flat.numel()):
            values = []
            for step in (1e-6, -1e-6):
                flat[i] += step
                with torch.no_grad():
                    loss = rows(sched, hook=False)
                values.append((loss.square() if name in shape else loss).mean())
                flat[i] -= step
            numeric = (values[0] - values[1]) / 2e-6
            got = param.grad.reshape(-1)[i]
            assert got.item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-6), (name, i)
    assert set(shape + ends) == {n for n, _ in sched.named_parameters()}


class KnownData(nn.Module):
    """For data that is the single point ``x_ref``: ``eps_hat = (z_t - alpha_t x_ref) / sigma_t
    + sin(6 t)``, so ``eps - eps_hat = -sin(6 t)``: the loss varies with t alone."""

    def __init__(self, x_ref, log_snr):
        super().__init__()
        self.x_ref, self.log_snr = x_ref, log_snr

    def forward(self, z, t):
        lam = self.log_snr(t).view(-1, 1, 1, 1)
        a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        return (z - a * self.x_ref) / s + torch.sin(6 * t).view(-1, 1, 1, 1)


def test_stratified_times_are_unbiased_and_lower_the_variance_of_the_batch_mean():
    m, reps, x = _small(schedule="fixed_linear"), 300, _images(1)
    m.decoder.net = KnownData(x, m.encoder.log_snr)
    batch = x.repeat(64, 1, 1, 1)
    means = {}
    with torch.no_grad():
        for sampler in ("stratified", "uniform"):
            torch.manual_seed(1)
            draws = [m.elbo(batch, t_sampler=sampler).terms["denoising_matching"].mean() for _ in range(reps)]  # fmt: skip
            means[sampler] = torch.stack(draws).double()
    strat, unif = means["stratified"], means["uniform"]
    se = math.sqrt(strat.var().item() / reps + unif.var().item() / reps)
    assert abs(strat.mean().item() - unif.mean().item()) < 4 * se
    # the closed form: -1/2 * 18.3 * 16 * int_0^1 sin(6 t)^2 dt
    expected = -0.5 * 18.3 * 16 * (0.5 - math.sin(12) / 24)
    assert abs(unif.mean().item() - expected) < 4 * unif.std().item() / math.sqrt(reps)
    assert strat.var() < 0.01 * unif.var(), (strat.var(), unif.var())


def test_draw_uniforms_share_the_shift_in_training_and_not_in_evaluation():
    torch.manual_seed(0)
    shared = draw_uniforms(3, 4, "stratified", shared=True)
    gaps = shared.reshape(-1).sort().values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 12), rtol=0, atol=1e-6)
    own = draw_uniforms(3, 4, "stratified", shared=False)
    for e in range(4):  # each example's draws lie 1/3 apart, modulo 1
        draws = own[:, e].sort().values
        torch.testing.assert_close(draws.diff(), torch.full((2,), 1 / 3), rtol=0, atol=1e-6)
    offsets = torch.frac(own[0] - torch.arange(4) / 12)  # the per-example random shifts
    assert offsets.unique().numel() == 4


def test_sampling_is_8bit_reproducible_and_deterministic_without_noise():
    m = _small()
    m.eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a, b = m.sample(5, generator=g(), steps=4), m.sample(5, generator=g(), steps=4)
    assert a.shape == (5, 1, 4, 4) and torch.equal(a, b)
    assert torch.equal(a, to_model_scale(torch.round((a + 1) * 127.5).to(torch.uint8)))
    ancestral = m.sample(5, generator=g(), steps=4, eta=1.0)
    assert not torch.equal(ancestral, a)  # eta = 1 draws fresh noise at every step
    vectors = genkit.create_model("vdm", (3,), timesteps=0, hidden=8, depth=1)
    assert vectors.sample(2, steps=3).shape == (2, 3)


def test_q_posterior_is_gaussian_conditioning():
    """q(z_s | z_t, x) from the joint of (z_s, z_t) given x, by the conditioning formula."""
    m = _small(schedule="fixed_linear")
    enc = m.encoder
    x, z_t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t, s = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.3, 0.1, 0.0])
    q = enc.q_posterior(z_t, x, t, s)
    lt, ls = 13.3 - 18.3 * t.double(), 13.3 - 18.3 * s.double()
    a_t, a_s = torch.sigmoid(lt).sqrt(), torch.sigmoid(ls).sqrt()
    v_t, v_s = torch.sigmoid(-lt), torch.sigmoid(-ls)
    # z_s = a_s x + sqrt(v_s) e1; z_t = a_t x + sqrt(v_t) e: Cov(z_s, z_t | x) = a_t/a_s v_s
    cov = (a_t / a_s) * v_s
    mean = a_s[:, None] * x.flatten(1).double() + (cov / v_t)[:, None] * (
        z_t.flatten(1).double() - a_t[:, None] * x.flatten(1).double()
    )
    var = v_s - cov**2 / v_t
    torch.testing.assert_close(q.mean.flatten(1).double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.variance[:, 0, 0, 0].double(), var, rtol=1e-4, atol=1e-7)
    with pytest.raises(InvalidParameterError, match="s < t"):
        enc.q_posterior(z_t, x, t, t)
    with pytest.raises(InvalidParameterError, match=r"\[0, 1\]"):
        enc.q_marginal(x, 1.5)


def test_the_learned_schedule_resumes_exactly_from_a_checkpoint(tmp_path):
    data = _images(48, seed=3)
    cfg = TrainConfig(
        steps=8, batch_size=16, lr=1e-2, lr_warmup_steps=2, log_every=0, eval_every=0,
        checkpoint_every=0,
    )  # fmt: skip
    full = Trainer(_small(), cfg, data, run_dir=tmp_path / "a", progress=False)
    full.fit()
    first = Trainer(_small(), cfg, data, run_dir=tmp_path / "b", progress=False)
    first.start()
    first.train(4)
    first.save_checkpoint()
    first.close()
    torch.manual_seed(99)
    second = Trainer(_small(seed=None), cfg, data, run_dir=tmp_path / "b", progress=False)
    second.fit(resume=True)
    for a, b in [(full.model, second.model), (full.ema_model, second.ema_model)]:
        for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(va, vb), name
    assert not torch.equal(full.model.schedule.centre, Learned(hidden=1024).centre)


def test_under_bf16_autocast_the_schedule_and_the_loss_stay_float32():
    m, x = _small(denoiser="unet", channels=8, fourier=[4, 5]), _images()
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    plain = m.schedule(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = m.schedule(t)
        terms = m.elbo(x)
        loss, _, _ = diffusion_loss(m, x, t)
    assert mixed.value.dtype == mixed.slope.dtype == torch.float32
    assert torch.equal(mixed.value, plain.value) and torch.equal(mixed.slope, plain.slope)
    assert all(v.dtype == torch.float32 for v in terms.terms.values())
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


class KnownLevel(nn.Module):
    """For data that is the single point ``x_ref``, given the noise level ``u`` (the net's time
    input, ``(13.3 - lambda) / 18.3``): ``eps_hat = (z - alpha x_ref) / sigma + sin(6 u)``,
    so ``eps - eps_hat = -sin(6 u)``: the loss is a function of the noise level alone."""

    def __init__(self, x_ref):
        super().__init__()
        self.x_ref = x_ref

    def forward(self, z, u):
        lam = (13.3 - 18.3 * u).view(-1, 1, 1, 1)
        a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        return (z - a * self.x_ref) / s + torch.sin(6 * u).view(-1, 1, 1, 1)


def test_the_elbo_depends_on_the_schedule_only_through_its_end_points():
    """The net sees the noise level (``schedule.conditioning(lambda)``), so two learned
    schedules with the same end points and different shapes give the same ELBO in
    expectation (Kingma et al. eq. 14), though not the same variance."""
    x_ref = _images(1)
    x = x_ref.repeat(4000, 1, 1, 1)
    means, variances = [], []
    for shape_seed in (None, 3):
        m = _small(schedule_params={"hidden": 4})  # few units: a visibly different shape
        m.decoder.net = KnownLevel(x_ref)
        if shape_seed is not None:  # a steep interior, the same end points
            with torch.no_grad():
                m.schedule.raw_weight.fill_(4.0)
                m.schedule.raw_frequency.fill_(20.0)
                m.schedule.centre.copy_(torch.tensor([0.2, 0.3, 0.7, 0.8]))
        lam = m.schedule(torch.tensor([0.0, 1.0])).value
        assert lam[0].item() == pytest.approx(13.3) and lam[1].item() == pytest.approx(-5.0)
        torch.manual_seed(0)
        with torch.no_grad():
            total = m.elbo(x, t_sampler="uniform").terms["denoising_matching"].double()
        means.append(total.mean().item())
        variances.append(total.var().item())
    se = math.sqrt(sum(variances) / x.shape[0])
    # -1/2 int sin(6 u)^2 d lambda over the linear range, in closed form
    expected = -0.5 * 18.3 * 16 * (0.5 - math.sin(12) / 24)
    for mean in means:
        assert abs(mean - expected) < 4 * se, (means, expected, se)
    assert abs(variances[0] - variances[1]) > 0.2 * min(variances), variances


VALUES = torch.tensor([0, 64, 200, 255])  # an 8-bit pixel takes one of these values...
PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)  # ...with these probabilities


class PosteriorMeanEps(nn.Module):
    """The eps-prediction of the posterior mean for images whose pixels are independent draws
    of ``VALUES`` with ``probs``: ``(z - alpha E[x | z]) / sigma``, ``E[x_i | z_i] = sum_v v
    P(v) N(z_i; alpha v, sigma^2) / sum_v P(v) N(z_i; alpha v, sigma^2)``."""

    def __init__(self, log_snr, probs):
        super().__init__()
        self.log_snr, self.probs = log_snr, probs

    def forward(self, z, t):
        lam = self.log_snr(t).double().view(-1, *([1] * z.dim()))
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        v = to_model_scale(VALUES).double()
        z = z.double().unsqueeze(-1)
        logits = self.probs.log() - 0.5 * ((z - alpha * v) / sigma).square()
        x0 = (torch.softmax(logits, -1) * v).sum(-1, keepdim=True)
        return ((z - alpha * x0) / sigma).squeeze(-1).float()


@pytest.mark.parametrize("knows", ["probs", "uniform"])
def test_the_posterior_mean_denoiser_on_8bit_data_gives_the_cross_entropy(knows):
    """On 8-bit images of independent pixels drawn from ``PROBS`` over ``VALUES``, the
    continuous ELBO (as ``elbo`` computes it) of the posterior-mean denoiser for a distribution
    ``Q`` over the same values: its prior matching and diffusion loss average to the
    cross-entropy ``-sum_v P(v) log Q(v)`` per pixel (the I-MMSE identity and its mismatched
    form, Verdu 2010), the entropy of ``P`` for the exact denoiser (``Q = P``) and ``log 4`` for
    one that takes the four values as equally likely. What separates the two sides,
    ``KL(q(z_1) || N(0, I)) - H(x | z_0)``, is below 0.001 nats per pixel at the end points 13.3
    and -5 (``alpha_1^2 = 0.0067``; the values lie far apart at ``sigma_0 = 0.0013``). The
    softmax decoder's reconstruction costs about 0.005 nats per pixel more (its uniform prior
    over the 256 values lends the neighbouring bins some mass), a bound's honest gap: checked
    against ``E_eps[-log softmax_k(-(x + s eps - x_k)^2 / (2 s^2))]`` by quadrature over eps,
    ``s = exp(-lambda(0) / 2)``."""
    torch.manual_seed(0)
    shape = (1, 2, 2)
    m = genkit.create_model("vdm", shape, timesteps=0, schedule="fixed_linear", net=nn.Identity())
    q = PROBS if knows == "probs" else torch.full((4,), 0.25, dtype=torch.float64)
    m.decoder.net = PosteriorMeanEps(m.encoder.log_snr, q)
    cross_entropy = -(PROBS * q.log()).sum().item()  # nats per pixel
    k = torch.multinomial(PROBS.float(), 4 * 800_000, replacement=True)
    x = to_model_scale(VALUES[k].view(-1, *shape))
    with torch.no_grad():
        parts = [m.elbo(part).terms for part in x.split(50_000)]
    neg = -torch.cat([t["prior_matching"] + t["denoising_matching"] for t in parts]).double() / 4
    mean, se = neg.mean().item(), neg.std().item() / math.sqrt(neg.numel())
    assert se < 0.005, se
    assert abs(mean - cross_entropy) < 0.001 + 4 * se, (mean, cross_entropy, se)

    recon = -torch.cat([t["reconstruction"] for t in parts]).double() / 4
    eps = torch.linspace(-12.0, 12.0, 24_001, dtype=torch.float64)
    weights = torch.distributions.Normal(0.0, 1.0).log_prob(eps).exp() * (eps[1] - eps[0])
    s = math.exp(-m.encoder.log_snr(torch.zeros(1)).item() / 2)
    grid = to_model_scale(torch.arange(256)).double()
    expected = 0.0
    for v, p in zip(to_model_scale(VALUES).double(), PROBS, strict=True):
        mean_z = v + s * eps  # z_0 / alpha_0
        logits = -0.5 * ((mean_z[:, None] - grid) / s).square()
        nll = torch.logsumexp(logits, -1) + 0.5 * ((mean_z - v) / s).square()
        expected += p.item() * (weights * nll).sum().item()
    r_se = recon.std().item() / math.sqrt(recon.numel())
    assert 0.003 < expected < 0.008, expected  # the 0.005 of the docstring
    assert abs(recon.mean().item() - expected) < 4 * r_se + 1e-5, (recon.mean(), expected, r_se)
