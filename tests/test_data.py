"""Datasets: the embedded digits, tiny CIFAR archives and image folders written here."""

import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from hpd_fast.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASET_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENET_SUBSETS,
    DistillData,
    load,
    subset_classes,
)

# ----------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def test_digits_shapes_and_split(digits):
    assert digits.name == "digits"
    assert digits.train_images.shape == (1438, 1, 8, 8)
    assert digits.test_images.shape == (359, 1, 8, 8)
    assert digits.train_images.dtype == torch.float32 and digits.test_images.dtype == torch.float32
    assert digits.train_labels.dtype == torch.int64 and digits.test_labels.dtype == torch.int64
    assert (digits.num_classes, digits.channels, digits.im_size) == (10, 1, (8, 8))
    assert digits.class_names == [str(i) for i in range(10)]
    assert len(digits) == 1438
    # Stratified: every class has round(n_c / 5) test images (n_c from scikit-learn).
    from sklearn.datasets import load_digits

    n_c = np.bincount(load_digits().target, minlength=10)
    test_counts = torch.bincount(digits.test_labels, minlength=10).numpy()
    np.testing.assert_array_equal(test_counts, np.round(n_c / 5).astype(int))
    np.testing.assert_array_equal(digits.class_counts().numpy(), n_c - test_counts)


def test_digits_normalization_and_pixels(digits):
    assert len(digits.mean) == len(digits.std) == 1
    x = digits.train_images
    assert abs(float(x.mean())) < 1e-5
    assert abs(float(x.std()) - 1.0) < 1e-4
    # Denormalized pixels are the original values k / 16, for the test split too (same stats).
    for split in (digits.train_images, digits.test_images):
        pix = digits.denormalize(split) * 16
        assert float(pix.min()) > -1e-3 and float(pix.max()) < 16 + 1e-3
        torch.testing.assert_close(pix, pix.round(), atol=1e-3, rtol=0)


def test_digits_split_is_a_partition_of_sklearn_digits(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    ours = torch.cat(
        [digits.denormalize(digits.train_images), digits.denormalize(digits.test_images)]
    )
    ours_rows = sorted(
        tuple(r) + (int(y),)
        for r, y in zip(
            (ours.flatten(1) * 16).round().to(torch.int64).tolist(),
            torch.cat([digits.train_labels, digits.test_labels]),
        )
    )
    raw_rows = sorted(
        tuple(r) + (int(y),) for r, y in zip(raw.data.astype(int).tolist(), raw.target)
    )
    assert ours_rows == raw_rows


def test_digits_deterministic(digits):
    again = load("digits")
    assert torch.equal(again.train_images, digits.train_images)
    assert torch.equal(again.test_labels, digits.test_labels)
    assert again.mean == digits.mean and again.std == digits.std


def test_digits_resolution_and_cap():
    big = load("digits", resolution=16)
    assert big.train_images.shape == (1438, 1, 16, 16)
    capped = load("Digits", max_per_class=7)
    assert capped.train_images.shape == (70, 1, 8, 8)
    assert capped.class_counts().tolist() == [7] * 10
    assert capped.test_images.shape[0] == 359  # the test split is never capped


def test_random_real(digits):
    state = torch.get_rng_state()
    x, y = digits.random_real(3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert x.shape == (30, 1, 8, 8) and y.tolist() == [c for c in range(10) for _ in range(3)]
    x2, y2 = digits.random_real(3, seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = digits.random_real(3, seed=6)
    assert not torch.equal(x, x3)
    flat_train = digits.train_images.flatten(1)
    for i in range(30):
        matches = (flat_train == x[i].flatten()).all(1).nonzero().squeeze(1)
        assert matches.numel() >= 1
        assert bool((digits.train_labels[matches] == y[i]).all())
    for c in range(10):  # drawn without replacement
        rows = x[y == c].flatten(1)
        assert torch.unique(rows, dim=0).shape[0] == 3
    with pytest.raises(ValueError, match="ipc"):
        digits.random_real(0)
    with pytest.raises(ValueError, match="ipc=500"):
        digits.random_real(500)


def test_images_of_class(digits):
    x = digits.images_of_class(3)
    assert x.shape == (int(digits.class_counts()[3]), 1, 8, 8)
    torch.testing.assert_close(x, digits.train_images[digits.train_labels == 3])
    with pytest.raises(ValueError, match="c must be"):
        digits.images_of_class(10)
    with pytest.raises(ValueError, match="c must be"):
        digits.images_of_class(1.5)


def test_normalize_roundtrip_and_to(digits):
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(digits.denormalize(digits.normalize(x)), x)
    moved = digits.to("cpu")
    assert moved is not digits and torch.equal(moved.train_images, digits.train_images)
    assert "digits" in repr(digits) and "1438" in repr(digits)


def test_distilldata_validation():
    x, y = torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])
    ok = dict(name="t", train_images=x, train_labels=y, test_images=x, test_labels=y,
              class_names=["a", "b"], mean=(0.0,), std=(1.0,))  # fmt: skip
    DistillData(**ok)
    with pytest.raises(ValueError, match="train_labels has 3"):
        DistillData(**{**ok, "train_labels": y[:3]})
    with pytest.raises(ValueError, match="lie in"):
        DistillData(**{**ok, "test_labels": torch.tensor([0, 1, 2, 0])})
    with pytest.raises(ValueError, match="float32"):
        DistillData(**{**ok, "train_images": x.double()})
    with pytest.raises(ValueError, match="one value per channel"):
        DistillData(**{**ok, "mean": (0.0, 0.0)})


# ------------------------------------------------------------------------------------ CIFAR


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _batch(rng, n, k, label_key):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, k, size=n).tolist()
    return {b"data": data, label_key: labels, b"batch_label": b"x"}


def _write_cifar10(parent, n_per_batch=4, n_test=6):
    rng = np.random.default_rng(1)
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = []
    for i in range(1, 6):
        b = _batch(rng, n_per_batch, 10, b"labels")
        _pickle(folder / f"data_batch_{i}", b)
        batches.append(b)
    test = _batch(rng, n_test, 10, b"labels")
    _pickle(folder / "test_batch", test)
    names = [f"c10_{i}".encode() for i in range(10)]
    _pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return folder, batches, test


def test_cifar10_tiny_archive(tmp_path):
    folder, batches, test = _write_cifar10(tmp_path)
    for root in (tmp_path, folder, str(folder)):  # parent or the folder itself
        data = load("cifar10", root)
        assert data.train_images.shape == (20, 3, 32, 32)
        assert data.test_images.shape == (6, 3, 32, 32)
        assert data.class_names == [f"c10_{i}" for i in range(10)]
        assert data.mean == CIFAR10_MEAN and data.std == CIFAR10_STD
        want_y = [y for b in batches for y in b[b"labels"]]
        assert data.train_labels.tolist() == want_y
        assert data.test_labels.tolist() == test[b"labels"]
        # Row layout: 1024 R, 1024 G, 1024 B values, each 32x32 row-major.
        raw = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        pix = data.denormalize(data.train_images) * 255
        torch.testing.assert_close(pix, torch.from_numpy(raw).float(), atol=1e-3, rtol=0)
    small = load("CIFAR-10", tmp_path, resolution=16, max_per_class=1)
    assert small.train_images.shape[1:] == (3, 16, 16)
    assert bool((small.class_counts() <= 1).all())


def test_cifar100_tiny_archive(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = _batch(rng, 12, 100, b"fine_labels")
    train[b"coarse_labels"] = [0] * 12
    test = _batch(rng, 5, 100, b"fine_labels")
    _pickle(folder / "train", train)
    _pickle(folder / "test", test)
    names = [f"f{i}".encode() for i in range(100)]
    _pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    for root in (tmp_path, folder):
        data = load("cifar100", root)
        assert data.num_classes == 100 and data.class_names[7] == "f7"
        assert data.train_images.shape == (12, 3, 32, 32)
        assert data.train_labels.tolist() == train[b"fine_labels"]
        assert data.test_labels.tolist() == test[b"fine_labels"]
        assert data.mean == CIFAR100_MEAN and data.std == CIFAR100_STD
        pix = data.denormalize(data.test_images) * 255
        want = torch.from_numpy(test[b"data"].reshape(-1, 3, 32, 32)).float()
        torch.testing.assert_close(pix, want, atol=1e-3, rtol=0)


def test_cifar_errors(tmp_path):
    with pytest.raises(ValueError, match="root is required"):
        load("cifar10")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load("cifar10", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1.*nothing is"):
        load("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python/train"):
        load("cifar100", tmp_path)

    folder, _, _ = _write_cifar10(tmp_path / "a")
    os.remove(folder / "test_batch")
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load("cifar10", folder)

    folder, _, _ = _write_cifar10(tmp_path / "b")
    (folder / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="data_batch_3.*not a readable CIFAR-10 pickle"):
        load("cifar10", folder)

    folder, _, _ = _write_cifar10(tmp_path / "c")
    _pickle(folder / "data_batch_2", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    with pytest.raises(ValueError, match=r"uint8 \[N, 3072\]"):
        load("cifar10", folder)

    folder, _, _ = _write_cifar10(tmp_path / "d")
    _pickle(folder / "data_batch_2", {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3})
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        load("cifar10", folder)

    folder, _, _ = _write_cifar10(tmp_path / "e")
    _pickle(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        load("cifar10", folder)

    folder, _, _ = _write_cifar10(tmp_path / "f")
    _pickle(folder / "data_batch_1", {b"labels": [0]})
    with pytest.raises(ValueError, match="lacks key"):
        load("cifar10", folder)

    folder, _, _ = _write_cifar10(tmp_path / "g")
    _pickle(folder / "batches.meta", {b"label_names": [b"a"] * 3})
    with pytest.raises(ValueError, match="expected 10 names"):
        load("cifar10", folder)


# ------------------------------------------------------------------------------ imagefolder


def _png(path, size=(12, 10), color=(10, 20, 30), ext=".png"):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    fmt = "JPEG" if ext.lower() in (".jpg", ".jpeg") else "PNG"
    img.save(path.with_suffix(ext), format=fmt, quality=100)


def _expected_norm(color):
    return torch.tensor(
        [(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD)]
    ).view(3, 1, 1)


def test_imagefolder_train_val(tmp_path):
    colors = {"cat": (200, 10, 10), "dog": (10, 200, 10)}
    for cls, col in colors.items():
        for i in range(3):
            _png(tmp_path / "train" / cls / f"{i}", size=(20 + i, 12), color=col)
        _png(tmp_path / "val" / cls / "v0", size=(9, 14), color=col)
    _png(tmp_path / "train" / "cat" / "3", size=(15, 15), color=colors["cat"], ext=".JPEG")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    data = load("imagefolder", tmp_path, resolution=8)
    assert data.class_names == ["cat", "dog"]
    assert data.train_images.shape == (7, 3, 8, 8) and data.test_images.shape == (2, 3, 8, 8)
    assert data.train_labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert data.test_labels.tolist() == [0, 1]
    assert data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD
    for x, y in zip(data.train_images[:3], data.train_labels[:3]):  # PNGs are exact
        torch.testing.assert_close(x, _expected_norm(colors[data.class_names[y]]).expand(3, 8, 8))
    jpeg = data.denormalize(data.train_images[3:4]) * 255  # lossy, but close
    assert float((jpeg - torch.tensor(colors["cat"]).view(1, 3, 1, 1)).abs().max()) < 6
    assert load("imagefolder", tmp_path).im_size == (128, 128)  # default resolution
    capped = load("imagefolder", tmp_path, resolution=4, max_per_class=2, num_workers=1)
    assert capped.class_counts().tolist() == [2, 2] and capped.test_images.shape[0] == 2


def test_imagefolder_resize_and_center_crop(tmp_path):
    # 30x10 image: black sides, white centre 10x10 -> shorter side already 10: crop = centre.
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 10:20] = 255
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(img).save(tmp_path / split / "a" / "x.png")
    data = load("imagefolder", tmp_path, resolution=10)
    torch.testing.assert_close(data.denormalize(data.train_images), torch.ones(1, 3, 10, 10))
    # Tall 10x40 image with a white centre band: resized to 5x20, centre 5x5 is white.
    img = np.zeros((40, 10, 3), np.uint8)
    img[10:30] = 255
    Image.fromarray(img).save(tmp_path / "train" / "a" / "x.png")
    data = load("imagefolder", tmp_path, resolution=5)
    pix = data.denormalize(data.train_images)
    assert float(pix.min()) > 0.95


def test_imagefolder_single_split_holdout(tmp_path):
    for cls in ("b", "a"):
        for i in range(5):
            _png(tmp_path / cls / f"{i}", color=(i * 40, 0, 0))
    data = load("imagefolder", tmp_path, resolution=4)
    assert data.class_names == ["a", "b"]
    assert data.class_counts().tolist() == [4, 4]
    assert torch.bincount(data.test_labels).tolist() == [1, 1]
    again = load("imagefolder", tmp_path, resolution=4)
    assert torch.equal(again.test_images, data.test_images)


def _write_subset(root, name, splits=("train", "val"), skip=()):
    wnids = [w for w, _ in IMAGENET_SUBSETS[name]]
    for split in splits:
        for i, w in enumerate(wnids):
            if w in skip:
                continue
            for j in range(2 if split == "train" else 1):
                _png(root / split / w / f"{w}_{j}", size=(10, 8), color=(i * 20, 0, 0), ext=".JPEG")
        _png(root / split / "n09999999" / "other", color=(255, 255, 255))  # not in the subset
    return wnids


def test_imagenet_subset_by_wordnet_id(tmp_path):
    _write_subset(tmp_path, "imagenette")
    data = load("imagenette", tmp_path, resolution=4)
    assert data.name == "imagenette" and data.num_classes == 10
    assert data.class_names[0] == "tench" and data.class_names[9] == "parachute"
    assert data.train_images.shape == (20, 3, 4, 4) and data.test_images.shape == (10, 3, 4, 4)
    assert data.train_labels.tolist() == [c for c in range(10) for _ in range(2)]
    red = (data.denormalize(data.test_images)[:, 0] * 255).mean((1, 2))
    torch.testing.assert_close(red, torch.arange(10.0) * 20, atol=4, rtol=0)  # label i <-> wnid i


def test_subset_tables():
    for name, classes in IMAGENET_SUBSETS.items():
        wnids = [w for w, _ in classes]
        assert len(classes) == 10 and len(set(wnids)) == 10, name
        assert all(re.fullmatch(r"n\d{8}", w) for w in wnids), name
        assert name in DATASET_NAMES
    assert {w for w, _ in IMAGENET_SUBSETS["imagenette"]} == {
        "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
        "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
    }  # fmt: skip
    assert {w for w, _ in IMAGENET_SUBSETS["imagewoof"]} == {
        "n02086240", "n02087394", "n02088364", "n02089973", "n02093754",
        "n02096294", "n02099601", "n02105641", "n02111889", "n02115641",
    }  # fmt: skip
    assert subset_classes("imagenet-birds") == IMAGENET_SUBSETS["imagesquawk"]
    assert subset_classes("imagenet-cats")[0] == ("n02123045", "tabby cat")
    with pytest.raises(ValueError, match="unknown ImageNet subset"):
        subset_classes("imagenet-z")


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ValueError, match="root is required"):
        load("imagefolder")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load("imagefolder", tmp_path / "missing")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        load("imagefolder", tmp_path / "empty_root")

    r = tmp_path / "r1"
    _png(r / "train" / "a" / "0")
    (r / "train" / "b").mkdir()
    _png(r / "val" / "a" / "0")
    _png(r / "val" / "b" / "0")
    with pytest.raises(ValueError, match=r"class folder .*b'? holds no images"):
        load("imagefolder", r, resolution=4)

    r = tmp_path / "r2"
    _png(r / "train" / "a" / "0")
    with pytest.raises(FileNotFoundError, match="no val/ or test/"):
        load("imagefolder", r, resolution=4)

    _png(r / "val" / "z" / "0")
    with pytest.raises(ValueError, match="class folders differ"):
        load("imagefolder", r, resolution=4)

    r = tmp_path / "r3"
    _png(r / "a" / "0")
    _png(r / "a" / "2")  # three images: the 20% holdout keeps one for test
    (r / "a" / "1.png").write_bytes(b"garbage, not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*1\.png"):
        load("imagefolder", r, resolution=4)

    with pytest.raises(ValueError, match="max_per_class"):
        load("imagefolder", r, max_per_class=0)
    with pytest.raises(ValueError, match="resolution"):
        load("imagefolder", r, resolution=0)


def test_imagenet_subset_errors(tmp_path):
    with pytest.raises(ValueError, match="root is required"):
        load("imagewoof")
    wnids = _write_subset(tmp_path, "imagewoof", skip=("n02099601",))
    assert "n02099601" in wnids
    with pytest.raises(FileNotFoundError, match=r"n02099601.*nothing is downloaded"):
        load("imagewoof", tmp_path, resolution=4)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"unknown dataset name 'mnist'.*digits.*cifar10"):
        load("mnist")
    with pytest.raises(ValueError, match="name must be a str"):
        load(3)
