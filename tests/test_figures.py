"""Figures of a run (hpd_fast.figures) and the folder DistillResult.save writes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hpd_fast.distill.result import DistillResult
from hpd_fast.figures import (
    grid_layout,
    overview_layout,
    save_grid,
    save_stage_plot,
    score_axis_label,
    selection_method,
)

PNG = b"\x89PNG\r\n\x1a\n"


def make(
    num_classes=3,
    ipc=2,
    stages=(1, 2),
    select="crfd",
    real=True,
    names=("cat", "dog", "bird"),
    iters=4,
):
    """A small hand-made result: ``stages`` with ``iters`` steps each, scored at 0, 2, iters."""
    g = torch.Generator().manual_seed(0)
    m = num_classes * ipc
    labels = torch.arange(num_classes).repeat_interleave(ipc)

    def img():
        return torch.randn(m, 1, 4, 4, generator=g)

    history, losses, best = [], [], {}
    for k in stages:
        losses += [{"stage": k, "iteration": i, "loss": 1.0 / (k + i)} for i in range(1, iters + 1)]
        if select == "last":
            best[k] = {"iteration": iters, "score": None}
            continue
        pts = [(0, 3.0 - k), (2, 2.5 - k), (iters, 2.7 - k)]
        history += [{"stage": k, "iteration": i, "score": s} for i, s in pts]
        it, s = min(pts, key=lambda p: p[1])
        best[k] = {"iteration": it, "score": s}
    last = stages[-1]
    return DistillResult(
        images=img(),
        labels=labels,
        w=torch.randn(m, 5, generator=g),
        f=torch.randn(m, 2, 2, generator=g),
        stage=last,
        iteration=best[last]["iteration"],
        stage_images={k: img() for k in stages},
        stage_w={k: torch.randn(m, 5, generator=g) for k in stages},
        stage_f={k: torch.randn(m, 2, 2, generator=g) for k in stages},
        stage_best=best,
        history=history,
        losses=losses,
        timings={"total": 1.0},
        config={"algorithm": "dm", "ipc": ipc, "select": select},
        mean=(0.5,),
        std=(0.25,),
        real_images=img() if real else None,
        real_labels=labels.clone() if real else None,
        class_names=list(names) if names is not None else None,
    )


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------ saved folder


def test_save_writes_every_file(tmp_path):
    res = make(stages=(1, 2, 3))
    out = res.save(tmp_path / "run")
    assert (out / "tensors.safetensors").is_file() and (out / "summary.json").is_file()
    pngs = ["grid_chosen.png", "overview.png", "stages.png"]
    pngs += [f"grid_stage{k}.png" for k in (1, 2, 3)]
    for name in pngs:
        assert _is_png(out / name), name
    assert not list(out.glob("*.tmp"))  # every file renamed into place
    tensors = load_file(str(out / "tensors.safetensors"))
    assert torch.equal(tensors["real.images"], res.real_images)
    assert torch.equal(tensors["real.labels"], res.real_labels)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_names"] == ["cat", "dog", "bird"]


def test_save_without_figures(tmp_path):
    out = make().save(tmp_path / "run", figures=False)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "tensors.safetensors"]


def test_round_trip_of_the_new_fields(tmp_path):
    res = make()
    back = DistillResult.load(res.save(tmp_path / "run", figures=False))
    assert torch.equal(back.real_images, res.real_images)
    assert torch.equal(back.real_labels, res.real_labels)
    assert back.class_names == res.class_names
    assert torch.equal(back.images, res.images) and back.history == res.history
    assert back.stage_best == res.stage_best and back.config == res.config


def test_without_real_images_or_names(tmp_path):
    res = make(real=False, names=None)
    out = res.save(tmp_path / "run")
    assert "real.images" not in load_file(str(out / "tensors.safetensors"))
    assert "class_names" not in json.loads((out / "summary.json").read_text())
    back = DistillResult.load(out)
    assert back.real_images is None and back.real_labels is None and back.class_names is None
    assert _is_png(out / "overview.png")


def test_an_old_folder_still_loads(tmp_path):
    """A folder written before real images and class names were saved."""
    out = make().save(tmp_path / "run", figures=False)
    tensors = load_file(str(out / "tensors.safetensors"))
    del tensors["real.images"], tensors["real.labels"]
    meta = {"format": "hpd_fast.DistillResult"}
    save_file(tensors, str(out / "tensors.safetensors"), metadata=meta)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("class_names", "run_id", "tensors", "files"):  # none of these existed then
        del summary[key]
    (out / "summary.json").write_text(json.dumps(summary))
    back = DistillResult.load(out)
    assert back.real_images is None and back.real_labels is None and back.class_names is None
    back.save(tmp_path / "again")  # and draws its figures
    assert _is_png(tmp_path / "again" / "overview.png")


def test_real_images_and_labels_come_together():
    res = make()
    with pytest.raises(ValueError, match="together"):
        DistillResult(**{**res.__dict__, "real_labels": None})
    with pytest.raises(ValueError, match=r"real_labels \[N\]"):
        DistillResult(**{**res.__dict__, "real_labels": res.real_labels[:-1]})


# ------------------------------------------------------------------------------------ layouts


def test_grid_is_one_row_per_class_also_at_ipc_1():
    labels = torch.arange(10)  # ipc 1
    layout = grid_layout(labels, [f"c{i}" for i in range(10)])
    assert layout.mode == "per-class" and layout.ncols == 1 and layout.note is None
    assert layout.rows == [(f"c{i}", [i]) for i in range(10)]


def test_grid_rows_follow_the_classes_in_label_order():
    labels = torch.tensor([1, 0, 1, 0, 2, 2])
    layout = grid_layout(labels, ["a", "b", "c"])
    assert layout.rows == [("a", [1, 3]), ("b", [0, 2]), ("c", [4, 5])] and layout.ncols == 2
    assert [r[0] for r in grid_layout(labels).rows] == ["0", "1", "2"]  # no names: the index


def test_grid_fallbacks_are_labelled():
    wrapped = grid_layout(torch.arange(3).repeat_interleave(45), max_columns=20)
    assert wrapped.mode == "wrapped" and wrapped.ncols == 20 and wrapped.note
    assert [r[0] for r in wrapped.rows] == ["0", "", "", "1", "", "", "2", "", ""]
    assert [len(r[1]) for r in wrapped.rows[:3]] == [20, 20, 5]

    compact = grid_layout(torch.arange(100).repeat_interleave(2), max_classes=50)
    assert compact.mode == "compact" and "100 classes" in compact.note
    assert compact.ncols == 16  # near-square (~15), whole classes per row (8 classes of 2)
    assert compact.rows[0] == ("0 … 7", list(range(16)))
    assert sum(len(r[1]) for r in compact.rows) == 200


def test_overview_rows_and_columns():
    res = make(stages=(1, 2, 3))
    layout = overview_layout(res)
    assert layout.columns == [(0, "cat"), (1, "dog"), (2, "bird")] and layout.note is None
    assert [r[1] for r in layout.rows] == ["real", "stage1", "stage2", "stage3", "chosen"]
    assert layout.rows[0][0] == "random real"
    assert layout.rows[1][0] == "stage 1\niterate 2"
    assert layout.rows[-1][0] == "chosen\nstage 3, iterate 2"
    assert all(r[2] == [0, 2, 4] for r in layout.rows)  # first image of each class


def test_overview_without_real_images_and_with_many_classes():
    layout = overview_layout(make(real=False, names=None))
    assert [r[1] for r in layout.rows] == ["stage1", "stage2", "chosen"]
    assert [c for c, _ in layout.columns] == [0, 1, 2]
    many = overview_layout(make(num_classes=30, ipc=1, names=None), max_classes=20)
    assert len(many.columns) == 20 and many.note == "first 20 of 30 classes"


def test_score_axis_label_follows_the_selection_method():
    assert selection_method({"select": "crfd"}) == "crfd"
    assert selection_method({"select": {"method": "eval", "every": 10}}) == "eval"
    assert selection_method({"run_config": {"select": {"method": "last"}}}) == "last"
    assert selection_method({}) == "last"  # nothing scored
    assert selection_method({}, history=[{"stage": 1}]) is None
    assert score_axis_label("crfd") == "CRFD (lower is better)"
    assert score_axis_label("eval") == "minus evaluation accuracy (lower is better)"
    assert score_axis_label("last") is None
    assert score_axis_label(None) == "selection score (lower is better)"


@pytest.mark.parametrize(
    ("select", "label"),
    [
        ("crfd", "CRFD (lower is better)"),
        ({"method": "eval"}, "minus evaluation accuracy (lower is better)"),
        ("last", None),
    ],
)
def test_stage_plot_axes(tmp_path, monkeypatch, select, label):
    from matplotlib.figure import Figure

    figs = []
    real_savefig = Figure.savefig

    def savefig(self, *args, **kwargs):
        figs.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    res = make(select="last" if select == "last" else "crfd")
    res.config["select"] = select
    save_stage_plot(res, tmp_path / "stages.png")
    assert _is_png(tmp_path / "stages.png")
    (fig,) = figs
    ylabels = [ax.get_ylabel() for ax in fig.axes]
    assert ylabels[0] == "distillation loss"
    assert ylabels[1:] == ([] if label is None else [label])  # no score axis for select=last


def test_save_grid_draws_any_layout(tmp_path):
    for i, labels in enumerate([torch.arange(4), torch.arange(2).repeat_interleave(25)]):
        pixels = torch.rand(labels.numel(), 3, 4, 4)
        path = save_grid(pixels, labels, tmp_path / f"g{i}.png", title="t", class_names=["a", "b"])
        assert _is_png(path)


def test_save_grid_is_still_importable_from_result():
    from hpd_fast.distill import result

    assert result.save_grid is save_grid
