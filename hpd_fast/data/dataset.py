"""The in-memory dataset every loader returns."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hpd_fast.data.zca import ZCA

__all__ = ["DistillData"]


@dataclass(eq=False, repr=False)
class DistillData:
    """A labelled image classification dataset held as normalized tensors.

    Attributes:
        name: dataset name as given to :func:`hpd_fast.data.load` (e.g. "digits").
        train_images: float32 [N, C, H, W], normalized: ``(x - mean) / std`` per channel, where
            x is the image in [0, 1].
        train_labels: int64 [N], class indices in [0, num_classes).
        test_images: float32 [N_test, C, H, W], normalized the same way.
        test_labels: int64 [N_test].
        class_names: one human-readable name per class; ``len(class_names) == num_classes``.
        mean, std: per-channel normalization constants (tuples of C floats).
        zca: the ZCA whitening fitted on the training split (:class:`hpd_fast.data.zca.ZCA`;
            ``load(..., zca=True)``), or None. When set, both splits hold *whitened* images
            (``zca.whiten`` of the normalized ones): the space experts, distillation losses
            and evaluation work in; ``zca.unwhiten`` maps back for pictures.

    Derived: ``num_classes``, ``channels`` (C), ``im_size`` ((H, W)).
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None = None

    def __post_init__(self) -> None:
        self.class_names = [str(c) for c in self.class_names]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        k = len(self.class_names)
        if k < 1:
            raise ValueError("class_names must name at least one class")
        for split in ("train", "test"):
            x = getattr(self, f"{split}_images")
            y = getattr(self, f"{split}_labels")
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != torch.float32:
                raise ValueError(f"{split}_images must be a float32 tensor [N, C, H, W]")
            if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.int64:
                raise ValueError(f"{split}_labels must be an int64 tensor [N]")
            if y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{split}_labels has {y.shape[0]} entries but {split}_images has "
                    f"{x.shape[0]} images"
                )
            if x.shape[0] == 0:
                # An empty test split would "evaluate" to 0% accuracy; an empty train split
                # has nothing to distill. Refuse both rather than report a number.
                raise ValueError(
                    f"{split} split holds no image ({split}_images has shape "
                    f"{tuple(x.shape)}); every dataset needs at least one {split} image"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
                raise ValueError(f"{split}_labels must lie in [0, {k}) for {k} class names")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"train images {tuple(self.train_images.shape[1:])} and test images "
                f"{tuple(self.test_images.shape[1:])} differ in shape"
            )
        c = self.train_images.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean and std must have one value per channel ({c})")
        if self.zca is not None and tuple(self.zca.shape) != tuple(self.train_images.shape[1:]):
            raise ValueError(
                f"zca whitens images {self.zca.shape}, but the images are "
                f"{tuple(self.train_images.shape[1:])}"
            )

    # ----------------------------------------------------------------------------- shape info

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.class_names)

    @property
    def channels(self) -> int:
        """Image channels C."""
        return int(self.train_images.shape[1])

    @property
    def im_size(self) -> tuple[int, int]:
        """Image (H, W)."""
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    def __len__(self) -> int:
        """Number of training images N."""
        return int(self.train_images.shape[0])

    def __repr__(self) -> str:
        c, (h, w) = self.channels, self.im_size
        return (
            f"DistillData(name={self.name!r}, train={len(self)}, test={self.test_images.shape[0]}, "
            f"classes={self.num_classes}, image={c}x{h}x{w}"
            + (", zca" if self.zca is not None else "")
            + ")"
        )

    # ---------------------------------------------------------------------------------- access

    def _check_class(self, c: int) -> int:
        try:
            c = operator.index(c)
        except TypeError:
            raise ValueError(f"c must be an int class index, got {type(c).__name__}") from None
        if not 0 <= c < self.num_classes:
            raise ValueError(f"c must be in [0, {self.num_classes}), got {c}")
        return c

    def class_counts(self) -> torch.Tensor:
        """Training images per class: int64 [K]."""
        return torch.bincount(self.train_labels.cpu(), minlength=self.num_classes)

    def images_of_class(self, c: int) -> torch.Tensor:
        """All training images of class ``c``: float32 [n_c, C, H, W] (a copy), in dataset order."""
        c = self._check_class(c)
        idx = (self.train_labels == c).nonzero().squeeze(1)
        return self.train_images.index_select(0, idx)

    def random_real(self, ipc: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``ipc`` random training images of every class, drawn without replacement.

        The draw uses its own ``torch.Generator`` seeded with ``seed`` (the global RNG is not
        touched), so the same ``(ipc, seed)`` always gives the same images.

        Returns:
            images: float32 [K * ipc, C, H, W], class-major (class 0's images first).
            labels: int64 [K * ipc], ``labels[i] == i // ipc``.

        Raises:
            ValueError: if ``ipc`` < 1 or a class has fewer than ``ipc`` training images.
        """
        try:
            ipc = operator.index(ipc)
            seed = operator.index(seed)
        except TypeError:
            raise ValueError("ipc and seed must be ints") from None
        if ipc < 1:
            raise ValueError(f"ipc must be >= 1, got {ipc}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        labels_cpu = self.train_labels.cpu()
        picks = []
        for c in range(self.num_classes):
            idx = (labels_cpu == c).nonzero().squeeze(1)
            if idx.numel() < ipc:
                raise ValueError(
                    f"ipc={ipc} but class {c} ({self.class_names[c]!r}) has only "
                    f"{idx.numel()} training images"
                )
            picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:ipc]])
        index = torch.cat(picks).to(self.train_images.device)
        labels = torch.arange(self.num_classes).repeat_interleave(ipc)
        return self.train_images.index_select(0, index), labels.to(self.train_labels.device)

    # ----------------------------------------------------------------------- pixels and devices

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] [B, C, H, W] -> normalized images (differentiable)."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images [B, C, H, W] -> pixels (about [0, 1]; not clamped)."""
        mean, std = self._stats(x)
        return x * std + mean

    def to(self, device: torch.device | str) -> DistillData:
        """A copy whose four tensors live on ``device``."""
        return dataclasses.replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
            class_names=list(self.class_names),
        )
