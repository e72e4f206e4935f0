"""Tiny ImageNet loader on a small fake copy of the official folder layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from hpd_fast.data import DATASET_NAMES, IMAGENET_MEAN, IMAGENET_STD, load
from hpd_fast.data import tinyimagenet as tiny
from hpd_fast.data.tinyimagenet import load_tinyimagenet

# wnids.txt is not sorted in the official archive; labels follow the sorted ids.
WNIDS = ["n03444034", "n01443537", "n02124075"]
WORDS = {
    "n01443537": "goldfish, Carassius auratus",
    "n02124075": "Egyptian cat",
    "n03444034": "go-kart",
    "n09999999": "unused, other",
}
COLOUR = {"n01443537": (200, 30, 30), "n02124075": (30, 200, 30), "n03444034": (30, 30, 200)}


def _jpeg(path: Path, colour, size=64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, quality=95)


def make_tiny(root: Path, n_train=4, n_val=2) -> Path:
    """tiny-imagenet-200 in miniature: wnids.txt, words.txt, train/<wnid>/images, val/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in WORDS.items()))
    for w in WNIDS:
        for i in range(n_train):
            _jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", COLOUR[w])
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    lines, k = [], 0
    for w in reversed(WNIDS):
        for _ in range(n_val):
            _jpeg(root / "val" / "images" / f"val_{k}.JPEG", COLOUR[w])
            lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
            k += 1
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _jpeg(root / "test" / "images" / "test_0.JPEG", (0, 0, 0))  # unlabelled: not read
    return root


@pytest.fixture
def root(tmp_path):
    return make_tiny(tmp_path / "tiny-imagenet-200")


def _pixels(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * s + m) * 255


def test_loads_layout_labels_and_names(root):
    data = load("tinyimagenet", root, num_workers=1)
    assert "tinyimagenet" in DATASET_NAMES and data.name == "tinyimagenet"
    assert data.train_images.shape == (12, 3, 64, 64) and data.test_images.shape == (6, 3, 64, 64)
    assert data.class_names == ["goldfish", "Egyptian cat", "go-kart"]  # sorted wnids
    assert data.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert tuple(data.mean) == IMAGENET_MEAN
    # Every image is where its label says (each class has its own colour).
    sorted_ids = sorted(WNIDS)
    for x, y in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        mean_rgb = _pixels(x).mean(dim=(2, 3))
        want = torch.tensor([COLOUR[sorted_ids[c]] for c in y.tolist()], dtype=torch.float32)
        assert (mean_rgb - want).abs().max() < 6


def test_parent_folder_alias_resolution_and_cap(root):
    data = load("tiny-imagenet", root.parent, resolution=32, max_per_class=3, num_workers=2)
    assert data.train_images.shape == (9, 3, 32, 32) and data.test_images.shape == (6, 3, 32, 32)
    assert data.train_labels.bincount().tolist() == [3, 3, 3]


def test_words_txt_optional(root):
    (root / "words.txt").unlink()
    assert load_tinyimagenet(root, num_workers=1).class_names == sorted(WNIDS)


@pytest.mark.parametrize(
    "breaks, error, match",
    [
        (lambda r: (r / "wnids.txt").unlink(), FileNotFoundError, r"wnids\.txt"),
        (
            lambda r: (r / "wnids.txt").write_text("n01443537\nn01443537\n"),
            ValueError,
            r"wnids\.txt', line 2: 'n01443537' is listed twice",
        ),
        (
            lambda r: (r / "val" / "val_annotations.txt").write_text("val_0.JPEG n01443537\n"),
            ValueError,
            r"val_annotations\.txt', line 1: expected",
        ),
        (
            lambda r: (r / "val" / "val_annotations.txt").open("a").write("x.JPEG\tn00000001\n"),
            ValueError,
            r"val_annotations\.txt', line 7: class 'n00000001' is not in wnids\.txt",
        ),
        (
            lambda r: (r / "val" / "val_annotations.txt").open("a").write("../x.JPEG\tn01443537\n"),
            ValueError,
            r"line 7: '\.\./x\.JPEG' is not a file name",
        ),
        (
            lambda r: (r / "val" / "images" / "val_3.JPEG").unlink(),
            FileNotFoundError,
            r"lists '.*val/images/val_3\.JPEG', which does not exist",
        ),
        (
            lambda r: (r / "val" / "val_annotations.txt").write_text(
                "val_0.JPEG\tn03444034\nval_2.JPEG\tn02124075\n"
            ),
            ValueError,
            r"labels no validation image of the class\(es\) \['n01443537'\]",
        ),
        (
            lambda r: [p.unlink() for p in (r / "train" / "n02124075" / "images").iterdir()],
            ValueError,
            r"class folder '.*train/n02124075/images' holds no images",
        ),
        (
            lambda r: os.rename(r / "train" / "n02124075", r / "train" / "moved"),
            FileNotFoundError,
            r"expected a class folder '.*train/n02124075/images'",
        ),
        (
            lambda r: (r / "train" / "n01443537" / "images" / "n01443537_1.JPEG").write_bytes(
                b"\xff\xd8\xff\xe0 not really a jpeg"
            ),
            ValueError,
            r"cannot read image '.*n01443537_1\.JPEG'",
        ),
        (
            lambda r: (r / "words.txt").write_text("n01443537 goldfish\n"),
            ValueError,
            r"words\.txt', line 1: expected",
        ),
    ],
)
def test_errors_name_the_file(root, breaks, error, match):
    breaks(root)
    with pytest.raises(error, match=match):
        load_tinyimagenet(root, num_workers=1)


def test_missing_root_and_bad_arguments(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load("tinyimagenet", tmp_path / "nope")
    with pytest.raises(ValueError, match="root is required"):
        load("tinyimagenet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected the class list wnids\.txt at"):
        load("tinyimagenet", tmp_path / "empty")
    with pytest.raises(ValueError, match="resolution"):
        load("tinyimagenet", root, resolution=0)
    with pytest.raises(ValueError, match="max_per_class"):
        load("tinyimagenet", root, max_per_class=0)


def test_decompression_bomb_names_the_file(root, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2 * 1000: an error
    with pytest.raises(ValueError, match=r"n01443537_0\.JPEG.*decompression bomb"):
        load_tinyimagenet(root, num_workers=1)


def test_permission_errors_stay_permission_errors(root, monkeypatch):
    real_open = open

    def guarded(path, *a, **k):
        if str(path).endswith("val_annotations.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(tiny, "open", guarded, raising=False)
    with pytest.raises(PermissionError, match=r"cannot read '.*val_annotations\.txt'"):
        load_tinyimagenet(root, num_workers=1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_image_folder(root):
    folder = root / "train" / "n01443537" / "images"
    os.chmod(folder, 0)
    try:
        with pytest.raises(PermissionError, match="n01443537"):
            load_tinyimagenet(root, num_workers=1)
    finally:
        os.chmod(folder, 0o700)
