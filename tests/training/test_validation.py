"""A validation split held out of the train split, and early stopping on it (``keep_best``):
the best EMA weights by validation bits/dim are evaluated, sampled, checkpointed and loaded."""

import pytest
import torch
from trainhelp import tiny_images, tiny_vae

from genkit.data import RowRange, hold_out
from genkit.errors import ConfigError, DataError
from genkit.training import TrainConfig, Trainer, make_config
from genkit.training import checkpoint as ckpt

QUIET = dict(batch_size=16, log_every=0, checkpoint_every=0, num_samples=0, eval_mc_se=None)


def test_hold_out_keeps_the_first_rows_and_holds_out_the_last():
    data = torch.arange(50.0).view(50, 1)
    kept, held = hold_out(data, 0.1)
    assert isinstance(kept, RowRange) and (len(kept), len(held)) == (45, 5)
    assert torch.equal(held.__getitems__([0, 4]), data[[45, 49]]) and held[1].item() == 46.0
    assert torch.equal(torch.stack([kept[i] for i in range(45)]), data[:45])
    with pytest.raises(IndexError):
        held[5]
    with pytest.raises(DataError, match="both must be >= 1"):
        hold_out(data[:1], 0.5)


def test_keep_best_needs_a_validation_split():
    with pytest.raises(ConfigError, match="validation_fraction"):
        make_config({"keep_best": True})


def test_validation_rows_are_never_trained_on_and_periodic_evaluations_use_them(monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (80, 1, 8, 8), generator=g) / 127.5 - 1  # rows all distinct
    seen = []
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, x: seen.append(x) or step(self, x))
    cfg = TrainConfig(steps=12, eval_points=3, validation_fraction=0.2, **QUIET)
    trainer = Trainer(tiny_vae(), cfg, data, data[:8], progress=False)
    trainer.fit()
    trained = torch.cat(seen)
    assert len(trained) == 12 * 16
    assert not any(torch.equal(row, h) for row in trained for h in data[64:])
    assert any(torch.equal(trained[0], row) for row in data[:64])
    splits = [e["split"] for e in trainer.eval_history]
    assert splits == ["validation", "validation", "test"]
    assert trainer.eval_history[0]["examples"] == 16  # the 16 held-out rows


def test_keep_best_evaluates_samples_and_checkpoints_the_best_weights(tmp_path):
    """A learning rate that makes training diverge after a few steps: the best validation
    point comes early, and the final test evaluation is that of its weights."""
    data = tiny_images(96)
    cfg = TrainConfig(
        steps=30, eval_points=6, validation_fraction=0.25, keep_best=True, lr=0.5,
        lr_warmup_steps=0, grad_clip=None, schedule="constant", ema_decay=0.0, **QUIET,
    )  # fmt: skip
    info = {"model": {"name": "vae", "params": {"latent_dim": 4, "hidden": 32, "net": "mlp"}}}
    trainer = Trainer(
        tiny_vae(), cfg, data, data[:16], run_dir=tmp_path, run_info=info, progress=False
    )
    result = trainer.fit()
    validation = [e for e in trainer.eval_history if e["split"] == "validation"]
    best = min(validation, key=lambda e: e["bits_per_dim"])
    assert trainer.best["step"] == best["step"] and validation[-1]["step"] == 30
    for name, value in trainer.ema_model.state_dict().items():
        assert torch.equal(value, trainer.best["ema"][name]), name
    # the final test evaluation is of those weights: the same as evaluating them afresh
    again = trainer.evaluate_detailed(mc_se=cfg.eval_mc_se, max_nfe=cfg.eval_max_nfe)
    assert again.bits()["mean"] == pytest.approx(result.bits()["mean"])
    state = ckpt.load(ckpt.latest_checkpoint(tmp_path))
    assert state["best"]["step"] == best["step"]
    # genkit eval loads the best weights, --last the last ones
    from genkit.training.cli import load_run

    model, info, _ = load_run(tmp_path, device="cpu")
    assert info["weights"].startswith(f"best EMA (step {best['step']}")
    for name, value in model.state_dict().items():
        assert torch.equal(value, trainer.best["ema"][name]), name
    last_model, info, _ = load_run(tmp_path, device="cpu", last=True)
    assert info["weights"] == "EMA"
    for name, value in last_model.state_dict().items():
        assert torch.equal(value, state["ema"][name]), name
    assert any(not torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())


def test_a_resumed_keep_best_run_keeps_its_best(tmp_path):
    data = tiny_images(64)
    cfg = TrainConfig(steps=12, eval_points=4, validation_fraction=0.25, keep_best=True, **QUIET)
    first = Trainer(tiny_vae(), cfg, data, data[:8], run_dir=tmp_path, progress=False)
    first.start()
    first.train(7)
    first.save_checkpoint()
    first.close()
    assert first.best is not None
    second = Trainer(tiny_vae(seed=5), cfg, data, data[:8], run_dir=tmp_path, progress=False)
    second.start(resume=True)
    assert second.best["step"] == first.best["step"]
    second.close()
