"""genkit's built-in Gaussian VAE plugin (model name ``vae``)."""

from genkit_vae.model import VAE, VAEConfig

__all__ = ["VAE", "VAEConfig"]
