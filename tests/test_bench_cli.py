"""``hpd-fast bench``: listing, the quick suite's output folder, refusals, and the redirect of
the full suites' results away from the checkout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpd_fast.bench import CASES
from hpd_fast.cli import main

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _checkout_state() -> tuple[str, dict[str, str]]:
    """``git status --porcelain benchmarks/`` and the hashes of every file under benchmarks/
    (results and README included: a file that was already modified would not show in the
    status a second time)."""
    status = ""
    if shutil.which("git") and (REPO / ".git").exists():
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "benchmarks/"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout
    hashes = {
        str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(BENCH.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }
    return status, hashes


def test_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in CASES:
        assert name in out
    if BENCH.is_dir():
        assert "feature_distance" in out.split("full suites", 1)[1]


def test_quick_smoke_writes_only_to_out(tmp_path, capsys):
    before = _checkout_state()
    out = tmp_path / "bench-out"
    assert (
        main(["bench", "--quick", "--smoke", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert _checkout_state() == before

    assert sorted(p.name for p in out.iterdir()) == ["quick.json", "quick.md"]
    data = json.loads((out / "quick.json").read_text())
    assert data["suite"] == "quick" and data["smoke"] is True
    assert [r["case"] for r in data["rows"]] == list(CASES)
    for r in data["rows"]:
        assert "error" not in r, r
        assert r["rounds"] == 1 and r["speedup_median"] > 0
        assert len(r["baseline_s"]) == len(r["hpd_fast_s"]) == 1
    meta = data["meta"]
    for key in ("device", "device_name", "torch", "torch_threads", "commit", "date"):
        assert key in meta
    assert meta["device"] == "cpu"

    md = (out / "quick.md").read_text()
    assert "| case |" in md and "Smoke run" in md
    for name in CASES:
        assert f"| {name} |" in md
    assert "| case |" in printed  # the table is printed too


def test_quick_rounds(tmp_path, capsys):
    out = tmp_path / "o"
    args = ["bench", "--smoke", "--rounds", "2", "-q", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    data = json.loads((out / "quick.json").read_text())
    assert all(r["rounds"] == 2 and len(r["hpd_fast_s"]) == 2 for r in data["rows"])


def test_not_measured_rows_carry_no_numbers():
    from hpd_fast.bench import QuickReport

    report = QuickReport(
        meta={
            "device": "cpu", "device_name": "x", "cpu_count": 2, "torch_threads": 1,
            "torch": "t", "hpd_fast": "v", "commit": None, "date": "d",
        },
        rows=[{"case": "student_block", "title": "t", "fast": "f", "baseline": "b",
               "shapes": "", "error": "RuntimeError: no kernel"}],
    )  # fmt: skip
    md = report.markdown()
    row = next(line for line in md.splitlines() if line.startswith("| student_block"))
    assert "not measured: RuntimeError: no kernel" in row
    assert "×" not in row


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "no_such_suite"], "unknown benchmark suite(s): no_such_suite"),
        (["bench", "feature_distance", "--quick"], "name no SUITE with it"),
        (["bench", "feature_distance", "--rounds", "1"], "apply to the quick suite"),
        (["bench", "--rounds", "0"], "--rounds must be >= 1"),
        (["bench", "--threads", "zero"], "--threads must be"),
    ],
)
def test_refusals(argv, message, capsys, tmp_path):
    if ("no_such_suite" in argv or "feature_distance" in argv) and not BENCH.is_dir():
        pytest.skip("needs the source checkout's benchmarks/")
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_out_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "old.json").write_text("{}")
    assert main(["bench", "--smoke", "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_out_never_inside_the_package(capsys):
    import hpd_fast

    inside = Path(hpd_fast.__file__).resolve().parent / "bench-out"
    assert main(["bench", "--smoke", "--out", str(inside)]) == 2
    assert "choose another folder" in capsys.readouterr().err
    assert not inside.exists()


@pytest.mark.skipif(not BENCH.is_dir(), reason="needs the source checkout's benchmarks/")
def test_suite_results_redirected(tmp_path):
    """A named suite writes its JSON and README section to --out; the checkout's
    benchmarks/results/ and README.md are untouched. Smallest feature-distance subset."""
    pytest.importorskip("pytest_benchmark")
    before = _checkout_state()
    out = tmp_path / "suite-out"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("HPD_BENCH_RESULTS_DIR", None)
    select = "test_forward and convnet3_n100 and fp32 and cpu and torch_vectorized"
    proc = subprocess.run(
        [sys.executable, "-m", "hpd_fast", "bench", "feature_distance", "--device", "cpu",
         "--out", str(out), "--pytest-args", "-k", select],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _checkout_state() == before
    assert "warning" not in proc.stderr
    results = sorted(p.name for p in out.glob("feature_distance_*.json"))
    assert results, sorted(p.name for p in out.iterdir())
    payload = json.loads((out / results[0]).read_text())
    assert {r["provider"] for r in payload["records"]} == {"torch_vectorized"}
    assert "<!-- BEGIN feature_distance -->" in (out / "README.md").read_text()
    assert (out / "pytest-benchmark.json").is_file()
    tables = (out / "tables.md").read_text()
    assert "torch_vectorized" in tables
