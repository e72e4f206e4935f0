"""Fault injection: real `python -m hpd_fast distill` runs killed with SIGKILL at seeded random
moments during the experts, H-PD, saving and evaluation, then rerun; after every kill the
folder must hold no result or a complete one, and the finished rerun must equal an
uninterrupted run bit for bit. Plus two writers on one folder (point 3 of the reliability
issue). Trials: HPD_FAST_FAULT_CHAINS chains (default 1) of one kill per phase."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hpd_fast
from hpd_fast.distill.result import DistillResult, IncompleteResultError

ARGS = [
    "--max-per-class", "10", "--num-experts", "3", "--expert-train-epochs", "3",
    "--model-kwargs", '{"width": 4}', "--last-stage", "2", "--iterations-per-stage", "3",
    "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "2", "--crfd-models", "1",
    "--num-eval", "1", "--eval-epochs", "2", "--threads", "1",
]  # fmt: skip

# phase -> the log line after which the kill comes (a seeded delay later)
PHASES = {
    "experts": ("expert trajectories:", 0.4),
    "hpd": ("H-PD mtt", 1.0),
    "saving": ("H-PD stage 2/2", 3.0),
    "evaluation": ("evaluate ConvNet synthetic", 0.6),
}
CHAINS = int(os.environ.get("HPD_FAST_FAULT_CHAINS", "1"))


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    from hpd_fast.generators import ConvGenerator, save_generator

    d = hpd_fast.data.load("digits")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        g = ConvGenerator(10, (1, 8, 8), latent_dim=4, width=4, mean=d.mean, std=d.std)
    path = tmp_path_factory.mktemp("gen") / "tiny"
    save_generator(g, path)
    return path


def _cmd(gen: Path, out: Path, cache: Path) -> list[str]:
    args = ["distill", "--generator", str(gen), "--out", str(out), "--cache-dir", str(cache)]
    return [sys.executable, "-m", "hpd_fast", *args, *ARGS]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HPD_FAST_CACHE", None)
    return env


def _killed_at(cmd: list[str], marker: str, delay: float) -> str:
    """Start ``cmd``, SIGKILL it ``delay`` s after ``marker`` appears on stderr."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env()
    )
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            if marker in line:
                time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return "killed"
                break
        proc.wait(timeout=300)
        return f"finished before the kill (rc {proc.returncode})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "tensors.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _accuracy(out: Path) -> tuple:
    m = json.loads((out / "metrics.json").read_text())
    return (m["accuracy"], m["random_real"])


def _check_state(out: Path, ref: dict[str, torch.Tensor]) -> str:
    """A killed run's folder: no result, or a complete one that equals the reference (and a
    metrics.json, when present, of the result beside it)."""
    try:
        res = DistillResult.load(out)
    except (FileNotFoundError, IncompleteResultError) as exc:
        assert not isinstance(exc, IncompleteResultError) or "does not belong" in str(exc)
        return "no result"
    assert _same(_tensors(out), ref), "a folder loads as complete but differs"
    if (out / "metrics.json").exists():
        assert json.loads((out / "metrics.json").read_text())["run_id"] == res.run_id
        return "complete result and metrics"
    return "complete result, no metrics yet"


@pytest.fixture(scope="module")
def reference(tiny_generator, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ref")
    proc = subprocess.run(
        _cmd(tiny_generator, root / "out", root / "cache"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "out"


@pytest.mark.parametrize("chain", range(CHAINS))
def test_killed_runs_resume_bit_identical(chain, reference, tiny_generator, tmp_path):
    rng = random.Random(1000 + chain)
    ref = _tensors(reference)
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = _cmd(tiny_generator, out, cache)
    outcomes = []
    for phase, (marker, span) in PHASES.items():
        delay = rng.uniform(0.0, span)
        how = _killed_at(cmd, marker, delay)
        state = _check_state(out, ref) if out.exists() else "no folder"
        outcomes.append(f"{phase} +{delay:.2f}s: {how}; {state}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _same(_tensors(out), ref)
    assert _accuracy(out) == _accuracy(reference)
    print("\n".join(outcomes))


def test_two_writers_on_one_folder(reference, tiny_generator, tmp_path):
    """Two distill processes on one --out (and one expert cache entry): the second one gets an
    error naming the first one's PID, or (when they did not overlap) reuses its finished run;
    the folder ends equal to the uninterrupted run."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = _cmd(tiny_generator, out, cache)
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for _ in range(2)
    ]
    results = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in procs]
    ok = [r for r in results if r[3] == 0]
    failed = [r for r in results if r[3] != 0]
    assert ok, [r[2][-2000:] for r in results]
    for _, _, err, _ in failed:
        other = next(r[0] for r in results if r[3] == 0)
        assert f"PID {other}" in err and "Traceback" not in err, err[-2000:]
    assert _same(_tensors(out), _tensors(reference))
    assert _accuracy(out) == _accuracy(reference)
