"""The staged-generator interface used by GAN-prior distillation.

A generator is seen as a chain of synthesis stages followed by an image head::

    labels, seed --sample--> w --stage 1--> f_1 --stage 2--> f_2 ... f_K --head--> image

``K = num_stages`` (at least 1). The latents the distiller optimises at stage k are
``(w, f_k)``: ``w`` is the style/latent code every later stage consumes, ``f_k`` the feature
map after stage k. Subclasses implement four private hooks (``_sample_w``, ``_first_stage``,
``_advance``, ``_head``); the public methods validate their arguments, broadcast shared latents
and map the head's output to the normalisation of the real data.

Shared latents: ``w`` and ``f`` each have a leading batch dimension that is either M (one code
per image) or 1 (one code shared by all M images; it is broadcast with ``expand`` so autograd
sums the per-image gradients into it). Every hook is called with both already expanded to M.

Pixel space: the head's raw output lies in ``output_range`` (``(-1, 1)`` for tanh/StyleGAN
heads); it is mapped to [0, 1] and then normalised per channel with the ``mean``/``std`` given
at construction, so rendered images live in the same space as the normalised real data.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["StagedGenerator", "check_labels"]


def check_labels(labels: torch.Tensor, num_classes: int, name: str = "labels") -> torch.Tensor:
    """Validate a 1-D integer label vector with values in [0, num_classes).

    Returns ``labels`` as int64. Raises ValueError naming ``name`` otherwise.
    """
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    labels = labels.long()
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return labels


def _channel_stats(
    value: float | Sequence[float] | torch.Tensor | None, channels: int, default: float, name: str
) -> torch.Tensor:
    """Per-channel statistic as a float32 tensor [channels] (a scalar is broadcast)."""
    if value is None:
        return torch.full((channels,), float(default))
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels).clone()
    if t.numel() != channels:
        raise ValueError(f"{name} must have 1 or {channels} values, got {t.numel()}")
    if name == "std" and bool((t <= 0).any()):
        raise ValueError(f"std must be positive, got {t.tolist()}")
    return t


class StagedGenerator(nn.Module, metaclass=abc.ABCMeta):
    """Abstract base of every generator the distiller can drive.

    Args:
        num_stages: number K >= 1 of synthesis stages before the image head.
        num_classes: labels accepted by :meth:`sample_latents` lie in [0, num_classes).
        image_shape: (C, H, W) of a rendered image.
        latent_dim: size of the last dimension of ``w``.
        mean, std: per-channel (or scalar) statistics of the real data in [0, 1] pixel units;
            None means 0 and 1 (images are returned in [0, 1]).
        output_range: (lo, hi) of the head's raw output; mapped linearly onto [0, 1].

    Attributes:
        num_stages, num_classes, image_shape, latent_dim, output_range: as given.
        mean, std: float32 buffers [C].

    Subclasses implement (all tensors batch-first, already broadcast to M rows):

    - ``_sample_w(labels [M] int64, gen: torch.Generator (CPU)) -> w [M, *w_shape]``;
      all randomness must come from ``gen``.
    - ``_first_stage(w) -> f_1``.
    - ``_advance(w, f_k, k) -> f_{k+1}`` for 1 <= k < num_stages.
    - ``_head(w, f_K) -> raw images [M, C, H, W]`` in ``output_range``.

    Stages and head must be deterministic (no noise): the memory-lean :func:`hpd_fast.render`
    renders twice and relies on getting the same result.
    """

    def __init__(
        self,
        *,
        num_stages: int,
        num_classes: int,
        image_shape: Sequence[int],
        latent_dim: int,
        mean: float | Sequence[float] | torch.Tensor | None = None,
        std: float | Sequence[float] | torch.Tensor | None = None,
        output_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(
                f"num_stages must be an int >= 1 (a generator needs a stage), got {num_stages!r}"
            )
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(
                f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}"
            )
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        lo, hi = (float(v) for v in output_range)
        if not hi > lo:
            raise ValueError(f"output_range must be (lo, hi) with hi > lo, got {output_range!r}")
        self.num_stages = num_stages
        self.num_classes = num_classes
        self.image_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.latent_dim = latent_dim
        self.output_range = (lo, hi)
        self.register_buffer("mean", _channel_stats(mean, shape[0], 0.0, "mean"))
        self.register_buffer("std", _channel_stats(std, shape[0], 1.0, "std"))
        self._shapes: tuple[tuple[int, ...], list[tuple[int, ...]]] | None = None

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _sample_w(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor: ...

    @abc.abstractmethod
    def _first_stage(self, w: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _advance(self, w: torch.Tensor, f: torch.Tensor, stage: int) -> torch.Tensor: ...

    @abc.abstractmethod
    def _head(self, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor: ...

    def _adopt_device(self) -> None:
        """Move this module's own buffers to the device of its first parameter.

        Adapters call it after wrapping modules that may already live on an accelerator.
        """
        ref = next(self.parameters(), None)
        if ref is not None:
            for name, buf in self._buffers.items():
                if buf is not None:
                    self._buffers[name] = buf.to(ref.device)

    # ------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        """Device of the generator's buffers (where latents are created)."""
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the generator's first floating parameter (float32 if none)."""
        for p in self.parameters():
            if p.dtype.is_floating_point:
                return p.dtype
        return self.mean.dtype

    def _probe(self) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        """Per-sample shapes of w and of f_1..f_K, found by rendering one sample (cached).

        Also checks that the head produces ``image_shape``.
        """
        if self._shapes is None:
            with torch.no_grad():
                labels = torch.zeros(1, dtype=torch.long, device=self.device)
                w = self._sample_w(labels, torch.Generator().manual_seed(0))
                f = self._first_stage(w)
                shapes = [tuple(f.shape[1:])]
                for k in range(1, self.num_stages):
                    f = self._advance(w, f, k)
                    shapes.append(tuple(f.shape[1:]))
                out = tuple(self._head(w, f).shape[1:])
            if out != self.image_shape:
                raise ValueError(
                    f"the generator's head produces images of shape {out}, but image_shape is"
                    f" {self.image_shape}"
                )
            self._shapes = (tuple(w.shape[1:]), shapes)
        return self._shapes

    @property
    def w_shape(self) -> tuple[int, ...]:
        """Per-image shape of ``w`` (e.g. (latent_dim,) or (num_ws, latent_dim))."""
        return self._probe()[0]

    def feature_shape(self, stage: int) -> tuple[int, ...]:
        """Per-image shape of ``f`` after ``stage`` (1-based), e.g. (C_k, H_k, W_k)."""
        self._check_stage(stage, self.num_stages)
        return self._probe()[1][stage - 1]

    # ------------------------------------------------------------- validation
    def _check_stage(self, stage: int, last: int, name: str = "stage") -> None:
        if isinstance(stage, bool) or not isinstance(stage, int):
            raise ValueError(f"{name} must be an int, got {stage!r}")
        if not 1 <= stage <= last:
            raise ValueError(f"{name} must be in [1, {last}] for this generator, got {stage}")

    def check_latents(
        self, w: torch.Tensor, f: torch.Tensor, stage: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate ``(w, f)`` at ``stage`` and broadcast them to a common batch size M.

        Args:
            w: [M or 1, *w_shape] floating.
            f: [M or 1, *feature_shape(stage)] floating.
            stage: 1 <= stage <= num_stages.

        Returns:
            (w, f) expanded (views, no copy) to [M, ...]. Raises ValueError naming the argument.
        """
        self._check_stage(stage, self.num_stages)
        w_shape, f_shapes = self._probe()
        for name, t, want in (("w", w, w_shape), ("f", f, f_shapes[stage - 1])):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise ValueError(f"{name} must be a floating tensor")
            if tuple(t.shape[1:]) != tuple(want) or t.shape[0] < 1:
                raise ValueError(
                    f"{name} must have shape [M, {', '.join(map(str, want))}] at stage {stage},"
                    f" got {tuple(t.shape)}"
                )
        m = max(w.shape[0], f.shape[0])
        for name, t in (("w", w), ("f", f)):
            if t.shape[0] not in (1, m):
                raise ValueError(
                    f"{name} has batch {t.shape[0]}; w and f batches must match or be 1"
                    f" (w: {w.shape[0]}, f: {f.shape[0]})"
                )
        return w.expand(m, *w.shape[1:]), f.expand(m, *f.shape[1:])

    # ------------------------------------------------------------- public API
    def sample_latents(
        self, labels: torch.Tensor, seed: int, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial latents for ``labels``, drawn from a CPU ``torch.Generator`` seeded by ``seed``.

        Args:
            labels: [M] integer class indices in [0, num_classes).
            seed: seed of the only random source used; the same seed gives the same latents on
                any device.
            rows: only these rows (int64 indices into ``labels``): ``w`` is drawn for all
                ``M`` labels (the same random stream) and the first stage runs on these rows
                alone, so a process owning part of the images never builds every ``f``.

        Returns:
            ``(w, f)``: w [M, *w_shape] and f [M, *feature_shape(1)] (the feature after the
            first synthesis stage; ``M = len(rows)`` with ``rows``), detached, on the
            generator's device and dtype.
        """
        labels = check_labels(labels, self.num_classes)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = self._sample_w(labels.to(self.device), gen)
            if rows is not None:
                w = w.index_select(0, rows.to(w.device))
            f = self._first_stage(w)
        return w.detach(), f.detach()

    def advance(self, w: torch.Tensor, f: torch.Tensor, stage: int) -> torch.Tensor:
        """Push ``f`` from ``stage`` to ``stage + 1`` (differentiable).

        Args:
            w: [M or 1, *w_shape]; f: [M or 1, *feature_shape(stage)].
            stage: 1 <= stage < num_stages.

        Returns:
            f_{stage+1} [M, *feature_shape(stage + 1)].
        """
        self._check_stage(stage, self.num_stages - 1)
        w, f = self.check_latents(w, f, stage)
        return self._advance(w, f, stage)

    def render(self, w: torch.Tensor, f: torch.Tensor, stage: int) -> torch.Tensor:
        """Run the stages after ``stage`` and the head (differentiable, plain autograd).

        Args:
            w: [M or 1, *w_shape]; f: [M or 1, *feature_shape(stage)].
            stage: 1 <= stage <= num_stages.

        Returns:
            images [M, C, H, W] in the generator's dtype, normalised like the real data.
            For the memory-lean version see :func:`hpd_fast.render`.
        """
        w, f = self.check_latents(w, f, stage)
        for k in range(stage, self.num_stages):
            f = self._advance(w, f, k)
        return self.normalize(self._head(w, f))

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Map raw head output [M, C, H, W] in ``output_range`` to the data normalisation."""
        lo, hi = self.output_range
        x01 = (raw - lo) / (hi - lo)
        mean = self.mean.to(raw.dtype).view(1, -1, 1, 1)
        std = self.std.to(raw.dtype).view(1, -1, 1, 1)
        return (x01 - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Inverse of the data normalisation: images [M, C, H, W] -> pixels in [0, 1] units."""
        mean = self.mean.to(images.dtype).view(1, -1, 1, 1)
        std = self.std.to(images.dtype).view(1, -1, 1, 1)
        return images * std + mean

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """Images [M, C, H, W] for ``labels`` (no graph): ``render(*sample_latents(...), 1)``."""
        w, f = self.sample_latents(labels, seed)
        return self.render(w, f, 1)

    def extra_repr(self) -> str:
        return (
            f"num_stages={self.num_stages}, num_classes={self.num_classes},"
            f" image_shape={self.image_shape}, latent_dim={self.latent_dim}"
        )
