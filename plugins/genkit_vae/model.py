"""The Gaussian VAE of the lecture (Kingma & Welling 2014).

``q(z|x) = N(z; mu(x), diag sigma^2(x))``, ``p(z) = N(0, I)``, and a decoder likelihood
``p(x|z)`` chosen by ``likelihood``::

    ELBO = E_{q(z|x)}[log p(x|z)] - KL(q(z|x) || p(z))
"""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import Tensor, nn
from torch.distributions import Distribution

from genkit import likelihoods
from genkit.distributions import diagonal_normal, sample
from genkit.elbo import StandardELBO
from genkit.errors import InvalidParameterError
from genkit.model import (
    Decoder,
    Encoder,
    LatentVariableModel,
    StandardNormalPrior,
    check_count,
)
from genkit.nets import ConvDecoderTrunk, ConvEncoderTrunk, mlp


@attrs.frozen(kw_only=True)
class VAEConfig:
    """Parameters of ``create_model("vae", data_shape, **params)``."""

    latent_dim: int = attrs.field(default=16, validator=v.ge(1))
    #: ``mlp``, ``conv`` (images only) or ``auto`` (conv for images, mlp for vectors).
    net: str = attrs.field(default="auto", validator=v.in_(("auto", "mlp", "conv")))
    #: Width of MLP hidden layers.
    hidden: int = attrs.field(default=256, validator=v.ge(1))
    #: Hidden layers of the MLPs.
    depth: int = attrs.field(default=2, validator=v.ge(1))
    #: Base channel count of the convolutional trunks (doubled at each downsampling).
    channels: int = attrs.field(default=32, validator=v.ge(1))
    #: ``discretized_gaussian``, ``discretized_logistic_mixture`` (images), ``bernoulli``,
    #: ``gaussian`` or ``auto`` (by data rank: discretized_gaussian for images).
    likelihood: str = attrs.field(
        default="auto", validator=v.in_(("auto", *likelihoods.LIKELIHOODS))
    )
    #: Components K of ``discretized_logistic_mixture`` (10, as NVAE on CIFAR-10).
    mixture_components: int = attrs.field(default=likelihoods.DEFAULT_COMPONENTS, validator=v.ge(1))
    #: Monte-Carlo samples of z for the reconstruction term of ``elbo(x)``.
    samples: int = attrs.field(default=1, validator=v.ge(1))


def net_kind(net: str, data_shape: tuple[int, ...], model: str = "vae") -> str:
    """``auto`` -> ``conv`` for images ``(C, H, W)``, ``mlp`` for vectors; ``conv`` on vectors
    is an :class:`InvalidParameterError` naming ``model``."""
    if net == "auto":
        return "conv" if len(data_shape) == 3 else "mlp"
    if net == "conv" and len(data_shape) != 3:
        raise InvalidParameterError(
            f"model '{model}': net='conv' needs image data (C, H, W), got data_shape "
            f"{data_shape}; use net='mlp'"
        )
    return net


def diagonal_gaussian(params: Tensor) -> Distribution:
    """``N(mu, diag sigma^2)`` from ``params: (B, 2L)`` = ``[mu, log sigma]`` (log sigma clamped
    to [-10, 5]); batch ``(B,)``, event ``(L,)``."""
    mu, log_sigma = params.chunk(2, dim=-1)
    return diagonal_normal(mu, torch.exp(log_sigma.clamp(-10.0, 5.0)), 1)


class GaussianEncoder(Encoder):
    """``q(z|x) = N(mu(x), diag sigma^2(x))``; ``x: (B, *data_shape)`` -> batch ``(B,)``,
    event ``(latent_dim,)``. The layer giving ``[mu, log sigma]`` is a float32 head
    (:class:`genkit.nets.Float32Head`), so under bf16 autocast ``q``, ``z`` and the KL are
    float32."""

    def __init__(self, data_shape: tuple[int, ...], cfg: VAEConfig, kind: str) -> None:
        super().__init__()
        if kind == "conv":
            self.net = ConvEncoderTrunk(
                data_shape, cfg.channels, 2 * cfg.latent_dim, float32_head=True
            )
        else:
            d = int(torch.Size(data_shape).numel())
            self.net = nn.Sequential(
                nn.Flatten(),
                mlp([d, *[cfg.hidden] * cfg.depth, 2 * cfg.latent_dim], float32_head=True),
            )

    def forward(self, x: Tensor) -> Distribution:
        return diagonal_gaussian(self.net(x))


class LikelihoodDecoder(Decoder):
    """``p(x|z)``: a network from ``z: (B, latent_dim)`` to the likelihood's parameters
    ``(B, P, *rest)`` for data ``(C, *rest)``, ``P = likelihoods.num_outputs(lik, C, K)`` (laid
    out as :mod:`genkit.likelihoods` says), whose last layer is a float32 head
    (:class:`genkit.nets.Float32Head`): under bf16 autocast the ``loc`` of a discretized
    likelihood is not rounded to bf16, whose spacing near 1 is a bin."""

    def __init__(self, data_shape: tuple[int, ...], cfg: VAEConfig, kind: str, lik: str) -> None:
        super().__init__()
        self.data_shape, self.lik = data_shape, lik
        self.components = cfg.mixture_components
        c, *rest = data_shape
        p = likelihoods.num_outputs(lik, c, self.components)
        if kind == "conv":
            self.net = ConvDecoderTrunk(
                cfg.latent_dim, data_shape, cfg.channels, p, float32_head=True
            )
        else:
            out = p * int(torch.Size(rest).numel())
            self.net = mlp([cfg.latent_dim, *[cfg.hidden] * cfg.depth, out], float32_head=True)

    def forward(self, z: Tensor) -> Distribution:
        params = self.net(z)
        if params.dim() == 2 and len(self.data_shape) > 1:
            # MLP on images: (B, P*H*W) -> (B, P, H, W), P-major as a conv head's channels
            _, *rest = self.data_shape
            params = params.view(params.shape[0], -1, *rest)
        return likelihoods.likelihood(
            self.lik, params, len(self.data_shape), components=self.components
        )


class VAE(LatentVariableModel):
    """The Gaussian VAE; ``elbo(x)`` returns ``reconstruction`` and ``prior_matching``."""

    def __init__(self, data_shape: tuple[int, ...], config: VAEConfig | None = None) -> None:
        super().__init__(data_shape)
        self.config = cfg = config or VAEConfig()
        kind = net_kind(cfg.net, self.data_shape)
        lik = likelihoods.resolve(cfg.likelihood, self.data_shape, "vae")
        self.encoder = GaussianEncoder(self.data_shape, cfg, kind)
        self.decoder = LikelihoodDecoder(self.data_shape, cfg, kind, lik)
        self.prior = StandardNormalPrior((cfg.latent_dim,))
        self.default_estimator = StandardELBO(samples=cfg.samples)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``z ~ p(z)``, then ``x ~ p(x|z)``: ``(n, *data_shape)`` on the data scale."""
        z = sample(self.prior(), (check_count("n", n),), generator)
        return sample(self.decoder(z), (), generator)
