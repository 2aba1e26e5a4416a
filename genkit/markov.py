"""The ELBO of a Markov chain of latents, in the lecture's consistency form.

A chain ``x = z_0 -> z_1 -> ... -> z_T`` (``seeds/000``, "Markovian Hierarchical Variational
Autoencoder")::

    p(x, z_{1:T}) = p(z_T) p(x|z_1) prod_{t=2}^T p(z_{t-1}|z_t)       (generative, top-down)
    q(z_{1:T}|x)  = q(z_1|x) prod_{t=2}^T q(z_t|z_{t-1})              (inference, bottom-up)

and its ELBO broken down as in "Breaking down ELBO"::

    ELBO = E_q[log p(x|z_1)]                                             reconstruction
         + E_q[log p(z_T) - log q(z_T|z_{T-1})]                          prior_matching
         + sum_{t=1}^{T-1} E_q[log p(z_t|z_{t+1}) - log q(z_t|z_{t-1})]  consistency

The ``consistency`` terms are Monte-Carlo differences of log-densities, not KL divergences: the
lecture's form, which needs nothing of the transitions but ``rsample`` and ``log_prob``, so one
estimator serves the learned MHVAE and the VDM's fixed encoder alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from einops import rearrange, repeat
from torch import Tensor
from torch.distributions import Distribution, kl_divergence

from genkit.elbo import ELBO, ELBOTerms
from genkit.errors import IncompatibleEstimatorError, InvalidParameterError

if TYPE_CHECKING:
    from genkit.model import LatentVariableModel

#: With ``per_level=None``, per-level extras are returned only for chains this short or shorter
#: (``T - 1 <= MAX_LEVEL_EXTRAS``), so a 1000-step diffusion does not log 999 scalars a step.
MAX_LEVEL_EXTRAS = 64


@runtime_checkable
class MarkovChain(Protocol):
    """A chain ``x = z_0 -> z_1 -> ... -> z_T`` of latents with transitions in both directions.

    ``p(x, z_{1:T}) = p(z_T) p(x|z_1) prod_{t=2}^T p(z_{t-1}|z_t)`` and
    ``q(z_{1:T}|x) = q(z_1|x) prod_{t=2}^T q(z_t|z_{t-1})``.

    ``t`` is always a LongTensor of shape ``(B,)``, one level per example (it may differ between
    examples where the chain allows it). Every returned distribution has batch shape ``(B,)``
    (``log_prob`` returns ``(B,)``). A chain may also define ``q_marginal(x, t)``, the jump
    ``q(z_t | x)`` straight from the data (a fixed Gaussian encoder has it in closed form); the
    estimator then samples a few levels without walking the chain. A chain whose encoder has
    no network (the VDM's fixed forward process) sets ``fixed_encoder = True``, so that the
    network evaluations an estimate reports (``ELBOTerms.nfe``) count the ``p`` steps only.
    """

    #: ``T >= 1``, the number of latents.
    num_latents: int

    def q_transition(self, z_prev: Tensor, t: Tensor) -> Distribution:
        """``q(z_t | z_{t-1})`` for ``t = 1..T`` (``z_0 = x``), reparameterised (``rsample``)."""
        ...

    def p_transition(self, z_t: Tensor, t: Tensor) -> Distribution:
        """``p(z_{t-1} | z_t)`` for ``t = 1..T``; ``t = 1`` is the decoder ``p(x | z_1)``."""
        ...

    def prior_latent(self) -> Distribution:
        """``p(z_T)``, batch shape ``()``, e.g. ``N(0, I)``."""
        ...


def find_chain(model: object, estimator: str = "consistency") -> MarkovChain:
    """``model.chain`` if it is a :class:`MarkovChain`, else ``model`` itself if it is one."""
    chain = getattr(model, "chain", None)
    for candidate in (chain, model):
        if candidate is not None and isinstance(candidate, MarkovChain):
            return candidate
    raise IncompatibleEstimatorError(
        f"estimator '{estimator}' needs a Markov chain of latents: {type(model).__name__} "
        "(and its .chain) lacks num_latents, q_transition, p_transition or prior_latent"
    )


def _levels(t: int, like: Tensor) -> Tensor:
    """The level ``t`` for every example of ``like``: a LongTensor ``(B,)``."""
    return torch.full((like.shape[0],), t, dtype=torch.long, device=like.device)


def _rsample(q: Distribution, what: str) -> Tensor:
    """``q.rsample()``, or an :class:`IncompatibleEstimatorError` naming ``what`` when ``q`` is
    not reparameterised (the estimator differentiates through the draws)."""
    if not q.has_rsample:
        raise IncompatibleEstimatorError(
            f"estimator 'consistency' needs reparameterised encoder transitions (rsample); "
            f"{what} returned {type(q).__name__}, which has no rsample"
        )
    return q.rsample()


def _walk(chain: MarkovChain, x: Tensor, num_latents: int):
    """One draw of the whole chain, ``z_t ~ q(z_t|z_{t-1})`` for t = 1..T with ``rsample``.

    Returns ``z`` (``z[0] = x``, ``z[t]: (B, ...)``), ``log_q`` (``log_q[t] =
    log q(z_t|z_{t-1})``, ``(B,)``; ``log_q[0] = None``) and the last transition
    ``q(z_T|z_{T-1})``.
    """
    z: list[Tensor] = [x]
    log_q: list[Tensor | None] = [None]
    q_t = None
    for t in range(1, num_latents + 1):
        q_t = chain.q_transition(z[-1], _levels(t, x))
        z.append(_rsample(q_t, f"q_transition(z_{t - 1}, t={t})"))
        log_q.append(q_t.log_prob(z[-1]))
    return z, log_q, q_t


def _prior_matching(
    chain: MarkovChain, q_last: Distribution, z_last: Tensor, analytic: bool
) -> Tensor:
    """``log p(z_T) - log q(z_T|z_{T-1})`` at the sampled ``z_T`` or, with ``analytic``, its
    expectation over ``z_T`` given ``z_{T-1}``, ``-KL(q(z_T|z_{T-1}) || p(z_T))``. ``(B,)``."""
    prior = chain.prior_latent()
    if analytic:
        try:
            return -kl_divergence(q_last, prior)
        except NotImplementedError:
            raise IncompatibleEstimatorError(
                f"analytic_prior=True: torch has no KL between {type(q_last).__name__} and "
                f"{type(prior).__name__}; use analytic_prior=False"
            ) from None
    return prior.log_prob(z_last) - q_last.log_prob(z_last)


class ConsistencyELBO(ELBO):
    """The lecture's MHVAE ELBO for any :class:`MarkovChain` (see the module docstring).

    Terms: ``reconstruction`` = E_q[log p(x|z_1)], ``prior_matching`` =
    E_q[log p(z_T) - log q(z_T|z_{T-1})] and ``consistency`` =
    sum_{t=1}^{T-1} E_q[log p(z_t|z_{t+1}) - log q(z_t|z_{t-1})] (a zero tensor when T = 1).
    Extras ``consistency/level_t`` for t = 1..T-1: the level's summand (estimated without bias
    when levels are sampled), so that ``consistency`` is their sum; ``prior_matching`` is level T's.

    :param levels: ``None`` samples the whole chain once per example with ``rsample`` and sums
        every level (exact in t). ``k`` draws k levels per example from 1..T-1 (with
        replacement) and weights each drawn summand by ``1 / (k p(t))``, an unbiased estimate
        (``(T-1)/k`` for uniform levels); with the chain's ``q_marginal`` the draws of
        ``z_{t-1}, z_t, z_{t+1}`` cost a constant number of batched calls however long the
        chain is, without it the chain is walked once.
    :param proposal: ``p(t)`` for the sampled levels t = 1..T-1 (``T - 1`` positive numbers,
        normalised here); ``None`` is uniform. Importance sampling: put mass where the
        summands vary most (for a diffusion, the small t).
    :param analytic_prior: replace the sampled ``log p(z_T) - log q(z_T|z_{T-1})`` by its
        expectation given ``z_{T-1}``, ``-KL(q(z_T|z_{T-1}) || p(z_T))`` (same expectation, less
        variance; with T = 1 it is the VAE's analytic prior matching).
    :param per_level: return the ``consistency/level_t`` extras; ``None`` does so when
        ``T - 1 <= MAX_LEVEL_EXTRAS``.
    """

    name = "consistency"

    def __init__(
        self,
        levels: int | None = None,
        analytic_prior: bool = False,
        per_level: bool | None = None,
        proposal: Sequence[float] | None = None,
    ) -> None:
        if levels is not None and (
            not isinstance(levels, int) or isinstance(levels, bool) or levels < 1
        ):
            raise InvalidParameterError(
                f"levels must be None (every level) or an integer >= 1, got {levels!r}"
            )
        if proposal is not None:
            proposal = torch.as_tensor(proposal, dtype=torch.float64)
            if proposal.dim() != 1 or not bool((proposal > 0).all() & proposal.isfinite().all()):
                raise InvalidParameterError(
                    "proposal must be a 1-D sequence of positive numbers, one per level 1..T-1"
                )
            if levels is None:
                raise InvalidParameterError(
                    "a proposal p(t) needs sampled levels (levels=k); levels=None sums every level"
                )
        self.levels = levels
        self.proposal = proposal
        self.analytic_prior = bool(analytic_prior)
        self.per_level = per_level

    def __call__(self, model: LatentVariableModel, x: Tensor) -> ELBOTerms:
        chain = find_chain(model, self.name)
        num_latents = int(chain.num_latents)
        if num_latents < 1:
            raise IncompatibleEstimatorError(
                f"a Markov chain needs num_latents >= 1, got {num_latents}"
            )
        q_cost = 0 if getattr(chain, "fixed_encoder", False) else 1  # networks per q step
        k = self.levels
        if k is None or num_latents == 1:
            terms, per_level = self._every_level(chain, x, num_latents)
            nfe = num_latents * (1 + q_cost)
        elif callable(getattr(chain, "q_marginal", None)):
            terms, per_level = self._sampled_levels_marginal(chain, x, num_latents, k)
            nfe = (1 + k) + q_cost * (2 + 2 * k)
        else:
            terms, per_level = self._sampled_levels_walk(chain, x, num_latents, k)
            nfe = (1 + k) + q_cost * num_latents
        show = self.per_level if self.per_level is not None else num_latents - 1 <= MAX_LEVEL_EXTRAS
        extras = {}
        if show and per_level is not None:
            extras = {f"consistency/level_{t + 1}": per_level[:, t] for t in range(num_latents - 1)}
        num_dims = getattr(model, "num_dims", None) or x[0].numel()
        return ELBOTerms(terms=terms, num_dims=num_dims, extras=extras, nfe=float(nfe))

    # -- every level: one sample of the whole chain ----------------------------------------
    def _every_level(self, chain: MarkovChain, x: Tensor, num_latents: int):
        """``z_t ~ q(z_t|z_{t-1})`` for t = 1..T in turn; every level's summand at that draw."""
        z, log_q, q_last = _walk(chain, x, num_latents)
        reconstruction = chain.p_transition(z[1], _levels(1, x)).log_prob(x)
        prior_matching = _prior_matching(chain, q_last, z[num_latents], self.analytic_prior)
        levels = [
            chain.p_transition(z[t + 1], _levels(t + 1, x)).log_prob(z[t]) - log_q[t]
            for t in range(1, num_latents)
        ]  # log p(z_t|z_{t+1}) - log q(z_t|z_{t-1}), each (B,)
        per_level = torch.stack(levels, dim=1) if levels else None  # (B, T-1)
        consistency = per_level.sum(1) if levels else torch.zeros_like(reconstruction)
        terms = {
            "reconstruction": reconstruction,
            "prior_matching": prior_matching,
            "consistency": consistency,
        }
        return terms, per_level

    # -- k sampled levels per example ------------------------------------------------------
    def probabilities(self, num_latents: int, device: torch.device | None = None) -> Tensor:
        """``p(t)`` for the levels ``t = 1..T-1`` that are drawn, float64 ``(T-1,)``."""
        if self.proposal is None:
            return torch.full((num_latents - 1,), 1.0 / (num_latents - 1), dtype=torch.float64)
        if self.proposal.numel() != num_latents - 1:
            raise InvalidParameterError(
                f"proposal has {self.proposal.numel()} entries; this chain needs one per level "
                f"1..T-1, T - 1 = {num_latents - 1}"
            )
        return (self.proposal / self.proposal.sum()).to(device)

    def _draw_levels(self, x: Tensor, num_latents: int, k: int) -> tuple[Tensor, Tensor]:
        """``t ~ p(t)`` on 1..T-1, a ``(k, B)`` LongTensor, and the weights ``1 / (k p(t))``
        (in ``x``'s dtype) that make the weighted sum of the drawn summands unbiased."""
        if self.proposal is None:
            t = torch.randint(1, num_latents, (k, x.shape[0]), device=x.device)
            return t, torch.full(t.shape, (num_latents - 1) / k, dtype=x.dtype, device=x.device)
        p = self.probabilities(num_latents, x.device)
        t = torch.multinomial(p.float(), k * x.shape[0], replacement=True).view(k, -1) + 1
        return t, (1.0 / (k * p[t - 1])).to(x.dtype)

    @staticmethod
    def _per_level(t: Tensor, weighted: Tensor, num_latents: int) -> Tensor:
        """The weighted summands ``(k, B)`` drawn at levels ``t: (k, B)`` gathered into the
        unbiased per-level estimates ``(B, T-1)``, which sum to the ``consistency`` estimate."""
        per_level = weighted.new_zeros(weighted.shape[1], num_latents - 1)
        return per_level.scatter_add(1, (t - 1).T, weighted.T)

    def _sampled_levels_marginal(self, chain: MarkovChain, x: Tensor, num_latents: int, k: int):
        """``z_{t-1} ~ q(z_{t-1}|x)`` by the chain's ``q_marginal``, then two transitions."""

        def marginal(x_rows: Tensor, t: Tensor) -> Tensor:  # z_t ~ q(z_t|x), z_0 = x
            z = _rsample(chain.q_marginal(x_rows, t.clamp(min=1)), "q_marginal")
            keep = (t == 0).view(-1, *[1] * (x_rows.dim() - 1))
            return torch.where(keep, x_rows, z)

        b = x.shape[0]
        z_1 = _rsample(chain.q_transition(x, _levels(1, x)), "q_transition(x, t=1)")
        reconstruction = chain.p_transition(z_1, _levels(1, x)).log_prob(x)

        t_last = _levels(num_latents, x)
        q_last = chain.q_transition(marginal(x, t_last - 1), t_last)
        z_last = _rsample(q_last, f"q_transition(z_{num_latents - 1}, t={num_latents})")
        prior_matching = _prior_matching(chain, q_last, z_last, self.analytic_prior)

        t, weight = self._draw_levels(x, num_latents, k)  # (k, B) each
        t_rows = t.reshape(-1)  # row j*B + b is draw j of example b
        x_rows = repeat(x, "b ... -> (k b) ...", k=k)  # row j*B + b: copy j of b
        q_t = chain.q_transition(marginal(x_rows, t_rows - 1), t_rows)
        z_t = _rsample(q_t, "q_transition")
        z_next = _rsample(chain.q_transition(z_t, t_rows + 1), "q_transition")
        summand = chain.p_transition(z_next, t_rows + 1).log_prob(z_t) - q_t.log_prob(z_t)
        per_level = self._per_level(t, weight * summand.view(k, b), num_latents)
        consistency = per_level.sum(1)
        terms = {
            "reconstruction": reconstruction,
            "prior_matching": prior_matching,
            "consistency": consistency,
        }
        return terms, per_level

    def _sampled_levels_walk(self, chain: MarkovChain, x: Tensor, num_latents: int, k: int):
        """No ``q_marginal``: walk the chain once, then evaluate only the levels drawn."""
        z, log_q, q_last = _walk(chain, x, num_latents)
        reconstruction = chain.p_transition(z[1], _levels(1, x)).log_prob(x)
        prior_matching = _prior_matching(chain, q_last, z[num_latents], self.analytic_prior)

        t, weight = self._draw_levels(x, num_latents, k)  # (k, B) each
        # per example and level, the summed weights of the draws that hit it (0 if none did)
        hits = self._per_level(t, weight.to(reconstruction.dtype), num_latents)  # (B, T-1)
        drawn = set(torch.unique(t).tolist())
        columns = [
            hits[:, level - 1]
            * (
                chain.p_transition(z[level + 1], _levels(level + 1, x)).log_prob(z[level])
                - log_q[level]
            )
            if level in drawn
            else hits[:, level - 1]  # zeros: no example drew this level
            for level in range(1, num_latents)
        ]
        per_level = torch.stack(columns, dim=1)  # (B, T-1)
        terms = {
            "reconstruction": reconstruction,
            "prior_matching": prior_matching,
            "consistency": per_level.sum(1),
        }
        return terms, per_level


@torch.no_grad()
def active_units(
    model: object, batches: Iterable[Tensor], threshold: float = 0.01, samples: int = 8
) -> dict[int, int]:
    """The number of active latent units at each level t = 1..T (Burda et al. 2016).

    Unit u of z_t is active when ``A_u = Cov_x(E_{q(z_t|x)}[z_{t,u}]) > threshold``. For t = 1
    the inner mean is the encoder's; for t > 1 it is ``E_{z_{t-1}}[mean of q(z_t|z_{t-1})]``,
    estimated by ``m(x)``, the average over ``samples`` draws of the chain below. The
    covariance over x is the population variance across every example of ``batches`` (tensors
    ``(B, *data_shape)``), less the Monte-Carlo variance of ``m(x)`` (the draws' sample variance
    over ``samples``, zero at t = 1), which would otherwise count a unit whose mean varies with
    the draws but not with x as active. Returns ``{t: count}``.
    """
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 2:
        raise InvalidParameterError(f"active_units needs samples >= 2, got {samples!r}")
    chain = find_chain(model, "active_units")
    num_latents = int(chain.num_latents)
    device = getattr(model, "device", None)
    # per level, summed over x: E[z_t|x], its square, and the Monte-Carlo variance of the first
    sums: list[list[Tensor | float]] = [[0.0, 0.0, 0.0] for _ in range(num_latents)]
    count = 0
    for x in batches:
        x = x.to(device) if device is not None else x
        z = repeat(x, "b ... -> (s b) ...", s=samples)  # (S*B, ...), row s*B + b
        for t in range(1, num_latents + 1):
            q_t = chain.q_transition(z, _levels(t, z))
            draws = rearrange(q_t.mean.double(), "(s b) ... -> s b (...)", s=samples)
            mean = draws.mean(0)  # (B, units)
            for i, value in enumerate((mean, mean.square(), draws.var(0) / samples)):
                sums[t - 1][i] = sums[t - 1][i] + value.sum(0)
            z = q_t.sample()
        count += x.shape[0]
    if count == 0:
        raise InvalidParameterError("active_units needs at least one batch of data, got none")
    out = {}
    for t, (total, square, noise) in enumerate(sums, start=1):
        variance = (square - noise) / count - (total / count).square()  # (units,)
        out[t] = int((variance > threshold).sum().item())
    return out
