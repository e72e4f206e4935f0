"""VGG-11 for small images, as used for cross-architecture evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hpd_fast.models._layers import as_size, check_norm, downsample_here, make_norm

__all__ = ["VGG11"]

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11: eight 3x3 convs (each followed by norm and ReLU) and five 2x2 max pools.

    At 32 px the map ends at 1x1 and the classifier is ``Linear(512, num_classes)``. A pool that
    would leave the following convs on a map below 2x2 is skipped (inputs under 32 px, e.g.
    8x8: 8 -> 4 -> 2, then 2 until the final pool to 1). ``norm="instancenorm"`` (default) is
    GroupNorm(C, C).

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
        n_pools = _VGG11.count("M")
        layers: list[nn.Module] = []
        c_in, pools_seen = channel, 0
        for v in _VGG11:
            if v == "M":
                pools_seen += 1
                if downsample_here(min(h, w), last=pools_seen == n_pools):
                    layers.append(nn.MaxPool2d(2, 2))
                    h, w = h // 2, w // 2
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), make_norm(norm, v), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.feature_shape = (c_in, h, w)
        self.classifier = nn.Linear(c_in * h * w, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features [B, 512 * h * w]."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        return self.classifier(self.embed(x))
