// CPU kernels of the flat-parameter operations of trajectory matching
// (see csrc/trajectory_ops.h for the math). Each is one pass over its inputs (param_match_loss:
// one reduction pass, one write pass). Reductions use fixed chunks summed in a fixed order, so
// results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "trajectory_ops.h"

namespace hpd_fast {
namespace {

constexpr int64_t kChunk = 16384;

void check_flat(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D [P], got ", t.dim(), "-D");
  TORCH_CHECK(t.numel() == ref.numel(), op, ": ", name, " has ", t.numel(), " elements, expected ",
              ref.numel());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ",
              ref.device());
}

// Sums f(i) over [0, n) in double: fixed chunks in parallel, chunk totals in order.
template <typename F>
double chunked_sum(int64_t n, const F& f) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(nchunks, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
      double acc = 0;
      for (int64_t i = lo; i < hi; ++i) acc += f(i);
      partial[c] = acc;
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

at::Tensor sgd_step_cpu(const at::Tensor& theta_, const at::Tensor& grad_, const at::Tensor& lr) {
  check_flat("sgd_step", "theta", theta_, theta_);
  check_flat("sgd_step", "grad", grad_, theta_);
  TORCH_CHECK(lr.numel() == 1, "sgd_step: lr must have one element, got ", lr.numel());
  const at::Tensor theta = theta_.contiguous(), grad = grad_.contiguous();
  at::Tensor out = at::empty_like(theta);
  const double lr_v = lr.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "sgd_step", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* tp = theta.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc a = static_cast<acc>(lr_v);
    at::parallel_for(0, theta.numel(), kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        op[i] = static_cast<scalar_t>(
            traj::sgd<acc>(static_cast<acc>(tp[i]), a, static_cast<acc>(gp[i])));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> param_match_loss_cpu(const at::Tensor& theta_n_,
                                                        const at::Tensor& target_,
                                                        const at::Tensor& start_) {
  check_flat("param_match_loss", "theta_n", theta_n_, theta_n_);
  check_flat("param_match_loss", "target", target_, theta_n_);
  check_flat("param_match_loss", "start", start_, theta_n_);
  const at::Tensor theta_n = theta_n_.contiguous(), target = target_.contiguous(),
                   start = start_.contiguous();
  at::Tensor seed = at::empty_like(theta_n);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, theta_n.scalar_type(), "param_match_loss", [&] {
        using acc = acc_t<scalar_t>;
        const scalar_t* np = theta_n.data_ptr<scalar_t>();
        const scalar_t* tp = target.data_ptr<scalar_t>();
        const scalar_t* sp = start.data_ptr<scalar_t>();
        const int64_t n = theta_n.numel();
        // One pass for both sums: interleave them in one chunked reduction.
        const int64_t nchunks = (n + kChunk - 1) / kChunk;
        std::vector<double> pnum(nchunks, 0.0), pden(nchunks, 0.0);
        at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
            double num = 0, den = 0;
            for (int64_t i = lo; i < hi; ++i) {
              traj::match_terms(static_cast<double>(np[i]), static_cast<double>(tp[i]),
                                static_cast<double>(sp[i]), num, den);
            }
            pnum[c] = num;
            pden[c] = den;
          }
        });
        double num = 0, den = 0;
        for (int64_t c = 0; c < nchunks; ++c) {
          num += pnum[c];
          den += pden[c];
        }
        TORCH_CHECK(den > 0, "param_match_loss: start equals target (zero denominator)");
        loss = num / den;
        const acc two_over_den = static_cast<acc>(2.0 / den);
        scalar_t* op = seed.data_ptr<scalar_t>();
        at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            op[i] = static_cast<scalar_t>(traj::adjoint_seed<acc>(
                static_cast<acc>(np[i]), static_cast<acc>(tp[i]), two_over_den));
          }
        });
      });
  return {at::scalar_tensor(loss, theta_n.options()), seed};
}

std::tuple<at::Tensor, at::Tensor> adjoint_update_cpu(const at::Tensor& lam_, const at::Tensor& h_,
                                                      const at::Tensor& g_) {
  check_flat("adjoint_update", "lam", lam_, lam_);
  check_flat("adjoint_update", "h", h_, lam_);
  check_flat("adjoint_update", "g", g_, lam_);
  const at::Tensor lam = lam_.contiguous(), h = h_.contiguous(), g = g_.contiguous();
  at::Tensor out = at::empty_like(lam);
  double dot = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, lam.scalar_type(), "adjoint_update", [&] {
        using acc = acc_t<scalar_t>;
        const scalar_t* lp = lam.data_ptr<scalar_t>();
        const scalar_t* hp = h.data_ptr<scalar_t>();
        const scalar_t* gp = g.data_ptr<scalar_t>();
        scalar_t* op = out.data_ptr<scalar_t>();
        // The update is written inside the reduction pass: one read of each input.
        dot = chunked_sum(lam.numel(), [&](int64_t i) {
          const acc l = static_cast<acc>(lp[i]);
          op[i] = static_cast<scalar_t>(l + static_cast<acc>(hp[i]));
          return static_cast<double>(gp[i]) * static_cast<double>(l);
        });
      });
  return {out, at::scalar_tensor(dot, lam.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(hpd_fast, CPU, m) {
  m.impl("sgd_step", &sgd_step_cpu);
  m.impl("param_match_loss", &param_match_loss_cpu);
  m.impl("adjoint_update", &adjoint_update_cpu);
}

}  // namespace hpd_fast
