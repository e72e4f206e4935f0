"""ResNet-18 for small images, as used for cross-architecture evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hpd_fast.models._layers import as_size, check_norm, downsample_here, make_norm

__all__ = ["BasicBlock", "ResNet18"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; [B, c_in, H, W] -> [B, c_out, H/s, W/s]."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), make_norm(norm, c_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with a 3x3 stride-1 stem (no max pool), for 8-64 px images.

    Stages of 2 basic blocks with 64, 128, 256, 512 channels; stages 2-4 halve the map, except
    that a halving which would leave a normalised map below 2x2 is skipped (only matters for
    inputs under 16 px, e.g. 8x8 digits: 8 -> 8 -> 4 -> 2 -> 2). Global average pooling and one
    Linear follow. ``norm="instancenorm"`` (default) is GroupNorm(C, C).

    Input [B, channel, H, W] float; output logits [B, num_classes].
    """

    def __init__(
        self,
        channel: int = 3,
        num_classes: int = 10,
        norm: str = "instancenorm",
        im_size: int | Sequence[int] = (32, 32),
    ) -> None:
        super().__init__()
        check_norm(norm)
        h, w = as_size(im_size)
        side = min(h, w)
        self.stem = nn.Sequential(
            nn.Conv2d(channel, 64, 3, stride=1, padding=1, bias=False),
            make_norm(norm, 64),
            nn.ReLU(),
        )
        stages = []
        c_in = 64
        for i, c_out in enumerate((64, 128, 256, 512)):
            stride = 2 if i > 0 and downsample_here(side, last=False) else 1
            side //= stride
            stages.append(
                nn.Sequential(
                    BasicBlock(c_in, c_out, stride, norm), BasicBlock(c_out, c_out, 1, norm)
                )
            )
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features [B, 512]."""
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        return self.classifier(self.embed(x))
