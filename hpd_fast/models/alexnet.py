"""AlexNet for small images, as used for cross-architecture evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hpd_fast.models._layers import as_size, check_norm, downsample_here, make_norm

__all__ = ["AlexNet"]

# (out channels, kernel, pool after)
_ALEXNET = ((128, 5, True), (192, 5, True), (256, 3, False), (192, 3, False), (192, 3, True))


class AlexNet(nn.Module):
    """Small-image AlexNet: five stride-1 convs (5x5, 5x5, 3x3, 3x3, 3x3; 'same' padding) with
    ReLU and three 2x2 max pools, then one Linear.

    At 32 px the map ends at 4x4 (``Linear(192 * 16, num_classes)``); at 8 px at 1x1. Pools
    that would shrink a map below 2x2 before more convs are skipped. ``norm`` defaults to
    "none" (the usual evaluation AlexNet has no normalisation); any ConvNet norm may be given.

    Input [B, channel, H, W] float; output logits [B, num_classes].
    """

    def __init__(
        self,
        channel: int = 3,
        num_classes: int = 10,
        norm: str = "none",
        im_size: int | Sequence[int] = (32, 32),
    ) -> None:
        super().__init__()
        check_norm(norm)
        h, w = as_size(im_size)
        layers: list[nn.Module] = []
        c_in = channel
        for i, (c_out, k, pool) in enumerate(_ALEXNET):
            layers.append(nn.Conv2d(c_in, c_out, k, stride=1, padding=k // 2))
            if norm != "none":
                layers.append(make_norm(norm, c_out))
            layers.append(nn.ReLU())
            if pool and downsample_here(min(h, w), last=i == len(_ALEXNET) - 1):
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.feature_shape = (c_in, h, w)
        self.classifier = nn.Linear(c_in * h * w, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features [B, 192 * h * w]."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        return self.classifier(self.embed(x))
