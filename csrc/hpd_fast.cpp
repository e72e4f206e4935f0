// hpd_fast._C: every operator schema, once. Implementations register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu. Importing the module from Python registers the operators.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A module with no Python functions: `import hpd_fast._C` only loads the library so that the
// static registrations below run. No pybind11, stable ABI.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hpd_fast, m) {
  // Segmented-mean squared distance over a list of layers (CRFD, distribution matching).
  // features[l]: [N, D_l]; labels: int64 [N] in [0, S); targets[l]: [S, D_l] in the
  // accumulation dtype. Returns (dist [S], diff [S, sum_l D_l] = mean - target with the layers
  // side by side, counts [S]); an empty segment has diff 0 and dist 0.
  m.def(
      "class_mean_distance(Tensor[] features, Tensor labels, Tensor[] targets) "
      "-> (Tensor, Tensor, Tensor)");
  // Feature gradient of one layer: out[i, :] = scale[labels[i]] * diff[labels[i], :], in dtype.
  m.def(
      "class_mean_distance_backward(Tensor scale, Tensor diff, Tensor labels, ScalarType dtype) "
      "-> Tensor");

  // Flat-parameter steps of trajectory matching. theta, grad, ...: 1-D [P], one dtype;
  // lr: a one-element tensor. Not differentiable (the sweeps run them without a graph).
  m.def("sgd_step(Tensor theta, Tensor grad, Tensor lr) -> Tensor");
  // (loss = ||theta_n - target||^2 / ||start - target||^2 as a 0-dim tensor,
  //  seed = 2 (theta_n - target) / ||start - target||^2)
  m.def("param_match_loss(Tensor theta_n, Tensor target, Tensor start) -> (Tensor, Tensor)");
  // (lam + h, <g, lam> as a 0-dim tensor)
  m.def("adjoint_update(Tensor lam, Tensor h, Tensor g) -> (Tensor, Tensor)");

  // Fused ConvNet block tail: instance norm (GroupNorm(C, C) with affine) -> ReLU -> 2x2
  // average pool (floor for odd sizes), or no pool when pool = false.
  // input: [B, C, H, W] (fp16/bf16/fp32/fp64); weight, bias: [C] in the accumulation dtype
  // (fp64 for fp64 input, else fp32). Returns (out [B, C, H/2, W/2] or [B, C, H, W] in the
  // input dtype, mean [B, C], rstd [B, C] = 1 / sqrt(var + eps), both accumulation dtype).
  m.def(
      "instance_norm_relu_pool(Tensor input, Tensor weight, Tensor bias, float eps, bool pool) "
      "-> (Tensor, Tensor, Tensor)");
  // (grad_input, grad_weight, grad_bias); mean and rstd must be the forward's statistics of
  // input (the normalized input is recomputed from them); eps is unused by the kernels.
  m.def(
      "instance_norm_relu_pool_backward(Tensor grad_out, Tensor input, Tensor weight, "
      "Tensor bias, Tensor mean, Tensor rstd, float eps, bool pool) -> (Tensor, Tensor, Tensor)");
  // VJP of the backward w.r.t. (grad_out, input, weight), with mean and rstd taken as functions
  // of input, for the cotangents (grad_grad_input, grad_grad_weight, grad_grad_bias) of its
  // three outputs. Returns (grad of grad_out, grad of input, grad of weight).
  m.def(
      "instance_norm_relu_pool_double_backward(Tensor grad_grad_input, Tensor grad_grad_weight, "
      "Tensor grad_grad_bias, Tensor grad_out, Tensor input, Tensor weight, Tensor bias, "
      "Tensor mean, Tensor rstd, float eps, bool pool) -> (Tensor, Tensor, Tensor)");
}
