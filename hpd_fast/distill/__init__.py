"""Distillation losses and loops."""

from hpd_fast.distill.crfd import CRFD
from hpd_fast.distill.hpd import ALGORITHMS, HPD, SELECTIONS, NonFiniteLossError
from hpd_fast.distill.losses import dc_loss, dm_loss, gradient_match_distance
from hpd_fast.distill.result import DistillResult
from hpd_fast.distill.trajectory import (
    MODES,
    TrajectorySchedule,
    batch_schedule,
    trajectory_matching_loss,
)

__all__ = [
    "ALGORITHMS",
    "CRFD",
    "HPD",
    "MODES",
    "SELECTIONS",
    "DistillResult",
    "NonFiniteLossError",
    "TrajectorySchedule",
    "batch_schedule",
    "dc_loss",
    "dm_loss",
    "gradient_match_distance",
    "trajectory_matching_loss",
]
