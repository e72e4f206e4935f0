"""Fused ConvNet block tail: instance norm -> ReLU -> 2x2 average pool, differentiable twice.

The student of trajectory matching is a ConvNet whose blocks are ``conv -> GroupNorm(C, C)
(affine) -> ReLU -> AvgPool2d(2, 2)``. Composed of PyTorch ops, everything after the convolution
is many small passes over memory; its backward more, and the double backward that the exact
trajectory sweep needs (it differentiates the student's gradient) more still. This op does the
tail in one pass per (b, c) plane for each of the three:

    forward          y = avgpool2x2(relu(GN_CC(x)))         (pool=False: relu(GN_CC(x)))
    backward         (gy, x, w)   -> (gx, gw, gb)
    double backward  the VJP of the backward w.r.t. (gy, x, w)   (derived by hand in
                     csrc/instance_norm_relu_pool.h; checked against torch.autograd in the tests)

Each has four implementations: ``reference`` (:func:`instance_norm_relu_pool_ref`, pure
PyTorch; the oracle), ``cpp``, ``cuda`` and ``triton``. Mean and 1/std per plane are saved by
the forward (``[B, C]``); the normalized activation and the ReLU mask are recomputed, never
stored.

Derivatives of every order are exact. First and second order run the fused kernels of the
chosen backend; third and higher orders (never needed by trajectory matching) differentiate a
PyTorch composition of the same double-backward formulas, so they are correct but not fused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hpd_fast import _backend

__all__ = ["instance_norm_relu_pool", "instance_norm_relu_pool_ref"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OP = "instance_norm_relu_pool"


# --------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_vector(t: Tensor | None, name: str, x: Tensor, acc: torch.dtype, fill: float) -> Tensor:
    c = x.shape[1]
    if t is None:
        return torch.full((c,), fill, dtype=acc, device=x.device)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64"
        )
    if t.dim() != 1 or t.shape[0] != c:
        raise ValueError(f"{name} must have shape [C] = [{c}], got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return t.to(acc)  # differentiable cast; a no-op for the usual fp32/fp64 parameters


def _prepare(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, pool: bool
) -> tuple[Tensor, Tensor, Tensor, float]:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if not isinstance(pool, bool):
        raise TypeError(f"pool must be a bool, got {type(pool).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite non-negative float, got {eps!r}")
    if eps < 0:
        raise ValueError(f"eps must be a finite non-negative float, got {eps!r}")
    h, w = x.shape[2], x.shape[3]
    if h < 1 or w < 1:
        raise ValueError(f"x must have H, W >= 1, got shape {tuple(x.shape)}")
    if pool and (h < 2 or w < 2):
        raise ValueError(f"x has spatial size {h}x{w}; pool=True needs H, W >= 2 (use pool=False)")
    acc = _acc_dtype(x.dtype)
    w_ = _check_vector(weight, "weight", x, acc, 1.0)
    b_ = _check_vector(bias, "bias", x, acc, 0.0)
    return x, w_, b_, float(eps)


# --------------------------------------------------------------------------------------------
# Reference implementation (the oracle) and PyTorch forms of the derivative formulas
# --------------------------------------------------------------------------------------------


def _ref_impl(x: Tensor, weight: Tensor, bias: Tensor, eps: float, pool: bool) -> Tensor:
    # group_norm takes weight/bias in x's dtype; the accumulation-dtype copies are cast back.
    y = F.relu(F.group_norm(x, x.shape[1], weight.to(x.dtype), bias.to(x.dtype), eps))
    return F.avg_pool2d(y, 2) if pool else y


def instance_norm_relu_pool_ref(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    eps: float = 1e-5,
    pool: bool = True,
) -> Tensor:
    """Pure-PyTorch :func:`instance_norm_relu_pool`:
    ``F.avg_pool2d(F.relu(F.group_norm(x, C, weight, bias, eps)), 2)``; the oracle.

    Differentiable to any order by ordinary autograd.
    """
    x, w, b, eps = _prepare(x, weight, bias, eps, pool)
    return _ref_impl(x, w, b, eps, pool)


def _plane(t: Tensor) -> Tensor:
    """[B, C] per-plane or [C] per-channel values, shaped to broadcast over [B, C, H, W]."""
    return t[:, :, None, None] if t.dim() == 2 else t[None, :, None, None]


def _stats_torch(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-plane mean and 1/sqrt(var + eps) (biased variance) of ``x`` [B, C, H, W]."""
    mean = x.mean((2, 3))
    var = (x - _plane(mean)).square().mean((2, 3))
    return mean, (var + eps).rsqrt()


def _spread(gy: Tensor, h: int, w: int, pool: bool) -> Tensor:
    """Adjoint of the 2x2 average pool: each output gradient / 4 to its window; 0 elsewhere."""
    if not pool:
        return gy
    ga = gy.repeat_interleave(2, 2).repeat_interleave(2, 3) * 0.25
    return F.pad(ga, (0, w - ga.shape[3], 0, h - ga.shape[2]))


def _pool(t: Tensor, pool: bool) -> Tensor:
    return F.avg_pool2d(t, 2) if pool else t


def _double_backward_torch(
    u: Tensor,
    ggw: Tensor,
    ggb: Tensor,
    gy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    rstd: Tensor,
    pool: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The double-backward formulas of csrc/instance_norm_relu_pool.h in PyTorch ops.

    Inputs as in the ``instance_norm_relu_pool_double_backward`` schema (all in the
    accumulation dtype here); returns (grad of gy, grad of x, grad of weight). Used for third
    and higher derivatives: differentiable when ``mean`` and ``rstd`` are computed from ``x``.
    """
    n = x.shape[2] * x.shape[3]
    r, w, a, c = _plane(rstd), _plane(weight), _plane(ggw), _plane(ggb)
    xh = (x - _plane(mean)) * r
    mask = ((xh * w + _plane(bias)) > 0).to(x.dtype)
    gz = _spread(gy, x.shape[2], x.shape[3], pool) * mask

    def psum(t: Tensor) -> Tensor:
        return t.sum((2, 3), keepdim=True)

    s1, s2, u1, u2, u3 = psum(gz), psum(gz * xh), psum(u), psum(u * xh), psum(u * gz)
    wrn = w * r / n
    q = u3 - (s1 * u1 + s2 * u2) / n
    t = w * r * u + (a - wrn * u2) * xh + (c - wrn * u1)
    g_gy = _pool(mask * t, pool)
    mean_g = (a * s1 - wrn * (s1 * u2 + u1 * s2)) / n
    mean_gxh = (a * s2 - 2 * wrn * s2 * u2) / n
    g_x = r * (a - wrn * u2) * gz - r * wrn * s2 * u - r * (mean_gxh + wrn * q) * xh - r * mean_g
    g_w = (r * q).sum((0, 2, 3))
    return g_gy, g_x, g_w


# --------------------------------------------------------------------------------------------
# Autograd of the kernel-backed operators (the same functions serve C++ and Triton ops)
# --------------------------------------------------------------------------------------------


def _forward_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps, pool = inputs
    _, mean, rstd = output
    # mean and rstd are functions of x: the derivatives below are total derivatives through x,
    # so the statistics themselves carry no gradient.
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps, ctx.pool = eps, pool


def _make_forward_backward(backward_op):
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        gx, gw, gb = backward_op(grad_out, x, weight, bias, mean, rstd, ctx.eps, ctx.pool)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None,
                None, None)  # fmt: skip

    return backward


def _backward_setup_context(ctx, inputs, output) -> None:
    grad_out, x, weight, bias, mean, rstd, eps, pool = inputs
    ctx.save_for_backward(grad_out, x, weight, bias, mean, rstd)
    ctx.eps, ctx.pool = eps, pool


def _make_backward_backward(double_backward_op):
    def backward(ctx, ggx, ggw, ggb):
        grad_out, x, weight, bias, mean, rstd = ctx.saved_tensors
        g_gy, g_x, g_w = double_backward_op(
            ggx, ggw, ggb, grad_out, x, weight, bias, mean, rstd, ctx.eps, ctx.pool
        )
        need = ctx.needs_input_grad
        # bias moves only the ReLU threshold (zero derivative almost everywhere); mean and
        # rstd are non-differentiable outputs of the forward (their effect is inside g_x).
        return (g_gy if need[0] else None, g_x if need[1] else None, g_w if need[2] else None,
                None, None, None, None, None)  # fmt: skip

    return backward


def _double_backward_setup_context(ctx, inputs, output) -> None:
    ggx, ggw, ggb, grad_out, x, weight, bias, _mean, _rstd, eps, pool = inputs
    ctx.save_for_backward(ggx, ggw, ggb, grad_out, x, weight, bias)
    ctx.eps, ctx.pool = eps, pool


def _double_backward_backward(ctx, *grads):
    """Third order: the VJP of the PyTorch form of the double-backward formulas."""
    saved = ctx.saved_tensors
    bias = saved[6]
    need = ctx.needs_input_grad[:6]
    create = torch.is_grad_enabled()  # create_graph=True of the caller: keep a graph
    acc = bias.dtype
    with torch.enable_grad():
        leaves = [
            t if create and t.requires_grad else t.detach().requires_grad_(n)
            for t, n in zip(saved[:6], need)
        ]
        u, ggw, ggb, gy, x, w = leaves
        mean, rstd = _stats_torch(x.to(acc), ctx.eps)
        outs = _double_backward_torch(
            u.to(acc), ggw, ggb, gy.to(acc), x.to(acc), w, bias.detach(), mean, rstd, ctx.pool
        )
        outs = (outs[0].to(gy.dtype), outs[1].to(x.dtype), outs[2])
        wrt = [t for t, n in zip(leaves, need) if n]
        got = iter(
            torch.autograd.grad(outs, wrt, grads, create_graph=create, allow_unused=True)
            if wrt
            else ()
        )
    result = [next(got) if n else None for n in need]
    return (*result, None, None, None, None, None)


def _register_autograd(forward_op: str, backward_op: str, double_backward_op: str) -> None:
    fwd = getattr(torch.ops.hpd_fast, backward_op)
    dbwd = getattr(torch.ops.hpd_fast, double_backward_op)
    torch.library.register_autograd(
        f"hpd_fast::{forward_op}",
        _make_forward_backward(fwd),
        setup_context=_forward_setup_context,
    )
    torch.library.register_autograd(
        f"hpd_fast::{backward_op}",
        _make_backward_backward(dbwd),
        setup_context=_backward_setup_context,
    )
    torch.library.register_autograd(
        f"hpd_fast::{double_backward_op}",
        _double_backward_backward,
        setup_context=_double_backward_setup_context,
    )


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels of the C++ operators
# --------------------------------------------------------------------------------------------


def _fake_forward(x, weight, bias, eps, pool):
    b, c, h, w = x.shape
    oh, ow = (h // 2, w // 2) if pool else (h, w)
    acc = _acc_dtype(x.dtype)
    return (
        x.new_empty((b, c, oh, ow)),
        x.new_empty((b, c), dtype=acc),
        x.new_empty((b, c), dtype=acc),
    )


def _fake_backward(grad_out, x, weight, bias, mean, rstd, eps, pool):
    c = x.shape[1]
    return x.new_empty(x.shape), weight.new_empty((c,)), weight.new_empty((c,))


def _fake_double_backward(ggx, ggw, ggb, grad_out, x, weight, bias, mean, rstd, eps, pool):
    return grad_out.new_empty(grad_out.shape), x.new_empty(x.shape), weight.new_empty((x.shape[1],))


_REGISTERED: dict[str, bool] = {}
_CPP_NAMES = (_OP, f"{_OP}_backward", f"{_OP}_double_backward")
_TRITON_NAMES = tuple(f"{n}_triton" for n in _CPP_NAMES)


def _register_cpp() -> bool:
    """Attach fake kernels and autograd to the C++ operators (once, after hpd_fast._C loads)."""
    if "cpp" not in _REGISTERED:
        ok = _backend.cpp_loaded() and hasattr(torch.ops.hpd_fast, _OP)
        if ok:
            for name, fake in zip(
                _CPP_NAMES, (_fake_forward, _fake_backward, _fake_double_backward), strict=True
            ):
                torch.library.register_fake(f"hpd_fast::{name}")(fake)
            _register_autograd(*_CPP_NAMES)
        _REGISTERED["cpp"] = ok
    return _REGISTERED["cpp"]


def _triton_ops():
    """The Triton operators (defined on first use, so importing hpd_fast never imports triton)."""
    if "triton" not in _REGISTERED:
        from hpd_fast.ops import _instance_norm_relu_pool_triton  # noqa: F401

        _register_autograd(*_TRITON_NAMES)
        _REGISTERED["triton"] = True
    return torch.ops.hpd_fast.instance_norm_relu_pool_triton


# Operators are registered when this module is imported (as torch's own libraries do), so that
# torch.compile never meets a first-use import. Triton is imported only where it can run.
_register_cpp()
if _backend.backend_info()["triton"]["available"]:
    _triton_ops()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def instance_norm_relu_pool(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    eps: float = 1e-5,
    pool: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Instance norm (``GroupNorm(C, C)`` with affine) -> ReLU -> 2x2 average pool, fused.

    ``y = avg_pool2d(relu(group_norm(x, C, weight, bias, eps)), 2)``, or without the pool when
    ``pool=False``: the tail of a ConvNet block after its convolution.

    Args:
        x: ``[B, C, H, W]``, float32 or float64 (float16/bfloat16 accepted: statistics and
            arithmetic in float32, output rounded once); any strides.
        weight, bias: ``[C]`` affine parameters (``None``: 1 and 0). Cast to the accumulation
            dtype (float64 for float64 ``x``, else float32); their gradients come back in their
            own dtype.
        eps: added to the per-plane variance (biased, like ``nn.GroupNorm``).
        pool: 2x2 average pool with stride 2 (floor for odd H or W, like ``nn.AvgPool2d(2, 2)``);
            needs H, W >= 2.
        backend: ``None`` (fastest available), ``"reference"``, ``"cpp"``, ``"cuda"`` or
            ``"triton"``.

    Returns:
        ``[B, C, H // 2, W // 2]`` (``[B, C, H, W]`` with ``pool=False``) in ``x``'s dtype.

    Differentiable with respect to ``x``, ``weight`` and ``bias``, to any order: the backward
    and its own derivative (needed with ``create_graph=True``, e.g. by exact trajectory
    matching) are fused kernels; third and higher orders use PyTorch ops. Under ``torch.func``
    transforms (``vmap``, ``grad``, ``jvp``, ...), which cannot see the kernels' autograd,
    ``backend=None`` runs the reference (a forced kernel backend raises ``RuntimeError``).
    """
    x, w, b, eps = _prepare(x, weight, bias, eps, pool)
    if _backend.under_func_transform():
        if backend not in (None, "reference"):
            raise RuntimeError(
                f"{_OP}: backend={backend!r} cannot run under torch.func transforms (vmap, "
                "grad, jvp, ...); use backend=None or 'reference' there"
            )
        return _ref_impl(x, w, b, eps, pool)
    chosen = _backend.select_backend(_OP, x.device, backend)
    if chosen == "reference":
        return _ref_impl(x, w, b, eps, pool)
    if chosen == "triton":
        op = _triton_ops()
    else:
        if not _register_cpp():
            raise RuntimeError(
                f"{_OP}: hpd_fast._C has no {_OP} kernels; rebuild the extension "
                "(pip install --no-build-isolation -e .)"
            )
        op = torch.ops.hpd_fast.instance_norm_relu_pool
    return op(x, w, b, eps, pool)[0]
