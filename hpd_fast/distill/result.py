"""The outcome of a distillation run, with saving and loading.

On disk (``DistillResult.save(dir)``)::

    dir/tensors.safetensors   images, labels, w, f (chosen set) and stage{k}.images / .w / .f
                              (the best iterate of every stage)
    dir/summary.json          chosen stage and iterate, scores history, losses, timings, config
    dir/grid_chosen.png       the chosen images, one row per class
    dir/grid_stage{k}.png     the best images of stage k

Tensors are written with safetensors (no pickle); :meth:`DistillResult.load` reads them back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["DistillResult", "save_grid"]

_FORMAT = "hpd_fast.DistillResult"
_VERSION = 1


@dataclass
class DistillResult:
    """A distilled set and how it was chosen.

    Attributes:
        images: float32 ``[M, C, H, W]`` chosen synthetic images, normalised like the dataset.
        labels: int64 ``[M]`` their classes (class-major: ``ipc`` images of class 0 first).
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
        }

    def save(self, directory: str | os.PathLike[str], *, grids: bool = True) -> Path:
        """Write tensors (safetensors), a JSON summary and PNG grids into ``directory``.

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
        tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
        save_file(tensors, str(out / "tensors.safetensors"), metadata={"format": _FORMAT})
        (out / "summary.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
        if grids:
            save_grid(
                self.denormalized(),
                self.labels,
                out / "grid_chosen.png",
                title=f"chosen: stage {self.stage}, iterate {self.iteration}",
            )
            for k, imgs in sorted(self.stage_images.items()):
                best = self.stage_best.get(k, {})
                title = f"stage {k}, iterate {best.get('iteration')}"
                if best.get("score") is not None:
                    title += f", score {best['score']:.4g}"
                save_grid(self.denormalized(imgs), self.labels, out / f"grid_stage{k}.png", title)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DistillResult:
        """Read a result written by :meth:`save`."""
        d = Path(directory)
        summary_path, tensor_path = d / "summary.json", d / "tensors.safetensors"
        for p in (summary_path, tensor_path):
            if not p.is_file():
                raise FileNotFoundError(f"{str(p)!r} not found: not a saved DistillResult")
        meta = json.loads(summary_path.read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{str(summary_path)!r} is not a {_FORMAT} summary")
        t = load_file(str(tensor_path))
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
        )


def save_grid(
    pixels: Tensor, labels: Tensor, path: str | os.PathLike[str], title: str | None = None
) -> None:
    """Save images as a PNG grid, one row per class (matplotlib, no display needed).

    Args:
        pixels: float ``[M, C, H, W]`` in [0, 1] (C = 1 is shown in grey, C = 3 as RGB).
        labels: int ``[M]``; images are grouped by label, one row per class present.
        path: output file (``.png``).
        title: optional figure title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    pixels = pixels.detach().float().cpu().clamp(0, 1)
    labels = labels.detach().cpu()
    classes = sorted(set(labels.tolist()))
    rows = [(labels == c).nonzero().flatten().tolist() for c in classes]
    ncols = max(len(r) for r in rows)
    order = [i for r in rows for i in r]
    if ncols == 1:
        # One image per class: the classes side by side, up to 10 per row.
        ncols = min(10, len(order))
        rows = [order[i : i + ncols] for i in range(0, len(order), ncols)]
    elif len(rows) * ncols > 400 or ncols > 20:
        # Large sets: a near-square layout instead of one row per class.
        ncols = math.ceil(math.sqrt(len(order)))
        rows = [order[i : i + ncols] for i in range(0, len(order), ncols)]
    nrows = len(rows)
    fig = Figure(figsize=(max(3.0, 0.7 * ncols), max(1.0, 0.7 * nrows + (0.4 if title else 0))))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for r, idxs in enumerate(rows):
        for cidx in range(ncols):
            ax = axes[r][cidx]
            ax.set_axis_off()
            if cidx < len(idxs):
                img = pixels[idxs[cidx]]
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(img[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.savefig(str(path), dpi=80)
