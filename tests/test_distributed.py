"""Trajectory matching over a torch.distributed group: two CPU processes (gloo) share every
student step's batch and must reproduce the single-process loss and gradients (float64)."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpd_fast import evaluate
from hpd_fast.augment import DSA
from hpd_fast.experts import load, train_experts

WORLD = 2

# name -> (soft labels, mode, keyword arguments); M = 7 images.
CASES = {
    # batches of 5 split 2 + 3; DSA on the whole batch; snapshots rebuilt (budget 2 of 6)
    "exact": (True, "exact", dict(batch_syn=5, syn_steps=6, seed=3, max_snapshots=2)),
    "first_order": (True, "first_order", dict(batch_syn=5, syn_steps=6, seed=3)),
    # hard labels, full batches (7 = 3 + 4), no augmentation, seed drawn on each rank
    "hard_seed_none": (False, "exact", dict(syn_steps=4, seed=None, augment=None)),
}


# Expert training shared out: 3 experts, one at a time (rank 0: 0 and 2, rank 1: 1) or in
# vmap blocks of 2 (rank 0: block [0, 1], rank 1: block [2]).
EXPERT_RUNS = {
    "experts_seq": dict(model="ConvNet", num_experts=3, epochs=2, batch_size=8,
                        model_kwargs={"width": 4}),
    "experts_vmap": dict(model="ConvNet", num_experts=3, epochs=2, batch_size=8,
                         model_kwargs={"width": 4}, vmap=True, group_size=2),
}  # fmt: skip

# DM / DC: the 3 classes split 2 + 1 (rank 0: classes 0 and 2, rank 1: class 1).
HPD_KW_DM = dict(iterations_per_stage=2)

# Evaluation shared out: 2 models x 2 sets x 2 runs = 8 training runs, 4 per rank.
EVAL_KW = dict(models=("ConvNet", "ConvNetD1"), num_eval=2, epochs=2, baseline="random_real",
               model_kwargs={"ConvNet": {"width": 4}, "ConvNetD1": {"width": 4}},
               num_threads=1)  # fmt: skip


def EVAL_SET(data):  # noqa: N802  (a constant's recipe)
    return data.random_real(2, 7)


# A tiny H-PD run (3 classes, 1 image each: each step's batch of 3 split 1 + 2).
HPD_KW = dict(syn_steps=5, iterations_per_stage=2)


def _problem_and_run(soft: bool, mode: str, kw: dict, group=None):
    from test_trajectory import make_problem, run

    problem = make_problem(soft=soft)
    kw = {"augment": DSA(), **kw}
    if group is not None:
        kw["group"] = group
    return problem, run(problem, mode, **kw)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    out = Path(out_dir)
    try:
        group = dist.group.WORLD
        from test_trajectory import make_problem, run

        for name, (soft, mode, kw) in CASES.items():
            problem = make_problem(soft=soft)
            drawn = None
            if kw.get("seed", 1) is None:
                torch.manual_seed(100 + rank)  # each rank would draw another seed: this one
                state = torch.get_rng_state()
                drawn = int(torch.randint(0, 2**62, ()))
                torch.set_rng_state(state)
            rows: list[int] = []
            hook = problem[0].register_forward_pre_hook(
                lambda m, a, rows=rows: rows.append(len(a[0]))
            )
            res = run(problem, mode, **{"augment": DSA(), **kw, "group": group})
            hook.remove()
            torch.save({"result": res, "rows": rows, "drawn": drawn}, out / f"{name}-{rank}.pt")

        from test_hpd import TinyExperts, make, tiny_data

        data = tiny_data()
        for key, kw in EXPERT_RUNS.items():
            trained: list[int] = []
            train_experts(data, **kw, out=out / key, group=group, progress=False,
                          on_expert=lambda k, p, trained=trained: trained.append(k))  # fmt: skip
            torch.save(trained, out / f"{key}-trained-{rank}.pt")
        import hpd_fast.evaluation as evaluation

        runs: list[int] = []
        train_and_test = evaluation.train_and_test

        def counted(*a, **kw):
            runs.append(1)
            return train_and_test(*a, **kw)

        evaluation.train_and_test = counted
        ev = evaluate(*EVAL_SET(data), data, **EVAL_KW, group=group)
        evaluation.train_and_test = train_and_test
        torch.save({"ev": ev, "runs": len(runs)}, out / f"eval-{rank}.pt")
        result = make("mtt", data=data, experts=TinyExperts(data), group=group, **HPD_KW,
                      checkpoint_dir=out / f"ckpt-{rank}").fit(progress=False)  # fmt: skip
        torch.save({"images": result.images, "losses": result.losses}, out / f"hpd-{rank}.pt")
        for algorithm in ("dm", "dc"):
            result = make(algorithm, data=data, group=group, **HPD_KW_DM).fit(progress=False)
            torch.save(
                {"images": result.images, "losses": result.losses},
                out / f"hpd-{algorithm}-{rank}.pt",
            )

        problem = make_problem()
        errors = {}
        other = list(problem)
        if rank == 1:
            other[1] = problem[1] + 1.0  # images differ on one rank
        for key, prob, kw in (
            ("different_images", tuple(other), {}),
            ("batch_too_small", problem, {"batch_syn": 1}),
            ("unrolled", problem, {"mode": "unrolled"}),
        ):
            kw = {"syn_steps": 2, "seed": 0, "group": group, **kw}
            mode = kw.pop("mode", "exact")
            try:
                run(prob, mode, **kw)
                errors[key] = None
            except ValueError as exc:
                errors[key] = str(exc)
        try:
            train_experts(data, num_experts=1, epochs=1, group=group, progress=False)
            errors["experts_no_out"] = None
        except ValueError as exc:
            errors["experts_no_out"] = str(exc)
        torch.save(errors, out / f"errors-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, timeout: float = 240.0) -> None:
    ctx = mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {timeout:.0f} s (hang?)")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # children inherit the environment
    _spawn(tmp)
    return tmp


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", ["exact", "first_order"])
def test_two_ranks_equal_one_process(ranks: Path, name: str):
    """Loss, image, soft-label and rate gradients of the sharded run equal the single-process
    ones (the sums only associate differently), on both ranks alike."""
    soft, mode, kw = CASES[name]
    _, ref = _problem_and_run(soft, mode, kw)
    got = [torch.load(ranks / f"{name}-{r}.pt")["result"] for r in range(WORLD)]
    for a, b in zip(got[0], got[1], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for g, r in zip(got[0], ref, strict=True):
        if r is None:
            assert g is None
        else:
            assert _rel(g, r) < 1e-12, name


def test_each_rank_runs_its_slice_only(ranks: Path):
    """Batches of 5 go through the student as 2 rows on rank 0 and 3 on rank 1 (the one-row
    forward is the argument check's); full batches of 7 as 3 and 4."""
    for name, sizes in (("exact", (2, 3)), ("first_order", (2, 3)), ("hard_seed_none", (3, 4))):
        for r in range(WORLD):
            rows = torch.load(ranks / f"{name}-{r}.pt")["rows"]
            assert set(rows) == {1, sizes[r]}, (name, r, set(rows))


def test_seed_none_takes_the_first_ranks_seed(ranks: Path):
    """Each rank drew another seed; both ran with rank 0's, as one process does with it."""
    saved = [torch.load(ranks / f"hard_seed_none-{r}.pt") for r in range(WORLD)]
    assert saved[0]["drawn"] != saved[1]["drawn"]
    soft, mode, kw = CASES["hard_seed_none"]
    _, ref = _problem_and_run(soft, mode, {**kw, "seed": saved[0]["drawn"]})
    for got in saved:
        for g, r in zip(got["result"], ref, strict=True):
            assert (g is None and r is None) or _rel(g, r) < 1e-12


def test_bad_group_use_is_an_error_on_every_rank(ranks: Path):
    for r in range(WORLD):
        errors = torch.load(ranks / f"errors-{r}.pt")
        assert "ranks passed different images" in errors["different_images"]
        assert "batch_syn" in errors["batch_too_small"]
        assert "unrolled" in errors["unrolled"]
        assert "out: training experts over a process group" in errors["experts_no_out"]


def test_group_without_initialized_distributed_is_an_error():
    from test_trajectory import make_problem, run

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="group was given but torch.distributed"):
        run(make_problem(), "exact", syn_steps=2, group=object())


def test_hpd_over_two_ranks(ranks: Path):
    """The H-PD loop with a group: both ranks end with the same images and losses. Against
    the single-process run they differ by float32 rounding (the batch sums associate
    differently): the losses by < 1e-4 relative (3e-7 at the first iteration), the latents
    by what Adam makes of it over 6 iterations (~0.2% of the images' norm). A wrongly summed
    batch changes the first loss by far more. Only the first rank wrote a checkpoint."""
    from test_hpd import TinyExperts, make, tiny_data

    data = tiny_data()
    ref = make("mtt", data=data, experts=TinyExperts(data), **HPD_KW).fit(progress=False)
    got = [torch.load(ranks / f"hpd-{r}.pt") for r in range(WORLD)]
    assert torch.equal(got[0]["images"], got[1]["images"])
    assert got[0]["losses"] == got[1]["losses"]
    first, ref_first = got[0]["losses"][0]["loss"], ref.losses[0]["loss"]
    assert first == pytest.approx(ref_first, rel=1e-6)
    for a, b in zip(got[0]["losses"], ref.losses, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["syn_lr"] == pytest.approx(b["syn_lr"], rel=1e-5)
    assert _rel(got[0]["images"], ref.images) < 1e-2
    assert (ranks / "ckpt-0" / "checkpoint.safetensors").is_file()
    assert not (ranks / "ckpt-1").exists() or not any((ranks / "ckpt-1").iterdir())


@pytest.mark.parametrize("algorithm", ["dm", "dc"])
def test_hpd_dm_dc_over_two_ranks(ranks: Path, algorithm: str):
    """DM / DC with the classes split over the ranks: the same images and losses on both
    ranks, and the single-process losses up to float32 rounding (the first to 1e-6)."""
    from test_hpd import make

    ref = make(algorithm, **HPD_KW_DM).fit(progress=False)
    got = [torch.load(ranks / f"hpd-{algorithm}-{r}.pt") for r in range(WORLD)]
    assert torch.equal(got[0]["images"], got[1]["images"])
    assert got[0]["losses"] == got[1]["losses"]
    assert got[0]["losses"][0]["loss"] == pytest.approx(ref.losses[0]["loss"], rel=1e-6)
    for a, b in zip(got[0]["losses"], ref.losses, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert _rel(got[0]["images"], ref.images) < 1e-2


@pytest.mark.parametrize(("key", "shares"), [("experts_seq", ([0, 2], [1])),
                                             ("experts_vmap", ([0, 1], [2]))])  # fmt: skip
def test_experts_shared_out_over_two_ranks(ranks: Path, key: str, shares):
    """Each rank trained its share only; the folder then holds the same experts as one process
    trains (expert k depends on (seed, k) alone)."""
    from test_hpd import tiny_data

    for r in range(WORLD):
        assert sorted(torch.load(ranks / f"{key}-trained-{r}.pt")) == shares[r]
    got = load(ranks / key)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same kernels, the same numbers
    try:
        ref = train_experts(tiny_data(), **EXPERT_RUNS[key], progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(got) == 3
    for a, b in zip(got.trajectories, ref.trajectories, strict=True):
        assert torch.equal(a, b)


def test_experts_group_needs_torch_distributed():
    from test_hpd import tiny_data

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="group was given"):
        train_experts(tiny_data(), num_experts=1, epochs=1, group=object(), progress=False)


def test_evaluation_shared_out_over_two_ranks(ranks: Path):
    """Each rank trained half of the 8 evaluation networks; both return every accuracy, equal
    to one process's (each run depends on its seeds alone)."""
    from test_hpd import tiny_data

    data = tiny_data()
    ref = evaluate(*EVAL_SET(data), data, **EVAL_KW)
    for r in range(WORLD):
        saved = torch.load(ranks / f"eval-{r}.pt")
        assert saved["runs"] == 4
        got = saved["ev"]
        for name in EVAL_KW["models"]:
            assert got[name]["accs"] == ref[name]["accs"]
            assert got["random_real"][name]["accs"] == ref["random_real"][name]["accs"]
