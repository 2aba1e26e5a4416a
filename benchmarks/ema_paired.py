"""Does the trainer's EMA of the weights help? The test bits/dim of a run's EMA weights against
its raw (last) weights, paired: per test image, the same draws of the ELBO's noise for both.

    python benchmarks/ema_paired.py RUN_DIR [RUN_DIR ...] [--draws 8] [--seed 0]

For each run (any model; its latest checkpoint, the last EMA weights of a ``keep_best`` run) it prints both bound estimates and the paired
difference EMA minus raw in bits/dim, ± its se over the test images (each image's difference
averaged over ``--draws`` draws of the model's training ELBO, e.g. one t and eps per draw for a
VDM, seeded alike for the two weight sets). Negative: the EMA is the tighter bound. Pairing
removes the spread between images and most of the Monte-Carlo noise, which two independent
``genkit eval`` runs (one with ``--no-ema``) leave in; the last line pools the runs given
(inverse-variance weighted mean of their differences).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from genkit.data import batch_tensor, open_dataset
from genkit.training.cli import load_run


def per_image_bits(model, dataset, draws: int, seed: int, batch_size: int = 500) -> torch.Tensor:
    """``-ELBO / (D ln 2)`` per test image, averaged over ``draws`` seeded draws."""
    out = torch.zeros(len(dataset), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            x = torch.stack([batch_tensor(dataset[i]) for i in range(start, stop)])
            for draw in range(draws):
                torch.manual_seed(seed + 1_000_003 * draw + start)
                terms = model.elbo(x)
                out[start:stop] += -terms.total.double() / (model.num_dims * math.log(2))
    return out / draws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pooled = []
    for run in args.runs:
        bits = {}
        for ema in (True, False):
            model, info, path = load_run(run, use_ema=ema, device="cpu", last=True)
            model.eval()
            bits[ema] = per_image_bits(
                model, open_dataset(info["data"], "test"), args.draws, args.seed
            )
        diff = bits[True] - bits[False]
        se = (diff.std() / math.sqrt(diff.numel())).item()
        pooled.append((diff.mean().item(), se))
        print(
            f"{run} ({path.name}): EMA {bits[True].mean():.4f}, raw {bits[False].mean():.4f} "
            f"bits/dim; EMA - raw {diff.mean():+.4f} ± {se:.4f} (paired, {diff.numel()} test "
            f"images x {args.draws} draws)",
            flush=True,
        )
    if len(pooled) > 1:
        w = [1 / se**2 for _, se in pooled]
        mean = sum(wi * d for wi, (d, _) in zip(w, pooled, strict=True)) / sum(w)
        print(
            f"pooled over {len(pooled)} runs: EMA - raw {mean:+.4f} ± {math.sqrt(1 / sum(w)):.4f}"
        )


if __name__ == "__main__":
    main()
