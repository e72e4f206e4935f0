"""hpd_fast.render.render: chunked re-rendering gives plain autograd's gradients, in less memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpd_fast.generators import ConvGenerator, StagedGenerator, from_modules
from hpd_fast.render import render


def _conv(dtype=torch.float64) -> ConvGenerator:
    torch.manual_seed(0)
    G = ConvGenerator(
        4, image_shape=(2, 8, 8), latent_dim=5, width=4, mean=[0.2, 0.5], std=[0.3, 0.6]
    )
    # Non-trivial FiLM weights (they start at zero).
    for stage in G.stages:
        nn.init.normal_(stage.film.weight, std=0.3)
    return G.to(dtype).requires_grad_(False)


def _modules(dtype=torch.float64) -> StagedGenerator:
    torch.manual_seed(1)

    class Mod(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(4, 3)

        def forward(self, f, w):
            f = F.interpolate(f, scale_factor=2.0, mode="bilinear", align_corners=False)
            return torch.tanh(self.conv(f) * self.fc(w)[:, :, None, None])

    G = from_modules(
        [
            nn.Sequential(nn.Linear(4, 12), nn.Unflatten(1, (3, 2, 2))),
            Mod(),
            Mod(),
            nn.Conv2d(3, 1, 1),
        ],
        latent_sampler=lambda y, g: torch.randn(len(y), 4, generator=g),
        num_classes=2,
        image_shape=(1, 8, 8),
        takes_w=[True, True, False],
    )
    return G.to(dtype).requires_grad_(False)


def _latents(G: StagedGenerator, m: int, stage: int, seed: int = 0):
    w, f = G.sample_latents(torch.arange(m) % G.num_classes, seed=seed)
    for k in range(1, stage):
        f = G.advance(w, f, k)
    return w, f


def _grads(G, w, f, stage, chunk_size, cot):
    w = w.detach().clone().requires_grad_(True)
    f = f.detach().clone().requires_grad_(True)
    img = render(G, w, f, stage, chunk_size=chunk_size)
    (img * cot).sum().backward()
    return img.detach(), w.grad, f.grad


@pytest.mark.parametrize(
    ("make", "chunk_size", "m"), [(_conv, 1, 3), (_conv, 3, 7), (_conv, 64, 7), (_modules, 3, 7)]
)
def test_gradients_match_plain_autograd(make, chunk_size, m):
    G = make()
    for stage in range(1, G.num_stages + 1):
        w, f = _latents(G, m, stage)
        cot = torch.randn(m, *G.image_shape, dtype=torch.float64)
        ref_img, ref_gw, ref_gf = _grads(G, w, f, stage, None, cot)
        img, gw, gf = _grads(G, w, f, stage, chunk_size, cot)
        torch.testing.assert_close(img, ref_img, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gw, ref_gw, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gf, ref_gf, rtol=1e-10, atol=1e-12)
        assert gf.abs().sum() > 0
        # The last stage's head may not read w; then neither path gives w a gradient.
        assert (gw is None) == (ref_gw is None)
        if gw is not None:
            assert gw.abs().sum() > 0


@pytest.mark.parametrize("shared", ["w", "f"])
def test_shared_latent_gradients_sum_over_chunks(shared):
    G = _conv()
    m = 5
    w, f = _latents(G, m, 2)
    if shared == "w":
        w = w[:1]
    else:
        f = f[:1]
    cot = torch.randn(m, *G.image_shape, dtype=torch.float64)
    ref = _grads(G, w, f, 2, None, cot)
    out = _grads(G, w, f, 2, 2, cot)
    assert out[0].shape[0] == m
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (out[1] if shared == "w" else out[2]).shape[0] == 1


def test_gradcheck():
    torch.manual_seed(0)
    G = ConvGenerator(2, image_shape=(1, 4, 4), latent_dim=3, width=2).double()
    for stage in G.stages:
        nn.init.normal_(stage.film.weight, std=0.3)
    G.requires_grad_(False)
    w, f = _latents(G, 3, 1)
    w.requires_grad_(True)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w, f: render(G, w, f, 1, chunk_size=2), (w, f), fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda w, f: render(G, w, f, 1, chunk_size=2), (w[:1], f), fast_mode=True
    )


def test_only_the_needed_gradient_and_frozen_generator():
    G = _conv().requires_grad_(True)
    w, f = _latents(G, 4, 1)
    f.requires_grad_(True)
    render(G, w, f, 1, chunk_size=3).sum().backward()
    assert w.grad is None and f.grad is not None
    assert all(p.grad is None for p in G.parameters())  # the generator stays untouched
    out = render(G, w, f.detach(), 1, chunk_size=3)
    assert not out.requires_grad


def test_bad_arguments():
    G = _conv()
    w, f = _latents(G, 3, 1)
    for bad in (0, -2, 2.5, "4"):
        with pytest.raises(ValueError, match="chunk_size"):
            render(G, w, f, 1, chunk_size=bad)
    with pytest.raises(ValueError, match="stage"):
        render(G, w, f, G.num_stages + 1)
    with pytest.raises(ValueError, match="f must have shape"):
        render(G, w, f, 2)
    with pytest.raises(ValueError, match="generator"):
        render(nn.Linear(2, 2), w, f, 1)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    torch.set_num_threads(1)
    from hpd_fast.generators import ConvGenerator
    from hpd_fast.render import render

    def status(key):  # kB value of a /proc/self/status line
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    torch.manual_seed(0)
    G = ConvGenerator(10, image_shape=(3, 32, 32), latent_dim=16, width=32).requires_grad_(False)
    w, f = G.sample_latents(torch.arange(32) % 10, seed=0)
    w.requires_grad_(True); f.requires_grad_(True)
    out = {}
    for rep in range(2):  # the first round warms up both code paths at full size
        for name, chunk in (("lean", 4), ("plain", None)):
            w.grad = f.grad = None
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak RSS (VmHWM, i.e. ru_maxrss) to the current RSS
            before = status("VmRSS")
            render(G, w, f, 1, chunk_size=chunk).sum().backward()
            out[name] = status("VmHWM") - before
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_is_one_chunk():
    # 32 images at 32x32 with 32 channels: the full graph holds about 50 MB of activations.
    # A fixed mmap threshold makes glibc return every large buffer to the OS when it is freed,
    # so RSS follows the live tensors instead of the allocator's history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, check=True, env=env
    )
    peaks = json.loads(res.stdout.strip().splitlines()[-1])
    plain, lean = peaks["plain"], peaks["lean"]
    assert plain > 30 * 2**20, peaks
    assert lean < 0.35 * plain, peaks
