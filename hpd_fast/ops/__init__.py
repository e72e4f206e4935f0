"""Public fused operators (each with reference, C++ CPU, CUDA and Triton implementations)."""

from hpd_fast.ops.class_mean_distance import (
    ClassMeanAccumulator,
    class_mean_distance,
    class_mean_distance_ref,
    class_means,
)
from hpd_fast.ops.instance_norm_relu_pool import (
    instance_norm_relu_pool,
    instance_norm_relu_pool_ref,
)
from hpd_fast.ops.trajectory_ops import (
    adjoint_update,
    adjoint_update_ref,
    param_match_loss,
    param_match_loss_ref,
    sgd_step,
    sgd_step_ref,
)

__all__ = [
    "ClassMeanAccumulator",
    "class_mean_distance",
    "class_mean_distance_ref",
    "class_means",
    "instance_norm_relu_pool",
    "instance_norm_relu_pool_ref",
    "adjoint_update",
    "adjoint_update_ref",
    "param_match_loss",
    "param_match_loss_ref",
    "sgd_step",
    "sgd_step_ref",
]
