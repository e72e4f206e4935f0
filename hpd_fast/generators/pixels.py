"""Pixel space as a staged generator: one stage whose latents are the images themselves.

With :func:`pixels` the H-PD loop (:class:`hpd_fast.distill.HPD`) optimises images directly,
as the original MTT / DM / DC code does, with everything else unchanged: the three losses and
MTT's modes, checkpoints, selection, evaluation, figures and the command line
(``--generator pixels``). The latents at stage 1 are ``(w, f)`` with

- ``w``: an empty code, ``[M, 0]`` (nothing to optimise; ``lr_w`` has no effect);
- ``f``: the images ``[M, C, H, W]`` in the dataset's space (normalised, or ZCA-whitened when
  the dataset is), and rendering is the identity.

Initialisation (``init``): ``"real"`` draws random training images of each label's class
(without replacement, from a ``torch.Generator`` seeded by the seed), ``"noise"`` draws
standard Gaussian images, as MTT's ``--pix_init real|noise``.

Learning rates: ``lr_f`` is the image learning rate. The published pixel-space defaults
live in :attr:`hpd_fast.config.HPDConfig.pixel_per_algorithm` (used in place of
``per_algorithm`` when the generator is pixels).
"""

from __future__ import annotations

import torch

from hpd_fast.data.dataset import DistillData
from hpd_fast.generators.base import StagedGenerator, check_labels

__all__ = ["PIXEL_INITS", "PixelGenerator", "pixels"]

PIXEL_INITS = ("real", "noise")


class PixelGenerator(StagedGenerator):
    """A one-stage generator whose feature latents are the images (see the module docstring).

    Args:
        data: the dataset the images live in (its training split is the "real" initialisation;
            its ``zca`` decides whether the images are whitened).
        init: ``"real"`` or ``"noise"``.

    Attributes:
        init: as given. zca: the dataset's ZCA identity (``zca.identity()``) or None: the
            space the images live in (:class:`~hpd_fast.distill.HPD` refuses a dataset whose
            space differs).
    """

    def __init__(self, data: DistillData, init: str = "real") -> None:
        if not isinstance(data, DistillData):
            raise TypeError(
                f"data must be a DistillData (from hpd_fast.data.load), got {type(data).__name__}"
            )
        if init not in PIXEL_INITS:
            raise ValueError(f"init must be one of {', '.join(PIXEL_INITS)}, got {init!r}")
        super().__init__(
            num_stages=1,
            num_classes=data.num_classes,
            image_shape=(data.channels, *data.im_size),
            latent_dim=1,
            mean=data.mean,
            std=data.std,
            output_range=(0.0, 1.0),
        )
        self.latent_dim = 0  # w is empty: [M, 0]
        self.init = init
        self.zca = data.zca.identity() if data.zca is not None else None
        # A reference to the training split, not a buffer: not copied by .to(), not part of
        # state_dict (the dataset's fingerprint identifies it in H-PD's records).
        self._real = data.train_images
        self._real_labels = data.train_labels.cpu()

    # -- hooks: w is empty, f is the image, the head is the identity
    def _sample_w(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.zeros(labels.shape[0], 0, device=self.device)

    def _first_stage(self, w: torch.Tensor) -> torch.Tensor:
        # Only the shape probe calls this; sample_latents draws the images itself.
        return torch.zeros(w.shape[0], *self.image_shape, device=self.device)

    def _advance(self, w: torch.Tensor, f: torch.Tensor, stage: int) -> torch.Tensor:
        raise RuntimeError("a pixel generator has one stage: there is nothing to advance")

    def _head(self, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return f

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """The identity: pixel latents already live in the dataset's space."""
        return raw

    def identity(self) -> dict[str, object]:
        """What distinguishes this generator in H-PD's run records (checked on resume)."""
        return {"init": self.init, "zca": self.zca}

    # -- the images
    def sample_latents(
        self, labels: torch.Tensor, seed: int, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w [M, 0], images [M, C, H, W])`` for ``labels`` (see ``init``), from a CPU
        generator seeded by ``seed``; with ``rows`` only those rows (drawn as for all ``M``).

        Raises:
            ValueError: bad labels or seed; ``init="real"`` asking a class for more images than
                its training split holds.
        """
        labels = check_labels(labels, self.num_classes).cpu()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
        m = labels.shape[0]
        w = torch.zeros(m, 0, device=self.device)
        if self.init == "noise":
            f = torch.randn(m, *self.image_shape, generator=gen)
            if rows is not None:
                w, f = w[: rows.numel()], f.index_select(0, rows.cpu())
            return w, f.to(self.device)
        index = torch.empty(m, dtype=torch.long)
        for c in range(self.num_classes):
            where = (labels == c).nonzero().squeeze(1)
            if where.numel() == 0:
                continue
            pool = (self._real_labels == c).nonzero().squeeze(1)
            if pool.numel() < where.numel():
                raise ValueError(
                    f"init='real': class {c} has {pool.numel()} training image(s) but "
                    f"{where.numel()} were asked for; use init='noise' or a smaller ipc"
                )
            index[where] = pool[torch.randperm(pool.numel(), generator=gen)[: where.numel()]]
        if rows is not None:
            w, index = w[: rows.numel()], index.index_select(0, rows.cpu())
        f = self._real.index_select(0, index.to(self._real.device))
        return w, f.detach().to(self.device, torch.float32).clone()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init!r}, zca={self.zca is not None}"


def pixels(data: DistillData, init: str = "real") -> PixelGenerator:
    """A :class:`PixelGenerator`: H-PD / MTT / DM / DC directly on the images of ``data``.

    ``init``: ``"real"`` (random real training images of each class) or ``"noise"``
    (standard Gaussian in the dataset's space).
    """
    return PixelGenerator(data, init=init)
