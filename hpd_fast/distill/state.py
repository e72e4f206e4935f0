"""The state of an H-PD run and its checkpoint on disk.

A checkpoint is one safetensors file, ``checkpoint.safetensors``, holding every tensor of the
state (latents, optimiser buffers, the best iterate of each stage, pending candidates, CRFD class
means) and, in its metadata, the JSON of everything else; ``checkpoint.json`` is a readable copy
of that JSON (never read back). Both are written to a temporary name and renamed into place, so
a kill at any moment leaves the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from hpd_fast._common import settings_diff
from hpd_fast._files import atomic_save_tensors, atomic_write_text, describe_os_error

__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "Candidate",
    "RunState",
    "config_diff",
    "pack_optimizer",
    "private_copy",
    "read_checkpoint",
    "unpack_optimizer",
    "write_checkpoint",
]

FORMAT = "hpd_fast.HPDCheckpoint"
VERSION = 1
CHECKPOINT_FILE = "checkpoint.safetensors"


class CheckpointMismatchError(ValueError):
    """A checkpoint folder holds a checkpoint of a different run (the message says what
    differs)."""


class CheckpointCorruptError(ValueError):
    """The checkpoint file cannot be read (truncated, not safetensors, malformed state); the
    message names the file and says how to start afresh."""


def private_copy(t: Tensor) -> Tensor:
    """A detached private copy in the plain contiguous layout."""
    return t.detach().clone(memory_format=torch.contiguous_format)


@dataclass
class Candidate:
    """A scored (or to be scored) iterate: private copies of its latents."""

    iteration: int
    w: Tensor
    f: Tensor
    y: Tensor | None = None  # soft labels: the label logits of the iterate


class RunState:
    """Everything that changes during :meth:`HPD.fit` (what a checkpoint holds)."""

    def __init__(self) -> None:
        self.stage = 1
        self.iteration = 0
        self.finished = False
        self.w: Tensor = torch.empty(0)
        self.f: Tensor = torch.empty(0)
        self.syn_lr: Tensor = torch.zeros(())
        self.y: Tensor | None = None  # soft labels: label logits [M, K] (None: hard labels)
        self.opt: torch.optim.Optimizer | None = None
        self.opt_lr: torch.optim.Optimizer | None = None
        self.pending: list[Candidate] = []
        self.best: dict[int, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.losses: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}

    def add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def best_score(self) -> float | None:
        scores = [b["score"] for b in self.best.values() if b["score"] is not None]
        return min(scores) if scores else None


def pack_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, Tensor]) -> dict:
    """Optimiser state: tensors go into ``tensors`` (``prefix.state.i.key``), the rest to JSON."""
    sd = opt.state_dict()
    state_json: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        state_json[str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.state.{idx}.{key}"] = value
                state_json[str(idx)][key] = {"tensor": True}
            else:
                state_json[str(idx)][key] = value
    return {"param_groups": sd["param_groups"], "state": state_json}


def unpack_optimizer(
    opt: torch.optim.Optimizer,
    packed: Mapping[str, Any],
    prefix: str,
    tensors: Mapping[str, Tensor],
    device: torch.device,
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in packed["state"].items():
        state[int(idx)] = {
            key: tensors[f"{prefix}.state.{idx}.{key}"].to(device)
            if isinstance(value, dict) and value.get("tensor")
            else value
            for key, value in entry.items()
        }
    opt.load_state_dict({"param_groups": packed["param_groups"], "state": state})


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's run identity and the current one."""
    return settings_diff(a, b, ("checkpoint", "now"), summarised=())


def write_checkpoint(directory: Path, tensors: Mapping[str, Tensor], meta: dict[str, Any]) -> None:
    """Write the checkpoint atomically (temporary name, then rename)."""
    meta = {"format": FORMAT, "version": VERSION, **meta}
    text = json.dumps(meta)
    # A crash leaves the previous checkpoint intact (temporary name, fsync, rename).
    atomic_save_tensors(
        directory / CHECKPOINT_FILE, tensors, metadata={"format": FORMAT, "state": text}
    )
    # A readable copy of the state (the safetensors file is the one that is read back).
    atomic_write_text(directory / "checkpoint.json", json.dumps(meta, indent=1) + "\n")


def _row_runs(rows: Tensor) -> list[tuple[int, int]]:
    """Sorted distinct row indices as half-open runs ``[(a, b), ...]`` of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for r in rows.tolist():
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def read_checkpoint(
    directory: Path,
    identity: Mapping[str, Any],
    rows: Tensor | None = None,
    is_row: Callable[[str], bool] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """``(meta, tensors)`` of the checkpoint in ``directory`` (None when there is none).

    With ``rows`` (sorted int64 image indices), the tensors for which ``is_row(name)`` holds
    (those with one row per synthetic image) are read for those rows only, slice by slice from
    the file: a process owning part of the images never holds the others.

    Raises:
        CheckpointCorruptError: naming the file, when it is truncated or not an H-PD checkpoint.
        CheckpointMismatchError: when it belongs to a run whose identity differs from
            ``identity`` (the message lists what differs).
        PermissionError / OSError: naming the file, when it cannot be read.
    """
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    fresh = "; delete it or start afresh with --overwrite (overwrite=True)"

    def opened(read: Callable[[Any], Any]) -> Any:
        try:
            with safe_open(str(path), framework="pt") as fh:
                return read(fh)
        except OSError as exc:
            raise type(exc)(
                exc.errno, describe_os_error(exc, path, "cannot read the checkpoint")
            ) from None
        except (SafetensorError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointCorruptError(
                f"the checkpoint {str(path)!r} is damaged (truncated or not a safetensors file:"
                f" {exc}){fresh}"
            ) from None

    file_meta = opened(lambda fh: fh.metadata() or {})
    if file_meta.get("format") != FORMAT or "state" not in file_meta:
        raise CheckpointCorruptError(f"{str(path)!r} is not an H-PD checkpoint{fresh}")
    try:
        meta = json.loads(file_meta["state"])
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise CheckpointCorruptError(
            f"the checkpoint {str(path)!r} has a malformed state ({exc}){fresh}"
        ) from None
    if meta.get("config") != identity:
        diff = config_diff(meta.get("config", {}), identity)
        raise CheckpointMismatchError(
            f"checkpoint_dir {str(directory)!r} holds a checkpoint of a different "
            f"run ({'; '.join(diff[:6])}); use another directory or delete it"
        )
    runs = None if rows is None else _row_runs(rows)
    last = -1 if rows is None or rows.numel() == 0 else int(rows.max())

    def read(fh: Any) -> dict[str, Tensor]:
        out = {}
        for k in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
            # Fresh (aligned) copies: the kernels may round differently on the file buffer's
            # alignment, and a resumed run must repeat the uninterrupted one bit for bit.
            if runs is None or is_row is None or not is_row(k):
                out[k] = private_copy(fh.get_tensor(k))
                continue
            piece = fh.get_slice(k)
            shape = piece.get_shape()
            if not shape or shape[0] <= last:
                raise ValueError(f"tensor {k!r} of shape {shape} has no row {last}")
            out[k] = private_copy(torch.cat([piece[a:b] for a, b in runs]))
        return out

    return meta, opened(read)
