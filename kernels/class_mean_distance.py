"""Triton kernels of the segmented-mean squared distance (see hpd_fast/ops/class_mean_distance.py).

Rows arrive bucketed by segment (``order``, ``offsets``); one program per (column block, segment)
sums a [BLOCK_R, BLOCK_D] tile of its rows at a time, so every feature element is read once.
"""

import triton
import triton.language as tl


@triton.jit
def _class_mean_distance_fwd_kernel(
    x_ptr,  # [N, D] features, any float dtype, contiguous
    t_ptr,  # [S, D] targets, accumulation dtype, contiguous
    order_ptr,  # [N] int64 rows sorted by segment
    offsets_ptr,  # [S + 1] int64 segment boundaries in order
    diff_ptr,  # [S, ld_diff] output view: mean - target (0 for an empty segment)
    partial_ptr,  # [S, NBLK] output: sum of squares per column block
    D,
    ld_diff,
    NBLK,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    pid_d = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    r0 = tl.load(offsets_ptr + seg)
    r1 = tl.load(offsets_ptr + seg + 1)
    if ACC_FP64:
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r in range(r0, r1, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        rmask = rows < r1
        idx = tl.load(order_ptr + rows, mask=rmask, other=0)
        x = tl.load(
            x_ptr + idx[:, None] * D + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )
        acc += x.to(acc.dtype)  # upcast right after the load (bf16/fp16 never used in math)
    sums = tl.sum(acc, axis=0)
    count = r1 - r0
    t = tl.load(t_ptr + seg * D + cols, mask=cmask, other=0.0)
    inv = 1.0 / tl.maximum(count, 1).to(acc.dtype)
    d = tl.where(cmask & (count > 0), sums * inv - t, 0.0)
    tl.store(diff_ptr + seg * ld_diff + cols, d, mask=cmask)
    tl.store(partial_ptr + seg * NBLK + pid_d, tl.sum(d * d, axis=0))


@triton.jit
def _class_mean_distance_bwd_kernel(
    scale_ptr,  # [S] accumulation dtype: 2 * grad / count
    diff_ptr,  # [S, ld_diff] accumulation dtype
    labels_ptr,  # [N] int64
    out_ptr,  # [N, D] feature dtype
    N,
    D,
    ld_diff,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols[None, :] < D)
    seg = tl.load(labels_ptr + rows, mask=rmask, other=0)
    a = tl.load(scale_ptr + seg, mask=rmask, other=0.0)
    d = tl.load(diff_ptr + seg[:, None] * ld_diff + cols[None, :], mask=mask, other=0.0)
    g = a[:, None] * d
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
        g.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def forward_blocks(on_gpu: bool, d: int, n: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): small tiles for the GPU, big ones for the (slow) CPU interpreter."""
    if on_gpu:
        return 8, 256
    return (
        min(triton.next_power_of_2(max(n, 1)), 64),
        min(triton.next_power_of_2(max(d, 1)), 4096),
    )


def backward_blocks(on_gpu: bool, n: int, d: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) for the backward kernel."""
    if on_gpu:
        return 4, 256
    return min(triton.next_power_of_2(max(n, 1)), 64), min(triton.next_power_of_2(max(d, 1)), 4096)
