"""Training a ConvGenerator for a dataset: the library, ``hpd-fast generator train`` (resumable,
cached) and ``hpd-fast distill --generator auto`` on an image folder."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hpd_fast.cli import build_parser, main
from hpd_fast.config import DataConfig, GeneratorTrainConfig
from hpd_fast.generators import cached_generator, load_generator, train_for_dataset
from hpd_fast.generators import fit as fit_mod
from hpd_fast.generators import train as train_mod
from hpd_fast.generators.io import DIGITS_TRAINING

TINY_TRAIN = dict(
    epochs=2, batch_size=8, latent_dim=4, width=4, d_width=4, checkpoint_every=2, seed=1
)
TINY_TRAIN_ARGS = [
    "--epochs", "2", "--batch-size", "8", "--latent-dim", "4", "--width", "4",
    "--d-width", "4", "--checkpoint-every", "2",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """Bitwise comparisons need one thread; in-process commands may change it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 10 RGB 8x8 PNG images (8 train + 2 test per class after the holdout)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ants", "bees", "cats")):
        (root / name).mkdir()
        for i in range(10):
            base = np.zeros((8, 8, 3), np.float64)
            base[..., c] = 200
            img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def _data(folder: Path, resolution: int = 8):
    from hpd_fast.data import load

    return load("imagefolder", str(folder), resolution=resolution)


def _equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_defaults_are_the_shipped_digits_settings():
    cfg = dataclasses.asdict(GeneratorTrainConfig())
    for key, value in DIGITS_TRAINING.items():
        if key == "num_stages":
            assert cfg[key] is None  # doublings + 2 = 4 for 8x8
            continue
        assert cfg[key] == value, key


def test_train_writes_the_folder_and_reuses_it(folder, tmp_path, caplog):
    data = _data(folder)
    cfg = GeneratorTrainConfig(**TINY_TRAIN)
    G = train_for_dataset(data, cfg, tmp_path / "g", progress=False)
    names = sorted(p.name for p in (tmp_path / "g").iterdir() if p.name != ".lock")
    assert names == ["generator.json", "generator.safetensors", "samples.png"]
    assert G.image_shape == (3, 8, 8) and G.num_classes == 3 and G.num_stages == 4
    meta = json.loads((tmp_path / "g" / "generator.json").read_text())
    assert meta["training"]["steps"] == 6 and meta["training"]["data"]["dataset"] == "imagefolder"
    H = load_generator(tmp_path / "g")  # the folder is enough
    assert _equal(G, H)
    # a second call reuses the folder (no training)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "train_generator", _no_training)
        assert _equal(train_for_dataset(data, cfg, tmp_path / "g", progress=False), G)
        # other settings: refused without overwrite
        other = dataclasses.replace(cfg, seed=2)
        with pytest.raises(ValueError, match="other settings.*--overwrite"):
            train_for_dataset(data, other, tmp_path / "g", progress=False)


def _no_training(*a, **k):
    raise AssertionError("trained although it should not have")


def test_resume_after_interruption_gives_the_same_weights(folder, tmp_path, monkeypatch):
    data = _data(folder)
    cfg = GeneratorTrainConfig(**TINY_TRAIN)
    whole = train_for_dataset(data, cfg, tmp_path / "whole", progress=False)

    real_save = train_mod._save_checkpoint
    saved = []

    def save_then_die(path, identity, step, *rest):
        real_save(path, identity, step, *rest)
        saved.append(step)
        if step == 4:
            raise KeyboardInterrupt  # killed right after the checkpoint of step 4

    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_for_dataset(data, cfg, tmp_path / "cut", progress=False)
    assert saved == [2, 4]
    assert (tmp_path / "cut" / "checkpoint.safetensors").is_file()
    assert not (tmp_path / "cut" / "generator.json").exists()
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    resumed = train_for_dataset(data, cfg, tmp_path / "cut", progress=False)
    assert _equal(whole, resumed)
    assert not (tmp_path / "cut" / "checkpoint.safetensors").exists()
    # a checkpoint of other settings is refused, and replaced with overwrite
    (tmp_path / "x").mkdir()
    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_for_dataset(data, cfg, tmp_path / "x", progress=False)
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    other = dataclasses.replace(cfg, seed=5)
    with pytest.raises(ValueError, match="checkpoint.*other settings"):
        train_for_dataset(data, other, tmp_path / "x", progress=False)
    train_for_dataset(data, other, tmp_path / "x", progress=False, overwrite=True)


def test_cache_reuse(folder, tmp_path, monkeypatch):
    data = _data(folder)
    cfg = GeneratorTrainConfig(**TINY_TRAIN)
    dc = DataConfig(dataset="imagefolder", root=str(folder), resolution=8)
    G = cached_generator(data, cfg, dc, cache_dir=tmp_path, progress=False)
    (entry,) = (tmp_path / "generators").iterdir()
    assert entry.name.startswith("imagefolder-8x8-")
    monkeypatch.setattr(train_mod, "train_generator", _no_training)
    assert _equal(cached_generator(data, cfg, dc, cache_dir=tmp_path, progress=False), G)
    assert fit_mod.cache_path(data, cfg, dc, tmp_path) == entry
    # other settings: another entry
    assert fit_mod.cache_path(data, dataclasses.replace(cfg, width=8), dc, tmp_path) != entry


def test_bad_resolution_refused_before_training(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_mod, "train_generator", _no_training)
    data = _data(folder, resolution=5)
    with pytest.raises(ValueError, match=r"--resolution 5: .*--resolution 4 or 6"):
        train_for_dataset(data, GeneratorTrainConfig(), tmp_path / "g")
    with pytest.raises(ValueError, match="--generator-stages 2 .*>= 3"):
        train_for_dataset(_data(folder), GeneratorTrainConfig(num_stages=2), tmp_path / "g")
    assert not (tmp_path / "g").exists()
    args = ["--dataset", "imagefolder", "--root", str(folder), "--resolution", "5", "-q"]
    rc = main(["generator", "train", *args, "--out", str(tmp_path / "g")])
    assert rc == 1 and "--resolution 5" in capsys.readouterr().err
    rc = main(
        ["distill", *args, "--generator", "auto", "--cache-dir", str(tmp_path / "c"),
         "--out", str(tmp_path / "run")]
    )  # fmt: skip
    assert rc == 1 and "--resolution 5" in capsys.readouterr().err
    assert not (tmp_path / "c" / "experts").exists()  # nothing trained


def test_cli_train_and_help(folder, tmp_path, capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["generator"]._actions:
        assert action.help
        if action.option_strings and action.dest not in ("help", "config"):
            assert "(default: " in action.help, action.option_strings
    base = ["generator", "train", "--dataset", "imagefolder", "--root", str(folder)]
    base += ["--resolution", "8", *TINY_TRAIN_ARGS, "-q", "--threads", "1"]
    rc = main([*base, "--out", str(tmp_path / "g")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "--generator " + str(tmp_path / "g") in out
    for name in ("generator.safetensors", "generator.json", "samples.png"):
        assert (tmp_path / "g" / name).is_file()
    rc = main([*base, "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0 and "--generator auto" in capsys.readouterr().out
    (entry,) = (tmp_path / "cache" / "generators").iterdir()
    assert _equal(load_generator(entry), load_generator(tmp_path / "g"))


def test_distill_generator_auto_end_to_end(folder, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ["distill", "--dataset", "imagefolder", "--root", str(folder), "--resolution", "8"]
    args += ["--generator", "auto", "--cache-dir", str(cache), "--out", str(out)]
    args += ["--generator-epochs", "1", "--generator-batch-size", "8", "--generator-width", "4"]
    args += ["--generator-latent-dim", "4", "--generator-d-width", "4"]
    args += ["--num-experts", "1", "--expert-train-epochs", "2", "--model-kwargs", '{"width": 4}']
    args += ["--last-stage", "2", "--syn-steps", "2", "--expert-epochs", "1"]
    args += ["--max-start-epoch", "1", "--crfd-models", "1", "--iterations-per-stage", "1"]
    args += ["--num-eval", "1", "--eval-epochs", "1", "--threads", "1", "-q"]
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    m = json.loads((out / "metrics.json").read_text())
    assert m["generator"] == "auto" and m["dataset"] == "imagefolder"
    assert m["run_config"]["generator_train"]["width"] == 4
    (entry,) = (cache / "generators").iterdir()
    assert (entry / "samples.png").is_file()
    # pretrained (the default) names the way out for a dataset without a shipped generator
    rc = main([*args[: args.index("--generator")], "--out", str(tmp_path / "r2"), "-q"])
    assert rc == 1 and "--generator auto" in capsys.readouterr().err
