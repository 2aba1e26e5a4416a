"""Multi-process data parallelism with ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node=N -m genkit train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` joins the group
through that environment-variable rendezvous (so multi-machine ``torchrun`` works too), with
``nccl`` on CUDA and ``gloo`` on CPU. The model's ELBO goes through
:class:`ELBOModule`, a module whose ``forward(x)`` calls ``model.elbo(x)``, so that
``DistributedDataParallel``'s gradient all-reduce hooks fire.
"""

from __future__ import annotations

import datetime
import os

import attrs
import torch
import torch.distributed as dist
from torch import Tensor, nn

from genkit.errors import ConfigError


@attrs.frozen
class DistInfo:
    """This process's place in the group (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistInfo:
    """The group this process already belongs to (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo()


def resolve_device(kind: str, info: DistInfo) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; under DDP each process takes the GPU of its
    ``LOCAL_RANK``."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device 'cuda' was asked for but torch sees no CUDA device; use 'cpu'"
            )
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (``WORLD_SIZE > 1``), or do
    nothing. The backend is ``nccl`` when the run uses CUDA, ``gloo`` otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method="env://",
        timeout=datetime.timedelta(seconds=timeout_seconds()),
    )
    return current()


#: The environment variable that bounds every collective, in seconds (default 1800): a rank
#: whose peer has died or hangs gives up after this long instead of waiting for ever.
TIMEOUT_ENV = "GENKIT_DIST_TIMEOUT"


def timeout_seconds() -> float:
    """The collectives' timeout (``GENKIT_DIST_TIMEOUT``, seconds > 0; default 1800)."""
    text = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return value


def shutdown() -> None:
    """Leave the group: wait for every rank (a rank that tears down gloo while a peer is still
    in a collective aborts it), then destroy the group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ELBOModule(nn.Module):
    """``forward(x) -> (terms, extras)``: the per-sample ELBO terms of ``model.elbo(x)`` (or
    ``model.elbo(x, estimator)`` with a training estimator) as plain dicts of ``(B,)``
    tensors, so DDP (and ``torch.compile``) see a module call."""

    def __init__(self, model: nn.Module, estimator: object | None = None) -> None:
        super().__init__()
        self.model = model
        self.estimator = estimator

    def forward(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        out = self.model.elbo(x) if self.estimator is None else self.model.elbo(x, self.estimator)
        return dict(out.terms), dict(out.extras)


def all_reduce_max(flag: Tensor) -> Tensor:
    """Element-wise maximum over the group (identity for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def all_reduce_mean(values: Tensor) -> Tensor:
    """In place, the mean of ``values`` over the group (identity for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
