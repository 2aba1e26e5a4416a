"""The continuous-time VDM's ELBO (Kingma et al. eqs. 11-17, written out in
:mod:`genkit_vdm.continuous`): its terms at drawn ``t`` and ``z_t``, which the
``denoising_matching`` estimator (:mod:`genkit_vdm.estimators`) computes for a model with
``timesteps=0``. ``model`` is a :class:`~genkit_vdm.continuous.ContinuousVDM`, annotated as the
shared :class:`~genkit_vdm.base.VDMBase` so that this module sits below the models.
"""

from __future__ import annotations

import torch
from einops import reduce, repeat
from torch import Tensor
from torch.distributions import Independent, Normal, kl_divergence

from genkit.elbo import ELBOTerms
from genkit_vdm.base import VDMBase
from genkit_vdm.draws import draw_uniforms
from genkit_vdm.encoder import expand_like
from genkit_vdm.logsnr import LogSNR, minimise_variance


def diffusion_loss(model: VDMBase, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, LogSNR]:
    """At one draw ``z_t = alpha_t x + sigma_t eps`` per row (``x: (N, ...)``, ``t: (N,)``):
    ``L = -1/2 lambda'(t) ||eps - eps_hat(z_t, t)||^2`` and ``||eps - eps_hat||^2``, each
    ``(N,)``, and the schedule's values at ``t``."""
    log_snr = model.encoder.log_snr_and_slope(t)
    alpha, sigma = model.encoder.coefficients(log_snr.value)
    eps = torch.randn_like(x)
    z_t = expand_like(alpha, x) * x + expand_like(sigma, x) * eps
    pred = model.decoder.predict(z_t, t, log_snr=log_snr.value)
    # float32 at least (bf16 under autocast), float64 in a float64 model
    err = (eps - pred.eps).to(torch.promote_types(x.dtype, torch.float32))
    sq_err = reduce(err.square(), "n ... -> n", "sum")
    return -0.5 * log_snr.slope * sq_err, sq_err, log_snr


def reconstruction(model: VDMBase, x: Tensor, log_snr_0: Tensor) -> Tensor:
    """The ``reconstruction`` term at one draw ``z_0 = alpha_0 x + sigma_0 eps``, ``(B,)``::

        E_{q(z_0|x)}[log p(x|z_0)],   softmax:  log p(x|z_0) = sum_i [l_i(x_i)
                                                    - log sum_{k=0}^{255} exp l_i(x_k)],
                                      l_i(v) = -(z_{0,i} - alpha_0 v)^2 / (2 sigma_0^2)

    (``x_k = k/127.5 - 1``); ``bin_mass``: ``sum_i log P(bin of x_i)`` under
    ``N(z_{0,i} / alpha_0, (sigma_0 / alpha_0)^2)``; vectors: that Gaussian's log-density.
    ``log_snr_0 = lambda(0)``, with its gradient for a learned end point."""
    alpha_0, sigma_0 = model.encoder.coefficients(log_snr_0)
    z_0 = alpha_0 * x + sigma_0 * torch.randn_like(x)
    return model.decoder.decoder_at(z_0, log_snr_0).log_prob(x)


def continuous_elbo(model: VDMBase, x: Tensor, t_samples: int, sampler: str) -> ELBOTerms:
    """The continuous-time ELBO of ``x: (B, ...)`` (:mod:`genkit_vdm.continuous`), ``t_samples``
    draws of ``t`` per example by :func:`draw_uniforms` (shared shift in training mode). Extra
    ``simple``: ``-E_t ||eps - eps_hat||^2``, the unweighted loss (Ho et al.'s L_simple in
    continuous t)."""
    b = x.shape[0]
    u = draw_uniforms(t_samples, b, sampler, shared=model.training, device=x.device)
    t = u.reshape(-1)  # row j * B + e: draw j of example e
    loss, sq_err, log_snr = diffusion_loss(model, repeat(x, "b ... -> (k b) ...", k=t_samples), t)
    minimise_variance(log_snr, loss)
    ends = model.schedule.end_points()  # lambda(0), lambda(1)
    alpha_1, sigma_1 = model.encoder.coefficients(ends[1])
    q_1 = Independent(Normal(alpha_1 * x, sigma_1.expand_as(x)), x.dim() - 1)
    terms = {
        "reconstruction": reconstruction(model, x, ends[0]),
        "prior_matching": -kl_divergence(q_1, model.prior()),
        "denoising_matching": -reduce(loss, "(k b) -> b", "mean", k=t_samples),
    }
    simple = -reduce(sq_err, "(k b) -> b", "mean", k=t_samples)
    return ELBOTerms(
        terms=terms, num_dims=model.num_dims, extras={"simple": simple}, nfe=float(t_samples)
    )


__all__ = ["continuous_elbo", "diffusion_loss", "reconstruction"]
