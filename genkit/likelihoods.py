"""Decoder likelihoods ``p(x | .)`` built from a network's raw output.

Every image model in genkit ends in one of these, so all report log-likelihoods on one scale:
``discretized_gaussian`` (the default for images: a mass over the 256 bins of 8-bit data),
``bernoulli`` (binarized images, pixels in {-1, +1}) and ``gaussian`` (a density, for
continuous vector data).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from genkit.distributions import DiscretizedGaussian, SignedBernoulli
from genkit.errors import InvalidParameterError

LIKELIHOODS: tuple[str, ...] = ("discretized_gaussian", "bernoulli", "gaussian")
_NUM_PARAMS = {"discretized_gaussian": 2, "bernoulli": 1, "gaussian": 2}
#: Smallest log-scale: far below the bin half-width (1/255 ~ e^-5.5), so a sharp decoder can
#: put almost all its mass in one bin, without letting the scale collapse to 0.
MIN_LOG_SCALE = -7.0


def default_likelihood(data_shape: tuple[int, ...]) -> str:
    """``discretized_gaussian`` for images ``(C, H, W)``, ``gaussian`` for vectors ``(D,)``."""
    return "discretized_gaussian" if len(data_shape) == 3 else "gaussian"


def resolve(kind: str, data_shape: tuple[int, ...]) -> str:
    """``"auto"`` -> :func:`default_likelihood`; else check that ``kind`` is known."""
    if kind == "auto":
        return default_likelihood(data_shape)
    if kind not in LIKELIHOODS:
        raise InvalidParameterError(
            f"unknown likelihood '{kind}'; choose from {', '.join(LIKELIHOODS)}"
        )
    return kind


def num_params(kind: str) -> int:
    """How many channels per data channel the network must output for ``kind``."""
    return _NUM_PARAMS[kind]


def likelihood(kind: str, params: Tensor, event_dims: int) -> Distribution:
    """``p(x | .)`` from ``params: (B, P*C, ...)``, split into ``P = num_params(kind)`` along
    dim 1; the last ``event_dims`` dimensions form the event (so ``log_prob`` is ``(B,)``).

    Half-precision ``params`` (a network run under bf16 autocast) are taken to float32 first:
    bf16 cannot hold the 256 bin centres apart (its spacing near 1 is one bin), so the mass
    function, its samples and its mode are computed in float32 at least. The cast cannot bring
    back what a bf16 output layer rounded away, so decoders compute ``params`` with a float32
    head (:class:`genkit.nets.Float32Head`), as the built-in ones do."""
    if params.dtype in (torch.float16, torch.bfloat16):
        params = params.float()
    if kind == "bernoulli":
        return Independent(SignedBernoulli(logits=params), event_dims)
    loc, log_scale = torch.chunk(params, 2, dim=1)
    log_scale = log_scale.clamp(min=MIN_LOG_SCALE, max=7.0)
    if kind == "discretized_gaussian":
        return Independent(DiscretizedGaussian(loc, torch.exp(log_scale)), event_dims)
    return Independent(Normal(loc, torch.exp(log_scale)), event_dims)
