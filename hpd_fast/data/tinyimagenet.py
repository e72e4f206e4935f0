"""Tiny ImageNet (200 classes, 64x64) from the folder of the official archive, local files only.

Layout (``tiny-imagenet-200/`` as unpacked; ``root`` may be that folder or its parent)::

    wnids.txt                     the 200 WordNet ids, one per line
    words.txt                     <wnid> TAB <name>, <other name>, ...  (optional: names)
    train/<wnid>/images/*.JPEG    500 training images per class
    val/val_annotations.txt       <file> TAB <wnid> TAB x0 TAB y0 TAB x1 TAB y1
    val/images/*.JPEG             50 validation images per class (the test split here)

Labels follow the sorted WordNet ids -- the order of ``torchvision.datasets.ImageFolder`` on
``train/``, which the published MTT code uses, so its experts' classifier rows line up. The
class name is the first comma-separated name in ``words.txt`` (the WordNet id without it).
``test/`` has no labels and is not read. Images are processed as by
:func:`hpd_fast.data.imagefolder.load_imagefolder` (RGB, shorter side resized to the
resolution, centre crop; ImageNet mean/std, as the published code normalises Tiny ImageNet).
"""

from __future__ import annotations

import os

import torch

from hpd_fast.data._common import check_resolution, isdir_checked, normalize_
from hpd_fast.data.dataset import DistillData
from hpd_fast.data.imagefolder import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _check_max,
    _image_files,
    _load_split,
)

__all__ = ["NUM_CLASSES", "RESOLUTION", "load_tinyimagenet"]

RESOLUTION = 64
NUM_CLASSES = 200
ARCHIVE_FOLDER = "tiny-imagenet-200"


def _read_lines(path: str, what: str) -> list[str]:
    """The lines of a text file; errors name the file and say what it is for."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"Tiny ImageNet: expected {what} at {path!r}") from None
    except PermissionError as e:
        raise PermissionError(f"cannot read {path!r}: permission denied") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} ({what}) is not UTF-8 text: {e}") from None
    except IsADirectoryError:
        raise ValueError(f"{path!r} ({what}) is a folder, expected a text file") from None
    except OSError as e:
        raise OSError(f"cannot read {path!r}: {e}") from e


def _find_root(root: str | os.PathLike[str] | None) -> str:
    if root is None:
        raise ValueError(
            "root is required for 'tinyimagenet': the tiny-imagenet-200 folder (or its parent)"
        )
    root = os.fspath(root)
    if not isdir_checked(root):
        raise FileNotFoundError(f"root {root!r} for 'tinyimagenet' is not a directory")
    inner = os.path.join(root, ARCHIVE_FOLDER)
    if not os.path.exists(os.path.join(root, "wnids.txt")) and isdir_checked(inner):
        return inner
    return root


def _wnids(root: str) -> list[str]:
    path = os.path.join(root, "wnids.txt")
    wnids: list[str] = []
    for n, line in enumerate(_read_lines(path, "the class list wnids.txt"), 1):
        w = line.strip()
        if not w:
            continue
        if any(c.isspace() for c in w) or "/" in w or w.startswith("."):
            raise ValueError(f"{path!r}, line {n}: {line!r} is not a WordNet id")
        if w in wnids:
            raise ValueError(f"{path!r}, line {n}: {w!r} is listed twice")
        wnids.append(w)
    if not wnids:
        raise ValueError(f"{path!r} lists no classes")
    return sorted(wnids)


def _names(root: str, wnids: list[str]) -> list[str]:
    """First name of each class in words.txt (the id itself when the file or entry is absent)."""
    path = os.path.join(root, "words.txt")
    if not os.path.exists(path):
        return list(wnids)
    wanted = set(wnids)
    names: dict[str, str] = {}
    for n, line in enumerate(_read_lines(path, "the class names words.txt"), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{path!r}, line {n}: expected '<wnid>\\t<names>', got {line!r}")
        wnid, text = line.split("\t", 1)
        if wnid in wanted:
            names[wnid] = text.split(",")[0].strip() or wnid
    return [names.get(w, w) for w in wnids]


def _val_files(root: str, wnids: list[str]) -> tuple[list[str], list[int]]:
    """Validation files and labels from val/val_annotations.txt (every class needs one)."""
    val = os.path.join(root, "val")
    ann = os.path.join(val, "val_annotations.txt")
    images = os.path.join(val, "images")
    if not isdir_checked(images):
        raise FileNotFoundError(f"Tiny ImageNet: expected the validation images in {images!r}")
    index = {w: i for i, w in enumerate(wnids)}
    pairs: list[tuple[str, int]] = []
    seen: set[str] = set()
    for n, line in enumerate(_read_lines(ann, "the validation labels val_annotations.txt"), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise ValueError(f"{ann!r}, line {n}: expected '<file>\\t<wnid>\\t...', got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if os.path.basename(name) != name or name.startswith("."):
            raise ValueError(f"{ann!r}, line {n}: {name!r} is not a file name in {images!r}")
        if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{ann!r}, line {n}: {name!r} is not an image file")
        if wnid not in index:
            raise ValueError(f"{ann!r}, line {n}: class {wnid!r} is not in wnids.txt")
        if name in seen:
            raise ValueError(f"{ann!r}, line {n}: {name!r} is labelled twice")
        seen.add(name)
        pairs.append((os.path.join(images, name), index[wnid]))
    counts = [0] * len(wnids)
    for _, c in pairs:
        counts[c] += 1
    empty = [w for w, k in zip(wnids, counts) if k == 0]
    if empty:
        raise ValueError(
            f"{ann!r} labels no validation image of the class(es) {empty[:5]}"
            + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        )
    for path, _ in pairs:
        if not os.path.isfile(path):
            if not os.access(os.path.dirname(path), os.X_OK):
                raise PermissionError(f"cannot access {path!r}: permission denied")
            raise FileNotFoundError(f"{ann!r} lists {path!r}, which does not exist")
    pairs.sort(key=lambda p: (p[1], p[0]))  # by class, then file name
    return [p for p, _ in pairs], [c for _, c in pairs]


def load_tinyimagenet(
    root: str | os.PathLike[str] | None,
    resolution: int | None = None,
    *,
    max_per_class: int | None = None,
    num_workers: int | None = None,
) -> DistillData:
    """Tiny ImageNet's training and validation images, loaded into memory.

    Args:
        root: the ``tiny-imagenet-200`` folder (``wnids.txt``, ``train/``, ``val/``) or the
            folder holding it. Nothing is downloaded.
        resolution: square side in pixels (default 64, the native size).
        max_per_class: keep at most this many training images per class (the first in sorted
            file order); the validation split is not capped.
        num_workers: decoding threads (default min(8, CPU count)).

    Returns:
        DistillData named "tinyimagenet": float32 images [N, 3, r, r] normalised with the
        ImageNet mean/std; 200 classes for the official folder (as many as ``wnids.txt``
        lists), label i = the i-th WordNet id in sorted order; the validation split is the
        test split.

    Raises:
        FileNotFoundError: a missing file or folder, named (``wnids.txt``,
            ``train/<wnid>/images``, ``val/val_annotations.txt``, an image it lists).
        ValueError: a malformed line (file and line number), a folder without images, an
            unreadable or decompression-bomb image (named), bad arguments.
        PermissionError: naming the file or folder that cannot be read.
    """
    root = _find_root(root)
    resolution = check_resolution(resolution, RESOLUTION)
    max_per_class = _check_max(max_per_class)
    wnids = _wnids(root)
    names = _names(root, wnids)
    train = os.path.join(root, "train")
    if not isdir_checked(train):
        raise FileNotFoundError(f"Tiny ImageNet: expected the training folder {train!r}")
    per_class = [_image_files(os.path.join(train, w, "images")) for w in wnids]
    if max_per_class is not None:
        per_class = [fs[:max_per_class] for fs in per_class]
    train_files = [p for fs in per_class for p in fs]
    train_labels = [c for c, fs in enumerate(per_class) for _ in fs]
    test_files, test_labels = _val_files(root, wnids)
    x_train = _load_split(train_files, resolution, num_workers)
    x_test = _load_split(test_files, resolution, num_workers)
    return DistillData(
        name="tinyimagenet",
        train_images=normalize_(x_train, IMAGENET_MEAN, IMAGENET_STD),
        train_labels=torch.tensor(train_labels, dtype=torch.int64),
        test_images=normalize_(x_test, IMAGENET_MEAN, IMAGENET_STD),
        test_labels=torch.tensor(test_labels, dtype=torch.int64),
        class_names=names,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
