"""Learned soft labels (DATM): the exact label gradient against a float64 reference, the H-PD
loop end to end, checkpoints keeping labels and their optimiser state, results, evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hpd_fast import evaluate
from hpd_fast._common import derive_seed
from hpd_fast.config import ConfigError
from hpd_fast.distill import HPD, DistillResult
from hpd_fast.distill.state import RunState
from hpd_fast.distill.trajectory import trajectory_matching_loss
from hpd_fast.generators import pixels
from hpd_fast.models import get_model
from hpd_fast.params import functional_forward

sys.path.insert(0, str(Path(__file__).parent))
from test_hpd import SMALL, K, TinyExperts, _same, _Stop, tiny_data, tiny_generator  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _label_grads(mode: str, dtype: torch.dtype, m: int = 7):
    """d loss / d logits (through softmax) and d loss / d images, for one fixed problem."""
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = get_model("ConvNet", 1, 5, (8, 8), width=4, depth=1).to(dtype)
    p = sum(q.numel() for q in student.parameters())
    start = (0.3 * torch.randn(p, generator=gen)).to(dtype)
    target = start + (0.05 * torch.randn(p, generator=gen)).to(dtype)
    x = torch.randn(m, 1, 8, 8, generator=gen).to(dtype).requires_grad_(True)
    z = (2 * torch.randn(m, 5, generator=gen)).to(dtype).requires_grad_(True)
    lr = torch.tensor(0.1, dtype=dtype, requires_grad=True)
    loss = trajectory_matching_loss(
        student, x, torch.softmax(z, dim=1), lr, start, target,
        syn_steps=4, batch_syn=3, mode=mode, seed=5,
    )  # fmt: skip
    gz, gx, glr = torch.autograd.grad(loss, (z, x, lr))
    return loss.detach(), gz, gx, glr


def test_exact_label_gradient_matches_the_float64_unrolled_reference():
    ref = _label_grads("unrolled", F64)
    exact64 = _label_grads("exact", F64)
    for a, b in zip(exact64, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    exact32 = _label_grads("exact", torch.float32)
    # float32 against float64: the error of float32 itself (a few ulps of the gradient)
    scale = ref[1].abs().max()
    assert (exact32[1].double() - ref[1]).abs().max() < 1e-4 * scale
    assert ref[1].abs().max() > 0  # the labels do receive a gradient
    first = _label_grads("first_order", F64)
    assert not torch.allclose(first[1], ref[1], rtol=1e-3)  # an approximation, not the same


def _hpd(data, experts, **kw):
    args = {
        "ipc": 2,
        "algorithm": "mtt",
        "iterations_per_stage": 3,
        "select_every": 1,
        "syn_steps": 2,
        "expert_epochs": 1,
        "lr_f": 1.0,
        "soft_labels": "expert",
        "lr_y": 5.0,
        **SMALL,
        **kw,
    }
    return HPD(pixels(data), data, experts=experts, **args)


def test_initial_labels_onehot_and_expert():
    data = tiny_data()
    experts = TinyExperts(data)
    # lr_y = 0: the labels stay where they start
    h = _hpd(data, experts, soft_labels="onehot", lr_y=0.0)
    res = h.fit(progress=False)
    want = torch.full((2 * K, K), 0.1 / (K - 1))
    want[torch.arange(2 * K), torch.arange(K).repeat_interleave(2)] = 0.9
    assert torch.allclose(res.labels, want, atol=1e-6)
    h = _hpd(data, experts, lr_y=0.0)
    res = h.fit(progress=False)
    _, x0 = h.generator.sample_latents(h.labels, derive_seed(0, "latents"))
    logits = functional_forward(h.student, experts.trajectories[0][-1], x0)
    assert torch.allclose(res.labels, torch.softmax(logits, 1), atol=1e-6)
    assert torch.equal(res.classes, torch.arange(K).repeat_interleave(2))


def test_label_step_is_the_trajectory_gradient():
    """One step: logits move by ``-lr_y * dL/dz`` (``L`` on targets softmax(z))."""
    data = tiny_data()
    experts = TinyExperts(data)
    h = _hpd(data, experts, iterations_per_stage=1, select="last", lr_f=0.0)
    res = h.fit(progress=False)
    w, x0 = h.generator.sample_latents(h.labels, derive_seed(0, "latents"))
    z0 = h._initial_label_logits(w, x0, 1)
    h._y = z0.clone().requires_grad_(True)
    lr = torch.tensor(h.lr_teacher, requires_grad=True)
    (gz,) = torch.autograd.grad(h._loss(x0, 1, 0, lr), h._y)
    assert gz.abs().max() > 0
    assert torch.allclose(res.labels, torch.softmax(z0 - 5.0 * gz, 1), atol=1e-6)
    assert torch.equal(res.images, x0)  # lr_f = 0


def test_soft_labels_end_to_end_save_load_and_evaluate(tmp_path):
    data = tiny_data()
    res = _hpd(data, TinyExperts(data)).fit(progress=False)
    assert res.labels.shape == (2 * K, K) and res.labels.dtype == torch.float32
    assert torch.allclose(res.labels.sum(1), torch.ones(2 * K))
    assert res.config["soft_labels"] == {"init": "expert", "lr_y": 5.0, "momentum_y": 0.9}
    assert set(res.stage_labels) == {1}
    res.save(tmp_path)
    back = DistillResult.load(tmp_path)
    assert torch.equal(back.labels, res.labels) and torch.equal(back.classes, res.classes)
    assert torch.equal(back.stage_labels[1], res.stage_labels[1])
    assert (tmp_path / "grid_chosen.png").is_file() and (tmp_path / "overview.png").is_file()
    ev = evaluate(back.images, back.labels, data, num_eval=1, epochs=2, baseline=None,
                  model_kwargs={"ConvNet": {"width": 4}})  # fmt: skip
    assert ev["config"]["soft_labels"] is True


def test_soft_cross_entropy_of_evaluation_is_the_documented_one():
    """Training on soft labels minimises ``-sum_k y_k log softmax(logits)_k`` (mean over the
    batch): one step of evaluation's trainer equals that loss's SGD step."""
    from hpd_fast.evaluation import train_and_test

    data = tiny_data()
    x = torch.randn(4, 1, 8, 8)
    y = torch.softmax(torch.randn(4, K), 1)
    torch.manual_seed(3)
    a = get_model("ConvNet", 1, K, (8, 8), width=4)
    b = get_model("ConvNet", 1, K, (8, 8), width=4)
    b.load_state_dict(a.state_dict())
    train_and_test(a, x, y, data, epochs=1, lr=0.1, batch_size=4, augment=None, seed=0,
                   momentum=0.0, weight_decay=0.0, warmup=0.0)  # fmt: skip
    loss = -(y * F.log_softmax(b(x), 1)).sum(1).mean()
    grads = torch.autograd.grad(loss, list(b.parameters()))
    for p, q, g in zip(a.parameters(), b.parameters(), grads):
        assert torch.allclose(p, q - 0.1 * g, atol=1e-6)


def test_resume_keeps_labels_and_their_optimiser_state(tmp_path):
    data = tiny_data()
    experts = TinyExperts(data)
    kw = {"iterations_per_stage": 5, "checkpoint_every": 2}
    ref = _hpd(data, experts, checkpoint_dir=tmp_path / "a", **kw).fit(progress=False)

    def stop(info):
        if info["iteration"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        _hpd(data, experts, checkpoint_dir=tmp_path / "b", callback=stop, **kw).fit(progress=False)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "b" / "checkpoint.safetensors"))
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["iteration"] == 2
    h = _hpd(data, experts, checkpoint_dir=tmp_path / "b", **kw)
    st = RunState()
    h._load_checkpoint(st)
    assert torch.equal(st.y.detach(), saved["y"])  # bit-identical logits ...
    buf = st.opt.state[st.opt.param_groups[2]["params"][0]]["momentum_buffer"]
    assert torch.equal(buf, saved["opt.state.2.momentum_buffer"])  # ... and momentum
    assert st.opt.param_groups[2]["lr"] == 5.0 and st.opt.param_groups[2]["momentum"] == 0.9
    again = _hpd(data, experts, checkpoint_dir=tmp_path / "b", **kw).fit(progress=False)
    _same(again, ref)
    assert torch.equal(again.labels, ref.labels)
    # other label settings are another run
    with pytest.raises(ValueError, match="lr_y"):
        _hpd(data, experts, checkpoint_dir=tmp_path / "b", lr_y=1.0, **kw).fit(progress=False)


def test_soft_labels_through_generator_stages():
    data = tiny_data()
    h = HPD(tiny_generator(), data, ipc=1, algorithm="mtt", experts=TinyExperts(data),
            iterations_per_stage=2, select_every=1, syn_steps=2, expert_epochs=1,
            soft_labels="onehot", lr_y=10.0, **SMALL)  # fmt: skip
    res = h.fit(progress=False)
    assert set(res.stage_labels) == {1, 2, 3}
    assert torch.equal(res.labels, res.stage_labels[res.stage])
    assert not torch.allclose(res.stage_labels[1], res.stage_labels[3])


def test_bad_soft_label_settings_are_refused():
    data = tiny_data()
    with pytest.raises(ValueError, match="soft_labels='onehot' needs algorithm='mtt'"):
        HPD(pixels(data), data, algorithm="dm", soft_labels="onehot")
    with pytest.raises(ConfigError, match="soft_labels: invalid choice 'soft'"):
        HPD(pixels(data), data, algorithm="dm", soft_labels="soft")
    with pytest.raises(ConfigError, match="lr_y: must be a finite number >= 0"):
        HPD(pixels(data), data, algorithm="dm", lr_y=-1.0)


def test_cli_soft_label_options():
    from hpd_fast.cli import build_parser

    ns = build_parser().parse_args(
        ["distill", "--soft-labels", "expert", "--lr-y", "3", "--momentum-y", "0.5"]
    )
    assert ns.__dict__["hpd.soft_labels"] == "expert"
    assert (ns.__dict__["hpd.lr_y"], ns.__dict__["hpd.momentum_y"]) == (3.0, 0.5)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--soft-labels", "maybe"])
