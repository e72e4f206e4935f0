"""Scale: MTT renders only the images its schedules touch; many trajectories per iteration."""

from __future__ import annotations

import pytest
import torch
from test_hpd import TinyExperts, make, tiny_data, tiny_generator

from hpd_fast.distill import HPD
from hpd_fast.distill.state import RunState
from hpd_fast.distill.trajectory import batch_schedule, trajectory_matching_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _counting(G):
    """``G`` whose ``render`` records the batch size of every call while ``G.on``."""
    plain = G.render
    G.calls, G.on = [], False

    def render(w, f, stage):
        if G.on:
            G.calls.append(f.shape[0])
        return plain(w, f, stage)

    G.render = render
    return G


class _Counted(HPD):
    """Records the images rendered by each training step."""

    def _step(self, st, stage, it):
        G = self.generator
        G.calls, G.on = [], True
        try:
            return super()._step(st, stage, it)
        finally:
            G.on = False
            self.rendered[(stage, it)] = list(G.calls)


def _run(render_all: bool, data, experts, **kw):
    G = _counting(tiny_generator())
    args = {
        "model_kwargs": {"width": 4},
        "crfd_models": 1,
        "crfd_syn_augments": 2,
        "crfd_model_kwargs": {"width": 4},
        "iterations_per_stage": 3,
        "select_every": 1,
        "syn_steps": 2,
        "expert_epochs": 1,
        "lr_f": 0.5,
        "chunk_size": 2,
        **kw,
    }
    hpd = _Counted(G, data, ipc=2, algorithm="mtt", experts=experts, **args)
    hpd.rendered = {}
    hpd._render_all = render_all
    return hpd, hpd.fit(progress=False)


def _same(a, b):
    assert (a.stage, a.iteration, a.score) == (b.stage, b.iteration, b.score)
    assert a.losses == b.losses and a.history == b.history
    for name in ("images", "w", "f"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for k in a.stage_f:
        assert torch.equal(a.stage_f[k], b.stage_f[k])
        assert torch.equal(a.stage_w[k], b.stage_w[k])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"soft_labels": "onehot"},
        {"num_trajectories": 2, "chunk_size": 1},
        {"mtt_mode": "first_order", "chunk_size": 4},
    ],
)
def test_touched_images_only_equals_full_render(kw):
    """batch_syn < M: fewer images rendered, the same run bit for bit.

    Bit for bit needs the generator to give each image the same numbers whatever the size of
    its render chunk: true here for the full chunks of these cases (unions of 4 images in
    chunks of 2, or single-image chunks); a chunk of 1 against one of 2 differs by float32
    rounding (see test_odd_chunks_equal_to_rounding).
    """
    data = tiny_data()
    experts = TinyExperts(data)
    new, res_new = _run(False, data, experts, batch_syn=2, **kw)
    old, res_old = _run(True, data, experts, batch_syn=2, **kw)
    _same(res_new, res_old)
    m = new.labels.numel()
    assert m == 6
    fewer = 0
    for (stage, it), calls in new.rendered.items():
        union = set()
        for k in range(new.num_trajectories):
            seed = new._mtt_draw(stage, it, k)[2]
            for idx in batch_schedule(m, new.syn_steps, new.batch_syn, seed).indices:
                union |= set(idx.tolist())
        # forward and backward re-render: chunks of 2 over the union, twice
        assert sum(calls) == 2 * len(union), (stage, it)
        assert sum(old.rendered[(stage, it)]) == 2 * m
        fewer += len(union) < m
    assert fewer > 0


def test_odd_chunks_equal_to_rounding():
    """Unions of 5 in chunks of 2 render one image alone: the generator's float32 rounding
    for a batch of 1 differs from a batch of 2, so the run agrees to rounding only."""
    data = tiny_data()
    experts = TinyExperts(data)
    kw = {"batch_syn": 2, "num_trajectories": 2, "chunk_size": 2}
    _, a = _run(False, data, experts, **kw)
    _, b = _run(True, data, experts, **kw)
    assert [e["loss"] for e in a.losses] == pytest.approx([e["loss"] for e in b.losses], rel=1e-5)
    for k in a.stage_f:
        torch.testing.assert_close(a.stage_f[k], b.stage_f[k], rtol=1e-4, atol=1e-5)


def test_all_touched_renders_all_without_gather():
    data = tiny_data()
    experts = TinyExperts(data)
    new, res_new = _run(False, data, experts, batch_syn=2, syn_steps=3)  # 3 x 2 = all 6
    _, res_old = _run(True, data, experts, batch_syn=2, syn_steps=3)
    _same(res_new, res_old)
    for stage in (1, 2, 3):
        assert new._mtt_union(stage, 0) is None  # everything: no gather
    assert all(sum(c) == 12 for c in new.rendered.values())


def test_one_trajectory_draws_are_unchanged():
    """num_trajectories=1 keeps the draws of the step generator (e, s, then the seed)."""
    hpd = make("mtt")
    gen = hpd._rng("step", 2, 1)
    expect = tuple(hpd._draw(gen, n) for n in (hpd.num_experts, hpd.max_start_epoch, 2**62))
    assert hpd._mtt_draw(2, 1) == expect
    assert hpd._mtt_draw(2, 1, 1) != expect  # the extra pairs come from their own generator


def _grads(hpd: HPD, n: int | None = None):
    """One step's gradients of (w, f, syn_lr) from a fresh state (float64), no update."""
    if n is not None:
        hpd.num_trajectories = n
    w, f = hpd.generator.sample_latents(hpd.labels, 0)
    st = RunState()
    st.w = w.double().requires_grad_(True)
    st.f = f.double().requires_grad_(True)
    st.syn_lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    st.y = None
    value = hpd._mtt_backward(st, 1, 0, "here")
    return value, st.w.grad, st.f.grad, st.syn_lr.grad


class _OneTraj(HPD):
    """Trajectory ``pick`` of a K-trajectory iteration, alone."""

    pick = 0

    def _mtt_draw(self, stage, it, k=0):
        return super()._mtt_draw(stage, it, self.pick)


def test_k_trajectories_average_the_single_gradients():
    data = tiny_data()
    experts = TinyExperts(data)
    G = tiny_generator().double()

    def build(cls):
        h = cls(G, data, ipc=2, algorithm="mtt", experts=experts, syn_steps=2, expert_epochs=1,
                batch_syn=2, iterations_per_stage=1, model_kwargs={"width": 4})  # fmt: skip
        h.student = h.student.double()
        h._expert_pair = lambda e, s, _p=h._expert_pair: tuple(t.double() for t in _p(e, s))
        return h

    value, gw, gf, glr = _grads(build(HPD), 3)
    singles = []
    for k in range(3):
        one = build(_OneTraj)
        one.pick = k
        singles.append(_grads(one, 1))
    assert value == pytest.approx(sum(s[0] for s in singles) / 3, rel=1e-12)
    for i, g in ((1, gw), (2, gf), (3, glr)):
        ref = sum(s[i] for s in singles) / 3
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    # the three trajectories differ (else the test would prove little)
    assert not torch.allclose(singles[0][2], singles[1][2])
    # and trajectory 0 alone is the one-trajectory run's step
    torch.testing.assert_close(singles[0][2], _grads(build(HPD), 1)[2], rtol=0, atol=0)


def test_schedule_argument_is_checked():
    torch.manual_seed(0)
    from torch import nn

    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(3, 1, 2, 2)
    y = torch.tensor([0, 1, 0])
    p = sum(q.numel() for q in student.parameters())
    start, target = torch.zeros(p), torch.ones(p)
    lr = torch.tensor(0.1)
    sched = batch_schedule(3, 2, 2, seed=5)
    kw = {"syn_steps": 2}
    a = trajectory_matching_loss(student, x, y, lr, start, target, batch_syn=2, seed=5, **kw)
    b = trajectory_matching_loss(student, x, y, lr, start, target, schedule=sched, **kw)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="syn_steps"):
        trajectory_matching_loss(student, x, y, lr, start, target, syn_steps=3, schedule=sched)
    bad = type(sched)((torch.tensor([0, 3]), sched.indices[1]), sched.aug_seeds)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        trajectory_matching_loss(student, x, y, lr, start, target, schedule=bad, **kw)


def test_num_trajectories_reaches_hpd_and_the_run_identity():
    from hpd_fast import cli
    from hpd_fast.cli import build_parser

    ns = build_parser().parse_args(["distill", "--num-trajectories", "3"])
    cfg = cli._COMMANDS["distill"].resolve(ns, cli._COMMANDS)[0]
    assert cfg.hpd.mtt.num_trajectories == 3
    ns = build_parser().parse_args(["distill"])
    assert cli._COMMANDS["distill"].resolve(ns, cli._COMMANDS)[0].hpd.mtt.num_trajectories == 1
    # one trajectory: the recorded settings of earlier runs are unchanged (resume accepted)
    assert "num_trajectories" not in make("mtt").config["mtt"]
    assert make("mtt", num_trajectories=3).config["mtt"]["num_trajectories"] == 3
    with pytest.raises(Exception, match="num_trajectories"):
        make("mtt", num_trajectories=0)
