"""Triton kernels of the fused instance norm -> ReLU -> 2x2 average pool block tail
(see hpd_fast/ops/instance_norm_relu_pool.py; the arithmetic and the derivation of the double
backward are in csrc/instance_norm_relu_pool.h).

One program per (b, c) plane of N = H * W values, walking the plane in BLOCK-sized chunks:
a first pass for the plane sums, then one pass per output. Indexing is flat over the input
plane (h = i // W, w = i % W) or over the pooled plane (its 2x2 window read with four masked
loads). Loads are upcast to the accumulation dtype right away; every access is masked.
Divisions and square roots round to nearest and ReLU passes NaN through (kernels/_math.py), as
in the C++ kernels.
"""

import triton
import triton.language as tl

from hpd_fast.kernels._math import div_rn, relu, sqrt_rn


@triton.jit
def _spread_grad(gy_base, offs, m, W, H2, W2, POOL: tl.constexpr, ACC_FP64: tl.constexpr):
    """gy / 4 of the pooled output whose window holds input element ``offs`` (0 if none), in
    the accumulation dtype."""
    if POOL:
        h = offs // W
        w = offs % W
        inside = m & (h < 2 * H2) & (w < 2 * W2)
        g = tl.load(gy_base + (h // 2) * W2 + w // 2, mask=inside, other=0.0)
    else:
        g = tl.load(gy_base + offs, mask=m, other=0.0)
    if ACC_FP64:
        g = g.to(tl.float64)
    else:
        g = g.to(tl.float32)
    if POOL:
        g = g * 0.25
    return g


@triton.jit
def _relu_affine(x_base, e, m, mean, rstd, w, b, ACC_FP64: tl.constexpr):
    """relu(w (x - mean) rstd + b) at input elements ``e``, in the accumulation dtype."""
    if ACC_FP64:
        xv = tl.load(x_base + e, mask=m, other=0.0).to(tl.float64)
    else:
        xv = tl.load(x_base + e, mask=m, other=0.0).to(tl.float32)
    return relu((xv - mean) * rstd * w + b)


@triton.jit
def _instance_norm_relu_pool_fwd_kernel(
    x_ptr,  # [B, C, H, W] contiguous, any float dtype
    w_ptr,  # [C] accumulation dtype
    b_ptr,  # [C]
    eps_ptr,  # [1] accumulation dtype
    y_ptr,  # [B, C, H2, W2] contiguous
    mean_ptr,  # [B, C] accumulation dtype
    rstd_ptr,  # [B, C]
    C,
    H,
    W,
    H2,
    W2,
    POOL: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    bc = tl.program_id(0).to(tl.int64)
    c = bc % C
    n = H * W
    n_out = H2 * W2
    x_base = x_ptr + bc * n
    y_base = y_ptr + bc * n_out
    ar = tl.arange(0, BLOCK)
    if ACC_FP64:
        part = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        part = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + ar
        part += tl.load(x_base + offs, mask=offs < n, other=0.0).to(part.dtype)
    nf = n.to(part.dtype)
    mean = div_rn(tl.sum(part, axis=0), nf)
    inv_n = div_rn(nf * 0.0 + 1.0, nf)
    part2 = part * 0.0
    for start in range(0, n, BLOCK):
        offs = start + ar
        m = offs < n
        d = tl.where(m, tl.load(x_base + offs, mask=m, other=0.0).to(part.dtype) - mean, 0.0)
        part2 += d * d
    var = tl.sum(part2, axis=0) * inv_n  # csrc/instance_norm_relu_pool.h: inv_std
    rstd = div_rn(nf * 0.0 + 1.0, sqrt_rn(var + tl.load(eps_ptr)))
    tl.store(mean_ptr + bc, mean)
    tl.store(rstd_ptr + bc, rstd)
    w = tl.load(w_ptr + c)
    b = tl.load(b_ptr + c)
    for start in range(0, n_out, BLOCK):
        o = start + ar
        m = o < n_out
        if POOL:
            e = (o // W2) * 2 * W + (o % W2) * 2
            a00 = _relu_affine(x_base, e, m, mean, rstd, w, b, ACC_FP64)
            a01 = _relu_affine(x_base, e + 1, m, mean, rstd, w, b, ACC_FP64)
            a10 = _relu_affine(x_base, e + W, m, mean, rstd, w, b, ACC_FP64)
            a11 = _relu_affine(x_base, e + W + 1, m, mean, rstd, w, b, ACC_FP64)
            out = ((a00 + a10) + (a01 + a11)) * 0.25
        else:
            out = _relu_affine(x_base, o, m, mean, rstd, w, b, ACC_FP64)
        tl.store(y_base + o, out.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _instance_norm_relu_pool_bwd_kernel(
    gy_ptr,  # [B, C, H2, W2] contiguous, input dtype
    x_ptr,  # [B, C, H, W] contiguous
    w_ptr,  # [C] accumulation dtype
    b_ptr,  # [C]
    mean_ptr,  # [B, C]
    rstd_ptr,  # [B, C]
    gx_ptr,  # [B, C, H, W] output
    gw_part_ptr,  # [B, C] output: this plane's sum gz * xh
    gb_part_ptr,  # [B, C] output: this plane's sum gz
    C,
    H,
    W,
    H2,
    W2,
    POOL: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    bc = tl.program_id(0).to(tl.int64)
    c = bc % C
    n = H * W
    x_base = x_ptr + bc * n
    gy_base = gy_ptr + bc * (H2 * W2)
    ar = tl.arange(0, BLOCK)
    mean = tl.load(mean_ptr + bc)
    rstd = tl.load(rstd_ptr + bc)
    w = tl.load(w_ptr + c)
    b = tl.load(b_ptr + c)
    scale = w * rstd
    if ACC_FP64:
        s1 = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = s1 * 0.0
    for start in range(0, n, BLOCK):
        offs = start + ar
        m = offs < n
        xv = tl.load(x_base + offs, mask=m, other=0.0).to(s1.dtype)
        ga = _spread_grad(gy_base, offs, m, W, H2, W2, POOL, ACC_FP64)
        gz = tl.where((xv - mean) * rstd * w + b > 0.0, ga, 0.0)
        s1 += gz
        s2 += gz * ((xv - mean) * rstd)
    sum1 = tl.sum(s1, axis=0)
    sum2 = tl.sum(s2, axis=0)
    tl.store(gb_part_ptr + bc, sum1)
    tl.store(gw_part_ptr + bc, sum2)
    nf = n.to(s1.dtype)
    inv_n = div_rn(nf * 0.0 + 1.0, nf)
    k_xh = -scale * sum2 * inv_n  # csrc/instance_norm_relu_pool.h: backward_coef
    k_0 = -scale * sum1 * inv_n
    for start in range(0, n, BLOCK):
        offs = start + ar
        m = offs < n
        xv = tl.load(x_base + offs, mask=m, other=0.0).to(s1.dtype)
        ga = _spread_grad(gy_base, offs, m, W, H2, W2, POOL, ACC_FP64)
        gz = tl.where((xv - mean) * rstd * w + b > 0.0, ga, 0.0)
        gx = scale * gz + k_xh * ((xv - mean) * rstd) + k_0
        tl.store(gx_ptr + bc * n + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _masked_t(x_base, u_base, e, m, mean, rstd, w, b, t_u, t_xh, t_0, ACC_FP64: tl.constexpr):
    """[z > 0] * t at input elements ``e`` (t = dL/dgz of the double backward)."""
    if ACC_FP64:
        xv = tl.load(x_base + e, mask=m, other=0.0).to(tl.float64)
        uv = tl.load(u_base + e, mask=m, other=0.0).to(tl.float64)
    else:
        xv = tl.load(x_base + e, mask=m, other=0.0).to(tl.float32)
        uv = tl.load(u_base + e, mask=m, other=0.0).to(tl.float32)
    xh = (xv - mean) * rstd
    t = t_u * uv + t_xh * xh + t_0
    return tl.where(xh * w + b > 0.0, t, 0.0)


@triton.jit
def _instance_norm_relu_pool_dbwd_kernel(
    u_ptr,  # [B, C, H, W] contiguous: cotangent of grad_input
    ggw_ptr,  # [C] cotangent of grad_weight, accumulation dtype
    ggb_ptr,  # [C] cotangent of grad_bias
    gy_ptr,  # [B, C, H2, W2]
    x_ptr,  # [B, C, H, W]
    w_ptr,  # [C]
    b_ptr,  # [C]
    mean_ptr,  # [B, C]
    rstd_ptr,  # [B, C]
    g_gy_ptr,  # [B, C, H2, W2] output
    g_x_ptr,  # [B, C, H, W] output
    gw_part_ptr,  # [B, C] output: this plane's share of the weight gradient
    C,
    H,
    W,
    H2,
    W2,
    POOL: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    bc = tl.program_id(0).to(tl.int64)
    c = bc % C
    n = H * W
    n_out = H2 * W2
    x_base = x_ptr + bc * n
    u_base = u_ptr + bc * n
    gy_base = gy_ptr + bc * n_out
    ar = tl.arange(0, BLOCK)
    mean = tl.load(mean_ptr + bc)
    rstd = tl.load(rstd_ptr + bc)
    w = tl.load(w_ptr + c)
    b = tl.load(b_ptr + c)
    gw = tl.load(ggw_ptr + c)
    gb = tl.load(ggb_ptr + c)
    if ACC_FP64:
        s1 = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = s1 * 0.0
    u1 = s1 * 0.0
    u2 = s1 * 0.0
    u3 = s1 * 0.0
    for start in range(0, n, BLOCK):
        offs = start + ar
        m = offs < n
        xv = tl.load(x_base + offs, mask=m, other=0.0).to(s1.dtype)
        uv = tl.load(u_base + offs, mask=m, other=0.0).to(s1.dtype)
        ga = _spread_grad(gy_base, offs, m, W, H2, W2, POOL, ACC_FP64)
        gz = tl.where((xv - mean) * rstd * w + b > 0.0, ga, 0.0)
        xh = (xv - mean) * rstd
        s1 += gz
        s2 += gz * xh
        u1 += uv
        u2 += uv * xh
        u3 += uv * gz
    S1 = tl.sum(s1, axis=0)
    S2 = tl.sum(s2, axis=0)
    U1 = tl.sum(u1, axis=0)
    U2 = tl.sum(u2, axis=0)
    U3 = tl.sum(u3, axis=0)
    # Per-plane coefficients (csrc/instance_norm_relu_pool.h: double_backward_coef).
    nf = n.to(s1.dtype)
    inv_n = div_rn(nf * 0.0 + 1.0, nf)
    wr = w * rstd
    wrn = wr * inv_n
    q = U3 - (S1 * U1 + S2 * U2) * inv_n
    mean_g = (gw * S1 - wrn * (S1 * U2 + U1 * S2)) * inv_n
    mean_gxh = (gw * S2 - 2.0 * wrn * S2 * U2) * inv_n
    t_u = wr
    t_xh = gw - wrn * U2
    t_0 = gb - wrn * U1
    k_gz = rstd * (gw - wrn * U2)
    k_u = -rstd * wrn * S2
    k_xh = -rstd * (mean_gxh + wrn * q)
    k_0 = -rstd * mean_g
    tl.store(gw_part_ptr + bc, rstd * q)
    for start in range(0, n, BLOCK):
        offs = start + ar
        m = offs < n
        xv = tl.load(x_base + offs, mask=m, other=0.0).to(s1.dtype)
        uv = tl.load(u_base + offs, mask=m, other=0.0).to(s1.dtype)
        ga = _spread_grad(gy_base, offs, m, W, H2, W2, POOL, ACC_FP64)
        gz = tl.where((xv - mean) * rstd * w + b > 0.0, ga, 0.0)
        g_x = k_gz * gz + k_u * uv + k_xh * ((xv - mean) * rstd) + k_0
        tl.store(g_x_ptr + bc * n + offs, g_x.to(g_x_ptr.dtype.element_ty), mask=m)
    for start in range(0, n_out, BLOCK):
        o = start + ar
        m = o < n_out
        if POOL:
            e = (o // W2) * 2 * W + (o % W2) * 2
            t00 = _masked_t(x_base, u_base, e, m, mean, rstd, w, b, t_u, t_xh, t_0, ACC_FP64)
            t01 = _masked_t(x_base, u_base, e + 1, m, mean, rstd, w, b, t_u, t_xh, t_0, ACC_FP64)
            t10 = _masked_t(x_base, u_base, e + W, m, mean, rstd, w, b, t_u, t_xh, t_0, ACC_FP64)
            t11 = _masked_t(
                x_base, u_base, e + W + 1, m, mean, rstd, w, b, t_u, t_xh, t_0, ACC_FP64
            )
            out = ((t00 + t10) + (t01 + t11)) * 0.25
        else:
            out = _masked_t(x_base, u_base, o, m, mean, rstd, w, b, t_u, t_xh, t_0, ACC_FP64)
        tl.store(g_gy_ptr + bc * n_out + o, out.to(g_gy_ptr.dtype.element_ty), mask=m)


def plane_block(on_gpu: bool, n: int) -> tuple[int, int]:
    """(BLOCK, num_warps): chunks of a plane per loop step. The CPU interpreter gets one chunk
    for the whole plane (its cost is per step, not per element)."""
    if on_gpu:
        block = min(triton.next_power_of_2(max(n, 1)), 2048)
        return block, max(1, min(8, block // 256))
    return min(triton.next_power_of_2(max(n, 1)), 16384), 1
