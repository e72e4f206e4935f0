"""Training expert trajectories: :func:`train_experts`, one expert at a time or several at once
through :func:`torch.func.vmap`.

Training follows the published MTT expert recipe (the defaults of
:class:`hpd_fast.config.ExpertConfig`): plain SGD (lr 0.01, momentum 0, weight decay 0),
minibatches of 256, DSA augmentation on every batch, cross-entropy. Everything random is
derived from ``(seed, expert index)``: the initial weights (drawn inside
:func:`torch.random.fork_rng`, so the caller's global RNG state is left as it was), the
minibatch order and one augmentation seed per step (a private :class:`torch.Generator`). Expert
``k`` is therefore the same whatever other experts are trained, in which order, or after an
interruption; calling :func:`train_experts` again with the same ``out`` and settings keeps the
experts already there and trains the rest.

Several experts can train at once through :func:`torch.func.vmap` over stacked parameters
(``vmap=True``; models without buffers only, e.g. the ConvNet with instance norm); both paths
give the same trajectories up to floating-point rounding. It is off by default: on the CPU it
measured slower than one expert at a time (``benchmarks/README.md``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpd_fast._checks import check_float, check_int
from hpd_fast._common import (
    MAX_AUG_SEED,
    Augment,
    data_fingerprint,
    derive_seed,
    logger,
    progress_bar,
    resolve_augment,
    test_accuracy,
)
from hpd_fast._distributed import rank_and_size
from hpd_fast.augment import DSA
from hpd_fast.config import ExpertConfig
from hpd_fast.data.dataset import DistillData
from hpd_fast.experts.format import (
    _COMPATIBLE_KEYS,
    FORMAT,
    VERSION,
    _config_diff,
    _read_expert,
    _save_expert,
    expert_path,
)
from hpd_fast.experts.trajectories import Experts
from hpd_fast.models import MODEL_NAMES, get_model
from hpd_fast.params import flatten_params, load_flat_params_, param_layout

__all__ = ["train_experts"]

# Every default of train_experts is ExpertConfig's.
_DEFAULTS = ExpertConfig()


def _sgd_update_(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor | None],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """torch.optim.SGD's rule (dampening 0, no Nesterov), in place, on plain tensors.

    Shared by the sequential and the vmap paths so both do the same per-element arithmetic.
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g.add(p, alpha=weight_decay) if weight_decay else g
        if momentum:
            if bufs[i] is None:
                bufs[i] = d.clone()
            else:
                bufs[i].mul_(momentum).add_(d)  # type: ignore[union-attr]
            d = bufs[i]  # type: ignore[assignment]
        p.sub_(d, alpha=lr)


class _Stream:
    """The data stream of one expert: epoch permutations and per-step augmentation seeds."""

    def __init__(self, seed: int, index: int) -> None:
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(derive_seed(seed, index, "train"))

    def epoch(self, n: int, batch_size: int) -> list[tuple[Tensor, int]]:
        order = torch.randperm(n, generator=self.gen)
        return [
            (idx, int(torch.randint(0, MAX_AUG_SEED, (), generator=self.gen)))
            for idx in order.split(batch_size)
        ]


def _init_net(
    name: str, data: DistillData, kwargs: Mapping[str, Any], seed: int, index: int
) -> nn.Module:
    """Expert ``index``'s initial network, on the CPU, from a forked (then restored) RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, index, "init"))
        return get_model(name, data.channels, data.num_classes, data.im_size, **kwargs)


def _batch(
    x: Tensor, y: Tensor, idx: Tensor, aug_seed: int, augment: Augment | None
) -> tuple[Tensor, Tensor]:
    idx = idx.to(x.device)
    xb, yb = x.index_select(0, idx), y.index_select(0, idx)
    if augment is not None:
        xb = augment(xb, aug_seed)
    return xb, yb


def _train_sequential(
    net: nn.Module,
    stream: _Stream,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    augment: Augment | None,
    tick: Callable[[float], None],
) -> tuple[Tensor, Tensor]:
    """Train one expert; returns (trajectory [epochs + 1, P], mean train loss per epoch [epochs])."""
    params = [p for _, p in net.named_parameters()]
    bufs: list[Tensor | None] = [None] * len(params)
    traj = [flatten_params(net).cpu()]
    losses = []
    net.train()
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx, aug_seed in stream.epoch(x.shape[0], batch_size):
            xb, yb = _batch(x, y, idx, aug_seed, augment)
            loss = F.cross_entropy(net(xb), yb)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                _sgd_update_(params, list(grads), bufs, lr, momentum, weight_decay)
            total += float(loss.detach()) * yb.shape[0]
            count += yb.shape[0]
        traj.append(flatten_params(net).cpu())
        losses.append(total / count)
        tick(losses[-1])
    return torch.stack(traj), torch.tensor(losses, dtype=torch.float32)


def _train_vmap(
    nets: list[nn.Module],
    streams: list[_Stream],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    augment: Augment | None,
    tick: Callable[[float], None],
) -> tuple[list[Tensor], list[Tensor]]:
    """Train G experts at once: vmap over stacked parameters and per-expert minibatches."""
    from torch.func import functional_call, grad_and_value, vmap

    g = len(nets)
    names = [n for n, _ in nets[0].named_parameters()]
    stacked = [
        torch.stack([dict(net.named_parameters())[n].detach() for net in nets]).clone()
        for n in names
    ]
    base = nets[0]
    base.train()

    def loss_fn(flat: tuple[Tensor, ...], xb: Tensor, yb: Tensor) -> Tensor:
        logits = functional_call(base, dict(zip(names, flat)), (xb,))
        return F.cross_entropy(logits, yb)

    step = vmap(grad_and_value(loss_fn), in_dims=(0, 0, 0))

    def flat_rows() -> Tensor:
        return torch.cat([t.reshape(g, -1) for t in stacked], dim=1).cpu()

    bufs: list[Tensor | None] = [None] * len(stacked)
    traj = [flat_rows()]
    losses = []
    for _ in range(epochs):
        plans = [s.epoch(x.shape[0], batch_size) for s in streams]
        total = torch.zeros(g, dtype=torch.float64)
        for steps in zip(*plans):
            batches = [_batch(x, y, idx, seed, augment) for idx, seed in steps]
            xb = torch.stack([b[0] for b in batches])
            yb = torch.stack([b[1] for b in batches])
            grads, loss = step(tuple(stacked), xb, yb)
            _sgd_update_(stacked, list(grads), bufs, lr, momentum, weight_decay)
            total += loss.detach().double().cpu() * yb.shape[1]
        traj.append(flat_rows())
        losses.append(total / x.shape[0])
        tick(float(losses[-1].mean()))
    rows = torch.stack(traj, dim=1)  # [G, epochs + 1, P]
    loss_rows = torch.stack(losses, dim=1).float()  # [G, epochs]
    # Leave the final parameters in the modules (used for the test accuracy).
    for k, net in enumerate(nets):
        load_flat_params_(net, rows[k, -1])
    return list(rows.unbind(0)), list(loss_rows.unbind(0))


def _vmap_ok(net: nn.Module) -> bool:
    """vmap trains stacked parameters functionally; modules with buffers (BatchNorm running
    statistics, updated in place during training) cannot be batched that way."""
    return next(iter(net.buffers()), None) is None


def _vmap_probe(net: nn.Module, data: DistillData) -> None:
    """Run one vmapped gradient on two images; raise ValueError if the model's operators do
    not support torch.func transforms (e.g. a custom autograd op without vmap rules)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach().unsqueeze(0) for n, p in net.named_parameters()}
    x = data.train_images[:2].cpu().unsqueeze(0)
    y = data.train_labels[:2].cpu().unsqueeze(0)

    def loss_fn(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, p, (xb,)), yb)

    try:
        vmap(grad(loss_fn))(params, x, y)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"vmap=True: the model does not support torch.func.vmap ({first}); use vmap=False"
            + (" or model_kwargs fused=False" if getattr(net, "fused", False) else "")
        ) from None


def train_experts(
    dataset: DistillData,
    model: str = _DEFAULTS.model,
    num_experts: int = _DEFAULTS.num_experts,
    epochs: int = _DEFAULTS.epochs,
    lr: float = _DEFAULTS.lr,
    batch_size: int = _DEFAULTS.batch_size,
    augment: DSA | Augment | str | type[DSA] | None = _DEFAULTS.augment,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    momentum: float = _DEFAULTS.momentum,
    weight_decay: float = _DEFAULTS.weight_decay,
    vmap: bool = _DEFAULTS.vmap,
    group_size: int = _DEFAULTS.group_size,
    device: torch.device | str | None = None,
    on_expert: Callable[[int, Path | None], None] | None = None,
    group: Any = None,
) -> Experts:
    """Train ``num_experts`` networks on the real training split and keep their trajectories.

    The defaults are those of :class:`hpd_fast.config.ExpertConfig`;
    :func:`hpd_fast.experts.cached_experts` trains from such a config into the cache.

    Args:
        dataset: the real data (:func:`hpd_fast.data.load`); all training images are used.
        model: a name of :data:`hpd_fast.models.MODEL_NAMES` ("ConvNet": the usual student).
        num_experts: experts K >= 1 (expert k is seeded from ``(seed, k)``).
        epochs: training epochs E >= 1 per expert; trajectories have E + 1 rows.
        lr, momentum, weight_decay: plain SGD (defaults 0.01, 0, 0 as in the published MTT
            expert code; no learning-rate decay).
        batch_size: minibatch size (the last batch of an epoch may be smaller).
        augment: "dsa" (default) or the class ``DSA`` (its default strategy, one family per
            batch, each image its own parameters), a DSA instance or strategy string, any
            deterministic callable ``f(x, seed)``, or None / "none".
        seed: base seed; see the module docstring.
        out: folder for the safetensors files (created if needed). Experts already there with
            the same settings are kept and not retrained; different settings raise. None: keep
            everything in memory only.
        progress: True: a tqdm bar over all remaining expert-epochs; None (default): the bar
            when stderr is a terminal, otherwise one INFO line per finished expert through
            ``logging.getLogger("hpd_fast")`` ("expert k/K: test accuracy X%, N s"); False:
            neither.
        model_kwargs: constructor arguments of the model (JSON-serialisable), e.g.
            ``{"width": 64}``.
        vmap: train ``group_size`` experts at once with :func:`torch.func.vmap` (models
            without buffers only; a model with buffers raises). Off by default: on the CPU it
            is slower than one expert at a time and needs several times the memory (see
            ``benchmarks/bench_experts.py``); on CUDA it has not been measured yet.
        group_size: experts per vmap call (fixed blocks ``[g * size, (g + 1) * size)``).
        device: where to train (default: the dataset's device); results are stored on the CPU.
        on_expert: called as ``on_expert(index, path_or_None)`` after each expert is finished
            (and saved); an exception raised there stops the run, keeping the saved experts.
        group: a ``torch.distributed`` process group whose ranks share the work: rank ``r`` of
            ``W`` trains the missing experts ``k`` with ``k % W == r`` (with ``vmap``, the blocks
            ``b`` with ``b % W == r``) into ``out``, which every rank must see (required); after
            a barrier each rank loads the others' experts from there. Same experts as one
            process, since expert ``k`` depends only on ``(seed, k)``.

    Returns:
        :class:`Experts` for indices 0 .. K - 1 (trajectories on the CPU, float32).

    Raises:
        ValueError: bad arguments (naming them), an unknown model, or ``out`` holding experts
            made with different settings (the message lists what differs).
    """
    if not isinstance(dataset, DistillData):
        raise ValueError(
            f"dataset must be a DistillData (from hpd_fast.data.load), got {type(dataset).__name__}"
        )
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model name {model!r}; valid names: {', '.join(MODEL_NAMES)}")
    num_experts = check_int("num_experts", num_experts, 1)
    epochs = check_int("epochs", epochs, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    group_size = check_int("group_size", group_size, 1)
    seed = check_int("seed", seed, 0)
    lr = check_float("lr", lr)
    momentum = check_float("momentum", momentum, allow_zero=True)
    weight_decay = check_float("weight_decay", weight_decay, allow_zero=True)
    kwargs = dict(model_kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise ValueError(f"model_kwargs must be JSON-serialisable: {exc}") from None
    aug, aug_desc = resolve_augment(augment)
    dev = torch.device(device) if device is not None else dataset.train_images.device

    probe = _init_net(model, dataset, kwargs, seed, 0)
    layout = param_layout(probe)
    if not layout:
        raise ValueError(f"model {model!r} has no parameters")
    use_vmap = bool(vmap)
    if use_vmap and not _vmap_ok(probe):
        buffers = [n for n, _ in probe.named_buffers()][:3]
        raise ValueError(
            f"vmap=True needs a model without buffers; {model} with {kwargs} has {buffers}... "
            "(e.g. BatchNorm running statistics): use vmap=False"
        )
    if use_vmap:
        _vmap_probe(probe, dataset)
    config: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "name": model,
            "channel": dataset.channels,
            "num_classes": dataset.num_classes,
            "im_size": list(dataset.im_size),
            "kwargs": kwargs,
        },
        "dataset": {
            "name": dataset.name,
            "num_train": len(dataset),
            "channels": dataset.channels,
            "num_classes": dataset.num_classes,
            "im_size": list(dataset.im_size),
            "mean": list(dataset.mean),
            "std": list(dataset.std),
            "fingerprint": data_fingerprint(dataset),
            # only when whitened, so that earlier expert files stay compatible
            **({"zca": dataset.zca.identity()} if dataset.zca is not None else {}),
        },
        "training": {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "augment": aug_desc,
            "seed": seed,
        },
        "layout": [[n, list(s)] for n, s in layout],
        "num_params": sum(math.prod(s) for _, s in layout),
    }

    rank, world = rank_and_size(group)
    if group is not None and out is None:
        raise ValueError("out: training experts over a process group needs a shared folder")
    trajs: dict[int, Tensor] = {}
    accs: dict[int, float | None] = {}
    out_dir = None if out is None else Path(out)
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"out must be a folder, but {str(out_dir)!r} is a file")
        out_dir.mkdir(parents=True, exist_ok=True)
        for k in range(num_experts):
            p = expert_path(out_dir, k)
            if not p.is_file():
                continue
            stored, traj, acc = _read_expert(p)
            diff = _config_diff(
                {key: stored.get(key) for key in _COMPATIBLE_KEYS},
                {key: config[key] for key in _COMPATIBLE_KEYS},
            )
            if diff:
                raise ValueError(
                    f"{str(out_dir)!r} holds experts trained with different settings ("
                    + "; ".join(diff[:6])
                    + "); use another out folder or delete it"
                )
            trajs[k], accs[k] = traj, acc

    if use_vmap:
        mine = {k for k in range(num_experts) if (k // group_size) % world == rank}
    else:
        mine = {k for k in range(num_experts) if k % world == rank}
    todo = [k for k in range(num_experts) if k not in trajs and k in mine]
    x = dataset.train_images.to(dev)
    y = dataset.train_labels.to(dev)
    bar, log_lines = progress_bar(
        progress, total=len(todo) * epochs, desc="experts", unit="epoch", disable=not todo
    )

    def finish(k: int, net: nn.Module, traj: Tensor, losses: Tensor, t0: float) -> None:
        acc = test_accuracy(net, dataset, dev)
        trajs[k], accs[k] = traj, acc
        path = None
        if out_dir is not None:
            path = expert_path(out_dir, k)
            _save_expert(path, traj, losses, config, k, acc)
        bar.set_postfix_str(f"expert {k}: test {acc:.1f}%")
        if log_lines:
            logger.info(
                "expert %d/%d: test accuracy %.1f%%, %.1f s",
                k + 1,
                num_experts,
                acc,
                time.perf_counter() - t0,
            )
        if on_expert is not None:
            on_expert(k, path)

    def ticker(n: int) -> Callable[[float], None]:
        def tick(loss: float) -> None:  # one epoch of n experts done
            bar.update(n)
            bar.set_postfix_str(f"loss {loss:.3f}")

        return tick

    common = dict(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        augment=aug,
    )
    with bar:
        if use_vmap:
            # Fixed blocks; a block with any missing expert is trained whole (the others are
            # recomputed identically and not rewritten).
            for start in range(0, num_experts, group_size):
                block = list(range(start, min(start + group_size, num_experts)))
                missing = [k for k in block if k not in trajs and k in mine]
                if not missing:
                    continue
                t0 = time.perf_counter()  # a block's experts share its time
                nets = [_init_net(model, dataset, kwargs, seed, k).to(dev) for k in block]
                streams = [_Stream(seed, k) for k in block]
                rows, losses = _train_vmap(
                    nets,
                    streams,
                    x,
                    y,
                    tick=ticker(len(missing)),
                    **common,  # type: ignore[arg-type]
                )
                for k, net, traj, loss in zip(block, nets, rows, losses):
                    if k in missing:
                        finish(k, net, traj.clone(), loss.clone(), t0)
        else:
            for k in todo:
                t0 = time.perf_counter()
                net = _init_net(model, dataset, kwargs, seed, k).to(dev)
                traj, losses = _train_sequential(
                    net,
                    _Stream(seed, k),
                    x,
                    y,
                    tick=ticker(1),
                    **common,  # type: ignore[arg-type]
                )
                finish(k, net, traj, losses, t0)

    if group is not None:
        torch.distributed.barrier(group)  # every rank has written its share
        for k in range(num_experts):
            if k not in trajs:
                _, trajs[k], accs[k] = _read_expert(expert_path(out_dir, k))
    order = list(range(num_experts))
    return Experts(
        [trajs[k] for k in order],
        config,
        indices=order,
        test_accuracy=[accs[k] for k in order],
        path=out_dir,
    )
