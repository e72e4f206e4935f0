"""hpd_fast.models._conv.conv2d: the convolution whose every derivative runs on the convolution
kernels. References: finite differences (gradcheck) and PyTorch's own convolution autograd, in
float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpd_fast.models import get_model
from hpd_fast.models._conv import conv2d
from hpd_fast.params import flatten_params, functional_forward

CASES = [  # (x shape, weight shape, stride, padding)
    ((2, 3, 7, 6), (4, 3, 3, 3), 1, 1),
    ((3, 2, 8, 9), (3, 2, 3, 3), 2, 1),
    ((2, 4, 5, 5), (2, 4, 3, 1), (1, 2), (0, 1)),
]


def _inputs(xs, ws, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(ws, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(ws[0], generator=gen, dtype=torch.float64, requires_grad=True)
    return x, w, b


@pytest.mark.parametrize("xs,ws,stride,padding", CASES)
def test_gradcheck_and_gradgradcheck(xs, ws, stride, padding):
    x, w, b = _inputs(xs, ws)
    fn = lambda x, w, b: conv2d(x, w, b, stride, padding)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def _three_orders(conv, x, w, b, seed=1):
    """First, second and third derivatives of a random functional of ``tanh(conv(x, w, b))``
    (the convolution is bilinear: the nonlinearity makes every order depend on it)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.tanh(conv(x, w, b))
    r = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    g1 = torch.autograd.grad((y * r).sum(), (x, w, b), create_graph=True)
    v = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in g1]
    s2 = sum((g * vv).sum() for g, vv in zip(g1, v))
    g2 = torch.autograd.grad(s2, (x, w, b), create_graph=True, allow_unused=True)
    g2 = [torch.zeros_like(t) if g is None else g for g, t in zip(g2, (x, w, b))]
    u = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in g2]
    s3 = sum((g * uu).sum() for g, uu in zip(g2, u))
    g3 = torch.autograd.grad(s3, (x, w, b), allow_unused=True)
    g3 = [torch.zeros_like(t) if g is None else g for g, t in zip(g3, (x, w, b))]
    return [t.detach() for t in (*g1, *g2, *g3)]


@pytest.mark.parametrize("xs,ws,stride,padding", CASES)
def test_three_orders_match_pytorch_convolution(xs, ws, stride, padding):
    x, w, b = _inputs(xs, ws, seed=3)
    mine = _three_orders(lambda x, w, b: conv2d(x, w, b, stride, padding), x, w, b)
    ref = _three_orders(lambda x, w, b: F.conv2d(x, w, b, stride, padding), x, w, b)
    for a, r in zip(mine, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_forward_is_f_conv2d_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=gen) for s in ((4, 8, 12, 12), (16, 8, 3, 3), (16,)))
    assert torch.equal(conv2d(x, w, b, 1, 1), F.conv2d(x, w, b, 1, 1))


def test_only_requested_gradients_are_computed():
    x, w, b = _inputs((2, 3, 6, 6), (4, 3, 3, 3))
    y = conv2d(x.detach(), w, None, 1, 1)
    (gw,) = torch.autograd.grad(y.square().sum(), (w,))
    (ref,) = torch.autograd.grad(F.conv2d(x.detach(), w, None, 1, 1).square().sum(), (w,))
    torch.testing.assert_close(gw, ref, rtol=1e-12, atol=1e-12)


def test_convnet_blocks_after_the_first_use_it_and_match_the_plain_network():
    torch.manual_seed(0)
    net = get_model("ConvNet", 3, 10, (16, 16), width=8, depth=3).double()
    plain = get_model("ConvNet", 3, 10, (16, 16), width=8, depth=3, fused=False).double()
    plain.load_state_dict(net.state_dict())
    assert [blk.reads_images for blk in net.features] == [True, False, False]

    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    y = torch.arange(4)
    theta = flatten_params(net).requires_grad_(True)
    v = torch.randn_like(theta)

    def hvp_and_image_grad(model):
        loss = F.cross_entropy(functional_forward(model, theta, x), y)
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        return torch.autograd.grad(torch.dot(g, v), (theta, x))

    graph = F.cross_entropy(functional_forward(net, theta, x), y).grad_fn
    names, stack, seen = set(), [graph], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert "_ConvBackward" in names and "ConvolutionBackward0" in names

    for a, r in zip(hvp_and_image_grad(net), hvp_and_image_grad(plain)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_under_vmap_it_is_plain_convolution():
    x, w, b = (t.detach() for t in _inputs((3, 2, 2, 5, 5), (4, 2, 3, 3)))
    out = torch.func.vmap(lambda xi: conv2d(xi, w, b, 1, 1))(x)
    torch.testing.assert_close(out, torch.stack([F.conv2d(xi, w, b, 1, 1) for xi in x]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"stride": "1"}, "stride must be an int or a pair"),
        ({"padding": (1, 1, 1)}, "padding must be an int or a pair"),
        ({"x": torch.zeros(3, 5, 5)}, r"x must be \[B, C_in, H, W\]"),
        ({"weight": torch.zeros(4, 2, 3, 3)}, "the same C_in"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"x": torch.zeros(1, 3, 5, 5), "weight": torch.zeros(4, 3, 3, 3)} | kwargs
    with pytest.raises(ValueError, match=match):
        conv2d(**args)
