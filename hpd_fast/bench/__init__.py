"""The quick benchmark suite: ``hpd_fast`` against today's baselines, in about two minutes.

Four workloads from real distillation runs, each timed side by side with its baseline in one
run (providers alternate round by round; the reported speed-up is the median over rounds of
the per-round ratio baseline / ``hpd_fast``):

* ``feature_distance``  :func:`hpd_fast.class_mean_distance` vs PyTorch's vectorized per-class
  means (``index_add_`` per layer), forward + backward, ConvNet-3 features of 100 images;
* ``student_block``     :func:`hpd_fast.instance_norm_relu_pool` vs ``GroupNorm(C, C)`` + ReLU +
  ``avg_pool2d``, forward + backward, the first ConvNet-3 block at 32x32;
* ``trajectory``        :func:`hpd_fast.trajectory_matching_loss` ``mode="exact"`` vs
  ``mode="unrolled"``, ConvNet-3 student (width 32), IPC 10 at 32x32, 4 steps;
* ``hpd_iteration``     one H-PD MTT iteration vs the published code's structure (render
  twice, the first-order two-pass scheme on a plain PyTorch ConvNet), digits workload.

It ships inside the package (no ``benchmarks/`` folder needed), so an installed wheel runs it:
``hpd-fast bench --out DIR`` or :func:`quick` then ``report.save(DIR)``. The full
pytest-benchmark suites of a source checkout (``pytest benchmarks/``) cover many more shapes,
backends and peak memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from hpd_fast.bench._cases import CASES, Case
from hpd_fast.bench._report import QuickReport, run_metadata
from hpd_fast.bench._timing import time_paired

__all__ = ["CASES", "Case", "QuickReport", "quick"]

_LOG = logging.getLogger("hpd_fast")


def quick(
    *,
    device: str | torch.device | None = None,
    cases: Sequence[str] | None = None,
    rounds: int | None = None,
    smoke: bool = False,
    budget_s: float = 90.0,
) -> QuickReport:
    """Run the quick suite and return its report (``report.save(dir)`` writes JSON + Markdown).

    Args:
        device: where to run; ``None``: CUDA when available, else the CPU.
        cases: names from :data:`CASES` (default: all, in that order).
        rounds: timed rounds per case (default: as many as ``budget_s`` allows, 3 to 15;
            1 with ``smoke``).
        smoke: tiny shapes, to check that everything runs; the ratios then mean nothing.
        budget_s: seconds for the whole suite: each case gets an equal share of what is left
            when it starts (warm-up included) and times at least 3 rounds.

    A case that fails (e.g. a kernel missing on this device) gets a row with ``error`` and no
    numbers; the others still run.
    """
    dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r}: CUDA is not available")
    names = list(CASES) if cases is None else list(cases)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown quick case(s) {unknown}; available: {', '.join(CASES)}")
    if rounds is not None and rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if smoke and rounds is None:
        rounds = 1
    t0 = time.perf_counter()
    report = QuickReport(meta={}, smoke=smoke)
    deadline = t0 + budget_s
    for i, name in enumerate(names):
        case = CASES[name]
        share = max(0.0, deadline - time.perf_counter()) / (len(names) - i)
        row = {"case": name, "title": case.title, "fast": case.fast, "baseline": case.baseline}
        t_case = time.perf_counter()
        try:
            work = case.build(dev, smoke)
            row["shapes"] = work.shapes
            timing = time_paired(
                work.baseline,
                work.fast,
                cuda=dev.type == "cuda",
                rounds=rounds,
                budget_s=share,
                min_round_s=0.0 if smoke else 0.05,  # smoke: one call per round
            )
            row.update(timing.summary())
            _LOG.info(
                "%-17s %.2fx (%d rounds, %.0f s)",
                name,
                row["speedup_median"],
                timing.rounds,
                time.perf_counter() - t_case,
            )
        except Exception as exc:  # reported in the row, never as numbers
            row.setdefault("shapes", "")
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            _LOG.warning("%-17s not measured: %s", name, row["error"])
        finally:
            work = None  # free the case's tensors before the next one
        report.rows.append(row)
    report.meta = run_metadata(dev)
    report.seconds = time.perf_counter() - t0
    return report
