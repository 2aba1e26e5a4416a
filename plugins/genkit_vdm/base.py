"""What the discrete and the continuous variational diffusion model share, below both
(:mod:`genkit_vdm.model`, :mod:`genkit_vdm.continuous`) and below the estimators and samplers
that take either: the configuration :class:`VDMConfig`, the schedule and the default denoiser
it builds, the learned reverse process :class:`ReverseProcess` with its network's reading
:class:`Prediction` (``parameterization``: see :mod:`genkit_vdm.model`), and :class:`VDMBase`,
the base class of both models.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import attrs
import torch
from attrs import validators as v
from einops import rearrange
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from genkit.distributions import DiscretizedGaussian, diagonal_normal
from genkit.elbo import ELBO
from genkit.errors import InvalidParameterError
from genkit.model import Decoder, LatentVariableModel, StandardNormalPrior
from genkit_vdm.encoder import ContinuousForwardProcess, DiscreteForwardProcess, expand_like
from genkit_vdm.logsnr import LogSNRSchedule
from genkit_vdm.schedules import DiscreteSchedule
from genkit_vdm.unet import MLPDenoiser, UNet

PARAMETERIZATIONS = ("eps", "x0", "v")
#: ``VDMConfig.decoder``: the continuous model's ``p(x|z_0)`` for 8-bit images.
DECODERS = ("auto", "softmax", "bin_mass")
#: The reverse variance ``sigma_t^2`` of ``p(x_{t-1}|x_t)`` (t >= 2) and of the decoder (t = 1):
#: ``posterior``: beta-tilde_t, decoder beta_1 (genkit's default); ``fixed_small``: beta-tilde_t,
#: decoder beta-tilde_2 (Ho et al.'s clipped log-variance); ``fixed_large``: beta_t, decoder
#: beta-tilde_2 (Ho et al., improved-diffusion); ``learned_range``: the net outputs ``2C``
#: channels, the last ``C`` read as ``v`` in [-1, 1] with ``log sigma_t^2 = f log beta_t +
#: (1 - f) log beta-tilde_t`` (clipped as ``fixed_small`` at t = 1), ``f = (v + 1) / 2``
#: (Nichol & Dhariwal 2021).
VARIANCES = ("posterior", "fixed_small", "fixed_large", "learned_range")


def _exponents(value: Any) -> tuple[int, ...] | None:
    """``None`` (automatic) or a list of integer exponents ``n`` of the Fourier features."""
    if value is None:
        return None
    values = tuple(value) if isinstance(value, list | tuple) else (value,)
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 12 for n in values):
        raise InvalidParameterError(
            f"fourier must be a list of integer exponents n in 0..12 (features sin/cos(2^n pi "
            f"x_t)), [] for none, or None for the default; got {value!r}"
        )
    return values


#: The Fourier-feature exponents images get by default in continuous time: sin/cos(2^n pi z_t)
#: for n = 4..7, periods 2^(1-n) from 1/8 down to 1/64 on the [-1, 1] scale (about 16 down to
#: 2 bins of 8-bit data); docs/vdm.md has the measurements behind the choice.
DEFAULT_FOURIER = (4, 5, 6, 7)


@attrs.frozen(kw_only=True)
class VDMConfig:
    """Parameters of ``create_model("vdm", data_shape, **params)`` (all but ``net``)."""

    #: The U-Net defaults until issue #21, which rebuild a run recorded without its resolved
    #: config (``genkit.registry.create_run_model``).
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {
        "channels": 32,
        "channel_mults": (1, 2),
        "attention_resolution": 8,
    }

    #: ``T``, the number of noising steps; ``0`` selects continuous time (T -> infinity).
    timesteps: int = attrs.field(default=1000, validator=v.ge(0))
    #: A registered schedule name: discrete ``linear``, ``cosine``; continuous
    #: ``fixed_linear``, ``learned``; ``None``: ``linear`` (T >= 1) or ``learned`` (T = 0).
    schedule: str | None = None
    #: Extra keyword arguments of the schedule's factory (e.g. ``{"s": 0.008}`` for cosine,
    #: ``{"log_snr_max": 13.3, "log_snr_min": -5.0}`` for the continuous ones).
    schedule_params: dict[str, Any] = attrs.field(factory=dict)
    #: What the network predicts: ``eps``, ``x0`` or ``v``.
    parameterization: str = attrs.field(default="eps", validator=v.in_(PARAMETERIZATIONS))
    #: The default denoiser: ``unet`` (images only), ``mlp``, ``auto`` (by data rank) or
    #: ``diffusers`` (diffusers' ``UNet2DModel`` built from ``unet``; needs the extra).
    denoiser: str = attrs.field(
        default="auto", validator=v.in_(("auto", "unet", "mlp", "diffusers"))
    )
    #: ``denoiser="diffusers"``: keyword arguments of ``diffusers.UNet2DModel`` (its config);
    #: ``sample_size``, ``in_channels`` and ``out_channels`` default to the data's.
    unet: dict[str, Any] = attrs.field(factory=dict)
    #: The reverse variance, one of ``VARIANCES`` (discrete time only).
    variance: str = attrs.field(default="posterior", validator=v.in_(VARIANCES))
    #: U-Net base channels, per-level multipliers, residual blocks per level, attention
    #: at resolutions <= ``attention_resolution`` and in the middle (0: none), dropout. The
    #: defaults are the fastest to fall in bits/dim per CPU-second on 28x28 (docs/vdm.md).
    channels: int = attrs.field(default=16, validator=v.ge(1))
    channel_mults: tuple[int, ...] = attrs.field(
        default=(1, 2, 2), validator=[v.min_len(1), v.deep_iterable(v.ge(1))]
    )
    num_res_blocks: int = attrs.field(default=1, validator=v.ge(1))
    attention_resolution: int = attrs.field(default=0, validator=v.ge(0))
    dropout: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.lt(1.0)])
    #: U-Net space-to-depth: ``p x p`` pixel patches become channels before the first
    #: convolution (after the Fourier features), ``1``: none. ``p`` must divide H and W.
    patch_size: int = attrs.field(default=1, validator=v.ge(1))
    #: Exponents ``n`` of the U-Net's Fourier input features ``sin/cos(2^n pi x_t)``; ``[]``:
    #: none; ``None``: ``DEFAULT_FOURIER`` for images in continuous time, none otherwise.
    fourier: Any = attrs.field(default=None, converter=_exponents)
    #: MLP denoiser width and depth (vectors, or images with ``denoiser="mlp"``).
    hidden: int = attrs.field(default=256, validator=v.ge(1))
    depth: int = attrs.field(default=3, validator=v.ge(1))
    #: The decoder ``p(x|.)``: ``discretized_gaussian``, ``gaussian`` or ``auto``.
    likelihood: str = attrs.field(
        default="auto", validator=v.in_(("auto", "discretized_gaussian", "gaussian"))
    )
    #: Continuous time, 8-bit images: the decoder ``p(x|z_0)`` over the 256 values,
    #: ``softmax`` (Kingma et al.: ``q(z_0|x)`` normalised over the grid,
    #: :class:`~genkit.distributions.GridGaussian`) or ``bin_mass`` (the Gaussian's mass on each
    #: bin, :class:`~genkit.distributions.DiscretizedGaussian`); ``auto``: ``softmax``.
    decoder: str = attrs.field(default="auto", validator=v.in_(DECODERS))
    #: The default estimator (``elbo(x)``): draws of t per example, and how the uniform
    #: numbers behind them are drawn: ``stratified`` (one random shift of an evenly spaced grid
    #: over the batch in training, per example in evaluation) or ``uniform`` (independent).
    t_samples: int = attrs.field(default=1, validator=v.ge(1))
    t_sampler: str = attrs.field(default="stratified", validator=v.in_(("stratified", "uniform")))
    #: Discrete time: ``p(t)`` over the steps, ``loss_aware`` (``p(t) ∝ sqrt(E[L_t^2])`` from
    #: the model's buffers ``loss_moments.mean_sq`` / ``loss_moments.seen``, in ``state_dict()``)
    #: or ``uniform``.
    t_proposal: str = attrs.field(default="loss_aware", validator=v.in_(("loss_aware", "uniform")))
    #: Discrete time, ``loss_aware``: observations per ``t`` before ``p(t)`` leaves its warm-up
    #: proposal, and the exponential average's horizon (its rate is ``1 / t_history``).
    t_history: int = attrs.field(default=10, validator=v.ge(1))
    #: Discrete time: compute the reconstruction (t = 1) at every step with a network call of
    #: its own, as before genkit 0.2, instead of as one of the sampled steps.
    reconstruction_every_step: bool = False
    #: Draws of t per example of the estimator that evaluation uses (``model.estimator(
    #: evaluation=True)``, :func:`genkit.evaluation.evaluate`), stratified per example.
    eval_t_samples: int = attrs.field(default=4, validator=v.ge(1))
    #: Continuous time: steps of ``sample()`` when it is not given ``steps``.
    sample_steps: int = attrs.field(default=256, validator=v.ge(1))
    #: Clip ``x0_hat`` to [-1, 1] when sampling images (never inside the ELBO).
    clip_denoised: bool = True

    @property
    def continuous(self) -> bool:
        """Continuous time (``timesteps == 0``)."""
        return self.timesteps == 0

    @property
    def schedule_name(self) -> str:
        """``schedule``, or its default for the time kind."""
        if self.schedule is not None:
            return self.schedule
        return "learned" if self.continuous else "linear"

    def fourier_exponents(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``fourier``, or its default: ``DEFAULT_FOURIER`` for images in continuous time."""
        if self.fourier is not None:
            return self.fourier
        return DEFAULT_FOURIER if self.continuous and len(data_shape) == 3 else ()


def build_schedule(cfg: VDMConfig) -> DiscreteSchedule | LogSNRSchedule:
    """The schedule ``cfg.schedule_name`` built through the catalogue (``register_schedules``):
    a :class:`DiscreteSchedule` with ``T`` betas, or a continuous
    :class:`~genkit_vdm.logsnr.LogSNRSchedule` when ``timesteps == 0``."""
    from genkit.registry import get_catalog

    name = cfg.schedule_name
    schedule = get_catalog().build(
        "schedules", name, timesteps=cfg.timesteps, **cfg.schedule_params
    )
    if cfg.continuous:
        if not isinstance(schedule, LogSNRSchedule):
            raise InvalidParameterError(
                f"model 'vdm': schedule '{name}' returned {type(schedule).__name__}; continuous "
                "time (timesteps=0) needs a log-SNR schedule such as 'fixed_linear' or 'learned'"
            )
        return schedule
    if not isinstance(schedule, DiscreteSchedule) or schedule.timesteps != cfg.timesteps:
        raise InvalidParameterError(
            f"schedule '{name}' returned {type(schedule).__name__}; the discrete-time VDM "
            f"needs a DiscreteSchedule with {cfg.timesteps} betas"
        )
    return schedule


def default_denoiser(data_shape: tuple[int, ...], cfg: VDMConfig) -> nn.Module:
    """The U-Net for images ``(C, H, W)``, the MLP for vectors ``(D,)`` (or ``cfg.denoiser``).
    In continuous time the nets embed ``1000 t``."""
    kind = cfg.denoiser
    if kind == "auto":
        kind = "unet" if len(data_shape) == 3 else "mlp"
    time_scale = 1000.0 if cfg.continuous else 1.0
    fourier = cfg.fourier_exponents(data_shape)
    if cfg.patch_size > 1 and kind != "unet":
        raise InvalidParameterError(
            f"model 'vdm': patch_size is an option of genkit's U-Net; the {kind} denoiser has "
            "none: use patch_size=1"
        )
    if kind == "diffusers":
        from genkit_vdm.diffusers_unet import diffusers_denoiser

        if cfg.continuous or fourier:
            raise InvalidParameterError(
                "model 'vdm': denoiser='diffusers' is for discrete time (timesteps >= 1) "
                "without Fourier features"
            )
        out = 2 if cfg.variance == "learned_range" else 1
        return diffusers_denoiser(data_shape, cfg.unet, out_factor=out)
    if cfg.unet:
        raise InvalidParameterError("model 'vdm': unet={...} needs denoiser='diffusers'")
    if cfg.variance == "learned_range":
        raise InvalidParameterError(
            "model 'vdm': variance='learned_range' needs a net with 2C output channels: "
            "denoiser='diffusers' or your own net"
        )
    if fourier and kind != "unet":
        raise InvalidParameterError(
            "model 'vdm': Fourier features (fourier=[...]) are an input option of the U-Net; "
            f"the {kind} denoiser has none: use fourier=[]"
        )
    if kind == "unet":
        if len(data_shape) != 3:
            raise InvalidParameterError(
                f"model 'vdm': denoiser='unet' needs images (C, H, W), got data_shape {data_shape}"
            )
        return UNet(
            data_shape,
            channels=cfg.channels,
            channel_mults=cfg.channel_mults,
            num_res_blocks=cfg.num_res_blocks,
            attention_resolution=cfg.attention_resolution,
            dropout=cfg.dropout,
            fourier=fourier,
            time_scale=time_scale,
            patch_size=cfg.patch_size,
        )
    dim = int(torch.Size(data_shape).numel())
    net = MLPDenoiser(dim, hidden=cfg.hidden, depth=cfg.depth, time_scale=time_scale)
    return net if len(data_shape) == 1 else _FlatMLP(data_shape, net)


class _FlatMLP(nn.Module):
    """An MLP denoiser on flattened images: ``(B, C, H, W)`` -> ``(B, C*H*W)`` and back."""

    def __init__(self, data_shape: tuple[int, ...], net: nn.Module) -> None:
        super().__init__()
        self.data_shape, self.net = data_shape, net

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x.flatten(1), t).view(x.shape)


@attrs.frozen
class Prediction:
    """The network's reading at ``(x_t, t)``: ``x0`` and ``eps`` estimates, shaped like ``x_t``;
    ``var``: with ``variance="learned_range"``, the net's variance output ``v`` in [-1, 1]."""

    x0: Tensor
    eps: Tensor
    var: Tensor | None = None


class ReverseProcess(Decoder):
    """The learned reverse process ``p(x_{t-1} | x_t)``; called as a :class:`Decoder` it is the
    last step, ``p(x_0 | x_1)``. It owns the denoising network ``net(x_t, t)``.

    ``predict`` reads the network through the encoder's ``signal_noise(t)`` (the scales of
    ``x_0`` and ``eps`` in ``x_t``), so the continuous-time reverse process
    (:class:`genkit_vdm.continuous.ContinuousReverseProcess`) shares it."""

    def __init__(
        self,
        net: nn.Module,
        encoder: DiscreteForwardProcess,
        parameterization: str,
        likelihood: str,
        variance: str = "posterior",
    ) -> None:
        super().__init__()
        if variance not in VARIANCES:
            raise InvalidParameterError(
                f"unknown variance '{variance}'; choose from {', '.join(VARIANCES)}"
            )
        self.variance = variance
        if parameterization not in PARAMETERIZATIONS:
            raise InvalidParameterError(
                f"unknown parameterization '{parameterization}'; choose from {', '.join(PARAMETERIZATIONS)}"
            )
        self.net, self.encoder = net, encoder
        self.parameterization, self.likelihood = parameterization, likelihood

    def predict(
        self,
        x_t: Tensor,
        t: Tensor,
        clip: bool = False,
        signal_noise: tuple[Tensor, Tensor] | None = None,
        net_time: Tensor | None = None,
    ) -> Prediction:
        """Run ``net(x_t, t)`` and read it as eps, x0 or v; both estimates returned. With
        ``clip``, ``x0_hat`` is clipped to [-1, 1] and ``eps_hat`` re-derived from it
        (``eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)``), so the two stay consistent.
        ``signal_noise``: ``(sqrt(ab_t), sqrt(1 - ab_t))`` when the caller has them already
        (default: the encoder's ``signal_noise(t)``); ``net_time``: what the net is given in
        place of ``t`` (the continuous model gives it the noise level, see there)."""
        out = self.net(x_t, t if net_time is None else net_time).to(x_t.dtype)
        var = None
        if self.variance == "learned_range" and out.dim() > 1 and out.shape[1] == 2 * x_t.shape[1]:
            out, var = out.chunk(2, dim=1)
        if out.shape != x_t.shape:
            raise InvalidParameterError(
                f"the denoiser returned shape {tuple(out.shape)} for x_t of shape "
                f"{tuple(x_t.shape)}"
                + (" (variance='learned_range' needs 2C channels)" if var is None else "")
            )
        signal, noise = signal_noise if signal_noise is not None else self.encoder.signal_noise(t)
        s, r = expand_like(signal, x_t), expand_like(noise, x_t)
        if self.parameterization == "eps":
            x0, eps = (x_t - r * out) / s, out
        elif self.parameterization == "x0":
            x0, eps = out, (x_t - s * out) / r
        else:
            x0, eps = s * x_t - r * out, r * x_t + s * out
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x_t - s * x0) / r
        return Prediction(x0, eps, var)

    def log_variance(self, t: Tensor, like: Tensor, var: Tensor | None = None) -> Tensor:
        """``log sigma_t^2`` of ``p(x_{t-1}|x_t)`` (``t = 1``: of the decoder) for steps
        ``t: (B,)`` by ``self.variance``, ``(B, 1, ..)`` or, learned, shaped like ``like``.
        Fixed: ``log beta-tilde_t`` (small) or ``log beta_t`` (large), at ``t = 1``
        ``log beta-tilde_2`` (``posterior``: ``log beta_1``); learned: ``f log beta_t +
        (1 - f) log beta-tilde_t`` (clipped likewise), ``f = (var + 1) / 2``."""
        enc = self.encoder
        small = enc.posterior_coefficients(t)[2]  # beta-tilde_t, 0 at t = 1
        if self.variance == "posterior":
            return expand_like(torch.where(t == 1, enc.betas[t], small).log(), like)
        if enc.timesteps < 2:
            raise InvalidParameterError(
                f"variance='{self.variance}' needs T >= 2 (its t = 1 variance is beta-tilde_2)"
            )
        tilde_2 = enc.posterior_coefficients(torch.full_like(t, 2))[2]
        log_small = torch.where(t == 1, tilde_2, small).log()
        if self.variance == "fixed_small":
            return expand_like(log_small, like)
        log_large = torch.where(t == 1, tilde_2, enc.betas[t]).log()
        if self.variance == "fixed_large":
            return expand_like(log_large, like)
        if var is None:
            raise InvalidParameterError("variance='learned_range' needs the net's variance output")
        frac = (var.double() + 1.0) / 2.0  # mixed in float64, then cast to like's dtype
        hi, lo = enc.betas[t].log(), log_small  # the upper end is beta_t, also at t = 1
        pattern = "b -> b" + " 1" * (like.dim() - 1)
        mixed = frac * rearrange(hi, pattern) + (1.0 - frac) * rearrange(lo, pattern)
        return mixed.to(like.dtype)

    def step_from(self, x_t: Tensor, t: Tensor, x0_hat: Tensor | Prediction) -> Distribution:
        """``p(x_{t-1} | x_t) = N(mu_q(x_t, x0_hat), sigma_t^2 I)`` for ``t`` in 2..T, ``sigma_t^2``
        by :meth:`log_variance` (give the :class:`Prediction` when the variance is learned)."""
        var = x0_hat.var if isinstance(x0_hat, Prediction) else None
        x0_hat = x0_hat.x0 if isinstance(x0_hat, Prediction) else x0_hat
        mean = self.encoder.posterior_mean(x_t, x0_hat, t)
        if self.variance == "posterior":
            std = self.encoder.posterior_std(t, x_t)
        else:
            std = (0.5 * self.log_variance(t, x_t, var)).exp()
        return diagonal_normal(mean, std.expand_as(x_t), x_t.dim() - 1)

    def decoder_from(self, x0_hat: Tensor | Prediction) -> Distribution:
        """``p(x_0 | x_1)``: mean ``x0_hat(x_1, 1)``, scale ``sigma_1`` (:meth:`log_variance` at
        ``t = 1``: ``sqrt(beta_1)`` by default), over the data dims."""
        var = x0_hat.var if isinstance(x0_hat, Prediction) else None
        x0_hat = x0_hat.x0 if isinstance(x0_hat, Prediction) else x0_hat
        if self.variance == "posterior":
            scale = self.encoder.betas[1].sqrt().to(x0_hat.dtype).expand_as(x0_hat)
        else:
            one = torch.ones(x0_hat.shape[0], dtype=torch.long, device=x0_hat.device)
            scale = (0.5 * self.log_variance(one, x0_hat, var)).exp().expand_as(x0_hat)
        event = x0_hat.dim() - 1
        if self.likelihood == "discretized_gaussian":
            return Independent(DiscretizedGaussian(x0_hat, scale), event)
        return Independent(Normal(x0_hat, scale), event)

    def p_step(self, x_t: Tensor, t: Tensor | int) -> Distribution:
        """``p(x_{t-1} | x_t)`` for ``t`` in 2..T."""
        t = self.encoder.steps(t, x_t.shape[0], low=2)
        return self.step_from(x_t, t, self.predict(x_t, t))

    def forward(self, x1: Tensor) -> Distribution:
        """``p(x_0 | x_1)``, the decoder, ``x1: (B, *data_shape)``."""
        t = self.encoder.steps(1, x1.shape[0])
        return self.decoder_from(self.predict(x1, t))


class VDMBase(LatentVariableModel):
    """What the discrete :class:`~genkit_vdm.model.VDM` and the continuous
    :class:`~genkit_vdm.continuous.ContinuousVDM` share: ``config`` (a :class:`VDMConfig`),
    ``encoder`` (the fixed forward process), ``decoder`` (a :class:`ReverseProcess`, owning
    ``net``), ``prior`` (``N(0, I)``) and the default estimator ``denoising_matching`` with the
    settings of ``_estimator_settings()``. The estimators and samplers, which take either
    model, are written against this class."""

    default_estimator = "denoising_matching"
    config: VDMConfig
    encoder: DiscreteForwardProcess | ContinuousForwardProcess
    decoder: ReverseProcess
    prior: StandardNormalPrior

    @abc.abstractmethod
    def _estimator_settings(self) -> dict[str, Any]:
        """The model's settings of a ``denoising_matching`` estimator: the defaults of one
        built without a name (:func:`vdm_estimator`)."""

    @property
    def net(self) -> nn.Module:
        """The denoising network ``net(x_t, t)`` (the decoder's); in continuous time
        ``net(z_t, t)``, ``t`` a float in [0, 1]."""
        return self.decoder.net


def vdm_estimator(
    model: VDMBase, name: str | ELBO | None, evaluation: bool, params: dict[str, Any]
) -> ELBO:
    """:meth:`VDM.estimator` for both VDMs: ``model._estimator_settings()`` are the defaults
    of a ``denoising_matching`` estimator built without a name."""
    if name is None and (params or evaluation):
        settings = model._estimator_settings()
        if evaluation:
            settings["t_samples"] = model.config.eval_t_samples
        if "proposal" in params or settings.get("moments", 0) is None:
            settings.pop("moments", None)
        return LatentVariableModel.estimator(model, "denoising_matching", **{**settings, **params})
    return LatentVariableModel.estimator(model, name, **params)


__all__ = [
    "DECODERS",
    "DEFAULT_FOURIER",
    "PARAMETERIZATIONS",
    "VARIANCES",
    "Prediction",
    "ReverseProcess",
    "VDMBase",
    "VDMConfig",
    "build_schedule",
    "default_denoiser",
    "vdm_estimator",
]
