"""torch.distributed helpers shared by the entry points that take a process group."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["group_rank", "rank_and_size"]


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
