"""The on-disk format of expert trajectories.

A folder holds one safetensors file per expert, ``expert_00000.safetensors``, ..., each with
the tensors ``trajectory`` [epochs + 1, P] (float32) and ``train_loss`` [epochs] and string
metadata: the format and version, the expert index, its final test accuracy and a JSON
``config`` (model name and constructor arguments, dataset name / shape / fingerprint, training
settings, the parameter layout). Files are written atomically (temporary name, fsync, rename),
so an interrupted run leaves only complete experts. A trajectory with a NaN or infinite value is
neither written nor read: the error names the expert (file) and the first such epoch.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hpd_fast._common import settings_diff
from hpd_fast._files import atomic_save_tensors, describe_os_error
from hpd_fast.experts.trajectories import Experts, _LazyTrajectories

__all__ = ["FORMAT", "VERSION", "NonFiniteExpertError", "expert_path", "load"]

FORMAT = "hpd_fast.experts"
VERSION = 1

_FILE_RE = re.compile(r"^expert_(\d+)\.safetensors$")
# Settings that must agree for stored experts to be reused (the rest is informational).
_COMPATIBLE_KEYS = ("model", "dataset", "training", "layout", "num_params")


class NonFiniteExpertError(FloatingPointError):
    """An expert trajectory holds NaN or infinite parameters (the message names the expert
    file or index and the first such epoch)."""


def _first_bad_epoch(traj: Tensor) -> int | None:
    """The first row (epoch) of ``traj`` [E + 1, P] with a non-finite value, or None."""
    bad = ~torch.isfinite(traj.reshape(traj.shape[0], -1)).all(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def expert_path(out: str | os.PathLike[str], index: int) -> Path:
    """File of expert ``index`` inside the folder ``out``: ``out/expert_00042.safetensors``."""
    return Path(out) / f"expert_{index:05d}.safetensors"


def _save_expert(
    path: Path, traj: Tensor, losses: Tensor, config: Mapping[str, Any], index: int, test_acc: float
) -> None:
    """Write one expert atomically: a temporary file, fsync, then a rename.

    Raises:
        NonFiniteExpertError: the trajectory holds NaN / inf (the expert diverged); nothing is
            written.
    """
    epoch = _first_bad_epoch(traj)
    if epoch is not None:
        raise NonFiniteExpertError(
            f"expert {index} diverged: its parameters are not finite after epoch {epoch} "
            f"(lr {config.get('training', {}).get('lr')!r}); lower the experts' learning rate "
            f"(--expert-lr); {str(path)!r} is not written"
        )
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "index": str(index),
        "test_accuracy": repr(float(test_acc)),
        "config": json.dumps(config, sort_keys=True),
    }
    atomic_save_tensors(
        path,
        {"trajectory": traj.contiguous(), "train_loss": losses.contiguous()},
        metadata=meta,
        tmp=path.with_name(f".{path.name}.tmp"),
    )


def _config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between stored and requested expert settings."""
    return settings_diff(a, b, ("stored", "requested"))


def _read_meta(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except OSError as exc:
        raise type(exc)(
            exc.errno, describe_os_error(exc, path, "cannot read the expert file")
        ) from None
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not an expert trajectory file (format={meta.get('format')!r}, "
            f"expected {FORMAT!r}; write them with hpd_fast.experts.train_experts or "
            "`hpd-fast experts`)"
        )
    if int(meta.get("version", "0")) > VERSION:
        raise ValueError(
            f"{str(path)!r} has format version {meta['version']}, newer than this hpd_fast "
            f"reads ({VERSION}); upgrade hpd_fast"
        )
    if "trajectory" not in keys or "config" not in meta:
        raise ValueError(f"{str(path)!r} lacks the 'trajectory' tensor or its config")
    return meta


def _read_expert(
    path: Path, lazy: bool = False
) -> tuple[dict[str, Any], Tensor | None, float | None]:
    """(config, trajectory [E + 1, P] or None when lazy, test accuracy) of one file."""
    from safetensors import SafetensorError, safe_open

    meta = _read_meta(path)
    redo = "; delete it to train it again"
    try:
        config = json.loads(meta["config"])
        want = [int(config["training"]["epochs"]) + 1, int(config["num_params"])]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{str(path)!r} has a malformed config: {exc!r}{redo}") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            shape = list(f.get_slice("trajectory").get_shape())
            traj = None if lazy else f.get_tensor("trajectory")
    except OSError as exc:
        raise type(exc)(
            exc.errno, describe_os_error(exc, path, "cannot read the expert file")
        ) from None
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{str(path)!r} is damaged (truncated or not a safetensors file: {exc}){redo}"
        ) from None
    if traj is not None:
        epoch = _first_bad_epoch(traj)
        if epoch is not None:
            raise NonFiniteExpertError(
                f"{str(path)!r}: the expert trajectory is not finite (NaN/inf) at epoch "
                f"{epoch}; this expert diverged or the file is damaged{redo}"
            )
    if shape != want:
        raise ValueError(
            f"{str(path)!r}: trajectory has shape {shape} but its config says {want} "
            "(epochs + 1, P)"
        )
    acc = meta.get("test_accuracy")
    value = None if acc in (None, "None") else float(acc)
    # Imported experts (published buffers) have no known accuracy: stored as NaN, read as None.
    return config, traj, (None if value is None or math.isnan(value) else value)


def load(path: str | os.PathLike[str], *, lazy: bool = False) -> Experts:
    """Read expert trajectories written by :func:`train_experts`.

    Args:
        path: a folder of ``expert_*.safetensors`` files (all are read, in index order), or
            one such file.
        lazy: keep only the file names and read trajectories on access
            (``experts.trajectories[i]`` reads one file; :meth:`Experts.pair` reads two rows).
            For expert sets larger than memory.

    Returns:
        :class:`Experts`; use :meth:`Experts.check_student` (or :meth:`Experts.make_student`)
        before matching a student against them.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without expert files.
        ValueError: a file that is not an expert trajectory file, or files made with
            different settings.
    """
    p = Path(path)
    if p.is_dir():
        found = sorted(
            (int(m.group(1)), p / name)
            for name in os.listdir(p)
            if (m := _FILE_RE.match(name)) is not None
        )
        if not found:
            raise FileNotFoundError(
                f"no expert trajectories in {str(p)!r} (expected expert_00000.safetensors, ... "
                "written by hpd_fast.experts.train_experts or `hpd-fast experts`)"
            )
    elif p.is_file():
        m = _FILE_RE.match(p.name)
        found = [(int(m.group(1)) if m else 0, p)]
    else:
        raise FileNotFoundError(
            f"no expert trajectories at {str(p)!r}: no such file or folder (train them with "
            "`hpd-fast experts --out PATH` or hpd_fast.experts.train_experts(..., out=PATH))"
        )
    config = None
    trajs: list[Tensor] = []
    accs: list[float | None] = []
    for _, file in found:
        cfg, traj, acc = _read_expert(file, lazy=lazy)
        if config is None:
            config = cfg
        else:
            diff = _config_diff(
                {k: config.get(k) for k in _COMPATIBLE_KEYS},
                {k: cfg.get(k) for k in _COMPATIBLE_KEYS},
            )
            if diff:
                raise ValueError(
                    f"{str(file)!r} was trained with different settings than "
                    f"{str(found[0][1])!r}: " + "; ".join(diff[:6])
                )
        if traj is not None:
            trajs.append(traj)
        accs.append(acc)
    assert config is not None
    files = [f for _, f in found]
    trajectories: Sequence[Tensor] = _LazyTrajectories(files) if lazy else trajs
    return Experts(
        trajectories,
        config,
        indices=[i for i, _ in found],
        test_accuracy=accs,
        path=p if p.is_dir() else p.parent,
    )
