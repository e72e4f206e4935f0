"""The expert cache: its root, the folder name (the cache key) and reuse of a folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

import hpd_fast
from hpd_fast.config import DataConfig, ExpertConfig
from hpd_fast.experts import cache_path, cache_root, cache_settings, cached_experts

SMALL = {"width": 8}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> hpd_fast.DistillData:
    return hpd_fast.data.load("digits", max_per_class=6)


def _config(tmp_path: Path, **kw) -> ExpertConfig:
    args = dict(
        model_kwargs=dict(SMALL), num_experts=2, epochs=1, batch_size=16, cache_dir=str(tmp_path)
    )
    args.update(kw)
    return ExpertConfig(**args)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("HPD_FAST_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert cache_root("~/c") == Path.home() / "c"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("HPD_FAST_CACHE")
    assert cache_root() == tmp_path / "xdg" / "hpd_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root(None) == Path.home() / ".cache" / "hpd_fast"


def test_cache_path_pinned(tiny, monkeypatch):
    """The name the command line has always given these settings: existing caches stay valid."""
    monkeypatch.setenv("HPD_FAST_CACHE", "/cache")
    cfg = ExpertConfig(epochs=2, batch_size=16)
    dc = DataConfig(max_per_class=6)
    settings = {
        "dataset": "digits",
        "root": None,
        "resolution": [8, 8],
        "max_per_class": 6,
        "model": "ConvNet",
        "model_kwargs": {},
        "epochs": 2,
        "lr": 0.01,
        "batch_size": 16,
        "augment": "dsa",
        "seed": 3,
    }
    assert cache_settings(tiny, cfg, 3, dc) == settings
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    assert digest == "2c17c311f9"  # computed by the pre-library command line
    expected = Path("/cache/experts/digits-8x8-ConvNet-e2-2c17c311f9")
    assert cache_path(tiny, cfg, 3, dc) == expected

    # No augmentation is stored as the word "none"; the root resolved; the number of experts,
    # vmap and the group size are not part of the key.
    cfg = ExpertConfig(augment=None, model_kwargs=SMALL, num_experts=3, vmap=True, group_size=2)
    s = cache_settings(tiny, cfg, 0, DataConfig(root="/a/b/../c"))
    assert s["augment"] == "none" and s["root"] == "/a/c" and s["model_kwargs"] == SMALL
    assert "num_experts" not in s and "vmap" not in s and "momentum" not in s
    assert cache_path(tiny, cfg, 0) != cache_path(tiny, ExpertConfig(model_kwargs=SMALL), 0)
    assert cache_path(tiny, ExpertConfig(momentum=0.9), 0) != cache_path(tiny, ExpertConfig(), 0)
    assert cache_path(tiny, ExpertConfig(cache_dir="/elsewhere"), 0).parent == Path(
        "/elsewhere/experts"
    )


def test_cached_experts_reuses_folder(tiny, tmp_path):
    cfg = _config(tmp_path)
    first = cached_experts(tiny, cfg, seed=1, progress=False)
    folder = cache_path(tiny, cfg, 1)
    assert first.path == folder and folder.parent == tmp_path / "experts"
    files = sorted(f for f in folder.iterdir() if f.name != ".lock")  # .lock: the entry's lock
    assert [f.name for f in files] == ["expert_00000.safetensors", "expert_00001.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in files]

    again = cached_experts(tiny, cfg, seed=1, progress=False)  # nothing trained, nothing written
    assert [f.stat().st_mtime_ns for f in files] == stamps
    for a, b in zip(first.trajectories, again.trajectories):
        assert torch.equal(a, b)

    more = cached_experts(tiny, _config(tmp_path, num_experts=3), seed=1, progress=False)
    assert more.path == folder and len(more) == 3  # the same folder, extended
    assert [f.stat().st_mtime_ns for f in files] == stamps

    # config.path: read from there, no training; another dataset is refused.
    read = cached_experts(tiny, ExpertConfig(path=str(folder), num_experts=1))
    assert len(read) == 3 and torch.equal(read.trajectories[0], first.trajectories[0])
    other = dataclasses.replace(tiny, name="other")
    with pytest.raises(ValueError, match="trained on 'digits'"):
        cached_experts(other, ExpertConfig(path=str(folder)))
    with pytest.raises(ValueError, match="give one"):
        cached_experts(tiny, ExpertConfig(path=str(folder)), out=tmp_path / "o")

    # out: that folder instead of the cache's (same experts: same seeds).
    elsewhere = cached_experts(tiny, cfg, seed=1, out=tmp_path / "o", progress=False)
    assert elsewhere.path == tmp_path / "o" and len(list((tmp_path / "o").glob("expert_*"))) == 2
    assert torch.equal(elsewhere.trajectories[1], first.trajectories[1])
