// CUDA kernels of hpd_fast::class_mean_distance (see csrc/class_mean_distance.h for the math).
//
// Same plan as the CPU kernel: rows bucketed by segment (a stable sort on the device), then one
// thread block per (segment, column tile) sums its rows' slice in registers: each warp reads
// 32 * kPerThread consecutive columns of one row at a time (coalesced, in the feature dtype) and
// the block's warps take every kWarps-th row of the segment; the warps' partial sums are then
// added in warp order in shared memory. Per-block partial squares are reduced in a fixed order
// afterwards, so results are deterministic. The grid is one-dimensional (segment * tiles + tile):
// any number of segments launches (grid axis 0 allows 2^31 - 1 blocks).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/diff.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "class_mean_distance.h"

namespace hpd_fast {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kPerThread = 4;
constexpr int kTile = 32 * kPerThread;  // columns per block

// Labels arrive sorted: the range check needs the first and the last. Without it a bad label
// (possible under torch.compile, where the Python check is skipped) would only be dropped from
// every segment; with it the launch fails with a device-side assert naming the condition.
__global__ void cmd_check_sorted_labels_kernel(const int64_t* __restrict__ sorted, int64_t N,
                                               int64_t S) {
  CUDA_KERNEL_ASSERT(sorted[0] >= 0 && "class_mean_distance: a label is negative");
  CUDA_KERNEL_ASSERT(sorted[N - 1] < S && "class_mean_distance: a label is >= num_segments");
}

template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    cmd_fwd_kernel(const scalar_t* __restrict__ x, const acc* __restrict__ target,
                   const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                   acc* __restrict__ diff, acc* __restrict__ partial, int64_t D, int64_t ld_diff,
                   int64_t nblk) {
  const int64_t s = blockIdx.x / nblk;  // once per block
  const int64_t blk = blockIdx.x - s * nblk;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t j0 = blk * kTile + lane;
  const int64_t r0 = offsets[s], r1 = offsets[s + 1];
  acc sum[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) sum[k] = acc(0);
  for (int64_t r = r0 + warp; r < r1; r += kWarps) {
    const scalar_t* row = x + order[r] * D;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = j0 + k * 32;
      if (j < D) sum[k] += cmd::load<acc>(row[j]);
    }
  }
  // Column sums: the warps' partials added in warp order (fixed, so deterministic).
  __shared__ acc col[kWarps][kTile];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) col[warp][lane + k * 32] = sum[k];
  __syncthreads();
  acc sq = 0;
  if (threadIdx.x < kTile) {
    const int64_t j = blk * kTile + threadIdx.x;
    if (j < D) {
      acc total = col[0][threadIdx.x];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) total += col[w][threadIdx.x];
      const acc d = cmd::centred_mean<acc>(total, cmd::inverse_count<acc>(r1 - r0),
                                           target[s * D + j], r1 > r0);
      diff[s * ld_diff + j] = d;
      sq = d * d;
    }
  }
  // Block reduction of the squares: warp shuffles, then one value per warp, in warp order.
  __shared__ acc warp_sums[kWarps];
  for (int off = 16; off > 0; off >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, off);
  if (lane == 0) warp_sums[warp] = sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    partial[blockIdx.x] = total;
  }
}

// index_t: int32 when N * D fits (the element -> (row, column) split is one 32-bit division).
template <typename scalar_t, typename acc, typename index_t>
__global__ void cmd_bwd_kernel(const acc* __restrict__ scale, const acc* __restrict__ diff,
                               const int64_t* __restrict__ labels, scalar_t* __restrict__ out,
                               index_t N, index_t D, int64_t S, int64_t ld) {
  const index_t total = N * D;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const index_t i = e / D, j = e - i * D;
    const int64_t s = labels[i];
    CUDA_KERNEL_ASSERT(s >= 0 && s < S && "class_mean_distance_backward: label out of range");
    out[e] = (s >= 0 && s < S) ? cmd::feature_grad<scalar_t, acc>(scale[s], diff[s * ld + j])
                               : scalar_t(0);  // never read out of bounds (asserts compiled out)
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

  // Bucket rows by segment: segment s holds sorted rows [offsets[s], offsets[s + 1]) (no
  // atomics; a label outside [0, S) falls outside every segment and fails the check kernel).
  auto sorted = at::sort(labels, /*stable=*/true, /*dim=*/0, false);
  const at::Tensor& order = std::get<1>(sorted);
  if (N > 0) {
    cmd_check_sorted_labels_kernel<<<1, 1, 0, stream>>>(std::get<0>(sorted).data_ptr<int64_t>(),
                                                        N, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor offsets =
      at::searchsorted(std::get<0>(sorted), at::arange(S + 1, labels.options()));
  const at::Tensor counts_i = at::diff(offsets);

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
      TORCH_CHECK(S * nblk <= std::numeric_limits<int32_t>::max(), "class_mean_distance (CUDA): ",
                  S, " segments x ", nblk, " column tiles exceed one launch (2^31 - 1 blocks)");
      at::Tensor partial = at::empty({S, nblk}, opts);
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, x.scalar_type(), "class_mean_distance_cuda", [&] {
            using acc = acc_t<scalar_t>;
            TORCH_CHECK(c10::CppTypeToScalarType<acc>::value == acc_dtype,
                        "class_mean_distance: features[", l, "] is ", x.scalar_type(),
                        " but the accumulation dtype is ", acc_dtype);
            cmd_fwd_kernel<scalar_t, acc>
                <<<static_cast<unsigned>(S * nblk), kThreads, 0, stream>>>(
                    x.data_ptr<scalar_t>(), t.data_ptr<acc>(), order.data_ptr<int64_t>(),
                    offsets.data_ptr<int64_t>(), diff.data_ptr<acc>() + col0,
                    partial.data_ptr<acc>(), D, total_cols, nblk);
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
    const int64_t S = dc.size(0);
    if (N * D <= std::numeric_limits<int32_t>::max() - int64_t(65536) * kThreads) {
      cmd_bwd_kernel<scalar_t, acc, int32_t>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              sc.data_ptr<acc>(), dc.data_ptr<acc>(), lab.data_ptr<int64_t>(),
              out.data_ptr<scalar_t>(), static_cast<int32_t>(N), static_cast<int32_t>(D), S, ld);
    } else {
      cmd_bwd_kernel<scalar_t, acc, int64_t>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              sc.data_ptr<acc>(), dc.data_ptr<acc>(), lab.data_ptr<int64_t>(),
              out.data_ptr<scalar_t>(), N, D, S, ld);
    }
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
