"""The VDM's ELBO: each term against an independent computation, the two decompositions against
each other, the samplers over t against the exact sum, and the parameterizations."""

import math

import pytest
import torch
from torch import nn

import genkit
from genkit.distributions import discretized_gaussian_log_prob, to_model_scale
from genkit.errors import IncompatibleEstimatorError, InvalidParameterError
from genkit.markov import ConsistencyELBO, MarkovChain


def _images(n=4, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return to_model_scale(torch.randint(0, 256, (n, *shape), generator=g))


def _tables(timesteps):
    """alpha_t, alpha_bar_t (index t, alpha_bar_0 = 1) of the linear schedule, by hand."""
    betas = torch.cat([torch.zeros(1), torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)])
    return betas, torch.cumprod(1 - betas, 0)


class RandomEps(nn.Module):
    """A fixed, non-trivial eps-prediction: a random linear map of x_t plus a function of t."""

    def __init__(self, dim, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.3 * torch.randn(dim, dim, generator=g))
        self.b = nn.Parameter(0.3 * torch.randn(dim, generator=g))

    def forward(self, x, t):
        flat = x.flatten(1)
        out = flat @ self.w + self.b * torch.sin(t.float())[:, None]
        return out.view(x.shape)


class Converted(nn.Module):
    """The eps-net read as an x0- or v-prediction of the same mean (the conversion by hand)."""

    def __init__(self, eps_net, timesteps, target):
        super().__init__()
        self.eps_net, self.target = eps_net, target
        self.ab = _tables(timesteps)[1].float()

    def forward(self, x, t):
        eps = self.eps_net(x, t)
        ab = self.ab[t].view(-1, *[1] * (x.dim() - 1))
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        return x0 if self.target == "x0" else ab.sqrt() * eps - (1 - ab).sqrt() * x0


def _vdm(timesteps=10, shape=(1, 4, 4), net=None, **params):
    torch.manual_seed(0)
    net = net if net is not None else RandomEps(math.prod(shape))
    return genkit.create_model("vdm", shape, timesteps=timesteps, net=net, **params)


def test_vdm_is_a_markov_chain_and_consistency_is_the_shared_estimator():
    m = _vdm()
    assert isinstance(m, MarkovChain) and m.num_latents == 10
    assert type(genkit.create_estimator("consistency")) is ConsistencyELBO
    x = _images()
    terms = m.elbo(x, "consistency")
    assert set(terms.terms) == {"reconstruction", "prior_matching", "consistency"}
    decoder = m.p_transition(x, torch.ones(4, dtype=torch.long))
    assert decoder.log_prob(x).shape == (4,)  # t = 1: the discretized decoder p(x0|x1)
    with pytest.raises(InvalidParameterError, match="mixed"):
        m.p_transition(x, torch.tensor([1, 2, 2, 2]))


def test_terms_by_hand_with_the_noise_replayed():
    """Exact in t with one step per chunk: the draws are x_t = sqrt(ab) x0 + sqrt(1-ab) eps_t for
    t = 2..T in turn, then x_1 for the reconstruction; each term recomputed from the formulas."""
    timesteps, x = 6, _images()
    m = _vdm(timesteps)
    torch.manual_seed(7)
    terms = m.elbo(x, "denoising_matching", t_samples=None, chunk=1)
    betas, ab = _tables(timesteps)
    net = m.net
    torch.manual_seed(7)
    alias = m.elbo(x, "denoising_matching", exact=True, chunk=1)
    for name in terms.terms:
        torch.testing.assert_close(alias.terms[name], terms.terms[name])
    torch.manual_seed(7)
    kl_sum, sq_sum = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    x64 = x.double()
    for t in range(2, timesteps + 1):
        eps = torch.randn_like(x)
        x_t = (ab[t].sqrt() * x64 + (1 - ab[t]).sqrt() * eps.double()).float()
        eps_hat = net(x_t, torch.full((4,), t)).double()
        # mu_q - mu_p = sqrt(ab_{t-1}) beta_t / (1 - ab_t) * (x0 - x0_hat), variance beta-tilde
        x0_hat = (x_t.double() - (1 - ab[t]).sqrt() * eps_hat) / ab[t].sqrt()
        coef = ab[t - 1].sqrt() * betas[t] / (1 - ab[t])
        var = betas[t] * (1 - ab[t - 1]) / (1 - ab[t])
        kl_sum += ((coef * (x64 - x0_hat)) ** 2 / (2 * var)).flatten(1).sum(1)
        sq_sum += ((eps.double() - eps_hat) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(
        terms.terms["denoising_matching"].double(), -kl_sum, rtol=2e-3, atol=1e-2
    )
    # reconstruction: x1 = sqrt(alpha_1) x0 + sqrt(beta_1) eps, decoder N(x0_hat(x1), beta_1) on the bins
    eps = torch.randn_like(x)
    x1 = (ab[1].sqrt() * x64 + betas[1].sqrt() * eps.double()).float()
    eps_hat = net(x1, torch.ones(4, dtype=torch.long))
    x0_hat = (x1 - betas[1].sqrt().float() * eps_hat) / ab[1].sqrt().float()
    sq_sum += ((eps - eps_hat).double() ** 2).flatten(1).sum(1)  # L_simple's t = 1 summand
    torch.testing.assert_close(
        terms.extras["simple"].double(), -sq_sum / timesteps, rtol=1e-4, atol=1e-4
    )
    log_scale = torch.full_like(x, 0.5 * math.log(betas[1].item()))
    recon = discretized_gaussian_log_prob(x, x0_hat, log_scale).flatten(1).sum(1)
    torch.testing.assert_close(terms.terms["reconstruction"], recon, rtol=1e-4, atol=1e-3)
    # prior matching: -KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1)) in closed form
    a = ab[timesteps]
    kl = 0.5 * (a * x64**2 + (1 - a) - 1 - torch.log(1 - a))
    torch.testing.assert_close(
        terms.terms["prior_matching"].double(), -kl.flatten(1).sum(1), rtol=1e-5, atol=1e-5
    )


def test_prior_matching_is_tiny_for_the_default_schedule():
    m = _vdm(timesteps=1000)
    values = to_model_scale(torch.tensor([0, 255, 128, 255] * 4))  # the extremes -1, +1 and ~0
    x = values.view(1, 1, 4, 4)
    got = -m.elbo(x, t_samples=1).terms["prior_matching"].item() / 16  # nats per dimension
    a = _tables(1000)[1][-1].item()
    closed = sum(0.5 * (a * v * v - a - math.log(1 - a)) for v in values.tolist()) / 16
    assert got == pytest.approx(closed, rel=2e-2)  # float32 cancellation at 1e-5 nats
    assert 0 < got < 1e-4


@pytest.mark.parametrize("target", ["x0", "v"])
def test_eps_x0_and_v_predictions_of_the_same_mean_give_the_same_elbo(target):
    timesteps, x = 10, _images()
    eps_net = RandomEps(16)
    eps_model = _vdm(timesteps, net=eps_net, parameterization="eps")
    other = _vdm(timesteps, net=Converted(eps_net, timesteps, target), parameterization=target)
    for estimator, params in (("denoising_matching", {"t_samples": None}), ("consistency", {})):
        torch.manual_seed(3)
        a = eps_model.elbo(x, estimator, **params)
        torch.manual_seed(3)
        b = other.elbo(x, estimator, **params)
        for name in a.terms:
            torch.testing.assert_close(a.terms[name], b.terms[name], rtol=1e-3, atol=1e-2)
    # and the reading is not trivially the same: the same net read as x0 gives another ELBO
    misread = _vdm(timesteps, net=eps_net, parameterization=target)
    torch.manual_seed(3)
    assert not torch.allclose(
        misread.elbo(x, t_samples=None).total, eps_model.elbo(x, t_samples=None).total
    )


def _replicated_totals(model, x, reps, estimator, **params):
    xs = x.repeat(reps, *[1] * (x.dim() - 1))
    with torch.no_grad():
        return model.elbo(xs, estimator, **params).total.view(reps, -1)


class NearOptimal(nn.Module):
    """The ideal eps-prediction for data that is the single point ``x_ref`` (row b of a batch of
    replicas is ``x_ref[b % len(x_ref)]``), plus ``noise`` times a random map: a trained-like net."""

    def __init__(self, x_ref, timesteps, noise=0.1):
        super().__init__()
        self.x_ref, self.noise = x_ref, noise
        self.ab = _tables(timesteps)[1].float()
        self.perturb = RandomEps(x_ref[0].numel())

    def forward(self, x, t):
        ab = self.ab[t].view(-1, *[1] * (x.dim() - 1))
        ref = self.x_ref.repeat(x.shape[0] // len(self.x_ref), *[1] * (x.dim() - 1))
        return (x - ab.sqrt() * ref) / (1 - ab).sqrt() + self.noise * self.perturb(x, t)


@pytest.mark.parametrize("net", ["random", "near_optimal"])
def test_the_two_decompositions_agree_and_denoising_matching_has_less_variance(net):
    """Both are unbiased estimates of the same ELBO (the lecture's two breakdowns of
    E_q[log p(x_{0:T}) / q(x_{1:T}|x_0)]), so their means agree within Monte-Carlo error, for a
    random net as for a good one. Denoising matching integrates each x_{t-1} out analytically
    (given x_t and x_0), where consistency keeps the sampled log-density ratios; for a net near
    the ideal denoiser the KLs are nearly constant in x_t and its variance is far lower."""
    torch.manual_seed(0)
    x, reps, timesteps = _images(n=2), 2000, 8
    m = _vdm(timesteps, net=RandomEps(16) if net == "random" else NearOptimal(x, timesteps))
    dm = _replicated_totals(m, x, reps, "denoising_matching", t_samples=None)
    cons = _replicated_totals(m, x, reps, "consistency")
    se = (dm.var(0) / reps + cons.var(0) / reps).sqrt()
    assert ((dm.mean(0) - cons.mean(0)).abs() < 4 * se).all(), (dm.mean(0), cons.mean(0), se)
    assert (dm.var(0) < cons.var(0)).all()
    if net == "near_optimal":
        assert (dm.var(0) < 0.01 * cons.var(0)).all(), (dm.var(0), cons.var(0))
        # one sampled step per example against one sampled level (each with the
        # reconstruction computed at every call): the same ordering
        dm1 = _replicated_totals(
            m, x, reps, "denoising_matching", t_samples=1, reconstruction_every_step=True
        )
        cons1 = _replicated_totals(m, x, reps, "consistency", levels=1)
        assert (dm1.var(0) < 0.1 * cons1.var(0)).all(), (dm1.var(0), cons1.var(0))


@pytest.mark.parametrize(
    "params",
    [
        {"t_samples": 1},
        {"t_samples": 3},
        {"t_samples": 1, "proposal": [8.0, 4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]},
        {"t_samples": 1, "reconstruction_every_step": True},
        {
            "t_samples": 1,
            "reconstruction_every_step": True,
            "proposal": [8.0, 4.0, 2.0, 1.0, 1.0, 1.0, 1.0],
        },
    ],
    ids=["default", "default-k3", "fixed", "every-step", "every-step-fixed"],
)
def test_sampled_t_is_unbiased_for_the_exact_sum(params):
    torch.manual_seed(1)
    m, x, reps = _vdm(timesteps=8), _images(n=2), 4000
    exact = _replicated_totals(m, x, reps, "denoising_matching", t_samples=None)
    sampled = _replicated_totals(m, x, reps, "denoising_matching", **params)
    se = (exact.var(0) / reps + sampled.var(0) / reps).sqrt()
    assert ((exact.mean(0) - sampled.mean(0)).abs() < 4 * se).all(), (
        exact.mean(0),
        sampled.mean(0),
        se,
    )


SPLIT = ("reconstruction", "denoising_matching")


def _replicated_terms(model, x, reps, estimator, **params):
    """``reconstruction`` and ``denoising_matching`` of ``reps`` replicas of ``x``, each
    ``(reps, B)`` float64, by an estimator instance or by name."""
    xs = x.repeat(reps, *[1] * (x.dim() - 1))
    with torch.no_grad():
        if isinstance(estimator, str):
            terms = model.elbo(xs, estimator, **params)
        else:
            terms = estimator(model, xs)
    return {name: terms.terms[name].double().view(reps, -1) for name in SPLIT}


def _assert_unbiased_per_term(exact, sampled, reps):
    for name in SPLIT:
        a, b = exact[name], sampled[name]
        se = (a.var(0) / reps + b.var(0) / reps).sqrt()
        assert ((a.mean(0) - b.mean(0)).abs() < 4 * se).all(), (name, a.mean(0), b.mean(0), se)


def _warmed(model, x, **params):
    """A loss-aware estimator warmed in training mode (every t seen ``history`` times)."""
    from genkit_vdm.estimators import DenoisingMatchingELBO

    est = DenoisingMatchingELBO(history=2, **params)
    with torch.no_grad():
        est(model.train(), x.repeat(100, *[1] * (x.dim() - 1)))
    assert est.moments.warm(2)
    return est


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("t_sampler", ["stratified", "uniform"])
@pytest.mark.parametrize("proposal", ["uniform", "loss_aware", "fixed"])
def test_one_call_estimator_is_unbiased_per_term(proposal, t_sampler, k):
    """One draw t ~ p(t) on 1..T per call, booked to reconstruction (t = 1, weight 1/p(1)) or
    to denoising_matching (t >= 2): each term's mean over replicas is the exact estimator's.
    Evaluation mode: each example has its own stratified shift, so the replicas are
    independent and the standard errors honest."""
    from genkit_vdm.estimators import DenoisingMatchingELBO

    torch.manual_seed(5)
    m, x, reps = _vdm(timesteps=8), _images(n=2), 4000
    exact = _replicated_terms(m, x, reps, "denoising_matching", t_samples=None)
    if proposal == "loss_aware":
        est = _warmed(m, x, t_samples=k, t_sampler=t_sampler)
        p, _ = est.probabilities(8, x.device)
        assert not torch.allclose(p, torch.full_like(p, 1 / 8))  # not trivially uniform
    else:
        given = [1.0, 3.0, 8.0, 1.0, 1.0, 0.5, 0.5, 0.5] if proposal == "fixed" else proposal
        est = DenoisingMatchingELBO(t_samples=k, t_sampler=t_sampler, proposal=given)
    m.eval()
    sampled = _replicated_terms(m, x, reps, est)
    _assert_unbiased_per_term(exact, sampled, reps)
    # the test can fail: booking t = 1 with weight 1 instead of 1/p(1) is far off
    p1 = est.probabilities(8, x.device, model=m, x=x)[0][0].item()
    wrong = sampled["reconstruction"] * p1
    se = (wrong.var(0) / reps + exact["reconstruction"].var(0) / reps).sqrt()
    assert ((wrong.mean(0) - exact["reconstruction"].mean(0)).abs() > 10 * se).all()


def test_loss_aware_proposal_adapts_and_stays_unbiased():
    from genkit_vdm.estimators import DenoisingMatchingELBO

    torch.manual_seed(2)
    m, x, reps = _vdm(timesteps=8), _images(n=1), 4000
    est = DenoisingMatchingELBO(history=2)
    # cold, in training: the warm-up proposal p(1) = 1/4, the rest uniform; on 2..T: uniform
    p, cost = est.probabilities(8, x.device)
    warm_up = torch.tensor([0.25] + [0.75 / 7] * 7, dtype=torch.float64)
    assert cost == 0.0 and torch.allclose(p, warm_up, rtol=1e-12, atol=0)
    p2, _ = est.probabilities(8, x.device, first=2)
    assert torch.allclose(p2, torch.full((7,), 1 / 7, dtype=torch.float64))
    with torch.no_grad():
        est(m, x.repeat(200, 1, 1, 1))  # every t seen often enough
    p, cost = est.probabilities(8, x.device)
    root = est.moments.mean_sq.sqrt()
    assert cost == 0.0 and est.moments.seen.sum() == 200
    assert torch.allclose(p, 0.99 * root / root.sum() + 0.01 / 8, rtol=1e-12, atol=0)
    assert p.sum().item() == pytest.approx(1.0) and p.max() > 0.25  # no longer the warm-up
    exact = _replicated_totals(m, x, reps, "denoising_matching", t_samples=None)
    with torch.no_grad():
        sampled = est(m, x.repeat(reps, 1, 1, 1)).total.view(reps, -1)
    se = (exact.var(0) / reps + sampled.var(0) / reps).sqrt()
    assert ((exact.mean(0) - sampled.mean(0)).abs() < 4 * se).all()
    # through the model: its default estimator keeps the statistics between calls
    m2 = _vdm(timesteps=8)
    m2.elbo(x)
    m2.elbo(x.repeat(3, 1, 1, 1))
    assert m2.loss_moments.seen.sum().item() == 4
    # with the reconstruction at every call, only t = 2..T are recorded
    m3 = _vdm(timesteps=8, reconstruction_every_step=True)
    m3.elbo(x.repeat(16, 1, 1, 1))
    assert m3.loss_moments.seen[0] == 0 and m3.loss_moments.seen.sum() == 16


class Counting(nn.Module):
    """A net that records each call's rows and steps, then defers to ``net``."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows, self.steps = net, [], []

    def forward(self, x, t):
        self.rows.append(x.shape[0])
        self.steps.append(t.detach().clone())
        return self.net(x, t)


@pytest.mark.parametrize("every_step", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_one_network_call_per_example_per_draw(k, every_step):
    """The default estimator evaluates the net once per draw (B k rows in one call, nfe = k);
    reconstruction_every_step adds the t = 1 call (B (1 + k) rows in two calls); exact mode
    evaluates T steps per example."""
    b, timesteps = 4, 8
    net = Counting(RandomEps(16))
    m, x = _vdm(timesteps, net=net, reconstruction_every_step=every_step), _images(n=b)
    with torch.no_grad():
        for _ in range(8):  # warm the model's statistics, so that evaluation needs no pilot
            m.elbo(x.repeat(8, 1, 1, 1))
    assert m.loss_moments.warm(m.config.t_history, 2 if every_step else 1)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        net.rows.clear()
        terms = m.elbo(x, t_samples=k)
        expected = b * (k + 1) if every_step else b * k
        assert len(net.rows) == (2 if every_step else 1), (mode, net.rows)
        assert sum(net.rows) == expected and terms.nfe == expected / b
    net.rows.clear()
    assert m.elbo(x, t_samples=None).nfe == timesteps
    assert sum(net.rows) == b * timesteps


def test_stratified_uniforms_are_an_evenly_spaced_grid():
    """draw_uniforms: shared, the k b numbers are one shifted grid with spacing exactly 1/(k b);
    per example, its k numbers are 1/k apart modulo 1 with a shift of its own."""
    from genkit_vdm.draws import draw_uniforms

    torch.manual_seed(0)
    k, b = 3, 5
    u = draw_uniforms(k, b, "stratified", shared=True).double()
    assert u.shape == (k, b) and ((u >= 0) & (u < 1)).all()
    v = u.flatten().sort().values
    spacing = torch.full((k * b - 1,), 1 / (k * b), dtype=torch.float64)
    torch.testing.assert_close(v.diff(), spacing, rtol=0, atol=1e-6)
    assert v[0] < 1 / (k * b)
    # per example (columns): k numbers 1/k apart modulo 1, in either mode
    k, b = 4, 2000
    expected = torch.arange(k, dtype=torch.float64)[:, None] / k
    for shared in (True, False):
        u = draw_uniforms(k, b, "stratified", shared=shared).double()
        gaps = (u - u[:1]) % 1.0
        gaps = torch.where(gaps > 1 - 1e-6, gaps - 1.0, gaps)
        assert ((gaps - expected).abs() < 1e-6).all()
        # the shift of example e: u[0, e] = frac(U_e + e / (k b))
        shift = (u[0] - torch.arange(b, dtype=torch.float64) / (k * b)) % 1.0
        shift = torch.where(shift > 1 - 1e-6, shift - 1.0, shift)
        if shared:
            assert (shift - shift[0]).abs().max() < 1e-6
        else:  # independent U(0, 1) shifts: spread out and uncorrelated across examples
            assert abs(shift.mean().item() - 0.5) < 0.03
            assert abs(shift.var().item() - 1 / 12) < 0.01
            assert abs(torch.corrcoef(torch.stack([shift[:-1], shift[1:]]))[0, 1].item()) < 0.1
    u = draw_uniforms(k, b, "uniform", shared=True).double()
    assert not (((u - u[:1]) % 1.0 - expected).abs() < 1e-3).all()  # no grid


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_stratified_draws_give_one_step_per_stratum_of_the_cdf(mode):
    """With p = (1/4, 1/4, 1/8, 1/8, 1/16 x 4), the quarters of p's CDF are the steps {1}, {2},
    {3, 4} and {5..8}: each example's 4 draws take one from each. In training the whole batch
    is one grid: each step is drawn k B p(t) times (up to a float rounding)."""
    from genkit_vdm.estimators import DenoisingMatchingELBO

    torch.manual_seed(3)
    p = [0.25, 0.25, 0.125, 0.125] + [0.0625] * 4
    k, b = 4, 64
    net = Counting(RandomEps(16))
    m = _vdm(8, net=net)
    getattr(m, mode)()
    with torch.no_grad():
        DenoisingMatchingELBO(t_samples=k, proposal=p)(m, _images(n=b))
    t = net.steps[-1].view(k, b).sort(0).values  # row j*B + e is draw j of example e
    assert (t[0] == 1).all() and (t[1] == 2).all()
    assert ((t[2] >= 3) & (t[2] <= 4)).all() and (t[3] >= 5).all()
    assert set(t[2].tolist()) == {3, 4}
    if mode == "train":
        counts = torch.bincount(net.steps[-1], minlength=9)[1:].double()
        assert ((counts - k * b * torch.tensor(p, dtype=torch.float64)).abs() <= 1).all(), counts
    # independent uniforms break the pattern
    with torch.no_grad():
        DenoisingMatchingELBO(t_samples=k, proposal=p, t_sampler="uniform")(m, _images(n=b))
    t = net.steps[-1].view(k, b).sort(0).values
    assert not ((t[0] == 1) & (t[1] == 2)).all()


def test_pilot_proposal_is_fitted_once_favours_t_1_and_stays_unbiased():
    """Evaluation mode, cold loss-aware estimator: the pilot fits p on the first batch (8
    examples x the grid's steps, here every t = 1..8), charged to that call's nfe only; it
    gives t = 1 far more than 1/T for a net whose L_1 dominates (:class:`NearOptimal`: L_1
    about 19 nats, L_2 about 1, the later KLs hundredths); the estimates stay unbiased."""
    from genkit_vdm.estimators import PILOT_EXAMPLES, DenoisingMatchingELBO

    torch.manual_seed(6)
    timesteps, x = 8, _images(n=2)
    net = Counting(NearOptimal(x, timesteps))
    m = _vdm(timesteps, net=net)
    m.eval()
    est = DenoisingMatchingELBO()  # loss_aware, no statistics yet
    xb = x.repeat(8, 1, 1, 1)  # B = 16
    grid = timesteps  # geomspace(1, 8, 24).round() hits every step
    with torch.no_grad():
        first = est(m, xb)
    assert net.rows == [PILOT_EXAMPLES * grid, 16]
    assert first.nfe == 1 + PILOT_EXAMPLES * grid / 16
    assert sorted(set(net.steps[0].tolist())) == list(range(1, timesteps + 1))
    net.rows.clear()
    with torch.no_grad():
        again = est(m, xb)
    assert net.rows == [16] and again.nfe == 1  # fitted once
    p, cost = est.probabilities(timesteps, x.device, model=m, x=xb)
    assert cost == 0.0 and p.sum().item() == pytest.approx(1.0)
    assert p[0] > 0.5 > 1 / timesteps and (p >= 0.05 / timesteps).all()
    assert est.moments is None  # evaluation records nothing
    # unbiased per term, against the exact sum
    reps = 2000
    exact = _replicated_terms(m, x, reps, "denoising_matching", t_samples=None)
    sampled = _replicated_terms(m, x, reps, est)
    _assert_unbiased_per_term(exact, sampled, reps)
    # proposal="pilot" fits its own in training mode too; a warm loss-aware one needs none
    with torch.no_grad():
        assert DenoisingMatchingELBO(proposal="pilot")(m.train(), xb).nfe == first.nfe
    warm = _warmed(m, x)
    net.rows.clear()
    with torch.no_grad():
        assert warm(m.eval(), xb).nfe == 1 and net.rows == [16]


class OffsetAtFirstStep(RandomEps):
    """:class:`RandomEps` plus a constant ``offset`` at ``t = 1`` only, so that L_simple's
    ``t = 1`` summand stands out from the others."""

    offset = 2.0

    def forward(self, x, t):
        first = (t == 1).float().view(-1, *[1] * (x.dim() - 1))
        return super().forward(x, t) + self.offset * first


def _l_simple_closed_form(model, x, ts):
    """``E_eps ||eps - eps_hat(x_t, t)||^2`` for the net :class:`OffsetAtFirstStep`, in closed form.

    Rows are ``flat(x_t) @ W + c_t`` (``c_t = b sin t``, plus the offset at ``t = 1``); with
    ``x_t = s x0 + r eps``, ``eps - eps_hat = eps (I - r W) - (s x0 W + c_t)``, so the
    expectation over ``eps`` is ``||I - r W||_F^2 + ||s x0 W + c_t||^2``. ``(len(ts), B)``.
    """
    w, bias = model.net.w.detach().double(), model.net.b.detach().double()
    flat, ab = x.flatten(1).double(), _tables(model.timesteps)[1]
    eye = torch.eye(w.shape[0], dtype=torch.float64)
    rows = []
    for t in ts:
        s, r = ab[t].sqrt(), (1 - ab[t]).sqrt()
        c = bias * math.sin(t) + (OffsetAtFirstStep.offset if t == 1 else 0.0)
        rows.append((eye - r * w).square().sum() + (s * flat @ w + c).square().sum(1))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "params", [{"t_samples": 1}, {"t_samples": None}], ids=["sampled", "exact"]
)
def test_simple_is_ho_et_al_l_simple_over_t_1_to_T(params):
    """The extra ``simple`` is -L_simple = -E_{t ~ U{1..T}, eps} ||eps - eps_hat(x_t, t)||^2,
    against the closed form for a linear net; leaving out t = 1 would be detected."""
    timesteps, reps = 6, 3000
    m, x = _vdm(timesteps, net=OffsetAtFirstStep(16)), _images(n=2)
    torch.manual_seed(4)
    with torch.no_grad():
        got = -m.elbo(x.repeat(reps, 1, 1, 1), **params).extras["simple"].double().view(reps, -1)
    per_t = _l_simple_closed_form(m, x, range(1, timesteps + 1))  # (T, B)
    expected = per_t.mean(0)
    se = got.std(0) / math.sqrt(reps)
    assert ((got.mean(0) - expected).abs() < 4 * se).all(), (got.mean(0), expected, se)
    without_t1 = per_t[1:].mean(0)
    assert ((without_t1 - expected).abs() > 12 * se).all()  # the test can tell the two apart


def test_ho_et_al_objective_trains_on_l_simple_and_logs_the_true_elbo():
    m, x = _vdm(timesteps=10), _images()
    torch.manual_seed(0)
    terms = m.elbo(x)
    ho = {"reconstruction": 0.0, "denoising_matching": 0.0, "simple": 1.0}
    torch.testing.assert_close(
        terms.objective(ho), -(terms.terms["prior_matching"] + terms.extras["simple"])
    )
    # prior matching has no parameters: the gradient is that of L_simple alone
    m.zero_grad()
    terms.objective(ho).sum().backward(retain_graph=True)
    grad = m.net.w.grad.clone()
    m.zero_grad()
    (-terms.extras["simple"]).sum().backward()
    torch.testing.assert_close(grad, m.net.w.grad)
    assert "simple" not in terms.terms and (terms.extras["simple"] < 0).all()
    torch.testing.assert_close(terms.total, sum(terms.terms.values()))


def test_training_a_few_steps_raises_the_elbo():
    from sklearn.datasets import load_digits

    digits = load_digits().images[:16]  # values 0..16
    x = to_model_scale(torch.tensor(digits * 255.0 / 16.0).round().to(torch.uint8)).unsqueeze(1)
    torch.manual_seed(0)
    m = genkit.create_model(
        "vdm", (1, 8, 8), timesteps=10, channels=8, channel_mults=(1,), attention_resolution=0
    )
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)

    def evaluate():
        torch.manual_seed(123)
        with torch.no_grad():
            return m.elbo(x, t_samples=None).total.mean().item()

    before = evaluate()
    for _ in range(25):
        loss = m.elbo(x, t_samples=2).objective().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after > before + 10.0, (before, after)  # nats per image, on the same noise


def test_estimator_errors():
    m, x = _vdm(), _images()
    with pytest.raises(InvalidParameterError, match="t_samples"):
        m.elbo(x, "denoising_matching", t_samples=0)
    with pytest.raises(InvalidParameterError, match="t_sampler 'importance'; choose from strat"):
        m.elbo(x, "denoising_matching", t_sampler="importance")
    with pytest.raises(InvalidParameterError, match="unexpected keyword argument 'sampler'"):
        m.elbo(x, "denoising_matching", sampler="uniform")  # the old name is gone
    with pytest.raises(InvalidParameterError, match="'bogus'; choose from loss_aware, uniform, pi"):
        m.elbo(x, "denoising_matching", proposal="bogus")
    with pytest.raises(InvalidParameterError, match=r"2 entries; .* steps 1\.\.10, 10 of them"):
        m.elbo(x, "denoising_matching", proposal=[1.0, 2.0])
    with pytest.raises(InvalidParameterError, match=r"10 entries; .* steps 2\.\.10, 9 of them"):
        m.elbo(x, "denoising_matching", proposal=[1.0] * 10, reconstruction_every_step=True)
    with pytest.raises(InvalidParameterError, match="positive numbers"):
        m.elbo(x, "denoising_matching", proposal=[1.0, 0.0] * 5)
    with pytest.raises(InvalidParameterError, match="uniform_mix"):
        m.elbo(x, "denoising_matching", uniform_mix=0.0)
    vae = genkit.create_model("vae", (1, 4, 4), latent_dim=2, hidden=8, net="mlp")
    with pytest.raises(IncompatibleEstimatorError, match=r"q_posterior|closed-form"):
        vae.elbo(x, "denoising_matching")


@pytest.mark.parametrize("training", [True, False])
def test_a_single_step_vdm_is_all_reconstruction(training):
    """T = 1: every draw is t = 1, the reconstruction, with weight 1 (no KL term at all)."""
    m = _vdm(timesteps=1, shape=(4,), net=RandomEps(4))
    m.train(training)
    x = torch.randn(2, 4).clamp(-1, 1).repeat(2000, 1)
    with torch.no_grad():
        terms = m.elbo(x)
        exact = m.elbo(x, t_samples=None)
    assert torch.equal(terms.terms["denoising_matching"], torch.zeros(4000)) and terms.nfe == 1.0
    got = terms.terms["reconstruction"].view(2000, 2).double()
    want = exact.terms["reconstruction"].view(2000, 2).double()
    se = (got.var(0) / 2000 + want.var(0) / 2000).sqrt()
    assert ((got.mean(0) - want.mean(0)).abs() < 4 * se).all()
