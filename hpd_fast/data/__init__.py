"""Datasets as in-memory normalized tensors: the embedded digits, CIFAR-10/100, image folders
and ImageNet subsets. Nothing is downloaded; every loader reads local files only."""

from hpd_fast.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from hpd_fast.data.dataset import DistillData
from hpd_fast.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from hpd_fast.data.registry import DATASET_NAMES, load
from hpd_fast.data.subsets import IMAGENET_SUBSETS, subset_classes

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENET_SUBSETS",
    "DistillData",
    "load",
    "subset_classes",
]
