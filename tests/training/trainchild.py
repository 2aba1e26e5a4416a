"""A training process the tests start, kill and resume (``python trainchild.py ...``).

``--kill-at K`` SIGKILLs the process itself at the end of step K (after any checkpoint of
that step); ``--ddp-step`` instead takes two steps of TinyModel on this rank's half of fixed
batches, under torchrun-style environment variables, and saves the parameters and the step
metrics rank 0 logs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from trainhelp import TinyModel, ddp_config, flat_params, tiny_images, tiny_vae

import genkit
from genkit.registry import make_plugin_manager
from genkit.training import (
    TrainConfig,
    Trainer,
    distributed,
)


class Metrics:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    @genkit.hookimpl
    def on_step_end(self, trainer, step, metrics):
        self.logged = dict(metrics)


class KillAt:
    def __init__(self, step: int) -> None:
        self.step = step

    @genkit.hookimpl
    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ddp-step", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.ddp_step:
        ddp_step(args.run_dir)
        return
    data = tiny_images(96)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=16,
        lr_warmup_steps=2,
        log_every=1,
        eval_every=0,
        checkpoint_every=10,
        ema_decay=0.9,
    )
    plugins = [KillAt(args.kill_at)] if args.kill_at else []
    trainer = Trainer(
        tiny_vae(),
        cfg,
        data,
        run_dir=args.run_dir,
        catalog=make_plugin_manager(plugins=plugins),
        progress=False,
    )
    trainer.fit(resume=args.resume)
    torch.save(
        {"params": flat_params(trainer.model), "ema": flat_params(trainer.ema_model)},
        args.run_dir / "final.pt",
    )


def ddp_step(out: Path) -> None:
    info = distributed.init_from_env("cpu")
    torch.manual_seed(0)
    model = TinyModel()
    x = tiny_images(32, seed=3)
    half = x.shape[0] // info.world_size
    cfg = ddp_config()
    metrics = Metrics()
    catalog = make_plugin_manager(plugins=[metrics])
    trainer = Trainer(model, cfg, x, catalog=catalog, progress=False)
    trainer.start()  # opens the (here file-less) logger
    trainer.train_step(x[info.rank * half : (info.rank + 1) * half])
    trainer.train_step(x[info.rank * half : (info.rank + 1) * half].flip(0))
    trainer._flush_metrics()  # what a log_every boundary does (a collective under DDP)
    if info.is_main:
        torch.save(
            {
                "params": flat_params(trainer.model),
                "metrics": metrics.logged,
                "world_size": trainer.dist.world_size,
            },
            out / "ddp.pt",
        )
    distributed.shutdown()


if __name__ == "__main__":
    main()
