"""Triton operators ``hpd_fast::class_mean_distance_triton`` and its backward.

Defined with ``torch.library.triton_op`` + ``wrap_triton`` so torch.compile sees the kernels.
Imported on first use only (it imports triton).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hpd_fast.kernels._math import LAUNCH_OPTIONS
from hpd_fast.kernels.class_mean_distance import (
    _class_mean_distance_bwd_kernel,
    _class_mean_distance_fwd_kernel,
    backward_blocks,
    backward_grid,
    forward_blocks,
    forward_grid,
)


@triton_op("hpd_fast::class_mean_distance_triton", mutates_args=())
def class_mean_distance_triton(
    features: list[Tensor], labels: Tensor, targets: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as ``hpd_fast::class_mean_distance`` (see csrc/hpd_fast.cpp).

    Labels must lie in ``[0, S)`` (the public function checks them outside torch.compile). A bad
    label fails in ``scatter_add_`` below (an IndexError on the CPU, a device-side assert on the
    GPU) before any kernel runs; the kernels never read outside their tensors.
    """
    s = targets[0].shape[0]
    acc = targets[0].dtype
    on_gpu = labels.is_cuda
    order = torch.sort(labels, stable=True).indices
    counts = torch.zeros(s, dtype=torch.int64, device=labels.device)
    counts.scatter_add_(0, labels, torch.ones_like(labels))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    total = sum(f.shape[1] for f in features)
    diff = torch.empty(s, total, dtype=acc, device=labels.device)
    dist = torch.zeros(s, dtype=acc, device=labels.device)
    col0 = 0
    for f, t in zip(features, targets):
        x, t = f.contiguous(), t.contiguous()
        d = x.shape[1]
        if d > 0 and s > 0:
            block_r, block_d = forward_blocks(on_gpu, d, labels.shape[0])
            nblk = triton.cdiv(d, block_d)
            partial = torch.empty(s, nblk, dtype=acc, device=labels.device)
            wrap_triton(_class_mean_distance_fwd_kernel)[forward_grid(s, nblk)](
                x, t, order, offsets, diff[:, col0:], partial, d, total, nblk,
                BLOCK_R=block_r, BLOCK_D=block_d, ACC_FP64=acc == torch.float64, **LAUNCH_OPTIONS,
            )  # fmt: skip
            dist = dist + partial.sum(1)
        col0 += d
    return dist, diff, counts.to(acc)


@triton_op("hpd_fast::class_mean_distance_backward_triton", mutates_args=())
def class_mean_distance_backward_triton(
    scale: Tensor, diff: Tensor, labels: Tensor, dtype: torch.dtype
) -> Tensor:
    """``out[i, :] = scale[labels[i]] * diff[labels[i], :]`` in ``dtype``; a row whose label is
    outside ``[0, S)`` gets 0 (the kernel never reads out of bounds)."""
    n, d = labels.shape[0], diff.shape[1]
    # The CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest: there, write
    # fp32 and let torch round. Compiled GPU kernels store bf16 directly.
    store_dtype = torch.float32 if dtype == torch.bfloat16 and not labels.is_cuda else dtype
    out = torch.empty(n, d, dtype=store_dtype, device=diff.device)
    if n == 0 or d == 0:
        return out.to(dtype)
    if diff.stride(1) != 1:
        diff = diff.contiguous()
    block_n, block_d = backward_blocks(labels.is_cuda, n, d)
    grid = backward_grid(n, d, block_n, block_d)
    wrap_triton(_class_mean_distance_bwd_kernel)[grid](
        scale.contiguous(), diff, labels.contiguous(), out, n, d, diff.shape[0], diff.stride(0),
        triton.cdiv(d, block_d), BLOCK_N=block_n, BLOCK_D=block_d, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out.to(dtype)
