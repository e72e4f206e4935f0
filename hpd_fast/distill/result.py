"""The outcome of a distillation run, with saving and loading.

On disk (``DistillResult.save(dir)``)::

    dir/tensors.safetensors   images, labels, w, f (chosen set) and stage{k}.images / .w / .f
                              (the best iterate of every stage) and, when the result holds
                              them, real.images / real.labels (random real images)
    dir/summary.json          chosen stage and iterate, scores history, losses, timings, config
                              (and class_names when known)
    dir/grid_chosen.png       the chosen images, one row per class
    dir/grid_stage{k}.png     the best images of stage k
    dir/overview.png          a column per class: random real, every stage's best, the chosen
    dir/stages.png            loss per step and selection score per stage

The figures are drawn by :mod:`hpd_fast.figures` (the CLI writes the same folder through
:meth:`DistillResult.save`). Tensors are written with safetensors (no pickle).

Whole or absent: ``summary.json`` is the manifest and is written last. :meth:`DistillResult.save`
first removes the previous manifest (and the files of the previous result that the new one does
not write), then writes every file beside its name and renames it into place, then the manifest.
The manifest and the tensors carry one ``run_id`` (a digest of the tensors and the choice they
record) and the manifest lists every tensor's shape; :meth:`DistillResult.load` refuses a folder
whose tensors do not belong to its summary (e.g. a save killed after the tensors were replaced),
naming the files. Folders written before the run id existed still load.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hpd_fast._files import atomic_save_tensors, atomic_write_text, describe_os_error
from hpd_fast.figures import save_figures, save_grid

__all__ = ["RESULT_FILES", "DistillResult", "IncompleteResultError", "save_grid"]

# Every file a saved result consists of (glob patterns), with their temporary names.
RESULT_FILES = (
    "summary.json",
    "tensors.safetensors",
    "grid_chosen.png",
    "grid_stage*.png",
    "overview.png",
    "stages.png",
)


class IncompleteResultError(ValueError):
    """A result folder whose files do not belong together (an interrupted save), or a file
    that cannot be read; the message names the file."""


def _is_result_file(name: str) -> bool:
    """One of :data:`RESULT_FILES` or its temporary name (``x.json.tmp``, ``x.tmp`` for PNGs)."""
    base = name[: -len(".tmp")] if name.endswith(".tmp") else name
    return any(
        fnmatch.fnmatchcase(base, pat) or fnmatch.fnmatchcase(base + ".png", pat)
        for pat in RESULT_FILES
    )


def _run_id(tensors: dict[str, Tensor], identity: dict[str, Any]) -> str:
    """Digest of the tensors (names, dtypes, shapes, bytes) and what the summary says of them."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _load_zca(tensors: dict[str, Tensor], meta: Any) -> Any:
    if meta is None:
        return None
    from hpd_fast.data.zca import ZCA

    return ZCA.from_state(tensors, meta, "zca")


_FORMAT = "hpd_fast.DistillResult"
_VERSION = 1


@dataclass
class DistillResult:
    """A distilled set and how it was chosen.

    Attributes:
        images: float32 ``[M, C, H, W]`` chosen synthetic images, normalised like the dataset.
        labels: int64 ``[M]`` their classes (class-major: ``ipc`` images of class 0 first), or
            float ``[M, K]`` learned soft labels (probabilities; ``HPD(soft_labels=...)``).
        w: the chosen latent code ``[M, *w_shape]``; f: the chosen feature ``[M, *f_shape]``
            at stage ``stage``.
        stage: the chosen stage (1-based); iteration: the chosen iterate within it (0 = the
            latents the stage started from, i = after i optimiser steps).
        stage_images, stage_w, stage_f: per stage ``k``, the best iterate's images and latents.
        stage_best: per stage ``k``, ``{"iteration": int, "score": float | None}``.
        history: every scored iterate, ``{"stage", "iteration", "score"}`` in order (the CRFD,
            or minus the evaluation accuracy with ``select="eval"``; lower is better).
        losses: one ``{"stage", "iteration", "loss"}`` per optimiser step (plus ``"syn_lr"`` for
            trajectory matching).
        timings: seconds: ``"total"``, ``"setup"``, ``"select"`` and ``"stage{k}"``.
        config: the settings of the run (JSON-able).
        mean, std: per-channel normalisation of the dataset (for de-normalised pictures).
        real_images: optional float32 ``[ipc * K, C, H, W]`` random real training images,
            normalised like the dataset (``dataset.random_real(ipc, seed)``), for the overview.
        real_labels: their classes, int64 ``[ipc * K]``; given together with ``real_images``.
        class_names: optional name of every class (``dataset.class_names``), for the figures.
        run_config: the resolved :class:`hpd_fast.config.RunConfig` of the run that made it
            (as a dict; :func:`hpd_fast.run.distill_run` fills it), so that
            ``hpd-fast distill --config <dir>/summary.json`` repeats the run.
        run_id: the digest that ties ``summary.json`` to ``tensors.safetensors`` (and to the
            run's ``metrics.json``); set by :meth:`save` and :meth:`load`.
        classes: int64 ``[M]`` the class of every image (for the figures); defaults to
            ``labels`` (hard) or ``labels.argmax(1)`` (soft).
        stage_labels: soft labels only: per stage ``k``, the best iterate's labels ``[M, K]``.
        zca: the dataset's :class:`~hpd_fast.data.zca.ZCA` when it was whitened (images are
            then whitened; :meth:`denormalized` un-whitens them for pictures), else None.
    """

    images: Tensor
    labels: Tensor
    w: Tensor
    f: Tensor
    stage: int
    iteration: int
    stage_images: dict[int, Tensor] = field(default_factory=dict)
    stage_w: dict[int, Tensor] = field(default_factory=dict)
    stage_f: dict[int, Tensor] = field(default_factory=dict)
    stage_best: dict[int, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    real_images: Tensor | None = None
    real_labels: Tensor | None = None
    class_names: list[str] | None = None
    run_config: dict[str, Any] | None = None
    run_id: str | None = None
    classes: Tensor | None = None
    stage_labels: dict[int, Tensor] = field(default_factory=dict)
    zca: Any = None

    def __post_init__(self) -> None:
        if self.classes is None:
            self.classes = self.labels.argmax(1) if self.labels.dim() == 2 else self.labels
        if (self.real_images is None) != (self.real_labels is None):
            raise ValueError("real_images and real_labels are given together (or neither)")
        x, y = self.real_images, self.real_labels
        if x is not None and y is not None and (x.dim() != 4 or tuple(y.shape) != x.shape[:1]):
            raise ValueError(
                f"real_images must be [N, C, H, W] and real_labels [N]; got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]

    @property
    def score(self) -> float | None:
        """Score of the chosen iterate (None when nothing was scored)."""
        return self.stage_best.get(self.stage, {}).get("score")

    def history_of(self, stage: int) -> list[tuple[int, float]]:
        """(iteration, score) pairs recorded at ``stage``."""
        return [(h["iteration"], h["score"]) for h in self.history if h["stage"] == stage]

    def denormalized(self, images: Tensor | None = None) -> Tensor:
        """Pixels in [0, 1] (clamped) of ``images`` (default: the chosen images)."""
        x = (self.images if images is None else images).detach().float().cpu()
        if self.zca is not None:  # whitened images: back to the dataset's normalisation
            x = self.zca.unwhiten(x.double()).float()
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------ save/load
    def summary(self) -> dict[str, Any]:
        """Everything but the tensors, as a JSON-able dict."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "stage": self.stage,
            "iteration": self.iteration,
            "score": self.score,
            "num_images": int(self.images.shape[0]),
            "image_shape": list(self.images.shape[1:]),
            "stages": sorted(self.stage_images),
            "stage_best": {str(k): v for k, v in sorted(self.stage_best.items())},
            "history": self.history,
            "losses": self.losses,
            "timings": self.timings,
            "config": self.config,
            "mean": list(self.mean),
            "std": list(self.std),
            **({} if self.class_names is None else {"class_names": self.class_names}),
            **({} if self.run_config is None else {"run_config": self.run_config}),
            **({} if self.zca is None else {"zca": self.zca.state_meta()}),
        }

    def save(self, directory: str | os.PathLike[str], *, figures: bool = True) -> Path:
        """Write tensors (safetensors), a JSON summary and the figures into ``directory``:
        the same folder ``hpd-fast distill`` writes (see the module docstring).

        Args:
            figures: also draw the PNGs (:func:`hpd_fast.figures.save_figures`).

        Returns:
            The directory as a ``Path`` (created if needed).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "images": self.images,
            "labels": self.labels,
            "w": self.w,
            "f": self.f,
        }
        for k in sorted(self.stage_images):
            tensors[f"stage{k}.images"] = self.stage_images[k]
            tensors[f"stage{k}.w"] = self.stage_w[k]
            tensors[f"stage{k}.f"] = self.stage_f[k]
        if self.real_images is not None and self.real_labels is not None:
            tensors["real.images"] = self.real_images
            tensors["real.labels"] = self.real_labels
        if self.labels.dim() == 2:  # soft labels: the classes, every stage's labels
            tensors["classes"] = self.classes
            tensors.update({f"stage{k}.labels": v for k, v in self.stage_labels.items()})
        if self.zca is not None:
            tensors.update(self.zca.state_tensors("zca"))
        tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
        summary = self.summary()
        summary["run_id"] = self.run_id = _run_id(
            tensors, {k: summary[k] for k in ("stage", "iteration", "config")}
        )
        summary["tensors"] = {n: list(t.shape) for n, t in sorted(tensors.items())}
        files = ["tensors.safetensors"]
        if figures:
            files += ["grid_chosen.png", "overview.png", "stages.png"]
            files += [f"grid_stage{k}.png" for k in sorted(self.stage_images)]
        summary["files"] = sorted(files)
        # The previous manifest goes first: until the new one is written the folder holds no
        # result at all, never the old summary beside new tensors. Then the previous result's
        # files that this one does not write (another run's stages).
        (out / "summary.json").unlink(missing_ok=True)
        keep = set(files) | {"summary.json"}
        for p in out.iterdir():
            if p.is_file() and _is_result_file(p.name) and p.name not in keep:
                p.unlink(missing_ok=True)
        atomic_save_tensors(
            out / "tensors.safetensors",
            tensors,
            metadata={"format": _FORMAT, "run_id": summary["run_id"]},
        )
        if figures:
            drawn = [p.name for p in save_figures(self, out)]
            summary["files"] = sorted({"tensors.safetensors", *drawn})
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DistillResult:
        """Read a result written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        d = Path(directory)
        summary_path, tensor_path = d / "summary.json", d / "tensors.safetensors"
        for p in (summary_path, tensor_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{str(p)!r} not found: {str(d)!r} holds no saved DistillResult (or its "
                    "save was interrupted: run it again)"
                )
        redo = "; run it again (hpd-fast distill --overwrite) or restore the folder"
        try:
            meta = json.loads(summary_path.read_text())
        except OSError as exc:
            raise type(exc)(
                exc.errno, describe_os_error(exc, summary_path, "cannot read")
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise IncompleteResultError(
                f"{str(summary_path)!r} is not valid JSON ({exc}){redo}"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{str(summary_path)!r} is not a {_FORMAT} summary")
        try:
            with safe_open(str(tensor_path), framework="pt") as fh:
                file_meta = fh.metadata() or {}
                t = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except OSError as exc:
            raise type(exc)(exc.errno, describe_os_error(exc, tensor_path, "cannot read")) from None
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise IncompleteResultError(
                f"{str(tensor_path)!r} is not a readable safetensors file ({exc}){redo}"
            ) from None
        want_id, got_id = meta.get("run_id"), file_meta.get("run_id")
        if want_id != got_id:
            raise IncompleteResultError(
                f"{str(tensor_path)!r} (run {got_id}) does not belong to {str(summary_path)!r} "
                f"(run {want_id}): an interrupted save mixed two runs{redo}"
            )
        shapes = meta.get("tensors")
        if want_id is not None:
            got = {n: list(v.shape) for n, v in t.items()}
            if not isinstance(shapes, dict) or got != shapes:
                raise IncompleteResultError(
                    f"{str(tensor_path)!r} holds tensors {got}, but {str(summary_path)!r} "
                    f"describes {shapes}{redo}"
                )
        try:
            stages = [int(k) for k in meta["stages"]]
            return cls(
                images=t["images"],
                labels=t["labels"],
                w=t["w"],
                f=t["f"],
                stage=int(meta["stage"]),
                iteration=int(meta["iteration"]),
                stage_images={k: t[f"stage{k}.images"] for k in stages},
                stage_w={k: t[f"stage{k}.w"] for k in stages},
                stage_f={k: t[f"stage{k}.f"] for k in stages},
                stage_best={int(k): v for k, v in meta["stage_best"].items()},
                history=meta["history"],
                losses=meta["losses"],
                timings=meta["timings"],
                config=meta["config"],
                mean=tuple(meta["mean"]),
                std=tuple(meta["std"]),
                real_images=t.get("real.images"),
                real_labels=t.get("real.labels"),
                class_names=meta.get("class_names"),
                run_config=meta.get("run_config"),
                run_id=want_id,
                classes=t.get("classes"),
                stage_labels={k: t[f"stage{k}.labels"] for k in stages if f"stage{k}.labels" in t},
                zca=_load_zca(t, meta.get("zca")),
            )
        except KeyError as exc:
            raise IncompleteResultError(
                f"{str(d)!r}: {exc.args[0]!r} is missing from {str(summary_path)!r} or "
                f"{str(tensor_path)!r}{redo}"
            ) from None
