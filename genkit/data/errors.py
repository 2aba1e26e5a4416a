"""The specific data errors. Each is a :class:`~genkit.errors.DataError` (the CLI prints its
one-line message and exits 1) and also the matching built-in exception where one exists, so
``except FileNotFoundError`` works too."""

from __future__ import annotations

from genkit import errors
from genkit.errors import DataError


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or source path that does not exist."""


class NotHDF5Error(DataError):
    """A path that exists but is not an HDF5 file."""


class CorruptFileError(DataError, OSError):
    """An HDF5 (or source) file that is truncated or whose contents cannot be read."""


class MissingSplitError(DataError, KeyError):
    """A split or dataset that the file does not hold (the message names those it holds)."""


class LayoutError(DataError, ValueError):
    """Arrays that break the layout: wrong rank or dtype, an empty split, non-finite values,
    a label count that does not match."""


class SourceFormatError(DataError, ValueError):
    """A conversion source in a format genkit cannot read (bad IDX header, unknown keys, ...)."""


class OutputError(DataError, errors.OutputError):
    """An output path that exists (without ``force``) or a folder that cannot be written.

    A :class:`genkit.errors.OutputError` (what the trainer raises for its outputs) and, as
    before, a :class:`DataError` and an ``OSError``."""
