"""Triton operators ``hpd_fast::instance_norm_relu_pool_triton`` and its two derivatives.

Same contracts as the C++ operators (schemas in csrc/hpd_fast.cpp). Defined with
``torch.library.triton_op`` + ``wrap_triton`` so torch.compile sees the kernels. Imported on first
use only (it imports triton).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hpd_fast.kernels._math import LAUNCH_OPTIONS
from hpd_fast.kernels.instance_norm_relu_pool import (
    _instance_norm_relu_pool_bwd_kernel,
    _instance_norm_relu_pool_dbwd_kernel,
    _instance_norm_relu_pool_fwd_kernel,
    plane_block,
)


def _store_dtype(dtype: torch.dtype, on_gpu: bool) -> torch.dtype:
    # The CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest: there, write
    # fp32 and let torch round. Compiled GPU kernels store bf16 directly.
    return torch.float32 if dtype == torch.bfloat16 and not on_gpu else dtype


def _sizes(x: Tensor, pool: bool) -> tuple[int, int, int, int, int, int]:
    b, c, h, w = x.shape
    return b, c, h, w, (h // 2 if pool else h), (w // 2 if pool else w)


@triton_op("hpd_fast::instance_norm_relu_pool_triton", mutates_args=())
def instance_norm_relu_pool_triton(
    input: Tensor, weight: Tensor, bias: Tensor, eps: float, pool: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean [B, C], rstd [B, C]); see ``hpd_fast::instance_norm_relu_pool``."""
    x = input.contiguous()
    b, c, h, w, h2, w2 = _sizes(x, pool)
    on_gpu = x.is_cuda
    acc = weight.dtype
    y = torch.empty(b, c, h2, w2, dtype=_store_dtype(x.dtype, on_gpu), device=x.device)
    mean = torch.empty(b, c, dtype=acc, device=x.device)
    rstd = torch.empty(b, c, dtype=acc, device=x.device)
    if b * c > 0:
        block, warps = plane_block(on_gpu, h * w)
        eps_t = torch.full((1,), eps, dtype=acc, device=x.device)  # exact in fp64, unlike a scalar
        wrap_triton(_instance_norm_relu_pool_fwd_kernel)[(b * c,)](
            x, weight.contiguous(), bias.contiguous(), eps_t, y, mean, rstd, c, h, w, h2, w2,
            POOL=pool, BLOCK=block, ACC_FP64=acc == torch.float64, num_warps=warps, **LAUNCH_OPTIONS,
        )  # fmt: skip
    return y.to(x.dtype), mean, rstd


@triton_op("hpd_fast::instance_norm_relu_pool_backward_triton", mutates_args=())
def instance_norm_relu_pool_backward_triton(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    pool: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); see ``hpd_fast::instance_norm_relu_pool_backward``."""
    x, gy = input.contiguous(), grad_out.contiguous()
    b, c, h, w, h2, w2 = _sizes(x, pool)
    on_gpu = x.is_cuda
    acc = weight.dtype
    gx = torch.empty(x.shape, dtype=_store_dtype(x.dtype, on_gpu), device=x.device)
    gw_part = torch.zeros(b, c, dtype=acc, device=x.device)
    gb_part = torch.zeros(b, c, dtype=acc, device=x.device)
    if b * c > 0:
        block, warps = plane_block(on_gpu, h * w)
        wrap_triton(_instance_norm_relu_pool_bwd_kernel)[(b * c,)](
            gy, x, weight.contiguous(), bias.contiguous(), mean.contiguous(), rstd.contiguous(),
            gx, gw_part, gb_part, c, h, w, h2, w2,
            POOL=pool, BLOCK=block, ACC_FP64=acc == torch.float64, num_warps=warps, **LAUNCH_OPTIONS,
        )  # fmt: skip
    # Per-plane partials summed over the batch: deterministic.
    return gx.to(x.dtype), gw_part.sum(0), gb_part.sum(0)


@triton_op("hpd_fast::instance_norm_relu_pool_double_backward_triton", mutates_args=())
def instance_norm_relu_pool_double_backward_triton(
    grad_grad_input: Tensor,
    grad_grad_weight: Tensor,
    grad_grad_bias: Tensor,
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    pool: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad of grad_out, grad of input, grad of weight); see
    ``hpd_fast::instance_norm_relu_pool_double_backward``."""
    x, gy, u = input.contiguous(), grad_out.contiguous(), grad_grad_input.contiguous()
    b, c, h, w, h2, w2 = _sizes(x, pool)
    on_gpu = x.is_cuda
    acc = weight.dtype
    store = _store_dtype(x.dtype, on_gpu)
    g_gy = torch.empty(gy.shape, dtype=store, device=x.device)
    g_x = torch.empty(x.shape, dtype=store, device=x.device)
    gw_part = torch.zeros(b, c, dtype=acc, device=x.device)
    if b * c > 0:
        block, warps = plane_block(on_gpu, h * w)
        wrap_triton(_instance_norm_relu_pool_dbwd_kernel)[(b * c,)](
            u, grad_grad_weight.contiguous(), grad_grad_bias.contiguous(), gy, x,
            weight.contiguous(), bias.contiguous(), mean.contiguous(), rstd.contiguous(),
            g_gy, g_x, gw_part, c, h, w, h2, w2,
            POOL=pool, BLOCK=block, ACC_FP64=acc == torch.float64, num_warps=warps, **LAUNCH_OPTIONS,
        )  # fmt: skip
    return g_gy.to(x.dtype), g_x.to(x.dtype), gw_part.sum(0)
