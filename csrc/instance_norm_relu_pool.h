// Arithmetic of the fused ConvNet block tail, shared by the CPU (.cpp) and CUDA (.cu) kernels:
//
//   instance norm (GroupNorm(C, C) with affine) -> ReLU -> 2x2 average pool (or no pool).
//
// Notation, per (b, c) plane of N = H * W elements (everything in the accumulation type):
//   mean, r = 1 / sqrt(var + eps)         biased variance, like torch.nn.GroupNorm
//   xh_i = (x_i - mean) r                  normalized input (recomputed, never stored)
//   z_i  = w xh_i + b,  scale = w r
//   a_i  = relu(z_i),  y = avgpool2x2(a)   (pool = false: y = a)
//
// Backward, given gy: ga = gy spread over each 2x2 window / 4 (0 for the row/column an odd size
// drops), gz_i = [z_i > 0] ga_i, and with S1 = sum gz, S2 = sum gz xh:
//   gb = S1,  gw = S2,  gx_i = scale (gz_i - S1 / N - xh_i S2 / N)
//
// Double backward: the vector-Jacobian product of (gx, gw, gb) w.r.t. (gy, x, w) with
// cotangents (u = ggx, a = ggw, c = ggb); mean and r are functions of x (total derivative).
// The ReLU mask is piecewise constant, so it contributes nothing. With the plane sums
// U1 = sum u, U2 = sum u xh, U3 = sum u gz and L = <u, gx> + a S2 + c S1:
//   dL/dgz_i = t_i = w r (u_i - U1 / N - xh_i U2 / N) + a xh_i + c
//   g_gy      = avgpool2x2([z > 0] t)                         (pool = false: [z > 0] t)
//   g_w       = r Q,  Q = U3 - S1 U1 / N - S2 U2 / N           (summed over the batch)
//   g_x_i     = r (G_i - mean(G) - xh_i mean(G xh)) - (r^2 xh_i / N) w Q
// where G_i = dL/dxh_i at fixed r = a gz_i - (w r / N)(gz_i U2 + u_i S2), whose means are
//   mean(G) = (a S1 - (w r / N)(S1 U2 + U1 S2)) / N,  mean(G xh) = (a S2 - 2 (w r / N) S2 U2) / N
// and the last term is dL/dr dr/dx_i with dr/dx_i = -r^2 xh_i / N. Collected per plane:
//   t_i   = t_u u_i + t_xh xh_i + t_0
//   g_x_i = k_gz gz_i + k_u u_i + k_xh xh_i + k_0
// (tests check these against torch.autograd on the float64 reference.)
#pragma once

#include "hpd_common.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace hpd_fast {
namespace inrp {

// Sizes of one (b, c) plane: input H x W, output H2 x W2 (H / 2, W / 2 when pooling).
struct PlaneShape {
  int64_t H, W, H2, W2;
  bool pool;
  HPD_HD int64_t n() const { return H * W; }
  HPD_HD int64_t n_out() const { return H2 * W2; }
};

// 1 / sqrt(var + eps) from the centred sum of squares m2 = sum (x - mean)^2.
template <typename acc>
HPD_HD acc inv_std(acc m2, acc inv_n, acc eps) {
  const acc var = m2 * inv_n;
#if defined(__CUDA_ARCH__)
  return acc(1) / sqrt(var + eps);
#else
  return acc(1) / std::sqrt(var + eps);
#endif
}

// Per-plane constants of z = w xh + b (scale = w r, the factor of the input gradient).
template <typename acc>
struct Affine {
  acc mean, rstd, w, b, scale;
};

template <typename acc>
HPD_HD Affine<acc> affine(acc mean, acc rstd, acc w, acc b) {
  return {mean, rstd, w, b, w * rstd};
}

template <typename acc>
HPD_HD acc normalized(acc x, acc mean, acc rstd) {
  return (x - mean) * rstd;
}

// z = w (x - mean) r + b. Normalizing first keeps z accurate near 0 (its sign is the ReLU
// mask) also when |mean| >> std, where x scale + (b - mean scale) would cancel.
template <typename acc>
HPD_HD acc pre_act(acc x, const Affine<acc>& f) {
  return normalized(x, f.mean, f.rstd) * f.w + f.b;
}

// relu(z); NaN passes through like torch.relu.
template <typename acc>
HPD_HD acc relu(acc z) {
  return z < acc(0) ? acc(0) : z;
}

// gz = [z > 0] ga: the gradient reaching z (torch's threshold_backward uses the same test).
template <typename acc>
HPD_HD acc relu_grad(acc z, acc ga) {
#if defined(__CUDA_ARCH__)
  return z > acc(0) ? ga : acc(0);
#else
  // The same select as a bit mask: the CPU compiler vectorizes it, whereas a conditional would
  // keep the floating-point work that produces `ga` behind a branch (it may not speculate it).
  using bits_t = std::conditional_t<sizeof(acc) == 4, uint32_t, uint64_t>;
  bits_t b;
  std::memcpy(&b, &ga, sizeof(b));
  b &= bits_t(0) - static_cast<bits_t>(z > acc(0));
  acc out;
  std::memcpy(&out, &b, sizeof(out));
  return out;
#endif
}

// Average of a 2x2 window from its two column sums (a00 + a10, a01 + a11); times 1/4 rounds
// exactly like a division by 4. The CPU kernel forms column sums a whole row at a time.
template <typename acc>
HPD_HD acc pool_combine(acc left_col, acc right_col) {
  return (left_col + right_col) * acc(0.25);
}

// Average of the window [[a00, a01], [a10, a11]].
template <typename acc>
HPD_HD acc pool4(acc a00, acc a01, acc a10, acc a11) {
  return pool_combine(a00 + a10, a01 + a11);
}

// The share of a pooled output's gradient that reaches each of its four inputs.
template <typename acc>
HPD_HD acc pool_spread(acc gy) {
  return gy * acc(0.25);
}

// ---------------------------------------------------------------------------------- backward

template <typename acc>
struct BackwardCoef {
  acc k_gz, k_xh, k_0;  // gx = k_gz gz + k_xh xh + k_0
};

template <typename acc>
HPD_HD BackwardCoef<acc> backward_coef(acc scale, acc s1, acc s2, acc inv_n) {
  return {scale, -scale * s2 * inv_n, -scale * s1 * inv_n};
}

template <typename acc>
HPD_HD acc backward_input(BackwardCoef<acc> k, acc gz, acc xh) {
  return k.k_gz * gz + k.k_xh * xh + k.k_0;
}

// --------------------------------------------------------------------------- double backward

template <typename acc>
struct DoubleBackwardCoef {
  acc t_u, t_xh, t_0;        // t   = t_u u + t_xh xh + t_0            (dL/dgz)
  acc k_gz, k_u, k_xh, k_0;  // g_x = k_gz gz + k_u u + k_xh xh + k_0
  acc g_w;                   // this plane's share of the weight gradient
};

// Plane sums: s1 = sum gz, s2 = sum gz xh, u1 = sum u, u2 = sum u xh, u3 = sum u gz;
// gw, gb are this channel's cotangents (a, c in the derivation above).
template <typename acc>
HPD_HD DoubleBackwardCoef<acc> double_backward_coef(acc w, acc rstd, acc gw, acc gb, acc s1,
                                                    acc s2, acc u1, acc u2, acc u3, acc inv_n) {
  const acc wr = w * rstd;
  const acc wrn = wr * inv_n;
  const acc q = u3 - (s1 * u1 + s2 * u2) * inv_n;
  const acc mean_g = (gw * s1 - wrn * (s1 * u2 + u1 * s2)) * inv_n;
  const acc mean_gxh = (gw * s2 - acc(2) * wrn * s2 * u2) * inv_n;
  DoubleBackwardCoef<acc> k;
  k.t_u = wr;
  k.t_xh = gw - wrn * u2;
  k.t_0 = gb - wrn * u1;
  k.k_gz = rstd * (gw - wrn * u2);
  k.k_u = -rstd * wrn * s2;
  k.k_xh = -rstd * (mean_gxh + wrn * q);
  k.k_0 = -rstd * mean_g;
  k.g_w = rstd * q;
  return k;
}

template <typename acc>
HPD_HD acc double_backward_t(const DoubleBackwardCoef<acc>& k, acc u, acc xh) {
  return k.t_u * u + k.t_xh * xh + k.t_0;
}

template <typename acc>
HPD_HD acc double_backward_input(const DoubleBackwardCoef<acc>& k, acc gz, acc u, acc xh) {
  return k.k_gz * gz + k.k_u * u + k.k_xh * xh + k.k_0;
}

// ------------------------------------------------------- argument checks (host, CPU and CUDA)

inline PlaneShape checked_shape(const at::Tensor& input, bool pool, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be [B, C, H, W], got ", input.sizes());
  const int64_t H = input.size(2), W = input.size(3);
  TORCH_CHECK(H >= 1 && W >= 1, op, ": input must have H, W >= 1, got ", input.sizes());
  TORCH_CHECK(!pool || (H >= 2 && W >= 2), op, ": pooling needs H, W >= 2, got ", input.sizes());
  return {H, W, pool ? H / 2 : H, pool ? W / 2 : W, pool};
}

// fp64 for fp64 input, else fp32: the dtype of weight, bias, mean, rstd and their gradients.
inline at::ScalarType acc_dtype_of(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_channels(const at::Tensor& t, int64_t C, at::ScalarType acc, const char* op,
                           const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must be [C] with C = ", C,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc,
              " (the accumulation dtype of the input), got ", t.scalar_type());
}

inline void check_stats(const at::Tensor& t, int64_t B, int64_t C, at::ScalarType acc,
                        const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == C, op, ": ", name,
              " must be [B, C] = [", B, ", ", C, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ",
              t.scalar_type());
}

inline void check_like(const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType dtype,
                       const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& input, std::initializer_list<at::Tensor> others,
                              const char* op) {
  for (const at::Tensor& t : others)
    TORCH_CHECK(t.device() == input.device(), op, ": all tensors must be on ", input.device(),
                ", got one on ", t.device());
}

}  // namespace inrp
}  // namespace hpd_fast
