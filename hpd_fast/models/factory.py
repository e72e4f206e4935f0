"""Build a network by its conventional name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from hpd_fast.models._layers import as_size
from hpd_fast.models.alexnet import AlexNet
from hpd_fast.models.convnet import ConvNet
from hpd_fast.models.resnet import ResNet18
from hpd_fast.models.vgg import VGG11

__all__ = ["MODEL_NAMES", "get_model"]

_MAX_DEPTH = 8


def _convnet_fixed(depth: int) -> Callable[..., nn.Module]:
    def build(channel: int, num_classes: int, im_size: tuple[int, int], **kw: Any) -> nn.Module:
        if "depth" in kw:
            raise ValueError(f"ConvNetD{depth} fixes depth={depth}; do not pass depth")
        return ConvNet(channel, num_classes, depth=depth, im_size=im_size, **kw)

    return build


def _convnet(channel: int, num_classes: int, im_size: tuple[int, int], **kw: Any) -> nn.Module:
    return ConvNet.for_resolution(im_size, channel, num_classes, **kw)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "ConvNet": _convnet,
    **{f"ConvNetD{d}": _convnet_fixed(d) for d in range(1, _MAX_DEPTH + 1)},
    "ResNet18": ResNet18,
    "VGG11": VGG11,
    "AlexNet": AlexNet,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def get_model(
    name: str,
    channel: int = 3,
    num_classes: int = 10,
    im_size: int | Sequence[int] = (32, 32),
    **kw: Any,
) -> nn.Module:
    """Network ``name`` for images [B, channel, *im_size] and ``num_classes`` logits.

    Names:
        "ConvNet": depth chosen for the resolution (3 at 32 px, 4 at 64, 5 at 128, 2 at 8; see
            :func:`hpd_fast.models.convnet.depth_for_resolution`); ``depth=`` overrides it.
        "ConvNetD1" ... "ConvNetD8": ConvNet of that depth.
        "ResNet18", "VGG11", "AlexNet": small-image evaluation networks.

    ``kw`` goes to the constructor (e.g. ``norm="batchnorm"``, ``width=64``).

    Raises:
        ValueError: for an unknown ``name``, listing the valid ones.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](channel=channel, num_classes=num_classes, im_size=as_size(im_size), **kw)
