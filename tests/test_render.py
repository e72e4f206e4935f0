"""hpd_fast.render.render: chunked re-rendering gives plain autograd's gradients, in less memory."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("make", [_conv, _modules])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_gradients_match_plain_autograd(make, chunk_size):
    G = make()
    m = 7
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
    G = _conv()
    w, f = _latents(G, 3, 3)
    w.requires_grad_(True)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, f: render(G, w, f, 3, chunk_size=2), (w, f))


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
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from hpd_fast.generators import ConvGenerator
    from hpd_fast.render import render

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    chunk = None if sys.argv[1] == "none" else int(sys.argv[1])
    torch.manual_seed(0)
    G = ConvGenerator(10, image_shape=(3, 32, 32), latent_dim=16, width=32).requires_grad_(False)
    w, f = G.sample_latents(torch.arange(64) % 10, seed=0)
    w.requires_grad_(True); f.requires_grad_(True)
    render(G, w[:2], f[:2], 1, chunk_size=chunk).sum().backward()  # warm-up
    w.grad = f.grad = None
    before = rss()
    # Reset the high-water mark: ru_maxrss would include the parent's RSS at fork time.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    render(G, w, f, 1, chunk_size=chunk).sum().backward()
    with open("/proc/self/status") as fh:
        hwm = [ln for ln in fh if ln.startswith("VmHWM:")][0]
    peak = int(hwm.split()[1]) * 1024
    print(json.dumps({"peak_delta": peak - before}))
    """
)


def _peak(chunk: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, chunk], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_memory_is_one_chunk():
    # 64 images at 32x32 with 32 channels: the full graph holds roughly 100 MB of activations.
    plain, lean = _peak("none"), _peak("4")
    assert plain > 50 * 2**20, plain
    assert lean < 0.35 * plain, (lean, plain)
