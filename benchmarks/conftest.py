"""pytest configuration shared by the benchmark suites (``pytest benchmarks/``).

* ``--bench-device``: ``auto`` (default: the CPU, plus the GPU when one is visible), ``cpu``,
  ``cuda`` or a comma list; ``$HPD_BENCH_DEVICE`` gives the default. Suites read it with
  ``_util.bench_devices(config.getoption("bench_device"))``.
* ``--bench-threads N``: run with ``torch.set_num_threads(N)`` (default: torch's own choice;
  ``$HPD_BENCH_THREADS``). One thread measures per-core efficiency and is far less disturbed
  when other work shares the machine. Suites tag their result files with it.
* ``--bench-results DIR``: write the run's result files and README sections to DIR instead of
  ``benchmarks/results/`` and ``benchmarks/README.md`` (sets ``$HPD_BENCH_RESULTS_DIR``, which
  ``_util`` reads; ``hpd-fast bench SUITE --out DIR`` sets it directly).
* ``bench_summary``: a list on which a suite puts ``(title, lines)``; everything collected is
  printed at the end of the run (after pytest-benchmark's own tables), so target checks and
  ratios are visible without ``-s``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

RESULTS_ENV = "HPD_BENCH_RESULTS_DIR"  # the name _util.RESULTS_ENV reads

_SUMMARY = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hpd_fast benchmarks")
    group.addoption(
        "--bench-device",
        default=os.environ.get("HPD_BENCH_DEVICE", "auto"),
        help="auto (CPU, plus CUDA when visible), cpu, cuda, or a comma list "
        "(default: $HPD_BENCH_DEVICE or auto)",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=int(os.environ["HPD_BENCH_THREADS"])
        if os.environ.get("HPD_BENCH_THREADS")
        else None,
        help="torch.set_num_threads(N) for the run (default: $HPD_BENCH_THREADS or torch's default)",
    )
    group.addoption(
        "--bench-results",
        default=None,
        metavar="DIR",
        help="write result files and README sections to DIR, not benchmarks/results/ and "
        "benchmarks/README.md (default: $HPD_BENCH_RESULTS_DIR, else those)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Before the suites are collected, i.e. before they import _util, which reads it.
    out = config.getoption("bench_results", default=None)
    if out:
        os.environ[RESULTS_ENV] = str(Path(out).resolve())


@pytest.fixture(scope="module", autouse=True)
def _redirect_suite_results(request: pytest.FixtureRequest):
    """A suite that keeps its own ``RESULTS_DIR`` global (rather than ``_util.RESULTS_DIR``)
    gets the redirected folder for the module's run, so that it too writes where asked.
    Set up before, and torn down after, the suite's own result-writing fixtures."""
    out = os.environ.get(RESULTS_ENV)
    if not out or not hasattr(request.module, "RESULTS_DIR"):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(request.module, "RESULTS_DIR", Path(out).resolve())
        yield


@pytest.fixture(scope="session", autouse=True)
def _bench_threads(request: pytest.FixtureRequest):
    threads = request.config.getoption("bench_threads")
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bench_summary(request: pytest.FixtureRequest) -> list:
    """Append ``(title, [lines])``; printed in the terminal summary."""
    return request.config.stash.setdefault(_SUMMARY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    sections = config.stash.get(_SUMMARY, [])
    for title, lines in sections:
        terminalreporter.write_sep("=", title)
        for line in lines:
            terminalreporter.write_line(line)
