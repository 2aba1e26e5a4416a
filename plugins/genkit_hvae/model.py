"""The Markovian hierarchical VAE of the lecture (model name ``hvae``).

T levels of latents, learned Gaussian transitions in both directions::

    p(x, z_{1:T}) = p(z_T) p(x|z_1) prod_{t=2}^T p(z_{t-1}|z_t),   p(z_T) = N(0, I)
    q(z_{1:T}|x)  = q(z_1|x) prod_{t=2}^T q(z_t|z_{t-1})

``q(z_1|x)`` is the VAE's encoder and ``p(x|z_1)`` its decoder likelihood (the same classes,
so with T = 1 a ``vae`` state dict loads as is); ``q(z_t|z_{t-1})`` and ``p(z_{t-1}|z_t)`` for
t >= 2 are MLPs giving diagonal Gaussians. The model is itself a
:class:`genkit.markov.MarkovChain` and its ELBO is the lecture's consistency form
(:class:`genkit.markov.ConsistencyELBO`).
"""

from __future__ import annotations

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
from genkit.distributions import sample
from genkit.errors import InvalidParameterError
from genkit.markov import ConsistencyELBO
from genkit.model import LatentVariableModel, StandardNormalPrior
from genkit.nets import mlp


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
    #: Latent size per level: a list of T ints, one int for every level, or ``None`` for 32
    #: halved at each level above the first (at least 2): ``[32, 16]`` with T = 2.
    latent_dims: Any = attrs.field(default=None, converter=_latent_dims)
    #: Network of ``q(z_1|x)`` and ``p(x|z_1)``: ``mlp``, ``conv`` (images) or ``auto``.
    net: str = attrs.field(default="auto", validator=v.in_(("auto", "mlp", "conv")))
    #: Width of MLP hidden layers (data MLPs and the latent transitions).
    hidden: int = attrs.field(default=256, validator=v.ge(1))
    #: Hidden layers of every MLP.
    depth: int = attrs.field(default=2, validator=v.ge(1))
    #: Base channel count of the convolutional trunks.
    channels: int = attrs.field(default=32, validator=v.ge(1))
    #: ``discretized_gaussian``, ``bernoulli``, ``gaussian`` or ``auto`` (by data rank).
    likelihood: str = attrs.field(
        default="auto", validator=v.in_(("auto", *likelihoods.LIKELIHOODS))
    )
    #: ``prior_matching`` as ``-KL(q(z_T|z_{T-1}) || p(z_T))`` instead of the lecture's sampled
    #: ``log p(z_T) - log q(z_T|z_{T-1})`` (same expectation, less variance).
    analytic_prior: bool = False

    @latent_dims.validator
    def _check_dims(self, _attribute: attrs.Attribute, value: tuple[int, ...] | None) -> None:
        if value is not None and len(value) not in (1, self.levels):
            raise InvalidParameterError(
                f"latent_dims has {len(value)} sizes {list(value)} but levels={self.levels}; "
                "give one size per level or a single int"
            )

    def sizes(self) -> tuple[int, ...]:
        """The latent size of each level 1..T."""
        if self.latent_dims is None:
            return tuple(max(2, 32 >> t) for t in range(self.levels))
        if len(self.latent_dims) == 1:
            return self.latent_dims * self.levels
        return self.latent_dims


class GaussianTransition(nn.Module):
    """A learned diagonal Gaussian ``N(mu(z), diag sigma^2(z))`` over ``out_dim`` units given
    ``z: (B, in_dim)``: one step ``q(z_t|z_{t-1})`` or ``p(z_{t-1}|z_t)`` of the chain."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.net = mlp([in_dim, *[hidden] * depth, 2 * out_dim])

    def forward(self, z: Tensor) -> Distribution:
        return diagonal_gaussian(self.net(z))


class HVAE(LatentVariableModel):
    """The MHVAE; ``elbo(x)`` returns ``reconstruction``, ``prior_matching`` and
    ``consistency`` (zero when T = 1) with the extras ``consistency/level_t``.

    Parts: ``encoder`` = q(z_1|x), ``decoder`` = p(x|z_1), ``prior`` = p(z_T) = N(0, I);
    ``q_steps[t-2]`` = q(z_t|z_{t-1}) and ``p_steps[t-2]`` = p(z_{t-1}|z_t) for t = 2..T.
    """

    def __init__(self, data_shape: tuple[int, ...], config: HVAEConfig | None = None) -> None:
        super().__init__(data_shape)
        self.config = cfg = config or HVAEConfig()
        self.latent_sizes = sizes = cfg.sizes()
        kind = net_kind(cfg.net, self.data_shape, "hvae")
        lik = likelihoods.resolve(cfg.likelihood, self.data_shape)
        bottom = VAEConfig(
            latent_dim=sizes[0],
            net=kind,
            hidden=cfg.hidden,
            depth=cfg.depth,
            channels=cfg.channels,
            likelihood=lik,
        )
        self.encoder = GaussianEncoder(self.data_shape, bottom, kind)
        self.decoder = LikelihoodDecoder(self.data_shape, bottom, kind, lik)
        self.q_steps = nn.ModuleList(
            GaussianTransition(sizes[t - 2], sizes[t - 1], cfg.hidden, cfg.depth)
            for t in range(2, cfg.levels + 1)
        )
        self.p_steps = nn.ModuleList(
            GaussianTransition(sizes[t - 1], sizes[t - 2], cfg.hidden, cfg.depth)
            for t in range(2, cfg.levels + 1)
        )
        self.prior = StandardNormalPrior((sizes[-1],))
        self.default_estimator = ConsistencyELBO(analytic_prior=cfg.analytic_prior)

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
        z = sample(self.prior(), (n,), generator)
        for step in reversed(self.p_steps):
            z = sample(step(z), (), generator)
        return sample(self.decoder(z), (), generator)
