"""Feature distance: ``hpd_fast.class_mean_distance`` against the code users run today.

Providers, timed side by side on the same inputs:

* ``published_loop``    per class and per layer: boolean-mask select, mean, squared distance,
                        summed (how the published distillation code computes it)
* ``torch_vectorized``  per layer ``torch.zeros(S, D).index_add_(0, labels, x)``, counts, means,
                        one distance; bf16 features are upcast first (``x.float()``) to stay exact
* ``reference``         ``hpd_fast`` backend="reference" (pure PyTorch, the oracle)
* ``cpp`` on CPU; ``cuda`` and ``triton`` on CUDA (Triton on CPU only runs interpreted)
* ``sum_pass``          ``x.sum()`` over every layer: the bandwidth yardstick
* ``device_copy``       CUDA only: ``y.copy_(x)`` on a 1 GiB buffer (bytes read + written)

Workloads: ConvNet-3 block outputs at 32x32 (128x32x32, 128x16x16, 128x8x8) for N = 100 and 500
over 10 classes, and ConvNetD5 at 128x128 (128x64x64 ... 128x4x4) for N = 10; fp32 and bf16
features (targets always fp32). Forward (the value) everywhere; forward + backward (features
requiring grad) at N = 500 fp32. Peak memory of each provider at N = 500 (fresh subprocess).

Effective bandwidth = bytes of features read / median time (forward + backward also counts the
feature gradient written, i.e. twice the feature bytes).

Run::

    .venv/bin/python -m pytest benchmarks/bench_feature_distance.py
    .venv/bin/python benchmarks/bench_feature_distance.py --table   # README from results/*.json

Results: ``benchmarks/results/feature_distance_<device>.json``; the "Feature distance" section of
``benchmarks/README.md`` is regenerated from every such file at the end of a run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _util
import pytest
import torch
from torch import Tensor

import hpd_fast
from hpd_fast import class_mean_distance_ref

SUITE = "feature_distance"
README_KEY = "feature_distance"
README_HEADING = "## Feature distance (`class_mean_distance`)"
NUM_CLASSES = 10


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    n: int
    shapes: tuple[tuple[int, int, int], ...]

    @property
    def cols(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


_CONVNET3 = ((128, 32, 32), (128, 16, 16), (128, 8, 8))
_CONVNETD5 = ((128, 64, 64), (128, 32, 32), (128, 16, 16), (128, 8, 8), (128, 4, 4))
CASES = {
    c.key: c
    for c in (
        Case("convnet3_n100", "ConvNet-3 32×32, N=100", 100, _CONVNET3),
        Case("convnet3_n500", "ConvNet-3 32×32, N=500", 500, _CONVNET3),
        Case("convnetd5_n10", "ConvNetD5 128×128, N=10", 10, _CONVNETD5),
    )
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BIG_CASE = "convnet3_n500"  # targets, forward + backward and peak memory are measured here

HPD_BACKENDS = {"cpu": ("reference", "cpp"), "cuda": ("reference", "cuda", "triton")}
DEVICE_BACKENDS = ("cpp", "cuda", "triton")  # the fused kernels (not the reference)

# CPU timings are ratios on a shared machine; these caps keep a default run near 2 minutes.
ROUNDS = {"cpu": (3, 10), "cuda": (5, 50)}  # (min, max) timed rounds
TARGET_SECONDS = {"cpu": 1.0, "cuda": 1.0}  # timed seconds to aim for per benchmark
COPY_BYTES = 2**30

# (name, dtype, provider, ratio, threshold), checked on BIG_CASE forward; reported, not asserted.
_C = [
    ("fp32 cpp ≥ 3× faster than published_loop", "fp32", "cpp", "speedup_vs_published_loop", 3.0),
    ("fp32 cpp no slower than torch_vectorized", "fp32", "cpp", "speedup_vs_torch_vectorized", 1),
    ("fp32 cpp bandwidth ≥ 80% of sum_pass", "fp32", "cpp", "bw_fraction_of_sum_pass", 0.8),
    ("bf16 cpp ≥ 1.5× faster than torch_vectorized (upcast)", "bf16", "cpp",
     "speedup_vs_torch_vectorized", 1.5),
]  # fmt: skip
_G = [
    (
        f"{dtype} {backend} bandwidth ≥ 70% of device copy",
        dtype,
        backend,
        "bw_fraction_of_copy",
        0.7,
    )
    for backend in ("cuda", "triton")
    for dtype in DTYPES
]
TARGETS = {"cpu": _C, "cuda": _G}


# --------------------------------------------------------------------------------------------
# providers: f(features: list of [N, C, H, W], labels [N] int64, targets list of [S, D]) -> 0-dim
# --------------------------------------------------------------------------------------------


def published_loop(features: list[Tensor], labels: Tensor, targets: list[Tensor]) -> Tensor:
    """Per class, per layer: mask-select the class's rows, mean, squared distance; summed."""
    n = labels.shape[0]
    total = torch.zeros((), device=labels.device)
    for c in range(targets[0].shape[0]):
        mask = labels == c
        for x, t in zip(features, targets):
            mean = x.reshape(n, -1)[mask].mean(0)
            total = total + ((mean - t[c]) ** 2).sum()
    return total


def torch_vectorized(features: list[Tensor], labels: Tensor, targets: list[Tensor]) -> Tensor:
    """One ``index_add_`` per layer into ``[S, D]`` sums, then means and one distance."""
    n, s = labels.shape[0], targets[0].shape[0]
    ones = torch.ones(n, device=labels.device)
    counts = torch.zeros(s, device=labels.device).index_add_(0, labels, ones)
    inv = (1.0 / counts.clamp(min=1)).unsqueeze(1)
    total = torch.zeros((), device=labels.device)
    for x, t in zip(features, targets):
        x = x.reshape(n, -1).float()  # a no-op for fp32; bf16 is upcast to stay accurate
        sums = torch.zeros(s, x.shape[1], device=x.device).index_add_(0, labels, x)
        total = total + ((sums * inv - t) ** 2).sum()
    return total


def sum_pass(features: list[Tensor], labels: Tensor, targets: list[Tensor]) -> Tensor:
    """Reads every feature once and does nothing else: the bandwidth yardstick."""
    total = features[0].sum()
    for x in features[1:]:
        total = total + x.sum()
    return total


def _hpd(backend: str) -> Callable[..., Tensor]:
    def call(features: list[Tensor], labels: Tensor, targets: list[Tensor]) -> Tensor:
        return hpd_fast.class_mean_distance(features, labels, targets, backend=backend)

    call.__name__ = f"hpd_fast_{backend}"
    return call


PROVIDERS: dict[str, Callable[..., Tensor]] = {
    "published_loop": published_loop,
    "torch_vectorized": torch_vectorized,
    **{b: _hpd(b) for b in ("reference", "cpp", "cuda", "triton")},
    "sum_pass": sum_pass,
}


def forward_providers(device: str) -> list[str]:
    return ["published_loop", "torch_vectorized", *HPD_BACKENDS[device], "sum_pass"]


def backward_providers(device: str) -> list[str]:
    return ["torch_vectorized", *HPD_BACKENDS[device]]


def memory_providers(device: str, mode: str) -> list[str]:
    """The baselines and the fused kernels (the reference allocates as torch_vectorized does)."""
    names = forward_providers(device) if mode == "forward" else backward_providers(device)
    return [p for p in names if p not in ("reference", "sum_pass")]


def unavailable(provider: str) -> str | None:
    """Why ``provider`` cannot run in this installation, or None."""
    if provider not in ("reference", "cpp", "cuda", "triton"):
        return None
    info = hpd_fast.backend_info()[provider]
    return None if info["available"] else str(info["detail"])


def with_backward(fn: Callable[..., Tensor]) -> Callable[..., tuple[Tensor, ...]]:
    """Forward, then the gradient of every feature layer (returned, not accumulated)."""

    def call(features: list[Tensor], labels: Tensor, targets: list[Tensor]) -> tuple[Tensor, ...]:
        return torch.autograd.grad(fn(features, labels, targets), features)

    return call


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def make_inputs(case: Case, dtype: str, device: str, seed: int = 0):
    """Random block outputs ``[N, C, H, W]`` (``dtype``), balanced shuffled labels, fp32 targets.

    The bf16 features are the fp32 ones rounded, so both dtypes see the same values.
    """
    g = torch.Generator().manual_seed(seed)
    feats = [
        torch.randn(case.n, *shape, generator=g).to(device=device, dtype=DTYPES[dtype])
        for shape in case.shapes
    ]
    labels = (torch.randperm(case.n, generator=g) % NUM_CLASSES).to(device)
    targets = [
        torch.randn(NUM_CLASSES, math.prod(shape), generator=g).to(device) for shape in case.shapes
    ]
    return feats, labels, targets


_CACHE: dict[tuple[str, str, str], tuple] = {}


def cached_inputs(case: Case, dtype: str, device: str):
    """Inputs plus the fp64 reference value; one set kept at a time (tests run grouped)."""
    key = (case.key, dtype, device)
    if key not in _CACHE:
        _CACHE.clear()
        feats, labels, targets = make_inputs(case, dtype, device)
        exact = class_mean_distance_ref(feats, labels, [t.double() for t in targets])
        _CACHE[key] = (feats, labels, targets, float(exact))
    return _CACHE[key]


def feature_bytes(feats: list[Tensor]) -> int:
    return sum(f.numel() * f.element_size() for f in feats)


def memory_workload(device: str, case: str, dtype: str, provider: str, mode: str):
    """``(fn, args)`` of one measured call (used inside the peak-memory subprocess)."""
    feats, labels, targets = make_inputs(CASES[case], dtype, device)
    fn = PROVIDERS[provider]
    if mode == "forward_backward":
        feats = [f.requires_grad_() for f in feats]
        fn = with_backward(fn)
    return fn, (feats, labels, targets)


# --------------------------------------------------------------------------------------------
# parametrization
# --------------------------------------------------------------------------------------------


def _specs(name: str, devices: list[str]) -> list[tuple]:
    out: list[tuple] = []
    for device in devices:
        if name == "test_forward":
            for case in CASES:
                for dtype in DTYPES:
                    out += [(device, case, dtype, p) for p in forward_providers(device)]
        elif name == "test_forward_backward":
            out += [(device, BIG_CASE, "fp32", p) for p in backward_providers(device)]
        elif name == "test_device_copy" and device == "cuda":
            out.append((device,))
        elif name == "test_peak_memory":
            for dtype in DTYPES:
                out += [
                    (device, BIG_CASE, dtype, p, "forward")
                    for p in memory_providers(device, "forward")
                ]
            out += [
                (device, BIG_CASE, "fp32", p, "forward_backward")
                for p in memory_providers(device, "forward_backward")
            ]
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "spec" in metafunc.fixturenames:
        devices = _util.bench_devices(metafunc.config.getoption("bench_device", None))
        specs = _specs(metafunc.function.__name__, devices)
        params = [pytest.param(s, id="-".join(s)) for s in specs]
        if not params:  # e.g. the device copy on a CPU-only run
            reason = f"nothing to run on {', '.join(devices)}"
            params = [pytest.param(None, id="none", marks=pytest.mark.skip(reason=reason))]
        metafunc.parametrize("spec", params)


# --------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add(self, **record: Any) -> dict[str, Any]:
        self.records.append(record)
        return record


@pytest.fixture(scope="module")
def recorder(request: pytest.FixtureRequest, bench_summary: list):
    rec = Recorder()
    yield rec
    if rec.records:
        threads = request.config.getoption("bench_threads", None)
        bench_summary.extend(finalize(rec.records, tag=f"{threads}t" if threads else ""))


def _rounds(fn: Callable[[], Any], device: str) -> tuple[int, int]:
    """(timed rounds, warm-up rounds) for ``fn``, from one untimed call, which is itself a
    warm-up: a further one is only worth it for fast calls."""
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-9)
    lo, hi = ROUNDS[device]
    return max(lo, min(hi, int(TARGET_SECONDS[device] / dt))), int(dt < 0.25)


def _skip_if_missing(device: str, provider: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    why = unavailable(provider)
    if why:
        pytest.skip(f"{provider}: {why}")


def _time(benchmark, recorder: Recorder, fn, args, *, nbytes: int, group: str, **key):
    """Time ``fn(*args)`` with pytest-benchmark; returns (last output, record or None)."""
    device = key["device"]
    timed = _util.synchronized(fn, device)
    rounds, warmup = _rounds(lambda: timed(*args), device)
    benchmark.group = group
    out = benchmark.pedantic(timed, args=args, rounds=rounds, iterations=1, warmup_rounds=warmup)
    st = _util.stats_of(benchmark)
    record = None
    if st is not None:
        gbps = nbytes / st["median_s"] / 1e9
        benchmark.extra_info.update(bytes=nbytes, gbps=round(gbps, 3))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        record = recorder.add(
            kind="time", **key, **st, bytes=nbytes, gbps=gbps, loadavg_1m_after=load
        )
    return out, record


def test_forward(benchmark, recorder: Recorder, spec: tuple[str, str, str, str]) -> None:
    device, case, dtype, provider = spec
    _skip_if_missing(device, provider)
    feats, labels, targets, exact = cached_inputs(CASES[case], dtype, device)
    key = dict(device=device, case=case, dtype=dtype, mode="forward", provider=provider)
    out, record = _time(
        benchmark,
        recorder,
        PROVIDERS[provider],
        (feats, labels, targets),
        nbytes=feature_bytes(feats),
        group=f"{device} {case} {dtype} forward",
        **key,
    )
    if provider != "sum_pass":
        # Every provider computes the same number; 1e-2 catches a wrong one, not rounding.
        rel = abs(float(out) - exact) / abs(exact)
        if record is not None:
            record["rel_err"] = rel
        assert rel < 1e-2, f"{provider} gives {float(out)}, fp64 reference {exact}"


def test_forward_backward(benchmark, recorder: Recorder, spec: tuple[str, str, str, str]) -> None:
    device, case, dtype, provider = spec
    _skip_if_missing(device, provider)
    feats, labels, targets, _ = cached_inputs(CASES[case], dtype, device)
    leaves = [f.detach().requires_grad_() for f in feats]
    _time(
        benchmark,
        recorder,
        with_backward(PROVIDERS[provider]),
        (leaves, labels, targets),
        nbytes=2 * feature_bytes(feats),
        group=f"{device} {case} {dtype} forward+backward",
        device=device,
        case=case,
        dtype=dtype,
        mode="forward_backward",
        provider=provider,
    )


def test_device_copy(benchmark, recorder: Recorder, spec: tuple[str]) -> None:
    (device,) = spec
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    x = torch.randn(COPY_BYTES // 4, device=device)
    y = torch.empty_like(x)
    _time(
        benchmark,
        recorder,
        lambda: y.copy_(x),
        (),
        nbytes=2 * COPY_BYTES,  # read + written
        group=f"{device} device copy",
        device=device,
        case="copy_1gib",
        dtype="fp32",
        mode="copy",
        provider="device_copy",
    )


def test_peak_memory(recorder: Recorder, spec: tuple[str, str, str, str, str]) -> None:
    device, case, dtype, provider, mode = spec
    _skip_if_missing(device, provider)
    if device == "cuda":
        fn, args = memory_workload(device, case, dtype, provider, mode)
        mem = _util.cuda_peak_memory(lambda: fn(*args), device)
    else:
        setup = (
            "import bench_feature_distance as _b\n"
            f"_fn, _args = _b.memory_workload({device!r}, {case!r}, {dtype!r}, "
            f"{provider!r}, {mode!r})"
        )
        mem = _util.peak_memory_subprocess(setup, "_out = _fn(*_args)")
    recorder.add(
        kind="memory", device=device, case=case, dtype=dtype, mode=mode, provider=provider, **mem
    )


# --------------------------------------------------------------------------------------------
# results: JSON per device, derived ratios, target checks, README table
# --------------------------------------------------------------------------------------------


def _rkey(r: dict[str, Any]) -> tuple:
    return (r["kind"], r["case"], r["dtype"], r["mode"], r["provider"])


def _ratios(r: dict, t: dict, copy: dict | None, stat: str) -> dict[str, float]:
    """Speedups and bandwidth fractions of timing record ``r``, from its ``stat`` time."""
    if r["provider"] == "sum_pass" and copy is None:
        return {}
    bw = lambda x: x["bytes"] / x[stat]
    out = {}
    base = (r["case"], r["dtype"], r["mode"])
    for other in ("published_loop", "torch_vectorized"):
        o = t.get((*base, other))
        if o is not None and other != r["provider"] and r["provider"] != "sum_pass":
            out[f"speedup_vs_{other}"] = o[stat] / r[stat]
    s = t.get((*base, "sum_pass"))
    if s is not None and r["provider"] != "sum_pass":
        out["bw_fraction_of_sum_pass"] = bw(r) / bw(s)
    if copy is not None:
        out["bw_fraction_of_copy"] = bw(r) / bw(copy)
    return out


def derive(records: list[dict[str, Any]], device: str) -> tuple[list, list]:
    """Fill each timing record's ``ratios`` (from medians) and ``ratios_min`` (from the fastest
    round, the estimate least disturbed by other load); return (ratio rows, target checks)."""
    t = {_rkey(r)[1:]: r for r in records if r["kind"] == "time"}
    copy = t.get(("copy_1gib", "fp32", "copy", "device_copy"))
    ratio_rows = []
    for r in records:
        if r["kind"] != "time" or r["mode"] == "copy":
            continue
        r["ratios"] = _ratios(r, t, copy, "median_s")
        r["ratios_min"] = _ratios(r, t, copy, "min_s")
        if r["ratios"]:
            ratio_rows.append(
                {k: r[k] for k in ("case", "dtype", "mode", "provider")} | r["ratios"]
            )

    def check(name: str, dtype: str, provider: str, ratio: str, threshold: float) -> dict:
        r = t.get((BIG_CASE, dtype, "forward", provider))
        value = None if r is None else r["ratios"].get(ratio)
        value_min = None if r is None else r["ratios_min"].get(ratio)
        status = "MISSING" if value is None else ("PASS" if value >= threshold else "FAIL")
        return dict(
            target=name,
            case=BIG_CASE,
            dtype=dtype,
            provider=provider,
            ratio=ratio,
            value=value,
            value_from_min=value_min,
            threshold=threshold,
            status=status,
        )

    targets = [check(*spec) for spec in TARGETS[device]]
    return ratio_rows, targets


def _merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of this run replace same-keyed old ones; old ones not re-measured are kept."""
    fresh = {_rkey(r) for r in new}
    return [r for r in old if _rkey(r) not in fresh] + new


def finalize(records: list[dict[str, Any]], tag: str = "") -> list[tuple[str, list[str]]]:
    """Write the per-device JSON files (``tag``: e.g. ``1t`` for a run pinned to one thread)
    and the README section; return terminal summaries."""
    summaries = []
    for device in sorted({r["device"] for r in records}):
        meta = _util.run_metadata(device)
        stamp = {"commit": meta["commit"], "date": meta["date"]}
        new = [r | stamp for r in records if r["device"] == device]
        path = _util.results_path(SUITE, device, tag)
        old = (_util.read_json(path) or {}).get("records", [])
        merged = _merge(old, new)
        ratios, targets = derive(merged, device)
        payload = {
            "suite": SUITE,
            "op": "hpd_fast.class_mean_distance",
            "meta": meta,
            "definitions": {
                "median_s / iqr_s": "pytest-benchmark statistics over the timed rounds",
                "gbps": "bytes / median_s / 1e9; bytes = feature bytes read (forward), plus the "
                "feature gradient written (forward_backward), read + written (device_copy)",
                "speedup_vs_X": "median_s of X / median_s of the provider (> 1: faster)",
                "bw_fraction_of_Y": "gbps of the provider / gbps of Y",
                "peak_delta_mib": "peak memory of one call beyond its inputs",
            },
            "cases": {
                k: {
                    "label": c.label,
                    "n": c.n,
                    "num_classes": NUM_CLASSES,
                    "shapes": ["x".join(map(str, s)) for s in c.shapes],
                    "values_per_row": c.cols,
                }
                for k, c in CASES.items()
            },
            "records": merged,
            "ratios": ratios,
            "targets": targets,
        }
        _util.write_json(path, payload)
        summaries.append(
            (
                f"feature distance on {meta['device_name']} ({device}) -> {path.name}",
                _summary_lines(payload),
            )
        )
    write_readme()
    return summaries


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _f(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _ms(s: float | None) -> str:
    if s is None:
        return "–"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _order(provider: str) -> int:
    order = ["published_loop", "torch_vectorized", "reference", "cpp", "cuda", "triton"]
    return order.index(provider) if provider in order else len(order)


def _tables(payload: dict[str, Any]) -> list[str]:
    records = payload["records"]
    gpu = payload["meta"]["device"].startswith("cuda")
    mem = {_rkey(r)[1:]: r for r in records if r["kind"] == "memory"}
    times = [r for r in records if r["kind"] == "time"]
    out = []

    targets = payload["targets"]
    if targets:
        rows = [
            (
                t["target"],
                _f(t["value"], ".2f"),
                _f(t.get("value_from_min"), ".2f"),
                _f(t["threshold"], ".2f"),
                f"**{t['status']}**",
            )
            for t in targets
        ]
        out.append(f"Targets ({CASES[BIG_CASE].label}, forward; result from the medians):\n")
        headers = ["target", "measured (medians)", "from min times", "needed", "result"]
        out.append(_util.markdown_table(headers, rows, "lrrrc"))

    def peak(r: dict[str, Any]) -> str:
        m = mem.get((r["case"], r["dtype"], r["mode"], r["provider"]))
        return _f(m and m["peak_delta_mib"], ".0f")

    for mode, title in (("forward", "Forward (value)"), ("forward_backward", "Forward + backward")):
        rows = []
        sel = [r for r in times if r["mode"] == mode]
        sel.sort(key=lambda r: (list(CASES).index(r["case"]), r["dtype"], _order(r["provider"])))
        for r in sel:
            q = r.get("ratios", {})
            row = [
                CASES[r["case"]].label,
                r["dtype"],
                r["provider"],
                _ms(r["median_s"]),
                _ms(r["iqr_s"]),
                _f(r["gbps"], ".2f"),
            ]
            if mode == "forward":
                row += [_x(q.get("speedup_vs_published_loop"))]
            row += [_x(q.get("speedup_vs_torch_vectorized"))]
            if mode == "forward":
                row += [_pct(q.get("bw_fraction_of_sum_pass"))]
            if gpu:
                row += [_pct(q.get("bw_fraction_of_copy"))]
            row += [peak(r)]
            rows.append(row)
        if not rows:
            continue
        headers = ["workload", "dtype", "provider", "median ms", "IQR ms", "GB/s"]
        if mode == "forward":
            headers += ["× vs published_loop"]
        headers += ["× vs torch_vectorized"]
        if mode == "forward":
            headers += ["BW / sum_pass"]
        if gpu:
            headers += ["BW / copy"]
        headers += ["peak extra MiB"]
        out.append(f"\n{title}:\n")
        out.append(_util.markdown_table(headers, rows, "lll" + "r" * (len(headers) - 3)))

    copy = [r for r in times if r["mode"] == "copy"]
    for r in copy:
        out.append(
            f"\nDevice copy (`y.copy_(x)`, 1 GiB, read + written): {_ms(r['median_s'])} ms, "
            f"{r['gbps']:.0f} GB/s."
        )
    return out


def _summary_lines(payload: dict[str, Any]) -> list[str]:
    meta = payload["meta"]
    lines = [
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['torch_threads']} threads, "
        f"commit {meta['commit']}{' (dirty)' if meta.get('dirty') else ''}, {meta['date']}",
        "",
    ]
    lines += "\n".join(_tables(payload)).splitlines()
    lines.append("")
    for t in payload["targets"]:
        lines.append(
            f"{t['status']:>7}  {t['target']}: {_f(t['value'], '.2f')} "
            f"(from min times: {_f(t.get('value_from_min'), '.2f')}; needed {t['threshold']})"
        )
    return lines


_README_INTRO = """\
`hpd_fast.class_mean_distance` (per-class feature means of several layers against per-class
targets: the CRFD / distribution-matching loss) against what users run today:

- `published_loop`: per class and per layer, boolean-mask select, mean, squared distance, summed
  (how the published distillation code computes it);
- `torch_vectorized`: per layer `torch.zeros(S, D).index_add_(0, labels, x)`, counts, means, one
  distance (bf16 features upcast with `x.float()` first, to stay accurate);
- `reference`: `backend="reference"` (pure PyTorch; the oracle); `cpp` on CPU, `cuda` and `triton`
  on CUDA (Triton runs only interpreted on CPU, so it is not timed there);
- `sum_pass`: `x.sum()` over every layer, the bandwidth yardstick; on CUDA also `y.copy_(x)` on
  1 GiB (bytes read + written).

Workloads: ConvNet-3 block outputs at 32×32 (128×32×32, 128×16×16, 128×8×8; 172,032 values per
row) for N = 100 and 500 over 10 classes, and ConvNetD5 at 128×128 (128×64×64 … 128×4×4; 698,368
values per row) for N = 10; features fp32 or bf16, targets fp32, labels shuffled.

GB/s = bytes of features read / median time (forward + backward also counts the feature
gradient written). "× vs X" = median time of X / median time of the row (> 1: faster).
"BW / sum_pass" = the row's GB/s / sum_pass's GB/s. "peak extra MiB" (N = 500 only) = peak
resident memory of one call beyond its inputs, in a fresh process (CUDA:
`torch.cuda.max_memory_allocated`). CPU timings on a shared machine are ratios, not absolutes
(the load average is recorded with every row in the JSON). GPU timings synchronize inside the
timed call.

Run (about two minutes on 2 idle CPU cores; longer on a busy machine), then regenerate this
section from the JSON files alone:

```bash
.venv/bin/python -m pytest benchmarks/bench_feature_distance.py
.venv/bin/python benchmarks/bench_feature_distance.py --table
```

`--bench-device cpu|cuda|auto` picks the devices (default: CPU, plus CUDA when visible);
`--bench-threads 1` pins torch to one thread (per-core efficiency, and far steadier when other
work shares the machine; results then go to a `-1t` file). Raw numbers, versions and commit:
`benchmarks/results/feature_distance_<device>[-<threads>t].json`.
"""


def render_section() -> str:
    parts = [_README_INTRO]
    files = sorted(_util.RESULTS_DIR.glob(f"{SUITE}_*.json"))
    payloads = [p for p in (_util.read_json(f) for f in files) if p and p.get("suite") == SUITE]
    payloads.sort(
        key=lambda p: (
            p["meta"]["device"] != "cuda",
            p["meta"]["device"],
            -p["meta"]["torch_threads"],
        )
    )
    if not payloads:
        parts.append("\n_No results yet._\n")
    for p in payloads:
        m = p["meta"]
        p["ratios"], p["targets"] = derive(p["records"], m["device"])  # current definitions
        commits = sorted({r.get("commit") or "?" for r in p["records"]})
        parts.append(
            f"\n### {m['device_name']} ({m['device']}, {m['cpu_count']} cores, "
            f"{m['torch_threads']} torch threads)\n\n"
            f"torch {m['torch']}, triton {m['triton']}, commit {', '.join(commits)}"
            f"{' (uncommitted changes)' if m.get('dirty') else ''}, {m['date'][:10]}; "
            f"load average {_f(m.get('loadavg_1m'), '.1f')} at the end of the run.\n"
        )
        parts.append("\n".join(_tables(p)) + "\n")
    return "\n".join(parts)


def write_readme() -> None:
    _util.update_readme_section(README_KEY, render_section(), heading=README_HEADING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--table", action="store_true", help="regenerate the README section from results/*.json"
    )
    args, rest = parser.parse_known_args(argv)
    if args.table:
        write_readme()
        print(f"wrote {_util.README}")
        return 0
    return pytest.main([__file__, *rest])


if __name__ == "__main__":
    sys.exit(main())
