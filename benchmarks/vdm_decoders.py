"""The continuous VDM's two decoders p(x|z_0) on the same trained weights: Kingma et al.'s
softmax over the 256 values (``decoder="softmax"``) against the bin mass
(``decoder="bin_mass"``). The decoder has no parameters, so one trained model serves both.

    python benchmarks/vdm_decoders.py RUN_DIR [RUN_DIR ...] [--mc-se 0.01] [--z-draws 16]
    python benchmarks/vdm_decoders.py --step-cost 1,28,28 [--steps 12] [--batch-size 64]

RUN_DIR: a continuous VDM run of ``genkit train``/``genkit run`` (its EMA weights). For each
run and decoder it prints the test bits/dim as ``genkit eval`` computes it (the model's
evaluation estimator, drawn to ``--mc-se``, the same seed for both decoders) with the
reconstruction term's share; then the paired difference of the reconstruction term alone
(softmax minus bin mass, bits/dim, ± se over the test images), from ``--z-draws`` draws of
z_0 ~ q(z_0|x) per image shared by the two decoders. The other terms do not depend on the
decoder (tests/plugins/vdm/test_decoder.py), so this is also the difference of the bound.

``--step-cost C,H,W``: the CPU seconds (``time.process_time``, so other jobs on the machine
count little) of one training step (ELBO, backward, Adam) of a fresh continuous VDM with the
defaults on random 8-bit images of that shape, the two decoders alternating step by step;
mean over ``--steps`` steps each after two warm-up steps.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from genkit.data import batch_tensor, open_dataset
from genkit.evaluation import evaluate
from genkit.training.cli import load_run

DECODERS = ("bin_mass", "softmax")


def paired_reconstruction_gap(model, dataset, z_draws: int, seed: int) -> tuple[float, float]:
    """Softmax minus bin-mass reconstruction in bits/dim (``> 0``: the softmax is tighter by
    that much): mean and se over the examples, each averaged over ``z_draws`` shared z_0."""
    from genkit_vdm.continuous_elbo import reconstruction

    gaps = []
    log_snr_0 = model.schedule.end_points()[0].detach()
    scale = model.num_dims * math.log(2)
    with torch.no_grad():
        for start in range(0, len(dataset), 256):
            x = torch.stack(
                [batch_tensor(dataset[i]) for i in range(start, min(start + 256, len(dataset)))]
            )
            total = torch.zeros(x.shape[0], dtype=torch.float64)
            for draw in range(z_draws):
                recon = {}
                for name in DECODERS:
                    model.decoder.grid_decoder = name
                    torch.manual_seed(seed + 1000 * draw + start)  # the same z_0 for both
                    recon[name] = reconstruction(model, x, log_snr_0).double()
                total += (recon["softmax"] - recon["bin_mass"]) / scale
            gaps.append(total / z_draws)
    g = torch.cat(gaps)
    return g.mean().item(), (g.std() / math.sqrt(g.numel())).item()


def step_cost(shape: tuple[int, ...], steps: int, batch_size: int) -> None:
    """Print the mean CPU seconds of a training step under each decoder (module docstring)."""
    import time

    import genkit

    torch.manual_seed(0)
    model = genkit.create_model("vdm", shape, timesteps=0)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randint(0, 256, (batch_size, *shape)).float() / 127.5 - 1
    seconds: dict[str, list[float]] = {name: [] for name in DECODERS}
    with torch.enable_grad():
        for i in range(2 * (steps + 2)):
            name = DECODERS[i % 2]
            model.decoder.grid_decoder = name
            start = time.process_time()
            loss = -model.elbo(x).total.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 4:
                seconds[name].append(time.process_time() - start)
    threads = torch.get_num_threads()
    for name, values in seconds.items():
        print(
            f"  {name:<9} {sum(values) / len(values):.3f} s CPU per step (batch {batch_size}, "
            f"{shape}, {threads} thread(s), {len(values)} steps)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--step-cost", type=str, default=None, metavar="C,H,W")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mc-se", type=float, default=0.01)
    ap.add_argument("--z-draws", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.step_cost:
        step_cost(tuple(int(n) for n in args.step_cost.split(",")), args.steps, args.batch_size)
    for run in args.runs:
        model, info, path = load_run(run, device="cpu")
        model.eval()
        test = open_dataset(info["data"], "test") if "data" in info else None
        if test is None:
            raise SystemExit(f"{run}: the run config names no data")
        trained = model.decoder.grid_decoder
        lam0 = model.schedule.end_points()[0].item()
        print(f"{run} ({path.name}; trained with decoder={trained}; lambda(0) = {lam0:.3f})")
        for name in DECODERS:
            model.decoder.grid_decoder = name
            torch.manual_seed(args.seed)
            r = evaluate(model, test, mc_se=args.mc_se)
            b = r.bits()
            recon = -r.means["reconstruction"] / (r.num_dims * math.log(2))
            print(
                f"  {name:<9} test bits/dim {b['mean']:.4f} ± {b['se']:.4f} (se) "
                f"± {b['mc_se']:.4f} (mc_se), draws {r.draws}; reconstruction "
                f"{recon:.4f} bits/dim"
            )
        gap, se = paired_reconstruction_gap(model, test, args.z_draws, args.seed)
        print(
            f"  softmax tighter by {gap:.4f} ± {se:.4f} bits/dim (paired, reconstruction, "
            f"{args.z_draws} z_0 per image, {len(test)} test images)"
        )
        model.decoder.grid_decoder = trained


if __name__ == "__main__":
    main()
