"""genkit's built-in Markovian hierarchical VAE plugin (model name ``hvae``)."""

from genkit.markov import active_units
from genkit_hvae.model import HVAE, GaussianTransition, HVAEConfig
from genkit_hvae.plugin import level_kl

__all__ = ["HVAE", "GaussianTransition", "HVAEConfig", "active_units", "level_kl"]
