"""The variational diffusion model in discrete time: the lecture's MHVAE with three restrictions
(latents the size of the data, a fixed Gaussian encoder, a standard-normal last latent).

Generative model (``seeds/000``, "Restriction 3")::

    p(x_{0:T}) = p(x_T) p(x_0 | x_1) prod_{t=2}^T p(x_{t-1} | x_t),     p(x_T) = N(0, I)

with the learned reverse step ``p(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)`` for
``t >= 2``, where ``mu_theta(x_t, t) = mu_q(x_t, x0_hat(x_t, t))`` is the posterior mean of
:mod:`genkit_vdm.encoder` with the network's estimate of ``x_0`` in place of ``x_0``, and
``sigma_t^2 = beta-tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``, the posterior
variance (Ho et al.'s lower choice; with it the reverse step is exact when ``x0_hat = x_0``).

The network's output is read by ``parameterization``:

- ``eps``: ``eps_hat``; ``x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t)``;
- ``x0``:  ``x0_hat`` itself;
- ``v``:   ``v_hat`` with ``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0``;
  ``x0_hat = sqrt(ab_t) x_t - sqrt(1 - ab_t) v_hat``.

The decoder ``p(x_0 | x_1)`` (``t = 1``) has mean ``x0_hat(x_1, 1)``, which equals ``mu_theta(x_1, 1)``
since ``alpha_bar_0 = 1``, and scale ``sigma_1 = sqrt(beta_1)`` (``beta-tilde_1 = 0`` is no scale;
DDPM's ``sigma_1^2 = beta_1``): a :class:`~genkit.distributions.DiscretizedGaussian` over the
256 bins for images, a Gaussian density for vectors. No clipping happens inside the ELBO.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from genkit import likelihoods
from genkit.elbo import ELBO
from genkit.errors import InvalidParameterError
from genkit.model import StandardNormalPrior, check_count
from genkit_vdm.base import (
    ReverseProcess,
    VDMBase,
    VDMConfig,
    build_schedule,
    default_denoiser,
    vdm_estimator,
)
from genkit_vdm.encoder import DiscreteForwardProcess
from genkit_vdm.estimators import DenoisingMatchingELBO, LossSecondMoments
from genkit_vdm.sampling import ancestral, ddim


class VDM(VDMBase):
    """The discrete-time variational diffusion model; also a :class:`genkit.markov.MarkovChain`
    (``z_t = x_t``), so the shared ``consistency`` estimator works on it unchanged.

    Parts: ``encoder`` (the fixed forward process), ``decoder`` (the learned reverse process,
    owning ``net``), ``prior`` (``N(0, I)`` over the data shape). With the default
    ``t_proposal="loss_aware"`` also ``loss_moments``, the loss-aware proposal's ``E[L_t^2]``
    and counts for ``t = 1..T`` as persistent buffers (float64 and int64, ``(T,)``) that the
    default estimator reads and updates in training mode: they are saved and restored with
    ``state_dict()``, so a resumed run draws ``t`` as the uninterrupted one; otherwise ``None``.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        config: VDMConfig | None = None,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__(data_shape)
        self.config = cfg = config or VDMConfig()
        self.encoder = DiscreteForwardProcess(build_schedule(cfg))
        lik = likelihoods.resolve(cfg.likelihood, self.data_shape)
        self.decoder = ReverseProcess(
            net if net is not None else default_denoiser(self.data_shape, cfg),
            self.encoder,
            cfg.parameterization,
            lik,
            cfg.variance,
        )
        self.prior = StandardNormalPrior(self.data_shape)
        loss_aware = cfg.t_proposal == "loss_aware"
        self.loss_moments = LossSecondMoments(cfg.timesteps) if loss_aware else None
        self.default_estimator = DenoisingMatchingELBO(
            **self._estimator_settings(), cache_pilot=False
        )

    def _estimator_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "t_samples": cfg.t_samples,
            "t_sampler": cfg.t_sampler,
            "proposal": cfg.t_proposal,
            "history": cfg.t_history,
            "reconstruction_every_step": cfg.reconstruction_every_step,
            "moments": self.loss_moments,
        }

    def estimator(
        self, name: str | ELBO | None = None, *, evaluation: bool = False, **params: Any
    ) -> ELBO:
        """The estimator of ``elbo(x, name, **params)``: ``denoising_matching`` (default) or
        ``consistency`` (the shared Markov-chain estimator), e.g. ``elbo(x, t_samples=None)``
        for the exact sum over t. Without ``name`` and ``params``, the model's own instance.
        With ``params`` and no name, a new ``denoising_matching`` estimator with the model's
        settings overridden by ``params``; it shares the model's ``loss_moments`` unless
        ``params`` change the proposal. By name, a new estimator with statistics of its own.
        ``evaluation=True``: ``t_samples`` defaults to ``config.eval_t_samples``."""
        return vdm_estimator(self, name, evaluation, params)

    @property
    def timesteps(self) -> int:
        return self.encoder.timesteps

    # -- the MarkovChain protocol (genkit.markov) -----------------------------------------
    #: The encoder transitions have no network (``ELBOTerms.nfe`` counts the ``p`` steps only).
    fixed_encoder = True

    @property
    def num_latents(self) -> int:
        """``T``: the latents are ``x_1..x_T``."""
        return self.encoder.timesteps

    def q_transition(self, z_prev: Tensor, t: Tensor) -> Distribution:
        """``q(x_t | x_{t-1})``, the fixed encoder's step."""
        return self.encoder.q_step(z_prev, t)

    def q_marginal(self, x: Tensor, t: Tensor) -> Distribution:
        """``q(x_t | x_0)`` in closed form."""
        return self.encoder.q_marginal(x, t)

    def p_transition(self, z_t: Tensor, t: Tensor) -> Distribution:
        """``p(x_{t-1} | x_t)``; ``t = 1`` is the decoder ``p(x_0 | x_1)``. Within one call
        ``t`` is either 1 for every example or >= 2 for every example."""
        t = self.encoder.steps(t, z_t.shape[0])
        first = t == 1
        if bool(first.all()):
            return self.decoder(z_t)
        if bool(first.any()):
            raise InvalidParameterError(
                "p_transition: t = 1 (the discretized decoder) and t >= 2 (Gaussian steps) "
                "cannot be mixed in one call"
            )
        return self.decoder.p_step(z_t, t)

    def prior_latent(self) -> Distribution:
        """``p(x_T) = N(0, I)`` over the data shape."""
        return self.prior()

    # -- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        eta: float = 0.0,
        clip: bool | None = None,
        final: str = "mode",
    ) -> Tensor:
        """``n`` draws, ``(n, *data_shape)``: ancestral DDPM sampling over all T steps when
        ``steps`` is None, else DDIM with ``steps`` steps and noise ``eta`` (see
        :mod:`genkit_vdm.sampling`). Images come back quantized to the 256 levels of [-1, 1]."""
        n = check_count("n", n)
        clip = self.config.clip_denoised and len(self.data_shape) == 3 if clip is None else clip
        if steps is None:
            return ancestral(self, n, generator=generator, clip=clip, final=final)
        return ddim(self, n, steps=steps, eta=eta, generator=generator, clip=clip, final=final)


__all__ = ["VDM"]
