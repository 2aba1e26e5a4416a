"""The trainer's budgets and formats: a ``minutes`` budget calibrated after ``CALIBRATION_STEPS``
on a fake clock (exact, and kept on resume), ``channels_last``, ``sample_params`` and the
``eval_mc_se``/``eval_max_nfe`` budget of the final evaluation."""

import math
import time
import types

import attrs
import pytest
import torch
from trainhelp import flat_params, tiny_images, tiny_vae

import genkit
from genkit.errors import ConfigError
from genkit.training import TrainConfig, Trainer, make_config
from genkit.training import checkpoint as ckpt
from genkit.training import trainer as trainer_module
from genkit.training.trainer import CALIBRATION_STEPS

QUIET = dict(batch_size=16, log_every=0, eval_every=0, checkpoint_every=0, num_samples=0)

# -- minutes ---------------------------------------------------------------------------------
DT = 0.125  # seconds per training step on the fake clock (a power of 2: exact arithmetic)
FIRST = 5  # the first step costs FIRST * DT (one-off costs), every later one DT
MINUTES = 0.125  # 7.5 s


class Clock:
    """``perf_counter`` for the trainer: time passes only inside a training ``elbo`` call (the
    step's work), ``FIRST * DT`` for the first call and ``DT`` for each later one, and at a
    batch fetch ``fetch(calls)`` (default nothing)."""

    def __init__(self, dt=DT, fetch=None):
        self.now, self.calls, self.fetches, self.dt = 0.0, 0, 0, dt
        self.fetch = fetch or (lambda _: 0.0)

    def __call__(self):
        return self.now

    def step(self):
        self.now += (FIRST if self.calls == 0 else 1) * self.dt
        self.calls += 1

    def fetched(self):
        self.now += self.fetch(self.fetches)
        self.fetches += 1


@pytest.fixture
def clocked(monkeypatch):
    """``clocked(clock)`` makes ``clock`` the trainer's ``time.perf_counter`` and has every
    training ``elbo`` of the VAE advance it (the evaluation's calls do not)."""
    vae_type = type(tiny_vae())
    elbo = vae_type.elbo

    def use(clock):
        fake = types.ModuleType("time")
        fake.__dict__.update(vars(time))
        fake.perf_counter = clock

        def timed_elbo(self, x, *args, **kwargs):
            if self.training:
                clock.step()
            return elbo(self, x, *args, **kwargs)

        monkeypatch.setattr(trainer_module, "time", fake)
        monkeypatch.setattr(vae_type, "elbo", timed_elbo)
        return clock

    return use


def expected_total(budget_s, first_s, later_s):
    """``total_steps`` from the documented rule: after ``CALIBRATION_STEPS`` steps taking
    ``first_s`` then ``later_s`` each, ``max(20, 20 + int(remaining / mean of the later))``."""
    spent = first_s + (CALIBRATION_STEPS - 1) * later_s
    return max(CALIBRATION_STEPS, CALIBRATION_STEPS + int((budget_s - spent) / later_s))


def test_epochs_and_minutes_together_is_a_config_error():
    with pytest.raises(ConfigError, match=r"not both epochs and minutes"):
        make_config({"epochs": 2, "minutes": 1.0})
    with pytest.raises(ConfigError, match="'minutes' must be > 0"):
        make_config({"minutes": 0})
    assert make_config({"minutes": 0.5, "steps": 7}).minutes == 0.5


def test_minutes_fix_the_steps_from_the_measured_step_time(tmp_path, clocked):
    clock = clocked(Clock())
    cfg = TrainConfig(minutes=MINUTES, **QUIET)
    trainer = Trainer(tiny_vae(), cfg, tiny_images(64), run_dir=tmp_path, progress=False)
    assert trainer.total_steps is None  # provisional until the calibration
    trainer.start()
    trainer.train(CALIBRATION_STEPS - 1)
    assert trainer.total_steps is None
    trainer.train(CALIBRATION_STEPS)
    assert trainer.train_seconds == (FIRST + CALIBRATION_STEPS - 1) * DT
    total = expected_total(MINUTES * 60, FIRST * DT, DT)
    assert total == 56 and trainer.total_steps == total
    trainer.train()
    trainer.close()
    assert trainer.step == total and clock.calls == total
    assert trainer.train_seconds == (FIRST + total - 1) * DT == MINUTES * 60
    trainer.save_checkpoint()
    saved = ckpt.load(ckpt.latest_checkpoint(tmp_path))
    assert (saved["step"], saved["total_steps"]) == (total, total)
    assert saved["train_seconds"] == trainer.train_seconds


def test_a_budget_spent_by_the_calibration_stops_there(clocked):
    clocked(Clock(dt=0.5))  # 24 * 0.5 s = 12 s > 7.5 s
    trainer = Trainer(tiny_vae(), TrainConfig(minutes=MINUTES, **QUIET), tiny_images(64))
    trainer.fit()
    assert trainer.step == trainer.total_steps == CALIBRATION_STEPS
    assert trainer.train_seconds == 12.0


def test_a_resumed_budget_run_keeps_its_total_and_ends_bit_for_bit(tmp_path, clocked):
    cfg = TrainConfig(minutes=MINUTES, ema_decay=0.9, **QUIET)
    data = tiny_images(64)  # 4 batches per epoch: the checkpoint falls mid-epoch
    clocked(Clock())
    full = Trainer(tiny_vae(), cfg, data, run_dir=tmp_path / "a", progress=False)
    full.fit()

    clock = clocked(Clock())  # the same clock, on until the end of the resumed run
    first = Trainer(tiny_vae(), cfg, data, run_dir=tmp_path / "b", progress=False)
    first.start()
    first.train(30)
    first.save_checkpoint()
    first.close()
    saved = ckpt.load(ckpt.latest_checkpoint(tmp_path / "b"))
    assert saved["total_steps"] == full.total_steps == 56
    assert saved["train_seconds"] == (FIRST + 29) * DT
    torch.manual_seed(1234)
    second = Trainer(tiny_vae(seed=99), cfg, data, run_dir=tmp_path / "b", progress=False)
    assert second.total_steps is None
    second.fit(resume=True)
    assert clock.calls == 56
    assert second.step == second.total_steps == full.step == 56
    assert second.train_seconds == full.train_seconds == MINUTES * 60
    assert torch.equal(flat_params(full.model), flat_params(second.model))
    assert torch.equal(flat_params(full.ema_model), flat_params(second.ema_model))


def test_a_run_resumed_before_the_calibration_gets_the_same_total(tmp_path, clocked):
    cfg = TrainConfig(minutes=MINUTES, **QUIET)
    data = tiny_images(64)
    clocked(Clock())
    first = Trainer(tiny_vae(), cfg, data, run_dir=tmp_path, progress=False)
    first.start()
    first.train(10)
    first.save_checkpoint()
    first.close()
    second = Trainer(tiny_vae(), cfg, data, run_dir=tmp_path, progress=False)
    second.fit(resume=True)
    assert second.total_steps == expected_total(MINUTES * 60, FIRST * DT, DT)


def test_the_first_batch_fetch_is_left_out_of_the_step_time(clocked, monkeypatch):
    clock = clocked(Clock(fetch=lambda i: 4.0 * DT if i == 0 else 0.0))
    next_batch = Trainer._next_batch

    def fetch(self):
        clock.fetched()
        return next_batch(self)

    monkeypatch.setattr(Trainer, "_next_batch", fetch)
    trainer = Trainer(tiny_vae(), TrainConfig(minutes=MINUTES, **QUIET), tiny_images(64))
    trainer.fit()
    assert trainer.total_steps == expected_total(MINUTES * 60, (FIRST + 4) * DT, DT)


# -- channels_last ---------------------------------------------------------------------------
IMAGE = (3, 8, 8)  # C > 1: with one channel NCHW and NHWC strides coincide


def conv_vae(seed=0, shape=IMAGE):
    torch.manual_seed(seed)
    return genkit.create_model("vae", shape, latent_dim=4, channels=4, net="conv")


@pytest.fixture
def seen(monkeypatch):
    """Records ``(training, dims, channels_last, contiguous)`` of every ``x`` reaching a VAE's
    ``elbo``."""
    calls = []
    vae_type = type(tiny_vae())
    elbo = vae_type.elbo

    def recording(self, x, *args, **kwargs):
        calls.append(
            (
                self.training,
                x.dim(),
                x.is_contiguous(memory_format=torch.channels_last),
                x.is_contiguous(),
            )
        )
        return elbo(self, x, *args, **kwargs)

    monkeypatch.setattr(vae_type, "elbo", recording)
    return calls


def four_d(model):
    return [p for p in model.parameters() if p.dim() == 4]


@pytest.mark.parametrize("channels_last", [True, False])
def test_image_models_and_batches_in_the_chosen_memory_format(seen, channels_last):
    data = tiny_images(48, shape=IMAGE)
    cfg = TrainConfig(steps=3, **{**QUIET, "channels_last": channels_last})
    if channels_last:
        assert TrainConfig().channels_last  # the default
    trainer = Trainer(conv_vae(), cfg, data, data[:16], progress=False)
    result = trainer.fit()
    for model in (trainer.model, trainer.ema_model):
        params = four_d(model)
        assert params
        if channels_last:
            assert all(p.is_contiguous(memory_format=torch.channels_last) for p in params)
            assert not all(p.is_contiguous() for p in params)
        else:
            assert all(p.is_contiguous() for p in params)
            assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in params)
    training = [c for c in seen if c[0]]
    evaluating = [c for c in seen if not c[0]]
    assert len(training) == 3 and len(evaluating) >= 2  # the final evaluation: >= 2 draws
    for _, dims, nhwc, nchw in seen:
        assert dims == 4 and (nhwc if channels_last else nchw)
        assert nhwc != nchw
    assert result.count == 16 and math.isfinite(result.means["bits_per_dim"])
    x = trainer.sample(4)
    assert x.shape == (4, *IMAGE) and bool(torch.isfinite(x).all())


def test_vector_data_are_left_alone(seen):
    data = tiny_images(48).flatten(1)  # (48, 64)
    torch.manual_seed(0)
    model = genkit.create_model("vae", (64,), latent_dim=4, hidden=32, net="mlp")
    trainer = Trainer(model, TrainConfig(steps=2, **QUIET), data, data[:16], progress=False)
    result = trainer.fit()
    assert all(dims == 2 and nchw for _, dims, _, nchw in seen)
    assert all(p.is_contiguous() for p in trainer.model.parameters())
    assert math.isfinite(result.means["bits_per_dim"])
    assert trainer.sample(3).shape == (3, 64)


def test_the_two_memory_formats_train_to_the_same_weights():
    """Not bit for bit (the convolutions sum in other orders), but within float noise, against
    steps that move the weights by ~1e-2. Adam amplifies that noise where a gradient is near
    zero (its step is ~lr * g / |g|): on AVX2 kernels a few weights in 6,330 differ by ~2e-4
    after four steps (AVX-512: ~1e-6), so the bound is on nearly all weights and on the worst."""
    data = tiny_images(64, shape=IMAGE)
    cfg = TrainConfig(steps=4, ema_decay=0.5, lr_warmup_steps=0, **QUIET)
    runs = {}
    for fmt in (True, False):
        trainer = Trainer(conv_vae(), attrs.evolve(cfg, channels_last=fmt), data, data[:16])
        runs[fmt] = (trainer, trainer.fit())
    (a, ra), (b, rb) = runs[True], runs[False]
    moved = (flat_params(a.model) - flat_params(conv_vae())).abs().max()
    assert moved > 1e-3
    for model_a, model_b in ((a.model, b.model), (a.ema_model, b.ema_model)):
        diff = (flat_params(model_a) - flat_params(model_b)).abs()
        assert float((diff > 5e-5).float().mean()) < 2e-3  # at most a dozen of 6,330 weights
        assert float(diff.max()) < 0.05 * float(moved)
    assert ra.means["elbo"] == pytest.approx(rb.means["elbo"], rel=1e-5)


# -- sampling and the final evaluation -------------------------------------------------------
def test_sample_params_reach_model_sample(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = genkit.create_model(
        "vdm", (1, 8, 8), timesteps=10, denoiser="mlp", hidden=16, depth=1, fourier=[]
    )
    calls = []
    sample = type(model).sample

    def recording(self, n, generator=None, **kwargs):
        calls.append((n, kwargs))
        return sample(self, n, generator=generator, **kwargs)

    monkeypatch.setattr(type(model), "sample", recording)
    data = tiny_images(32)
    cfg = TrainConfig(
        steps=2,
        **{**QUIET, "eval_every": 2, "num_samples": 4},
        eval_batches=1,
        eval_max_nfe=20,
        sample_params={"steps": 3},
    )
    trainer = Trainer(model, cfg, data, data[:16], tmp_path, progress=False)
    trainer.fit()
    assert calls == [(4, {"steps": 3})]  # the periodic evaluation's grid
    x = trainer.sample(2)
    assert calls[-1] == (2, {"steps": 3}) and x.shape == (2, 1, 8, 8)


def test_the_final_evaluation_draws_to_its_mc_se_target():
    data = tiny_images(48)
    cfg = TrainConfig(steps=2, **QUIET, eval_mc_se=10.0, eval_max_nfe=None)
    result = Trainer(tiny_vae(), cfg, data, data[:16], progress=False).fit()
    assert (result.stop, result.target_mc_se, result.draws) == ("target", 10.0, 2)
    assert result.mc_se["bits_per_dim"] <= 10.0


def test_the_final_evaluation_keeps_to_its_nfe_budget():
    data = tiny_images(48)
    cfg = TrainConfig(steps=2, **QUIET, eval_mc_se=1e-9, eval_max_nfe=10)
    result = Trainer(tiny_vae(), cfg, data, data[:16], progress=False).fit()
    # the VAE's ELBO costs 2 network evaluations per example per draw: 5 draws fit in 10
    assert (result.stop, result.draws, result.nfe_per_example) == ("max_nfe", 5, 10.0)
    assert result.target_mc_se == 1e-9 and result.mc_se["bits_per_dim"] > 1e-9


class SlowStart(Clock):
    """Steps 2..20 take 3 DT (another process busy at the start), every later one DT."""

    def step(self):
        self.now += (FIRST if self.calls == 0 else 3 if self.calls < 20 else 1) * self.dt
        self.calls += 1


def test_a_second_calibration_corrects_a_slow_start(clocked):
    clocked(SlowStart())
    trainer = Trainer(tiny_vae(), TrainConfig(minutes=1.0, **QUIET), tiny_images(64))
    budget = 60.0
    first = expected_total(budget, FIRST * DT, 3 * DT)  # what the slow start alone suggests
    again = max(2 * CALIBRATION_STEPS, first // 10)
    spent = (FIRST + 19 * 3 + (again - 20)) * DT
    trainer.fit()
    assert trainer.total_steps == again + int((budget - spent) / DT) > first
    assert trainer.train_seconds == pytest.approx(budget, abs=DT)
