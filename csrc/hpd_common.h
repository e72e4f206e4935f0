// Shared helpers for the CPU (.cpp) and CUDA (.cu) kernels of hpd_fast.
//
// Per-element arithmetic lives in headers as HPD_HD inline functions so that the CPU build,
// which the test suite exercises on every machine, runs the very arithmetic the GPU runs:
// given the same inputs, bitwise, because every backend rounds to nearest and none contracts
// multiply-adds (nvcc -fmad=false in setup.py; Triton: kernels/_math.py). Reductions add in a
// different order per backend and agree to rounding only (docs/gpu.md).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HPD_HD __host__ __device__ __forceinline__
#else
#define HPD_HD inline
#endif

namespace hpd_fast {

// Accumulation type: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs.
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc_type<T>::type;

}  // namespace hpd_fast
