"""Training a :class:`ConvGenerator` for a dataset, into a folder or into the cache.

:func:`train_for_dataset` trains one on a :class:`~hpd_fast.data.DistillData` training split
with the settings of a :class:`~hpd_fast.config.GeneratorTrainConfig` and writes the folder::

    generator.safetensors   the weights (load with hpd_fast.generators.load_generator(folder))
    generator.json          constructor arguments, mean/std, the training settings
    samples.png             8 samples per class, one row per class
    checkpoint.safetensors  the training state while it runs (removed when done)

A killed run resumes from the checkpoint (same settings and data: same final weights); a
finished folder with the same settings is reused, one with other settings is refused. One
writer per folder (:class:`~hpd_fast._files.FolderLock`).

:func:`cached_generator` does the same in the cache (``hpd-fast distill --generator auto``):
``<cache root>/generators/<dataset>-<h>x<w>-<digest>``, the digest naming the settings and the
data (:func:`cache_settings`); the cache root is the expert cache's
(:func:`hpd_fast.experts.cache.cache_root`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from hpd_fast._common import logger
from hpd_fast.generators.convgen import ConvGenerator, stage_layout

__all__ = [
    "GENERATOR_NAME",
    "cache_path",
    "cache_settings",
    "cached_generator",
    "check_trainable",
    "train_for_dataset",
]

#: File stem of the generator in a training folder.
GENERATOR_NAME = "generator"
SAMPLES_NAME = "samples.png"
CHECKPOINT_NAME = "checkpoint.safetensors"
SAMPLES_PER_CLASS = 8


def _valid_sides(side: int) -> tuple[int | None, int | None]:
    """The nearest square sides below and above ``side`` that a ConvGenerator renders."""

    def ok(s: int) -> bool:
        try:
            stage_layout((1, s, s))
        except ValueError:
            return False
        return True

    below = next((s for s in range(side - 1, 3, -1) if ok(s)), None)
    above = next(s for s in range(max(side + 1, 4), 4 * side + 8) if ok(s))
    return below, above


def check_trainable(data: Any, config: Any) -> tuple[int, int, int]:
    """Refuse, naming the option, settings a ConvGenerator cannot be trained with for
    ``data`` (before any training). Returns the image shape ``(C, H, W)``.

    Raises:
        ValueError: a resolution the generator cannot render (``--resolution``), a stage
            count below the number of doublings plus one (``--generator-stages``).
    """
    shape = (int(data.channels), *(int(s) for s in data.im_size))
    _, h, w = shape
    try:
        stage_layout(shape)
    except ValueError as exc:
        side = min(h, w)
        if h != w:
            hint = "use a square --resolution"
        elif side < 4:
            hint = "use --resolution 4 or more"
        else:
            below, above = _valid_sides(side)
            pick = " or ".join(str(s) for s in (below, above) if s is not None)
            hint = f"use for example --resolution {pick}"
        raise ValueError(
            f"--resolution {side if h == w else f'{h}x{w}'}: the ConvGenerator cannot render "
            f"{h}x{w} images ({exc}); {hint}"
        ) from None
    if config.num_stages is not None:
        try:
            stage_layout(shape, int(config.num_stages))
        except ValueError as exc:
            raise ValueError(
                f"--generator-stages {config.num_stages} (generator train: --stages): {exc}"
            ) from None
    return shape


def _training_images(data: Any) -> torch.Tensor:
    """The training split in the generator's space: normalised, not ZCA-whitened (the
    whitening is applied after rendering)."""
    x = data.train_images
    if getattr(data, "zca", None) is not None:
        x = torch.cat([data.zca.unwhiten(x[a : a + 512]) for a in range(0, x.shape[0], 512)])
    return x


def cache_settings(data: Any, config: Any, data_config: Any = None) -> dict[str, Any]:
    """What decides the generator: the data (name, root, resolution, max_per_class, a
    fingerprint of the training split) and the training settings (not ``checkpoint_every``)."""
    from hpd_fast._common import data_fingerprint

    train = dataclasses.asdict(config)
    train.pop("checkpoint_every", None)
    root = getattr(data_config, "root", None)
    return {
        "dataset": data.name,
        "root": str(Path(root).expanduser().resolve()) if root else None,
        "resolution": list(data.im_size),
        "max_per_class": getattr(data_config, "max_per_class", None),
        "fingerprint": data_fingerprint(data),
        "train": train,
    }


def _digest(settings: dict[str, Any], n: int = 16) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:n]


def cache_path(
    data: Any,
    config: Any,
    data_config: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """``<cache root>/generators/<dataset>-<h>x<w>-<digest>``."""
    from hpd_fast.experts.cache import cache_root

    h, w = data.im_size
    name = f"{data.name}-{h}x{w}-{_digest(cache_settings(data, config, data_config), 10)}"
    return cache_root(cache_dir) / "generators" / name


def _finished(out: Path) -> dict[str, Any] | None:
    """The JSON of a finished generator in ``out`` (None when there is none)."""
    weights, meta = out / f"{GENERATOR_NAME}.safetensors", out / f"{GENERATOR_NAME}.json"
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(G: ConvGenerator, out: Path, labels: torch.Tensor, title: str) -> None:
    """samples.png, then the weights, then the JSON (the mark of a finished folder), each
    written under a temporary name and renamed into place."""
    from hpd_fast.figures import save_grid
    from hpd_fast.generators.io import save_generator

    with torch.no_grad():
        pixels = G.denormalize(G.sample(labels, 0)).clamp(0, 1)
    tmp_png = out / "samples.tmp.png"
    save_grid(pixels, labels, tmp_png, title=title)
    os.replace(tmp_png, out / SAMPLES_NAME)
    weights, meta = save_generator(G, out / f"{GENERATOR_NAME}.tmp")
    for src, suffix in ((weights, ".safetensors"), (meta, ".json")):
        _fsync(src)
        os.replace(src, out / f"{GENERATOR_NAME}{suffix}")


def train_for_dataset(
    data: Any,
    config: Any = None,
    out: str | os.PathLike[str] = "generator",
    *,
    data_config: Any = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    wait: bool = False,
) -> ConvGenerator:
    """Train a :class:`ConvGenerator` on ``data``'s training split into the folder ``out``.

    Args:
        data: a :class:`~hpd_fast.data.DistillData` (ZCA-whitened data: trained on the
            un-whitened images, as the generator renders them).
        config: a :class:`~hpd_fast.config.GeneratorTrainConfig` (default: its defaults, the
            settings of the shipped digits generator).
        out: the folder (see the module documentation for its files).
        data_config: how ``data`` was loaded (root and max_per_class join the settings that a
            finished folder must match).
        device: where to train (default the CPU).
        progress: True: a bar; None: a bar on a terminal, else log lines; False: quiet.
        overwrite: discard a generator or checkpoint of other settings in ``out`` instead of
            refusing (one of the same settings is reused / resumed all the same).
        wait: when another process trains into ``out``, wait for it instead of refusing.

    Returns:
        The generator (eval mode, CPU), also when the folder held it already.

    Raises:
        ValueError: settings the generator cannot work with (before training), or a folder
            holding a generator or checkpoint of other settings (without ``overwrite``).
        FolderLockedError: another process writes ``out`` (without ``wait``).
    """
    from hpd_fast._files import FolderLock
    from hpd_fast.config import GeneratorTrainConfig
    from hpd_fast.generators.io import load_generator
    from hpd_fast.generators.train import train_generator

    cfg = config if config is not None else GeneratorTrainConfig()
    check_trainable(data, cfg)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a folder")
    settings = cache_settings(data, cfg, data_config)
    key = _digest(settings)
    lock = FolderLock(out, "hpd-fast generator train", {"settings": key})
    if not lock.try_acquire():
        holder = lock.holder()
        if not wait or holder.get("settings") != key:
            lock.acquire()  # raises FolderLockedError naming the holder
        logger.info("waiting for PID %s, which trains this generator", holder.get("pid", "?"))
        lock.acquire(wait=True)
    try:
        meta = _finished(out)
        if meta is not None and (meta.get("training") or {}).get("key") == key:
            logger.info("generator: %s (trained before, reused)", out)
            return load_generator(out / GENERATOR_NAME)
        stale = [out / f"{GENERATOR_NAME}.safetensors", out / f"{GENERATOR_NAME}.json"]
        if meta is not None and not overwrite:  # a finished generator of other settings
            raise ValueError(
                f"out: {str(out)!r} holds a generator trained with other settings or data; "
                "pass --overwrite (overwrite=True) to replace it, or choose another folder"
            )
        ckpt = out / CHECKPOINT_NAME
        if overwrite:
            for p in [*stale, out / SAMPLES_NAME]:
                p.unlink(missing_ok=True)
        images = _training_images(data)
        logger.info(
            "training a generator for %s (%d images, %dx%d) into %s",
            data.name,
            images.shape[0],
            *data.im_size,
            out,
        )
        kwargs = dataclasses.asdict(cfg)
        every = kwargs.pop("checkpoint_every")

        def fit() -> ConvGenerator:
            return train_generator(
                images,
                data.train_labels,
                data.num_classes,
                mean=data.mean,
                std=data.std,
                **kwargs,
                progress=progress,
                checkpoint=ckpt,
                checkpoint_every=every,
                device=device,
            )

        try:
            G = fit()
        except ValueError as exc:
            if "checkpoint" not in str(exc):
                raise
            if not overwrite:
                raise ValueError(f"{exc}, or pass --overwrite (overwrite=True)") from None
            logger.info("discarding %s (%s)", ckpt, exc)
            ckpt.unlink(missing_ok=True)
            G = fit()
        G.training_config = {**G.training_config, "key": key, "data": settings}
        labels = torch.arange(data.num_classes).repeat_interleave(SAMPLES_PER_CLASS)
        _save(G, out, labels, f"generator samples: {data.name}, {G.training_config['steps']} steps")
        ckpt.unlink(missing_ok=True)
        logger.info("generator: %s", out)
        return G.eval()
    finally:
        lock.release()


def cached_generator(
    data: Any,
    config: Any = None,
    data_config: Any = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    group: Any = None,
) -> ConvGenerator:
    """The generator :func:`train_for_dataset` makes for these settings, from the cache
    (:func:`cache_path`), trained into it when missing. Under ``group`` the first rank trains
    and the others read its folder.
    """
    from hpd_fast._distributed import rank_and_size
    from hpd_fast.config import GeneratorTrainConfig
    from hpd_fast.generators.io import load_generator

    cfg = config if config is not None else GeneratorTrainConfig()
    check_trainable(data, cfg)
    path = cache_path(data, cfg, data_config, cache_dir)
    rank, _ = rank_and_size(group)
    G, error = None, None
    if rank == 0:
        logger.info("generator: %s", path)
        try:
            G = train_for_dataset(
                data,
                cfg,
                path,
                data_config=data_config,
                device=device,
                progress=progress,
                overwrite=True,  # the cache's own entry: replace what does not match
                wait=True,
            )
        except Exception as exc:  # told to every rank below
            if group is None:
                raise
            error = f"{type(exc).__name__}: {exc}"
    if group is not None:
        box = [error]
        torch.distributed.broadcast_object_list(
            box, src=torch.distributed.get_global_rank(group, 0), group=group
        )
        if box[0] is not None:
            raise RuntimeError(f"generator training failed on the first rank: {box[0]}")
        if G is None:
            G = load_generator(path / GENERATOR_NAME)
    assert G is not None
    return G
