"""The VDM's fixed encoder: the forward (noising) process of the lecture, restriction 2.

With ``alpha_t = 1 - beta_t`` and ``alpha_bar_t = prod_{s=1}^t alpha_s`` (``alpha_bar_0 = 1``)::

    q(x_t | x_{t-1})     = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I)               q_step
    q(x_t | x_0)         = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)           q_marginal
    q(x_{t-1} | x_t, x_0) = N(mu_q, sigma_q^2 I)                                    q_posterior
        mu_q      = (sqrt(alpha_bar_{t-1}) beta_t x_0 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) x_t)
                    / (1 - alpha_bar_t)
        sigma_q^2 = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)                (beta-tilde)

:class:`ContinuousForwardProcess` is the same encoder in continuous time (T -> infinity),
on a log-SNR schedule ``lambda(t)``, ``t in [0, 1]`` (:mod:`genkit_vdm.logsnr`).

The discrete encoder holds buffers only (the schedule's tables, float64, not saved in checkpoints since the
config rebuilds them) and no learned parameter. Every distribution it returns is an
``Independent(Normal)`` over the data dimensions: batch shape ``(B,)``, ``log_prob`` ``(B,)``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torch.distributions import Distribution

from genkit.distributions import diagonal_normal
from genkit.errors import InvalidParameterError
from genkit.model import Encoder
from genkit_vdm.logsnr import LogSNR, LogSNRSchedule, check_times
from genkit_vdm.schedules import DiscreteSchedule


def expand_like(c: Tensor, x: Tensor) -> Tensor:
    """A per-example coefficient ``c: (B,)`` shaped ``(B, 1, ..., 1)`` to broadcast over ``x``."""
    pattern = "b -> b" + " 1" * (x.dim() - 1)
    return rearrange(c.to(x.dtype), pattern)


class DiscreteForwardProcess(Encoder):
    """The fixed Gaussian encoder of a discrete-time VDM with ``T = schedule.timesteps`` steps.

    Tables are stored with index ``t`` for step ``t`` (index 0 is ``t = 0``: ``alpha_bar_0 = 1``).
    Steps ``t`` are a ``(B,)`` LongTensor or an int (broadcast over the batch).
    """

    def __init__(self, schedule: DiscreteSchedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.timesteps = schedule.timesteps
        one = torch.ones(1, dtype=torch.float64)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), schedule.betas])  # (T+1,)
        alpha_bars = torch.cat([one, schedule.alpha_bars])  # (T+1,)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas", 1.0 - betas, persistent=False)
        self.register_buffer("alpha_bars", alpha_bars, persistent=False)

    # -- steps -----------------------------------------------------------------------------
    def steps(self, t: Tensor | int, batch: int | None = None, *, low: int = 1) -> Tensor:
        """``t`` as a LongTensor ``(B,)`` on the tables' device, checked to lie in ``low..T``."""
        device = self.betas.device
        if isinstance(t, int):
            t = torch.full((batch or 1,), t, dtype=torch.long, device=device)
        else:
            t = torch.as_tensor(t, device=device)
            if t.is_floating_point():
                raise InvalidParameterError(
                    f"a discrete-time VDM takes integer steps t in {low}..{self.timesteps}, got a float tensor"
                )
            t = t.long().reshape(-1)
            if batch is not None and t.numel() == 1 and batch != 1:
                t = t.expand(batch)
            elif batch is not None and t.numel() != batch:
                raise InvalidParameterError(
                    f"got {t.numel()} steps t for a batch of {batch}; give one step per example "
                    "or a single step for all"
                )
        if t.numel() and (int(t.min()) < low or int(t.max()) > self.timesteps):
            raise InvalidParameterError(
                f"step t must lie in {low}..{self.timesteps}; got values from {int(t.min())} to {int(t.max())}"
            )
        return t

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """``alpha_bar_t = prod_{s=1}^t (1 - beta_s)`` for ``t`` in ``0..T`` (float64, ``(B,)``)."""
        return self.alpha_bars[self.steps(t, low=0)]

    def log_snr(self, t: Tensor | int) -> Tensor:
        """``log SNR(t) = log(alpha_bar_t / (1 - alpha_bar_t))`` for ``t`` in ``1..T``
        (VDM's ``gamma(t)`` is its negative), float64 ``(B,)``."""
        ab = self.alpha_bars[self.steps(t)]
        return torch.log(ab) - torch.log1p(-ab)

    def signal_noise(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))`` for steps ``t: (B,)`` in ``0..T``, the
        scales of ``x_0`` and ``eps`` in ``x_t`` (float64, each ``(B,)``)."""
        ab = self.alpha_bars[t]
        return ab.sqrt(), (1.0 - ab).sqrt()

    # -- the distributions -----------------------------------------------------------------
    def q_step(self, x_prev: Tensor, t: Tensor | int) -> Distribution:
        """``q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I)``, ``x_prev: (B, ...)``."""
        t = self.steps(t, x_prev.shape[0])
        # sqrt(alpha_t) and sqrt(1 - alpha_t) from the float64 tables, then cast to x's dtype
        gain = expand_like(self.alphas[t].sqrt(), x_prev)
        std = expand_like(self.betas[t].sqrt(), x_prev)
        return diagonal_normal(gain * x_prev, std.expand_as(x_prev), x_prev.dim() - 1)

    def q_marginal(self, x0: Tensor, t: Tensor | int) -> Distribution:
        """``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)``, ``x0: (B, ...)``."""
        t = self.steps(t, x0.shape[0])
        ab = self.alpha_bars[t]  # float64: 1 - alpha_bar keeps its digits at small t
        gain, std = expand_like(ab.sqrt(), x0), expand_like((1.0 - ab).sqrt(), x0)
        return diagonal_normal(gain * x0, std.expand_as(x0), x0.dim() - 1)

    def posterior_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For steps ``t: (B,)`` in ``1..T``: the coefficients of ``x_0`` and ``x_t`` in
        ``mu_q`` and the variance ``sigma_q^2 = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``
        (float64, each ``(B,)``; the variance is 0 at ``t = 1``)."""
        beta, alpha = self.betas[t], self.alphas[t]
        ab, ab_prev = self.alpha_bars[t], self.alpha_bars[t - 1]
        c0 = ab_prev.sqrt() * beta / (1.0 - ab)
        ct = alpha.sqrt() * (1.0 - ab_prev) / (1.0 - ab)
        var = beta * (1.0 - ab_prev) / (1.0 - ab)
        return c0, ct, var

    def posterior_mean(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """``mu_q(x_t, x_0) = (sqrt(alpha_bar_{t-1}) beta_t x_0 + sqrt(alpha_t)
        (1 - alpha_bar_{t-1}) x_t) / (1 - alpha_bar_t)``, shaped like ``x_t``."""
        c0, ct, _ = self.posterior_coefficients(t)
        return expand_like(c0, x_t) * x0 + expand_like(ct, x_t) * x_t

    def posterior_std(self, t: Tensor, like: Tensor) -> Tensor:
        """``sigma_q`` of step ``t``, ``(B, 1, ..., 1)`` in ``like``'s dtype."""
        return expand_like(self.posterior_coefficients(t)[2].sqrt(), like)

    def q_posterior(self, x_t: Tensor, x0: Tensor, t: Tensor | int) -> Distribution:
        """``q(x_{t-1} | x_t, x_0) = N(mu_q, sigma_q^2 I)`` for ``t`` in ``2..T`` (at ``t = 1`` it
        is a point mass at ``x_0`` and has no density)."""
        t = self.steps(t, x_t.shape[0], low=2)
        mean = self.posterior_mean(x_t, x0, t)
        return diagonal_normal(mean, self.posterior_std(t, x_t).expand_as(x_t), x_t.dim() - 1)

    def forward(self, x: Tensor, t: Tensor | int = 1) -> Distribution:
        """``encoder(x0, t) = q(x_t | x_0)``; by default the first latent's ``q(x_1 | x_0)``, as
        an MHVAE's encoder gives ``q(z_1 | x)``."""
        return self.q_marginal(x, t)


class ContinuousForwardProcess(Encoder):
    """The fixed Gaussian encoder of a continuous-time VDM (Kingma et al. 2021, sec. 3.1)::

        q(z_t | x)      = N(alpha_t x, sigma_t^2 I),  alpha_t^2 = sigmoid(lambda(t)),
                                                      sigma_t^2 = sigmoid(-lambda(t))
        q(z_s | z_t, x) = N(mu_Q, sigma_Q^2 I)   for s < t, with r = SNR(t) / SNR(s) < 1:
            mu_Q      = r (alpha_s / alpha_t) z_t + alpha_s (1 - r) x
            sigma_Q^2 = sigma_s^2 (1 - r),   1 - r = -expm1(lambda(t) - lambda(s))

    the limit of :class:`DiscreteForwardProcess` as the steps shrink (``alpha_bar = alpha_t^2``).
    Times ``t`` are float tensors ``(B,)`` in [0, 1] or a float (broadcast over the batch). The
    schedule is a module (a ``learned`` one has parameters); every coefficient is float32.
    """

    timesteps = 0

    def __init__(self, schedule: LogSNRSchedule) -> None:
        super().__init__()
        self.schedule = schedule

    def times(self, t: Tensor | float, batch: int | None = None) -> Tensor:
        """``t`` as a float32 ``(B,)`` tensor on the schedule's device, checked to lie in [0, 1]."""
        if isinstance(t, int | float):
            t = torch.full((batch or 1,), float(t))
        t = check_times(t).to(self.schedule._device())
        if batch is not None and t.numel() == 1 and batch != 1:
            t = t.expand(batch)
        elif batch is not None and t.numel() != batch:
            raise InvalidParameterError(
                f"got {t.numel()} times t for a batch of {batch}; give one time per example "
                "or a single time for all"
            )
        return t

    def log_snr(self, t: Tensor | float) -> Tensor:
        """``lambda(t) = log(alpha_t^2 / sigma_t^2)`` (VDM's ``gamma(t)`` is its negative), ``(B,)``."""
        return self.schedule(self.times(t)).value

    def log_snr_and_slope(self, t: Tensor) -> LogSNR:
        """``lambda(t)`` and ``dlambda/dt`` (:class:`~genkit_vdm.logsnr.LogSNR`) at ``t: (B,)``."""
        return self.schedule(self.times(t))

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """``alpha_t^2 = sigmoid(lambda(t))`` (the lecture's alpha-bar), ``(B,)``."""
        return torch.sigmoid(self.log_snr(t))

    @staticmethod
    def coefficients(log_snr: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma) = (sqrt(sigmoid(lambda)), sqrt(sigmoid(-lambda)))`` for ``lambda``."""
        return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()

    def signal_noise(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)``, the scales of ``x`` and ``eps`` in ``z_t``, each ``(B,)``."""
        return self.coefficients(self.log_snr(t))

    def q_marginal(self, x0: Tensor, t: Tensor | float) -> Distribution:
        """``q(z_t | x) = N(alpha_t x, sigma_t^2 I)``, ``x0: (B, ...)``."""
        alpha, sigma = self.signal_noise(self.times(t, x0.shape[0]))
        gain, std = expand_like(alpha, x0), expand_like(sigma, x0)
        return diagonal_normal(gain * x0, std.expand_as(x0), x0.dim() - 1)

    def posterior_coefficients(
        self, log_snr_t: Tensor, log_snr_s: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """For ``lambda(t) < lambda(s)`` (``s < t``): the coefficients of ``z_t`` and ``x`` in
        ``mu_Q`` and the variance ``sigma_Q^2``, each ``(B,)``."""
        one_minus_r = -torch.expm1(log_snr_t - log_snr_s)
        alpha_t, _ = self.coefficients(log_snr_t)
        alpha_s, sigma_s = self.coefficients(log_snr_s)
        c_t = (1.0 - one_minus_r) * alpha_s / alpha_t
        c_0 = alpha_s * one_minus_r
        return c_t, c_0, sigma_s.square() * one_minus_r

    def q_posterior(
        self, x_t: Tensor, x0: Tensor, t: Tensor | float, s: Tensor | float
    ) -> Distribution:
        """``q(z_s | z_t, x) = N(mu_Q, sigma_Q^2 I)`` for ``0 <= s < t <= 1``."""
        t, s = self.times(t, x_t.shape[0]), self.times(s, x_t.shape[0])
        if not bool((s < t).all()):
            raise InvalidParameterError("q_posterior(x_t, x0, t, s) needs s < t for every example")
        c_t, c_0, var = self.posterior_coefficients(self.log_snr(t), self.log_snr(s))
        mean = expand_like(c_t, x_t) * x_t + expand_like(c_0, x_t) * x0
        return diagonal_normal(mean, expand_like(var.sqrt(), x_t).expand_as(x_t), x_t.dim() - 1)

    def forward(self, x: Tensor, t: Tensor | float = 0.0) -> Distribution:
        """``encoder(x, t) = q(z_t | x)``; by default the first latent's ``q(z_0 | x)``."""
        return self.q_marginal(x, t)
