"""Trainer overhead: the same model, data and optimizer stepped by ``genkit.training.Trainer``
(TensorBoard and metric logging on) and by a plain PyTorch loop, interleaved in one process.

    python benchmarks/trainer_overhead.py [--rounds 8] [--block 50] [--threads 1] [--batch-size 32]

Prints the ratio of mean step times, Trainer / plain loop. The plain loop does the same
maths as the Trainer's step (AdamW, warm-up + cosine LR, gradient clipping, EMA of the
weights), so the ratio measures what the Trainer adds: on-device metric accumulation, the
non-finite check, data-order bookkeeping, the hooks and TensorBoard every ``log_every`` steps.
A second ratio against a bare loop (AdamW only) is printed for reference.
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
    k = torch.randint(0, 256, (n, *shape), generator=g).float()
    return k / 127.5 - 1.0  # 8-bit data on the model scale


class PlainLoop:
    """The textbook loop: forward, backward, clip, AdamW, LR schedule, EMA."""

    def __init__(self, model, data, cfg: TrainConfig, total: int, *, extras: bool = True) -> None:
        self.model, self.data, self.cfg, self.extras = model, data, cfg, extras
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.params = list(model.parameters())
        self.ema_params = list(self.ema.parameters())
        # fused, as the Trainer's: the ratio is the Trainer's overhead, not the optimizer's
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: cfg.lr_factor(s, total))
        self.epoch = 0
        self.it = iter(self._loader())

    def _loader(self):
        return make_loader(self.data, self.cfg.batch_size, seed=self.cfg.seed, epoch=self.epoch)

    def batch(self) -> torch.Tensor:
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            self.it = iter(self._loader())
            return next(self.it)

    def steps(self, n: int) -> None:
        with distribution_validation(False):  # as the Trainer runs every step after its first
            self._steps(n)

    def _steps(self, n: int) -> None:
        for _ in range(n):
            x = self.batch()
            loss = -self.model.elbo(x).total.mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.extras:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.opt.step()
            if self.extras:
                self.sched.step()
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema_params, self.params, 1 - self.cfg.ema_decay)


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=50, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    shape = (1, 28, 28)
    data = make_data(4096, shape)
    torch.manual_seed(0)
    model = genkit.create_model("vae", shape, net="mlp", latent_dim=16, hidden=256)
    total = (args.rounds + 1) * args.block
    cfg = TrainConfig(
        steps=total,
        batch_size=args.batch_size,
        log_every=50,
        eval_every=0,
        checkpoint_every=0,
        lr_warmup_steps=10,
        grad_clip=1.0,  # the plain loop clips as the Trainer does
        device="cpu",
    )
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(copy.deepcopy(model), cfg, data, run_dir=run_dir, progress=False)
        trainer.start()
        plain = PlainLoop(copy.deepcopy(model), data, cfg, total)
        bare = PlainLoop(copy.deepcopy(model), data, cfg, total, extras=False)
        runners = {
            "trainer": lambda n: trainer.train(trainer.step + n),
            "plain": plain.steps,
            "bare": bare.steps,
        }
        for fn in runners.values():  # warm-up block, not timed
            fn(args.block)
        times: dict[str, list[float]] = {k: [] for k in runners}
        order = list(runners)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                times[name].append(timed(runners[name], args.block))
        trainer.close()
        assert (trainer.run_dir / "tb").is_dir()

    ms = {k: 1000 * statistics.mean(v) for k, v in times.items()}
    per_round = [t / p for t, p in zip(times["trainer"], times["plain"], strict=True)]
    print(
        f"model: vae mlp on {shape}, batch {args.batch_size}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.block} steps, interleaved"
    )
    print(
        f"step time: trainer {ms['trainer']:.2f} ms, plain loop {ms['plain']:.2f} ms, "
        f"bare loop (AdamW only) {ms['bare']:.2f} ms"
    )
    print(
        f"ratio trainer / plain loop: {ms['trainer'] / ms['plain']:.3f} "
        f"(median of rounds {statistics.median(per_round):.3f})"
    )
    print(f"ratio trainer / bare loop:  {ms['trainer'] / ms['bare']:.3f}")


if __name__ == "__main__":
    main()
