"""A 2-D convolution whose derivatives of every order run on the convolution kernels.

PyTorch's own double backward of a convolution (``aten::_convolution_double_backward``) computes
the weight term ``d<g_W, v>/dW``, which exact trajectory matching and gradient matching need at
every student step, as a convolution with the batch and channel dimensions swapped. On the CPU
that is slower than the weight-gradient kernel that computes the same numbers (ConvNet-3's
second layer, 10 images, 2-core EPYC: 3.9 ms against 2.4 ms); with :func:`conv2d` in the
ConvNet blocks, a CIFAR-shaped H-PD iteration with exact MTT took about 7% less time.

:func:`conv2d` writes the convolution as three autograd functions that differentiate into each
other, each running one ``aten::convolution_backward`` or ``conv2d`` call::

    y  = conv(x, W)            dy/dx -> input_grad(g, W)      dy/dW -> weight_grad(x, g)
    input_grad(g, W)           d/dg  -> conv(c, W)            d/dW  -> weight_grad(c, g)
    weight_grad(x, g)          d/dx  -> input_grad(g, c)      d/dg  -> conv(x, c)

so every order of derivative is made of the forward, input-gradient and weight-gradient
kernels, and only what autograd asks for is computed. Groups 1, dilation 1, zero padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hpd_fast import _backend

__all__ = ["conv2d"]

_Pair = tuple[int, int]


def _conv_backward(
    grad_out: Tensor, x: Tensor, w: Tensor, stride: _Pair, padding: _Pair, mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten.convolution_backward(
        grad_out, x, w, None, stride, padding, (1, 1), False, (0, 0), 1, mask
    )


class _Conv(torch.autograd.Function):
    """``y = conv2d(x, w, b)``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, stride: _Pair, padding: _Pair):
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, b is not None)
        return F.conv2d(x, w, b, stride, padding)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: differentiable pieces
            gx = _InputGrad.apply(g, w, x.shape, stride, padding) if need_x else None
            gw = _WeightGrad.apply(x, g, w.shape, stride, padding) if need_w else None
        else:  # one kernel call for both
            gx, gw, _ = _conv_backward(g, x, w, stride, padding, [need_x, need_w, False])
        gb = g.sum((0, 2, 3)) if need_b and has_bias else None
        return gx, gw, gb, None, None


class _InputGrad(torch.autograd.Function):
    """``dx = d<g, conv(x, w)>/dx`` for an input of shape ``x_shape``."""

    @staticmethod
    def forward(ctx, g: Tensor, w: Tensor, x_shape: torch.Size, stride: _Pair, padding: _Pair):
        ctx.save_for_backward(g, w)
        ctx.conf = (stride, padding)
        # Only the input's shape is read by the input-gradient kernel.
        x_like = g.new_empty(x_shape)
        return _conv_backward(g, x_like, w, stride, padding, [True, False, False])[0]

    @staticmethod
    def backward(ctx, c: Tensor):
        g, w = ctx.saved_tensors
        stride, padding = ctx.conf
        need_g, need_w = ctx.needs_input_grad[:2]
        dg = _Conv.apply(c, w, None, stride, padding) if need_g else None
        dw = _WeightGrad.apply(c, g, w.shape, stride, padding) if need_w else None
        return dg, dw, None, None, None


class _WeightGrad(torch.autograd.Function):
    """``dW = d<g, conv(x, W)>/dW`` for a weight of shape ``w_shape``."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor, w_shape: torch.Size, stride: _Pair, padding: _Pair):
        ctx.save_for_backward(x, g)
        ctx.conf = (stride, padding)
        w_like = x.new_empty(w_shape)  # only its shape is read
        return _conv_backward(g, x, w_like, stride, padding, [False, True, False])[1]

    @staticmethod
    def backward(ctx, c: Tensor):
        x, g = ctx.saved_tensors
        stride, padding = ctx.conf
        need_x, need_g = ctx.needs_input_grad[:2]
        dx = _InputGrad.apply(g, c, x.shape, stride, padding) if need_x else None
        dg = _Conv.apply(x, c, None, stride, padding) if need_g else None
        return dx, dg, None, None, None


def _pair(name: str, v: int | tuple[int, int]) -> _Pair:
    pair = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(pair) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair  # type: ignore[return-value]


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (groups 1, dilation 1), with derivatives
    of every order computed by the forward, input-gradient and weight-gradient kernels.

    Args:
        x: ``[B, C_in, H, W]``.
        weight: ``[C_out, C_in, kH, kW]``.
        bias: ``[C_out]`` or ``None``.
        stride, padding: an int or a pair.

    Returns:
        ``[B, C_out, H_out, W_out]``, the same numbers as ``F.conv2d``.

    Under ``torch.func`` transforms and ``torch.compile`` it is ``F.conv2d`` itself (custom
    autograd functions are opaque there).
    """
    stride, padding = _pair("stride", stride), _pair("padding", padding)
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"conv2d: x must be [B, C_in, H, W] and weight [C_out, C_in, kH, kW] with the same "
            f"C_in, got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if torch.compiler.is_compiling() or _backend.under_func_transform():
        return F.conv2d(x, weight, bias, stride, padding)
    return _Conv.apply(x, weight, bias, stride, padding)
