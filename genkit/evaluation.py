"""Likelihood evaluation with honest errors: every bits/dim with ``se`` and ``mc_se``.

An estimator's value for one example is random (the draws of z, of t, ...). Evaluating a test
split of ``N`` examples ``R`` times ("draws"), with value ``v_{r,n}`` of draw ``r`` for example
``n``, genkit reports for each term and for bits/dim::

    mean   = (1/N) sum_n m_n,                     m_n = (1/R) sum_r v_{r,n}
    se     = std_n(m_n) / sqrt(N)                 the paper's ±: the spread of the test examples
    mc_se  = sqrt( (1/N^2) sum_n s_n^2 / R )      the Monte-Carlo part, given the test set,
                                                  s_n^2 = the sample variance of v_{.,n} over r

``mc_se`` is the standard deviation of ``mean`` over repeated evaluations of the same test set
with other random draws; it needs ``R >= 2`` and draws independent across examples (genkit's
estimators draw independently per example in evaluation mode; within an example an estimator
may stratify, the draws of one call counting as one value). ``se`` is what a paper's ± should
be; it includes the Monte-Carlo noise, which ``mc_se`` bounds.

:func:`evaluate` draws until ``mc_se`` of bits/dim is at most a target, or a budget of network
evaluations per example (``max_nfe``) would be exceeded by the next draw, or ``max_draws`` is
reached; the result says which. Everything runs with the model in eval mode, without gradients.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from genkit import collective
from genkit.elbo import LN2

#: Why the draws stopped.
STOPS = ("target", "draws", "max_nfe", "max_draws")


@attrs.frozen
class EvalResult:
    """Mean per-example ELBO terms on a split, with their errors (module docstring).

    ``means``/``stderrs``/``mc_se`` hold every term and extra plus ``elbo`` (the total of the
    terms, in nats) and ``bits_per_dim``. ``stderrs`` is ``se``: the standard deviation of the
    per-example means over the examples, over ``sqrt(count)``.
    """

    means: dict[str, float]
    stderrs: dict[str, float]
    count: int
    num_dims: int
    terms: list[str]
    extras: list[str]
    #: the Monte-Carlo standard error of each mean given the split (``nan`` with one draw)
    mc_se: dict[str, float] = attrs.field(factory=dict)
    #: draws per example (each a call of the estimator on every example)
    draws: int = 1
    #: network evaluations per example, over all draws (``None``: the estimator did not say)
    nfe_per_example: float | None = None
    seconds: float = 0.0
    estimator: str = ""
    params: dict[str, Any] = attrs.field(factory=dict)
    #: why the draws stopped: one of ``STOPS`` (or ``""``)
    stop: str = ""
    target_mc_se: float | None = None
    #: the standard deviation of the bits/dim of one draw (one estimator call) on one example,
    #: ``sqrt(mean_n s_n^2)``: what ``mc_se`` would be for a single example and draw
    draw_sd: float = math.nan
    #: the processes that shared the examples (``torchrun``; 1: this one alone)
    processes: int = 1

    @property
    def se(self) -> dict[str, float]:
        """``stderrs`` by its short name."""
        return self.stderrs

    def rows(self) -> list[tuple[str, float, float]]:
        """``(name, nats, se)`` for each term, the total ``elbo`` (their sum), then each extra
        (not part of the sum), named ``extra: NAME``."""
        rows = [(n, self.means[n], self.stderrs[n]) for n in [*self.terms, "elbo"]]
        return rows + [(f"extra: {n}", self.means[n], self.stderrs[n]) for n in self.extras]

    def bits(self) -> dict[str, float]:
        """``{"mean", "se", "mc_se"}`` of bits/dim."""
        name = "bits_per_dim"
        return {
            "mean": self.means[name],
            "se": self.stderrs[name],
            "mc_se": self.mc_se.get(name, math.nan),
        }

    def to_json(self, checkpoint: str | None = None) -> dict[str, Any]:
        """The ``--json`` document: ``{"bits_per_dim": {"mean", "se", "mc_se"}, "terms":
        {name: {"mean", "se", "mc_se", "bits_per_dim"}}, "nfe_per_example", "seconds",
        "estimator", "params", "checkpoint", ...}``; nats for terms, ``NaN`` as ``null``."""
        scale = self.num_dims * LN2

        def clean(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else v

        names = [*self.terms, "elbo", *self.extras]
        terms = {
            n: {
                "mean": clean(self.means[n]),
                "se": clean(self.stderrs[n]),
                "mc_se": clean(self.mc_se.get(n)),
                "bits_per_dim": clean(-self.means[n] / scale),
                "extra": n in self.extras,
            }
            for n in names
        }
        return {
            "bits_per_dim": {k: clean(v) for k, v in self.bits().items()},
            "terms": terms,
            "nfe_per_example": clean(self.nfe_per_example),
            "seconds": self.seconds,
            "estimator": self.estimator,
            "params": dict(self.params),
            "checkpoint": checkpoint,
            "examples": self.count,
            "draws": self.draws,
            "stop": self.stop,
            "target_mc_se": self.target_mc_se,
            "draw_sd": clean(self.draw_sd),
            "num_dims": self.num_dims,
            "processes": self.processes,
        }


class _Accumulator:
    """Per-example sums of values and squares over draws, for each name."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.squares: dict[str, Tensor] = {}
        self.draws = 0

    def add(self, values: Mapping[str, Tensor]) -> None:
        for name, v in values.items():
            v = v.double()
            if name not in self.sums:
                self.sums[name], self.squares[name] = torch.zeros_like(v), torch.zeros_like(v)
            self.sums[name] += v
            self.squares[name] += v.square()
        self.draws += 1

    def draw_sd(self, name: str) -> float:
        """The standard deviation of one draw, ``sqrt(mean_n s_n^2)`` (``nan`` with one draw)."""
        r = self.draws
        if r < 2:
            return math.nan
        m = self.sums[name] / r
        s2 = ((self.squares[name] - r * m.square()) / (r - 1)).clamp(min=0.0)
        return math.sqrt(s2.mean().item())

    def stats(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """``means, se, mc_se`` per name (module docstring)."""
        r = self.draws
        means, se, mc = {}, {}, {}
        for name, total in self.sums.items():
            m = total / r  # (N,) per-example means
            n = m.numel()
            means[name] = m.mean().item()
            se[name] = (m.std(correction=1) / math.sqrt(n)).item() if n > 1 else math.nan
            if r > 1:
                s2 = ((self.squares[name] - r * m.square()) / (r - 1)).clamp(min=0.0)
                mc[name] = math.sqrt(s2.sum().item() / r) / n
            else:
                mc[name] = math.nan
        return means, se, mc


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    *,
    estimator: str | None = None,
    params: Mapping[str, Any] | None = None,
    mc_se: float | None = None,
    max_nfe: float | None = None,
    max_draws: int | None = 10_000,
    min_draws: int = 2,
    batch_size: int = 256,
    max_batches: int | None = None,
    channels_last: bool = False,
    shard: bool = True,
) -> EvalResult:
    """Every ELBO term of ``model`` on ``dataset`` (module docstring), in eval mode.

    :param estimator: a registered name; ``None``: the model's evaluation estimator
        (``model.estimator(evaluation=True)``), built once and reused for every call.
    :param params: the estimator's parameters.
    :param mc_se: target Monte-Carlo standard error of the mean bits/dim; ``None``: stop after
        ``min_draws`` draws (or ``max_draws``).
    :param max_nfe: network evaluations per example in all; no draw starts that would pass it
        (an estimator whose first call alone costs more is an ``InvalidParameterError``).
    :param max_draws: the most draws per example (a cap against a target that cannot be met).
    :param min_draws: at least this many draws (2 gives ``mc_se``), budget permitting.
    :param channels_last: feed image batches in ``torch.channels_last`` (as the model is).
    :param shard: in a ``torchrun`` group, every process calls this and evaluates its own
        contiguous share of the examples (each exactly once), on a random stream of its own;
        the per-example values are gathered after each draw, so the statistics, the stopping
        decision and the result (``processes`` records the group's size) are those of one
        process holding every example. ``False``: this process alone evaluates everything.
    """
    from genkit.data import RowRange, batch_tensor, make_eval_loader
    from genkit.errors import DataError, InvalidParameterError, NonFiniteError

    for name, value in (("mc_se", mc_se), ("max_nfe", max_nfe)):
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise InvalidParameterError(f"{name} must be a number > 0, got {value!r}")
    if max_draws is not None and (not isinstance(max_draws, int) or max_draws < 1):
        raise InvalidParameterError(f"max_draws must be an integer >= 1, got {max_draws!r}")
    params = dict(params or {})
    was_training = model.training
    model.eval()
    if callable(getattr(model, "estimator", None)):
        est = model.estimator(estimator, evaluation=estimator is None, **params)
        call = lambda x: model.elbo(x, est)  # noqa: E731 - one estimator object for every call
    elif estimator is None and not params:  # a model that only has elbo(x) (DESIGN's minimum)
        est, call = None, model.elbo
    else:
        raise InvalidParameterError(
            f"{type(model).__name__} has no estimator() (a genkit.LatentVariableModel has): "
            "it can be evaluated only by its own elbo(x), without an estimator or parameters"
        )
    device = model.device
    rank, size = collective.rank_and_size() if shard else (0, 1)
    rows = len(dataset)
    if max_batches is not None:  # the first max_batches batches, then shared out
        rows = min(rows, max_batches * batch_size)
        dataset = RowRange(dataset, 0, rows) if 0 < rows < len(dataset) else dataset
    first, last = collective.shard_bounds(rows, rank, size)
    part = dataset if size == 1 else (RowRange(dataset, first, last) if last > first else [])

    def one_draw() -> dict[str, Any]:
        """This process's share of one draw: per-example values, network evaluations, count;
        ``costly`` (the cost of one call) when that alone passes ``max_nfe``."""
        draw: dict[str, list[Tensor]] = {}
        nfe: float | None = 0.0
        count, names = 0, ([], [])
        for i, batch in enumerate(make_eval_loader(part, batch_size)):
            x = batch_tensor(batch).to(device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out = call(x)
            names = (list(out.terms), list(out.extras))
            values = {
                **out.terms,
                **out.extras,
                "elbo": out.total,
                "bits_per_dim": out.bits_per_dim(),
            }
            for k, v in values.items():
                draw.setdefault(k, []).append(v.detach().double().cpu())
            if out.nfe is None or nfe is None:
                nfe = None
            else:
                nfe += out.nfe * x.shape[0]
                if max_nfe is not None and acc.draws == 0 and i == 0 and out.nfe > max_nfe:
                    return {"costly": out.nfe}
            count += x.shape[0]
        values = {k: torch.cat(v) for k, v in draw.items()}
        return {"values": values, "nfe": nfe, "count": count, "names": names}

    acc = _Accumulator()
    terms: list[str] = []
    extras: list[str] = []
    nfe_total: float | None = 0.0
    start = time.perf_counter()
    stop = ""
    try:
        with _rank_stream(rank, size, device):
            while True:
                # every process's share, in rank order: contiguous shards, so the examples
                # come back in the dataset's order and the statistics are those of one process
                shares = collective.gather_objects(collective.agreed(one_draw))
                costly = [s["costly"] for s in shares if "costly" in s]
                if costly:
                    raise InvalidParameterError(
                        f"one draw of estimator '{_name(est)}' "
                        f"costs {costly[0]:.4g} network evaluations per example, more than "
                        f"max_nfe {max_nfe:g}; raise max_nfe or give the estimator fewer "
                        "draws per call (e.g. t_samples=1)"
                    )
                shares = [s for s in shares if s["count"] > 0]
                count = sum(s["count"] for s in shares)
                if count == 0:
                    raise DataError("the evaluation split is empty")
                terms, extras = shares[0]["names"]
                acc.add(
                    {k: torch.cat([s["values"][k] for s in shares]) for k in shares[0]["values"]}
                )
                nfes = [s["nfe"] for s in shares]
                nfe_draw = None if None in nfes else sum(nfes)
                nfe_total = (
                    None if nfe_draw is None or nfe_total is None else nfe_total + nfe_draw / count
                )
                means, _, mc = acc.stats()
                enough = acc.draws >= min_draws
                if not math.isfinite(means["bits_per_dim"]) or (
                    acc.draws >= 2 and not math.isfinite(mc["bits_per_dim"])
                ):
                    raise NonFiniteError(
                        f"evaluation: estimator '{_name(est)}' gave non-finite bits/dim on some "
                        "examples; its Monte-Carlo error cannot be estimated"
                    )
                if mc_se is not None and enough and mc["bits_per_dim"] <= mc_se:
                    stop = "target"
                elif mc_se is None and enough:
                    stop = "draws"
                elif max_draws is not None and acc.draws >= max_draws:
                    stop = "max_draws"
                elif (
                    max_nfe is not None
                    and nfe_total is not None
                    and nfe_total * (acc.draws + 1) / acc.draws > max_nfe * (1 + 1e-9)
                ):
                    stop = "max_nfe"  # the next draw would pass the budget
                if stop:
                    break
    finally:
        model.train(was_training)
    means, se, mc = acc.stats()
    return EvalResult(
        means=means,
        stderrs=se,
        count=count,
        num_dims=int(model.num_dims),
        terms=terms,
        extras=extras,
        mc_se=mc,
        draws=acc.draws,
        nfe_per_example=nfe_total,
        seconds=time.perf_counter() - start,
        estimator=estimator or _name(est),
        params=params,
        stop=stop,
        target_mc_se=mc_se,
        draw_sd=acc.draw_sd("bits_per_dim"),
        processes=size,
    )


@contextlib.contextmanager
def _rank_stream(rank: int, size: int, device: torch.device) -> Iterator[None]:
    """In a group of ``size > 1``, run the block on a random stream of this rank's own (the
    caller's seed plus the rank), so that the draws of examples on different ranks are
    independent, as ``mc_se`` needs; the caller's stream is left as it was."""
    if size == 1:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)
        yield


def _name(estimator: Any) -> str:
    """An estimator's registered name, or its class name, or ``elbo`` for a bare ``elbo(x)``."""
    if estimator is None:
        return "elbo"
    return getattr(estimator, "name", type(estimator).__name__)


def describe(result: EvalResult) -> str:
    """One line on the budget an evaluation used and why it stopped."""
    bits = result.bits()
    nfe = "?" if result.nfe_per_example is None else f"{result.nfe_per_example:.4g}"
    target = (
        "" if result.target_mc_se is None else f" before the mc_se target {result.target_mc_se}"
    )
    why = {
        "target": f"mc_se target {result.target_mc_se} reached",
        "draws": "no mc_se target",
        "max_nfe": f"the network-evaluation budget ran out{target}",
        "max_draws": f"max_draws reached{target}",
    }.get(result.stop, result.stop)
    return (
        f"bits/dim {bits['mean']:.4f} ± {bits['se']:.4f} (se) ± {bits['mc_se']:.4f} (mc_se); "
        f"{result.draws} draws (sd of one: {result.draw_sd:.3g}), {nfe} network evaluations "
        f"per example, {result.seconds:.1f} s; {why}"
    )
