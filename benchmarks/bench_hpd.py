"""One H-PD iteration (render, loss, backward through the generator): time and peak memory.

Providers, on the same latents, networks, expert parameters and seeds:

* ``hpd_fast``   what :class:`hpd_fast.HPD` does per iteration: :func:`hpd_fast.render.render`
                 (no generator graph; the backward re-renders 10 images at a time), the loss
                 (MTT: :func:`trajectory_matching_loss`, ``mode="exact"``; DM: :func:`dm_loss`,
                 all classes in one network pass and the fused segmented-mean distance; DC:
                 :func:`dc_loss`), one backward to ``w``, ``f`` (and the student rate).
* ``published``  the structure of the published GLaD / H-PD code, re-implemented with plain
                 PyTorch networks (same weights, no fused ops), as that code runs: render every
                 image without a graph, the loss on the detached images (MTT: the first-order
                 two-pass scheme that builds a double-backward graph in its forward sweep, from
                 ``bench_trajectory.published_two_pass``; DM: one network pass and one
                 ``mean``/``sum`` per class; DC: one backward per class), then render again
                 chunk by chunk with a graph to push the image gradient to the latents, and
                 ``gc.collect()`` (plus ``torch.cuda.empty_cache()`` on CUDA) every iteration.

The published MTT gradient is the first-order approximation; ``hpd_fast`` computes the exact
one (one extra forward+backward per student step) and must still be faster (target: at least
1.3x per MTT iteration on the CPU, with a lower peak memory).

Workloads (IPC 1, 10 classes, ConvGenerator at stage 1, i.e. every synthesis stage rendered):

* ``digits``:  1x8x8, ConvGenerator(latent 32, width 48, 4 stages), ConvNet-2 (width 128)
* ``cifar32``: 3x32x32 random data, ConvGenerator(latent 32, width 64, 5 stages), ConvNet-3

Environment: ``HPD_BENCH_STEPS`` (student steps, default 20), ``HPD_BENCH_ROUNDS`` (default 1),
``HPD_BENCH_WORKLOADS`` (default ``digits,cifar32``), ``HPD_BENCH_ALGOS`` (default
``mtt,dm,dc``), ``HPD_BENCH_MEMORY=0`` to skip the peak-memory subprocesses,
``HPD_BENCH_MEMORY_REPEATS`` (default 3: fresh processes per configuration, median reported).

Run::

    .venv/bin/python -m pytest benchmarks/bench_hpd.py

Results go to ``benchmarks/results/hpd_<device>[-<threads>t].json``; a table is printed.
``python benchmarks/bench_hpd.py --table`` prints the README tables of every result file.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from hpd_fast.augment import DSA
from hpd_fast.distill.losses import dc_loss, derive_seed, dm_loss, random_network
from hpd_fast.distill.trajectory import trajectory_matching_loss
from hpd_fast.generators import ConvGenerator
from hpd_fast.models import get_model
from hpd_fast.params import flatten_params
from hpd_fast.render import render

K = 10
IPC = 1
BATCH_REAL = 64  # real images per class for DM / DC
STEPS = int(os.environ.get("HPD_BENCH_STEPS", "20"))
ROUNDS = int(os.environ.get("HPD_BENCH_ROUNDS", "1"))
WORKLOADS = tuple(os.environ.get("HPD_BENCH_WORKLOADS", "digits,cifar32").split(","))
ALGOS = tuple(os.environ.get("HPD_BENCH_ALGOS", "mtt,dm,dc").split(","))
MEASURE_MEMORY = os.environ.get("HPD_BENCH_MEMORY", "1") != "0"
MEMORY_REPEATS = int(os.environ.get("HPD_BENCH_MEMORY_REPEATS", "3"))
PAIRED_ROUNDS = int(os.environ.get("HPD_BENCH_PAIRED", "0"))
PROVIDERS = ("hpd_fast", "published")
SG_BATCH = 10  # images per render chunk, both providers

_SPECS = {
    "digits": {"shape": (1, 8, 8), "width": 48},
    "cifar32": {"shape": (3, 32, 32), "width": 64},
}


# --------------------------------------------------------------------------------------------
# workload
# --------------------------------------------------------------------------------------------


def make_workload(name: str, device: str = "cpu") -> dict[str, Any]:
    """Generator, latents at stage 1, student and expert-like parameters, a real batch."""
    spec = _SPECS[name]
    c, h, w = spec["shape"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        G = ConvGenerator(K, spec["shape"], latent_dim=32, width=spec["width"]).to(device).eval()
        student = get_model("ConvNet", c, K, (h, w)).to(device)
    # The published code's student: the same network in plain PyTorch modules (no fused ops).
    student_plain = get_model("ConvNet", c, K, (h, w), fused=False).to(device)
    student_plain.load_state_dict(student.state_dict())
    G.requires_grad_(False)
    labels = torch.arange(K, device=device).repeat_interleave(IPC)
    lat_w, lat_f = G.sample_latents(labels, seed=1)
    start = flatten_params(student)
    gen = torch.Generator().manual_seed(2)
    target = start + 0.01 * torch.randn(start.shape, generator=gen).to(device)
    real_y = torch.arange(K).repeat_interleave(BATCH_REAL).to(device)
    real_x = torch.randn(len(real_y), c, h, w, generator=gen).to(device)
    return {
        "G": G,
        "w": lat_w,
        "f": lat_f,
        "labels": labels,
        "student": student,
        "student_plain": student_plain,
        "start": start,
        "target": target,
        "real_x": real_x,
        "real_y": real_y,
        "dsa": DSA(),
        "seeds": [derive_seed("bench", c) % (2**31 - 1) for c in range(K)],
        "net_seed": 3,
    }


def _siamese(dsa: DSA):
    return lambda x, s: dsa(x, s, siamese=True)


# --------------------------------------------------------------------------------------------
# hpd_fast: one iteration as HPD runs it
# --------------------------------------------------------------------------------------------


def hpd_fast_iteration(work: dict[str, Any], algorithm: str) -> float:
    G, dev = work["G"], work["w"].device
    w = work["w"].clone().requires_grad_(True)
    f = work["f"].clone().requires_grad_(True)
    images = render(G, w, f, 1, chunk_size=SG_BATCH)
    c, h, wd = G.image_shape
    inputs = [w, f]
    if algorithm == "mtt":
        lr = torch.tensor(0.01, device=dev, requires_grad=True)
        inputs.append(lr)
        loss = trajectory_matching_loss(
            work["student"], images, work["labels"], lr, work["start"], work["target"],
            syn_steps=STEPS, augment=work["dsa"], mode="exact", seed=0,
        )  # fmt: skip
    else:
        net = random_network("ConvNet", c, K, (h, wd), work["net_seed"], dev)
        args = (work["real_x"], work["real_y"], images, work["labels"], K)
        kw = {"augment": _siamese(work["dsa"]), "seeds": work["seeds"]}
        if algorithm == "dm":
            loss = dm_loss(net.embed, *args, **kw)
        else:
            loss = dc_loss(net.requires_grad_(True), *args, **kw)
    torch.autograd.backward(loss, inputs=inputs)
    return float(loss.detach())


# --------------------------------------------------------------------------------------------
# published: render twice, loss on detached images, re-render with a graph
# --------------------------------------------------------------------------------------------


def _published_loss_and_image_grad(work: dict[str, Any], algorithm: str, image_syn: Tensor):
    """Fills ``image_syn.grad`` the way the published scripts do; returns the loss value."""
    from bench_trajectory import published_two_pass

    c, h, wd = work["G"].image_shape
    labels = work["labels"]
    dsa = work["dsa"]
    if algorithm == "mtt":
        lr = torch.tensor(0.01, device=image_syn.device, requires_grad=True)
        return float(
            published_two_pass(
                work["student_plain"], image_syn, labels, lr, work["start"], work["target"],
                syn_steps=STEPS, augment=dsa, seed=0,
            )
        )  # fmt: skip
    net = random_network(
        "ConvNet", c, K, (h, wd), work["net_seed"], image_syn.device, fused=False
    )  # the same weights as hpd_fast's network, in plain PyTorch modules
    if algorithm == "dm":
        loss = torch.zeros((), device=image_syn.device)
        for k in range(K):
            real = work["real_x"][work["real_y"] == k]
            syn = image_syn[labels == k]
            s = work["seeds"][k]
            out_real = net.embed(dsa(real, s, siamese=True)).detach()
            out_syn = net.embed(dsa(syn, s, siamese=True))
            loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
        loss.backward()
        return float(loss.detach())
    net.requires_grad_(True)
    params = list(net.parameters())
    total = 0.0
    for k in range(K):  # one backward per class, as published
        real = dsa(work["real_x"][work["real_y"] == k], work["seeds"][k], siamese=True)
        syn = dsa(image_syn[labels == k], work["seeds"][k], siamese=True)
        yk = torch.full((real.shape[0],), k, device=real.device)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(real), yk), params)]
        ys = torch.full((syn.shape[0],), k, device=syn.device)
        g_syn = torch.autograd.grad(F.cross_entropy(net(syn), ys), params, create_graph=True)
        loss = torch.zeros((), device=syn.device)
        for gs, gr in zip(g_syn, g_real):
            if gs.dim() == 1:
                continue
            a, b = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
            loss = loss + (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-6)).sum()
        loss.backward()
        total += float(loss.detach())
    return total


def published_iteration(work: dict[str, Any], algorithm: str) -> float:
    G = work["G"]
    w, f = work["w"].clone(), work["f"].clone()
    with torch.no_grad():
        images = torch.cat(
            [G.render(ws, fs, 1) for ws, fs in zip(w.split(SG_BATCH), f.split(SG_BATCH))]
        )
    image_syn = images.detach().requires_grad_(True)
    loss = _published_loss_and_image_grad(work, algorithm, image_syn)
    # gan_backward: render again, chunk by chunk, with a graph
    gw, gf = [], []
    for ws, fs, gx in zip(w.split(SG_BATCH), f.split(SG_BATCH), image_syn.grad.split(SG_BATCH)):
        ws = ws.detach().clone().requires_grad_(True)
        fs = fs.detach().clone().requires_grad_(True)
        G.render(ws, fs, 1).backward(gx)
        gw.append(ws.grad)
        gf.append(fs.grad)
    torch.cat(gw), torch.cat(gf)
    gc.collect()
    if image_syn.is_cuda:
        torch.cuda.empty_cache()
    return loss


RUNNERS = {"hpd_fast": hpd_fast_iteration, "published": published_iteration}


def run_once(workload: str, algorithm: str, provider: str) -> float:
    """Build the workload and run one iteration (used by the memory subprocess)."""
    return RUNNERS[provider](make_workload(workload), algorithm)


# --------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------

_ROWS: list[dict[str, Any]] = []


def _memory(workload: str, algorithm: str, provider: str) -> dict[str, Any] | None:
    if not MEASURE_MEMORY:
        return None
    import _util

    setup = f"""
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        import bench_hpd as B
        work = B.make_workload({workload!r})
        B.RUNNERS[{provider!r}](work, {algorithm!r})  # warm-up: allocator and kernels
    """
    stmt = f"B.RUNNERS[{provider!r}](work, {algorithm!r})"
    env = dict(os.environ, HPD_BENCH_STEPS=str(STEPS))
    # Peaks of a few tens of MiB move by ~10 MiB between fresh processes (allocator state):
    # the run with the median peak is reported, every run's peak is kept.
    runs = [_util.peak_memory_subprocess(setup, stmt, env=env) for _ in range(MEMORY_REPEATS)]
    runs.sort(key=lambda r: r["peak_delta_mib"])
    median = dict(runs[len(runs) // 2])
    median["peak_delta_mib_runs"] = [r["peak_delta_mib"] for r in runs]
    return median


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_hpd_iteration(benchmark, workload: str, algorithm: str, provider: str) -> None:
    import _util

    work = make_workload(workload)
    fn = RUNNERS[provider]
    fn(work, algorithm)  # warm-up
    loss = benchmark.pedantic(fn, args=(work, algorithm), rounds=ROUNDS, iterations=1)
    assert loss == loss  # finite enough to be a number
    row = {
        "workload": workload,
        "algorithm": algorithm,
        "provider": provider,
        "syn_steps": STEPS if algorithm == "mtt" else None,
        "time": _util.stats_of(benchmark),
        "memory": _memory(workload, algorithm, provider),
    }
    _ROWS.append(row)


_PAIRED: list[dict[str, Any]] = []


@pytest.mark.skipif(PAIRED_ROUNDS < 1, reason="set HPD_BENCH_PAIRED=<rounds> to run it")
@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_hpd_paired(workload: str, algorithm: str) -> None:
    """Both providers in alternation: every round times one iteration of each (the order
    flips every round), so that the slow and fast phases of a shared machine fall on both
    alike; the speed-up is the median over rounds of ``published / hpd_fast``."""
    import statistics
    import time

    work = make_workload(workload)
    for prov in PROVIDERS:
        RUNNERS[prov](work, algorithm)  # warm-up
    times: dict[str, list[float]] = {prov: [] for prov in PROVIDERS}
    for r in range(PAIRED_ROUNDS):
        for prov in PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]:
            t0 = time.perf_counter()
            RUNNERS[prov](work, algorithm)
            times[prov].append(time.perf_counter() - t0)
    ratios = sorted(p / h for p, h in zip(times["published"], times["hpd_fast"]))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios * 3)
    _PAIRED.append({
        "workload": workload, "algorithm": algorithm, "rounds": PAIRED_ROUNDS,
        "syn_steps": STEPS if algorithm == "mtt" else None,
        "times_s": times,
        "median_s": {prov: statistics.median(v) for prov, v in times.items()},
        "speedup_median": statistics.median(ratios), "speedup_q1": q1, "speedup_q3": q3,
        "speedup_min": ratios[0], "speedup_max": ratios[-1],
    })  # fmt: skip


def _paired_table(paired: list[dict[str, Any]]) -> list[str]:
    import _util

    out = [
        [
            p["workload"], p["algorithm"], p["rounds"], f"{p['median_s']['hpd_fast']:.3f}",
            f"{p['median_s']['published']:.3f}", f"{p['speedup_median']:.2f}×",
            f"{p['speedup_q1']:.2f}-{p['speedup_q3']:.2f}",
            f"{p['speedup_min']:.2f}-{p['speedup_max']:.2f}",
        ]
        for p in sorted(paired, key=lambda p: (p["workload"], p["algorithm"]))
    ]  # fmt: skip
    headers = ["workload", "algorithm", "rounds", "hpd_fast median s", "published median s",
               "speed-up (median of rounds)", "quartiles", "range"]  # fmt: skip
    return _util.markdown_table(headers, out, "llr" + "r" * 5).splitlines()


@pytest.fixture(scope="module", autouse=True)
def _write_results(bench_summary: list):
    yield
    if not (_ROWS or _PAIRED):
        return
    import _util

    # A paired-only run gets its own file, so that it does not replace the per-provider rows.
    tag = f"{torch.get_num_threads()}t" + ("" if _ROWS else "-paired")
    path = _util.results_path("hpd", "cpu", tag)
    payload = {"meta": _util.run_metadata("cpu"), "rows": _ROWS}
    if _PAIRED:
        payload["paired"] = _PAIRED
    _util.write_json(path, payload)
    title = f"H-PD iteration ({STEPS} student steps for MTT); results in {path.name}"
    lines = readme_table(payload)[2:]  # the tables, without the metadata line
    bench_summary.append((title, lines))


def readme_table(payload: dict[str, Any]) -> list[str]:
    """Markdown for benchmarks/README.md: rounds, median and fastest round, speed-ups by both."""
    import _util

    rows = payload.get("rows") or []
    by = {(r["workload"], r["algorithm"], r["provider"]): r for r in rows}
    out = []
    for (wl, algo, prov), r in sorted(by.items()):
        t = r["time"] or {}
        base = (by.get((wl, algo, "published")) or {}).get("time") or {}
        mine = prov != "published" and t and base
        mem = r["memory"] or {}
        peak = "–" if mem.get("peak_delta_mib") is None else f"{mem['peak_delta_mib']:.0f}"
        if len(mem.get("peak_delta_mib_runs", [])) > 1:
            lo, hi = min(mem["peak_delta_mib_runs"]), max(mem["peak_delta_mib_runs"])
            peak += f" ({lo:.0f}-{hi:.0f})"
        out.append([
            wl, algo, prov, t.get("rounds"), f"{t['median_s']:.3f}", f"{t['min_s']:.3f}",
            f"{base['median_s'] / t['median_s']:.2f}×" if mine else "–",
            f"{base['min_s'] / t['min_s']:.2f}×" if mine else "–", peak,
        ])  # fmt: skip
    meta = payload["meta"]
    head = (
        f"{meta['device_name']} ({meta.get('cpu_count', '?')} cores, "
        f"{meta.get('torch_threads', '?')} torch threads), torch {meta['torch']}, commit "
        f"{meta['commit']}{' (uncommitted changes)' if meta.get('dirty') else ''}, "
        f"{meta['date'][:10]}; load average {meta.get('loadavg_1m', 0):.1f} at the end of the run."
    )
    headers = ["workload", "algorithm", "provider", "rounds", "median s", "min s",
               "× vs published (medians)", "× (min times)",
               "peak extra MiB (median of runs, range)"]  # fmt: skip
    lines = [head, ""]
    if rows:
        lines += _util.markdown_table(headers, out, "lll" + "r" * 6).splitlines() + [""]
    if payload.get("paired"):
        lines += ["Paired rounds (alternating providers):", ""]
        lines += _paired_table(payload["paired"])
    return lines


if __name__ == "__main__":
    # python benchmarks/bench_hpd.py --table          README tables from results/hpd_*.json
    # python benchmarks/bench_hpd.py WORKLOAD ALGO PROVIDER   one iteration (memory subprocess)
    if sys.argv[1:] == ["--table"]:
        import _util

        for path in sorted(_util.RESULTS_DIR.glob("hpd_*.json")):
            payload = _util.read_json(path)
            if payload:
                print(f"### `{path.name}`\n")
                print("\n".join(readme_table(payload)) + "\n")
    else:
        print(run_once(sys.argv[1], sys.argv[2], sys.argv[3]))
