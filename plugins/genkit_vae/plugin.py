"""Registers the ``vae`` model through the ``genkit`` entry-point group, as any plugin would."""

from __future__ import annotations

import genkit
from genkit_vae.model import VAE, VAEConfig


@genkit.hookimpl
def register_models(register) -> None:
    register(
        "vae",
        VAE,
        config=VAEConfig,
        description="Gaussian VAE: q(z|x) = N(mu(x), diag sigma^2(x)), p(z) = N(0, I)",
    )
