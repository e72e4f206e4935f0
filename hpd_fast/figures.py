"""Figures of a distillation run, as PNG files.

:meth:`hpd_fast.DistillResult.save` calls :func:`save_figures`, so a run saved from Python and
one saved by ``hpd-fast distill`` hold the same pictures:

``grid_chosen.png`` / ``grid_stage{k}.png`` (:func:`save_grid`)
    The chosen images / the best iterate of stage ``k``: one row per class, the class name at
    the left of its row, the class's ``ipc`` images along it (also at ``ipc == 1``). Larger
    sets fall back to a labelled, more compact layout (see :func:`grid_layout`).
``overview.png`` (:func:`save_overview`)
    Columns are classes (named above them); rows are random real images (when the result
    holds them), the best iterate of every stage and the chosen set; the first image of each
    class is shown.
``stages.png`` (:func:`save_stage_plot`)
    The distillation loss of every step, and the selection score of every scored iterate per
    stage; the score axis is named after the selection method (``CRFD (lower is better)``,
    ``minus evaluation accuracy (lower is better)``) and left out with ``select=last``.

The ``*_layout`` functions plan what goes where (rows, columns, labels) without drawing, so
the plan can be checked without looking at pixels. Drawing uses ``matplotlib.figure.Figure``
with the Agg renderer directly: no ``pyplot``, no display, no change to matplotlib's global
backend. Text is kept inside the picture with ``bbox_inches="tight"``; each file is written
beside its final name and renamed into place.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from hpd_fast.distill.result import DistillResult

__all__ = [
    "GridLayout",
    "OverviewLayout",
    "grid_layout",
    "overview_layout",
    "save_figures",
    "save_grid",
    "save_overview",
    "save_stage_plot",
    "score_axis_label",
    "selection_method",
]

#: One row per class up to this many classes; more use the compact layout.
MAX_GRID_CLASSES = 50
#: At most this many images per row; a class with more wraps over several rows.
MAX_GRID_COLUMNS = 20
#: The overview shows the first this-many classes (a note in the title says so).
MAX_OVERVIEW_CLASSES = 20

_CELL = 0.7  # inches per image in grids
_OVERVIEW_NAME_WIDTH = 12  # characters per line of a class name over an overview column
_DPI = 100


# ------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class GridLayout:
    """Where each image of a grid goes.

    Attributes:
        rows: ``(label, indices)`` per row, top to bottom; ``indices`` are positions in the
            image tensor, left to right; ``label`` is written at the left of the row ("" for
            the continuation rows of a wrapped class).
        ncols: columns of the grid.
        mode: ``"per-class"`` (one row per class), ``"wrapped"`` (one class per row, a class
            with more than :data:`MAX_GRID_COLUMNS` images over several rows) or ``"compact"``
            (more than :data:`MAX_GRID_CLASSES` classes: images in class order, left to right,
            each row labelled with the first and last class it holds).
        note: what the title says about a fallback layout (None for ``"per-class"``).
    """

    rows: list[tuple[str, list[int]]]
    ncols: int
    mode: str
    note: str | None = None


def _name(class_names: Sequence[str] | None, c: int) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return str(class_names[c])
    return str(c)


def grid_layout(
    labels: Tensor | Sequence[int],
    class_names: Sequence[str] | None = None,
    *,
    max_classes: int = MAX_GRID_CLASSES,
    max_columns: int = MAX_GRID_COLUMNS,
) -> GridLayout:
    """Plan a grid: one row per class, labelled with the class name, its images along it.

    With more than ``max_columns`` images in a class, the class wraps over several rows (the
    label on its first). With more than ``max_classes`` classes, a compact near-square layout
    in class order is used, each row labelled ``"first … last"`` with the classes it holds.

    Args:
        labels: class of every image (``[M]``); images are taken in this order within a class.
        class_names: names by class index (default: the index).
    """
    labels = torch.as_tensor(labels).detach().cpu().flatten()
    classes = sorted(set(labels.tolist()))
    if not classes:
        return GridLayout(rows=[], ncols=0, mode="per-class")
    members = {c: (labels == c).nonzero().flatten().tolist() for c in classes}
    widest = max(len(m) for m in members.values())
    if len(classes) <= max_classes and widest <= max_columns:
        rows = [(_name(class_names, c), members[c]) for c in classes]
        return GridLayout(rows=rows, ncols=widest, mode="per-class")
    if len(classes) <= max_classes:
        rows = []
        for c in classes:
            m = members[c]
            for start in range(0, len(m), max_columns):
                label = _name(class_names, c) if start == 0 else ""
                rows.append((label, m[start : start + max_columns]))
        spans = math.ceil(widest / max_columns)
        note = f"{widest} images per class: each class over up to {spans} rows of {max_columns}"
        return GridLayout(rows=rows, ncols=max_columns, mode="wrapped", note=note)
    # Many classes: class-major order in a near-square block; a row of whole classes where the
    # images per class allow it.
    order = [(c, i) for c in classes for i in members[c]]
    side = math.ceil(math.sqrt(len(order)))
    ncols = max(1, round(side / widest)) * widest if widest <= side else side
    rows = []
    for start in range(0, len(order), ncols):
        chunk = order[start : start + ncols]
        first, last = chunk[0][0], chunk[-1][0]
        label = _name(class_names, first)
        if last != first:
            label += " … " + _name(class_names, last)
        rows.append((label, [i for _, i in chunk]))
    note = (
        f"compact layout for {len(classes)} classes: class order, left to right; "
        "each row labelled with its first … last class"
    )
    return GridLayout(rows=rows, ncols=ncols, mode="compact", note=note)


@dataclass(frozen=True)
class OverviewLayout:
    """What the overview shows.

    Attributes:
        columns: ``(class index, class name)`` per column.
        rows: ``(label, source, indices)`` per row: ``source`` is ``"real"``, ``"stage{k}"`` or
            ``"chosen"``; ``indices[j]`` is the position (in that source's images) of the first
            image of column ``j``'s class, or None when the source has none.
        note: said in the title when only some classes are shown.
    """

    columns: list[tuple[int, str]]
    rows: list[tuple[str, str, list[int | None]]]
    note: str | None = None


def _classes(result: Any) -> Tensor:
    """The class of every image: ``result.classes`` (soft labels are [M, K]), else labels."""
    classes = getattr(result, "classes", None)
    return result.labels if classes is None else classes


def _firsts(labels: Tensor | None, classes: Sequence[int]) -> list[int | None]:
    if labels is None:
        return [None] * len(classes)
    labels = labels.detach().cpu().flatten()
    out: list[int | None] = []
    for c in classes:
        hit = (labels == c).nonzero().flatten()
        out.append(int(hit[0]) if hit.numel() else None)
    return out


def _stage_title(result: DistillResult, k: int) -> str:
    it = result.stage_best.get(k, {}).get("iteration")
    return f"stage {k}" if it is None else f"stage {k}, iterate {it}"


def overview_layout(
    result: DistillResult, *, max_classes: int = MAX_OVERVIEW_CLASSES
) -> OverviewLayout:
    """Plan the overview: a column per class (the first ``max_classes``), a row for the random
    real images (only when ``result.real_images`` is set), one per stage, one for the chosen
    set."""
    names = result.class_names
    if names is not None:
        num_classes = len(names)
    else:
        seen = [int(_classes(result).max()) + 1] if _classes(result).numel() else [0]
        if result.real_labels is not None and result.real_labels.numel():
            seen.append(int(result.real_labels.max()) + 1)
        num_classes = max(seen)
    shown = list(range(min(num_classes, max_classes)))
    note = None
    if len(shown) < num_classes:
        note = f"first {len(shown)} of {num_classes} classes"
    rows: list[tuple[str, str, list[int | None]]] = []
    if result.real_images is not None:
        rows.append(("random real", "real", _firsts(result.real_labels, shown)))
    for k in sorted(result.stage_images):
        label = _stage_title(result, k).replace(", ", "\n")
        rows.append((label, f"stage{k}", _firsts(_classes(result), shown)))
    chosen = f"chosen\nstage {result.stage}, iterate {result.iteration}"
    rows.append((chosen, "chosen", _firsts(_classes(result), shown)))
    return OverviewLayout(columns=[(c, _name(names, c)) for c in shown], rows=rows, note=note)


# ---------------------------------------------------------------------------------- selection
def selection_method(config: Mapping[str, Any], history: Sequence[Any] = ()) -> str | None:
    """The selection method of a run from its config: ``config["select"]`` as a name
    (``"crfd"``) or a section (``{"method": "crfd", ...}``), also under ``"run_config"``.
    Without either: ``"last"`` when nothing was scored, else None (unknown)."""
    for cfg in (config, config.get("run_config")):
        if not isinstance(cfg, Mapping):
            continue
        sel = cfg.get("select")
        if isinstance(sel, Mapping):
            sel = sel.get("method")
        if isinstance(sel, str):
            return sel
    return "last" if not history else None


def score_axis_label(method: str | None) -> str | None:
    """Label of the score axis for a selection method; None when nothing is scored."""
    if method == "last":
        return None
    if method == "crfd":
        return "CRFD (lower is better)"
    if method == "eval":
        return "minus evaluation accuracy (lower is better)"
    return "selection score (lower is better)"


# ------------------------------------------------------------------------------------ drawing
def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _write(fig: Figure, path: str | os.PathLike[str], dpi: int = _DPI) -> Path:
    """Save as PNG with all text inside, written beside ``path`` then renamed into place."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    fig.savefig(str(tmp), format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.08)
    os.replace(tmp, path)
    return path


def _show(ax: Axes, img: Tensor | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if img is None:
        return
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img[:3].permute(1, 2, 0).numpy(), interpolation="nearest")


def save_grid(
    pixels: Tensor,
    labels: Tensor,
    path: str | os.PathLike[str],
    title: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Save images as a PNG grid, one row per class with the class name at its left.

    Args:
        pixels: float ``[M, C, H, W]`` in [0, 1] (C = 1 is shown in grey, C = 3 as RGB).
        labels: int ``[M]``; see :func:`grid_layout` for the rows (and the fallbacks for more
            than 50 classes or 20 images per class, which the title then names).
        path: output file (``.png``).
        title: figure title.
        class_names: names by class index (default: the index).

    Returns:
        ``path`` as a ``Path``.
    """
    layout = grid_layout(labels, class_names)
    nrows, ncols = len(layout.rows), max(1, layout.ncols)
    head = "\n".join(t for t in (title, layout.note) if t)
    fig = _new_figure(_CELL * ncols, _CELL * max(1, nrows))
    axes = fig.subplots(max(1, nrows), ncols, squeeze=False)
    for r, (label, idxs) in enumerate(layout.rows):
        for c in range(ncols):
            _show(axes[r][c], pixels[idxs[c]] if c < len(idxs) else None)
        if label:
            axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0.06, hspace=0.06)
    if head:
        fig.suptitle(head, fontsize=9, y=1.0, va="bottom")
    return _write(fig, path)


def save_overview(
    result: DistillResult,
    path: str | os.PathLike[str],
    *,
    max_classes: int = MAX_OVERVIEW_CLASSES,
) -> Path:
    """One picture of the run: a column per class, rows of random real images (when
    ``result.real_images`` is set), each stage's best iterate and the chosen set; the first
    image of each class (see :func:`overview_layout`)."""
    layout = overview_layout(result, max_classes=max_classes)
    sources: dict[str, Tensor | None] = {
        "real": None if result.real_images is None else result.denormalized(result.real_images),
        "chosen": result.denormalized(),
    }
    for k, imgs in result.stage_images.items():
        sources[f"stage{k}"] = result.denormalized(imgs)
    nrows, ncols = len(layout.rows), max(1, len(layout.columns))
    # Column names wrapped to the width of a column; the header is as tall as the longest.
    heads = [textwrap.fill(name, _OVERVIEW_NAME_WIDTH) for _, name in layout.columns]
    header = 0.08 + 0.16 * max((h.count("\n") + 1 for h in heads), default=1)  # inches
    height = 0.8 * nrows + header
    fig = _new_figure(0.8 * ncols, height)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for r, (label, source, idxs) in enumerate(layout.rows):
        images = sources[source]
        for c, i in enumerate(idxs):
            _show(axes[r][c], None if i is None or images is None else images[i])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    for c, name in enumerate(heads):
        axes[0][c].set_title(name, fontsize=7.5, pad=3)
    top = 1 - header / height
    fig.subplots_adjust(left=0, right=1, bottom=0, top=top, wspace=0.1, hspace=0.08)
    head = "first image of each class"
    alg = result.config.get("algorithm") if isinstance(result.config, Mapping) else None
    if alg:
        head = f"{alg}: {head}"
    if layout.note:
        head += f" ({layout.note})"
    fig.suptitle(head, fontsize=9, y=1.0, va="bottom")
    return _write(fig, path)


def save_stage_plot(result: DistillResult, path: str | os.PathLike[str]) -> Path:
    """Loss of every step (all stages in a row) and, unless nothing was scored
    (``select=last``), the score of every scored iterate per stage, each stage's best
    iterate as a bar, the chosen one in red. The score axis is named after the selection
    method (:func:`score_axis_label`)."""
    import matplotlib

    method = selection_method(result.config, result.history)
    ylabel = score_axis_label(method)
    best = {k: v.get("score") for k, v in result.stage_best.items() if v.get("score") is not None}
    scored = ylabel is not None and bool(best or result.history)
    fig = _new_figure(10 if scored else 5.5, 3.6)
    if scored:
        ax_loss, ax_score = fig.subplots(1, 2)
    else:
        ax_loss, ax_score = fig.subplots(1, 1), None
    stages = sorted({e["stage"] for e in result.losses} | set(result.stage_best))
    colors = matplotlib.colormaps["viridis"]
    n = max(1, len(stages))
    per_stage = max(
        [e["iteration"] for e in result.losses] + [h["iteration"] for h in result.history],
        default=0,
    )
    for j, k in enumerate(stages):
        pts = [(e["iteration"], e["loss"]) for e in result.losses if e["stage"] == k]
        if pts:
            x = [j * per_stage + it for it, _ in pts]
            ax_loss.plot(x, [v for _, v in pts], color=colors(j / n), lw=1, label=f"stage {k}")
    for j in range(1, len(stages)):
        ax_loss.axvline(j * per_stage + 0.5, color="0.8", lw=0.8)
    ax_loss.set_xlabel("iteration (stages one after another)")
    ax_loss.set_ylabel("distillation loss")
    ax_loss.set_title("distillation loss per step", fontsize=10)
    if stages and result.losses:
        ax_loss.legend(fontsize=7)
    chosen = f"chosen: stage {result.stage}, iterate {result.iteration}"
    if ax_score is not None:
        ks = sorted(set(best) | {h["stage"] for h in result.history})
        for j, k in enumerate(ks):
            if k in best:  # the best score of the stage as a bar-wide line
                is_chosen = k == result.stage
                ax_score.hlines(
                    best[k],
                    j - 0.4,
                    j + 0.4,
                    colors="tab:red" if is_chosen else "0.5",
                    lw=3 if is_chosen else 2,
                )
            hist = result.history_of(k)
            if hist:
                xs = [j + (it / max(1, per_stage) - 0.5) * 0.8 for it, _ in hist]
                c = colors(stages.index(k) / n) if k in stages else "0.3"
                ax_score.plot(xs, [s for _, s in hist], "o-", ms=2, lw=0.8, color=c)
            if k == result.stage and result.score is not None:
                x = j + (result.iteration / max(1, per_stage) - 0.5) * 0.8
                ax_score.plot([x], [result.score], "*", ms=9, color="tab:red", zorder=5)
        ax_score.set_xticks(range(len(ks)), [str(k) for k in ks])
        scores = [sc for k in ks for _, sc in result.history_of(k)] or list(best.values())
        lo, hi = min(scores), max(scores)
        pad = 0.15 * (hi - lo) or 0.05 * abs(hi) or 1.0
        ax_score.set_ylim(lo - pad, hi + pad)  # the differences matter, not the distance to 0
        ax_score.set_xlim(-0.6, len(ks) - 0.4)
        ax_score.set_xlabel("stage (dots: scored iterates; bar: best of stage; red star: chosen)")
        ax_score.set_ylabel(ylabel)
        ax_score.set_title(f"selection ({method or 'score'}) — {chosen}", fontsize=10)
    else:
        ax_loss.set_title(f"distillation loss per step — {chosen} (select={method})", fontsize=10)
    fig.tight_layout()
    return _write(fig, path)


def save_figures(result: DistillResult, directory: str | os.PathLike[str]) -> list[Path]:
    """Every figure of a run into ``directory``: ``grid_chosen.png``, ``grid_stage{k}.png``,
    ``overview.png`` and ``stages.png``. Returns the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = result.class_names
    label = score_axis_label(selection_method(result.config, result.history))
    short = (label or "score").split(" (")[0]
    title = f"chosen: stage {result.stage}, iterate {result.iteration}"
    if result.score is not None:
        title += f" ({short} {result.score:.4g})"
    paths = [
        save_grid(result.denormalized(), _classes(result), out / "grid_chosen.png", title, names)
    ]
    for k, imgs in sorted(result.stage_images.items()):
        title = f"best of {_stage_title(result, k)}"
        score = result.stage_best.get(k, {}).get("score")
        if score is not None:
            title += f" ({short} {score:.4g})"
        path = out / f"grid_stage{k}.png"
        paths.append(save_grid(result.denormalized(imgs), _classes(result), path, title, names))
    paths.append(save_overview(result, out / "overview.png"))
    paths.append(save_stage_plot(result, out / "stages.png"))
    return paths
