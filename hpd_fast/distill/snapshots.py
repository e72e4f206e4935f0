"""Where the exact sweep keeps student parameter snapshots under a memory budget.

The reverse sweep of trajectory matching needs ``theta_t`` for ``t = N-1, ..., 0``, in that
order. Storing all of them costs ``N`` parameter vectors; storing none costs ``N (N - 1) / 2``
recomputed steps. With a budget of ``S`` vectors held at once, the cheapest schedule (fewest
recomputed SGD steps, each a forward + backward without a graph) follows from two recurrences
over a segment of ``n`` steps whose first snapshot ``theta_a`` is held, with ``s`` slots
counting that one:

* ``C(n, s)``: the reverse of the segment, every snapshot inside it still to be computed::

      C(1, s) = 0,  C(n, 1) = n (n - 1) / 2,  C(n, s >= n) = n - 1,
      C(n, s) = min_m  m + C(n - m, s - 1) + C(m, s)

  (advance ``m`` steps and store ``theta_a+m``; reverse the upper part with one slot fewer;
  then the lower part with all ``s``).
* ``D(n, s)``: the same when the steps are already being taken by the forward sweep, which has
  to reach ``theta_N`` anyway, so advancing is free::

      D(1, s) = 0,  D(n, 1) = n (n - 1) / 2,  D(n, s >= n) = 0,
      D(n, s) = min_m  D(n - m, s - 1) + C(m, s).

The forward sweep stores the snapshots of the ``D`` chain (``theta_0`` and one more per level,
at most ``S``); the reverse sweep walks the chain back, reversing each segment with the ``C``
schedule and the slots the freed chain snapshots leave. ``N <= S`` stores every snapshot and
recomputes nothing; ``N <= S (S + 1) / 2`` recomputes ``N - S`` steps, each once (no schedule
that keeps ``S`` vectors can do with fewer: the forward sweep stores at most ``S``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
from torch import Tensor

from hpd_fast._checks import check_int

__all__ = ["DEFAULT_MAX_SNAPSHOTS", "SnapshotPlan", "check_max_snapshots"]

#: Default budget of the exact sweep: parameter vectors held at once (ConvNet-3: 1.2 MiB each).
DEFAULT_MAX_SNAPSHOTS = 32

#: ``advance(t, theta_t) -> theta_t+1``: one SGD step of the trajectory, no graph.
Advance = Callable[[int, Tensor], Tensor]
#: ``store(theta) -> snapshot`` (a private copy, possibly on another device) and
#: ``load(snapshot) -> theta`` on the compute device.
Store = Callable[[Tensor], Tensor]


def check_max_snapshots(value: int | None) -> int | None:
    """``max_snapshots`` as given: ``None`` or an int ``>= 1`` (``ValueError`` naming it)."""
    return None if value is None else check_int("max_snapshots", value, 1)


class SnapshotPlan:
    """The cheapest snapshot schedule of ``num_steps`` steps under ``max_snapshots`` vectors.

    Args:
        num_steps: ``N >= 1``.
        max_snapshots: the most parameter vectors stored at once (``>= 1``); ``None`` stores
            all ``N``.

    Attributes:
        chain: the steps whose snapshots the forward sweep stores (starts with 0).
        recomputed_steps: SGD steps the reverse sweep takes again (0 when ``N <= S``).
        peak: the most snapshots held at once, ``<= max_snapshots`` (the vector a step is
            being recomputed or replayed at is not counted).

    Use :meth:`get`: plans are cached (the tables cost ``O(S N^2)`` to fill).
    """

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def get(num_steps: int, max_snapshots: int | None) -> SnapshotPlan:
        """The (cached, immutable) plan for ``num_steps`` steps and ``max_snapshots``."""
        return SnapshotPlan(num_steps, max_snapshots)

    def __init__(self, num_steps: int, max_snapshots: int | None) -> None:
        n_max = check_int("num_steps", num_steps, 1)
        max_snapshots = check_max_snapshots(max_snapshots)
        slots = n_max if max_snapshots is None else min(max_snapshots, n_max)
        self.num_steps, self.slots = n_max, slots
        if slots >= n_max:  # store everything: the chain is every step
            self._split_c = self._split_d = None
            self.chain = list(range(n_max))
            self.recomputed_steps = 0
        else:
            self._tables(n_max, slots)
            self.chain = []
            a, s = 0, slots
            while True:
                self.chain.append(a)
                n = n_max - a
                if n == 1 or s == 1:
                    break
                a, s = a + self._d_split(n, s), s - 1
            self.recomputed_steps = int(self._d[slots, n_max])
        self.peak = self._simulate_peak()

    # ------------------------------------------------------------------ dynamic programme

    def _tables(self, n_max: int, s_max: int) -> None:
        """Fill ``C``, ``D`` and their argmin splits for ``n <= n_max``, ``2 <= s <= s_max``."""
        n = np.arange(n_max + 1, dtype=np.int64)
        c = np.zeros((s_max + 1, n_max + 1), dtype=np.int64)
        d = np.zeros_like(c)
        c[1] = d[1] = n * (n - 1) // 2
        split_c = np.ones_like(c)
        split_d = np.ones_like(c)
        for s in range(2, s_max + 1):
            c[s, : s + 1] = np.maximum(n[: s + 1] - 1, 0)  # s >= n: store all, advance n - 1
            for k in range(s + 1, n_max + 1):
                m = n[1:k]  # the lower segment's length
                cost_c = m + c[s - 1, k - m] + c[s, m]
                cost_d = d[s - 1, k - m] + c[s, m]
                i, j = int(np.argmin(cost_c)), int(np.argmin(cost_d))
                c[s, k], split_c[s, k] = cost_c[i], m[i]
                d[s, k], split_d[s, k] = cost_d[j], m[j]
        self._c, self._d = c, d
        self._split_c, self._split_d = split_c, split_d

    def _c_split(self, n: int, s: int) -> int:
        return int(self._split_c[s, n])

    def _d_split(self, n: int, s: int) -> int:
        return int(self._split_d[s, n])

    # ------------------------------------------------------------------ reverse sweep

    def reverse(
        self, stored: list[Tensor], advance: Advance, store: Store, load: Store
    ) -> Iterator[tuple[int, Tensor]]:
        """``(t, theta_t)`` for ``t = N-1 .. 0``; consumes ``stored`` (the chain's snapshots).

        ``stored[i]`` is the snapshot of step ``chain[i]``; each is released once its segment
        is done, so that the segments below can use its slot.
        """
        if len(stored) != len(self.chain):
            raise ValueError(f"expected {len(self.chain)} stored snapshots, got {len(stored)}")
        ends = self.chain[1:] + [self.num_steps]
        for level in range(len(self.chain) - 1, -1, -1):
            a, n = self.chain[level], ends[level] - self.chain[level]
            theta_a = stored.pop()
            yield from self._reverse(a, theta_a, n, self.slots - level, advance, store, load)
            del theta_a

    def _reverse(
        self, a: int, theta_a: Tensor, n: int, s: int, advance: Advance, store: Store, load: Store
    ) -> Iterator[tuple[int, Tensor]]:
        """Reverse steps ``a+n-1 .. a`` holding at most ``s`` snapshots (``theta_a`` included)."""
        while True:
            if n == 1:
                yield a, load(theta_a)
                return
            if s >= n:  # room for the whole segment: advance once, storing every snapshot
                segment = [theta_a]
                theta = load(theta_a)
                for t in range(a, a + n - 1):
                    theta = advance(t, theta)
                    segment.append(store(theta))
                del theta
                for t in range(a + n - 1, a - 1, -1):
                    yield t, load(segment.pop())
                return
            if s == 1:  # no slot to spare: every snapshot from theta_a again
                for j in range(n - 1, 0, -1):
                    theta = load(theta_a)
                    for t in range(a, a + j):
                        theta = advance(t, theta)
                    yield a + j, theta
                    del theta
                yield a, load(theta_a)
                return
            m = self._c_split(n, s)
            theta = load(theta_a)
            for t in range(a, a + m):
                theta = advance(t, theta)
            upper = store(theta)
            del theta
            yield from self._reverse(a + m, upper, n - m, s - 1, advance, store, load)
            del upper
            n = m  # then the lower part, same start and slots

    # ------------------------------------------------------------------ bookkeeping

    def _simulate_peak(self) -> int:
        """Snapshots held at once when :meth:`reverse` runs (counted, not derived)."""
        held = 0
        peak = 0

        def store(x: Tensor) -> Tensor:
            nonlocal held, peak
            held += 1
            peak = max(peak, held)
            return _Token(lambda: _release())

        def _release() -> None:
            nonlocal held
            held -= 1

        # Symbolic run with tokens instead of tensors: count what is alive at once.
        stored = [store(None) for _ in self.chain]  # type: ignore[arg-type]
        for _ in self.reverse(stored, lambda t, x: x, store, lambda x: None):  # type: ignore
            pass
        return peak


class _Token:
    """Stands for a stored snapshot in :meth:`SnapshotPlan._simulate_peak`."""

    __slots__ = ("_on_free",)

    def __init__(self, on_free: Callable[[], None]) -> None:
        self._on_free = on_free

    def __del__(self) -> None:
        self._on_free()
