"""The VDM's own ELBO estimator: the lecture's denoising-matching decomposition, which the
fixed Gaussian encoder allows (closed-form ``q(x_t|x_0)`` and ``q(x_{t-1}|x_t, x_0)``)::

    ELBO = E_{q(x_1|x_0)}[log p(x_0|x_1)]                                     reconstruction
         - KL(q(x_T|x_0) || p(x_T))                                            prior_matching
         - sum_{t=2}^T E_{q(x_t|x_0)}[KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t))] denoising_matching

Every KL is analytic (``torch.distributions.kl_divergence`` between the Gaussians); what is
left random is ``x_1``, each ``x_t`` and, unless ``exact``, which ``t`` is evaluated. The other
decomposition of the same ELBO, the consistency form, is :class:`genkit.markov.ConsistencyELBO`
(estimator ``consistency``), which works on the VDM as on any Markov chain.

The extra ``simple`` is ``-L_simple = -E_{t ~ U{1..T}} ||eps - eps_hat(x_t, t)||^2``, Ho et
al. (2020) eq. 14 with the squared norm summed over the data dimensions, signed like a term and
estimated at the same draws (``t = 1`` at the reconstruction's ``x_1``, weight ``1/T``; the
steps ``t >= 2`` at the denoising draws, weight ``(T - 1)/T``). It is not part of the ELBO. A
recipe trains on DDPM's simple loss with the objective weights ``{"reconstruction": 0,
"denoising_matching": 0, "simple": 1}`` (``prior_matching`` has no parameters), while the
logged ELBO stays the true one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from einops import reduce, repeat
from torch import Tensor, nn
from torch.distributions import kl_divergence

from genkit.elbo import ELBO, ELBOTerms
from genkit.errors import IncompatibleEstimatorError, InvalidParameterError

if TYPE_CHECKING:
    from genkit_vdm.model import VDM

SAMPLERS = ("uniform", "importance")
#: Rows (examples x steps) per network call in exact mode when ``chunk`` is not given.
EXACT_ROWS = 2048


def denoising_kl(model: VDM, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """At one draw ``x_t ~ q(x_t|x_0)`` per row (``x0: (N, ...)``, ``t: (N,)`` in 2..T):
    ``KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t))`` and ``||eps - eps_hat||^2``, each ``(N,)``."""
    q_t = model.encoder.q_marginal(x0, t)
    eps = torch.randn_like(x0)
    x_t = q_t.mean + q_t.stddev * eps  # the reparameterised draw, with its eps kept
    pred = model.decoder.predict(x_t, t)
    kl = kl_divergence(
        model.encoder.q_posterior(x_t, x0, t), model.decoder.step_from(x_t, t, pred.x0)
    )
    sq_err = reduce((eps - pred.eps).square(), "n ... -> n", "sum")
    return kl, sq_err


def first_step(model: VDM, x0: Tensor) -> tuple[Tensor, Tensor]:
    """The reconstruction ``E_{q(x_1|x_0)}[log p(x_0|x_1)]`` at one draw
    ``x_1 = sqrt(alpha_1) x_0 + sqrt(1 - alpha_1) eps``, and ``||eps - eps_hat(x_1, 1)||^2`` (the
    ``t = 1`` summand of ``L_simple``) at the same draw, each ``(B,)``."""
    q_1 = model.encoder.q_marginal(x0, 1)
    eps = torch.randn_like(x0)
    x1 = q_1.mean + q_1.stddev * eps
    pred = model.decoder.predict(x1, model.encoder.steps(1, x0.shape[0]))
    log_px = model.decoder.decoder_from(pred.x0).log_prob(x0)
    return log_px, reduce((eps - pred.eps).square(), "b ... -> b", "sum")


def prior_matching(model: VDM, x0: Tensor) -> Tensor:
    """``-KL(q(x_T|x_0) || N(0, I))``, analytic, ``(B,)``."""
    return -kl_divergence(model.encoder.q_marginal(x0, model.encoder.timesteps), model.prior())


class LossSecondMoments(nn.Module):
    """The loss-aware sampler's statistics (Nichol & Dhariwal 2021, sec. 3.3) for ``t = 2..T``,
    as persistent buffers, so that they are part of ``state_dict()`` (and of the trainer's
    checkpoints) when a model owns them::

        mean_sq[t - 2] ~ E[L_t^2]   an exponential average, rate 1/history, of L_t^2
        seen[t - 2]                 how many L_t have been recorded

    where ``L_t = KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t))``. ``mean_sq`` is float64 and ``seen``
    int64, each ``(T - 1,)``; keep the module in float64 (``model.half()``/``.float()`` would
    cast ``mean_sq`` as they cast every floating buffer).
    """

    mean_sq: Tensor
    seen: Tensor

    def __init__(self, num_steps: int) -> None:
        super().__init__()
        if not isinstance(num_steps, int) or num_steps < 1:
            raise InvalidParameterError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        self.num_steps = num_steps
        size = num_steps - 1
        self.register_buffer("mean_sq", torch.zeros(size, dtype=torch.float64), persistent=True)
        self.register_buffer("seen", torch.zeros(size, dtype=torch.int64), persistent=True)

    def probabilities(self, history: int, uniform_mix: float) -> Tensor:
        """``p(t) = (1 - m) sqrt(mean_sq_t) / sum_s sqrt(mean_sq_s) + m / (T - 1)`` with
        ``m = uniform_mix``, float64 ``(T - 1,)``; the uniform ``1 / (T - 1)`` until every
        ``t`` has been seen ``history`` times (or while every ``mean_sq`` is 0)."""
        uniform = torch.full_like(self.mean_sq, 1.0 / max(self.num_steps - 1, 1))
        root = self.mean_sq.sqrt()
        total = root.sum()
        if bool((self.seen < history).any()) or not bool(total > 0):
            return uniform
        return (1.0 - uniform_mix) * (root / total) + uniform_mix * uniform

    @torch.no_grad()
    def record(self, t: Tensor, loss: Tensor, history: int) -> None:
        """Fold the losses ``loss`` observed at steps ``t`` (same shape, ``t`` in 2..T) into
        ``mean_sq``: per ``t`` hit, ``mean_sq <- (1 - 1/history) mean_sq + (1/history) m_t``
        with ``m_t`` the batch mean of ``L_t^2`` (``mean_sq <- m_t`` at the first sighting)."""
        # the per-t sums on the CPU, where index_add_ is deterministic (CUDA's uses atomics)
        idx = (t - 2).reshape(-1).cpu()
        sq = loss.detach().reshape(-1).to(torch.float64).cpu().square()
        sums = torch.zeros(self.num_steps - 1, dtype=torch.float64).index_add_(0, idx, sq)
        counts = torch.zeros(self.num_steps - 1, dtype=torch.int64).index_add_(
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


class DenoisingMatchingELBO(ELBO):
    """The denoising-matching ELBO (module docstring), per sample.

    :param t_samples: steps ``t`` drawn per example for the ``denoising_matching`` sum
        (each with its own ``x_t``); ``None`` evaluates every ``t = 2..T`` (exact in t).
    :param exact: the same as ``t_samples=None``.
    :param sampler: ``uniform`` (``t ~ U{2..T}``, weight ``T - 1``) or ``importance``
        (``t ~ p(t)``, weight ``1 / p(t)``, i.e. ``(T - 1) * 1/((T - 1) p(t))`` against the
        uniform estimate): unbiased either way.
    :param proposal: with ``importance``, a fixed ``p(t)`` for ``t = 2..T`` (``T - 1``
        positive numbers, normalised here). Without it the sampler is loss-aware (Nichol &
        Dhariwal 2021, sec. 3.3): ``p(t) ∝ sqrt(E[L_t^2])`` from an exponential average of the
        KLs ``L_t`` seen in training mode (``model.training``; as BatchNorm's running
        statistics, evaluation reads ``p(t)`` but does not change it), mixed with
        ``uniform_mix`` of the uniform distribution; uniform until every ``t`` has been seen
        ``history`` times.
    :param moments: where the loss-aware sampler keeps ``E[L_t^2]``: a
        :class:`LossSecondMoments` owned by a model (the VDM's default estimator with
        ``t_sampler="importance"`` uses ``model.loss_moments``, so the statistics are in
        ``model.state_dict()``, in checkpoints and in the EMA copy). ``None``: the estimator
        keeps its own, which lives as long as this object (an estimator created by name, as in
        ``model.elbo(x, "denoising_matching", sampler="importance")``, starts afresh at each call).
    :param chunk: steps per batched network call in exact mode (default: about 2048 rows).

    Under DDP the trainer's ``DistributedDataParallel`` broadcasts the model's buffers from
    rank 0 before each forward pass (its buffer sync, on by default), so with the model's
    ``moments`` every rank draws ``t`` from the same ``p(t)``, learned from rank 0's shard only
    (the other ranks' updates are overwritten at the next step); a checkpoint (rank 0's state)
    resumes it exactly. Without that sync, or with an estimator keeping its own statistics,
    each rank's ``p(t)`` follows its own shard and they drift apart. Either way the estimate is
    unbiased on every rank, as it is for any ``p(t) > 0``.
    """

    name = "denoising_matching"

    def __init__(
        self,
        t_samples: int | None = 1,
        exact: bool = False,
        sampler: str = "uniform",
        proposal: Sequence[float] | None = None,
        history: int = 10,
        uniform_mix: float = 0.01,
        chunk: int | None = None,
        moments: LossSecondMoments | None = None,
    ) -> None:
        if t_samples is not None and (
            not isinstance(t_samples, int) or isinstance(t_samples, bool) or t_samples < 1
        ):
            raise InvalidParameterError(
                f"t_samples must be an integer >= 1 or None (every t; on the command line: "
                f"exact=true), got {t_samples!r}"
            )
        if sampler not in SAMPLERS:
            raise InvalidParameterError(
                f"unknown sampler '{sampler}'; choose from {', '.join(SAMPLERS)}"
            )
        if proposal is not None and sampler != "importance":
            raise InvalidParameterError("a proposal p(t) needs sampler='importance'")
        if not 0.0 < uniform_mix <= 1.0:
            raise InvalidParameterError(f"uniform_mix must lie in (0, 1], got {uniform_mix}")
        if not isinstance(history, int) or history < 1:
            raise InvalidParameterError(f"history must be an integer >= 1, got {history!r}")
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise InvalidParameterError(f"chunk must be an integer >= 1, got {chunk!r}")
        if moments is not None and not isinstance(moments, LossSecondMoments):
            raise InvalidParameterError(
                f"moments must be a LossSecondMoments (or None), got {type(moments).__name__}"
            )
        if moments is not None and (sampler != "importance" or proposal is not None):
            raise InvalidParameterError(
                "moments are the loss-aware sampler's statistics: they need "
                "sampler='importance' and no proposal"
            )
        self.t_samples = None if exact else t_samples
        self.sampler = sampler
        self.proposal = None if proposal is None else torch.as_tensor(proposal, dtype=torch.float64)
        if self.proposal is not None and (
            self.proposal.dim() != 1 or not bool((self.proposal > 0).all())
        ):
            raise InvalidParameterError(
                "proposal must be a 1-D sequence of positive numbers, one per t = 2..T"
            )
        self.history, self.uniform_mix, self.chunk = history, uniform_mix, chunk
        #: the loss-aware sampler's statistics: a model's (shared) or this estimator's own
        self.moments = moments
        self._owns_moments = moments is None

    def __call__(self, model: VDM, x: Tensor) -> ELBOTerms:
        encoder = getattr(model, "encoder", None)
        decoder = getattr(model, "decoder", None)
        if not callable(getattr(encoder, "q_posterior", None)) or not hasattr(decoder, "step_from"):
            raise IncompatibleEstimatorError(
                f"estimator '{self.name}' needs a diffusion model with a closed-form q(x_t|x_0) and "
                f"q(x_(t-1)|x_t, x_0) (the VDM); {type(model).__name__} has none: use 'consistency' or 'elbo'"
            )
        num_steps = encoder.timesteps
        if num_steps == 1:
            kl_sum = sq_sum = x.new_zeros(x.shape[0])
        elif self.t_samples is None:
            kl_sum, sq_sum = self._every_step(model, x, num_steps)
        else:
            kl_sum, sq_sum = self._sampled_steps(model, x, num_steps, self.t_samples)
        log_px, sq_first = first_step(model, x)
        terms = {
            "reconstruction": log_px,
            "prior_matching": prior_matching(model, x),
            "denoising_matching": -kl_sum,
        }
        simple = -(sq_first + sq_sum) / num_steps  # -E_{t ~ U{1..T}} ||eps - eps_hat||^2
        return ELBOTerms(terms=terms, num_dims=model.num_dims, extras={"simple": simple})

    # -- exact in t ------------------------------------------------------------------------
    def _every_step(self, model: VDM, x: Tensor, num_steps: int) -> tuple[Tensor, Tensor]:
        """``sum_{t=2}^T KL_t`` and ``sum_{t=2}^T ||eps - eps_hat||^2`` (one ``x_t`` per t),
        each ``(B,)``, batched over chunks of t."""
        b = x.shape[0]
        chunk = self.chunk or max(1, EXACT_ROWS // b)
        kl_sum, sq_sum = x.new_zeros(b), x.new_zeros(b)
        for start in range(2, num_steps + 1, chunk):
            ts = torch.arange(start, min(start + chunk, num_steps + 1), device=x.device)  # (c,)
            t_rows = ts.repeat_interleave(b)  # row j*B + b has step ts[j]
            kl, sq = denoising_kl(model, repeat(x, "b ... -> (c b) ...", c=ts.numel()), t_rows)
            kl_sum = kl_sum + reduce(kl, "(c b) -> b", "sum", b=b)
            sq_sum = sq_sum + reduce(sq, "(c b) -> b", "sum", b=b)
        return kl_sum, sq_sum

    # -- t sampled -------------------------------------------------------------------------
    def probabilities(self, num_steps: int, device: torch.device) -> Tensor:
        """``p(t)`` for ``t = 2..T`` that the sampler draws from now, float64 ``(T-1,)``."""
        uniform = torch.full(
            (num_steps - 1,), 1.0 / (num_steps - 1), dtype=torch.float64, device=device
        )
        if self.sampler == "uniform":
            return uniform
        if self.proposal is not None:
            if self.proposal.numel() != num_steps - 1:
                raise InvalidParameterError(
                    f"proposal has {self.proposal.numel()} entries; this model needs T - 1 = {num_steps - 1}"
                )
            return (self.proposal / self.proposal.sum()).to(device)
        moments = self._moments(num_steps, create=False)
        if moments is None:
            return uniform
        return moments.probabilities(self.history, self.uniform_mix).to(device)

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

    def _sampled_steps(
        self, model: VDM, x: Tensor, num_steps: int, k: int
    ) -> tuple[Tensor, Tensor]:
        """``k`` draws ``t ~ p(t)`` per example: the unbiased estimates ``mean_j w(t_j) KL_{t_j}``
        of ``sum_{t=2}^T KL_t`` and ``mean_j w(t_j) ||eps - eps_hat||^2_{t_j}`` of
        ``sum_{t=2}^T ||eps - eps_hat||^2``, with ``w = 1/p(t)`` (``T - 1`` for uniform)."""
        b = x.shape[0]
        p = self.probabilities(num_steps, x.device)
        if self.sampler == "uniform":
            t = torch.randint(2, num_steps + 1, (k, b), device=x.device)
        else:
            t = torch.multinomial(p.float(), k * b, replacement=True).view(k, b) + 2
        weight = (1.0 / p[t - 2]).to(x.dtype)  # (k, B): 1 / p(t)
        kl, sq = denoising_kl(model, repeat(x, "b ... -> (k b) ...", k=k), t.reshape(-1))
        kl, sq = kl.view(k, b), sq.view(k, b)
        if self.sampler == "importance" and self.proposal is None and model.training:
            moments = self._moments(num_steps, create=True)
            moments.record(t, kl, self.history)
        return (weight * kl).mean(0), (weight * sq).mean(0)
