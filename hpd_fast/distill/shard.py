"""Latents sharded over the ranks of a process group: who owns which synthetic image.

With a ``torch.distributed`` group of ``W`` ranks, rank ``r`` owns the images of the classes
``c`` with ``c % W == r``: their latents ``w`` and ``f``, the optimiser's buffers of them, their
soft-label logits and the copies kept for selection. Every rank knows every rank's rows (they
follow from the labels), so the collectives below need no size exchange:

* :meth:`Shard.gather` — rows rendered by their owners, assembled in a given global order on
  every rank (all-gather), differentiable: the backward hands each owner the gradient of its own
  rows. The callers' losses sum their image gradients over the group themselves (the trajectory
  loss does, and a loss run per rank is all-reduced before it comes back), so that gradient is
  the same on every rank and taking the own rows is the whole routing.
* :meth:`Shard.collect` — a full ``[M, ...]`` tensor in host memory from every rank's rows, on
  every rank (one broadcast per rank) or on the first only (checkpoints, results, scoring: each
  rank sends its part there). Each part travels on its own, so a device never holds more than
  one rank's share at once.

Without a group every method is the identity on the full set (rank 0 of 1 owns everything).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hpd_fast._distributed import rank_and_size

__all__ = ["Shard"]


class Shard:
    """The rows of the ``M`` synthetic images owned by this rank (see the module docstring).

    Args:
        labels: ``[M]`` class index of every image (any device).
        group: the process group, or None (one process owns every row).
    """

    def __init__(self, labels: Tensor, group: Any = None) -> None:
        self.group = group
        self.rank, self.world = rank_and_size(group)
        labels = labels.detach().cpu().long()
        self.num_images = int(labels.numel())
        owner = labels % self.world
        self.owner = owner  # [M] rank owning each image
        self.rows_of = [(owner == r).nonzero().squeeze(1) for r in range(self.world)]
        self.rows = self.rows_of[self.rank]  # sorted global indices of this rank's images
        # position of each global row inside its owner's local arrays
        self.local_pos = torch.empty(self.num_images, dtype=torch.long)
        for rows in self.rows_of:
            self.local_pos[rows] = torch.arange(rows.numel())

    @property
    def sharded(self) -> bool:
        return self.group is not None and self.world > 1

    def _src(self, r: int) -> int:
        return dist.get_global_rank(self.group, r)

    def local(self, full: Tensor) -> Tensor:
        """This rank's rows of a full ``[M, ...]`` tensor (the tensor itself without a group)."""
        if not self.sharded:
            return full
        return full.index_select(0, self.rows.to(full.device))

    def mine(self, rows: Tensor) -> Tensor:
        """The subset of the sorted global ``rows`` that this rank owns (sorted)."""
        if not self.sharded:
            return rows
        return rows[self.owner[rows] == self.rank]

    # ------------------------------------------------------------------------ collectives
    def gather(self, local_rows: Tensor, order: Tensor) -> Tensor:
        """Every rank's rows of ``order`` (sorted global indices), in that order, on every rank.

        ``local_rows`` holds this rank's images of ``order`` (:meth:`mine`), in their order.
        Differentiable: the gradient of the result must be the same on every rank (a loss whose
        image gradient is summed over the group); each owner takes its rows back.
        """
        if not self.sharded:
            return local_rows
        return _Gather.apply(local_rows, order, self)

    def _all_gather(self, local_rows: Tensor, order: Tensor) -> Tensor:
        shape = local_rows.shape[1:]
        out = local_rows.new_empty((order.numel(), *shape))
        owners = self.owner[order]
        for r in range(self.world):
            where = (owners == r).nonzero().squeeze(1)
            if where.numel() == 0:
                continue
            if r == self.rank:
                part = local_rows.contiguous()
            else:
                part = local_rows.new_empty((where.numel(), *shape))
            dist.broadcast(part, src=self._src(r), group=self.group)
            out[where.to(out.device)] = part
        return out

    def collect(self, local: Tensor, *, everywhere: bool = True) -> Tensor | None:
        """The full ``[M, ...]`` tensor in host memory (CPU, contiguous) from every rank's rows
        ``local`` (this rank's, in row order); None on the ranks other than the first when
        ``everywhere`` is False. Every rank must call it (a collective)."""
        if not self.sharded:
            return local.detach().to("cpu").contiguous()
        shape = local.shape[1:]
        mine = local.detach().contiguous()
        if not everywhere and self.rank != 0:  # only the first rank keeps it: send it there
            dist.send(mine, dst=self._src(0), group=self.group)
            return None
        full = torch.empty((self.num_images, *shape), dtype=local.dtype)
        for r, rows in enumerate(self.rows_of):
            part = mine if r == self.rank else local.new_empty((rows.numel(), *shape))
            if everywhere:
                dist.broadcast(part, src=self._src(r), group=self.group)
            elif r != self.rank:
                dist.recv(part, src=self._src(r), group=self.group)
            full[rows] = part.to("cpu")
        return full

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum over the group in place (``t`` itself without one)."""
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t


class _Gather(torch.autograd.Function):
    """:meth:`Shard.gather`: all-gather forward, own rows of the (shared) gradient backward."""

    @staticmethod
    def forward(ctx, local_rows: Tensor, order: Tensor, shard: Shard) -> Tensor:  # type: ignore[override]
        ctx.shard = shard
        mine = (shard.owner[order] == shard.rank).nonzero().squeeze(1)
        ctx.save_for_backward(mine)
        return shard._all_gather(local_rows.detach(), order)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (mine,) = ctx.saved_tensors
        return grad.index_select(0, mine.to(grad.device)), None, None
