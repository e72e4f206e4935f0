"""hpd_fast: fast, exact, memory-lean GAN-prior dataset distillation (H-PD) for PyTorch."""

from hpd_fast import data
from hpd_fast._backend import backend_info
from hpd_fast.data import DistillData
from hpd_fast.data import load as load_dataset
from hpd_fast.evaluation import evaluate
from hpd_fast.ops import (
    ClassMeanAccumulator,
    class_mean_distance,
    class_mean_distance_ref,
    class_means,
)

__version__ = "0.1.0"

__all__ = [
    "ClassMeanAccumulator",
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
