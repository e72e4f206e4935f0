// Arithmetic of the segmented-mean squared distance, shared by CPU and CUDA.
//
//   d_s = sum_j (mean_{i in s} x[i, j] - t[s, j])^2        (0 when segment s is empty)
//   dx[i, j] = scale[s_i] * diff[s_i, j],  scale[s] = 2 g_s / count_s,  diff = mean - t
#pragma once

#include "hpd_common.h"

namespace hpd_fast {
namespace cmd {

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
