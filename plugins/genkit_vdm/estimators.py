"""The VDM's own ELBO estimator: the lecture's denoising-matching decomposition, which the
fixed Gaussian encoder allows (closed-form ``q(x_t|x_0)`` and ``q(x_{t-1}|x_t, x_0)``)::

    ELBO = E_{q(x_1|x_0)}[log p(x_0|x_1)]                                     reconstruction
         - KL(q(x_T|x_0) || p(x_T))                                            prior_matching
         - sum_{t=2}^T E_{q(x_t|x_0)}[KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t))] denoising_matching

Every KL is analytic (``torch.distributions.kl_divergence`` between the Gaussians); what is
left random is each ``x_t`` and, unless ``exact``, which ``t`` is evaluated.

**One network call per draw.** Write ``L_1 = -log p(x_0|x_1)`` and ``L_t`` for the KL of step
``t >= 2``: ``-reconstruction - denoising_matching = sum_{t=1}^T E[L_t]``. A draw ``t ~ p(t)``
on ``1..T`` costs one call of the network at ``x_t`` and gives the unbiased estimate
``L_t / p(t)`` of that sum, booked to ``reconstruction`` when ``t = 1`` and to
``denoising_matching`` otherwise (each term is unbiased on its own). ``L_1`` (tens of nats)
dwarfs a typical ``L_t`` (a tenth of a nat), so ``p`` must give ``t = 1`` its share: by default
``p(t) ∝ sqrt(E[L_t^2])``, the loss-aware proposal of Nichol & Dhariwal (2021, sec. 3.3)
extended to ``t = 1``, the proposal that minimises the variance of ``L_t / p(t)`` among those
that ignore ``x``. ``reconstruction_every_step=True`` computes ``L_1`` at every call instead (a
second network call) and draws ``t`` on ``2..T`` only.

The uniform numbers behind the draws are ``stratified`` by default (an evenly spaced grid with
a random shift, Kingma et al. 2021's low-discrepancy sampler; see
:func:`genkit_vdm.draws.draw_uniforms`), mapped to steps through the inverse CDF of
``p``: each draw stays exactly distributed as ``p``, so the estimate stays unbiased.

The other decomposition of the same ELBO, the consistency form, is
:class:`genkit.markov.ConsistencyELBO` (estimator ``consistency``), which works on the discrete
VDM as on any Markov chain. In continuous time (``timesteps=0``) this estimator computes the
continuous ELBO of :mod:`genkit_vdm.continuous` (:mod:`genkit_vdm.continuous_elbo`).

The extra ``simple`` is ``-L_simple = -E_{t ~ U{1..T}} ||eps - eps_hat(x_t, t)||^2``, Ho et
al. (2020) eq. 14 with the squared norm summed over the data dimensions, signed like a term and
estimated at the same draws (weight ``1 / (T p(t))``). It is not part of the ELBO. A recipe
trains on DDPM's simple loss with the objective weights ``{"reconstruction": 0,
"denoising_matching": 0, "simple": 1}`` (``prior_matching`` has no parameters), while the
logged ELBO stays the true one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import reduce, repeat
from torch import Tensor, nn
from torch.distributions import kl_divergence

from genkit.elbo import ELBO, ELBOTerms
from genkit.errors import IncompatibleEstimatorError, InvalidParameterError
from genkit_vdm.base import VDMBase
from genkit_vdm.continuous_elbo import continuous_elbo
from genkit_vdm.draws import draw_uniforms, inverse_cdf

T_SAMPLERS = ("stratified", "uniform")
PROPOSALS = ("loss_aware", "uniform", "pilot")
#: Rows (examples x steps) per network call in exact mode when ``chunk`` is not given.
EXACT_ROWS = 2048
#: ``p(1)`` of the loss-aware proposal in training until every step has been seen ``history``
#: times (the rest uniform over 2..T): ``L_1`` is about a fifth of the summed losses of a
#: trained model on 8-bit images, far more than the ``1 / T`` of the uniform proposal.
WARMUP_FIRST_STEP = 0.25
#: The pilot proposal: examples and steps it evaluates (once, on the first batch it sees).
PILOT_EXAMPLES, PILOT_STEPS = 8, 24


def denoising_kl(model: VDMBase, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """At one draw ``x_t ~ q(x_t|x_0)`` per row (``x0: (N, ...)``, ``t: (N,)`` in 2..T):
    ``KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t))`` and ``||eps - eps_hat||^2``, each ``(N,)``."""
    q_t = model.encoder.q_marginal(x0, t)
    eps = torch.randn_like(x0)
    x_t = q_t.mean + q_t.stddev * eps  # the reparameterised draw, with its eps kept
    pred = model.decoder.predict(x_t, t)
    kl = kl_divergence(model.encoder.q_posterior(x_t, x0, t), model.decoder.step_from(x_t, t, pred))
    sq_err = reduce((eps - pred.eps).square(), "n ... -> n", "sum")
    return kl, sq_err


def step_losses(model: VDMBase, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """At one draw ``x_t ~ q(x_t|x_0)`` per row (``t: (N,)`` in 1..T, mixed), with one network
    call: ``L_t`` (``-log p(x_0|x_1)`` where ``t = 1``, the step's KL where ``t >= 2``) and
    ``||eps - eps_hat||^2``, each ``(N,)``."""
    q_t = model.encoder.q_marginal(x0, t)
    eps = torch.randn_like(x0)
    x_t = q_t.mean + q_t.stddev * eps
    pred = model.decoder.predict(x_t, t)
    first = t == 1
    nll = -model.decoder.decoder_from(pred).log_prob(x0)
    if model.encoder.timesteps == 1:  # no step t >= 2
        return nll, reduce((eps - pred.eps).square(), "n ... -> n", "sum")
    t_kl = t.clamp(min=2)  # rows with t = 1 compute a KL that the mask drops
    kl = kl_divergence(
        model.encoder.q_posterior(x_t, x0, t_kl), model.decoder.step_from(x_t, t_kl, pred)
    )
    sq_err = reduce((eps - pred.eps).square(), "n ... -> n", "sum")
    return torch.where(first, nll, kl), sq_err


def first_step(model: VDMBase, x0: Tensor) -> tuple[Tensor, Tensor]:
    """The reconstruction ``E_{q(x_1|x_0)}[log p(x_0|x_1)]`` at one draw
    ``x_1 = sqrt(alpha_1) x_0 + sqrt(1 - alpha_1) eps``, and ``||eps - eps_hat(x_1, 1)||^2`` (the
    ``t = 1`` summand of ``L_simple``) at the same draw, each ``(B,)``."""
    q_1 = model.encoder.q_marginal(x0, 1)
    eps = torch.randn_like(x0)
    x1 = q_1.mean + q_1.stddev * eps
    pred = model.decoder.predict(x1, model.encoder.steps(1, x0.shape[0]))
    log_px = model.decoder.decoder_from(pred).log_prob(x0)
    return log_px, reduce((eps - pred.eps).square(), "b ... -> b", "sum")


def prior_matching(model: VDMBase, x0: Tensor) -> Tensor:
    """``-KL(q(x_T|x_0) || N(0, I))``, analytic, ``(B,)``."""
    return -kl_divergence(model.encoder.q_marginal(x0, model.encoder.timesteps), model.prior())


class LossSecondMoments(nn.Module):
    """The loss-aware proposal's statistics (Nichol & Dhariwal 2021, sec. 3.3) for ``t = 1..T``,
    as persistent buffers, so that they are part of ``state_dict()`` (and of the trainer's
    checkpoints) when a model owns them::

        mean_sq[t - 1] ~ E[L_t^2]   an exponential average, rate 1/history, of L_t^2
        seen[t - 1]                 how many L_t have been recorded

    where ``L_1 = -log p(x_0|x_1)`` and ``L_t = KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t))``.
    ``mean_sq`` is float64 and ``seen`` int64, each ``(T,)``; keep the module in float64
    (``model.half()``/``.float()`` would cast ``mean_sq`` as they cast every floating buffer).
    """

    mean_sq: Tensor
    seen: Tensor

    def __init__(self, num_steps: int) -> None:
        super().__init__()
        if not isinstance(num_steps, int) or num_steps < 1:
            raise InvalidParameterError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        self.num_steps = num_steps
        self.register_buffer("mean_sq", torch.zeros(num_steps, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(num_steps, dtype=torch.int64))

    def warm(self, history: int, first: int = 1) -> bool:
        """Whether every step ``first..T`` has been seen ``history`` times and some loss is > 0."""
        return bool((self.seen[first - 1 :] >= history).all()) and bool(
            (self.mean_sq[first - 1 :] > 0).any()
        )

    def probabilities(self, uniform_mix: float, first: int = 1) -> Tensor:
        """``p(t) = (1 - m) sqrt(mean_sq_t) / sum_s sqrt(mean_sq_s) + m / K`` over the ``K``
        steps ``first..T`` with ``m = uniform_mix``, float64 ``(K,)``."""
        root = self.mean_sq[first - 1 :].sqrt()
        uniform = torch.full_like(root, 1.0 / root.numel())
        return (1.0 - uniform_mix) * (root / root.sum()) + uniform_mix * uniform

    @torch.no_grad()
    def record(self, t: Tensor, loss: Tensor, history: int) -> None:
        """Fold the losses ``loss`` observed at steps ``t`` (same shape, ``t`` in 1..T) into
        ``mean_sq``: per ``t`` hit, ``mean_sq <- (1 - 1/history) mean_sq + (1/history) m_t``
        with ``m_t`` the batch mean of ``L_t^2`` (``mean_sq <- m_t`` at the first sighting)."""
        # the per-t sums on the CPU, where index_add_ is deterministic (CUDA's uses atomics)
        idx = (t - 1).reshape(-1).cpu()
        sq = loss.detach().reshape(-1).to(torch.float64).cpu().square()
        sums = torch.zeros(self.num_steps, dtype=torch.float64).index_add_(0, idx, sq)
        counts = torch.zeros(self.num_steps, dtype=torch.int64).index_add_(
            0, idx, torch.ones_like(idx)
        )
        sums, counts = sums.to(self.mean_sq.device), counts.to(self.seen.device)
        hit = counts > 0
        mean = sums / counts.clamp(min=1)
        rate = 1.0 / history
        update = torch.where(self.seen == 0, mean, (1 - rate) * self.mean_sq + rate * mean)
        self.mean_sq.copy_(torch.where(hit, update, self.mean_sq))
        self.seen.add_(counts)

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}"


def _check_count_or_none(name: str, value: object, hint: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InvalidParameterError(f"{name} must be an integer >= 1{hint}, got {value!r}")


class DenoisingMatchingELBO(ELBO):
    """The denoising-matching ELBO (module docstring), per sample.

    :param t_samples: draws of ``t`` per example (each with its own ``x_t``); ``None``
        evaluates every ``t`` (exact in t; discrete time only).
    :param exact: the same as ``t_samples=None``.
    :param t_sampler: ``stratified`` (default) or ``uniform`` uniforms behind the draws
        (:func:`genkit_vdm.draws.draw_uniforms`): in training mode (``model.training``)
        the grid's shift is shared by the batch, in evaluation each example has its own.
    :param proposal: discrete time, ``p(t)`` on the steps drawn (``1..T``, or ``2..T`` with
        ``reconstruction_every_step``): ``loss_aware`` (default; ``p(t) ∝ sqrt(E[L_t^2])`` from
        an exponential average of the losses seen in training mode, mixed with ``uniform_mix``
        of the uniform; until every step has been seen ``history`` times it is the warm-up
        proposal ``p(1) = 1/4``, the rest uniform, in training and the ``pilot`` proposal in
        evaluation), ``uniform``, ``pilot`` (``p(t) ∝ sqrt(E[L_t^2])`` measured once, on the
        first batch: ``PILOT_EXAMPLES`` examples at ``PILOT_STEPS`` steps spaced evenly in
        ``log t``, interpolated, mixed with 5 % of the uniform; its network calls are counted
        in that call's ``nfe``), or a fixed sequence of positive numbers, one per step drawn.
        Every choice is unbiased: the weight of a draw is ``1 / p(t)``.
    :param history: ``loss_aware``: observations per step before ``p`` leaves its warm-up
        proposal, and the horizon of the exponential average.
    :param uniform_mix: ``loss_aware``: the share of the uniform in ``p``.
    :param reconstruction_every_step: compute ``reconstruction`` at every call with a second
        network call (the estimator of genkit 0.1) and draw ``t`` on ``2..T`` only.
    :param chunk: steps per batched network call in exact mode (default: about 2048 rows).
    :param cache_pilot: keep a fitted pilot proposal for later calls (default): one fit per
        evaluation by :func:`genkit.evaluation.evaluate`, which builds its estimator once. The
        model's own default estimator, which lives as long as the model, does not.
    :param moments: where ``loss_aware`` keeps ``E[L_t^2]``: a :class:`LossSecondMoments`
        owned by a model (the VDM's default estimator uses ``model.loss_moments``, so the
        statistics are in ``model.state_dict()``, in checkpoints and in the EMA copy). ``None``:
        the estimator keeps its own, which live as long as this object (one created by name,
        as in ``model.elbo(x, "denoising_matching")``, starts afresh at each call).

    Under DDP the trainer's ``DistributedDataParallel`` broadcasts the model's buffers from
    rank 0 before each forward pass (its buffer sync, on by default), so with the model's
    ``moments`` every rank draws ``t`` from the same ``p(t)``, learned from rank 0's shard only;
    a checkpoint (rank 0's state) resumes it exactly. The estimate is unbiased on every rank,
    as it is for any ``p(t) > 0``.

    In continuous time only ``t_samples`` (>= 1) and ``t_sampler`` apply.
    """

    name = "denoising_matching"

    def __init__(
        self,
        t_samples: int | None = 1,
        exact: bool = False,
        t_sampler: str = "stratified",
        proposal: str | Sequence[float] = "loss_aware",
        history: int = 10,
        uniform_mix: float = 0.01,
        reconstruction_every_step: bool = False,
        chunk: int | None = None,
        moments: LossSecondMoments | None = None,
        cache_pilot: bool = True,
    ) -> None:
        _check_count_or_none(
            "t_samples", t_samples, " or None (every t; on the command line: exact=true)"
        )
        if t_sampler not in T_SAMPLERS:
            raise InvalidParameterError(
                f"unknown t_sampler '{t_sampler}'; choose from {', '.join(T_SAMPLERS)}"
            )
        if isinstance(proposal, str):
            if proposal not in PROPOSALS:
                raise InvalidParameterError(
                    f"unknown proposal '{proposal}'; choose from {', '.join(PROPOSALS)} or give "
                    "one positive number per step"
                )
            self.proposal: str | Tensor = proposal
        else:
            values = torch.as_tensor(proposal, dtype=torch.float64)
            if values.dim() != 1 or not bool((values > 0).all() & values.isfinite().all()):
                raise InvalidParameterError(
                    "proposal must be a name or a 1-D sequence of positive numbers, one per step"
                )
            self.proposal = values
        if not 0.0 < uniform_mix <= 1.0:
            raise InvalidParameterError(f"uniform_mix must lie in (0, 1], got {uniform_mix}")
        _check_count_or_none("history", history, "")
        _check_count_or_none("chunk", chunk, "")
        if moments is not None and not isinstance(moments, LossSecondMoments):
            raise InvalidParameterError(
                f"moments must be a LossSecondMoments (or None), got {type(moments).__name__}"
            )
        if moments is not None and proposal != "loss_aware":
            raise InvalidParameterError(
                "moments are the loss-aware proposal's statistics: they need proposal='loss_aware'"
            )
        self.t_samples = None if exact else t_samples
        self.t_sampler = t_sampler
        self.history, self.uniform_mix, self.chunk = history, uniform_mix, chunk
        self.reconstruction_every_step = bool(reconstruction_every_step)
        #: the loss-aware proposal's statistics: a model's (shared) or this estimator's own
        self.moments = moments
        self._owns_moments = moments is None
        self.cache_pilot = bool(cache_pilot)
        self._pilot: dict[tuple[int, int], Tensor] = {}

    # -- dispatch --------------------------------------------------------------------------
    def __call__(self, model: VDMBase, x: Tensor) -> ELBOTerms:
        encoder = getattr(model, "encoder", None)
        if getattr(encoder, "timesteps", None) == 0 and hasattr(encoder, "log_snr_and_slope"):
            return self._continuous(model, x)
        decoder = getattr(model, "decoder", None)
        if not callable(getattr(encoder, "q_posterior", None)) or not hasattr(decoder, "step_from"):
            raise IncompatibleEstimatorError(
                f"estimator '{self.name}' needs a diffusion model with a closed-form q(x_t|x_0) and "
                f"q(x_(t-1)|x_t, x_0) (the VDM); {type(model).__name__} has none: use 'consistency' or 'elbo'"
            )
        num_steps = encoder.timesteps
        if self.t_samples is None:
            return self._exact(model, x, num_steps)
        if self.reconstruction_every_step:
            return self._every_step_reconstruction(model, x, num_steps, self.t_samples)
        return self._sampled(model, x, num_steps, self.t_samples)

    def _continuous(self, model, x: Tensor) -> ELBOTerms:
        discrete_only = {
            "exact=True (t_samples=None)": self.t_samples is None,
            f"proposal={self.proposal!r}": not (
                isinstance(self.proposal, str) and self.proposal == "loss_aware"
            ),
            "reconstruction_every_step": self.reconstruction_every_step,
            "chunk": self.chunk is not None,
            "moments": self.moments is not None,
        }
        given = [name for name, on in discrete_only.items() if on]
        if given:
            raise InvalidParameterError(
                f"{given[0]} applies to discrete time only; in continuous time the "
                "denoising-matching estimator takes t_samples (>= 1) and t_sampler"
            )
        return continuous_elbo(model, x, self.t_samples, self.t_sampler)

    # -- exact in t ------------------------------------------------------------------------
    def _exact(self, model: VDMBase, x: Tensor, num_steps: int) -> ELBOTerms:
        """``reconstruction`` at one draw of ``x_1`` and every KL ``t = 2..T``: ``T`` calls."""
        b = x.shape[0]
        kl_sum, sq_sum = x.new_zeros(b), x.new_zeros(b)
        chunk = self.chunk or max(1, EXACT_ROWS // b)
        for start in range(2, num_steps + 1, chunk):
            ts = torch.arange(start, min(start + chunk, num_steps + 1), device=x.device)  # (c,)
            t_rows = ts.repeat_interleave(b)  # row j*B + b has step ts[j]
            kl, sq = denoising_kl(model, repeat(x, "b ... -> (c b) ...", c=ts.numel()), t_rows)
            kl_sum = kl_sum + reduce(kl, "(c b) -> b", "sum", b=b)
            sq_sum = sq_sum + reduce(sq, "(c b) -> b", "sum", b=b)
        log_px, sq_first = first_step(model, x)
        simple = -(sq_first + sq_sum) / num_steps
        return self._terms(model, x, log_px, -kl_sum, simple, float(num_steps))

    # -- t sampled -------------------------------------------------------------------------
    def _draw(self, model: VDMBase, x: Tensor, num_steps: int, k: int, first: int):
        """``k`` steps per example on ``first..T`` and their weights ``1 / p(t)``, each ``(k, B)``,
        and the network calls per example a pilot fit cost (0 without one)."""
        p, pilot_nfe = self.probabilities(num_steps, x.device, model=model, x=x, first=first)
        u = draw_uniforms(k, x.shape[0], self.t_sampler, shared=model.training, device=x.device)
        t = inverse_cdf(p, u, first)
        return t, (1.0 / p[t - first]).to(x.dtype), pilot_nfe

    def _sampled(self, model: VDMBase, x: Tensor, num_steps: int, k: int) -> ELBOTerms:
        """``k`` draws ``t ~ p(t)`` on ``1..T`` per example, one network call each."""
        b = x.shape[0]
        t, weight, pilot_nfe = self._draw(model, x, num_steps, k, first=1)
        loss, sq = step_losses(model, repeat(x, "b ... -> (k b) ...", k=k), t.reshape(-1))
        loss, sq = loss.view(k, b), sq.view(k, b)
        self._record(model, num_steps, t, loss)
        weighted = weight * loss
        first = t == 1
        reconstruction = -torch.where(first, weighted, 0.0).mean(0)
        denoising = -torch.where(first, 0.0, weighted).mean(0)
        simple = -(weight * sq).mean(0) / num_steps
        return self._terms(model, x, reconstruction, denoising, simple, k + pilot_nfe)

    def _every_step_reconstruction(
        self, model: VDMBase, x: Tensor, num_steps: int, k: int
    ) -> ELBOTerms:
        """``reconstruction`` at every call (one network call), ``k`` draws on ``2..T``."""
        b = x.shape[0]
        log_px, sq_first = first_step(model, x)
        if num_steps == 1:
            zero = x.new_zeros(b)
            return self._terms(model, x, log_px, zero, -sq_first, 1.0)
        t, weight, pilot_nfe = self._draw(model, x, num_steps, k, first=2)
        kl, sq = denoising_kl(model, repeat(x, "b ... -> (k b) ...", k=k), t.reshape(-1))
        kl, sq = kl.view(k, b), sq.view(k, b)
        self._record(model, num_steps, t, kl)
        simple = -(sq_first + (weight * sq).mean(0)) / num_steps
        return self._terms(model, x, log_px, -(weight * kl).mean(0), simple, 1 + k + pilot_nfe)

    def _terms(self, model, x, reconstruction, denoising, simple, nfe: float) -> ELBOTerms:
        terms = {
            "reconstruction": reconstruction,
            "prior_matching": prior_matching(model, x),
            "denoising_matching": denoising,
        }
        return ELBOTerms(terms=terms, num_dims=model.num_dims, extras={"simple": simple}, nfe=nfe)

    def _record(self, model: VDMBase, num_steps: int, t: Tensor, loss: Tensor) -> None:
        if self.proposal == "loss_aware" and model.training:
            self._moments(num_steps, create=True).record(t, loss, self.history)

    # -- the proposal ----------------------------------------------------------------------
    def probabilities(
        self,
        num_steps: int,
        device: torch.device,
        *,
        model: VDMBase | None = None,
        x: Tensor | None = None,
        first: int | None = None,
    ) -> tuple[Tensor, float]:
        """``p(t)`` on the steps ``first..T`` that the next call draws from (float64 ``(K,)``)
        and the network calls per example of ``x`` it cost (a pilot fit; else 0). ``first``
        defaults to 1 (2 with ``reconstruction_every_step``); ``model`` and ``x`` are needed
        only when a pilot must be fitted, and ``model.training`` picks the loss-aware
        proposal's warm-up (training) or pilot (evaluation) fallback."""
        first = first if first is not None else (2 if self.reconstruction_every_step else 1)
        size = num_steps - first + 1
        uniform = torch.full((size,), 1.0 / size, dtype=torch.float64, device=device)
        if isinstance(self.proposal, Tensor):
            if self.proposal.numel() != size:
                raise InvalidParameterError(
                    f"proposal has {self.proposal.numel()} entries; this model draws steps "
                    f"{first}..{num_steps}, {size} of them"
                )
            return (self.proposal / self.proposal.sum()).to(device), 0.0
        if self.proposal == "uniform" or size == 1:
            return uniform, 0.0
        if self.proposal == "loss_aware":
            moments = self._moments(num_steps, create=False)
            if moments is not None and moments.warm(self.history, first):
                return moments.probabilities(self.uniform_mix, first).to(device), 0.0
            training = model is None or model.training
            if training:
                if first == 2:
                    return uniform, 0.0
                rest = (1.0 - WARMUP_FIRST_STEP) / (num_steps - 1)
                p = torch.full((size,), rest, dtype=torch.float64, device=device)
                p[0] = WARMUP_FIRST_STEP
                return p, 0.0
        return self._pilot_proposal(model, x, num_steps, first, device)

    def _pilot_proposal(
        self, model: VDMBase | None, x: Tensor | None, num_steps: int, first: int, device
    ) -> tuple[Tensor, float]:
        """The pilot ``p(t) ∝ sqrt(E[L_t^2])`` (see ``proposal``), fitted on ``x`` once per
        estimator (with ``cache_pilot``; the model's own default estimator refits at every
        call, so that one evaluation of the model never depends on another)."""
        key = (first, num_steps)
        cache = self.cache_pilot
        if cache and key in self._pilot:
            return self._pilot[key].to(device), 0.0
        if model is None or x is None:
            raise InvalidParameterError("a pilot proposal is fitted on a batch: pass model and x")
        grid = np.unique(np.geomspace(first, num_steps, PILOT_STEPS).round().astype(np.int64))
        examples = x[:PILOT_EXAMPLES]
        n, g = examples.shape[0], grid.size
        t = torch.as_tensor(grid, device=x.device).repeat_interleave(n)  # row j*n + e
        rows = repeat(examples, "e ... -> (g e) ...", g=g)
        with torch.no_grad():
            if first == 1:
                loss, _ = step_losses(model, rows, t)
            else:
                loss, _ = denoising_kl(model, rows, t)
        root = reduce(loss.double().square(), "(g e) -> g", "mean", g=g).sqrt().cpu().numpy()
        root = np.maximum(root, 1e-3 * root.max() + 1e-12)
        steps = np.arange(first, num_steps + 1)
        p = torch.from_numpy(np.interp(steps, grid, root))
        p = 0.95 * p / p.sum() + 0.05 / p.numel()
        if cache:
            self._pilot[key] = p
        return p.to(device), g * n / x.shape[0]

    def _moments(self, num_steps: int, *, create: bool) -> LossSecondMoments | None:
        """The statistics for a chain of ``num_steps`` steps: a model's must match it; this
        estimator's own are (re)started for it when ``create``."""
        moments = self.moments
        if moments is not None and moments.num_steps == num_steps:
            return moments
        if not self._owns_moments:
            raise InvalidParameterError(
                f"this estimator's loss-aware statistics are for T = {moments.num_steps} steps "
                f"(the model that owns them); this model has T = {num_steps}: use that model, "
                "or an estimator without moments"
            )
        if create:
            self.moments = LossSecondMoments(num_steps)
        return self.moments if create else None
