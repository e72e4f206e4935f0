"""CIFAR-10 and CIFAR-100 from the local "python version" archives (nothing is downloaded)."""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch

from hpd_fast.data._common import check_resolution, normalize_, resize
from hpd_fast.data.dataset import DistillData

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "load_cifar"]

# The constants used throughout the dataset-distillation literature (DC/DSA/DM, MTT, GLaD).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4866, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_SPECS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "names_key": b"label_names",
        "num_classes": 10,
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
    },
    "cifar100": {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "names_key": b"fine_label_names",
        "num_classes": 100,
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
    },
}


def _find_folder(root: str | os.PathLike[str], spec: dict[str, Any]) -> str:
    """The archive folder: ``root`` itself or ``root/<folder>``."""
    root = os.fspath(root)
    first = spec["train"][0]
    for cand in (root, os.path.join(root, spec["folder"])):
        if os.path.isfile(os.path.join(cand, first)):
            return cand
    raise FileNotFoundError(
        f"expected {spec['folder']}/{first} under {root!r} (the python version of "
        f"{spec['title']}; root may also be the {spec['folder']} folder itself); nothing is "
        "downloaded"
    )


def _unpickle(path: str, title: str) -> dict[Any, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected {title} file {path!r}; nothing is downloaded")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # unpickling raises many types on corrupt input
        raise ValueError(f"{path!r} is not a readable {title} pickle: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} should hold a dict, holds {type(obj).__name__}")
    # Archives written by Python 3 may use str keys; accept both.
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def _read_batches(
    folder: str, files: list[str], spec: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 3, 32, 32] and int64 labels [N] from the listed batch files."""
    xs, ys = [], []
    for name in files:
        path = os.path.join(folder, name)
        d = _unpickle(path, spec["title"])
        if b"data" not in d or spec["label_key"] not in d:
            raise ValueError(
                f"{path!r} lacks key b'data' or {spec['label_key']!r} (keys: {sorted(d)[:6]})"
            )
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[spec["label_key"]], dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path!r}: b'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}"
            )
        if labels.shape[0] != data.shape[0]:
            raise ValueError(f"{path!r}: {data.shape[0]} images but {labels.shape[0]} labels")
        k = spec["num_classes"]
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"{path!r}: labels must lie in [0, {k})")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _to_float(x: np.ndarray, resolution: int | None) -> torch.Tensor:
    t = torch.from_numpy(x).to(torch.float32).div_(255.0)
    return resize(t, resolution).contiguous()


def load_cifar(
    name: str, root: str | os.PathLike[str] | None, resolution: int | None = None
) -> DistillData:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels) from ``root``.

    ``root`` is the folder of the python-version archive (``cifar-10-batches-py`` with
    ``data_batch_1..5``, ``test_batch``, ``batches.meta``; ``cifar-100-python`` with ``train``,
    ``test``, ``meta``) or its parent. Pixels are scaled to [0, 1] and normalized with the fixed
    constants of the distillation literature (:data:`CIFAR10_MEAN`/``_STD``,
    :data:`CIFAR100_MEAN`/``_STD``), not statistics of the files.

    Args:
        resolution: None keeps 32x32; otherwise images are resized (bilinear, antialiased).

    Returns:
        DistillData with float32 images [N, 3, r, r] (50,000 train / 10,000 test for the full
        archives).

    Raises:
        FileNotFoundError: root missing or a file absent (the message says what was expected).
        ValueError: a file that is not a CIFAR pickle of the expected layout.
    """
    spec = _SPECS[name]
    resolution = check_resolution(resolution)
    if root is None:
        raise ValueError(
            f"root is required for {name!r}: the folder holding {spec['folder']}/ (the python "
            f"version of {spec['title']}); nothing is downloaded"
        )
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"root {os.fspath(root)!r} for {name!r} is not a directory; expected it to hold "
            f"{spec['folder']}/ (the python version of {spec['title']}); nothing is downloaded"
        )
    folder = _find_folder(root, spec)
    x_train, y_train = _read_batches(folder, spec["train"], spec)
    x_test, y_test = _read_batches(folder, spec["test"], spec)
    meta_path = os.path.join(folder, spec["meta"])
    meta = _unpickle(meta_path, spec["title"])
    names = meta.get(spec["names_key"])
    if names is None or len(names) != spec["num_classes"]:
        raise ValueError(
            f"{meta_path!r}: expected {spec['num_classes']} names under {spec['names_key']!r}"
        )
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    mean, std = spec["mean"], spec["std"]
    return DistillData(
        name=name,
        train_images=normalize_(_to_float(x_train, resolution), mean, std),
        train_labels=torch.from_numpy(y_train),
        test_images=normalize_(_to_float(x_test, resolution), mean, std),
        test_labels=torch.from_numpy(y_test),
        class_names=class_names,
        mean=mean,
        std=std,
    )
