"""The consistency ELBO of a Markov chain against brute force and closed forms.

The test chain is element-wise linear-Gaussian on D dimensions::

    q(z_t | z_{t-1}) = N(a_t z_{t-1} + b_t, s_t^2),   p(z_{t-1} | z_t) = N(c_t z_t + d_t, r_t^2),
    p(z_T) = N(0, I)

so every expectation of the ELBO has a closed form, log p(x) is Gaussian, and the exact
posterior p(z_{1:T} | x) is itself such a bottom-up chain (the generative chain's reversed
conditionals), for which log p(x, z) - log q(z | x) = log p(x) at every draw.
"""

import math

import pytest
import torch
from torch.distributions import Independent, Normal

from genkit import IncompatibleEstimatorError, InvalidParameterError, create_estimator
from genkit.markov import ConsistencyELBO, MarkovChain, find_chain

LOG_2PI = math.log(2 * math.pi)


class LinearChain:
    """Rows ``t = 1..T`` of each ``(T + 1, D)`` table hold level t's coefficients."""

    def __init__(self, a, b, s, c, d, r):
        self.a, self.b, self.s, self.c, self.d, self.r = a, b, s, c, d, r
        self.num_latents = a.shape[0] - 1
        self.calls = {"q_transition": 0, "p_transition": 0, "q_marginal": 0}

    def q_transition(self, z_prev, t):
        self.calls["q_transition"] += 1
        return Independent(Normal(self.a[t] * z_prev + self.b[t], self.s[t]), 1)

    def p_transition(self, z_t, t):
        self.calls["p_transition"] += 1
        return Independent(Normal(self.c[t] * z_t + self.d[t], self.r[t]), 1)

    def prior_latent(self):
        zeros = torch.zeros(self.a.shape[1])
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)


class MarginalLinearChain(LinearChain):
    """The same chain with ``q(z_t | x) = N(A_t x + B_t, V_t)`` in closed form."""

    def q_marginal(self, x, t):
        self.calls["q_marginal"] += 1
        gain, shift, var = _q_marginal_tables(self)
        return Independent(Normal(gain[t] * x + shift[t], var[t].sqrt()), 1)


def _q_marginal_tables(chain):
    """z_t = A_t x + B_t + noise of variance V_t: A_0 = 1, B_0 = 0, V_0 = 0."""
    gain, shift, var = (
        [torch.ones_like(chain.a[0])],
        [torch.zeros_like(chain.a[0])],
        [torch.zeros_like(chain.a[0])],
    )
    for t in range(1, chain.num_latents + 1):
        gain.append(chain.a[t] * gain[-1])
        shift.append(chain.a[t] * shift[-1] + chain.b[t])
        var.append(chain.a[t] ** 2 * var[-1] + chain.s[t] ** 2)
    return torch.stack(gain), torch.stack(shift), torch.stack(var)


def _random_chain(num_latents=3, dims=2, seed=0, cls=LinearChain):
    g = torch.Generator().manual_seed(seed)

    def table(lo, hi):
        return lo + (hi - lo) * torch.rand(num_latents + 1, dims, generator=g, dtype=torch.float64)

    return cls(
        table(0.5, 1.2),
        table(-0.3, 0.3),
        table(0.4, 0.9),
        table(0.6, 1.3),
        table(-0.3, 0.3),
        table(0.3, 0.8),
    )


def _generative_marginals(chain):
    """p(z_t) = N(m_t, v_t) of the generative chain, t = 0..T (z_0 = x)."""
    num_latents = chain.num_latents
    m, v = [None] * (num_latents + 1), [None] * (num_latents + 1)
    m[num_latents], v[num_latents] = torch.zeros_like(chain.a[0]), torch.ones_like(chain.a[0])
    for t in range(num_latents, 0, -1):
        m[t - 1] = chain.c[t] * m[t] + chain.d[t]
        v[t - 1] = chain.c[t] ** 2 * v[t] + chain.r[t] ** 2
    return m, v


def _log_px(chain, x):
    m, v = _generative_marginals(chain)
    return (-0.5 * (LOG_2PI + v[0].log()) - (x - m[0]) ** 2 / (2 * v[0])).sum(-1)


def _exact_posterior_chain(generative, cls=LinearChain):
    """q(z_t | z_{t-1}) = p(z_t | z_{t-1}): by the Markov property the exact posterior."""
    m, v = _generative_marginals(generative)
    a, b, s = [torch.ones_like(v[0])], [torch.zeros_like(v[0])], [torch.ones_like(v[0])]
    for t in range(1, generative.num_latents + 1):
        gain = generative.c[t] * v[t] / v[t - 1]  # Cov(z_t, z_{t-1}) / Var(z_{t-1})
        a.append(gain)
        b.append(m[t] - gain * m[t - 1])
        s.append((v[t] - generative.c[t] ** 2 * v[t] ** 2 / v[t - 1]).sqrt())
    return cls(
        torch.stack(a), torch.stack(b), torch.stack(s), generative.c, generative.d, generative.r
    )


def _log_normal(value, mean, std):
    """Written out, not torch.distributions: sum_d log N(value_d; mean_d, std_d^2)."""
    return (-0.5 * ((value - mean) / std) ** 2 - std.log() - 0.5 * LOG_2PI).sum(-1)


def _expected_terms(chain, x):
    """Closed-form E_q of each term, for x: (B, D), from q's marginal means and variances."""
    gain, shift, var = _q_marginal_tables(chain)
    mu = [gain[t] * x + shift[t] for t in range(chain.num_latents + 1)]
    a, b, s, c, d, r = chain.a, chain.b, chain.s, chain.c, chain.d, chain.r
    recon = -0.5 * (LOG_2PI + 2 * r[1].log()) - (
        (x - c[1] * mu[1] - d[1]) ** 2 + c[1] ** 2 * var[1]
    ) / (2 * r[1] ** 2)
    levels = []
    for t in range(1, chain.num_latents):
        lean = 1 - c[t + 1] * a[t + 1]  # z_t - c z_{t+1} - d = lean z_t - c b - d - c s eps
        sq = (
            (lean * mu[t] - c[t + 1] * b[t + 1] - d[t + 1]) ** 2
            + lean**2 * var[t]
            + c[t + 1] ** 2 * s[t + 1] ** 2
        )
        log_p = -0.5 * (LOG_2PI + 2 * r[t + 1].log()) - sq / (2 * r[t + 1] ** 2)
        log_q = -0.5 * (LOG_2PI + 2 * s[t].log()) - 0.5
        levels.append((log_p - log_q).sum(-1))
    top = chain.num_latents
    prior = (
        -0.5 * LOG_2PI - (mu[top] ** 2 + var[top]) / 2 + 0.5 * (LOG_2PI + 2 * s[top].log()) + 0.5
    )
    return recon.sum(-1), prior.sum(-1), levels


def _x(n=4, dims=2, seed=1):
    return torch.randn(n, dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_terms_match_log_p_minus_log_q_from_the_same_noise():
    chain, x = _random_chain(), _x()
    for table in (chain.a, chain.s, chain.c):
        table.requires_grad_(True)
    torch.manual_seed(7)
    got = ConsistencyELBO()(chain, x)
    torch.manual_seed(7)  # rsample draws eps_1, eps_2, eps_3 in this order
    z = [x]
    for t in (1, 2, 3):
        z.append(chain.a[t] * z[-1] + chain.b[t] + chain.s[t] * torch.randn(x.shape, dtype=x.dtype))
    log_q = [None] + [
        _log_normal(z[t], chain.a[t] * z[t - 1] + chain.b[t], chain.s[t]) for t in (1, 2, 3)
    ]
    log_p_down = [None] + [
        _log_normal(z[t - 1], chain.c[t] * z[t] + chain.d[t], chain.r[t]) for t in (1, 2, 3)
    ]
    log_prior = _log_normal(z[3], torch.zeros(2), torch.ones(2))
    expect = {
        "reconstruction": log_p_down[1],
        "prior_matching": log_prior - log_q[3],
        "consistency/level_1": log_p_down[2] - log_q[1],
        "consistency/level_2": log_p_down[3] - log_q[2],
    }
    for name in ("reconstruction", "prior_matching"):
        torch.testing.assert_close(got.terms[name], expect[name])
    for name in ("consistency/level_1", "consistency/level_2"):
        torch.testing.assert_close(got.extras[name], expect[name])
    torch.testing.assert_close(
        got.terms["consistency"], expect["consistency/level_1"] + expect["consistency/level_2"]
    )
    log_joint = log_prior + sum(log_p_down[1:])
    torch.testing.assert_close(got.total, log_joint - sum(log_q[1:]))
    assert set(got.terms) == {"reconstruction", "prior_matching", "consistency"}
    got.total.sum().backward()  # reparameterised: gradients reach q's and p's parameters
    assert chain.a.grad.abs().sum() > 0 and chain.c.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [LinearChain, MarginalLinearChain])
def test_exact_posterior_gives_log_px_at_every_draw(cls):
    generative = _random_chain(num_latents=4, seed=3)
    chain, x = _exact_posterior_chain(generative, cls), _x(n=6)
    torch.manual_seed(0)
    got = ConsistencyELBO()(chain, x).total
    torch.testing.assert_close(got, _log_px(generative, x))


def test_closed_form_elbo_is_below_log_px_and_equal_for_the_exact_posterior():
    generative, x = _random_chain(num_latents=3, seed=5), _x(n=3)
    recon, prior, levels = _expected_terms(generative, x)
    assert (recon + prior + sum(levels) < _log_px(generative, x) - 1e-3).all()
    exact = _exact_posterior_chain(generative)
    recon, prior, levels = _expected_terms(exact, x)
    torch.testing.assert_close(recon + prior + sum(levels), _log_px(generative, x))


@pytest.mark.parametrize(
    ("cls", "estimator"),
    [
        (LinearChain, ConsistencyELBO()),
        (LinearChain, ConsistencyELBO(analytic_prior=True)),
        (MarginalLinearChain, ConsistencyELBO(levels=1)),
        (MarginalLinearChain, ConsistencyELBO(levels=3, analytic_prior=True)),
        (
            LinearChain,
            ConsistencyELBO(levels=2),
        ),  # no q_marginal: walk once, evaluate the drawn levels
        # importance-sampled levels, weighted by 1 / (k p(t)): unbiased with or without q_marginal
        (MarginalLinearChain, ConsistencyELBO(levels=2, proposal=[0.8, 0.2])),
        (LinearChain, ConsistencyELBO(levels=1, proposal=[1.0, 3.0])),
    ],
)
def test_monte_carlo_means_match_the_closed_form_expectations(cls, estimator):
    chain = _random_chain(num_latents=3, seed=11, cls=cls)
    x = _x(n=2).repeat(10000, 1)  # 10000 draws of each of two examples
    torch.manual_seed(1)
    got = estimator(chain, x)
    recon, prior, levels = _expected_terms(chain, x[:2])
    expected = {"reconstruction": recon, "prior_matching": prior, "consistency": sum(levels)}
    expected.update({f"consistency/level_{t + 1}": v for t, v in enumerate(levels)})
    values = {**got.terms, **got.extras}
    assert set(values) == set(expected)
    for name, want in expected.items():
        draws = values[name].view(10000, 2)
        se = draws.std(0) / math.sqrt(10000)
        assert ((draws.mean(0) - want).abs() <= 5 * se + 1e-9).all(), (
            name,
            draws.mean(0),
            want,
            se,
        )


def test_sampled_levels_extras_sum_to_the_consistency_term():
    chain, x = _random_chain(num_latents=5, cls=MarginalLinearChain), _x(n=8)
    got = ConsistencyELBO(levels=2)(chain, x)
    per_level = torch.stack([got.extras[f"consistency/level_{t}"] for t in range(1, 5)])
    torch.testing.assert_close(per_level.sum(0), got.terms["consistency"])
    assert ((per_level != 0).sum(0) <= 2).all()  # at most k = 2 levels drawn per example


def test_a_proposal_puts_the_draws_where_it_says_and_is_validated():
    chain, x = _random_chain(num_latents=5, cls=MarginalLinearChain), _x(n=4000)
    torch.manual_seed(3)
    got = ConsistencyELBO(levels=1, proposal=[1.0, 0.0001, 0.0001, 3.0])(chain, x)
    hit = torch.stack([got.extras[f"consistency/level_{t}"] != 0 for t in range(1, 5)])
    share = hit.double().mean(1)  # how often each level was drawn
    assert abs(share[0] - 0.25) < 0.03 and abs(share[3] - 0.75) < 0.03 and share[1:3].sum() < 0.01
    with pytest.raises(InvalidParameterError, match=r"one per level 1\.\.T-1, T - 1 = 4"):
        ConsistencyELBO(levels=1, proposal=[1.0, 1.0])(chain, x)
    with pytest.raises(InvalidParameterError, match="positive numbers"):
        ConsistencyELBO(levels=1, proposal=[1.0, -1.0])
    with pytest.raises(InvalidParameterError, match="needs sampled levels"):
        ConsistencyELBO(proposal=[1.0, 1.0])


def test_a_single_latent_has_no_consistency_and_a_monte_carlo_prior_matching():
    chain, x = _random_chain(num_latents=1), _x()
    torch.manual_seed(2)
    got = ConsistencyELBO(levels=3)(chain, x)  # levels is moot with T = 1
    torch.manual_seed(2)
    z1 = chain.a[1] * x + chain.b[1] + chain.s[1] * torch.randn(x.shape, dtype=x.dtype)
    prior = _log_normal(z1, torch.zeros(2), torch.ones(2)) - _log_normal(
        z1, chain.a[1] * x + chain.b[1], chain.s[1]
    )
    torch.testing.assert_close(got.terms["prior_matching"], prior)
    torch.testing.assert_close(
        got.terms["reconstruction"], _log_normal(x, chain.c[1] * z1 + chain.d[1], chain.r[1])
    )
    assert torch.equal(got.terms["consistency"], torch.zeros(4, dtype=x.dtype)) and not got.extras


def test_a_long_chain_with_q_marginal_needs_a_constant_number_of_calls():
    chain, x = _random_chain(num_latents=1000, dims=3, cls=MarginalLinearChain), _x(n=5, dims=3)
    got = ConsistencyELBO(levels=4)(chain, x)
    assert chain.calls == {"q_transition": 4, "p_transition": 2, "q_marginal": 2}
    assert torch.isfinite(got.total).all() and got.total.shape == (5,)
    assert not got.extras  # 999 levels: no per-level extras unless asked for
    many = ConsistencyELBO(levels=4, per_level=True)(chain, x)
    assert len(many.extras) == 999 and "consistency/level_999" in many.extras


class _Model:
    num_dims = 2

    def __init__(self, chain):
        self.chain = chain


def test_finds_model_chain_is_registered_and_rejects_non_chains():
    chain = _random_chain()
    assert isinstance(chain, MarkovChain) and find_chain(_Model(chain)) is chain
    estimator = create_estimator("consistency", levels=2)
    assert isinstance(estimator, ConsistencyELBO) and estimator.levels == 2
    assert estimator(_Model(chain), _x()).num_dims == 2
    with pytest.raises(IncompatibleEstimatorError, match="needs a Markov chain"):
        ConsistencyELBO()(object(), _x())
    with pytest.raises(InvalidParameterError, match="levels must be"):
        ConsistencyELBO(levels=0)


class _BernoulliChain(MarginalLinearChain):
    """q(z_1|x) cannot be reparameterised: a Bernoulli."""

    def q_transition(self, z_prev, t):
        if int(t[0]) == 1:
            return Independent(torch.distributions.Bernoulli(logits=z_prev), 1)
        return super().q_transition(z_prev, t)


@pytest.mark.parametrize("estimator", [ConsistencyELBO(), ConsistencyELBO(levels=2)])
def test_a_transition_without_rsample_is_one_clear_error(estimator):
    chain = _random_chain(num_latents=3, cls=_BernoulliChain)
    with pytest.raises(
        IncompatibleEstimatorError,
        match=r"needs reparameterised .*t=1\) returned Independent, which has no rsample",
    ):
        estimator(chain, _x())
