"""Helpers shared by the loaders: normalization, resizing, a seeded stratified split."""

from __future__ import annotations

import operator
import os
import stat
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "check_resolution",
    "isdir_checked",
    "normalize_",
    "resize",
    "stratified_holdout",
]


def isdir_checked(path: str | os.PathLike[str]) -> bool:
    """``os.path.isdir`` that reports a permission problem instead of answering "no"."""
    path = os.fspath(path)
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except PermissionError as e:
        raise PermissionError(f"cannot access {path!r}: permission denied") from e
    except OSError:
        return False


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
    labels: np.ndarray,
    num_classes: int,
    test_fraction: float = 0.2,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices per class into (train, test) with a fixed seeded permutation.

    The rule, exactly: a ``numpy.random.RandomState(seed)`` draws one permutation of each
    class's sample indices (ascending order), class 0 first; the first
    ``round(test_fraction * n_c)`` indices of class c's permutation are its test samples, the
    rest its training samples. Both returned index arrays are sorted ascending.
    ``RandomState`` is used because its stream is frozen by NumPy's compatibility policy.

    A class whose share rounds to no test sample (e.g. 20% of 1 or 2 samples) or to all of its
    samples, or that has no sample at all, is refused rather than silently left out of a split.

    Args:
        names: one name per class for error messages (e.g. its folder); default "class c".

    Raises:
        ValueError: naming the class, when one of its two splits would be empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    rng = np.random.RandomState(seed)  # noqa: NPY002 (frozen legacy stream, on purpose)
    train, test = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        perm = idx[rng.permutation(idx.size)]
        n_test = round(test_fraction * idx.size)
        if not 0 < n_test < idx.size:
            what = repr(names[c]) if names is not None else f"class {c}"
            need = next(n for n in range(1, 10**6) if 0 < round(test_fraction * n) < n)
            split = "test" if n_test == 0 else "training"
            raise ValueError(
                f"{what} has {idx.size} sample(s): holding out {test_fraction:.0%} of them "
                f"per class leaves its {split} split empty; it needs at least {need} samples "
                "(or give an explicit test split)"
            )
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
