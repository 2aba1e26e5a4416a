"""The ``vdm`` model's factory :func:`create_vdm` (discrete or continuous time) and the
registrations: the ``vdm`` model, its schedules (discrete ``linear`` and ``cosine``, continuous
``fixed_linear`` and ``learned``) and its estimators ``denoising_matching`` (the ELBO) and
``ode`` (the probability-flow ODE log-likelihood) through the ``genkit`` entry-point group, as
any plugin would.

The ``consistency`` estimator the VDM also supports is genkit's shared Markov-chain estimator
(:class:`genkit.markov.ConsistencyELBO`), registered by genkit itself, not here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

import genkit
from genkit.config import structure
from genkit.errors import InvalidParameterError
from genkit.model import LatentVariableModel
from genkit_vdm.base import VDMConfig
from genkit_vdm.continuous import ContinuousVDM
from genkit_vdm.estimators import DenoisingMatchingELBO
from genkit_vdm.logsnr import CONTINUOUS_SCHEDULES
from genkit_vdm.model import VDM
from genkit_vdm.ode import ProbabilityFlowODE
from genkit_vdm.schedules import BUILTIN_SCHEDULES


def create_vdm(
    data_shape: tuple[int, ...], *, net: nn.Module | None = None, **params: Any
) -> LatentVariableModel:
    """``create_model("vdm", data_shape, net=None, **params)``: ``params`` are the fields of
    :class:`VDMConfig`; ``net`` is any module called as ``net(x_t, t)``. ``timesteps=0`` gives
    the continuous-time :class:`~genkit_vdm.continuous.ContinuousVDM`, else a :class:`VDM`."""
    if net is not None and not isinstance(net, nn.Module):
        raise InvalidParameterError(
            f"model 'vdm': net must be a torch.nn.Module, got {type(net).__name__}"
        )
    cfg = structure(VDMConfig, params, where="model 'vdm'")
    if cfg.continuous:
        discrete_only = {"t_proposal": "loss_aware", "reconstruction_every_step": False}
        for name, default in discrete_only.items():
            if name in params and params[name] != default:
                raise InvalidParameterError(
                    f"model 'vdm': {name} applies to discrete time only (timesteps >= 1)"
                )
        if cfg.variance != "posterior" or cfg.denoiser == "diffusers":
            raise InvalidParameterError(
                "model 'vdm': variance and denoiser='diffusers' apply to discrete time only "
                "(timesteps >= 1)"
            )
        return ContinuousVDM(data_shape, cfg, net=net)
    if cfg.decoder == "softmax":
        raise InvalidParameterError(
            "model 'vdm': decoder='softmax' applies to continuous time only (timesteps=0); the "
            "discrete decoder p(x_0|x_1) is the bin mass around x0_hat"
        )
    return VDM(data_shape, cfg, net=net)


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
