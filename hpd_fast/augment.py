"""Differentiable siamese augmentation (DSA) with explicit seeds.

Every transform is differentiable with respect to the images, and all of its randomness comes
from a CPU ``torch.Generator`` seeded by the caller. Replaying a distillation step therefore
only needs the seed: the same ``(seed, batch size, siamese)`` gives the same transformation on
any device, and the global RNG is never touched.

Transform families (the published DSA parameterisation):

- ``color``: brightness ``x + (r - 0.5) * brightness``; saturation scales each pixel's
  deviation from its channel mean by ``r * saturation`` (no effect on 1-channel images);
  contrast scales the deviation from the image mean by ``r + contrast``. r ~ U[0, 1).
- ``crop``: integer translation by up to ``round(ratio_crop_pad * size)`` pixels along each
  axis, zero filled.
- ``cutout``: zeroes a ``round(ratio_cutout * size)`` square (clipped at the border) whose
  centre is uniform over the image.
- ``flip``: horizontal flip with probability 0.5.
- ``scale``: independent x/y scaling of the sampling grid by factors in [1/ratio_scale,
  ratio_scale] (bilinear, zero padding).
- ``rotate``: rotation by an angle uniform in ±ratio_rotate degrees (bilinear, zero padding).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

__all__ = ["DSA", "FAMILIES"]

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
MODES = ("single", "all")

_PROB_FLIP = 0.5


class DSA:
    """Seeded differentiable siamese augmentation.

    Args:
        strategy: families joined by "_" (any of :data:`FAMILIES`), or "none" / "" for the
            identity.
        ratio_scale, ratio_rotate, ratio_crop_pad, ratio_cutout, brightness, saturation,
            contrast: transform strengths, defaults as in the published DSA.
        mode: "single" applies one family of the strategy per call, chosen by the seeded
            generator; "all" applies every family in strategy order.

    Call ``dsa(x, seed, siamese=False)`` with x [B, C, H, W] floating point (any device);
    returns a tensor of the same shape, dtype and device, differentiable with respect to x.
    ``siamese=True`` draws one parameter set and applies it to every image, so batches of
    different sizes augmented with the same seed get the same transformation; otherwise each
    image gets its own parameters.
    """

    def __init__(
        self,
        strategy: str = "color_crop_cutout_flip_scale_rotate",
        *,
        ratio_scale: float = 1.2,
        ratio_rotate: float = 15.0,
        ratio_crop_pad: float = 0.125,
        ratio_cutout: float = 0.5,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        mode: str = "single",
    ) -> None:
        if not isinstance(strategy, str):
            raise ValueError(f"strategy must be a str, got {type(strategy).__name__}")
        if strategy.strip().lower() in ("", "none"):
            families: tuple[str, ...] = ()
        else:
            families = tuple(strategy.split("_"))
            unknown = [f for f in families if f not in FAMILIES]
            if unknown:
                raise ValueError(
                    f"strategy {strategy!r} has unknown transform(s) {unknown}; valid ones are "
                    f"{', '.join(FAMILIES)} (joined by '_'), or 'none'"
                )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if ratio_scale < 1.0:
            raise ValueError(f"ratio_scale must be >= 1, got {ratio_scale}")
        for name, value in (
            ("ratio_crop_pad", ratio_crop_pad),
            ("ratio_cutout", ratio_cutout),
            ("ratio_rotate", ratio_rotate),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.strategy = strategy
        self.families = families
        self.mode = mode
        self.ratio_scale = float(ratio_scale)
        self.ratio_rotate = float(ratio_rotate)
        self.ratio_crop_pad = float(ratio_crop_pad)
        self.ratio_cutout = float(ratio_cutout)
        self.brightness = float(brightness)
        self.saturation = float(saturation)
        self.contrast = float(contrast)

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r})"

    def __call__(self, x: torch.Tensor, seed: int, siamese: bool = False) -> torch.Tensor:
        """Augment x [B, C, H, W] with the transformation determined by ``seed``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            desc = f"{x.dim()}-D {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D floating-point tensor [B, C, H, W], got {desc}")
        try:
            seed = operator.index(seed)
        except TypeError:
            raise ValueError(f"seed must be an int, got {type(seed).__name__}") from None
        if not self.families:
            return x
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        n = 1 if siamese else x.shape[0]
        if self.mode == "single":
            pick = int(torch.randint(len(self.families), (1,), generator=gen))
            families: tuple[str, ...] = (self.families[pick],)
        else:
            families = self.families
        for family in families:
            x = getattr(self, f"_{family}")(x, gen, n)
        return x

    # Random draws: always float32 / int64 on the CPU generator, so the values do not depend
    # on x's dtype or device; then broadcast to the batch.

    @staticmethod
    def _uniform(x: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
        """U[0, 1) values [B] in x's dtype and device (one value repeated when n == 1)."""
        r = torch.rand(n, generator=gen, dtype=torch.float32)
        return r.to(device=x.device, dtype=x.dtype).expand(x.shape[0])

    @staticmethod
    def _randint(
        x: torch.Tensor, gen: torch.Generator, n: int, low: int, high: int
    ) -> torch.Tensor:
        """Integers [B] in [low, high) on x's device."""
        r = torch.randint(low, high, (n,), generator=gen, dtype=torch.int64)
        return r.to(device=x.device).expand(x.shape[0])

    def _color(self, x: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
        rb = self._uniform(x, gen, n).view(-1, 1, 1, 1)
        rs = self._uniform(x, gen, n).view(-1, 1, 1, 1)
        rc = self._uniform(x, gen, n).view(-1, 1, 1, 1)
        x = x + (rb - 0.5) * self.brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (rs * self.saturation) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (rc + self.contrast) + mean

    def _crop(self, x: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
        b, c, h, w = x.shape
        sh, sw = int(h * self.ratio_crop_pad + 0.5), int(w * self.ratio_crop_pad + 0.5)
        th = self._randint(x, gen, n, -sh, sh + 1)
        tw = self._randint(x, gen, n, -sw, sw + 1)
        # One ring of zeros; every index that falls outside the image lands on it.
        xp = F.pad(x, (1, 1, 1, 1))
        rows = (torch.arange(h, device=x.device) + th[:, None] + 1).clamp(0, h + 1)
        cols = (torch.arange(w, device=x.device) + tw[:, None] + 1).clamp(0, w + 1)
        xp = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2))
        return xp.gather(3, cols[:, None, None, :].expand(b, c, h, w))

    def _cutout(self, x: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        ch, cw = int(h * self.ratio_cutout + 0.5), int(w * self.ratio_cutout + 0.5)
        # Centre range as in the published DSA: one extra position when the size is even.
        top = self._randint(x, gen, n, 0, h + 1 - ch % 2) - ch // 2
        left = self._randint(x, gen, n, 0, w + 1 - cw % 2) - cw // 2
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        in_rows = (ar_h >= top[:, None]) & (ar_h < top[:, None] + ch)
        in_cols = (ar_w >= left[:, None]) & (ar_w < left[:, None] + cw)
        keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
        return x * keep[:, None].to(x.dtype)

    def _flip(self, x: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
        flip = torch.rand(n, generator=gen, dtype=torch.float32) < _PROB_FLIP
        flip = flip.to(x.device).expand(x.shape[0]).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(3), x)

    def _scale(self, x: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
        lo, hi = 1.0 / self.ratio_scale, self.ratio_scale
        sx = torch.rand(n, generator=gen, dtype=torch.float32).double() * (hi - lo) + lo
        sy = torch.rand(n, generator=gen, dtype=torch.float32).double() * (hi - lo) + lo
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
        return self._warp(x, theta)

    def _rotate(self, x: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
        r = torch.rand(n, generator=gen, dtype=torch.float32).double()
        ang = (r - 0.5) * 2.0 * self.ratio_rotate * math.pi / 180.0
        cos, sin, zero = ang.cos(), ang.sin(), torch.zeros_like(ang)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1
        )
        return self._warp(x, theta)

    @staticmethod
    def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Resample x [B, C, H, W] with affine matrices theta [n, 2, 3] (n is 1 or B)."""
        theta = theta.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
