// Arithmetic of the segmented-mean squared distance, shared by CPU and CUDA.
//
//   d_s = sum_j (mean_{i in s} x[i, j] - t[s, j])^2        (0 when segment s is empty)
//   dx[i, j] = scale[s_i] * diff[s_i, j],  scale[s] = 2 g_s / count_s,  diff = mean - t
#pragma once

#include "hpd_common.h"

#include <cstring>

#include <c10/util/BFloat16.h>

namespace hpd_fast {
namespace cmd {

// Load one feature element in the accumulation type.
template <typename acc, typename scalar_t>
HPD_HD acc load(const scalar_t& v) {
  return static_cast<acc>(v);
}
// bf16 -> fp32 is a 16-bit shift; spelled out so the CPU compiler vectorizes the row loops.
template <>
HPD_HD float load<float, c10::BFloat16>(const c10::BFloat16& v) {
#if defined(__CUDA_ARCH__)
  return static_cast<float>(v);
#else
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

// 1 / count, and 0 for an empty segment (its mean is defined as "no contribution").
template <typename acc>
HPD_HD acc inverse_count(int64_t count) {
  return count > 0 ? acc(1) / static_cast<acc>(count) : acc(0);
}

// mean - target from a column sum; an empty segment gives 0 so it adds nothing to d_s.
template <typename acc>
HPD_HD acc centred_mean(acc column_sum, acc inv_count, acc target, bool nonempty) {
  return nonempty ? column_sum * inv_count - target : acc(0);
}

// One element of the feature gradient.
template <typename scalar_t, typename acc>
HPD_HD scalar_t feature_grad(acc scale, acc diff) {
  return static_cast<scalar_t>(scale * diff);
}

}  // namespace cmd
}  // namespace hpd_fast
