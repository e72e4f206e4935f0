"""The expert cache: trained experts kept under a folder named by what decides their content.

``<cache root>/experts/<dataset>-<h>x<w>-<model>-e<epochs>-<digest>``, where the digest is the
first 10 hex digits of the sha256 of :func:`cache_settings` as sorted JSON. The number of
experts is not part of the name: asking for more later extends the same folder, and
:func:`~hpd_fast.experts.train_experts` refuses a folder whose experts were made with other
settings. The cache root is ``cache_dir``, else ``$HPD_FAST_CACHE``, else
``$XDG_CACHE_HOME/hpd_fast``, else ``~/.cache/hpd_fast``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from hpd_fast._common import logger
from hpd_fast._files import FolderLock, FolderLockedError
from hpd_fast.config import DataConfig, ExpertConfig
from hpd_fast.data.dataset import DistillData
from hpd_fast.experts.format import load
from hpd_fast.experts.train import train_experts
from hpd_fast.experts.trajectories import Experts

__all__ = ["cache_path", "cache_root", "cache_settings", "cached_experts"]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$HPD_FAST_CACHE``, else
    ``$XDG_CACHE_HOME/hpd_fast``, else ``~/.cache/hpd_fast``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HPD_FAST_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hpd_fast"


def cache_settings(
    data: DistillData, config: ExpertConfig, seed: int, data_config: DataConfig | None = None
) -> dict[str, Any]:
    """What decides the content of a set of experts: the cache key.

    ``root`` (resolved) and ``max_per_class`` come from ``data_config`` (None without it);
    the number of experts, ``vmap`` and ``group_size`` are not part of it. Momentum and weight
    decay appear only when non-zero, so that the keys of caches written before they were
    settings stay the same.
    """
    dc = data_config if data_config is not None else DataConfig()
    settings: dict[str, Any] = {
        "dataset": data.name,
        "root": str(Path(dc.root).resolve()) if dc.root else None,
        "resolution": list(data.im_size),
        "max_per_class": dc.max_per_class,
        "model": config.model,
        "model_kwargs": dict(config.model_kwargs or {}),
        "epochs": int(config.epochs),
        "lr": float(config.lr),
        "batch_size": int(config.batch_size),
        # The command line has always stored the word: "none" for no augmentation.
        "augment": "none" if config.augment is None else config.augment,
        "seed": int(seed),
    }
    if data.zca is not None:  # ZCA-whitened data (absent otherwise: earlier keys unchanged)
        settings["zca"] = data.zca.identity()
    if config.momentum:
        settings["momentum"] = float(config.momentum)
    if config.weight_decay:
        settings["weight_decay"] = float(config.weight_decay)
    return settings


def cache_path(
    data: DistillData, config: ExpertConfig, seed: int, data_config: DataConfig | None = None
) -> Path:
    """The cache folder of these experts:
    ``<cache_root(config.cache_dir)>/experts/<dataset>-<h>x<w>-<model>-e<epochs>-<digest>``."""
    settings = cache_settings(data, config, seed, data_config)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    h, w = data.im_size
    name = f"{data.name}-{h}x{w}-{config.model}-e{config.epochs}-{digest}"
    return cache_root(config.cache_dir) / "experts" / name


def cached_experts(
    data: DistillData,
    config: ExpertConfig,
    *,
    seed: int = 0,
    data_config: DataConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    group: Any = None,
    progress: bool | None = None,
) -> Experts:
    """Expert trajectories for ``config``: read from ``config.path`` when it is set, else
    from ``out`` or the cache (:func:`cache_path`), training the missing ones into it.

    Args:
        data: the real data the experts are (or were) trained on.
        config: the expert settings (:class:`hpd_fast.config.ExpertConfig`).
        seed: base seed of the experts (part of the cache key).
        data_config: how ``data`` was loaded (its ``root`` and ``max_per_class`` are part of
            the cache key).
        out: a folder to train / load the experts in instead of the cache folder.
        device, group, progress: as for :func:`~hpd_fast.experts.train_experts`.

    Raises:
        ValueError: both ``config.path`` and ``out``; experts at ``config.path`` trained on
            another dataset; or (from
            :func:`~hpd_fast.experts.train_experts`) a cache folder holding experts made with
            other settings.
    """
    if config.path and out is not None:
        raise ValueError(
            f"out={str(out)!r} and config.path={config.path!r}: give one (path: existing "
            "experts to read; out: where to train them)"
        )
    if config.path:
        experts = load(config.path)
        logger.info("expert trajectories: %s", config.path)
        if experts.dataset_name != data.name:
            raise ValueError(
                f"experts at {str(config.path)!r} were trained on {experts.dataset_name!r}, "
                f"but the dataset is {data.name!r}"
            )
        return experts
    if out is None:
        out = cache_path(data, config, seed, data_config)
    logger.info("expert trajectories: %s", out)
    digest = hashlib.sha256(
        json.dumps(cache_settings(data, config, seed, data_config), sort_keys=True).encode()
    ).hexdigest()[:16]
    lock = _lock_entry(Path(out), digest, group)
    try:
        return _train(data, config, seed, out, device, group, progress)
    finally:
        if lock is not None:
            lock.release()


def _lock_entry(out: Path, digest: str, group: Any) -> FolderLock | None:
    """One writer per expert folder: the first rank takes its lock. A holder with the same
    settings is waited for (its experts are then reused); one with other settings is an error
    naming its PID. Every rank of ``group`` learns the outcome."""
    from hpd_fast._distributed import rank_and_size

    rank, _ = rank_and_size(group)
    lock, error = None, None
    if rank == 0:
        lock = FolderLock(out, "hpd-fast expert training", {"settings": digest})
        try:
            if not lock.try_acquire():
                holder = lock.holder()
                if holder.get("settings") != digest:
                    lock.acquire()  # raises FolderLockedError naming the holder's PID
                logger.info(
                    "waiting for PID %s, which trains these experts into %s",
                    holder.get("pid", "?"),
                    out,
                )
                lock.acquire(wait=True)
        except (FolderLockedError, OSError) as exc:
            error = f"experts: {exc}"
    if group is not None:
        box = [error]
        torch.distributed.broadcast_object_list(
            box, src=torch.distributed.get_global_rank(group, 0), group=group
        )
        error = box[0]
    if error is not None:
        raise FolderLockedError(error, {})
    return lock


def _train(
    data: DistillData,
    config: ExpertConfig,
    seed: int,
    out: str | os.PathLike[str],
    device: Any,
    group: Any,
    progress: bool | None,
) -> Experts:
    return train_experts(
        data,
        config.model,
        num_experts=config.num_experts,
        epochs=config.epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        augment=config.augment,
        seed=seed,
        out=out,
        progress=progress,
        model_kwargs=config.model_kwargs,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        vmap=config.vmap,
        group_size=config.group_size,
        device=device,
        group=group,
    )
