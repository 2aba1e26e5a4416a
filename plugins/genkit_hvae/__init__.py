"""genkit's built-in Markovian hierarchical VAE plugin (model name ``hvae``)."""

from genkit.markov import active_units
from genkit_hvae.model import HVAE, GaussianTransition, HVAEConfig

__all__ = ["HVAE", "GaussianTransition", "HVAEConfig", "active_units"]
