"""torch.distributions argument validation: on for the first training step, off for the
rest, the process-wide default always restored (also after ``torch.compile``)."""

import math
from typing import ClassVar

import pytest
import torch
from torch.distributions import Distribution, Independent, Normal
from trainhelp import DATA_SHAPE, tiny_images, tiny_vae

from genkit.elbo import ELBOTerms
from genkit.errors import InvalidParameterError, NonFiniteError
from genkit.model import LatentVariableModel
from genkit.training import TrainConfig, Trainer
from genkit.training.trainer import distribution_validation


class GaussianDecoder(LatentVariableModel):
    """``p(x) = N(x; W x + b, exp(s)^2 I)`` built as a real torch ``Independent(Normal)``::

        reconstruction = log N(x; W x + b, exp(s)^2 I),   prior_matching = -1/2 ||b||^2

    At training call ``nan_at`` (1-based) the decoder's mean becomes NaN, as a diverged
    network's output would. Every call records ``(training, Distribution._validate_args)``
    in the class-level ``seen`` (shared with the trainer's EMA copy); ``raise_at`` raises a
    ``RuntimeError`` from inside that training call.
    """

    seen: ClassVar[list[tuple[bool, bool]]] = []

    def __init__(self, nan_at=None, raise_at=None):
        super().__init__(DATA_SHAPE)
        d = math.prod(DATA_SHAPE)
        self.lin = torch.nn.Linear(d, d)
        self.log_scale = torch.nn.Parameter(torch.zeros(()))
        self.nan_at, self.raise_at, self.calls = nan_at, raise_at, 0

    def elbo(self, x, estimator=None, **params):
        GaussianDecoder.seen.append((self.training, Distribution._validate_args))
        flat = x.flatten(1)  # (B, D)
        loc = self.lin(flat)
        if self.training:
            self.calls += 1
            if self.calls == self.raise_at:
                raise RuntimeError("the model failed")
            if self.calls == self.nan_at:
                loc = loc * float("nan")
        decoder = Independent(Normal(loc, self.log_scale.exp().expand_as(loc)), 1)
        terms = {
            "reconstruction": decoder.log_prob(flat),
            "prior_matching": (-0.5 * (self.lin.bias**2).sum()).expand(flat.shape[0]),
        }
        return ELBOTerms(terms=terms, num_dims=self.num_dims)

    def sample(self, n, generator=None):
        return torch.zeros(n, *self.data_shape)


@pytest.fixture(params=[True, False], ids=["validating", "not-validating"])
def default(request):
    """Run the test under either process-wide default; put torch's back afterwards."""
    before = Distribution._validate_args
    Distribution.set_default_validate_args(request.param)
    GaussianDecoder.seen = []
    yield request.param
    Distribution.set_default_validate_args(before)


def test_a_nan_decoder_mean_is_the_trainers_error_not_torchs(images):
    """With torch's validation the NaN mean would raise ``ValueError`` from ``Normal``."""
    with pytest.raises(ValueError, match="Expected parameter loc"):  # what torch would do
        Normal(torch.full((2,), float("nan")), torch.ones(2), validate_args=True)
    for eager in (True, False):
        cfg = TrainConfig(steps=10, batch_size=16, log_every=5, eval_every=0)
        trainer = Trainer(GaussianDecoder(nan_at=3), cfg, images, progress=False)
        trainer._eager_checks = eager
        with pytest.raises(NonFiniteError, match="non-finite ELBO term 'reconstruction' at step 3"):
            trainer.fit()


def test_training_steps_after_the_first_do_not_validate_and_evaluation_does(default, images):
    cfg = TrainConfig(steps=4, batch_size=16, log_every=2, eval_every=2, eval_batches=1)
    Trainer(GaussianDecoder(), cfg, images, images[:16], progress=False).fit()
    train = [v for training, v in GaussianDecoder.seen if training]
    evals = [v for training, v in GaussianDecoder.seen if not training]
    assert train == [True, False, False, False]  # the first step validates, whatever the default
    assert evals and all(v == default for v in evals)  # periodic and final evaluation
    assert Distribution._validate_args is default


@pytest.mark.parametrize(
    "params",
    [
        dict(raise_at=3),  # raised inside a step that runs without checks
        dict(nan_at=2),  # NonFiniteError
        dict(nan_at=1),  # the first step validates: torch's ValueError from Normal
    ],
    ids=["raises", "nan", "nan-first-step"],
)
def test_the_default_is_restored_when_fit_raises(default, images, params):
    cfg = TrainConfig(steps=6, batch_size=16, log_every=1, eval_every=0)
    if "raise_at" in params:
        error = RuntimeError
    elif params["nan_at"] == 1:
        error = ValueError
    else:
        error = NonFiniteError
    with pytest.raises(error):
        Trainer(GaussianDecoder(**params), cfg, images, progress=False).fit()
    assert Distribution._validate_args is default


def test_off_grid_data_at_step_one_is_the_clear_error(default, images):
    cfg = TrainConfig(steps=3, batch_size=16, eval_every=0)
    trainer = Trainer(tiny_vae(), cfg, images + 1e-3, progress=False)
    with pytest.raises(InvalidParameterError) as err:
        trainer.fit()
    message = str(err.value)
    assert "needs 8-bit data on [-1, 1]" in message and "off that grid" in message
    assert "\n" not in message
    assert trainer.step == 0
    assert Distribution._validate_args is default


def test_distribution_validation_restores_the_default_on_exceptions(default):
    for enabled in (True, False):
        with distribution_validation(enabled):
            assert Distribution._validate_args is enabled
            assert Normal(torch.zeros(1), torch.ones(1))._validate_args is enabled
        assert Distribution._validate_args is default
        with pytest.raises(KeyError), distribution_validation(enabled):
            raise KeyError("x")
        assert Distribution._validate_args is default


def test_a_resumed_run_validates_its_first_step_again(tmp_path, default):
    data = tiny_images(64)
    cfg = TrainConfig(steps=2, batch_size=16, eval_every=0)
    Trainer(GaussianDecoder(), cfg, data, run_dir=tmp_path, progress=False).fit()
    GaussianDecoder.seen = []
    longer = TrainConfig(steps=4, batch_size=16, eval_every=0)
    Trainer(GaussianDecoder(), longer, data, run_dir=tmp_path, progress=False).fit(resume=True)
    assert [v for training, v in GaussianDecoder.seen if training] == [True, False]


def test_compiling_the_model_leaves_the_default_alone(default, images, monkeypatch):
    """The first ``torch.compile`` of a process runs dynamo's ``TorchPatcher.patch``, which
    turns validation off for the whole process; it runs once per process, so here it is
    replaced by that same effect, on every compile."""
    from torch._dynamo import eval_frame

    def patch():
        Distribution.set_default_validate_args(False)

    monkeypatch.setattr(eval_frame.TorchPatcher, "patch", staticmethod(patch))
    torch.compile(torch.nn.Identity())  # compiling is lazy: only the patch runs here
    assert Distribution._validate_args is False  # what torch does to the process
    Distribution.set_default_validate_args(default)
    cfg = TrainConfig(steps=1, batch_size=16, compile=True, eval_every=0)
    trainer = Trainer(GaussianDecoder(), cfg, images, progress=False)
    assert trainer.model.lin._compiled_call_impl is not None  # compiled in place
    assert Distribution._validate_args is default
