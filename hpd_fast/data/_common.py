"""Helpers shared by the loaders: normalization, resizing, a seeded stratified split."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["check_resolution", "normalize_", "resize", "stratified_holdout"]


def check_resolution(resolution: int | None, native: int | None = None) -> int | None:
    """Validate a ``resolution`` argument (square side in pixels); None keeps ``native``."""
    if resolution is None:
        return native
    try:
        resolution = operator.index(resolution)
    except TypeError:
        raise ValueError(
            f"resolution must be an int (square side in pixels), got {type(resolution).__name__}"
        ) from None
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    return resolution


def resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Resize float images [N, C, H, W] to [N, C, r, r] (bilinear, antialiased); None: as is."""
    if resolution is None or tuple(x.shape[-2:]) == (resolution, resolution):
        return x
    return F.interpolate(
        x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
    )


def normalize_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place: float32 pixels [N, C, H, W] in [0, 1] -> ``(x - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def stratified_holdout(
    labels: np.ndarray, num_classes: int, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices per class into (train, test) with a fixed seeded permutation.

    The rule, exactly: a ``numpy.random.RandomState(seed)`` draws one permutation of each
    class's sample indices (ascending order), class 0 first; the first
    ``round(test_fraction * n_c)`` indices of class c's permutation are its test samples, the
    rest its training samples. Both returned index arrays are sorted ascending.
    ``RandomState`` is used because its stream is frozen by NumPy's compatibility policy.
    """
    rng = np.random.RandomState(seed)  # noqa: NPY002 (frozen legacy stream, on purpose)
    train, test = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        perm = idx[rng.permutation(idx.size)]
        n_test = round(test_fraction * idx.size)
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
