"""``image_grid``'s padded, upscaled tiles and ``genkit sample --param/--padding/--upscale``."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from trainhelp import invoke

from genkit.errors import InvalidParameterError
from genkit.training.logging import GRID_SEPARATOR, grid_upscale, image_grid


def grid_size(n: int, h: int, w: int, *, ncol: int, factor: int, padding: int) -> tuple[int, int]:
    rows = math.ceil(n / ncol)
    return rows * (factor * h + padding) + padding, ncol * (factor * w + padding) + padding


def levels(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Images on the 8-bit model scale ``k / 127.5 - 1``, so pixel values are exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1.0


def tile(grid: np.ndarray, i: int, *, ncol: int, size: tuple[int, int], padding: int):
    """The ``i``-th cell of ``grid`` (row-major), without its separators."""
    th, tw = size
    r, k = divmod(i, ncol)
    top, left = padding + r * (th + padding), padding + k * (tw + padding)
    return grid[top : top + th, left : left + tw]


def test_small_grey_images_are_upscaled_and_separated():
    x = levels((64, 1, 8, 8))
    grid = image_grid(x)
    assert grid.dtype == np.uint8
    assert grid.shape == (8 * (32 + 2) + 2, 8 * (32 + 2) + 2, 1)  # tile 8*4 px, 2 px apart
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).numpy()  # (64, 1, 8, 8)

    separator = np.ones(grid.shape[:2], dtype=bool)
    for i in range(64):
        r, k = divmod(i, 8)
        top, left = 2 + r * 34, 2 + k * 34
        separator[top : top + 32, left : left + 32] = False
        expected = np.kron(pixels[i, 0], np.ones((4, 4), dtype=np.uint8))  # nearest neighbour
        np.testing.assert_array_equal(
            tile(grid, i, ncol=8, size=(32, 32), padding=2)[..., 0], expected
        )
    assert separator[:2].all() and separator[:, -2:].all()  # the border is separator too
    assert (grid[separator] == GRID_SEPARATOR).all()
    assert separator.sum() == grid.shape[0] * grid.shape[1] - 64 * 32 * 32


def test_upscale_and_padding_can_be_set():
    x = levels((3, 1, 8, 8))
    grid = image_grid(x, ncol=3, padding=0, upscale=1)
    assert grid.shape == (8, 24, 1)
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(grid[:, 8:16, 0], pixels[1, 0])  # the old, plain tiling
    assert image_grid(x, upscale=3, padding=5).shape == (2 * 29 + 5, 2 * 29 + 5, 1)
    sides = (1, 7, 8, 11, 16, 28, 31, 32, 64)
    assert [grid_upscale(s, s) for s in sides] == [32, 5, 4, 3, 2, 2, 2, 1, 1]
    assert grid_upscale(8, 40) == 4  # the shorter side decides
    with pytest.raises(InvalidParameterError, match="upscale"):
        image_grid(x, upscale=0)
    with pytest.raises(InvalidParameterError, match="padding"):
        image_grid(x, padding=-1)


def test_rgb_images_of_32_pixels_keep_their_size_and_empty_cells_stay_blank():
    x = levels((10, 3, 32, 32), seed=1)
    grid = image_grid(x, ncol=4)
    assert grid.shape == (3 * 34 + 2, 4 * 34 + 2, 3)  # upscale 1, 3 rows of 4
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # NHWC
    for i in range(10):
        np.testing.assert_array_equal(tile(grid, i, ncol=4, size=(32, 32), padding=2), pixels[i])
    for i in (10, 11):  # the two cells after the last image
        assert (tile(grid, i, ncol=4, size=(32, 32), padding=2) == GRID_SEPARATOR).all()


@pytest.fixture(scope="module")
def vdm_run(tmp_path_factory):
    """A 2-step VDM run on the built-in 8x8 digits, small enough to sample in a moment."""
    root = tmp_path_factory.mktemp("sample")
    run = root / "run"
    invoke(
        "train",
        "--model",
        "vdm",
        "--data",
        "builtin:digits",
        "--out",
        run,
        "--cache-dir",
        root / "cache",
        *("--set", "steps=2", "--set", "batch_size=16", "--set", "eval_every=0"),
        *("--set", "num_samples=0", "--set", "checkpoint_every=0"),
        *("--set", "model.timesteps=20", "--set", "model.channels=8"),
        "-q",
    )
    return run


def test_genkit_sample_passes_params_and_writes_a_readable_grid(vdm_run, tmp_path):
    out = tmp_path / "x.png"
    text = invoke(
        "sample", vdm_run, "-n", 4, "--param", "steps=3", "--param", "eta=0", "--out", out
    )
    assert "wrote 4 samples" in text
    with Image.open(out) as image:
        assert image.size == grid_size(4, 8, 8, ncol=2, factor=4, padding=2)  # (W, H) = (70, 70)
        assert image.mode == "L"

    out = tmp_path / "big.png"
    invoke(
        "sample",
        vdm_run,
        "-n",
        3,
        "--param",
        "steps=2",
        "--upscale",
        2,
        "--padding",
        0,
        "--out",
        out,
    )
    with Image.open(out) as image:
        assert image.size == (2 * 16, 2 * 16)

    npy = tmp_path / "x.npy"  # raw samples, no grid
    invoke("sample", vdm_run, "-n", 3, "--param", "steps=2", "--out", npy)
    assert np.load(npy).shape == (3, 1, 8, 8)


def test_genkit_sample_refuses_unknown_and_fixed_params_in_one_line(vdm_run, tmp_path):
    out = tmp_path / "x.png"
    text = invoke("sample", vdm_run, "-n", 2, "--param", "stepz=3", "--out", out, code=1)
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text
    assert "model 'vdm' sample() has no parameter 'stepz'; did you mean 'steps'?" in text
    assert "(its parameters: steps, eta" in text  # n and generator are not listed
    assert "generator" not in text and " n," not in text

    text = invoke("sample", vdm_run, "-n", 2, "--param", "generator=1", "--out", out, code=1)
    assert len(text.strip().splitlines()) == 1 and "--seed" in text
    text = invoke("sample", vdm_run, "--param", "n=2", "--out", out, code=1)
    assert len(text.strip().splitlines()) == 1 and "-n" in text
    text = invoke("sample", vdm_run, "--param", "steps", "--out", out, code=1)
    assert "--param expects KEY=VALUE" in text
    assert not out.exists()
