"""The Markovian hierarchical VAE of the lecture (model name ``hvae``).

T levels of latents, learned Gaussian transitions in both directions::

    p(x, z_{1:T}) = p(z_T) p(x|z_1) prod_{t=2}^T p(z_{t-1}|z_t),   p(z_T) = N(0, I)
    q(z_{1:T}|x)  = q(z_1|x) prod_{t=2}^T q(z_t|z_{t-1})

Two kinds of latents, chosen by ``transitions``:

- ``mlp`` (default): each ``z_t`` is a vector of ``latent_dims[t-1]`` units. ``q(z_1|x)`` is
  the VAE's encoder and ``p(x|z_1)`` its decoder likelihood (the same classes, so with T = 1 a
  ``vae`` state dict loads as is and the ELBO is the VAE's); ``q(z_t|z_{t-1})`` and
  ``p(z_{t-1}|z_t)`` for t >= 2 are MLPs giving diagonal Gaussians.
- ``conv`` (images): each ``z_t`` is a feature map of ``latent_dims[t-1]`` channels at the
  resolution of the convolutional trunk (H and W halved up to twice), and every transition,
  ``q(z_1|x)`` and ``p(x|z_1)`` included, is a convolutional network.

The model is itself a :class:`genkit.markov.MarkovChain` and its ELBO is the lecture's
consistency form (:class:`genkit.markov.ConsistencyELBO`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from attrs import validators as v
from genkit_vae.model import (
    GaussianEncoder,
    LikelihoodDecoder,
    VAEConfig,
    diagonal_gaussian,
    net_kind,
)
from torch import Tensor, nn
from torch.distributions import Distribution

from genkit import likelihoods
from genkit.distributions import diagonal_normal, sample
from genkit.elbo import ELBO, ELBOTerms
from genkit.errors import InvalidParameterError
from genkit.markov import ConsistencyELBO
from genkit.model import (
    Decoder,
    Encoder,
    LatentVariableModel,
    StandardNormalPrior,
    check_count,
)
from genkit.nets import Float32Conv2d, mlp, num_downsamples


def _latent_dims(value: Any) -> tuple[int, ...] | None:
    """``None``, one int (every level) or a list of ints (one per level) -> a tuple or None."""
    if value is None:
        return None
    sizes = (value,) if isinstance(value, int) else tuple(value)
    if not sizes or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in sizes
    ):
        raise InvalidParameterError(
            f"latent_dims must be a positive int or a list of positive ints, got {value!r}"
        )
    return sizes


@attrs.frozen(kw_only=True)
class HVAEConfig:
    """Parameters of ``create_model("hvae", data_shape, **params)``."""

    #: ``T``, the number of latent levels.
    levels: int = attrs.field(default=2, validator=v.ge(1))
    #: Latent size per level (units, or channels with ``transitions="conv"``): a list of T
    #: ints, one int for every level, or ``None`` for 32 halved at each level above the first
    #: (at least 2): ``[32, 16]`` with T = 2.
    latent_dims: Any = attrs.field(default=None, converter=_latent_dims)
    #: Network of ``q(z_1|x)`` and ``p(x|z_1)``: ``mlp``, ``conv`` (images) or ``auto``.
    net: str = attrs.field(default="auto", validator=v.in_(("auto", "mlp", "conv")))
    #: ``mlp``: vector latents, MLP transitions between them. ``conv`` (images): feature-map
    #: latents and convolutional transitions everywhere (``net`` must be ``auto`` or ``conv``).
    transitions: str = attrs.field(default="mlp", validator=v.in_(("mlp", "conv")))
    #: Width of MLP hidden layers (data MLPs and the latent transitions).
    hidden: int = attrs.field(default=256, validator=v.ge(1))
    #: Hidden layers of every MLP, and of every convolutional latent transition.
    depth: int = attrs.field(default=2, validator=v.ge(1))
    #: Base channel count of the convolutional trunks (doubled at each halving of H and W).
    channels: int = attrs.field(default=32, validator=v.ge(1))
    #: ``discretized_gaussian``, ``discretized_logistic_mixture`` (images), ``bernoulli``,
    #: ``gaussian`` or ``auto`` (by data rank: discretized_gaussian for images).
    likelihood: str = attrs.field(
        default="auto", validator=v.in_(("auto", *likelihoods.LIKELIHOODS))
    )
    #: Components K of ``discretized_logistic_mixture`` (10, as NVAE on CIFAR-10).
    mixture_components: int = attrs.field(default=likelihoods.DEFAULT_COMPONENTS, validator=v.ge(1))
    #: ``prior_matching`` as ``-KL(q(z_T|z_{T-1}) || p(z_T))`` (the default: with T = 1 it is
    #: the VAE's term, value for value) instead of the lecture's sampled
    #: ``log p(z_T) - log q(z_T|z_{T-1})`` (same expectation, more variance).
    analytic_prior: bool = True

    @latent_dims.validator
    def _check_dims(self, _attribute: attrs.Attribute, value: tuple[int, ...] | None) -> None:
        if value is not None and len(value) not in (1, self.levels):
            raise InvalidParameterError(
                f"latent_dims has {len(value)} sizes {list(value)} but levels={self.levels}; "
                "give one size per level or a single int"
            )

    def sizes(self) -> tuple[int, ...]:
        """The latent size (units or channels) of each level 1..T."""
        if self.latent_dims is None:
            return tuple(max(2, 32 >> t) for t in range(self.levels))
        if len(self.latent_dims) == 1:
            return self.latent_dims * self.levels
        return self.latent_dims


def spatial_gaussian(params: Tensor) -> Distribution:
    """``N(mu, diag sigma^2)`` over feature maps from ``params: (B, 2C, h, w)`` =
    ``[mu, log sigma]`` along channels (log sigma clamped to [-10, 5], as
    :func:`genkit_vae.model.diagonal_gaussian`); batch ``(B,)``, event ``(C, h, w)``."""
    mu, log_sigma = params.chunk(2, dim=1)
    return diagonal_normal(mu, torch.exp(log_sigma.clamp(-10.0, 5.0)), 3)


def conv_stack(channels: Sequence[int], *, float32_head: bool = False) -> nn.Sequential:
    """3x3 convolutions ``channels[0] -> channels[1] -> ...`` with SiLU between them: the
    convolutional counterpart of :func:`genkit.nets.mlp`; keeps H and W. With ``float32_head``
    the last one is a :class:`~genkit.nets.Float32Conv2d` (for distribution parameters)."""
    layers: list[nn.Module] = []
    last = len(channels) - 2
    for i, (a, b) in enumerate(itertools.pairwise(channels)):
        if i:
            layers.append(nn.SiLU())
        layers.append(
            (Float32Conv2d if float32_head and i == last else nn.Conv2d)(a, b, 3, padding=1)
        )
    return nn.Sequential(*layers)


class ConvGaussianEncoder(Encoder):
    """``q(z_1|x)``: ``x: (B, C, H, W)`` -> a diagonal Gaussian over ``(c_1, H/2^n, W/2^n)``;
    a 3x3 convolution, ``n`` stride-2 4x4 convolutions doubling the channels, a 3x3 float32
    head (:class:`~genkit.nets.Float32Conv2d`) giving ``[mu, log sigma]``."""

    def __init__(self, in_channels: int, channels: int, halvings: int, latent: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        ch = channels
        for _ in range(halvings):
            layers += [nn.SiLU(), nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1)]
            ch *= 2
        layers += [nn.SiLU(), Float32Conv2d(ch, 2 * latent, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Distribution:
        return spatial_gaussian(self.net(x))


class ConvLikelihoodDecoder(Decoder):
    """``p(x|z_1)``: ``z_1: (B, c_1, H/2^n, W/2^n)`` -> the likelihood over ``(C, H, W)``; the
    mirror of :class:`ConvGaussianEncoder` with transposed convolutions, ending in a float32
    head (:class:`~genkit.nets.Float32Conv2d`): under bf16 autocast the likelihood's ``loc`` is
    not rounded to bf16, whose spacing near 1 is a bin."""

    def __init__(
        self,
        latent: int,
        channels: int,
        halvings: int,
        data_channels: int,
        lik: str,
        components: int = likelihoods.DEFAULT_COMPONENTS,
    ) -> None:
        super().__init__()
        self.lik, self.components = lik, components
        ch = channels * 2**halvings
        layers: list[nn.Module] = [nn.Conv2d(latent, ch, 3, padding=1)]
        for _ in range(halvings):
            layers += [nn.SiLU(), nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1)]
            ch //= 2
        out = likelihoods.num_outputs(lik, data_channels, components)
        layers += [nn.SiLU(), Float32Conv2d(ch, out, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Distribution:
        return likelihoods.likelihood(self.lik, self.net(z), 3, components=self.components)


class GaussianTransition(nn.Module):
    """A learned diagonal Gaussian ``N(mu(z), diag sigma^2(z))``: one step ``q(z_t|z_{t-1})``
    or ``p(z_{t-1}|z_t)`` of the chain. An MLP from ``z: (B, in_dim)`` to ``out_dim`` units,
    or, with ``conv=True``, ``depth`` hidden 3x3 convolutions of ``hidden`` channels from
    ``z: (B, in_dim, h, w)`` to ``out_dim`` channels at the same ``(h, w)``.

    The last layer is a float32 head (:class:`~genkit.nets.Float32Head`), as in the encoder and
    decoder: under bf16 autocast the chain's ``log q`` and ``log p`` of every level, and so the
    ``consistency`` term, are then float32; a bf16 ``mu`` would be off by up to ``2^-8 |mu|``, not
    small against a sharp ``sigma``."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int, depth: int, conv: bool = False
    ) -> None:
        super().__init__()
        make = conv_stack if conv else mlp
        self.net = make([in_dim, *[hidden] * depth, 2 * out_dim], float32_head=True)
        self.gaussian = spatial_gaussian if conv else diagonal_gaussian

    def forward(self, z: Tensor) -> Distribution:
        return self.gaussian(self.net(z))


class HVAE(LatentVariableModel):
    """The MHVAE; ``elbo(x)`` returns ``reconstruction``, ``prior_matching`` and
    ``consistency`` (zero when T = 1) with the extras ``consistency/level_t``.

    Parts: ``encoder`` = q(z_1|x), ``decoder`` = p(x|z_1), ``prior`` = p(z_T) = N(0, I);
    ``q_steps[t-2]`` = q(z_t|z_{t-1}) and ``p_steps[t-2]`` = p(z_{t-1}|z_t) for t = 2..T.
    ``latent_shapes[t-1]`` is the shape of one ``z_t``: ``(units,)`` or ``(channels, h, w)``.
    """

    def __init__(self, data_shape: tuple[int, ...], config: HVAEConfig | None = None) -> None:
        super().__init__(data_shape)
        self.config = cfg = config or HVAEConfig()
        self.latent_sizes = sizes = cfg.sizes()
        kind = net_kind(cfg.net, self.data_shape, "hvae")
        lik = likelihoods.resolve(cfg.likelihood, self.data_shape, "hvae")
        conv = cfg.transitions == "conv"
        if conv:
            _check_conv(cfg, self.data_shape, kind)
            c, h, w = self.data_shape
            n = num_downsamples(h, w)
            self.latent_shapes = tuple((s, h >> n, w >> n) for s in sizes)
            self.encoder = ConvGaussianEncoder(c, cfg.channels, n, sizes[0])
            self.decoder = ConvLikelihoodDecoder(
                sizes[0], cfg.channels, n, c, lik, cfg.mixture_components
            )
            width = cfg.channels * 2**n  # the trunk's width at the latents' resolution
        else:
            self.latent_shapes = tuple((s,) for s in sizes)
            bottom = VAEConfig(
                latent_dim=sizes[0],
                net=kind,
                hidden=cfg.hidden,
                depth=cfg.depth,
                channels=cfg.channels,
                likelihood=lik,
                mixture_components=cfg.mixture_components,
            )
            self.encoder = GaussianEncoder(self.data_shape, bottom, kind)
            self.decoder = LikelihoodDecoder(self.data_shape, bottom, kind, lik)
            width = cfg.hidden
        self.q_steps = nn.ModuleList(
            GaussianTransition(sizes[t - 2], sizes[t - 1], width, cfg.depth, conv)
            for t in range(2, cfg.levels + 1)
        )
        self.p_steps = nn.ModuleList(
            GaussianTransition(sizes[t - 1], sizes[t - 2], width, cfg.depth, conv)
            for t in range(2, cfg.levels + 1)
        )
        self.prior = StandardNormalPrior(self.latent_shapes[-1])
        self.default_estimator = ConsistencyELBO(analytic_prior=cfg.analytic_prior)

    def elbo(self, x: Tensor, estimator: str | ELBO | None = None, **params: Any) -> ELBOTerms:
        """The ELBO of ``x: (B, *data_shape)`` in the lecture's consistency form (see
        :class:`~genkit.markov.ConsistencyELBO`). ``params`` without ``estimator`` configure the
        default one, e.g. ``elbo(x, levels=1)``, keeping ``analytic_prior`` from the config."""
        if estimator is None and params:
            params = {"analytic_prior": self.config.analytic_prior, **params}
            return super().elbo(x, "consistency", **params)
        return super().elbo(x, estimator, **params)

    # -- the MarkovChain protocol ---------------------------------------------------------
    @property
    def num_latents(self) -> int:
        """``T``."""
        return self.config.levels

    def _level(self, t: Tensor) -> int:
        """The one level ``t: (B,)`` names; levels differ in size, so one call is one level."""
        level = int(t.reshape(-1)[0])
        if not 1 <= level <= self.num_latents or bool((t != level).any()):
            raise InvalidParameterError(
                f"hvae transitions take one level 1..{self.num_latents} per call, "
                f"got t = {t.unique().tolist()}"
            )
        return level

    def q_transition(self, z_prev: Tensor, t: Tensor) -> Distribution:
        """``q(z_t | z_{t-1})``; ``t = 1`` is the encoder ``q(z_1 | x)``."""
        level = self._level(t)
        return self.encoder(z_prev) if level == 1 else self.q_steps[level - 2](z_prev)

    def p_transition(self, z_t: Tensor, t: Tensor) -> Distribution:
        """``p(z_{t-1} | z_t)``; ``t = 1`` is the decoder ``p(x | z_1)``."""
        level = self._level(t)
        return self.decoder(z_t) if level == 1 else self.p_steps[level - 2](z_t)

    def prior_latent(self) -> Distribution:
        """``p(z_T) = N(0, I)``."""
        return self.prior()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral: ``z_T ~ p(z_T)``, ``z_{t-1} ~ p(z_{t-1}|z_t)`` down to ``z_1``, then
        ``x ~ p(x|z_1)``: ``(n, *data_shape)`` on the data scale."""
        z = sample(self.prior(), (check_count("n", n),), generator)
        for step in reversed(self.p_steps):
            z = sample(step(z), (), generator)
        return sample(self.decoder(z), (), generator)


def _check_conv(cfg: HVAEConfig, data_shape: tuple[int, ...], kind: str) -> None:
    """``transitions="conv"`` needs images and convolutional data networks."""
    if len(data_shape) != 3:
        raise InvalidParameterError(
            f"model 'hvae': transitions='conv' needs image data (C, H, W), got data_shape "
            f"{data_shape}; use transitions='mlp'"
        )
    if kind != "conv":
        raise InvalidParameterError(
            f"model 'hvae': transitions='conv' makes every latent a feature map, which "
            f"net='{cfg.net}' cannot encode; use net='conv' (or 'auto') with it, or "
            "transitions='mlp'"
        )
