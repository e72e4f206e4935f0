// CUDA kernels of hpd_fast::instance_norm_relu_pool and its first and second derivatives
// (see csrc/instance_norm_relu_pool.h for the arithmetic and its derivation).
//
// One thread block per (b, c) plane. Threads stride over the plane (coalesced) for the plane
// sums, reduce them in registers, warp shuffles and shared memory (a fixed order: results are
// deterministic), then stride again to write the outputs; re-reads of the plane hit L1/L2.
// Per-channel weight/bias gradients are per-plane partials summed over the batch afterwards.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "instance_norm_relu_pool.h"

namespace hpd_fast {
namespace {

using inrp::Affine;
using inrp::PlaneShape;

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;

// Threads per block: the plane size rounded up to whole warps, at most kMaxThreads.
int threads_for(int64_t n) {
  const int64_t t = ((n + 31) / 32) * 32;
  return static_cast<int>(t < kMaxThreads ? t : kMaxThreads);
}

// Sum K values over the block; every thread gets the totals. `red` holds K * kMaxWarps values.
template <typename acc, int K>
__device__ __forceinline__ void block_sum(acc (&v)[K], acc* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    if (lane == 0) red[k * kMaxWarps + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    acc total = 0;
    for (int w = 0; w < nwarps; ++w) total += red[k * kMaxWarps + w];
    v[k] = total;
  }
  __syncthreads();  // `red` may be reused right after
}

// Quotient of two in-plane indices in 32 bits (check_grid caps a plane below 2^31 elements):
// a 64-bit integer division is a long software sequence on the GPU, once per element here.
__device__ __forceinline__ int64_t div32(int64_t a, int64_t b) {
  return static_cast<int32_t>(a) / static_cast<int32_t>(b);
}

template <typename acc, typename scalar_t>
__device__ __forceinline__ acc ld(const scalar_t* p, int64_t i) {
  return static_cast<acc>(p[i]);
}

// gy / 4 of the pooled output whose window holds input element i (0 outside every window).
template <typename acc, typename scalar_t>
__device__ __forceinline__ acc spread_grad(const scalar_t* gy, int64_t i, const PlaneShape& p) {
  if (!p.pool) return ld<acc>(gy, i);
  const int64_t h = div32(i, p.W), w = i - h * p.W;
  if (h >= 2 * p.H2 || w >= 2 * p.W2) return acc(0);
  return inrp::pool_spread(ld<acc>(gy, (h >> 1) * p.W2 + (w >> 1)));
}

template <typename scalar_t, typename acc>
__global__ void inrp_fwd_kernel(const scalar_t* __restrict__ x, const acc* __restrict__ weight,
                                const acc* __restrict__ bias, acc eps, scalar_t* __restrict__ y,
                                acc* __restrict__ mean_out, acc* __restrict__ rstd_out, int64_t C,
                                PlaneShape p) {
  __shared__ acc red[kMaxWarps];
  const int64_t bc = blockIdx.x, c = bc % C, n = p.n(), n_out = p.n_out();
  const scalar_t* xp = x + bc * n;
  acc s[1] = {acc(0)};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s[0] += ld<acc>(xp, i);
  block_sum<acc, 1>(s, red);
  const acc mean = s[0] / static_cast<acc>(n);
  acc m2[1] = {acc(0)};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc d = ld<acc>(xp, i) - mean;
    m2[0] += d * d;
  }
  block_sum<acc, 1>(m2, red);
  const acc rstd = inrp::inv_std(m2[0], acc(1) / static_cast<acc>(n), eps);
  if (threadIdx.x == 0) {
    mean_out[bc] = mean;
    rstd_out[bc] = rstd;
  }
  const Affine<acc> f = inrp::affine(mean, rstd, weight[c], bias[c]);
  scalar_t* yp = y + bc * n_out;
  for (int64_t o = threadIdx.x; o < n_out; o += blockDim.x) {
    if (p.pool) {
      const int64_t oh = div32(o, p.W2), ow = o - oh * p.W2;
      const int64_t e = 2 * oh * p.W + 2 * ow;
      const acc a00 = inrp::relu(inrp::pre_act(ld<acc>(xp, e), f));
      const acc a01 = inrp::relu(inrp::pre_act(ld<acc>(xp, e + 1), f));
      const acc a10 = inrp::relu(inrp::pre_act(ld<acc>(xp, e + p.W), f));
      const acc a11 = inrp::relu(inrp::pre_act(ld<acc>(xp, e + p.W + 1), f));
      yp[o] = static_cast<scalar_t>(inrp::pool4(a00, a01, a10, a11));
    } else {
      yp[o] = static_cast<scalar_t>(inrp::relu(inrp::pre_act(ld<acc>(xp, o), f)));
    }
  }
}

template <typename scalar_t, typename acc>
__global__ void inrp_bwd_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                const acc* __restrict__ weight, const acc* __restrict__ bias,
                                const acc* __restrict__ mean_in, const acc* __restrict__ rstd_in,
                                scalar_t* __restrict__ gx, acc* __restrict__ gw_part,
                                acc* __restrict__ gb_part, int64_t C, PlaneShape p) {
  __shared__ acc red[2 * kMaxWarps];
  const int64_t bc = blockIdx.x, c = bc % C, n = p.n();
  const scalar_t* xp = x + bc * n;
  const scalar_t* gyp = gy + bc * p.n_out();
  const acc mean = mean_in[bc], rstd = rstd_in[bc];
  const Affine<acc> f = inrp::affine(mean, rstd, weight[c], bias[c]);
  acc s[2] = {acc(0), acc(0)};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc xv = ld<acc>(xp, i);
    const acc gz = inrp::relu_grad(inrp::pre_act(xv, f), spread_grad<acc>(gyp, i, p));
    s[0] += gz;
    s[1] += gz * inrp::normalized(xv, mean, rstd);
  }
  block_sum<acc, 2>(s, red);
  if (threadIdx.x == 0) {
    gb_part[bc] = s[0];
    gw_part[bc] = s[1];
  }
  const inrp::BackwardCoef<acc> k =
      inrp::backward_coef(f.scale, s[0], s[1], acc(1) / static_cast<acc>(n));
  scalar_t* gxp = gx + bc * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc xv = ld<acc>(xp, i);
    const acc gz = inrp::relu_grad(inrp::pre_act(xv, f), spread_grad<acc>(gyp, i, p));
    gxp[i] = static_cast<scalar_t>(inrp::backward_input(k, gz, inrp::normalized(xv, mean, rstd)));
  }
}

template <typename scalar_t, typename acc>
__device__ __forceinline__ acc masked_t(const scalar_t* xp, const scalar_t* up, int64_t e,
                                        const inrp::DoubleBackwardCoef<acc>& k, Affine<acc> f,
                                        acc mean, acc rstd) {
  const acc xv = ld<acc>(xp, e);
  const acc t = inrp::double_backward_t(k, ld<acc>(up, e), inrp::normalized(xv, mean, rstd));
  return inrp::relu_grad(inrp::pre_act(xv, f), t);
}

template <typename scalar_t, typename acc>
__global__ void inrp_dbwd_kernel(const scalar_t* __restrict__ u, const acc* __restrict__ ggw,
                                 const acc* __restrict__ ggb, const scalar_t* __restrict__ gy,
                                 const scalar_t* __restrict__ x, const acc* __restrict__ weight,
                                 const acc* __restrict__ bias, const acc* __restrict__ mean_in,
                                 const acc* __restrict__ rstd_in, scalar_t* __restrict__ g_gy,
                                 scalar_t* __restrict__ g_x, acc* __restrict__ gw_part, int64_t C,
                                 PlaneShape p) {
  __shared__ acc red[5 * kMaxWarps];
  const int64_t bc = blockIdx.x, c = bc % C, n = p.n(), n_out = p.n_out();
  const scalar_t* xp = x + bc * n;
  const scalar_t* up = u + bc * n;
  const scalar_t* gyp = gy + bc * n_out;
  const acc mean = mean_in[bc], rstd = rstd_in[bc], w = weight[c];
  const Affine<acc> f = inrp::affine(mean, rstd, w, bias[c]);
  acc s[5] = {acc(0), acc(0), acc(0), acc(0), acc(0)};  // S1, S2, U1, U2, U3
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc xv = ld<acc>(xp, i), uv = ld<acc>(up, i);
    const acc gz = inrp::relu_grad(inrp::pre_act(xv, f), spread_grad<acc>(gyp, i, p));
    const acc xh = inrp::normalized(xv, mean, rstd);
    s[0] += gz;
    s[1] += gz * xh;
    s[2] += uv;
    s[3] += uv * xh;
    s[4] += uv * gz;
  }
  block_sum<acc, 5>(s, red);
  const inrp::DoubleBackwardCoef<acc> k = inrp::double_backward_coef(
      w, rstd, ggw[c], ggb[c], s[0], s[1], s[2], s[3], s[4], acc(1) / static_cast<acc>(n));
  if (threadIdx.x == 0) gw_part[bc] = k.g_w;
  scalar_t* gxp = g_x + bc * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc xv = ld<acc>(xp, i);
    const acc gz = inrp::relu_grad(inrp::pre_act(xv, f), spread_grad<acc>(gyp, i, p));
    gxp[i] = static_cast<scalar_t>(
        inrp::double_backward_input(k, gz, ld<acc>(up, i), inrp::normalized(xv, mean, rstd)));
  }
  scalar_t* ggp = g_gy + bc * n_out;
  for (int64_t o = threadIdx.x; o < n_out; o += blockDim.x) {
    if (p.pool) {
      const int64_t oh = div32(o, p.W2), ow = o - oh * p.W2;
      const int64_t e = 2 * oh * p.W + 2 * ow;
      ggp[o] = static_cast<scalar_t>(inrp::pool4(masked_t(xp, up, e, k, f, mean, rstd),
                                                 masked_t(xp, up, e + 1, k, f, mean, rstd),
                                                 masked_t(xp, up, e + p.W, k, f, mean, rstd),
                                                 masked_t(xp, up, e + p.W + 1, k, f, mean, rstd)));
    } else {
      ggp[o] = static_cast<scalar_t>(masked_t(xp, up, o, k, f, mean, rstd));
    }
  }
}

void check_grid(int64_t planes, const PlaneShape& p, const char* op) {
  TORCH_CHECK(planes <= 2147483647LL, op, " (CUDA): at most 2^31 - 1 (b, c) planes, got ",
              planes);
  TORCH_CHECK(p.n() <= 2147483647LL, op, " (CUDA): at most 2^31 - 1 elements per plane, got ",
              p.n());
}

// ------------------------------------------------------------------------------ operators

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_cuda(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps,
    bool pool) {
  constexpr const char* op = "instance_norm_relu_pool";
  const PlaneShape p = inrp::checked_shape(input, pool, op);
  const int64_t B = input.size(0), C = input.size(1);
  const at::ScalarType acc_dtype = inrp::acc_dtype_of(input);
  inrp::check_channels(weight, C, acc_dtype, op, "weight");
  inrp::check_channels(bias, C, acc_dtype, op, "bias");
  inrp::check_same_device(input, {weight, bias}, op);
  check_grid(B * C, p, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous(), bb = bias.contiguous();
  at::Tensor y = at::empty({B, C, p.H2, p.W2}, x.options());
  at::Tensor mean = at::empty({B, C}, x.options().dtype(acc_dtype));
  at::Tensor rstd = at::empty({B, C}, x.options().dtype(acc_dtype));
  if (B * C == 0) return {y, mean, rstd};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inrp_fwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    inrp_fwd_kernel<scalar_t, acc>
        <<<static_cast<unsigned>(B * C), threads_for(p.n()), 0, stream>>>(
            x.data_ptr<scalar_t>(), w.data_ptr<acc>(), bb.data_ptr<acc>(), static_cast<acc>(eps),
            y.data_ptr<scalar_t>(), mean.data_ptr<acc>(), rstd.data_ptr<acc>(), C, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd, double /*eps*/,
    bool pool) {
  constexpr const char* op = "instance_norm_relu_pool_backward";
  const PlaneShape p = inrp::checked_shape(input, pool, op);
  const int64_t B = input.size(0), C = input.size(1);
  const at::ScalarType acc_dtype = inrp::acc_dtype_of(input);
  inrp::check_channels(weight, C, acc_dtype, op, "weight");
  inrp::check_channels(bias, C, acc_dtype, op, "bias");
  inrp::check_stats(mean, B, C, acc_dtype, op, "mean");
  inrp::check_stats(rstd, B, C, acc_dtype, op, "rstd");
  inrp::check_like(grad_out, {B, C, p.H2, p.W2}, input.scalar_type(), op, "grad_out");
  inrp::check_same_device(input, {grad_out, weight, bias, mean, rstd}, op);
  check_grid(B * C, p, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), gy = grad_out.contiguous();
  const at::Tensor w = weight.contiguous(), bb = bias.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw_part = at::zeros({B, C}, w.options());
  at::Tensor gb_part = at::zeros({B, C}, w.options());
  if (B * C > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "inrp_bwd_cuda", [&] {
          using acc = acc_t<scalar_t>;
          inrp_bwd_kernel<scalar_t, acc>
              <<<static_cast<unsigned>(B * C), threads_for(p.n()), 0, stream>>>(
                  gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<acc>(),
                  bb.data_ptr<acc>(), mc.data_ptr<acc>(), rc.data_ptr<acc>(),
                  gx.data_ptr<scalar_t>(), gw_part.data_ptr<acc>(), gb_part.data_ptr<acc>(), C, p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {gx, at::sum(gw_part, {0}), at::sum(gb_part, {0})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_double_backward_cuda(
    const at::Tensor& grad_grad_input, const at::Tensor& grad_grad_weight,
    const at::Tensor& grad_grad_bias, const at::Tensor& grad_out, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& rstd, double /*eps*/, bool pool) {
  constexpr const char* op = "instance_norm_relu_pool_double_backward";
  const PlaneShape p = inrp::checked_shape(input, pool, op);
  const int64_t B = input.size(0), C = input.size(1);
  const at::ScalarType acc_dtype = inrp::acc_dtype_of(input);
  inrp::check_channels(weight, C, acc_dtype, op, "weight");
  inrp::check_channels(bias, C, acc_dtype, op, "bias");
  inrp::check_channels(grad_grad_weight, C, acc_dtype, op, "grad_grad_weight");
  inrp::check_channels(grad_grad_bias, C, acc_dtype, op, "grad_grad_bias");
  inrp::check_stats(mean, B, C, acc_dtype, op, "mean");
  inrp::check_stats(rstd, B, C, acc_dtype, op, "rstd");
  inrp::check_like(grad_out, {B, C, p.H2, p.W2}, input.scalar_type(), op, "grad_out");
  inrp::check_like(grad_grad_input, input.sizes(), input.scalar_type(), op, "grad_grad_input");
  inrp::check_same_device(input, {grad_grad_input, grad_grad_weight, grad_grad_bias, grad_out,
                                  weight, bias, mean, rstd}, op);
  check_grid(B * C, p, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), gy = grad_out.contiguous();
  const at::Tensor u = grad_grad_input.contiguous();
  const at::Tensor w = weight.contiguous(), bb = bias.contiguous();
  const at::Tensor ggw = grad_grad_weight.contiguous(), ggb = grad_grad_bias.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor g_gy = at::empty_like(gy);
  at::Tensor g_x = at::empty_like(x);
  at::Tensor gw_part = at::zeros({B, C}, w.options());
  if (B * C > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "inrp_dbwd_cuda", [&] {
          using acc = acc_t<scalar_t>;
          inrp_dbwd_kernel<scalar_t, acc>
              <<<static_cast<unsigned>(B * C), threads_for(p.n()), 0, stream>>>(
                  u.data_ptr<scalar_t>(), ggw.data_ptr<acc>(), ggb.data_ptr<acc>(),
                  gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<acc>(),
                  bb.data_ptr<acc>(), mc.data_ptr<acc>(), rc.data_ptr<acc>(),
                  g_gy.data_ptr<scalar_t>(), g_x.data_ptr<scalar_t>(), gw_part.data_ptr<acc>(),
                  C, p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {g_gy, g_x, at::sum(gw_part, {0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(hpd_fast, CUDA, m) {
  m.impl("instance_norm_relu_pool", &instance_norm_relu_pool_cuda);
  m.impl("instance_norm_relu_pool_backward", &instance_norm_relu_pool_backward_cuda);
  m.impl("instance_norm_relu_pool_double_backward", &instance_norm_relu_pool_double_backward_cuda);
}

}  // namespace hpd_fast
