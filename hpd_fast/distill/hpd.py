"""H-PD: progressive latent optimisation over a staged generator, with CRFD selection.

The synthetic set is ``ipc`` images per class rendered by a frozen generator from latents
``(w, f_k)``. Starting at stage ``k = 1``:

1. ``iterations_per_stage`` steps of SGD (momentum 0.5, separate rates for ``w`` and ``f``) on a
   distillation loss of the rendered images: trajectory matching (``"mtt"``), distribution
   matching (``"dm"``) or gradient matching (``"dc"``). Images are rendered with
   :func:`hpd_fast.render` (no generator graph is kept; the backward re-renders chunk by chunk).
2. Every ``select_every`` iterations and at the end of the stage the current iterate is scored
   (CRFD by default, see :mod:`hpd_fast.distill.crfd`); the best iterate of the stage is kept as
   a copy (clones of ``w`` and ``f``; later optimiser steps cannot touch it).
3. ``f`` is pushed one stage deeper (``f_{k+1} = stage_k(f_k, w)``, then ``nan_to_num`` and a
   clamp to ``[-10, 10]``), from the stage's best iterate (``continue_from="best"``) or its
   last one, and the optimiser is rebuilt. This repeats up to the last stage before the image.

The result is the stage and iterate with the lowest score over all stages.

Reproducibility: every random choice of iteration ``i`` at stage ``k`` (expert and start epoch,
minibatch schedule and augmentation seeds, random networks, real batches) comes from a private
``torch.Generator`` seeded by ``(seed, k, i)``; the global RNG is never used (networks are built
inside ``torch.random.fork_rng``). Checkpoints therefore only need tensors and counters: a run
interrupted and restarted with the same ``checkpoint_dir`` gives the same result as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hpd_fast._checks import check_float, check_int
from hpd_fast._common import MAX_AUG_SEED, derive_seed, resolve_augment, tensor_fingerprint
from hpd_fast._distributed import rank_and_size
from hpd_fast.augment import DSA
from hpd_fast.config import ALGORITHMS, SELECTIONS, HPDConfig, preset, preset_for, with_overrides
from hpd_fast.data.dataset import DistillData
from hpd_fast.distill.crfd import CRFD
from hpd_fast.distill.losses import dc_loss, dm_loss, random_network
from hpd_fast.distill.result import DistillResult
from hpd_fast.distill.shard import Shard
from hpd_fast.distill.state import (
    Candidate,
    RunState,
    pack_optimizer,
    private_copy,
    read_checkpoint,
    unpack_optimizer,
    write_checkpoint,
)
from hpd_fast.distill.trajectory import (
    TrajectorySchedule,
    batch_schedule,
    trajectory_matching_loss,
)
from hpd_fast.generators.base import StagedGenerator
from hpd_fast.generators.pixels import PixelGenerator
from hpd_fast.models import MODEL_NAMES, get_model
from hpd_fast.params import functional_forward
from hpd_fast.render import render

__all__ = ["ALGORITHMS", "HPD", "NonFiniteLossError", "SELECTIONS"]

_LOG = logging.getLogger("hpd_fast")
_F_CLAMP = 10.0
# Latents (and the learned rate) beyond this magnitude have diverged: the generator's inputs
# are O(1) (f is clamped to [-10, 10] between stages), and float32 would soon overflow.
_DIVERGED = 1e12
# soft_labels="onehot": the logit of the labelled class (the others 0) whose softmax gives it
# probability 0.9; exact one-hot targets would need infinite logits and a dead softmax.
_ONEHOT_PROB = 0.9


def _abs_max(t: Tensor) -> float:
    """The largest magnitude in ``t``: NaN when it holds a NaN, inf when an inf (one pass over
    the tensor, no temporary: the latents' checks run on every step)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return float(torch.maximum(-lo, hi))


def _is_row_tensor(name: str) -> bool:
    """Whether a checkpoint tensor has one row per synthetic image (latents, their optimiser
    buffers, candidates, bests, soft labels), as opposed to shared state."""
    return not name.startswith(("syn_lr", "opt_lr", "crfd"))


class NonFiniteLossError(FloatingPointError):
    """The distillation loss (or its gradient) became NaN/inf; the message names stage and step."""


Callback = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


class HPD:
    """Hierarchical parameterization distillation over a staged generator.

    Every setting lives in :class:`~hpd_fast.config.HPDConfig` (with its default and help);
    ``config=None`` takes the preset of the dataset (:func:`hpd_fast.config.preset_for`: the
    ``digits`` preset for the embedded digits, the published H-PD settings for CIFAR and
    ImageNet subsets), exactly as ``hpd-fast distill`` does. Keyword ``overrides`` change single
    settings by name: any field of :class:`~hpd_fast.config.HPDConfig` or of its ``mtt``,
    ``match`` and ``select`` sections (``syn_steps=10``, ``batch_real=32``, ``crfd_models=2``),
    plus the names ``mtt_mode``, ``select`` (a method name), ``select_every`` and
    ``select_batch``.

    Args:
        generator: a :class:`~hpd_fast.generators.StagedGenerator` (frozen; it renders
            ``[M, C, H, W]`` images normalised like ``dataset``).
        dataset: the real data (:func:`hpd_fast.data.load`); its training split is distilled.
        config: the settings (:class:`~hpd_fast.config.HPDConfig`); see above for None.
        experts: expert trajectories for ``"mtt"`` (:func:`hpd_fast.experts.load`): an object
            with ``trajectories`` (each ``[epochs + 1, P]``), ``model_config``, ``lr`` and
            ``check_student(student)``.
        seed: the seed of everything random.
        checkpoint_dir: folder for checkpoints (written at every stage boundary, every
            ``checkpoint_every`` iterations and at the end). If it holds a checkpoint of the same
            run, :meth:`fit` resumes from it.
        group: a ``torch.distributed`` process group of ``W`` ranks sharing the synthetic set
            out (:mod:`hpd_fast.distill.shard`): rank ``r`` owns the images of the classes
            ``c`` with ``c % W == r`` (at least one class per rank) and holds only their
            latents, optimiser state, soft labels and selection copies, and renders only them.
            MTT gathers each iteration's touched images on every rank and splits each student
            step's batch over the ranks (see
            :func:`~hpd_fast.distill.trajectory.trajectory_matching_loss`), or deals out the
            ``num_trajectories`` pairs; the owners take their images' gradient back. DM and DC
            match each rank's classes on that rank. The first rank scores the gathered
            candidates, shows progress and writes the checkpoint, the same file one process
            writes (each rank reads its rows of it to resume, with any ``W``). :meth:`fit`
            returns on every rank the whole set of images, labels and records, equal to one
            process's up to the order of the sums; the latents (``w``, ``f``, ``stage_w``,
            ``stage_f``) are whole on the first rank only (the others hold empty ``[0, ...]``
            tensors: the latents of every stage can outgrow one process's memory).
        callback: called after every iteration with ``{"stage", "iteration", "loss", "w", "f",
            "hpd"}`` (``w``, ``f``: the current latents, detached views, over a group this
            rank's rows; do not modify them); an exception raised there stops :meth:`fit` (the
            last checkpoint stays).
        **overrides: single settings, see above.

    Pixel space: with ``generator=hpd_fast.generators.pixels(data)`` the latents are the images
    (one stage) and the rates come from ``config.pixel_per_algorithm`` (``lr_f``: the image
    learning rate).

    Soft labels (``soft_labels="onehot"|"expert"``, trajectory matching only), as DATM: every
    image gets label logits ``z`` [K] (one-hot logits with probability 0.9 on its class, or the
    logits of the first expert's last epoch on the initial images), the student steps use the
    targets ``softmax(z)``, and ``z`` is optimised with its own SGD (``lr_y``, ``momentum_y``)
    through the trajectory-matching gradient. The result's ``labels`` are then the
    probabilities ``softmax(z)`` ``[M, K]`` (its ``classes`` the class of every image).

    ZCA: for a dataset loaded with ``zca=True`` the rendered images pass through the dataset's
    fixed whitening (``dataset.zca.whiten``, differentiable) before every loss and score; a
    pixel generator already holds whitened images. Results hold whitened images (what
    evaluation trains on) and the transform (pictures are un-whitened).

    Trajectory matching renders, in each iteration, only the images that its student
    minibatch schedules touch (all of them when ``batch_syn`` is None); the others get a zero
    gradient, as they would from a full render. With ``num_trajectories=K`` every iteration
    averages the exact gradients of ``K`` (expert, start epoch) pairs, one trajectory at a
    time (the first pair is the one a one-trajectory run draws, the others come from derived
    generators of the same seed); over a process group rank ``r`` runs the pairs ``k`` with
    ``k % W == r``, each on its own, and the gradients are summed over the ranks.

    The loop: starting at ``first_stage``, ``iterations_per_stage`` SGD steps on the latents
    ``(w, f)``, scoring iterates every ``select_every`` steps (CRFD by default) and keeping
    each stage's best, then ``f`` is pushed one stage deeper from the stage's best (or last)
    iterate, up to ``last_stage``; the result is the best-scored iterate over all stages.

    Raises:
        ValueError / TypeError: on bad input, naming the argument (ipc < 1, a generator with no
            stages, class counts or image shapes that differ between dataset and generator,
            ``"mtt"`` without experts, an unknown setting name, ...).
    """

    def __init__(
        self,
        generator: StagedGenerator,
        dataset: DistillData,
        config: HPDConfig | None = None,
        *,
        experts: Any = None,
        seed: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        group: Any = None,
        callback: Callback | None = None,
        **overrides: Any,
    ) -> None:
        # ---- generator and dataset
        if not isinstance(generator, StagedGenerator):
            raise TypeError(
                f"generator must be a hpd_fast.generators.StagedGenerator, got "
                f"{type(generator).__name__}"
            )
        stages = getattr(generator, "num_stages", 0)
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(
                f"generator has no stages (num_stages={stages!r}): H-PD needs at least one "
                "synthesis stage to optimise"
            )
        if not isinstance(dataset, DistillData):
            raise TypeError(
                f"dataset must be a DistillData (from hpd_fast.data.load), got "
                f"{type(dataset).__name__}"
            )
        if config is None:
            config = preset(preset_for(dataset.name)).hpd
        elif not isinstance(config, HPDConfig):
            raise TypeError(
                f"config must be a hpd_fast.config.HPDConfig or None, got {type(config).__name__}"
                " (single settings go by keyword, e.g. HPD(G, data, ipc=10))"
            )
        self._pixels = isinstance(generator, PixelGenerator)
        cfg = with_overrides(config, overrides).resolved("pixels" if self._pixels else None)
        self.settings = cfg
        if generator.num_classes != dataset.num_classes:
            raise ValueError(
                f"class counts disagree: the generator has num_classes={generator.num_classes} "
                f"but dataset {dataset.name!r} has {dataset.num_classes} classes"
            )
        data_shape = (dataset.channels, *dataset.im_size)
        if tuple(generator.image_shape) != data_shape:
            raise ValueError(
                f"the generator renders images of shape {tuple(generator.image_shape)} but "
                f"dataset {dataset.name!r} has images of shape {data_shape}"
            )
        self.zca = dataset.zca
        if self._pixels:
            have = dataset.zca.identity() if dataset.zca is not None else None
            if generator.zca != have:
                raise ValueError(
                    "generator: the pixel generator holds "
                    f"{'ZCA-whitened' if generator.zca else 'un-whitened'} images of another "
                    f"dataset than {dataset.name!r} ("
                    f"{'ZCA-whitened' if have else 'un-whitened'}): build it with "
                    "hpd_fast.generators.pixels(dataset)"
                )
        self.soft_labels = cfg.soft_labels
        self.lr_y, self.momentum_y = cfg.lr_y, cfg.momentum_y
        if self.soft_labels != "none" and cfg.algorithm != "mtt":
            raise ValueError(
                f"soft_labels={self.soft_labels!r} needs algorithm='mtt' (learned labels are "
                f"optimised through the trajectory-matching gradient; {cfg.algorithm} takes "
                "class indices)"
            )
        self.ipc = cfg.ipc
        counts = dataset.class_counts()
        if int(counts.min()) < 1:
            empty = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"dataset has no training image of class(es) {empty}")
        for name, value in (("model", cfg.match.model), ("crfd_model", cfg.select.crfd_model)):
            if value not in MODEL_NAMES:
                raise ValueError(f"{name} must be one of {', '.join(MODEL_NAMES)}, got {value!r}")

        self.generator = generator.requires_grad_(False)
        # float64 throughout for a float64 generator (exact checks); float32 otherwise.
        self.dtype = torch.float64 if generator.dtype == torch.float64 else torch.float32
        self.dataset = dataset
        self.algorithm = cfg.algorithm
        self.device = generator.device
        self.num_classes = dataset.num_classes
        self.iterations_per_stage = cfg.iterations_per_stage
        self.lr_w, self.lr_f, self.momentum = cfg.lr_w, cfg.lr_f, cfg.momentum
        self.last_stage = stages if cfg.last_stage is None else cfg.last_stage
        if self.last_stage > stages:
            raise ValueError(
                f"last_stage must be <= generator.num_stages = {stages}, got {self.last_stage}"
            )
        self.first_stage = cfg.first_stage
        if self.first_stage > self.last_stage:
            raise ValueError(
                f"first_stage must be <= last_stage = {self.last_stage}, got {self.first_stage}"
            )
        self.continue_from = cfg.continue_from
        self.batch_real = cfg.match.batch_real
        self.model = cfg.match.model
        self.model_kwargs = dict(cfg.match.model_kwargs)
        self.augment = resolve_augment(cfg.augment)[0]
        sel = cfg.select
        self.select = sel.method
        self.select_every = sel.every
        self.select_batch = sel.batch
        self.crfd_kwargs = {
            "num_models": sel.crfd_models,
            "syn_augments": sel.crfd_syn_augments,
            "real_passes": sel.crfd_real_passes,
            "model": sel.crfd_model,
            "model_kwargs": dict(sel.crfd_model_kwargs),
        }
        self.eval_kwargs = dict(sel.eval_kwargs)
        self.chunk_size = cfg.chunk_size
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.group = group
        rank, world = rank_and_size(group)
        self._writer = rank == 0
        self._rank, self._world = rank, world
        if group is not None and self.num_classes < world:
            raise ValueError(
                f"group: the {self.num_classes} classes' latents are shared out over the "
                f"{world} ranks; every rank needs at least one class"
            )
        self.checkpoint_every = cfg.checkpoint_every
        self.seed = check_int("seed", seed, 0)
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable(info: dict) or None")
        self.callback = callback

        # ---- trajectory matching
        mtt = cfg.mtt
        self.experts = experts
        self.mtt_mode = mtt.mode
        # Not part of the run's identity: it changes memory and time, not the numbers.
        self.max_snapshots = mtt.max_snapshots
        self.syn_steps = mtt.syn_steps
        self.expert_epochs = mtt.expert_epochs
        self.lr_lr = mtt.lr_lr
        m = self.ipc * self.num_classes
        if mtt.batch_syn is not None and mtt.batch_syn > m:
            raise ValueError(f"batch_syn must be <= ipc * num_classes = {m}, got {mtt.batch_syn}")
        self.batch_syn = mtt.batch_syn
        self.num_trajectories = mtt.num_trajectories
        # Private: render every image in MTT steps (the reference path of the tests) instead
        # of only those the iteration's minibatch schedules touch; the numbers are the same.
        self._render_all = False
        self.student: nn.Module | None = None
        self.max_start_epoch = 0
        self.lr_teacher = 0.0
        if self.algorithm == "mtt":
            if experts is None:
                raise ValueError(
                    "algorithm='mtt' needs experts= (expert trajectories: "
                    "hpd_fast.experts.train_experts(...) or hpd_fast.experts.load(path))"
                )
            self._setup_experts(mtt.max_start_epoch, mtt.lr_teacher)

        self.labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(self.ipc)
        self._y: Tensor | None = None  # soft labels: the label logits being optimised
        # The images whose latents this process holds: all of them, or over a group those of
        # the classes c with c % W == rank (hpd_fast.distill.shard).
        self._shard = Shard(self.labels, group)
        self._local_labels = self._shard.local(self.labels)
        self.config = self._make_config()

    # ------------------------------------------------------------------------------ set-up
    def _setup_experts(self, max_start_epoch: int | None, lr_teacher: float | None) -> None:
        ex = self.experts
        for attr in ("trajectories", "model_config", "lr", "check_student"):
            if not hasattr(ex, attr):
                raise TypeError(
                    f"experts must provide {attr!r} (use hpd_fast.experts.load or train_experts)"
                )
        if len(ex.trajectories) < 1:
            raise ValueError("experts holds no trajectories")
        cfg = dict(ex.model_config)
        data_shape = [self.dataset.channels, *self.dataset.im_size]
        got = [cfg.get("channel"), *list(cfg.get("im_size", data_shape))]
        if cfg.get("num_classes", self.num_classes) != self.num_classes or (
            cfg.get("channel") is not None and got != data_shape
        ):
            raise ValueError(
                f"experts were trained for {cfg.get('num_classes')} classes and images "
                f"{got}, but the dataset has {self.num_classes} classes and images {data_shape}"
            )
        meta = getattr(ex, "dataset", None)  # hpd_fast.experts.Experts: the data they saw
        if isinstance(meta, dict):
            want = self.dataset.zca.identity() if self.dataset.zca is not None else None
            got = meta.get("zca")
            if (got or {}).get("fingerprint") != (want or {}).get("fingerprint"):

                def space(z: Any) -> str:
                    return "un-whitened images" if not z else f"ZCA-whitened images ({z})"

                raise ValueError(
                    f"experts were trained on {space(got)}, but the dataset holds "
                    f"{space(want)}: train the experts with the same zca setting (--zca)"
                )
        # Only the structure matters (parameters come from the trajectories); building it must
        # not consume the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            if hasattr(ex, "make_student"):
                student = ex.make_student()
            else:
                student = get_model(
                    cfg["name"],
                    cfg.get("channel", self.dataset.channels),
                    cfg.get("num_classes", self.num_classes),
                    tuple(cfg.get("im_size", self.dataset.im_size)),
                    **cfg.get("kwargs", {}),
                )
        ex.check_student(student)
        self.student = student.to(self.device).requires_grad_(False)
        epochs = int(getattr(ex, "epochs", ex.trajectories[0].shape[0] - 1))
        if self.expert_epochs > epochs:
            raise ValueError(
                f"expert_epochs={self.expert_epochs} exceeds the experts' {epochs} epochs"
            )
        limit = epochs - self.expert_epochs + 1
        if max_start_epoch is None:
            max_start_epoch = min(5, limit)
        self.max_start_epoch = check_int("max_start_epoch", max_start_epoch, 1)
        if self.max_start_epoch > limit:
            raise ValueError(
                f"max_start_epoch must be <= epochs - expert_epochs + 1 = {limit} (experts have "
                f"{epochs} epochs, expert_epochs={self.expert_epochs}), got {max_start_epoch}"
            )
        self.num_experts = len(ex.trajectories)
        self.lr_teacher = check_float("lr_teacher", ex.lr if lr_teacher is None else lr_teacher)

    def _make_config(self) -> dict[str, Any]:
        """The settings that define the run (checked when resuming) plus descriptions."""
        g = self.generator
        aug = self.augment
        cfg: dict[str, Any] = {
            "algorithm": self.algorithm,
            "ipc": self.ipc,
            "iterations_per_stage": self.iterations_per_stage,
            "lr_w": self.lr_w,
            "lr_f": self.lr_f,
            "momentum": self.momentum,
            "first_stage": self.first_stage,
            "last_stage": self.last_stage,
            "continue_from": self.continue_from,
            "select": self.select,
            "select_every": self.select_every,
            "select_batch": self.select_batch,
            "crfd": self.crfd_kwargs,
            "eval_kwargs": {k: repr(v) for k, v in self.eval_kwargs.items()},
            "augment": repr(aug) if aug is not None else None,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "dataset": {
                "name": self.dataset.name,
                "num_train": len(self.dataset),
                "num_classes": self.num_classes,
                "image_shape": [self.dataset.channels, *self.dataset.im_size],
                "fingerprint": tensor_fingerprint(
                    [self.dataset.train_images, self.dataset.train_labels]
                ),
            },
            "generator": {
                "type": type(g).__name__,
                "num_stages": g.num_stages,
                "fingerprint": tensor_fingerprint(list(g.state_dict().values())),
            },
        }
        # Only when used, so that the records of earlier runs stay the same.
        if self.zca is not None:
            cfg["dataset"]["zca"] = self.zca.identity()
        if hasattr(g, "identity"):
            cfg["generator"].update(g.identity())
        if self.soft_labels != "none":
            cfg["soft_labels"] = {
                "init": self.soft_labels,
                "lr_y": self.lr_y,
                "momentum_y": self.momentum_y,
            }
        if self.algorithm == "mtt":
            cfg["mtt"] = {
                "syn_steps": self.syn_steps,
                "expert_epochs": self.expert_epochs,
                "max_start_epoch": self.max_start_epoch,
                "batch_syn": self.batch_syn,
                "lr_lr": self.lr_lr,
                "lr_teacher": self.lr_teacher,
                "mode": self.mtt_mode,
                "num_experts": self.num_experts,
            }
            if self.num_trajectories != 1:  # only when used: earlier records stay the same
                cfg["mtt"]["num_trajectories"] = self.num_trajectories
        else:
            cfg[self.algorithm] = {
                "batch_real": self.batch_real,
                "model": self.model,
                "model_kwargs": self.model_kwargs,
            }
        return json.loads(json.dumps(cfg))

    # ------------------------------------------------------------------------- randomness
    def _rng(self, *parts: object) -> torch.Generator:
        """A CPU generator seeded by ``(seed, *parts)``: the only source of randomness."""
        return torch.Generator().manual_seed(derive_seed(self.seed, *parts))

    @staticmethod
    def _draw(gen: torch.Generator, high: int) -> int:
        return int(torch.randint(high, (), generator=gen))

    # -------------------------------------------------------------------------- augmentations
    def _aug_plain(self, x: Tensor, seed: int) -> Tensor:
        return self.augment(x, seed)  # type: ignore[misc]

    def _aug_siamese(self, x: Tensor, seed: int) -> Tensor:
        if isinstance(self.augment, DSA):
            return self.augment(x, seed, siamese=True)
        return self.augment(x, seed)  # type: ignore[misc]

    # ---------------------------------------------------------------------------- losses
    def _class_index(self) -> list[Tensor]:
        if not hasattr(self, "_by_class"):
            y = self.dataset.train_labels.cpu()
            self._by_class = [(y == c).nonzero().squeeze(1) for c in range(self.num_classes)]
        return self._by_class

    def _real_batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch_real`` random real images per class (fewer if a class is smaller)."""
        picks = []
        for idx in self._class_index():
            n = min(self.batch_real, idx.numel())
            picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:n]])
        index = torch.cat(picks)
        x = self.dataset.train_images.index_select(0, index.to(self.dataset.train_images.device))
        y = self.dataset.train_labels.cpu().index_select(0, index)
        return x.to(self.device, self.dtype), y.to(self.device)

    def _mtt_draw(self, stage: int, it: int, k: int = 0) -> tuple[int, int, int]:
        """``(expert, start epoch, schedule seed)`` of trajectory ``k`` of iteration ``it``.

        Trajectory 0 takes the draws of a one-trajectory run (so ``num_trajectories=1`` is the
        run it always was); trajectory ``k > 0`` draws from its own derived generator.
        """
        gen = self._rng("step", stage, it) if k == 0 else self._rng("step", stage, it, "traj", k)
        e = self._draw(gen, self.num_experts)
        s = self._draw(gen, self.max_start_epoch)
        return e, s, self._draw(gen, 2**62)

    def _mtt_schedule(self, stage: int, it: int, k: int = 0) -> TrajectorySchedule:
        """The minibatch schedule of trajectory ``k`` over all ``M`` images: the one
        :func:`trajectory_matching_loss` draws from the same seed."""
        seed = self._mtt_draw(stage, it, k)[2]
        return batch_schedule(self.labels.numel(), self.syn_steps, self.batch_syn, seed)

    def _mtt_union(self, stage: int, it: int) -> Tensor | None:
        """The images (sorted int64 CPU indices) the iteration's trajectories touch, or None
        when that is all of them (or when ``_render_all``)."""
        if self._render_all:
            return None
        parts = [
            i
            for k in range(self.num_trajectories)
            for i in self._mtt_schedule(stage, it, k).indices
        ]
        union = torch.cat(parts).unique()
        return None if union.numel() == self.labels.numel() else union

    def _loss(
        self,
        images: Tensor,
        stage: int,
        it: int,
        syn_lr: Tensor | None,
        traj: int = 0,
        union: Tensor | None = None,
        labels: Tensor | None = None,
        data_parallel: bool = True,
    ) -> Tensor:
        """The distillation loss of iteration ``it`` (0-based) at ``stage`` on ``images``.

        Trajectory matching: trajectory ``traj``; ``images`` are those of ``union`` (sorted
        indices of the ``M`` images, as :meth:`_mtt_union`) in that order, or all ``M`` when
        ``union`` is None. The schedule is drawn over all ``M`` images, as always, and remapped
        to the rows of ``images``: the same batches, augmentations and numbers. ``labels``:
        the targets of those rows when the caller has them (gathered soft labels), else
        derived here; ``data_parallel=False`` runs the trajectory on this process alone.

        DM / DC: ``images`` are this process's (all, or over a group its classes').
        """
        images = self._to_data(images)
        if self.algorithm == "mtt":
            e, s, seed = self._mtt_draw(stage, it, traj)
            start, target = self._expert_pair(e, s)
            m = self.labels.numel()
            schedule = batch_schedule(m, self.syn_steps, self.batch_syn, seed)
            if labels is None:
                labels = self.labels if self._y is None else torch.softmax(self._y, dim=1)
                if union is not None:
                    labels = labels.index_select(0, union.to(labels.device))
            if union is not None:
                pos = torch.full((m,), -1, dtype=torch.int64)
                pos[union] = torch.arange(union.numel())
                schedule = TrajectorySchedule(
                    tuple(pos[i] for i in schedule.indices), schedule.aug_seeds
                )
            return trajectory_matching_loss(
                self.student,
                images,
                labels,
                syn_lr,
                start,
                target,
                syn_steps=self.syn_steps,
                augment=self._aug_plain if self.augment is not None else None,
                mode=self.mtt_mode,
                seed=seed,
                max_snapshots=self.max_snapshots,
                group=self.group if data_parallel else None,
                schedule=schedule,
            )
        gen = self._rng("step", stage, it)
        k = self.num_classes
        c, h, w = self.generator.image_shape
        net_seed = self._draw(gen, 2**62)
        real_x, real_y = self._real_batch(gen)
        seeds = [self._draw(gen, MAX_AUG_SEED) for _ in range(k)]
        aug = self._aug_siamese if self.augment is not None else None
        labels = self._local_labels  # this process's classes (the others contribute 0 here)
        net = random_network(self.model, c, k, (h, w), net_seed, self.device, **self.model_kwargs)
        if self.dtype != torch.float32:
            net = net.to(self.dtype)
        if self.algorithm == "dm":
            if not hasattr(net, "embed"):
                raise ValueError(f"model {self.model!r} has no embed(); DM needs one")
            return dm_loss(net.embed, real_x, real_y, images, labels, k, augment=aug, seeds=seeds)
        net.requires_grad_(True)
        return dc_loss(net, real_x, real_y, images, labels, k, augment=aug, seeds=seeds)

    def _expert_pair(self, e: int, s: int) -> tuple[Tensor, Tensor]:
        ex = self.experts
        if hasattr(ex, "pair"):
            a, b = ex.pair(e, s, self.expert_epochs)
        else:
            traj = ex.trajectories[e]
            a, b = traj[s], traj[s + self.expert_epochs]
        return a.to(self.device, self.dtype), b.to(self.device, self.dtype)

    # ------------------------------------------------------------------------- rendering
    @torch.no_grad()
    def render(self, w: Tensor, f: Tensor, stage: int) -> Tensor:
        """Images ``[M, C, H, W]`` of latents at ``stage`` (no graph, in chunks), in the
        dataset's space (ZCA-whitened when the dataset is)."""
        x = render(self.generator, w.detach(), f.detach(), stage, self.chunk_size or w.shape[0])
        return self._to_data(x)

    def _to_data(self, images: Tensor) -> Tensor:
        """Rendered images -> the dataset's space: the fixed ZCA layer for a generator on a
        whitened dataset (differentiable); the identity otherwise (a pixel generator's images
        already live there)."""
        if self.zca is None or self._pixels:
            return images
        return self.zca.whiten(images)

    @torch.no_grad()
    def _initial_label_logits(self, w: Tensor, f: Tensor, stage: int) -> Tensor:
        """Soft labels: the starting logits ``[M, K]`` (see the class docstring)."""
        k = self.num_classes
        if self.soft_labels == "onehot":
            high = math.log(_ONEHOT_PROB * (k - 1) / (1 - _ONEHOT_PROB)) if k > 1 else 0.0
            return torch.nn.functional.one_hot(self._local_labels, k).to(self.dtype) * high
        # DATM: the expert's parameters at its last epoch, on the initial synthetic images.
        traj = self.experts.trajectories[0]
        params = traj[-1].to(self.device, self.dtype)
        images = self.render(w, f, stage)
        chunk = self.chunk_size or images.shape[0]
        logits = [
            functional_forward(self.student, params, images[a : a + chunk])
            for a in range(0, images.shape[0], chunk)
        ]
        return torch.cat(logits).to(self.dtype)

    @torch.no_grad()
    def _advance(self, w: Tensor, f: Tensor, stage: int) -> Tensor:
        """``f`` at ``stage + 1`` (guarded: NaN -> 0, clamped to [-10, 10])."""
        chunk = self.chunk_size or w.shape[0]
        m = w.shape[0]
        f_next: Tensor | None = None
        for a in range(0, m, chunk):  # filled in place: one f-sized tensor, not four
            part = self.generator.advance(w[a : a + chunk], f[a : a + chunk], stage)
            if f_next is None:
                f_next = part.new_empty((m, *part.shape[1:]))
            f_next[a : a + part.shape[0]] = part
        assert f_next is not None
        return f_next.nan_to_num_(nan=0.0).clamp_(-_F_CLAMP, _F_CLAMP)

    # ------------------------------------------------------------------------- selection
    def _make_crfd(self, real_means: list[list[Tensor]] | None = None) -> CRFD:
        return CRFD.from_dataset(
            self.dataset,
            augment=self.augment,
            seed=derive_seed(self.seed, "crfd"),
            device=self.device,
            real_means=real_means,
            **self.crfd_kwargs,
        )

    def _score(self, cands: list[Candidate], stage: int) -> list[float]:
        """Scores of the candidates (lower is better). Over a group the first rank scores the
        gathered sets and every rank receives its scores."""
        imgs = [self.render(c.w, c.f, stage) for c in cands]
        ys = [None if c.y is None else torch.softmax(c.y, dim=1) for c in cands]
        sh = self._shard
        if not sh.sharded:
            return self._score_sets(imgs, ys)
        imgs = [sh.collect(x, everywhere=False) for x in imgs]
        ys = [None if y is None else sh.collect(y, everywhere=False) for y in ys]
        scores = torch.zeros(len(cands), dtype=torch.float64)
        if sh.rank == 0:
            full = [x.to(self.device) for x in imgs]  # type: ignore[union-attr]
            scores = torch.tensor(self._score_sets(full, ys), dtype=torch.float64)
        scores = scores.to(self.device)
        torch.distributed.broadcast(scores, src=sh._src(0), group=self.group)
        return [float(v) for v in scores.cpu()]

    def _score_sets(self, imgs: list[Tensor], ys: list[Tensor | None]) -> list[float]:
        if self.select == "crfd":  # class means: by class index, also with soft labels
            return [float(v) for v in self._crfd.score([x.float() for x in imgs], self.labels)]
        from hpd_fast.evaluation import evaluate

        kw = {"num_eval": 3, "seed": derive_seed(self.seed, "eval") % 2**31, "baseline": None}
        kw.update(self.eval_kwargs)
        models = kw.get("models", ("ConvNet",))
        first = models if isinstance(models, str) else models[0]
        out = []
        for x, y in zip(imgs, ys):
            y = self.labels if y is None else y
            res = evaluate(x.cpu().float(), y.cpu().float() if y.is_floating_point() else y.cpu(),
                           self.dataset, **kw)  # fmt: skip
            out.append(-float(res[first]["mean"]))
        return out

    # --------------------------------------------------------------------------------- fit
    def fit(self, progress: bool | None = None) -> DistillResult:
        """Run (or resume) the distillation and return the chosen synthetic set.

        Args:
            progress: None (default): a tqdm bar over all iterations when stderr is a terminal,
                otherwise one line per stage (loss, best score) through the ``hpd_fast``
                logger; True: the bar; False: neither. Only the group's first rank reports.

        Returns:
            :class:`~hpd_fast.distill.result.DistillResult`.

        Raises:
            NonFiniteLossError: the loss or its gradient became NaN/inf (the message names the
                stage and iteration; the last good checkpoint is left in place).
            ValueError: ``checkpoint_dir`` holds a checkpoint of a different run.
        """
        from tqdm.auto import tqdm

        t_start = time.perf_counter()
        st = RunState()
        loaded = self._load_checkpoint(st)
        crfd_means = loaded.pop("crfd_means", None) if loaded else None
        if self.select == "crfd":
            t0 = time.perf_counter()
            self._crfd = self._make_crfd(crfd_means)
            if crfd_means is None:
                st.timings["setup"] = st.timings.get("setup", 0.0) + time.perf_counter() - t0
        if not loaded:
            rows = self._shard.rows if self._shard.sharded else None
            w, f = self.generator.sample_latents(
                self.labels, derive_seed(self.seed, "latents"), rows=rows
            )
            w, f = w.to(self.dtype), f.to(self.dtype)
            for k in range(1, self.first_stage):  # stages before the first optimised one
                f = self._advance(w, f, k).to(self.dtype)
            st.stage, st.iteration = self.first_stage, 0
            st.w, st.f = w, f
            st.syn_lr = torch.tensor(self.lr_teacher, device=self.device, dtype=self.dtype)
            if self.soft_labels != "none":
                st.y = self._initial_label_logits(w, f, self.first_stage)
            self._new_optimizers(st, keep_lr_state=False)
            self._add_candidate(st)
        total = (self.last_stage - self.first_stage + 1) * self.iterations_per_stage
        done = (st.stage - self.first_stage) * self.iterations_per_stage + st.iteration
        bar = tqdm(
            total=total,
            initial=min(done, total),
            desc="H-PD",
            unit="it",
            disable=(None if progress is None else not progress) if self._writer else True,
        )
        log_stages = self._writer and progress is None and bar.disable
        t_loop = time.perf_counter()
        try:
            while not st.finished:
                stage = st.stage
                t_stage = time.perf_counter()
                for it in range(st.iteration, self.iterations_per_stage):
                    loss = self._step(st, stage, it)
                    st.iteration = it + 1
                    entry = {"stage": stage, "iteration": it + 1, "loss": loss}
                    if self.algorithm == "mtt":
                        entry["syn_lr"] = float(st.syn_lr.detach())
                    st.losses.append(entry)
                    last = st.iteration == self.iterations_per_stage
                    if self.select != "last" and (st.iteration % self.select_every == 0 or last):
                        self._add_candidate(st)
                        if len(st.pending) >= self.select_batch:
                            self._flush(st)
                    st.add_time(f"stage{stage}", time.perf_counter() - t_stage)
                    t_stage = time.perf_counter()
                    if (
                        self.checkpoint_every is not None
                        and st.iteration % self.checkpoint_every == 0
                        and not last
                    ):
                        self._save_checkpoint(st)
                    bar.update(1)
                    best = st.best_score()
                    bar.set_postfix_str(
                        f"stage {stage}, loss {loss:.4g}"
                        + (f", best {best:.4g}" if best is not None else "")
                    )
                    if self.callback is not None:
                        self.callback(
                            {
                                "stage": stage,
                                "iteration": it + 1,
                                "loss": loss,
                                "w": st.w.detach(),
                                "f": st.f.detach(),
                                "hpd": self,
                            }
                        )
                self._end_stage(st)
                st.add_time(f"stage{stage}", time.perf_counter() - t_stage)
                self._save_checkpoint(st)
                if log_stages:
                    self._log_stage(st, stage)
        finally:
            bar.close()
        st.add_time("loop", time.perf_counter() - t_loop)
        st.add_time("total", time.perf_counter() - t_start)
        return self._result(st)

    def _log_stage(self, st: RunState, stage: int) -> None:
        losses = [e["loss"] for e in st.losses if e["stage"] == stage]
        best = st.best.get(stage, {})
        score = best.get("score")
        what = "CRFD" if self.select == "crfd" else "score"
        _LOG.info(
            "H-PD stage %d/%d: %d iterations, last loss %s, best %s (iterate %s), %.1f s",
            stage,
            self.last_stage,
            len(losses),
            f"{losses[-1]:.4g}" if losses else "-",
            f"{what} {score:.4g}" if score is not None else "unscored",
            best.get("iteration"),
            st.timings.get(f"stage{stage}", 0.0),
        )

    # ------------------------------------------------------------------------------ steps
    def _new_optimizers(self, st: RunState, keep_lr_state: bool) -> None:
        # New leaves (fresh, contiguous memory) for the new optimiser.
        st.w = private_copy(st.w).requires_grad_(True)
        st.f = private_copy(st.f).requires_grad_(True)
        groups = [{"params": [st.w], "lr": self.lr_w}, {"params": [st.f], "lr": self.lr_f}]
        if st.y is not None:  # soft labels: their own rate and momentum, in the same optimiser
            st.y = private_copy(st.y).requires_grad_(True)
            groups.append({"params": [st.y], "lr": self.lr_y, "momentum": self.momentum_y})
        self._y = st.y
        st.opt = torch.optim.SGD(groups, lr=self.lr_f, momentum=self.momentum)
        if self.algorithm == "mtt" and not keep_lr_state:
            st.syn_lr = st.syn_lr.detach().clone().requires_grad_(True)
            st.opt_lr = torch.optim.SGD([st.syn_lr], lr=self.lr_lr, momentum=self.momentum)

    def _step(self, st: RunState, stage: int, it: int) -> float:
        """One optimiser step at ``stage`` (iteration ``it``, 0-based); returns the loss.

        The non-finite guard: the latents and the learning rate going in, the loss, every
        gradient and the updated values coming out are checked; the error names the quantity
        that went non-finite (latents, learning rate, expert data, loss), the stage and the
        iteration.
        """
        where = f"at stage {stage}, iteration {it + 1}"
        self._check_finite(st, where, "before the step")
        st.opt.zero_grad(set_to_none=True)
        if st.opt_lr is not None:
            st.opt_lr.zero_grad(set_to_none=True)
        if self.algorithm == "mtt":
            value = self._mtt_backward(st, stage, it, where)
        else:
            value = self._match_backward(st, stage, it, where)
        named = (
            ("w", st.w),
            ("f", st.f),
            ("syn_lr", st.syn_lr if self.algorithm == "mtt" else None),
        )
        bad = self._any(
            *(t is not None and t.grad is not None and not math.isfinite(_abs_max(t.grad))
              for _, t in named)
        )  # fmt: skip
        for (name, _), wrong in zip(named, bad):
            if wrong:
                raise NonFiniteLossError(
                    f"the gradient of the {self.algorithm} loss with respect to {name} is not "
                    f"finite {where}: {self._advice()}{self._kept()}"
                )
        st.opt.step()
        if st.opt_lr is not None:
            st.opt_lr.step()
        self._check_finite(st, where, "after the optimiser step")
        return value

    def _render_checked(self, st: RunState, w: Tensor, f: Tensor, stage: int, where: str) -> Tensor:
        """``render(w, f)`` (chunked backward); non-finite images are an error naming the
        latents (``st``'s, all of them)."""
        if w.shape[0] == 0 or f.shape[0] == 0:  # a rank none of whose images are used now
            shape = (0, *self.generator.image_shape)
            images = torch.zeros(shape, dtype=self.dtype, device=self.device, requires_grad=True)
        else:
            images = render(self.generator, w, f, stage, chunk_size=self.chunk_size)
        if self._any(not math.isfinite(_abs_max(images.detach())))[0]:
            raise NonFiniteLossError(
                f"the rendered images are not finite {where} although the latents are: the "
                f"latents (max |w| {float(st.w.detach().abs().max()):.3g}, max |f| "
                f"{float(st.f.detach().abs().max()):.3g}) overflow the generator; lower lr_w / "
                f"lr_f (--lr-w / --lr-f){self._kept()}"
            )
        return images

    def _checked_loss(
        self,
        images: Tensor,
        stage: int,
        it: int,
        syn_lr: Tensor | None,
        where: str,
        traj: int = 0,
        union: Tensor | None = None,
        labels: Tensor | None = None,
        data_parallel: bool = True,
    ) -> Tensor:
        """:meth:`_loss`, its errors and a non-finite value explained (a bad expert pair)."""
        try:
            if self.algorithm == "mtt":
                loss = self._loss(images, stage, it, syn_lr, traj, union, labels, data_parallel)
            else:
                loss = self._loss(images, stage, it, syn_lr)
        except (ValueError, RuntimeError) as exc:
            bad = self._bad_expert_pair(stage, it, traj)
            if bad is None:
                raise
            raise NonFiniteLossError(f"{bad} {where}{self._kept()}") from exc
        return loss

    def _check_value(self, value: float, stage: int, it: int, where: str, traj: int = 0) -> None:
        if not math.isfinite(value):
            bad = self._bad_expert_pair(stage, it, traj)
            raise NonFiniteLossError(
                (bad or f"the {self.algorithm} loss is {value}")
                + f" {where}: "
                + self._advice()
                + self._kept()
            )

    def _match_backward(self, st: RunState, stage: int, it: int, where: str) -> float:
        """DM / DC: the loss on every image of this process (both use all of each class's
        images, and a class's terms only its own images: over a group every rank renders and
        scores its classes, and the latents it holds get their whole gradient), backward into
        the latents; returns the loss value (summed over the group)."""
        images = self._render_checked(st, st.w, st.f, stage, where)
        loss = self._checked_loss(images, stage, it, None, where)
        if self.group is not None:
            total = loss.detach().clone()
            torch.distributed.all_reduce(total, group=self.group)
            value = float(total)
        else:
            value = float(loss.detach())
        self._check_value(value, stage, it, where)
        torch.autograd.backward(loss, inputs=[st.w, st.f])
        return value

    def _mtt_backward(self, st: RunState, stage: int, it: int, where: str) -> float:
        """Trajectory matching: render only the images the iteration's schedules touch, and
        backward the average loss of its ``num_trajectories`` trajectories into the latents,
        ``syn_lr`` and soft labels (zero gradient for untouched images); returns the (average)
        loss value.

        One trajectory: one backward through the trajectory and the renderer, as always (over a
        group the trajectory is data parallel: every step's batch is split over the ranks).
        More: each trajectory's loss is backpropagated to the (shared) rendered images before
        the next one runs (memory as for one trajectory); the renderer's backward runs once, on
        the average image gradient. Over a group the trajectories are dealt out (rank ``r``
        runs those ``k`` with ``k % W == r``, each on its own) and the image, label and rate
        gradients summed over the ranks.
        """
        union = self._mtt_union(stage, it)
        images, labels = self._mtt_inputs(st, union, stage, where)
        n = self.num_trajectories
        if n == 1:
            extra = [st.syn_lr] + ([st.y] if st.y is not None else [])  # soft labels learn too
            loss = self._checked_loss(images, stage, it, st.syn_lr, where, 0, union, labels)
            value = float(loss.detach())
            self._check_value(value, stage, it, where)
            torch.autograd.backward(loss, inputs=[st.w, st.f, *extra])
            self._zero_missing_grads(st)
            return value
        spread = self._shard.sharded
        mine = range(self._rank, n, self._world) if spread else range(n)
        leaf = images.detach().requires_grad_(True)
        # gathered soft labels: a leaf too (their graph back to st.y is walked once, below)
        leaf_y = labels.detach().requires_grad_(True) if st.y is not None and spread else None
        lab = leaf_y if leaf_y is not None else labels
        wrt = [leaf, st.syn_lr]
        if st.y is not None:
            wrt.append(leaf_y if leaf_y is not None else st.y)
        total = 0.0
        for traj in mine:
            loss = self._checked_loss(
                leaf, stage, it, st.syn_lr, where, traj, union, lab, data_parallel=not spread
            )
            value = float(loss.detach())
            if not spread:
                self._check_value(value, stage, it, where, traj)
            torch.autograd.backward(loss, inputs=wrt)
            del loss
            total += value
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in wrt]
        for t in wrt[1:]:
            t.grad = None
        if spread:  # each rank ran its share: sum the losses and gradients
            both = torch.tensor([total], dtype=torch.float64, device=self.device)
            for g in (both, *grads):
                self._shard.all_reduce_(g)
            total = float(both)
            if not math.isfinite(total):
                bad = [k for k in range(n) if self._bad_expert_pair(stage, it, k) is not None]
                self._check_value(total, stage, it, where, bad[0] if bad else 0)
        outs, cots, into = [images], [grads[0] / n], [st.w, st.f]
        if leaf_y is not None:
            outs.append(labels)
            cots.append(grads[2] / n)
            into.append(st.y)
        if any(o.requires_grad for o in outs):
            torch.autograd.backward(outs, cots, inputs=into)
        st.syn_lr.grad = grads[1] / n
        if st.y is not None and leaf_y is None:
            st.y.grad = grads[2] / n
        self._zero_missing_grads(st)
        return total / n

    def _mtt_inputs(
        self, st: RunState, union: Tensor | None, stage: int, where: str
    ) -> tuple[Tensor, Tensor | None]:
        """The images of ``union`` (all when None), rendered with a graph to the latents, and
        their targets when they come from elsewhere (over a group: gathered soft labels or the
        class indices; None: :meth:`_loss` derives them).

        Over a group every rank renders its own images of ``union`` and all of them are
        gathered on every rank (:meth:`Shard.gather`); the gradient comes back to the owners.
        """
        sh = self._shard
        if not sh.sharded:
            w, f = st.w, st.f
            if union is not None:  # only the touched rows (a shared batch-1 latent stays whole)
                rows = union.to(w.device)
                w = w if w.shape[0] == 1 else w.index_select(0, rows)
                f = f if f.shape[0] == 1 else f.index_select(0, rows)
            return self._render_checked(st, w, f, stage, where), None
        order = union if union is not None else torch.arange(sh.num_images)
        pos = sh.local_pos[sh.mine(order)].to(st.w.device)
        own = self._render_checked(
            st, st.w.index_select(0, pos), st.f.index_select(0, pos), stage, where
        )
        images = sh.gather(own, order)
        if st.y is None:
            return images, self.labels.index_select(0, order.to(self.labels.device))
        return images, sh.gather(torch.softmax(st.y.index_select(0, pos), dim=1), order)

    @staticmethod
    def _zero_missing_grads(st: RunState) -> None:
        """Latents that no loss reached get a zero gradient (the optimiser's momentum then
        moves them as it moves untouched rows of touched latents)."""
        for t in (st.w, st.f, st.y):
            if t is not None and t.grad is None:
                t.grad = torch.zeros_like(t)

    def _group_max(self, *values: float) -> list[float]:
        """Each value's maximum over the group's ranks (the values themselves without
        sharding): what every rank then decides alike."""
        if not self._shard.sharded:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def _any(self, *flags: bool) -> list[bool]:
        """Each flag, or-ed over the group's ranks."""
        return [v > 0 for v in self._group_max(*(float(f) for f in flags))]

    def _kept(self) -> str:
        """What is left to resume from: said only when a checkpoint exists."""
        d = self.checkpoint_dir
        if d is not None and (d / "checkpoint.safetensors").is_file():
            return f"; the last good checkpoint in {str(d)!r} is kept"
        return "; no checkpoint was written yet" if d is not None else ""

    def _advice(self) -> str:
        lr = "lower lr_w / lr_f (--lr-w / --lr-f)"
        if self.algorithm == "mtt":
            lr += ", lr_lr (--lr-lr) or lr_teacher (--lr-teacher)"
        return lr

    def _check_finite(self, st: RunState, where: str, when: str) -> None:
        """The latents and the learned learning rate must be finite (named when not)."""
        for name, t, fix in (
            ("latents w", st.w, "lower lr_w (--lr-w)"),
            ("latents f", st.f, "lower lr_f (--lr-f)"),
            (
                "learned learning rate syn_lr",
                st.syn_lr if self.algorithm == "mtt" else None,
                "lower lr_lr (--lr-lr) or lr_teacher (--lr-teacher)",
            ),
        ):
            # over a group: this rank's rows; the verdict and magnitude are the group's
            empty = t is None or t.numel() == 0
            big = 0.0 if empty else _abs_max(t.detach())  # type: ignore[union-attr]
            finite = math.isfinite(big)
            big = big if finite else 0.0
            bad, big = self._group_max(float(not finite), big)
            finite = bad == 0
            if empty:
                continue
            if not finite:
                raise NonFiniteLossError(
                    f"the {name} became non-finite (NaN/inf) {when} {where}: {fix}{self._kept()}"
                )
            if big > _DIVERGED:
                raise NonFiniteLossError(
                    f"the {name} diverged {when} {where} (largest magnitude {big:.3g}, beyond "
                    f"{_DIVERGED:.0e}): {fix}{self._kept()}"
                )

    def _bad_expert_pair(self, stage: int, it: int, traj: int = 0) -> str | None:
        """A description of the expert pair of trajectory ``traj`` of this step when it is
        not finite, else None."""
        if self.algorithm != "mtt":
            return None
        e, s, _ = self._mtt_draw(stage, it, traj)  # the draws of _loss
        try:
            start, target = self._expert_pair(e, s)
        except Exception:  # noqa: BLE001 (the diagnosis must not hide the original error)
            return None
        if bool(torch.isfinite(start).all()) and bool(torch.isfinite(target).all()):
            return None
        ex = self.experts
        idx = ex.indices[e] if hasattr(ex, "indices") else e
        path = getattr(ex, "path", None)
        file = f" ({str(Path(path) / f'expert_{idx:05d}.safetensors')!r})" if path else ""
        bad = s if not bool(torch.isfinite(start).all()) else s + self.expert_epochs
        return (
            f"the expert data is not finite: expert {idx}{file} has NaN/inf parameters at epoch "
            f"{bad} (the pair of epochs {s} and {s + self.expert_epochs}); retrain that expert"
        )

    def _add_candidate(self, st: RunState) -> None:
        if self.select == "last":
            return
        y = None if st.y is None else private_copy(st.y)
        st.pending.append(Candidate(st.iteration, private_copy(st.w), private_copy(st.f), y))

    def _flush(self, st: RunState) -> None:
        if not st.pending:
            return
        t0 = time.perf_counter()
        scores = self._score(st.pending, st.stage)
        for cand, score in zip(st.pending, scores):
            st.history.append({"stage": st.stage, "iteration": cand.iteration, "score": score})
            best = st.best.get(st.stage)
            if best is None or score < best["score"]:
                st.best[st.stage] = {
                    "iteration": cand.iteration,
                    "score": score,
                    "w": cand.w,
                    "f": cand.f,
                    "y": cand.y,
                }
        st.pending = []
        st.add_time("select", time.perf_counter() - t0)

    def _end_stage(self, st: RunState) -> None:
        stage = st.stage
        if self.select == "last":
            st.best[stage] = {
                "iteration": st.iteration,
                "score": None,
                "w": private_copy(st.w),
                "f": private_copy(st.f),
                "y": None if st.y is None else private_copy(st.y),
            }
        else:
            self._flush(st)
        if stage >= self.last_stage:
            st.finished = True
            return
        src = st.best[stage] if self.continue_from == "best" else {"w": st.w, "f": st.f, "y": st.y}
        w = private_copy(src["w"])
        f = self._advance(w, src["f"].detach(), stage)  # a fresh contiguous tensor
        st.stage, st.iteration = stage + 1, 0
        st.w, st.f = w, f
        st.y = None if src.get("y") is None else private_copy(src["y"])
        self._new_optimizers(st, keep_lr_state=True)
        self._add_candidate(st)

    # ------------------------------------------------------------------------------ result
    def _result(self, st: RunState) -> DistillResult:
        scored = {k: b for k, b in st.best.items() if b["score"] is not None}
        if scored:
            chosen = min(sorted(scored), key=lambda k: scored[k]["score"])
        else:
            chosen = max(st.best)
        sh = self._shard

        def full(t: Tensor) -> Tensor:  # every rank's rows, in host memory
            return sh.collect(t) if sh.sharded else t.detach().cpu()  # type: ignore[return-value]

        def latents(t: Tensor) -> Tensor:  # over a group: whole on the first rank only
            if not sh.sharded:
                return t.detach().cpu().clone()
            got = sh.collect(t, everywhere=False)
            return got if got is not None else t.detach().cpu()[:0].clone()

        stage_images = {k: full(self.render(b["w"], b["f"], k)) for k, b in st.best.items()}
        b = st.best[chosen]
        # Random real images at the same IPC (or fewer, for a smaller class), for the overview.
        real_ipc = min(self.ipc, int(self.dataset.class_counts().min()))
        real_x, real_y = self.dataset.random_real(real_ipc, self.seed)

        def probabilities(best: dict[str, Any]) -> Tensor:  # soft labels: softmax(logits)
            return torch.softmax(full(best["y"]).float(), dim=1).cpu()

        soft = b.get("y") is not None
        extra: dict[str, Any] = {"zca": self.zca}
        if soft:
            extra["classes"] = self.labels.cpu()
            extra["stage_labels"] = {k: probabilities(v) for k, v in st.best.items()}
        return DistillResult(
            images=stage_images[chosen].clone(),
            labels=probabilities(b) if soft else self.labels.cpu(),
            w=latents(b["w"]),
            f=latents(b["f"]),
            stage=chosen,
            iteration=int(b["iteration"]),
            stage_images=stage_images,
            stage_w={k: latents(v["w"]) for k, v in st.best.items()},
            stage_f={k: latents(v["f"]) for k, v in st.best.items()},
            stage_best={
                k: {"iteration": v["iteration"], "score": v["score"]} for k, v in st.best.items()
            },
            history=[dict(h) for h in st.history],
            losses=[dict(e) for e in st.losses],
            timings=dict(st.timings),
            config=dict(self.config),
            mean=tuple(self.dataset.mean),
            std=tuple(self.dataset.std),
            real_images=real_x.detach().cpu().float(),
            real_labels=real_y.detach().cpu(),
            class_names=list(self.dataset.class_names),
            **extra,
        )

    # ------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, st: RunState) -> None:
        """Write the state (one file). Over a group every rank sends its rows and the first
        writes the whole state, the same file one process writes: a run resumes from it with
        any number of ranks."""
        if self.checkpoint_dir is None:
            return
        rows: dict[str, Tensor] = {"w": st.w, "f": st.f}  # one row per synthetic image
        meta: dict[str, Any] = {
            "config": self.config,
            "stage": st.stage,
            "iteration": st.iteration,
            "finished": st.finished,
            "history": st.history,
            "losses": st.losses,
            "timings": st.timings,
            "pending": [c.iteration for c in st.pending],
            "best": {
                str(k): {"iteration": b["iteration"], "score": b["score"]}
                for k, b in st.best.items()
            },
        }
        for i, c in enumerate(st.pending):
            rows[f"pending{i}.w"], rows[f"pending{i}.f"] = c.w, c.f
        for k, b in st.best.items():
            rows[f"best{k}.w"], rows[f"best{k}.f"] = b["w"], b["f"]
        if st.y is not None:  # soft labels: the logits of the state, candidates and bests
            rows["y"] = st.y
            for i, c in enumerate(st.pending):
                rows[f"pending{i}.y"] = c.y  # type: ignore[assignment]
            for k, b in st.best.items():
                rows[f"best{k}.y"] = b["y"]
        meta["opt"] = pack_optimizer(st.opt, "opt", rows)
        shared: dict[str, Tensor] = {}  # the same on every rank
        if st.opt_lr is not None:
            shared["syn_lr"] = st.syn_lr.reshape(1)
            meta["opt_lr"] = pack_optimizer(st.opt_lr, "opt_lr", shared)
        if self.select == "crfd":
            shared.update(self._crfd.state_tensors("crfd"))
        if self._shard.sharded:
            gathered = {k: self._shard.collect(v, everywhere=False) for k, v in rows.items()}
            if not self._writer:
                return
            rows = gathered  # type: ignore[assignment]
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in {**rows, **shared}.items()}
        d = self.checkpoint_dir
        d.mkdir(parents=True, exist_ok=True)
        write_checkpoint(d, tensors, meta)

    def _load_checkpoint(self, st: RunState) -> dict[str, Any]:
        """Fill ``st`` from ``checkpoint_dir`` if it holds one; returns extra loaded items."""
        if self.checkpoint_dir is None:
            return {}
        sh = self._shard
        loaded = read_checkpoint(
            self.checkpoint_dir,
            self.config,
            rows=sh.rows if sh.sharded else None,
            is_row=_is_row_tensor,
        )
        if loaded is None:
            return {}
        meta, tensors = loaded
        dev = self.device
        st.stage, st.iteration = int(meta["stage"]), int(meta["iteration"])
        st.finished = bool(meta["finished"])
        st.history, st.losses = meta["history"], meta["losses"]
        st.timings = {k: float(v) for k, v in meta["timings"].items()}
        st.w, st.f = tensors["w"].to(dev), tensors["f"].to(dev)
        if self.algorithm == "mtt":
            st.syn_lr = tensors["syn_lr"].reshape(()).to(dev)
        st.y = tensors["y"].to(dev) if "y" in tensors else None

        def y_of(name: str) -> Tensor | None:
            return tensors[name].to(dev) if name in tensors else None

        self._new_optimizers(st, keep_lr_state=False)
        unpack_optimizer(st.opt, meta["opt"], "opt", tensors, dev)
        if st.opt_lr is not None:
            unpack_optimizer(st.opt_lr, meta["opt_lr"], "opt_lr", tensors, dev)
        st.pending = [
            Candidate(
                int(it),
                tensors[f"pending{i}.w"].to(dev),
                tensors[f"pending{i}.f"].to(dev),
                y_of(f"pending{i}.y"),
            )
            for i, it in enumerate(meta["pending"])
        ]
        st.best = {
            int(k): {
                "iteration": int(b["iteration"]),
                "score": b["score"],
                "w": tensors[f"best{k}.w"].to(dev),
                "f": tensors[f"best{k}.f"].to(dev),
                "y": y_of(f"best{k}.y"),
            }
            for k, b in meta["best"].items()
        }
        out: dict[str, Any] = {"loaded": True}
        if self.select == "crfd":
            out["crfd_means"] = CRFD.means_from_tensors(tensors, "crfd")
        return out
