"""A small class-conditional convolutional generator with explicit synthesis stages.

Layout for ``image_shape=(C, H, W)``: the first map has side ``H / 2**n_up`` x ``W / 2**n_up``
(2x2 for images up to 8 px, 4x4 above), then ``n_up`` doubling stages, then refinement stages
at full resolution until ``num_stages`` is reached (default: one). Every stage has ``width``
channels.

    mapping:  w = MLP(pixelnorm(z) ++ embed(label))                       w  [M, latent_dim]
    stage 1:  f_1 = lrelu(pixelnorm(Linear(w) reshaped))                  [M, width, h0, w0]
    stage k:  f_k = lrelu(FiLM_w(pixelnorm(conv3x3(up2(f_{k-1})))))       doubling stages
              f_k = lrelu(FiLM_w(pixelnorm(conv3x3(f_{k-1}))))            refinement stages
    head:     tanh(conv1x1(f_K)) in [-1, 1] -> [0, 1] -> (x - mean) / std [M, C, H, W]

FiLM_w(x) = x * (1 + gamma(w)) + beta(w), one affine map of w per stage. Examples:
8x8 digits -> 4 stages at 2, 4, 8, 8 px; 32x32 -> 5 stages at 4, 8, 16, 32, 32 px.
No layer has batch statistics, so rendering is deterministic and per-image independent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpd_fast.generators.base import StagedGenerator

__all__ = ["ConvGenerator", "stage_layout"]

_SLOPE = 0.2


def _pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise each position's vector over dim 1 to unit RMS (batch-independent)."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def stage_layout(
    image_shape: Sequence[int], num_stages: int | None = None
) -> list[tuple[int, int]]:
    """Spatial size (h, w) of f_k for k = 1..num_stages of a :class:`ConvGenerator`.

    Raises ValueError if H and W are not divisible by the number of doublings, or if
    ``num_stages`` is smaller than the number of doubling stages plus one.
    """
    _, h, w = (int(s) for s in image_shape)
    side = min(h, w)
    if side < 4:
        raise ValueError(f"image_shape must have H, W >= 4, got {tuple(image_shape)}")
    start = 2 if side <= 8 else 4
    n_up = int(math.floor(math.log2(side / start)))
    if h % (1 << n_up) or w % (1 << n_up):
        raise ValueError(
            f"image_shape H and W must be divisible by {1 << n_up} ({n_up} doublings), got {(h, w)}"
        )
    if num_stages is None:
        num_stages = n_up + 2
    if not isinstance(num_stages, int) or num_stages < n_up + 1:
        raise ValueError(
            f"num_stages must be an int >= {n_up + 1} for image_shape {tuple(image_shape)}"
            f" ({n_up} doublings after the first map), got {num_stages!r}"
        )
    sizes = [(h >> (n_up - i), w >> (n_up - i)) for i in range(n_up + 1)]
    return sizes + [(h, w)] * (num_stages - n_up - 1)


class _StyleConv(nn.Module):
    """[optional 2x nearest upsample] -> conv3x3 -> pixelnorm -> FiLM(w) -> leaky ReLU."""

    def __init__(self, channels: int, latent_dim: int, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(latent_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)  # starts as the identity modulation
        nn.init.zeros_(self.film.bias)

    def forward(self, f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            f = F.interpolate(f, scale_factor=2.0, mode="nearest")
        x = _pixel_norm(self.conv(f))
        gamma, beta = self.film(w).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return F.leaky_relu(x * (1 + gamma) + beta, _SLOPE)


class ConvGenerator(StagedGenerator):
    """Small class-conditional generator: mapping MLP + FiLM-modulated conv stages.

    Args:
        num_classes: number of classes (label embedding rows).
        image_shape: (C, H, W) of the output; H, W >= 4 (see :func:`stage_layout`).
        latent_dim: size of z and of w.
        width: channels of every synthesis stage.
        num_stages: number of stages K (default: doublings + 2, i.e. one refinement stage).
        mean, std: per-channel statistics of the real data in [0, 1] units (output
            normalisation); None means images in [0, 1].

    Latents: ``w`` [M, latent_dim]; ``f_k`` [M, width, h_k, w_k] with (h_k, w_k) from
    :func:`stage_layout`. All parameters float32 unless converted.
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int] = (1, 8, 8),
        latent_dim: int = 32,
        width: int = 64,
        num_stages: int | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> None:
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        sizes = stage_layout(image_shape, num_stages)
        super().__init__(
            num_stages=len(sizes),
            num_classes=num_classes,
            image_shape=image_shape,
            latent_dim=latent_dim,
            mean=mean,
            std=std,
            output_range=(-1.0, 1.0),
        )
        self.width = width
        self.sizes = sizes
        # Constructor arguments, for save_generator / load_generator.
        self.config: dict[str, Any] = {
            "num_classes": num_classes,
            "image_shape": list(self.image_shape),
            "latent_dim": latent_dim,
            "width": width,
            "num_stages": len(sizes),
        }
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.mapping = nn.Sequential(
            nn.Linear(2 * latent_dim, 2 * latent_dim),
            nn.LeakyReLU(_SLOPE),
            nn.Linear(2 * latent_dim, latent_dim),
        )
        h0, w0 = sizes[0]
        self.input = nn.Linear(latent_dim, width * h0 * w0)
        self.stages = nn.ModuleList(
            _StyleConv(width, latent_dim, upsample=sizes[k] != sizes[k - 1])
            for k in range(1, len(sizes))
        )
        self.to_img = nn.Conv2d(width, self.image_shape[0], 1)

    def _sample_w(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(labels.shape[0], self.latent_dim, generator=gen)
        return self.map(z.to(device=labels.device, dtype=self.dtype), labels)

    def map(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mapping network: z [M, latent_dim] float, labels [M] int64 -> w [M, latent_dim]."""
        e = self.embed(labels)
        return self.mapping(torch.cat([_pixel_norm(z), _pixel_norm(e)], dim=1))

    def _first_stage(self, w: torch.Tensor) -> torch.Tensor:
        h0, w0 = self.sizes[0]
        x = self.input(w).view(w.shape[0], self.width, h0, w0)
        return F.leaky_relu(_pixel_norm(x), _SLOPE)

    def _advance(self, w: torch.Tensor, f: torch.Tensor, stage: int) -> torch.Tensor:
        return self.stages[stage - 1](f, w)

    def _head(self, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.to_img(f))

    def generate_raw(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Full forward used in training: z [M, latent_dim], labels [M] -> [M, C, H, W] in [-1, 1]."""
        w = self.map(z, labels)
        f = self._first_stage(w)
        for k in range(1, self.num_stages):
            f = self._advance(w, f, k)
        return self._head(w, f)
