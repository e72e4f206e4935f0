import pytest
import torch
from torch import nn

from hpd_fast.models.convnet import ConvNet
from hpd_fast.params import (
    check_replayable,
    flatten_params,
    functional_forward,
    load_flat_params_,
    num_params,
    param_layout,
    unflatten_params,
)


def _small_net(dtype: torch.dtype = torch.float32) -> nn.Module:
    return ConvNet(channel=2, num_classes=3, width=5, depth=2, im_size=(7, 6)).to(dtype)


def test_layout_follows_named_parameters():
    net = _small_net()
    layout = param_layout(net)
    assert [n for n, _ in layout] == [n for n, _ in net.named_parameters()]
    assert [s for _, s in layout] == [tuple(p.shape) for p in net.parameters()]
    assert num_params(net) == sum(p.numel() for p in net.parameters())
    assert num_params(layout) == num_params(net)


def test_flatten_order_and_values():
    net = _small_net()
    flat = flatten_params(net)
    assert flat.dim() == 1 and flat.numel() == num_params(net)
    expected = torch.cat([p.detach().flatten() for p in net.parameters()])
    torch.testing.assert_close(flat, expected, rtol=0, atol=0)
    assert not flat.requires_grad
    # A new tensor, not a view of some parameter.
    flat.add_(1.0)
    assert not torch.equal(flat, flatten_params(net))


def test_round_trip_unflatten_and_load():
    src, dst = _small_net(), _small_net()
    flat = flatten_params(src)
    pieces = unflatten_params(flat, src)
    for name, p in src.named_parameters():
        torch.testing.assert_close(pieces[name], p.detach(), rtol=0, atol=0)
    # Unflatten with a layout gives the same pieces, and they are views of flat.
    pieces2 = unflatten_params(flat, param_layout(src))
    assert list(pieces2) == list(pieces)
    base = flat.untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == base for v in pieces2.values())
    assert not torch.equal(flatten_params(dst), flat)
    out = load_flat_params_(dst, flat)
    assert out is dst
    torch.testing.assert_close(flatten_params(dst), flat, rtol=0, atol=0)
    x = torch.randn(4, 2, 7, 6)
    torch.testing.assert_close(dst(x), src(x))


def test_load_casts_to_parameter_dtype():
    net = _small_net()
    flat64 = torch.randn(num_params(net), dtype=torch.float64)
    load_flat_params_(net, flat64)
    assert next(net.parameters()).dtype == torch.float32
    torch.testing.assert_close(flatten_params(net), flat64.float())


def test_functional_forward_matches_module_and_gradients():
    torch.manual_seed(1)
    net = _small_net(torch.float64)
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    flat = flatten_params(net).requires_grad_(True)

    out = functional_forward(net, flat, x)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    loss = nn.functional.cross_entropy(out, y)
    (g_flat,) = torch.autograd.grad(loss, flat)

    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    g_ref = torch.cat([p.grad.flatten() for p in net.parameters()])
    torch.testing.assert_close(g_flat, g_ref, rtol=1e-12, atol=1e-12)
    assert g_flat.abs().sum() > 0
    # The module's own parameters were not modified.
    torch.testing.assert_close(flatten_params(net), flat.detach(), rtol=0, atol=0)


def test_functional_forward_double_backward():
    # Hessian-vector products through the flat vector, checked against finite differences.
    torch.manual_seed(2)
    net = _small_net(torch.float64)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    y = torch.tensor([1, 0])
    flat = flatten_params(net)
    v = torch.randn_like(flat)

    def grad_at(theta: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        loss = nn.functional.cross_entropy(functional_forward(net, theta, x), y)
        return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]

    theta = flat.clone().requires_grad_(True)
    (hv,) = torch.autograd.grad(grad_at(theta, create_graph=True), theta, v)
    eps = 1e-6
    fd = (
        grad_at((flat + eps * v).requires_grad_(True))
        - grad_at((flat - eps * v).requires_grad_(True))
    ) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-5, atol=1e-7)


def test_functional_forward_uses_module_buffers():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        net[1].running_mean.fill_(0.5)
    x = torch.randn(5, 3)
    torch.testing.assert_close(functional_forward(net, flatten_params(net), x), net(x))


def test_unflatten_errors():
    net = _small_net()
    p = num_params(net)
    with pytest.raises(ValueError, match="flat"):
        unflatten_params(torch.zeros(p + 1), net)
    with pytest.raises(ValueError, match="flat"):
        unflatten_params(torch.zeros(p - 1), net)
    with pytest.raises(ValueError, match="flat"):
        unflatten_params(torch.zeros(1, p), net)
    with pytest.raises(ValueError, match="flat"):
        load_flat_params_(net, torch.zeros(p + 3))
    with pytest.raises(ValueError, match="flat"):
        functional_forward(net, torch.zeros(2, p), torch.randn(1, 2, 7, 6))


def test_flatten_errors():
    with pytest.raises(ValueError, match="no parameters"):
        flatten_params(nn.ReLU())
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="dtype"):
        flatten_params(mixed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_flatten_mixed_devices():
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).cuda())
    with pytest.raises(ValueError, match="device"):
        flatten_params(mixed)


def test_check_replayable():
    check_replayable(ConvNet(im_size=8, depth=2, width=4))  # instance norm: fine
    check_replayable(nn.Sequential(nn.Linear(2, 2)))

    bn = ConvNet(im_size=8, depth=2, width=4, norm="batchnorm")
    with pytest.raises(ValueError, match="instancenorm") as err:
        check_replayable(bn)
    assert "features.0.1" in str(err.value) and ".eval()" in str(err.value)
    check_replayable(bn.eval())  # eval mode uses fixed statistics

    no_stats = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    check_replayable(no_stats.train())
    with pytest.raises(ValueError):
        check_replayable(nn.BatchNorm1d(3))
