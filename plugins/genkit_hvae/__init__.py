"""genkit's built-in Markovian hierarchical VAE plugin (model name ``hvae``)."""
