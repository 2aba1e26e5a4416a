"""The default denoisers ``net(x_t, t)``: a small U-Net for images, an MLP for vectors.

Both take the step ``t: (B,)`` (an integer step 1..T, or a float) through a sinusoidal
embedding of ``time_scale * t`` and an MLP, and return a tensor shaped like ``x_t`` that the
model reads as eps, x0 or v. In continuous time ``t`` is a float in [0, 1] and ``time_scale`` is
1000, so the embedding's frequencies see the same range as for a 1000-step discrete model.

The U-Net can take Fourier features of its input (Kingma et al. 2021, appendix C), ``sin(2^n pi
x_t)`` and ``cos(2^n pi x_t)`` for each exponent ``n`` in ``fourier``, as extra input channels:
at small t they resolve the fine scale of 8-bit data (bins of width 2/255 on [-1, 1]) that a
network with smooth first layers hardly sees. The U-Net halves the resolution between levels while H and W are even and >= 4
(8x8 -> 4x4, 28x28 -> 14x14 -> 7x7, 32x32 -> 16x16 -> 8x8) and keeps it otherwise, so the
upsampling path meets every skip connection at its size.

The output layer of both is a float32 head (:class:`genkit.nets.Float32Head`): under bf16
autocast a bf16 eps would carry a relative error of up to ``2^-8``, which the x0 the estimators
read from it, ``x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)``, multiplies by
``sqrt((1 - alpha_bar) / alpha_bar)`` (about 150 at the last step of the linear schedule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from genkit.errors import InvalidParameterError
from genkit.nets import Float32Conv2d, mlp


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer sinusoids of ``t: (B,)`` -> ``(B, dim)``:
    ``[cos(t w_i), sin(t w_i)]`` with ``w_i = max_period^(-i / (dim/2))``, computed in float32,
    or float64 for a float64 ``t``."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    steps = torch.arange(half, device=t.device, dtype=dtype)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    angles = t.to(dtype)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def fourier_features(x: Tensor, exponents: Sequence[int]) -> Tensor:
    """``x: (B, C, ...)`` -> ``(B, 2 C len(exponents), ...)``: ``sin(2^n pi x)``, ``cos(2^n pi x)``
    for each ``n``, computed in float32 (bf16 would lose the phase at ``2^7 pi``), or float64
    for a float64 ``x``."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    freqs = torch.tensor([(2.0**n) * math.pi for n in exponents], device=x.device, dtype=dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        angles = rearrange(x.to(dtype), "b c ... -> b c 1 ...") * rearrange(
            freqs, "n -> n" + " 1" * (x.dim() - 2)
        )
        features = torch.cat([angles.sin(), angles.cos()], dim=2)  # (B, C, 2n, ...)
    return rearrange(features, "b c n ... -> b (c n) ...").to(x.dtype)


def _groups(channels: int, most: int = 8) -> int:
    return math.gcd(channels, most)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the projected time embedding, GroupNorm -> SiLU ->
    dropout -> conv; a 1x1 skip when the channel count changes."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + rearrange(self.emb(F.silu(emb)), "b c -> b c 1 1")
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = math.gcd(heads, channels)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        q, k, v = rearrange(
            self.qkv(self.norm(x)), "b (three n c) h w -> three b n (h w) c", three=3, n=self.heads
        )
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.out(rearrange(a, "b n (h w) c -> b (n c) h w", h=h, w=w))


class UNet(nn.Module):
    """``net(x_t, t)`` for images ``x_t: (B, C, H, W)`` -> ``(B, C, H, W)``.

    ``channels * channel_mults[i]`` channels at level ``i``, ``num_res_blocks`` residual blocks
    per level (one more on the way up, taking the skips), self-attention at levels whose
    resolution is at most ``attention_resolution`` (0 disables it) and in the middle. ``fourier``:
    exponents ``n`` of the Fourier features concatenated to the input (empty: none);
    ``time_scale``: the embedding sees ``time_scale * t``; ``patch_size = p > 1``: space-to-depth
    (Hoogeboom et al. 2023), the input and its Fourier features (computed at full resolution)
    folded into ``p x p`` patches, ``(C', H, W) -> (C' p^2, H/p, W/p)``, before the first
    convolution, and the output unfolded back, so every level runs at ``1/p`` of the resolution.
    """

    def __init__(
        self,
        data_shape: tuple[int, int, int],
        channels: int = 16,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolution: int = 0,
        dropout: float = 0.0,
        fourier: Sequence[int] = (),
        time_scale: float = 1.0,
        patch_size: int = 1,
    ) -> None:
        super().__init__()
        c, h, w = data_shape
        if h % patch_size or w % patch_size:
            raise InvalidParameterError(
                f"model 'vdm': patch_size={patch_size} must divide the image size {h}x{w}"
            )
        emb_dim = 4 * channels
        self.channels = channels
        self.fourier = tuple(int(n) for n in fourier)
        self.time_scale = float(time_scale)
        self.patch_size = int(patch_size)
        self.embed = mlp([channels, emb_dim, emb_dim])
        # space-to-depth: p x p patches become channels after the Fourier features
        c_in = c * (1 + 2 * len(self.fourier)) * patch_size**2
        h, w = h // patch_size, w // patch_size
        self.conv_in = nn.Conv2d(c_in, channels, 3, padding=1)

        def attn(ch: int, res: int) -> nn.Module:
            return SelfAttention(ch) if res <= attention_resolution else nn.Identity()

        # Down: residual blocks per level, then (between levels) a stride-2 conv where H and W
        # are even and >= 4, else an identity, so every level pushes the same skips.
        self.down = nn.ModuleList()
        skips, ch, size, halved = [channels], channels, (h, w), []
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(ch, channels * mult, emb_dim, dropout)])
                ch = channels * mult
                block.append(attn(ch, min(size)))
                self.down.append(block)
                skips.append(ch)
            if level < len(channel_mults) - 1:
                can = size[0] % 2 == 0 and size[1] % 2 == 0 and min(size) >= 4
                halved.append(can)
                self.down.append(
                    nn.Conv2d(ch, ch, 3, stride=2, padding=1) if can else nn.Identity()
                )
                size = (size[0] // 2, size[1] // 2) if can else size
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = SelfAttention(ch) if attention_resolution > 0 else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)

        # Up: the mirror, one more block per level to take the transition's skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList(
                    [ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout)]
                )
                ch = channels * mult
                block.append(attn(ch, min(size)))
                self.up.append(block)
            if level > 0:
                if halved.pop():
                    size = (size[0] * 2, size[1] * 2)
                    up = nn.Sequential(
                        nn.Upsample(scale_factor=2.0, mode="nearest"),
                        nn.Conv2d(ch, ch, 3, padding=1),
                    )
                else:
                    up = nn.Identity()
                self.up.append(up)
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = Float32Conv2d(ch, c * patch_size**2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1).expand(x.shape[0]) * self.time_scale
        # the embedding in the input's precision: float64 for a float64 model
        emb = self.embed(timestep_embedding(t, self.channels).to(x.dtype))
        if self.fourier:
            x = torch.cat([x, fourier_features(x, self.fourier)], dim=1)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer[1](layer[0](h, emb)) if isinstance(layer, nn.ModuleList) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](torch.cat([h, hs.pop()], dim=1), emb))
            else:
                h = layer(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out


class MLPDenoiser(nn.Module):
    """``net(x_t, t)`` for vectors ``x_t: (B, D)``: an MLP on ``[x_t, embed(t)]``."""

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        emb_dim: int = 64,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.emb_dim, self.time_scale = emb_dim, float(time_scale)
        self.embed = mlp([emb_dim, hidden, hidden])
        self.net = mlp([dim + hidden, *[hidden] * depth, dim], float32_head=True)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1).expand(x.shape[0]) * self.time_scale
        emb = self.embed(timestep_embedding(t, self.emb_dim).to(x.dtype))
        return self.net(torch.cat([x, emb], dim=-1))
