"""Triton kernels of the segmented-mean squared distance (see hpd_fast/ops/class_mean_distance.py).

Rows arrive bucketed by segment (``order``, ``offsets``); one program per (column block, segment)
sums a [BLOCK_R, BLOCK_D] tile of its rows at a time, so every feature element is read once.

Grids are one-dimensional (axis 0 allows 2^31 - 1 programs; axes 1 and 2 only 65,535), so any
number of segments or rows launches: see :func:`forward_grid` and :func:`backward_grid`.
"""

import triton
import triton.language as tl

from hpd_fast.kernels._math import div_rn

# CUDA's limit on grid axis 0, the only axis these launchers use.
MAX_GRID_X = 2**31 - 1


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
    pid = tl.program_id(0)
    seg = (pid // NBLK).to(tl.int64)
    pid_d = pid % NBLK
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
    cnt = tl.maximum(count, 1).to(acc.dtype)
    inv = div_rn(cnt * 0.0 + 1.0, cnt)  # 1 / count, rounded like the C++ kernels
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
    S,
    ld_diff,
    NBLK_D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid // NBLK_D).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (pid % NBLK_D) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    seg = tl.load(labels_ptr + rows, mask=rmask, other=0)
    # A label outside [0, S) is never followed (its row gets 0): the launcher's contract is that
    # labels were checked, but under torch.compile nothing on the GPU may read out of bounds.
    rmask = rmask & (seg >= 0) & (seg < S)
    mask = rmask[:, None] & (cols[None, :] < D)
    a = tl.load(scale_ptr + seg, mask=rmask, other=0.0)
    d = tl.load(diff_ptr + seg[:, None] * ld_diff + cols[None, :], mask=mask, other=0.0)
    g = a[:, None] * d
    tl.store(
        out_ptr + rows[:, None] * D + cols[None, :],
        g.to(out_ptr.dtype.element_ty),
        mask=(rows < N)[:, None] & (cols[None, :] < D),
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


def _check_grid(programs: int, what: str) -> tuple[int]:
    if programs > MAX_GRID_X:
        raise ValueError(
            f"class_mean_distance (Triton): {what} needs {programs} programs, more than "
            f"the {MAX_GRID_X} one launch allows"
        )
    return (programs,)


def forward_grid(segments: int, col_blocks: int) -> tuple[int]:
    """Launch grid of the forward kernel: program ``seg * col_blocks + column block``."""
    return _check_grid(segments * col_blocks, f"{segments} segments x {col_blocks} column blocks")


def backward_grid(n: int, d: int, block_n: int, block_d: int) -> tuple[int]:
    """Launch grid of the backward kernel: program ``row block * cdiv(d, block_d) + column block``."""
    return _check_grid(triton.cdiv(n, block_n) * triton.cdiv(d, block_d), f"{n} rows x {d} columns")
