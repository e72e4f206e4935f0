"""Wrapping a plain list of modules as a staged generator.

Contract for ``stages = [m_0, m_1, ..., m_K]`` (K = num_stages >= 1, so at least two modules):

    f_1     = m_0(w)                       the first synthesis stage reads the latent code
    f_{k+1} = m_k(f_k, w)  (or m_k(f_k))   1 <= k < K, intermediate stages
    raw     = m_K(f_K, w)  (or m_K(f_K))   the image head, raw pixels in ``output_range``

Whether ``m_k`` (k >= 1) receives ``w`` is set by ``takes_w`` (one bool for all, or one per
module m_1..m_K). ``w`` comes from ``latent_sampler(labels, generator)`` where labels is an
int64 [M] tensor on the modules' device and ``generator`` a seeded CPU ``torch.Generator``
that must be the only source of randomness; it returns w [M, ...] (any per-sample shape), which
is then cast to the modules' device and floating dtype.
Modules must be deterministic and treat batch rows independently (no batch statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from hpd_fast.generators.base import StagedGenerator

__all__ = ["ModuleGenerator", "from_modules"]

LatentSampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class ModuleGenerator(StagedGenerator):
    """Staged generator over ``stages`` (see the module docstring for the call contract).

    Args:
        stages: K + 1 modules (K >= 1): first stage, K - 1 intermediate stages, image head.
        latent_sampler: ``(labels [M] int64, generator) -> w [M, ...]``; registered as a
            submodule when it is an ``nn.Module``.
        num_classes: labels lie in [0, num_classes).
        image_shape: (C, H, W) the head must produce (checked once at construction).
        takes_w: whether m_1..m_K are called with ``w`` (one bool or K bools).
        mean, std, output_range: see :class:`StagedGenerator`.

    ``latent_dim`` is the size of the last dimension of ``w`` (found by one probe render).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        latent_sampler: LatentSampler,
        num_classes: int,
        image_shape: Sequence[int],
        takes_w: bool | Sequence[bool] = True,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        output_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        stages = list(stages)
        if len(stages) < 2:
            raise ValueError(
                "stages must hold at least two modules (a first stage and the image head),"
                f" got {len(stages)}: a generator needs at least one synthesis stage"
            )
        for i, m in enumerate(stages):
            if not callable(m):
                raise ValueError(f"stages[{i}] must be callable, got {type(m).__name__}")
        if not callable(latent_sampler):
            raise ValueError("latent_sampler must be callable (labels, generator) -> w")
        k = len(stages) - 1
        flags = [bool(takes_w)] * k if isinstance(takes_w, bool) else [bool(t) for t in takes_w]
        if len(flags) != k:
            raise ValueError(
                f"takes_w must be a bool or {k} bools (one per stages[1:]), got {len(flags)}"
            )
        super().__init__(
            num_stages=k,
            num_classes=num_classes,
            image_shape=image_shape,
            latent_dim=1,  # replaced below, once w's shape is known
            mean=mean,
            std=std,
            output_range=output_range,
        )
        self.stages = nn.ModuleList(m if isinstance(m, nn.Module) else _Lambda(m) for m in stages)
        self.latent_sampler = latent_sampler
        self.takes_w = flags
        self._adopt_device()
        self.latent_dim = int(self.w_shape[-1]) if self.w_shape else 1

    def _sample_w(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        w = self.latent_sampler(labels, gen)
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or w.shape[0] != labels.shape[0]:
            raise ValueError(
                f"latent_sampler must return a tensor [M, ...] with M = {labels.shape[0]},"
                f" got {getattr(w, 'shape', type(w).__name__)}"
            )
        return w.to(device=self.device, dtype=self.dtype)

    def _call(self, k: int, f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m = self.stages[k]
        return m(f, w) if self.takes_w[k - 1] else m(f)

    def _first_stage(self, w: torch.Tensor) -> torch.Tensor:
        return self.stages[0](w)

    def _advance(self, w: torch.Tensor, f: torch.Tensor, stage: int) -> torch.Tensor:
        return self._call(stage, f, w)

    def _head(self, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return self._call(self.num_stages, f, w)


class _Lambda(nn.Module):
    """Holds a plain callable stage so it sits in the ModuleList."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


def from_modules(
    stages: Sequence[nn.Module],
    *,
    latent_sampler: LatentSampler,
    num_classes: int,
    image_shape: Sequence[int],
    takes_w: bool | Sequence[bool] = True,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    output_range: tuple[float, float] = (-1.0, 1.0),
) -> ModuleGenerator:
    """Wrap modules as a :class:`StagedGenerator`; arguments as :class:`ModuleGenerator`.

    Example (w [M, 16] -> f_1 [M, 8, 4, 4] -> f_2 [M, 8, 8, 8] -> image [M, 1, 8, 8])::

        G = from_modules(
            [nn.Sequential(nn.Linear(16, 128), nn.Unflatten(1, (8, 4, 4))),
             nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 8, 3, padding=1)),
             nn.Sequential(nn.Conv2d(8, 1, 1), nn.Tanh())],
            latent_sampler=lambda y, g: torch.randn(len(y), 16, generator=g).to(y.device),
            num_classes=10, image_shape=(1, 8, 8), takes_w=False)
    """
    return ModuleGenerator(
        stages,
        latent_sampler=latent_sampler,
        num_classes=num_classes,
        image_shape=image_shape,
        takes_w=takes_w,
        mean=mean,
        std=std,
        output_range=output_range,
    )
