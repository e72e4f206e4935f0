"""benchmarks/stylegan_shaped.py: StyleGAN-XL geometry, wrapped by from_stylegan."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from stylegan_shaped import (  # noqa: E402
    STYLEGAN_XL,
    hpd_stage_shapes,
    make_stylegan_shaped,
    official_parameter_count,
    stylegan_xl_input,
    stylegan_xl_layers,
)

import hpd_fast  # noqa: E402

SMALL = {"channel_max": 16, "channel_base": 256}


def test_imagenet128_geometry():
    layers = stylegan_xl_layers(128)
    names = [lay["name"] for lay in layers]
    assert len(names) == 27  # 26 layers + ToRGB: 11 stem layers, -2 +7 per doubling
    # the stem's L0..L8, then the official index gap (L9 was cut), ToRGB last
    assert names[:10] == [f"L{i}_36_1024" for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 10)]
    assert names[10:16] == [f"L{i}_52_1024" for i in range(11, 16)] + ["L16_84_1024"]
    assert names[20:] == [
        "L21_148_1023",
        "L22_148_861",
        "L23_148_724",
        "L24_148_609",
        "L25_148_512",
        "L26_128_512",
        "L27_128_3",
    ]
    assert [lay["torgb"] for lay in layers] == [False] * 26 + [True]
    assert [lay["stage"] for lay in layers] == list(range(2, 28)) + [None]
    inp = stylegan_xl_input(128)
    assert (inp["channels"], inp["size"], inp["sampling_rate"]) == (1024, 36, 16.0)
    w_shape, feats = hpd_stage_shapes(layers)
    assert w_shape == (28, 512)
    # H-PD's layers 1..9 (hpd_fast stages 2..10) and the input: all 1024 x 36 x 36
    assert set(feats[:10]) == {(1024, 36, 36)}
    assert feats[-1] == (512, 128, 128)
    count = official_parameter_count(layers)
    assert 2e8 < count["synthesis"] < 3e8


def test_stem_matches_the_official_names():
    # a 16 px stem with --syn_layers 10: L0_36_1024 ... L10_16_3 (autonomousvision/stylegan-xl#84)
    names = [lay["name"] for lay in stylegan_xl_layers(16, syn_layers=10)]
    assert names[0] == "L0_36_1024" and names[-1] == "L10_16_3" and len(names) == 11
    # StyleGAN3's own widths (channel_base 32768, channel_max 512) halve the early layers
    assert stylegan_xl_layers(16, 32768, 512)[0]["name"] == "L0_36_512"


def test_wrapped_shapes_match_the_layers():
    gen = make_stylegan_shaped(10, 32, **SMALL)
    layers = stylegan_xl_layers(32, SMALL["channel_base"], SMALL["channel_max"])
    w_shape, feats = hpd_stage_shapes(layers, STYLEGAN_XL["w_dim"])
    assert gen.num_stages == len(layers) == 17
    assert gen.G.num_ws == len(gen.G.synthesis.layer_names) + 1 == 18
    assert list(gen.G.synthesis.layer_names) == [lay["name"] for lay in layers]
    assert gen.w_shape == w_shape == (18, 512)
    for k in range(1, gen.num_stages + 1):
        assert gen.feature_shape(k) == feats[k - 1]


def test_full_width_is_constructible():
    gen = make_stylegan_shaped(10, 32)  # the official widths, a cheap resolution
    assert gen.feature_shape(2) == (1024, 36, 36)
    assert gen.feature_shape(gen.num_stages) == (1024, 32, 32)
    assert gen.w_shape == (18, 512)


def test_render_images_and_gradients():
    gen = make_stylegan_shaped(10, 32, **SMALL)
    labels = torch.tensor([0, 3, 3, 9, 5, 1])
    w, f = gen.sample_latents(labels, seed=3)
    assert w.shape == (6, *gen.w_shape) and w.dtype == torch.float32
    assert gen.sample(labels, 3).shape == (6, 3, 32, 32)
    stage = 12  # a 52 x 52 layer of the super-resolution stage
    with torch.no_grad():
        for k in range(1, stage):
            f = gen.advance(w, f, k)
    img = gen.render(w, f, stage)
    assert img.shape == (6, 3, 32, 32) and bool(torch.isfinite(img).all())
    assert img.std() > 0
    # the same again (deterministic), and the memory-lean render gives the same gradients
    w1, f1 = w.clone().requires_grad_(True), f.clone().requires_grad_(True)
    w2, f2 = w.clone().requires_grad_(True), f.clone().requires_grad_(True)
    weight = torch.randn(img.shape, generator=torch.Generator().manual_seed(0))
    (gen.render(w1, f1, stage) * weight).sum().backward()
    (hpd_fast.render(gen, w2, f2, stage, chunk_size=4) * weight).sum().backward()
    for a, b in ((w1.grad, w2.grad), (f1.grad, f2.grad)):
        assert a is not None and float(a.abs().sum()) > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(gen.render(w, f, stage), img)


def test_seeded_and_truncated():
    a = make_stylegan_shaped(4, 16, **SMALL, seed=1)
    b = make_stylegan_shaped(4, 16, **SMALL, seed=1)
    c = make_stylegan_shaped(4, 16, **SMALL, seed=2)
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.equal(a.sample(labels, 0), b.sample(labels, 0))
    assert not torch.equal(a.sample(labels, 0), c.sample(labels, 0))
    z = torch.randn(4, a.G.z_dim)
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    full = a.G.mapping(z, onehot)
    half = a.G.mapping(z, onehot, truncation_psi=0.5)
    centre = a.G.mapping.w_avg[labels].unsqueeze(1)
    torch.testing.assert_close(half, centre + 0.5 * (full - centre))


def test_bad_arguments():
    with pytest.raises(ValueError, match="power of two"):
        stylegan_xl_layers(48)
    with pytest.raises(ValueError, match="resolution"):
        stylegan_xl_layers(8)
    with pytest.raises(ValueError, match="c_dim"):
        make_stylegan_shaped(10, 16, c_dim=5, **SMALL)
