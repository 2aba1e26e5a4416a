"""Noise schedules of the discrete-time VDM: the table ``beta_1..beta_T`` of the lecture's
``q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I)`` with ``alpha_t = 1 - beta_t``.

A schedule is a plain object holding no network (diffusers keeps its schedulers apart from the
denoiser): :class:`DiscreteSchedule` with ``betas: (T,)`` float64. The built-ins are registered
through the ``register_schedules`` hook by this plugin, and the model looks every schedule up
through the catalogue, so a third party's schedule is used exactly like these.

The tables are those of diffusers' ``DDPMScheduler`` (computed here in float64, diffusers
uses float32; they agree to float32 precision):

- ``linear`` (Ho et al. 2020): ``beta = linspace(beta_start=1e-4, beta_end=0.02, T)``. As in
  diffusers, the end points do not depend on ``T``: for ``T != 1000`` the betas are still
  ``linspace(1e-4, 0.02, T)`` (no rescaling by ``1000 / T`` as in improved-diffusion), so a
  small ``T`` leaves ``q(x_T | x_0)`` far from ``N(0, I)`` and the prior-matching term large.
- ``cosine`` (Nichol & Dhariwal 2021, diffusers' ``squaredcos_cap_v2``): with
  ``f(u) = cos((u + s) / (1 + s) * pi / 2)^2`` and ``s = 0.008``,
  ``beta_t = min(1 - f(t / T) / f((t - 1) / T), max_beta = 0.999)``.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor

from genkit.errors import InvalidParameterError


def _check_betas(betas: Tensor) -> Tensor:
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.dim() != 1 or betas.numel() < 1:
        raise InvalidParameterError(
            f"a schedule needs a 1-D table of betas, got shape {tuple(betas.shape)}"
        )
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise InvalidParameterError(
            f"every beta must lie in (0, 1); got min {betas.min().item():.3g}, max {betas.max().item():.3g}"
        )
    return betas


@attrs.frozen
class DiscreteSchedule:
    """``beta_1..beta_T`` as a ``(T,)`` float64 tensor (index ``t - 1`` holds ``beta_t``).

    ``alpha_t = 1 - beta_t`` and ``alpha_bar_t = prod_{s <= t} alpha_s`` (the lecture's
    alpha-bar, ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)``).
    """

    betas: Tensor = attrs.field(converter=_check_betas)
    name: str = "custom"

    @property
    def timesteps(self) -> int:
        """``T``, the number of noising steps."""
        return self.betas.numel()

    @property
    def alphas(self) -> Tensor:
        """``alpha_t = 1 - beta_t``, ``(T,)``."""
        return 1.0 - self.betas

    @property
    def alpha_bars(self) -> Tensor:
        """``alpha_bar_t = prod_{s=1}^t alpha_s``, ``(T,)``."""
        return torch.cumprod(self.alphas, dim=0)


def _check_timesteps(timesteps: int, name: str) -> int:
    if timesteps == 0:
        raise InvalidParameterError(
            f"schedule '{name}' is a discrete-time schedule; timesteps=0 (continuous time) needs "
            "a log-SNR schedule: 'fixed_linear' or 'learned'"
        )
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 1:
        raise InvalidParameterError(f"timesteps must be an integer >= 1, got {timesteps!r}")
    return timesteps


def linear(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteSchedule:
    """Ho et al. (2020): ``beta_t = linspace(beta_start, beta_end, T)[t - 1]``."""
    timesteps = _check_timesteps(timesteps, "linear")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise InvalidParameterError(
            f"linear schedule needs 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
        )
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return DiscreteSchedule(betas, name="linear")


def cosine(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> DiscreteSchedule:
    """Nichol & Dhariwal (2021): ``beta_t = min(1 - f(t/T) / f((t-1)/T), max_beta)`` with
    ``f(u) = cos((u + s) / (1 + s) * pi / 2)^2``."""
    timesteps = _check_timesteps(timesteps, "cosine")
    if s < 0 or not 0.0 < max_beta < 1.0:
        raise InvalidParameterError(
            f"cosine schedule needs s >= 0 and 0 < max_beta < 1, got {s}, {max_beta}"
        )
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return DiscreteSchedule(betas, name="cosine")


#: diffusers' ``beta_schedule`` names that :func:`diffusers_betas` computes.
DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def diffusers_betas(
    timesteps: int,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    trained_betas: list[float] | None = None,
) -> DiscreteSchedule:
    """The betas of a diffusers ``DDPMScheduler`` / ``DDIMScheduler`` config, in float64:
    ``linear``: ``linspace(beta_start, beta_end, T)``; ``scaled_linear``:
    ``linspace(sqrt(beta_start), sqrt(beta_end), T)^2``; ``squaredcos_cap_v2``: :func:`cosine`
    (s = 0.008, max_beta = 0.999); or ``trained_betas`` as given (``T`` of them)."""
    timesteps = _check_timesteps(timesteps, "diffusers")
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64).reshape(-1)
        if betas.numel() != timesteps:
            raise InvalidParameterError(
                f"trained_betas has {betas.numel()} values for num_train_timesteps={timesteps}"
            )
        return DiscreteSchedule(betas, name="diffusers")
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = cosine(timesteps).betas
    else:
        raise InvalidParameterError(
            f"unknown diffusers beta_schedule '{beta_schedule}'; genkit reads "
            f"{', '.join(DIFFUSERS_BETA_SCHEDULES)} or explicit trained_betas"
        )
    return DiscreteSchedule(betas, name="diffusers")


#: The schedules this plugin registers: name -> (factory, description).
BUILTIN_SCHEDULES = {
    "linear": (linear, "Ho et al. 2020: beta linear from 1e-4 to 0.02 (diffusers 'linear')"),
    "cosine": (
        cosine,
        "Nichol & Dhariwal 2021: s=0.008, beta <= 0.999 (diffusers 'squaredcos_cap_v2')",
    ),
    "diffusers": (
        diffusers_betas,
        "a diffusers scheduler's betas: beta_schedule linear, scaled_linear, "
        "squaredcos_cap_v2 (beta_start, beta_end) or trained_betas",
    ),
}
