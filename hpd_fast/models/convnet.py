"""The ConvNet student used throughout dataset distillation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hpd_fast.models._layers import FusedConvBlock, as_size, check_norm, make_act, make_norm

__all__ = ["POOLINGS", "ConvNet", "depth_for_resolution"]

POOLINGS = ("avgpooling", "maxpooling", "none")


def depth_for_resolution(im_size: int | Sequence[int]) -> int:
    """Conventional ConvNet depth for an image size.

    32 px -> 3, 64 px -> 4 ("ConvNetD4"), 128 px -> 5 ("ConvNetD5"), 256 px -> 6: in general
    ``round(log2(min side)) - 2``, which leaves a 4x4 final map at those sizes. Below 16 px the
    depth is 2, so 8x8 digits go 8 -> 4 -> 2: a third block would normalise 2x2 maps (4 values
    per channel) and end at 1x1, discarding all spatial layout.
    """
    side = min(as_size(im_size))
    if side < 2:
        raise ValueError(f"im_size must be at least 2 px for a pooled ConvNet, got {im_size!r}")
    if side < 4:
        return 1
    return max(2, round(math.log2(side)) - 2)


class ConvNet(nn.Module):
    """``depth`` blocks of [3x3 conv -> norm -> act -> 2x2 pool], then one Linear.

    Args:
        channel: input channels C_in.
        num_classes: number of logits.
        width: channels of every conv.
        depth: number of blocks.
        norm: "instancenorm" (GroupNorm(C, C), no running statistics), "batchnorm",
            "layernorm" (GroupNorm(1, C)), "groupnorm" (GroupNorm(4, C)) or "none".
        act: "relu", "leakyrelu" or "sigmoid".
        pooling: "avgpooling", "maxpooling" (kernel 2, stride 2) or "none".
        im_size: input (H, W) or one int for square images.
        fused: run each block's instance norm -> ReLU -> average pool (or no pool) as one fused
            op (:func:`hpd_fast.ops.instance_norm_relu_pool`: fewer passes over memory, exact
            first and second derivatives). Applies to norm="instancenorm" with act="relu" and
            pooling "avgpooling" or "none"; other configurations ignore it. Parameters, their
            names and order are the same either way; outputs equal to rounding.

    Attributes:
        features: ``nn.Sequential`` of ``depth`` blocks, each ``nn.Sequential(conv, norm, act,
            pool)`` (identity modules where norm or pooling is "none"); a
            :class:`~hpd_fast.models._layers.FusedConvBlock` (a subclass) when fused.
        fused: whether the blocks run the fused op.
        classifier: ``nn.Linear(width * h * w, num_classes)``, (h, w) = ``feature_shape[1:]``.
        feature_shape: (width, h, w) of the last block's output.

    Input [B, C_in, H, W] float; output logits [B, num_classes].
    """

    def __init__(
        self,
        channel: int = 3,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        act: str = "relu",
        pooling: str = "avgpooling",
        im_size: int | Sequence[int] = (32, 32),
        fused: bool = True,
    ) -> None:
        super().__init__()
        check_norm(norm)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        for arg, value in (("channel", channel), ("num_classes", num_classes), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        h, w = as_size(im_size)
        make_act(act)  # validate the name before building anything
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        self.fused = (
            fused and norm == "instancenorm" and act == "relu" and pooling in ("avgpooling", "none")
        )
        block_cls = FusedConvBlock if self.fused else nn.Sequential

        blocks = []
        c_in = channel
        for i in range(depth):
            if pooling == "avgpooling":
                pool: nn.Module = nn.AvgPool2d(kernel_size=2, stride=2)
            elif pooling == "maxpooling":
                pool = nn.MaxPool2d(kernel_size=2, stride=2)
            else:
                pool = nn.Identity()
            if pooling != "none":
                if min(h, w) < 2:
                    raise ValueError(
                        f"depth={depth} pools a {as_size(im_size)} image below 1 pixel at "
                        f"block {i + 1}; use a smaller depth or a larger im_size"
                    )
                h, w = h // 2, w // 2
            blocks.append(
                block_cls(
                    nn.Conv2d(c_in, width, kernel_size=3, padding=1, bias=True),
                    make_norm(norm, width),
                    make_act(act),
                    pool,
                )
            )
            c_in = width
        if self.fused:
            blocks[0].reads_images = True
        self.features = nn.Sequential(*blocks)
        self.feature_shape = (width, h, w)
        self.classifier = nn.Linear(width * h * w, num_classes)

    @classmethod
    def for_resolution(
        cls,
        res: int | Sequence[int],
        channel: int = 3,
        num_classes: int = 10,
        **kw: Any,
    ) -> ConvNet:
        """ConvNet with the conventional depth for ``res`` (see :func:`depth_for_resolution`).

        ``kw`` is passed to the constructor; an explicit ``depth`` in ``kw`` wins.
        """
        kw.setdefault("depth", depth_for_resolution(res))
        return cls(channel=channel, num_classes=num_classes, im_size=as_size(res), **kw)

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every block: ``depth`` tensors [B, width, h_l, w_l]."""
        outs = []
        for block in self.features:
            x = block(x)
            outs.append(x)
        return outs

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened last-block features [B, width * h * w] (the classifier's input)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for images [B, C_in, H, W]."""
        return self.classifier(self.embed(x))
