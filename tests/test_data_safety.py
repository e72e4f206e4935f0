"""Data loading: nothing executed from a file, errors that name the file, no empty splits."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from hpd_fast._checks import check_float, check_int
from hpd_fast.data import DistillData, load
from hpd_fast.data._common import stratified_holdout

# ------------------------------------------------------------------ CIFAR, as the archives are


class _Py2Pickler(pickle._Pickler):
    """What Python 2's cPickle wrote at protocol 2 (the official CIFAR archives).

    str and bytes become BINSTRING (Python 2 ``str``), and NumPy's array reconstruction is
    named ``numpy.core.multiarray._reconstruct`` as NumPy 1.x did.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _dump_py2(path, obj):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    raw = buf.getvalue()
    assert b"_codecs" not in raw
    assert b"data" not in obj or b"numpy.core.multiarray\n_reconstruct" in raw
    path.write_bytes(raw)


def _dump_py3_protocol2(path, obj):
    raw = pickle.dumps(obj, protocol=2)
    # Python 3 writes bytes as _codecs.encode(str, 'latin1') at protocol 2
    assert b"data" not in obj or b"_codecs" in raw
    path.write_bytes(raw)


def _batch(rng, n, k, label_key):
    return {
        b"batch_label": b"training batch 1 of 5",
        label_key: rng.integers(0, k, size=n).tolist(),
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _cifar10(folder, dump, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = [_batch(rng, 3, 10, b"labels") for _ in range(5)]
    for i, b in enumerate(batches, 1):
        dump(folder / f"data_batch_{i}", b)
    test = _batch(rng, 4, 10, b"labels")
    dump(folder / "test_batch", test)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                  "frog", "horse", "ship", "truck")]  # fmt: skip
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 3,
                                   b"num_vis": 3072})  # fmt: skip
    return batches, test


@pytest.mark.parametrize("dump", [_dump_py2, _dump_py3_protocol2], ids=["py2", "py3-protocol2"])
def test_cifar10_official_format_loads(tmp_path, dump):
    folder = tmp_path / "cifar-10-batches-py"
    batches, test = _cifar10(folder, dump)
    data = load("cifar10", tmp_path)
    assert data.class_names[:2] == ["airplane", "automobile"]
    assert data.train_labels.tolist() == [y for b in batches for y in b[b"labels"]]
    assert data.test_labels.tolist() == test[b"labels"]
    raw = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    pix = data.denormalize(data.train_images) * 255
    torch.testing.assert_close(pix, torch.from_numpy(raw).float(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("dump", [_dump_py2, _dump_py3_protocol2], ids=["py2", "py3-protocol2"])
def test_cifar100_official_format_loads(tmp_path, dump):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = _batch(rng, 6, 100, b"fine_labels"), _batch(rng, 2, 100, b"fine_labels")
    train[b"coarse_labels"] = [0] * 6
    dump(folder / "train", train)
    dump(folder / "test", test)
    names = [f"fine{i}".encode() for i in range(100)]
    dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    data = load("cifar100", folder)
    assert data.class_names[5] == "fine5"
    assert data.train_labels.tolist() == train[b"fine_labels"]
    pix = data.denormalize(data.test_images) * 255
    want = torch.from_numpy(test[b"data"].reshape(-1, 3, 32, 32)).float()
    torch.testing.assert_close(pix, want, atol=1e-3, rtol=0)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("where", ["top", "labels", "eval"])
def test_cifar_malicious_batch_runs_nothing(tmp_path, where):
    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder, lambda p, o: p.write_bytes(pickle.dumps(o, protocol=2)))
    marker = tmp_path / "pwned"
    if where == "top":
        payload = _Evil(marker)
    elif where == "labels":  # hidden inside a valid-looking batch
        payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0, _Evil(marker)]}
    else:
        payload = _EvilEval(marker)
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1.*(posix|__builtin__)\.(system|eval)"):
        load("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_refuses_object_arrays_and_state_on_globals(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder, lambda p, o: p.write_bytes(pickle.dumps(o, protocol=2)))
    obj = np.array([b"x", 1], dtype=object)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": obj, b"labels": [0]}, 2))
    with pytest.raises(ValueError, match="data_batch_2.*not a readable CIFAR-10 pickle"):
        load("cifar10", folder)
    # BUILD on an admitted global (would set attributes on it): refused
    raw = b"\x80\x02cnumpy\ndtype\n}b."
    (folder / "data_batch_2").write_bytes(raw)
    with pytest.raises(ValueError, match="data_batch_2.*state cannot be set"):
        load("cifar10", folder)


def test_cifar_empty_test_batch_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder, lambda p, o: p.write_bytes(pickle.dumps(o)))
    empty = {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}
    (folder / "test_batch").write_bytes(pickle.dumps(empty))
    with pytest.raises(ValueError, match="test split holds no image"):
        load("cifar10", folder)


def test_cifar_permission_error_names_the_file(tmp_path, monkeypatch):
    import hpd_fast.data.cifar as cifar

    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder, lambda p, o: p.write_bytes(pickle.dumps(o)))
    target = str(folder / "data_batch_3")
    real_open = open

    def fake_open(path, *a, **k):
        if os.fspath(path) == target:
            raise PermissionError(13, "Permission denied", target)
        return real_open(path, *a, **k)

    monkeypatch.setattr(cifar, "open", fake_open, raising=False)
    with pytest.raises(PermissionError, match=r"data_batch_3.*permission denied"):
        load("cifar10", folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_cifar_unreadable_file_is_a_permission_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder, lambda p, o: p.write_bytes(pickle.dumps(o)))
    os.chmod(folder / "test_batch", 0)
    with pytest.raises(PermissionError, match="test_batch"):
        load("cifar10", folder)
    os.chmod(folder / "test_batch", 0o600)
    os.chmod(folder, 0o600)  # not searchable: not "missing"
    try:
        with pytest.raises(PermissionError, match="cifar-10-batches-py"):
            load("cifar10", folder)
    finally:
        os.chmod(folder, 0o700)


# ---------------------------------------------------------------------------- image folders


def _png(path, color=(10, 20, 30), size=(6, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.mark.parametrize("n_small", [1, 2])
def test_holdout_that_rounds_to_nothing_is_refused(tmp_path, n_small):
    for i in range(5):
        _png(tmp_path / "big" / f"{i}.png")
    for i in range(n_small):
        _png(tmp_path / "tiny" / f"{i}.png")
    with pytest.raises(ValueError, match=rf"tiny'? has {n_small} sample.*test split empty"):
        load("imagefolder", tmp_path, resolution=4)


def test_stratified_holdout_names_the_class():
    labels = np.array([0] * 5 + [1] * 2)
    with pytest.raises(ValueError, match="class 1 has 2 sample.*at least 3"):
        stratified_holdout(labels, 2, 0.2)
    with pytest.raises(ValueError, match="'dogs' has 2 sample"):
        stratified_holdout(labels, 2, 0.2, names=["cats", "dogs"])
    with pytest.raises(ValueError, match="class 2 has 0 sample"):
        stratified_holdout(np.array([0] * 5 + [1] * 5), 3, 0.2)
    tr, te = stratified_holdout(np.array([0] * 5 + [1] * 3), 2, 0.2)
    assert len(te) == 2 and len(tr) == 6


def test_empty_splits_refused():
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="test split holds no image"):
        DistillData("t", x, y, x[:0], y[:0], ["a", "b"], (0.0,), (1.0,))
    with pytest.raises(ValueError, match="train split holds no image"):
        DistillData("t", x[:0], y[:0], x, y, ["a", "b"], (0.0,), (1.0,))


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    for i in range(3):
        _png(tmp_path / "a" / f"{i}.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2 * 1000: an error
    with pytest.raises(ValueError, match=r"a/[012]\.png.*decompression bomb"):
        load("imagefolder", tmp_path, resolution=4, num_workers=1)


def test_image_permission_error_is_a_permission_error(tmp_path, monkeypatch):
    for i in range(3):
        _png(tmp_path / "a" / f"{i}.png")
    real_open = Image.open

    def fake_open(fp, *a, **k):
        if str(fp).endswith("1.png"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", fake_open)
    with pytest.raises(PermissionError, match=r"1\.png.*permission denied"):
        load("imagefolder", tmp_path, resolution=4, num_workers=1)


def test_unsearchable_class_folder_is_a_permission_error(tmp_path, monkeypatch):
    import hpd_fast.data._common as common

    for i in range(3):
        _png(tmp_path / "train" / "a" / f"{i}.png")
        _png(tmp_path / "val" / "a" / f"{i}.png")
    real_stat = os.stat
    locked = str(tmp_path / "val" / "a")

    class _OS:  # os with a stat that fails like an unsearchable parent folder
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def stat(path, *a, **k):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real_stat(path, *a, **k)

    monkeypatch.setattr(common, "os", _OS())
    with pytest.raises(PermissionError, match=r"val/a.*permission denied"):
        load("imagefolder", tmp_path, resolution=4)


# ------------------------------------------------------------------------- numpy integers


def test_numpy_integers_accepted_like_ints(tmp_path):
    for cls in ("a", "b"):
        for i in range(5):
            _png(tmp_path / cls / f"{i}.png")
    data = load("imagefolder", tmp_path, resolution=np.int64(4), max_per_class=np.int64(2),
                num_workers=np.int32(1))  # fmt: skip
    assert data.class_counts().tolist() == [2, 2]
    digits = load("digits", max_per_class=np.int64(3))
    assert bool((digits.class_counts() == 3).all())
    assert check_int("n", np.int64(3), 1) == 3 and check_int("n", np.uint8(3), 0) == 3
    assert check_float("lr", np.float32(0.5)) == 0.5 and check_float("lr", np.int64(2)) == 2.0
    for bad in (True, np.bool_(True), 2.0, "3"):
        with pytest.raises(ValueError, match="n must be an int"):
            check_int("n", bad, 0)
    with pytest.raises(ValueError, match="max_per_class must be >= 1"):
        load("digits", max_per_class=np.int64(0))
