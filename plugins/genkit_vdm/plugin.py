"""Registers the ``vdm`` model, its schedules (discrete ``linear`` and ``cosine``, continuous
``fixed_linear`` and ``learned``) and its estimators ``denoising_matching`` (the ELBO) and
``ode`` (the probability-flow ODE log-likelihood) through the ``genkit`` entry-point group, as
any plugin would.

The ``consistency`` estimator the VDM also supports is genkit's shared Markov-chain estimator
(:class:`genkit.markov.ConsistencyELBO`), registered by genkit itself, not here.
"""

from __future__ import annotations

import genkit
from genkit_vdm.estimators import DenoisingMatchingELBO
from genkit_vdm.logsnr import CONTINUOUS_SCHEDULES
from genkit_vdm.model import create_vdm
from genkit_vdm.ode import ProbabilityFlowODE
from genkit_vdm.schedules import BUILTIN_SCHEDULES


@genkit.hookimpl
def register_models(register) -> None:
    register(
        "vdm",
        create_vdm,
        description="variational diffusion model, discrete (timesteps=T) or continuous time "
        "(timesteps=0): fixed Gaussian encoder, learned denoiser",
    )


@genkit.hookimpl
def register_schedules(register) -> None:
    for name, (factory, description) in {**BUILTIN_SCHEDULES, **CONTINUOUS_SCHEDULES}.items():
        register(name, factory, description=description)


@genkit.hookimpl
def register_estimators(register) -> None:
    register(
        "denoising_matching",
        DenoisingMatchingELBO,
        description="VDM ELBO: reconstruction + prior matching + analytic denoising-matching KLs",
    )
    register(
        "ode",
        ProbabilityFlowODE,
        description="VDM probability-flow ODE log-likelihood (8-bit data: dequantized bound)",
    )
