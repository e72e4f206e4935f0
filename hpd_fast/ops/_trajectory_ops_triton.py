"""Triton operators for the flat-parameter steps of trajectory matching (see trajectory_ops.py).

Defined with ``torch.library.triton_op`` + ``wrap_triton``; imported on first use only.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hpd_fast.kernels._math import LAUNCH_OPTIONS
from hpd_fast.kernels.trajectory_ops import (
    _adjoint_update_fwd_kernel,
    _param_match_seed_kernel,
    _param_match_sums_kernel,
    _sgd_step_fwd_kernel,
    block_size,
)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton_op("hpd_fast::sgd_step_triton", mutates_args=())
def sgd_step_triton(theta: Tensor, grad: Tensor, lr: Tensor) -> Tensor:
    theta, grad = theta.contiguous(), grad.contiguous()
    out = torch.empty_like(theta)
    n = theta.numel()
    if n:
        blk = block_size(theta.is_cuda, n)
        lr_d = lr.reshape(1).to(device=theta.device, dtype=_acc(theta.dtype))
        wrap_triton(_sgd_step_fwd_kernel)[(triton.cdiv(n, blk),)](
            theta, grad, lr_d, out, n, BLOCK=blk, **LAUNCH_OPTIONS
        )
    return out


@triton_op("hpd_fast::param_match_loss_triton", mutates_args=())
def param_match_loss_triton(
    theta_n: Tensor, target: Tensor, start: Tensor
) -> tuple[Tensor, Tensor]:
    theta_n, target, start = theta_n.contiguous(), target.contiguous(), start.contiguous()
    n = theta_n.numel()
    blk = block_size(theta_n.is_cuda, n)
    grid = max(1, triton.cdiv(n, blk))
    num = torch.zeros(grid, dtype=torch.float64, device=theta_n.device)
    den = torch.zeros(grid, dtype=torch.float64, device=theta_n.device)
    seed = torch.empty_like(theta_n)
    if n:
        wrap_triton(_param_match_sums_kernel)[(grid,)](
            theta_n, target, start, num, den, n, BLOCK=blk, **LAUNCH_OPTIONS
        )
    den_total = den.sum().reshape(1)
    if n:
        wrap_triton(_param_match_seed_kernel)[(grid,)](
            theta_n, target, den_total, seed, n, BLOCK=blk, **LAUNCH_OPTIONS
        )
    return (num.sum() / den_total[0]).to(theta_n.dtype), seed


@triton_op("hpd_fast::adjoint_update_triton", mutates_args=())
def adjoint_update_triton(lam: Tensor, h: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    lam, h, g = lam.contiguous(), h.contiguous(), g.contiguous()
    n = lam.numel()
    blk = block_size(lam.is_cuda, n)
    grid = max(1, triton.cdiv(n, blk))
    out = torch.empty_like(lam)
    dot = torch.zeros(grid, dtype=torch.float64, device=lam.device)
    if n:
        wrap_triton(_adjoint_update_fwd_kernel)[(grid,)](
            lam, h, g, out, dot, n, BLOCK=blk, **LAUNCH_OPTIONS
        )
    return out, dot.sum().to(lam.dtype)
