import copy
import os
import re
import signal
import warnings

import attrs
import pytest
import torch
from trainhelp import TinyModel, flat_params, tiny_images, tiny_vae

import genkit
from genkit.errors import CheckpointError, ConfigError, NonFiniteError
from genkit.registry import make_plugin_manager
from genkit.training import TrainConfig, Trainer
from genkit.training import checkpoint as ckpt
from genkit.training.distributed import DistInfo

FAST = dict(batch_size=16, lr_warmup_steps=2, log_every=5, eval_every=0, checkpoint_every=0)


class Recorder:
    """A plugin recording every trainer hook call."""

    def __init__(self):
        self.calls = []

    @genkit.hookimpl
    def on_train_start(self, trainer):
        self.calls.append(("start", trainer.step, None))

    @genkit.hookimpl
    def on_step_end(self, trainer, step, metrics):
        self.calls.append(("step", step, dict(metrics)))

    @genkit.hookimpl
    def on_eval_end(self, trainer, step, metrics):
        self.calls.append(("eval", step, dict(metrics)))

    @genkit.hookimpl
    def on_checkpoint(self, trainer, step, path):
        self.calls.append(("checkpoint", step, path))

    def of(self, kind):
        return [c for c in self.calls if c[0] == kind]


def catalog_with(*plugins):
    return make_plugin_manager(plugins=plugins)


def test_loss_goes_down_on_a_tiny_dataset(tmp_path):
    data = tiny_images(128)
    cfg = TrainConfig(steps=80, lr=3e-3, ema_decay=0.9, **FAST)
    trainer = Trainer(tiny_vae(), cfg, data, data[:64], tmp_path / "run", progress=False)
    before = trainer.evaluate()["elbo"]
    result = trainer.fit()
    assert result.means["elbo"] > before + 20.0  # nats per image, from about -380
    assert result.count == 64
    assert result.means["bits_per_dim"] == pytest.approx(
        -result.means["elbo"] / (64 * torch.log(torch.tensor(2.0)).item())
    )


class WeightsAfterEachStep:
    def __init__(self):
        self.weights = []

    @genkit.hookimpl
    def on_step_end(self, trainer, step, metrics):
        self.weights.append(flat_params(trainer.model).clone())


@pytest.mark.parametrize(
    "debias, start",
    [(True, 0), (False, 0), (True, 3)],
    ids=["debiased", "plain", "debiased-after-start"],
)
def test_ema_is_the_average_it_claims(images, debias, start):
    """The EMA against its definition, summed directly over the recorded weights: a copy up to
    ``ema_start``, then ``sum_j d^(k-j) (1 - d) w_j`` over the k steps after it, divided by
    ``1 - d^k`` with ``ema_debias`` (plus ``d^k`` times the copy without)."""
    rec = WeightsAfterEachStep()
    torch.manual_seed(0)
    model = TinyModel()
    expected = flat_params(model).clone()
    cfg = TrainConfig(
        steps=8, batch_size=16, log_every=1, eval_every=0, checkpoint_every=0, ema_decay=0.9,
        ema_debias=debias, ema_start=start,
    )  # fmt: skip
    trainer = Trainer(model, cfg, images, catalog=catalog_with(rec), progress=False)
    trainer.fit()
    assert len(rec.weights) == 8
    d, k = 0.9, 8 - start
    if start:
        expected = rec.weights[start - 1]
    since = rec.weights[start:]
    average = sum(d ** (k - j) * (1 - d) * w for j, w in enumerate(since, start=1))
    expected = average / (1 - d**k) if debias else average + d**k * expected
    torch.testing.assert_close(flat_params(trainer.ema_model), expected, rtol=1e-6, atol=1e-7)


def test_weights_change_the_objective_but_not_the_logged_elbo(images):
    logged = {}
    for name, extra in {
        "plain": {},
        "weighted": {"objective_weights": {"prior_matching": 0.5, "surrogate": 0.25}},
        "warmup": {"warmup_terms": ["prior_matching"], "warmup_steps": 10},
    }.items():
        rec = Recorder()
        torch.manual_seed(0)
        cfg = TrainConfig(steps=1, batch_size=16, log_every=1, eval_every=0, **extra)
        Trainer(TinyModel(), cfg, images, catalog=catalog_with(rec), progress=False).fit()
        logged[name] = rec.of("step")[0][2]
    plain, weighted, warm = logged["plain"], logged["weighted"], logged["warmup"]
    for m in logged.values():  # the logged ELBO is the unweighted sum, the same batch
        assert m["elbo"] == pytest.approx(plain["elbo"], rel=1e-6)
        assert m["elbo"] == pytest.approx(m["reconstruction"] + m["prior_matching"], rel=1e-6)
    rec_, pm = plain["reconstruction"], plain["prior_matching"]
    assert plain["objective"] == pytest.approx(-(rec_ + pm), rel=1e-6)
    assert weighted["objective"] == pytest.approx(-(rec_ + 0.5 * pm + 0.25 * 2 * rec_), rel=1e-6)
    assert warm["objective"] == pytest.approx(-rec_, rel=1e-6)  # ramp starts at weight 0


def test_unknown_objective_weight_is_a_clear_error(images):
    cfg = TrainConfig(steps=1, batch_size=16, objective_weights={"priorr": 1.0})
    with pytest.raises(genkit.InvalidParameterError, match="unknown term 'priorr'"):
        Trainer(TinyModel(), cfg, images, progress=False).fit()


def test_tensorboard_holds_a_scalar_per_term_and_extra(tmp_path, images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(steps=10, batch_size=16, log_every=5, eval_every=5, num_samples=4)
    Trainer(TinyModel(), cfg, images, images[:32], tmp_path, progress=False).fit()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for split in ("train", "eval"):
        for name in ("reconstruction", "prior_matching", "surrogate", "elbo", "bits_per_dim"):
            assert f"{split}/{name}" in tags
    assert {"train/objective", "train/lr", "train/grad_norm"} <= tags
    assert [e.step for e in acc.Scalars("train/reconstruction")] == [5, 10]
    assert [e.step for e in acc.Scalars("eval/elbo")] == [5, 10, 10]  # periodic + final
    assert "samples" in acc.Tags()["images"]
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_hooks_are_called_and_a_raising_plugin_is_named(tmp_path, images):
    class Broken:
        __name__ = "broken_plugin"

        @genkit.hookimpl
        def on_step_end(self, trainer, step, metrics):
            raise ValueError("boom")

    rec = Recorder()
    cfg = TrainConfig(steps=10, batch_size=16, log_every=5, eval_every=10, checkpoint_every=5)
    trainer = Trainer(
        TinyModel(),
        cfg,
        images,
        images[:32],
        tmp_path,
        catalog=catalog_with(rec, Broken()),
        progress=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "plugin 'broken_plugin' raised in on_step_end" in messages[0]
    assert rec.of("start") == [("start", 0, None)]
    assert [c[1] for c in rec.of("step")] == [5, 10]  # training went on after the warning
    assert [c[1] for c in rec.of("eval")] == [10, 10]  # periodic, then the final one
    assert [(c[1], c[2].name) for c in rec.of("checkpoint")] == [
        (5, "step-00000005.pt"),
        (10, "step-00000010.pt"),
    ]


def test_keeps_the_last_k_checkpoints(tmp_path, images):
    cfg = TrainConfig(steps=12, batch_size=16, checkpoint_every=3, keep_checkpoints=2)
    Trainer(TinyModel(), cfg, images, run_dir=tmp_path, progress=False).fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step-00000009.pt",
        "step-00000012.pt",
    ]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, images):
    cfg = TrainConfig(steps=2, batch_size=16)
    Trainer(TinyModel(), cfg, images, run_dir=tmp_path, progress=False).fit()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(TinyModel(), cfg, images, run_dir=tmp_path, progress=False).fit()


def test_resume_in_process_equals_uninterrupted(tmp_path):
    """Checkpoint mid-epoch (6 batches per epoch, stop at 9), resume in a new Trainer: the
    VAE (random z every step) ends with bit-identical parameters and EMA."""
    data = tiny_images(96)
    cfg = TrainConfig(steps=20, ema_decay=0.9, **FAST)
    full = Trainer(tiny_vae(), cfg, data, run_dir=tmp_path / "a", progress=False)
    full.fit()

    first = Trainer(tiny_vae(), cfg, data, run_dir=tmp_path / "b", progress=False)
    first.start()
    first.train(9)
    first.save_checkpoint()
    first.close()
    torch.manual_seed(1234)  # whatever the process did since must not matter
    second = Trainer(tiny_vae(seed=99), cfg, data, run_dir=tmp_path / "b", progress=False)
    second.fit(resume=True)
    assert second.step == 20 and (second.epoch, second.batch_in_epoch) == (3, 2)
    assert torch.equal(flat_params(full.model), flat_params(second.model))
    assert torch.equal(flat_params(full.ema_model), flat_params(second.ema_model))


def test_a_resumed_run_takes_the_rates_betas_and_weight_decay_of_its_new_config(tmp_path):
    """Resumed with another lr, lr multiplier, betas and weight decay, the run steps with them
    (the checkpoint's would be silently kept otherwise): the logged lr of the first resumed
    step is the new base rate times the schedule's factor at that step, and each group
    carries the new settings."""
    data = tiny_images(96)
    cfg = TrainConfig(steps=12, lr=0.01, lr_multipliers={"lin": 0.5}, **FAST)
    first = Trainer(TinyModel(), cfg, data, run_dir=tmp_path / "run", progress=False)
    first.start()
    first.train(5)
    first.save_checkpoint()
    first.close()
    rec = Recorder()
    changed = attrs.evolve(
        cfg,
        lr=0.001,
        lr_multipliers={"lin": 2.0},
        betas=(0.5, 0.9),
        weight_decay=0.25,
        log_every=1,
    )
    second = Trainer(
        TinyModel(),
        changed,
        data,
        run_dir=tmp_path / "run",
        catalog=catalog_with(rec),
        progress=False,
    )
    second.start(resume=True)
    second.train(6)
    second.close()
    factor = changed.lr_factor(5, 12)  # step 6 (1-based) uses the factor at 5
    assert rec.of("step")[0][2]["lr"] == pytest.approx(0.001 * factor)
    base, lin = second.optimizer.param_groups
    assert (base["initial_lr"], lin["initial_lr"]) == pytest.approx((0.001, 0.002))
    assert base["betas"] == lin["betas"] == (0.5, 0.9)
    assert base["weight_decay"] == lin["weight_decay"] == 0.25
    assert second.scheduler.base_lrs == pytest.approx([0.001, 0.002])


def test_a_resume_with_other_lr_multiplier_keys_is_a_clear_error(tmp_path):
    data = tiny_images(96)
    cfg = TrainConfig(steps=12, **FAST)
    first = Trainer(TinyModel(), cfg, data, run_dir=tmp_path / "run", progress=False)
    first.start()
    first.train(2)
    first.save_checkpoint()
    first.close()
    other = attrs.evolve(cfg, lr_multipliers={"lin": 2.0})
    second = Trainer(TinyModel(), other, data, run_dir=tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="parameter groups"):
        second.start(resume=True)


def test_epochs_set_the_number_of_steps(images):
    cfg = TrainConfig(epochs=2, batch_size=32, eval_every=0)  # 96 // 32 = 3 batches/epoch
    trainer = Trainer(TinyModel(), cfg, images, progress=False)
    trainer.fit()
    assert trainer.total_steps == 6 and trainer.step == 6 and trainer.epoch == 2


def test_corrupt_checkpoint_is_a_clear_error_and_is_left_alone(tmp_path, images):
    cfg = TrainConfig(steps=4, batch_size=16, checkpoint_every=2)
    Trainer(TinyModel(), cfg, images, run_dir=tmp_path, progress=False).fit()
    latest = ckpt.latest_checkpoint(tmp_path)
    blob = latest.read_bytes()
    latest.write_bytes(blob[: len(blob) // 2])  # truncated
    damaged = latest.read_bytes()
    trainer = Trainer(
        TinyModel(),
        attrs.evolve(cfg, steps=8),
        images,
        run_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(
        CheckpointError, match=re.escape(f"checkpoint {latest} is corrupt or truncated")
    ):
        trainer.fit(resume=True)
    assert latest.read_bytes() == damaged

    with pytest.raises(CheckpointError, match="older checkpoint") as err:
        Trainer(TinyModel(), cfg, images, run_dir=tmp_path, progress=False).fit(resume=True)
    assert "step-00000002.pt" in str(err.value) and "\n" not in str(err.value)

    latest.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"step-00000004\.pt"):
        Trainer(TinyModel(), cfg, images, run_dir=tmp_path, progress=False).fit(resume=True)


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, images):
    cfg = TrainConfig(steps=2, batch_size=16)
    Trainer(TinyModel(), cfg, images, run_dir=tmp_path, progress=False).fit()
    path = ckpt.latest_checkpoint(tmp_path)
    with pytest.raises(
        CheckpointError, match=re.escape(f"checkpoint {path} does not match this model")
    ):
        Trainer(tiny_vae(), cfg, images, run_dir=tmp_path, progress=False).fit(resume=True)
    other_shape = tiny_images(64, shape=(1, 4, 4))
    with pytest.raises(CheckpointError, match="data of shape"):
        Trainer(TinyModel((1, 4, 4)), cfg, other_shape, run_dir=tmp_path, progress=False).fit(
            resume=True
        )


@pytest.mark.parametrize("eager", [True, False], ids=["checked-each-step", "checked-on-sync"])
@pytest.mark.parametrize("term", ["reconstruction", "prior_matching"])
def test_nan_stops_the_run_naming_step_and_term(tmp_path, images, eager, term):
    cfg = TrainConfig(steps=20, batch_size=16, log_every=4, checkpoint_every=4)
    trainer = Trainer(TinyModel(nan_at=7, term=term), cfg, images, run_dir=tmp_path, progress=False)
    trainer._eager_checks = eager
    with pytest.raises(NonFiniteError, match=f"non-finite ELBO term '{term}' at step 7") as err:
        trainer.fit()
    assert "step-00000004.pt" in str(err.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004.pt"]
    good = ckpt.load(ckpt.latest_checkpoint(tmp_path))
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def test_bf16_autocast_trains_on_cpu(images):
    cfg = TrainConfig(steps=3, batch_size=16, precision="bf16", log_every=1)
    rec = Recorder()
    trainer = Trainer(
        tiny_vae(), cfg, images, images[:16], catalog=catalog_with(rec), progress=False
    )
    result = trainer.fit()
    assert all(torch.isfinite(torch.tensor(m["elbo"])) for _, _, m in rec.of("step"))
    assert torch.isfinite(torch.tensor(result.means["elbo"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.skipif(
    bool(os.environ.get("GENKIT_SKIP_COMPILE")),
    reason="GENKIT_SKIP_COMPILE is set (torch.compile takes ~10 s on a small CPU)",
)
def test_compiled_model_matches_eager(images):
    cfg = TrainConfig(steps=2, batch_size=16, eval_every=0)
    eager = Trainer(tiny_vae(), cfg, images, progress=False)
    compiled = Trainer(tiny_vae(), attrs.evolve(cfg, compile=True), images, progress=False)
    assert torch.equal(flat_params(eager.model), flat_params(compiled.model))
    torch.manual_seed(5)
    eager.fit()
    torch.manual_seed(5)
    compiled.fit()
    assert torch.allclose(flat_params(eager.model), flat_params(compiled.model), atol=1e-5)
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())


def test_logged_lr_is_the_rate_each_step_used(images):
    """Linear warm-up over 4 steps: step k (1-based) uses lr * min(1, k / 4); the first AdamW
    step moves every parameter by about its learning rate (``g / sqrt(g^2)``)."""
    rec = Recorder()
    cfg = TrainConfig(
        steps=6, batch_size=16, lr=0.01, lr_warmup_steps=4, schedule="constant", log_every=1
    )
    torch.manual_seed(0)
    trainer = Trainer(TinyModel(), cfg, images, catalog=catalog_with(rec), progress=False)
    before = flat_params(trainer.model).clone()
    trainer.start()
    trainer.train(1)
    moved = (flat_params(trainer.model) - before).abs()
    torch.testing.assert_close(moved.max(), torch.tensor(0.0025), rtol=1e-3, atol=0.0)
    trainer.train(6)
    trainer.close()
    logged = [m["lr"] for _, _, m in rec.of("step")]
    assert logged == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_lr_multipliers_scale_each_parameter_group_by_the_longest_matching_key(images):
    """The first AdamW step moves each parameter by about its rate (``g / sqrt(g^2)``): lr for
    ``log_scale``, ``0.5 lr`` for ``lin.weight`` (key ``lin``), ``0.1 lr`` for ``lin.bias`` (key
    ``lin.bias``, longer than ``lin``); the logged lr is the base rate."""
    rec = Recorder()
    cfg = TrainConfig(
        steps=1,
        batch_size=16,
        lr=0.01,
        lr_warmup_steps=0,
        schedule="constant",
        log_every=1,
        lr_multipliers={"lin": 0.5, "lin.bias": 0.1},
    )
    torch.manual_seed(0)
    trainer = Trainer(TinyModel(), cfg, images, catalog=catalog_with(rec), progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.start()
    trainer.train(1)
    trainer.close()
    for name, rate in (("log_scale", 0.01), ("lin.weight", 0.005), ("lin.bias", 0.001)):
        moved = (dict(trainer.model.named_parameters())[name] - before[name]).abs().max()
        torch.testing.assert_close(moved, torch.tensor(rate), rtol=1e-3, atol=0.0, msg=name)
    assert [m["lr"] for _, _, m in rec.of("step")] == pytest.approx([0.01])


def test_lr_multiplier_groups_do_not_depend_on_the_order_of_the_keys(images):
    """config.json stores the keys sorted and a resumed optimizer matches its groups by
    position: the groups must come out in the same order whatever the order given."""
    rates = []
    for multipliers in ({"lin": 0.5, "log_scale": 2.0}, {"log_scale": 2.0, "lin": 0.5}):
        cfg = TrainConfig(steps=1, batch_size=16, lr=0.01, lr_multipliers=multipliers)
        trainer = Trainer(TinyModel(), cfg, images, progress=False)
        rates.append([g["initial_lr"] for g in trainer.optimizer.param_groups])
    assert rates[0] == rates[1] == pytest.approx([0.01, 0.005, 0.02])


def test_an_lr_multiplier_that_names_no_parameter_is_a_clear_error(images):
    cfg = TrainConfig(steps=1, batch_size=16, lr_multipliers={"encoder.schedule": 0.1})
    with pytest.raises(ConfigError, match=r"'encoder.schedule' names no trainable parameter.*lin"):
        Trainer(TinyModel(), cfg, images, progress=False)
    with pytest.raises(ValueError, match="lr_multipliers' must be finite numbers >= 0"):
        TrainConfig(lr_multipliers={"lin": -1.0})


def test_evaluation_and_sampling_do_not_disturb_training(tmp_path):
    """Periodic evaluation and sample grids use private random streams: the VAE (random z
    every step) ends with the same parameters as a run that never evaluates."""
    data = tiny_images(96)
    cfg = TrainConfig(steps=12, ema_decay=0.9, **FAST)
    quiet = Trainer(tiny_vae(), cfg, data, progress=False)
    quiet.fit()
    busy_cfg = attrs.evolve(cfg, eval_every=4, eval_batches=1, num_samples=4)
    busy = Trainer(tiny_vae(), busy_cfg, data, data[:32], tmp_path, progress=False)
    busy.fit()
    assert torch.equal(flat_params(quiet.model), flat_params(busy.model))
    assert torch.equal(flat_params(quiet.ema_model), flat_params(busy.ema_model))


class SignalAt:
    """Sends this process ``signum`` when step ``step`` ends."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    @genkit.hookimpl
    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigint_saves_a_checkpoint_of_that_step_and_stops(tmp_path, images, capsys):
    before = signal.getsignal(signal.SIGINT)
    cfg = TrainConfig(steps=50, batch_size=16, log_every=1, eval_every=0, checkpoint_every=0)
    trainer = Trainer(
        TinyModel(),
        cfg,
        images,
        images[:16],
        tmp_path,
        catalog=catalog_with(SignalAt(6, signal.SIGINT)),
        progress=False,
    )
    assert trainer.fit() is None
    assert trainer.interrupted == "SIGINT" and trainer.step == 6
    assert "SIGINT at step 6: checkpoint saved" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000006.pt"]
    saved = ckpt.load(ckpt.latest_checkpoint(tmp_path))
    assert saved["step"] == 6
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(saved["model"][name], value)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_every_rank_refuses_a_run_dir_with_checkpoints(tmp_path, images):
    """Not only rank 0: under DDP the other ranks would otherwise wait in a step for ever."""
    cfg = TrainConfig(steps=2, batch_size=16)
    Trainer(TinyModel(), cfg, images, run_dir=tmp_path, progress=False).fit()
    other_rank = Trainer(TinyModel(), cfg, images, run_dir=tmp_path, progress=False)
    other_rank.dist = DistInfo(rank=1, world_size=1)
    assert not other_rank.is_main
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        other_rank.start()


def grad_norm(model):
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))


def test_gradients_are_clipped_and_the_logged_norm_is_before_clipping(images):
    torch.manual_seed(0)
    model = TinyModel()
    reference = copy.deepcopy(model)
    x = images[:16]
    (-reference.elbo(x).total.mean()).backward()  # the plain ELBO gradient, by autograd
    norm = grad_norm(reference)
    assert norm > 1.0  # so that clipping to 0.5 acts
    rec = Recorder()
    cfg = TrainConfig(steps=1, batch_size=16, grad_clip=0.5, log_every=1)
    trainer = Trainer(model, cfg, images, catalog=catalog_with(rec), progress=False)
    trainer.start()
    trainer.train_step(x)
    trainer._flush_metrics()
    trainer.close()
    assert rec.of("step")[0][2]["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert grad_norm(trainer.model).item() == pytest.approx(0.5, rel=1e-5)
    for clipped, full in zip(trainer.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(clipped.grad, full.grad * (0.5 / norm.item()))


def test_the_trainers_fused_adamw_takes_the_textbook_adamw_steps(images):
    """Three steps of the Trainer (fused AdamW on the CPU, weight decay, constant lr) against
    ``torch.optim.AdamW``'s loop over the parameters on the same batches: the same weights."""
    cfg = TrainConfig(
        steps=3,
        batch_size=16,
        lr=0.01,
        lr_warmup_steps=0,
        schedule="constant",
        weight_decay=0.1,
        ema_decay=0.0,
        log_every=1,
    )
    torch.manual_seed(0)
    model = TinyModel()
    reference = copy.deepcopy(model)
    before = flat_params(model).clone()
    trainer = Trainer(model, cfg, images, progress=False)
    assert trainer.optimizer.defaults["fused"]
    opt = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    trainer.start()
    for k in range(3):
        x = images[16 * k : 16 * (k + 1)]
        trainer.train_step(x)
        opt.zero_grad()
        (-reference.elbo(x).total.mean()).backward()
        opt.step()
    trainer.close()
    torch.testing.assert_close(flat_params(trainer.model), flat_params(reference))
    assert (flat_params(trainer.model) - before).abs().max() > 1e-3  # the steps moved it


class GradNaN(TinyModel):
    """At training call ``at`` adds ``sqrt(0 * s)`` to the reconstruction: a finite value
    (0) whose gradient ``0 / (2 sqrt(0))`` is NaN."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def elbo(self, x, estimator=None, **params):
        out = super().elbo(x)
        if not (self.training and self.calls == self.at):
            return out
        terms = dict(out.terms)
        terms["reconstruction"] = terms["reconstruction"] + torch.sqrt(0.0 * self.log_scale)
        return genkit.ELBOTerms(terms=terms, extras=out.extras, num_dims=out.num_dims)


@pytest.mark.parametrize("eager", [True, False], ids=["checked-each-step", "checked-on-sync"])
def test_a_non_finite_gradient_with_a_finite_loss_stops_the_run(images, eager):
    cfg = TrainConfig(steps=10, batch_size=16, log_every=5, eval_every=0)
    trainer = Trainer(GradNaN(at=3), cfg, images, progress=False)
    trainer._eager_checks = eager
    with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 3") as err:
        trainer.fit()
    if eager:  # checked before the update: the weights are still those of step 2
        assert trainer.step == 2 and "reconstruction=" in str(err.value)
        assert torch.isfinite(flat_params(trainer.model)).all()


def test_eval_table_puts_the_elbo_under_its_terms_and_extras_after_it():
    from genkit.training.logging import format_table
    from genkit.training.trainer import EvalResult

    means = {"reconstruction": -3.0, "prior_matching": -1.0, "simple": -7.0, "elbo": -4.0}
    result = EvalResult(
        means={**means, "bits_per_dim": 0.0},
        stderrs={k: 0.1 for k in [*means, "bits_per_dim"]},
        count=10,
        num_dims=4,
        terms=["reconstruction", "prior_matching"],
        extras=["simple"],
    )
    names = [row[0] for row in result.rows()]
    assert names == ["reconstruction", "prior_matching", "elbo", "extra: simple"]
    table = format_table(result.rows(), result.num_dims).splitlines()
    assert table[3].startswith("elbo") and table[4].startswith("extra: simple")


def test_the_training_estimator_is_built_once_and_used_for_every_step():
    """``estimator``/``estimator_params``: the trainer minimises that estimator's terms (here
    IWAE's one term) instead of the model's default ones; an unknown name fails at once."""
    from genkit.errors import UnknownNameError

    data = torch.randint(0, 256, (64, 1, 8, 8)) / 127.5 - 1
    torch.manual_seed(0)
    model = genkit.create_model("vae", (1, 8, 8), latent_dim=2, hidden=16, net="mlp")
    cfg = TrainConfig(steps=2, estimator="iwae", estimator_params={"k": 3}, **FAST)
    trainer = Trainer(model, cfg, data, data[:16], progress=False)
    seen = []
    estimator = trainer._forward.estimator
    original = type(estimator).__call__
    type(estimator).__call__ = lambda self, m, x: seen.append(self) or original(self, m, x)
    try:
        trainer.fit()
    finally:
        type(estimator).__call__ = original
    assert estimator.k == 3 and len(seen) == 2 and all(e is estimator for e in seen)
    assert trainer._term_names == ["importance_weighted"]
    with pytest.raises(UnknownNameError, match="iwea"):
        Trainer(model, TrainConfig(steps=1, estimator="iwea", **FAST), data, progress=False)
