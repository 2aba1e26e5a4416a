"""The free-bits objective (Kingma et al. 2016, "Improved Variational Inference with Inverse
Autoregressive Flow", eq. 15) as an extra beside the true ELBO.

Early in training a VAE can set ``q(z|x) = p(z)`` ("posterior collapse"): the KL is then 0 and
the latent unused. Free bits gives each group ``j`` of latent dimensions ``lambda`` nats that
cost nothing: the KL part of the loss is ``sum_j max(lambda, KL_j)``, flat (no gradient) where a
group's KL is under ``lambda``::

    free_bits_prior_matching = -sum_j max(lambda, E_{x in batch}[KL_j(x)])     (per="batch")
                             = -sum_j max(lambda, KL_j(x))                      (per="sample")

The terms stay the lecture's ELBO, computed as genkit's ``elbo`` estimator computes them (same
draws, same values), so the ELBO that is logged and reported is still the true bound::

    reconstruction = mean_s log p(x | z_s),  prior_matching = -KL(q(z|x) || p(z))

Train on the surrogate with the objective weights
``{"prior_matching": 0, "free_bits_prior_matching": 1}`` (see ``ELBOTerms.objective``).
"""

from __future__ import annotations

import math
import numbers

import torch
from einops import reduce
from torch import Tensor
from torch.distributions import Independent, kl_divergence

import genkit
from genkit.elbo import prior_matching, reconstruction
from genkit.model import check_count

PER = ("batch", "sample")


def _check_free_nats(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise genkit.InvalidParameterError(
            f"estimator 'free_bits': free_nats must be a finite number >= 0 (nats per group), "
            f"got {value!r}"
        )
    return float(value)


def _one_latent_parts(model: genkit.LatentVariableModel, estimator: str):
    """``(encoder, decoder, prior)`` of a model with one latent, or an
    :class:`~genkit.IncompatibleEstimatorError` saying what is missing. A Markov chain of
    several latents (``num_latents > 1`` on the model or its ``.chain``) is refused: its
    ``prior`` is ``p(z_T)``, not the prior of the encoder's ``z_1``."""
    chain = getattr(model, "chain", None)
    levels = getattr(model if chain is None else chain, "num_latents", 1)
    if isinstance(levels, int) and levels > 1:
        raise genkit.IncompatibleEstimatorError(
            f"estimator '{estimator}' needs a model with one latent; {type(model).__name__} is a "
            f"chain of {levels} latents"
        )
    for part in ("encoder", "decoder", "prior"):
        if not callable(getattr(model, part, None)):
            raise genkit.IncompatibleEstimatorError(
                f"estimator '{estimator}' needs a model with callable encoder, decoder and prior; "
                f"{type(model).__name__} has no usable '{part}'"
            )
    return model.encoder, model.decoder, model.prior


def kl_per_dimension(q_z, p_z, estimator: str) -> Tensor:
    """``KL(q(z_l|x) || p(z_l))`` per latent dimension, ``(B, L)``, analytic: both must be
    ``Independent`` over a vector ``z: (L,)`` with a KL that torch knows for their factors."""
    factorised = all(
        isinstance(d, Independent) and len(d.event_shape) == 1 and d.reinterpreted_batch_ndims == 1
        for d in (q_z, p_z)
    )
    try:
        if factorised:
            return kl_divergence(q_z.base_dist, p_z.base_dist)
    except NotImplementedError:
        pass
    raise genkit.IncompatibleEstimatorError(
        f"estimator '{estimator}' with groups > 1 needs q(z|x) and p(z) that factorise over the "
        f"latent dimensions with an analytic KL; got {type(q_z).__name__} and "
        f"{type(p_z).__name__} (a mixture prior does not factorise): use groups=1"
    )


class FreeBitsELBO(genkit.ELBO):
    """The ELBO (``reconstruction``, ``prior_matching``) plus the extra
    ``free_bits_prior_matching = -sum_j max(free_nats, KL_j)``.

    :param free_nats: ``lambda``, the nats each group may use for free (>= 0).
    :param per: ``batch`` (Kingma et al.: the max of the batch-mean KL; each sample's extra is
        ``-KL_j(x)`` where the group's batch mean is over ``lambda``, else ``-lambda``, so the
        batch mean is ``-sum_j max(lambda, mean KL_j)``) or ``sample`` (the max per sample).
    :param groups: ``G``, the latent vector split into G equal groups of dimensions; ``1`` takes
        the KL of the whole latent (the only choice for a mixture prior, whose KL is a Monte-Carlo
        estimate); ``G > 1`` needs a prior that factorises (the ``vae``'s ``N(0, I)``).
    :param samples: Monte-Carlo draws of ``z ~ q(z|x)``, as for the ``elbo`` estimator.
    """

    name = "free_bits"

    def __init__(
        self, free_nats: float = 1.0, per: str = "batch", groups: int = 1, samples: int = 1
    ) -> None:
        self.free_nats = _check_free_nats(free_nats)
        if per not in PER:
            raise genkit.InvalidParameterError(
                f"estimator 'free_bits': per must be one of {', '.join(PER)}, got {per!r}"
            )
        self.per = per
        self.groups = check_count("groups", groups)
        self.samples = check_count("samples", samples)

    def __call__(self, model: genkit.LatentVariableModel, x: Tensor) -> genkit.ELBOTerms:
        encoder, decoder, prior = _one_latent_parts(model, self.name)
        # the steps of genkit's StandardELBO, in its order, so the same seed gives the same terms
        q_z = encoder(x)
        z = q_z.rsample((self.samples,))  # (S, B, L)
        p_z = prior()
        terms = {
            "reconstruction": reconstruction(decoder, x, z),
            "prior_matching": prior_matching(q_z, p_z, z),
        }
        extras = {"free_bits_prior_matching": -self.floored_kl(q_z, p_z, terms["prior_matching"])}
        return genkit.ELBOTerms(terms=terms, num_dims=model.num_dims, extras=extras)

    def floored_kl(self, q_z, p_z, prior_matching_term: Tensor) -> Tensor:
        """``sum_j max(lambda, KL_j)`` per sample, ``(B,)`` (with ``per="batch"`` its batch mean
        is the floored batch-mean KL)."""
        if self.groups == 1:
            kl = -prior_matching_term.unsqueeze(-1)  # (B, 1): analytic or Monte Carlo
        else:
            kl_dims = kl_per_dimension(q_z, p_z, self.name)  # (B, L)
            size = kl_dims.shape[-1]
            if size % self.groups:
                raise genkit.InvalidParameterError(
                    f"estimator 'free_bits': groups={self.groups} must divide the latent size "
                    f"{size}"
                )
            kl = reduce(kl_dims, "b (g d) -> b g", "sum", g=self.groups)
        floor = kl.new_tensor(self.free_nats)
        if self.per == "sample":
            floored = torch.maximum(kl, floor)
        else:
            floored = torch.where(kl.mean(0, keepdim=True) >= floor, kl, floor)
        return reduce(floored, "b g -> b", "sum")
