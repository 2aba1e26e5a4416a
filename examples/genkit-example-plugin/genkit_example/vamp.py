"""A VAE with a learned prior: the VampPrior (Tomczak & Welling 2018) or a mixture of Gaussians.

The encoder ``q(z|x) = N(mu(x), diag sigma^2(x))`` and the decoder likelihood ``p(x|z)`` are the
``vae`` plugin's; only the prior changes, to a uniform mixture of ``K`` diagonal Gaussians::

    prior="vamp":  p(z) = (1/K) sum_k q(z | u_k)            K learned pseudo-inputs u_k ~ x
    prior="mog":   p(z) = (1/K) sum_k N(z; m_k, diag s_k^2)  K learned means and scales

The ELBO keeps the lecture's two terms. ``KL(q(z|x) || p(z))`` has no closed form when ``p`` is
a mixture, so ``prior_matching`` is its Monte-Carlo estimate on the same draws as
``reconstruction``::

    reconstruction = mean_s log p(x | z_s)                       z_s ~ q(z|x), s = 1..S
    prior_matching = mean_s [log p(z_s) - log q(z_s | x)]        (-KL, unbiased)
    log p(z)       = logsumexp_k log N(z; mu_k, sigma_k^2) - log K

genkit's ``StandardELBO`` already computes exactly this: it falls back to the Monte-Carlo form
when ``torch.distributions.kl_divergence`` has no entry for the pair.
"""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from genkit_vae.model import GaussianEncoder, LikelihoodDecoder, VAEConfig, net_kind
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, MixtureSameFamily

import genkit
from genkit import likelihoods
from genkit.distributions import diagonal_normal, sample
from genkit.model import check_count

PRIORS = ("vamp", "mog")
#: Pseudo-inputs start as small noise around 0, the middle of the data scale [-1, 1].
PSEUDO_INPUT_INIT_STD = 0.1


@attrs.frozen(kw_only=True)
class VampVAEConfig(VAEConfig):
    """Parameters of ``create_model("vamp_vae", data_shape, **params)``: every one of the
    ``vae``'s (``latent_dim``, ``net``, ``hidden``, ``likelihood``, ``samples``, ...: this is a
    subclass of its ``VAEConfig``) and the prior's."""

    #: ``vamp``: ``(1/K) sum_k q(z|u_k)`` with learned pseudo-inputs; ``mog``: K learned Gaussians.
    prior: str = attrs.field(default="vamp", validator=v.in_(PRIORS))
    #: ``K``: pseudo-inputs (``vamp``) or Gaussians (``mog``), each of weight ``1/K``. Each
    #: ``prior()`` call runs the encoder on the K pseudo-inputs.
    prior_components: int = attrs.field(default=50, validator=v.ge(1))


def uniform_mixture(components: Independent) -> MixtureSameFamily:
    """``(1/K) sum_k components_k``: from diagonal Gaussians of batch ``(K,)``, event ``(L,)``, a
    distribution of batch ``()`` and event ``(L,)``."""
    k = components.batch_shape[-1]
    logits = components.base_dist.loc.new_zeros(k)  # equal weights 1/K, on the right device
    return MixtureSameFamily(Categorical(logits=logits), components)


def sample_mixture(
    mixture: MixtureSameFamily, n: int, generator: torch.Generator | None = None
) -> Tensor:
    """``n`` draws ``(n, L)`` from a mixture of diagonal Gaussians of batch shape ``()``, all
    randomness from ``generator``: the component index ``k ~ Categorical``, then
    ``z ~ N(mu_k, diag sigma_k^2)`` (``MixtureSameFamily.sample`` takes no generator)."""
    k = torch.multinomial(
        mixture.mixture_distribution.probs, n, replacement=True, generator=generator
    )
    normal = mixture.component_distribution.base_dist  # loc, scale: (K, L)
    return sample(diagonal_normal(normal.loc[k], normal.scale[k], 1), (), generator)


class VampPrior(genkit.Prior):
    """``p(z) = (1/K) sum_k q(z | u_k)``: the encoder (shared with the model) applied to ``K``
    learned pseudo-inputs ``u_k`` shaped like the data. The prior is the aggregate posterior of
    the pseudo-inputs, the optimal prior's form ``(1/N) sum_n q(z | x_n)`` with K << N."""

    def __init__(self, encoder: genkit.Encoder, data_shape: tuple[int, ...], k: int) -> None:
        super().__init__()
        self.encoder = encoder  # the model's own encoder: one set of weights, two roles
        self.pseudo_inputs = nn.Parameter(PSEUDO_INPUT_INIT_STD * torch.randn(k, *data_shape))

    def forward(self) -> MixtureSameFamily:
        return uniform_mixture(self.encoder(self.pseudo_inputs))  # q(z | u_k): batch (K,)


class GaussianMixturePrior(genkit.Prior):
    """``p(z) = (1/K) sum_k N(z; m_k, diag s_k^2)`` with learned ``m_k`` (start ``N(0, I)``) and
    ``log s_k`` (start 0, clamped to [-10, 5] like the encoder's)."""

    def __init__(self, latent_dim: int, k: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.randn(k, latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(k, latent_dim))

    def forward(self) -> MixtureSameFamily:
        scale = torch.exp(self.log_scale.clamp(-10.0, 5.0))
        return uniform_mixture(diagonal_normal(self.loc, scale, 1))


class VampVAE(genkit.LatentVariableModel):
    """The Gaussian VAE with a learned mixture prior; ``elbo(x)`` returns ``reconstruction`` and
    ``prior_matching`` (Monte Carlo), ``sample(n)`` draws ``z ~ p(z)`` then ``x ~ p(x|z)``."""

    def __init__(self, data_shape: tuple[int, ...], config: VampVAEConfig | None = None) -> None:
        super().__init__(data_shape)
        self.config = cfg = config or VampVAEConfig()
        kind = net_kind(cfg.net, self.data_shape, "vamp_vae")
        lik = likelihoods.resolve(cfg.likelihood, self.data_shape)
        self.encoder = GaussianEncoder(self.data_shape, cfg, kind)
        self.decoder = LikelihoodDecoder(self.data_shape, cfg, kind, lik)
        if cfg.prior == "vamp":
            self.prior = VampPrior(self.encoder, self.data_shape, cfg.prior_components)
        else:
            self.prior = GaussianMixturePrior(cfg.latent_dim, cfg.prior_components)
        self.default_estimator = genkit.StandardELBO(samples=cfg.samples)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``z ~ p(z)``, then ``x ~ p(x|z)``: ``(n, *data_shape)`` on the data scale."""
        z = sample_mixture(self.prior(), check_count("n", n), generator)
        return sample(self.decoder(z), (), generator)
