"""Generator files: truncated or malformed files and permission problems name the file."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from hpd_fast.generators import ConvGenerator, load_generator, load_stylegan_pickle, save_generator


def _saved(tmp_path):
    G = ConvGenerator(num_classes=3, image_shape=(1, 8, 8), latent_dim=8, width=8, num_stages=3)
    return save_generator(G, tmp_path / "g")


def test_truncated_safetensors_names_the_file(tmp_path):
    wpath, _ = _saved(tmp_path)
    raw = wpath.read_bytes()
    for cut in (4, 20, len(raw) - 7):
        wpath.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=r"g\.safetensors'? is not a readable safetensors"):
            load_generator(wpath)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": "hpd_fast.ConvGenerator", "kwargs": ', "not a valid JSON generator config"),
        ("[1, 2]", "is not a hpd_fast.ConvGenerator config"),
        ('{"format": "hpd_fast.ConvGenerator", "mean": [0], "std": [1]}', r"lacks the key.*kwargs"),
        ('{"format": "hpd_fast.ConvGenerator", "kwargs": {"bogus": 1}, "mean": [0], "std": [1]}',
         "cannot be built"),
        (b"\xff\xfe not utf-8", "not a valid JSON generator config"),
    ],
)  # fmt: skip
def test_bad_json_names_the_file(tmp_path, text, match):
    wpath, cpath = _saved(tmp_path)
    if isinstance(text, bytes):
        cpath.write_bytes(text)
    else:
        cpath.write_text(text)
    with pytest.raises(ValueError, match=rf"g\.json'?:? .*{match}|{match}.*g\.json"):
        load_generator(wpath)


def test_weights_of_another_generator_name_both_files(tmp_path):
    wpath, cpath = _saved(tmp_path)
    meta = json.loads(cpath.read_text())
    meta["kwargs"]["width"] = 16
    cpath.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"g\.safetensors'? does not hold .*g\.json"):
        load_generator(wpath)


def test_permission_error_is_reported_as_one(tmp_path, monkeypatch):
    wpath, cpath = _saved(tmp_path)
    real = Path.read_bytes

    def fake(self):
        if self == cpath:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", fake)
    with pytest.raises(PermissionError, match=r"g\.json'?: permission denied"):
        load_generator(wpath)


def test_stylegan_pickle_truncated_and_permission_name_the_file(tmp_path, monkeypatch):
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"G_ema": nn.Linear(2, 2)})[:40])
    with pytest.raises(ValueError, match=r"net\.pkl'? is not a readable network pickle"):
        load_stylegan_pickle(path, allow_pickle=True)
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 8 + b"cdnnlib_missing_mod\nX\n.")
    with pytest.raises(ModuleNotFoundError, match=r"net\.pkl.*dnnlib_missing_mod"):
        load_stylegan_pickle(path, allow_pickle=True)
    real = Path.open

    def fake(self, *a, **k):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "open", fake)
    with pytest.raises(PermissionError, match=r"net\.pkl'?: permission denied"):
        load_stylegan_pickle(path, allow_pickle=True)


def test_generator_roundtrip_still_works(tmp_path):
    wpath, _ = _saved(tmp_path)
    G = load_generator(wpath)
    labels = torch.tensor([0, 1])
    assert G.sample(labels, 0).shape == (2, 1, 8, 8)
