"""The exceptions genkit raises. Every one is a :class:`GenkitError`; the CLI prints the
message alone (no traceback) and exits non-zero."""

from __future__ import annotations


class GenkitError(Exception):
    """Base class of every error genkit raises on purpose."""

    def __str__(self) -> str:  # KeyError subclasses would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class UnknownNameError(GenkitError, KeyError):
    """A name (model, estimator, dataset, schedule, ...) that no plugin registered."""


class UnknownModelError(UnknownNameError):
    """``create_model`` was given a name that no plugin registered."""


class InvalidParameterError(GenkitError, ValueError):
    """A parameter a model, estimator or config does not accept, or a bad value for it."""


class ConfigError(InvalidParameterError):
    """A recipe or config file/mapping that does not match its schema."""


class PluginError(GenkitError):
    """A plugin that failed to load or misbehaved while registering (named in the message)."""


class IncompatibleEstimatorError(GenkitError, TypeError):
    """An ELBO estimator was asked to work on a model that lacks what it needs."""


class DataError(GenkitError):
    """A data file or source that cannot be read as the layout requires."""


class OutputError(GenkitError, OSError):
    """An output that cannot be written: a checkpoint, run config, image grid, samples or data
    file whose folder is missing or not writable, a disk that is full, or (without ``force``)
    a path that already exists. Also an ``OSError``, so ``except OSError`` works too."""


class CheckpointError(GenkitError):
    """A checkpoint that is missing, corrupt, truncated or belongs to another model."""


class NonFiniteError(GenkitError, FloatingPointError):
    """Training produced a NaN or infinite loss, ELBO term or gradient."""


class IncompatibleModelError(GenkitError, ValueError):
    """A model from another library (a diffusers pipeline, say) that genkit cannot read as one
    of its own, or a genkit model that cannot be written in another library's format."""


class MissingDependencyError(GenkitError, ImportError):
    """An optional dependency (an extra such as ``genkit[diffusers]``) that is not installed."""
