"""One command that answers, on a CUDA machine, what the GPU path of genkit does (at most about
8 minutes; on a machine without CUDA it says so in one line and exits 0):

    python benchmarks/gpu_check.py [--steps 200] [--budget-minutes 8] [--skip-ddp]
        [--skip-unet] [--allow-cpu]

1. **Training** through the real :class:`~genkit.training.Trainer` (random 8-bit data on the
   GPU recipes' shapes), for each model of ``recipes/mnist_gpu.toml`` (vae, hvae, the discrete
   and the continuous VDM) in four modes: fp32 NCHW, fp32 channels_last, bf16 autocast
   channels_last, and bf16 channels_last with ``torch.compile``; images per second of
   training steps (``Trainer.train_seconds``, after 5 untimed steps that allocate, autotune
   and, with compile, compile).
2. **bf16 against fp32**: each model's ELBO on one batch with the same weights and the same
   random draws, in fp32 and under bf16 autocast: the relative difference of the total, and
   the largest of the terms' differences in bits/dim.
3. **DDP with NCCL** on every visible GPU: ``torchrun --nproc_per_node=<GPUs> -m genkit train``
   for 50 steps; with one GPU it says that NCCL needs a GPU per rank and skips.
4. **genkit's U-Net against diffusers' UNet2DModel** of the same layers, on the GPU
   (``benchmarks/unet_speed.py --device cuda``; needs the ``diffusers`` extra).
5. **The GPU recipes' wall time**, estimated from rates measured here on each recipe's own
   models: training is the recipe's ``minutes`` budget (and the steps it buys at the measured
   rate), evaluation from 2 draws (the least) to ``max_nfe`` network evaluations per test
   example (the most), sampling from the measured sampler speed.

``--allow-cpu`` runs the same code on the CPU with small sizes (a check of the script itself,
not a measurement; compile is skipped there). Every figure is printed with the device's name.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import genkit
from genkit.data import DatasetArrays, SplitArrays, open_dataset, write_h5
from genkit.recipes.schema import load_recipe
from genkit.training import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"mnist_gpu": (1, 28, 28), "cifar10_gpu": (3, 32, 32)}
#: Test examples of the data sets the GPU recipes are written for.
TEST_EXAMPLES = {"mnist_gpu": 10_000, "cifar10_gpu": 10_000}
#: Untimed training steps before the timed ones (with compile: the compiling).
WARMUP_STEPS = 5
MODES = {
    "fp32 NCHW": {"precision": "fp32", "channels_last": False},
    "fp32 channels_last": {"precision": "fp32", "channels_last": True},
    "bf16 channels_last": {"precision": "bf16", "channels_last": True},
    "bf16 channels_last compile": {"precision": "bf16", "channels_last": True, "compile": True},
}


class Deadline:
    """The script's time budget: each section asks before it starts."""

    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float, what: str) -> bool:
        if self.left() >= seconds:
            return True
        print(
            f"  skipped {what}: {self.left():.0f} s of the budget left, it needs ~{seconds:.0f} s"
        )
        return False


def random_h5(folder: Path, shape: tuple[int, ...], n: int) -> Path:
    """``n`` random 8-bit images of ``shape`` (train and test) in genkit's layout."""
    rng = np.random.default_rng(0)
    path = folder / f"random_{'x'.join(map(str, shape))}.h5"
    if not path.exists():
        splits = {
            s: SplitArrays(images=rng.integers(0, 256, (n, *shape), dtype=np.uint8))
            for s in ("train", "test")
        }
        write_h5(DatasetArrays(splits, {"source": "gpu_check"}), path)
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(
    name: str, params: dict, shape: tuple, data: Path, mode: dict, steps: int, batch: int
) -> float:
    """Images per second of ``steps`` training steps of the model through the Trainer."""
    train = open_dataset(data, "train", in_memory=True)
    config = TrainConfig(
        steps=WARMUP_STEPS + steps,
        batch_size=batch,
        lr_warmup_steps=0,
        eval_every=0,
        num_samples=0,
        log_every=0,
        checkpoint_every=0,
        device="auto",
        **mode,
    )
    torch.manual_seed(0)
    model = genkit.create_model(name, shape, **params)
    trainer = Trainer(model, config, train, None, None, progress=False)
    trainer.start()
    try:
        # warm-up steps first: allocations, cuDNN autotuning, and with compile the compiling
        trainer.train(until=WARMUP_STEPS)
        synchronize(trainer.device)
        began = trainer.train_seconds
        trainer.train(until=WARMUP_STEPS + steps)
        synchronize(trainer.device)
        seconds = trainer.train_seconds - began
    finally:
        trainer.close()
    return steps * batch / seconds if seconds > 0 else math.nan


def elbo_agreement(name: str, params: dict, shape: tuple, device: torch.device) -> dict:
    """The ELBO in fp32 and under bf16 autocast, same weights and draws."""
    torch.manual_seed(0)
    model = genkit.create_model(name, shape, **params).to(device).eval()
    x = torch.randint(0, 256, (64, *shape), device=device) / 127.5 - 1
    results = {}
    with torch.no_grad():
        for precision in ("fp32", "bf16"):
            torch.manual_seed(1)
            if device.type == "cuda":
                torch.cuda.manual_seed(1)
            autocast = (
                torch.autocast(device.type, dtype=torch.bfloat16)
                if precision == "bf16"
                else contextlib.nullcontext()
            )
            with autocast:
                terms = model.elbo(x)
            results[precision] = terms
    full, half = results["fp32"], results["bf16"]
    scale = model.num_dims * math.log(2)
    total = (half.total.float().mean() / full.total.float().mean() - 1).abs().item()
    worst = max(
        ((half.terms[k].float() - full.terms[k].float()).mean().abs() / scale).item()
        for k in full.terms
    )
    return {"relative": total, "worst_term_bits": worst}


def forward_rate(model: torch.nn.Module, shape: tuple, batch: int, bf16: bool, device) -> float:
    """Network evaluations (images) per second of ``model.elbo`` in evaluation, one call
    costing ``terms.nfe`` network evaluations per image."""
    x = torch.randint(0, 256, (batch, *shape), device=device) / 127.5 - 1
    if len(shape) == 3:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        nfe = model.elbo(x).nfe or 1.0  # warm-up
        synchronize(device)
        began, calls = time.perf_counter(), 0
        while time.perf_counter() - began < 1.0 or calls < 3:
            model.elbo(x)
            calls += 1
        synchronize(device)
    return calls * batch * nfe / (time.perf_counter() - began)


def sample_rate(model: torch.nn.Module, sample_params: dict, device, n: int = 16) -> float:
    with torch.no_grad():
        began = time.perf_counter()
        model.sample(n, **sample_params)
        synchronize(device)
    return n / (time.perf_counter() - began)


def recipe_estimates(device: torch.device, deadline: Deadline, quick: bool) -> None:
    print("\n5. The GPU recipes' wall time, from rates measured here")
    for recipe_name, shape in RECIPES.items():
        recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.toml")
        bf16 = recipe.train.get("precision") == "bf16"
        total_low = total_high = 0.0
        print(f"  {recipe_name} ({len(recipe.runs)} runs, {'bf16' if bf16 else 'fp32'}):")
        for spec in recipe.runs:
            if not deadline.allows(20, f"{recipe_name}/{spec.name}"):
                return
            budget, settings = recipe.budget_for(spec), recipe.eval_for(spec)
            torch.manual_seed(0)
            model = genkit.create_model(spec.model, shape, **spec.params).to(device).eval()
            if len(shape) == 3:
                model = model.to(memory_format=torch.channels_last)
            batch = 8 if quick else min(settings.batch_size, 256)
            # evaluation runs in fp32 (the trainer's evaluation and genkit eval)
            rate = forward_rate(model, shape, batch, False, device)  # images x NFE per second
            params = {**recipe.train.get("sample_params", {}), **spec.sample_params}
            if quick and "steps" in params:
                params["steps"] = 2
            per_image = 1 / sample_rate(model, params, device, n=4 if quick else 16)
            with torch.no_grad():  # network evaluations per example of one estimator call
                one_call = model.elbo(torch.full((1, *shape), -1.0, device=device)).nfe or 1.0
            n = TEST_EXAMPLES[recipe_name]
            low = 2 * n * one_call / rate  # two draws: the fewest
            high = n * (settings.max_nfe or 1000) / rate
            train = 60 * (budget.minutes or 0)
            samples = settings.samples * per_image
            # sample quality: metric_samples at the run's sampler, and again at each of
            # metric_steps (a sampler's cost is proportional to its steps)
            quality = 0.0
            if settings.metrics:
                own = params.get("steps")
                steps = [s for s in settings.metric_steps if s != own] if own else []
                scale = 1 + sum(s / own for s in steps) if own else 1
                quality = settings.metric_samples * per_image * scale
            total_low += train + low + samples + quality
            total_high += train + high + samples + quality
            print(
                f"    {spec.name:16s} train {train / 60:5.0f} min, final eval "
                f"{low / 60:6.1f}–{high / 60:6.1f} min ({rate:,.0f} NFE/s), "
                f"{settings.samples} samples {samples:5.1f} s, sample quality "
                f"{quality / 60:6.1f} min"
            )
        print(
            f"    in all: {total_low / 3600:.2f}–{total_high / 3600:.2f} h (periodic "
            "evaluations and checkpoints add a little)"
        )


def ddp_check(data: Path, deadline: Deadline) -> None:
    print("\n3. DDP with NCCL on every visible GPU")
    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"  {gpus} GPU visible: NCCL needs one GPU per rank, so DDP is not exercised here")
        return
    if not deadline.allows(90, "DDP"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={gpus}", "-m", "genkit", "train", "--model", "vae",
            "--data", str(data), "--out", str(Path(tmp) / "run"), "--quiet",
            "--set", "steps=50", "--set", "device=\"cuda\"", "--set", "batch_size=256",
        ]  # fmt: skip
        began = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - began
    status = "ran" if proc.returncode == 0 else f"FAILED (status {proc.returncode})"
    print(f"  {gpus} processes, NCCL, 50 steps: {status} in {seconds:.0f} s")
    if proc.returncode != 0:
        print("  " + "\n  ".join(proc.stderr.strip().splitlines()[-5:]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="timed training steps per mode")
    ap.add_argument("--budget-minutes", type=float, default=8.0)
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--allow-cpu", action="store_true", help="check the script on the CPU")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu_check: no CUDA device (torch {torch.__version__}); nothing to measure")
        return 0
    quick = not torch.cuda.is_available()
    device = torch.device("cuda" if not quick else "cpu")
    deadline = Deadline(args.budget_minutes)
    steps = 3 if quick else args.steps
    if device.type == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(
            f"gpu_check: {', '.join(names)}; torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        print(
            "gpu_check --allow-cpu: the CPU, small sizes (a check of the script, not a measurement)"
        )
    recipe = load_recipe(ROOT / "recipes" / "mnist_gpu.toml")
    shape = RECIPES["mnist_gpu"]
    batch = 8 if quick else int(recipe.train.get("batch_size", 128))
    with tempfile.TemporaryDirectory() as tmp:
        data = random_h5(Path(tmp), shape, max(4 * batch, 64))
        print(
            f"\n1. Training img/s through the Trainer (mnist_gpu's models, batch {batch}, {steps} steps)"
        )
        print(f"  {'model':16s}" + "".join(f"{m:>28s}" for m in MODES))
        for spec in recipe.runs:
            params = dict(spec.params)
            if quick:
                params = {**params, **({"channels": 8} if "channels" in params else {})}
            cells = []
            for mode_name, mode in MODES.items():
                if mode.get("compile") and quick:
                    cells.append("(not on CPU)")
                    continue
                if not deadline.allows(
                    15 if not mode.get("compile") else 60, f"{spec.name} {mode_name}"
                ):
                    cells.append("(no time)")
                    continue
                try:
                    cells.append(
                        f"{train_rate(spec.model, params, shape, data, mode, steps, batch):,.0f}"
                    )
                except Exception as exc:  # a mode that fails is a finding, not the end
                    cells.append(f"FAILED {type(exc).__name__}")
                    print(f"  {spec.name} {mode_name}: {type(exc).__name__}: {exc}")
            print(f"  {spec.name:16s}" + "".join(f"{c:>28s}" for c in cells))

        print("\n2. ELBO under bf16 autocast against fp32 (same weights and draws, batch 64)")
        for spec in recipe.runs:
            params = dict(spec.params)
            if quick:
                params = {**params, **({"channels": 8} if "channels" in params else {})}
            got = elbo_agreement(spec.model, params, shape, device)
            print(
                f"  {spec.name:16s} total relative difference {got['relative']:.2e}, "
                f"largest term difference {got['worst_term_bits']:.2e} bits/dim"
            )

        if not args.skip_ddp and device.type == "cuda":
            ddp_check(data, deadline)
        if not args.skip_unet and device.type == "cuda" and deadline.allows(60, "U-Net"):
            print("\n4. genkit's U-Net against diffusers' UNet2DModel of the same layers")
            proc = subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / "unet_speed.py"), "--device", "cuda"],
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ},
            )
            print("  " + "\n  ".join((proc.stdout or proc.stderr).strip().splitlines()[-8:]))
        recipe_estimates(device, deadline, quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
