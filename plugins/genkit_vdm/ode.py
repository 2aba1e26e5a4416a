"""The probability-flow ODE log-likelihood of a VDM (Song et al. 2021): estimator ``ode``.

**The ODE.** The VDM's encoder ``z_t = alpha_t x + sigma_t eps`` on a log-SNR schedule
``lambda(t)`` (``alpha_t^2 = sigmoid(lambda)``, ``sigma_t^2 = sigmoid(-lambda)``, ``lambda``
decreasing) has the marginals of the variance-preserving SDE ``dz = f(t) z dt + g(t) dW`` with::

    f   = d log alpha / dt = 1/2 d log sigmoid(lambda) / dt           = 1/2 sigma^2 lambda'
    g^2 = d sigma^2 / dt - 2 f sigma^2 = -alpha^2 sigma^2 lambda' - sigma^4 lambda'
        = -sigma^2 lambda'                                             (> 0: lambda' < 0)

(``d sigmoid(l)/dl = sigmoid(l) sigmoid(-l)`` and ``alpha^2 + sigma^2 = 1``). Its probability
flow ``dz/dt = f z - 1/2 g^2 grad log p_t(z)`` has the same marginals; with the network's
score ``grad log p_t(z) = -eps_hat(z, t) / sigma_t``::

    dz/dt = F(z, t) = 1/2 lambda'(t) (sigma_t^2 z - sigma_t eps_hat(z, t))
    div F           = 1/2 lambda'(t) (sigma_t^2 D - sigma_t div eps_hat(z, t))

and by the instantaneous change of variables (``d log p_t(z_t)/dt = -div F``)::

    log p_start(z_start) = log N(z_1; 0, I) + int_start^1 div F(z_t, t) dt

where ``z_1`` is the end of the flow from ``z_start`` and ``N(0, I)`` is the VDM's prior. This
is the exact log-density of the flow the network defines (a model of its own, which equals the
VDM's generative model only for a perfect denoiser), up to the solver's error.

**Data scale.** ``z_start = alpha_start y`` for data ``y``, so
``log p(y) = log p_start(alpha_start y) + D log alpha_start``. Vector data (a ``gaussian``
decoder likelihood) report this density of ``x`` (nats, a density: it may be positive).
8-bit images (a ``discretized_gaussian`` likelihood; the continuous VDM's ``decoder``, softmax or
bin mass, does not enter) report a lower bound on the log-probability of
the discrete data under uniform dequantization (Theis et al. 2016; Ho et al. 2019): with bins of
width ``w = 2/255`` on genkit's scale (``x = k/127.5 - 1``) and ``u ~ U(-1/255, 1/255)^D``::

    log P(x) = log int_{bin(x)} p(y) dy >= log int_{x + [-1/255, 1/255]^D} p(y) dy
             = D log w + log E_u[p(x + u)] >= D log w + E_u[log p(x + u)]       (Jensen)

``P`` puts on each 8-bit value the mass of its bin, the edge bins (pixel 0 and 255) open to
``-inf`` and ``+inf`` as in genkit's discretized decoders, so that ``P`` sums to 1; the cube
``x + [-1/255, 1/255]^D`` lies inside every bin, the open ones included, hence the first
inequality. One draw of ``u`` per call: the term is an unbiased estimate of the bound, and the
Monte-Carlo error of repeated calls measures its noise (as for every estimator).

**Time.** Continuous VDM: ``t`` in [0, 1], ``lambda`` and ``lambda'`` from the schedule
(``model.encoder.log_snr_and_slope``), ``start = 0``. Discrete VDM with ``T`` steps: a continuous
step ``tau`` in [1, T] with ``lambda(tau)`` linear between the table's integer steps
(``lambda_i = log(ab_i / (1 - ab_i))``, so the marginals at integer ``tau`` are the chain's
``q(x_i|x_0)``) and ``dlambda/dtau`` piecewise constant; ``start`` is step 1, not 0 (``ab_0 = 1``:
``lambda = inf``, no density). That ``dlambda/dtau`` jumps at every integer step, and ``F`` with
it, which an adaptive solver handles badly (``T = 10``, 1x4x4 images, ``eps_hat = 0``, default
tolerances: 0.008 nats of error in 428 evaluations integrating in ``tau``, 3e-6 in 56 as
below; ``T = 1000`` Gaussian data: 254 against 92 evaluations). So the same ODE is integrated in ``s = -lambda`` (from ``-lambda_1`` to ``-lambda_T``): a change
of the time variable that leaves the path ``z`` and the integral of ``div F`` unchanged, and gives
``dz/ds = -1/2 (sigma^2 z - sigma eps_hat(z, tau(s)))``, continuous in ``s``; ``tau(s)`` is the
piecewise-linear inverse. The network is called with the float ``tau`` (``(B,)``): the default
nets embed it with sinusoids, which interpolate between the steps they were trained on; a
user's net that indexes a table by ``t`` cannot serve this estimator.

**Solve.** One adaptive solve (``torchdiffeq.odeint``, ``method``, ``rtol``, ``atol``) per batch
on the augmented state ``(z, int div F)``, every example sharing the steps (as score_sde does),
under ``torch.no_grad`` except for the divergence's vector-Jacobian products, in float32
(float64 for a double model) with autocast off; the solver is made to step onto the end
time, and its times are clamped to the interval, so the network is never asked beyond it. ``div eps_hat`` is exact (``D``
vector-Jacobian products, one per data dimension, ``EXACT_CHUNK`` of them per batched backward
pass) when ``divergence="exact"`` or, by default,
when ``D <= exact_max_dims``; otherwise Hutchinson's ``v^T (d eps_hat / dz) v`` with one
Rademacher ``v`` per example fixed for the solve (FFJORD), unbiased for the divergence and so
for the log-likelihood, its noise part of the Monte-Carlo error of repeated calls. Examples
must not interact inside the net (no batch statistics): the divergence sums over the batch.

``nfe`` counts the calls of ``F``: each runs the network forward once on every example and,
through it, ``D`` (exact) or one (Hutchinson) vector-Jacobian products, not counted apart (each
costs about two forward passes). Call it in eval mode, as ``genkit eval`` does: dropout would
make ``F`` random and the adaptive solve meaningless.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import attrs
import torch
from einops import reduce
from torch import Tensor
from torchdiffeq import odeint

from genkit.distributions import BIN_HALF_WIDTH, eight_bit
from genkit.elbo import ELBO, ELBOTerms
from genkit.errors import IncompatibleEstimatorError, InvalidParameterError
from genkit.model import LatentVariableModel
from genkit_vdm.encoder import expand_like

#: torchdiffeq's adaptive solvers (those that take ``rtol`` and ``atol``).
METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
DIVERGENCES = ("auto", "exact", "hutchinson")
#: The width of one 8-bit bin on genkit's [-1, 1] scale.
BIN_WIDTH = 2.0 * BIN_HALF_WIDTH
#: Basis vectors per batched backward pass of the exact divergence.
EXACT_CHUNK = 16


@attrs.frozen
class FlowTime:
    """The ODE's time axis, from ``start`` to ``end``: ``at(t)`` gives, at ``t: (1,)`` float64,
    ``lambda``, ``dlambda/dt`` and the time the network is called with, each ``(1,)``."""

    start: float
    end: float
    at: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def log_snr_table(alpha_bars: Tensor) -> Tensor:
    """``lambda_i = log(ab_i / (1 - ab_i))`` for ``i = 1..T`` (float64 ``(T,)``, decreasing)
    from a discrete VDM's ``(T + 1,)`` table ``alpha_bars`` (``ab_0 = 1``)."""
    ab = alpha_bars[1:].double()
    return torch.log(ab) - torch.log1p(-ab)


def step_of_log_snr(table: Tensor, log_snr: Tensor) -> Tensor:
    """The continuous step ``tau`` in [1, T] at which the piecewise-linear ``lambda(tau)``
    through ``table`` (:func:`log_snr_table`) equals ``log_snr: (N,)``; float64 ``(N,)``."""
    log_snr = log_snr.to(table.device, torch.float64)
    if table.numel() == 1:
        return torch.ones_like(log_snr)
    i = torch.searchsorted(-table, -log_snr, right=True).clamp(1, table.numel() - 1)
    high, low = table[i - 1], table[i]  # lambda_i >= log_snr >= lambda_(i+1)
    return i + (high - log_snr) / (high - low)


def flow_time(model: LatentVariableModel) -> FlowTime:
    """The time axis of ``model``'s flow (module docstring), or an
    :class:`~genkit.errors.IncompatibleEstimatorError` for a model that is not a VDM."""
    encoder = getattr(model, "encoder", None)
    decoder = getattr(model, "decoder", None)
    steps = getattr(encoder, "timesteps", None)
    if callable(getattr(decoder, "predict", None)):
        if steps == 0 and callable(getattr(encoder, "log_snr_and_slope", None)):

            def continuous(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                # t stays float64: the schedule computes in the model's precision
                log_snr = encoder.log_snr_and_slope(t)
                # the net sees the noise level, as in training (ContinuousReverseProcess.predict)
                return log_snr.value, log_snr.slope, encoder.schedule.conditioning(log_snr.value)

            return FlowTime(0.0, 1.0, continuous)
        table = getattr(encoder, "alpha_bars", None)
        if isinstance(steps, int) and steps >= 1 and isinstance(table, Tensor):
            table = log_snr_table(table)

            def discrete(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # s = -lambda
                return -s, -torch.ones_like(s), step_of_log_snr(table, -s)

            return FlowTime(-table[0].item(), -table[-1].item(), discrete)
    raise IncompatibleEstimatorError(
        f"estimator 'ode' needs a variational diffusion model (a log-SNR schedule on "
        f"model.encoder and model.decoder.predict(z, t)); {type(model).__name__} has none"
    )


def divergence(eps: Tensor, z: Tensor, noise: Tensor | None) -> Tensor:
    """``div_z eps(z)`` per example, ``(B,)``: exact (``noise`` None: one vector-Jacobian
    product per data dimension, ``EXACT_CHUNK`` of them batched per backward pass) or
    Hutchinson's ``v^T (d eps/dz) v`` with ``v = noise`` shaped like ``z``. ``eps`` must be
    computed from ``z`` with autograd on, each example from its own row of ``z``."""
    zero = z.new_zeros(z.shape[0])
    if not eps.requires_grad:  # a net that ignores z
        return zero
    if noise is not None:
        (grad,) = torch.autograd.grad(eps, z, grad_outputs=noise, allow_unused=True)
        return zero if grad is None else reduce(grad * noise, "b ... -> b", "sum")
    b, dims = z.shape[0], z[0].numel()
    total = zero
    for first in range(0, dims, EXACT_CHUNK):
        k = min(EXACT_CHUNK, dims - first)
        basis = torch.zeros(k, b, dims, dtype=eps.dtype, device=eps.device)
        basis[torch.arange(k), :, first + torch.arange(k)] = 1.0  # e_(first+j) for every example
        (grad,) = torch.autograd.grad(
            eps,
            z,
            grad_outputs=basis.view(k, *eps.shape),
            retain_graph=first + k < dims,
            is_grads_batched=True,
            allow_unused=True,
        )
        if grad is not None:  # (k, B, ...): row j holds e_(first+j)^T d eps / dz
            total = total + torch.einsum("kbd,kbd->b", grad.flatten(2), basis)
    return total


class _Flow:
    """The right-hand side ``(F(z, t), div F(z, t))`` of the augmented ODE; counts its calls."""

    def __init__(self, model, time: FlowTime, noise: Tensor | None) -> None:
        self.model, self.time, self.noise, self.calls = model, time, noise, 0

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        z = state[0]
        self.calls += 1
        b, dims = z.shape[0], z[0].numel()
        # the initial-step probe of torchdiffeq may look past the end: keep t in range
        t = t.to(torch.float64).clamp(self.time.start, self.time.end).reshape(1)
        lam, slope, net_t = self.time.at(t)
        lam, slope = lam.detach().to(z.dtype), slope.detach().to(z.dtype)
        net_t = net_t.detach().to(z.dtype)  # the nets' time in the model's precision
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            eps = self.model.decoder.predict(
                z,
                net_t.expand(b),
                signal_noise=(alpha.expand(b), sigma.expand(b)),
                net_time=net_t.expand(b),
            ).eps
            div_eps = divergence(eps, z, self.noise)
        s, r = expand_like(slope.expand(b), z), expand_like(sigma.expand(b), z)
        drift = 0.5 * s * (r.square() * z - r * eps.detach())
        div = 0.5 * slope * (sigma.square() * dims - sigma * div_eps)
        return drift.detach(), div.detach()


def _compute_dtype(model: LatentVariableModel, x: Tensor) -> torch.dtype:
    """float64 for a double model (its float parameters; without any, double data), else
    float32."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} or {x.dtype}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _check_positive(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (math.isfinite(value) and value > 0)
    ):
        raise InvalidParameterError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


class ProbabilityFlowODE(ELBO):
    """The probability-flow ODE log-likelihood (module docstring) of a continuous or discrete VDM.

    One term, ``log_likelihood`` (nats per example): ``log p(x)`` for vector data, the
    dequantized lower bound ``E_u[log p(x + u)] + D log(2/255)`` on ``log P(x)`` for 8-bit
    images. ``nfe``: calls of the ODE's right-hand side in the solve (module docstring).

    :param rtol: the solver's relative tolerance (torchdiffeq's name), > 0.
    :param atol: its absolute tolerance, > 0.
    :param method: a torchdiffeq adaptive solver: ``dopri5``, ``dopri8``, ``bosh3``,
        ``fehlberg2``, ``adaptive_heun``.
    :param divergence: ``auto`` (exact for ``D <= exact_max_dims``, else Hutchinson),
        ``exact`` or ``hutchinson`` (one Rademacher vector per example and solve).
    :param exact_max_dims: the largest ``D`` for which ``auto`` computes the exact divergence.
    :param dequantize: ``None`` / ``"auto"``: for 8-bit data, that is when the model's decoder
        likelihood is ``discretized_gaussian``; ``True``: always (the data must be 8-bit);
        ``False``: never (the density of ``x`` itself).
    """

    name = "ode"

    def __init__(
        self,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        method: str = "dopri5",
        divergence: str = "auto",
        exact_max_dims: int = 16,
        dequantize: bool | str | None = None,
    ) -> None:
        self.rtol, self.atol = _check_positive("rtol", rtol), _check_positive("atol", atol)
        if method not in METHODS:
            raise InvalidParameterError(
                f"unknown method {method!r}; choose an adaptive torchdiffeq solver: "
                f"{', '.join(METHODS)}"
            )
        if divergence not in DIVERGENCES:
            raise InvalidParameterError(
                f"unknown divergence {divergence!r}; choose from {', '.join(DIVERGENCES)}"
            )
        if (
            isinstance(exact_max_dims, bool)
            or not isinstance(exact_max_dims, numbers.Integral)
            or exact_max_dims < 0
        ):
            raise InvalidParameterError(
                f"exact_max_dims must be an integer >= 0, got {exact_max_dims!r}"
            )
        if not (dequantize is None or isinstance(dequantize, bool) or dequantize == "auto"):
            raise InvalidParameterError(
                f"dequantize must be true, false or 'auto', got {dequantize!r}"
            )
        self.method, self.divergence = method, divergence
        self.exact_max_dims = int(exact_max_dims)
        self.dequantize = None if dequantize == "auto" else dequantize

    def __call__(self, model: LatentVariableModel, x: Tensor) -> ELBOTerms:
        time = flow_time(model)
        dequantize = self.dequantize
        if dequantize is None:
            dequantize = getattr(model.decoder, "likelihood", None) == "discretized_gaussian"
        dtype = _compute_dtype(model, x)
        b, dims = x.shape[0], x[0].numel()
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            y = x.detach().to(dtype)
            offset = 0.0
            if dequantize:
                if not bool(eight_bit.check(y).all()):
                    raise InvalidParameterError(
                        "estimator 'ode' with dequantize needs 8-bit data on [-1, 1] "
                        "(x = k / 127.5 - 1); genkit.distributions.quantize snaps data to it"
                    )
                y = y + BIN_HALF_WIDTH * (2.0 * torch.rand_like(y) - 1.0)
                offset = dims * math.log(BIN_WIDTH)
            exact = self.divergence == "exact" or (
                self.divergence == "auto" and dims <= self.exact_max_dims
            )
            noise = None if exact else torch.randint_like(y, 2) * 2.0 - 1.0
            start = torch.tensor([time.start], dtype=torch.float64, device=x.device)
            lam_start = time.at(start)[0].to(dtype)
            alpha_start = torch.sigmoid(lam_start).sqrt()  # (1,)
            z = alpha_start * y
            flow = _Flow(model, time, noise)
            if time.end > time.start:
                times = torch.tensor([time.start, time.end], dtype=torch.float64, device=x.device)
                zs, integrals = odeint(
                    flow,
                    (z, z.new_zeros(b)),
                    times,
                    rtol=self.rtol,
                    atol=self.atol,
                    method=self.method,
                    options={"step_t": times[1:]},
                )
                z_end, integral = zs[-1], integrals[-1]
            else:  # a one-step chain: start and end coincide
                z_end, integral = z, z.new_zeros(b)
            squares = reduce(z_end.square(), "b ... -> b", "sum")
            log_prior = -0.5 * (squares + dims * math.log(2.0 * math.pi))  # log N(z_end; 0, I)
            log_p = log_prior + integral + dims * torch.log(alpha_start) + offset
        return ELBOTerms(
            terms={"log_likelihood": log_p}, num_dims=model.num_dims, nfe=float(flow.calls)
        )


__all__ = [
    "FlowTime",
    "ProbabilityFlowODE",
    "divergence",
    "flow_time",
    "log_snr_table",
    "step_of_log_snr",
]
