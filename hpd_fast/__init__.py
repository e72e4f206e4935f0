"""hpd_fast: fast, exact, memory-lean GAN-prior dataset distillation (H-PD) for PyTorch."""

from hpd_fast import data, experts, generators, models  # noqa: E402  (after the ops are registered)
from hpd_fast._backend import backend_info
from hpd_fast.data import DistillData
from hpd_fast.data import load as load_dataset
from hpd_fast.distill import HPD, DistillResult, trajectory_matching_loss
from hpd_fast.evaluation import evaluate
from hpd_fast.experts import Experts, train_experts
from hpd_fast.experts import load as load_experts
from hpd_fast.ops import (
    ClassMeanAccumulator,
    class_mean_distance,
    class_mean_distance_ref,
    class_means,
    instance_norm_relu_pool,
)
from hpd_fast.params import flatten_params, functional_forward, unflatten_params
from hpd_fast.render import render

__version__ = "0.1.0"

__all__ = [
    "HPD",
    "instance_norm_relu_pool",
    "ClassMeanAccumulator",
    "DistillResult",
    "Experts",
    "experts",
    "flatten_params",
    "functional_forward",
    "generators",
    "load_experts",
    "models",
    "render",
    "train_experts",
    "trajectory_matching_loss",
    "unflatten_params",
    "DistillData",
    "data",
    "evaluate",
    "load_dataset",
    "__version__",
    "backend_info",
    "class_mean_distance",
    "class_mean_distance_ref",
    "class_means",
]
