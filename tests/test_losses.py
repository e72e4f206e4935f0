"""DM and DC losses against straightforward independent implementations (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpd_fast.augment import DSA
from hpd_fast.distill.losses import (
    dc_loss,
    derive_seed,
    dm_loss,
    gradient_match_distance,
    random_network,
)

F64 = torch.float64
K = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(seed: int = 3):
    return random_network("ConvNet", 2, K, (8, 8), seed, width=5).double()


def _data(n_real=(4, 1, 6), n_syn=(2, 3, 1), seed=0):
    """Real and synthetic sets with odd class sizes, labels in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    yr = torch.cat([torch.full((n,), c) for c, n in enumerate(n_real)])
    ys = torch.cat([torch.full((n,), c) for c, n in enumerate(n_syn)])
    yr = yr[torch.randperm(len(yr), generator=gen)]
    ys = ys[torch.randperm(len(ys), generator=gen)]
    xr = torch.randn(len(yr), 2, 8, 8, generator=gen, dtype=F64)
    xs = torch.randn(len(ys), 2, 8, 8, generator=gen, dtype=F64).requires_grad_(True)
    return xr, yr, xs, ys


def _siamese(x, seed):
    return DSA()(x, seed, siamese=True)


SEEDS = [11, 22, 33]


# ---------------------------------------------------------------------------------- DM


def _dm_reference(net, xr, yr, xs, ys, augment):
    total = torch.zeros((), dtype=F64)
    for c in range(K):
        if not bool((ys == c).any()):
            continue
        r, s = xr[yr == c], xs[ys == c]
        if augment is not None:
            r, s = augment(r, SEEDS[c]), augment(s, SEEDS[c])
        mr = net.embed(r).detach().mean(0)
        ms = net.embed(s).mean(0)
        total = total + ((mr - ms) ** 2).sum()
    return total


@pytest.mark.parametrize("augment", [None, _siamese])
def test_dm_loss_matches_reference(augment):
    net = _net()
    xr, yr, xs, ys = _data()
    ref = _dm_reference(net, xr, yr, xs, ys, augment)
    (g_ref,) = torch.autograd.grad(ref, xs)
    got = dm_loss(net.embed, xr, yr, xs, ys, K, augment=augment, seeds=SEEDS if augment else None)
    (g_got,) = torch.autograd.grad(got, xs)
    assert got.dtype == F64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)
    assert g_ref.abs().sum() > 0


def test_dm_loss_multi_layer_and_missing_class():
    net = _net()
    xr, yr, xs, ys = _data(n_syn=(2, 0, 3))  # class 1 has no synthetic image: contributes 0
    ref = torch.zeros((), dtype=F64)
    for c in (0, 2):
        for fr, fs in zip(net.block_outputs(xr[yr == c]), net.block_outputs(xs[ys == c])):
            ref = ref + ((fr.detach().mean(0) - fs.mean(0)) ** 2).sum()
    got = dm_loss(net.block_outputs, xr, yr, xs, ys, K)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_dm_loss_bad_input():
    net = _net()
    xr, yr, xs, ys = _data()
    with pytest.raises(ValueError, match="seeds"):
        dm_loss(net.embed, xr, yr, xs, ys, K, augment=_siamese, seeds=[1])
    with pytest.raises(ValueError, match="real_labels has no image"):
        dm_loss(net.embed, xr[yr != 1], yr[yr != 1], xs, ys, K)
    with pytest.raises(ValueError, match="syn_labels"):
        dm_loss(net.embed, xr, yr, xs, ys.float(), K)
    with pytest.raises(ValueError, match="real_images"):
        dm_loss(net.embed, xr[0], yr, xs, ys, K)


# ---------------------------------------------------------------------------------- DC


def _distance_reference(gs_list, gr_list, include_1d=False):
    """Row by row, with explicit dot products."""
    total = torch.zeros((), dtype=F64)
    for gs, gr in zip(gs_list, gr_list):
        if gs.dim() == 1:
            if not include_1d:
                continue
            gs, gr = gs.view(1, -1), gr.view(1, -1)
        for o in range(gs.shape[0]):
            a, b = gs[o].flatten(), gr[o].flatten()
            total = total + 1 - torch.dot(a, b) / (a.norm() * b.norm() + 1e-6)
    return total


@pytest.mark.parametrize("include_1d", [False, True])
def test_gradient_match_distance(include_1d):
    gen = torch.Generator().manual_seed(1)
    shapes = [(5, 2, 3, 3), (7,), (3, 11), (1, 1, 1, 1)]
    gs = [torch.randn(s, generator=gen, dtype=F64).requires_grad_(True) for s in shapes]
    gr = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    ref = _distance_reference(gs, gr, include_1d)
    got = gradient_match_distance(gs, gr, include_1d=include_1d)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(ref, gs, allow_unused=True, materialize_grads=True)
    g_got = torch.autograd.grad(got, gs, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # identical gradients: distance ~ 0 (up to the epsilon)
    same = gradient_match_distance(gr, gr)
    assert 0 <= float(same) < 1e-4
    with pytest.raises(ValueError, match="grads_syn has"):
        gradient_match_distance(gs[:2], gr)
    with pytest.raises(ValueError, match="shapes"):
        gradient_match_distance([gs[0]], [gr[2]])


@pytest.mark.parametrize("augment", [None, _siamese])
def test_dc_loss_matches_reference(augment):
    net = _net().requires_grad_(True)
    params = list(net.parameters())
    xr, yr, xs, ys = _data()
    ref = torch.zeros((), dtype=F64)
    for c in range(K):
        r, s = xr[yr == c], xs[ys == c]
        if augment is not None:
            r, s = augment(r, SEEDS[c]), augment(s, SEEDS[c])
        gr = torch.autograd.grad(F.cross_entropy(net(r), yr[yr == c]), params)
        gs = torch.autograd.grad(F.cross_entropy(net(s), ys[ys == c]), params, create_graph=True)
        ref = ref + _distance_reference(gs, [g.detach() for g in gr])
    (g_ref,) = torch.autograd.grad(ref, xs)
    got = dc_loss(net, xr, yr, xs, ys, K, augment=augment, seeds=SEEDS if augment else None)
    (g_got,) = torch.autograd.grad(got, xs)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-12)
    assert g_ref.abs().sum() > 0
    for p in params:  # autograd.grad only: nothing accumulated on the network
        assert p.grad is None


def test_dc_loss_needs_trainable_net():
    net = _net()  # random_network returns parameters that do not require grad
    xr, yr, xs, ys = _data()
    with pytest.raises(ValueError, match="require grad"):
        dc_loss(net, xr, yr, xs, ys, K)


def test_random_network_is_seeded_and_leaves_global_rng():
    state = torch.get_rng_state()
    a = random_network("ConvNet", 1, 4, (8, 8), 7, width=4)
    b = random_network("ConvNet", 1, 4, (8, 8), 7, width=4)
    c = random_network("ConvNet", 1, 4, (8, 8), 8, width=4)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert derive_seed(1, "a") == derive_seed(1, "a") != derive_seed(1, "b")
