"""The ``genkit`` command line (click).

Sub-commands live in the modules that own their work and are imported only when invoked, so
``genkit --help`` stays fast. A :class:`~genkit.errors.GenkitError` is printed as one line,
without a traceback, and the command exits with status 1.
"""

from __future__ import annotations

import importlib
import sys

import click

from genkit.errors import GenkitError

#: command name -> "module:attribute" of a click command; each owner module adds its line.
COMMANDS: dict[str, str] = {
    "plugins": "genkit.cli_plugins:plugins",
    "train": "genkit.training.cli:train",
    "eval": "genkit.training.cli:eval_",
    "sample": "genkit.training.cli:sample",
    "data": "genkit.data.cli:data",
    "run": "genkit.recipes.cli:run",
    "export": "genkit.cli_export:export",
}


class LazyGroup(click.Group):
    """A group that imports each sub-command's module only when it is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS:
            module, attr = COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GenkitError as exc:
            raise click.ClickException(str(exc)) from None
        except (MemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise click.ClickException(
                f"out of memory ({first}); ask for less at once (-n, --samples, --batch-size)"
            ) from None


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the host's or a GPU's out-of-memory error (torch raises
    ``OutOfMemoryError`` on CUDA, a ``RuntimeError`` on the CPU)."""
    text = str(exc)
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in text
        or "out of memory" in text.lower()
    )


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="genkit", prog_name="genkit")
def cli() -> None:
    """genkit: train and compare latent-variable generative models (VAE, MHVAE, VDM) by
    their ELBO, on one likelihood scale."""


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="genkit", args=sys.argv[1:])
