"""The discretized mixture of logistics: PixelCNN++'s likelihood for 8-bit images
(Salimans et al. 2017), the decoder of NVAE and VDVAE.

A mass over the 256 bins of [-1, 1] (``x = k / 127.5 - 1``, the scale of
:mod:`genkit.distributions`): :func:`discretized_logistic_log_prob` for one logistic,
:class:`DiscretizedLogisticMixture` for a mixture per element (each channel on its own) and
:class:`DiscretizedLogisticMixtureRGB` for PixelCNN++'s coupled RGB pixels.

Parameter layout: the K components are last. Per element, ``logits``, ``loc``, ``scale``:
``(*batch_shape, K)``. For RGB, ``logits: (*batch_shape, H, W, K)``, one mixture per pixel
shared by its channels, and ``loc``, ``scale``, ``coeffs`` (alpha, beta, gamma):
``(*batch_shape, 3, H, W, K)``. :mod:`genkit.likelihoods` cuts a network's output into these.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from einops import reduce
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.utils import broadcast_all
from torch.nn.functional import logsigmoid

from genkit.distributions import (
    BIN_HALF_WIDTH,
    _bin_centres,
    _check_eight_bit,
    eight_bit,
    quantize,
)
from genkit.errors import InvalidParameterError

#: Bins scored per pass when a mixture is evaluated on all 256 (``mode``, ``mean``): each pass
#: holds ``chunk * K`` values per element.
_BIN_CHUNK = 16


def discretized_logistic_log_prob(x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """Element-wise ``log P(x)`` of a logistic ``(loc, s)`` discretized into the 256 bins of
    [-1, 1]. With ``u = (x + 1/255 - loc) / s`` and ``l = (x - 1/255 - loc) / s``,
    ``P(x) = sigmoid(u) - sigmoid(l)`` for interior bins, and the edge bins are open:
    ``P(-1) = sigmoid(u)``, ``P(1) = 1 - sigmoid(l) = sigmoid(-l)``.

    The difference is exactly a product, ``sigmoid(u) - sigmoid(l) = sigmoid(u) sigmoid(-l)
    (1 - e^{-w})`` with ``w = u - l = 2 / (255 s)``, so::

        log P(x) = log sigmoid(u) + log sigmoid(-l) + log(-expm1(-w))

    with ``w`` formed from ``s``, not as ``u - l``. Nothing nearly equal is subtracted, in either
    tail nor for bins narrow against ``s``. That is why there is no midpoint rule here, unlike
    :func:`discretized_gaussian_log_prob`, whose CDF difference cancels there: the midpoint rule is
    this formula's limit (``log sigmoid(z) + log sigmoid(-z)`` is the logistic log-density), with
    a relative error of order ``w^2`` that the exact form does not make. Values and gradients stay
    finite in float32 for log-scales down to -7 and locs far outside [-1, 1]. Reduces nothing.
    """
    inv_s = torch.exp(-log_scale)
    log_cdf_upper = logsigmoid((x - loc + BIN_HALF_WIDTH) * inv_s)  # log sigmoid(u)
    log_sf_lower = logsigmoid((loc - x + BIN_HALF_WIDTH) * inv_s)  # log sigmoid(-l)
    log_width = torch.log(-torch.expm1(-2.0 * BIN_HALF_WIDTH * inv_s))  # log(1 - e^-w)
    return torch.where(
        x < -1.0 + BIN_HALF_WIDTH,
        log_cdf_upper,
        torch.where(
            x > 1.0 - BIN_HALF_WIDTH, log_sf_lower, log_cdf_upper + log_sf_lower + log_width
        ),
    )


def _pick_component(logits: Tensor, shape: torch.Size, generator: torch.Generator | None) -> Tensor:
    """Component indices ``(*shape, 1)`` drawn with probabilities ``softmax(logits)`` (``logits``
    broadcastable to ``(*shape, K)``) by the Gumbel-max trick:
    ``argmax_k logits_k - log(-log u_k)``, ``u_k ~ U(0, 1)``."""
    logits = logits.expand((*shape, logits.shape[-1]))
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    return (logits - torch.log(-torch.log(u))).argmax(-1, keepdim=True)


def _logistic_noise(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard logistic draws ``logit(u)``, ``u ~ U(0, 1)``, on ``like``'s device and dtype."""
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    return torch.logit(u)


class DiscretizedLogisticMixture(Distribution):
    """A mixture of K logistics discretized into the 256 bins of 8-bit data on [-1, 1]::

        P(x) = sum_k pi_k [sigmoid((x + 1/255 - mu_k) / s_k) - sigmoid((x - 1/255 - mu_k) / s_k)]

    with ``pi = softmax(logits)`` and the edge bins open (:func:`discretized_logistic_log_prob`);
    ``log P(x) = logsumexp_k(log pi_k + log P_k(x))``. PixelCNN++'s likelihood with each channel
    on its own (:class:`DiscretizedLogisticMixtureRGB` couples the channels of RGB pixels).

    ``logits``, ``loc``, ``scale``: ``(*batch_shape, K)``, the components last as in
    ``torch.distributions.MixtureSameFamily``. Element-wise (``event_shape == ()``); wrap in
    ``Independent`` to sum over pixels. Sampling picks a component, draws its logistic and snaps
    it to its bin, which is exact for this mass function.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "logits": constraints.real_vector,
        "loc": constraints.real_vector,
        "scale": constraints.independent(constraints.positive, 1),
    }
    support = eight_bit
    has_rsample = False
    has_enumerate_support = True

    def __init__(
        self, logits: Tensor, loc: Tensor, scale: Tensor, validate_args: bool | None = None
    ) -> None:
        self.logits, self.loc, self.scale = broadcast_all(logits, loc, scale)
        if self.loc.dim() == 0:
            raise InvalidParameterError(
                "the discretized logistic mixture needs its components in the last dimension "
                "of logits, loc and scale: (*batch_shape, K), got scalars"
            )
        super().__init__(self.loc.shape[:-1], validate_args=validate_args)

    @classmethod
    def from_log_scale(
        cls, logits: Tensor, loc: Tensor, log_scale: Tensor
    ) -> DiscretizedLogisticMixture:
        return cls(logits, loc, torch.exp(log_scale))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogisticMixture, _instance)
        shape = torch.Size(batch_shape) + self.loc.shape[-1:]
        new.logits, new.loc, new.scale = (
            t.expand(shape) for t in (self.logits, self.loc, self.scale)
        )
        super(DiscretizedLogisticMixture, new).__init__(
            torch.Size(batch_shape), validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def enumerate_support(self, expand: bool = True) -> Tensor:
        """The 256 bin centres ``k / 127.5 - 1``, shape ``(256, *batch_shape)`` (or
        ``(256, 1, ..., 1)`` without ``expand``)."""
        values = _bin_centres(self.loc, len(self.batch_shape))
        return values.expand((-1, *self.batch_shape)) if expand else values

    def log_prob(self, value: Tensor) -> Tensor:
        """``log P(value)`` per element: ``logsumexp_k(log_softmax(logits)_k + log P_k)``."""
        if self._validate_args:
            _check_eight_bit(value, "the discretized logistic mixture")
            self._validate_sample(value)
        return self._log_prob(value)

    def _log_prob(self, value: Tensor) -> Tensor:
        log_p = discretized_logistic_log_prob(value.unsqueeze(-1), self.loc, torch.log(self.scale))
        return torch.logsumexp(torch.log_softmax(self.logits, -1) + log_p, -1)

    def _all_bins(self) -> tuple[Tensor, Tensor]:
        """The bin centres ``(256, 1, ..., 1)`` and their ``log P``: ``(256, *batch_shape)``."""
        bins = self.enumerate_support(expand=False)
        return bins, torch.cat([self._log_prob(v) for v in bins.split(_BIN_CHUNK)])

    @property
    def mode(self) -> Tensor:
        """The most probable bin, found by scoring all 256 (a mixture's has no closed form)."""
        bins, log_p = self._all_bins()
        return bins.expand_as(log_p).gather(0, log_p.argmax(0, keepdim=True)).squeeze(0)

    @property
    def mean(self) -> Tensor:
        """``sum_x x P(x)`` over the 256 bins (the edge bins hold the tails: it lies in [-1, 1])."""
        bins, log_p = self._all_bins()
        return (bins * log_p.exp()).sum(0)

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            k = _pick_component(self.logits, shape, generator)
            loc, scale = (
                t.expand(k.shape[:-1] + t.shape[-1:]).gather(-1, k).squeeze(-1)
                for t in (self.loc, self.scale)
            )
            return quantize(loc + scale * _logistic_noise(shape, generator, loc))


class DiscretizedLogisticMixtureRGB(Distribution):
    """PixelCNN++'s mixture over RGB pixels (Salimans et al. 2017, sec. 2.2): one mixture per
    pixel, shared by its channels, whose components move the mean of G linearly with R and that
    of B with R and G::

        P(r, g, b) = sum_k pi_k L(r; mu_kR, s_kR) L(g; mu_kG + alpha_k r, s_kG)
                                L(b; mu_kB + beta_k r + gamma_k g, s_kB)

    with ``L`` the discretized logistic mass of :func:`discretized_logistic_log_prob` and
    ``pi = softmax(logits)``. The channels of a pixel are not independent, so the event holds the
    channel dimension, and with it the pixels after it: a value is ``(*batch_shape, 3, H, W)``
    and ``event_shape == (3, H, W)`` (``Independent`` has nothing left to reinterpret for an
    image). ``logits``: ``(*batch_shape, H, W, K)``; ``loc``, ``scale`` and ``coeffs`` (alpha,
    beta, gamma along the channel dimension): ``(*batch_shape, 3, H, W, K)``.

    Sampling draws R, then G given the sampled bin of R, then B: exact for this mass function.
    It has no ``mode`` (the joint one takes 256^3 evaluations per pixel) nor ``mean``.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "logits": constraints.real,
        "loc": constraints.real,
        "scale": constraints.positive,
        "coeffs": constraints.real,
    }
    support = constraints.independent(eight_bit, 3)
    has_rsample = False

    def __init__(
        self,
        logits: Tensor,
        loc: Tensor,
        scale: Tensor,
        coeffs: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        self.loc, self.scale, self.coeffs = broadcast_all(loc, scale, coeffs)
        if self.loc.dim() < 4 or self.loc.shape[-4] != 3:
            raise InvalidParameterError(
                "the RGB discretized logistic mixture needs loc, scale and coeffs of shape "
                f"(*batch_shape, 3, H, W, K), got {tuple(self.loc.shape)}"
            )
        self.logits = logits.expand(self.loc.shape[:-4] + self.loc.shape[-3:])
        super().__init__(self.loc.shape[:-4], self.loc.shape[-4:-1], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogisticMixtureRGB, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale, new.coeffs = (
            t.expand(batch_shape + t.shape[-4:]) for t in (self.loc, self.scale, self.coeffs)
        )
        new.logits = self.logits.expand(batch_shape + self.logits.shape[-3:])
        super(DiscretizedLogisticMixtureRGB, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def coupled_loc(self, value: Tensor) -> Tensor:
        """The components' means given the pixels ``value: (..., 3, H, W)``:
        ``(mu_R, mu_G + alpha r, mu_B + beta r + gamma g)``, shape ``(..., 3, H, W, K)``."""
        r, g, _ = value.unsqueeze(-1).unbind(-4)
        mu_r, mu_g, mu_b = self.loc.unbind(-4)
        alpha, beta, gamma = self.coeffs.unbind(-4)
        means = torch.broadcast_tensors(mu_r, mu_g + alpha * r, mu_b + beta * r + gamma * g)
        return torch.stack(means, -4)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log P(value)`` of whole images: ``(*sample_shape, *batch_shape)``."""
        if self._validate_args:
            _check_eight_bit(value, "the RGB discretized logistic mixture")
            self._validate_sample(value)
        log_p = discretized_logistic_log_prob(
            value.unsqueeze(-1), self.coupled_loc(value), torch.log(self.scale)
        )  # (..., 3, H, W, K)
        joint = torch.log_softmax(self.logits, -1) + reduce(
            log_p, "... c h w k -> ... h w k", "sum"
        )
        return reduce(torch.logsumexp(joint, -1), "... h w -> ...", "sum")

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        shape = self._extended_shape(sample_shape)  # (..., 3, H, W)
        with torch.no_grad():
            k = _pick_component(self.logits, shape[:-3] + shape[-2:], generator).unsqueeze(-4)
            k = k.expand((*shape, 1))  # one component per pixel, for all its channels
            loc, scale, coeffs = (
                t.expand((*shape, t.shape[-1])).gather(-1, k).squeeze(-1)
                for t in (self.loc, self.scale, self.coeffs)
            )
            free = loc + scale * _logistic_noise(shape, generator, loc)  # before the coupling
            (free_r, free_g, free_b), (alpha, beta, gamma) = free.unbind(-3), coeffs.unbind(-3)
            r = quantize(free_r)
            g = quantize(free_g + alpha * r)
            return torch.stack([r, g, quantize(free_b + beta * r + gamma * g)], -3)
