"""``genkit data``: convert sources into genkit's HDF5 layout and describe files."""

from __future__ import annotations

from pathlib import Path

import click

from genkit.errors import GenkitError


class _DataGroup(click.Group):
    """Turns a :class:`GenkitError` into one ``Error: ...`` line (also when used alone)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GenkitError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_DataGroup)
def data() -> None:
    """Convert data into genkit's HDF5 layout and inspect data files."""


@data.command("convert")
@click.argument("source")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--test-fraction",
    type=float,
    default=None,
    help="Fraction held out as 'test' when the source has no test split [default: 0.1].",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Seed of the split and order.",
)
@click.option(
    "--layout",
    type=click.Choice(["auto", "nhwc", "nchw"]),
    default="auto",
    show_default=True,
    help="Axis order of rank-4 .npy/.npz image arrays.",
)
@click.option("--keep-order", is_flag=True, help="Keep the source's row order.")
@click.option(
    "--compression",
    type=click.Choice(["none", "gzip", "lzf"]),
    default="none",
    show_default=True,
    help="HDF5 chunk compression (none reads fastest).",
)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert_cmd(
    source: str,
    out: Path,
    test_fraction: float | None,
    seed: int,
    layout: str,
    keep_order: bool,
    compression: str,
    force: bool,
) -> None:
    """Convert SOURCE to OUT.h5.

    SOURCE: an IDX folder or file (MNIST style, plain or .gz), a CIFAR-10 python-batch folder
    or .tar.gz, a .npy/.npz file, a folder of images (one sub-folder per class), or
    builtin:NAME.
    """
    from genkit.data.convert import convert, describe

    path = convert(
        source,
        out,
        test_fraction=test_fraction,
        seed=seed,
        layout=layout,
        force=force,
        keep_order=keep_order,
        compression=None if compression == "none" else compression,
    )
    click.echo(f"wrote {path}")
    click.echo(describe(path))


@data.command("info")
@click.argument("file")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Built-in dataset cache (default $GENKIT_CACHE/datasets or ~/.cache/genkit/datasets).",
)
def info_cmd(file: str, cache_dir: Path | None) -> None:
    """Print FILE's splits, shapes, dtypes, value ranges, labels and attributes.

    FILE is an HDF5 file or builtin:NAME (converted into the cache first).
    """
    from genkit.data.builtin import builtin_path
    from genkit.data.convert import inspect_file
    from genkit.data.errors import LayoutError

    path = (
        builtin_path(file.removeprefix("builtin:"), cache_dir)
        if file.startswith("builtin:")
        else file
    )
    text, problems = inspect_file(path)
    click.echo(text)
    if problems:
        raise LayoutError(f"'{path}' cannot be trained on: {'; '.join(problems)}")


@data.command("list")
def list_cmd() -> None:
    """List the built-in datasets (usable as builtin:NAME)."""
    from genkit.registry import get_catalog

    catalog = get_catalog()
    for name in catalog.names("datasets"):
        reg = catalog.get("datasets", name)
        click.echo(f"{name}\t{reg.plugin}\t{reg.description}")
