"""``on_train_end(trainer, step, result)``: once per ``fit()``, however the run ends."""

import os
import signal
import warnings

import pytest
from trainhelp import TinyModel

import genkit
from genkit.errors import ConfigError, NonFiniteError
from genkit.registry import make_plugin_manager
from genkit.training import EvalResult, TrainConfig, Trainer
from genkit.training import checkpoint as ckpt


class EndRecorder:
    """Records the trainer hooks in order; at ``on_train_end`` also what is on disk and
    whether the TensorBoard writer is still open (it logs ``end/step``)."""

    def __init__(self, signal_at=None):
        self.calls = []
        self.signal_at = signal_at

    @genkit.hookimpl
    def on_train_start(self, trainer):
        self.calls.append(("start", trainer.step))

    @genkit.hookimpl
    def on_step_end(self, trainer, step, metrics):
        self.calls.append(("step", step))
        if step == self.signal_at:
            os.kill(os.getpid(), signal.SIGINT)

    @genkit.hookimpl
    def on_eval_end(self, trainer, step, metrics):
        self.calls.append(("eval", step))

    @genkit.hookimpl
    def on_checkpoint(self, trainer, step, path):
        self.calls.append(("checkpoint", step))

    @genkit.hookimpl
    def on_train_end(self, trainer, step, result):
        on_disk = ckpt.latest_checkpoint(trainer.run_dir) if trainer.run_dir else None
        self.end = dict(
            step=step,
            result=result,
            interrupted=trainer.interrupted,
            checkpoint=on_disk.name if on_disk else None,
            logger_open=trainer.logger is not None,
        )
        self.calls.append(("end", step))
        trainer.log_scalar("end/step", step, step)

    def kinds(self):
        return [c[0] for c in self.calls]


def trainer_with(model, cfg, data, test=None, run_dir=None, plugins=()):
    return Trainer(
        model,
        cfg,
        data,
        test,
        run_dir,
        catalog=make_plugin_manager(plugins=list(plugins)),
        progress=False,
    )


def test_called_once_after_the_final_checkpoint_and_evaluation(tmp_path, images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = EndRecorder()
    cfg = TrainConfig(steps=6, batch_size=16, log_every=3, eval_every=0, checkpoint_every=0)
    trainer = trainer_with(TinyModel(), cfg, images, images[:32], tmp_path, [rec])
    result = trainer.fit()
    assert isinstance(result, EvalResult)
    assert rec.kinds() == ["start", "step", "step", "checkpoint", "eval", "end"]
    assert rec.end == dict(
        step=6,
        result=result,
        interrupted=None,
        checkpoint="step-00000006.pt",
        logger_open=True,
    )
    assert rec.end["result"] is result
    assert trainer.logger is None  # closed after the hook
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("end/step")] == [(6, 6.0)]


def test_result_is_none_without_a_test_split(images):
    rec = EndRecorder()
    cfg = TrainConfig(steps=4, batch_size=16, log_every=2, eval_every=0)
    assert trainer_with(TinyModel(), cfg, images, plugins=[rec]).fit() is None
    assert rec.kinds().count("end") == 1 and rec.calls[-1] == ("end", 4)
    assert rec.end["result"] is None


def test_called_after_the_checkpoint_of_a_sigint(tmp_path, images, capsys):
    rec = EndRecorder(signal_at=4)
    cfg = TrainConfig(steps=50, batch_size=16, log_every=1, eval_every=0, checkpoint_every=0)
    trainer = trainer_with(TinyModel(), cfg, images, images[:16], tmp_path, [rec])
    assert trainer.fit() is None
    assert "SIGINT at step 4" in capsys.readouterr().out
    assert rec.kinds()[-3:] == ["step", "checkpoint", "end"]
    assert rec.end == dict(
        step=4,
        result=None,
        interrupted="SIGINT",
        checkpoint="step-00000004.pt",
        logger_open=True,
    )


@pytest.mark.parametrize("eager", [True, False], ids=["checked-each-step", "checked-on-sync"])
def test_called_with_none_when_a_non_finite_value_stops_the_run(tmp_path, images, eager):
    rec = EndRecorder()
    cfg = TrainConfig(steps=20, batch_size=16, log_every=4, eval_every=0, checkpoint_every=4)
    trainer = trainer_with(TinyModel(nan_at=7), cfg, images, images[:16], tmp_path, [rec])
    trainer._eager_checks = eager
    with pytest.raises(NonFiniteError, match="non-finite ELBO term 'reconstruction' at step 7"):
        trainer.fit()
    assert rec.kinds().count("end") == 1 and rec.kinds()[-1] == "end"
    assert "eval" not in rec.kinds()  # no final evaluation of a broken run
    # checked each step: raised before step 7's update; on sync: at the flush of step 8
    assert rec.end["step"] == trainer.step == (6 if eager else 8)
    assert rec.end["result"] is None and rec.end["checkpoint"] == "step-00000004.pt"
    assert trainer.logger is None


def test_a_plugin_raising_in_on_train_end_is_reported_and_masks_nothing(images):
    class Broken:
        __name__ = "broken_end"

        @genkit.hookimpl
        def on_train_end(self, trainer, step, result):
            raise OSError("cannot flush")

    rec = EndRecorder()
    cfg = TrainConfig(steps=2, batch_size=16, log_every=1, eval_every=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer_with(TinyModel(), cfg, images, images[:16], plugins=[rec, Broken()]).fit()
        with pytest.raises(NonFiniteError, match="at step 2"):  # still the run's own error
            trainer_with(TinyModel(nan_at=2), cfg, images, plugins=[Broken()]).fit()
    assert isinstance(result, EvalResult) and rec.end["result"] is result  # others still ran
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2
    assert all(
        m.startswith("plugin 'broken_end' raised in on_train_end: OSError: cannot flush")
        for m in messages
    )


def test_not_called_when_the_run_never_started(tmp_path, images):
    cfg = TrainConfig(steps=2, batch_size=16, eval_every=0)
    trainer_with(TinyModel(), cfg, images, run_dir=tmp_path).fit()
    rec = EndRecorder()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        trainer_with(TinyModel(), cfg, images, run_dir=tmp_path, plugins=[rec]).fit()
    assert rec.calls == []
