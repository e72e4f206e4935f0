"""torch.distributed helpers shared by the entry points that take a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["group_rank", "rank_and_size", "sum_grad"]


def group_rank(group: Any) -> int:
    """This process's rank in ``group``; ``ValueError`` when it is not a usable group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized")
    try:
        rank = dist.get_rank(group)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"group is not a process group of this run: {exc}") from exc
    if rank < 0:
        raise ValueError("group: this process is not a member of the group")
    return rank


def rank_and_size(group: Any) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` without one (``ValueError`` as above)."""
    if group is None:
        return 0, 1
    return group_rank(group), dist.get_world_size(group)


class _SumGrad(torch.autograd.Function):
    """Identity whose backward sums the incoming gradient over a process group."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad(x: Tensor, group: Any) -> Tensor:
    """``x`` itself, whose gradient is summed over ``group`` on the way back (each rank's loss
    covers its share; every rank then holds the gradient of the total)."""
    return _SumGrad.apply(x, group)
