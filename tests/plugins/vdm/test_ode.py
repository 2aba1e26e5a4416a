"""The ``ode`` estimator (probability-flow ODE log-likelihood) against closed forms: Gaussian
data with the Bayes-optimal denoiser (continuous and discrete time), the linear flow of an
untrained denoiser on 8-bit images (dequantized bound), Hutchinson's unbiasedness, nfe, errors."""

import math

import numpy as np
import pytest
import torch
from genkit_vdm.ode import log_snr_table, step_of_log_snr
from torch import nn

import genkit
from genkit.distributions import to_model_scale
from genkit.errors import IncompatibleEstimatorError, InvalidParameterError

S, D = 0.5, 4  # Gaussian data x ~ N(0, S^2 I_D)


class GaussianEps(nn.Module):
    """The Bayes-optimal prediction for x ~ N(0, C): ``E[eps | z_t] = sigma (alpha^2 C +
    sigma^2 I)^-1 z``, through ``C = Q diag(e) Q^T``; ``log_snr(t)`` is the model's schedule.
    ``parameterization="v"`` returns ``v = alpha eps_hat - sigma x0_hat`` instead."""

    def __init__(self, log_snr, cov, parameterization="eps"):
        super().__init__()
        self.log_snr, self.parameterization = log_snr, parameterization
        self.e, self.q = torch.linalg.eigh(cov.double())

    def forward(self, z, t):
        lam = self.log_snr(t).double()[:, None]
        a2, s2 = torch.sigmoid(lam), torch.sigmoid(-lam)
        zq = z.double() @ self.q
        eps = s2.sqrt() * (zq / (a2 * self.e + s2)) @ self.q.T
        if self.parameterization == "v":
            x0 = (z.double() - s2.sqrt() * eps) / a2.sqrt()
            eps = a2.sqrt() * eps - s2.sqrt() * x0
        return eps.to(z.dtype)


def _continuous(cov, parameterization="eps"):
    m = genkit.create_model(
        "vdm",
        (D,),
        timesteps=0,
        schedule="fixed_linear",
        parameterization=parameterization,
        net=nn.Identity(),
    )
    m.decoder.net = GaussianEps(m.encoder.log_snr, cov, parameterization)
    return m


def _discrete(cov, timesteps=1000):
    """A discrete VDM whose net reads the float step ``tau`` through its own piecewise-linear
    interpolation of the log-SNR table (numpy's, independent of the estimator's)."""
    m = genkit.create_model("vdm", (D,), timesteps=timesteps, net=nn.Identity())
    ab = m.encoder.alpha_bars[1:].numpy()
    table = np.log(ab) - np.log1p(-ab)
    steps = np.arange(1, timesteps + 1)

    def log_snr(tau):
        return torch.from_numpy(np.interp(tau.double().numpy(), steps, table))

    m.decoder.net = GaussianEps(log_snr, cov)
    return m, table


def _data(n, cov=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    if cov is not None:
        x = x @ torch.linalg.cholesky(cov).T
    return (S * x if cov is None else x).float()


def _log_normal(x, var):
    """``log N(x; 0, var I)`` summed over the last dimension, float64."""
    x = x.double()
    return -0.5 * (x.square() / var + math.log(2 * math.pi * var)).sum(-1)


def _flow_log_density(x, lam_start, lam_end):
    """What the exact flow gives for x ~ N(0, S^2 I): it carries N(0, v_start) onto
    N(0, v_end), ``v = alpha^2 S^2 + sigma^2``, where the prior N(0, I) takes over."""
    a2 = [1 / (1 + math.exp(-lam)) for lam in (lam_start, lam_end)]
    v = [a * S**2 + (1 - a) for a in a2]
    z_end = math.sqrt(a2[0]) * x.double() * math.sqrt(v[1] / v[0])
    jacobian = 0.5 * D * math.log(v[1] / v[0]) + 0.5 * D * math.log(a2[0])
    return _log_normal(z_end, 1.0) + jacobian


def _correlated_cov():
    a = torch.randn(D, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return 0.25 * a @ a.T + 0.05 * torch.eye(D, dtype=torch.float64)


def test_the_optimal_denoiser_recovers_the_gaussian_density_in_continuous_time():
    m, x = _continuous(S**2 * torch.eye(D)), _data(64)
    out = m.elbo(x, "ode", divergence="exact")
    assert set(out.terms) == {"log_likelihood"} and out.nfe > 0
    got = out.terms["log_likelihood"].double()
    gap = (got - _log_normal(x, S**2)) / D
    assert gap.abs().max() < 0.01, gap.abs().max()
    # the remainder is the prior N(0, I) in place of N(0, v_1) (alpha_1^2 = sigmoid(-5)):
    # against the flow's own closed form only the solver's error is left
    flow = (got - _flow_log_density(x, 13.3, -5.0)) / D
    assert flow.abs().max() < 2e-4, flow.abs().max()


def test_hutchinson_is_unbiased_and_auto_switches_by_dimension():
    cov = _correlated_cov()
    m, x = _continuous(cov), _data(32, cov)
    exact = m.elbo(x, "ode", divergence="exact").terms["log_likelihood"].double()
    truth = torch.distributions.MultivariateNormal(torch.zeros(D, dtype=torch.float64), cov)
    assert ((exact - truth.log_prob(x.double())) / D).abs().max() < 0.01
    reps = 40
    torch.manual_seed(0)
    hutch = m.elbo(x.repeat(reps, 1), "ode", divergence="hutchinson").terms["log_likelihood"]
    diff = hutch.double().view(reps, -1) - exact
    se = diff.std() / math.sqrt(diff.numel())
    assert diff.std() > 0.1  # the noise is there (a non-diagonal Jacobian) ...
    assert abs(diff.mean()) < 4 * se, (diff.mean(), se)  # ... and averages out
    same = [m.elbo(x[:4], "ode").terms["log_likelihood"] for _ in range(2)]  # D = 4 <= 16: exact
    assert torch.equal(*same)
    noisy = [m.elbo(x[:4], "ode", exact_max_dims=3).terms["log_likelihood"] for _ in range(2)]
    assert not torch.equal(*noisy)


def test_the_v_parameterization_reads_the_same_flow():
    cov = S**2 * torch.eye(D)
    x = _data(16)
    eps = _continuous(cov).elbo(x, "ode").terms["log_likelihood"]
    v = _continuous(cov, "v").elbo(x, "ode").terms["log_likelihood"]
    torch.testing.assert_close(v, eps, rtol=0, atol=1e-3)


def test_the_optimal_denoiser_recovers_the_gaussian_density_in_discrete_time():
    """T = 1000 linear, the ODE between the integer steps (log-SNR linear in tau). Tolerance
    0.003 nats/dim against the true density: the flow starts at step 1, whose marginal is the
    data smoothed by N(0, sigma_1^2 / alpha_1^2 = 1e-4), which moves log p by
    1e-4 / (2 S^2) (x^2 / S^2 - 1) <= 1e-3 per dim for |x| <= 3 S; against the flow's own closed
    form (start at step 1, end at step T, prior N(0, I)) only the solver's error is left."""
    m, table = _discrete(S**2 * torch.eye(D))
    x = _data(64)
    out = m.elbo(x, "ode")
    got = out.terms["log_likelihood"].double()
    gap = (got - _log_normal(x, S**2)) / D
    assert gap.abs().max() < 3e-3, gap.abs().max()
    flow = (got - _flow_log_density(x, table[0], table[-1])) / D
    assert flow.abs().max() < 5e-4, flow.abs().max()
    assert out.nfe > 0
    # the estimator's tau(lambda) inverts numpy's lambda(tau), the ends included
    tau = np.concatenate([[1.0, 1000.0, 500.0], np.random.default_rng(0).uniform(1, 1000, 50)])
    lam = torch.from_numpy(np.interp(tau, np.arange(1, 1001), table))
    back = step_of_log_snr(log_snr_table(m.encoder.alpha_bars), lam)
    torch.testing.assert_close(back, torch.from_numpy(tau), rtol=0, atol=1e-6)


def test_double_data_with_a_parameterless_model_are_computed_in_float64():
    m, x = _continuous(S**2 * torch.eye(D)), _data(8).double()
    got = m.elbo(x, "ode", rtol=1e-8, atol=1e-8).terms["log_likelihood"]
    assert got.dtype == torch.float64
    assert ((got - _flow_log_density(x, 13.3, -5.0)) / D).abs().max() < 1e-6


def _images(n=6):
    g = torch.Generator().manual_seed(0)
    return to_model_scale(torch.randint(0, 256, (n, 1, 4, 4), generator=g))


@pytest.mark.parametrize("timesteps", [0, 10])
def test_untrained_denoiser_on_images_gives_the_linear_flow_closed_form(timesteps):
    """eps_hat = 0 (the MLP's output layer starts at zero): dz/dt = 1/2 lambda' sigma^2 z =
    (d log alpha/dt) z, so z_1 = (alpha_1 / alpha_start) z_start and int div F = D log(alpha_1 /
    alpha_start). With z_start = alpha_start y: log p(y) = log N(alpha_1 y; 0, I) + D log alpha_1,
    alpha_start cancelling only if the estimator adds D log alpha_start (lambda_max = 3 makes it
    -0.39 nats). The 8-bit bound adds D log(2/255) at y = x + u, u replayed from the seed."""
    params = dict(denoiser="mlp", hidden=16, depth=1)
    if timesteps == 0:
        params.update(schedule="fixed_linear", schedule_params={"log_snr_max": 3.0}, fourier=[])
    torch.manual_seed(0)
    m = genkit.create_model("vdm", (1, 4, 4), timesteps=timesteps, **params).eval()
    dims, x = 16, _images()
    if timesteps == 0:
        a1_sq = torch.sigmoid(torch.tensor(-5.0, dtype=torch.float64))
    else:
        a1_sq = m.encoder.alpha_bars[-1].double()

    def closed_form(y):
        return _log_normal(a1_sq.sqrt() * y.flatten(1), 1.0) + 0.5 * dims * torch.log(a1_sq)

    torch.manual_seed(5)
    out = m.elbo(x, "ode")  # auto: a discretized_gaussian decoder, so the dequantized bound
    torch.manual_seed(5)
    u = (2.0 * torch.rand_like(x) - 1.0) / 255.0
    expected = closed_form(x + u) + dims * math.log(2 / 255)
    torch.testing.assert_close(out.terms["log_likelihood"].double(), expected, rtol=0, atol=1e-3)
    density = m.elbo(x, "ode", dequantize=False).terms["log_likelihood"].double()
    torch.testing.assert_close(density, closed_form(x), rtol=0, atol=1e-3)
    with pytest.raises(InvalidParameterError, match="8-bit"):
        m.elbo(x + 0.001, "ode")


def test_nfe_grows_as_the_tolerances_tighten():
    m, x = _continuous(S**2 * torch.eye(D)), _data(8)
    loose = m.elbo(x, "ode", rtol=1e-3, atol=1e-3).nfe
    tight = m.elbo(x, "ode", rtol=1e-7, atol=1e-7).nfe
    assert 0 < loose < tight, (loose, tight)
    assert m.elbo(x, "ode", method="bosh3").nfe > 0


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"rtol": 0.0}, "rtol must be a number > 0"),
        ({"atol": -1e-5}, "atol must be a number > 0"),
        ({"rtol": True}, "rtol must be a number > 0"),
        ({"method": "euler"}, "unknown method 'euler'; choose an adaptive"),
        ({"divergence": "skilling"}, "unknown divergence 'skilling'"),
        ({"exact_max_dims": -1}, "exact_max_dims must be an integer >= 0"),
        ({"exact_max_dims": 2.5}, "exact_max_dims must be an integer >= 0"),
        ({"dequantize": "yes"}, "dequantize must be true, false or 'auto'"),
    ],
)
def test_bad_parameters_are_one_line_errors(params, match):
    m = _continuous(S**2 * torch.eye(D))
    with pytest.raises(InvalidParameterError, match=match) as err:
        m.elbo(_data(2), "ode", **params)
    assert "\n" not in str(err.value)


def test_a_model_that_is_not_a_vdm_is_refused_and_ode_is_registered():
    vae = genkit.create_model("vae", (1, 4, 4), latent_dim=2, hidden=8, net="mlp")
    with pytest.raises(IncompatibleEstimatorError, match="needs a variational diffusion model"):
        vae.elbo(_images(2), "ode")
    assert "ode" in genkit.available_estimators()
