"""The embedded dataset: scikit-learn's 8x8 handwritten digits (ships offline)."""

from __future__ import annotations

import numpy as np
import torch

from hpd_fast.data._common import check_resolution, normalize_, resize, stratified_holdout
from hpd_fast.data.dataset import DistillData

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "load_digits"]

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def load_digits(resolution: int | None = None) -> DistillData:
    """scikit-learn's handwritten digits as a :class:`DistillData` (no files, no download).

    1,797 grey 8x8 images of the digits 0-9, pixel values 0..16, scaled to [0, 1].

    Split (fixed, see :func:`hpd_fast.data._common.stratified_holdout`): per class, a
    ``numpy.random.RandomState(0)`` permutation; its first ``round(0.2 * n_c)`` images are
    test images. That gives 1,438 training and 359 test images (per class: 139-146 training,
    35-37 test).

    Normalization: the mean and standard deviation of all training pixels (one channel).

    Args:
        resolution: None keeps 8x8; otherwise images are resized (bilinear, antialiased) to
            ``resolution`` x ``resolution`` before normalization.

    Returns:
        DistillData with train_images [1438, 1, r, r], test_images [359, 1, r, r], float32.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    resolution = check_resolution(resolution)
    raw = _sk_load_digits()
    images = np.asarray(raw.images, dtype=np.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    labels = np.asarray(raw.target, dtype=np.int64)
    train_idx, test_idx = stratified_holdout(
        labels, 10, test_fraction=DIGITS_TEST_FRACTION, seed=DIGITS_SPLIT_SEED
    )
    x = resize(torch.from_numpy(images).unsqueeze(1), resolution)
    x_train, x_test = x[torch.from_numpy(train_idx)], x[torch.from_numpy(test_idx)]
    mean = (float(x_train.mean()),)
    std = (float(x_train.std()),)
    return DistillData(
        name="digits",
        train_images=normalize_(x_train.contiguous(), mean, std),
        train_labels=torch.from_numpy(labels[train_idx]),
        test_images=normalize_(x_test.contiguous(), mean, std),
        test_labels=torch.from_numpy(labels[test_idx]),
        class_names=[str(d) for d in range(10)],
        mean=mean,
        std=std,
    )
