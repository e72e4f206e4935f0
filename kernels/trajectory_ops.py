"""Triton kernels of the flat-parameter operations of trajectory matching.

See hpd_fast/ops/trajectory_ops.py for the math. Reductions write one fp64 partial per program;
the launcher sums them in a fixed order.
"""

import triton
import triton.language as tl


@triton.jit
def _sgd_step_fwd_kernel(theta_ptr, grad_ptr, lr_ptr, out_ptr, P, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    lr = tl.load(lr_ptr)
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(lr.dtype)
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(lr.dtype)
    tl.store(out_ptr + offs, (theta - lr * grad).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _param_match_sums_kernel(
    theta_n_ptr, target_ptr, start_ptr, num_ptr, den_ptr, P, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    tn = tl.load(theta_n_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    tg = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    st = tl.load(start_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    a = tn - tg
    b = st - tg
    tl.store(num_ptr + tl.program_id(0), tl.sum(a * a, axis=0))
    tl.store(den_ptr + tl.program_id(0), tl.sum(b * b, axis=0))


@triton.jit
def _param_match_seed_kernel(theta_n_ptr, target_ptr, den_ptr, seed_ptr, P, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    two_over_den = 2.0 / tl.load(den_ptr)
    tn = tl.load(theta_n_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    tg = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    seed = two_over_den * (tn - tg)
    tl.store(seed_ptr + offs, seed.to(seed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adjoint_update_fwd_kernel(lam_ptr, h_ptr, g_ptr, out_ptr, dot_ptr, P, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    lam = tl.load(lam_ptr + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    acc_t = tl.float64 if lam.dtype == tl.float64 else tl.float32
    tl.store(out_ptr + offs, (lam.to(acc_t) + h.to(acc_t)).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dot_ptr + tl.program_id(0), tl.sum(g.to(tl.float64) * lam.to(tl.float64), axis=0))


def block_size(on_gpu: bool, n: int) -> int:
    """Elements per program: 1024 on the GPU, few big programs for the CPU interpreter."""
    if on_gpu:
        return 1024
    return max(16, min(triton.next_power_of_2(max(n, 1)), 1 << 16))
