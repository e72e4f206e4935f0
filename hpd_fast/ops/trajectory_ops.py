"""Flat-parameter primitives of the trajectory-matching sweep.

Every function works on 1-D parameter vectors ``[P]`` (the layout of
:func:`hpd_fast.params.flatten_params`). They are the only arithmetic the exact trajectory
sweep does outside the student's own forward/backward, so they are the place for fused kernels:

* :func:`sgd_step`          ``theta - lr * grad``                      (forward sweep)
* :func:`param_match_loss`  normalised distance and its gradient       (loss + adjoint seed)
* :func:`adjoint_update`    ``lam + h`` and ``<g, lam>``                (backward sweep)

Each public function takes ``backend=``: ``None`` picks the fastest available (``cpp`` for CPU
tensors, ``cuda`` then ``triton`` for CUDA tensors), or force ``"reference"``, ``"cpp"``,
``"cuda"``, ``"triton"``. The kernels are not differentiable: they serve the no-grad sweeps. When
autograd must record the call (an input requires grad and grad mode is on, as in
``mode="unrolled"``), the reference runs instead, so every call is exact. Parameters must be
float32 or float64. The ``*_ref`` functions are the oracles the kernels are tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpd_fast import _backend

__all__ = [
    "adjoint_update",
    "adjoint_update_ref",
    "param_match_loss",
    "param_match_loss_ref",
    "sgd_step",
    "sgd_step_ref",
]

_DTYPES = (torch.float32, torch.float64)


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS} or None, got {backend!r}")


def _check_flat(name: str, t: object, like: Tensor | None = None) -> None:
    """Raise a clear error unless ``t`` is a floating 1-D tensor matching ``like``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [P], got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device}, expected {like.device}")


# --------------------------------------------------------------------------------------------
# reference implementations (the oracles)
# --------------------------------------------------------------------------------------------


def sgd_step_ref(theta: Tensor, grad: Tensor, lr: Tensor) -> Tensor:
    """``theta - lr * grad``, out of place.

    Args:
        theta: ``[P]`` float parameters.
        grad: ``[P]`` gradient, same dtype/device as ``theta``.
        lr: 0-dim float learning rate (may require grad).

    Returns:
        ``[P]`` new parameters.
    """
    return theta - lr * grad


def param_match_loss_ref(theta_n: Tensor, target: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised parameter distance and its gradient with respect to ``theta_n``.

    With ``D = ||start - target||^2``:
    ``loss = ||theta_n - target||^2 / D`` and ``adjoint_seed = 2 (theta_n - target) / D``.

    Args:
        theta_n: ``[P]`` parameters at the end of the student trajectory.
        target: ``[P]`` expert parameters to match.
        start: ``[P]`` parameters the student started from.

    Returns:
        ``(loss, adjoint_seed)``: a 0-dim tensor and a ``[P]`` tensor.
    """
    diff = theta_n - target
    denom = (start - target).pow(2).sum()
    return diff.dot(diff) / denom, diff * (2.0 / denom)


def adjoint_update_ref(lam: Tensor, h: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the adjoint recursion.

    Args:
        lam: ``[P]`` adjoint ``lambda_{t+1}``.
        h: ``[P]`` Hessian-vector term ``-lr * H_t lambda_{t+1}``.
        g: ``[P]`` the step's gradient ``g_t``.

    Returns:
        ``(lam + h, <g, lam>)``; the dot product uses the *old* ``lam``.
    """
    return lam + h, torch.dot(g, lam)


# --------------------------------------------------------------------------------------------
# kernel registration and dispatch
# --------------------------------------------------------------------------------------------


def _fake_like(x: Tensor, *_: Tensor) -> Tensor:
    return torch.empty_like(x)


def _fake_pair(x: Tensor, *_: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(()), torch.empty_like(x)


def _fake_update(x: Tensor, *_: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(())


_FAKES = {"sgd_step": _fake_like, "param_match_loss": _fake_pair, "adjoint_update": _fake_update}

if _backend.cpp_loaded():
    for _name, _fake in _FAKES.items():
        torch.library.register_fake(f"hpd_fast::{_name}")(_fake)
if _backend.backend_info()["triton"]["available"]:
    from hpd_fast.ops import _trajectory_ops_triton  # noqa: F401  (defines the *_triton ops)


def _run(name: str, ref, args: tuple[Tensor, ...], backend: str | None):
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        if backend not in (None, "reference"):
            raise ValueError(
                f"{name}: backend={backend!r} is not differentiable; an input requires grad "
                "(use backend=None/'reference', or call under torch.no_grad())"
            )
        return ref(*args)
    chosen = _backend.select_backend(name, args[0].device, backend)
    if chosen == "reference":
        return ref(*args)
    op = getattr(torch.ops.hpd_fast, name + ("_triton" if chosen == "triton" else ""))
    return op(*args)


# --------------------------------------------------------------------------------------------
# public functions (dispatch)
# --------------------------------------------------------------------------------------------


def sgd_step(theta: Tensor, grad: Tensor, lr: Tensor, *, backend: str | None = None) -> Tensor:
    """``theta - lr * grad`` (out of place). See :func:`sgd_step_ref` for shapes.

    Args:
        theta: ``[P]`` float parameters.
        grad: ``[P]`` gradient.
        lr: 0-dim float tensor.
        backend: ``None`` (choose) or one of ``reference``, ``cpp``, ``cuda``, ``triton``.
    """
    _check_backend(backend)
    _check_flat("theta", theta)
    _check_flat("grad", grad, theta)
    if not isinstance(lr, Tensor) or lr.dim() != 0 or not lr.is_floating_point():
        raise TypeError("lr must be a 0-dim floating-point tensor")
    if lr.device != theta.device and lr.device.type != "cpu":
        raise ValueError(f"lr is on {lr.device}, expected {theta.device} (or the CPU)")
    return _run("sgd_step", sgd_step_ref, (theta, grad, lr), backend)


def param_match_loss(
    theta_n: Tensor, target: Tensor, start: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Normalised distance ``||theta_n - target||^2 / ||start - target||^2`` and its gradient.

    See :func:`param_match_loss_ref`. All inputs are ``[P]``; returns ``(loss [], seed [P])``.
    """
    _check_backend(backend)
    _check_flat("theta_n", theta_n)
    _check_flat("target", target, theta_n)
    _check_flat("start", start, theta_n)
    # Data-dependent check (one pass and a sync), skipped while torch.compile traces.
    if not torch.compiler.is_compiling() and torch.equal(start, target):
        raise ValueError("start equals target: the loss ||start - target||^2 denominator is 0")
    return _run("param_match_loss", param_match_loss_ref, (theta_n, target, start), backend)


def adjoint_update(
    lam: Tensor, h: Tensor, g: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """``(lam + h, <g, lam>)`` with the old ``lam`` in the dot. All inputs ``[P]``.

    See :func:`adjoint_update_ref`.
    """
    _check_backend(backend)
    _check_flat("lam", lam)
    _check_flat("h", h, lam)
    _check_flat("g", g, lam)
    return _run("adjoint_update", adjoint_update_ref, (lam, h, g), backend)
