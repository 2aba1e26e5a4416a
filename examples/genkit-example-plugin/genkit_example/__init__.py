"""An example third-party genkit plugin: the ``vamp_vae`` model (a VAE with a VampPrior or a
mixture-of-Gaussians prior) and the ``free_bits`` ELBO estimator.

genkit finds it through the entry point ``genkit_example = "genkit_example.plugin"`` of the
group ``genkit``; nothing in genkit imports it by name.
"""

from genkit_example.free_bits import FreeBitsELBO
from genkit_example.vamp import (
    GaussianMixturePrior,
    VampPrior,
    VampVAE,
    VampVAEConfig,
    sample_mixture,
)

__all__ = [
    "FreeBitsELBO",
    "GaussianMixturePrior",
    "VampPrior",
    "VampVAE",
    "VampVAEConfig",
    "sample_mixture",
]
