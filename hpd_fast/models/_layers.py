"""Layer builders shared by the small-image networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hpd_fast.models._conv import conv2d
from hpd_fast.ops.instance_norm_relu_pool import instance_norm_relu_pool

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS = ("relu", "leakyrelu", "sigmoid")


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer for a [B, channels, H, W] map.

    "instancenorm" is ``GroupNorm(C, C)`` with affine parameters: per-sample, per-channel
    statistics and no running buffers, which is what the dataset-distillation literature calls
    instance norm. "layernorm" is ``GroupNorm(1, C)``, "groupnorm" is ``GroupNorm(4, C)``,
    "batchnorm" is ``BatchNorm2d(C)`` and "none" is the identity.
    """
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        return nn.GroupNorm(1, channels, affine=True)
    if norm == "groupnorm":
        if channels % 4:
            raise ValueError(f'norm="groupnorm" needs channels divisible by 4, got {channels}')
        return nn.GroupNorm(4, channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def make_act(act: str) -> nn.Module:
    """Activation by name: "relu", "leakyrelu" (slope 0.01) or "sigmoid"."""
    if act == "relu":
        return nn.ReLU(inplace=False)
    if act == "leakyrelu":
        return nn.LeakyReLU(0.01)
    if act == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"act must be one of {ACTS}, got {act!r}")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def as_size(im_size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from an int or a pair; raises ValueError naming ``im_size`` otherwise."""
    size = (im_size, im_size) if isinstance(im_size, int) else tuple(im_size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(f"im_size must be a positive int or a pair of them, got {im_size!r}")
    return size  # type: ignore[return-value]


def downsample_here(side: int, last: bool) -> bool:
    """Whether a 2x downsampling step should run on a map whose smaller side is ``side``.

    Small inputs (8x8 digits) have fewer pixels than the architectures' fixed number of
    downsamplings expects. A step that would leave layers with a learned normalisation on a map
    below 2x2 (where per-channel statistics are degenerate) is skipped; only the last step,
    after which no convolution follows, may reach 1x1.
    """
    return side >= 4 or (last and side >= 2)


def _is_fusable_pool(pool: nn.Module) -> bool:
    if isinstance(pool, nn.Identity):
        return True
    if type(pool) is not nn.AvgPool2d:
        return False
    two = (2, (2, 2))
    return (
        pool.kernel_size in two
        and pool.stride in two
        and pool.padding in (0, (0, 0))
        and not pool.ceil_mode
        and pool.divisor_override is None
    )


class FusedConvBlock(nn.Sequential):
    """``nn.Sequential(conv, GroupNorm(C, C), ReLU, AvgPool2d(2, 2) or Identity)`` whose forward
    runs everything after the convolution as one fused op,
    :func:`hpd_fast.ops.instance_norm_relu_pool` (exact first and second derivatives).

    The children, their names and their parameters are those of the plain ``nn.Sequential``, so
    ``named_parameters()``, ``state_dict()`` and flat-parameter layouts are unchanged, and
    ``torch.func.functional_call`` swaps the norm's weight and bias as usual. Should the
    children no longer fit that pattern (replaced or sliced), it runs them one by one.

    Input ``[B, C_in, H, W]``; output ``[B, C, H // 2, W // 2]`` (``[B, C, H, W]`` without pool).
    """

    def fusable(self) -> bool:
        """Whether the children still form conv -> instance norm -> ReLU -> avg pool / none."""
        if len(self) != 4:
            return False
        norm, act, pool = self[1], self[2], self[3]
        return (
            type(norm) is nn.GroupNorm
            and norm.affine
            and norm.num_groups == norm.num_channels
            and type(act) is nn.ReLU
            and _is_fusable_pool(pool)
        )

    #: Set by :class:`~hpd_fast.models.ConvNet` on its first block, whose input is the image
    #: batch. Elsewhere, on the CPU, the convolution runs through
    #: :func:`hpd_fast.models._conv.conv2d` (a faster double backward; same numbers). The first
    #: block keeps ``nn.Conv2d``: a gradient taken with respect to the parameters only does not
    #: need the image gradient, which PyTorch's convolution then skips and a custom autograd
    #: function cannot.
    reads_images: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fusable():
            return super().forward(x)
        conv, norm, _, pool = self
        if not self.reads_images and x.device.type == "cpu" and _is_plain_conv(conv):
            z = conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        else:
            z = conv(x)
        return instance_norm_relu_pool(
            z, norm.weight, norm.bias, eps=norm.eps, pool=not isinstance(pool, nn.Identity)
        )


def _is_plain_conv(conv: nn.Module) -> bool:
    """An ``nn.Conv2d`` that :func:`hpd_fast.models._conv.conv2d` computes exactly."""
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and tuple(conv.dilation) == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )
