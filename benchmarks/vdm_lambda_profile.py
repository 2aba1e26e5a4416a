"""Where along the log-SNR a trained continuous VDM spends its bits, against the per-pixel
oracle: what context buys at each noise level.

    python benchmarks/vdm_lambda_profile.py RUN_DIR [--grid 200] [--draws 2] [--examples 500]

RUN_DIR: a continuous VDM run of ``genkit train``/``genkit run`` (its EMA weights). The
diffusion loss is an integral over the log-SNR ``lambda`` (Kingma et al. 2021, eq. 16 after
the change of variables ``t -> lambda``, the denoiser conditioned on ``lambda``)::

    L_inf = 1/2 int_{lambda(1)}^{lambda(0)} E_{x, eps} ||eps - eps_hat(z_lambda, lambda)||^2 dlambda,
    z_lambda = alpha_lambda x + sigma_lambda eps,

which the script computes by the midpoint rule on ``--grid`` points (``--draws`` draws of eps per
point and test image) and splits into bands of ``lambda``. Next to it, the same integral for
the *per-pixel oracle*: ``eps_hat`` from ``E[x_i | z_i]`` with each pixel on its own, drawn
from the 256-value marginal of the train split (pooled over positions). That denoiser knows
the grey levels the data use (the comb of ``builtin:digits``) but not a pixel's neighbours;
over all ``lambda`` its loss is the marginal's entropy (the I-MMSE identity), which the script
prints as a check. ``model - oracle < 0`` in a band: what the network's view of the context
saves there.

Also printed: the reconstruction and prior-matching terms at the trained end points, and the
sum, the test bits/dim that ``genkit eval`` estimates (up to its Monte-Carlo error).
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch

from genkit.data import batch_tensor, open_dataset
from genkit.distributions import to_model_scale, to_pixels
from genkit.training.cli import load_run

#: Band edges in lambda, high to low.
EDGES = (20.0, 12.0, 10.0, 8.0, 6.0, 4.0, 2.0, 0.0, -2.0, -4.0, -6.0, -20.0)


def stack(dataset, limit: int | None = None) -> torch.Tensor:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.stack([batch_tensor(dataset[i]) for i in range(n)])


def marginal_log_probs(x: torch.Tensor) -> torch.Tensor:
    """``log P(v)`` of the 256 values over all pixels of ``x`` (model scale), add-0.001
    smoothing so that no value has probability 0."""
    counts = torch.bincount(to_pixels(x.reshape(-1)).long(), minlength=256)
    p = counts.double() + 1e-3
    return (p / p.sum()).log()


def oracle_x0(z: torch.Tensor, alpha: float, sigma: float, log_p: torch.Tensor) -> torch.Tensor:
    """``E[x_i | z_i]`` per pixel: ``sum_v v P(v) N(z_i; alpha v, sigma^2) / sum_v (...)``."""
    grid = to_model_scale(torch.arange(256)).to(z.dtype)
    logits = log_p.to(z.dtype) - 0.5 * ((z.unsqueeze(-1) - alpha * grid) / sigma).square()
    return (torch.softmax(logits, dim=-1) * grid).sum(-1)


def profile(model, x: torch.Tensor, log_p: torch.Tensor, grid: int, draws: int, seed: int):
    """``[(lambda, model bits/dim, oracle bits/dim)]`` per grid cell (module docstring)."""
    lo, hi = (float(e) for e in reversed(model.schedule.end_points()))
    width = (hi - lo) / grid
    scale = model.num_dims * math.log(2)
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for j in range(grid):
        lam = lo + (j + 0.5) * width
        alpha, sigma = (float(c) for c in model.encoder.coefficients(torch.tensor(lam)))
        net = orc = 0.0
        for _ in range(draws):
            eps = torch.randn(x.shape, generator=gen)
            z = alpha * x + sigma * eps
            log_snr = torch.full((x.shape[0],), lam)
            pred = model.decoder.predict(z, torch.full((x.shape[0],), 0.5), log_snr=log_snr)
            net += (eps - pred.eps).square().flatten(1).sum(1).mean().item()
            x0 = oracle_x0(z.double(), alpha, sigma, log_p)
            eps_o = (z.double() - alpha * x0) / sigma
            orc += (eps.double() - eps_o).square().flatten(1).sum(1).mean().item()
        rows.append((lam, 0.5 * net / draws * width / scale, 0.5 * orc / draws * width / scale))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--grid", type=int, default=200)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--examples", type=int, default=500, help="test images used (at most)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, info, path = load_run(args.run, device="cpu")
    model.eval()
    if getattr(model, "timesteps", None) != 0:
        raise SystemExit(f"{args.run}: not a continuous-time VDM (timesteps=0)")
    test = stack(open_dataset(info["data"], "test"), args.examples)
    train = stack(open_dataset(info["data"], "train"))
    log_p = marginal_log_probs(train)
    scale = model.num_dims * math.log(2)
    ends = model.schedule.end_points()
    torch.manual_seed(args.seed)
    # the two end terms as the model's ELBO computes them, the reconstruction over 4 draws
    terms = [model.elbo(test).terms for _ in range(4)]
    recon = -sum(t["reconstruction"].mean().item() for t in terms) / 4 / scale
    prior = -terms[0]["prior_matching"].mean().item() / scale
    rows = profile(model, test, log_p, args.grid, args.draws, args.seed)
    net_total = sum(r[1] for r in rows)
    orc_total = sum(r[2] for r in rows)
    entropy = -(log_p.exp() * log_p).sum().item() / math.log(2)
    print(
        f"{args.run} ({path.name}; lambda(0) = {float(ends[0]):.3f}, lambda(1) = "
        f"{float(ends[1]):.3f}; {test.shape[0]} test images, grid {args.grid}, "
        f"{args.draws} draws)"
    )
    print(f"{'lambda band':<16} {'model':>8} {'oracle':>8} {'model - oracle':>15}  (bits/dim)")
    for top, bottom in itertools.pairwise(EDGES):
        m = sum(r[1] for r in rows if bottom <= r[0] < top)
        o = sum(r[2] for r in rows if bottom <= r[0] < top)
        if m or o:
            print(f"[{bottom:>5.1f}, {top:>5.1f})   {m:>8.4f} {o:>8.4f} {m - o:>15.4f}")
    print(f"{'diffusion':<16} {net_total:>8.4f} {orc_total:>8.4f} {net_total - orc_total:>15.4f}")
    print(
        f"reconstruction {recon:.4f}, prior matching {prior:.4f}: the model's bound "
        f"{net_total + recon + prior:.4f} bits/dim"
    )
    print(
        f"check: the oracle's integral over all lambda is the marginal's entropy, "
        f"{entropy:.4f} bits/dim (here over [lambda(1), lambda(0)] only)"
    )


if __name__ == "__main__":
    main()
