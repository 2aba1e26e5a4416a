"""Seconds per training step of the continuous VDM on grey images (28x28 unless ``--shape``
says otherwise): fp32, bf16 autocast and ``torch.compile``, for today's default U-Net and any
other layout, in one process.

    python benchmarks/vdm_step_time.py [--batch-size 16] [--steps 40] [--modes fp32,bf16,compile]
        [--params '{"channels": 32, "channel_mults": [1, 2], "attention_resolution": 8}']
        [--shape 1,8,8] [--threads N] [--adamw fused|loop]

A step is what the Trainer does per batch: the ELBO's objective, backward and fused AdamW, on random
8-bit images in ``channels_last`` (the Trainer's layout for images). For each mode it prints
the first step's seconds (``compile``: the compilation) and the mean wall seconds of
``--steps`` steps after three warm-up steps. ``compile`` compiles each of the model's
sub-networks in place, as ``TrainConfig(compile=True)`` does. Run it on an otherwise idle
machine: it times wall seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import genkit


def step_time(
    mode: str,
    params: dict,
    batch_size: int,
    steps: int,
    shape: tuple[int, ...] = (1, 28, 28),
    fused: bool = True,
) -> tuple[float, float]:
    """``(first step seconds, mean seconds per step)`` of ``mode`` (module docstring)."""
    torch.manual_seed(0)
    model = genkit.create_model("vdm", shape, timesteps=0, **params)
    model = model.to(memory_format=torch.channels_last)
    if mode == "compile":
        for child in model.children():
            child.compile()
    # fused as the Trainer's; ``loop``: torch's loop over the parameters
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=False)
    x = torch.randint(0, 256, (batch_size, *shape)).float() / 127.5 - 1
    x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16"):
            loss = -model.elbo(x).total.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return first, (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--modes", default="fp32,bf16,compile")
    ap.add_argument("--params", default="{}", help="create_model keyword arguments (JSON)")
    ap.add_argument("--shape", default="1,28,28", help="C,H,W of the images")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--adamw", choices=("fused", "loop"), default="fused")
    args = ap.parse_args()
    params = json.loads(args.params)
    shape = tuple(int(n) for n in args.shape.split(","))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for mode in args.modes.split(","):
        first, per = step_time(
            mode, params, args.batch_size, args.steps, shape, args.adamw == "fused"
        )
        print(
            f"{mode:<8} {per:.4f} s/step (first step {first:.1f} s), batch {args.batch_size}, "
            f"shape {shape}, AdamW {args.adamw}, "
            f"params {params or 'defaults'}, {torch.get_num_threads()} threads",
            flush=True,
        )


if __name__ == "__main__":
    main()
