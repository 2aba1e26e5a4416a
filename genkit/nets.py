"""Small network trunks shared by the built-in plugins: an MLP and convolutional encoder and
decoder trunks that work for any image size (they halve H and W up to twice while both stay
even)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from einops.layers.torch import Rearrange
from torch import Tensor, nn


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1])``, activation, ..., ``Linear(sizes[-2], sizes[-1])``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def num_downsamples(height: int, width: int, most: int = 2) -> int:
    """How many times (at most ``most``) H and W can be halved while both stay even and >= 2."""
    n = 0
    while n < most and height % 2 == 0 and width % 2 == 0 and height >= 4 and width >= 4:
        height, width, n = height // 2, width // 2, n + 1
    return n


class ConvEncoderTrunk(nn.Module):
    """``x: (B, C, H, W)`` -> features ``(B, out_features)``: a 3x3 convolution, then stride-2
    4x4 convolutions that double the channels as they halve the resolution."""

    def __init__(self, data_shape: tuple[int, int, int], channels: int, out_features: int) -> None:
        super().__init__()
        c, h, w = data_shape
        n = num_downsamples(h, w)
        layers: list[nn.Module] = [nn.Conv2d(c, channels, 3, padding=1)]
        ch = channels
        for _ in range(n):
            layers += [nn.SiLU(), nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1)]
            ch *= 2
        flat = ch * (h >> n) * (w >> n)
        layers += [nn.SiLU(), Rearrange("b c h w -> b (c h w)"), nn.Linear(flat, out_features)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoderTrunk(nn.Module):
    """``z: (B, in_features)`` -> ``(B, out_channels, H, W)``: the mirror of
    :class:`ConvEncoderTrunk` with transposed convolutions."""

    def __init__(
        self, in_features: int, data_shape: tuple[int, int, int], channels: int, out_channels: int
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
        layers += [nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
