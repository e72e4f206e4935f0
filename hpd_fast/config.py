"""Every setting of hpd_fast, once: typed dataclasses with their default and a one-line help.

The Python API (:class:`~hpd_fast.distill.HPD`, :func:`~hpd_fast.experts.train_experts`,
:func:`~hpd_fast.evaluate`, :func:`~hpd_fast.run.distill_run`), the ``hpd-fast`` command line
(its options are generated from these fields) and config files (JSON or TOML, read into these
dataclasses) all take their defaults from here.

A whole ``hpd-fast distill`` run is a :class:`RunConfig`::

    RunConfig
      data:      DataConfig       which dataset, where, at which resolution
      generator: GeneratorConfig  the staged generator
      generator_train: GeneratorTrainConfig  training one (--generator auto)
      experts:   ExpertConfig     expert trajectories (trajectory matching)
      hpd:       HPDConfig        the H-PD loop
        mtt:     MTTConfig        trajectory matching
        match:   MatchConfig      distribution / gradient matching
        select:  SelectConfig     the choice of stage and iterate (CRFD)
      eval:      EvalConfig       evaluation of the distilled set

Presets are named :class:`RunConfig` instances (:data:`PRESETS`, :func:`preset`): ``default``
(the dataclass defaults), ``digits`` (the main job: small and fast, for the embedded digits)
and ``hpd-cifar`` / ``hpd-imagenet`` (the published H-PD settings). ``preset="auto"`` picks one
by dataset (:func:`preset_for`).
A resolved configuration is saved with every run (``metrics.json``, ``summary.json``) and can
be fed back (``hpd-fast distill --config metrics.json``, :func:`load_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import operator
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExpertConfig",
    "GeneratorConfig",
    "GeneratorTrainConfig",
    "HPDConfig",
    "MTTConfig",
    "MatchConfig",
    "PRESETS",
    "RunConfig",
    "SOFT_LABELS",
    "SelectConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "preset",
    "preset_for",
    "with_overrides",
]

ALGORITHMS = ("mtt", "dm", "dc")
SOFT_LABELS = ("none", "onehot", "expert")
MTT_MODES = ("exact", "first_order", "unrolled")
SELECTIONS = ("crfd", "eval", "last")
BASELINES = ("random_real", "none")


class ConfigError(ValueError):
    """A setting with a bad value or an unknown name; the message names it (and the file)."""


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its one-line ``help`` and CLI metadata.

    ``meta``: ``flag`` (the long option, default ``--<name>``), ``flags`` (per command, e.g.
    ``{"evaluate": "--epochs"}``), ``minimum`` (ints: ``>= minimum``; floats: 0 means ``>= 0``,
    else ``> 0``), ``choices``, ``none`` (the word that means None on the command line, e.g.
    ``"all"``), ``metavar``, ``cli=False`` (a config-file-only setting), ``shown`` (the default
    as help shows it, when the value alone does not say it).
    """
    meta["help"] = help
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """The real dataset (:func:`hpd_fast.data.load`)."""

    dataset: str = setting(
        "digits", "dataset name (see hpd_fast.data.DATASET_NAMES)", metavar="NAME"
    )
    root: str | None = setting(
        None,
        "local folder of the dataset (CIFAR archives, image folders); not used for digits; "
        "nothing is downloaded",
        metavar="DIR",
        shown="none",
    )
    resolution: int | None = setting(
        None,
        "square image side",
        minimum=1,
        shown="the dataset's own: 8 for digits, 32 for CIFAR, 128 for image folders",
    )
    max_per_class: int | None = setting(
        None, "use at most this many training images per class", minimum=1, shown="all"
    )
    zca: bool = setting(
        False,
        "ZCA-whiten the images with a transform fitted on the training split (MTT's CIFAR "
        "recipe): experts, distillation and evaluation see whitened images, pictures are shown "
        "un-whitened; up to 64x64 RGB",
    )
    zca_regularization: float = setting(
        0.1, "--zca: added to the covariance eigenvalues (MTT / kornia: 0.1)", minimum=1
    )


@dataclass
class GeneratorConfig:
    """The staged generator whose latents H-PD optimises."""

    source: str = setting(
        "pretrained",
        "'pretrained' (the generator shipped for the dataset), 'auto' (the shipped one, else "
        "a ConvGenerator trained once with the --generator-* settings and cached), a "
        "ConvGenerator file or folder (from `hpd-fast generator train` or "
        "hpd_fast.generators.save_generator), or a StyleGAN network pickle (.pkl; needs "
        "--allow-pickle and the official code importable), or 'pixels' "
        "(optimise the images themselves: MTT / DM / DC in pixel space; see "
        "hpd_fast.generators.pixels)",
        flag="--generator",
        metavar="PATH",
    )
    pixel_init: str = setting(
        "real",
        "--generator pixels: initial images: real (random training images of each class) or "
        "noise (standard Gaussian)",
        choices=("real", "noise"),
    )
    allow_pickle: bool = setting(
        False, "allow unpickling a StyleGAN .pkl (runs code from the file: trusted files only)"
    )
    kwargs: dict[str, Any] = setting(
        {},
        "extra arguments of hpd_fast.generators.from_stylegan as JSON, e.g. "
        "'{\"truncation_psi\": 0.7}'",
        flag="--generator-kwargs",
    )


@dataclass
class ExpertConfig:
    """Expert trajectories: networks trained on the real data, parameters kept every epoch.

    The training recipe defaults to the published MTT one (plain SGD 0.01, batch 256, DSA).
    """

    model: str = setting(
        "ConvNet", "expert / student network (see hpd_fast.models.MODEL_NAMES)", metavar="NAME"
    )
    model_kwargs: dict[str, Any] = setting(
        {}, "constructor arguments of the network as JSON, e.g. '{\"width\": 64}'"
    )
    num_experts: int = setting(10, "number of expert networks", minimum=1)
    epochs: int = setting(
        20,
        "training epochs of each expert",
        minimum=1,
        flags={"distill": "--expert-train-epochs", "experts": "--epochs"},
    )
    lr: float = setting(0.01, "experts' SGD learning rate", minimum=1, flag="--expert-lr")
    batch_size: int = setting(256, "experts' minibatch size", minimum=1, flag="--expert-batch-size")
    momentum: float = setting(0.0, "experts' SGD momentum", minimum=0, flag="--expert-momentum")
    weight_decay: float = setting(
        0.0, "experts' SGD weight decay", minimum=0, flag="--expert-weight-decay"
    )
    augment: str | None = setting(
        "dsa",
        "augmentation while training the experts: dsa, none, or a DSA strategy such as "
        "color_crop_cutout_flip_scale_rotate",
        none="none",
    )
    vmap: bool = setting(
        False,
        "train --group-size experts at once with torch.func.vmap (models without buffers; on "
        "the CPU it is slower and needs more memory, see benchmarks/README.md)",
    )
    group_size: int = setting(4, "experts per vmap call", minimum=1)
    path: str | None = setting(
        None,
        "existing expert trajectories (a folder written by `hpd-fast experts` or "
        "hpd_fast.experts.train_experts); otherwise they are trained into the cache if missing",
        flag="--experts",
        metavar="PATH",
        shown="the cache",
    )
    cache_dir: str | None = setting(
        None,
        "cache folder; experts go to <cache-dir>/experts/<dataset>-<size>-<model>-e<epochs>-<hash>",
        metavar="DIR",
        shown="$HPD_FAST_CACHE, else $XDG_CACHE_HOME/hpd_fast or ~/.cache/hpd_fast",
    )


@dataclass
class MTTConfig:
    """Trajectory matching (``algorithm="mtt"``)."""

    syn_steps: int = setting(20, "student steps per iteration", minimum=1)
    expert_epochs: int = setting(3, "expert epochs the student must match", minimum=1)
    max_start_epoch: int | None = setting(
        None,
        "start epochs are drawn from [0, N)",
        minimum=1,
        shown="min(5, expert epochs - expert_epochs + 1)",
    )
    batch_syn: int | None = setting(
        None, "student minibatch", minimum=1, shown="all synthetic images"
    )
    lr_lr: float = setting(1e-6, "learning rate of the learnable student rate", minimum=0)
    lr_teacher: float | None = setting(
        None, "initial student rate", minimum=1, shown="the experts' learning rate"
    )
    mode: str = setting(
        "exact",
        "trajectory-matching gradient: exact (constant memory), first_order (the published "
        "H-PD/GLaD approximation) or unrolled (full autograd graph)",
        choices=MTT_MODES,
    )
    max_snapshots: int | None = setting(
        32,
        "exact/first_order: the most student snapshots stored at once; longer trajectories "
        "rebuild the rest in the backward sweep (same gradients); 'all' stores every one",
        minimum=1,
        none="all",
    )
    num_trajectories: int = setting(
        1,
        "(expert, start epoch) pairs per iteration; the latents' gradient is the average of "
        "their exact gradients (one trajectory at a time: memory as for one; under torchrun "
        "the pairs are dealt out over the processes)",
        minimum=1,
    )


@dataclass
class MatchConfig:
    """Distribution matching (``"dm"``) and gradient matching (``"dc"``)."""

    batch_real: int = setting(64, "real images per class in each DM / DC iteration", minimum=1)
    model: str = setting(
        "ConvNet",
        "the random network of DM / DC (DM uses its embed())",
        flag="--match-model",
        metavar="NAME",
    )
    model_kwargs: dict[str, Any] = setting(
        {}, "constructor arguments of the DM / DC network as JSON", flag="--match-model-kwargs"
    )


@dataclass
class SelectConfig:
    """How the stage and iterate are chosen."""

    method: str = setting(
        "crfd",
        "crfd (class-relevant feature distance), eval (train networks per candidate; slow) "
        "or last (no scoring)",
        choices=SELECTIONS,
        flag="--select",
    )
    every: int = setting(
        10, "score the iterate every N iterations (and at every stage's end)", minimum=1,
        flag="--select-every",
    )  # fmt: skip
    batch: int = setting(
        4, "candidates scored together in one batched CRFD pass", minimum=1, flag="--select-batch"
    )
    crfd_models: int = setting(3, "random networks averaged in the CRFD score", minimum=1)
    crfd_syn_augments: int = setting(
        4, "augmented copies of each synthetic image in the CRFD score", minimum=1
    )
    crfd_real_passes: int = setting(
        1, "augmented passes over the real data for the CRFD class means", minimum=1
    )
    crfd_model: str = setting("ConvNet", "network of the CRFD score", metavar="NAME")
    crfd_model_kwargs: dict[str, Any] = setting(
        {}, "constructor arguments of the CRFD network as JSON"
    )
    eval_kwargs: dict[str, Any] = setting(
        {},
        "select=eval: arguments of hpd_fast.evaluate as JSON (default 3 ConvNets)",
        flag="--select-eval-kwargs",
    )


#: Per-algorithm values of ``iterations_per_stage``, ``lr_w`` and ``lr_f`` for the embedded
#: digits setting (8x8, the shipped generator, ConvNet-2): each step moves the latents by a few
#: percent of their RMS.
DIGITS_PER_ALGORITHM: dict[str, dict[str, float]] = {
    "mtt": {"iterations_per_stage": 25, "lr_w": 10.0, "lr_f": 10.0},
    "dm": {"iterations_per_stage": 30, "lr_w": 0.1, "lr_f": 0.2},
    "dc": {"iterations_per_stage": 30, "lr_w": 0.03, "lr_f": 0.05},
}
_PER_ALGORITHM_KEYS = ("iterations_per_stage", "lr_w", "lr_f")
_TABLES = ("per_algorithm", "pixel_per_algorithm")

#: ``pixel_per_algorithm`` of the digits setting (``--generator pixels``; ``lr_f`` is the image
#: learning rate, ``lr_w`` unused): chosen by a measurement on the embedded digits (IPC 1 and
#: 10, ConvNet-2 evaluation), see hpd_fast.generators.pixels.
DIGITS_PIXEL_PER_ALGORITHM: dict[str, dict[str, float]] = {
    "mtt": {"iterations_per_stage": 100, "lr_w": 0.0, "lr_f": 100.0},
    "dm": {"iterations_per_stage": 200, "lr_w": 0.0, "lr_f": 1.0},
    "dc": {"iterations_per_stage": 100, "lr_w": 0.0, "lr_f": 0.1},
}


@dataclass
class HPDConfig:
    """The H-PD loop (:class:`hpd_fast.distill.HPD`)."""

    ipc: int = setting(1, "images per class", minimum=1)
    algorithm: str = setting(
        "mtt",
        "distillation loss: mtt (trajectory matching), dm (distribution matching), dc "
        "(gradient matching)",
        choices=ALGORITHMS,
    )
    iterations_per_stage: int | None = setting(
        None, "optimiser steps per generator stage", minimum=1, per_algorithm=True
    )
    lr_w: float | None = setting(
        None, "learning rate of the latent code w", minimum=0, per_algorithm=True
    )
    lr_f: float | None = setting(
        None, "learning rate of the feature latents f", minimum=0, per_algorithm=True
    )
    per_algorithm: dict[str, dict[str, float]] = setting(
        DIGITS_PER_ALGORITHM,
        "iterations_per_stage, lr_w and lr_f per algorithm, used where those are not set",
        cli=False,
    )
    pixel_per_algorithm: dict[str, dict[str, float]] = setting(
        DIGITS_PIXEL_PER_ALGORITHM,
        "the same with --generator pixels (lr_f: the image learning rate), in place of "
        "per_algorithm",
        cli=False,
    )
    soft_labels: str = setting(
        "none",
        "learned soft labels (DATM; trajectory matching only): none (hard labels), onehot "
        "(start from one-hot logits) or expert (start from an expert's logits on the initial "
        "images); targets are softmax(logits)",
        choices=SOFT_LABELS,
    )
    lr_y: float = setting(2.0, "--soft-labels: SGD learning rate of the label logits", minimum=0)
    momentum_y: float = setting(0.9, "--soft-labels: SGD momentum of the label logits", minimum=0)
    momentum: float = setting(0.5, "SGD momentum of the latents", minimum=0)
    first_stage: int = setting(1, "first generator stage optimised", minimum=1)
    last_stage: int | None = setting(
        None, "deepest generator stage optimised", minimum=1, shown="the generator's last"
    )
    continue_from: str = setting(
        "best",
        "which iterate of a stage is advanced to the next: best (by the score) or last",
        choices=("best", "last"),
    )
    augment: str | None = setting(
        "dsa",
        "augmentation inside the distillation loss: dsa, none, or a DSA strategy",
        flag="--distill-augment",
        none="none",
    )
    chunk_size: int | None = setting(
        10,
        "images re-rendered per backward chunk ('none': keep the generator graph, more memory)",
        minimum=1,
        none="none",
    )
    checkpoint_every: int | None = setting(
        None,
        "iterations between checkpoints within a stage",
        minimum=1,
        shown="stage boundaries only",
    )
    mtt: MTTConfig = field(default_factory=MTTConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    select: SelectConfig = field(default_factory=SelectConfig)

    def resolved(self, generator: str | None = None) -> HPDConfig:
        """A copy whose ``iterations_per_stage``, ``lr_w`` and ``lr_f`` are numbers (taken from
        ``per_algorithm[algorithm]`` where they are None; from ``pixel_per_algorithm`` when
        ``generator == "pixels"``)."""
        out = copy.deepcopy(self)
        tables = out.pixel_per_algorithm if generator == "pixels" else out.per_algorithm
        table = tables.get(out.algorithm)
        for key in _PER_ALGORITHM_KEYS:
            if getattr(out, key) is None:
                if table is None or key not in table:
                    raise ConfigError(
                        f"hpd.{key} is not set and hpd."
                        f"{'pixel_per_algorithm' if generator == 'pixels' else 'per_algorithm'}"
                        f" has no value of it for algorithm {out.algorithm!r}"
                    )
                value = table[key]
                setattr(out, key, int(value) if key == "iterations_per_stage" else float(value))
        return out


@dataclass
class EvalConfig:
    """Evaluation: networks trained from scratch on the set, tested on the real test split."""

    models: list[str] = setting(
        ["ConvNet"],
        "networks trained on the set (comma separated): ConvNet, ResNet18, VGG11, AlexNet, ...",
        flags={"distill": "--eval-models", "evaluate": "--models"},
        metavar="NAMES",
    )
    num_eval: int = setting(5, "networks trained per architecture", minimum=1)
    epochs: int = setting(
        300,
        "training epochs per network",
        minimum=1,
        flags={"distill": "--eval-epochs", "evaluate": "--epochs"},
    )
    lr: float = setting(
        0.01,
        "peak learning rate (SGD, warm-up then cosine)",
        minimum=1,
        flags={"distill": "--eval-lr", "evaluate": "--lr"},
    )
    batch_size: int = setting(
        256,
        "minibatch size",
        minimum=1,
        flags={"distill": "--eval-batch-size", "evaluate": "--batch-size"},
    )
    momentum: float = setting(
        0.9,
        "SGD momentum",
        minimum=0,
        flags={"distill": "--eval-momentum", "evaluate": "--momentum"},
    )
    weight_decay: float = setting(
        5e-4,
        "SGD weight decay",
        minimum=0,
        flags={"distill": "--eval-weight-decay", "evaluate": "--weight-decay"},
    )
    augment: str | None = setting(
        "dsa",
        "augmentation of every minibatch: dsa, none, or a DSA strategy",
        flags={"distill": "--eval-augment", "evaluate": "--augment"},
        none="none",
    )
    baseline: str = setting(
        "random_real",
        "also train on IPC random real images per class (random_real) or not (none)",
        choices=BASELINES,
        flags={"distill": "--eval-baseline", "evaluate": "--baseline"},
    )
    enabled: bool = setting(True, "evaluate the distilled set", flags={"distill": "--eval"})


def _gen(name: str) -> dict[str, Any]:
    """Flags of a :class:`GeneratorTrainConfig` field: ``--generator-<name>`` in ``distill``,
    ``--<name>`` in ``hpd-fast generator train``."""
    return {"flag": f"--generator-{name}", "flags": {"generator": f"--{name}"}}


@dataclass
class GeneratorTrainConfig:
    """Training a ConvGenerator for a dataset (``hpd-fast generator train``; ``distill
    --generator auto`` when none ships). The defaults made the shipped digits generator."""

    epochs: int = setting(80, "passes over the training images", minimum=1, **_gen("epochs"))
    batch_size: int = setting(
        64, "minibatch size (capped at the number of images)", minimum=1, **_gen("batch-size")
    )
    lr: float = setting(5e-4, "Adam learning rate of both networks", minimum=1, **_gen("lr"))
    latent_dim: int = setting(32, "size of z and w", minimum=1, **_gen("latent-dim"))
    width: int = setting(32, "channels of every synthesis stage", minimum=1, **_gen("width"))
    d_width: int = setting(32, "discriminator channels", minimum=1, **_gen("d-width"))
    num_stages: int | None = setting(
        None,
        "synthesis stages",
        minimum=2,
        shown="doublings + 2: 4 for 8x8 and 16x16, 5 for 32x32",
        **_gen("stages"),
    )
    cond_weight: float = setting(
        0.1, "weight of the auxiliary classification loss", minimum=0, **_gen("cond-weight")
    )
    diversity_weight: float = setting(
        0.2, "weight of the mode-seeking term", minimum=0, **_gen("diversity-weight")
    )
    ema_decay: float = setting(
        0.999, "decay of the generator weight average kept", minimum=0, **_gen("ema-decay")
    )
    seed: int = setting(0, "seed of the generator's training", minimum=0, **_gen("seed"))
    checkpoint_every: int = setting(
        200, "steps between resumable checkpoints", minimum=1, **_gen("checkpoint-every")
    )


@dataclass
class RunConfig:
    """A whole ``hpd-fast distill`` run (:func:`hpd_fast.run.distill_run`)."""

    preset: str = setting(
        "auto",
        "named settings (default, digits, hpd-cifar, hpd-imagenet, hpd-stylegan-xl) under "
        "every other option; "
        "auto: digits for the embedded digits, hpd-cifar for CIFAR-10/100, hpd-imagenet for "
        "ImageNet subsets, default otherwise",
        metavar="NAME",
    )
    seed: int = setting(0, "seed of everything random", minimum=0)
    out: str | None = setting(
        None, "output folder", metavar="DIR", shown="runs/<dataset>-ipc<ipc>-<algorithm>"
    )
    overwrite: bool = setting(
        False,
        "discard an existing H-PD checkpoint in the output folder (otherwise a run with the "
        "same settings resumes from it)",
    )
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    generator_train: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    hpd: HPDConfig = field(default_factory=HPDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def out_dir(self) -> Path:
        """``out``, or ``runs/<dataset>-ipc<ipc>-<algorithm>``."""
        if self.out:
            return Path(self.out)
        return Path(f"runs/{self.data.dataset}-ipc{self.hpd.ipc}-{self.hpd.algorithm}")


# ------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------


def _digits() -> RunConfig:
    # The main job (`hpd-fast distill` with no arguments): the whole job, experts included,
    # in well under a minute of 2-core CPU time.
    cfg = RunConfig(preset="digits")
    cfg.experts.num_experts = 5
    cfg.experts.epochs = 8  # >= expert_epochs (3) + the largest start epoch (5)
    cfg.hpd.mtt.syn_steps = 10
    cfg.hpd.per_algorithm["mtt"]["iterations_per_stage"] = 20
    return cfg


def _published(name: str, dataset: str) -> RunConfig:
    # The published H-PD settings with StyleGAN-XL (ConvNet students, trajectory matching with
    # the published MTT experts: 100 experts x 50 epochs).
    cfg = RunConfig(preset=name)
    cfg.data.dataset = dataset
    cfg.experts.num_experts = 100
    cfg.experts.epochs = 50
    # Trajectory matching as the H-PD code sets it: 20 student steps matched against 3 expert
    # epochs from a start epoch below 5, lr_lr 1e-6, 100 iterations per layer, lr_w 10 and
    # lr_img (for f) 1e4. DM / DC: the rates of its DM / DC scripts, 100 iterations per layer.
    cfg.hpd.mtt.syn_steps = 20
    cfg.hpd.mtt.expert_epochs = 3
    cfg.hpd.mtt.max_start_epoch = 5
    cfg.hpd.mtt.lr_lr = 1e-6
    cfg.hpd.per_algorithm = {
        "mtt": {"iterations_per_stage": 100, "lr_w": 10.0, "lr_f": 10000.0},
        "dm": {"iterations_per_stage": 100, "lr_w": 0.01, "lr_f": 10.0},
        "dc": {"iterations_per_stage": 100, "lr_w": 0.001, "lr_f": 1.0},
    }
    # --generator pixels: the image rates of the published pixel-space code, which optimises
    # images with SGD (momentum 0.5) as the loop does. MTT: lr_img 1000 (distill.py's default
    # and its README commands for CIFAR-100 / ImageNet subsets, and CIFAR-10 IPC 1 in its
    # hyper-parameter table; CIFAR-10 IPC 10 uses 100: pass --lr-f 100), 5000 iterations.
    # DM: lr_img 1, 20000 iterations; DC: lr_img 0.1, 1000 iterations (the DC/DM code of
    # VICO-UoE/DatasetCondensation).
    cfg.hpd.pixel_per_algorithm = {
        "mtt": {"iterations_per_stage": 5000, "lr_w": 0.0, "lr_f": 1000.0},
        "dm": {"iterations_per_stage": 20000, "lr_w": 0.0, "lr_f": 1.0},
        "dc": {"iterations_per_stage": 1000, "lr_w": 0.0, "lr_f": 0.1},
    }
    cfg.eval.models = ["ConvNet", "ResNet18", "VGG11", "AlexNet"]
    cfg.eval.epochs = 1000
    return cfg


def _hpd_stylegan_xl() -> RunConfig:
    # H-PD's layer range on StyleGAN-XL: stage 1 is the Fourier-feature input, which H-PD never
    # optimises; H-PD's layer k is stage k + 1 and it stops at layer 9
    # (docs/stylegan_layers.md).
    cfg = _published("hpd-stylegan-xl", "imagenette")
    cfg.hpd.first_stage = 2
    cfg.hpd.last_stage = 10
    return cfg


#: Named settings. ``preset(name)`` returns a fresh copy.
PRESETS: dict[str, typing.Callable[[], RunConfig]] = {
    "default": lambda: RunConfig(preset="default"),
    "digits": _digits,
    "hpd-cifar": lambda: _published("hpd-cifar", "cifar10"),
    "hpd-imagenet": lambda: _published("hpd-imagenet", "imagenette"),
    "hpd-stylegan-xl": _hpd_stylegan_xl,
}


def preset_for(dataset: str) -> str:
    """The preset ``preset="auto"`` picks for a dataset name."""
    from hpd_fast.data.subsets import IMAGENET_SUBSETS

    name = str(dataset).lower()
    if name == "digits":
        return "digits"
    if name in ("cifar10", "cifar100"):
        return "hpd-cifar"
    if name in IMAGENET_SUBSETS:
        return "hpd-imagenet"
    return "default"


def preset(name: str, dataset: str | None = None) -> RunConfig:
    """A fresh :class:`RunConfig` of preset ``name`` (``"auto"``: by ``dataset``)."""
    if name == "auto":
        name = preset_for(dataset or "digits")
    if name not in PRESETS:
        raise ConfigError(f"preset must be auto or one of {', '.join(PRESETS)}, got {name!r}")
    cfg = PRESETS[name]()
    if dataset is not None:
        cfg.data.dataset = dataset
    return cfg


# ------------------------------------------------------------------------------------------
# values: checking and conversion
# ------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``(inner type, allows None)`` of ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def check_value(f: dataclasses.Field, tp: Any, value: Any, where: str) -> Any:
    """``value`` for field ``f`` (type ``tp``) from Python, JSON or TOML; ``ConfigError``
    naming ``where`` when it does not fit."""
    inner, optional = _split_optional(tp)
    meta = f.metadata
    if value is None or (meta.get("none") and value == meta["none"]):
        if optional:
            return None
        raise ConfigError(f"{where}: must not be empty")
    base = typing.get_origin(inner) or inner
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value
    if base is int:
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise ConfigError(f"{where}: must be an integer, got {value!r}") from None
        lo = meta.get("minimum")
        if lo is not None and value < lo:
            raise ConfigError(f"{where}: must be an integer >= {lo}, got {value}")
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        value = float(value)
        lo = meta.get("minimum")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        if lo == 0 and value < 0:
            raise ConfigError(f"{where}: must be a finite number >= 0, got {value!r}")
        if lo is not None and lo != 0 and value <= 0:
            raise ConfigError(f"{where}: must be a finite number > 0, got {value!r}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {value!r}")
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{where}: invalid choice {value!r} (choose from {', '.join(choices)})"
            )
        return value
    if base is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{where}: must be a non-empty list, got {value!r}")
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: must be a list of names, got {value!r}")
        return list(value)
    if base is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: must be a table / JSON object, got {value!r}")
        try:
            return json.loads(json.dumps(dict(value)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: must be JSON-serialisable ({exc})") from None
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")  # pragma: no cover


def sections(cls: type) -> dict[str, type]:
    """The nested dataclass fields of ``cls``: ``{name: dataclass}``."""
    hints = _hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints[f.name])
    }


def leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every setting of ``cls`` and its sections: ``(dotted path, field, type)``."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaves(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f, tp))
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-able nested dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _apply(obj: Any, data: Mapping[str, Any], where: str, path: str) -> None:
    cls = type(obj)
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        f = names.get(norm)
        dotted = f"{path}{norm}"
        if f is None:
            valid = ", ".join(sorted(names))
            raise ConfigError(f"{where}: unknown key {path + str(key)!r} (valid: {valid})")
        tp = hints[norm]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {dotted!r} must be a table of settings")
            _apply(getattr(obj, norm), value, where, f"{dotted}.")
        elif norm in _TABLES:  # merged: a file may set one value of one algorithm
            table = copy.deepcopy(getattr(obj, norm))
            for alg, values in _check_per_algorithm(value, f"{where}: {dotted!r}").items():
                table.setdefault(alg, {}).update(values)
            setattr(obj, norm, table)
        else:
            setattr(obj, norm, check_value(f, tp, value, f"{where}: key {dotted!r}"))


def _check_per_algorithm(value: Any, where: str) -> dict[str, dict[str, float]]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table of algorithms")
    out: dict[str, dict[str, float]] = {}
    for alg, table in value.items():
        if alg not in ALGORITHMS or not isinstance(table, Mapping):
            raise ConfigError(f"{where}: {alg!r} must be one of {ALGORITHMS} holding a table")
        out[alg] = {}
        for key, v in table.items():
            if key not in _PER_ALGORITHM_KEYS:
                raise ConfigError(f"{where}.{alg}: unknown key {key!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"{where}.{alg}.{key}: must be a number >= 0, got {v!r}")
            out[alg][key] = v
    return out


def apply_overrides(cfg: Any, data: Mapping[str, Any], where: str = "settings") -> Any:
    """Set nested settings from a mapping (``{"hpd": {"ipc": 10}}``), in place; unknown keys
    and bad values raise :class:`ConfigError` naming them. Returns ``cfg``."""
    _apply(cfg, data, where, "")
    return cfg


def config_from_dict(cls: type, data: Mapping[str, Any], where: str = "settings") -> Any:
    """A ``cls`` built from a nested mapping; a :class:`RunConfig` starts from its preset."""
    if cls is RunConfig:
        name = data.get("preset", "auto")
        dataset = (
            (data.get("data") or {}).get("dataset")
            if isinstance(data.get("data"), Mapping)
            else None
        )
        base = preset(name if isinstance(name, str) else "auto", dataset)
        return apply_overrides(base, data, where)
    return apply_overrides(cls(), data, where)


#: Keyword names of :class:`~hpd_fast.distill.HPD` that differ from the field they set.
_HPD_ALIASES = {
    "mtt_mode": "mtt.mode",
    "select_every": "select.every",
    "select_batch": "select.batch",
}


def _hpd_paths() -> dict[str, str]:
    """Override name -> dotted field path within :class:`HPDConfig` (leaf names are unique)."""
    out = {}
    for path, _, _ in leaves(HPDConfig):
        out.setdefault(path.rsplit(".", 1)[-1], path)
    out.update(_HPD_ALIASES)
    return out


def with_overrides(config: HPDConfig, overrides: Mapping[str, Any]) -> HPDConfig:
    """A copy of ``config`` with single settings changed by name (``syn_steps=10``,
    ``select="last"``, ``mtt_mode="first_order"``); bad names and values raise
    :class:`ConfigError` naming them. ``augment`` may also be a DSA instance or a callable
    ``augment(x, seed)``."""
    out = copy.deepcopy(config)
    paths = _hpd_paths()
    for name, value in overrides.items():
        path = "select.method" if name == "select" else paths.get(name)
        if path is None:
            raise ConfigError(
                f"unknown setting {name!r}; valid: {', '.join(sorted(paths))} (see "
                "hpd_fast.config.HPDConfig)"
            )
        *parents, leaf = path.split(".")
        obj = out
        for p in parents:
            obj = getattr(obj, p)
        if leaf == "augment" and value is not None and not isinstance(value, str):
            if not callable(value):
                raise ConfigError(
                    "augment must be 'dsa', a DSA strategy string, a DSA instance, a callable "
                    f"augment(x, seed[, siamese]) or None, got {type(value).__name__}"
                )
            obj.augment = value
            continue
        if leaf in _TABLES:
            setattr(obj, leaf, _check_per_algorithm(value, leaf))
            continue
        f = next(f for f in dataclasses.fields(obj) if f.name == leaf)
        tp = _hints(type(obj))[leaf]
        setattr(obj, leaf, check_value(f, tp, value, name))
    return out


def read_file(path: str | Path) -> dict[str, Any]:
    """The top-level table of a JSON or TOML file (:class:`ConfigError` naming the file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    text = p.read_bytes()
    suffix = p.suffix.lower()
    errors = []
    if suffix in (".json", ""):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            errors.append(f"not valid JSON ({exc})")
        else:
            if not isinstance(data, dict):
                raise ConfigError(
                    f"config file {str(path)!r} must hold a JSON object at the top level"
                )
            return data
    if suffix in (".toml", ""):
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise ConfigError(
                    "TOML config files need Python >= 3.11 (or `pip install tomli`)"
                ) from None
        try:
            return tomllib.loads(text.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            errors.append(f"not valid TOML ({exc})")
    if not errors:
        raise ConfigError(
            f"config file {str(path)!r}: unknown extension {suffix!r} (use .json or .toml)"
        )
    raise ConfigError(f"config file {str(path)!r} is " + "; ".join(errors))


def saved_config(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The run configuration inside a ``metrics.json`` or ``summary.json`` (or ``data``)."""
    fmt = data.get("format")
    if fmt in ("hpd_fast.metrics", "hpd_fast.DistillResult") and isinstance(
        data.get("run_config"), Mapping
    ):
        return data["run_config"]
    return data


def load_config(path: str | Path) -> RunConfig:
    """A :class:`RunConfig` from a JSON / TOML file, or from a run's ``metrics.json`` /
    ``summary.json`` (its recorded configuration)."""
    return config_from_dict(RunConfig, saved_config(read_file(path)), f"config file {str(path)!r}")


#: The settings shown in :func:`preset_table` (dotted paths; ``hpd.*`` are resolved for mtt).
TABLE_SETTINGS = (
    "data.dataset",
    "hpd.ipc",
    "hpd.algorithm",
    "hpd.iterations_per_stage",
    "hpd.lr_w",
    "hpd.lr_f",
    "hpd.mtt.syn_steps",
    "hpd.mtt.expert_epochs",
    "hpd.mtt.max_start_epoch",
    "hpd.mtt.mode",
    "hpd.select.method",
    "hpd.select.every",
    "experts.num_experts",
    "experts.epochs",
    "eval.models",
    "eval.num_eval",
    "eval.epochs",
)


def preset_table(settings: tuple[str, ...] = TABLE_SETTINGS) -> str:
    """A Markdown table of the main settings of every preset (for the README)."""
    names = list(PRESETS)
    rows = ["| setting | " + " | ".join(f"`{n}`" for n in names) + " |"]
    rows.append("|---|" + "---|" * len(names))
    cfgs = {}
    for n in names:
        cfg = PRESETS[n]()
        cfg.hpd = cfg.hpd.resolved()
        cfgs[n] = cfg
    for path in settings:
        cells = []
        for n in names:
            value: Any = cfgs[n]
            for part in path.split("."):
                value = getattr(value, part)
            if value is None:
                value = "auto"
            elif isinstance(value, list):
                value = ", ".join(value)
            elif isinstance(value, float):
                value = f"{value:g}"
            cells.append(str(value))
        rows.append(f"| `{path}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)
