"""Flat-parameter ops of trajectory matching: every backend against a float64 oracle."""

from __future__ import annotations

import pytest
import torch

import hpd_fast
from hpd_fast.ops import trajectory_ops as T

INFO = hpd_fast.backend_info()


def _cases():
    out = [("cpu", "reference")]
    if INFO["cpp"]["available"]:
        out.append(("cpu", "cpp"))
    if INFO["triton"]["available"] and not torch.cuda.is_available():
        out.append(("cpu", "triton"))
    if torch.cuda.is_available():
        out.append(("cuda", "reference"))
        for b in ("cuda", "triton"):
            if INFO[b]["available"]:
                out.append(("cuda", b))
    return out


CASES = _cases()
KERNEL_CASES = [c for c in CASES if c[1] != "reference"]
SIZES = [1, 7, 4099, 70001]  # one element, odd, several chunks / programs


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_sgd_step(device, backend, dtype, n):
    theta, grad = (
        torch.randn(n, dtype=dtype, device=device),
        torch.randn(n, dtype=dtype, device=device),
    )
    lr = torch.tensor(0.0173, dtype=dtype, device=device)
    got = T.sgd_step(theta, grad, lr, backend=backend)
    want = theta.double() - lr.double() * grad.double()
    assert got.dtype == dtype and got.shape == (n,)
    torch.testing.assert_close(got.double(), want, **_tol(dtype))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_param_match_loss(device, backend, dtype, n):
    tn, tg, st = (torch.randn(n, dtype=dtype, device=device) for _ in range(3))
    loss, seed = T.param_match_loss(tn, tg, st, backend=backend)
    a, b = tn.double() - tg.double(), st.double() - tg.double()
    den = (b * b).sum()
    assert loss.dim() == 0 and loss.dtype == dtype and seed.dtype == dtype
    torch.testing.assert_close(loss.double(), (a * a).sum() / den, **_tol(dtype))
    torch.testing.assert_close(seed.double(), 2 * a / den, **_tol(dtype))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_adjoint_update(device, backend, dtype, n):
    lam, h, g = (torch.randn(n, dtype=dtype, device=device) for _ in range(3))
    new, dot = T.adjoint_update(lam, h, g, backend=backend)
    torch.testing.assert_close(new.double(), lam.double() + h.double(), **_tol(dtype))
    want = (g.double() * lam.double()).sum()
    # A float32 dot of n terms: compare at the scale of the terms, not of the (cancelling) sum.
    scale = (g.double() * lam.double()).abs().sum()
    assert abs(dot.double() - want) <= (1e-12 if dtype == torch.float64 else 1e-6) * scale + 1e-30


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous(device, backend):
    base = torch.randn(3, 501, device=device)
    theta, grad, other = base[0, ::2], base[1, ::2], base[2, ::2]
    lr = torch.tensor(0.5, device=device)
    torch.testing.assert_close(T.sgd_step(theta, grad, lr, backend=backend), theta - lr * grad)
    new, dot = T.adjoint_update(theta, grad, other, backend=backend)
    torch.testing.assert_close(new, theta + grad)
    torch.testing.assert_close(dot, torch.dot(other, theta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_deterministic(device, backend):
    x, y, z = (torch.randn(100003, device=device) for _ in range(3))
    a = T.param_match_loss(x, y, z, backend=backend)[0]
    b = T.param_match_loss(x, y, z, backend=backend)[0]
    assert torch.equal(a, b)
    assert torch.equal(
        T.adjoint_update(x, y, z, backend=backend)[1], T.adjoint_update(x, y, z, backend=backend)[1]
    )


def test_differentiable_inputs_use_the_reference():
    # The kernels run inside no-grad sweeps; with autograd on, the public function stays exact.
    theta = torch.randn(9, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(9, dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    out = T.sgd_step(theta, grad, lr)
    assert out.requires_grad
    assert torch.autograd.gradcheck(lambda t, a: T.sgd_step(t, grad, a), (theta, lr))
    tn = torch.randn(9, dtype=torch.float64, requires_grad=True)
    tg, st = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: T.param_match_loss(t, tg, st)[0], (tn,))


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_opcheck(device, backend):
    suffix = "_triton" if backend == "triton" else ""
    utils = (
        ("test_schema", "test_autograd_registration")
        if backend == "triton" and device == "cpu"
        else torch.library._OPCHECK_DEFAULT_UTILS
    )
    x, y, z = (torch.randn(1001, device=device) for _ in range(3))
    lr = torch.tensor(0.2, device=device)
    ops = torch.ops.hpd_fast
    torch.library.opcheck(getattr(ops, "sgd_step" + suffix), (x, y, lr), test_utils=utils)
    torch.library.opcheck(getattr(ops, "param_match_loss" + suffix), (x, y, z), test_utils=utils)
    torch.library.opcheck(getattr(ops, "adjoint_update" + suffix), (x, y, z), test_utils=utils)


@pytest.mark.skipif(not INFO["cpp"]["available"], reason="hpd_fast._C not built")
def test_torch_compile_fullgraph_parity():
    def sweep(theta, grad, target, start, lr):
        t1 = T.sgd_step(theta, grad, lr)
        loss, seed = T.param_match_loss(t1, target, start)
        lam, dot = T.adjoint_update(seed, grad, theta)
        return loss, lam, dot

    args = [torch.randn(2049) for _ in range(4)] + [torch.tensor(0.01)]
    want = sweep(*args)
    got = torch.compile(sweep, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    x, y = torch.randn(5), torch.randn(5)
    lr = torch.tensor(0.1)
    with pytest.raises(ValueError, match="grad has shape"):
        T.sgd_step(x, torch.randn(6), lr)
    with pytest.raises(ValueError, match="theta must be 1-D"):
        T.sgd_step(x.view(5, 1), y.view(5, 1), lr)
    with pytest.raises(TypeError, match="lr must be a 0-dim"):
        T.sgd_step(x, y, torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="theta"):
        T.sgd_step(x.long(), y.long(), lr)
    with pytest.raises(TypeError, match="float32 or float64"):
        T.sgd_step(x.half(), y.half(), lr)
    with pytest.raises(ValueError, match="start equals target"):
        T.param_match_loss(x, y, y.clone())
    with pytest.raises(ValueError, match="h is on meta"):
        T.adjoint_update(x, y.to("meta"), x)
    with pytest.raises(ValueError, match="backend must be one of"):
        T.adjoint_update(x, y, x, backend="gpu")
