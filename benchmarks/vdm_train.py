"""VDM training throughput: the ``vdm`` plugin through ``genkit.training.Trainer`` against a
plain PyTorch loop around the same U-Net with the same one-call loss, interleaved in one run.

    python benchmarks/vdm_train.py [--size 28] [--batch-size 64] [--rounds 6] [--block 10]
        [--threads N] [--timesteps 0]

genkit: ``create_model("vdm", (1, S, S), timesteps=..., channels=32, channel_mults=(1, 2),
attention_resolution=8)`` (the U-Net of the defaults before issue #21, as measured in the
README; otherwise the defaults: continuous time: the learned schedule with its variance
gradient, Fourier features; discrete time: the loss-aware proposal over t = 1..T) trained by
the Trainer with its defaults and gradient clipping at 1.0 (AdamW, warm-up + cosine, clipping,
EMA, channels_last, metric logging and TensorBoard).

The plain loop: a deep copy of the same U-Net, the continuous-time loss written out in a few
lines (a fixed linear log-SNR, one stratified t per example, ``1/2 * 18.3 * ||eps -
eps_hat||^2`` plus the closed-form prior term), AdamW, clipping and an EMA, on the same data in
the same batches. It is timed in the plain NCHW memory format and in channels_last, and the
ratio uses the faster of the two: the Trainer must match the best a hand-written loop gets.

Prints images/s of each and ``Trainer / best plain loop`` (the issue's target: >= 0.95).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

import genkit
from genkit.data import make_loader
from genkit.training import TrainConfig, Trainer
from genkit.training.trainer import distribution_validation


def make_data(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float() / 127.5 - 1.0


class PlainLoop:
    """The continuous VDM's one-call loss around ``net``, by hand, with AdamW, clip and EMA."""

    def __init__(self, net, data, cfg: TrainConfig, channels_last: bool) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=fmt)
        self.fmt, self.data, self.cfg = fmt, data, cfg
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.params = list(self.net.parameters())
        self.ema_params = list(self.ema.parameters())
        # fused, as the Trainer's: the ratio is the Trainer's overhead, not the optimizer's
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, fused=True)
        self.epoch, self.it = 0, None

    def batch(self) -> torch.Tensor:
        while True:
            if self.it is None:
                self.it = iter(
                    make_loader(self.data, self.cfg.batch_size, seed=0, epoch=self.epoch)
                )
            try:
                return next(self.it)
            except StopIteration:
                self.epoch, self.it = self.epoch + 1, None

    def steps(self, n: int) -> None:
        lam_max, lam_min = 13.3, -5.0
        with distribution_validation(False):
            for _ in range(n):
                x = self.batch().contiguous(memory_format=self.fmt)
                b = x.shape[0]
                t = torch.frac(torch.rand(()) + torch.arange(b) / b)  # stratified
                lam = lam_max + (lam_min - lam_max) * t
                alpha = torch.sigmoid(lam).sqrt().view(-1, 1, 1, 1)
                sigma = torch.sigmoid(-lam).sqrt().view(-1, 1, 1, 1)
                eps = torch.randn_like(x)
                eps_hat = self.net(alpha * x + sigma * eps, t)
                diffusion = 0.5 * (lam_max - lam_min) * (eps - eps_hat).square().sum((1, 2, 3))
                a1 = torch.sigmoid(torch.tensor(lam_min))
                prior = 0.5 * (a1 * x.square() + (1 - a1) - 1 - torch.log(1 - a1)).sum((1, 2, 3))
                loss = (diffusion + prior).mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
                self.opt.step()
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema_params, self.params, 1 - self.cfg.ema_decay)


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=10, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timesteps", type=int, default=0, help="0: continuous time (default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = (1, args.size, args.size)
    data = make_data(2048, shape)
    torch.manual_seed(0)
    unet = {"channels": 32, "channel_mults": (1, 2), "attention_resolution": 8}
    model = genkit.create_model("vdm", shape, timesteps=args.timesteps, **unet)
    total = (args.rounds + 1) * args.block + 1
    cfg = TrainConfig(
        steps=total,
        batch_size=args.batch_size,
        grad_clip=1.0,  # the plain loops clip as the Trainer does
        eval_every=0,
        checkpoint_every=0,
        device="cpu",
    )
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(copy.deepcopy(model), cfg, data, run_dir=run_dir, progress=False)
        trainer.start()
        loops = {
            "plain_nchw": PlainLoop(copy.deepcopy(model.net), data, cfg, channels_last=False),
            "plain_channels_last": PlainLoop(
                copy.deepcopy(model.net), data, cfg, channels_last=True
            ),
        }
        runners = {"trainer": lambda n: trainer.train(trainer.step + n)}
        runners.update({k: v.steps for k, v in loops.items()})
        for fn in runners.values():  # warm-up, not timed
            fn(max(2, args.block // 2))
        times: dict[str, list[float]] = {k: [] for k in runners}
        order = list(runners)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                times[name].append(timed(runners[name], args.block))
        trainer.close()

    rate = {k: args.block * args.batch_size / statistics.median(v) for k, v in times.items()}
    best = max(("plain_nchw", "plain_channels_last"), key=rate.get)
    print(
        f"vdm timesteps={args.timesteps} on {shape}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.block} steps, "
        f"interleaved; {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    for name, value in rate.items():
        print(f"  {name:<22} {value:8.1f} images/s")
    print(f"ratio Trainer / best plain loop ({best}): {rate['trainer'] / rate[best]:.3f}")
    print(f"ratio Trainer / plain NCHW loop: {rate['trainer'] / rate['plain_nchw']:.3f}")


if __name__ == "__main__":
    main()
