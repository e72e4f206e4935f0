// CUDA kernels of the flat-parameter operations of trajectory matching
// (see csrc/trajectory_ops.h for the math). Grid-stride loops; reductions accumulate in double,
// one partial per block, summed afterwards in a fixed order (deterministic, no atomics). No
// host synchronization: lr and the loss denominator are read from device memory.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "trajectory_ops.h"

namespace hpd_fast {
namespace {

constexpr int kThreads = 256;

int num_blocks(int64_t n) {
  const int64_t want = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, 1024)));
}

__device__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

template <typename scalar_t>
__global__ void sgd_step_kernel(const scalar_t* __restrict__ theta,
                                const scalar_t* __restrict__ grad, const acc_t<scalar_t>* lr,
                                scalar_t* __restrict__ out, int64_t n) {
  using acc = acc_t<scalar_t>;
  const acc a = *lr;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(
        traj::sgd<acc>(static_cast<acc>(theta[i]), a, static_cast<acc>(grad[i])));
  }
}

template <typename scalar_t>
__global__ void match_sums_kernel(const scalar_t* __restrict__ theta_n,
                                  const scalar_t* __restrict__ target,
                                  const scalar_t* __restrict__ start, double* __restrict__ pnum,
                                  double* __restrict__ pden, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    traj::match_terms(static_cast<double>(theta_n[i]), static_cast<double>(target[i]),
                      static_cast<double>(start[i]), num, den);
  }
  num = block_sum(num);
  den = block_sum(den);
  if (threadIdx.x == 0) {
    pnum[blockIdx.x] = num;
    pden[blockIdx.x] = den;
  }
}

template <typename scalar_t>
__global__ void match_seed_kernel(const scalar_t* __restrict__ theta_n,
                                  const scalar_t* __restrict__ target,
                                  const double* __restrict__ den, scalar_t* __restrict__ seed,
                                  int64_t n) {
  using acc = acc_t<scalar_t>;
  const acc two_over_den = static_cast<acc>(2.0 / *den);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    seed[i] = static_cast<scalar_t>(traj::adjoint_seed<acc>(
        static_cast<acc>(theta_n[i]), static_cast<acc>(target[i]), two_over_den));
  }
}

template <typename scalar_t>
__global__ void adjoint_update_kernel(const scalar_t* __restrict__ lam,
                                      const scalar_t* __restrict__ h,
                                      const scalar_t* __restrict__ g, scalar_t* __restrict__ out,
                                      double* __restrict__ pdot, int64_t n) {
  using acc = acc_t<scalar_t>;
  double dot = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc l = static_cast<acc>(lam[i]);
    out[i] = static_cast<scalar_t>(l + static_cast<acc>(h[i]));
    dot += static_cast<double>(g[i]) * static_cast<double>(l);
  }
  dot = block_sum(dot);
  if (threadIdx.x == 0) pdot[blockIdx.x] = dot;
}

void check_flat(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D [P], got ", t.dim(), "-D");
  TORCH_CHECK(t.numel() == ref.numel(), op, ": ", name, " has ", t.numel(), " elements, expected ",
              ref.numel());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ",
              ref.device());
}

at::Tensor sgd_step_cuda(const at::Tensor& theta_, const at::Tensor& grad_, const at::Tensor& lr) {
  check_flat("sgd_step", "theta", theta_, theta_);
  check_flat("sgd_step", "grad", grad_, theta_);
  TORCH_CHECK(lr.numel() == 1, "sgd_step: lr must have one element, got ", lr.numel());
  const c10::cuda::CUDAGuard guard(theta_.device());
  const at::Tensor theta = theta_.contiguous(), grad = grad_.contiguous();
  at::Tensor out = at::empty_like(theta);
  const int64_t n = theta.numel();
  if (n == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "sgd_step", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor lr_d =
        lr.reshape({1}).to(theta.device(), c10::CppTypeToScalarType<acc>::value);
    sgd_step_kernel<scalar_t><<<num_blocks(n), kThreads, 0, stream>>>(
        theta.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), lr_d.data_ptr<acc>(),
        out.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> param_match_loss_cuda(const at::Tensor& theta_n_,
                                                         const at::Tensor& target_,
                                                         const at::Tensor& start_) {
  check_flat("param_match_loss", "theta_n", theta_n_, theta_n_);
  check_flat("param_match_loss", "target", target_, theta_n_);
  check_flat("param_match_loss", "start", start_, theta_n_);
  const c10::cuda::CUDAGuard guard(theta_n_.device());
  const at::Tensor theta_n = theta_n_.contiguous(), target = target_.contiguous(),
                   start = start_.contiguous();
  at::Tensor seed = at::empty_like(theta_n);
  const int64_t n = theta_n.numel();
  const int blocks = num_blocks(n);
  auto dopts = theta_n.options().dtype(at::kDouble);
  at::Tensor pnum = at::empty({blocks}, dopts), pden = at::empty({blocks}, dopts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, theta_n.scalar_type(), "param_match_loss", [&] {
        match_sums_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            theta_n.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(),
            start.data_ptr<scalar_t>(), pnum.data_ptr<double>(), pden.data_ptr<double>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  const at::Tensor num = at::sum(pnum), den = at::sum(pden);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, theta_n.scalar_type(), "param_match_seed", [&] {
          match_seed_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
              theta_n.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), den.data_ptr<double>(),
              seed.data_ptr<scalar_t>(), n);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  // A zero denominator gives inf/nan here; the Python front end refuses it before the call.
  return {at::div(num, den).to(theta_n.scalar_type()), seed};
}

std::tuple<at::Tensor, at::Tensor> adjoint_update_cuda(const at::Tensor& lam_,
                                                       const at::Tensor& h_,
                                                       const at::Tensor& g_) {
  check_flat("adjoint_update", "lam", lam_, lam_);
  check_flat("adjoint_update", "h", h_, lam_);
  check_flat("adjoint_update", "g", g_, lam_);
  const c10::cuda::CUDAGuard guard(lam_.device());
  const at::Tensor lam = lam_.contiguous(), h = h_.contiguous(), g = g_.contiguous();
  at::Tensor out = at::empty_like(lam);
  const int64_t n = lam.numel();
  const int blocks = num_blocks(n);
  at::Tensor pdot = at::empty({blocks}, lam.options().dtype(at::kDouble));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, lam.scalar_type(), "adjoint_update", [&] {
        adjoint_update_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            lam.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(), pdot.data_ptr<double>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {out, at::sum(pdot).to(lam.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(hpd_fast, CUDA, m) {
  m.impl("sgd_step", &sgd_step_cuda);
  m.impl("param_match_loss", &param_match_loss_cuda);
  m.impl("adjoint_update", &adjoint_update_cuda);
}

}  // namespace hpd_fast
