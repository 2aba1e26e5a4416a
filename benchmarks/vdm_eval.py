"""What an honest VDM bits/dim costs: network evaluations (NFE) and seconds to reach
``mc_se <= 0.01`` bits/dim on the test split of ``builtin:digits``, against the exact sum over
all T, and the probability-flow ODE likelihood next to the ELBO of the same model.

    python benchmarks/vdm_eval.py --discrete RUN_DIR --continuous RUN_DIR [--target 0.01]
    python benchmarks/vdm_eval.py --train-minutes 3      # trains the two small VDMs first
        [--target 0.01] [--skip-exact] [--skip-ode] [--batch-size 64] [--repeats 16]

RUN_DIRs are digits runs of ``genkit train``/``genkit run`` (their EMA weights are used), for
instance ``runs/vdm_digits_table/runs/discrete_fourier`` and ``.../learned_fourier`` of
``benchmarks/vdm_digits_table.toml``. Without them the script trains a discrete (T = 1000) and
a continuous VDM with their defaults for ``--train-minutes`` each.

For each model it prints, on the whole test split:

- the evaluation estimator (discrete: loss-aware proposal over t = 1..T from the statistics
  stored in training, 4 stratified t per example and call; continuous: 4 stratified t) run to
  ``mc_se <= --target``: bits/dim ± se ± mc_se, draws, NFE per example, seconds;
- discrete only: the exact sum over every t (T NFE per example; one draw), and the per-draw
  standard deviation of one call of the one-call estimator (one t, reconstruction sampled
  with the rest) and of genkit 0.1's two-call estimator (reconstruction at every call plus one
  t), with the one-call one over two draws (so both cost two network calls); and the same
  comparison for what a training step sees: the sd of the batch-mean bits/dim of batches of
  ``--batch-size`` in training mode, where the draws of ``t`` are stratified over the batch;
- the ODE log-likelihood (``estimator="ode"``, rtol = atol = ``--ode-tol``, Hutchinson
  divergence) on ``--ode-examples`` test images: bits/dim ± se ± mc_se, NFE, seconds, next to
  the ELBO on the same images.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

import genkit
from genkit.data import open_dataset
from genkit.evaluation import EvalResult, evaluate


def line(name: str, r: EvalResult) -> str:
    b = r.bits()
    nfe = "?" if r.nfe_per_example is None else f"{r.nfe_per_example:.1f}"
    return (
        f"  {name:<44} {b['mean']:.4f} ± {b['se']:.4f} (se) ± {b['mc_se']:.4f} (mc_se)  "
        f"draws {r.draws:>3}  NFE/example {nfe:>7}  {r.seconds:7.1f} s"
    )


def load(run_dir: Path):
    from genkit.training.cli import load_run

    model, _info, path = load_run(run_dir, device="cpu")
    return model, path


def train(timesteps: int, minutes: float, root: Path, data: str):
    from genkit.training import TrainConfig, Trainer

    torch.manual_seed(0)
    shape = tuple(open_dataset(data, "train").data_shape)
    model = genkit.create_model("vdm", shape, timesteps=timesteps)
    cfg = TrainConfig(minutes=minutes, eval_every=0, checkpoint_every=0, eval_mc_se=None)
    trainer = Trainer(model, cfg, open_dataset(data, "train"), None, root, progress=False)
    trainer.fit()
    return trainer.ema_model.eval(), root


def subset(dataset, n: int) -> torch.Tensor:
    from genkit.data import batch_tensor

    return torch.stack([batch_tensor(dataset[i]) for i in range(min(n, len(dataset)))])


def training_batch_sd(model, dataset, batch_size: int, repeats: int) -> tuple[float, float]:
    """What a training step sees: the sd of the batch-mean bits/dim of the one-call and of the
    two-call estimator over ``repeats`` draws on fixed batches of ``batch_size`` test images
    (pooled over the batches), in training mode, where the uniforms behind ``t`` are stratified
    over the batch (one shift per call). ``p(t)`` is the one the model's training estimator
    would draw from now (its loss-aware proposal, or its warm-up proposal while the statistics
    are cold), on ``1..T`` and on ``2..T`` respectively, passed as a fixed sequence so that
    nothing is recorded."""
    from genkit_vdm.estimators import DenoisingMatchingELBO

    x = subset(dataset, len(dataset))
    batches = x[: len(x) // batch_size * batch_size].split(batch_size)
    was_training = model.training
    model.train()
    try:
        own = model.estimator()  # the training estimator: its p(t), warm-up included
        estimators = []
        for first, extra in ((1, {}), (2, {"reconstruction_every_step": True})):
            p, _ = own.probabilities(model.timesteps, x.device, model=model, x=x, first=first)
            estimators.append(DenoisingMatchingELBO(proposal=p.tolist(), **extra))
        variances = [[], []]
        torch.manual_seed(4)
        with torch.no_grad():
            for batch in batches:
                for i, est in enumerate(estimators):
                    draws = [est(model, batch).bits_per_dim().mean() for _ in range(repeats)]
                    variances[i].append(torch.stack(draws).double().var())
    finally:
        model.train(was_training)
    one, two = (float(torch.stack(v).mean().sqrt()) for v in variances)
    return one, two


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--discrete", type=Path)
    ap.add_argument("--continuous", type=Path)
    ap.add_argument("--data", default="builtin:digits")
    ap.add_argument("--target", type=float, default=0.01)
    ap.add_argument("--train-minutes", type=float, default=3.0)
    ap.add_argument("--ode-examples", type=int, default=64)
    ap.add_argument("--ode-tol", type=float, default=1e-4)
    ap.add_argument("--draws", type=int, default=8, help="draws for the per-draw sd")
    ap.add_argument("--skip-exact", action="store_true", help="skip the exact sum over T")
    ap.add_argument("--skip-ode", action="store_true", help="skip the ODE likelihoods")
    ap.add_argument("--batch-size", type=int, default=64, help="training batch for its sd")
    ap.add_argument("--repeats", type=int, default=16, help="draws per training batch")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    test = open_dataset(args.data, "test")
    tmp = Path(tempfile.mkdtemp(prefix="vdm_eval_"))
    models = {}
    for kind, run_dir, timesteps in (
        ("discrete", args.discrete, 1000),
        ("continuous", args.continuous, 0),
    ):
        if run_dir is not None:
            models[kind] = load(run_dir)
        else:
            print(f"training the {kind} VDM for {args.train_minutes} minutes ...", flush=True)
            models[kind] = train(timesteps, args.train_minutes, tmp / kind, args.data)
    print(f"test split of {args.data}: {len(test)} examples, {torch.get_num_threads()} threads")

    for kind, (model, where) in models.items():
        print(f"\n{kind} VDM ({where}):")
        torch.manual_seed(0)
        main_result = evaluate(model, test, mc_se=args.target, max_nfe=4000)
        print(line(f"evaluation estimator to mc_se <= {args.target}", main_result))
        if kind == "discrete":
            if not args.skip_exact:
                torch.manual_seed(0)
                exact = evaluate(model, test, params={"exact": True}, mc_se=None, min_draws=1)
                print(line(f"exact sum over all T = {model.timesteps} steps (1 draw)", exact))
                print(
                    f"  -> {exact.nfe_per_example / main_result.nfe_per_example:.1f}x fewer "
                    f"network evaluations, {exact.seconds / main_result.seconds:.1f}x less time"
                )
            sds = {}
            for name, params in (
                ("one call: t ~ p(t) on 1..T", {"t_samples": 1}),
                (
                    "two calls: reconstruction + t on 2..T",
                    {"t_samples": 1, "reconstruction_every_step": True},
                ),
            ):
                torch.manual_seed(1)
                r = evaluate(model, test, params=params, mc_se=None, min_draws=args.draws)
                sds[name] = r.draw_sd
                print(line(f"{name}, {args.draws} draws", r) + f"  sd of one draw {r.draw_sd:.3f}")
            one, two = sds.values()
            print(
                f"  per two network calls: one-call estimator over two draws sd {one / math.sqrt(2):.3f}"
                f" bits/dim, two-call estimator sd {two:.3f} bits/dim"
            )
            one, two = training_batch_sd(model, test, args.batch_size, args.repeats)
            print(
                f"  training batches of {args.batch_size} (t stratified over the batch, p(t) of the "
                f"training estimator), sd of the batch-mean bits/dim over {args.repeats} "
                f"draws: one call {one:.3f} (two draws: {one / math.sqrt(2):.3f}), "
                f"two calls {two:.3f}"
            )
        else:
            torch.manual_seed(1)
            r = evaluate(model, test, params={"t_samples": 1}, mc_se=None, min_draws=args.draws)
            print(
                line(f"one t per call, {args.draws} draws", r) + f"  sd of one draw {r.draw_sd:.3f}"
            )
        if args.skip_ode:
            continue
        x = subset(test, args.ode_examples)
        torch.manual_seed(2)
        elbo = evaluate(model, x, mc_se=args.target / 2, max_nfe=4000)
        print(line(f"ELBO on the first {len(x)} test images", elbo))
        began = time.perf_counter()
        torch.manual_seed(3)
        ode = evaluate(
            model, x, estimator="ode", params={"rtol": args.ode_tol, "atol": args.ode_tol},
            mc_se=None, min_draws=2,
        )  # fmt: skip
        print(line(f"ODE log-likelihood, same images (tol {args.ode_tol:g})", ode))
        print(f"  (ODE wall time {time.perf_counter() - began:.1f} s)")


if __name__ == "__main__":
    main()
