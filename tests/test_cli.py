"""The ``genkit`` command line: help, version, plugins, and one-line errors."""

import subprocess
import sys

from click.testing import CliRunner

import genkit
from genkit.cli import cli


def test_help_and_version():
    runner = CliRunner()
    out = runner.invoke(cli, ["--help"])
    assert out.exit_code == 0 and "plugins" in out.output
    out = runner.invoke(cli, ["--version"])
    assert out.exit_code == 0 and genkit.__version__ in out.output


def test_plugins_lists_vae_with_its_package():
    out = CliRunner().invoke(cli, ["plugins"])
    assert out.exit_code == 0
    lines = out.output.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("vae "))
    assert "(package genkit" in lines[i]
    assert "models: vae" in lines[i + 1]
    # trainer hooks are listed with what a plugin registers (hvae logs per-level KLs by hooks)
    j = next(i for i, line in enumerate(lines) if line.startswith("hvae "))
    assert lines[j + 1 : j + 3] == ["    models: hvae", "    hooks: on_eval_end, on_step_end"]


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "genkit", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "genkit, version" in out.stdout
