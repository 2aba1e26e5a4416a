"""Distributions torch lacks, as :class:`torch.distributions.Distribution` subclasses, and
element-wise maths helpers that reduce nothing (callers sum with einops ``reduce``).

The likelihood scale of genkit: 8-bit pixels ``k`` in 0..255 map to ``x = k / 127.5 - 1``, so
each bin has half-width ``1/255`` and every image decoder is a probability mass over the 256
bins; ``-log P(x) / (D ln 2)`` is then bits/dim as DDPM, VDM and NVAE report it. The masses:
:class:`DiscretizedGaussian` (Ho et al. 2020) and :class:`GridGaussian` (Kingma et al. 2021's
VDM decoder, a softmax over the 256 values) here, and PixelCNN++'s mixture of logistics in
:mod:`genkit.logistic`, which builds on this module's bins and checks.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions import Bernoulli, Distribution, Independent, Normal, constraints
from torch.distributions.utils import broadcast_all
from torch.nn.functional import binary_cross_entropy_with_logits

from genkit.errors import GenkitError, InvalidParameterError

#: Half the width of one of the 256 bins on the [-1, 1] scale.
BIN_HALF_WIDTH = 1.0 / 255.0
NUM_BINS = 256
#: Bin width in units of the scale below which the midpoint rule replaces the CDF difference
#: (in float32 the CDF difference is off by 0.01 nat at s = 1e3 and by 50 nats at s = 1e6).
MIDPOINT_WIDTH = 1e-3


def to_model_scale(k: Tensor) -> Tensor:
    """uint8 pixels ``k`` -> ``x = k / 127.5 - 1`` in [-1, 1] (float32)."""
    return k.to(torch.float32) / 127.5 - 1.0


def to_pixels(x: Tensor) -> Tensor:
    """``x`` in [-1, 1] -> the nearest uint8 pixel value ``round((x + 1) * 127.5)``."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _centres_of(k: Tensor, dtype: torch.dtype) -> Tensor:
    """Bin centres ``k / 127.5 - 1`` in ``dtype``, worked out in float32 or, for float64, in
    float64 (so the bins of a float64 distribution tile [-1, 1] without float32 gaps)."""
    return (k.to(torch.promote_types(dtype, torch.float32)) / 127.5 - 1.0).to(dtype)


def quantize(x: Tensor) -> Tensor:
    """Snap ``x`` to the centre of its 8-bit bin on the [-1, 1] scale (edges absorb the tails)."""
    return _centres_of(to_pixels(x), x.dtype)


class _EightBit(constraints.Constraint):
    """The 256 bin centres ``k / 127.5 - 1``."""

    is_discrete = True
    event_dim = 0

    def check(self, value: Tensor) -> Tensor:
        k = (value + 1.0) * 127.5
        return (value >= -1.0 - 1e-6) & (value <= 1.0 + 1e-6) & ((k - k.round()).abs() < 1e-3)


eight_bit = _EightBit()


class _PlusMinusOne(constraints.Constraint):
    """The two values ``-1`` and ``+1`` of binarized images on the model scale."""

    is_discrete = True
    event_dim = 0

    def check(self, value: Tensor) -> Tensor:
        return (value == -1.0) | (value == 1.0)


plus_minus_one = _PlusMinusOne()


def _check_support(
    constraint: constraints.Constraint, value: Tensor, needs: str, off: str, hint: str
) -> None:
    """One :class:`InvalidParameterError` line if ``value`` leaves ``constraint``: what the
    distribution ``needs``, how many values are ``off`` and the first of them, and a ``hint``."""
    bad = ~constraint.check(value)
    if bool(bad.any()):
        raise InvalidParameterError(
            f"{needs}; {int(bad.sum())} value(s) are {off}, e.g. "
            f"{value[bad].flatten()[0].item():.6g} ({hint})"
        )


def _check_eight_bit(value: Tensor, name: str) -> None:
    """:func:`_check_support` for the masses over the 256 bins; ``name`` the distribution."""
    _check_support(
        eight_bit,
        value,
        f"{name} needs 8-bit data on [-1, 1] (x = k / 127.5 - 1)",
        "off that grid",
        "genkit.distributions.quantize snaps data to it",
    )


def _bin_centres(like: Tensor, batch_dims: int) -> Tensor:
    """The 256 bin centres ``k / 127.5 - 1`` on ``like``'s device and dtype, shape
    ``(256, 1, ..., 1)`` with ``batch_dims`` ones."""
    values = _centres_of(torch.arange(NUM_BINS, device=like.device), like.dtype)
    return values.view((-1,) + (1,) * batch_dims)


class _LogNdtr(torch.autograd.Function):
    """``log Phi(z)`` whose derivative is right in float32 far into the lower tail.

    torch's ``log_ndtr`` backward forms ``phi(z) / Phi(z)`` from two terms of size ``z^2 / 2``
    that cancel: in float32 its gradient is 4% off at ``z = -1000``, a factor 6 off at
    ``z = -10^4`` and NaN beyond. The exact ratio without cancellation is the inverse of the
    scaled complementary error function::

        d log Phi(z) / dz = phi(z) / Phi(z) = sqrt(2 / pi) / erfcx(-z / sqrt(2))

    (``Phi(z) = erfcx(-z/sqrt 2) exp(-z^2/2) / 2``), finite for every ``z`` and 0 where
    ``erfcx`` overflows (``z`` large and positive, where the ratio underflows anyway).
    """

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return torch.special.log_ndtr(z)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad * (math.sqrt(2.0 / math.pi) / torch.special.erfcx(-z * math.sqrt(0.5)))


def log_ndtr(z: Tensor) -> Tensor:
    """``log Phi(z)``, element-wise, with a gradient that stays accurate in the tails (see
    :class:`_LogNdtr`); values are torch's ``special.log_ndtr``."""
    return _LogNdtr.apply(z)


def _log_diff_ndtr(a: Tensor, b: Tensor) -> Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b``, stably in both tails.

    Where ``a > 0`` the bin is mirrored (``Phi(b) - Phi(a) = Phi(-a) - Phi(-b)``) so both
    arguments sit in the lower tail, where ``log_ndtr`` keeps full precision; then
    ``log(Phi(b) - Phi(a)) = log Phi(b) + log(-expm1(log Phi(a) - log Phi(b)))``.
    """
    flip = a > 0
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    log_hi = log_ndtr(hi)
    log_lo = log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1((log_lo - log_hi).clamp(max=-1e-30)))


def discretized_gaussian_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Element-wise ``log P(x)`` of a Gaussian discretized into the 256 bins of [-1, 1].

    ``P(x) = Phi((x + 1/255 - mean) / s) - Phi((x - 1/255 - mean) / s)`` for interior bins, with
    the edge bins open: ``P(-1) = Phi((-1 + 1/255 - mean) / s)`` and
    ``P(1) = 1 - Phi((1 - 1/255 - mean) / s)`` (Ho et al. 2020, eq. 13). Computed in log space
    with ``log_ndtr``; where the bin is narrow against ``s`` (width ``w = 2/(255 s)`` below
    :data:`MIDPOINT_WIDTH`) the difference of two nearly equal CDFs loses its digits, and the
    midpoint rule ``log(pdf(x) * 2/255)`` (relative error ``w^2 |z^2 - 1| / 24``) takes over.
    Reduces nothing.
    """
    inv_s = torch.exp(-log_scale)
    upper = (x - mean + BIN_HALF_WIDTH) * inv_s
    lower = (x - mean - BIN_HALF_WIDTH) * inv_s
    log_cdf_upper = log_ndtr(upper)  # left edge bin: log Phi(upper)
    log_sf_lower = log_ndtr(-lower)  # right edge bin: log(1 - Phi(lower))
    log_mid = _log_diff_ndtr(lower, upper)
    centred = (x - mean) * inv_s
    log_pdf_mid = (
        -0.5 * centred.square()
        - log_scale
        - 0.5 * math.log(2 * math.pi)
        + math.log(2 * BIN_HALF_WIDTH)
    )
    narrow = (upper - lower) < MIDPOINT_WIDTH
    log_mid = torch.where(narrow | ~torch.isfinite(log_mid), log_pdf_mid, log_mid)
    return torch.where(
        x < -1.0 + BIN_HALF_WIDTH,
        log_cdf_upper,
        torch.where(x > 1.0 - BIN_HALF_WIDTH, log_sf_lower, log_mid),
    )


class DiscretizedGaussian(Distribution):
    """A Gaussian ``N(loc, scale^2)`` discretized into the 256 bins of 8-bit data on [-1, 1].

    Element-wise (``event_shape == ()``); wrap in ``Independent`` to sum over pixels. Sampling
    draws the continuous Gaussian and snaps it to its bin, which is exact for this mass function.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    support = eight_bit
    has_rsample = False
    has_enumerate_support = True

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @classmethod
    def from_log_scale(cls, loc: Tensor, log_scale: Tensor) -> DiscretizedGaussian:
        return cls(loc, torch.exp(log_scale))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedGaussian, _instance)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(DiscretizedGaussian, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mode(self) -> Tensor:
        """The most probable bin. Among interior bins (all of width ``2/255``) it is the one
        nearest ``loc``; an open edge bin can hold more (``loc`` near an edge, wide ``scale``),
        so the edges are candidates too."""
        edge = 1.0 - 2 * BIN_HALF_WIDTH  # the outermost interior bin centres are +-edge
        inner = quantize(self.loc).clamp(-edge, edge)
        candidates = torch.stack([inner, -torch.ones_like(inner), torch.ones_like(inner)])
        log_p = discretized_gaussian_log_prob(candidates, self.loc, torch.log(self.scale))
        return candidates.gather(0, log_p.argmax(0, keepdim=True)).squeeze(0)

    def enumerate_support(self, expand: bool = True) -> Tensor:
        """The 256 bin centres ``k / 127.5 - 1``, shape ``(256, *batch_shape)`` (or
        ``(256, 1, ..., 1)`` without ``expand``)."""
        values = _bin_centres(self.loc, len(self.batch_shape))
        return values.expand((-1, *self.batch_shape)) if expand else values

    def log_prob(self, value: Tensor) -> Tensor:
        """``log P(value)`` per element; see :func:`discretized_gaussian_log_prob`."""
        if self._validate_args:
            _check_eight_bit(value, "the discretized Gaussian")
            self._validate_sample(value)
        return discretized_gaussian_log_prob(value, self.loc, torch.log(self.scale))

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            noise = torch.randn(
                shape, generator=generator, device=self.loc.device, dtype=self.loc.dtype
            )
            return quantize(self.loc.expand(shape) + self.scale.expand(shape) * noise)


#: :meth:`GridGaussian.log_normaliser` leaves out terms worth less than ``e^-45`` of the sum.
_WINDOW_NATS = 45.0


class GridGaussian(Distribution):
    """A Gaussian density ``N(loc, scale^2)`` evaluated at the 256 bin centres and normalised
    over them: a categorical over ``x_k = k / 127.5 - 1`` with a softmax of the logits::

        P(x_k) = exp(-(x_k - loc)^2 / (2 scale^2)) / sum_j exp(-(x_j - loc)^2 / (2 scale^2))

    It is Kingma et al.'s (2021) VDM decoder ``p(x|z_0) ∝ q(z_0|x)`` with ``loc = z_0 / alpha_0``
    and ``scale = sigma_0 / alpha_0`` (``q(z_0|x_k)`` is that Gaussian in ``x_k`` up to a
    constant), the posterior of ``x`` under a uniform prior on the grid. Against
    :class:`DiscretizedGaussian` (the Gaussian's mass on each bin) it has no open edge bins and
    puts the mass of a bin's neighbourhood on its centre. Element-wise (``event_shape == ()``);
    :attr:`logits` gives the whole grid, ``Categorical(logits=...)`` over the bin indices.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    support = eight_bit
    has_rsample = False
    has_enumerate_support = True

    def __init__(self, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GridGaussian, _instance)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(GridGaussian, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _grid_energy(self) -> Tensor:
        """The unnormalised logits ``-(x_k - loc)^2 / (2 scale^2)``, ``(*batch_shape, 256)``."""
        grid = _bin_centres(self.loc, 0)  # (256,)
        return -0.5 * ((grid - self.loc.unsqueeze(-1)) / self.scale.unsqueeze(-1)).square()

    @property
    def logits(self) -> Tensor:
        """``log P(x_k)`` for ``k = 0..255``, shape ``(*batch_shape, 256)`` (normalised)."""
        energy = self._grid_energy()
        return energy - torch.logsumexp(energy, dim=-1, keepdim=True)

    @property
    def mode(self) -> Tensor:
        """The bin centre nearest ``loc`` (the largest logit), ``loc`` clamped to [-1, 1]."""
        return quantize(self.loc)

    @property
    def mean(self) -> Tensor:
        return (self.logits.exp() * _bin_centres(self.loc, 0)).sum(-1)

    @property
    def variance(self) -> Tensor:
        grid = _bin_centres(self.loc, 0)
        return (self.logits.exp() * (grid - self.mean.unsqueeze(-1)).square()).sum(-1)

    def enumerate_support(self, expand: bool = True) -> Tensor:
        """The 256 bin centres, shape ``(256, *batch_shape)`` (or ``(256, 1, ..., 1)``)."""
        values = _bin_centres(self.loc, len(self.batch_shape))
        return values.expand((-1, *self.batch_shape)) if expand else values

    def log_normaliser(self) -> Tensor:
        """``log sum_k exp(-(x_k - loc)^2 / (2 scale^2))``, ``(*batch_shape,)``, summed over the
        ``2W + 1`` centres nearest ``loc`` only, where that is exact to float64 rounding.

        With ``k*`` the centre nearest ``loc`` and ``d = 2/255`` the spacing, a centre ``j``
        bins from ``k*`` has ``|x_j - loc| >= (j - 1/2) d`` and ``|x_k* - loc| <= d / 2``, so
        its term is at most ``exp(-d^2 j (j - 1) / (2 scale^2))`` times ``k*``'s. Leaving out
        every ``|j| > W`` changes the sum by a factor below ``1 + 256 exp(-d^2 W (W + 1) /
        (2 scale^2))``; ``W(W + 1) >= 2 (45 + ln 256) (scale / d)^2`` makes that ``e^-45``.
        At ``lambda(0) = 13.3`` (``scale/d = 0.16``) ``W = 2``: 5 terms instead of 256."""
        if self.loc.numel() == 0:
            return self.loc.new_zeros(self.batch_shape)
        ratio = float(self.scale.detach().max()) / (2 * BIN_HALF_WIDTH)
        if not math.isfinite(ratio):  # a diverged scale: the full sum, whose NaN the trainer
            return torch.logsumexp(self._grid_energy(), dim=-1)  # reports as non-finite
        need = 2.0 * (_WINDOW_NATS + math.log(NUM_BINS)) * ratio * ratio
        w = max(2, math.ceil(0.5 * (math.sqrt(1.0 + 4.0 * need) - 1.0)))
        if 2 * w + 1 >= NUM_BINS:
            return torch.logsumexp(self._grid_energy(), dim=-1)
        nearest = to_pixels(self.loc.detach()).long().unsqueeze(-1)  # k*, (*batch, 1)
        k = nearest + torch.arange(-w, w + 1, device=self.loc.device)  # (*batch, 2W + 1)
        inside = (k >= 0) & (k < NUM_BINS)
        centres = _centres_of(k.clamp(0, NUM_BINS - 1), self.loc.dtype)
        energy = -0.5 * ((centres - self.loc.unsqueeze(-1)) / self.scale.unsqueeze(-1)).square()
        return torch.logsumexp(energy.masked_fill(~inside, -math.inf), dim=-1)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log P(value) = -(value - loc)^2 / (2 scale^2) - logsumexp_k(-(x_k - loc)^2 /
        (2 scale^2))`` per element (the normaliser by :meth:`log_normaliser`)."""
        if self._validate_args:
            _check_eight_bit(value, "the grid Gaussian")
            self._validate_sample(value)
        return -0.5 * ((value - self.loc) / self.scale).square() - self.log_normaliser()

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """Draws from the categorical over the 256 centres (inverse CDF of one uniform each)."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            cdf = self.logits.exp().cumsum(-1)  # (*batch_shape, 256)
            u = torch.rand(shape, generator=generator, device=self.loc.device, dtype=cdf.dtype)
            cdf = cdf.expand(*shape, NUM_BINS).contiguous()
            v = (u * cdf[..., -1]).unsqueeze(-1)  # first k with cdf_k > v: P(k) = p_k
            k = torch.searchsorted(cdf, v, right=True).clamp(max=NUM_BINS - 1)
            return _centres_of(k.squeeze(-1), self.loc.dtype)


class SignedBernoulli(Bernoulli):
    """A Bernoulli over {-1, +1}, the model scale of binarized images (pixel 0 or 255).

    ``P(x = 1) = p``; ``log_prob(x) = Bernoulli(p).log_prob((x + 1) / 2)``. It is the image of
    ``Bernoulli(p)`` under ``b -> 2b - 1``: mean ``2p - 1``, variance ``4p(1 - p)``, the same
    entropy and KL divergences.
    """

    support = plus_minus_one

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            _check_support(
                plus_minus_one,
                value,
                "the Bernoulli likelihood needs binarized data in {-1, +1} (pixels 0 or 255)",
                "neither -1 nor +1",
                "binarize first, e.g. torch.where(x > 0, 1.0, -1.0)",
            )
        logits, value = broadcast_all(self.logits, value)
        return -binary_cross_entropy_with_logits(logits, (value + 1.0) / 2.0, reduction="none")

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        return super().sample(sample_shape) * 2.0 - 1.0

    def enumerate_support(self, expand: bool = True) -> Tensor:
        return super().enumerate_support(expand) * 2.0 - 1.0

    @property
    def mean(self) -> Tensor:
        return 2.0 * self.probs - 1.0

    @property
    def variance(self) -> Tensor:
        return 4.0 * super().variance

    @property
    def mode(self) -> Tensor:
        return super().mode * 2.0 - 1.0


def _takes_a_generator(dist: Distribution) -> bool:
    """Whether ``dist.sample`` accepts ``generator=`` (the discretized masses of this module and
    of :mod:`genkit.logistic` do), found by its signature so this module imports none of them."""
    return "generator" in inspect.signature(dist.sample).parameters


def sample(
    dist: Distribution, sample_shape=torch.Size(), generator: torch.Generator | None = None
) -> Tensor:
    """``dist.sample(sample_shape)`` that draws its randomness from ``generator``.

    torch's ``Distribution.sample`` takes no generator; this covers the families genkit's
    decoders and priors use (``Normal``, ``Bernoulli``, any whose own ``sample`` takes a
    ``generator``, as the discretized ones here and in :mod:`genkit.logistic`, and
    ``Independent`` of them) so that ``model.sample(n, generator=g)`` is reproducible.
    """
    if generator is None:
        return dist.sample(sample_shape)
    if isinstance(dist, Independent):
        return sample(dist.base_dist, sample_shape, generator)
    if _takes_a_generator(dist):
        return dist.sample(sample_shape, generator=generator)
    shape = dist._extended_shape(sample_shape)
    if isinstance(dist, Normal):
        noise = torch.randn(
            shape, generator=generator, device=dist.loc.device, dtype=dist.loc.dtype
        )
        return (dist.loc.expand(shape) + dist.scale.expand(shape) * noise).detach()
    if isinstance(dist, Bernoulli):
        u = torch.rand(shape, generator=generator, device=dist.probs.device, dtype=dist.probs.dtype)
        draw = (u < dist.probs.expand(shape)).to(dist.probs.dtype)
        return draw * 2.0 - 1.0 if isinstance(dist, SignedBernoulli) else draw
    raise GenkitError(
        f"cannot sample {type(dist).__name__} with a generator; "
        "supported: Normal, Bernoulli, distributions whose own sample takes a generator "
        "(DiscretizedGaussian, GridGaussian, DiscretizedLogisticMixture, "
        "DiscretizedLogisticMixtureRGB) "
        "and Independent of them"
    )


def diagonal_normal(loc: Tensor, scale: Tensor, event_dims: int) -> Independent:
    """``N(loc, diag(scale^2))`` with the last ``event_dims`` dimensions as the event."""
    return Independent(Normal(loc, scale), event_dims)


def standard_normal(shape: tuple[int, ...], *, like: Tensor | None = None) -> Independent:
    """``N(0, I)`` over an event of ``shape`` on ``like``'s device and dtype."""
    zeros = torch.zeros(shape) if like is None else like.new_zeros(shape)
    return Independent(Normal(zeros, torch.ones_like(zeros)), len(shape))


#: Names moved to :mod:`genkit.logistic`, still importable from here for one release.
_MOVED_TO_LOGISTIC = frozenset(
    {"DiscretizedLogisticMixture", "DiscretizedLogisticMixtureRGB", "discretized_logistic_log_prob"}
)


def __getattr__(name: str) -> Any:
    """The old import path of the mixture of logistics, resolved lazily (PEP 562) so that this
    module never imports :mod:`genkit.logistic` at import time (that one imports this)."""
    if name in _MOVED_TO_LOGISTIC:
        warnings.warn(
            f"genkit.distributions.{name} has moved to genkit.logistic.{name}; "
            "the old path will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        from genkit import logistic

        return getattr(logistic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
