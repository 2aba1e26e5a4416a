"""``genkit data convert`` / ``info`` / ``list`` through click's CliRunner."""

from __future__ import annotations

import h5py
from click.testing import CliRunner

from genkit.cli import cli


def test_convert_then_info(tmp_path, idx_folder):
    runner = CliRunner()
    out = tmp_path / "m.h5"
    result = runner.invoke(cli, ["data", "convert", str(idx_folder[0]), str(out), "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and h5py.is_hdf5(out)
    result = runner.invoke(cli, ["data", "info", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "train:" in text and "test:" in text
    with h5py.File(out, "r") as f:
        lo, hi = int(f["train/images"][()].min()), int(f["train/images"][()].max())
    assert f"images: shape (30, 1, 7, 5) uint8, range [{lo}, {hi}]" in text
    assert "labels: shape (30,) int64" in text and "layout_version: 1" in text
    assert 'source: "idx:' in text


def test_convert_refuses_existing_output_in_one_line(tmp_path, idx_folder):
    runner = CliRunner()
    out = tmp_path / "m.h5"
    out.write_text("x")
    result = runner.invoke(cli, ["data", "convert", str(idx_folder[0]), str(out)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"Error: output '{out}' already exists (use --force to overwrite)"
    ]
    assert "Traceback" not in result.output
    forced = runner.invoke(cli, ["data", "convert", str(idx_folder[0]), str(out), "--force"])
    assert forced.exit_code == 0, forced.output


def test_info_on_a_bad_file_is_one_line(tmp_path):
    (tmp_path / "x.h5").write_text("not hdf5")
    result = CliRunner().invoke(cli, ["data", "info", str(tmp_path / "x.h5")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: '{tmp_path / 'x.h5'}' is not an HDF5 file (no HDF5 signature)"
    ]


def test_builtin_info_and_list(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "info", "builtin:digits", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "images: shape (1438, 1, 8, 8) uint8" in result.output
    assert (tmp_path / "digits.h5").is_file()
    listing = runner.invoke(cli, ["data", "list"])
    assert listing.exit_code == 0 and "digits\tdatasets\t" in listing.output
    unknown = runner.invoke(cli, ["data", "info", "builtin:nope", "--cache-dir", str(tmp_path)])
    assert unknown.exit_code == 1
    assert (
        unknown.output.startswith("Error: unknown dataset 'nope'")
        and len(unknown.output.splitlines()) == 1
    )


def test_damaged_or_missing_inputs_are_one_line(tmp_path):
    runner = CliRunner()
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_group("train/images")
    result = runner.invoke(cli, ["data", "info", str(tmp_path / "g.h5")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"Error: '{tmp_path / 'g.h5'}' train/images must be a dataset, got an HDF5 Group"
    ]
    missing = runner.invoke(cli, ["data", "convert", str(tmp_path / "no"), str(tmp_path / "o.h5")])
    assert missing.exit_code == 1
    assert missing.output.strip().splitlines() == [
        f"Error: source '{tmp_path / 'no'}' does not exist"
    ]
    assert not (tmp_path / "o.h5").exists()
