"""Staged-generator contract: ConvGenerator, from_modules, from_stylegan (stand-ins), I/O."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpd_fast.generators import (
    ConvGenerator,
    StagedGenerator,
    from_modules,
    from_stylegan,
    load_generator,
    load_stylegan_pickle,
    pretrained,
    save_generator,
    stage_layout,
    train_generator,
)

# --------------------------------------------------------------------------- stand-ins
# Tiny modules with the attribute structure and call signatures of the official StyleGAN code
# (mapping(z, c, truncation_psi=...), synthesis.input / layer_names, b<res> blocks).


class _Mapping(nn.Module):
    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int) -> None:
        super().__init__()
        self.num_ws = num_ws
        self.fc = nn.Linear(z_dim + c_dim, w_dim)
        self.register_buffer("w_avg", torch.randn(w_dim) * 0.1)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        x = F.leaky_relu(self.fc(torch.cat([z, c.to(z.dtype)], dim=1)), 0.2)
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
        if truncation_psi != 1:
            x[:, :cutoff] = self.w_avg.to(x.dtype).lerp(x[:, :cutoff], truncation_psi)
        return x


class _Input(nn.Module):
    def __init__(self, w_dim: int, channels: int, size: int) -> None:
        super().__init__()
        self.channels, self.size = channels, size
        self.fc = nn.Linear(w_dim, channels * size * size)

    def forward(self, w):
        return self.fc(w).view(-1, self.channels, self.size, self.size)


class _Layer(nn.Module):
    """(x, w, noise_mode, ...) -> x; random noise unless noise_mode='const' (as the official)."""

    def __init__(self, w_dim, cin, cout, up, is_torgb):
        super().__init__()
        self.w_dim, self.up, self.is_torgb = w_dim, up, is_torgb
        self.affine = nn.Linear(w_dim, cin)
        self.conv = nn.Conv2d(cin, cout, 1 if is_torgb else 3, padding=0 if is_torgb else 1)

    def forward(self, x, w, noise_mode="random", force_fp32=False, update_emas=False):
        assert w.shape == (x.shape[0], self.w_dim)
        x = x * (1 + self.affine(w))[:, :, None, None]
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = self.conv(x)
        if noise_mode == "random":
            x = x + 0.1 * torch.randn_like(x)
        return x if self.is_torgb else F.leaky_relu(x, 0.2)


class _Synthesis3(nn.Module):
    def __init__(self, w_dim, channels=3, res=8, width=6):
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, res, channels
        self.output_scale = 0.25
        self.input = _Input(w_dim, width, res // 2)
        specs = [
            (width, width, True, False),
            (width, width, False, False),
            (width, channels, False, True),
        ]
        self.layer_names = []
        for i, (cin, cout, up, rgb) in enumerate(specs):
            name = f"L{i}_{res}_{cout}"
            setattr(self, name, _Layer(w_dim, cin, cout, up, rgb))
            self.layer_names.append(name)
        self.num_ws = len(self.layer_names) + 1

    def forward(self, ws, **layer_kwargs):  # the official StyleGAN3 order
        ws = ws.unbind(dim=1)
        x = self.input(ws[0])
        for name, w in zip(self.layer_names, ws[1:]):
            x = getattr(self, name)(x, w, **layer_kwargs)
        return x * self.output_scale


class _Block(nn.Module):
    """StyleGAN2-ADA SynthesisBlock stand-in: (x, img, ws) -> (x, img)."""

    def __init__(self, cin, cout, w_dim, res, img_channels, is_last, architecture):
        super().__init__()
        self.in_channels, self.resolution, self.w_dim = cin, res, w_dim
        self.num_conv = 1 if cin == 0 else 2
        self.num_torgb = 1 if (is_last or architecture == "skip") else 0
        if cin == 0:
            self.const = nn.Parameter(torch.randn(cout, res, res))
        else:
            self.conv0 = _Layer(w_dim, cin, cout, True, False)
        self.conv1 = _Layer(w_dim, cout, cout, False, False)
        if self.num_torgb:
            self.torgb = _Layer(w_dim, cout, img_channels, False, True)

    def forward(self, x, img, ws, force_fp32=False, fused_modconv=None, **layer_kwargs):
        assert ws.shape[1:] == (self.num_conv + self.num_torgb, self.w_dim)
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
        else:
            x = self.conv0(x, next(w_iter), **layer_kwargs)
        x = self.conv1(x, next(w_iter), **layer_kwargs)
        if img is not None:
            img = F.interpolate(img, scale_factor=2.0, mode="bilinear", align_corners=False)
        if self.num_torgb:
            y = self.torgb(x, next(w_iter), noise_mode="none")
            img = img + y if img is not None else y
        return x, img


class _Synthesis2(nn.Module):
    def __init__(self, w_dim, channels=3, res=16, architecture="skip"):
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, res, channels
        self.block_resolutions = [2**i for i in range(2, int(np.log2(res)) + 1)]
        self.num_ws = 0
        for r in self.block_resolutions:
            cin = 0 if r == 4 else 5
            block = _Block(cin, 5, w_dim, r, channels, r == res, architecture)
            self.num_ws += block.num_conv + (block.num_torgb if r == res else 0)
            setattr(self, f"b{r}", block)

    def forward(self, ws, **block_kwargs):  # the official StyleGAN2-ADA split of ws
        block_ws, w_idx = [], 0
        for r in self.block_resolutions:
            block = getattr(self, f"b{r}")
            block_ws.append(ws.narrow(1, w_idx, block.num_conv + block.num_torgb))
            w_idx += block.num_conv
        x = img = None
        for r, cur_ws in zip(self.block_resolutions, block_ws):
            x, img = getattr(self, f"b{r}")(x, img, cur_ws, **block_kwargs)
        return img


class FakeStyleGAN(nn.Module):
    """G with z_dim, c_dim, w_dim, num_ws, img_resolution, img_channels, mapping, synthesis."""

    def __init__(self, synthesis: nn.Module, z_dim: int = 5, c_dim: int = 4) -> None:
        super().__init__()
        self.synthesis = synthesis
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, synthesis.w_dim
        self.img_resolution, self.img_channels = synthesis.img_resolution, synthesis.img_channels
        self.num_ws = synthesis.num_ws
        self.mapping = _Mapping(z_dim, c_dim, self.w_dim, self.num_ws)

    def forward(self, z, c, truncation_psi=1, **synthesis_kwargs):
        return self.synthesis(self.mapping(z, c, truncation_psi=truncation_psi), **synthesis_kwargs)


def _module_stages(width: int = 4) -> list[nn.Module]:
    """w [M, 6] -> f_1 [M, w, 2, 2] -> f_2 [M, w, 4, 4] -> f_3 [M, w, 4, 4] -> image [M, 2, 4, 4]."""

    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, width * 4)

        def forward(self, w):
            return torch.tanh(self.fc(w)).view(-1, width, 2, 2)

    class Mod(nn.Module):  # called as m(f, w)
        def __init__(self, up):
            super().__init__()
            self.up, self.fc = up, nn.Linear(6, width)
            self.conv = nn.Conv2d(width, width, 3, padding=1)

        def forward(self, f, w):
            if self.up:
                f = F.interpolate(f, scale_factor=2.0, mode="bilinear", align_corners=False)
            return torch.tanh(self.conv(f) * self.fc(w)[:, :, None, None])

    head = nn.Sequential(nn.Conv2d(width, 2, 1), nn.Tanh())  # called as m(f)
    return [First(), Mod(True), Mod(False), head]


def _sampler(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(labels.shape[0], 6, generator=gen).to(labels.device)
    return z + labels.to(z.dtype)[:, None]


def make(kind: str, dtype: torch.dtype = torch.float32) -> StagedGenerator:
    torch.manual_seed(0)
    if kind == "conv":
        G = ConvGenerator(3, image_shape=(1, 8, 8), latent_dim=6, width=5, mean=0.3, std=0.4)
    elif kind == "conv32":
        G = ConvGenerator(2, image_shape=(3, 16, 32), latent_dim=4, width=3, num_stages=6)
    elif kind == "modules":
        G = from_modules(
            _module_stages(),
            latent_sampler=_sampler,
            num_classes=3,
            image_shape=(2, 4, 4),
            takes_w=[True, True, False],
        )
    elif kind == "sg3":
        G = from_stylegan(FakeStyleGAN(_Synthesis3(w_dim=7)), mean=[0.5, 0.4, 0.3], std=0.25)
    elif kind in ("sg2skip", "sg2orig"):
        syn = _Synthesis2(w_dim=7, architecture=kind[3:])
        G = from_stylegan(FakeStyleGAN(syn, c_dim=0), num_classes=3)
    else:
        raise AssertionError(kind)
    return G.to(dtype)


KINDS = ["conv", "conv32", "modules", "sg3", "sg2skip", "sg2orig"]
EXPECTED_STAGES = {"conv": 4, "conv32": 6, "modules": 3, "sg3": 3, "sg2skip": 2, "sg2orig": 2}


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_stage_count(kind):
    G = make(kind)
    assert G.num_stages == EXPECTED_STAGES[kind]
    labels = torch.tensor([0, 1, 2, 1, 0]) % G.num_classes
    w, f = G.sample_latents(labels, seed=3)
    assert not w.requires_grad and not f.requires_grad
    assert w.shape == (5, *G.w_shape) and w.shape[-1] == G.latent_dim
    assert f.shape == (5, *G.feature_shape(1))
    for k in range(1, G.num_stages + 1):
        img = G.render(w, f, k)
        assert img.shape == (5, *G.image_shape)
        assert torch.isfinite(img).all()
        if k < G.num_stages:
            f = G.advance(w, f, k)
            assert f.shape == (5, *G.feature_shape(k + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_render_from_stage_k_equals_render_from_stage_1(kind):
    G = make(kind, torch.float64)
    w, f1 = G.sample_latents(torch.arange(7) % G.num_classes, seed=11)
    ref = G.render(w, f1, 1)
    f = f1
    for k in range(2, G.num_stages + 1):
        f = G.advance(w, f, k - 1)
        torch.testing.assert_close(G.render(w, f, k), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_determinism(kind):
    G = make(kind)
    labels = torch.arange(4) % G.num_classes
    torch.manual_seed(123)
    w1, f1 = G.sample_latents(labels, seed=5)
    torch.manual_seed(456)  # the global RNG must not matter
    w2, f2 = G.sample_latents(labels, seed=5)
    w3, _ = G.sample_latents(labels, seed=6)
    assert torch.equal(w1, w2) and torch.equal(f1, f2)
    assert not torch.equal(w1, w3)
    torch.testing.assert_close(G.render(w1, f1, 1), G.render(w1, f1, 1), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_shared_w_broadcasts(kind):
    G = make(kind, torch.float64)
    w, f = G.sample_latents(torch.arange(4) % G.num_classes, seed=2)
    out = G.render(w[:1], f, 1)
    torch.testing.assert_close(out, G.render(w[:1].expand_as(w), f, 1))
    assert out.shape[0] == 4


@pytest.mark.parametrize("kind", KINDS)
def test_bad_arguments_raise(kind):
    G = make(kind)
    k = G.num_stages
    with pytest.raises(ValueError, match="labels"):
        G.sample_latents(torch.tensor([0, G.num_classes]), seed=0)
    with pytest.raises(ValueError, match="labels"):
        G.sample_latents(torch.tensor([-1]), seed=0)
    with pytest.raises(ValueError, match="labels"):
        G.sample_latents(torch.tensor([0.0]), seed=0)
    with pytest.raises(ValueError, match="seed"):
        G.sample_latents(torch.tensor([0]), seed=1.5)
    w, f = G.sample_latents(torch.tensor([0, 0, 0]), seed=0)
    for bad in (0, k + 1, -1, 1.0):
        with pytest.raises(ValueError, match="stage"):
            G.render(w, f, bad)
    with pytest.raises(ValueError, match="stage"):
        G.advance(w, f, k)  # nothing after the last stage
    with pytest.raises(ValueError, match="f must have shape"):
        G.render(w, f[:, :1], 1)
    with pytest.raises(ValueError, match="w must have shape"):
        G.render(w[..., :1], f, 1)
    with pytest.raises(ValueError, match="batch"):
        G.render(w[:2], f, 1)
    if k > 1:  # f of stage 1 is not a stage-2 feature
        f2 = G.advance(w, f, 1)
        if f2.shape[1:] != f.shape[1:]:
            with pytest.raises(ValueError, match="f must have shape"):
                G.render(w, f, 2)


# --------------------------------------------------------------------------- ConvGenerator
def test_conv_stage_layout():
    assert stage_layout((1, 8, 8)) == [(2, 2), (4, 4), (8, 8), (8, 8)]
    assert stage_layout((3, 32, 32)) == [(4, 4), (8, 8), (16, 16), (32, 32), (32, 32)]
    assert stage_layout((1, 8, 8), 3) == [(2, 2), (4, 4), (8, 8)]
    G = ConvGenerator(10, (3, 32, 32), width=4)
    assert G.num_stages == 5
    assert G.feature_shape(2) == (4, 8, 8)
    with pytest.raises(ValueError, match="num_stages"):
        ConvGenerator(10, (1, 8, 8), num_stages=2)
    with pytest.raises(ValueError, match="image_shape"):
        ConvGenerator(10, (1, 10, 8))
    with pytest.raises(ValueError, match="image_shape"):
        ConvGenerator(10, (1, 2, 2))
    with pytest.raises(ValueError, match="num_classes"):
        ConvGenerator(0)


def test_normalization_matches_mean_std():
    G = make("conv", torch.float64)
    w, f = G.sample_latents(torch.arange(3), seed=0)
    img = G.render(w, f, 1).detach()
    x01 = G.denormalize(img)
    assert x01.min().item() >= 0.0 and x01.max().item() <= 1.0  # tanh head -> [0, 1]
    torch.testing.assert_close((x01 - 0.3) / 0.4, img)


def test_save_load_roundtrip(tmp_path):
    G = make("conv")
    G.training_config = {"epochs": 1}
    wpath, cpath = save_generator(G, tmp_path / "sub" / "g")
    assert wpath.suffix == ".safetensors" and cpath.suffix == ".json"
    with open(wpath, "rb") as fh:  # safetensors: 8-byte header length then JSON, no pickle
        assert fh.read(9)[8:9] == b"{"
    meta = json.loads(cpath.read_text())
    assert meta["kwargs"]["num_classes"] == 3 and meta["training"] == {"epochs": 1}
    assert meta["mean"] == pytest.approx([0.3]) and meta["std"] == pytest.approx([0.4])
    H = load_generator(wpath)
    assert H.training_config == {"epochs": 1}
    labels = torch.tensor([0, 2, 1])
    torch.testing.assert_close(H.sample(labels, 9), G.sample(labels, 9), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        load_generator(tmp_path / "missing")
    with pytest.raises(ValueError, match="ConvGenerator"):
        save_generator(make("modules"), tmp_path / "m")


def test_train_generator_few_steps(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=gen)
    labels = torch.arange(40) % 4
    state = torch.random.get_rng_state()
    kw = dict(image_shape=(1, 8, 8), epochs=1, batch_size=16, latent_dim=4, width=4, d_width=4)
    G1 = train_generator(images, labels, 4, progress=False, out=tmp_path / "g", **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    G2 = train_generator(images, labels, 4, progress=False, **kw)
    for a, b in zip(G1.state_dict().values(), G2.state_dict().values()):
        assert torch.equal(a, b)
    assert G1.training_config["steps"] == 2 and G1.training_config["seed"] == 0
    torch.testing.assert_close(G1.mean, images.mean().view(1))
    H = load_generator(tmp_path / "g.safetensors")
    torch.testing.assert_close(H.sample(labels[:5], 0), G1.sample(labels[:5], 0))
    with pytest.raises(ValueError, match="dataset_labels"):
        train_generator(images, labels[:-1], 4, progress=False, **kw)
    with pytest.raises(ValueError, match="dataset_labels"):
        train_generator(images, labels + 1, 4, progress=False, **kw)
    with pytest.raises(ValueError, match="image_shape"):
        train_generator(images, labels, 4, progress=False, **{**kw, "image_shape": (1, 4, 4)})


_WEIGHTS = (
    Path(__file__).resolve().parents[1] / "hpd_fast/generators/weights/digits_convgen.safetensors"
)


@pytest.mark.skipif(
    not _WEIGHTS.exists(), reason="the digits generator weights are not shipped yet"
)
def test_pretrained_digits_is_class_conditional():
    from sklearn.neighbors import KNeighborsClassifier

    from hpd_fast.generators.io import digits_train_split

    G = pretrained("digits")
    assert isinstance(G, ConvGenerator) and G.image_shape == (1, 8, 8)
    x, y, mean, std = digits_train_split()
    torch.testing.assert_close(G.mean, torch.tensor(mean))
    torch.testing.assert_close(G.std, torch.tensor(std))
    labels = torch.arange(10).repeat_interleave(30)
    img = G.sample(labels, seed=1)
    assert img.shape == (300, 1, 8, 8) and torch.isfinite(img).all()
    # A classifier fit on real training digits must recognise the conditioning labels.
    clf = KNeighborsClassifier(5).fit(x.flatten(1).numpy(), y.numpy())
    acc = clf.score(img.flatten(1).numpy(), labels.numpy())
    assert acc > 0.85, f"generated digits classified at {acc:.2f}"
    # Samples of one class differ (no collapse onto one image per class).
    per_class = img.view(10, 30, -1).std(dim=1).mean()
    real_spread = torch.stack([x[y == c].flatten(1).std(dim=0).mean() for c in range(10)]).mean()
    assert per_class > 0.5 * real_spread
    with pytest.raises(ValueError, match="name"):
        pretrained("cifar10")


# --------------------------------------------------------------------------- from_modules
def test_from_modules_contract_and_errors():
    G = make("modules")
    assert G.latent_dim == 6 and G.w_shape == (6,)
    stages = _module_stages()
    with pytest.raises(ValueError, match="at least one synthesis stage"):
        from_modules(stages[:1], latent_sampler=_sampler, num_classes=3, image_shape=(2, 4, 4))
    with pytest.raises(ValueError, match="at least one synthesis stage"):
        from_modules([], latent_sampler=_sampler, num_classes=3, image_shape=(2, 4, 4))
    with pytest.raises(ValueError, match="takes_w"):
        from_modules(
            stages, latent_sampler=_sampler, num_classes=3, image_shape=(2, 4, 4), takes_w=[True]
        )
    with pytest.raises(ValueError, match="image_shape"):
        from_modules(
            stages,
            latent_sampler=_sampler,
            num_classes=3,
            image_shape=(1, 4, 4),
            takes_w=[True, True, False],
        )
    # A two-module generator: one stage, then the head.
    H = from_modules(
        [nn.Linear(6, 4), nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Tanh())],
        latent_sampler=_sampler,
        num_classes=2,
        image_shape=(1, 2, 2),
        takes_w=False,
        mean=0.5,
        std=0.5,
    )
    assert H.num_stages == 1
    w, f = H.sample_latents(torch.tensor([0, 1]), seed=0)
    assert H.render(w, f, 1).shape == (2, 1, 2, 2)


# --------------------------------------------------------------------------- from_stylegan
def _official_output(G: FakeStyleGAN, labels, seed, c_dim, class_map=None):
    z = torch.randn(len(labels), G.z_dim, generator=torch.Generator().manual_seed(seed))
    z = z.to(next(G.parameters()).dtype)
    cls = labels if class_map is None else torch.tensor(class_map)[labels]
    c = F.one_hot(cls, c_dim).to(z.dtype) if c_dim else z.new_zeros(len(labels), 0)
    return G(z, c, noise_mode="const")


@pytest.mark.parametrize("kind", ["sg3", "sg2skip", "sg2orig"])
def test_stylegan_adapter_matches_official_forward(kind):
    G = make(kind, torch.float64)
    labels = torch.tensor([2, 0, 1, 1])
    w, f = G.sample_latents(labels, seed=4)
    assert w.shape == (4, G.G.num_ws, G.G.w_dim)
    raw = _official_output(G.G, labels, 4, G.G.c_dim)
    torch.testing.assert_close(G.denormalize(G.render(w, f, 1)), (raw + 1) / 2)


def test_stylegan_class_map_truncation_and_errors():
    torch.manual_seed(0)
    fake = FakeStyleGAN(_Synthesis3(w_dim=7), c_dim=4).double()
    G = from_stylegan(fake, class_map=[3, 1])
    assert G.num_classes == 2
    labels = torch.tensor([0, 1, 1])
    w, f = G.sample_latents(labels, seed=0)
    raw = _official_output(fake, labels, 0, 4, class_map=[3, 1])
    torch.testing.assert_close(G.denormalize(G.render(w, f, 1)), (raw + 1) / 2)
    # truncation pulls w towards w_avg
    T = from_stylegan(fake, truncation_psi=0.0)
    wt, _ = T.sample_latents(labels, seed=0)
    torch.testing.assert_close(wt, fake.mapping.w_avg.expand_as(wt))
    with pytest.raises(ValueError, match="num_classes"):
        from_stylegan(fake, num_classes=3)
    with pytest.raises(ValueError, match="class_map"):
        from_stylegan(fake, class_map=[4])
    with pytest.raises(ValueError, match="num_classes is required"):
        from_stylegan(FakeStyleGAN(_Synthesis3(w_dim=7), c_dim=0))
    bad = FakeStyleGAN(_Synthesis3(w_dim=7))
    bad.num_ws = 7
    with pytest.raises(ValueError, match="num_ws"):
        from_stylegan(bad)
    with pytest.raises(ValueError, match="synthesis"):
        from_stylegan(nn.Linear(2, 2))
    one_block = FakeStyleGAN(_Synthesis2(w_dim=7, res=4), c_dim=0)
    with pytest.raises(ValueError, match="no stages"):
        from_stylegan(one_block, num_classes=2)


def test_stylegan_noise_mode_is_const_by_default():
    fake = FakeStyleGAN(_Synthesis3(w_dim=7))
    G = from_stylegan(fake)
    w, f = G.sample_latents(torch.tensor([0, 1]), seed=0)
    assert torch.equal(G.render(w, f, 1), G.render(w, f, 1))
    R = from_stylegan(fake, synthesis_kwargs={"noise_mode": "random"})
    assert not torch.equal(R.render(w, f, 1), R.render(w, f, 1))


def test_load_stylegan_pickle_requires_opt_in(tmp_path):
    path = tmp_path / "net.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"G_ema": nn.Linear(3, 2), "D": None}, fh)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_stylegan_pickle(path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_stylegan_pickle(path, allow_pickle=1)
    with pytest.raises(ValueError, match="local"):
        load_stylegan_pickle("https://example.org/net.pkl", allow_pickle=True)
    with pytest.raises(FileNotFoundError):
        load_stylegan_pickle(tmp_path / "none.pkl", allow_pickle=True)
    with pytest.raises(ValueError, match="key"):
        load_stylegan_pickle(path, key="G", allow_pickle=True)
    net = load_stylegan_pickle(path, allow_pickle=True)
    assert isinstance(net, nn.Linear) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert set(load_stylegan_pickle(path, key=None, allow_pickle=True)) == {"G_ema", "D"}


def test_no_stage_generator_rejected():
    class Empty(StagedGenerator):
        def __init__(self):
            super().__init__(num_stages=0, num_classes=2, image_shape=(1, 4, 4), latent_dim=2)

        _sample_w = _first_stage = _advance = _head = None

    with pytest.raises(ValueError, match="num_stages"):
        Empty()
