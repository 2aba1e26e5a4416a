"""What the trainer logs: on-device metric accumulation, TensorBoard, the progress bar and
image grids.

Per step the trainer adds one small tensor of batch means to a running sum on the device; it
is copied to the CPU (one synchronisation) only every ``log_every`` steps. Nothing per step
touches the disk or the Python side of TensorBoard.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange, repeat
from torch import Tensor
from torch.nn import functional as F

from genkit.distributions import to_pixels

LN2 = math.log(2.0)


class MetricAccumulator:
    """Running sums of per-step values, kept on the device.

    ``add(values)`` with ``values: (K,)`` (the same ``names`` every step) costs one in-place
    add; ``mean()`` synchronises once and returns floats by name.
    """

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = list(names)
        self.total = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, values: Tensor) -> None:
        self.total += values.detach()
        self.count += 1

    def mean(self) -> dict[str, float]:
        values = (self.total / max(1, self.count)).tolist()
        self.total.zero_()
        self.count = 0
        return dict(zip(self.names, values, strict=True))


def with_totals(
    means: Mapping[str, float], terms: Sequence[str], num_dims: int
) -> dict[str, float]:
    """Add ``elbo = sum of the term means`` and ``bits_per_dim = -elbo / (D ln 2)``."""
    out = dict(means)
    out["elbo"] = sum(means[t] for t in terms)
    out["bits_per_dim"] = -out["elbo"] / (num_dims * LN2)
    return out


#: The uint8 value of the grid's separators, border and empty cells: mid-grey, which stands
#: apart from both dark-background digits and natural images.
GRID_SEPARATOR = 128

#: ``image_grid``'s automatic upscaling makes each tile at least this many pixels on its
#: shorter side.
GRID_MIN_TILE = 32


def grid_upscale(h: int, w: int, min_tile: int = GRID_MIN_TILE) -> int:
    """The smallest integer factor ``f >= 1`` with ``min(h, w) * f >= min_tile``."""
    return max(1, math.ceil(min_tile / max(1, min(h, w))))


def image_grid(
    x: Tensor, ncol: int | None = None, *, padding: int = 2, upscale: int | None = None
) -> np.ndarray:
    """Tile images ``x: (N, C, H, W)`` in [-1, 1] into one uint8 HWC array.

    Each image is upscaled by nearest neighbour with the integer factor ``f = upscale``
    (``None``: :func:`grid_upscale`, so small images become tiles of at least 32 pixels), and
    tiles are separated, and surrounded, by ``padding`` pixels of :data:`GRID_SEPARATOR`. With
    ``ncol`` columns (default ``ceil(sqrt(N))``) and ``rows = ceil(N / ncol)`` the result is::

        (rows * (f*H + padding) + padding,  ncol * (f*W + padding) + padding,  C)

    Empty cells (when N is not a multiple of ``ncol``) are blank (the separator colour).
    """
    from genkit.errors import InvalidParameterError

    n, _c, h, w = x.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    factor = grid_upscale(h, w) if upscale is None else upscale
    if ncol < 1 or padding < 0 or factor < 1:
        raise InvalidParameterError(
            f"image_grid needs ncol >= 1, padding >= 0 and upscale >= 1, "
            f"got ncol={ncol}, padding={padding}, upscale={factor}"
        )
    rows = math.ceil(n / ncol)
    pixels = to_pixels(x.detach().float().cpu())  # (N, C, H, W) uint8
    tiles = repeat(pixels, "n c h w -> n c (h a) (w b)", a=factor, b=factor)  # nearest
    blank = torch.full((rows * ncol - n, *tiles.shape[1:]), GRID_SEPARATOR, dtype=torch.uint8)
    tiles = torch.cat([tiles, blank])  # (rows*ncol, C, f*H, f*W)
    # each tile gets its separator right and below; the grid gets the top and left border
    tiles = F.pad(tiles, (0, padding, 0, padding), value=GRID_SEPARATOR)
    grid = rearrange(tiles, "(r k) c h w -> c (r h) (k w)", r=rows, k=ncol)
    grid = F.pad(grid, (padding, 0, padding, 0), value=GRID_SEPARATOR)
    return rearrange(grid, "c h w -> h w c").contiguous().numpy()


def save_png(grid: np.ndarray, path: Path) -> Path:
    """Write a ``(H, W, C)`` uint8 grid as a PNG (grey for C = 1), atomically (an unwritable
    ``path`` is an :class:`~genkit.errors.OutputError`)."""
    return save_image(grid, path, format="PNG")


def image_format(path: Path) -> str:
    """The Pillow format that ``path``'s suffix names (``.png`` -> ``PNG``, ``.jpg`` ->
    ``JPEG``); a suffix that names none is a :class:`~genkit.errors.ConfigError`."""
    from PIL import Image

    from genkit.errors import ConfigError

    formats = Image.registered_extensions()
    found = formats.get(Path(path).suffix.lower())
    if found is None or found not in Image.SAVE:
        raise ConfigError(
            f"{path}: '{Path(path).suffix}' is not an image format Pillow writes; use .png "
            "(lossless), .jpg, .webp, ... or .npy for the raw samples"
        )
    return found


def save_image(grid: np.ndarray, path: Path, format: str | None = None) -> Path:
    """Write a ``(H, W, C)`` uint8 grid (grey for C = 1) in ``format`` (default: the one
    ``path``'s suffix names, :func:`image_format`), atomically (an unwritable ``path`` is an
    :class:`~genkit.errors.OutputError`)."""
    from PIL import Image

    from genkit.training.checkpoint import write_atomic

    format = format or image_format(path)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return write_atomic(path, lambda f: image.save(f, format=format), what="image")


class RunLogger:
    """TensorBoard scalars/images/text under ``run_dir/tb`` plus the tqdm progress bar.

    ``enabled=False`` (ranks other than 0, or no run dir) makes every method a no-op.
    """

    def __init__(
        self,
        run_dir: Path | None,
        *,
        enabled: bool,
        total: int | None,
        initial: int,
        progress: bool,
        purge_step: int | None = None,
    ) -> None:
        self.writer = None
        self.bar = None
        if enabled and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)
        if enabled and progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="HWC")

    def config(self, config: Mapping[str, Any]) -> None:
        """The run's config as text (``config``) and as TensorBoard hparams."""
        if self.writer is None:
            return
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", f"```\n{text}\n```", 0)
        flat = {
            k: v if isinstance(v, int | float | str | bool) else json.dumps(v, default=str)
            for k, v in _flatten(config).items()
            if v is not None
        }
        from torch.utils.tensorboard.summary import hparams

        for event in hparams(flat, {}):
            self.writer.file_writer.add_summary(event)

    def set_total(self, total: int) -> None:
        """The progress bar's total, once a wall-clock budget has fixed it."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def progress(self, steps: int, postfix: Mapping[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def format_table(
    rows: Sequence[tuple[str, float, float | None] | tuple[str, float, float | None, float | None]],
    num_dims: int,
    *,
    title: str = "",
) -> str:
    """A short table: term, nats (± standard error), bits/dim ``-nats / (D ln 2)`` (± the
    standard error over ``D ln 2``) and, where rows carry a fourth value, the Monte-Carlo
    standard error ``mc_se`` of the bits/dim."""
    scale = num_dims * LN2
    with_mc = any(len(row) > 3 for row in rows)
    lines = [title] if title else []
    lines.append(
        f"{'term':<28}{'nats':>22}{'bits/dim':>20}" + (f"{'mc_se':>10}" if with_mc else "")
    )
    for name, value, se, *rest in rows:
        nats = f"{value:.4f}" + (f" ± {se:.4f}" if se is not None else "")
        bits = f"{-value / scale:.4f}" + (f" ± {se / scale:.4f}" if se is not None else "")
        mc = rest[0] if rest else None
        tail = ""
        if with_mc:
            tail = (
                f"{mc / scale:>10.4f}" if mc is not None and math.isfinite(mc) else f"{'n/a':>10}"
            )
        lines.append(f"{name:<28}{nats:>22}{bits:>20}{tail}")
    return "\n".join(lines)


def format_result(result: Any, *, title: str = "") -> str:
    """:func:`format_table` of an :class:`~genkit.evaluation.EvalResult` with its ``mc_se``
    column, then one line on the budget it used (:func:`genkit.evaluation.describe`)."""
    from genkit.evaluation import describe

    rows = [(name, value, se, _mc(result, name)) for name, value, se in result.rows()]
    return format_table(rows, result.num_dims, title=title) + "\n" + describe(result)


def _mc(result: Any, row_name: str) -> float | None:
    name = row_name.removeprefix("extra: ")
    return result.mc_se.get(name)
