// CPU kernels of hpd_fast::instance_norm_relu_pool and its first and second derivatives
// (see csrc/instance_norm_relu_pool.h for the arithmetic and its derivation).
//
// One at::parallel_for task per (b, c) plane: a plane (H * W values, 1024 at ConvNet-3's first
// block) stays in L1 while it is read two or three times, so every tensor crosses memory once.
// Reductions keep kLanes independent partial sums so the compiler vectorizes them (it may not
// reorder a single floating-point sum), then add the lanes in a fixed order: results do not
// depend on the thread count. Per-channel weight/bias gradients are per-plane partials summed
// over the batch in a fixed order afterwards.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "instance_norm_relu_pool.h"

namespace hpd_fast {
namespace {

using inrp::Affine;
using inrp::PlaneShape;

constexpr int kLanes = 16;  // independent partial sums for one- and two-sum reductions
constexpr int kLanes5 = 8;  // for the five sums of the double backward (register pressure)

template <typename acc, int L>
acc fold(const acc (&part)[L], acc tail) {
  // Pairwise, fixed order.
  acc buf[L];
  for (int k = 0; k < L; ++k) buf[k] = part[k];
  for (int width = L / 2; width > 0; width /= 2)
    for (int k = 0; k < width; ++k) buf[k] += buf[k + width];
  return buf[0] + tail;
}

// Grain (in planes): enough work per task to amortize scheduling.
int64_t plane_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// ------------------------------------------------------------------------------ plane sums

template <typename scalar_t, typename acc = acc_t<scalar_t>>
acc plane_mean(const scalar_t* __restrict__ x, int64_t n) {
  acc part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) part[k] += static_cast<acc>(x[i + k]);
  acc tail = 0;
  for (; i < n; ++i) tail += static_cast<acc>(x[i]);
  return fold(part, tail) / static_cast<acc>(n);
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
acc plane_centred_squares(const scalar_t* __restrict__ x, int64_t n, acc mean) {
  acc part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const acc d = static_cast<acc>(x[i + k]) - mean;
      part[k] += d * d;
    }
  acc tail = 0;
  for (; i < n; ++i) {
    const acc d = static_cast<acc>(x[i]) - mean;
    tail += d * d;
  }
  return fold(part, tail);
}

// ------------------------------------------------------------------------------ the planes

template <typename scalar_t, typename acc = acc_t<scalar_t>>
void forward_plane(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const PlaneShape& p,
                   acc w, acc b, acc eps, acc& mean_out, acc& rstd_out, acc* __restrict__ row) {
  const int64_t n = p.n();
  const acc mean = plane_mean(x, n);
  const acc rstd = inrp::inv_std(plane_centred_squares(x, n, mean), acc(1) / n, eps);
  mean_out = mean;
  rstd_out = rstd;
  const Affine<acc> f = inrp::affine(mean, rstd, w, b);
  if (!p.pool) {
    for (int64_t i = 0; i < n; ++i)
      y[i] = static_cast<scalar_t>(inrp::relu(inrp::pre_act(static_cast<acc>(x[i]), f)));
    return;
  }
  const int64_t w_in = 2 * p.W2;
  for (int64_t oh = 0; oh < p.H2; ++oh) {
    const scalar_t* __restrict__ x0 = x + 2 * oh * p.W;
    const scalar_t* __restrict__ x1 = x0 + p.W;
    // Column sums of the row pair (vectorizes), then neighbouring columns combined.
    for (int64_t j = 0; j < w_in; ++j)
      row[j] = inrp::relu(inrp::pre_act(static_cast<acc>(x0[j]), f)) +
               inrp::relu(inrp::pre_act(static_cast<acc>(x1[j]), f));
    scalar_t* __restrict__ yr = y + oh * p.W2;
    for (int64_t ow = 0; ow < p.W2; ++ow)
      yr[ow] = static_cast<scalar_t>(inrp::pool_combine(row[2 * ow], row[2 * ow + 1]));
  }
}

// gz = [z > 0] * (gy spread over the pooling windows), for the whole plane (0 where pooling
// drops an odd row or column).
template <typename scalar_t, typename acc = acc_t<scalar_t>>
void relu_grad_plane(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                     const PlaneShape& p, Affine<acc> f, acc* __restrict__ gz) {
  if (!p.pool) {
    const int64_t n = p.n();
    for (int64_t i = 0; i < n; ++i)
      gz[i] = inrp::relu_grad(inrp::pre_act(static_cast<acc>(x[i]), f), static_cast<acc>(gy[i]));
    return;
  }
  const int64_t w_in = 2 * p.W2;
  for (int64_t h = 0; h < p.H; ++h) {
    acc* __restrict__ g = gz + h * p.W;
    if (h >= 2 * p.H2) {
      std::fill(g, g + p.W, acc(0));
      continue;
    }
    const scalar_t* __restrict__ xr = x + h * p.W;
    const scalar_t* __restrict__ gyr = gy + (h / 2) * p.W2;
    for (int64_t ow = 0; ow < p.W2; ++ow) {
      const acc ga = inrp::pool_spread(static_cast<acc>(gyr[ow]));
      g[2 * ow] = ga;
      g[2 * ow + 1] = ga;
    }
    for (int64_t j = 0; j < w_in; ++j)
      g[j] = inrp::relu_grad(inrp::pre_act(static_cast<acc>(xr[j]), f), g[j]);
    std::fill(g + w_in, g + p.W, acc(0));
  }
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
void backward_plane(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                    scalar_t* __restrict__ gx, const PlaneShape& p, acc w, acc b, acc mean,
                    acc rstd, acc& gw_part, acc& gb_part, acc* __restrict__ gz) {
  const int64_t n = p.n();
  const Affine<acc> f = inrp::affine(mean, rstd, w, b);
  relu_grad_plane(x, gy, p, f, gz);
  acc p1[kLanes] = {}, p2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const acc g = gz[i + k];
      p1[k] += g;
      p2[k] += g * inrp::normalized(static_cast<acc>(x[i + k]), mean, rstd);
    }
  acc t1 = 0, t2 = 0;
  for (; i < n; ++i) {
    t1 += gz[i];
    t2 += gz[i] * inrp::normalized(static_cast<acc>(x[i]), mean, rstd);
  }
  const acc s1 = fold(p1, t1), s2 = fold(p2, t2);
  gb_part = s1;
  gw_part = s2;
  const inrp::BackwardCoef<acc> k = inrp::backward_coef(f.scale, s1, s2, acc(1) / n);
  for (int64_t j = 0; j < n; ++j)
    gx[j] = static_cast<scalar_t>(
        inrp::backward_input(k, gz[j], inrp::normalized(static_cast<acc>(x[j]), mean, rstd)));
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
void double_backward_plane(const scalar_t* __restrict__ u, acc ggw, acc ggb,
                           const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                           scalar_t* __restrict__ g_gy, scalar_t* __restrict__ g_x,
                           const PlaneShape& p, acc w, acc b, acc mean, acc rstd, acc& gw_part,
                           acc* __restrict__ gz, acc* __restrict__ row) {
  const int64_t n = p.n();
  const Affine<acc> f = inrp::affine(mean, rstd, w, b);
  relu_grad_plane(x, gy, p, f, gz);
  // The five plane sums in one pass.
  acc p1[kLanes5] = {}, p2[kLanes5] = {}, q1[kLanes5] = {}, q2[kLanes5] = {}, q3[kLanes5] = {};
  int64_t i = 0;
  for (; i + kLanes5 <= n; i += kLanes5)
    for (int k = 0; k < kLanes5; ++k) {
      const acc g = gz[i + k];
      const acc uu = static_cast<acc>(u[i + k]);
      const acc xh = inrp::normalized(static_cast<acc>(x[i + k]), mean, rstd);
      p1[k] += g;
      p2[k] += g * xh;
      q1[k] += uu;
      q2[k] += uu * xh;
      q3[k] += uu * g;
    }
  acc t1 = 0, t2 = 0, r1 = 0, r2 = 0, r3 = 0;
  for (; i < n; ++i) {
    const acc g = gz[i];
    const acc uu = static_cast<acc>(u[i]);
    const acc xh = inrp::normalized(static_cast<acc>(x[i]), mean, rstd);
    t1 += g;
    t2 += g * xh;
    r1 += uu;
    r2 += uu * xh;
    r3 += uu * g;
  }
  const inrp::DoubleBackwardCoef<acc> k = inrp::double_backward_coef(
      w, rstd, ggw, ggb, fold(p1, t1), fold(p2, t2), fold(q1, r1), fold(q2, r2), fold(q3, r3),
      acc(1) / n);
  gw_part = k.g_w;
  // g_x, and [z > 0] t in place of gz (each gz[j] is read before it is overwritten).
  for (int64_t j = 0; j < n; ++j) {
    const acc xv = static_cast<acc>(x[j]);
    const acc uu = static_cast<acc>(u[j]);
    const acc xh = inrp::normalized(xv, mean, rstd);
    g_x[j] = static_cast<scalar_t>(inrp::double_backward_input(k, gz[j], uu, xh));
    gz[j] = inrp::relu_grad(inrp::pre_act(xv, f), inrp::double_backward_t(k, uu, xh));
  }
  const acc* __restrict__ mt = gz;
  // g_gy = adjoint of the pool applied to [z > 0] t.
  if (!p.pool) {
    for (int64_t j = 0; j < n; ++j) g_gy[j] = static_cast<scalar_t>(mt[j]);
    return;
  }
  const int64_t w_in = 2 * p.W2;
  for (int64_t oh = 0; oh < p.H2; ++oh) {
    const acc* __restrict__ m0 = mt + 2 * oh * p.W;
    const acc* __restrict__ m1 = m0 + p.W;
    for (int64_t j = 0; j < w_in; ++j) row[j] = m0[j] + m1[j];
    scalar_t* __restrict__ out = g_gy + oh * p.W2;
    for (int64_t ow = 0; ow < p.W2; ++ow)
      out[ow] = static_cast<scalar_t>(inrp::pool_combine(row[2 * ow], row[2 * ow + 1]));
  }
}

// Sum per-plane partials [B, C] over the batch, in a fixed order.
template <typename acc>
void sum_over_batch(const std::vector<acc>& part, int64_t B, int64_t C, acc* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = acc(0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) out[c] += part[b * C + c];
}

// ------------------------------------------------------------------------------ operators

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_cpu(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps,
    bool pool) {
  constexpr const char* op = "instance_norm_relu_pool";
  const PlaneShape p = inrp::checked_shape(input, pool, op);
  const int64_t B = input.size(0), C = input.size(1);
  const at::ScalarType acc_dtype = inrp::acc_dtype_of(input);
  inrp::check_channels(weight, C, acc_dtype, op, "weight");
  inrp::check_channels(bias, C, acc_dtype, op, "bias");
  inrp::check_same_device(input, {weight, bias}, op);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous(), bb = bias.contiguous();
  at::Tensor y = at::empty({B, C, p.H2, p.W2}, x.options());
  at::Tensor mean = at::empty({B, C}, x.options().dtype(acc_dtype));
  at::Tensor rstd = at::empty({B, C}, x.options().dtype(acc_dtype));
  if (B * C == 0) return {y, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inrp_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc* wp = w.data_ptr<acc>();
    const acc* bp = bb.data_ptr<acc>();
    acc* mp = mean.data_ptr<acc>();
    acc* rp = rstd.data_ptr<acc>();
    at::parallel_for(0, B * C, plane_grain(p.n()), [&](int64_t begin, int64_t end) {
      std::vector<acc> row(p.W);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t c = bc % C;
        forward_plane<scalar_t>(xp + bc * p.n(), yp + bc * p.n_out(), p, wp[c], bp[c],
                                static_cast<acc>(eps), mp[bc], rp[bc], row.data());
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_backward_cpu(
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
  const at::Tensor x = input.contiguous(), gy = grad_out.contiguous();
  const at::Tensor w = weight.contiguous(), bb = bias.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty({C}, w.options());
  at::Tensor gb = at::empty({C}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inrp_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const acc* wp = w.data_ptr<acc>();
    const acc* bp = bb.data_ptr<acc>();
    const acc* mp = mc.data_ptr<acc>();
    const acc* rp = rc.data_ptr<acc>();
    std::vector<acc> gw_part(B * C), gb_part(B * C);
    at::parallel_for(0, B * C, plane_grain(p.n()), [&](int64_t begin, int64_t end) {
      std::vector<acc> gz(p.n());
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t c = bc % C;
        backward_plane<scalar_t>(gyp + bc * p.n_out(), xp + bc * p.n(), gxp + bc * p.n(), p,
                                 wp[c], bp[c], mp[bc], rp[bc], gw_part[bc], gb_part[bc],
                                 gz.data());
      }
    });
    sum_over_batch(gw_part, B, C, gw.data_ptr<acc>());
    sum_over_batch(gb_part, B, C, gb.data_ptr<acc>());
  });
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_double_backward_cpu(
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
  const at::Tensor x = input.contiguous(), gy = grad_out.contiguous();
  const at::Tensor u = grad_grad_input.contiguous();
  const at::Tensor w = weight.contiguous(), bb = bias.contiguous();
  const at::Tensor ggw = grad_grad_weight.contiguous(), ggb = grad_grad_bias.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor g_gy = at::empty_like(gy);
  at::Tensor g_x = at::empty_like(x);
  at::Tensor g_w = at::empty({C}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "inrp_dbwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* g_gyp = g_gy.data_ptr<scalar_t>();
    scalar_t* g_xp = g_x.data_ptr<scalar_t>();
    const acc* wp = w.data_ptr<acc>();
    const acc* bp = bb.data_ptr<acc>();
    const acc* ggwp = ggw.data_ptr<acc>();
    const acc* ggbp = ggb.data_ptr<acc>();
    const acc* mp = mc.data_ptr<acc>();
    const acc* rp = rc.data_ptr<acc>();
    std::vector<acc> gw_part(B * C);
    at::parallel_for(0, B * C, plane_grain(p.n()), [&](int64_t begin, int64_t end) {
      std::vector<acc> gz(p.n()), row(p.W);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t c = bc % C;
        double_backward_plane<scalar_t>(up + bc * p.n(), ggwp[c], ggbp[c], gyp + bc * p.n_out(),
                                        xp + bc * p.n(), g_gyp + bc * p.n_out(), g_xp + bc * p.n(),
                                        p, wp[c], bp[c], mp[bc], rp[bc], gw_part[bc], gz.data(),
                                        row.data());
      }
    });
    sum_over_batch(gw_part, B, C, g_w.data_ptr<acc>());
  });
  return {g_gy, g_x, g_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(hpd_fast, CPU, m) {
  m.impl("instance_norm_relu_pool", &instance_norm_relu_pool_cpu);
  m.impl("instance_norm_relu_pool_backward", &instance_norm_relu_pool_backward_cpu);
  m.impl("instance_norm_relu_pool_double_backward", &instance_norm_relu_pool_double_backward_cpu);
}

}  // namespace hpd_fast
