"""Trajectory matching (MTT) with an exact, constant-memory gradient.

A student network starts at expert parameters ``theta_0`` and takes ``N`` SGD steps with a
learnable rate ``alpha`` on minibatches of the synthetic set ``X``::

    g_t      = grad_theta CE(f(A_{s_t}(X[idx_t]); theta_t), Y[idx_t])
    theta_t+1 = theta_t - alpha * g_t
    L        = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2

Three ways to differentiate ``L`` are offered (``mode=``):

``"exact"`` (default)
    Reverse-mode through the whole trajectory without keeping its graph. The forward sweep
    stores only the parameter snapshots, the batch indices and the augmentation seeds; the
    backward sweep replays one step at a time and propagates the adjoint
    ``lambda_t = (I - alpha H_t) lambda_t+1`` with one double-backward per step. Memory: one
    step's graph plus at most ``max_snapshots`` parameter vectors (32 by default; longer
    trajectories rebuild the snapshots they did not store, see
    :mod:`hpd_fast.distill.snapshots`), whatever ``N``. Gradients equal the full unroll's up to
    floating-point rounding; cost is about one extra forward+backward per step.

``"first_order"``
    The approximation used by the published TESLA / GLaD / H-PD code (see
    :func:`trajectory_matching_loss` for exactly what it drops).

``"unrolled"``
    Plain autograd through every step (``create_graph=True``), as the original MTT code does.
    Memory grows linearly with ``N``; kept as the reference for tests.

No gradient flows to ``start_params`` or ``target_params`` in any mode: they are treated as
constants (expert checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from hpd_fast._checks import check_int
from hpd_fast._common import MAX_AUG_SEED, Augment
from hpd_fast._distributed import rank_and_size
from hpd_fast.distill.snapshots import DEFAULT_MAX_SNAPSHOTS, SnapshotPlan, check_max_snapshots
from hpd_fast.ops.trajectory_ops import adjoint_update, param_match_loss, sgd_step
from hpd_fast.params import check_replayable, functional_forward

__all__ = ["MODES", "TrajectorySchedule", "batch_schedule", "trajectory_matching_loss"]

MODES = ("exact", "first_order", "unrolled")


@dataclass(frozen=True)
class TrajectorySchedule:
    """What the student sees at each step; replaying it reproduces the trajectory exactly.

    Attributes:
        indices: ``syn_steps`` int64 CPU tensors ``[B_t]``, the synthetic images of step ``t``.
        aug_seeds: ``syn_steps`` ints, the augmentation seed of step ``t``.
    """

    indices: tuple[Tensor, ...]
    aug_seeds: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)


def batch_schedule(
    num_images: int, syn_steps: int, batch_syn: int | None = None, seed: int = 0
) -> TrajectorySchedule:
    """Draw the minibatch indices and augmentation seeds of a student trajectory.

    The schedule walks through random permutations of ``range(num_images)`` split into chunks
    of ``batch_syn`` (the last chunk of a permutation may be smaller); a new permutation is drawn
    when the chunks are used up. Each step also draws one augmentation seed. Everything comes
    from one CPU ``torch.Generator`` seeded with ``seed``.

    Args:
        num_images: ``M``, the size of the synthetic set.
        syn_steps: number of student steps ``N``.
        batch_syn: minibatch size in ``[1, M]``; ``None`` means ``M`` (full batch).
        seed: generator seed.

    Returns:
        A :class:`TrajectorySchedule` with ``N`` index tensors and ``N`` seeds.
    """
    batch = num_images if batch_syn is None else batch_syn
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    indices: list[Tensor] = []
    aug_seeds: list[int] = []
    chunks: list[Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(num_images, generator=gen).split(batch))
        indices.append(chunks.pop(0))
        aug_seeds.append(int(torch.randint(0, MAX_AUG_SEED, (), generator=gen)))
    return TrajectorySchedule(tuple(indices), tuple(aug_seeds))


# --------------------------------------------------------------------------------------------
# one student step
# --------------------------------------------------------------------------------------------


def _cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy; ``y`` is int64 ``[B]`` (hard) or float ``[B, K]`` probabilities."""
    if y.is_floating_point():
        return -(y * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return F.cross_entropy(logits, y)


@dataclass
class _Sweep:
    """Everything the autograd.Function needs besides tensors."""

    student: nn.Module
    schedule: TrajectorySchedule
    augment: Augment | None
    snapshot_device: torch.device | None
    first_order: bool
    plan: SnapshotPlan
    group: Any = None  # a torch.distributed process group sharing every step's batch, or None

    def step_grad(
        self, t: int, theta: Tensor, images: Tensor, labels: Tensor, create_graph: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``g_t`` at ``theta`` (requiring grad) on step ``t``'s batch.

        ``images`` and ``labels`` are the full sets (detached or leaves); the batch is gathered
        here so that the caller can take gradients with respect to the gathered batch.

        Returns:
            ``(x_batch [B, C, H, W], y_batch, g [P])``.
        """
        idx = self.schedule.indices[t].to(images.device)
        xb, yb = images[idx], labels[idx]
        return xb, yb, self.grad_at(t, theta, xb, yb, create_graph)

    def grad_at(self, t: int, theta: Tensor, xb: Tensor, yb: Tensor, create_graph: bool) -> Tensor:
        """``g_t [P]`` at ``theta`` on an already gathered batch ``xb [B, C, H, W]``, ``yb``.

        With a process group, this rank's share: the whole batch is augmented (the same
        transformation as on one device), the rank's contiguous slice of it goes through the
        student, and its cross-entropy sum is divided by ``B``, so that the sum of the shares
        over the ranks (:meth:`reduce`) is ``g_t``.
        """
        if self.augment is not None:
            xb = self.augment(xb, self.schedule.aug_seeds[t])
        scale = 1.0
        if self.group is not None:
            size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            b = xb.shape[0]
            lo, hi = rank * b // size, (rank + 1) * b // size
            xb, yb, scale = xb[lo:hi], yb[lo:hi], (hi - lo) / b
        loss = _cross_entropy(functional_forward(self.student, theta, xb), yb)
        (g,) = torch.autograd.grad(
            loss * scale if scale != 1.0 else loss, theta, create_graph=create_graph
        )
        return g

    def reduce(self, v: Tensor) -> Tensor:
        """Sum of ``v`` over the process group (in place; ``v`` itself without one)."""
        if self.group is not None:
            dist.all_reduce(v, group=self.group)
        return v

    def offload(self, theta: Tensor) -> Tensor:
        """Copy a snapshot ``[P]`` to ``snapshot_device`` (a private copy either way)."""
        dev = self.snapshot_device
        if dev is None or dev == theta.device:
            return theta.detach().clone()
        if theta.is_cuda and dev.type == "cpu":
            # Pinned + non_blocking: the copy overlaps with the sweep; the later host-to-device
            # copy is ordered after it on the same stream.
            out = torch.empty(theta.shape, dtype=theta.dtype, pin_memory=True)
            return out.copy_(theta.detach(), non_blocking=True)
        return theta.detach().to(dev)


# --------------------------------------------------------------------------------------------
# exact and first-order modes: forward sweep without a graph, replaying backward sweep
# --------------------------------------------------------------------------------------------


def _forward_sweep(
    sweep: _Sweep, x_all: Tensor, y_all: Tensor, lr: Tensor, start: Tensor, need_snapshots: bool
) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """Take the ``N`` steps without a graph from ``start`` (all detached).

    Returns:
        ``(theta_N, snapshots, g_sum)``: the snapshots of ``sweep.plan.chain`` when
        ``need_snapshots`` (else none) and, in first-order mode, ``sum_t g_t`` (else None).
    """
    theta = start
    snapshots: list[Tensor] = []
    keep = set(sweep.plan.chain) if need_snapshots else set()
    g_sum = torch.zeros_like(theta) if sweep.first_order else None
    for t in range(len(sweep.schedule)):
        if t in keep:
            snapshots.append(sweep.offload(theta))
        # Autograd is off inside Function.forward; each step needs its own small graph.
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            _, _, g = sweep.step_grad(t, leaf, x_all, y_all, create_graph=False)
        theta = sgd_step(theta, sweep.reduce(g), lr)
        if g_sum is not None:
            g_sum += g
    return theta, snapshots, g_sum


class _TrajectoryMatch(torch.autograd.Function):
    """``L(images, labels, syn_lr)`` with a replaying backward (exact or first-order)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        images: Tensor,
        labels: Tensor,
        syn_lr: Tensor,
        start: Tensor,
        target: Tensor,
        sweep: _Sweep,
    ) -> Tensor:
        need_x, need_y, need_lr = ctx.needs_input_grad[:3]
        need_data = need_x or (need_y and labels.is_floating_point())
        # The reverse sweep needs the snapshots for data gradients, and in exact mode for the
        # rate's too (first-order mode has that one from the forward sweep's sum of g_t).
        ctx.replay = need_data or (need_lr and not sweep.first_order)
        theta, snapshots, g_sum = _forward_sweep(
            sweep, images.detach(), labels.detach(), syn_lr.detach(), start.detach(), ctx.replay
        )
        loss, seed = param_match_loss(theta, target.detach(), start.detach())
        ctx.sweep = sweep
        ctx.snapshots = snapshots
        ctx.save_for_backward(images, labels, syn_lr, start, seed, g_sum)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        if not any(ctx.needs_input_grad[:3]):  # only start/target required grad: constants
            return None, None, None, None, None, None
        images, labels, syn_lr, start, seed, g_sum = ctx.saved_tensors
        sweep: _Sweep = ctx.sweep
        x_all, y_all = images.detach(), labels.detach()
        # The reverse sweep releases each stored snapshot once its segment is done (the budget
        # counts on it), so ctx must not keep them. A second backward (retain_graph=True)
        # stores them again with one more forward sweep.
        snapshots: list[Tensor] = ctx.snapshots
        ctx.snapshots = None
        if snapshots is None and ctx.replay:
            snapshots = _forward_sweep(
                sweep, x_all, y_all, syn_lr.detach(), start.detach(), need_snapshots=True
            )[1]
        need_x, need_y, need_lr = ctx.needs_input_grad[:3]
        need_y = need_y and labels.is_floating_point()
        device = seed.device
        lr = syn_lr.detach().to(seed.dtype)

        lam = seed * grad_loss.to(seed.dtype)  # lambda_N, scaled by the incoming gradient
        d_x = torch.zeros_like(images) if need_x else None
        d_y = torch.zeros_like(labels) if need_y else None
        d_lr = seed.new_zeros(())

        # Each VJP of g_t with cotangent v is taken as the gradient of the scalar <g_t, v>: the
        # same numbers as grad(g_t, ..., grad_outputs=v), but on CPU its peak memory is ~30 MB
        # lower for a ConvNet-3 (measured, independent of the batch size).
        if sweep.first_order:
            # dL/dalpha = -<sum_t g_t, lambda_N>: the forward sweep already summed the g_t.
            d_lr = d_lr - torch.dot(g_sum, lam)
            cot = -lr * lam  # the same cotangent for every step
            steps = _reverse_thetas(sweep, snapshots, syn_lr, x_all, y_all, device)
            for t, theta in steps if ctx.replay else ():
                theta = theta.requires_grad_(True)
                with torch.enable_grad():
                    xb, yb, g = _replay_batch(sweep, t, theta, x_all, y_all, need_x, need_y)
                    wrt = [v for v, need in ((xb, need_x), (yb, need_y)) if need]
                    grads = torch.autograd.grad(torch.dot(g, cot), wrt)
                _scatter(sweep, t, grads, d_x, d_y, need_x, need_y)
        else:
            for t, theta in _reverse_thetas(sweep, snapshots, syn_lr, x_all, y_all, device):
                theta = theta.requires_grad_(True)
                with torch.enable_grad():
                    xb, yb, g = _replay_batch(sweep, t, theta, x_all, y_all, need_x, need_y)
                    wrt = [theta] + [v for v, need in ((xb, need_x), (yb, need_y)) if need]
                    # One double backward gives -alpha H_t lambda and the data gradients.
                    grads = list(
                        torch.autograd.grad(
                            torch.dot(g, -lr * lam), wrt, allow_unused=True, materialize_grads=True
                        )
                    )
                if sweep.group is not None:  # this rank's shares of h_theta and g_t: sum them
                    grads[0] = sweep.reduce(grads[0])
                    g = sweep.reduce(g.detach().clone())
                lam, dot = adjoint_update(lam, grads[0], g.detach())
                d_lr = d_lr - dot
                _scatter(sweep, t, grads[1:], d_x, d_y, need_x, need_y)

        for d in (d_x, d_y):  # each rank scattered the gradients of its slices only
            if d is not None:
                sweep.reduce(d)
        d_lr = d_lr.to(syn_lr.dtype) if need_lr else None
        return d_x, d_y, d_lr, None, None, None


def _reverse_thetas(
    sweep: _Sweep,
    snapshots: list[Tensor],
    syn_lr: Tensor,
    x_all: Tensor,
    y_all: Tensor,
    device: torch.device,
) -> Iterator[tuple[int, Tensor]]:
    """``(t, theta_t)`` for ``t = N-1 .. 0`` (tensors on ``device``, no graph).

    ``snapshots`` are those of ``sweep.plan.chain``; the others are rebuilt by repeating the
    forward sweep's steps (the same batches, augmentation seeds, rate and ops, so the same
    numbers), never holding more than the plan's budget of stored vectors.
    """
    lr = syn_lr.detach()

    def advance(t: int, theta: Tensor) -> Tensor:
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            _, _, g = sweep.step_grad(t, leaf, x_all, y_all, create_graph=False)
        return sgd_step(theta, sweep.reduce(g), lr)

    def load(snapshot: Tensor) -> Tensor:
        return snapshot.to(device, non_blocking=True).detach()

    return sweep.plan.reverse(snapshots, advance, sweep.offload, load)


def _replay_batch(
    sweep: _Sweep,
    t: int,
    theta: Tensor,
    x_all: Tensor,
    y_all: Tensor,
    need_x: bool,
    need_y: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute ``g_t`` with a graph; the gathered batch ``(xb, yb)`` are fresh leaves."""
    idx = sweep.schedule.indices[t].to(x_all.device)
    xb = x_all[idx].requires_grad_(need_x)
    yb = y_all[idx].requires_grad_(need_y)
    return xb, yb, sweep.grad_at(t, theta, xb, yb, create_graph=True)


def _scatter(
    sweep: _Sweep,
    t: int,
    grads: tuple[Tensor, ...] | list[Tensor],
    d_x: Tensor | None,
    d_y: Tensor | None,
    need_x: bool,
    need_y: bool,
) -> None:
    """Add the batch gradients of step ``t`` into the full-set accumulators."""
    if not (need_x or need_y):
        return
    grads = list(grads)
    idx = sweep.schedule.indices[t].to(d_x.device if need_x else d_y.device)
    if need_x:
        d_x.index_add_(0, idx, grads.pop(0))
    if need_y:
        d_y.index_add_(0, idx, grads.pop(0))


# --------------------------------------------------------------------------------------------
# unrolled mode: plain autograd
# --------------------------------------------------------------------------------------------


def _unrolled(
    sweep: _Sweep, images: Tensor, labels: Tensor, syn_lr: Tensor, start: Tensor, target: Tensor
) -> Tensor:
    """Differentiate through every step with ``create_graph=True`` (memory grows with N)."""
    build = torch.is_grad_enabled()
    with torch.enable_grad():
        theta = start.detach().requires_grad_(True)
        for t in range(len(sweep.schedule)):
            _, _, g = sweep.step_grad(t, theta, images, labels, create_graph=build)
            theta = sgd_step(theta, g, syn_lr)
        loss, _ = param_match_loss(theta, target.detach(), start.detach())
    return loss if build else loss.detach()


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _validate(
    student: nn.Module,
    images: Tensor,
    labels: Tensor,
    syn_lr: Tensor,
    start_params: Tensor,
    target_params: Tensor,
    syn_steps: int,
    batch_syn: int | None,
    augment: Augment | None,
    mode: str,
    seed: int | None,
    snapshot_device: str | torch.device | None,
) -> _Validated:
    """Raise ``TypeError``/``ValueError`` naming the offending argument; return the checked ints."""
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, t in (
        ("images", images),
        ("labels", labels),
        ("syn_lr", syn_lr),
        ("start_params", start_params),
        ("target_params", target_params),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_meta:
            raise ValueError(f"{name} is a meta tensor (shape only, no data); pass real values")

    if images.dim() != 4:
        raise ValueError(f"images must be 4-D [M, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point, got {images.dtype}")
    num_images = images.shape[0]
    if num_images < 1:
        raise ValueError("images must hold at least one image")

    if syn_lr.dim() != 0:
        raise ValueError(f"syn_lr must be a 0-dim (scalar) tensor, got shape {tuple(syn_lr.shape)}")
    if not syn_lr.is_floating_point():
        raise TypeError(f"syn_lr must be floating point, got {syn_lr.dtype}")
    if syn_lr.dtype != images.dtype:
        # Mixed precision would silently compute the steps and the gradient in another dtype.
        raise TypeError(
            f"syn_lr has dtype {syn_lr.dtype} but images have dtype {images.dtype}; pass syn_lr "
            f"in the images' dtype (e.g. syn_lr.to({images.dtype}))"
        )

    num_params = sum(p.numel() for p in student.parameters())
    for name, p in (("start_params", start_params), ("target_params", target_params)):
        if p.dim() != 1:
            raise ValueError(f"{name} must be 1-D [P], got shape {tuple(p.shape)}")
        if p.numel() != num_params:
            raise ValueError(
                f"{name} has {p.numel()} elements but the student has P={num_params} parameters"
            )
        if not p.is_floating_point():
            raise TypeError(
                f"{name} must be floating point (expert parameters), got {p.dtype}; an integer "
                "or boolean trajectory is not a checkpoint of real-valued weights"
            )
        if p.dtype != images.dtype:
            raise TypeError(f"{name} has dtype {p.dtype}, expected images' dtype {images.dtype}")

    devices = {
        name: t.device
        for name, t in (
            ("labels", labels),
            ("syn_lr", syn_lr),
            ("start_params", start_params),
            ("target_params", target_params),
        )
    }
    devices.update({f"student buffer {n!r}": b.device for n, b in student.named_buffers()})
    for name, dev in devices.items():
        if dev != images.device:
            raise ValueError(f"{name} is on {dev} but images is on {images.device}")

    syn_steps = check_int("syn_steps", syn_steps, 1)  # numpy integers are ints too
    if batch_syn is not None:
        batch_syn = check_int("batch_syn", batch_syn, 1)
        if batch_syn > num_images:
            raise ValueError(
                f"batch_syn must be None or an int in [1, {num_images}], got {batch_syn!r}"
            )
    if seed is not None:
        try:
            seed = check_int("seed", seed, -(2**63))
        except ValueError as exc:
            raise TypeError(f"seed must be None or an int, got {type(seed).__name__}") from exc
    if augment is not None and not callable(augment):
        raise TypeError("augment must be None or a callable augment(x, seed)")

    snap_dev = None
    if snapshot_device is not None:
        try:
            snap_dev = torch.device(snapshot_device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"snapshot_device {snapshot_device!r} is not a device") from exc

    try:
        check_replayable(student)
    except ValueError as exc:
        raise ValueError(f"student cannot be replayed: {exc}") from exc
    if mode != "unrolled":  # the replaying modes recompute every step: it must be the same one
        _check_not_stochastic(student)

    if not bool((start_params != target_params).any()):
        raise ValueError(
            "start_params equals target_params: the normaliser ||start - target||^2 is zero"
        )

    # Number of classes from one single-image forward (labels are checked against it).
    with torch.no_grad():
        logits = functional_forward(student, start_params.detach(), images[:1].detach())
        if mode != "unrolled":  # anything random that the type check above cannot see
            again = functional_forward(student, start_params.detach(), images[:1].detach())
            _check_same_forward(logits, again)
    if logits.dim() != 2:
        raise ValueError(f"student must return logits [B, K], got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if labels.shape[:1] != (num_images,):
        raise ValueError(
            f"labels must have first dimension M={num_images}, got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        if labels.shape != (num_images, num_classes):
            raise ValueError(
                f"soft labels must be [M, K] = [{num_images}, {num_classes}], "
                f"got {tuple(labels.shape)}"
            )
    else:
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must be int64 (hard) or floating (soft), got {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"hard labels must be 1-D [M], got shape {tuple(labels.shape)}")
        if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
            raise ValueError(f"labels must lie in [0, {num_classes}) (the student's classes)")
    return _Validated(snap_dev, syn_steps, batch_syn, seed)


@dataclass(frozen=True)
class _Validated:
    """What :func:`_validate` hands back: the snapshot device and the ints as Python ints."""

    snapshot_device: torch.device | None
    syn_steps: int
    batch_syn: int | None
    seed: int | None


#: Modules that draw random numbers on every forward in training mode.
_STOCHASTIC_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)


def _check_not_stochastic(student: nn.Module) -> None:
    """Refuse random layers in training mode: a replayed step would draw other numbers.

    (Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout with ``p > 0``; RReLU.)
    """
    bad = []
    for name, m in student.named_modules():
        if not m.training or not isinstance(m, _STOCHASTIC_TYPES):
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0:
            continue
        if isinstance(m, nn.RReLU) and m.lower == m.upper:
            continue
        bad.append(f"{name or '<student>'} ({type(m).__name__})")
    if bad:
        raise ValueError(
            f"student cannot be replayed: {', '.join(bad)} draw(s) random numbers on every "
            "forward in training mode, so the replayed steps of mode='exact'/'first_order' "
            "would differ from the forward sweep and the gradient would be wrong. Call .eval() "
            "on these modules (or the student), remove them, or use mode='unrolled'."
        )


def _check_same_forward(a: Tensor, b: Tensor) -> None:
    """Two identical calls of the student must agree (to CUDA kernel nondeterminism)."""
    if a.shape == b.shape:
        if a.device.type == "cpu" and torch.equal(a, b):
            return
        if a.device.type != "cpu":
            scale = float(a.abs().max()) if a.numel() else 0.0
            if torch.allclose(a, b, rtol=1e-4, atol=1e-6 * max(scale, 1.0), equal_nan=True):
                return
        diff = float((a - b).abs().max()) if a.numel() else 0.0
    else:
        diff = float("nan")
    raise ValueError(
        "student cannot be replayed: two identical forward calls gave different outputs "
        f"(largest difference {diff:.3g}); a stochastic layer in training mode (e.g. "
        "F.dropout in forward) would make the replayed steps of mode='exact'/'first_order' "
        "differ from the forward sweep. Make the student deterministic (.eval()) or use "
        "mode='unrolled'."
    )


def _check_schedule(schedule: TrajectorySchedule, syn_steps: int, num_images: int) -> None:
    """A precomputed schedule must have ``syn_steps`` steps of int64 CPU indices in
    ``[0, num_images)``, each step at least one image, and one int seed per step."""
    if not isinstance(schedule, TrajectorySchedule):
        raise TypeError(
            f"schedule must be a TrajectorySchedule or None, got {type(schedule).__name__}"
        )
    if len(schedule.indices) != syn_steps or len(schedule.aug_seeds) != syn_steps:
        raise ValueError(
            f"schedule has {len(schedule.indices)} steps ({len(schedule.aug_seeds)} seeds) but "
            f"syn_steps={syn_steps}"
        )
    for t, idx in enumerate(schedule.indices):
        if not isinstance(idx, Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
            raise ValueError(f"schedule step {t}: indices must be a 1-D int64 tensor")
        if idx.numel() == 0:
            raise ValueError(f"schedule step {t} has no images")
        if bool((idx < 0).any()) or bool((idx >= num_images).any()):
            raise ValueError(f"schedule step {t}: indices must lie in [0, {num_images})")


def _check_group(
    group: Any,
    mode: str,
    images: Tensor,
    labels: Tensor,
    syn_lr: Tensor,
    start: Tensor,
    target: Tensor,
    batch: int,
    seed: int,
) -> int:
    """Validate a process group; return the seed of the group's first rank (all ranks use it).

    Every rank must pass the same problem: a fingerprint of the inputs is compared across the
    group (one small all-reduce), so that a rank with other images or parameters is an error
    rather than a silently wrong gradient.
    """
    _, size = rank_and_size(group)
    if mode == "unrolled":
        raise ValueError("group: mode='unrolled' runs on one device; use 'exact' or 'first_order'")
    if batch < size:
        raise ValueError(
            f"batch_syn: each of the group's {size} ranks needs at least one image of every "
            f"step's batch, got batches of {batch}"
        )
    dev = images.device
    seed_t = torch.tensor([seed], dtype=torch.int64, device=dev)
    dist.broadcast(seed_t, src=dist.get_global_rank(group, 0), group=group)
    seed = int(seed_t.item())
    with torch.no_grad():
        parts = [images, labels, syn_lr, start, target]
        sums = torch.stack([p.detach().to(torch.float64).sum() for p in parts])
        finger = torch.cat([sums, sums.new_tensor([float(t.numel()) for t in parts])]).to(dev)
        both = torch.cat([finger, -finger])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[: finger.numel()], -both[finger.numel() :]):
        raise ValueError(
            "group: the ranks passed different images, labels, syn_lr, start_params or "
            "target_params; every rank must pass the same problem"
        )
    return seed


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def trajectory_matching_loss(
    student: nn.Module,
    images: Tensor,
    labels: Tensor,
    syn_lr: Tensor,
    start_params: Tensor,
    target_params: Tensor,
    *,
    syn_steps: int,
    batch_syn: int | None = None,
    augment: Augment | None = None,
    mode: str = "exact",
    seed: int | None = None,
    snapshot_device: str | torch.device | None = None,
    max_snapshots: int | None = DEFAULT_MAX_SNAPSHOTS,
    group: Any = None,
    schedule: TrajectorySchedule | None = None,
) -> Tensor:
    """Trajectory-matching loss ``||theta_N - theta*||^2 / ||theta_0 - theta*||^2``.

    The student (its structure and buffers only; parameters come from the flat vectors) starts
    at ``start_params`` and takes ``syn_steps`` SGD steps with rate ``syn_lr`` on minibatches of
    ``images`` (schedule from :func:`batch_schedule` with ``seed``), each batch passed through
    ``augment(x, seed_t)`` when given. The step loss is the mean cross-entropy with hard labels
    or with soft labels (target probabilities, ``-sum y log softmax``).

    ``loss.backward()`` fills ``.grad`` of ``images``, ``syn_lr`` and floating ``labels`` when
    they require grad. ``start_params`` and ``target_params`` are constants: no gradient flows
    to them.

    Modes (the same ``seed`` gives the same batches and augmentations in all three):

    * ``"exact"``: constant-memory adjoint sweep. Backward replays step ``t = N-1 .. 0`` at the
      stored snapshot ``theta_t``; one double backward of ``g_t`` with cotangent
      ``-alpha lambda_t+1`` gives ``(h_theta, h_X, h_Y)``; then ``lambda_t = lambda_t+1 + h_theta``
      (``= (I - alpha H_t) lambda_t+1``), ``dX += h_X``, ``dY += h_Y`` and
      ``dalpha += -<g_t, lambda_t+1>``, starting from ``lambda_N = 2 (theta_N - theta*) / D``.
      Equals ``"unrolled"`` to rounding.
    * ``"first_order"``: the gradient of the published TESLA / GLaD / H-PD code. It treats every
      ``theta_t`` as a constant, i.e. ``theta_N = theta_0 - alpha sum_t g_t(theta_t, X_t)`` with
      a stop-gradient on each ``theta_t``. Equivalently the adjoint is frozen at ``lambda_N``
      for every step: all Hessian factors ``(I - alpha H_s)`` with ``H_s = d g_s / d theta_s``
      are dropped, so the effect of one batch on later gradients (through the parameters it
      moved) is ignored::

          dX     = sum_t (d g_t / d X)^T (-alpha lambda_N)       (exact: lambda_t+1)
          dalpha = -<sum_t g_t, lambda_N>                        (exact: -sum_t <g_t, lambda_t+1>)
          dY     likewise.

      (Their code reaches the same numbers through the surrogate
      ``alpha^2 <g_t, g_t> + 2 alpha <g_t, alpha (G - g_t) - theta_0 + theta*>`` per step, with
      ``G = sum g_t`` detached, and a separate scalar loss in ``alpha``.) It costs one
      forward+backward per step less than ``"exact"`` and is an approximation.
    * ``"unrolled"``: plain autograd through every step with ``create_graph=True`` (original
      MTT). Memory grows with ``syn_steps``.

    Args:
        student: network whose forward is replayed with flat parameters; must be replayable
            (no BatchNorm running statistics updated in training mode).
        images: ``[M, C, H, W]`` float synthetic images.
        labels: int64 ``[M]`` hard labels in ``[0, K)`` or float ``[M, K]`` soft labels.
        syn_lr: 0-dim float tensor, the student's learning rate ``alpha``.
        start_params: ``[P]`` expert parameters ``theta_0`` (same dtype as ``images``).
        target_params: ``[P]`` expert parameters ``theta*`` (must differ from the start).
        syn_steps: number of student steps ``N >= 1``.
        batch_syn: minibatch size in ``[1, M]``; ``None`` for full batches.
        augment: optional ``augment(x [B, C, H, W], seed: int)``, deterministic given the seed
            and differentiable in ``x``.
        mode: ``"exact"``, ``"first_order"`` or ``"unrolled"``.
        seed: schedule seed; ``None`` draws one from torch's default generator.
        snapshot_device: where ``"exact"``/``"first_order"`` keep the ``N`` parameter
            snapshots (e.g. ``"cpu"`` to spare GPU memory); ``None`` keeps them with the
            parameters.
        max_snapshots: the most parameter vectors ``"exact"``/``"first_order"`` store at once
            (default 32). With ``N <= max_snapshots`` every snapshot is stored; beyond, the
            backward sweep rebuilds the missing ones by repeating forward steps (no graph) on
            the schedule of :class:`~hpd_fast.distill.snapshots.SnapshotPlan`, which takes
            the fewest such steps: ``N - max_snapshots`` of them while
            ``N <= max_snapshots (max_snapshots + 1) / 2``, each once. Snapshot memory then
            stays the same however long the trajectory. ``None`` stores all ``N`` (memory
            grows by ``P`` floats a step; nothing is recomputed). Gradients are the same
            numbers either way on the CPU (on CUDA, up to the nondeterminism of its
            convolution kernels).

        group: a ``torch.distributed`` process group whose ranks share every student step's
            batch (data parallel; ``"exact"`` and ``"first_order"``): each rank runs the student
            on its contiguous slice of the batch, and the step gradients, Hessian-vector
            products and data gradients are summed over the group, so every rank gets the loss
            and gradients of the single-device computation (up to the order of the sums).
            Every rank must call with the same arguments (checked); ``seed=None`` takes the
            first rank's seed. Activation memory per rank falls with the group's size.
        schedule: a precomputed :class:`TrajectorySchedule` (``syn_steps`` steps, indices into
            ``images``) used instead of drawing one from ``seed`` and ``batch_syn`` (which are
            then ignored). A caller that renders only the images a schedule touches draws it
            with :func:`batch_schedule` and passes it remapped to the rendered subset.

    Returns:
        0-dim tensor, the loss (dtype of ``start_params``).

    Raises:
        TypeError, ValueError: on bad input, naming the argument.
    """
    checked = _validate(
        student,
        images,
        labels,
        syn_lr,
        start_params,
        target_params,
        syn_steps,
        batch_syn,
        augment,
        mode,
        seed,
        snapshot_device,
    )
    snap_dev = checked.snapshot_device
    syn_steps, batch_syn, seed = checked.syn_steps, checked.batch_syn, checked.seed
    max_snapshots = check_max_snapshots(max_snapshots)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    if schedule is not None:
        _check_schedule(schedule, syn_steps, images.shape[0])
        batch = min(int(i.numel()) for i in schedule.indices)
    else:
        batch = batch_syn or images.shape[0]
    if group is not None:
        seed = _check_group(group, mode, images, labels, syn_lr, start_params, target_params,
                            batch, seed)  # fmt: skip
    if schedule is None:
        schedule = batch_schedule(images.shape[0], syn_steps, batch_syn, seed)
    plan = SnapshotPlan.get(syn_steps, max_snapshots)
    sweep = _Sweep(student, schedule, augment, snap_dev, mode == "first_order", plan, group)
    if mode == "unrolled":
        return _unrolled(sweep, images, labels, syn_lr, start_params, target_params)
    return _TrajectoryMatch.apply(images, labels, syn_lr, start_params, target_params, sweep)
