"""A VDM denoiser backed by diffusers' ``UNet2DModel`` (``denoiser="diffusers"``, ``unet={...}``).

genkit's steps are ``t = 1..T``; diffusers' are indices ``0..T-1`` (``alphas_cumprod[i]`` is
genkit's ``alpha_bar_{i+1}``), so the network is called at ``t - 1``. Its ``.sample`` output is
read by the VDM's ``parameterization`` as any denoiser's; with ``variance="learned_range"`` it
has ``2C`` channels (the last ``C`` the variance output), as improved-diffusion's and
diffusers' ``learned_range`` models do.

diffusers is imported only when such a denoiser is built (the ``diffusers`` extra), through
:func:`genkit.diffusers_io.require_diffusers`; without it the error says how to install it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from genkit.diffusers_io import require_diffusers
from genkit.errors import InvalidParameterError


class DiffusersUNet(nn.Module):
    """``net(x_t, t) = unet(x_t, t - 1).sample``: a ``UNet2DModel`` as a genkit denoiser,
    ``x_t: (B, C, H, W)``, ``t: (B,)`` integer steps 1..T. The module is ``self.unet``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t - 1).sample


def unet_config(
    data_shape: tuple[int, ...], config: dict[str, Any], out_factor: int = 1
) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments for ``data_shape = (C, H, W)``: ``config`` over
    genkit's small default (two levels, ``block_out_channels=(32, 64)``, attention at the
    lower one, one block per level); ``sample_size``, ``in_channels`` and ``out_channels``
    (``out_factor * C``) from the data. Keys starting with ``_`` (diffusers' bookkeeping in
    a saved config) are dropped."""
    if len(data_shape) != 3:
        raise InvalidParameterError(
            f"model 'vdm': denoiser='diffusers' needs images (C, H, W), got data_shape {data_shape}"
        )
    c, h, w = data_shape
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise InvalidParameterError(
            "model 'vdm': a class-conditional UNet2DModel (class_embed_type / num_class_embeds) "
            "is not an unconditional model of p(x); genkit reads unconditional ones only"
        )
    expected = {"in_channels": c, "out_channels": out_factor * c}
    for key, value in expected.items():
        if key in cfg and cfg[key] != value:
            raise InvalidParameterError(
                f"model 'vdm': the UNet2DModel's {key} is {cfg[key]}, the data {data_shape} "
                f"need {value}"
                + (" (variance='learned_range': 2C)" if key == "out_channels" else "")
            )
    size = cfg.get("sample_size")
    if size is not None:
        sizes = tuple(size) if isinstance(size, list | tuple) else (size, size)
        if sizes != (h, w):
            raise InvalidParameterError(
                f"model 'vdm': the UNet2DModel's sample_size is {size}, the data {data_shape} "
                f"are {h}x{w}"
            )
    channels = tuple(cfg.get("block_out_channels", (32, 64)))
    n = len(channels)
    defaults: dict[str, Any] = {
        "sample_size": h if h == w else (h, w),
        "block_out_channels": channels,
        "down_block_types": ("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        "up_block_types": ("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        "layers_per_block": 1,
        "norm_num_groups": min(32, *channels),
    }
    merged = {**defaults, **cfg, **expected}
    from_unet = set(inspect.signature(require_diffusers().UNet2DModel.__init__).parameters)
    unknown = sorted(set(merged) - from_unet)
    if unknown:
        raise InvalidParameterError(
            f"model 'vdm': unet has key(s) {', '.join(unknown)} that diffusers' UNet2DModel "
            "does not take"
        )
    return merged


def diffusers_denoiser(
    data_shape: tuple[int, ...], config: dict[str, Any], out_factor: int = 1
) -> DiffusersUNet:
    """A new ``UNet2DModel`` built from :func:`unet_config`, wrapped as a genkit denoiser."""
    kwargs = unet_config(data_shape, config, out_factor)
    try:
        unet = require_diffusers().UNet2DModel(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(
            f"model 'vdm': diffusers' UNet2DModel({kwargs}): {exc}"
        ) from None
    return DiffusersUNet(unet)


__all__ = ["DiffusersUNet", "diffusers_denoiser", "require_diffusers", "unet_config"]
