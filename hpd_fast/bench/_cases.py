"""The quick suite's workloads: for each, ``hpd_fast`` and the baseline users have today.

Each builder takes ``(device, smoke)`` and returns a :class:`Workload`: two zero-argument
callables on the same inputs and a line describing the shapes. ``smoke`` shrinks every shape
to a few elements, to check that the suite runs (its ratios then mean nothing).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CASES", "Case", "Workload"]

K = 10  # classes, as in every workload the paper distils
STEPS = 4  # trajectory: a few student steps of a small ConvNet-3 keep a round near a second
WIDTH = 32


@dataclass(frozen=True)
class Workload:
    baseline: Callable[[], Any]
    fast: Callable[[], Any]
    shapes: str


@dataclass(frozen=True)
class Case:
    """One row of the quick suite: ``hpd_fast`` (``fast``) against ``baseline``."""

    name: str
    title: str
    fast: str
    baseline: str
    build: Callable[[torch.device, bool], Workload]


def _rand(*shape: int, device: torch.device, gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen).to(device)


# --------------------------------------------------------------------------------------------
# feature distance
# --------------------------------------------------------------------------------------------


def _vectorized_distance(feats: list[Tensor], labels: Tensor, targets: list[Tensor]) -> Tensor:
    """The vectorized PyTorch per-class mean: one ``index_add_`` per layer, means, distance."""
    n, s = labels.shape[0], targets[0].shape[0]
    counts = torch.zeros(s, device=labels.device).index_add_(
        0, labels, torch.ones(n, device=labels.device)
    )
    inv = (1.0 / counts.clamp(min=1)).unsqueeze(1)
    total = torch.zeros((), device=labels.device)
    for x, t in zip(feats, targets):
        x = x.reshape(n, -1)
        sums = torch.zeros(s, x.shape[1], device=x.device, dtype=x.dtype).index_add(0, labels, x)
        total = total + ((sums * inv - t) ** 2).sum()
    return total


def _feature_distance(device: torch.device, smoke: bool) -> Workload:
    import hpd_fast

    # ConvNet-3 block outputs at 32x32 for 100 images (IPC 10): what DM matches every step.
    n, shapes = (12, [(4, 4, 4), (4, 2, 2)]) if smoke else (100, [(128, 32, 32), (128, 16, 16), (128, 8, 8)])  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    feats = [_rand(n, *s, device=device, gen=gen).requires_grad_(True) for s in shapes]
    labels = torch.arange(K).repeat_interleave(n // K + 1)[:n].to(device)
    targets = [_rand(K, c * h * w, device=device, gen=gen) for c, h, w in shapes]

    def run(fn: Callable[..., Tensor]) -> Callable[[], Any]:
        return lambda: torch.autograd.grad(fn(feats, labels, targets), feats)

    text = f"N={n}, {K} classes, features " + ", ".join("x".join(map(str, s)) for s in shapes)
    return Workload(
        run(_vectorized_distance), run(hpd_fast.class_mean_distance), text + ", fp32, fwd+bwd"
    )


# --------------------------------------------------------------------------------------------
# student block
# --------------------------------------------------------------------------------------------


def _student_block(device: torch.device, smoke: bool) -> Workload:
    import hpd_fast

    b, c, hw = (2, 4, 4) if smoke else (100, 128, 32)  # first ConvNet-3 block, IPC 10, 32x32
    gen = torch.Generator().manual_seed(0)
    x = _rand(b, c, hw, hw, device=device, gen=gen).requires_grad_(True)
    w = (1 + 0.1 * _rand(c, device=device, gen=gen)).requires_grad_(True)
    bias = (0.1 * _rand(c, device=device, gen=gen)).requires_grad_(True)
    gy = _rand(b, c, hw // 2, hw // 2, device=device, gen=gen)

    def torch_block() -> Any:
        y = F.avg_pool2d(F.relu(F.group_norm(x, c, w, bias, 1e-5)), 2)
        return torch.autograd.grad(y, (x, w, bias), gy)

    def fused() -> Any:
        y = hpd_fast.instance_norm_relu_pool(x, w, bias)
        return torch.autograd.grad(y, (x, w, bias), gy)

    return Workload(torch_block, fused, f"x {b}x{c}x{hw}x{hw}, fp32, fwd+bwd")


# --------------------------------------------------------------------------------------------
# trajectory matching
# --------------------------------------------------------------------------------------------


def _trajectory(device: torch.device, smoke: bool) -> Workload:
    from hpd_fast.augment import DSA
    from hpd_fast.distill.trajectory import trajectory_matching_loss
    from hpd_fast.models import get_model
    from hpd_fast.params import flatten_params

    ipc, res, steps, width = (1, 8, 2, 8) if smoke else (10, 32, STEPS, WIDTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = get_model("ConvNet", 3, K, (res, res), width=width).to(device)
    gen = torch.Generator().manual_seed(1)
    start = flatten_params(student).detach()
    target = start + 0.01 * _rand(start.numel(), device=device, gen=gen)
    images = _rand(K * ipc, 3, res, res, device=device, gen=gen)
    labels = torch.arange(K, device=device).repeat_interleave(ipc)
    dsa = DSA()

    def run(mode: str) -> Callable[[], Any]:
        def call() -> float:
            x = images.clone().requires_grad_(True)
            lr = torch.tensor(0.01, device=device, requires_grad=True)
            loss = trajectory_matching_loss(
                student, x, labels, lr, start, target,
                syn_steps=steps, augment=dsa, mode=mode, seed=0,
            )  # fmt: skip
            loss.backward()
            return float(loss.detach())

        return call

    depth = sum(isinstance(m, nn.Conv2d) for m in student.modules())
    text = (
        f"ConvNet-{depth} (width {width}), IPC {ipc} ({K * ipc} images {res}x{res}), "
        f"{steps} student steps, DSA, fwd+bwd"
    )
    return Workload(run("unrolled"), run("exact"), text)


# --------------------------------------------------------------------------------------------
# one H-PD iteration
# --------------------------------------------------------------------------------------------


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


def published_first_order(
    student: nn.Module,
    images: Tensor,
    labels: Tensor,
    syn_lr: Tensor,
    start: Tensor,
    target: Tensor,
    *,
    syn_steps: int,
    augment: Callable[[Tensor, int], Tensor],
    seed: int = 0,
) -> Tensor:
    """First-order trajectory matching organised as the published GLaD / H-PD code does it.

    Pass 1 walks the trajectory taking each step's gradient with ``create_graph=True`` and keeps
    every augmented batch with its graph; pass 2 recomputes each step's gradient with a graph
    and differentiates the per-step surrogate with respect to the batch. Fills ``images.grad``;
    returns the loss. (The benchmark suite's ``bench_trajectory.published_two_pass``, without
    soft labels and minibatches: the quick suite's baseline ships with the package.)
    """
    from hpd_fast.distill.trajectory import batch_schedule
    from hpd_fast.params import functional_forward

    sched = batch_schedule(images.shape[0], syn_steps, None, seed)
    alpha = float(syn_lr.detach())
    start, target = start.detach(), target.detach()
    dist = (start - target).pow(2).sum()
    params = [start.clone().requires_grad_(True)]
    batches, augmented = [], []
    g_sum = torch.zeros_like(start)
    for idx, s in zip(sched.indices, sched.aug_seeds):
        idx = idx.to(images.device)
        xb = images[idx]
        xa = augment(xb, s)
        batches.append(xb)
        augmented.append(xa)
        w = params[-1].detach().clone().requires_grad_(True)
        ce = _ce(functional_forward(student, w, xa), labels[idx])
        (g,) = torch.autograd.grad(ce, w, create_graph=True, retain_graph=True)
        params.append(w - alpha * g.detach())
        g_sum = g_sum + g.detach()
    grad_x = torch.zeros_like(images)
    for t, idx in enumerate(sched.indices):
        idx = idx.to(images.device)
        w = params[t]
        ce = _ce(functional_forward(student, w, augmented[t]), labels[idx])
        (g,) = torch.autograd.grad(ce, w, create_graph=True, retain_graph=True)
        square = alpha**2 * g.dot(g)
        single = 2 * alpha * g.dot(alpha * (g_sum - g.detach()) - start + target)
        (gx,) = torch.autograd.grad((square + single) / dist, batches[t])
        grad_x.index_add_(0, idx, gx)
    images.grad = grad_x
    with torch.enable_grad():
        lr = syn_lr.detach().requires_grad_(True)
        loss = (start - lr * g_sum - target).pow(2).sum() / dist
        torch.autograd.grad(loss, lr)
    return loss.detach()


def _hpd_iteration(device: torch.device, smoke: bool) -> Workload:
    from hpd_fast.augment import DSA
    from hpd_fast.distill.trajectory import trajectory_matching_loss
    from hpd_fast.generators import ConvGenerator
    from hpd_fast.models import get_model
    from hpd_fast.params import flatten_params
    from hpd_fast.render import render

    # bench_hpd.py's "digits" workload: 1x8x8, ConvGenerator at stage 1, ConvNet-2, IPC 1.
    shape, gwidth, width, steps, chunk = ((1, 8, 8), 8, 8, 2, 5) if smoke else ((1, 8, 8), 48, 128, 20, 10)  # fmt: skip
    c, h, wd = shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        G = ConvGenerator(K, shape, latent_dim=32, width=gwidth).to(device).eval()
        student = get_model("ConvNet", c, K, (h, wd), width=width).to(device)
    plain = get_model("ConvNet", c, K, (h, wd), width=width, fused=False).to(device)
    plain.load_state_dict(student.state_dict())  # the published code's plain PyTorch student
    G.requires_grad_(False)
    labels = torch.arange(K, device=device)
    lat_w, lat_f = G.sample_latents(labels, seed=1)
    start = flatten_params(student).detach()
    gen = torch.Generator().manual_seed(2)
    target = start + 0.01 * _rand(start.numel(), device=device, gen=gen)
    dsa = DSA()

    def fast() -> float:  # what hpd_fast.HPD runs per MTT iteration
        w, f = lat_w.clone().requires_grad_(True), lat_f.clone().requires_grad_(True)
        lr = torch.tensor(0.01, device=device, requires_grad=True)
        images = render(G, w, f, 1, chunk_size=chunk)
        loss = trajectory_matching_loss(
            student, images, labels, lr, start, target,
            syn_steps=steps, augment=dsa, mode="exact", seed=0,
        )  # fmt: skip
        torch.autograd.backward(loss, inputs=[w, f, lr])
        return float(loss.detach())

    def published() -> float:  # render, loss on detached images, re-render with a graph
        w, f = lat_w.clone(), lat_f.clone()
        with torch.no_grad():
            images = torch.cat(
                [G.render(ws, fs, 1) for ws, fs in zip(w.split(chunk), f.split(chunk))]
            )
        image_syn = images.detach().requires_grad_(True)
        lr = torch.tensor(0.01, device=device, requires_grad=True)
        loss = published_first_order(
            plain, image_syn, labels, lr, start, target, syn_steps=steps, augment=dsa, seed=0
        )
        assert image_syn.grad is not None
        for ws, fs, gx in zip(w.split(chunk), f.split(chunk), image_syn.grad.split(chunk)):
            ws = ws.detach().clone().requires_grad_(True)
            fs = fs.detach().clone().requires_grad_(True)
            G.render(ws, fs, 1).backward(gx)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return float(loss)

    text = (
        f"digits {c}x{h}x{wd}, IPC 1, ConvGenerator (width {gwidth}) at stage 1, "
        f"ConvNet (width {width}), MTT {steps} student steps, DSA"
    )
    return Workload(published, fast, text)


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case(
            "feature_distance",
            "Feature distance (DM's per-class feature means)",
            "hpd_fast.class_mean_distance",
            "PyTorch vectorized per-class means (index_add_ per layer)",
            _feature_distance,
        ),
        Case(
            "student_block",
            "Student block: instance norm + ReLU + 2x2 average pool",
            "hpd_fast.instance_norm_relu_pool",
            "PyTorch GroupNorm(C, C) + ReLU + avg_pool2d",
            _student_block,
        ),
        Case(
            "trajectory",
            "Trajectory matching, exact gradient",
            'trajectory_matching_loss(mode="exact")',
            'trajectory_matching_loss(mode="unrolled") (MTT\'s unroll, same student)',
            _trajectory,
        ),
        Case(
            "hpd_iteration",
            "One H-PD iteration (MTT)",
            "hpd_fast: render + exact trajectory matching",
            "published structure: render twice, first-order two-pass, plain PyTorch ConvNet",
            _hpd_iteration,
        ),
    )
}
