"""The variational diffusion model in continuous time (Kingma et al. 2021): ``timesteps=0``.

The discrete VDM's chain ``x -> x_1 -> ... -> x_T`` with ``T -> infinity``: latents ``z_t`` for
``t in [0, 1]``, the fixed encoder ``q(z_t|x) = N(alpha_t x, sigma_t^2 I)`` on a log-SNR
schedule ``lambda(t)`` (:mod:`genkit_vdm.logsnr`), the reverse step ``p(z_s|z_t) = q(z_s|z_t,
x = x0_hat(z_t, t))`` for ``s < t``, ``p(z_1) = N(0, I)`` and a decoder ``p(x|z_0)`` with no
network. For 8-bit images it is, by default (``decoder="softmax"``), Kingma et al.'s
``p(x|z_0) ∝ q(z_0|x)`` normalised over the 256 values ``x_k = k/127.5 - 1``: a softmax of the
logits ``-(z_0 - alpha_0 x_k)^2 / (2 sigma_0^2)``, independent across pixels
(:class:`~genkit.distributions.GridGaussian`); ``decoder="bin_mass"`` gives the mass that the
Gaussian ``N(z_0 / alpha_0, (sigma_0 / alpha_0)^2)`` puts on each bin (DDPM's, a
:class:`~genkit.distributions.DiscretizedGaussian`). Vectors: that Gaussian as a density.

Its ELBO (Kingma et al. eqs. 11-17; docs/vdm.md derives it as the limit of the lecture's
denoising-matching sum)::

    ELBO = E_{q(z_0|x)}[log p(x|z_0)]                                      reconstruction
         - KL(q(z_1|x) || N(0, I))                                          prior_matching
         - 1/2 E_{t ~ U(0,1), eps}[-lambda'(t) ||eps - eps_hat(z_t, t)||^2]  denoising_matching

with ``z_t = alpha_t x + sigma_t eps``. One network call per draw of ``t``; the reconstruction
and the prior matching cost none. :mod:`genkit_vdm.continuous_elbo` computes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from genkit import likelihoods
from genkit.distributions import DiscretizedGaussian, GridGaussian
from genkit.elbo import ELBO
from genkit.errors import InvalidParameterError
from genkit.model import StandardNormalPrior, check_count
from genkit_vdm import sampling
from genkit_vdm.base import (
    Prediction,
    ReverseProcess,
    VDMBase,
    VDMConfig,
    build_schedule,
    default_denoiser,
    vdm_estimator,
)
from genkit_vdm.encoder import ContinuousForwardProcess, expand_like
from genkit_vdm.estimators import DenoisingMatchingELBO
from genkit_vdm.logsnr import LogSNRSchedule


class ContinuousReverseProcess(ReverseProcess):
    """The learned reverse process in continuous time. ``predict(z_t, t)`` (shared with the
    discrete one) reads ``net(z_t, t)``, ``t`` a float in [0, 1]; ``p_step(z_t, t, s)`` is
    ``p(z_s|z_t)``; called as a :class:`~genkit.model.Decoder` it is ``p(x|z_0)``."""

    encoder: ContinuousForwardProcess

    def __init__(
        self,
        net: nn.Module,
        encoder: ContinuousForwardProcess,
        parameterization: str,
        likelihood: str,
        decoder: str = "bin_mass",
    ) -> None:
        super().__init__(net, encoder, parameterization, likelihood)
        if decoder not in ("softmax", "bin_mass"):
            raise InvalidParameterError(
                f"unknown decoder '{decoder}'; choose from softmax, bin_mass"
            )
        #: ``p(x|z_0)`` for 8-bit images: ``softmax`` (Kingma et al.) or ``bin_mass`` (DDPM).
        self.grid_decoder = decoder

    @property
    def description(self) -> str:
        """The decoder as a report names it: ``softmax over the 256 values`` or the
        likelihood (``discretized_gaussian``: the bin mass; ``gaussian``)."""
        if self.likelihood == "discretized_gaussian" and self.grid_decoder == "softmax":
            return "softmax over the 256 values"
        return self.likelihood

    def predict(
        self,
        z_t: Tensor,
        t: Tensor | float,
        clip: bool = False,
        log_snr: Tensor | None = None,
        signal_noise: tuple[Tensor, Tensor] | None = None,
        net_time: Tensor | None = None,
    ) -> Prediction:
        """Run the net at ``(z_t, t)`` and read it as eps, x0 or v (see
        :meth:`ReverseProcess.predict`). The net is given the noise level, not the clock:
        ``schedule.conditioning(lambda(t))``, the time at which the schedule's initial linear
        form has the log-SNR ``lambda(t)`` (``t`` itself for ``fixed_linear``; Kingma et al.
        condition on gamma(t) likewise), so the denoiser is a function of ``(z, lambda)`` and
        the ELBO depends on the schedule only through its end points. ``log_snr``:
        ``lambda(t)`` when the caller has it (with its gradient); ``signal_noise`` and
        ``net_time`` when it has those (the ODE solver), as in :meth:`ReverseProcess.predict`."""
        if signal_noise is None or net_time is None:
            t = self.encoder.times(t, z_t.shape[0])
            log_snr = self.encoder.log_snr(t) if log_snr is None else log_snr
            if signal_noise is None:
                signal_noise = self.encoder.coefficients(log_snr)
            if net_time is None:
                net_time = self.encoder.schedule.conditioning(log_snr)
        return super().predict(z_t, t, clip, signal_noise=signal_noise, net_time=net_time)

    def p_step(self, z_t: Tensor, t: Tensor | float, s: Tensor | float) -> Distribution:
        """``p(z_s | z_t) = q(z_s | z_t, x = x0_hat(z_t, t))`` for ``0 <= s < t <= 1``."""
        t = self.encoder.times(t, z_t.shape[0])
        return self.encoder.q_posterior(z_t, self.predict(z_t, t).x0, t, s)

    def decoder_at(self, z_0: Tensor, log_snr_0: Tensor) -> Distribution:
        """``p(x | z_0)`` over the data dimensions (module docstring), from the Gaussian with
        mean ``z_0 / alpha_0`` and scale ``sigma_0 / alpha_0 = exp(-lambda(0)/2)``: on 8-bit
        images normalised over the 256 values (``softmax``) or its bin masses (``bin_mass``)."""
        alpha, _ = self.encoder.coefficients(log_snr_0)
        mean = z_0 / expand_like(alpha.reshape(-1), z_0)
        scale = torch.exp(-0.5 * log_snr_0).to(z_0.dtype).reshape(-1)
        scale = expand_like(scale, z_0).expand_as(z_0)
        if self.likelihood == "discretized_gaussian":
            grid = GridGaussian if self.grid_decoder == "softmax" else DiscretizedGaussian
            return Independent(grid(mean, scale), z_0.dim() - 1)
        return Independent(Normal(mean, scale), z_0.dim() - 1)

    def forward(self, z_0: Tensor) -> Distribution:
        """``p(x | z_0)``, the decoder (no network call), ``z_0: (B, *data_shape)``."""
        return self.decoder_at(z_0, self.encoder.log_snr(0.0))


#: ``decoder="auto"``: the continuous model's ``p(x|z_0)`` on 8-bit images (docs/vdm.md has
#: the measurements behind the choice).
DEFAULT_DECODER = "softmax"


def _grid_decoder(decoder: str, likelihood: str) -> str:
    """``VDMConfig.decoder`` resolved: ``auto`` -> :data:`DEFAULT_DECODER`; ``softmax`` and
    ``bin_mass`` are masses over 8-bit values, so a ``gaussian`` likelihood (a density) takes
    neither."""
    if likelihood != "discretized_gaussian":
        if decoder != "auto":
            raise InvalidParameterError(
                f"model 'vdm': decoder='{decoder}' is a mass over 8-bit values; the "
                f"'{likelihood}' likelihood is a density: leave decoder='auto'"
            )
        return DEFAULT_DECODER
    return DEFAULT_DECODER if decoder == "auto" else decoder


class ContinuousVDM(VDMBase):
    """The continuous-time variational diffusion model (module docstring).

    Parts: ``encoder`` (:class:`~genkit_vdm.encoder.ContinuousForwardProcess`, owning the
    schedule, which has parameters when it is ``learned``), ``decoder`` (the reverse process,
    owning ``net``), ``prior`` (``N(0, I)``). Not a Markov chain of finitely many latents, so
    the ``consistency`` estimator does not apply (an
    :class:`~genkit.errors.IncompatibleEstimatorError`).
    """

    #: Continuous time: no finite number of steps.
    timesteps = 0

    def __init__(
        self,
        data_shape: tuple[int, ...],
        config: VDMConfig | None = None,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__(data_shape)
        self.config = cfg = config or VDMConfig(timesteps=0)
        if not cfg.continuous:
            raise InvalidParameterError("ContinuousVDM needs timesteps=0")
        schedule = build_schedule(cfg)
        assert isinstance(schedule, LogSNRSchedule)
        self.encoder = ContinuousForwardProcess(schedule)
        lik = likelihoods.resolve(cfg.likelihood, self.data_shape)
        self.decoder = ContinuousReverseProcess(
            net if net is not None else default_denoiser(self.data_shape, cfg),
            self.encoder,
            cfg.parameterization,
            lik,
            _grid_decoder(cfg.decoder, lik),
        )
        self.prior = StandardNormalPrior(self.data_shape)
        self.default_estimator = DenoisingMatchingELBO(**self._estimator_settings())

    def _estimator_settings(self) -> dict[str, Any]:
        return {"t_samples": self.config.t_samples, "t_sampler": self.config.t_sampler}

    @property
    def train_defaults(self) -> dict[str, Any]:
        """``lr = 4e-3``, twice the trainer's shared rate, warmed up over 500 steps: on
        ``builtin:mnist`` at 2,400 steps of the default U-Net 4e-3 gives 1.2597 against 1.2978
        bits/dim, where the VAE is worse at 4e-3; on ``builtin:digits`` in five minutes 4e-3
        gave 1.9294 with the shared 100-step warm-up and 1.8704 with 500 (docs/vdm.md)."""
        return {"lr": 4e-3, "lr_warmup_steps": 500}

    def estimator(
        self, name: str | ELBO | None = None, *, evaluation: bool = False, **params: Any
    ) -> ELBO:
        """The estimator of ``elbo(x, name, **params)``: ``denoising_matching`` (the only one in
        continuous time) with the model's ``t_samples`` and ``t_sampler`` overridden by
        ``params``; ``evaluation=True``: ``t_samples`` defaults to ``config.eval_t_samples``."""
        return vdm_estimator(self, name, evaluation, params)

    @property
    def schedule(self) -> LogSNRSchedule:
        """The log-SNR schedule ``lambda(t)``."""
        return self.encoder.schedule

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        eta: float | None = None,
        clip: bool | None = None,
        final: str = "mode",
    ) -> Tensor:
        """``n`` draws, ``(n, *data_shape)``, on ``steps`` equal steps of ``t`` (default
        ``config.sample_steps``). ``eta``: 1 is ancestral sampling from ``p(z_s|z_t)``, 0 the
        deterministic DDIM-like sampler; by default ancestral when ``steps`` is not given and
        deterministic when it is (as the discrete model's DDIM). See
        :func:`genkit_vdm.sampling.continuous`."""
        n = check_count("n", n)
        clip = self.config.clip_denoised and len(self.data_shape) == 3 if clip is None else clip
        if eta is None:
            eta = 1.0 if steps is None else 0.0
        steps = self.config.sample_steps if steps is None else steps
        return sampling.continuous(
            self, n, steps, eta=eta, generator=generator, clip=clip, final=final
        )


__all__ = ["ContinuousReverseProcess", "ContinuousVDM"]
