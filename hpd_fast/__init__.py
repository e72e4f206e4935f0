"""hpd_fast: fast, exact, memory-lean GAN-prior dataset distillation (H-PD) for PyTorch."""

from hpd_fast._backend import backend_info
from hpd_fast.ops import (
    ClassMeanAccumulator,
    class_mean_distance,
    class_mean_distance_ref,
    class_means,
)

__version__ = "0.1.0"

__all__ = [
    "ClassMeanAccumulator",
    "__version__",
    "backend_info",
    "class_mean_distance",
    "class_mean_distance_ref",
    "class_means",
]
