"""CRFD: reference value, batched over candidates equals one at a time, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from hpd_fast.distill.crfd import CRFD

K = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _real(n_per_class=(7, 5, 9), seed=0):
    """Real images with class-dependent structure (so that the distances are meaningful)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    y = y[torch.randperm(len(y), generator=gen)]
    proto = torch.randn(K, 1, 8, 8, generator=gen)
    x = proto[y] + 0.3 * torch.randn(len(y), 1, 8, 8, generator=gen)
    return x, y


def _crfd(augment="dsa", **kw):
    x, y = _real()
    kw = {"num_models": 2, "model_kwargs": {"width": 6}, "batch_size": 8, "seed": 5, **kw}
    return CRFD(x, y, K, augment=augment, **kw), x, y


def test_matches_reference_without_augmentation():
    crfd, x, y = _crfd(augment=None)
    labels = torch.tensor([0, 0, 1, 2, 2])
    syn = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = 0.0
    with torch.no_grad():
        for net in crfd.nets:
            net = net.double()
            real_feats = net.block_outputs(x.double())
            syn_feats = net.block_outputs(syn.double())
            for fr, fs in zip(real_feats, syn_feats):
                for c in range(K):
                    ref += float(((fr[y == c].mean(0) - fs[labels == c].mean(0)) ** 2).sum())
            net.float()
    ref /= len(crfd.nets)
    got = crfd(syn, labels)
    assert got == pytest.approx(ref, rel=1e-5)


def test_batched_equals_one_at_a_time():
    crfd, x, y = _crfd(syn_augments=3)
    gen = torch.Generator().manual_seed(2)
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    cands = [torch.randn(7, 1, 8, 8, generator=gen) for _ in range(4)]
    batched = crfd.score(cands, labels)
    single = torch.stack([crfd.score(c, labels)[0] for c in cands])
    assert batched.shape == (4,) and batched.dtype == torch.float64
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=0)
    # stacked tensor input and repeated calls give the same numbers
    torch.testing.assert_close(crfd.score(torch.stack(cands), labels), batched, rtol=1e-6, atol=0)
    assert len(set(batched.tolist())) == 4  # the candidates really are scored differently


def test_deterministic_and_meaningful():
    crfd, x, y = _crfd()
    crfd2, _, _ = _crfd()
    labels = torch.arange(K).repeat_interleave(2)
    real_set = torch.cat([x[y == c][:2] for c in range(K)])
    noise = torch.randn(real_set.shape, generator=torch.Generator().manual_seed(3)) * 3
    assert crfd(real_set, labels) == crfd2(real_set, labels)
    assert crfd(real_set, labels) < crfd(noise, labels)
    # wrong labels make real images look worse
    assert crfd(real_set, labels) < crfd(real_set, labels.roll(2))


def test_state_roundtrip():
    crfd, x, y = _crfd()
    tensors = crfd.state_tensors()
    means = CRFD.means_from_tensors(tensors)
    again = CRFD(
        x[:3],
        y[:3],
        K,
        num_models=2,
        model_kwargs={"width": 6},
        batch_size=8,
        seed=5,
        real_means=means,
    )  # the real data is not read again when means are given
    labels = torch.tensor([0, 1, 2])
    syn = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    assert again(syn, labels) == crfd(syn, labels)


def test_bad_input():
    crfd, x, y = _crfd()
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="candidates must be"):
        crfd.score(torch.randn(2, 3, 1, 4, 4), labels)
    with pytest.raises(ValueError, match="labels must"):
        crfd.score(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="labels must"):
        crfd.score(torch.randn(3, 1, 8, 8), labels[:2])
    with pytest.raises(ValueError, match="num_models"):
        CRFD(x, y, K, num_models=0)
    with pytest.raises(ValueError, match="no image of class"):
        CRFD(x[y != 1], y[y != 1], K, num_models=1, model_kwargs={"width": 4})
