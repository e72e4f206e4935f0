"""Evaluate a synthetic set: train fresh networks on it, report their test accuracy.

The protocol of the dataset-distillation literature: for each architecture, ``num_eval``
networks are initialised from scratch, trained on the synthetic images only (SGD with momentum,
weight decay, DSA augmentation at every step, cross-entropy), and scored on the real test set.
The mean and standard deviation of their accuracies are reported, optionally next to the same
protocol run on ``ipc`` random real training images per class.

All randomness is explicit: network ``r`` of architecture ``name`` gets an initialisation seed
and a training seed derived from ``(seed, name, r)``; the training seed drives a private
``torch.Generator`` (minibatch order and one DSA seed per step). The global RNG is left as it
was. The random-real baseline reuses the same seeds, so each baseline network starts from the
same weights and sees the same augmentation stream as its synthetic-set counterpart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpd_fast._checks import check_int
from hpd_fast._common import (
    Augment,
    derive_seed,
    logger,
    progress_bar,
    resolve_augment,
    test_accuracy,
)
from hpd_fast._distributed import rank_and_size
from hpd_fast.augment import DSA
from hpd_fast.config import EvalConfig
from hpd_fast.data.dataset import DistillData
from hpd_fast.models import MODEL_NAMES, get_model

__all__ = ["BASELINES", "EVAL_MODELS", "evaluate", "train_and_test"]

#: The defaults of :func:`evaluate` (one source: :class:`hpd_fast.config.EvalConfig`).
_DEFAULTS = EvalConfig()

# Architectures of the cross-architecture table; any name of hpd_fast.models.MODEL_NAMES works.
EVAL_MODELS = ("ConvNet", "ResNet18", "VGG11", "AlexNet")
BASELINES = ("random_real",)


def _lr_at(step: int, total: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay towards 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def train_and_test(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: DistillData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    augment: Augment | None,
    seed: int,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    warmup: float = 0.05,
    test_batch_size: int = 1024,
    on_epoch: Callable[[], None] | None = None,
) -> float:
    """Train ``net`` in place on (images, labels) and return its test accuracy in percent.

    Args:
        net: a freshly initialised network on the device of ``images``.
        images: float32 [M, C, H, W] (already on the training device).
        labels: int64 [M] class indices, or float [M, K] soft labels (cross-entropy against
            the given probabilities).
        epochs: passes over the M images, in minibatches of ``batch_size`` (the last one may be
            smaller); the order is reshuffled every epoch.
        augment: ``augment(x, seed)`` applied to every minibatch, or None.
        seed: drives a private generator for the minibatch order and one augmentation seed
            per step.
        warmup: fraction of all steps spent in the linear warm-up of the learning rate; the
            rest follow a cosine decay to 0.

    SGD with ``momentum`` and ``weight_decay`` (applied to every parameter).
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    m = images.shape[0]
    steps_per_epoch = math.ceil(m / batch_size)
    total = epochs * steps_per_epoch
    warmup_steps = min(total, round(warmup * total))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    step = 0
    net.train()
    for _ in range(epochs):
        order = torch.randperm(m, generator=gen).to(images.device)
        for idx in order.split(batch_size):
            xb, yb = images.index_select(0, idx), labels.index_select(0, idx)
            aug_seed = int(torch.randint(2**62, (1,), generator=gen))
            if augment is not None:
                xb = augment(xb, aug_seed)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, lr, warmup_steps)
            opt.step()
            step += 1
        if on_epoch is not None:
            on_epoch()
    return test_accuracy(net, dataset, images.device, test_batch_size)


def _check_inputs(
    images: Any, labels: Any, dataset: Any, models: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate the set; returns (images, labels, soft)."""
    if not isinstance(dataset, DistillData):
        raise ValueError(
            f"dataset must be a DistillData (from hpd_fast.data.load), got {type(dataset).__name__}"
        )
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        desc = f"{images.dim()}-D" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a 4-D tensor [M, C, H, W], got {desc}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    expected = (dataset.channels, *dataset.im_size)
    if tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"images have shape [M, {', '.join(map(str, images.shape[1:]))}] but dataset "
            f"{dataset.name!r} has images [N, {', '.join(map(str, expected))}]"
        )
    m, k = images.shape[0], dataset.num_classes
    if m < 1:
        raise ValueError("images must hold at least one image")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.shape[0:1] != (m,):
        raise ValueError(
            f"labels must have {m} entries (one per image), got shape {list(labels.shape)}"
        )
    if labels.dim() == 1:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"hard labels must be an integer tensor [M], got {labels.dtype}")
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            raise ValueError(
                f"labels must lie in [0, {k}) for dataset {dataset.name!r}, got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        soft = False
    elif labels.dim() == 2:
        if labels.shape[1] != k or not labels.is_floating_point():
            raise ValueError(
                f"soft labels must be a float tensor [M, {k}], got {labels.dtype} {list(labels.shape)}"
            )
        if not bool(torch.isfinite(labels).all()):
            raise ValueError("soft labels must be finite")
        soft = True
    else:
        raise ValueError(
            f"labels must be [M] class indices or [M, K] soft labels, got {labels.dim()}-D"
        )
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images must be finite (no NaN/inf)")
    if isinstance(models, str) or not isinstance(models, Sequence) or not models:
        raise ValueError(f"models must be a non-empty sequence of model names, got {models!r}")
    unknown = [name for name in models if name not in MODEL_NAMES]
    if unknown:
        raise ValueError(f"models has unknown name(s) {unknown}; valid: {', '.join(MODEL_NAMES)}")
    return images, labels, soft


def _summary(accs: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs}


def evaluate(
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: DistillData,
    models: Sequence[str] | str = tuple(_DEFAULTS.models),
    num_eval: int = _DEFAULTS.num_eval,
    epochs: int = _DEFAULTS.epochs,
    lr: float = _DEFAULTS.lr,
    batch_size: int = _DEFAULTS.batch_size,
    augment: DSA | Augment | str | type[DSA] | None = _DEFAULTS.augment,
    seed: int = 0,
    baseline: str | None = _DEFAULTS.baseline,
    progress: bool | None = False,
    device: torch.device | str | None = None,
    *,
    momentum: float = _DEFAULTS.momentum,
    weight_decay: float = _DEFAULTS.weight_decay,
    warmup: float = 0.05,
    test_batch_size: int = 1024,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    num_threads: int | None = None,
    group: Any = None,
) -> dict[str, Any]:
    """Train fresh networks on a synthetic set and report their accuracy on the real test set.

    Args:
        images: synthetic images, float [M, C, H, W] in the dataset's normalized space, with
            (C, H, W) equal to the dataset's.
        labels: int64 [M] class indices, or float [M, K] soft labels (K = dataset.num_classes).
        dataset: the real dataset (:func:`hpd_fast.data.load`); its test split is the benchmark.
        models: architecture names (:data:`hpd_fast.models.MODEL_NAMES`, e.g. "ConvNet",
            "ResNet18", "VGG11", "AlexNet"), each built by
            ``get_model(name, C, K, (H, W), **model_kwargs.get(name, {}))``.
        num_eval: networks trained per architecture (each from its own initialisation).
        epochs: passes over the synthetic set; minibatches of ``batch_size`` (a small set is one
            batch, i.e. one step per epoch).
        lr: peak learning rate of SGD (``momentum``, ``weight_decay``), reached after a linear
            warm-up over the first ``warmup`` fraction of the steps, then cosine decay to 0.
        augment: "dsa" (default; :class:`hpd_fast.augment.DSA` with its default strategy) or the
            class ``DSA`` itself, a ``DSA`` instance, any callable ``f(x, seed) -> x``, a DSA
            strategy string (e.g. "color_crop_cutout"), or None / "none" for no augmentation.
            Applied to every minibatch with a fresh seed.
        seed: base seed; network r of architecture ``name`` uses seeds derived from
            (seed, name, r), so results do not depend on which other models are listed.
        baseline: "random_real" (default) also runs the protocol on
            ``dataset.random_real(ipc, seed)`` with ``ipc = max(1, round(M / K))``, with the same
            network seeds; None or "none": the synthetic set only.
        progress: True: a tqdm bar (one tick per training epoch); None: the bar when stderr
            is a terminal, otherwise one INFO line per trained network through
            ``logging.getLogger("hpd_fast")`` (model, set, run r/N, test accuracy); False
            (default): neither.
        device: where to train; default: the device of ``images``.
        test_batch_size: test images scored per forward pass (under no_grad, eval mode).
        model_kwargs: per-architecture constructor arguments, e.g. ``{"ConvNet": {"width": 64}}``.
        num_threads: if given, ``torch.set_num_threads`` for the duration of the call (restored
            afterwards). Tiny sets on small or busy CPUs often run fastest with 1.
        group: a ``torch.distributed`` process group whose ranks share the training runs (run
            ``j`` of the list of (model, set, r) goes to rank ``j % W``); every rank returns
            all the accuracies, the same as one process computes (each run depends on its
            seeds alone). Every rank must call with the same arguments.

    Returns:
        ``{name: {"mean": float, "std": float, "accs": [float] * num_eval}`` for every model
        (accuracy in percent; std is the population std, ddof=0, as in the literature), plus
        ``"random_real": {name: {...}}`` when ``baseline="random_real"``, plus ``"config"``:
        the settings used (models, num_eval, epochs, lr, batch_size, momentum, weight_decay,
        warmup, augment, seed, baseline, baseline_ipc, device, dataset, num_images, ipc,
        soft_labels, seconds).

    Raises:
        ValueError: naming the argument, for images that are not 4-D floating point or whose
            (C, H, W) differ from the dataset's; labels whose count differs from the images' or
            that lie outside [0, K); unknown model names; num_eval, epochs or batch_size < 1;
            an unknown baseline.
    """
    if isinstance(models, str):
        models = (models,)
    images, labels, soft = _check_inputs(images, labels, dataset, models)
    num_eval = check_int("num_eval", num_eval, 1)
    epochs = check_int("epochs", epochs, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    test_batch_size = check_int("test_batch_size", test_batch_size, 1)
    seed = check_int("seed", seed, 0)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}")
    if baseline == "none":
        baseline = None
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"baseline must be None or one of {BASELINES}, got {baseline!r}")
    model_kwargs = dict(model_kwargs or {})
    stray = [k for k in model_kwargs if k not in models]
    if stray:
        raise ValueError(f"model_kwargs names model(s) {stray} that are not in models")
    aug, _ = resolve_augment(augment)
    dev = torch.device(device) if device is not None else images.device

    k = dataset.num_classes
    m = images.shape[0]
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        "synthetic": (
            images.detach().to(dev, torch.float32),
            labels.detach().to(dev, torch.float32 if soft else torch.int64),
        )
    }
    baseline_ipc = None
    if baseline == "random_real":
        baseline_ipc = max(1, round(m / k))
        real_x, real_y = dataset.random_real(baseline_ipc, seed)
        sets["random_real"] = (real_x.to(dev, torch.float32), real_y.to(dev))

    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(check_int("num_threads", num_threads, 1))
    start = time.perf_counter()
    try:
        rank, world = rank_and_size(group)
        jobs = [(name, key, r) for name in models for key in sets for r in range(num_eval)]
        mine = [j for j in range(len(jobs)) if j % world == rank]
        bar, log_lines = progress_bar(
            progress, total=len(mine) * epochs, desc="evaluate", unit="epoch"
        )
        accs_all = torch.zeros(len(jobs), dtype=torch.float64)
        with bar:
            for j in mine:
                name, key, r = jobs[j]
                t0 = time.perf_counter()
                x, y = sets[key]
                kw = dict(model_kwargs.get(name, {}))
                # Initialise on the CPU from a forked RNG: same weights on any device,
                # and the caller's global RNG state is untouched.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive_seed(seed, name, r, "init"))
                    net = get_model(name, dataset.channels, k, dataset.im_size, **kw)
                net = net.to(dev)
                acc = train_and_test(
                    net,
                    x,
                    y,
                    dataset,
                    epochs=epochs,
                    lr=lr,
                    batch_size=batch_size,
                    augment=aug,
                    seed=derive_seed(seed, name, r, "train"),
                    momentum=momentum,
                    weight_decay=weight_decay,
                    warmup=warmup,
                    test_batch_size=test_batch_size,
                    on_epoch=lambda: bar.update(1),
                )
                accs_all[j] = acc
                bar.set_postfix_str(f"{name} {key} run {r + 1}/{num_eval}: {acc:.1f}%")
                if log_lines:
                    logger.info(
                        "evaluate %s %s run %d/%d: test accuracy %.1f%%, %.1f s",
                        name,
                        key,
                        r + 1,
                        num_eval,
                        acc,
                        time.perf_counter() - t0,
                    )
        if group is not None:  # each run was done by exactly one rank: the sum gathers them
            both = accs_all.to(dev if dev.type == "cuda" else "cpu")
            torch.distributed.all_reduce(both, group=group)
            accs_all = both.cpu()
        results: dict[str, dict[str, Any]] = {key: {} for key in sets}
        for name in models:
            for key in sets:
                idx = [j for j, job in enumerate(jobs) if job[:2] == (name, key)]
                results[key][name] = _summary([float(accs_all[j]) for j in idx])
    finally:
        if num_threads is not None:
            torch.set_num_threads(prev_threads)
    seconds = time.perf_counter() - start

    out: dict[str, Any] = dict(results["synthetic"])
    if "random_real" in results:
        out["random_real"] = results["random_real"]
    out["config"] = {
        "models": list(models),
        "num_eval": num_eval,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "warmup": warmup,
        "augment": repr(aug) if aug is not None else None,
        "seed": seed,
        "baseline": baseline,
        "baseline_ipc": baseline_ipc,
        "device": str(dev),
        "dataset": dataset.name,
        "num_images": m,
        "ipc": m / k,
        "soft_labels": soft,
        "model_kwargs": {key: dict(v) for key, v in model_kwargs.items()},
        "seconds": seconds,
    }
    return out
