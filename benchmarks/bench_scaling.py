"""Trajectory matching as the synthetic set grows: images rendered and time per H-PD iteration.

One H-PD trajectory-matching iteration (``HPD._step``: render, loss, backward through the
student trajectory and the generator, optimiser step) at a fixed student schedule,
``syn_steps x batch_syn`` = 10 x 100 (at most 1,000 images touched per iteration), as the
number of synthetic images M = IPC x 10 classes grows from 100 to 20,000. Two paths, on the same
:class:`hpd_fast.HPD` object, latents, experts and iteration index:

* ``today``  ``hpd._render_all = True``: every iteration renders all M images (forward without
             a graph) and re-renders all M in the backward; the private reference path of the
             tests, what every iteration did before ``HPD._mtt_union``.
* ``new``    the default: only the union of the images the iteration's minibatch schedules
             touch (``min(M, syn_steps x batch_syn)`` here) is rendered and re-rendered; the
             other images get a zero gradient. Same numbers (the suite checks the losses).

Generators (``GEN_SETTINGS``: render chunk, paired rounds, largest M at which today's path runs):

* ``shipped``  :func:`hpd_fast.generators.pretrained` ("digits": ConvGenerator, latent 32,
               width 32, 4 stages, 1x8x8) on the embedded digits; timed at stage 1 (every
               synthesis stage rendered); chunks of 10 (HPD's default); 3 rounds; today's path
               up to M = 20,000.
* ``stylegan`` ``benchmarks/stylegan_shaped.py``'s ``make_stylegan_shaped`` with ``SG_KWARGS``:
               StyleGAN-XL's 16 px stem (input and 11 layers at 36x36, two critically sampled
               layers, ToRGB) with 4 channels, on a random dataset of its image shape (3x16x16)
               and 10 classes; timed at stage 2 (H-PD's first optimised StyleGAN-XL stage: every
               synthesis layer rendered); chunks of 50 (its layers are so thin that per-call
               overhead would dominate chunks of 10); 2 rounds; today's path up to M = 5,000
               (at 20,000 it is not run: its images are M + M by definition).

Student: ConvNet width 8 (depth for the resolution). Experts: one synthetic trajectory (a random
ConvNet and two noise steps; the iteration's cost does not depend on the values), expert_epochs
1. Each (generator, M): one untimed warm-up iteration of the new path (at M <= 1,000 it is the
very code of today's path), then paired rounds in ABBA order (today, new, new, today, ...),
each call from a fresh copy of the same starting state with the round's iteration index, so
both paths run the same schedule and must give the same loss (checked). The new path is timed
by pytest-benchmark (``benchmark.pedantic``; today's path runs in its untimed set-up), both
also by ``time.perf_counter`` around ``HPD._step``, which the table uses. Images rendered: a
wrapper around ``G.render`` sums the batch of every call, forward (no grad) and the backward's
re-render (grad) apart. Peak memory: one iteration in a fresh process (``VmHWM`` after a reset,
minus the resident size before it; no warm-up), both paths, at the largest M up to 5,000.

Environment: ``HPD_BENCH_M`` (default ``100,1000,5000,20000``; multiples of 10),
``HPD_BENCH_GENERATORS`` (default ``shipped,stylegan``), ``HPD_BENCH_ROUNDS`` and
``HPD_BENCH_TODAY_MAX_M`` (override ``GEN_SETTINGS`` for both generators),
``HPD_BENCH_MEMORY=0`` to skip the peak-memory subprocesses, ``HPD_BENCH_MEMORY_MAX_M``
(default 5000: peak memory at the largest M up to it).

Run (5.5 minutes with one torch thread on a 2-core machine whose load average was 6 from other
work; ``--bench-threads 1`` is far steadier than 2 threads on a shared machine)::

    .venv/bin/python -m pytest benchmarks/bench_scaling.py --bench-threads 1
    .venv/bin/python benchmarks/bench_scaling.py --table   # README section from results/*.json

Results: ``benchmarks/results/scaling_<device>-<threads>t.json`` (rows of configurations a run
did not measure are kept) and the "Trajectory matching vs the number of synthetic images"
section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import pytest
import torch

SUITE = "scaling"
README_KEY = "scaling"
README_HEADING = "## Trajectory matching vs the number of synthetic images (M)"
K = 10  # classes
SYN_STEPS = 10
BATCH_SYN = 100
STUDENT_WIDTH = 8
M_GRID = tuple(int(m) for m in os.environ.get("HPD_BENCH_M", "100,1000,5000,20000").split(","))
GENERATORS = tuple(os.environ.get("HPD_BENCH_GENERATORS", "shipped,stylegan").split(","))
PATHS = ("today", "new")
# Per generator: images per render chunk (the shipped one: HPD's default 10; the StyleGAN-shaped
# one has so few channels that per-call overhead would dominate chunks of 10), paired rounds,
# and the largest M at which today's path is run (beyond it: M + M images, not timed).
GEN_SETTINGS: dict[str, dict[str, int]] = {
    "shipped": {"chunk_size": 10, "rounds": 3, "today_max_m": 20000},
    "stylegan": {"chunk_size": 50, "rounds": 2, "today_max_m": 5000},
}
for _g, _s in GEN_SETTINGS.items():
    if os.environ.get("HPD_BENCH_ROUNDS"):
        _s["rounds"] = int(os.environ["HPD_BENCH_ROUNDS"])
    if os.environ.get("HPD_BENCH_TODAY_MAX_M"):
        _s["today_max_m"] = int(os.environ["HPD_BENCH_TODAY_MAX_M"])
MEASURE_MEMORY = os.environ.get("HPD_BENCH_MEMORY", "1") != "0"
# Peak memory is measured (both paths, fresh processes) at the largest M of the grid up to this
# one at which today's path runs (a fresh process costs an import and an unwarmed iteration).
MEMORY_MAX_M = int(os.environ.get("HPD_BENCH_MEMORY_MAX_M", "5000"))
# The StyleGAN-shaped generator: StyleGAN-XL's 16 px stem (input and 11 layers at 36 x 36 with
# the 10-pixel margin, then the critically sampled layers and ToRGB) with 4 channels, so that
# thousands of images render in seconds on a CPU.
SG_KWARGS: dict[str, Any] = {
    "resolution": 16,
    "channel_max": 4,
    "channel_base": 64,
    "w_dim": 16,
    "z_dim": 16,
}

_DESCRIBE = {
    "shipped": "shipped ConvGenerator (digits 1×8×8, stage 1)",
    "stylegan": "StyleGAN-XL-shaped (3×{resolution}², channel_max {channel_max}, w_dim {w_dim}, "
    "stage 2)",
}


# --------------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------------


class SyntheticExperts:
    """The experts contract (``trajectories``, ``model_config``, ``lr``, ``check_student``):
    one trajectory of a random ConvNet plus two small noise steps. An iteration's cost does not
    depend on the values, and this needs no training."""

    def __init__(self, channels: int, im_size: tuple[int, int], epochs: int = 2) -> None:
        from hpd_fast.models import get_model
        from hpd_fast.params import flatten_params, param_layout

        self.model_config = {
            "name": "ConvNet",
            "channel": channels,
            "num_classes": K,
            "im_size": list(im_size),
            "kwargs": {"width": STUDENT_WIDTH},
        }
        self.lr = 0.01
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = get_model("ConvNet", channels, K, im_size, width=STUDENT_WIDTH)
        p = flatten_params(net)
        gen = torch.Generator().manual_seed(1)
        rows = [p]
        for _ in range(epochs):
            rows.append(rows[-1] + 0.01 * torch.randn(p.shape, generator=gen))
        self.trajectories = [torch.stack(rows)]
        self._layout = param_layout(net)

    def check_student(self, student: torch.nn.Module) -> None:
        from hpd_fast.params import param_layout

        if param_layout(student) != self._layout:
            raise ValueError("student layout differs from the experts'")


def _counting(G: Any) -> Any:
    """``G`` whose ``render`` adds the batch of every call to ``G.counts`` (forward: no grad;
    backward: the re-render with a graph)."""
    if getattr(G, "_counting", False):
        return G
    plain = G.render

    def render(w, f, stage):
        key = "backward" if torch.is_grad_enabled() else "forward"
        G.counts[key] += int(f.shape[0])
        return plain(w, f, stage)

    G.render = render
    G.counts = {"forward": 0, "backward": 0}
    G._counting = True
    return G


def _random_data(shape: tuple[int, ...]) -> Any:
    from hpd_fast.data.dataset import DistillData

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(K).repeat_interleave(20)
    x = torch.randn(len(y), *shape, generator=gen)
    return DistillData(
        "random", x, y, x[:K].clone(), y[:K].clone(), [str(c) for c in range(K)],
        (0.5,) * shape[0], (0.5,) * shape[0],
    )  # fmt: skip


def stylegan_available() -> str | None:
    """None when ``benchmarks/stylegan_shaped.py`` imports, else why not."""
    try:
        import stylegan_shaped  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means: skip that generator
        return f"benchmarks/stylegan_shaped.py does not import: {type(exc).__name__}: {exc}"
    return None


_WORKLOADS: dict[str, dict[str, Any]] = {}


def workload(name: str) -> dict[str, Any]:
    """Generator (counting), dataset, experts and the stage timed, built once per process."""
    if name in _WORKLOADS:
        return _WORKLOADS[name]
    if name == "shipped":
        from hpd_fast.data import load
        from hpd_fast.generators import pretrained

        G, data, stage = pretrained("digits"), load("digits"), 1
    elif name == "stylegan":
        from stylegan_shaped import make_stylegan_shaped

        kw = dict(SG_KWARGS)
        G = make_stylegan_shaped(K, kw.pop("resolution"), device="cpu", seed=0, **kw)
        data, stage = _random_data(tuple(G.image_shape)), 2
    else:
        raise ValueError(f"unknown generator workload {name!r}: shipped or stylegan")
    G = _counting(G.eval())
    experts = SyntheticExperts(data.channels, tuple(data.im_size))
    _WORKLOADS[name] = {"G": G, "data": data, "experts": experts, "stage": stage}
    return _WORKLOADS[name]


def build(name: str, m: int) -> tuple[Any, int, torch.Tensor, torch.Tensor]:
    """The HPD object for M = m images, the stage timed and the starting latents there (as
    :meth:`HPD.fit` makes them)."""
    from hpd_fast.distill import HPD
    from hpd_fast.distill.losses import derive_seed

    if m % K:
        raise ValueError(f"M must be a multiple of {K} classes, got {m}")
    work = workload(name)
    stage = work["stage"]
    hpd = HPD(
        work["G"], work["data"], ipc=m // K, algorithm="mtt", experts=work["experts"],
        syn_steps=SYN_STEPS, batch_syn=min(BATCH_SYN, m), expert_epochs=1,
        model_kwargs={"width": STUDENT_WIDTH}, iterations_per_stage=1, select="last",
        first_stage=stage, last_stage=stage, chunk_size=GEN_SETTINGS[name]["chunk_size"],
    )  # fmt: skip
    _time_checks(hpd)
    G = work["G"]
    w, f = G.sample_latents(hpd.labels, derive_seed(hpd.seed, "latents"))
    w, f = w.float(), f.float()
    for k in range(1, stage):
        f = hpd._advance(w, f, k).float()
    return hpd, stage, w, f


def fresh_state(hpd: Any, stage: int, w: torch.Tensor, f: torch.Tensor) -> Any:
    """A RunState at ``stage`` with private copies of the latents and new optimisers."""
    from hpd_fast.distill.state import RunState

    st = RunState()
    st.stage, st.iteration = stage, 0
    st.w, st.f = w, f  # _new_optimizers copies them
    st.syn_lr = torch.tensor(hpd.lr_teacher, device=hpd.device)
    hpd._new_optimizers(st, keep_lr_state=False)
    return st


def _time_checks(hpd: Any) -> None:
    """Wrap ``hpd._check_finite`` (the non-finite guard on all M latents, before and after
    every step) so that its seconds add up in ``hpd.check_s``."""
    plain = hpd._check_finite
    hpd.check_s = 0.0

    def checked(*args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        try:
            plain(*args, **kwargs)
        finally:
            hpd.check_s += time.perf_counter() - t0

    hpd._check_finite = checked


def iteration(hpd: Any, st: Any, stage: int, it: int, path: str) -> dict[str, Any]:
    """One ``HPD._step`` on ``path``: seconds, loss, images rendered forward / backward, and
    the seconds of it spent in ``_check_finite``."""
    G = hpd.generator
    hpd._render_all = path == "today"
    G.counts = {"forward": 0, "backward": 0}
    hpd.check_s = 0.0
    t0 = time.perf_counter()
    loss = hpd._step(st, stage, it)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "loss": loss, **G.counts, "check_finite_s": hpd.check_s}


def memory_run(name: str, m: int, path: str):
    """For the peak-memory subprocess: a closure running one iteration (state built here)."""
    hpd, stage, w, f = build(name, m)
    st = fresh_state(hpd, stage, w, f)
    return lambda: iteration(hpd, st, stage, 0, path)


# --------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------

_ROWS: list[dict[str, Any]] = []


def _stats(times: list[float]) -> dict[str, Any] | None:
    if not times:
        return None
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times * 3)
    return {
        "median_s": statistics.median(times),
        "iqr_s": q3 - q1,
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "rounds": len(times),
        "times_s": times,
    }


def memory_m(generator: str) -> int | None:
    """The M whose iteration's peak memory is measured: the largest M of the grid up to
    ``MEMORY_MAX_M`` at which today's path runs (both paths are measured there)."""
    ms = [m for m in M_GRID if m <= min(GEN_SETTINGS[generator]["today_max_m"], MEMORY_MAX_M)]
    return max(ms) if ms and MEASURE_MEMORY else None


def _memory(name: str, m: int, path: str) -> dict[str, Any] | None:
    if m != memory_m(name):
        return None
    import _util

    setup = f"""
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        import bench_scaling as B
        fn = B.memory_run({name!r}, {m}, {path!r})
    """
    return _util.peak_memory_subprocess(setup, "fn()")


@pytest.mark.parametrize("m", M_GRID)
@pytest.mark.parametrize("generator", GENERATORS)
def test_scaling(benchmark, generator: str, m: int) -> None:
    if generator == "stylegan" and (why := stylegan_available()) is not None:
        pytest.skip(why)
    settings = GEN_SETTINGS[generator]
    hpd, stage, w, f = build(generator, m)
    run_today = m <= settings["today_max_m"]
    # Warm-up: one untimed iteration of the new path (the same generator, student and loss
    # code as today's path, which at M <= syn_steps x batch_syn is the very same code).
    warm = iteration(hpd, fresh_state(hpd, stage, w, f), stage, 0, "new")
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}

    def today(r: int) -> None:
        runs["today"].append(iteration(hpd, fresh_state(hpd, stage, w, f), stage, r + 1, "today"))

    def setup():  # untimed by pytest-benchmark: today's rounds (ABBA order) and a fresh state
        r = len(runs["new"])
        if run_today and r % 2 == 0:
            if r > 0:
                today(r - 1)
            today(r)
        return (fresh_state(hpd, stage, w, f), r + 1), {}

    def new(st, it: int) -> None:
        runs["new"].append(iteration(hpd, st, stage, it, "new"))

    benchmark.group = f"scaling {generator}"
    benchmark.pedantic(new, setup=setup, rounds=settings["rounds"], iterations=1)
    if run_today and len(runs["today"]) < len(runs["new"]):
        today(len(runs["new"]) - 1)
    hpd._render_all = False

    # Same iteration, same state: the same loss on both paths (up to the rounding of render
    # chunks that hold other images).
    diffs = [
        abs(t["loss"] - n["loss"]) / abs(t["loss"]) for t, n in zip(runs["today"], runs["new"])
    ]
    assert all(d <= 1e-4 for d in diffs), f"losses differ between the paths: {diffs}"

    import _util

    rows = []
    for p in PATHS:
        done = runs[p]
        counted = done or (p == "new" and [warm])
        images = (
            {"forward": counted[0]["forward"], "backward": counted[0]["backward"], "counted": True}
            if counted
            else {"forward": m, "backward": m, "counted": False}  # every image, by definition
        )
        for r in done:  # every round renders the same number (the union is min(M, 1,000))
            assert (r["forward"], r["backward"]) == (images["forward"], images["backward"])
        rows.append({
            "generator": generator, "m": m, "ipc": m // K, "path": p,
            "syn_steps": SYN_STEPS, "batch_syn": min(BATCH_SYN, m), "stage": stage,
            "chunk_size": settings["chunk_size"], "images": images,
            "time": _stats([r["seconds"] for r in done]),
            "check_finite_s": _stats([r["check_finite_s"] for r in done]),
            "losses": [r["loss"] for r in done],
            "memory": _memory(generator, m, p) if done else None,
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        })  # fmt: skip
    rows[1]["warmup_s"] = warm["seconds"]
    if run_today:
        ratios = [t["seconds"] / n["seconds"] for t, n in zip(runs["today"], runs["new"])]
        rows[1]["ratio_today_over_new"] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "rounds": ratios,
        }
        rows[1]["loss_max_rel_diff"] = max(diffs)
    st = _util.stats_of(benchmark)
    if st is not None:
        rows[1]["pytest_benchmark"] = st
    _ROWS.extend(rows)


# --------------------------------------------------------------------------------------------
# results and the README
# --------------------------------------------------------------------------------------------


def _key(r: dict[str, Any]) -> tuple:
    return (r["generator"], r["m"], r["path"])


def setup_description() -> dict[str, Any]:
    return {
        "algorithm": "mtt (mode exact)",
        "syn_steps": SYN_STEPS,
        "batch_syn": BATCH_SYN,
        "expert_epochs": 1,
        "student": f"ConvNet width {STUDENT_WIDTH}",
        "per_generator": GEN_SETTINGS,
        "classes": K,
        "experts": "one synthetic trajectory (random ConvNet + 2 noise steps)",
        "generators": {
            "shipped": _DESCRIBE["shipped"],
            "stylegan": _DESCRIBE["stylegan"].format(**SG_KWARGS)
            + f"; make_stylegan_shaped kwargs {SG_KWARGS}",
        },
        "timed": "HPD._step (render, loss, backward, optimiser step) from a fresh state",
    }


@pytest.fixture(scope="module", autouse=True)
def _write_results(bench_summary: list):
    yield
    if not _ROWS:
        return
    import _util

    path = _util.results_path(SUITE, "cpu", f"{torch.get_num_threads()}t")
    fresh = {_key(r) for r in _ROWS}
    old = [r for r in (_util.read_json(path) or {}).get("rows", []) if _key(r) not in fresh]
    rows = sorted(old + _ROWS, key=lambda r: (r["generator"], r["m"], PATHS.index(r["path"])))
    payload = {
        "suite": SUITE,
        "meta": _util.run_metadata("cpu"),
        "setup": setup_description(),
        "definitions": {
            "images.forward / images.backward": "images through G.render per iteration: the "
            "render without a graph, and the backward's re-render with one",
            "time": "seconds of HPD._step per round (time.perf_counter), rounds alternating "
            "the paths in ABBA order; times_s lists them",
            "ratio_today_over_new": "per round: today's time / the new path's time",
            "check_finite_s": "seconds of the iteration spent in HPD._check_finite (the "
            "non-finite guard on all M latents, before and after the step; the gradient checks "
            "in _step are not included)",
            "memory.peak_delta_mib": "peak resident memory of one iteration beyond the "
            "resident size before it, fresh process, no warm-up",
            "pytest_benchmark": "pytest-benchmark's statistics of the new path's rounds",
        },
        "rows": rows,
    }
    _util.write_json(path, payload)
    write_readme()
    bench_summary.append((f"H-PD MTT scaling with M; results in {path.name}", _table(payload)))


def _n(x: int) -> str:
    return f"{x:,}"


def _table(payload: dict[str, Any]) -> list[str]:
    import _util

    rows = payload["rows"]
    has_mem = any(r.get("memory") for r in rows)
    out = []
    for r in rows:
        t, im = r["time"], r["images"]
        ratio = r.get("ratio_today_over_new")
        chk = r.get("check_finite_s")
        mem = r.get("memory") or {}
        cells = [
            _n(r["m"]), r["generator"], r["path"],
            f"{_n(im['forward'])} + {_n(im['backward'])}"
            + ("" if im.get("counted", True) else " (not run)"),
            f"{t['median_s']:.3f}" if t else "–",
            f"{t['min_s']:.3f}–{max(t['times_s']):.3f}" if t else "–",
            f"**{ratio['median']:.1f}×** ({ratio['min']:.1f}–{ratio['max']:.1f})" if ratio else "",
            f"{chk['median_s']:.3f}" if chk else "–",
        ]  # fmt: skip
        if has_mem:
            cells.append(f"{mem['peak_delta_mib']:.0f}" if mem else "–")
        out.append(cells)
    headers = [
        "M", "generator", "path", "images rendered / iteration (forward + backward)",
        "median s / iteration", "range s", "today / new (median of rounds, range)",
        "of which `_check_finite` s",
    ]  # fmt: skip
    if has_mem:
        headers.append("peak extra MiB")
    return _util.markdown_table(headers, out, "rll" + "r" * (len(headers) - 3)).splitlines()


_INTRO = """\
One H-PD trajectory-matching iteration (`HPD._step`: render, loss, backward through the student
trajectory and the generator, optimiser step) as the synthetic set grows from M = 100 to 20,000
images (IPC 10 to 2,000 over 10 classes) at a fixed student schedule, `syn_steps × batch_syn` =
10 × 100, so at most 1,000 images are touched per iteration. `today`: every iteration renders
all M images and re-renders all M in the backward (`hpd._render_all = True`, the private
reference path: what every iteration did before `HPD._mtt_union`); `new`: the default, which
renders only the union of the images the iteration's minibatch schedule touches (`min(M, 1,000)`
here; the others get a zero gradient). The suite checks that both paths give the same loss in
every round.

Generators: `shipped` is the digits ConvGenerator (`hpd_fast.generators.pretrained("digits")`,
1×8×8, 4 stages), timed at stage 1 (every synthesis stage rendered), render chunks of 10 (the
default `chunk_size`), 3 rounds. `stylegan` is `benchmarks/stylegan_shaped.py`'s
`make_stylegan_shaped(10, 16, channel_max=4, channel_base=64, w_dim=16, z_dim=16)`:
StyleGAN-XL's 16 px stem geometry (input and 11 layers at 36×36, the critically sampled layers,
ToRGB; 12 stages, `w` of 13 × 16 and `f` of 4 × 36 × 36 per image) with 4 channels, on a random
3×16×16 dataset, timed at stage 2 (H-PD's first optimised StyleGAN-XL stage: every synthesis
layer rendered), render chunks of 50 (its layers are so thin that per-call overhead would
dominate chunks of 10), 2 rounds; its today's path is not run at M = 20,000 (it renders M + M
images by definition: "not run"). Student: ConvNet width 8; experts: one synthetic trajectory
(the cost does not depend on its values), `expert_epochs` 1.

Images rendered per iteration are counted by a wrapper around `G.render` (the forward render
without a graph + the backward's re-render with one). Each configuration runs one untimed
warm-up iteration (new path), then paired rounds in ABBA order (today, new, new, today, ...),
every call from a fresh copy of the same starting state with the round's iteration index, so
both paths run the same schedule. "today / new" is the median (and range) over rounds of the
per-round time ratio. "of which `_check_finite` s": the part of the iteration spent in the
non-finite guard on the latents (one `torch.aminmax` pass over all M latents before and after
the step; the checks of the gradients inside `_step` are not included): it is O(M) on both
paths. "peak extra MiB": peak resident memory of one iteration beyond the resident size
before it, in a fresh process (no warm-up), at M = 5,000; it moves by ~20 MiB between fresh
processes. CPU timings on a shared 2-core machine are noisy (the load average at the end of each
configuration is in the JSON); the image counts are exact.

```bash
.venv/bin/python -m pytest benchmarks/bench_scaling.py --bench-threads 1   # or 2
.venv/bin/python benchmarks/bench_scaling.py --table     # this section, from the JSON files
```

`HPD_BENCH_M`, `HPD_BENCH_GENERATORS`, `HPD_BENCH_ROUNDS`, `HPD_BENCH_TODAY_MAX_M`,
`HPD_BENCH_MEMORY=0`, `HPD_BENCH_MEMORY_MAX_M`: see the module docstring. Raw numbers (every
round, losses, versions, commit): `benchmarks/results/scaling_<device>-<threads>t.json`.
"""


def _findings(payload: dict[str, Any]) -> list[str]:
    """Per generator: at the largest M both paths ran, images and time, today vs new; and the
    new path at the largest M, with its `_check_finite` share."""
    out = []
    rows = payload["rows"]
    for gen in sorted({r["generator"] for r in rows}):
        by = {(r["m"], r["path"]): r for r in rows if r["generator"] == gen}
        timed = [m for (m, p), r in by.items() if p == "new" and r.get("ratio_today_over_new")]
        if timed:
            m = max(timed)
            t, n = by[(m, "today")], by[(m, "new")]
            ti, ni = t["images"], n["images"]
            t_all, n_all = ti["forward"] + ti["backward"], ni["forward"] + ni["backward"]
            line = (
                f"- `{gen}`, M = {m:,}: {n_all:,} images rendered per iteration instead of "
                f"{t_all:,} ({t_all / n_all:.0f}× fewer), {n['time']['median_s']:.2f} s instead "
                f"of {t['time']['median_s']:.2f} s per iteration "
                f"(**{n['ratio_today_over_new']['median']:.1f}×** by the median of the paired "
                "rounds)"
            )
            tm, nm = t.get("memory"), n.get("memory")
            if tm and nm:
                line += (
                    f"; peak extra memory {nm['peak_delta_mib']:.0f} MiB instead of "
                    f"{tm['peak_delta_mib']:.0f} MiB"
                )
            out.append(line + ".")
        m_new = max((m for (m, p), r in by.items() if p == "new" and r.get("time")), default=None)
        if m_new is None:
            continue
        n = by[(m_new, "new")]
        chk = n.get("check_finite_s")
        same = [  # the M's at which the new path renders as many images as at m_new
            m
            for (m, p), r in by.items()
            if p == "new" and r.get("time") and r["images"] == n["images"]
        ]
        low = min(same)
        if low == m_new:
            continue
        line = (
            f"- `{gen}`, new path from M = {low:,} to {m_new:,}: the same "
            f"{n['images']['forward']:,} + {n['images']['backward']:,} images rendered, "
            f"{by[(low, 'new')]['time']['median_s']:.2f} s to {n['time']['median_s']:.2f} s per "
            "iteration"
        )
        if chk:
            share = chk["median_s"] / n["time"]["median_s"]
            line += (
                f"; at M = {m_new:,}, {chk['median_s']:.2f} s ({share:.0%}) of it in "
                "`_check_finite` over the M latents"
            )
        out.append(line + ".")
    return out


def _load_range(payload: dict[str, Any]) -> str:
    loads = [r["loadavg_1m"] for r in payload["rows"] if r.get("loadavg_1m") is not None]
    if len(loads) < 2:
        return ""
    return f" ({min(loads):.1f}–{max(loads):.1f} at the end of its configurations)"


def write_readme() -> None:
    import _util

    parts = [_INTRO]
    for path in sorted(_util.RESULTS_DIR.glob(f"{SUITE}_*.json")):
        payload = _util.read_json(path)
        if not payload or "rows" not in payload:
            continue
        meta = payload["meta"]
        threads = meta["torch_threads"]
        parts.append(
            f"\n### {meta['device_name']} ({meta['device']}, {meta['cpu_count']} cores, "
            f"{threads} torch thread{'' if threads == 1 else 's'})\n\n"
            f"`{path.name}`: torch {meta['torch']}, commit {meta['commit']}"
            f"{' (uncommitted changes)' if meta.get('dirty') else ''}, {meta['date'][:10]}; "
            f"load average {meta['loadavg_1m']:.1f} at the end of the run{_load_range(payload)}.\n"
        )
        parts.append("\n".join(_table(payload)))
        found = _findings(payload)
        if found:
            parts.append("\nFindings of this run:\n\n" + "\n".join(found))
    _util.update_readme_section(README_KEY, "\n".join(parts), heading=README_HEADING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="regenerate the README section")
    args = parser.parse_args(argv)
    if args.table:
        import _util

        write_readme()
        print(f"updated {_util.README}")
        return 0
    t0 = time.perf_counter()
    rc = pytest.main([__file__, "-q"])
    print(f"{time.perf_counter() - t0:.0f} s")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
