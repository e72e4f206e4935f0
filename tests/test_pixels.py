"""Pixel space through the H-PD loop: the one-stage pixel generator, the pixel learning-rate
tables, MTT (three modes) / DM / DC on images, checkpoints, the CLI's ``--generator pixels``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from hpd_fast.config import ConfigError, HPDConfig, preset
from hpd_fast.distill import HPD
from hpd_fast.generators import PixelGenerator, pixels
from hpd_fast.render import render

sys.path.insert(0, str(Path(__file__).parent))
from test_hpd import SMALL, TinyExperts, _same, _Stop, tiny_data  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_real_init_draws_training_images_of_each_class():
    data = tiny_data(per_class=5)
    G = pixels(data, init="real")
    labels = torch.tensor([2, 0, 0, 1, 2, 2])
    w, f = G.sample_latents(labels, seed=3)
    assert w.shape == (6, 0) and f.shape == (6, 1, 8, 8) and G.num_stages == 1
    for img, c in zip(f, labels):
        hits = (data.train_images == img).flatten(1).all(1).nonzero().flatten()
        assert hits.numel() == 1 and int(data.train_labels[hits[0]]) == int(c)
    same = [(f[i] == f[j]).all() for i in range(6) for j in range(i + 1, 6)]
    assert not any(same)  # without replacement
    assert torch.equal(G.sample_latents(labels, 3)[1], f)  # seeded
    assert not torch.equal(G.sample_latents(labels, 4)[1], f)
    with pytest.raises(ValueError, match="init='real': class 0 has 5 training image"):
        G.sample_latents(torch.zeros(6, dtype=torch.long), 0)


def test_noise_init_and_bad_arguments():
    data = tiny_data()
    w, f = pixels(data, init="noise").sample_latents(torch.arange(3).repeat(100), 0)
    assert abs(float(f.mean())) < 0.05 and abs(float(f.std()) - 1) < 0.05
    with pytest.raises(ValueError, match="init must be one of real, noise"):
        pixels(data, init="zeros")
    with pytest.raises(TypeError, match="data must be a DistillData"):
        pixels(torch.zeros(3))
    with pytest.raises(ValueError, match="labels must lie in"):
        pixels(data).sample_latents(torch.tensor([5]), 0)


def test_render_is_the_identity_with_its_gradient():
    G = pixels(tiny_data())
    w = torch.zeros(4, 0, dtype=F64, requires_grad=True)
    f = torch.randn(4, 1, 8, 8, dtype=F64, requires_grad=True)
    for chunk in (None, 3):
        assert torch.equal(render(G, w, f, 1, chunk_size=chunk), f)
        assert torch.autograd.gradcheck(lambda f, c=chunk: render(G, w.detach(), f, 1, c), (f,))
    with pytest.raises(ValueError, match="stage must be in"):
        G.advance(w, f, 1)


def test_pixel_rates_come_from_their_own_table():
    cfg = HPDConfig()
    for alg in ("mtt", "dm", "dc"):
        got = HPDConfig(algorithm=alg).resolved("pixels")
        assert got.lr_f == cfg.pixel_per_algorithm[alg]["lr_f"]
        assert got.iterations_per_stage == cfg.pixel_per_algorithm[alg]["iterations_per_stage"]
        assert HPDConfig(algorithm=alg).resolved().lr_f == cfg.per_algorithm[alg]["lr_f"]
    published = preset("hpd-cifar").hpd.pixel_per_algorithm  # MTT / DC / DM image rates
    assert {a: published[a]["lr_f"] for a in published} == {"mtt": 1000, "dm": 1, "dc": 0.1}
    assert HPDConfig(lr_f=7.0).resolved("pixels").lr_f == 7.0  # explicit values win
    with pytest.raises(ConfigError, match="hpd.pixel_per_algorithm has no value"):
        HPDConfig(pixel_per_algorithm={}).resolved("pixels")
    data = tiny_data()
    h = HPD(pixels(data), data, algorithm="dm", **SMALL)
    assert h.lr_f == cfg.pixel_per_algorithm["dm"]["lr_f"]
    assert (h.first_stage, h.last_stage) == (1, 1)


@pytest.mark.parametrize(
    ("algorithm", "mode"),
    [("mtt", "exact"), ("mtt", "first_order"), ("mtt", "unrolled"), ("dm", None), ("dc", None)],
)
def test_every_loss_optimises_the_images(algorithm, mode):
    data = tiny_data()
    experts = TinyExperts(data) if algorithm == "mtt" else None
    kw = {"mtt_mode": mode} if mode else {}
    G = pixels(data)
    h = HPD(G, data, ipc=2, algorithm=algorithm, experts=experts, iterations_per_stage=3,
            select_every=1, syn_steps=2, expert_epochs=1, lr_f=0.5, **SMALL, **kw)  # fmt: skip
    res = h.fit(progress=False)
    assert res.stage == 1 and res.images.shape == (6, 1, 8, 8)
    assert torch.equal(res.images, res.f)  # the images are the latents
    assert len(res.losses) == 3 and all(e["stage"] == 1 for e in res.losses)
    last = h.render(torch.zeros(6, 0), res.stage_f[1], 1)
    assert torch.equal(last, res.images)
    assert res.config["generator"]["type"] == "PixelGenerator"


def test_first_step_moves_images_by_the_loss_gradient():
    """One SGD step (momentum buffer = gradient) of the pixel loop is ``-lr_f * dL/dX``."""
    data = tiny_data()
    experts = TinyExperts(data)
    kw = {"iterations_per_stage": 1, "select": "last", "syn_steps": 2, "expert_epochs": 1}
    h = HPD(pixels(data), data, algorithm="mtt", experts=experts, lr_f=3.0, **kw)
    res = h.fit(progress=False)
    from hpd_fast._common import derive_seed

    _, x0 = h.generator.sample_latents(h.labels, derive_seed(0, "latents"))
    x = x0.clone().requires_grad_(True)
    lr = torch.tensor(h.lr_teacher, requires_grad=True)
    (g,) = torch.autograd.grad(h._loss(x, 1, 0, lr), x)
    assert torch.allclose(res.images, x0 - 3.0 * g, atol=1e-6)


def test_resume_equals_uninterrupted(tmp_path):
    data = tiny_data()
    experts = TinyExperts(data)
    kw = {"iterations_per_stage": 5, "select_every": 1, "checkpoint_every": 2, "syn_steps": 2,
          "expert_epochs": 1, "lr_f": 1.0, **SMALL}  # fmt: skip
    ref = HPD(pixels(data), data, algorithm="mtt", experts=experts,
              checkpoint_dir=tmp_path / "a", **kw).fit(progress=False)  # fmt: skip

    def stop(info):
        if info["iteration"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        HPD(pixels(data), data, algorithm="mtt", experts=experts, checkpoint_dir=tmp_path / "b",
            callback=stop, **kw).fit(progress=False)  # fmt: skip
    state = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert state["iteration"] == 2
    again = HPD(pixels(data), data, algorithm="mtt", experts=experts,
                checkpoint_dir=tmp_path / "b", **kw).fit(progress=False)  # fmt: skip
    _same(again, ref)
    # another initialisation is another run
    with pytest.raises(ValueError, match="init"):
        HPD(pixels(data, init="noise"), data, algorithm="mtt", experts=experts,
            checkpoint_dir=tmp_path / "b", **kw).fit(progress=False)  # fmt: skip


def test_cli_distills_in_pixel_space(tmp_path):
    from hpd_fast.cli import build_parser, main

    args = build_parser().parse_args(["distill", "--generator", "pixels", "--pixel-init", "noise"])
    assert args.__dict__["generator.source"] == "pixels"
    assert args.__dict__["generator.pixel_init"] == "noise"
    out = tmp_path / "run"
    rc = main(["distill", "--generator", "pixels", "--algorithm", "dc", "--max-per-class", "10",
               "--iterations-per-stage", "2", "--match-model-kwargs", '{"width": 4}',
               "--crfd-models", "1", "--no-eval", "--out", str(out), "-q", "--threads", "1"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["generator"] == "pixels" and metrics["chosen_stage"] == 1
    assert metrics["hpd_config"]["lr_f"] == HPDConfig().pixel_per_algorithm["dc"]["lr_f"]
    assert metrics["hpd_config"]["generator"]["init"] == "real"
    assert (out / "grid_chosen.png").is_file()
    assert isinstance(pixels(tiny_data()), PixelGenerator)
