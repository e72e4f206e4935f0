"""Paired timing: providers alternate round by round, the ratio is taken within each round."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Paired", "time_paired"]


@dataclass
class Paired:
    """Per-call seconds of a baseline and of ``hpd_fast``, one entry per round."""

    baseline_s: list[float]
    fast_s: list[float]
    calls_per_round: dict[str, int]

    @property
    def rounds(self) -> int:
        return len(self.fast_s)

    @property
    def ratios(self) -> list[float]:
        """``baseline / hpd_fast`` of every round (> 1: ``hpd_fast`` is faster)."""
        return [b / f for b, f in zip(self.baseline_s, self.fast_s)]

    def summary(self) -> dict[str, Any]:
        r = sorted(self.ratios)
        q1, _, q3 = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else r * 3
        return {
            "rounds": self.rounds,
            "calls_per_round": dict(self.calls_per_round),
            "baseline_median_s": statistics.median(self.baseline_s),
            "hpd_fast_median_s": statistics.median(self.fast_s),
            "speedup_median": statistics.median(r),
            "speedup_q1": q1,
            "speedup_q3": q3,
            "speedup_min": r[0],
            "speedup_max": r[-1],
            "baseline_s": list(self.baseline_s),
            "hpd_fast_s": list(self.fast_s),
        }


def _clock(fn: Callable[[], Any], calls: int, cuda: bool) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls (the GPU finished inside the timing)."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def time_paired(
    baseline: Callable[[], Any],
    fast: Callable[[], Any],
    *,
    cuda: bool,
    rounds: int | None = None,
    min_rounds: int = 3,
    max_rounds: int = 15,
    budget_s: float = 20.0,
    min_round_s: float = 0.05,
) -> Paired:
    """Time ``baseline`` and ``fast`` side by side.

    One warm-up call of each (it also measures how many calls make a round last at least
    ``min_round_s``, so that millisecond workloads are not timer noise); then rounds, each
    timing both providers, the order flipping every round so that a slow phase of a shared
    machine falls on both alike. ``rounds`` fixes the count; otherwise rounds go on while one more fits in
    ``budget_s`` (counting the warm-up), between ``min_rounds`` and ``max_rounds``.
    """
    t_start = time.perf_counter()
    fns: Sequence[tuple[str, Callable[[], Any]]] = (("baseline", baseline), ("fast", fast))
    calls: dict[str, int] = {}
    for name, fn in fns:
        warm = _clock(fn, 1, cuda)
        calls[name] = max(1, min(100, math.ceil(min_round_s / max(warm, 1e-6))))
    times: dict[str, list[float]] = {"baseline": [], "fast": []}
    r = 0
    t_rounds = time.perf_counter()
    while True:
        order = fns if r % 2 == 0 else fns[::-1]
        for name, fn in order:
            times[name].append(_clock(fn, calls[name], cuda))
        r += 1
        if rounds is not None:
            if r >= rounds:
                break
            continue
        now = time.perf_counter()
        next_end = now + (now - t_rounds) / r  # when one more round would end
        if r >= max_rounds or (r >= min_rounds and next_end - t_start > budget_s):
            break
    return Paired(times["baseline"], times["fast"], calls)
