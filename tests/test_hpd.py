"""The H-PD loop on tiny data: every algorithm through all stages, selection, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpd_fast.data.dataset import DistillData
from hpd_fast.distill import HPD, DistillResult, NonFiniteLossError
from hpd_fast.generators import ConvGenerator
from hpd_fast.models import get_model
from hpd_fast.params import flatten_params, param_layout

K = 3
SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_data(per_class: int = 8, seed: int = 0) -> DistillData:
    gen = torch.Generator().manual_seed(seed)
    proto = torch.randn(K, *SHAPE, generator=gen)

    def split(n):
        y = torch.arange(K).repeat_interleave(n)
        return proto[y] + 0.5 * torch.randn(len(y), *SHAPE, generator=gen), y

    xtr, ytr = split(per_class)
    xte, yte = split(3)
    return DistillData("tiny", xtr, ytr, xte, yte, ["a", "b", "c"], (0.5,), (0.25,))


def tiny_generator(num_classes: int = K, num_stages: int = 3) -> ConvGenerator:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        G = ConvGenerator(
            num_classes, SHAPE, latent_dim=4, width=4, num_stages=num_stages, mean=0.5, std=0.25
        )
        for stage in G.stages:  # non-trivial modulation (it starts at zero)
            nn.init.normal_(stage.film.weight, std=0.3)
    return G.eval()


class TinyExperts:
    """The minimal experts contract: trajectories [epochs + 1, P], model_config, lr, check."""

    def __init__(self, data: DistillData, num: int = 2, epochs: int = 3, lr: float = 0.05):
        self.model_config = {
            "name": "ConvNet",
            "channel": 1,
            "num_classes": K,
            "im_size": [8, 8],
            "kwargs": {"width": 4},
        }
        self.lr = lr
        self.trajectories = []
        for e in range(num):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(100 + e)
                net = get_model("ConvNet", 1, K, (8, 8), width=4)
            opt = torch.optim.SGD(net.parameters(), lr=lr)
            rows = [flatten_params(net)]
            for _ in range(epochs):
                loss = F.cross_entropy(net(data.train_images), data.train_labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                rows.append(flatten_params(net))
            self.trajectories.append(torch.stack(rows))
        self._layout = param_layout(net)

    def check_student(self, student):
        if param_layout(student) != self._layout:
            raise ValueError("student layout differs")


SMALL = {
    "model_kwargs": {"width": 4},
    "crfd_models": 1,
    "crfd_syn_augments": 2,
    "crfd_model_kwargs": {"width": 4},
    "batch_real": 4,
}


def make(algorithm="dm", data=None, G=None, experts=None, **kw) -> HPD:
    data = data or tiny_data()
    if algorithm == "mtt" and experts is None:
        experts = TinyExperts(data)
    args = {
        **SMALL,
        "iterations_per_stage": 3,
        "select_every": 2,
        "syn_steps": 2,
        "expert_epochs": 1,
        **kw,
    }
    return HPD(G or tiny_generator(), data, ipc=1, algorithm=algorithm, experts=experts, **args)


# --------------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("algorithm", ["mtt", "dm", "dc"])
def test_loop_runs_through_all_stages(algorithm):
    G = tiny_generator()
    rng = torch.get_rng_state()
    hpd = make(algorithm, G=G)
    res = hpd.fit(progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # only private, seeded generators
    n = hpd.iterations_per_stage
    assert [(e["stage"], e["iteration"]) for e in res.losses] == [
        (s, i) for s in (1, 2, 3) for i in range(1, n + 1)
    ]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in res.losses)
    # scored iterates: 0, every select_every, and the last one of every stage
    assert [(h["stage"], h["iteration"]) for h in res.history] == [
        (s, i) for s in (1, 2, 3) for i in (0, 2, 3)
    ]
    assert set(res.stage_images) == {1, 2, 3}
    assert res.images.shape == (K, *SHAPE) and torch.isfinite(res.images).all()
    assert res.labels.tolist() == [0, 1, 2]
    # the chosen set is the rendering of the chosen latents at the chosen stage
    torch.testing.assert_close(G.render(res.w, res.f, res.stage), res.images)
    assert res.f.shape[1:] == G.feature_shape(res.stage)
    # latents were optimised: the last stage differs from its starting point
    assert not torch.equal(res.stage_f[1], G.sample_latents(res.labels, 0)[1])
    if algorithm == "mtt":
        assert all("syn_lr" in e for e in res.losses)
    for key in ("total", "stage1", "stage3", "select"):
        assert res.timings[key] >= 0


def test_selection_picks_lowest_crfd_and_keeps_true_copies():
    seen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def record(info):
        seen[(info["stage"], info["iteration"])] = (info["w"].clone(), info["f"].clone())

    hpd = make("dm", iterations_per_stage=6, select_every=1, callback=record, lr_f=0.5)
    res = hpd.fit(progress=False)
    scores = {(h["stage"], h["iteration"]): h["score"] for h in res.history}
    best_key = min(scores, key=scores.get)
    assert (res.stage, res.iteration) == best_key
    assert res.score == scores[best_key]
    for stage in (1, 2, 3):
        per = {i: s for (k, i), s in scores.items() if k == stage}
        it = min(per, key=per.get)
        assert res.stage_best[stage] == {"iteration": it, "score": per[it]}
        if it > 0:  # the stored latents are those of that iterate, not of a later one
            w, f = seen[(stage, it)]
            assert torch.equal(res.stage_w[stage], w) and torch.equal(res.stage_f[stage], f)
    # the recorded score is the CRFD of the returned images
    assert hpd._crfd(res.images, res.labels) == pytest.approx(res.score, rel=1e-5)


class _FixedScores(HPD):
    """Scores that make iterate 1 the best of every stage (later steps must not alter it)."""

    def _score(self, cands, stage):
        return [0.0 if c.iteration == 1 else 1.0 + stage for c in cands]


def test_best_iterate_is_a_true_copy():
    seen = {}

    def record(info):
        seen[(info["stage"], info["iteration"])] = (info["w"].clone(), info["f"].clone())

    data = tiny_data()
    hpd = _FixedScores(
        tiny_generator(),
        data,
        ipc=1,
        algorithm="dm",
        iterations_per_stage=4,
        select_every=1,
        callback=record,
        **SMALL,
    )
    res = hpd.fit(progress=False)
    for stage in (1, 2, 3):
        assert res.stage_best[stage]["iteration"] == 1
        w1, f1 = seen[(stage, 1)]
        w4, f4 = seen[(stage, 4)]
        assert torch.equal(res.stage_w[stage], w1) and torch.equal(res.stage_f[stage], f1)
        assert not torch.equal(f1, f4)  # the optimiser kept moving after iterate 1
    assert (res.stage, res.iteration) == (1, 1)  # ties: the earliest stage wins


def test_select_last_and_continue_from_last():
    res = make("dm", select="last", continue_from="last").fit(progress=False)
    assert res.history == [] and res.stage == 3 and res.iteration == 3
    assert all(b["score"] is None for b in res.stage_best.values())


def test_select_by_evaluation():
    res = make(
        "dm", iterations_per_stage=2, select_every=2, select="eval",
        eval_kwargs={"num_eval": 1, "epochs": 2},
    ).fit(progress=False)  # fmt: skip
    assert [(h["stage"], h["iteration"]) for h in res.history] == [
        (s, i) for s in (1, 2, 3) for i in (0, 2)
    ]
    assert all(-100.0 <= h["score"] <= 0.0 for h in res.history)  # minus the accuracy
    assert res.score == min(h["score"] for h in res.history)


# ------------------------------------------------------------------------------- save / load


def test_result_save_and_load(tmp_path):
    res = make("dm").fit(progress=False)
    out = res.save(tmp_path / "run")
    for name in (
        "tensors.safetensors",
        "summary.json",
        "grid_chosen.png",
        "grid_stage1.png",
        "grid_stage3.png",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == res.stage and summary["config"]["algorithm"] == "dm"
    back = DistillResult.load(out)
    assert torch.equal(back.images, res.images) and torch.equal(back.labels, res.labels)
    assert torch.equal(back.stage_f[2], res.stage_f[2])
    assert back.history == res.history and back.losses == res.losses
    assert back.stage_best == res.stage_best and back.config == res.config
    with pytest.raises(FileNotFoundError):
        DistillResult.load(tmp_path / "nothing")


# ------------------------------------------------------------------------------------ resume


def _same(a: DistillResult, b: DistillResult) -> None:
    assert (a.stage, a.iteration) == (b.stage, b.iteration)
    assert torch.equal(a.images, b.images) and torch.equal(a.w, b.w) and torch.equal(a.f, b.f)
    for k in a.stage_f:
        assert torch.equal(a.stage_f[k], b.stage_f[k])
    assert a.history == b.history and a.losses == b.losses and a.stage_best == b.stage_best


class _Stop(Exception):
    pass


def test_max_snapshots_gives_the_same_run():
    """Rebuilding student snapshots (2 stored for 5 steps) changes memory, not one number."""
    data = tiny_data()
    experts = TinyExperts(data)
    kw = {"syn_steps": 5, "iterations_per_stage": 2}
    ref = make("mtt", data=data, experts=experts, max_snapshots=None, **kw).fit(progress=False)
    got = make("mtt", data=data, experts=experts, max_snapshots=2, **kw).fit(progress=False)
    _same(got, ref)


@pytest.mark.parametrize("algorithm", ["mtt", "dm"])
def test_resume_equals_uninterrupted(algorithm, tmp_path):
    data = tiny_data()
    experts = TinyExperts(data) if algorithm == "mtt" else None
    kw = {"iterations_per_stage": 4, "select_every": 1, "select_batch": 3, "checkpoint_every": 3}
    full = make(algorithm, data=data, experts=experts, checkpoint_dir=tmp_path / "a", **kw)
    ref = full.fit(progress=False)

    def stop(info):
        if (info["stage"], info["iteration"]) == (2, 2):
            raise _Stop

    first = make(
        algorithm, data=data, experts=experts, checkpoint_dir=tmp_path / "b", callback=stop, **kw
    )
    with pytest.raises(_Stop):
        first.fit(progress=False)
    state = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert (state["stage"], state["iteration"]) == (2, 0)  # the stage-boundary checkpoint
    again = make(algorithm, data=data, experts=experts, checkpoint_dir=tmp_path / "b", **kw)
    _same(again.fit(progress=False), ref)
    # a finished checkpoint gives the result back without running again
    calls = []
    done = make(
        algorithm,
        data=data,
        experts=experts,
        checkpoint_dir=tmp_path / "b",
        callback=calls.append,
        **kw,
    )
    _same(done.fit(progress=False), ref)
    assert calls == []


def test_checkpoint_of_another_run_is_refused(tmp_path):
    make("dm", checkpoint_dir=tmp_path).fit(progress=False)
    with pytest.raises(ValueError, match="different run.*lr_f"):
        make("dm", checkpoint_dir=tmp_path, lr_f=0.123).fit(progress=False)


# ------------------------------------------------------------------------------- bad input


class _NaNAt(HPD):
    """A loss that turns NaN at stage 2, iteration 2."""

    def _loss(self, images, stage, it, syn_lr):
        loss = super()._loss(images, stage, it, syn_lr)
        return loss * float("nan") if (stage, it + 1) == (2, 2) else loss


def test_non_finite_loss_names_stage_and_iteration_and_keeps_checkpoint(tmp_path):
    hpd = _NaNAt(
        tiny_generator(),
        tiny_data(),
        ipc=1,
        algorithm="dm",
        iterations_per_stage=3,
        checkpoint_dir=tmp_path,
        checkpoint_every=1,
        **SMALL,
    )
    with pytest.raises(NonFiniteLossError, match=r"stage 2, iteration 2.*checkpoint.*kept"):
        hpd.fit(progress=False)
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    assert (state["stage"], state["iteration"]) == (2, 1)
    assert (tmp_path / "checkpoint.safetensors").is_file()
    # the kept checkpoint is usable: the same run without the fault resumes from it
    res = HPD(
        tiny_generator(),
        tiny_data(),
        ipc=1,
        algorithm="dm",
        iterations_per_stage=3,
        checkpoint_dir=tmp_path,
        checkpoint_every=1,
        **SMALL,
    ).fit(progress=False)
    assert [(e["stage"], e["iteration"]) for e in res.losses] == [
        (s, i) for s in (1, 2, 3) for i in (1, 2, 3)
    ]


def test_bad_input():
    data = tiny_data()
    G = tiny_generator()
    with pytest.raises(ValueError, match="ipc"):
        HPD(G, data, ipc=0, algorithm="dm")
    with pytest.raises(ValueError, match="ipc"):
        HPD(G, data, ipc=1.5, algorithm="dm")
    with pytest.raises(ValueError, match="class counts disagree.*num_classes=4"):
        HPD(tiny_generator(num_classes=4), data, ipc=1, algorithm="dm")
    no_stages = tiny_generator()
    no_stages.num_stages = 0
    with pytest.raises(ValueError, match="no stages"):
        HPD(no_stages, data, ipc=1, algorithm="dm")
    with pytest.raises(TypeError, match="StagedGenerator"):
        HPD(nn.Linear(2, 2), data, ipc=1, algorithm="dm")
    with pytest.raises(ValueError, match="needs experts"):
        HPD(G, data, ipc=1, algorithm="mtt")
    with pytest.raises(ValueError, match="algorithm"):
        HPD(G, data, ipc=1, algorithm="kip")
    with pytest.raises(ValueError, match="select"):
        HPD(G, data, ipc=1, algorithm="dm", select="best")
    with pytest.raises(ValueError, match="last_stage"):
        HPD(G, data, ipc=1, algorithm="dm", last_stage=4)
    with pytest.raises(ValueError, match="lr_f"):
        HPD(G, data, ipc=1, algorithm="dm", lr_f=-1.0)
    with pytest.raises(ValueError, match="iterations_per_stage"):
        HPD(G, data, ipc=1, algorithm="dm", iterations_per_stage=0)
    experts = TinyExperts(data, epochs=2)
    with pytest.raises(ValueError, match="expert_epochs"):
        HPD(G, data, ipc=1, algorithm="mtt", experts=experts, expert_epochs=3)
    with pytest.raises(ValueError, match="max_start_epoch"):
        HPD(G, data, ipc=1, algorithm="mtt", experts=experts, expert_epochs=1, max_start_epoch=3)
    with pytest.raises(ValueError, match="batch_syn"):
        HPD(G, data, ipc=1, algorithm="mtt", experts=experts, expert_epochs=1, batch_syn=4)
    with pytest.raises(ValueError, match="max_snapshots"):
        HPD(G, data, ipc=1, algorithm="mtt", experts=experts, expert_epochs=1, max_snapshots=0)
    with pytest.raises(TypeError, match="experts must provide"):
        HPD(G, data, ipc=1, algorithm="mtt", experts=object())
    wrong = TinyExperts(data)
    wrong.model_config = {**wrong.model_config, "kwargs": {"width": 5}}
    with pytest.raises(ValueError, match="layout"):
        HPD(G, data, ipc=1, algorithm="mtt", experts=wrong)


def test_diverging_latents_are_named_not_chosen_silently():
    """A learning rate so large that the latents explode (finite but ~1e30) stops the run with
    the quantity and the fix named, instead of finishing with iterate 0 chosen."""
    hpd = make("dm", lr_w=1e30)
    with pytest.raises(NonFiniteLossError, match=r"latents w diverged.*lower lr_w \(--lr-w\)"):
        hpd.fit(progress=False)
    make("dm", lr_w=1.0).fit(progress=False)  # a large but sane rate runs
