import pytest
import torch

from hpd_fast.augment import DSA, FAMILIES

FULL = "color_crop_cutout_flip_scale_rotate"


def _images(b: int = 4, c: int = 3, h: int = 8, w: int = 8, dtype=torch.float32):
    return torch.rand(b, c, h, w, dtype=dtype)


@pytest.mark.parametrize("mode", ["single", "all"])
@pytest.mark.parametrize("siamese", [False, True])
def test_same_seed_same_output(mode, siamese):
    dsa = DSA(FULL, mode=mode)
    x = _images()
    a = dsa(x, 123, siamese=siamese)
    b = dsa(x.clone(), 123, siamese=siamese)
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A fresh object with the same settings replays the same transformation.
    torch.testing.assert_close(DSA(FULL, mode=mode)(x, 123, siamese=siamese), a, rtol=0, atol=0)


def test_different_seeds_differ():
    dsa = DSA(FULL, mode="all")
    x = _images()
    outs = [dsa(x, s) for s in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not torch.equal(outs[i], outs[j])


@pytest.mark.parametrize("strategy", [FULL, *FAMILIES])
@pytest.mark.parametrize("mode", ["single", "all"])
def test_siamese_independent_of_batch_size(strategy, mode):
    dsa = DSA(strategy, mode=mode)
    first = _images(1, 3, 9, 7)
    small = torch.cat([first, _images(1, 3, 9, 7)])
    large = torch.cat([first, _images(4, 3, 9, 7)])
    for seed in range(6):
        a = dsa(small, seed, siamese=True)
        b = dsa(large, seed, siamese=True)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        # Every image gets the same transform: a batch of copies stays a batch of copies.
        c = dsa(first.expand(3, -1, -1, -1), seed, siamese=True)
        torch.testing.assert_close(c[1], c[0], rtol=0, atol=0)
        torch.testing.assert_close(c[2], c[0], rtol=0, atol=0)


def test_non_siamese_transforms_per_image():
    dsa = DSA(FULL, mode="all")
    x = _images(1).expand(6, -1, -1, -1)
    out = dsa(x, 7, siamese=False)
    assert not all(torch.equal(out[0], out[i]) for i in range(1, 6))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("siamese", [False, True])
def test_gradcheck_each_family(family, siamese):
    x = torch.rand(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    for dsa in (DSA(family), DSA(family, mode="all")):
        for seed in (0, 3):
            assert torch.autograd.gradcheck(
                lambda t, d=dsa, s=seed: d(t, s, siamese=siamese), (x,), fast_mode=True
            )


def test_gradcheck_all_families_one_channel():
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    dsa = DSA(FULL, mode="all")
    assert torch.autograd.gradcheck(lambda t: dsa(t, 11), (x,))


def test_gradient_flows_to_every_image():
    x = _images(3).requires_grad_(True)
    DSA(FULL, mode="all")(x, 5).square().sum().backward()
    assert all(x.grad[i].abs().sum() > 0 for i in range(3))


def test_global_rng_untouched():
    x = _images()
    torch.manual_seed(42)
    state = torch.get_rng_state()
    for mode in ("single", "all"):
        for seed in range(4):
            DSA(FULL, mode=mode)(x, seed)
            DSA(FULL, mode=mode)(x, seed, siamese=True)
    assert torch.equal(torch.get_rng_state(), state)
    if torch.cuda.is_available():
        cuda_state = torch.cuda.get_rng_state()
        DSA(FULL, mode="all")(x.cuda(), 3)
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_changes_the_image(family):
    # 3 channels so that saturation matters too; some seed must change the image.
    x = _images(2, 3, 8, 8)
    dsa = DSA(family)
    assert any(not torch.equal(dsa(x, s), x) for s in range(8))


def test_single_mode_applies_one_family():
    x = _images(3, 3, 8, 8)
    single = DSA(FULL)
    families = [DSA(f) for f in FAMILIES]
    for seed in range(10):
        out = single(x, seed)
        # The family is drawn first, so the result equals exactly one single-family output
        # computed from a generator in the same state.
        assert any(torch.equal(out, _after_pick(f, x, seed)) for f in families)


def _after_pick(dsa_one: DSA, x: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    torch.randint(len(FAMILIES), (1,), generator=gen)
    n = x.shape[0]
    return getattr(dsa_one, f"_{dsa_one.families[0]}")(x, gen, n)


def test_single_mode_uses_every_family():
    x = _images(2, 3, 8, 8)
    single = DSA(FULL)
    families = [DSA(f) for f in FAMILIES]
    seen = set()
    for seed in range(60):
        out = single(x, seed)
        seen |= {f.strategy for f in families if torch.equal(out, _after_pick(f, x, seed))}
    assert seen == set(FAMILIES)


def test_parameter_semantics():
    x = _images(2, 3, 8, 8, dtype=torch.float64)
    # Flip with a seed that flips: exactly the mirrored image.
    out = [DSA("flip")(x, s, siamese=True) for s in range(10)]
    assert any(torch.equal(o, x.flip(3)) for o in out)
    assert any(torch.equal(o, x) for o in out)
    # Crop: an integer shift of at most round(0.125 * 8) = 1 pixel with zero fill.
    for s in range(10):
        o = DSA("crop")(x, s, siamese=True)
        shifted = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ref = torch.zeros_like(x)
                src = x[:, :, max(dy, 0) : 8 + min(dy, 0), max(dx, 0) : 8 + min(dx, 0)]
                ref[:, :, max(-dy, 0) : 8 + min(-dy, 0), max(-dx, 0) : 8 + min(-dx, 0)] = src
                shifted.append(torch.equal(o, ref))
        assert sum(shifted) == 1
    # Cutout: zeroes a (clipped) 4x4 square, keeps everything else.
    for s in range(10):
        o = DSA("cutout")(x, s)
        for i in range(2):
            zero = o[i, 0] == 0
            assert torch.equal(o[i][:, ~zero], x[i][:, ~zero])
            rows, cols = zero.any(1).sum(), zero.any(0).sum()
            assert 1 <= rows <= 4 and 1 <= cols <= 4 and zero.sum() == rows * cols
    # Rotation by 0 degrees and scaling by 1 are the identity.
    torch.testing.assert_close(DSA("rotate", ratio_rotate=0.0)(x, 1), x)
    torch.testing.assert_close(DSA("scale", ratio_scale=1.0)(x, 1), x)
    # Saturation strength 0 collapses the channels onto their mean.
    o = DSA("color", saturation=0.0)(x, 0)
    torch.testing.assert_close(o[:, 0], o[:, 1])
    torch.testing.assert_close(o[:, 1], o[:, 2])


def test_one_channel_images():
    x = _images(3, 1, 8, 8)
    for mode in ("single", "all"):
        for seed in range(5):
            out = DSA(FULL, mode=mode)(x, seed)
            assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("hw", [(2, 2), (2, 5), (3, 2), (32, 32)])
def test_small_and_odd_sizes(hw):
    x = _images(2, 3, *hw)
    for seed in range(4):
        assert DSA(FULL, mode="all")(x, seed).shape == x.shape


def test_non_contiguous_input():
    x = _images(4, 3, 8, 8).transpose(2, 3)
    dsa = DSA(FULL, mode="all")
    # Equal up to reduction order in the colour means.
    torch.testing.assert_close(dsa(x, 9), dsa(x.contiguous(), 9))


def test_dtype_does_not_change_transformation():
    x = _images(3, 3, 8, 8, dtype=torch.float64)
    dsa = DSA(FULL, mode="all")
    torch.testing.assert_close(dsa(x.float(), 4).double(), dsa(x, 4), rtol=1e-5, atol=1e-5)


def test_none_strategy_is_identity():
    x = _images()
    assert DSA("none")(x, 0) is x
    assert DSA("")(x, 0) is x
    assert DSA("None")(x, 3, siamese=True) is x


def test_errors():
    with pytest.raises(ValueError, match="color"):
        DSA("color_blur")
    with pytest.raises(ValueError, match="mode"):
        DSA(mode="S")
    dsa = DSA()
    with pytest.raises(ValueError, match="x"):
        dsa(torch.rand(3, 8, 8), 0)
    with pytest.raises(ValueError, match="x"):
        dsa(torch.rand(1, 2, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="x"):
        dsa(torch.zeros(1, 3, 8, 8, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="seed"):
        dsa(torch.rand(1, 3, 8, 8), 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_transformation_on_cuda():
    x = _images(3, 3, 16, 16)
    for mode in ("single", "all"):
        dsa = DSA(FULL, mode=mode)
        for seed in range(5):
            for siamese in (False, True):
                cpu = dsa(x, seed, siamese=siamese)
                gpu = dsa(x.cuda(), seed, siamese=siamese).cpu()
                torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_color_formula():
    x = _images(3, 3, 5, 6, dtype=torch.float64)
    dsa = DSA("color", mode="all", brightness=0.7, saturation=1.5, contrast=0.25)
    gen = torch.Generator().manual_seed(17)
    rb, rs, rc = (torch.rand(3, generator=gen).double().view(3, 1, 1, 1) for _ in range(3))
    ref = x + (rb - 0.5) * 0.7
    m = ref.mean(1, keepdim=True)
    ref = (ref - m) * (rs * 1.5) + m
    m = ref.mean((1, 2, 3), keepdim=True)
    ref = (ref - m) * (rc + 0.25) + m
    torch.testing.assert_close(dsa(x, 17), ref)
