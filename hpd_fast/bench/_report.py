"""The quick suite's result: metadata, rows, the Markdown table, and the files it is saved as."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["QuickReport", "run_metadata"]

JSON_NAME = "quick.json"
MARKDOWN_NAME = "quick.md"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_commit() -> tuple[str | None, bool | None]:
    """``(short commit, dirty)`` when ``hpd_fast`` is imported from a git checkout of itself
    (an installed wheel: ``(None, None)``)."""
    import hpd_fast

    pkg = Path(hpd_fast.__file__).resolve().parent
    top = _git(pkg.parent, "rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != pkg.parent:
        return None, None
    commit = _git(pkg.parent, "rev-parse", "--short", "HEAD")
    status = _git(pkg.parent, "status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def run_metadata(device: torch.device) -> dict[str, Any]:
    """Where and with what the suite ran: hardware, threads, versions, commit, date, load."""
    import hpd_fast

    commit, dirty = source_commit()
    meta: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "hpd_fast": hpd_fast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        # Other work on a shared machine shows here: timings under load are ratios at best.
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "backends": {k: v["available"] for k, v in hpd_fast.backend_info().items()},
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    return meta


@dataclass
class QuickReport:
    """What ``hpd_fast.bench.quick`` measured.

    ``rows``: one dict per case run, with ``case``, ``title``, ``fast``, ``baseline``,
    ``shapes`` and either the timing summary (``speedup_median`` = median over rounds of
    baseline time / ``hpd_fast`` time, its quartiles and range, per-call medians, every round's
    times) or ``error`` (the case did not run: no numbers). ``meta``: device, versions, threads,
    commit, date. ``smoke``: tiny shapes (the numbers then mean nothing).
    """

    meta: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    smoke: bool = False
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": "quick",
            "smoke": self.smoke,
            "seconds": self.seconds,
            "meta": self.meta,
            "definitions": {
                "speedup_median": "median over rounds of (baseline s / hpd_fast s) per call; "
                "> 1: hpd_fast is faster. Both providers run in every round, alternating order",
                "speedup_q1 / speedup_q3 / speedup_min / speedup_max": "quartiles and range of "
                "the per-round ratios",
                "*_median_s": "median seconds per call",
            },
            "rows": self.rows,
        }

    def markdown(self) -> str:
        """The table, with the run's device, versions, threads, commit and date above it."""
        m = self.meta
        commit = m.get("commit") or "not a git checkout"
        if m.get("dirty"):
            commit += " (uncommitted changes)"
        load = m.get("loadavg_1m")
        lines = [
            "# hpd-fast bench --quick",
            "",
            f"{m['device_name']} ({m['device']}, {m['cpu_count']} cores, "
            f"{m['torch_threads']} torch threads), torch {m['torch']}, hpd_fast {m['hpd_fast']}, "
            f"commit {commit}, {m['date']}"
            + (f"; load average {load:.1f}" if load is not None else "")
            + (f"; {self.seconds:.0f} s" if self.seconds is not None else "")
            + ".",
            "",
        ]
        if self.smoke:
            lines += ["**Smoke run: tiny shapes, the ratios mean nothing.**", ""]
        headers = ["case", "hpd_fast", "baseline", "rounds", "hpd_fast ms", "baseline ms",
                   "speed-up (median)", "quartiles", "range"]  # fmt: skip
        lines += [
            "| " + " | ".join(headers) + " |",
            "|:---|:---|:---|" + "---:|" * (len(headers) - 3),
        ]
        for r in self.rows:
            head = [r["case"], f"`{r['fast']}`", r["baseline"]]
            if "error" in r:
                cells = head + ["–", "–", "–", f"not measured: {r['error']}", "–", "–"]
            else:
                cells = head + [
                    str(r["rounds"]),
                    f"{r['hpd_fast_median_s'] * 1e3:.3g}",
                    f"{r['baseline_median_s'] * 1e3:.3g}",
                    f"**{r['speedup_median']:.2f}×**",
                    f"{r['speedup_q1']:.2f}–{r['speedup_q3']:.2f}",
                    f"{r['speedup_min']:.2f}–{r['speedup_max']:.2f}",
                ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines += ["", "Workloads:", ""]
        lines += [f"- `{r['case']}`: {r['title']}; {r['shapes']}" for r in self.rows]
        lines += [
            "",
            "Speed-up: baseline time / hpd_fast time per call, the median over rounds; both run "
            "in every round (alternating order), so a slow phase of a shared machine falls on "
            "both. CPU timings are ratios; absolute times count only on a GPU.",
        ]
        return "\n".join(lines) + "\n"

    def save(self, out: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``quick.json`` and ``quick.md`` into the folder ``out`` (created if needed);
        each file is written beside its final name and renamed into place."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = (out / JSON_NAME, out / MARKDOWN_NAME)
        texts = (json.dumps(self.to_dict(), indent=2) + "\n", self.markdown())
        for path, text in zip(paths, texts):
            tmp = path.with_suffix(path.suffix + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return paths
