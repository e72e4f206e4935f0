"""Trajectory matching: exact adjoint vs full unroll, first-order scheme, replay, memory, errors.

Gradients are compared in float64 on small ConvNets, where the exact constant-memory sweep must
agree with plain autograd through every step to rounding.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpd_fast.augment import DSA
from hpd_fast.distill.snapshots import SnapshotPlan
from hpd_fast.distill.trajectory import MODES, batch_schedule, trajectory_matching_loss
from hpd_fast.models.convnet import ConvNet
from hpd_fast.ops.trajectory_ops import (
    adjoint_update,
    adjoint_update_ref,
    param_match_loss,
    param_match_loss_ref,
    sgd_step,
    sgd_step_ref,
)
from hpd_fast.params import flatten_params, functional_forward

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64
NUM_CLASSES = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are tiny: one intra-op thread is faster and steadier on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def simple_augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded differentiable augmentation: per-image scale, per-channel shift, random flip."""
    gen = torch.Generator().manual_seed(seed)
    n, c = x.shape[:2]
    scale = (0.5 + torch.rand(n, 1, 1, 1, generator=gen, dtype=F64)).to(x)
    shift = torch.randn(n, c, 1, 1, generator=gen, dtype=F64).to(x)
    flip = (torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1).to(x.device)
    y = x * scale + 0.1 * shift
    return torch.where(flip, y.flip(-1), y)


AUGMENTS = {"none": None, "simple": simple_augment, "dsa": DSA()}


def make_problem(soft: bool = False, m: int = 7, seed: int = 0, depth: int = 2, width: int = 6):
    """A small float64 ConvNet problem: (student, images, labels, start, target)."""
    torch.manual_seed(seed)
    net = ConvNet(3, NUM_CLASSES, width, depth, im_size=(8, 8)).to(F64)
    start = flatten_params(net)
    target = start + 0.05 * torch.randn_like(start)
    images = torch.randn(m, 3, 8, 8, dtype=F64)
    if soft:
        labels = torch.softmax(2 * torch.randn(m, NUM_CLASSES, dtype=F64), dim=1)
    else:
        labels = torch.arange(m) % NUM_CLASSES
    return net, images, labels, start, target


def run(problem, mode: str, lr: float = 0.1, **kw):
    """Loss and gradients (images, soft labels or None, syn_lr) for one call."""
    net, images, labels, start, target = problem
    x = images.clone().requires_grad_(True)
    y = labels.clone().requires_grad_(labels.is_floating_point())
    syn_lr = torch.tensor(lr, dtype=F64, requires_grad=True)
    kw.setdefault("syn_steps", 6)
    kw.setdefault("seed", 1)
    loss = trajectory_matching_loss(net, x, y, syn_lr, start, target, mode=mode, **kw)
    loss.backward()
    return loss.detach(), x.grad, y.grad, syn_lr.grad


# --------------------------------------------------------------------------------------------
# flat-parameter primitives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 7, 1031])
@pytest.mark.parametrize("strided", [False, True])
def test_primitives_match_formulas(p: int, strided: bool):
    def vec():
        v = torch.randn(2 * p if strided else p, dtype=F64)
        return v[::2] if strided else v

    theta, grad, target, start, lam, h = (vec() for _ in range(6))
    lr = torch.tensor(0.3, dtype=F64)
    torch.testing.assert_close(sgd_step(theta, grad, lr), theta - 0.3 * grad)
    torch.testing.assert_close(sgd_step(theta, grad, lr), sgd_step_ref(theta, grad, lr))

    leaf = theta.clone().requires_grad_(True)
    loss, seed = param_match_loss(leaf, target, start)
    d = ((start - target) ** 2).sum()
    torch.testing.assert_close(loss, ((theta - target) ** 2).sum() / d)
    (auto,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(seed, auto)  # the seed is dL/dtheta_n
    ref = param_match_loss_ref(theta, target, start)
    # Dispatched kernels sum in another order than the reference: equal to rounding.
    torch.testing.assert_close(
        param_match_loss(theta, target, start)[0], ref[0], rtol=1e-14, atol=0
    )

    new_lam, dot = adjoint_update(lam, h, grad)
    torch.testing.assert_close(new_lam, lam + h)
    torch.testing.assert_close(dot, (grad * lam).sum())  # old lambda, not lam + h
    torch.testing.assert_close(adjoint_update_ref(lam, h, grad)[1], dot, rtol=1e-13, atol=1e-15)


def test_primitives_reject_bad_input():
    v = torch.randn(5, dtype=F64)
    lr = torch.tensor(0.1, dtype=F64)
    for fn, args in (
        (sgd_step, (v, v, lr)),
        (param_match_loss, (v, v + 1, v)),
        (adjoint_update, (v, v, v)),
    ):
        with pytest.raises(ValueError, match="backend"):
            fn(*args, backend="cuda")
        fn(*args, backend="reference")
    with pytest.raises(ValueError, match="grad"):
        sgd_step(v, torch.randn(4, dtype=F64), lr)
    with pytest.raises(TypeError, match="lr"):
        sgd_step(v, v, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="target"):
        param_match_loss(v, v.view(1, 5), v)
    with pytest.raises(ValueError, match="g"):
        adjoint_update(v, v, torch.randn(6, dtype=F64))


# --------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------


def test_batch_schedule_refills_permutations():
    sched = batch_schedule(7, 9, 3, seed=5)
    assert len(sched) == 9 and len(sched.aug_seeds) == 9
    sizes = [len(i) for i in sched.indices]
    assert sizes == [3, 3, 1, 3, 3, 1, 3, 3, 1]  # the last chunk of each permutation is short
    for k in range(3):
        perm = torch.cat(sched.indices[3 * k : 3 * k + 3])
        assert sorted(perm.tolist()) == list(range(7))
    again = batch_schedule(7, 9, 3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(sched.indices, again.indices, strict=True))
    assert sched.aug_seeds == again.aug_seeds
    other = batch_schedule(7, 9, 3, seed=6)
    assert sched.aug_seeds != other.aug_seeds
    full = batch_schedule(4, 2, None, seed=0)
    assert [len(i) for i in full.indices] == [4, 4]


# --------------------------------------------------------------------------------------------
# exact == unrolled
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", list(AUGMENTS))
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("batch_syn", [3, None], ids=["batch3", "full"])
def test_exact_matches_unrolled(augment: str, soft: bool, batch_syn: int | None):
    problem = make_problem(soft=soft)
    kw = dict(batch_syn=batch_syn, augment=AUGMENTS[augment])
    ref = run(problem, "unrolled", **kw)
    got = run(problem, "exact", **kw)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=0)
    assert rel_err(got[1], ref[1]) < 1e-9
    assert rel_err(got[3], ref[3]) < 1e-9
    if soft:
        assert rel_err(got[2], ref[2]) < 1e-9
    else:
        assert got[2] is None and ref[2] is None
    assert got[1].abs().sum() > 0 and got[3] != 0  # a real, non-trivial gradient


def test_exact_partial_requires_grad_and_grad_scaling():
    """Only syn_lr requires grad; and an upstream factor scales every gradient."""
    net, images, labels, start, target = make_problem()
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    kw = dict(syn_steps=5, batch_syn=4, seed=2)
    loss = trajectory_matching_loss(net, images, labels, lr, start, target, **kw)
    (3.0 * loss).backward()
    lr_u = torch.tensor(0.1, dtype=F64, requires_grad=True)
    loss_u = trajectory_matching_loss(
        net, images, labels, lr_u, start, target, mode="unrolled", **kw
    )
    (3.0 * loss_u).backward()
    assert rel_err(lr.grad, lr_u.grad) < 1e-9
    # Nothing requires grad: a plain value, no graph.
    plain = trajectory_matching_loss(net, images, labels, lr.detach(), start, target, **kw)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, loss.detach(), rtol=0, atol=0)


def test_no_gradient_to_start_and_target():
    net, images, labels, start, target = make_problem()
    start = start.clone().requires_grad_(True)
    target = target.clone().requires_grad_(True)
    x = images.clone().requires_grad_(True)
    lr = torch.tensor(0.1, dtype=F64)
    for mode in MODES:
        loss = trajectory_matching_loss(net, x, labels, lr, start, target, syn_steps=3, mode=mode)
        loss.backward()
        assert start.grad is None and target.grad is None
    # Only the constants require grad: the sweeps' backward runs and fills nothing.
    for mode in ("exact", "first_order"):
        loss = trajectory_matching_loss(
            net, images, labels, lr, start, target, syn_steps=3, mode=mode
        )
        loss.backward()
        assert start.grad is None and target.grad is None


def test_first_order_rate_only_stores_no_snapshot(monkeypatch):
    """first_order's rate gradient comes from the forward sweep's sum of g_t: with nothing else
    requiring grad no snapshot is stored, and the rate gradient is the one computed alongside
    the image gradient; a second backward (retain_graph) gives it again."""
    from hpd_fast.distill import trajectory as tm

    net, images, labels, start, target = make_problem()
    kw = dict(syn_steps=5, batch_syn=4, seed=2, mode="first_order")
    lr_both = torch.tensor(0.1, dtype=F64, requires_grad=True)
    x = images.clone().requires_grad_(True)
    trajectory_matching_loss(net, x, labels, lr_both, start, target, **kw).backward()

    stored = []
    offload = tm._Sweep.offload
    monkeypatch.setattr(tm._Sweep, "offload", lambda self, t: stored.append(1) or offload(self, t))
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    loss = trajectory_matching_loss(net, images, labels, lr, start, target, **kw)
    loss.backward(retain_graph=True)
    assert torch.equal(lr.grad, lr_both.grad)
    loss.backward()
    torch.testing.assert_close(lr.grad, 2 * lr_both.grad, rtol=1e-14, atol=0)
    assert not stored


# --------------------------------------------------------------------------------------------
# first order
# --------------------------------------------------------------------------------------------


def first_order_by_stop_gradient(problem, lr: float, syn_steps: int, batch_syn, augment, seed):
    """Independent first-order scheme: theta_N = theta_0 - alpha sum_t g_t(stopgrad(theta_t))."""
    net, images, labels, start, target = problem
    x_all = images.clone().requires_grad_(True)
    y_all = labels.clone().requires_grad_(labels.is_floating_point())
    alpha = torch.tensor(lr, dtype=F64, requires_grad=True)
    sched = batch_schedule(images.shape[0], syn_steps, batch_syn, seed)
    theta = start.clone()
    g_sum = torch.zeros_like(start)
    for idx, s in zip(sched.indices, sched.aug_seeds, strict=True):
        th = theta.detach().requires_grad_(True)
        xb = x_all[idx] if augment is None else augment(x_all[idx], s)
        logits = functional_forward(net, th, xb)
        yb = y_all[idx]
        if yb.is_floating_point():
            ce = -(yb * logits.log_softmax(1)).sum(1).mean()
        else:
            ce = F.cross_entropy(logits, yb)
        (g,) = torch.autograd.grad(ce, th, create_graph=True)
        g_sum = g_sum + g
        theta = (th - alpha * g).detach()
    theta_n = start - alpha * g_sum
    loss = ((theta_n - target) ** 2).sum() / ((start - target) ** 2).sum()
    loss.backward()
    return loss.detach(), x_all.grad, y_all.grad, alpha.grad


@pytest.mark.parametrize("augment", ["none", "dsa"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_first_order_matches_stop_gradient_formula(augment: str, soft: bool):
    problem = make_problem(soft=soft)
    aug = AUGMENTS[augment]
    ref = first_order_by_stop_gradient(problem, 0.1, 6, 3, aug, seed=4)
    got = run(problem, "first_order", syn_steps=6, batch_syn=3, augment=aug, seed=4)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=0)
    assert rel_err(got[1], ref[1]) < 1e-9
    assert rel_err(got[3], ref[3]) < 1e-9
    if soft:
        assert rel_err(got[2], ref[2]) < 1e-9


def test_first_order_is_an_approximation():
    problem = make_problem(soft=True)
    kw = dict(syn_steps=8, batch_syn=3, augment=simple_augment, seed=0, lr=0.2)
    exact = run(problem, "exact", **kw)
    first = run(problem, "first_order", **kw)
    torch.testing.assert_close(first[0], exact[0], rtol=1e-12, atol=0)  # same forward
    assert rel_err(first[1], exact[1]) > 1e-3  # but Hessian terms are missing
    assert rel_err(first[2], exact[2]) > 1e-3
    assert rel_err(first[3], exact[3]) > 1e-3
    # With one step there are no Hessian factors to drop: both are exact.
    one_e = run(problem, "exact", syn_steps=1, seed=0)
    one_f = run(problem, "first_order", syn_steps=1, seed=0)
    assert rel_err(one_f[1], one_e[1]) < 1e-12 and rel_err(one_f[3], one_e[3]) < 1e-12


# --------------------------------------------------------------------------------------------
# replay determinism, snapshots
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_result_other_seed_differs(mode: str):
    problem = make_problem(soft=True)
    kw = dict(batch_syn=3, augment=AUGMENTS["dsa"], syn_steps=4)
    a = run(problem, mode, seed=11, **kw)
    b = run(problem, mode, seed=11, **kw)
    c = run(problem, mode, seed=12, **kw)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[1], c[1])


def test_seed_none_draws_from_torch_generator():
    problem = make_problem()
    torch.manual_seed(3)
    a = run(problem, "exact", seed=None, batch_syn=3, syn_steps=3)
    b = run(problem, "exact", seed=None, batch_syn=3, syn_steps=3)
    torch.manual_seed(3)
    c = run(problem, "exact", seed=None, batch_syn=3, syn_steps=3)
    assert torch.equal(a[1], c[1]) and not torch.equal(a[1], b[1])


@pytest.mark.parametrize("mode", ["exact", "first_order"])
def test_snapshot_device_cpu(mode: str):
    problem = make_problem(soft=True)
    kw = dict(batch_syn=3, syn_steps=5, seed=3)
    a = run(problem, mode, **kw)
    b = run(problem, mode, snapshot_device="cpu", **kw)
    b2 = run(problem, mode, snapshot_device=torch.device("cpu"), **kw)
    for u, v, w in zip(a, b, b2, strict=True):
        assert torch.equal(u, v) and torch.equal(u, w)


@pytest.mark.parametrize("mode", ["exact", "first_order"])
@pytest.mark.parametrize("budget", [1, 2, 3, 5, 7, 50])
def test_max_snapshots_rebuilds_the_same_snapshots(mode: str, budget: int):
    """A snapshot budget below N (1: every snapshot from theta_0 again; 2, 3: steps rebuilt
    more than once; 5: each at most once; 7 = N and 50 > N: all stored) changes nothing: the
    rebuilt parameters are the same numbers, so the gradients are identical."""
    problem = make_problem(soft=True)
    kw = dict(batch_syn=3, syn_steps=7, seed=4, augment=AUGMENTS["dsa"])
    a = run(problem, mode, max_snapshots=None, **kw)
    b = run(problem, mode, max_snapshots=budget, **kw)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    if mode == "exact":
        ref = run(problem, "unrolled", **kw)
        assert rel_err(b[1], ref[1]) < 1e-9 and rel_err(b[3], ref[3]) < 1e-9


@pytest.mark.parametrize(("steps", "budget"), [(9, 4), (12, 4), (20, 3), (6, 6), (6, 2), (5, 1)])
def test_max_snapshots_bounds_live_snapshots_and_recomputation(monkeypatch, steps, budget):
    """Counted on the real tensors: stored snapshots alive at once never exceed the budget
    (so the reverse sweep does release them), and the SGD steps taken without a graph are the
    N of the forward sweep plus the plan's recomputation (N - budget when each is rebuilt
    once, i.e. N <= budget (budget + 1) / 2)."""
    from hpd_fast.distill import trajectory as tm

    alive = peak = graphless = 0
    offload, grad_at = tm._Sweep.offload, tm._Sweep.grad_at

    def on_free():
        nonlocal alive
        alive -= 1

    def counting_offload(self, theta):
        nonlocal alive, peak
        out = offload(self, theta)
        alive += 1
        peak = max(peak, alive)
        weakref.finalize(out, on_free)
        return out

    def counting_grad_at(self, t, theta, xb, yb, create_graph):
        nonlocal graphless
        graphless += not create_graph
        return grad_at(self, t, theta, xb, yb, create_graph)

    monkeypatch.setattr(tm._Sweep, "offload", counting_offload)
    monkeypatch.setattr(tm._Sweep, "grad_at", counting_grad_at)
    problem = make_problem(m=4)
    run(problem, "exact", syn_steps=steps, max_snapshots=budget, seed=2)
    plan = SnapshotPlan.get(steps, budget)
    assert peak == plan.peak <= budget
    assert graphless == steps + plan.recomputed_steps
    if steps <= budget * (budget + 1) // 2:
        assert plan.recomputed_steps == max(0, steps - budget)
    gc.collect()
    assert alive == 0


def test_snapshot_plan_replays_every_step_in_reverse():
    """On integers standing for snapshots: every (N, S) yields t = N-1 .. 0 with theta_t
    reached from a stored snapshot by the right steps, advances as often as the plan says,
    and recomputes N (N - 1) / 2 steps with a single slot, none when S >= N."""
    for n in range(1, 40):
        for s in [*range(1, 12), None]:
            plan = SnapshotPlan(n, s)
            taken: list[int] = []

            def advance(t, x, taken=taken):
                assert x == t
                taken.append(t)
                return t + 1

            out = list(plan.reverse(list(plan.chain), advance, lambda x: x, lambda x: x))
            assert out == [(t, t) for t in range(n - 1, -1, -1)], (n, s)
            assert len(taken) == plan.recomputed_steps and plan.peak <= (s or n)
            if s is None or s >= n:
                assert plan.recomputed_steps == 0 and plan.chain == list(range(n))
            elif s == 1:
                assert plan.recomputed_steps == n * (n - 1) // 2
            elif n <= s * (s + 1) // 2:
                assert plan.recomputed_steps == n - s  # the lower bound: S stored, N - S not


def test_snapshot_plan_recomputes_the_fewest_steps():
    """Against an independent exhaustive search over every recursive schedule (split a
    segment anywhere, store the split point, reverse the upper part with one slot fewer):
    the plan's recomputation is the minimum, also where steps must be rebuilt twice or more
    (N > S (S + 1) / 2)."""
    import functools

    @functools.cache
    def rebuild(n, s):  # cost of reversing n steps from a held snapshot, none of them taken
        if n == 1:
            return 0
        if s == 1:
            return sum(range(n))
        return min(m + rebuild(n - m, s - 1) + rebuild(m, s) for m in range(1, n))

    @functools.cache
    def first(n, s):  # the same while the forward sweep takes the steps anyway
        if n == 1:
            return 0
        if s == 1:
            return sum(range(n))
        return min(first(n - m, s - 1) + rebuild(m, s) for m in range(1, n))

    for n in range(1, 46):
        for s in range(1, 9):
            assert SnapshotPlan(n, s).recomputed_steps == first(n, s), (n, s)


def test_max_snapshots_backward_twice():
    """retain_graph: the first backward released the stored snapshots; a second one stores
    them again and gives the same gradient (so the total doubles)."""
    net, images, labels, start, target = make_problem()
    x = images.clone().requires_grad_(True)
    lr = torch.tensor(0.1, dtype=F64)
    loss = trajectory_matching_loss(
        net, x, labels, lr, start, target, syn_steps=5, seed=0, max_snapshots=2
    )
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=1e-14, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_exact_matches_unrolled_with_cpu_snapshots():
    net, images, labels, start, target = make_problem(soft=True)
    problem = (net.cuda(), images.cuda(), labels.cuda(), start.cuda(), target.cuda())
    kw = dict(batch_syn=3, syn_steps=5, seed=3, augment=AUGMENTS["dsa"])
    ref = run_cuda(problem, "unrolled", **kw)
    got = run_cuda(problem, "exact", snapshot_device="cpu", **kw)
    for u, v in zip(got[1:], ref[1:], strict=True):
        assert rel_err(u, v) < 1e-9


def run_cuda(problem, mode, **kw):
    net, images, labels, start, target = problem
    x = images.clone().requires_grad_(True)
    y = labels.clone().requires_grad_(True)
    lr = torch.tensor(0.1, dtype=F64, device="cuda", requires_grad=True)
    trajectory_matching_loss(net, x, y, lr, start, target, mode=mode, **kw).backward()
    return None, x.grad, y.grad, lr.grad


def test_custom_student_module():
    """Any replayable module works, e.g. a hand-built Sequential with Tanh and GroupNorm."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(4, 4),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).to(F64)
    start = flatten_params(net)
    target = start + 0.1 * torch.randn_like(start)
    problem = (
        net,
        torch.randn(5, 2, 6, 6, dtype=F64),
        torch.tensor([0, 1, 2, 0, 1]),
        start,
        target,
    )
    ref = run(problem, "unrolled", batch_syn=2, syn_steps=5)
    got = run(problem, "exact", batch_syn=2, syn_steps=5)
    assert rel_err(got[1], ref[1]) < 1e-9 and rel_err(got[3], ref[3]) < 1e-9


# --------------------------------------------------------------------------------------------
# memory: exact is flat in syn_steps, unrolled grows
# --------------------------------------------------------------------------------------------

# Peak RSS of the call above the RSS just before it. The peak is read from VmHWM, not
# ru_maxrss: Linux carries ru_maxrss across execve, so a child spawned by a big parent (vfork)
# would report the parent's peak. Writing "5" to clear_refs resets VmHWM to the current RSS.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)  # steadier on a shared machine; memory is what we measure
    from hpd_fast.distill.trajectory import trajectory_matching_loss
    from hpd_fast.models.convnet import ConvNet
    from hpd_fast.params import flatten_params

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    mode, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    net = ConvNet(3, 10, 32, 2, im_size=(16, 16))
    start = flatten_params(net)
    target = start + 0.01 * torch.randn_like(start)
    x = torch.randn(32, 3, 16, 16, requires_grad=True)
    y = torch.arange(32) % 10
    lr = torch.tensor(0.01, requires_grad=True)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status("VmRSS")
    loss = trajectory_matching_loss(net, x, y, lr, start, target, syn_steps=steps, mode=mode,
                                    seed=0)
    loss.backward()
    print(json.dumps({"peak": status("VmHWM") - before, "P": start.numel()}))
    """
)


def _peak_bytes(runs: list[tuple[str, int]]) -> list[int]:
    """Peak memory above baseline of each ``(mode, syn_steps)``, each in a fresh interpreter.

    The processes run concurrently (one thread each): the measure is per process.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MEMORY_SCRIPT, mode, str(steps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for mode, steps in runs
    ]
    peaks = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak"])
    return peaks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_exact_memory_is_flat_in_syn_steps():
    runs = [("exact", 10), ("exact", 60), ("unrolled", 10), ("unrolled", 60)]
    exact_10, exact_60, unrolled_10, unrolled_60 = _peak_bytes(runs)
    report = f"exact {exact_10 / 2**20:.0f}->{exact_60 / 2**20:.0f} MiB, "
    report += f"unrolled {unrolled_10 / 2**20:.0f}->{unrolled_60 / 2**20:.0f} MiB"
    assert exact_60 <= 1.25 * exact_10, report
    assert unrolled_60 >= 3 * unrolled_10, report
    assert exact_60 < unrolled_60 / 3, report


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def _call(problem, **overrides):
    net, images, labels, start, target = problem
    args = dict(
        student=net,
        images=images,
        labels=labels,
        syn_lr=torch.tensor(0.1, dtype=F64),
        start_params=start,
        target_params=target,
        syn_steps=2,
    )
    args.update(overrides)
    return trajectory_matching_loss(**args)


def _bad_cases(problem):
    net, images, labels, start, target = problem
    bn_net = nn.Sequential(
        nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, NUM_CLASSES)
    ).to(F64)
    bn_start = flatten_params(bn_net)
    return [
        ("start_params", dict(start_params=start[:-1])),
        ("target_params", dict(target_params=torch.cat([target, target[:1]]))),
        ("start_params", dict(start_params=start.view(1, -1))),
        ("target_params", dict(target_params=target.float())),
        ("start_params", dict(start_params=start.float(), target_params=target.float())),
        ("start_params", dict(target_params=start.clone())),
        ("syn_steps", dict(syn_steps=0)),
        ("syn_steps", dict(syn_steps=2.0)),
        ("batch_syn", dict(batch_syn=0)),
        ("batch_syn", dict(batch_syn=images.shape[0] + 1)),
        ("labels", dict(labels=labels[:-1])),
        ("labels", dict(labels=labels.clone().fill_(NUM_CLASSES))),
        ("labels", dict(labels=labels - 1)),
        ("labels", dict(labels=labels.int())),
        ("labels", dict(labels=torch.rand(images.shape[0], NUM_CLASSES + 1, dtype=F64))),
        ("syn_lr", dict(syn_lr=torch.tensor([0.1], dtype=F64))),
        ("syn_lr", dict(syn_lr=torch.tensor(1))),
        ("syn_lr", dict(syn_lr=0.1)),
        ("images", dict(images=images[0])),
        ("images", dict(images=images.long())),
        ("syn_lr", dict(syn_lr=torch.tensor(0.1, dtype=F64, device="meta"))),
        ("mode", dict(mode="second_order")),
        ("student", dict(student=bn_net, start_params=bn_start, target_params=bn_start + 1)),
        ("snapshot_device", dict(snapshot_device="not-a-device")),
        ("max_snapshots", dict(max_snapshots=0)),
        ("max_snapshots", dict(max_snapshots=2.0)),
        ("max_snapshots", dict(max_snapshots=True)),
        ("augment", dict(augment="dsa")),
        ("seed", dict(seed="1")),
    ]


def test_bad_input_raises_naming_the_argument():
    problem = make_problem()
    _call(problem)  # the base call is valid
    for name, override in _bad_cases(problem):
        with pytest.raises((ValueError, TypeError), match=name):
            _call(problem, **override)
