"""H-PD over a process group: the latents and optimiser state each process holds, 1, 2, 4 ranks.

Workload: trajectory matching over a StyleGAN-XL-shaped generator (``stylegan_shaped.py``:
StyleGAN-XL's layer geometry at 32x32 with ``channel_max`` 16, so ``w`` is [18, 512] and ``f``
at stage 2 is [16, 36, 36] per image), 10 classes, ``M = IPC x 10`` images, optimised at stage 2
(H-PD's first layer) for two iterations; ``syn_steps x batch_syn`` = 2 x 50; selection
``last`` (no candidate copies) and synthetic expert trajectories (a ConvNet of width 8), so that
the latents dominate. Each process of a group of ``W`` (gloo, one torch thread) reports

* ``state``: the bytes of the tensors it holds for the latents after the iterations, counted
  from the tensors themselves: ``w``, ``f`` and the optimiser's momentum buffers of both;
* ``peak``: its peak resident memory during ``HPD.fit`` above its resident memory before, at the
  end of the iterations and at the end of ``fit`` (the result gathered),
  (``VmHWM`` after a reset, minus ``VmRSS``): everything, the generator's transient work and
  the drawing of every ``w`` included (all ``M`` codes are drawn so that the random stream is
  the one a single process draws);
* its rows and the model's prediction ``2 x (bytes(w) + bytes(f)) x rows``.

The ranks' times are not a speed-up measure here (the processes share the machine's cores).

Environment: ``HPD_BENCH_SHARD_IPC`` (default 2000: M = 20,000), ``HPD_BENCH_SHARD_WORLDS``
(default ``1,2,4``). Result: ``benchmarks/results/shard_memory_<device>.json``.

Run::

    .venv/bin/python -m pytest benchmarks/bench_shard_memory.py
    .venv/bin/python benchmarks/bench_shard_memory.py --table
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import _util
import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
IPC = int(os.environ.get("HPD_BENCH_SHARD_IPC", "2000"))
WORLDS = [int(w) for w in os.environ.get("HPD_BENCH_SHARD_WORLDS", "1,2,4").split(",")]
K, RES, STAGE = 10, 32, 2
SETTINGS = dict(
    iterations_per_stage=2, first_stage=STAGE, last_stage=STAGE, select="last",
    syn_steps=2, batch_syn=50, expert_epochs=1, max_start_epoch=1, chunk_size=256,
)  # fmt: skip


class _Experts:
    """Synthetic expert trajectories of a ConvNet (width 8): enough for the loss to run."""

    def __init__(self) -> None:
        from hpd_fast.models import get_model
        from hpd_fast.params import flatten_params

        self.model_config = {"name": "ConvNet", "channel": 3, "num_classes": K,
                             "im_size": [RES, RES], "kwargs": {"width": 8}}  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            start = flatten_params(get_model("ConvNet", 3, K, (RES, RES), width=8))
            self.trajectories = [torch.stack([start, start + 0.01 * torch.randn_like(start)])]
        self.lr = 0.01

    def check_student(self, student) -> None:
        pass


def _data():
    from hpd_fast.data.dataset import DistillData

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(K * 20, 3, RES, RES, generator=gen)
    y = torch.arange(K).repeat_interleave(20)
    names = [f"c{i}" for i in range(K)]
    return DistillData("shaped", x, y, x[:K], y[:K], names, (0.5,) * 3, (0.5,) * 3)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, str(HERE))
    from bench_trajectory import _proc_status_bytes
    from stylegan_shaped import make_stylegan_shaped

    from hpd_fast._common import reset_peak_memory
    from hpd_fast.distill import HPD

    torch.set_num_threads(1)
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=20))  # fmt: skip
        group = dist.group.WORLD
    try:
        G = make_stylegan_shaped(K, RES, channel_max=16, channel_base=1024, mean=0.5, std=0.5)
        data = _data()
        held: dict[str, int] = {}

        class Measured(HPD):
            def _step(self, st, stage, it):
                value = super()._step(st, stage, it)
                bufs = [s["momentum_buffer"] for s in st.opt.state.values()]
                held.update(
                    rows=int(st.w.shape[0]),
                    w=st.w.nbytes, f=st.f.nbytes, momentum=sum(b.nbytes for b in bufs),
                    hwm=_proc_status_bytes("VmHWM"),
                )  # fmt: skip
                return value

        hpd = Measured(G, data, algorithm="mtt", experts=_Experts(), ipc=IPC, group=group,
                       **SETTINGS)  # fmt: skip
        w_img = 4 * math.prod(G.w_shape)
        f_img = 4 * math.prod(G.feature_shape(STAGE))
        reset_peak_memory()
        before = _proc_status_bytes("VmRSS")
        t0 = time.perf_counter()
        res = hpd.fit(progress=False)
        seconds = time.perf_counter() - t0
        peak = _proc_status_bytes("VmHWM") - before
        row = {
            "world": world, "rank": rank, "images": IPC * K, "rows": held["rows"],
            "w_bytes_per_image": w_img, "f_bytes_per_image": f_img,
            "state_bytes": held["w"] + held["f"] + held["momentum"],
            "model_bytes": 2 * (w_img + f_img) * held["rows"],
            "peak_rss_bytes": peak, "peak_loop_rss_bytes": held["hwm"] - before,
            "seconds": seconds,
            "losses": [e["loss"] for e in res.losses],
        }  # fmt: skip
        _util.write_rank_row(out_dir, world, rank, row)
    finally:
        if group is not None:
            dist.destroy_process_group()


def _table(rows: list[dict]) -> str:
    one = next(r for r in rows if r["world"] == 1)
    mib = 2**20
    out = []
    for r in sorted(rows, key=lambda r: (r["world"], r["rank"])):
        out.append([
            r["world"], r["rank"], f"{r['rows']:,} / {r['images']:,}",
            f"{r['state_bytes'] / mib:.0f}", f"{r['model_bytes'] / mib:.0f}",
            f"{r['state_bytes'] / one['state_bytes']:.3f}",
            f"{r['peak_loop_rss_bytes'] / mib:.0f}",
            f"{r['peak_loop_rss_bytes'] / one['peak_loop_rss_bytes']:.2f}",
            f"{r['peak_rss_bytes'] / mib:.0f}",
            f"{r['seconds']:.0f}",
        ])  # fmt: skip
    return _util.markdown_table(
        ["ranks", "rank", "rows held", "latents + momentum MiB", "model MiB",
         "× one process", "peak RSS MiB, set-up + iterations", "× one process",
         "peak RSS MiB, with the result", "s (cores shared)"],
        out, "rrrrrrrrrr",
    )  # fmt: skip


def _section(payload: dict) -> str:
    rows = payload["results"]
    return "\n".join([
        "H-PD trajectory matching at stage 2 of a StyleGAN-XL-shaped generator (32x32, "
        "`channel_max` 16: `w` [18, 512] = 36 KiB, `f` [16, 36, 36] = 81 KiB per image), "
        f"M = {rows[0]['images']:,} images of 10 classes, run by 1, 2 and 4 gloo processes "
        "(`benchmarks/bench_shard_memory.py`). \"latents + momentum\" is counted from the "
        "tensors each process holds (`w`, `f`, the optimiser's momentum of both); \"model\" is "
        "`2 × (bytes(w) + bytes(f)) × rows held` (docs/scaling.md); peak RSS is the process's "
        "peak resident memory above its memory before `fit`, up to the end of the iterations "
        "(the drawing of all M codes `w`, the first stages, rendering, the student) and up to "
        "the returned result (the first rank gathers the whole latents of every stage for "
        "it; the others only the images). Rank r holds the classes c with c % W == r, so "
        "with 4 ranks two hold 3 classes and two hold 2.",
        "",
        f"### {payload.get('device_name', 'cpu')} — {payload.get('file', '')}",
        "",
        _table(rows),
    ])  # fmt: skip


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_shard_memory(bench_summary):
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = [row for w in WORLDS for row in _util.spawn_ranks(_worker, w, tmp)]
    path = _util.results_path("shard_memory", "cpu")
    payload = {
        **_util.run_metadata("cpu"),
        "benchmark": "shard_memory",
        "file": path.name,
        "workload": f"H-PD MTT, StyleGAN-XL-shaped 32px channel_max 16, stage {STAGE}, "
        f"M = {IPC * K}",
        "settings": SETTINGS,
        "results": rows,
    }
    _util.write_json(path, payload)
    _util.update_readme_section(
        "shard_memory", _section(payload), heading="## Latents sharded over the ranks"
    )
    bench_summary.append((f"shard memory ({path.name})", _table(rows).splitlines()))
    one = next(r for r in rows if r["world"] == 1)
    for r in rows:
        assert r["state_bytes"] == r["model_bytes"]  # exactly the model's bytes
        # the same run: losses agree to float32 rounding of the sums
        for a, b in zip(r["losses"], one["losses"], strict=True):
            assert abs(a - b) <= 1e-4 * abs(b)


if __name__ == "__main__" and sys.argv[1:2] == ["--table"]:
    for f in sys.argv[2:] or sorted(str(p) for p in _util.RESULTS_DIR.glob("shard_memory_*.json")):
        d = json.loads(Path(f).read_text())
        d.setdefault("file", Path(f).name)
        _util.update_readme_section(
            "shard_memory", _section(d), heading="## Latents sharded over the ranks"
        )
        print(_section(d))
