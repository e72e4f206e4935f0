"""Triton kernels of hpd_fast (installed as ``hpd_fast.kernels``).

Only ``@triton.jit`` kernels and small launch helpers live here; the operators that call them
are defined in ``hpd_fast.ops``. Importing this package imports triton.
"""
