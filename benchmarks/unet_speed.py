"""U-Net speed: genkit's default VDM U-Net against diffusers' ``UNet2DModel`` of the same size,
each in contiguous NCHW and in ``torch.channels_last``, interleaved in one process.

    python benchmarks/unet_speed.py [--batch 64] [--size 28] [--channels 1] [--threads N]
        [--repeats 10] [--warmup 3] [--device cpu] [--diffusers-config matched]

One step is what training does: forward, backward and an AdamW step on the plain eps-prediction
MSE, ``mean((net(x_t, t) - eps)^2)`` with ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``, a random step
``t`` in 1..1000 per example and ``a = alpha_bar(t)`` of the DDPM linear schedule; the same
loss, data, noise and ``t`` for both nets. After ``--warmup`` untimed steps of each, the four
(net, format) pairs take one timed step each in turn (the order reversed every round, so drift
in the machine's load falls on all four alike), ``--repeats`` rounds; a pair's time is its
median. channels_last means ``model.to(memory_format=torch.channels_last)`` and
``x.contiguous(memory_format=torch.channels_last)``. On CUDA the timer is synchronised.

Prints a table (net, format, s/step, parameters), the ratio ``genkit best / diffusers best``
as a speed-up (diffusers' s/step over genkit's: > 1 means genkit is faster; the issue asks for
>= 1.5) and genkit's channels_last speed-up over its own NCHW.

The nets. genkit: ``genkit.create_model("vdm", (C, H, W), timesteps=1000, channels=32,
channel_mults=(1, 2), attention_resolution=8).net`` (the defaults before issue #21: channels
32, mults (1, 2), one residual block per level, attention at resolution <= 8 and in the middle,
GroupNorm(8), SiLU, sinusoidal time embedding + MLP, stride-2 conv down, nearest + conv up).
At 28x28 its levels are 28x28 and 14x14, so its only attention is the middle one (14x14, 4
heads). diffusers, ``--diffusers-config matched`` (default): ``UNet2DModel(sample_size=H,
in/out_channels=C, block_out_channels=(32, 64), layers_per_block=1, down_block_types=
("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
attention_head_dim=16)``: the same layers, layer for layer (diffusers' up blocks also take
``layers_per_block + 1`` residual blocks, its mid block is resnet-attention-resnet, 64 / 16 = 4
heads), hence the same parameter count (651,041 at 28x28x1). ``--diffusers-config issue`` uses
the issue's ``("DownBlock2D", "AttnDownBlock2D")`` / ``("AttnUpBlock2D", "UpBlock2D")``: it adds
three attention layers at 14x14 that genkit does not have (+8 % parameters, more compute), so
it flatters genkit; the default compares like with like.

Without diffusers (optional for genkit; ``pip install diffusers``) it says so, times genkit
alone and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import genkit

T = 1000
FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def genkit_net(shape: tuple[int, int, int]) -> nn.Module:
    return genkit.create_model(
        "vdm", shape, timesteps=T, channels=32, channel_mults=(1, 2), attention_resolution=8
    ).net


def diffusers_net(shape: tuple[int, int, int], config: str) -> nn.Module:
    from diffusers import UNet2DModel

    if config == "matched":
        down, up = ("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D")
    else:
        down, up = ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")
    unet = UNet2DModel(
        sample_size=shape[1:],
        in_channels=shape[0],
        out_channels=shape[0],
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=8,
        attention_head_dim=16,  # 64 channels / 16 = 4 heads, as genkit's
    )
    return DiffusersEps(unet)


class DiffusersEps(nn.Module):
    """``UNet2DModel`` as ``net(x_t, t) -> eps``, genkit's calling convention."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t, return_dict=False)[0]


class Stepper:
    """One net in one memory format, with its AdamW; ``step()`` is one training step."""

    def __init__(self, net: nn.Module, fmt: torch.memory_format, batch: dict[str, Tensor]) -> None:
        self.net = net.to(batch["x0"].device, memory_format=fmt).train()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.x0 = batch["x0"].contiguous(memory_format=fmt)
        self.eps = batch["eps"].contiguous(memory_format=fmt)
        self.t, self.a = batch["t"], batch["a"]  # t: (B,), a: (B, 1, 1, 1)

    def step(self) -> None:
        x_t = self.a.sqrt() * self.x0 + (1 - self.a).sqrt() * self.eps
        loss = F.mse_loss(self.net(x_t, self.t), self.eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def make_batch(n: int, shape: tuple[int, int, int], device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (n, *shape), generator=g).float() / 127.5 - 1.0  # 8-bit data
    eps = torch.randn(n, *shape, generator=g)
    t = torch.randint(1, T + 1, (n,), generator=g)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0)  # DDPM linear schedule
    batch = {"x0": x0, "eps": eps, "t": t.float(), "a": alpha_bar[t - 1].view(n, 1, 1, 1)}
    return {k: v.to(device) for k, v in batch.items()}


def timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn: Callable[[], None]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=28, help="H = W")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--threads", type=int, default=default_threads(), help="default: all cores")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per (net, format)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per (net, format)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--diffusers-config",
        choices=["matched", "issue"],
        default="matched",
        help="matched: attention only in the middle, as genkit at 28x28; "
        "issue: AttnDownBlock2D/AttnUpBlock2D at the second level",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = (args.channels, args.size, args.size)

    torch.manual_seed(0)
    nets: dict[str, Callable[[], nn.Module]] = {"genkit": lambda: genkit_net(shape)}
    try:
        import diffusers
    except ImportError:
        diffusers = None
    have_diffusers = diffusers is not None
    if have_diffusers:
        nets["diffusers"] = lambda: diffusers_net(shape, args.diffusers_config)
    else:
        print("diffusers is not installed (pip install diffusers): timing genkit alone.")

    batch = make_batch(args.batch, shape, device)
    runners: dict[tuple[str, str], Stepper] = {}
    params: dict[str, int] = {}
    for name, build in nets.items():
        for fmt_name, fmt in FORMATS.items():
            torch.manual_seed(0)
            net = build()
            params[name] = sum(p.numel() for p in net.parameters())
            runners[name, fmt_name] = Stepper(net, fmt, batch)

    timed = timer(device)
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
    order = list(runners)
    for i in range(args.repeats):
        for key in order if i % 2 == 0 else order[::-1]:
            times[key].append(timed(runners[key].step))
    med = {k: statistics.median(v) for k, v in times.items()}

    where = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    versions = f"torch {torch.__version__}" + (
        f", diffusers {diffusers.__version__}" if have_diffusers else ""
    )
    print(
        f"U-Net train step (fwd + bwd + AdamW), {args.size}x{args.size}x{args.channels}, "
        f"batch {args.batch}, {args.device} ({where}), {args.threads} threads, {versions}"
    )
    print(
        f"median of {args.repeats} steps after {args.warmup} warm-up, "
        f"(net, format) pairs interleaved"
        + (f"; diffusers config: {args.diffusers_config}" if have_diffusers else "")
    )
    print(f"{'net':<10} {'format':<14} {'s/step':>8} {'spread':>8} {'parameters':>11}")
    for (name, fmt_name), ts in times.items():
        spread = (max(ts) - min(ts)) / med[name, fmt_name]  # (max - min) / median
        print(
            f"{name:<10} {fmt_name:<14} {med[name, fmt_name]:>8.3f} {spread:>8.0%} "
            f"{params[name]:>11,}"
        )
    best = {n: min(FORMATS, key=lambda f, n=n: med[n, f]) for n in nets}
    g_plain, g_cl = med["genkit", "NCHW"], med["genkit", "channels_last"]
    print(f"genkit channels_last vs NCHW speed-up: {g_plain / g_cl:.2f}x")
    if have_diffusers:
        d_plain, d_cl = med["diffusers", "NCHW"], med["diffusers", "channels_last"]
        print(f"diffusers channels_last vs NCHW speed-up: {d_plain / d_cl:.2f}x")
        ratio = med["diffusers", best["diffusers"]] / med["genkit", best["genkit"]]
        print(
            f"genkit best ({best['genkit']}) / diffusers best ({best['diffusers']}) speed: "
            f"{ratio:.2f}x (> 1: genkit faster; target >= 1.5)"
        )
        rel = params["diffusers"] / params["genkit"] - 1
        if not math.isclose(rel, 0.0):
            print(f"parameters: diffusers {rel:+.1%} vs genkit")


if __name__ == "__main__":
    main()
