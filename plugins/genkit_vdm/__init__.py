"""genkit's built-in variational diffusion model plugin (model name ``vdm``)."""
