"""Drawing from a discrete-time VDM: ancestral (DDPM) sampling and DDIM.

Ancestral (Ho et al. 2020): ``x_T ~ N(0, I)``, then ``x_{t-1} ~ p(x_{t-1}|x_t) =
N(mu_q(x_t, x0_hat), beta-tilde_t I)`` for ``t = T..2``.

DDIM (Song et al. 2021) with ``S`` network calls on the steps ``tau_1 = 1 < ... < tau_S = T``
(``tau_i = floor(linspace(1, T, S)_i + 1/2)``; ``S = 1``: ``tau_1 = T``), from ``t = tau_i`` to
``s = tau_{i-1}``::

    x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)

With ``S = T`` and ``eta = 1``, ``sigma^2 = beta-tilde_t`` and the mean is ``mu_q(x_t, x0_hat)``
(substitute ``x_t = sqrt(ab_t) x0_hat + sqrt(1 - ab_t) eps_hat``), so DDIM is then the
ancestral sampler, draw for draw with the same generator. ``eta = 0`` is deterministic.

Both end at ``t = 1`` with the decoder ``p(x_0|x_1)``: ``final="mode"`` (default) returns its
mode, the quantized ``x0_hat(x_1, 1)`` for images (its mean for vectors), as DDPM shows the
mean at the last step; ``final="sample"`` draws from it. DDIM's last step is in general from
``x_{tau_1}`` to ``x_0`` with mean ``x0_hat(x_{tau_1}, tau_1)`` (Song et al.'s
``p(x_0|x_{tau_1})``), the decoder itself when ``tau_1 = 1``; so with ``S = 1`` it is one jump
from ``x_T``, the decoder's scale ``sqrt(beta_1)`` around ``x0_hat(x_T, T)``.

A continuous-time VDM (:func:`continuous`) samples on ``S`` equal steps of ``t`` from 1 to 0
with the same DDIM update (``alpha_bar = sigmoid(lambda(t))``): ``eta = 1`` is the ancestral
``p(z_s|z_t)``, ``eta = 0`` the deterministic sampler; it ends with the decoder ``p(x|z_0)``.

With ``clip`` (default for images) ``x0_hat`` is clipped to [-1, 1] at every step and
``eps_hat`` re-derived from it; the ELBO never clips.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genkit.distributions import sample as draw
from genkit.errors import InvalidParameterError
from genkit_vdm.base import VDMBase

FINALS = ("mode", "sample")


def _dtype(model: VDMBase) -> torch.dtype:
    """The model's floating-point precision (float64 for a model made ``.double()``)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _noise(model: VDMBase, n: int, generator: torch.Generator | None) -> Tensor:
    shape = (n, *model.data_shape)
    return torch.randn(shape, generator=generator, device=model.device, dtype=_dtype(model))


def _steps(model: VDMBase, n: int, t: int) -> Tensor:
    return torch.full((n,), t, dtype=torch.long, device=model.device)


def _last_step(
    model: VDMBase,
    x_t: Tensor,
    generator: torch.Generator | None,
    clip: bool,
    final: str,
    t: int = 1,
) -> Tensor:
    """``x_0`` from ``x_t`` (``t = 1``: the decoder ``p(x_0|x_1)``): the mode of, or a draw from,
    the decoder's distribution with mean ``x0_hat(x_t, t)``."""
    pred = model.decoder.predict(x_t, _steps(model, x_t.shape[0], t), clip=clip)
    dist = model.decoder.decoder_from(pred)
    if final == "sample":
        return draw(dist, (), generator)
    return dist.base_dist.mode


def _check_final(final: str) -> None:
    if final not in FINALS:
        raise InvalidParameterError(
            f"unknown final step '{final}'; choose from {', '.join(FINALS)}"
        )


@torch.no_grad()
def ancestral(
    model: VDMBase,
    n: int,
    generator: torch.Generator | None = None,
    clip: bool = False,
    final: str = "mode",
) -> Tensor:
    """DDPM's sampler over all ``T`` steps: ``(n, *data_shape)``."""
    _check_final(final)
    x = _noise(model, n, generator)  # x_T
    for t in range(model.encoder.timesteps, 1, -1):
        tt = _steps(model, n, t)
        pred = model.decoder.predict(x, tt, clip=clip)
        step = model.decoder.step_from(x, tt, pred)  # N(mu_q(x_t, x0_hat), sigma_t^2 I)
        x = step.mean + step.stddev * _noise(model, n, generator)
    return _last_step(model, x, generator, clip, final)


def ddim_steps(timesteps: int, steps: int) -> list[int]:
    """``tau_1 = 1 < ... < tau_S = T``: ``floor(linspace(1, T, S) + 1/2)``, distinct for
    ``S <= T``; ``[T]`` for ``S = 1``."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= timesteps:
        raise InvalidParameterError(
            f"DDIM steps must be an integer in 1..T = {timesteps}, got {steps!r}"
        )
    if steps == 1:
        return [timesteps]
    grid = torch.linspace(1, timesteps, steps, dtype=torch.float64)
    return torch.floor(grid + 0.5).long().tolist()


def _check_eta(eta: float) -> float:
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not eta >= 0:
        raise InvalidParameterError(f"eta must be a number >= 0, got {eta!r}")
    return float(eta)


def _ddim_step(
    model: VDMBase,
    x: Tensor,
    pred,
    ab_t: Tensor,
    ab_s: Tensor,
    eta: float,
    generator: torch.Generator | None,
) -> Tensor:
    """From ``x_t`` to ``x_s`` (``s < t``) given the prediction at ``x_t`` and the float64 0-d
    ``alpha_bar`` at both times: ``sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat +
    sigma z`` with ``sigma^2 = eta^2 (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s)``."""
    var = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    direction = (1 - ab_s - var).clamp(min=0.0).sqrt()
    coef = torch.stack([ab_s.sqrt(), direction, var.sqrt()]).to(x.dtype)
    x = coef[0] * pred.x0 + coef[1] * pred.eps
    if eta > 0:
        x = x + coef[2] * _noise(model, x.shape[0], generator)
    return x


@torch.no_grad()
def ddim(
    model: VDMBase,
    n: int,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: bool = False,
    final: str = "mode",
) -> Tensor:
    """DDIM with ``steps`` network calls and noise level ``eta`` (0: deterministic):
    ``(n, *data_shape)``."""
    _check_final(final)
    eta = _check_eta(eta)
    enc = model.encoder
    taus = ddim_steps(enc.timesteps, steps)
    x = _noise(model, n, generator)  # x_T
    for t, s in zip(reversed(taus[1:]), reversed(taus[:-1]), strict=True):
        pred = model.decoder.predict(x, _steps(model, n, t), clip=clip)
        x = _ddim_step(model, x, pred, enc.alpha_bars[t], enc.alpha_bars[s], eta, generator)
    return _last_step(model, x, generator, clip, final, t=taus[0])


@torch.no_grad()
def continuous(
    model: VDMBase,
    n: int,
    steps: int,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    clip: bool = False,
    final: str = "mode",
) -> Tensor:
    """A continuous-time VDM on the grid ``t_i = i / S``, ``i = S..0``: ``z_1 ~ N(0, I)``, then
    ``z_{t_{i-1}}`` from ``z_{t_i}`` by the DDIM update with noise ``eta`` (``eta = 1``: the
    ancestral step ``p(z_s|z_t) = q(z_s|z_t, x = x0_hat(z_t, t))``; ``eta = 0``: deterministic),
    and ``x`` from the decoder ``p(x|z_0)`` (its mode, or a draw with ``final="sample"``).
    ``S`` network calls; ``(n, *data_shape)``."""
    _check_final(final)
    eta = _check_eta(eta)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InvalidParameterError(f"steps must be an integer >= 1, got {steps!r}")
    enc = model.encoder
    grid = torch.linspace(0.0, 1.0, steps + 1, device=model.device, dtype=_dtype(model))
    ab = torch.sigmoid(enc.log_snr(grid).double())  # alpha_t^2 on the grid
    z = _noise(model, n, generator)  # z_1
    for i in range(steps, 0, -1):
        t = grid[i].expand(n)
        pred = model.decoder.predict(z, t, clip=clip)
        z = _ddim_step(model, z, pred, ab[i], ab[i - 1], eta, generator)
    dist = model.decoder(z)  # p(x | z_0)
    if final == "sample":
        return draw(dist, (), generator)
    return dist.base_dist.mode


__all__ = ["ancestral", "continuous", "ddim", "ddim_steps"]
