"""Image folders (class subfolders of PNG/JPEG files), including ImageNet subsets by WordNet id."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from hpd_fast._checks import check_int
from hpd_fast.data._common import check_resolution, isdir_checked, normalize_, stratified_holdout
from hpd_fast.data.dataset import DistillData
from hpd_fast.data.subsets import SUBSET_ALIASES, subset_classes

__all__ = [
    "DEFAULT_RESOLUTION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "load_imagefolder",
    "load_imagenet_subset",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # matched case-insensitively (ImageNet: .JPEG)
DEFAULT_RESOLUTION = 128
TEST_SPLIT_NAMES = ("val", "test")
HOLDOUT_FRACTION = 0.2


def _scan(path: str) -> list[os.DirEntry[str]]:
    """The entries of folder ``path``; errors name the folder (permission stays permission)."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except PermissionError as e:
        raise PermissionError(f"cannot list folder {path!r}: permission denied") from e
    except OSError as e:
        raise OSError(f"cannot list folder {path!r}: {e}") from e


def _subdirs(path: str) -> list[str]:
    """Sorted names of the visible subdirectories of ``path``."""
    return sorted(e.name for e in _scan(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: str) -> list[str]:
    """Sorted paths of the image files directly inside ``folder``."""
    if not isdir_checked(folder):
        raise FileNotFoundError(f"expected a class folder {folder!r} (images inside it)")
    names = sorted(
        e.name
        for e in _scan(folder)
        if e.is_file()
        and not e.name.startswith(".")
        and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
    )
    if not names:
        raise ValueError(
            f"class folder {folder!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return [os.path.join(folder, n) for n in names]


def _load_image(path: str, resolution: int) -> np.ndarray:
    """RGB uint8 [3, r, r]: shorter side resized to r (bilinear), then centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            # JPEG only: decode at a reduced scale that still covers r x r (much faster).
            img.draft("RGB", (resolution, resolution))
            img = img.convert("RGB")
            w, h = img.size
            if w <= h:
                nw, nh = resolution, max(resolution, int(resolution * h / w))
            else:
                nw, nh = max(resolution, int(resolution * w / h)), resolution
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            top = int(round((nh - resolution) / 2.0))
            left = int(round((nw - resolution) / 2.0))
            img = img.crop((left, top, left + resolution, top + resolution))
            arr = np.array(img, dtype=np.uint8)  # a writable copy
    except PermissionError as e:  # a permission problem, not a malformed image
        raise PermissionError(f"cannot read image {path!r}: permission denied") from e
    except FileNotFoundError as e:  # removed while loading
        raise FileNotFoundError(f"image {path!r} disappeared while loading: {e}") from e
    except Image.DecompressionBombError as e:  # not an OSError: it would not name the file
        raise ValueError(
            f"cannot read image {path!r}: refused as a possible decompression bomb: {e}"
        ) from e
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    return arr.transpose(2, 0, 1)


def _load_split(files: list[str], resolution: int, num_workers: int | None) -> torch.Tensor:
    """float32 pixels [N, 3, r, r] in [0, 1] for the listed files (order kept)."""
    out = torch.empty((len(files), 3, resolution, resolution), dtype=torch.uint8)
    if num_workers is None:
        workers = min(8, os.cpu_count() or 1)
    else:
        workers = check_int("num_workers", num_workers, 1)

    def work(i: int) -> None:
        out[i] = torch.from_numpy(_load_image(files[i], resolution))

    if workers == 1 or len(files) < 2:
        for i in range(len(files)):
            work(i)
    else:
        # PIL decodes without the GIL, so threads scale on JPEG-heavy folders.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(len(files))))
    return out.to(torch.float32).div_(255.0)


def _split_dirs(root: str) -> tuple[str, str | None]:
    """(train dir, test dir) when ``root`` has ``train/``; (root, None) for one split folder."""
    train = os.path.join(root, "train")
    if not isdir_checked(train):
        return root, None
    for name in TEST_SPLIT_NAMES:
        cand = os.path.join(root, name)
        if isdir_checked(cand):
            return train, cand
    raise FileNotFoundError(
        f"{root!r} has train/ but no val/ or test/ with class subfolders; pass the train folder "
        "itself as root to hold out 20% of its images per class instead"
    )


def _check_max(max_per_class: int | None) -> int | None:
    """``max_per_class`` as a positive ``int`` (numpy integers accepted) or None."""
    return None if max_per_class is None else check_int("max_per_class", max_per_class, 1)


def _build(
    name: str,
    root: str,
    folders: Sequence[str],
    class_names: Sequence[str],
    resolution: int,
    max_per_class: int | None,
    num_workers: int | None,
) -> DistillData:
    train_dir, test_dir = _split_dirs(root)
    per_class = [_image_files(os.path.join(train_dir, f)) for f in folders]
    if test_dir is None:
        # One split folder: a fixed 20% per class is the test set (same rule as digits).
        files = [p for fs in per_class for p in fs]
        labels = np.repeat(np.arange(len(folders)), [len(fs) for fs in per_class])
        tr, te = stratified_holdout(
            labels,
            len(folders),
            HOLDOUT_FRACTION,
            seed=0,
            names=[f"class folder {os.path.join(train_dir, f)}" for f in folders],
        )
        test_files = [files[i] for i in te]
        test_labels = labels[te].tolist()
        per_class = [[] for _ in folders]
        for i in tr:
            per_class[labels[i]].append(files[i])
    else:
        test_per_class = [_image_files(os.path.join(test_dir, f)) for f in folders]
        test_files = [p for fs in test_per_class for p in fs]
        test_labels = [c for c, fs in enumerate(test_per_class) for _ in fs]
    if max_per_class is not None:
        per_class = [fs[:max_per_class] for fs in per_class]
    train_files = [p for fs in per_class for p in fs]
    train_labels = [c for c, fs in enumerate(per_class) for _ in fs]
    x_train = _load_split(train_files, resolution, num_workers)
    x_test = _load_split(test_files, resolution, num_workers)
    return DistillData(
        name=name,
        train_images=normalize_(x_train, IMAGENET_MEAN, IMAGENET_STD),
        train_labels=torch.tensor(train_labels, dtype=torch.int64),
        test_images=normalize_(x_test, IMAGENET_MEAN, IMAGENET_STD),
        test_labels=torch.tensor(test_labels, dtype=torch.int64),
        class_names=list(class_names),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def _check_root(root: str | os.PathLike[str] | None, what: str) -> str:
    if root is None:
        raise ValueError(f"root is required for {what}: a folder of class subfolders")
    root = os.fspath(root)
    if not isdir_checked(root):
        raise FileNotFoundError(f"root {root!r} for {what} is not a directory")
    return root


def load_imagefolder(
    root: str | os.PathLike[str] | None,
    resolution: int | None = None,
    *,
    max_per_class: int | None = None,
    num_workers: int | None = None,
) -> DistillData:
    """Every class subfolder of an image folder, loaded into memory.

    Layouts:
        ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``root/test/<class>/*``):
            the given train/test split; val must have the same class folders as train.
        ``root/<class>/*`` (no ``train/``): one split; per class, a fixed 20% of the images
            (seeded permutation, seed 0, first ``round(0.2 * n)`` in sorted file order) are
            the test set.

    Classes are the sorted folder names (label i = i-th name); files ending in .png, .jpg or
    .jpeg (any case) are read with PIL, converted to RGB, resized so the shorter side is
    ``resolution`` (bilinear) and centre-cropped to ``resolution`` x ``resolution``, then
    normalized with the ImageNet mean/std.

    Args:
        resolution: square side in pixels (default 128).
        max_per_class: keep at most this many training images per class (the first in sorted
            file order); the test split is not capped.
        num_workers: decoding threads (default min(8, CPU count)).

    Returns:
        DistillData named "imagefolder" with float32 images [N, 3, r, r].
    """
    root = _check_root(root, "'imagefolder'")
    resolution = check_resolution(resolution, DEFAULT_RESOLUTION)
    max_per_class = _check_max(max_per_class)
    train_dir, test_dir = _split_dirs(root)
    classes = _subdirs(train_dir)
    if not classes:
        raise FileNotFoundError(
            f"no class subfolders in {train_dir!r}; expected <class>/ folders of images "
            "(or train/<class>/ and val/<class>/)"
        )
    if test_dir is not None:
        test_classes = _subdirs(test_dir)
        if test_classes != classes:
            raise ValueError(
                f"class folders differ between {train_dir!r} ({classes}) and {test_dir!r} "
                f"({test_classes})"
            )
    return _build("imagefolder", root, classes, classes, resolution, max_per_class, num_workers)


def load_imagenet_subset(
    name: str,
    root: str | os.PathLike[str] | None,
    resolution: int | None = None,
    *,
    max_per_class: int | None = None,
    num_workers: int | None = None,
) -> DistillData:
    """A ten-class ImageNet subset (see :mod:`hpd_fast.data.subsets`) from an ImageNet folder.

    ``root`` is laid out like ImageNet with one folder per WordNet id:
    ``root/train/n01440764/*.JPEG`` and ``root/val/n01440764/*.JPEG`` (fastai's
    imagenette2/imagewoof2 folders have this layout too), or ``root/n01440764/*`` for one split
    (20% held out per class as in :func:`load_imagefolder`). Only the subset's ten folders are
    read; label i is the subset's i-th class. Images are processed as in
    :func:`load_imagefolder` (default 128 px, ImageNet mean/std).
    """
    classes = subset_classes(name)
    root = _check_root(root, repr(name))
    resolution = check_resolution(resolution, DEFAULT_RESOLUTION)
    max_per_class = _check_max(max_per_class)
    train_dir, test_dir = _split_dirs(root)
    wnids = [w for w, _ in classes]
    for d in (train_dir, test_dir):
        if d is None:
            continue
        missing = [w for w in wnids if not isdir_checked(os.path.join(d, w))]
        if missing:
            raise FileNotFoundError(
                f"{name!r} needs the WordNet-id folders {missing} under {d!r} "
                "(an ImageNet-style folder: <split>/<wnid>/*.JPEG); nothing is downloaded"
            )
    return _build(
        SUBSET_ALIASES.get(name, name),
        root,
        wnids,
        [n for _, n in classes],
        resolution,
        max_per_class,
        num_workers,
    )
