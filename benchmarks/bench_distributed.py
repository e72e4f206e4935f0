"""Trajectory matching over a process group: peak memory per process against one process.

The workload of ``bench_trajectory.py`` (ConvNet-3, width 128, 32x32, DSA, all images in every
student step), exact mode, run by 1 process and then by ``W`` processes sharing every batch
(``trajectory_matching_loss(group=...)``; gloo on the CPU). Each process measures its own peak
resident memory above its resident memory before the call (``VmHWM`` after a reset, minus
``VmRSS``), in fresh processes. The losses of the runs are compared (float32: equal up to the
order of the batch sums).

On a CPU the processes share its cores, so their time says nothing about speed-up (one torch
thread per process); the point is the memory each process needs.

Environment: ``HPD_BENCH_IPC`` (default 10), ``HPD_BENCH_STEPS`` (default 20),
``HPD_BENCH_WORLD`` (default 2). Result: ``benchmarks/results/distributed_<device>.json``.

Run::

    .venv/bin/python -m pytest benchmarks/bench_distributed.py
    .venv/bin/python benchmarks/bench_distributed.py --table
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _util
import pytest
import torch
import torch.distributed as dist

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IPC = int(os.environ.get("HPD_BENCH_IPC", "10"))
STEPS = int(os.environ.get("HPD_BENCH_STEPS", "20"))
WORLD = int(os.environ.get("HPD_BENCH_WORLD", "2"))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One process: join the group (if any), one exact loss + backward, write its numbers."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_trajectory import _proc_status_bytes, make_workload

    from hpd_fast._common import reset_peak_memory
    from hpd_fast.distill.trajectory import trajectory_matching_loss

    torch.set_num_threads(1)
    group = None
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=10),
        )
        group = dist.group.WORLD
    try:
        work = make_workload(IPC, "cpu")
        x = work["images"].clone().requires_grad_(True)
        lr = torch.tensor(0.01, requires_grad=True)
        args = (work["net"], x, work["labels"], lr, work["start"], work["target"])
        reset_peak_memory()
        before = _proc_status_bytes("VmRSS")
        t0 = time.perf_counter()
        loss = trajectory_matching_loss(
            *args, syn_steps=STEPS, augment=work["dsa"], seed=0, mode="exact", group=group
        )
        loss.backward()
        row = {
            "world": world,
            "rank": rank,
            "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": _proc_status_bytes("VmHWM") - before,
            "loss": float(loss),
            "image_grad_norm": float(x.grad.norm()),
            "lr_grad": float(lr.grad),
        }
        _util.write_rank_row(out_dir, world, rank, row)
    finally:
        if group is not None:
            dist.destroy_process_group()


def _table(rows: list[dict]) -> str:
    one = next(r for r in rows if r["world"] == 1)
    lines = [
        "| processes | rank | peak MiB | × one process | loss | rel. diff. loss | "
        "rel. diff. image grad norm | s (cores shared) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["world"], r["rank"])):
        lines.append(
            f"| {r['world']} | {r['rank']} | {r['peak_rss_bytes'] / 2**20:.0f} "
            f"| {r['peak_rss_bytes'] / one['peak_rss_bytes']:.2f} | {r['loss']:.6f} "
            f"| {abs(r['loss'] - one['loss']) / abs(one['loss']):.1e} "
            f"| {abs(r['image_grad_norm'] - one['image_grad_norm']) / one['image_grad_norm']:.1e}"
            f" | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_distributed_memory(bench_summary):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = _util.spawn_ranks(_worker, 1, tmp) + _util.spawn_ranks(_worker, WORLD, tmp)
    payload = {
        **_util.run_metadata("cpu"),
        "benchmark": "distributed",
        "workload": f"exact trajectory matching, ConvNet-3 32x32, IPC {IPC}, {STEPS} steps, DSA",
        "results": rows,
    }
    path = _util.results_path("distributed", "cpu")
    _util.write_json(path, payload)
    bench_summary.append((f"distributed ({path.name})", _table(rows).splitlines()))
    one = rows[0]
    for r in rows[1:]:  # the same problem: the loss agrees to float32 rounding of the sums
        assert abs(r["loss"] - one["loss"]) <= 1e-4 * abs(one["loss"])


if __name__ == "__main__" and sys.argv[1:2] == ["--table"]:
    for f in sys.argv[2:] or sorted(str(p) for p in RESULTS_DIR.glob("distributed_*.json")):
        d = json.loads(Path(f).read_text())
        print(f"\n### {d.get('device_name', 'cpu')} — {Path(f).name}\n")
        print(_table(d["results"]))
