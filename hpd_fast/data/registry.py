"""``load(name, root)``: one entry point for every dataset."""

from __future__ import annotations

import os

import torch

from hpd_fast._checks import check_int
from hpd_fast.data.cifar import load_cifar
from hpd_fast.data.dataset import DistillData
from hpd_fast.data.digits import load_digits
from hpd_fast.data.imagefolder import load_imagefolder, load_imagenet_subset
from hpd_fast.data.subsets import IMAGENET_SUBSETS, SUBSET_ALIASES
from hpd_fast.data.tinyimagenet import load_tinyimagenet
from hpd_fast.data.zca import ZCA, ZCA_REGULARIZATION

__all__ = ["DATASET_NAMES", "load", "whiten"]

DATASET_NAMES: tuple[str, ...] = (
    "digits",
    "cifar10",
    "cifar100",
    "tinyimagenet",
    "imagefolder",
    *IMAGENET_SUBSETS,
)

_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "tiny-imagenet": "tinyimagenet",
    "tiny-imagenet-200": "tinyimagenet",
    **SUBSET_ALIASES,
}


def _cap_per_class(data: DistillData, max_per_class: int) -> DistillData:
    """Keep the first ``max_per_class`` training images of every class (dataset order)."""
    keep = torch.zeros(len(data), dtype=torch.bool)
    for c in range(data.num_classes):
        idx = (data.train_labels == c).nonzero().squeeze(1)[:max_per_class]
        keep[idx] = True
    data.train_images = data.train_images[keep].contiguous()
    data.train_labels = data.train_labels[keep]
    return data


def load(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    resolution: int | None = None,
    max_per_class: int | None = None,
    num_workers: int | None = None,
    zca: bool = False,
    zca_regularization: float = ZCA_REGULARIZATION,
) -> DistillData:
    """Load dataset ``name`` into memory as normalized tensors. Nothing is ever downloaded.

    Names (case-insensitive):
        "digits": scikit-learn's 8x8 handwritten digits, embedded (``root`` is ignored);
            1,438 train / 359 test, 1 channel; see :func:`hpd_fast.data.digits.load_digits`.
        "cifar10", "cifar100": the python-version archives under ``root`` (the
            ``cifar-10-batches-py`` / ``cifar-100-python`` folder or its parent); 32x32.
        "tinyimagenet": Tiny ImageNet (200 classes, 64x64) from the ``tiny-imagenet-200``
            folder under ``root`` (or ``root`` itself); see
            :func:`hpd_fast.data.tinyimagenet.load_tinyimagenet`.
        "imagefolder": class subfolders under ``root`` (``train/<class>``, ``val/<class>``,
            or one split folder); see :func:`hpd_fast.data.imagefolder.load_imagefolder`.
        "imagenette", "imagewoof", "imagemeow", "imagesquawk", "imagefruit", "imageyellow",
            "imagenet-a" ... "imagenet-e": ten ImageNet classes selected by WordNet id from an
            ImageNet-style folder under ``root`` (also accepted: the GLaD/H-PD spellings
            "imagenet-cats", "imagenet-birds", "imagenet-fruits", "imagenet-yellow").

    Args:
        resolution: square image side. Default: native (8 for digits, 32 for CIFAR, 64 for Tiny
            ImageNet) and 128 for image folders. Digits/CIFAR are resized (bilinear,
            antialiased) when it differs.
        max_per_class: keep at most this many training images per class (the first ones in
            file/dataset order); the test split is never capped.
        num_workers: image-decoding threads for folders (default min(8, CPU count)).
        zca: ZCA-whiten both splits with a transform fitted on the training split (after
            ``max_per_class``), as MTT does for CIFAR: see :mod:`hpd_fast.data.zca`. The
            transform is ``data.zca``; refused for images above 64x64 RGB in size.
        zca_regularization: added to the covariance eigenvalues (MTT / kornia: 0.1).

    Returns:
        :class:`DistillData`.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones), bad arguments, or
            malformed files.
        FileNotFoundError: ``root`` or an expected file/folder is missing; the message says
            what was expected where.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if max_per_class is not None:  # numpy integers are ints too
        max_per_class = check_int("max_per_class", max_per_class, 1)
    if not isinstance(zca, bool):
        raise ValueError(f"zca must be True or False, got {zca!r}")
    if isinstance(zca_regularization, bool) or not (
        isinstance(zca_regularization, (int, float)) and zca_regularization > 0
    ):
        raise ValueError(f"zca_regularization must be a number > 0, got {zca_regularization!r}")
    if key == "digits":
        data = load_digits(resolution)
    elif key in ("cifar10", "cifar100"):
        data = load_cifar(key, root, resolution)
    elif key == "tinyimagenet":
        data = load_tinyimagenet(
            root, resolution, max_per_class=max_per_class, num_workers=num_workers
        )
        max_per_class = None  # applied by the folder reader
    elif key == "imagefolder":
        data = load_imagefolder(
            root, resolution, max_per_class=max_per_class, num_workers=num_workers
        )
        max_per_class = None  # applied by the folder reader
    elif key in IMAGENET_SUBSETS:
        data = load_imagenet_subset(
            key, root, resolution, max_per_class=max_per_class, num_workers=num_workers
        )
        max_per_class = None
    else:
        valid = ", ".join([*DATASET_NAMES, *_ALIASES])
        raise ValueError(f"unknown dataset name {name!r}; valid names: {valid}")
    if max_per_class is not None:
        data = _cap_per_class(data, max_per_class)
    return whiten(data, zca_regularization) if zca else data


def whiten(data: DistillData, regularization: float = ZCA_REGULARIZATION) -> DistillData:
    """``data`` with both splits ZCA-whitened by a transform fitted on its training split
    (``data.zca``). Refused (ValueError naming ``zca``) for data already whitened."""
    if data.zca is not None:
        raise ValueError("zca: the dataset is already ZCA-whitened")
    t = ZCA.fit(data.train_images, data.mean, data.std, regularization)
    data.train_images = t.whiten_dataset(data.train_images)
    data.test_images = t.whiten_dataset(data.test_images)
    data.zca = t
    return data
