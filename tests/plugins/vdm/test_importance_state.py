"""The loss-aware proposal over t keeps its statistics in the model's state: they round-trip
through ``state_dict()``, follow the EMA copy without being disturbed by evaluation, and a run
killed and resumed from a trainer checkpoint ends bit for bit where the uninterrupted one does."""

import copy
import io

import pytest
import torch
from genkit_vdm.estimators import WARMUP_FIRST_STEP, DenoisingMatchingELBO, LossSecondMoments

import genkit
from genkit.distributions import to_model_scale
from genkit.errors import InvalidParameterError
from genkit.training import TrainConfig, Trainer
from genkit.training import checkpoint as ckpt

SHAPE = (1, 4, 4)
T = 5


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return to_model_scale(torch.randint(0, 256, (n, *SHAPE), generator=g))


def _vdm(seed=0, **params):
    torch.manual_seed(seed)
    settings = dict(timesteps=T, t_history=2, denoiser="mlp")  # t_proposal="loss_aware"
    return genkit.create_model("vdm", SHAPE, hidden=16, depth=1, **{**settings, **params})


def _probs(model):
    """The default estimator's p(t) on 1..T in training mode (no pilot: its cost is 0)."""
    assert model.training
    p, cost = model.default_estimator.probabilities(T, torch.device("cpu"), model=model)
    assert cost == 0.0
    return p


def _warmup():
    """The warm-up proposal by hand: p(1) = 1/4, the rest uniform over 2..T."""
    rest = (1 - 0.25) / (T - 1)
    return torch.tensor([0.25] + [rest] * (T - 1), dtype=torch.float64)


def _warm(model, batches=4, n=32):
    """A few training-mode ELBO calls: enough for every t to be seen ``t_history`` times."""
    with torch.no_grad():
        for i in range(batches):
            model.elbo(_images(n, seed=i))


def test_record_is_the_exponential_average_of_squared_losses_by_hand():
    moments, history = LossSecondMoments(4), 3  # t = 1, 2, 3, 4
    batches = [
        (torch.tensor([1, 2, 2, 3]), torch.tensor([5.0, 1.0, 3.0, 2.0])),
        (torch.tensor([3, 4, 4, 4]), torch.tensor([4.0, 1.0, 2.0, 2.0])),
        (torch.tensor([2, 3, 4]), torch.tensor([0.5, 1.5, 3.0])),
        (torch.tensor([1, 2, 3, 4]), torch.tensor([6.0, 2.0, 1.0, 1.0])),
        (torch.tensor([1]), torch.tensor([4.0])),
    ]
    mean_sq, seen = [0.0] * 4, [0] * 4
    warm, warm_from_2 = [], []
    for t, loss in batches:
        moments.record(t, loss, history)
        warm.append(moments.warm(history))
        warm_from_2.append(moments.warm(history, first=2))
        for i in range(4):  # the reference, one t at a time in plain Python
            got = [
                float(v) ** 2
                for tt, v in zip(t.tolist(), loss.tolist(), strict=True)
                if tt == i + 1
            ]
            if got:
                m = sum(got) / len(got)
                mean_sq[i] = m if seen[i] == 0 else (1 - 1 / history) * mean_sq[i] + m / history
                seen[i] += len(got)
    assert moments.mean_sq.dtype == torch.float64 and moments.seen.dtype == torch.int64
    assert moments.mean_sq.shape == moments.seen.shape == (4,)
    assert moments.mean_sq.tolist() == pytest.approx(mean_sq, rel=1e-12)
    assert moments.seen.tolist() == seen == [3, 4, 4, 5]
    # warm once every step of first..T has 3 sightings: t = 2..4 after batch 3, t = 1 after 5
    assert warm == [False, False, False, False, True]
    assert warm_from_2 == [False, False, True, True, True]
    root = torch.tensor(mean_sq, dtype=torch.float64).sqrt()
    expected = 0.9 * root / root.sum() + 0.1 / 4
    assert torch.allclose(moments.probabilities(0.1), expected, rtol=1e-12, atol=0)
    expected_2 = 0.9 * root[1:] / root[1:].sum() + 0.1 / 3  # over t = 2..4 only
    assert torch.allclose(moments.probabilities(0.1, first=2), expected_2, rtol=1e-12, atol=0)
    # and seen enough but every loss 0 is not warm (no direction to leave the warm-up in)
    zeros = LossSecondMoments(2)
    for _ in range(3):
        zeros.record(torch.tensor([1, 2]), torch.zeros(2), history)
    assert zeros.seen.tolist() == [3, 3] and not zeros.warm(history)


def test_the_estimator_reads_the_warm_up_proposal_then_the_statistics():
    """Until warm (training mode): p(1) = WARMUP_FIRST_STEP and the rest uniform (uniform over
    2..T with reconstruction_every_step); then (1 - m) sqrt(mean_sq) / sum + m / K, by hand."""
    assert WARMUP_FIRST_STEP == 0.25
    model = _vdm()
    assert torch.equal(_probs(model), _warmup())
    every_step = model.default_estimator.probabilities(T, torch.device("cpu"), first=2)
    assert torch.equal(every_step[0], torch.full((T - 1,), 1 / (T - 1), dtype=torch.float64))
    _warm(model)
    assert model.loss_moments.warm(2)
    root = model.loss_moments.mean_sq.sqrt()
    expected = 0.99 * root / root.sum() + 0.01 / T
    assert torch.allclose(_probs(model), expected, rtol=1e-12, atol=0)
    assert not torch.allclose(_probs(model), _warmup())


def test_statistics_round_trip_through_state_dict_and_give_the_same_p_t():
    model = _vdm()
    state = model.state_dict()
    assert state["loss_moments.mean_sq"].shape == state["loss_moments.seen"].shape == (T,)
    assert state["loss_moments.mean_sq"].dtype == torch.float64
    assert state["loss_moments.seen"].dtype == torch.int64
    _warm(model)
    before = _probs(model)
    assert not torch.allclose(before, _warmup())  # p(t) has left the warm-up proposal
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _vdm(seed=7)
    assert torch.equal(_probs(fresh), _warmup())
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(_probs(fresh), before)
    assert torch.equal(fresh.loss_moments.mean_sq, model.loss_moments.mean_sq)
    assert torch.equal(fresh.loss_moments.seen, model.loss_moments.seen)
    # and the fresh model keeps learning into the loaded buffers, not into a copy of its own
    x = _images(8, seed=11)
    fresh.elbo(x)
    assert fresh.loss_moments.seen.sum() == model.loss_moments.seen.sum() + 8


def test_a_uniform_vdm_has_no_statistics_in_its_state():
    model = _vdm(t_proposal="uniform")
    assert model.loss_moments is None and model.default_estimator.moments is None
    assert not any(k.startswith("loss_moments") for k in model.state_dict())
    x = _images(8)
    model.elbo(x)
    model.elbo(x, t_samples=2)
    assert model.default_estimator.moments is None  # no statistics of its own either
    uniform = torch.full((T,), 1 / T, dtype=torch.float64)
    assert torch.equal(_probs(model), uniform)


def test_only_training_mode_updates_the_statistics():
    model, x = _vdm(), _images(8)
    model.eval()
    model.elbo(x)
    assert model.loss_moments.seen.sum() == 0
    model.train()
    model.elbo(x)
    assert model.loss_moments.seen.sum() == 8


def test_the_ema_copy_has_its_own_statistics_and_evaluation_leaves_both_alone():
    model = _vdm()
    ema = copy.deepcopy(model)
    assert ema.default_estimator.moments is ema.loss_moments
    assert ema.loss_moments is not model.loss_moments
    data = _images(64)
    cfg = TrainConfig(
        steps=4, batch_size=16, lr_warmup_steps=0, log_every=0, eval_every=0, checkpoint_every=0
    )
    trainer = Trainer(model, cfg, data, data[:16], progress=False)
    trainer.start()
    trainer.train(4)
    trainer.close()
    live, shadow = trainer.model.loss_moments, trainer.ema_model.loss_moments
    assert live.seen.sum() == 4 * 16  # one t per example per step
    # the trainer copies buffers into the EMA after each step: equal values, separate tensors
    assert torch.equal(shadow.mean_sq, live.mean_sq) and torch.equal(shadow.seen, live.seen)
    assert shadow.mean_sq.data_ptr() != live.mean_sq.data_ptr()
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items() if "moments" in k}
    saved_ema = {k: v.clone() for k, v in trainer.ema_model.state_dict().items() if "moments" in k}
    trainer.evaluate()  # the EMA model with its default (loss-aware) estimator, in eval mode
    trainer.evaluate_detailed(use_ema=False)
    for k, v in trainer.model.state_dict().items():
        if k in saved:
            assert torch.equal(v, saved[k]), k
    for k, v in trainer.ema_model.state_dict().items():
        if k in saved_ema:
            assert torch.equal(v, saved_ema[k]), k


def test_killed_and_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path):
    """The loss-aware proposal is on from the second step (t_history=2, 5 values of t, 16
    stratified draws per batch: 4 at t = 1 and 3 at each other t under the warm-up proposal);
    checkpoint at step 5 (mid-epoch), resume in a new Trainer with a differently initialised
    model: parameters, EMA and statistics all equal the uninterrupted run's."""
    data = _images(48, seed=3)
    cfg = TrainConfig(
        steps=10,
        batch_size=16,
        lr=1e-2,
        lr_warmup_steps=2,
        ema_decay=0.9,
        log_every=0,
        eval_every=0,
        checkpoint_every=0,
    )
    full = Trainer(_vdm(), cfg, data, run_dir=tmp_path / "a", progress=False)
    full.fit()

    first = Trainer(_vdm(), cfg, data, run_dir=tmp_path / "b", progress=False)
    first.start()
    first.train(5)
    assert first.model.loss_moments.warm(2)
    assert not torch.allclose(_probs(first.model), _warmup())  # p(t) is loss-aware by now
    first.save_checkpoint()
    first.close()
    saved = ckpt.load(ckpt.latest_checkpoint(tmp_path / "b"))
    assert torch.equal(saved["model"]["loss_moments.seen"], first.model.loss_moments.seen)
    assert torch.equal(saved["ema"]["loss_moments.mean_sq"], first.model.loss_moments.mean_sq)

    torch.manual_seed(1234)  # whatever the process did since must not matter
    second = Trainer(_vdm(seed=99), cfg, data, run_dir=tmp_path / "b", progress=False)
    second.fit(resume=True)
    assert second.step == 10
    for a, b in [(full.model, second.model), (full.ema_model, second.ema_model)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert full.model.loss_moments.seen.sum() == 10 * 16


def test_a_shared_estimator_refuses_a_model_with_another_number_of_steps():
    model, other = _vdm(), _vdm(timesteps=T + 2)
    with pytest.raises(InvalidParameterError, match=r"T = 5 steps .* T = 7"):
        other.elbo(_images(2, seed=0), model.default_estimator)


def test_moments_need_the_loss_aware_proposal():
    DenoisingMatchingELBO(moments=LossSecondMoments(T))  # loss_aware is the default
    with pytest.raises(InvalidParameterError, match="need proposal='loss_aware'"):
        DenoisingMatchingELBO(proposal="uniform", moments=LossSecondMoments(T))
    with pytest.raises(InvalidParameterError, match="need proposal='loss_aware'"):
        DenoisingMatchingELBO(proposal=[1.0] * T, moments=LossSecondMoments(T))
    with pytest.raises(InvalidParameterError, match="moments must be a LossSecondMoments"):
        DenoisingMatchingELBO(moments=torch.zeros(T))


def test_an_estimator_by_name_keeps_statistics_of_its_own():
    """Created by name it neither reads nor writes the model's statistics, nor does one whose
    params set the proposal; params alone (no name) share the model's; one kept instance
    without ``moments`` accumulates its own, as before."""
    model, x = _vdm(), _images(32)
    model.elbo(x, "denoising_matching")
    model.elbo(x, proposal="loss_aware")
    model.elbo(x, proposal="uniform")
    assert model.loss_moments.seen.sum() == 0
    model.elbo(x, t_samples=2)  # the model's settings, its statistics: 2 draws per example
    assert model.loss_moments.seen.sum() == 64
    shared = model.loss_moments.mean_sq.clone()
    own = DenoisingMatchingELBO(history=2)
    with torch.no_grad():
        own(model, x)
        own(model, x)
    assert own.moments is not model.loss_moments and own.moments.seen.sum() == 64
    p, _ = own.probabilities(T, x.device)
    assert own.moments.warm(2) and not torch.allclose(p, _warmup())
    assert model.loss_moments.seen.sum() == 64
    assert torch.equal(model.loss_moments.mean_sq, shared)
