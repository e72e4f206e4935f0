"""Trajectory matching: time and peak memory of one loss forward + backward.

Providers, side by side on the same workload (ConvNet-3, width 128, 32x32, 10 classes, DSA):

* ``unrolled``            autograd through every step (the original MTT code)
* ``exact``               :func:`trajectory_matching_loss` default, constant-memory adjoint
* ``first_order``         the library's first-order mode
* ``published_two_pass``  the first-order scheme as the TESLA / GLaD / H-PD code structures it
                          (re-implemented below: a forward sweep that builds a double-backward
                          graph at every step, then a second sweep with a per-step surrogate)

Grid (environment variables):

* default (a 2-core CPU can afford it): ``syn_steps`` 10, 20 at IPC 10
* ``HPD_BENCH_FULL=1``: ``syn_steps`` 10, 20, 40, 80 at IPC 1 and 10
* overrides: ``HPD_BENCH_STEPS="10,80"``, ``HPD_BENCH_IPC="1"``, ``HPD_BENCH_MODES="exact"``,
  ``HPD_BENCH_ROUNDS`` (timed rounds; default 1 on CPU, 3 on CUDA), ``HPD_BENCH_MEMORY=0`` to
  skip the memory subprocesses, ``HPD_BENCH_TIME=0`` for peak memory only. Rows of configurations
  a run does not measure are kept from the existing result file (``HPD_BENCH_MERGE=0``: not).
* devices: ``--bench-device`` / ``HPD_BENCH_DEVICE`` = ``auto`` (the CPU, plus CUDA when
  visible), ``cpu``, ``cuda`` or a comma list; ``--bench-threads N`` / ``HPD_BENCH_THREADS``
  tags the result file with ``-Nt``.

Peak memory is measured in a fresh subprocess per configuration (this file run as a script):
CPU peak RSS (``VmHWM``, reset just before the call) minus the RSS just before it, and on CUDA
``torch.cuda.max_memory_allocated``. A configuration whose memory run fails for lack of
memory is recorded as ``oom`` and not timed.

Run::

    PYTHONPATH=. pytest benchmarks/bench_trajectory.py -s

Results go to ``benchmarks/results/trajectory_<device-slug>[-<N>t].json`` and a table is
printed at the end of the run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _util
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpd_fast._common import reset_peak_memory, status_kib
from hpd_fast.augment import DSA
from hpd_fast.distill.trajectory import batch_schedule, trajectory_matching_loss
from hpd_fast.models.convnet import ConvNet
from hpd_fast.params import flatten_params, functional_forward

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 10
WIDTH, DEPTH, RES = 128, 3, 32
# ``unrolled_pytorch``: the full unroll as the original MTT writes it (plain PyTorch ConvNet, no
# fused kernels, autograd through every step); ``unrolled``: the same unroll through the
# library's student (fused blocks); ``exact`` / ``first_order``: the library's sweeps (fused
# student, default snapshot budget); ``exact_all``: exact storing every parameter snapshot
# (``max_snapshots=None``, nothing rebuilt); ``published_two_pass``: the
# first-order scheme as the published GAN-prior code runs it (plain PyTorch ConvNet);
# ``published_two_pass_fused``: the same scheme on the library's fused student, which isolates
# the scheme from the kernels.
MODES = (
    "unrolled_pytorch",
    "unrolled",
    "exact",
    "exact_all",
    "first_order",
    "published_two_pass",
    "published_two_pass_fused",
)


def _env_ints(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = os.environ.get(name)
    return tuple(int(v) for v in raw.split(",")) if raw else default


def _rounds(device: str) -> int:
    return int(os.environ.get("HPD_BENCH_ROUNDS", "3" if device.startswith("cuda") else "1"))


FULL = os.environ.get("HPD_BENCH_FULL", "0") == "1"
STEPS = _env_ints("HPD_BENCH_STEPS", (10, 20, 40, 80) if FULL else (10, 20))
IPCS = _env_ints("HPD_BENCH_IPC", (1, 10) if FULL else (10,))
BENCH_MODES = tuple(os.environ.get("HPD_BENCH_MODES", ",".join(MODES)).split(","))
MEASURE_MEMORY = os.environ.get("HPD_BENCH_MEMORY", "1") != "0"
MEASURE_TIME = os.environ.get("HPD_BENCH_TIME", "1") != "0"
# HPD_BENCH_PAIRED=R: the selected modes in alternation, R rounds (see test_trajectory_paired).
PAIRED_ROUNDS = int(os.environ.get("HPD_BENCH_PAIRED", "0"))


# --------------------------------------------------------------------------------------------
# the published two-pass first-order scheme (benchmark baseline, not part of the library)
# --------------------------------------------------------------------------------------------


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    if y.is_floating_point():
        return -(y * logits.log_softmax(1)).sum(1).mean()
    return F.cross_entropy(logits, y)


def published_two_pass(
    student: nn.Module,
    images: Tensor,
    labels: Tensor,
    syn_lr: Tensor,
    start: Tensor,
    target: Tensor,
    *,
    syn_steps: int,
    batch_syn: int | None = None,
    augment: Callable[[Tensor, int], Tensor] | None = None,
    seed: int = 0,
) -> Tensor:
    """First-order trajectory matching computed the way the published code organises it.

    Pass 1 walks the trajectory and, at every step, computes ``g_t`` with ``create_graph=True``
    (a double-backward graph nobody uses), keeping each step's augmented batch with its graph
    back to ``images`` and the running sum ``G = sum_t g_t``. Pass 2 recomputes ``g_t`` at the
    stored ``theta_t`` with a graph and differentiates, with respect to the batch, the surrogate
    ``(alpha^2 <g_t, g_t> + 2 alpha <g_t, alpha (G - stopgrad g_t) - theta_0 + theta*>) / D``
    whose gradient in ``g_t`` is ``-alpha lambda_N``. ``alpha`` enters both passes as a Python
    float; its gradient comes from the scalar ``||theta_0 - alpha G - theta*||^2 / D``.

    Accumulates into ``images.grad`` and ``syn_lr.grad`` (when they require grad) and returns
    the loss (0-dim, detached). Hard or soft labels; no label gradient (as published).
    """
    sched = batch_schedule(images.shape[0], syn_steps, batch_syn, seed)
    alpha = float(syn_lr.detach())
    start, target = start.detach(), target.detach()
    dist = (start - target).pow(2).sum()

    params = [start.clone().requires_grad_(True)]
    batches: list[Tensor] = []
    augmented: list[Tensor] = []
    g_sum = torch.zeros_like(start)
    for idx, s in zip(sched.indices, sched.aug_seeds, strict=True):
        idx = idx.to(images.device)
        xb = images[idx]
        xa = augment(xb, s) if augment is not None else xb
        batches.append(xb)
        augmented.append(xa)
        w = params[-1].detach().clone().requires_grad_(True)
        ce = _ce(functional_forward(student, w, xa), labels[idx])
        (g,) = torch.autograd.grad(ce, w, create_graph=True, retain_graph=True)
        params.append(w - alpha * g.detach())
        g_sum = g_sum + g.detach()

    grad_x = torch.zeros_like(images) if images.requires_grad else None
    if grad_x is not None:
        for t, idx in enumerate(sched.indices):
            idx = idx.to(images.device)
            w = params[t]
            ce = _ce(functional_forward(student, w, augmented[t]), labels[idx])
            (g,) = torch.autograd.grad(ce, w, create_graph=True, retain_graph=True)
            square = alpha**2 * g.dot(g)
            single = 2 * alpha * g.dot(alpha * (g_sum - g.detach()) - start + target)
            (gx,) = torch.autograd.grad((square + single) / dist, batches[t])
            grad_x.index_add_(0, idx, gx)
        images.grad = grad_x if images.grad is None else images.grad + grad_x

    with torch.enable_grad():
        lr = syn_lr.detach().requires_grad_(True)
        loss = (start - lr * g_sum - target).pow(2).sum() / dist
        (grad_lr,) = torch.autograd.grad(loss, lr)
    if syn_lr.requires_grad:
        syn_lr.grad = grad_lr if syn_lr.grad is None else syn_lr.grad + grad_lr
    return loss.detach()


# --------------------------------------------------------------------------------------------
# workload
# --------------------------------------------------------------------------------------------


def make_workload(ipc: int, device: str, dtype: torch.dtype = torch.float32) -> dict:
    """ConvNet-3 (width 128, 32x32) student, ``10 * ipc`` images, expert-like start/target."""
    torch.manual_seed(0)
    net = ConvNet(3, NUM_CLASSES, WIDTH, DEPTH, im_size=(RES, RES)).to(device, dtype)
    plain = ConvNet(3, NUM_CLASSES, WIDTH, DEPTH, im_size=(RES, RES), fused=False)
    plain = plain.to(device, dtype)
    plain.load_state_dict(net.state_dict())  # same parameters, same flat layout
    start = flatten_params(net)
    target = start + 0.01 * torch.randn_like(start)
    images = torch.randn(NUM_CLASSES * ipc, 3, RES, RES, device=device, dtype=dtype)
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(ipc)
    return dict(
        net=net, plain=plain, start=start, target=target, images=images, labels=labels, dsa=DSA()
    )


def run_once(work: dict, mode: str, syn_steps: int) -> float:
    """One forward + backward of ``mode``; returns the loss."""
    x = work["images"].clone().requires_grad_(True)
    lr = torch.tensor(0.01, device=x.device, dtype=x.dtype, requires_grad=True)
    args = (work["net"], x, work["labels"], lr, work["start"], work["target"])
    kw = dict(syn_steps=syn_steps, augment=work["dsa"], seed=0)
    if mode == "published_two_pass":
        loss = published_two_pass(work["plain"], *args[1:], **kw)
    elif mode == "published_two_pass_fused":
        loss = published_two_pass(*args, **kw)
    elif mode == "exact_all":
        loss = trajectory_matching_loss(*args, mode="exact", max_snapshots=None, **kw)
        loss.backward()
    elif mode == "unrolled_pytorch":
        loss = trajectory_matching_loss(work["plain"], *args[1:], mode="unrolled", **kw)
        loss.backward()
    else:
        loss = trajectory_matching_loss(*args, mode=mode, **kw)
        loss.backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------
# peak memory in a fresh process
# --------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in bytes."""
    kib = status_kib(field)
    if kib is None:
        raise RuntimeError(f"{field} not found in /proc/self/status")
    return kib * 1024


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found")


def _measure_in_this_process(mode: str, syn_steps: int, ipc: int, device: str) -> dict:
    """Body of the memory subprocess: one call, peak memory above the pre-call baseline."""
    work = make_workload(ipc, device)
    if device == "cpu":
        # Fail with an allocation error instead of waking the OOM killer on a shared machine.
        with open("/proc/self/statm") as f:
            vsize = int(f.read().split()[0]) * resource.getpagesize()
        limit = vsize + int(0.85 * _mem_available_bytes())
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_cuda = torch.cuda.memory_allocated() if device != "cpu" else 0
    reset_peak_memory()
    before = _proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    try:
        run_once(work, mode, syn_steps)
    except (MemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        return {"oom": True}
    seconds = time.perf_counter() - t0
    out = {
        "oom": False,
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child spawned by
        # the (large) benchmark process would report the parent's peak.
        "peak_rss_bytes": _proc_status_bytes("VmHWM") - before,
        "fresh_process_seconds": seconds,
    }
    if device != "cpu":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() - base_cuda
    return out


def measure_peak_memory(mode: str, syn_steps: int, ipc: int, device: str) -> dict:
    """Run :func:`_measure_in_this_process` in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--peak-memory", mode, str(syn_steps), str(ipc), device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        # Killed (e.g. SIGKILL by the OOM killer) counts as out of memory; anything else fails.
        if proc.returncode < 0:
            return {"oom": True}
        raise RuntimeError(f"memory subprocess failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------

_RESULTS: dict[str, list[dict]] = {}  # device -> rows
_PAIRED: list[dict] = []  # test_trajectory_paired, CPU


def _fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _table(rows: list[dict]) -> str:
    """Markdown table; ratios are against ``unrolled`` at the same (IPC, syn_steps)."""
    base = {(r["ipc"], r["syn_steps"]): r for r in rows if r["mode"] == "unrolled"}
    plain = {(r["ipc"], r["syn_steps"]): r for r in rows if r["mode"] == "unrolled_pytorch"}
    mem_key = "peak_cuda_bytes" if any("peak_cuda_bytes" in r for r in rows) else "peak_rss_bytes"
    lines = [
        f"| IPC | steps | mode | median s | IQR s | time / unrolled | time / unrolled_pytorch "
        f"| peak MiB ({mem_key}) | mem / unrolled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(MODES)}
    for r in sorted(rows, key=lambda r: (r["ipc"], r["syn_steps"], order.get(r["mode"], 99))):
        ref = base.get((r["ipc"], r["syn_steps"]))
        ref_plain = plain.get((r["ipc"], r["syn_steps"]))
        t_ratio = m_ratio = p_ratio = "-"
        if r.get("median_s") and ref and ref.get("median_s"):
            t_ratio = f"{r['median_s'] / ref['median_s']:.2f}"
        if r.get("median_s") and ref_plain and ref_plain.get("median_s"):
            p_ratio = f"{r['median_s'] / ref_plain['median_s']:.2f}"
        if r.get(mem_key) and ref and ref.get(mem_key):
            m_ratio = f"{r[mem_key] / ref[mem_key]:.2f}"
        median = (
            "oom"
            if r.get("oom")
            else ("-" if r.get("median_s") is None else f"{r['median_s']:.2f}")
        )
        iqr = "-" if r.get("oom") or r.get("iqr_s") is None else f"{r['iqr_s']:.2f}"
        lines.append(
            f"| {r['ipc']} | {r['syn_steps']} | {r['mode']} | {median} | {iqr} | {t_ratio} "
            f"| {p_ratio} | {_fmt_mib(r.get(mem_key))} | {m_ratio} |"
        )
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _write_results(request):
    yield
    threads_opt = request.config.getoption("bench_threads", default=None)
    threads_opt = threads_opt or os.environ.get("HPD_BENCH_THREADS")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for device, rows in _RESULTS.items():
        tag = f"-{int(threads_opt)}t" if threads_opt else ""
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"trajectory_{_util.slug(_util.device_name(device))}{tag}.json"
        rows = _merge(path, rows)
        payload = _payload(device, rows)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        text = (
            f"\ntrajectory matching on {payload['device_name']} ({device}, "
            f"{payload['threads']} threads, load {payload['loadavg_1m']}) -> {path.name}\n"
            f"{_table(rows)}\n"
        )
        if reporter is not None:
            reporter.write_line(text)
        else:
            print(text)
    if _PAIRED:  # test_trajectory_paired runs on the CPU
        path = RESULTS_DIR / f"trajectory_{_util.slug(_util.device_name('cpu'))}-paired.json"
        payload = _payload("cpu", [])
        payload["paired"] = _PAIRED
        path.write_text(json.dumps(payload, indent=2) + "\n")


def _merge(path: Path, rows: list[dict]) -> list[dict]:
    """This run's rows plus the rows of ``path`` for configurations this run did not measure.

    The grid is usually measured in several runs (the 80-step rows alone take long); every row
    carries its own commit, time and load average.
    """
    key = lambda r: (r["mode"], r["syn_steps"], r["ipc"])  # noqa: E731
    if os.environ.get("HPD_BENCH_MERGE", "1") == "0" or not path.exists():
        return rows
    try:
        old = json.loads(path.read_text()).get("results", [])
    except (OSError, ValueError):
        return rows
    mine = {key(r) for r in rows}
    # Rows of a mode this file no longer defines were measured by another version: dropped.
    return [r for r in old if r.get("mode") in MODES and key(r) not in mine] + rows


def _payload(device: str, rows: list[dict]) -> dict:
    """Result file content: workload, hardware, versions, commit, rows."""
    import triton  # noqa: F401  (version only; the benchmark itself does not use it)

    return {
        "benchmark": "trajectory_matching_loss forward+backward",
        "workload": {
            "student": f"ConvNet depth {DEPTH} width {WIDTH} instancenorm",
            "image_size": RES,
            "num_classes": NUM_CLASSES,
            "augment": "DSA (default strategy)",
            "batch_syn": "full (M)",
            "dtype": "float32",
        },
        "device": device,
        "device_name": _util.device_name(device),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": _util.git_commit(short=False),
        "grid": "full" if FULL else "default",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # Other work on a shared machine shows here: CPU timings under load are ratios at best.
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "memory_note": "peak_rss_bytes: VmHWM of a fresh process minus its RSS before the call",
        "results": rows,
    }


# --------------------------------------------------------------------------------------------
# benchmarks and a parity check of the baseline
# --------------------------------------------------------------------------------------------


def test_published_two_pass_matches_first_order():
    """The baseline computes what ``mode="first_order"`` computes (so timings compare)."""
    torch.manual_seed(0)
    dt = torch.float64
    net = ConvNet(3, 4, 6, 2, im_size=(8, 8)).to(dt)
    start = flatten_params(net)
    target = start + 0.05 * torch.randn_like(start)
    images = torch.randn(6, 3, 8, 8, dtype=dt)
    labels = torch.arange(6) % 4
    grads = []
    for fn in ("published", "library"):
        x = images.clone().requires_grad_(True)
        lr = torch.tensor(0.1, dtype=dt, requires_grad=True)
        kw = dict(syn_steps=5, batch_syn=4, augment=DSA(), seed=7)
        if fn == "published":
            loss = published_two_pass(net, x, labels, lr, start, target, **kw)
        else:
            loss = trajectory_matching_loss(
                net, x, labels, lr, start, target, mode="first_order", **kw
            )
            loss.backward()
        grads.append((loss.detach(), x.grad, lr.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize the benchmark over devices (from ``--bench-device`` when registered)."""
    if "bench_dev" in metafunc.fixturenames:
        spec = metafunc.config.getoption("bench_device", default=None)
        metafunc.parametrize("bench_dev", _util.bench_devices(spec))


@pytest.mark.parametrize("mode", [m for m in MODES if m in BENCH_MODES])
@pytest.mark.parametrize("syn_steps", STEPS)
@pytest.mark.parametrize("ipc", IPCS)
def test_trajectory_benchmark(benchmark, bench_dev: str, ipc: int, syn_steps: int, mode: str):
    device = bench_dev
    rows = _RESULTS.setdefault(device, [])
    row: dict = {
        "mode": mode,
        "syn_steps": syn_steps,
        "ipc": ipc,
        "num_images": 10 * ipc,
        "commit": _util.git_commit(short=False),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if MEASURE_MEMORY:
        row.update(measure_peak_memory(mode, syn_steps, ipc, device))
        if row["oom"]:
            rows.append(row)
            pytest.skip(f"{mode} at {syn_steps} steps, IPC {ipc} does not fit in memory")
    if not MEASURE_TIME:
        row["loadavg_1m"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        pytest.skip("HPD_BENCH_TIME=0: peak memory only")
    work = make_workload(ipc, device)
    benchmark.group = f"trajectory {device} IPC {ipc} steps {syn_steps}"
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "mode"})
    benchmark.pedantic(run_once, args=(work, mode, syn_steps), rounds=_rounds(device), iterations=1)
    st = benchmark.stats.stats
    row.update(
        rounds=st.rounds,
        median_s=st.median,
        iqr_s=st.iqr,
        min_s=st.min,
        mean_s=st.mean,
        stddev_s=st.stddev if st.rounds > 1 else 0.0,
        loadavg_1m=round(os.getloadavg()[0], 2),
    )
    rows.append(row)


@pytest.mark.skipif(PAIRED_ROUNDS < 1, reason="set HPD_BENCH_PAIRED=<rounds> to run it")
@pytest.mark.parametrize("syn_steps", STEPS)
@pytest.mark.parametrize("ipc", IPCS)
def test_trajectory_paired(ipc: int, syn_steps: int):
    """The selected modes in alternation on the CPU: every round times each mode once (the
    order rotates every round), so slow and fast phases of a shared machine fall on all of
    them alike; each mode's time is compared with the first mode's in the same round.
    Results: ``trajectory_<device>-paired.json``; e.g. ``HPD_BENCH_MODES=unrolled,exact``."""
    import statistics

    modes = [m for m in BENCH_MODES if m in MODES]
    work = make_workload(ipc, "cpu")
    for mode in modes:
        run_once(work, mode, syn_steps)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(PAIRED_ROUNDS):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            t0 = time.perf_counter()
            run_once(work, mode, syn_steps)
            times[mode].append(time.perf_counter() - t0)
    ref = modes[0]
    ratios = {m: sorted(a / b for a, b in zip(times[m], times[ref])) for m in modes[1:]}
    _PAIRED.append({
        "ipc": ipc, "syn_steps": syn_steps, "rounds": PAIRED_ROUNDS, "reference": ref,
        "commit": _util.git_commit(short=False), "loadavg_1m": round(os.getloadavg()[0], 2),
        "times_s": times, "median_s": {m: statistics.median(v) for m, v in times.items()},
        "ratio_median": {m: statistics.median(v) for m, v in ratios.items()},
        "ratio_min": {m: v[0] for m, v in ratios.items()},
        "ratio_max": {m: v[-1] for m, v in ratios.items()},
    })  # fmt: skip


def _paired_table(paired: list[dict]) -> str:
    lines = [
        "| IPC | steps | mode | rounds | median s | time / reference (median of rounds) | range |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in paired:
        for m, med in p["median_s"].items():
            if m == p["reference"]:
                ratio, rng = "1.00 (reference)", "-"
            else:
                ratio = f"{p['ratio_median'][m]:.2f}"
                rng = f"{p['ratio_min'][m]:.2f}-{p['ratio_max'][m]:.2f}"
            lines.append(
                f"| {p['ipc']} | {p['syn_steps']} | {m} | {p['rounds']} | {med:.2f} | {ratio} "
                f"| {rng} |"
            )
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "--table":
    # python benchmarks/bench_trajectory.py --table [RESULT.json ...]: tables from result files
    for f in sys.argv[2:] or sorted(str(p) for p in RESULTS_DIR.glob("trajectory_*.json")):
        d = json.loads(Path(f).read_text())
        print(
            f"\n### {d['device_name']} ({d['device']}, {d['threads']} threads) — {Path(f).name}\n"
        )
        print(_paired_table(d["paired"]) if d.get("paired") else _table(d["results"]))
elif __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--peak-memory":
    _mode, _steps, _ipc, _device_arg = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    print(json.dumps(_measure_in_this_process(_mode, _steps, _ipc, _device_arg)))
