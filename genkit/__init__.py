"""genkit: latent-variable generative models (VAE, MHVAE, VDM) trained by their ELBO.

The public contract (see ``docs/``): ``available_models``, ``create_model``, the abstract
``Encoder``/``Decoder``/``Prior``/``ELBO`` interfaces, ``LatentVariableModel``, ``ELBOTerms``
and ``hookimpl`` for plugins.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from genkit.diffusers_io import from_diffusers
from genkit.elbo import ELBO, IWAE, ELBOTerms, StandardELBO
from genkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GenkitError,
    IncompatibleEstimatorError,
    IncompatibleModelError,
    InvalidParameterError,
    NonFiniteError,
    OutputError,
    PluginError,
    UnknownModelError,
    UnknownNameError,
)
from genkit.hookspecs import hookimpl
from genkit.model import Decoder, Encoder, LatentVariableModel, Prior, StandardNormalPrior
from genkit.registry import (
    available_estimators,
    available_models,
    create_estimator,
    create_model,
    make_plugin_manager,
)

try:
    __version__ = version("genkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ELBO",
    "IWAE",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Decoder",
    "ELBOTerms",
    "Encoder",
    "GenkitError",
    "IncompatibleEstimatorError",
    "IncompatibleModelError",
    "InvalidParameterError",
    "LatentVariableModel",
    "NonFiniteError",
    "OutputError",
    "PluginError",
    "Prior",
    "StandardELBO",
    "StandardNormalPrior",
    "UnknownModelError",
    "UnknownNameError",
    "__version__",
    "available_estimators",
    "available_models",
    "create_estimator",
    "create_model",
    "from_diffusers",
    "hookimpl",
    "make_plugin_manager",
]
