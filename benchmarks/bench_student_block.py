"""Student block tail: ``hpd_fast.instance_norm_relu_pool`` against the PyTorch composition.

The tail of every ConvNet block after its convolution (``GroupNorm(C, C)`` with affine ->
``ReLU`` -> ``AvgPool2d(2, 2)``), timed in the three passes exact trajectory matching runs:

* ``forward``          ``y`` (no graph)
* ``backward``         ``autograd.grad(y, (x, w, b), gy)`` on a recorded graph
* ``double_backward``  the VJP of the gradient: ``(gx, gw, gb)`` computed with
                       ``create_graph=True`` once, then ``autograd.grad((gx, gw, gb), (x, w, gy),
                       cotangents)`` timed on that graph (what the exact sweep does per step)
* ``sweep_step``       all of it from scratch: forward, backward with ``create_graph=True``,
                       double backward (the block's whole cost in one replayed student step)

Providers: ``torch`` (``F.group_norm`` -> ``F.relu`` -> ``F.avg_pool2d``: what
``nn.GroupNorm``/``nn.ReLU``/``nn.AvgPool2d`` run, and the same ops as ``backend="reference"``),
``cpp`` on CPU; ``cuda`` and ``triton`` on CUDA (Triton on CPU only runs interpreted).
Workload: ConvNet-3 at 32x32, batch 100, width 128: block inputs [100, 128, 32, 32],
[100, 128, 16, 16], [100, 128, 8, 8]; fp32. Peak memory of ``sweep_step`` at 32x32 in a fresh
process (CPU) or by ``torch.cuda.max_memory_allocated``.

Run::

    .venv/bin/python -m pytest benchmarks/bench_student_block.py
    .venv/bin/python benchmarks/bench_student_block.py --table   # markdown from results/*.json

Results: ``benchmarks/results/student_block_<device>[-<threads>t].json`` (medians, spread,
ratios, target checks, versions, commit, load average).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import _util
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import hpd_fast
from hpd_fast.ops.instance_norm_relu_pool import instance_norm_relu_pool

SUITE = "student_block"
BATCH, WIDTH = 100, 128
SIZES = (32, 16, 8)  # ConvNet-3 at 32x32: the input side of blocks 1, 2, 3
MODES = ("forward", "backward", "double_backward", "sweep_step")
BACKENDS = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
MEMORY_SIZE = 32
ROUNDS = {"cpu": (3, 10), "cuda": (5, 50)}  # (min, max) timed rounds
TARGET_SECONDS = 1.0  # timed seconds to aim for per benchmark
# (mode, threshold): speedup of each fused backend over torch; reported, not asserted.
TARGETS = (("double_backward", 2.0),)


# --------------------------------------------------------------------------------------------
# providers: f(x, w, b) -> y
# --------------------------------------------------------------------------------------------


def torch_block(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """The PyTorch composition (as ConvNet runs it unfused)."""
    return F.avg_pool2d(F.relu(F.group_norm(x, x.shape[1], w, b, 1e-5)), 2)


def _fused(backend: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def call(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return instance_norm_relu_pool(x, w, b, backend=backend)

    call.__name__ = f"hpd_fast_{backend}"
    return call


PROVIDERS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "torch": torch_block,
    **{b: _fused(b) for b in ("cpp", "cuda", "triton")},
}


def providers(device: str) -> list[str]:
    return ["torch", *BACKENDS[device]]


def unavailable(provider: str) -> str | None:
    if provider == "torch":
        return None
    info = hpd_fast.backend_info()[provider]
    return None if info["available"] else str(info["detail"])


# --------------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------------


def make_inputs(size: int, device: str, seed: int = 0) -> dict[str, Tensor]:
    """x [B, C, size, size] (a conv output), affine parameters, gy, and the cotangents."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    return {
        "x": rnd(BATCH, WIDTH, size, size, scale=2.0, shift=0.5),
        "w": rnd(WIDTH, scale=0.2, shift=1.0),
        "b": rnd(WIDTH, scale=0.1),
        "gy": rnd(BATCH, WIDTH, size // 2, size // 2),
        "ggx": rnd(BATCH, WIDTH, size, size),
        "ggw": rnd(WIDTH),
        "ggb": rnd(WIDTH),
    }


def _leaves(t: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(t[k].detach().requires_grad_() for k in ("x", "w", "b", "gy"))  # type: ignore[return-value]


def workload(provider: str, mode: str, t: dict[str, Tensor]) -> Callable[[], Any]:
    """A no-argument callable running one ``mode`` pass (graphs it needs are built here)."""
    fn = PROVIDERS[provider]
    x, w, b, gy = _leaves(t)
    cot = (t["ggx"], t["ggw"], t["ggb"])
    if mode == "forward":

        def run() -> Any:
            with torch.no_grad():
                return fn(x, w, b)

        return run
    if mode == "backward":
        y = fn(x, w, b)
        return lambda: torch.autograd.grad(y, (x, w, b), gy, retain_graph=True)
    if mode == "double_backward":
        grads = torch.autograd.grad(fn(x, w, b), (x, w, b), gy, create_graph=True)
        return lambda: torch.autograd.grad(grads, (x, w, gy), cot, retain_graph=True)
    if mode == "sweep_step":

        def run() -> Any:
            grads = torch.autograd.grad(fn(x, w, b), (x, w, b), gy, create_graph=True)
            return torch.autograd.grad(grads, (x, w, gy), cot)

        return run
    raise ValueError(f"unknown mode {mode!r}")


def memory_workload(device: str, size: int, provider: str) -> Callable[[], Any]:
    """``sweep_step`` of ``provider`` (used inside the peak-memory subprocess)."""
    return workload(provider, "sweep_step", make_inputs(size, device))


# --------------------------------------------------------------------------------------------
# parametrization
# --------------------------------------------------------------------------------------------


def _specs(name: str, devices: list[str]) -> list[tuple]:
    out: list[tuple] = []
    for device in devices:
        if name == "test_block":
            out += [(device, str(s), m, p) for s in SIZES for m in MODES for p in providers(device)]
        elif name == "test_peak_memory":
            out += [(device, str(MEMORY_SIZE), "sweep_step", p) for p in providers(device)]
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "spec" in metafunc.fixturenames:
        devices = _util.bench_devices(metafunc.config.getoption("bench_device", None))
        specs = _specs(metafunc.function.__name__, devices)
        params = [pytest.param(s, id="-".join(s)) for s in specs]
        if not params:
            reason = f"nothing to run on {', '.join(devices)}"
            params = [pytest.param(None, id="none", marks=pytest.mark.skip(reason=reason))]
        metafunc.parametrize("spec", params)


# --------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def recorder(request: pytest.FixtureRequest, bench_summary: list):
    rec = Recorder()
    yield rec
    if rec.records:
        threads = request.config.getoption("bench_threads", None)
        bench_summary.extend(finalize(rec.records, tag=f"{threads}t" if threads else ""))


_INPUTS: dict[tuple[int, str], dict[str, Tensor]] = {}


def cached_inputs(size: int, device: str) -> dict[str, Tensor]:
    key = (size, device)
    if key not in _INPUTS:
        _INPUTS.clear()  # one set at a time (tests run grouped by size)
        _INPUTS[key] = make_inputs(size, device)
    return _INPUTS[key]


def _skip_if_missing(device: str, provider: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    why = unavailable(provider)
    if why:
        pytest.skip(f"{provider}: {why}")


def test_block(benchmark, recorder: Recorder, spec: tuple[str, str, str, str]) -> None:
    device, size, mode, provider = spec
    _skip_if_missing(device, provider)
    run = _util.synchronized(workload(provider, mode, cached_inputs(int(size), device)), device)
    t0 = time.perf_counter()
    run()  # untimed warm-up, also sizes the round count
    dt = max(time.perf_counter() - t0, 1e-9)
    lo, hi = ROUNDS[device]
    rounds = max(lo, min(hi, int(TARGET_SECONDS / dt)))
    benchmark.group = f"{device} {size}x{size} {mode}"
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=int(dt < 0.25))
    st = _util.stats_of(benchmark)
    if st is not None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        recorder.records.append(
            dict(kind="time", device=device, size=int(size), mode=mode, provider=provider,
                 **st, loadavg_1m_after=load)
        )  # fmt: skip


def test_peak_memory(recorder: Recorder, spec: tuple[str, str, str, str]) -> None:
    device, size, mode, provider = spec
    _skip_if_missing(device, provider)
    if device == "cuda":
        mem = _util.cuda_peak_memory(memory_workload(device, int(size), provider), device)
    else:
        setup = (
            "import bench_student_block as _b\n"
            f"_run = _b.memory_workload({device!r}, {int(size)}, {provider!r})"
        )
        mem = _util.peak_memory_subprocess(setup, "_out = _run()")
    recorder.records.append(
        dict(kind="memory", device=device, size=int(size), mode=mode, provider=provider, **mem)
    )


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def _rkey(r: dict[str, Any]) -> tuple:
    return (r["kind"], r["size"], r["mode"], r["provider"])


def derive(records: list[dict[str, Any]], device: str) -> tuple[list, list]:
    """``speedup_vs_torch`` (from medians) and ``speedup_vs_torch_min`` (from the fastest
    rounds, least disturbed by other load) of every fused row; the target checks."""
    t = {_rkey(r)[1:]: r for r in records if r["kind"] == "time"}
    rows = []
    for r in records:
        base = t.get((r["size"], r["mode"], "torch"))
        if r["kind"] != "time" or r["provider"] == "torch" or base is None:
            continue
        r["speedup_vs_torch"] = base["median_s"] / r["median_s"]
        r["speedup_vs_torch_min"] = base["min_s"] / r["min_s"]
        rows.append({k: r[k] for k in ("size", "mode", "provider", "speedup_vs_torch")})
    targets = []
    for mode, threshold in TARGETS:
        for provider in BACKENDS[device]:
            for size in SIZES:
                r = t.get((size, mode, provider))
                value = None if r is None else r.get("speedup_vs_torch")
                status = "MISSING" if value is None else ("PASS" if value >= threshold else "FAIL")
                targets.append(
                    dict(target=f"{provider} {mode} ≥ {threshold:g}× faster than torch",
                         size=size, mode=mode, provider=provider, value=value,
                         value_from_min=None if r is None else r.get("speedup_vs_torch_min"),
                         threshold=threshold, status=status)
                )  # fmt: skip
    return rows, targets


def _merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fresh = {_rkey(r) for r in new}
    return [r for r in old if _rkey(r) not in fresh] + new


def finalize(records: list[dict[str, Any]], tag: str = "") -> list[tuple[str, list[str]]]:
    """Write one JSON file per device; return terminal summaries."""
    summaries = []
    for device in sorted({r["device"] for r in records}):
        meta = _util.run_metadata(device)
        stamp = {"commit": meta["commit"], "date": meta["date"]}
        new = [r | stamp for r in records if r["device"] == device]
        path = _util.results_path(SUITE, device, tag)
        merged = _merge((_util.read_json(path) or {}).get("records", []), new)
        ratios, targets = derive(merged, device)
        payload = {
            "suite": SUITE,
            "op": "hpd_fast.instance_norm_relu_pool",
            "meta": meta,
            "workload": {
                "block": "GroupNorm(C, C) affine -> ReLU -> AvgPool2d(2, 2)",
                "batch": BATCH,
                "channels": WIDTH,
                "sizes": [f"{s}x{s}" for s in SIZES],
                "dtype": "float32",
            },
            "definitions": {
                "forward": "y without a graph",
                "backward": "autograd.grad(y, (x, w, b), gy) on a recorded graph",
                "double_backward": "autograd.grad((gx, gw, gb), (x, w, gy), cotangents) on the "
                "graph of a create_graph=True backward",
                "sweep_step": "forward + backward(create_graph=True) + double_backward",
                "speedup_vs_torch": "median_s of torch / median_s of the provider (> 1: faster)",
                "peak_delta_mib": "peak memory of one sweep_step beyond its inputs",
            },
            "records": merged,
            "ratios": ratios,
            "targets": targets,
        }
        _util.write_json(path, payload)
        summaries.append(
            (f"student block on {meta['device_name']} ({device}) -> {path.name}", table(payload))
        )
    return summaries


def _ms(s: float | None) -> str:
    if s is None:
        return "–"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def table(payload: dict[str, Any]) -> list[str]:
    """Markdown: one row per (size, mode, provider), then the target checks."""
    records = payload["records"]
    mem = {(r["size"], r["provider"]): r for r in records if r["kind"] == "memory"}
    times = [r for r in records if r["kind"] == "time"]
    order = ["torch", "cpp", "cuda", "triton"]
    times.sort(key=lambda r: (-r["size"], MODES.index(r["mode"]), order.index(r["provider"])))
    rows = []
    for r in times:
        m = mem.get((r["size"], r["provider"])) if r["mode"] == "sweep_step" else None
        sp = r.get("speedup_vs_torch")
        sp_min = r.get("speedup_vs_torch_min")
        rows.append([
            f"{r['size']}×{r['size']}", r["mode"], r["provider"], _ms(r["median_s"]),
            _ms(r["iqr_s"]), "–" if sp is None else f"{sp:.2f}×",
            "–" if sp_min is None else f"{sp_min:.2f}×",
            "–" if m is None else f"{m['peak_delta_mib']:.0f}",
        ])  # fmt: skip
    headers = ["input", "pass", "provider", "median ms", "IQR ms", "× vs torch",
               "× (min times)", "peak extra MiB"]  # fmt: skip
    meta = payload["meta"]
    lines = [
        f"{meta['device_name']}, torch {meta['torch']}, {meta['torch_threads']} threads, "
        f"commit {meta['commit']}{' (dirty)' if meta.get('dirty') else ''}, "
        f"load {meta.get('loadavg_1m')}, {meta['date']}",
        "",
        _util.markdown_table(headers, rows, "lll" + "r" * 5),
        "",
    ]
    for t in payload["targets"]:
        v = "–" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"{t['status']:>7}  {t['target']} at {t['size']}×{t['size']}: {v}")
    return "\n".join(lines).splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print tables from results/*.json")
    args = parser.parse_args(argv)
    if not args.table:
        parser.print_help()
        return 0
    for path in sorted(_util.RESULTS_DIR.glob(f"{SUITE}_*.json")):
        payload = _util.read_json(path)
        if payload:
            print(f"### {path.name}\n")
            print("\n".join(table(payload)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
