"""``genkit export RUN --format diffusers OUT``: a run's model in another library's format."""

from __future__ import annotations

from pathlib import Path

import click

FORMATS = ("diffusers",)


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="diffusers", show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Default: the latest.")
@click.option("--no-ema", is_flag=True, help="Export the raw weights instead of the EMA.")
@click.option("--last", is_flag=True, help="A keep_best run: the last EMA weights, not the best.")
def export(
    run_dir: Path, out: Path, fmt: str, checkpoint: Path | None, no_ema: bool, last: bool
) -> None:
    """Write a run's model in another library's format. ``diffusers``: a discrete-time VDM
    trained with denoiser="diffusers" as a DDPMPipeline folder (UNet2DModel + DDPMScheduler
    with genkit's betas, prediction and variance type), written to a temporary folder and
    renamed; load it with DDPMPipeline.from_pretrained(OUT).

    \b
    genkit export runs/vdm --format diffusers exported/vdm
    """
    from genkit.diffusers_io import export_diffusers
    from genkit.training.cli import load_run

    model, info, path = load_run(
        run_dir, checkpoint=checkpoint, use_ema=not no_ema, device="cpu", last=last
    )
    export_diffusers(model, out)
    click.echo(f"wrote {out} ({fmt}; {info['weights']} weights of {path.name})")
