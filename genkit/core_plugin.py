"""genkit's own plugin: the ELBO estimators that work for any single-latent model."""

from __future__ import annotations

from genkit.elbo import IWAE, StandardELBO
from genkit.hookspecs import hookimpl
from genkit.markov import ConsistencyELBO


@hookimpl
def register_estimators(register) -> None:
    register("elbo", StandardELBO, description="reconstruction + analytic prior matching")
    register("iwae", IWAE, description="importance-weighted bound with k samples (Burda et al.)")
    register(
        "consistency",
        ConsistencyELBO,
        description="Markov-chain ELBO: reconstruction + prior matching + consistency (MHVAE, VDM)",
    )
