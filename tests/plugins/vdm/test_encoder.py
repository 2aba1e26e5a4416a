"""The fixed forward process: q_step, q_marginal and q_posterior against independent maths."""

import math

import pytest
import torch

import genkit
from genkit.errors import InvalidParameterError


def _model(timesteps=20, schedule="linear", shape=(3,)):
    return genkit.create_model(
        "vdm", shape, timesteps=timesteps, schedule=schedule, hidden=8, depth=1
    )


def test_encoder_holds_no_parameters_and_is_not_saved():
    m = _model()
    assert list(m.encoder.parameters()) == []
    assert not any(k.startswith("encoder.") for k in m.state_dict())
    assert {n for n, _ in m.encoder.named_buffers()} == {"betas", "alphas", "alpha_bars"}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_marginal_is_q_step_composed_t_times_analytically(schedule):
    m = _model(timesteps=30, schedule=schedule)
    x0 = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    mean_coef, var = 1.0, 0.0  # x_t = mean_coef * x0 + noise of variance var
    for t in range(1, 31):
        alpha = 1.0 - m.encoder.betas[t].item()
        mean_coef, var = math.sqrt(alpha) * mean_coef, alpha * var + (1.0 - alpha)
        q = m.encoder.q_marginal(x0, t)
        torch.testing.assert_close(q.mean, mean_coef * x0)
        torch.testing.assert_close(q.variance, torch.full_like(x0, var))


def test_q_marginal_matches_a_monte_carlo_walk_of_q_step():
    m, t_end, n = _model(timesteps=12), 12, 200_000
    torch.manual_seed(0)
    x0 = torch.tensor([0.7, -0.3, 0.0]).expand(n, 3)
    x = x0
    for t in range(1, t_end + 1):
        x = m.encoder.q_step(x, torch.full((n,), t)).rsample()
    q = m.encoder.q_marginal(x0[:1], t_end)
    se_mean = q.stddev[0] / math.sqrt(n)
    assert ((x.mean(0) - q.mean[0]).abs() < 5 * se_mean).all()
    assert torch.allclose(x.var(0), q.variance[0], rtol=0.02)


@pytest.mark.parametrize("t", [2, 7, 20])
def test_q_posterior_is_bayes_rule_on_a_grid(t):
    """q(x_{t-1}|x_t, x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0), normalised numerically on a 1-D grid."""
    m = _model(timesteps=20, shape=(1,))
    x0, x_t = torch.tensor([[0.4]]), torch.tensor([[0.1]])
    grid = torch.linspace(-3, 3, 200_001, dtype=torch.float64)
    step = m.encoder.q_step(grid[:, None], t)  # a distribution per grid point of x_{t-1}
    prev = m.encoder.q_marginal(x0.double(), t - 1)
    log_joint = step.log_prob(x_t.double().expand(len(grid), 1)) + prev.log_prob(grid[:, None])
    w = torch.softmax(log_joint, 0)
    mean = (w * grid).sum()
    var = (w * (grid - mean) ** 2).sum()
    post = m.encoder.q_posterior(x_t, x0, t)
    assert post.mean.item() == pytest.approx(mean.item(), abs=1e-6)
    assert post.variance.item() == pytest.approx(var.item(), rel=1e-4)
    # the densities agree too, not only the moments
    dx = (grid[1] - grid[0]).item()
    density = log_joint - torch.logsumexp(log_joint, 0) - math.log(dx)
    probe = [int(i) for i in torch.topk(w, 1).indices] + [len(grid) // 2]
    for i in probe:
        got = post.log_prob(grid[i : i + 1, None].float()).item()
        assert got == pytest.approx(density[i].item(), abs=1e-3)


def test_distributions_have_batch_shape_b_and_sum_over_data_dims():
    m = _model(timesteps=5, shape=(1, 4, 4))
    x = torch.zeros(3, 1, 4, 4)
    for dist in (
        m.encoder.q_step(x, 2),
        m.encoder.q_marginal(x, 2),
        m.encoder.q_posterior(x, x, 2),
    ):
        assert dist.batch_shape == (3,) and dist.event_shape == (1, 4, 4)
        assert dist.log_prob(x).shape == (3,)


def test_steps_out_of_range_and_float_steps_are_errors():
    m = _model(timesteps=5)
    x = torch.zeros(2, 3)
    with pytest.raises(InvalidParameterError, match=r"1\.\.5"):
        m.encoder.q_marginal(x, 6)
    with pytest.raises(InvalidParameterError, match=r"2\.\.5"):
        m.encoder.q_posterior(x, x, 1)  # a point mass at x0: no density
    with pytest.raises(InvalidParameterError, match="integer"):
        m.encoder.q_step(x, torch.tensor([0.5, 0.5]))
    with pytest.raises(InvalidParameterError, match="3 steps t for a batch of 2"):
        m.encoder.q_posterior(x, x, torch.tensor([2, 3, 4]))
    per_example = m.encoder.q_marginal(x, torch.tensor([1, 5]))
    torch.testing.assert_close(
        per_example.variance[:, 0], 1 - m.encoder.alpha_bar(torch.tensor([1, 5])).float()
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_float32_variances_keep_their_digits_at_small_t(schedule):
    # 1 - alpha_t formed in float32 loses ~1e-3 of a variance of 1e-4; from the float64 tables
    # the float32 result is right to float32 rounding
    m = _model(timesteps=1000, schedule=schedule)
    x = torch.zeros(1, 3)
    for t in (1, 2, 10):
        beta = m.encoder.betas[t].item()
        alpha_bar = m.encoder.alpha_bars[t].item()
        torch.testing.assert_close(
            m.encoder.q_step(x, t).variance, torch.full_like(x, beta), rtol=2e-7, atol=0
        )
        torch.testing.assert_close(
            m.encoder.q_marginal(x, t).variance,
            torch.full_like(x, 1.0 - alpha_bar),
            rtol=2e-7,
            atol=0,
        )


@pytest.mark.parametrize("schedule", ["fixed_linear", "learned"])
def test_continuous_schedules_say_they_are_not_available_yet(schedule):
    with pytest.raises(InvalidParameterError, match=f"'{schedule}' is a continuous-time"):
        _model(schedule=schedule)
