"""What the processes of a ``torchrun`` group do together, outside the training step:
shard examples so that each is handled exactly once, gather per-example values back in order,
and agree on failure, so that one rank's error stops every rank with the same one line.

Every function is the identity (or a no-op) in a single process, so callers need no branch.
The timeout that bounds every collective is set where the group is made
(:func:`genkit.training.distributed.init_from_env`, ``GENKIT_DIST_TIMEOUT``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from genkit.errors import GenkitError

T = TypeVar("T")


class RankFailedError(GenkitError):
    """Another process of the group failed; the message is its own error line."""


def active() -> bool:
    """Whether this process belongs to a group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_size() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a group."""
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return rank_and_size()[0] == 0


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously), so that a clock read
    after it times the work itself; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that ``rank`` of ``size`` takes: contiguous blocks
    whose sizes differ by at most one, in rank order, covering every row exactly once (no
    padding duplicates, unlike ``DistributedSampler``)."""
    return n * rank // size, n * (rank + 1) // size


def _device() -> torch.device:
    """Where this group's collectives need their tensors (CUDA for NCCL)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(values: Tensor) -> Tensor:
    """The ``(n_r, ...)`` tensors of every rank concatenated in rank order, on every rank, as
    float64 on the CPU (the rows of a contiguous shard come back in the dataset's order)."""
    values = values.detach().double().cpu()
    if not active():
        return values
    device = _device()
    _, size = rank_and_size()
    length = torch.tensor([values.shape[0]], device=device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length)
    longest = max(int(n.item()) for n in lengths)
    padded = torch.zeros((longest, *values.shape[1:]), dtype=values.dtype, device=device)
    padded[: values.shape[0]] = values.to(device)
    parts = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n.item())].cpu() for p, n in zip(parts, lengths, strict=True)])


def all_sum(values: Tensor) -> Tensor:
    """The element-wise sum of ``values`` over the group, as float64 on the CPU."""
    values = values.detach().double().cpu()
    if not active():
        return values
    out = values.to(_device())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * rank_and_size()[1]
    dist.all_gather_object(out, value)
    return out


def broadcast(value: T | None) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not active():
        return value  # type: ignore[return-value]
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed(fn: Callable[[], T]) -> T:
    """Call ``fn`` on every rank, then agree: when it raised on any rank, every rank raises the
    error of the lowest such rank (that rank its own exception; the others a
    :class:`RankFailedError` with the same message), so no rank goes on to wait for a peer
    that has stopped."""
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:
        if not active():
            raise
        error = exc
    if not active():
        return result
    lines = gather_objects(None if error is None else _line(error))
    failed = [(r, m) for r, m in enumerate(lines) if m is not None]
    if not failed:
        return result
    rank, message = failed[0]
    if error is not None and rank == rank_and_size()[0]:
        raise error
    raise RankFailedError(message)


def _line(exc: BaseException) -> str:
    """An error as the CLI would print it: a genkit error's message, else ``Type: message``."""
    if isinstance(exc, GenkitError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
