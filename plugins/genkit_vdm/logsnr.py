"""Noise schedules of the continuous-time VDM: the log signal-to-noise ratio ``lambda(t)`` on
``t in [0, 1]`` (Kingma et al. 2021, sec. 3.2; their ``gamma(t)`` is ``-lambda(t)``)::

    q(z_t | x) = N(alpha_t x, sigma_t^2 I),   alpha_t^2 = sigmoid(lambda(t)),
                                              sigma_t^2 = sigmoid(-lambda(t)),
    SNR(t) = alpha_t^2 / sigma_t^2 = exp(lambda(t)),   lambda strictly decreasing.

A schedule is an ``nn.Module`` called as ``schedule(t)`` with ``t: (N,)`` floats; it returns
:class:`LogSNR`: ``lambda(t)``, its derivative ``dlambda/dt`` (exact, not a finite difference)
and the tensors its interior parameters act through. It holds no denoiser parameters; the VDM
registers the built-ins through the ``register_schedules`` hook (``timesteps=0``):

- ``fixed_linear``: ``lambda(t) = lambda_max + (lambda_min - lambda_max) t`` with the VDM paper's
  ``lambda_max = 13.3``, ``lambda_min = -5.0``.
- ``learned``: ``lambda(t) = lambda_max - (lambda_max - lambda_min) u(t)`` with learned end points
  (starting at the same values) and a learned monotone shape ``u`` with ``u(0) = 0``,
  ``u(1) = 1``::

      v(t) = a t + (1/H) sum_k c_k sigmoid(d_k (t - m_k)),   a > 0, c_k >= 0, d_k >= 0
      u(t) = (v(t) - v(0)) / (v(1) - v(0))

  (positive weights, as the monotone network of the VDM paper's appendix H). ``a``, ``c``, ``d``
  and the range ``lambda_max - lambda_min`` are softplus images of free parameters plus a floor,
  so ``lambda`` is strictly decreasing for any parameter values.

In continuous time, with a denoiser that sees the noise level ``lambda`` (not the clock ``t``:
:meth:`LogSNRSchedule.conditioning`), the ELBO depends on the schedule only through its end
points (Kingma et al. eq. 14 and sec. 5.1): the shape ``u`` changes the variance of the
diffusion-loss estimate, not its mean. So the end points are trained by the ELBO and the shape
by the gradient of ``E[L^2]`` in place of ``E[L]`` (:func:`minimise_variance`), which is then
the gradient of the variance and lowers it.
"""

from __future__ import annotations

import abc
import math

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genkit.errors import InvalidParameterError

#: The VDM paper's end points: ``lambda(0) = 13.3``, ``lambda(1) = -5.0`` (gamma from -13.3 to 5).
LOG_SNR_MAX = 13.3
LOG_SNR_MIN = -5.0


@attrs.frozen
class LogSNR:
    """``lambda(t)`` and ``dlambda/dt`` at the times asked for, each ``(N,)`` float32.

    ``shape``: the tensors through which the schedule's interior (shape) parameters act, for
    :func:`minimise_variance`; empty for a schedule without such parameters.
    """

    value: Tensor
    slope: Tensor
    shape: tuple[Tensor, ...] = ()


def minimise_variance(log_snr: LogSNR, loss: Tensor) -> None:
    """Make the gradient that reaches the schedule's shape parameters that of ``E[L^2]``.

    ``loss``: the per-row diffusion loss ``L`` computed from ``log_snr`` (``(N,)``, the rows of
    ``log_snr.value``). A hook multiplies the gradient flowing into each shape tensor by
    ``2 L`` (detached): a row's ``dObjective/du = w dL/du`` becomes ``w dL^2/du``. The end points
    act outside ``shape`` and keep the ELBO's gradient. Nothing happens without gradients.
    """
    factor = 2.0 * loss.detach().float()
    for tensor in log_snr.shape:
        if tensor.requires_grad:
            tensor.register_hook(lambda grad, f=factor: grad * f.reshape(grad.shape))


def check_times(t: Tensor) -> Tensor:
    """``t`` as a float32 ``(N,)`` tensor (float64 kept: a float64 model's times stay exact),
    checked to lie in [0, 1]."""
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        raise InvalidParameterError(
            f"a continuous-time VDM takes float times t in [0, 1], got a {t.dtype} tensor"
        )
    t = t.to(torch.promote_types(t.dtype, torch.float32)).reshape(-1)
    if t.numel() and not bool(((t >= 0.0) & (t <= 1.0)).all()):
        raise InvalidParameterError(
            f"time t must lie in [0, 1]; got values from {t.min().item():.4g} to {t.max().item():.4g}"
        )
    return t


class LogSNRSchedule(nn.Module, abc.ABC):
    """A strictly decreasing ``lambda(t)`` on [0, 1]. Computed in float32 (float64 for a module
    made ``.double()``) with autocast off, whatever the caller's precision: bf16 would round
    ``lambda`` by up to 0.06 at 13.3."""

    def forward(self, t: Tensor) -> LogSNR:
        t = check_times(t)
        anchor = next(iter([*self.parameters(), *self.buffers()]), None)
        if anchor is not None:  # the module's device, and float64 if it was made double
            t = t.to(anchor.device, torch.promote_types(anchor.dtype, torch.float32))
        with torch.autocast(device_type=t.device.type, enabled=False):
            return self.compute(t)

    @abc.abstractmethod
    def compute(self, t: Tensor) -> LogSNR:
        """``lambda`` and ``dlambda/dt`` at ``t: (N,)`` float32 in [0, 1]."""

    #: ``(lambda_max, lambda_min)`` the schedule was created with: the reference of
    #: :meth:`conditioning`, fixed whatever the learned end points become.
    reference: tuple[float, float]

    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t)``, ``(N,)``."""
        return self(t).value

    def conditioning(self, log_snr: Tensor) -> Tensor:
        """What the denoiser is given for the noise level ``lambda``: ``(lambda_max^0 - lambda)
        / (lambda_max^0 - lambda_min^0)`` with the end points the schedule was created with,
        the time at which the linear schedule between them reaches ``lambda`` (so exactly ``t``
        for ``fixed_linear``, and about ``t`` for a ``learned`` one at the start). A net that
        sees the noise level, not the clock, makes the ELBO depend on the schedule only
        through its end points (Kingma et al. 2021, sec. 5.1)."""
        top, bottom = self.reference
        return (top - log_snr) / (top - bottom)

    def end_points(self) -> tuple[Tensor, Tensor]:
        """``(lambda(0), lambda(1))`` as 0-d tensors (with gradient for learned end points)."""
        ends = self(torch.tensor([0.0, 1.0])).value
        return ends[0], ends[1]

    def _device(self) -> torch.device:
        for tensor in [*self.parameters(), *self.buffers()]:
            return tensor.device
        return torch.device("cpu")


def _check_ends(log_snr_max: float, log_snr_min: float) -> None:
    if not (math.isfinite(log_snr_max) and math.isfinite(log_snr_min)) or not (
        log_snr_max > log_snr_min
    ):
        raise InvalidParameterError(
            f"a log-SNR schedule needs finite end points with log_snr_max > log_snr_min, got "
            f"{log_snr_max} and {log_snr_min}"
        )


def _check_continuous(name: str, timesteps: int) -> None:
    if timesteps != 0:
        raise InvalidParameterError(
            f"schedule '{name}' is a continuous-time schedule: it needs timesteps=0, got "
            f"{timesteps} (discrete schedules: linear, cosine)"
        )


class FixedLinear(LogSNRSchedule):
    """``lambda(t) = lambda_max + (lambda_min - lambda_max) t``; no parameters."""

    def __init__(self, log_snr_max: float = LOG_SNR_MAX, log_snr_min: float = LOG_SNR_MIN) -> None:
        super().__init__()
        _check_ends(log_snr_max, log_snr_min)
        self.log_snr_max, self.log_snr_min = float(log_snr_max), float(log_snr_min)
        self.reference = (self.log_snr_max, self.log_snr_min)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # follows .to(device)

    def compute(self, t: Tensor) -> LogSNR:
        slope = self.log_snr_min - self.log_snr_max
        t = t.to(self._anchor.dtype)
        return LogSNR(self.log_snr_max + slope * t, torch.full_like(t, slope))

    def extra_repr(self) -> str:
        return f"log_snr_max={self.log_snr_max}, log_snr_min={self.log_snr_min}"


def _softplus_inverse(y: float) -> float:
    """``x`` with ``softplus(x) = y`` (``y > 0``)."""
    return y + math.log(-math.expm1(-y))


class Learned(LogSNRSchedule):
    """``lambda(t) = lambda_max - range * u(t)`` with learned ``lambda_max``, ``range > 0`` and the
    monotone shape ``u`` of the module docstring (``hidden`` sigmoid units).

    Parameters: ``log_snr_max`` (starts at ``log_snr_max``), ``raw_range`` (``range =
    softplus(raw_range) + min_range``, starts at ``log_snr_max - log_snr_min``), and the shape's
    ``raw_slope``, ``raw_weight``, ``raw_frequency`` and ``centre``. The shape starts close to
    linear (``a = 1``, ``c_k`` about 0.05), so the schedule starts near ``fixed_linear``.
    """

    #: Floors of the range ``lambda_max - lambda_min`` and of the linear slope ``a``.
    min_range = 1e-2
    min_slope = 1e-3

    def __init__(
        self,
        log_snr_max: float = LOG_SNR_MAX,
        log_snr_min: float = LOG_SNR_MIN,
        hidden: int = 1024,
    ) -> None:
        super().__init__()
        _check_ends(log_snr_max, log_snr_min)
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise InvalidParameterError(f"hidden must be an integer >= 1, got {hidden!r}")
        self.hidden = hidden
        self.reference = (float(log_snr_max), float(log_snr_min))
        span = log_snr_max - log_snr_min - self.min_range
        self.log_snr_max = nn.Parameter(torch.tensor(float(log_snr_max)))
        self.raw_range = nn.Parameter(torch.tensor(_softplus_inverse(max(span, 1e-6))))
        self.raw_slope = nn.Parameter(torch.tensor(_softplus_inverse(1.0 - self.min_slope)))
        g = torch.Generator().manual_seed(0)  # the same start whatever the global seed
        self.raw_weight = nn.Parameter(torch.full((hidden,), _softplus_inverse(0.05)))
        self.raw_frequency = nn.Parameter(
            _softplus_inverse(1.0) + 3.0 * torch.rand(hidden, generator=g)
        )
        self.centre = nn.Parameter(torch.rand(hidden, generator=g))

    def shape_parts(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``v(t)`` and ``v'(t)`` of the module docstring, each ``(N,)``."""
        a = F.softplus(self.raw_slope) + self.min_slope
        c = F.softplus(self.raw_weight) / self.hidden  # (H,)
        d = F.softplus(self.raw_frequency)  # (H,)
        s = torch.sigmoid(d * (t[:, None] - self.centre))  # (N, H)
        v = a * t + s @ c
        dv = a + (s * (1.0 - s)) @ (c * d)
        return v, dv

    def compute(self, t: Tensor) -> LogSNR:
        ends = torch.tensor([0.0, 1.0], device=t.device, dtype=t.dtype)
        v, dv = self.shape_parts(torch.cat([ends, t]))
        norm = v[1] - v[0]  # >= a > 0
        u, du = (v[2:] - v[0]) / norm, dv[2:] / norm
        span = F.softplus(self.raw_range) + self.min_range
        return LogSNR(self.log_snr_max - span * u, -span * du, shape=(u, du))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}"


def fixed_linear(
    timesteps: int = 0, log_snr_max: float = LOG_SNR_MAX, log_snr_min: float = LOG_SNR_MIN
) -> FixedLinear:
    """The ``fixed_linear`` schedule (``timesteps`` must be 0: continuous time)."""
    _check_continuous("fixed_linear", timesteps)
    return FixedLinear(log_snr_max, log_snr_min)


def learned(
    timesteps: int = 0,
    log_snr_max: float = LOG_SNR_MAX,
    log_snr_min: float = LOG_SNR_MIN,
    hidden: int = 1024,
) -> Learned:
    """The ``learned`` schedule (``timesteps`` must be 0: continuous time)."""
    _check_continuous("learned", timesteps)
    return Learned(log_snr_max, log_snr_min, hidden)


#: The continuous-time schedules this plugin registers: name -> (factory, description).
CONTINUOUS_SCHEDULES = {
    "fixed_linear": (
        fixed_linear,
        "continuous time: log-SNR linear in t from 13.3 to -5.0 (Kingma et al. 2021)",
    ),
    "learned": (
        learned,
        "continuous time: monotone network with learned end points, trained for low variance",
    ),
}
