"""How a VDM's estimators draw their times: uniform numbers (plain or stratified) and the
inverse CDF that turns them into discrete steps ``t ~ p(t)``. Shared by the discrete and the
continuous estimator; depends on nothing else of the plugin."""

from __future__ import annotations

import torch
from torch import Tensor


def draw_uniforms(
    k: int, b: int, sampler: str, *, shared: bool, device: torch.device | None = None
) -> Tensor:
    """``(k, b)`` numbers in [0, 1), the ``k`` draws of each of ``b`` examples.

    ``uniform``: independent. ``stratified`` (Kingma et al.'s low-discrepancy sampler):
    ``u_{j,e} = frac(U + (j b + e) / (k b))``, an evenly spaced grid with a random shift, so each
    example's ``k`` draws lie ``1/k`` apart; with ``shared`` one ``U`` for the whole call (the
    draws of different examples are spread too: training), otherwise one ``U`` per example (the
    examples are independent, as an honest Monte-Carlo error needs: evaluation). Every
    ``u_{j,e}`` is uniform on [0, 1), so any estimator averaging ``f(u)`` stays unbiased.
    """
    if sampler == "uniform":
        return torch.rand(k, b, device=device)
    n = k * b
    grid = torch.arange(n, device=device, dtype=torch.float64).view(k, b) / n
    shift = torch.rand((1, 1) if shared else (1, b), device=device, dtype=torch.float64)
    # below 1 in float32 too (a float64 value within 2^-25 of 1 would round up to 1.0)
    return torch.frac(grid + shift).float().clamp(max=1.0 - 2.0**-24)


def inverse_cdf(p: Tensor, u: Tensor, first: int) -> Tensor:
    """Steps ``first + i`` with ``i ~ p`` (``p: (K,)`` float64, summing to 1) from uniforms
    ``u`` in [0, 1): ``i`` is the first index whose cumulative probability exceeds ``u``."""
    cdf = torch.cumsum(p, 0)
    i = torch.searchsorted(cdf, u.double().reshape(-1) * cdf[-1], right=True)
    return i.clamp(max=p.numel() - 1).view(u.shape) + first
