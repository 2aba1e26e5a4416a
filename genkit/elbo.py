"""The ELBO, its named terms, and the estimators that compute it.

The lecture's decomposition for one latent (``seeds/000``, "ELBO again")::

    ELBO = E_{q(z|x)}[log p(x|z)] - KL(q(z|x) || p(z))
         =       reconstruction    +    prior_matching

Each estimator is an :class:`ELBO` object taking a model and a batch and returning
:class:`ELBOTerms`. The Markov-chain (``consistency``) and VDM (``denoising_matching``)
estimators live beside their machinery; plugins add more through ``register_estimators``.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar

import attrs
import torch
from einops import reduce
from torch import Tensor
from torch.distributions import kl_divergence

from genkit.errors import IncompatibleEstimatorError, InvalidParameterError
from genkit.model import check_count

if TYPE_CHECKING:
    from genkit.model import LatentVariableModel

LN2 = math.log(2.0)


def _frozen_mapping(value: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class ELBOTerms:
    """Per-sample ELBO terms in nats.

    ``terms``: each of shape ``(B,)``, the signed contribution it makes, so that
    ``total = sum(terms.values())`` is the ELBO of each sample. ``extras``: per-sample values
    that are not part of the sum (per-level KLs, surrogate losses such as DDPM's L_simple),
    signed like terms (higher is better) so the trainer may weight them into its objective.
    ``num_dims``: ``D``, the number of data dimensions, for bits/dim. ``nfe``: the network
    evaluations per example the estimate cost (a forward pass of a network on one example
    counts one; k-diffusion reports its likelihoods with this count too), or ``None`` when the
    estimator does not say.
    """

    terms: Mapping[str, Tensor] = attrs.field(converter=_frozen_mapping)
    num_dims: int = attrs.field()
    extras: Mapping[str, Tensor] = attrs.field(factory=dict, converter=_frozen_mapping)
    nfe: float | None = attrs.field(default=None)

    @terms.validator
    def _check_terms(self, _attribute: attrs.Attribute, value: Mapping[str, Tensor]) -> None:
        if not value:
            raise InvalidParameterError("ELBOTerms needs at least one term")
        shapes = {name: tuple(t.shape) for name, t in value.items()}
        if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
            raise InvalidParameterError(
                f"every ELBO term must have the same shape (batch,); got {shapes}"
            )

    @num_dims.validator
    def _check_num_dims(self, _attribute: attrs.Attribute, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InvalidParameterError(
                f"ELBOTerms needs num_dims, the number of data dimensions D, as an int >= 1; "
                f"got {value!r}"
            )

    @extras.validator
    def _check_extras(self, _attribute: attrs.Attribute, value: Mapping[str, Tensor]) -> None:
        batch = tuple(next(iter(self.terms.values())).shape)
        wrong = {name: tuple(t.shape) for name, t in value.items() if tuple(t.shape) != batch}
        if wrong:
            raise InvalidParameterError(
                f"every ELBO extra must have the terms' shape {batch}; got {wrong}"
            )

    @nfe.validator
    def _check_nfe(self, _attribute: attrs.Attribute, value: float | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0
        ):
            raise InvalidParameterError(
                f"ELBOTerms.nfe must be None or a number >= 0 (network evaluations per "
                f"example), got {value!r}"
            )

    @property
    def total(self) -> Tensor:
        """The ELBO of each sample, ``sum(terms.values())``, shape ``(B,)``, in nats."""
        return torch.stack(list(self.terms.values())).sum(0)

    def bits_per_dim(self) -> Tensor:
        """``-ELBO / (D ln 2)`` per sample: an upper bound on the model's bits/dim."""
        return -self.total / (self.num_dims * LN2)

    def objective(self, weights: Mapping[str, float] | None = None) -> Tensor:
        """The per-sample loss to minimise: ``-(sum_k w_k terms_k + sum_j w_j extras_j)``.

        Terms default to weight 1 (the ELBO itself), extras to 0. A weight for a name that
        is neither a term nor an extra is an :class:`InvalidParameterError`.
        """
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.terms) - set(self.extras))
        if unknown:
            valid = ", ".join([*self.terms, *self.extras])
            raise InvalidParameterError(
                f"objective weight for unknown term '{unknown[0]}'; this model's terms are: {valid}"
            )
        parts = [weights.get(k, 1.0) * v for k, v in self.terms.items()]
        parts += [weights[k] * v for k, v in self.extras.items() if weights.get(k, 0.0) != 0.0]
        return -torch.stack(parts).sum(0)

    def mean(self) -> dict[str, float]:
        """Batch means of every term, extra, the total and bits/dim, as floats (for logging)."""
        out = {k: v.detach().mean().item() for k, v in self.terms.items()}
        out.update({k: v.detach().mean().item() for k, v in self.extras.items()})
        out["elbo"] = self.total.detach().mean().item()
        out["bits_per_dim"] = self.bits_per_dim().detach().mean().item()
        return out


class ELBO(abc.ABC):
    """An estimator of the ELBO: ``estimator(model, x) -> ELBOTerms``.

    Estimators hold their own settings (number of samples, importance weights, ...) and no
    parameters of the model. One that cannot work with ``model`` raises
    :class:`~genkit.errors.IncompatibleEstimatorError` saying what is missing.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def __call__(self, model: LatentVariableModel, x: Tensor) -> ELBOTerms:
        """The ELBO of each sample of ``x: (B, *data_shape)``."""


def _single_latent_parts(model: LatentVariableModel, estimator: str):
    """``(encoder, decoder, prior)`` of a one-latent model. A chain of several latents (a model
    or its ``.chain`` with ``num_latents > 1``) is refused: there ``prior`` is ``p(z_T)``, not
    the prior of the encoder's ``z_1``, and the value would bound nothing."""
    chain = getattr(model, "chain", None)
    levels = getattr(model if chain is None else chain, "num_latents", 1)
    if isinstance(levels, int) and levels > 1:
        raise IncompatibleEstimatorError(
            f"estimator '{estimator}' needs a model with one latent; {type(model).__name__} is a "
            f"chain of {levels} latents: use the estimator 'consistency'"
        )
    for part in ("encoder", "decoder", "prior"):
        if not callable(getattr(model, part, None)):
            raise IncompatibleEstimatorError(
                f"estimator '{estimator}' needs a model with callable encoder, decoder and prior; "
                f"{type(model).__name__} has no usable '{part}'"
            )
    return model.encoder, model.decoder, model.prior


def reconstruction(decoder, x: Tensor, z: Tensor) -> Tensor:
    """``E_{q(z|x)}[log p(x|z)] ~= (1/S) sum_s log p(x | z_s)`` with ``z: (S, B, ...)`` from q.

    Returns ``(B,)``.
    """
    s, b = z.shape[:2]
    z_flat = z.reshape(s * b, *z.shape[2:])
    x_rep = x.unsqueeze(0).expand(s, *x.shape).reshape(s * b, *x.shape[1:])
    log_px = decoder(z_flat).log_prob(x_rep)  # (S*B,)
    return reduce(log_px, "(s b) -> b", "mean", s=s)


def prior_matching(q_z, p_z, z: Tensor | None = None) -> Tensor:
    """``-KL(q(z|x) || p(z))``, analytic through ``torch.distributions.kl_divergence`` where
    torch knows the pair, else the Monte-Carlo ``mean_s[log p(z_s) - log q(z_s|x)]``.

    Returns ``(B,)``.
    """
    try:
        return -kl_divergence(q_z, p_z)
    except NotImplementedError:
        if z is None:
            raise
        return reduce(p_z.log_prob(z) - q_z.log_prob(z), "s b -> b", "mean")


class StandardELBO(ELBO):
    """The lecture's VAE ELBO for any model with one latent: ``reconstruction`` by ``samples``
    Monte-Carlo draws of the reparameterised ``z ~ q(z|x)``, ``prior_matching`` analytic."""

    name = "elbo"

    def __init__(self, samples: int = 1) -> None:
        self.samples = check_count("samples", samples)

    def __call__(self, model: LatentVariableModel, x: Tensor) -> ELBOTerms:
        encoder, decoder, prior = _single_latent_parts(model, self.name)
        q_z = encoder(x)
        z = q_z.rsample((self.samples,))  # (S, B, ...)
        terms = {
            "reconstruction": reconstruction(decoder, x, z),
            "prior_matching": prior_matching(q_z, prior(), z),
        }
        return ELBOTerms(terms=terms, num_dims=model.num_dims, nfe=1.0 + self.samples)


class IWAE(ELBO):
    """The importance-weighted bound of Burda et al. (2016) with ``k`` samples::

        L_k = E[log (1/k) sum_i p(x, z_i) / q(z_i | x)],   z_i ~ q(z | x)

    ``L_1`` is the ELBO and ``L_k`` rises towards ``log p(x)`` with ``k``. It is one term,
    ``importance_weighted``, since the bound does not split into the lecture's parts.
    """

    name = "iwae"

    def __init__(self, k: int = 16) -> None:
        self.k = check_count("k", k)

    def __call__(self, model: LatentVariableModel, x: Tensor) -> ELBOTerms:
        encoder, decoder, prior = _single_latent_parts(model, self.name)
        q_z = encoder(x)
        z = q_z.rsample((self.k,))  # (k, B, ...)
        log_px = decoder(z.flatten(0, 1)).log_prob(x.repeat(self.k, *[1] * (x.dim() - 1)))
        log_w = log_px.view(self.k, -1) + prior().log_prob(z) - q_z.log_prob(z)  # (k, B)
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.k)
        return ELBOTerms(
            terms={"importance_weighted": bound}, num_dims=model.num_dims, nfe=1.0 + self.k
        )
