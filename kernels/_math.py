"""Round-to-nearest arithmetic shared by the Triton kernels.

In fp32, Triton's ``/`` compiles to ``div.full.f32`` and ``tl.sqrt`` to ``sqrt.approx.f32``
(both a few ulp off), whereas the C++ CPU and CUDA kernels (and PyTorch) round to nearest. These
helpers keep every backend on the same IEEE arithmetic; fp64 ``/`` and ``sqrt`` already round to
nearest. Launchers also pass :data:`LAUNCH_OPTIONS` (no multiply-add contraction, as nvcc's
``-fmad=false`` and the CPU build), and ``.ci/triton_aot_check.py`` fails on any approximate
instruction in the compiled kernels. See docs/gpu.md.
"""

import triton
import triton.language as tl

# Compile options every launcher passes: no fused multiply-add contraction (the CPU compiler
# never contracts), so each per-element formula rounds exactly as in csrc/*.h.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def div_rn(a, b):
    """a / b rounded to nearest; a and b have the same float dtype (fp32 or fp64)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def sqrt_rn(a):
    """sqrt(a) rounded to nearest (fp32 or fp64)."""
    if a.dtype == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def relu(z):
    """relu(z) with NaN passed through, like torch.relu and csrc/instance_norm_relu_pool.h
    (``tl.maximum`` would return 0 for NaN: max.f32 ignores a NaN operand)."""
    return tl.where(z < 0.0, 0.0, z)
