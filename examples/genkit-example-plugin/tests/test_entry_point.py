"""The package is found through the ``genkit`` entry-point group, as any third party's is."""

from click.testing import CliRunner

import genkit
from genkit.cli import cli


def test_the_model_and_the_estimator_are_found_through_the_entry_point():
    assert "vamp_vae" in genkit.available_models()
    assert "free_bits" in genkit.available_estimators()
    # a fresh manager that loads entry points only (no plugin handed over in code)
    plugins = {p.name: p for p in genkit.make_plugin_manager(load_entrypoints=True).plugins()}
    ours = plugins["genkit_example"]
    assert ours.package == "genkit-example-plugin"
    assert ours.registered == {"models": ["vamp_vae"], "estimators": ["free_bits"]}


def test_without_entry_points_genkit_knows_neither_name():
    catalog = genkit.make_plugin_manager(load_entrypoints=False)
    assert "vamp_vae" not in catalog.names("models")
    assert "free_bits" not in catalog.names("estimators")


def test_genkit_plugins_lists_it():
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "genkit_example  (package genkit-example-plugin 0.1.0)" in result.output
    assert "models: vamp_vae" in result.output and "estimators: free_bits" in result.output
