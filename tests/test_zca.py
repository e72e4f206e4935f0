"""ZCA whitening: the transform against a float64 reference, the loader hook, H-PD's fixed
layer after rendering, results, experts and the evaluation refusing mismatched data."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from hpd_fast.config import DataConfig, ExpertConfig
from hpd_fast.data import load
from hpd_fast.data.registry import whiten
from hpd_fast.data.zca import MAX_ZCA_DIM, ZCA
from hpd_fast.distill import HPD, DistillResult
from hpd_fast.generators import pixels

sys.path.insert(0, str(Path(__file__).parent))
from test_hpd import SMALL, tiny_data, tiny_generator  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(x01: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kornia's ZCAWhitening (unbiased covariance, W = U diag(1/sqrt(S + eps)) U^T) as MTT
    calls it, written out in float64 with an SVD: (mean [D], W [D, D])."""
    flat = x01.reshape(x01.shape[0], -1).to(F64)
    mean = flat.mean(0)
    xc = flat - mean
    cov = xc.T @ xc / (flat.shape[0] - 1)
    u, s, _ = torch.linalg.svd(cov)
    return mean, u @ torch.diag(1.0 / torch.sqrt(s + reg)) @ u.T


def _normalised(n=37, shape=(2, 3, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x01 = torch.rand(n, *shape, generator=gen, dtype=F64)
    x01[:, 0] = 0.7 * x01[:, 0] + 0.2 * x01[:, 1]  # correlated channels
    mean, std = (0.4, 0.6), (0.2, 0.3)
    m = torch.tensor(mean, dtype=F64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=F64).view(1, -1, 1, 1)
    return x01, ((x01 - m) / s).float(), mean, std


@pytest.mark.parametrize("reg", [0.1, 1e-3])
def test_fit_and_whiten_match_the_float64_reference(reg):
    x01, xn, mean, std = _normalised()
    t = ZCA.fit(xn, mean, std, reg)
    mu, w = reference(xn.double() * torch.tensor(std, dtype=F64).view(1, -1, 1, 1)
                      + torch.tensor(mean, dtype=F64).view(1, -1, 1, 1), reg)  # fmt: skip
    assert torch.allclose(t.pixel_mean, mu, atol=1e-7)
    assert torch.allclose(t.matrix(F64), w, rtol=1e-6, atol=1e-6)
    want = ((x01.reshape(37, -1) - x01.reshape(37, -1).mean(0)) @ w).reshape(x01.shape)
    got = t.whiten(xn.double())
    assert torch.allclose(got, want, atol=1e-5)
    # the inverse brings normalised images back; float32 input works as well
    assert torch.allclose(t.unwhiten(got), xn.double(), atol=1e-6)
    assert torch.allclose(t.whiten(xn).double(), want, atol=1e-4)


def test_whiten_is_a_differentiable_layer():
    _, xn, mean, std = _normalised(n=9, shape=(2, 1, 3))
    t = ZCA.fit(xn, mean, std)
    x = torch.randn(3, 2, 1, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(t.whiten, (x,))
    assert torch.autograd.gradcheck(t.unwhiten, (x,))


def test_state_round_trip_and_fingerprint():
    _, xn, mean, std = _normalised()
    t = ZCA.fit(xn, mean, std)
    back = ZCA.from_state(t.state_tensors(), t.state_meta())
    assert back.fingerprint == t.fingerprint
    assert torch.equal(back.matrix(), t.matrix())
    other = ZCA.fit(xn[:20], mean, std)
    assert other.fingerprint != t.fingerprint
    meta = dict(t.state_meta(), fingerprint="0" * 16)
    with pytest.raises(ValueError, match="fingerprint"):
        ZCA.from_state(t.state_tensors(), meta)


def test_load_with_zca_whitens_both_splits_with_one_transform():
    plain = load("digits")
    data = load("digits", zca=True)
    t = data.zca
    assert isinstance(t, ZCA) and t.regularization == 0.1
    assert torch.allclose(data.train_images, t.whiten(plain.train_images), atol=1e-5)
    assert torch.allclose(data.test_images, t.whiten(plain.test_images), atol=1e-5)
    # the transform is the training split's: its whitened covariance is U S/(S+reg) U^T
    flat = data.train_images.reshape(len(data), -1).double()
    cov = torch.cov(flat.T)
    u, s = t.eigvecs, t.eigvals
    assert torch.allclose(cov, (u * (s / (s + 0.1))) @ u.T, atol=1e-4)
    # bit-reproducible (float64 on the CPU): the same fit gives the same bits
    again = load("digits", zca=True)
    assert torch.equal(again.train_images, data.train_images)
    assert again.zca.fingerprint == t.fingerprint
    assert "zca" in repr(data)
    # max_per_class: fitted on the capped training split
    capped = load("digits", zca=True, max_per_class=20)
    assert capped.zca.fingerprint != t.fingerprint


def test_zca_refusals_name_the_argument():
    with pytest.raises(ValueError, match="zca_regularization"):
        load("digits", zca=True, zca_regularization=0.0)
    with pytest.raises(ValueError, match="zca must be"):
        load("digits", zca="yes")
    side = 65  # 3 * 65 * 65 > MAX_ZCA_DIM: refused before any large allocation
    assert 3 * side * side > MAX_ZCA_DIM
    with pytest.raises(ValueError, match=r"zca: whitening 3x65x65 images needs"):
        ZCA.fit(torch.zeros(4, 3, side, side), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(ValueError, match="at least 2"):
        ZCA.fit(torch.zeros(1, 1, 2, 2), (0.5,), (0.2,))
    data = load("digits", zca=True)
    with pytest.raises(ValueError, match="already ZCA-whitened"):
        whiten(data)


def _tiny_zca():
    return whiten(tiny_data())


def test_hpd_whitens_generator_images_before_losses_and_results(tmp_path):
    data = _tiny_zca()
    G = tiny_generator()
    seen = []

    class Recording(HPD):
        def _loss(self, images, stage, it, syn_lr):
            loss = super()._loss(images, stage, it, syn_lr)
            seen.append(self._to_data(images.detach()))
            return loss

    h = Recording(G, data, ipc=1, algorithm="dm", iterations_per_stage=2, select_every=1,
                  last_stage=2, **SMALL)  # fmt: skip
    w, f = G.sample_latents(h.labels, 0)
    # the images the loop scores and returns: the generator's, whitened by the fixed layer
    assert torch.allclose(h.render(w, f, 1), data.zca.whiten(G.render(w, f, 1)), atol=1e-6)
    res = h.fit(progress=False)
    assert len(seen) == 4
    assert res.zca is data.zca and h.config["dataset"]["zca"] == data.zca.identity()
    # the result holds whitened images (evaluation's space); pictures are un-whitened
    chosen_latents_images = G.render(res.w, res.f, res.stage)
    assert torch.allclose(res.images, data.zca.whiten(chosen_latents_images), atol=1e-5)
    pic = res.denormalized()
    want = (chosen_latents_images * 0.25 + 0.5).clamp(0, 1)
    assert torch.allclose(pic, want, atol=1e-4)
    res.save(tmp_path)
    back = DistillResult.load(tmp_path)
    assert back.zca.fingerprint == data.zca.fingerprint
    assert torch.allclose(back.denormalized(), pic)
    assert (tmp_path / "overview.png").is_file()


def test_pixel_generator_lives_in_the_whitened_space():
    data = _tiny_zca()
    G = pixels(data)
    h = HPD(G, data, ipc=1, algorithm="dm", iterations_per_stage=1, select="last", **SMALL)
    w, f = G.sample_latents(h.labels, 0)
    assert torch.equal(h.render(w, f, 1), f)  # no second whitening
    assert h.config["generator"]["zca"] == data.zca.identity()
    with pytest.raises(ValueError, match="generator: the pixel generator holds un-whitened"):
        HPD(pixels(tiny_data()), data, ipc=1, algorithm="dm")
    with pytest.raises(ValueError, match="generator: the pixel generator holds ZCA-whitened"):
        HPD(G, tiny_data(), ipc=1, algorithm="dm")


def test_experts_record_zca_and_mismatched_experts_are_refused(tmp_path):
    from hpd_fast.experts import train_experts
    from hpd_fast.experts.cache import cache_settings

    plain = tiny_data()
    data = _tiny_zca()
    kw = {"num_experts": 1, "epochs": 2, "model_kwargs": {"width": 4}, "augment": None}
    ex_plain = train_experts(plain, "ConvNet", out=tmp_path / "plain", progress=False, **kw)
    ex_zca = train_experts(data, "ConvNet", out=tmp_path / "zca", progress=False, **kw)
    assert "zca" not in ex_plain.dataset
    assert ex_zca.dataset["zca"] == data.zca.identity()
    mtt = {"iterations_per_stage": 1, "syn_steps": 2, "expert_epochs": 1, "select": "last"}
    HPD(pixels(data), data, algorithm="mtt", experts=ex_zca, **mtt)  # accepted
    with pytest.raises(ValueError, match=r"experts were trained on un-whitened images.*--zca"):
        HPD(pixels(data), data, algorithm="mtt", experts=ex_plain, **mtt)
    with pytest.raises(ValueError, match=r"experts were trained on ZCA-whitened images"):
        HPD(pixels(plain), plain, algorithm="mtt", experts=ex_zca, **mtt)
    # the cache key tells whitened data apart (the folder of plain data keeps its key)
    cfg = ExpertConfig()
    assert "zca" not in cache_settings(plain, cfg, 0)
    assert cache_settings(data, cfg, 0)["zca"] == data.zca.identity()


def test_distill_run_and_evaluate_run_with_zca(tmp_path):
    from hpd_fast.config import preset
    from hpd_fast.run import distill_run, evaluate_run

    cfg = preset("digits")
    cfg.data = DataConfig(dataset="digits", max_per_class=10, zca=True)
    cfg.generator.source = "pixels"
    cfg.hpd.algorithm = "dm"
    cfg.hpd.iterations_per_stage = 2
    cfg.hpd.select.method = "last"
    cfg.hpd.match.model_kwargs = {"width": 4}
    cfg.eval.enabled = False
    cfg.out = str(tmp_path / "run")
    out = distill_run(cfg, device="cpu", progress=False)
    assert out.result.zca is not None
    assert out.metrics["run_config"]["data"]["zca"] is True
    ev = evaluate_run(
        out.out,
        dataclasses.replace(cfg.eval, num_eval=1, epochs=2, baseline="none"),
        progress=False,
    )
    assert ev["config"]["dataset"] == "digits"
    # the same run evaluated on un-whitened data is refused, naming zca
    with pytest.raises(ValueError, match="zca: the set .* holds ZCA-whitened images"):
        evaluate_run(out.out, data_config=DataConfig(dataset="digits", max_per_class=10))


def test_cli_zca_options():
    from hpd_fast.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["distill", "--zca", "--zca-regularization", "0.5"])
    assert args.__dict__["data.zca"] is True and args.__dict__["data.zca_regularization"] == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "--zca-regularization", "0"])
