"""Decoder likelihoods ``p(x | .)`` built from a network's raw output.

Every image model in genkit ends in one of these, so all report log-likelihoods on one scale:
``discretized_gaussian`` (the default for images: a mass over the 256 bins of 8-bit data),
``discretized_logistic_mixture`` (PixelCNN++'s mass over the same bins, as in NVAE and VDVAE),
``bernoulli`` (binarized images, pixels in {-1, +1}) and ``gaussian`` (a density, for
continuous vector data).

Layout of the network output ``params: (B, P, *rest)`` for data ``(C, *rest)`` (images:
``rest = (H, W)``; an MLP's ``(B, P * H * W)`` is viewed as ``(B, P, H, W)``), with
``P = num_outputs(kind, C, K)``: consecutive blocks along dim 1, one per parameter, each block
ordered ``(k c)`` (component-major, then channel)::

    discretized_gaussian, gaussian   [loc | log_scale]                      P = 2C
    bernoulli                        [logits]                               P = C
    discretized_logistic_mixture     [logits | loc | log_scale]             P = 3KC
      with C = 3 (RGB, coupled)      [logits (K) | loc | log_scale | coeffs]  P = 10K

For RGB images the mixture is PixelCNN++'s: one set of K logits per pixel shared by the three
channels, and per component three coefficients (through ``tanh``) making the mean of G linear
in R and that of B in R and G (:class:`~genkit.logistic.DiscretizedLogisticMixtureRGB`).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from genkit.distributions import DiscretizedGaussian, SignedBernoulli
from genkit.errors import InvalidParameterError
from genkit.logistic import DiscretizedLogisticMixture, DiscretizedLogisticMixtureRGB

LIKELIHOODS: tuple[str, ...] = (
    "discretized_gaussian",
    "discretized_logistic_mixture",
    "bernoulli",
    "gaussian",
)
_PER_CHANNEL = {"discretized_gaussian": 2, "bernoulli": 1, "gaussian": 2}
MIXTURE = "discretized_logistic_mixture"
#: Mixture components K by default: 10, as NVAE on CIFAR-10 (PixelCNN++ uses 5).
DEFAULT_COMPONENTS = 10
#: Smallest log-scale: far below the bin half-width (1/255 ~ e^-5.5), so a sharp decoder can
#: put almost all its mass in one bin, without letting the scale collapse to 0.
MIN_LOG_SCALE = -7.0
MAX_LOG_SCALE = 7.0


def default_likelihood(data_shape: tuple[int, ...]) -> str:
    """``discretized_gaussian`` for images ``(C, H, W)``, ``gaussian`` for vectors ``(D,)``."""
    return "discretized_gaussian" if len(data_shape) == 3 else "gaussian"


def resolve(kind: str, data_shape: tuple[int, ...], model: str | None = None) -> str:
    """``"auto"`` -> :func:`default_likelihood`; else check that ``kind`` is known and, for the
    logistic mixture (a mass over 8-bit pixels), that the data are images. ``model`` names the
    model in the error."""
    if kind == "auto":
        return default_likelihood(data_shape)
    if kind not in LIKELIHOODS:
        raise InvalidParameterError(
            f"unknown likelihood '{kind}'; choose from {', '.join(LIKELIHOODS)}"
        )
    if kind == MIXTURE and len(data_shape) != 3:
        who = f"model '{model}': " if model else ""
        raise InvalidParameterError(
            f"{who}likelihood='{MIXTURE}' is a mass over 8-bit pixels and needs image data "
            f"(C, H, W), got data_shape {data_shape}; use 'gaussian' for vectors"
        )
    return kind


def num_outputs(kind: str, channels: int, components: int = DEFAULT_COMPONENTS) -> int:
    """``P``, the outputs per position the network gives for ``kind`` on data of ``channels``
    channels (a conv head's channels; for vectors ``(D,)`` pass ``channels=D``): ``2C``, ``C``,
    or for the mixture of ``K = components`` ``3KC``, and ``10K`` when ``C = 3`` (coupled RGB)."""
    if kind == MIXTURE:
        return 10 * components if channels == 3 else 3 * components * channels
    return _PER_CHANNEL[kind] * channels


def _scale(log_scale: Tensor) -> Tensor:
    return torch.exp(log_scale.clamp(min=MIN_LOG_SCALE, max=MAX_LOG_SCALE))


def likelihood(
    kind: str, params: Tensor, event_dims: int, *, components: int = DEFAULT_COMPONENTS
) -> Distribution:
    """``p(x | .)`` from ``params: (B, P, ...)`` laid out as the module docstring shows
    (``P = num_outputs(kind, C, components)``); the last ``event_dims`` dimensions form the
    event (so ``log_prob`` is ``(B,)``). Log-scales are clamped to
    ``[MIN_LOG_SCALE, MAX_LOG_SCALE]``; ``components`` counts only for the mixture.

    Half-precision ``params`` (a network run under bf16 autocast) are taken to float32 first:
    bf16 cannot hold the 256 bin centres apart (its spacing near 1 is one bin), so the mass
    function, its samples and its mode are computed in float32 at least. The cast cannot bring
    back what a bf16 output layer rounded away, so decoders compute ``params`` with a float32
    head (:class:`genkit.nets.Float32Head`), as the built-in ones do."""
    if params.dtype in (torch.float16, torch.bfloat16):
        params = params.float()
    if kind == MIXTURE:
        return _logistic_mixture(params, event_dims, components)
    if kind == "bernoulli":
        return Independent(SignedBernoulli(logits=params), event_dims)
    loc, log_scale = torch.chunk(params, 2, dim=1)
    if kind == "discretized_gaussian":
        return Independent(DiscretizedGaussian(loc, _scale(log_scale)), event_dims)
    return Independent(Normal(loc, _scale(log_scale)), event_dims)


def _logistic_mixture(params: Tensor, event_dims: int, k: int) -> Distribution:
    """The mixture of ``k`` components from ``params: (B, P, ...)``: coupled RGB when the
    params are an image's with ``P = 10k``, else independent channels with ``P = 3kC``."""
    p = params.shape[1]
    if params.dim() == 4 and p == num_outputs(MIXTURE, 3, k):
        logits = rearrange(params[:, :k], "b k h w -> b h w k")
        loc, log_scale, coeffs = rearrange(
            params[:, k:], "b (p k c) h w -> p b c h w k", p=3, k=k, c=3
        )
        rgb = DiscretizedLogisticMixtureRGB(logits, loc, _scale(log_scale), torch.tanh(coeffs))
        return Independent(rgb, event_dims - 3)  # its event is already (3, H, W)
    if p % (3 * k) or (params.dim() == 4 and p == 9 * k):
        raise InvalidParameterError(
            f"likelihood '{MIXTURE}' with {k} components needs 3*{k}*C network outputs per "
            f"position for C channels, {10 * k} (10*{k}) for RGB images (C = 3), got {p}"
        )
    logits, loc, log_scale = rearrange(params, "b (p k c) ... -> p b c ... k", p=3, k=k)
    return Independent(DiscretizedLogisticMixture(logits, loc, _scale(log_scale)), event_dims)
