"""``genkit plugins``: every plugin with its package, version and what it registers."""

from __future__ import annotations

import json

import click

from genkit.registry import KINDS, get_catalog


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def plugins(as_json: bool) -> None:
    """List installed plugins and the models, estimators, datasets and schedules each registers
    (and the trainer hooks it implements); report any plugin that failed to load."""
    catalog = get_catalog()
    infos = catalog.plugins()
    if as_json:
        payload = {
            "plugins": [
                {"name": p.name, "package": p.package, "version": p.version, **p.registered}
                for p in infos
            ],
            "failures": [
                {"plugin": f.plugin, "package": f.package, "reason": f.reason}
                for f in catalog.failures
            ],
        }
        click.echo(json.dumps(payload, indent=2))
        return
    for p in infos:
        click.echo(f"{p.name}  (package {p.package} {p.version})")
        for kind in (*KINDS, "hooks"):
            if p.registered.get(kind):
                click.echo(f"    {kind}: {', '.join(p.registered[kind])}")
    for f in catalog.failures:
        click.echo(f"FAILED {f}", err=True)
