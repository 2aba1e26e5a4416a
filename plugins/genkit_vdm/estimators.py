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
from einops import reduce
from torch import Tensor
from torch.distributions import kl_divergence

from genkit.elbo import ELBO, ELBOTerms
from genkit.errors import IncompatibleEstimatorError, InvalidParameterError

if TYPE_CHECKING:
    from genkit_vdm.model import VDM

SAMPLERS = ("uniform", "importance")
#: Rows (examples x steps) per network call in exact mode when ``chunk`` is not given.
EXACT_ROWS = 2048


def _repeat(x: Tensor, k: int) -> Tensor:
    """``x: (B, ...)`` -> ``(k*B, ...)``; row ``j*B + b`` is copy ``j`` of example ``b``."""
    return x.repeat(k, *[1] * (x.dim() - 1))


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
        KLs this estimator has seen, mixed with ``uniform_mix`` of the uniform distribution;
        uniform until every ``t`` has been seen ``history`` times.
    :param chunk: steps per batched network call in exact mode (default: about 2048 rows).
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
    ) -> None:
        if t_samples is not None and (
            not isinstance(t_samples, int) or isinstance(t_samples, bool) or t_samples < 1
        ):
            raise InvalidParameterError(
                f"t_samples must be None (every t) or an integer >= 1, got {t_samples!r}"
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
        self._sq: Tensor | None = None  # (T-1,) running E[L_t^2] of the loss-aware sampler
        self._seen: Tensor | None = None  # (T-1,) how often each t was seen

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
            kl, sq = denoising_kl(model, _repeat(x, ts.numel()), t_rows)
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
        if (
            self._sq is None
            or self._sq.numel() != num_steps - 1
            or bool((self._seen < self.history).any())
        ):
            return uniform
        p = self._sq.to(device).sqrt()
        p = p / p.sum()
        return (1.0 - self.uniform_mix) * p + self.uniform_mix * uniform

    def _record(self, t: Tensor, kl: Tensor, num_steps: int) -> None:
        """Update the loss-aware sampler's running ``E[L_t^2]`` with this batch's KLs."""
        if self._sq is None or self._sq.numel() != num_steps - 1:
            self._sq = torch.zeros(num_steps - 1, dtype=torch.float64)
            self._seen = torch.zeros(num_steps - 1, dtype=torch.long)
        idx = (t - 2).reshape(-1).cpu()
        sq = kl.detach().reshape(-1).to(torch.float64).cpu().square()
        sums = torch.zeros_like(self._sq).index_add_(0, idx, sq)
        counts = torch.zeros_like(self._seen).index_add_(0, idx, torch.ones_like(idx))
        hit = counts > 0
        mean = sums[hit] / counts[hit]
        rate = 1.0 / self.history
        old = self._sq[hit]
        self._sq[hit] = torch.where(self._seen[hit] == 0, mean, (1 - rate) * old + rate * mean)
        self._seen += counts

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
        kl, sq = denoising_kl(model, _repeat(x, k), t.reshape(-1))
        kl, sq = kl.view(k, b), sq.view(k, b)
        if self.sampler == "importance" and self.proposal is None:
            self._record(t, kl, num_steps)
        return (weight * kl).mean(0), (weight * sq).mean(0)
