"""Plugin discovery through the ``genkit`` entry-point group, isolation of broken plugins, and
the registry's errors."""

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import genkit
from genkit.registry import make_plugin_manager, reset_catalog

GOOD_PLUGIN = """
import genkit
from genkit_vae import VAE, VAEConfig


@genkit.hookimpl
def register_models(register):
    register("tiny-vae", lambda shape, cfg: VAE(shape, cfg), config=VAEConfig,
             description="a third party's VAE")
"""


def install_fake_distribution(
    root: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str]
):
    """Write importable modules plus a ``.dist-info`` with entry points under ``root``: what pip
    leaves behind, so ``importlib.metadata`` finds the plugin exactly as it finds a real one."""
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[genkit]\n{lines}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("GENKIT_LOAD_PLUGINS", raising=False)
    reset_catalog()
    yield tmp_path
    reset_catalog()
    for name in list(sys.modules):
        if name.startswith("thirdparty_"):
            del sys.modules[name]


def test_builtin_vae_comes_from_its_entry_point():
    catalog = make_plugin_manager()
    reg = catalog.get("models", "vae")
    assert reg.plugin == "vae"
    assert catalog.sources["vae"][0] == "genkit"
    assert "vae" in genkit.available_models()


def test_installed_third_party_plugin_is_found(site):
    install_fake_distribution(
        site, "genkit-tiny", {"thirdparty_tiny": GOOD_PLUGIN}, {"tiny": "thirdparty_tiny"}
    )
    assert "tiny-vae" in genkit.available_models()
    model = genkit.create_model("tiny-vae", (1, 8, 8), latent_dim=2)
    assert model.elbo(-torch.ones(2, 1, 8, 8)).total.shape == (2,)
    info = {p.name: p for p in make_plugin_manager().plugins()}["tiny"]
    assert (info.package, info.version, info.registered) == (
        "genkit-tiny",
        "0.3.1",
        {"models": ["tiny-vae"]},
    )


def test_a_model_factory_that_returns_no_model_is_a_plugin_error(site):
    source = """
import genkit


@genkit.hookimpl
def register_models(register):
    register("not-a-model", lambda shape: None)
"""
    install_fake_distribution(
        site, "genkit-nomodel", {"thirdparty_nomodel": source}, {"nomodel": "thirdparty_nomodel"}
    )
    with pytest.raises(
        genkit.PluginError,
        match=r"plugin 'nomodel' \(package genkit-nomodel\): model 'not-a-model' returned "
        r"NoneType, not a genkit\.LatentVariableModel",
    ):
        genkit.create_model("not-a-model", (1, 8, 8))


def test_broken_plugins_are_reported_and_do_not_hide_the_rest(site):
    install_fake_distribution(
        site,
        "genkit-broken",
        {
            "thirdparty_good": GOOD_PLUGIN,
            "thirdparty_import": "import no_such_module_anywhere\n",
            "thirdparty_raises": """
                import genkit
                @genkit.hookimpl
                def register_models(register):
                    raise RuntimeError("database not reachable")
            """,
            "thirdparty_typo": """
                import genkit
                @genkit.hookimpl
                def register_modles(register):
                    pass
            """,
            "thirdparty_clash": """
                import genkit
                @genkit.hookimpl
                def register_models(register):
                    register("vae", lambda shape: None)
            """,
        },
        {
            "good": "thirdparty_good",
            "import": "thirdparty_import",
            "raises": "thirdparty_raises",
            "typo": "thirdparty_typo",
            "clash": "thirdparty_clash",
        },
    )
    catalog = make_plugin_manager()
    reasons = {f.plugin: str(f) for f in catalog.failures if f.package == "genkit-broken"}
    assert set(reasons) == {"import", "raises", "typo", "clash"}
    assert "plugin 'import' (package genkit-broken)" in reasons["import"]
    assert "No module named 'no_such_module_anywhere'" in reasons["import"]
    assert "database not reachable" in reasons["raises"]
    assert "register_modles" in reasons["typo"]
    assert "plugin 'vae' and plugin 'clash'" in reasons["clash"]
    assert {"vae", "tiny-vae"} <= set(catalog.names("models"))
    assert catalog.get("models", "vae").plugin == "vae"

    out = subprocess.run(
        [sys.executable, "-m", "genkit", "plugins"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert out.returncode == 0, out.stderr
    assert "tiny-vae" in out.stdout and "models: vae" in out.stdout
    assert "FAILED plugin 'import' (package genkit-broken)" in out.stderr


def test_plugin_registered_from_a_module_in_code():
    module = types.ModuleType("my_test_plugin")
    module.register_models = genkit.hookimpl(
        lambda register: register("from-code", lambda shape: None, description="x")
    )
    catalog = make_plugin_manager(load_entrypoints=False, plugins=[module])
    assert catalog.names("models") == ["from-code"]
    assert catalog.names("estimators") == ["consistency", "elbo", "iwae"]  # genkit's core plugin


def test_genkit_load_plugins_selects_entry_points(monkeypatch):
    monkeypatch.setenv("GENKIT_LOAD_PLUGINS", "")
    assert make_plugin_manager().names("models") == []
    monkeypatch.setenv("GENKIT_LOAD_PLUGINS", "vae")
    assert make_plugin_manager().names("models") == ["vae"]


def test_unknown_model_lists_what_exists():
    with pytest.raises(
        genkit.UnknownModelError,
        match=r"unknown model 'vea'; did you mean 'vae'\?.*available: .*vae",
    ):
        genkit.create_model("vea", (1, 8, 8))
    with pytest.raises(
        KeyError
    ):  # also a KeyError, for callers that treat the registry as a mapping
        genkit.create_model("nope", (1, 8, 8))


def test_bad_parameters_say_what_is_valid():
    with pytest.raises(
        genkit.ConfigError, match=r"unknown key 'latnt_dim'; did you mean 'latent_dim'\?"
    ):
        genkit.create_model("vae", (1, 8, 8), latnt_dim=3)
    with pytest.raises(genkit.ConfigError, match="latent_dim"):
        genkit.create_model("vae", (1, 8, 8), latent_dim=0)
    with pytest.raises(genkit.ConfigError, match="net"):
        genkit.create_model("vae", (1, 8, 8), net="transformer")
    with pytest.raises(genkit.InvalidParameterError, match="data_shape"):
        genkit.create_model("vae", (1, 0, 8))


def test_every_hookspec_is_documented():
    from genkit import hookspecs

    doc = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    hooks = [n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "genkit_spec")]
    assert len(hooks) >= 8
    missing = [h for h in hooks if f"`{h}" not in doc]
    assert not missing, f"hooks not documented in docs/plugins.md: {missing}"


def test_an_entry_point_name_taken_by_another_package_is_reported(site):
    install_fake_distribution(
        site,
        "genkit-other",
        {"thirdparty_other": GOOD_PLUGIN},
        {"vae": "thirdparty_other"},  # the built-in VAE plugin's entry-point name
    )
    catalog = make_plugin_manager()
    # the first on sys.path wins, as for imports (here the test's site, prepended); the other
    # is reported naming both packages instead of vanishing
    reasons = [str(f) for f in catalog.failures if f.plugin == "vae"]
    assert len(reasons) == 1
    loaded = catalog.sources["vae"][0]
    skipped = ({"genkit", "genkit-other"} - {loaded}).pop()
    assert f"plugin 'vae' (package {skipped})" in reasons[0]
    assert f"package {loaded} already uses the name 'vae'" in reasons[0]
    models = set(catalog.names("models"))
    assert ("tiny-vae" in models) == (loaded == "genkit-other")
    assert ("vae" in models) == (loaded == "genkit")


@pytest.mark.parametrize("shape", [5, (True, 8), (1, 8, 8.0), (), "abc", None])
def test_bad_data_shape_is_one_clear_error(shape):
    with pytest.raises(genkit.InvalidParameterError, match=r"data_shape must be a tuple"):
        genkit.create_model("vae", shape)


def test_data_shape_accepts_numpy_ints_and_torch_size():
    import numpy as np

    model = genkit.create_model("vae", (np.int64(1), np.int32(8), 8), latent_dim=2, hidden=8)
    assert model.data_shape == (1, 8, 8) and all(type(d) is int for d in model.data_shape)
    assert genkit.create_model("vae", torch.Size([6]), latent_dim=2).data_shape == (6,)
