"""Latents sharded over the ranks of a process group (2 and 3 CPU processes over gloo).

Every H-PD run here is in float64 (a float64 generator makes the whole loop float64), so that a
sharded run and the single-process run differ only by the order of float64 sums: losses,
latents, images, selection and checkpoints must agree to 1e-9 relative. A rank holds only the
latents of its classes (``c % W == r``) and renders only its own images."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from hpd_fast.distill import HPD

K, IPC = 3, 4  # M = 12 images; rank r of W owns the classes c with c % W == r

BASE = dict(
    model_kwargs={"width": 4}, crfd_models=1, crfd_syn_augments=2, crfd_model_kwargs={"width": 4},
    batch_real=4, iterations_per_stage=3, select_every=2, expert_epochs=1, ipc=IPC,
    checkpoint_every=1,
)  # fmt: skip

# name -> (algorithm, settings). MTT: batches of 3 over 2 steps touch 6 of the 12 images.
CASES = {
    "mtt": ("mtt", dict(syn_steps=2, batch_syn=3)),
    "mtt_soft_k3": ("mtt", dict(syn_steps=2, batch_syn=3, soft_labels="onehot", num_trajectories=3)),
    "mtt_all": ("mtt", dict(syn_steps=2, soft_labels="expert")),  # full batches: every image
    "dm": ("dm", {}),
    "dc": ("dc", {}),
}  # fmt: skip
RESUME = "mtt_soft_k3"  # interrupted at stage 2, iteration 2, then resumed
STOP_AT = (2, 2)


class _Stop(Exception):
    pass


def _hpd(name: str, checkpoint_dir=None, group=None, callback=None, counted=False) -> HPD:
    from test_hpd import SMALL, TinyExperts, tiny_data, tiny_generator

    algorithm, kw = CASES[name]
    data = tiny_data()
    experts = TinyExperts(data) if algorithm == "mtt" else None
    cls = _Counted if counted else HPD
    return cls(tiny_generator().double(), data, algorithm=algorithm, experts=experts,
               checkpoint_dir=checkpoint_dir, group=group, callback=callback,
               **{**SMALL, **BASE, **kw})  # fmt: skip


class _Counted(HPD):
    """Records the rows of latents each training step renders, and the rows it holds."""

    def _step(self, st, stage, it):
        self.rendered = getattr(self, "rendered", {})
        self._now = (stage, it)
        self.held = (st.w.shape[0], st.f.shape[0])
        return super()._step(st, stage, it)

    def _render_checked(self, st, w, f, stage, where):
        if hasattr(self, "_now"):
            self.rendered.setdefault(self._now, []).append(int(w.shape[0]))
        return super()._render_checked(st, w, f, stage, where)


def _save(res, path: Path, extra: dict) -> None:
    torch.save(
        {
            "images": res.images, "w": res.w, "f": res.f, "labels": res.labels,
            "stage": res.stage, "iteration": res.iteration, "losses": res.losses,
            "history": res.history, "stage_w": res.stage_w, "stage_f": res.stage_f,
            **extra,
        },
        path,
    )  # fmt: skip


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=180))  # fmt: skip
    out = Path(out_dir)
    group = dist.group.WORLD
    try:
        for name in CASES:
            hpd = _hpd(name, out / f"ckpt-{name}", group, counted=True)
            res = hpd.fit(progress=False)
            _save(res, out / f"{name}-{rank}.pt", {"rendered": hpd.rendered, "held": hpd.held,
                                                  "rows": hpd._shard.rows})  # fmt: skip

        def stop(info):
            if (info["stage"], info["iteration"]) == STOP_AT:
                raise _Stop

        ckpt = out / "ckpt-resume"
        with contextlib.suppress(_Stop):
            _hpd(RESUME, ckpt, group, callback=stop).fit(progress=False)
        dist.barrier()
        if rank == 0:  # the interrupted state, for a single process to resume
            shutil.copytree(ckpt, out / "ckpt-interrupted")
        dist.barrier()
        res = _hpd(RESUME, ckpt, group).fit(progress=False)
        _save(res, out / f"resumed-{rank}.pt", {})

        # Shard.gather alone: rows of ranks 0 and 2 only (rank 1 contributes nothing)
        from hpd_fast.distill.shard import Shard

        labels = torch.arange(K).repeat_interleave(2)
        shard = Shard(labels, group)
        order = torch.tensor([0, 1, 5]) if world == 3 else torch.tensor([0, 3, 4])
        mine = shard.mine(order)
        x = (mine.double() + 1).unsqueeze(1).repeat(1, 2).requires_grad_(True)
        got = shard.gather(x, order)
        coef = torch.arange(1.0, 1 + got.numel(), dtype=torch.float64).view_as(got)
        (got * coef).sum().backward()
        torch.save({"got": got.detach(), "grad": x.grad, "mine": mine}, out / f"gather-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp: Path, world: int, timeout: float = 400.0) -> None:
    ctx = mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} ranks did not finish in {timeout:.0f} s (hang?)")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The single-process runs (and their checkpoint folders)."""
    tmp = tmp_path_factory.mktemp("single")
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in CASES:
            hpd = _hpd(name, tmp / f"ckpt-{name}", counted=True)
            out[name] = (hpd, hpd.fit(progress=False), tmp / f"ckpt-{name}")
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["W2", "W3"])
def ranks(request, tmp_path_factory) -> tuple[int, Path]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = request.param
    tmp = tmp_path_factory.mktemp(f"shard{world}")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # children inherit the environment
    _spawn(tmp, world)
    return world, tmp


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _same_result(got: dict, ref, tol: float = 1e-9) -> None:
    assert got["images"].dtype == torch.float64
    assert (got["stage"], got["iteration"]) == (ref.stage, ref.iteration)
    assert len(got["losses"]) == len(ref.losses)
    for a, b in zip(got["losses"], ref.losses, strict=True):
        assert (a["stage"], a["iteration"]) == (b["stage"], b["iteration"])
        assert a["loss"] == pytest.approx(b["loss"], rel=tol)
        if "syn_lr" in b:
            assert a["syn_lr"] == pytest.approx(b["syn_lr"], rel=tol)
    for a, b in zip(got["history"], ref.history, strict=True):
        assert (a["stage"], a["iteration"]) == (b["stage"], b["iteration"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)  # CRFD scores in float32
    for key in ("images", "w", "f", "labels"):
        assert got[key].shape == getattr(ref, key).shape, key
        assert _rel(got[key].double(), getattr(ref, key).double()) < tol, key
    for k in ref.stage_w:
        assert _rel(got["stage_w"][k], ref.stage_w[k]) < tol
        assert _rel(got["stage_f"][k], ref.stage_f[k]) < tol


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_run_equals_one_process(ranks, single, name: str):
    """Every rank returns the whole set of images and records, the first rank also the whole
    latents, equal to the single process's (float64 sums in another order: 1e-9), with the
    same chosen stage and iterate."""
    world, tmp = ranks
    _, ref, _ = single[name]
    got = [torch.load(tmp / f"{name}-{r}.pt") for r in range(world)]
    for g in got[1:]:  # the same images and records on every rank, bit for bit
        for key in ("images", "labels"):
            assert torch.equal(g[key], got[0][key])
        assert g["losses"] == got[0]["losses"]
        assert g["history"] == got[0]["history"]
        # the latents are whole on the first rank only
        for key in ("w", "f"):
            assert g[key].shape == (0, *got[0][key].shape[1:])
        assert all(v.shape[0] == 0 for v in (*g["stage_w"].values(), *g["stage_f"].values()))
    _same_result(got[0], ref)


@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_holds_and_renders_its_classes_only(ranks, single, name: str):
    """Rank r holds the latents of the classes c % W == r (IPC rows each) and renders, per
    step, only its own images: MTT those of the iteration's touched set it owns (the ranks'
    counts add up to what the single process renders), DM/DC all of its own."""
    world, tmp = ranks
    hpd, _, _ = single[name]
    labels = torch.arange(K).repeat_interleave(IPC)
    for r in range(world):
        saved = torch.load(tmp / f"{name}-{r}.pt")
        own = (labels % world == r).nonzero().squeeze(1)
        assert torch.equal(saved["rows"], own)
        n_classes = len(range(r, K, world))
        assert saved["held"] == (n_classes * IPC, n_classes * IPC)
        for (stage, it), counts in saved["rendered"].items():
            if hpd.algorithm != "mtt":
                assert counts == [own.numel()]
                continue
            union = hpd._mtt_union(stage, it)
            touched = torch.arange(K * IPC) if union is None else union
            assert counts == [int(torch.isin(touched, own).sum())]
    for (stage, it), counts in hpd.rendered.items():  # the single process: the whole touched set
        union = hpd._mtt_union(stage, it) if hpd.algorithm == "mtt" else None
        assert counts == [K * IPC if union is None else union.numel()]
    if name == "mtt":  # the iteration really rendered a part: 6 of 12 images per trajectory
        assert all(c == [6] for c in hpd.rendered.values())


@pytest.mark.parametrize("name", ["mtt", "mtt_soft_k3", "dm"])
def test_checkpoint_is_one_file_equal_to_the_single_process_one(ranks, single, name: str):
    """The first rank wrote the whole state into one checkpoint (the other ranks nothing):
    the same tensor names and shapes as the single-process checkpoint, the same values to
    float64 rounding, the same counters."""
    world, tmp = ranks
    _, _, ref_dir = single[name]
    files = sorted(p.name for p in (tmp / f"ckpt-{name}").iterdir())
    assert files == ["checkpoint.json", "checkpoint.safetensors"]
    with (
        safe_open(str(tmp / f"ckpt-{name}" / "checkpoint.safetensors"), "pt") as a,
        safe_open(str(ref_dir / "checkpoint.safetensors"), "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        assert a.metadata()["format"] == b.metadata()["format"]
        for key in b.keys():  # noqa: SIM118 (safe_open is not a dict)
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.shape == y.shape and x.dtype == y.dtype, key
            if key.startswith("crfd"):  # the real data's class means: computed alike
                assert torch.equal(x, y), key
            else:
                assert _rel(x.double(), y.double()) < 1e-9, key


def test_resume_after_interruption(ranks, single):
    """Stopped at stage 2 iteration 2 and resumed over the same ranks: the uninterrupted result.
    The interrupted checkpoint also resumes in a single process (it does not depend on W)."""
    world, tmp = ranks
    _, ref, _ = single[RESUME]
    _same_result(torch.load(tmp / "resumed-0.pt"), ref)
    ckpt = tmp / "ckpt-single-resume"
    shutil.copytree(tmp / "ckpt-interrupted", ckpt)
    with safe_open(str(ckpt / "checkpoint.safetensors"), "pt") as fh:
        import json

        meta = json.loads(fh.metadata()["state"])
    assert (meta["stage"], meta["iteration"]) == STOP_AT  # written just before the stop
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = _hpd(RESUME, ckpt).fit(progress=False)
    finally:
        torch.set_num_threads(threads)
    _same_result(
        {k: getattr(res, k) for k in ("images", "w", "f", "labels", "stage", "iteration",
                                      "losses", "history", "stage_w", "stage_f")},
        ref,
    )  # fmt: skip


def test_gather_routes_each_rows_gradient_to_its_owner(ranks):
    """Shard.gather assembles the rows in the requested order on every rank; the backward
    hands each owner the gradient of its own rows (a rank owning none gets an empty one)."""
    world, tmp = ranks
    order = [0, 1, 5] if world == 3 else [0, 3, 4]
    expect = torch.tensor(order, dtype=torch.float64).add(1).unsqueeze(1).repeat(1, 2)
    coef = torch.arange(1.0, 7.0, dtype=torch.float64).view(3, 2)
    for r in range(world):
        saved = torch.load(tmp / f"gather-{r}.pt")
        assert torch.equal(saved["got"], expect)
        pos = [order.index(int(i)) for i in saved["mine"]]
        assert torch.equal(saved["grad"], coef[pos])
    assert torch.load(tmp / "gather-1.pt")["mine"].numel() == (0 if world == 3 else 1)
