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

__all__ = [
    "ClassMeanAccumulator",
    "class_mean_distance",
    "class_mean_distance_ref",
    "class_means",
    "instance_norm_relu_pool",
    "instance_norm_relu_pool_ref",
]
