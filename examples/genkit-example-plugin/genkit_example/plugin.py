"""Registers ``vamp_vae`` and ``free_bits`` through the ``genkit`` entry-point group."""

from __future__ import annotations

import genkit
from genkit_example.free_bits import FreeBitsELBO
from genkit_example.vamp import VampVAE, VampVAEConfig


@genkit.hookimpl
def register_models(register) -> None:
    register(
        "vamp_vae",
        VampVAE,
        config=VampVAEConfig,
        description="VAE with a learned prior: VampPrior (1/K) sum_k q(z|u_k), or a mixture of Gaussians",
    )


@genkit.hookimpl
def register_estimators(register) -> None:
    register(
        "free_bits",
        FreeBitsELBO,
        description="the ELBO's terms plus the free-bits surrogate -max(lambda, KL) (Kingma et al. 2016)",
    )
