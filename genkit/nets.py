"""Small network trunks shared by the built-in plugins: an MLP and convolutional encoder and
decoder trunks that work for any image size (they halve H and W up to twice while both stay
even), and float32 output layers for the layers that give a distribution's parameters.

Under bf16 autocast every ``Linear`` and ``Conv2d`` would run in bf16, whose 8 significant bits
space the numbers near ``|x| = 1`` by ``2^-8 .. 2^-7``: half a bin to a whole bin of the 256
bins of 8-bit data (width ``2/255``). A decoder's ``loc`` computed there makes the discretized
likelihood ``p(x|z)`` a function of the rounding, not of the network; casting ``loc`` to
float32 afterwards cannot bring the lost bits back. So the layer that outputs a distribution's
parameters (``loc``, log-scale, logits, or the denoiser's eps) is a :class:`Float32Head`: it
runs with autocast off, in float32, on its input cast to float32. The features reaching it keep
their bf16 rounding; what goes is the final rounding of the output, the one at the bin scale.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from einops.layers.torch import Rearrange
from torch import Tensor, nn


class Float32Head(nn.Module):
    """Mixin that runs a layer with autocast off, on its input cast to the dtype of its weight
    (float32: autocast leaves parameters in float32), so its weights, matmul and output are
    float32 whatever autocast is on; without autocast it changes nothing.

    Put it first among the bases, ``class Float32Conv1d(Float32Head, nn.Conv1d)``: the layer
    keeps its own parameter names (``weight``, ``bias``), so state dicts are unchanged.
    """

    weight: Tensor

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


class Float32Linear(Float32Head, nn.Linear):
    """``nn.Linear`` in float32 under autocast (see :class:`Float32Head`)."""


class Float32Conv2d(Float32Head, nn.Conv2d):
    """``nn.Conv2d`` in float32 under autocast (see :class:`Float32Head`)."""


def mlp(
    sizes: Sequence[int], activation: type[nn.Module] = nn.SiLU, *, float32_head: bool = False
) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1])``, activation, ..., ``Linear(sizes[-2], sizes[-1])``; with
    ``float32_head`` the last one is a :class:`Float32Linear` (for distribution parameters)."""
    layers: list[nn.Module] = []
    last = len(sizes) - 2
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(activation())
        layers.append((Float32Linear if float32_head and i == last else nn.Linear)(a, b))
    return nn.Sequential(*layers)


def num_downsamples(height: int, width: int, most: int = 2) -> int:
    """How many times (at most ``most``) H and W can be halved while both stay even and >= 2."""
    n = 0
    while n < most and height % 2 == 0 and width % 2 == 0 and height >= 4 and width >= 4:
        height, width, n = height // 2, width // 2, n + 1
    return n


class ConvEncoderTrunk(nn.Module):
    """``x: (B, C, H, W)`` -> features ``(B, out_features)``: a 3x3 convolution, then stride-2
    4x4 convolutions that double the channels as they halve the resolution; the last layer is a
    :class:`Float32Linear` with ``float32_head``."""

    def __init__(
        self,
        data_shape: tuple[int, int, int],
        channels: int,
        out_features: int,
        *,
        float32_head: bool = False,
    ) -> None:
        super().__init__()
        c, h, w = data_shape
        n = num_downsamples(h, w)
        layers: list[nn.Module] = [nn.Conv2d(c, channels, 3, padding=1)]
        ch = channels
        for _ in range(n):
            layers += [nn.SiLU(), nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1)]
            ch *= 2
        flat = ch * (h >> n) * (w >> n)
        head = Float32Linear if float32_head else nn.Linear
        layers += [nn.SiLU(), Rearrange("b c h w -> b (c h w)"), head(flat, out_features)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoderTrunk(nn.Module):
    """``z: (B, in_features)`` -> ``(B, out_channels, H, W)``: the mirror of
    :class:`ConvEncoderTrunk` with transposed convolutions; the last layer is a
    :class:`Float32Conv2d` with ``float32_head``."""

    def __init__(
        self,
        in_features: int,
        data_shape: tuple[int, int, int],
        channels: int,
        out_channels: int,
        *,
        float32_head: bool = False,
    ) -> None:
        super().__init__()
        _, h, w = data_shape
        n = num_downsamples(h, w)
        ch = channels * 2**n
        layers: list[nn.Module] = [
            nn.Linear(in_features, ch * (h >> n) * (w >> n)),
            Rearrange("b (c h w) -> b c h w", c=ch, h=h >> n, w=w >> n),
        ]
        for _ in range(n):
            layers += [nn.SiLU(), nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1)]
            ch //= 2
        head = Float32Conv2d if float32_head else nn.Conv2d
        layers += [nn.SiLU(), head(ch, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
