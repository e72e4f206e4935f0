import pytest
import torch
from torch import nn

from hpd_fast.models import (
    MODEL_NAMES,
    VGG11,
    AlexNet,
    ConvNet,
    ResNet18,
    depth_for_resolution,
    get_model,
)
from hpd_fast.params import check_replayable


@pytest.mark.parametrize(
    ("channel", "im_size", "depth", "final"),
    [
        (3, (32, 32), 3, (4, 4)),
        (1, (8, 8), 2, (2, 2)),
        (1, (8, 8), 3, (1, 1)),
        (3, (64, 64), 4, (4, 4)),
        (3, (31, 17), 2, (7, 4)),
        (2, (5, 5), 1, (2, 2)),
    ],
)
def test_convnet_shapes(channel, im_size, depth, final):
    net = ConvNet(channel=channel, num_classes=7, width=8, depth=depth, im_size=im_size)
    x = torch.randn(3, channel, *im_size)
    assert net(x).shape == (3, 7)
    assert net.feature_shape == (8, *final)
    assert net.classifier.in_features == 8 * final[0] * final[1]
    assert net.embed(x).shape == (3, 8 * final[0] * final[1])
    outs = net.block_outputs(x)
    assert len(outs) == depth == len(net.features)
    h, w = im_size
    for out in outs:
        h, w = h // 2, w // 2
        assert out.shape == (3, 8, h, w)
    torch.testing.assert_close(net.embed(x), outs[-1].flatten(1))
    torch.testing.assert_close(net(x), net.classifier(outs[-1].flatten(1)))


def test_convnet_no_pooling_and_options():
    net = ConvNet(channel=1, num_classes=2, width=4, depth=2, pooling="none", im_size=6)
    assert net.feature_shape == (4, 6, 6)
    assert net(torch.randn(2, 1, 6, 6)).shape == (2, 2)
    mp = ConvNet(width=4, depth=2, pooling="maxpooling", act="leakyrelu", norm="layernorm")
    assert isinstance(mp.features[0][3], nn.MaxPool2d)
    assert isinstance(mp.features[0][2], nn.LeakyReLU)
    assert isinstance(mp.features[0][1], nn.GroupNorm) and mp.features[0][1].num_groups == 1
    plain = ConvNet(width=4, depth=2, norm="none")
    assert isinstance(plain.features[0][1], nn.Identity)
    assert isinstance(ConvNet(width=4, norm="batchnorm").features[1][1], nn.BatchNorm2d)


def test_convnet3_parameter_count():
    net = ConvNet(channel=3, num_classes=10, width=128, depth=3, im_size=(32, 32))
    conv1 = 3 * 128 * 9 + 128
    norms = 3 * (2 * 128)
    conv23 = 2 * (128 * 128 * 9 + 128)
    fc = 128 * 4 * 4 * 10 + 10
    assert sum(p.numel() for p in net.parameters()) == conv1 + norms + conv23 + fc == 320010
    # Instance norm keeps no running statistics.
    assert len(list(net.buffers())) == 0


def test_instancenorm_is_per_sample_per_channel():
    net = ConvNet(channel=3, width=6, depth=1, im_size=8)
    norm = net.features[0][1]
    assert isinstance(norm, nn.GroupNorm)
    assert norm.num_groups == norm.num_channels == 6 and norm.affine
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6) + 0.5)
        norm.bias.copy_(torch.randn(6))
    z = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3 + 1
    ref = (z - z.mean((2, 3), keepdim=True)) / torch.sqrt(
        z.var((2, 3), unbiased=False, keepdim=True) + norm.eps
    )
    ref = ref * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]
    torch.testing.assert_close(norm.double()(z), ref)
    # Changing one channel of one sample leaves every other channel and sample unchanged.
    z2 = z.clone()
    z2[1, 2] = z2[1, 2] * 5 + 3
    out, out2 = norm(z), norm(z2)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 2] = False
    torch.testing.assert_close(out[mask], out2[mask])


def test_convnet_errors():
    with pytest.raises(ValueError, match="norm"):
        ConvNet(norm="weird")
    with pytest.raises(ValueError, match="pooling"):
        ConvNet(pooling="sum")
    with pytest.raises(ValueError, match="act"):
        ConvNet(act="gelu2")
    with pytest.raises(ValueError, match="depth"):
        ConvNet(depth=4, im_size=(8, 8))
    with pytest.raises(ValueError, match="depth"):
        ConvNet(depth=0)
    with pytest.raises(ValueError, match="im_size"):
        ConvNet(im_size=(32,))
    ConvNet(depth=4, im_size=(8, 8), pooling="none", width=2)  # no pooling: any depth


def test_depth_for_resolution():
    assert [depth_for_resolution(r) for r in (8, 16, 28, 32, 64, 128, 256)] == [
        2,
        2,
        3,
        3,
        4,
        5,
        6,
    ]
    assert depth_for_resolution((64, 32)) == 3
    net = ConvNet.for_resolution(64, channel=1, num_classes=4, width=8)
    assert len(net.features) == 4 and net.feature_shape == (8, 4, 4)
    net8 = ConvNet.for_resolution(8, channel=1, width=8)
    assert len(net8.features) == 2 and net8(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert len(ConvNet.for_resolution(32, depth=1, width=4).features) == 1


def test_get_model():
    net = get_model("ConvNet", 3, 10, (32, 32))
    assert isinstance(net, ConvNet) and len(net.features) == 3
    assert len(get_model("ConvNet", 1, 10, 8, width=8).features) == 2
    for name, depth in (("ConvNetD3", 3), ("ConvNetD4", 4), ("ConvNetD5", 5)):
        net = get_model(name, 3, 10, (128, 128), width=4)
        assert len(net.features) == depth
        assert net(torch.randn(1, 3, 128, 128)).shape == (1, 10)
    with pytest.raises(ValueError, match="ConvNetD4"):
        get_model("ConvNet9", 3, 10, 32)
    with pytest.raises(ValueError, match="depth"):
        get_model("ConvNetD3", 3, 10, 32, depth=2)
    for name in ("ConvNet", "ConvNetD3", "ConvNetD4", "ConvNetD5", "ResNet18", "VGG11", "AlexNet"):
        assert name in MODEL_NAMES


@pytest.mark.parametrize("cls", [ResNet18, VGG11, AlexNet])
@pytest.mark.parametrize(("channel", "size"), [(1, 8), (3, 32)])
def test_eval_architectures_run(cls, channel, size):
    net = get_model(cls.__name__, channel, 5, (size, size))
    assert isinstance(net, cls)
    x = torch.randn(2, channel, size, size)
    with torch.no_grad():  # forward only: these networks are large for a 2-core test run
        out = net(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    # No degenerate (1x1) normalised maps: the two images must give different logits.
    assert not torch.allclose(out[0], out[1])
    check_replayable(net)  # instance norm / no norm by default


def test_eval_architecture_norms():
    assert any(isinstance(m, nn.BatchNorm2d) for m in ResNet18(norm="batchnorm").modules())
    assert any(isinstance(m, nn.GroupNorm) for m in VGG11(channel=1, im_size=8).modules())
    assert any(isinstance(m, nn.GroupNorm) for m in AlexNet(norm="instancenorm").modules())
    with pytest.raises(ValueError, match="norm"):
        ResNet18(norm="bn")
