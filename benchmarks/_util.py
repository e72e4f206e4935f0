"""Helpers shared by the benchmark suites: run metadata, result files, peak memory, tables.

Nothing here runs at import time. Suites import it as ``import _util`` (pytest puts
``benchmarks/`` on ``sys.path`` through ``benchmarks/conftest.py``; run as a script, the
script's own folder is on the path).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# ``$HPD_BENCH_RESULTS_DIR`` (set by ``hpd-fast bench SUITE --out DIR`` and by ``pytest
# --bench-results DIR``) sends the result files and the README sections of a run to that
# folder, so a user's run never rewrites the checkout's results/ and README.md; unset, a
# maintainer's ``pytest benchmarks/`` and the ``--table`` generators write them as before.
RESULTS_ENV = "HPD_BENCH_RESULTS_DIR"
_REDIRECT = os.environ.get(RESULTS_ENV)
RESULTS_DIR = Path(_REDIRECT).resolve() if _REDIRECT else BENCH_DIR / "results"
README = RESULTS_DIR / "README.md" if _REDIRECT else BENCH_DIR / "README.md"


# --------------------------------------------------------------------------------------------
# devices and run metadata
# --------------------------------------------------------------------------------------------


def bench_devices(spec: str | None = None) -> list[str]:
    """Devices a run covers: ``spec`` (or ``$HPD_BENCH_DEVICE``) is ``auto``, ``cpu``, ``cuda``
    or a comma list. ``auto`` means the CPU, plus the GPU when one is visible."""
    spec = spec or os.environ.get("HPD_BENCH_DEVICE") or "auto"
    if spec == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    out = [d.strip() for d in spec.split(",") if d.strip()]
    for d in out:
        if d not in ("cpu", "cuda"):
            raise ValueError(f"benchmark device must be cpu, cuda or auto, got {d!r}")
    return out


def device_name(device: str) -> str:
    """Human name of the hardware behind ``device`` (CPU model or GPU name)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device: str) -> str:
    return slug(device_name(device))


def git_commit(short: bool = True) -> str | None:
    """``git rev-parse --short HEAD`` of the repository, or None outside a checkout."""
    cmd = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (results then describe uncommitted code)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def run_metadata(device: str) -> dict[str, Any]:
    """Where and with what a result was measured: hardware, versions, commit, date."""
    meta: dict[str, Any] = {
        "device": device,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "hpd_fast": _version("hpd_fast"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "dirty": git_dirty(),
        "date": now_iso(),
        # Other work on a shared machine shows here: timings under load are ratios at best.
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        meta["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(torch.device(device))
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return meta


# --------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------


def synchronized(fn: Callable[..., Any], device: str) -> Callable[..., Any]:
    """``fn`` followed by a device synchronize on CUDA, so a timer sees the kernels finish."""
    if not device.startswith("cuda"):
        return fn

    def call(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return call


def stats_of(benchmark: Any) -> dict[str, float] | None:
    """Median, IQR, min, mean (seconds) and rounds of a finished pytest-benchmark fixture;
    None when timing was disabled (``--benchmark-disable``)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    st = stats.stats
    return {
        "median_s": st.median,
        "iqr_s": st.iqr,
        "min_s": st.min,
        "mean_s": st.mean,
        "rounds": st.rounds,
    }


# --------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------

_PEAK_MARK = "__HPD_PEAK_MEMORY__"

_CHILD = """\
import json as _json

from hpd_fast._common import maxrss_kib as _maxrss_kb
from hpd_fast._common import reset_peak_memory as _reset_peak_memory
from hpd_fast._common import status_kib as _status_kb

{setup}

# Reset the high-water mark, so that the setup's transients are not counted.
_reset = _reset_peak_memory()
_before = _status_kb("VmRSS")
_before = _maxrss_kb() if _before is None else _before

{stmt}

print({mark!r} + _json.dumps(dict(
    before_kb=_before, hwm_kb=_status_kb("VmHWM"), maxrss_kb=_maxrss_kb(), reset=_reset)))
"""


def peak_memory_subprocess(
    setup: str, stmt: str, *, timeout: float = 600, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Peak CPU memory of ``stmt`` in a fresh ``python -c`` interpreter.

    ``setup`` (imports, inputs) runs first; then the resident set size is read, ``stmt`` runs,
    and the peak is read. Returns MiB: ``rss_before_mib``, ``peak_rss_mib`` and
    ``peak_delta_mib`` (peak minus before: what the statement needs beyond its inputs).

    The peak is the process's ``VmHWM`` (the counter behind ``ru_maxrss``), reset after setup.
    ``ru_maxrss`` itself is also returned (``ru_maxrss_mib``) but not used where VmHWM exists:
    Linux carries the high-water mark of the address space an ``exec`` replaces into the new
    process's ``ru_maxrss``, so a child started from a large pytest process reports its
    parent's peak. ``OMP_NUM_THREADS`` defaults to this process's torch thread count.
    """
    code = _CHILD.format(
        setup=textwrap.dedent(setup).strip(), stmt=textwrap.dedent(stmt).strip(), mark=_PEAK_MARK
    )
    full_env = dict(os.environ if env is None else env)
    # The child uses the parent's intra-op thread count (torch reads it at start-up).
    if env is None or "OMP_NUM_THREADS" not in env:
        full_env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCH_DIR), str(REPO), full_env.get("PYTHONPATH")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"peak-memory subprocess exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
        )
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(_PEAK_MARK))
    raw = json.loads(line[len(_PEAK_MARK) :])
    peak_kb = raw["hwm_kb"] if raw["hwm_kb"] is not None else raw["maxrss_kb"]
    return {
        "rss_before_mib": raw["before_kb"] / 1024,
        "peak_rss_mib": peak_kb / 1024,
        "peak_delta_mib": max(0, peak_kb - raw["before_kb"]) / 1024,
        "ru_maxrss_mib": raw["maxrss_kb"] / 1024,
        "peak_source": "VmHWM" if raw["hwm_kb"] is not None else "ru_maxrss",
    }


def cuda_peak_memory(fn: Callable[[], Any], device: str = "cuda") -> dict[str, Any]:
    """Peak CUDA memory of ``fn()`` in this process, above what was allocated before (MiB)."""
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del out
    return {
        "allocated_before_mib": before / 2**20,
        "peak_allocated_mib": peak / 2**20,
        "peak_delta_mib": (peak - before) / 2**20,
        "peak_source": "torch.cuda.max_memory_allocated",
    }


# --------------------------------------------------------------------------------------------
# result files and the README
# --------------------------------------------------------------------------------------------


def write_rank_row(out_dir: str | Path, world: int, rank: int, row: dict[str, Any]) -> None:
    """A rank's result row, for :func:`spawn_ranks` to collect."""
    Path(out_dir, f"w{world}-r{rank}.json").write_text(json.dumps(row))


def spawn_ranks(worker: Callable[..., Any], world: int, tmp: Path) -> list[dict[str, Any]]:
    """Run ``worker(rank, world, init_file, out_dir)`` in ``world`` fresh processes (each
    ends with :func:`write_rank_row`); returns their rows in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, str(tmp / f"init{world}"), str(tmp)), nprocs=world)
    return [json.loads((tmp / f"w{world}-r{r}.json").read_text()) for r in range(world)]


def results_path(suite: str, device: str, tag: str = "") -> Path:
    """``results/<suite>_<device-slug>[-<tag>].json``."""
    return RESULTS_DIR / f"{suite}_{device_slug(device)}{'-' + tag if tag else ''}.json"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None
) -> str:
    """A GitHub markdown table. ``align``: one of ``l``/``r``/``c`` per column (default: l)."""
    align = align or "l" * len(headers)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
    ]
    for row in rows:
        cells = ["" if c is None else str(c).replace("|", "\\|") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme_section(key: str, body: str, *, heading: str, readme: Path = README) -> None:
    """Replace the text between ``<!-- BEGIN key -->`` and ``<!-- END key -->`` in the
    benchmarks README; when the markers are missing, append ``heading`` and a marked block.
    Every other section of the file is left as it is."""
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    readme.write_text(text)
