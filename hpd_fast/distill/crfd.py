"""Class-relevant feature distance (CRFD): a cheap score for choosing among synthetic sets.

For a few randomly initialised networks ``phi`` (ConvNets by default) with block outputs
``phi_l``::

    CRFD(S) = mean_phi  sum_c sum_l || mu_real[phi, c, l] - mean_{s in S_c, r} phi_l(A_r(s)) ||^2

``mu_real[phi, c, l]`` is the mean of ``phi_l`` over augmented real images of class ``c``,
computed once by a streaming pass (:class:`hpd_fast.ClassMeanAccumulator`; features are never
stored). The synthetic side averages over ``syn_augments`` fixed augmentations ``A_r`` of every
image. Everything random (networks, augmentations) is fixed by ``seed`` at construction, so
the score of a given set is deterministic and scores of different sets are comparable. Lower is
better.

Several candidate sets (same labels) are scored in one batched pass: candidate ``j``'s rows
belong to segment ``j * K + c``; each candidate gets the same augmentations, so the batched
score equals the one-at-a-time score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hpd_fast._common import MAX_AUG_SEED, Augment, derive_seed
from hpd_fast.augment import DSA
from hpd_fast.data.dataset import DistillData
from hpd_fast.distill.losses import layer_features, random_network
from hpd_fast.ops.class_mean_distance import ClassMeanAccumulator, class_mean_distance

__all__ = ["CRFD"]


class CRFD:
    """Class-relevant feature distance against a real dataset (lower is better).

    Args:
        real_images: float ``[N, C, H, W]`` real training images (normalised like the synthetic
            images); real_labels: int64 ``[N]`` in ``[0, K)``.
        num_classes: ``K``.
        num_models: how many random networks are averaged.
        model: network name for :func:`hpd_fast.models.get_model`; it must have
            ``block_outputs`` (ConvNet family) or ``embed``.
        model_kwargs: constructor arguments of the networks.
        augment: ``augment(x, seed)`` applied to real and synthetic images (default: DSA, per
            image parameters); ``None`` for no augmentation.
        real_passes: passes over the real data (each with fresh augmentations).
        syn_augments: augmented copies of every synthetic image averaged on the synthetic side.
        batch_size: rows per network forward (real pass and synthetic side).
        seed: fixes the networks and every augmentation.
        device: where networks and features live (default: ``real_images``' device).
        backend: forwarded to :func:`hpd_fast.class_mean_distance`.

    Attributes:
        real_means: ``num_models`` lists of per-layer float32 ``[K, D_l]`` real class means.
    """

    def __init__(
        self,
        real_images: Tensor,
        real_labels: Tensor,
        num_classes: int,
        *,
        num_models: int = 3,
        model: str = "ConvNet",
        model_kwargs: Mapping[str, Any] | None = None,
        augment: Augment | None | str = "dsa",
        real_passes: int = 1,
        syn_augments: int = 4,
        batch_size: int = 256,
        seed: int = 0,
        device: torch.device | str | None = None,
        backend: str | None = None,
        real_means: Sequence[Sequence[Tensor]] | None = None,
    ) -> None:
        if not isinstance(real_images, Tensor) or real_images.dim() != 4:
            raise ValueError("real_images must be a floating tensor [N, C, H, W]")
        if (
            not isinstance(real_labels, Tensor)
            or real_labels.dim() != 1
            or real_labels.shape[0] != real_images.shape[0]
        ):
            raise ValueError("real_labels must be an int64 tensor [N] matching real_images")
        for name, value in (
            ("num_classes", num_classes),
            ("num_models", num_models),
            ("real_passes", real_passes),
            ("syn_augments", syn_augments),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if augment == "dsa":
            augment = DSA()
        elif isinstance(augment, str):
            raise ValueError(f"augment must be 'dsa', a callable or None, got {augment!r}")
        self.num_classes = num_classes
        self.num_models = num_models
        self.model = model
        self.model_kwargs = dict(model_kwargs or {})
        self.augment = augment
        self.real_passes = real_passes
        self.syn_augments = syn_augments
        self.batch_size = batch_size
        self.seed = seed
        self.backend = backend
        self.device = torch.device(device) if device is not None else real_images.device
        self.image_shape = tuple(real_images.shape[1:])
        c, h, w = self.image_shape
        self.nets = [
            random_network(
                model,
                c,
                num_classes,
                (h, w),
                derive_seed(seed, "crfd-net", i),
                self.device,
                **self.model_kwargs,
            ).eval()
            for i in range(num_models)
        ]
        self._features = [layer_features(net) for net in self.nets]
        # Synthetic-side augmentation seeds: the same for every candidate and every call.
        self.syn_seeds = [
            derive_seed(seed, "crfd-syn-aug", r) % MAX_AUG_SEED for r in range(syn_augments)
        ]
        if real_means is not None:
            self.real_means = [[t.to(self.device, torch.float32) for t in m] for m in real_means]
            if len(self.real_means) != num_models:
                raise ValueError(f"real_means must hold {num_models} models' means")
        else:
            self.real_means = self._real_pass(real_images, real_labels)
        self.counts: Tensor | None = None

    @classmethod
    def from_dataset(cls, dataset: DistillData, **kw: Any) -> CRFD:
        """CRFD against ``dataset``'s training split (keyword arguments as in the constructor)."""
        return cls(dataset.train_images, dataset.train_labels, dataset.num_classes, **kw)

    # ------------------------------------------------------------------------------ real side
    @torch.no_grad()
    def _real_pass(self, images: Tensor, labels: Tensor) -> list[list[Tensor]]:
        """Streaming class means of every block of every network over augmented real data."""
        labels = labels.to(self.device, torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"real_labels must lie in [0, {self.num_classes})")
        missing = (torch.bincount(labels.cpu(), minlength=self.num_classes) == 0).nonzero()
        if missing.numel():
            raise ValueError(f"real data has no image of class(es) {missing.flatten().tolist()}")
        out = []
        for i, feats in enumerate(self._features):
            acc = ClassMeanAccumulator(self.num_classes)
            for p in range(self.real_passes):
                for b, start in enumerate(range(0, images.shape[0], self.batch_size)):
                    x = images[start : start + self.batch_size].to(self.device, torch.float32)
                    if self.augment is not None:
                        x = self.augment(
                            x, derive_seed(self.seed, "crfd-real", i, p, b) % MAX_AUG_SEED
                        )
                    acc.update(list(feats(x)), labels[start : start + self.batch_size])
            self.counts = acc.counts
            out.append(list(acc.means(torch.float32)))
        return out

    # ------------------------------------------------------------------------- synthetic side
    def _check_candidates(self, candidates: Tensor | Sequence[Tensor], labels: Tensor) -> Tensor:
        if isinstance(candidates, Tensor):
            if candidates.dim() == 4:
                candidates = candidates.unsqueeze(0)
            cands = candidates
        else:
            if len(candidates) == 0:
                raise ValueError("candidates is empty")
            cands = torch.stack([c.detach() for c in candidates])
        if cands.dim() != 5 or tuple(cands.shape[2:]) != self.image_shape:
            raise ValueError(
                f"candidates must be [num_candidates, M, {', '.join(map(str, self.image_shape))}]"
                f" (or a list of [M, ...] sets), got shape {tuple(cands.shape)}"
            )
        m = cands.shape[1]
        if not isinstance(labels, Tensor) or labels.shape != (m,) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor [M] with M = {m}")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        return cands

    @torch.no_grad()
    def score(self, candidates: Tensor | Sequence[Tensor], labels: Tensor) -> Tensor:
        """CRFD of several candidate sets that share ``labels``, in one batched pass.

        Args:
            candidates: float ``[J, M, C, H, W]`` (or a list of ``J`` tensors ``[M, C, H, W]``,
                or one ``[M, C, H, W]`` set).
            labels: int64 ``[M]`` class of every image (the same for all candidates).

        Returns:
            float64 ``[J]``, one score per candidate (lower is better).
        """
        cands = self._check_candidates(candidates, labels)
        j, m = cands.shape[:2]
        k = self.num_classes
        labels = labels.to(self.device, torch.int64)
        # Augment each candidate on its own with the shared seeds (identical transformations
        # for every candidate), then run the networks over all of them together.
        flat = cands.to(self.device, torch.float32)
        if self.augment is None:
            views = [flat.reshape(j * m, *self.image_shape)]
        else:
            views = [
                torch.cat([self.augment(flat[i], s) for i in range(j)]) for s in self.syn_seeds
            ]
        x = torch.cat(views)  # [R * J * M, C, H, W]
        seg = (torch.arange(j, device=self.device).unsqueeze(1) * k + labels).reshape(-1)
        seg = seg.repeat(len(views))
        total = torch.zeros(j, dtype=torch.float64, device=self.device)
        for feats, means in zip(self._features, self.real_means):
            acc = ClassMeanAccumulator(j * k)
            for start in range(0, x.shape[0], self.batch_size):
                xb = x[start : start + self.batch_size]
                acc.update(list(feats(xb)), seg[start : start + self.batch_size])
            syn_means = acc.means(torch.float64)
            present = (acc.counts > 0).nonzero().squeeze(1)
            # Each present segment's mean is one row; its distance to the tiled real target.
            feats_rows = [s.reshape(j * k, -1).index_select(0, present) for s in syn_means]
            targets = [t.to(torch.float64).reshape(k, -1).repeat(j, 1) for t in means]
            d = class_mean_distance(
                feats_rows,
                present,
                targets,
                num_segments=j * k,
                reduction="none",
                backend=self.backend,
            )
            total += d.view(j, k).sum(1)
        return total / self.num_models

    def __call__(self, images: Tensor, labels: Tensor) -> float:
        """CRFD of one synthetic set ``images [M, C, H, W]`` with ``labels [M]``."""
        return float(self.score(images.unsqueeze(0) if images.dim() == 4 else images, labels)[0])

    # ----------------------------------------------------------------------------- persistence
    def state_tensors(self, prefix: str = "crfd") -> dict[str, Tensor]:
        """The real class means as named CPU tensors (for checkpoints)."""
        return {
            f"{prefix}.model{i}.layer{j}": t.detach().cpu().contiguous()
            for i, layers in enumerate(self.real_means)
            for j, t in enumerate(layers)
        }

    @staticmethod
    def means_from_tensors(
        tensors: Mapping[str, Tensor], prefix: str = "crfd"
    ) -> list[list[Tensor]]:
        """Inverse of :meth:`state_tensors` (pass as ``real_means=``)."""
        out: dict[int, dict[int, Tensor]] = {}
        for key, t in tensors.items():
            if not key.startswith(prefix + ".model"):
                continue
            model, layer = key[len(prefix) + 1 :].split(".")
            out.setdefault(int(model[5:]), {})[int(layer[5:])] = t
        return [[layers[j] for j in sorted(layers)] for _, layers in sorted(out.items())]
