"""``hpd-fast bench``: the quick suite (any install), or the full suites of a source checkout.

``hpd-fast bench [--out DIR]`` runs :func:`hpd_fast.bench.quick` and writes ``quick.json`` and
``quick.md`` to DIR. ``hpd-fast bench SUITE... [--out DIR]`` runs those pytest-benchmark suites
of ``benchmarks/`` with their result files and tables redirected to DIR
(``$HPD_BENCH_RESULTS_DIR``, read by ``benchmarks/_util.py``): the checkout's
``benchmarks/results/`` and ``benchmarks/README.md`` stay as they are (those are written by
``pytest benchmarks/`` and the suites' ``--table`` generators, a maintainer's commands).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hpd_fast.cli._options import PROG, CLIError, Runtime

RESULTS_ENV = "HPD_BENCH_RESULTS_DIR"  # read by benchmarks/_util.py and benchmarks/conftest.py


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark hpd_fast against today's baselines (quick suite, or the full suites)",
        description="Without SUITE (or with --quick): the quick suite, built into the package: "
        "feature distance, fused student block, exact trajectory matching vs the unroll and "
        "one H-PD iteration vs the published structure, each timed side by side with its "
        "baseline (about 2 minutes on 2 cores). With SUITE names: those pytest-benchmark suites "
        "of a source checkout's benchmarks/ folder. Everything is written to --out; nothing "
        "is written into the package or the checkout.",
    )
    p.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help="full suites to run from a source checkout, e.g. feature_distance (see --list)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="run the quick suite (the default when no SUITE is named)",
    )
    p.add_argument("--list", action="store_true", help="list the quick cases and the suites, exit")
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="folder for the JSON results and Markdown tables; must be new or empty "
        "(default: ./hpd-fast-bench-<date>-<time>/)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="quick suite: a torch device (default: cuda when available, else cpu); "
        "suites: auto, cpu, cuda or a comma list (default: auto)",
    )
    p.add_argument(
        "--threads",
        default=None,
        metavar="N|auto",
        help="torch threads (default auto: 1 when the CPU is oversubscribed, else torch's)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        metavar="N",
        help="quick suite: timed rounds per case (default: what about 2 minutes allows, >= 3)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="quick suite: tiny shapes and one round, to check that it runs (ratios meaningless)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    p.add_argument(
        "--pytest-args",
        nargs=argparse.REMAINDER,
        default=None,
        help="suites: everything after this flag goes to pytest, e.g. --pytest-args -k cpu",
    )
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# where things are
# --------------------------------------------------------------------------------------------


def _bench_dir() -> Path:
    """``benchmarks/`` beside the imported package (present in a source checkout only)."""
    import hpd_fast

    return Path(hpd_fast.__file__).resolve().parent.parent / "benchmarks"


def _suites(bench: Path) -> dict[str, Path]:
    if not bench.is_dir():
        return {}
    return {p.stem.removeprefix("bench_"): p for p in sorted(bench.glob("bench_*.py"))}


def _doc_line(path: Path) -> str:
    text = path.read_text()
    return text.split('"""')[1].strip().splitlines()[0] if '"""' in text else ""


def _out_dir(arg: str | None) -> Path:
    """The output folder: new or empty, and outside the package and the checkout's
    ``benchmarks/`` (the maintainer's results)."""
    import hpd_fast

    if arg is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path.cwd() / f"hpd-fast-bench-{stamp}"
    else:
        out = Path(arg).expanduser()
    res = out.resolve()
    for forbidden in (Path(hpd_fast.__file__).resolve().parent, _bench_dir()):
        if res == forbidden or forbidden in res.parents:
            raise CLIError(
                f"--out {str(out)!r} is inside {str(forbidden)!r}: choose another folder"
            )
    if res.exists() and (not res.is_dir() or any(res.iterdir())):
        raise CLIError(
            f"--out {str(out)!r} exists and is not an empty folder: choose a new one "
            "(results of an earlier run are never mixed with this run's)"
        )
    res.mkdir(parents=True, exist_ok=True)
    return res


def _threads(text: str | None) -> int | None:
    if text is None or text.strip().lower() == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise CLIError(f"--threads must be 'auto' or a positive integer, got {text!r}")
    return n


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def _list(suites: dict[str, Path], bench: Path) -> int:
    from hpd_fast.bench import CASES

    print("quick suite (built in; the default: `hpd-fast bench`):")
    for name, case in CASES.items():
        print(f"  {name:<20} {case.fast} vs {case.baseline}")
    if suites:
        print(f"\nfull suites (`{PROG} bench SUITE...`, from {bench}):")
        for name, path in suites.items():
            print(f"  {name:<20} {_doc_line(path)}")
    else:
        print(
            f"\nfull suites: none here ({bench} does not exist); they run from a source "
            "checkout (git clone, then pip install -e .)"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    bench = _bench_dir()
    suites = _suites(bench)
    if args.list:
        return _list(suites, bench)
    if args.suites:
        if args.quick:
            raise CLIError("--quick runs the built-in quick suite: name no SUITE with it")
        if not suites:
            raise CLIError(
                f"no benchmark suites here ({bench} does not exist): the full suites run from a "
                f"source checkout; `{PROG} bench` (no SUITE) runs the quick suite anywhere"
            )
        unknown = [s for s in args.suites if s not in suites]
        if unknown:
            raise CLIError(
                f"unknown benchmark suite(s): {', '.join(unknown)}; available: "
                f"{', '.join(suites)} (or no SUITE for the quick suite; see --list)"
            )
        if args.rounds is not None or args.smoke:
            raise CLIError(
                "--rounds and --smoke apply to the quick suite; give the suites' own options "
                "through --pytest-args (e.g. --pytest-args --benchmark-max-time=0.1)"
            )
        return _run_suites(args, bench, suites)
    if args.pytest_args:
        raise CLIError("--pytest-args applies to named suites, not to the quick suite")
    if args.rounds is not None and args.rounds < 1:
        raise CLIError(f"--rounds must be >= 1, got {args.rounds}")
    return _run_quick(args)


def _run_quick(args: argparse.Namespace) -> int:
    from hpd_fast.bench import quick
    from hpd_fast.cli._runtime import setup_logging, setup_torch

    runtime = Runtime(quiet=args.quiet, device=args.device, threads=_threads(args.threads))
    setup_logging(runtime)
    device = setup_torch(runtime)
    out = _out_dir(args.out)
    if not args.quiet:
        print(f"{PROG} bench: quick suite on {device}, results to {out}", file=sys.stderr)
    report = quick(device=device, rounds=args.rounds, smoke=args.smoke)
    json_path, md_path = report.save(out)
    print(report.markdown(), end="")
    print(f"\nwrote {json_path} and {md_path}")
    return 1 if any("error" in r for r in report.rows) else 0


# --------------------------------------------------------------------------------------------
# the full suites
# --------------------------------------------------------------------------------------------


def _snapshot(bench: Path) -> dict[str, str]:
    """Hashes of the checkout's benchmark results and README (to prove they stay untouched)."""
    files = [bench / "README.md", *sorted((bench / "results").glob("*"))]
    return {
        str(f.relative_to(bench)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in files
        if f.is_file()
    }


def _benchmark_table(path: Path) -> list[str]:
    """A Markdown table of a pytest-benchmark JSON file: every timed test of this run."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    rows = []
    for b in data.get("benchmarks", []):
        st = b.get("stats") or {}
        if "median" not in st:
            continue
        rows.append(
            f"| `{b.get('fullname', b.get('name'))}` | {st['median'] * 1e3:.4g} | "
            f"{st.get('iqr', 0) * 1e3:.3g} | {st.get('min', 0) * 1e3:.4g} | {st.get('rounds')} |"
        )
    if not rows:
        return []
    return [
        "| test | median ms | IQR ms | min ms | rounds |",
        "|:---|---:|---:|---:|---:|",
        *rows,
    ]


def _run_suites(args: argparse.Namespace, bench: Path, suites: dict[str, Path]) -> int:
    try:
        import pytest  # noqa: F401
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise CLIError(
            "the full suites need pytest and pytest-benchmark: pip install -e '.[dev]'"
        ) from None
    out = _out_dir(args.out)
    raw = out / "pytest-benchmark.json"
    cmd = [sys.executable, "-m", "pytest", *[str(suites[s]) for s in args.suites], "-q"]
    # No .pytest_cache in the checkout; pytest-benchmark's raw numbers to --out.
    cmd += ["-p", "no:cacheprovider", f"--benchmark-json={raw}"]
    if args.device:
        cmd += ["--bench-device", args.device]
    threads = _threads(args.threads)
    if threads:
        cmd += ["--bench-threads", str(threads)]
    cmd += list(args.pytest_args or [])
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env[RESULTS_ENV] = str(out)
    if not args.quiet:
        print(f"running: {' '.join(cmd)}\n  with {RESULTS_ENV}={out}", file=sys.stderr)
    before = _snapshot(bench)
    proc = subprocess.run(cmd, cwd=bench.parent, env=env)
    after = _snapshot(bench)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:  # a suite that ignores the redirect: say so rather than hide it
        print(
            f"{PROG} bench: warning: the checkout's {', '.join(changed)} changed during the run "
            f"(a suite that does not honour {RESULTS_ENV})",
            file=sys.stderr,
        )
    lines = [f"# {PROG} bench {' '.join(args.suites)}", ""]
    table = _benchmark_table(raw)
    if table:
        lines += ["## pytest-benchmark timings of this run", "", *table, ""]
    readme = out / "README.md"  # the suites' own README sections, this run's results only
    if readme.is_file():
        lines += [readme.read_text().strip(), ""]
    md = out / "tables.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md)
    print("\n" + "\n".join(lines))
    print(f"results in {out} (raw: {raw.name}, the suites' JSON files; tables: {md.name})")
    return proc.returncode
