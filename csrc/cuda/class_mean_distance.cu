// CUDA kernels of hpd_fast::class_mean_distance (see csrc/class_mean_distance.h for the math).
//
// Same plan as the CPU kernel: rows bucketed by segment (a stable sort on the device), then one
// thread block per (column tile, segment) sums its rows' slice in registers; each feature element
// is read once, coalesced, in its own dtype. Per-block partial squares are reduced in a fixed
// order afterwards, so results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "class_mean_distance.h"

namespace hpd_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int kTile = kThreads * kPerThread;  // columns per block

template <typename scalar_t, typename acc>
__global__ void cmd_fwd_kernel(const scalar_t* __restrict__ x, const acc* __restrict__ target,
                               const int64_t* __restrict__ order,
                               const int64_t* __restrict__ offsets, acc* __restrict__ diff,
                               acc* __restrict__ partial, int64_t D, int64_t ld_diff) {
  const int64_t s = blockIdx.y;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t r0 = offsets[s], r1 = offsets[s + 1];
  acc sum[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) sum[k] = acc(0);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + order[r] * D;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = j0 + k * kThreads;
      if (j < D) sum[k] += static_cast<acc>(row[j]);
    }
  }
  const acc inv = cmd::inverse_count<acc>(r1 - r0);
  const bool nonempty = r1 > r0;
  acc sq = 0;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t j = j0 + k * kThreads;
    if (j < D) {
      const acc d = cmd::centred_mean<acc>(sum[k], inv, target[s * D + j], nonempty);
      diff[s * ld_diff + j] = d;
      sq += d * d;
    }
  }
  // Block reduction of the squares: warp shuffles, then one value per warp.
  __shared__ acc warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    partial[s * gridDim.x + blockIdx.x] = total;
  }
}

template <typename scalar_t, typename acc>
__global__ void cmd_bwd_kernel(const acc* __restrict__ scale, const acc* __restrict__ diff,
                               const int64_t* __restrict__ labels, scalar_t* __restrict__ out,
                               int64_t N, int64_t D, int64_t ld) {
  const int64_t total = N * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t i = e / D, j = e - i * D;
    const int64_t s = labels[i];
    out[e] = cmd::feature_grad<scalar_t, acc>(scale[s], diff[s * ld + j]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_mean_distance_cuda(
    at::TensorList features, const at::Tensor& labels, at::TensorList targets) {
  TORCH_CHECK(!features.empty(), "class_mean_distance: features is empty");
  TORCH_CHECK(features.size() == targets.size(), "class_mean_distance: ", features.size(),
              " feature layers but ", targets.size(), " targets");
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong,
              "class_mean_distance: labels must be a 1-D int64 tensor");
  const c10::cuda::CUDAGuard guard(labels.device());
  const int64_t N = labels.size(0);
  const int64_t S = targets[0].size(0);
  const at::ScalarType acc_dtype = targets[0].scalar_type();
  TORCH_CHECK(acc_dtype == at::kFloat || acc_dtype == at::kDouble,
              "class_mean_distance: targets must be float32 or float64 (the accumulation dtype)");
  auto opts = targets[0].options();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Bucket rows by segment. Labels were range-checked by the Python front end.
  at::Tensor order = std::get<1>(at::sort(labels, /*stable=*/true, /*dim=*/0, false));
  at::Tensor counts_i = at::zeros({S}, labels.options());
  counts_i.scatter_add_(0, labels, at::ones_like(labels));
  at::Tensor offsets = at::zeros({S + 1}, labels.options());
  offsets.narrow(0, 1, S).copy_(at::cumsum(counts_i, 0));

  at::Tensor dist = at::zeros({S}, opts);
  int64_t total_cols = 0;
  for (const at::Tensor& f : features) total_cols += f.dim() == 2 ? f.size(1) : 0;
  at::Tensor diff = at::empty({S, total_cols}, opts);
  int64_t col0 = 0;
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor x = features[l].contiguous();
    const at::Tensor t = targets[l].contiguous();
    TORCH_CHECK(x.dim() == 2 && x.size(0) == N, "class_mean_distance: features[", l,
                "] must be [N, D] with N = ", N);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == S && t.size(1) == x.size(1),
                "class_mean_distance: targets[", l, "] must be [", S, ", ", x.size(1), "]");
    TORCH_CHECK(t.scalar_type() == acc_dtype, "class_mean_distance: targets[", l,
                "] must have the dtype of targets[0]");
    const int64_t D = x.size(1);
    if (D > 0 && S > 0) {
      const int64_t nblk = (D + kTile - 1) / kTile;
      TORCH_CHECK(S <= 65535, "class_mean_distance (CUDA): at most 65535 segments");
      at::Tensor partial = at::empty({S, nblk}, opts);
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, x.scalar_type(), "class_mean_distance_cuda", [&] {
            using acc = acc_t<scalar_t>;
            TORCH_CHECK(c10::CppTypeToScalarType<acc>::value == acc_dtype,
                        "class_mean_distance: features[", l, "] is ", x.scalar_type(),
                        " but the accumulation dtype is ", acc_dtype);
            dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(S));
            cmd_fwd_kernel<scalar_t, acc><<<grid, kThreads, 0, stream>>>(
                x.data_ptr<scalar_t>(), t.data_ptr<acc>(), order.data_ptr<int64_t>(),
                offsets.data_ptr<int64_t>(), diff.data_ptr<acc>() + col0, partial.data_ptr<acc>(), D,
                total_cols);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
      dist.add_(at::sum(partial, {1}));
    }
    col0 += D;
  }
  return {dist, diff, counts_i.to(acc_dtype)};
}

at::Tensor class_mean_distance_backward_cuda(const at::Tensor& scale, const at::Tensor& diff,
                                             const at::Tensor& labels, at::ScalarType dtype) {
  TORCH_CHECK(diff.dim() == 2, "class_mean_distance_backward: diff must be [S, D]");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == diff.size(0),
              "class_mean_distance_backward: scale must be [S]");
  TORCH_CHECK(scale.scalar_type() == diff.scalar_type(),
              "class_mean_distance_backward: scale and diff dtypes differ");
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong,
              "class_mean_distance_backward: labels must be a 1-D int64 tensor");
  const c10::cuda::CUDAGuard guard(diff.device());
  const int64_t N = labels.size(0), D = diff.size(1);
  at::Tensor out = at::empty({N, D}, diff.options().dtype(dtype));
  if (N == 0 || D == 0) return out;
  const at::Tensor lab = labels.contiguous();
  // A column slice of the forward's side-by-side diff is fine as is: rows need unit stride only.
  const at::Tensor dc = diff.stride(1) == 1 ? diff : diff.contiguous();
  const int64_t ld = dc.stride(0);
  const at::Tensor sc = scale.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cmd_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    TORCH_CHECK(c10::CppTypeToScalarType<acc>::value == diff.scalar_type(),
                "class_mean_distance_backward: diff dtype does not match ", dtype);
    const int64_t blocks = std::min<int64_t>((N * D + kThreads - 1) / kThreads, 65536);
    cmd_bwd_kernel<scalar_t, acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        sc.data_ptr<acc>(), dc.data_ptr<acc>(), lab.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), N, D, ld);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hpd_fast, CUDA, m) {
  m.impl("class_mean_distance", &class_mean_distance_cuda);
  m.impl("class_mean_distance_backward", &class_mean_distance_backward_cuda);
}

}  // namespace hpd_fast
