// Arithmetic of the flat-parameter operations of trajectory matching, shared by CPU and CUDA.
//
//   sgd_step:          out = theta - lr * grad
//   param_match_loss:  num = sum (theta_n - target)^2, den = sum (start - target)^2,
//                      loss = num / den, seed = (2 / den) (theta_n - target)
//   adjoint_update:    out = lam + h, dot = sum g * lam        (the dot uses the old lam)
// Reductions accumulate in double on every backend.
#pragma once

#include "hpd_common.h"

namespace hpd_fast {
namespace traj {

template <typename acc>
HPD_HD acc sgd(acc theta, acc lr, acc grad) {
  return theta - lr * grad;
}

// Adds one element's terms to the numerator and denominator of the normalized match loss.
HPD_HD void match_terms(double theta_n, double target, double start, double& num, double& den) {
  const double a = theta_n - target;
  const double b = start - target;
  num += a * a;
  den += b * b;
}

template <typename acc>
HPD_HD acc adjoint_seed(acc theta_n, acc target, acc two_over_den) {
  return two_over_den * (theta_n - target);
}

}  // namespace traj
}  // namespace hpd_fast
