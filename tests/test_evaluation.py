"""Likelihood evaluation (:func:`genkit.evaluation.evaluate`): ``se`` and ``mc_se`` by hand on a
deterministic stand-in, ``mc_se`` against the spread of repeated evaluations of real models,
the stopping rules (target, ``max_nfe``, ``max_draws``), the JSON document and ``genkit eval``."""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import genkit
from genkit.elbo import ELBO, ELBOTerms
from genkit.errors import InvalidParameterError
from genkit.evaluation import STOPS, EvalResult, evaluate
from genkit.model import LatentVariableModel

sys.path.insert(0, str(Path(__file__).parent / "training"))
from trainhelp import invoke, tiny_images

LN2 = math.log(2.0)
SHAPE = (1, 8, 8)


def _images(n=64, seed=0):
    """``n`` random 8-bit images on the model scale ``k / 127.5 - 1``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), generator=g).float() / 127.5 - 1.0


def _vae():
    torch.manual_seed(0)
    return genkit.create_model("vae", SHAPE, latent_dim=4, hidden=32, net="mlp")


def _vdm(timesteps, **params):
    torch.manual_seed(0)
    settings = dict(denoiser="mlp", hidden=16, depth=1, fourier=[])
    return genkit.create_model("vdm", SHAPE, timesteps=timesteps, **{**settings, **params})


# -- a deterministic stand-in ----------------------------------------------------------------
class TableELBO(ELBO):
    """Value ``values[r, n]`` (terms ``a`` and ``b``, extra ``c``) for the ``r``-th call on
    example ``n`` (``x[:, 0]`` holds ``n``), however the examples are batched."""

    name = "table"

    def __init__(self, values, nfe):
        self.values, self.nfe = values, nfe  # (R, N, 3)
        self.seen = torch.zeros(values.shape[1], dtype=torch.long)

    def __call__(self, model, x):
        n = x[:, 0].long()
        v = self.values[self.seen[n], n]  # (B, 3)
        self.seen[n] += 1
        return ELBOTerms(
            terms={"a": v[:, 0], "b": v[:, 1]},
            extras={"c": v[:, 2]},
            num_dims=model.num_dims,
            nfe=self.nfe,
        )


class TableModel(LatentVariableModel):
    """A model whose evaluation estimator is a :class:`TableELBO` (data ``(n, 0)``)."""

    def __init__(self, values, nfe=3.0):
        super().__init__((2,))
        self.default_estimator = TableELBO(values, nfe)

    def sample(self, n, generator=None):
        return torch.zeros(n, 2)


def _table(draws=64, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = -50.0 * torch.rand(n, 3, generator=g, dtype=torch.float64)
    noise = torch.rand(n, 3, generator=g, dtype=torch.float64)
    return mu + noise * torch.randn(draws, n, 3, generator=g, dtype=torch.float64)


def _index_data(n=10):
    return torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1).float()


def _expected(values):
    """``means, se, mc_se`` of each name from ``values: (R, N)`` (the module docstring)."""
    r, n = values.shape
    m = values.mean(0)
    se = m.std(ddof=1) / math.sqrt(n)
    mc = math.sqrt(values.var(0, ddof=1).sum() / r) / n
    return m.mean(), se, mc


def _per_name(table):
    """Every name's ``(R, N)`` values from a ``TableELBO`` table ``(R, N, 3)``."""
    t = table.numpy()
    total = t[..., 0] + t[..., 1]
    bits = -total / (2 * LN2)
    return {"a": t[..., 0], "b": t[..., 1], "c": t[..., 2], "elbo": total, "bits_per_dim": bits}


@pytest.mark.parametrize("draws", [2, 5])
def test_se_and_mc_se_match_a_direct_computation(draws):
    table = _table()
    result = evaluate(TableModel(table), _index_data(), mc_se=None, min_draws=draws, batch_size=3)
    assert (result.draws, result.stop, result.count, result.num_dims) == (draws, "draws", 10, 2)
    assert result.terms == ["a", "b"] and result.extras == ["c"]
    assert result.nfe_per_example == pytest.approx(3.0 * draws)
    for name, values in _per_name(table[:draws]).items():
        mean, se, mc = _expected(values)
        assert result.means[name] == pytest.approx(mean, rel=1e-12), name
        assert result.se[name] == pytest.approx(se, rel=1e-9), name
        assert result.mc_se[name] == pytest.approx(mc, rel=1e-9), name
    assert result.bits() == {
        "mean": result.means["bits_per_dim"],
        "se": result.stderrs["bits_per_dim"],
        "mc_se": result.mc_se["bits_per_dim"],
    }


def test_mc_se_by_hand_with_known_per_example_variances():
    """``v_{r,n} = mu_n + sigma_n e_r`` with ``e = ±sqrt((R-1)/R)`` alternating: each example's
    sample variance over its ``R`` draws is exactly ``sigma_n^2``, so ``mc_se = sqrt(sum_n
    sigma_n^2 / R) / N``; ``b`` has no noise (``mc_se`` 0) and its ``se`` is that of ``mu``."""
    r, n = 4, 6
    sigma = torch.tensor([0.5, 1.0, 2.0, 0.0, 3.0, 1.5], dtype=torch.float64)
    mu = torch.tensor([-10.0, -11.0, -13.0, -9.0, -12.0, -10.5], dtype=torch.float64)
    e = math.sqrt((r - 1) / r) * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    table = torch.zeros(r, n, 3, dtype=torch.float64)
    table[..., 0] = mu + sigma * e[:, None]
    table[..., 1] = 2.0 * mu
    result = evaluate(TableModel(table), _index_data(n), mc_se=None, min_draws=r, batch_size=4)
    mc_a = math.sqrt(float(sigma.square().sum()) / r) / n
    assert result.mc_se["a"] == pytest.approx(mc_a, rel=1e-12)
    assert result.mc_se["b"] == 0.0
    assert result.mc_se["elbo"] == pytest.approx(mc_a, rel=1e-12)
    assert result.mc_se["bits_per_dim"] == pytest.approx(mc_a / (2 * LN2), rel=1e-12)
    assert result.means["a"] == pytest.approx(float(mu.mean()), rel=1e-12)
    assert result.se["b"] == pytest.approx(float(2.0 * mu.std()) / math.sqrt(n), rel=1e-12)
    assert result.se["elbo"] == pytest.approx(float(3.0 * mu.std()) / math.sqrt(n), rel=1e-12)


def test_one_draw_has_no_mc_se():
    result = evaluate(TableModel(_table()), _index_data(), max_draws=1)
    assert result.draws == 1 and result.stop == "max_draws"
    assert all(math.isnan(v) for v in result.mc_se.values())
    assert math.isnan(result.bits()["mc_se"])


def test_draws_stop_at_the_first_draw_that_meets_the_target():
    table = _table()
    bits = _per_name(table)["bits_per_dim"]
    mcs = {r: _expected(bits[:r])[2] for r in range(2, 40)}
    target = 0.5 * mcs[2]
    first = min(r for r, mc in mcs.items() if mc <= target)
    assert first > 3  # the target needs more than the minimum of draws
    result = evaluate(TableModel(table), _index_data(), mc_se=target, batch_size=4)
    assert (result.stop, result.draws, result.target_mc_se) == ("target", first, target)
    assert result.mc_se["bits_per_dim"] <= target
    assert result.mc_se["bits_per_dim"] == pytest.approx(mcs[first], rel=1e-9)
    # max_draws comes first when the target is out of reach
    capped = evaluate(TableModel(table), _index_data(), mc_se=1e-9, max_draws=3)
    assert (capped.stop, capped.draws) == ("max_draws", 3)
    assert set(STOPS) == {"target", "draws", "max_nfe", "max_draws"}


def test_max_nfe_bounds_the_draws_and_refuses_a_budget_below_one_draw():
    table = _table()
    with pytest.raises(InvalidParameterError, match="costs 3 network evaluations"):
        evaluate(TableModel(table, nfe=3.0), _index_data(), mc_se=1e-9, max_nfe=2)
    result = evaluate(TableModel(table, nfe=3.0), _index_data(), mc_se=1e-9, max_nfe=10)
    assert (result.stop, result.draws, result.nfe_per_example) == ("max_nfe", 3, 9.0)
    exact = evaluate(TableModel(table, nfe=3.0), _index_data(), mc_se=1e-9, max_nfe=9)
    assert (exact.stop, exact.draws, exact.nfe_per_example) == ("max_nfe", 3, 9.0)
    # an estimator that does not count its network evaluations: no budget applies
    unknown = evaluate(
        TableModel(table, nfe=None), _index_data(), mc_se=1e-9, max_nfe=1, max_draws=4
    )
    assert (unknown.stop, unknown.draws, unknown.nfe_per_example) == ("max_draws", 4, None)


@pytest.mark.parametrize(
    "kwargs",
    [{"mc_se": 0.0}, {"mc_se": -1.0}, {"max_nfe": 0}, {"max_nfe": True}, {"max_draws": 0}],
)
def test_bad_budgets_are_clear_errors(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(InvalidParameterError, match=name):
        evaluate(TableModel(_table()), _index_data(), **kwargs)


def test_to_json_has_the_documented_keys():
    result = evaluate(TableModel(_table()), _index_data(), mc_se=None, min_draws=3)
    doc = json.loads(json.dumps(result.to_json(checkpoint="ckpt.pt")))
    assert {
        "bits_per_dim",
        "terms",
        "nfe_per_example",
        "seconds",
        "estimator",
        "params",
        "checkpoint",
        "examples",
        "draws",
        "stop",
        "target_mc_se",
        "num_dims",
    } <= set(doc)
    assert doc["bits_per_dim"] == {
        "mean": result.means["bits_per_dim"],
        "se": result.se["bits_per_dim"],
        "mc_se": result.mc_se["bits_per_dim"],
    }
    assert set(doc["terms"]) == {"a", "b", "elbo", "c"}
    for name, entry in doc["terms"].items():
        assert set(entry) == {"mean", "se", "mc_se", "bits_per_dim", "extra"}
        assert entry["mean"] == result.means[name] and entry["se"] == result.se[name]
        assert entry["mc_se"] == result.mc_se[name]
        assert entry["bits_per_dim"] == pytest.approx(-result.means[name] / (2 * LN2))
        assert entry["extra"] == (name == "c")
    assert (doc["checkpoint"], doc["examples"], doc["draws"], doc["stop"]) == (
        "ckpt.pt",
        10,
        3,
        "draws",
    )
    assert doc["nfe_per_example"] == 9.0 and doc["num_dims"] == 2
    # NaN (one draw) is written as null, so the document is strict JSON
    one = evaluate(TableModel(_table()), _index_data(), max_draws=1).to_json()
    json.dumps(one, allow_nan=False)
    assert one["bits_per_dim"]["mc_se"] is None and one["terms"]["a"]["mc_se"] is None


def test_evaluate_leaves_the_model_in_training_mode():
    model = _vae().train()
    evaluate(model, _images(8), mc_se=None)
    assert model.training


# -- mc_se against the spread of repeated evaluations -----------------------------------------
REPEATS, DRAWS = 40, 4


@pytest.mark.parametrize(
    ("make", "estimator", "params"),
    [
        (_vae, None, {}),
        (_vae, "iwae", {"k": 4}),
        (lambda: _vdm(0), None, {}),  # evaluation: 4 stratified t per example per call
        (lambda: _vdm(10), None, {}),
    ],
    ids=["vae", "iwae", "continuous_vdm", "discrete_vdm"],
)
def test_mc_se_is_the_spread_of_the_mean_over_seeds(make, estimator, params):
    """Evaluate the same model on the same data with ``REPEATS`` seeds: the standard deviation
    of the mean bits/dim over the seeds matches the average reported ``mc_se``. With ``n``
    repeats a sample standard deviation is off by about ``1/sqrt(2(n-1))`` (0.11 for 40)
    relative; 3 of those is the tolerance. A factor of 2 (``DRAWS = 4``: a missing or doubled
    ``1/sqrt(R)``) falls outside it, as does a factor of 0.6."""
    model, data = make(), _images(64)
    means, mcs = [], []
    for seed in range(REPEATS):
        torch.manual_seed(seed)
        result = evaluate(model, data, estimator=estimator, params=params, min_draws=DRAWS)
        assert (result.draws, result.stop) == (DRAWS, "draws")
        means.append(result.means["bits_per_dim"])
        mcs.append(result.mc_se["bits_per_dim"])
    spread, reported = np.std(means, ddof=1), np.mean(mcs)
    tolerance = 3.0 / math.sqrt(2 * (REPEATS - 1))
    assert abs(spread / reported - 1.0) < tolerance, (spread, reported)


def test_stratified_t_lowers_the_cost_of_a_target_and_leaves_the_mean_unchanged():
    """The continuous VDM's evaluation estimator (4 stratified t per example per call) against
    one uniform t per call: the two means agree within 4 combined ``mc_se``, and the stratified
    one reaches the same ``mc_se`` with less than half the network evaluations per example.
    The model predicts ``v``: an untrained eps-prediction's loss hardly depends on t (nothing
    for stratification to gain), an untrained v-prediction's does, as a trained model's."""
    model, data = _vdm(0, parameterization="v"), _images(64)
    target = 0.06
    torch.manual_seed(0)
    strat = evaluate(model, data, mc_se=target)
    torch.manual_seed(0)
    plain = evaluate(model, data, mc_se=target, params={"t_sampler": "uniform", "t_samples": 1})
    for result in (strat, plain):
        assert result.stop == "target" and result.mc_se["bits_per_dim"] <= target
    assert strat.nfe_per_example == 4 * strat.draws and plain.nfe_per_example == plain.draws
    combined = math.hypot(strat.mc_se["bits_per_dim"], plain.mc_se["bits_per_dim"])
    assert abs(strat.means["bits_per_dim"] - plain.means["bits_per_dim"]) < 4 * combined
    assert strat.nfe_per_example < 0.5 * plain.nfe_per_example, (strat, plain)


def test_a_vae_draws_until_its_target():
    model, data = _vae(), _images(32)
    torch.manual_seed(0)
    two = evaluate(model, data, mc_se=None)
    target = 0.4 * two.mc_se["bits_per_dim"]
    torch.manual_seed(0)
    result = evaluate(model, data, mc_se=target)
    assert result.stop == "target" and result.draws > 2
    assert result.mc_se["bits_per_dim"] <= target
    assert result.nfe_per_example == 2.0 * result.draws  # encoder + decoder per draw


def test_max_nfe_holds_when_the_target_is_out_of_reach():
    model, data = _vae(), _images(16)
    result = evaluate(model, data, mc_se=1e-9, max_nfe=9)
    assert result.stop == "max_nfe" and result.nfe_per_example <= 9
    assert (result.draws, result.nfe_per_example) == (4, 8.0)


def test_the_exact_discrete_vdm_within_t_evaluations_takes_one_draw():
    """``exact=True``: every step, ``T`` network evaluations per draw; ``max_nfe = T`` leaves
    one draw, so ``mc_se`` is NaN and the stop says why."""
    t = 10
    model, data = _vdm(t), _images(16)
    result = evaluate(model, data, params={"exact": True}, mc_se=0.01, max_nfe=t)
    assert (result.stop, result.draws, result.nfe_per_example) == ("max_nfe", 1, float(t))
    assert math.isnan(result.mc_se["bits_per_dim"])


# -- genkit eval --------------------------------------------------------------------------
QUICK = [
    *("--set", "steps=2", "--set", "batch_size=16", "--set", "eval_every=0"),
    *("--set", "log_every=0", "--set", "checkpoint_every=0", "--set", "num_samples=0"),
    *("--set", "eval_max_nfe=20", "-q"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny HDF5 file (32 train, 16 test images) and a trained ``vae`` and ``vdm`` run."""
    from genkit.data import DatasetArrays, SplitArrays, write_h5

    root = tmp_path_factory.mktemp("eval_cli")
    k = ((tiny_images(48) + 1) * 127.5).round().to(torch.uint8).numpy()
    labels = np.zeros(48, dtype=np.int64)
    arrays = DatasetArrays(
        splits={
            "train": SplitArrays(images=k[:32], labels=labels[:32]),
            "test": SplitArrays(images=k[32:], labels=labels[32:]),
        },
        attrs={"source": "genkit tests"},
    )
    data = write_h5(arrays, root / "tiny.h5")
    models = {
        "vae": ["model.latent_dim=4", "model.hidden=32", 'model.net="mlp"'],
        "vdm": [
            *("model.timesteps=10", 'model.denoiser="mlp"', "model.hidden=16"),
            *("model.depth=1", "model.fourier=[]"),
        ],
    }
    out = {}
    for name, params in models.items():
        sets = [a for p in params for a in ("--set", p)]
        out[name] = root / name
        invoke("train", "--model", name, "--data", data, "--out", out[name], *QUICK, *sets)
    return out


def _one_line_error(output, *words):
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "Traceback" not in output
    for word in words:
        assert word in lines[0], output


@pytest.mark.parametrize(
    ("flag", "value"), [("--mc-se", "-1"), ("--max-nfe", "-2"), ("--mc-se", "nan")]
)
def test_cli_rejects_a_negative_budget(runs, flag, value):
    _one_line_error(invoke("eval", runs["vae"], flag, value, code=1), flag)


@pytest.mark.parametrize("estimator", ["consistency", "ode"])
def test_cli_an_estimator_the_model_cannot_take_is_one_line(runs, estimator):
    from genkit.registry import available_estimators

    if estimator not in available_estimators():
        pytest.skip(f"estimator '{estimator}' is not registered")
    _one_line_error(invoke("eval", runs["vae"], "--estimator", estimator, code=1), estimator)


def test_cli_a_run_without_checkpoints_is_one_line(runs, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(runs["vae"], bare)
    shutil.rmtree(bare / "checkpoints")
    _one_line_error(invoke("eval", bare, code=1), "no checkpoint", str(bare))


def test_cli_max_nfe_is_respected_in_the_json(runs, tmp_path):
    """One uniform t per call (1 network evaluation per draw): ``--max-nfe 3`` with an
    unreachable target leaves 3 draws."""
    out = tmp_path / "eval.json"
    params = ["--param", "t_samples=1", "--param", "proposal='uniform'"]
    invoke("eval", runs["vdm"], *params, "--mc-se", "1e-9", "--max-nfe", "3", "--json", out)
    doc = json.loads(out.read_text())
    assert doc["nfe_per_example"] <= 3 and doc["stop"] == "max_nfe" and doc["draws"] == 3
    assert doc["target_mc_se"] == 1e-9 and doc["examples"] == 16
    assert doc["params"] == {"t_samples": 1, "proposal": "uniform"}


def test_cli_max_nfe_below_the_cost_of_one_draw_is_one_clear_line(runs, tmp_path):
    """The VDM's evaluation estimator takes 4 t per call (and a pilot fit): a budget of 3
    network evaluations per example cannot hold one draw, which is an error, not a silent
    overrun, and nothing is written."""
    out = tmp_path / "eval.json"
    text = invoke("eval", runs["vdm"], "--max-nfe", "3", "--json", out, code=1)
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "max_nfe 3" in lines[0] and "costs" in lines[0], text
    assert "Traceback" not in text and not out.exists()


def test_eval_result_is_the_public_type():
    from genkit.training import EvalResult as FromTraining

    assert FromTraining is EvalResult


class ElboOnly(torch.nn.Module):
    """DESIGN's minimum: a model with ``elbo(x)`` and ``num_dims`` only (no ``estimator``)."""

    num_dims = 4

    def __init__(self, bad: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.bad = bad

    @property
    def device(self):
        return self.w.device

    def elbo(self, x):
        value = -x.square().sum(1) - torch.rand(x.shape[0])
        if self.bad:
            value = value / 0.0
        return ELBOTerms(terms={"reconstruction": value}, num_dims=4, nfe=1.0)


def test_a_model_with_only_elbo_is_evaluated_and_non_finite_values_stop_the_draws():
    data = torch.randn(10, 4)
    result = evaluate(ElboOnly(), data, mc_se=None)
    assert result.draws == 2 and result.estimator == "elbo" and result.mc_se["bits_per_dim"] > 0
    with pytest.raises(InvalidParameterError, match="no estimator"):
        evaluate(ElboOnly(), data, estimator="iwae")
    from genkit.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match="non-finite"):
        evaluate(ElboOnly(bad=True), data, mc_se=0.01)


def test_one_draw_is_allowed_and_gives_no_mc_se():
    result = evaluate(ElboOnly(), torch.randn(10, 4), mc_se=None, min_draws=1)
    assert result.draws == 1 and math.isnan(result.mc_se["bits_per_dim"])
    assert math.isfinite(result.bits()["mean"])
