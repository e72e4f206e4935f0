"""Expert trajectories: networks trained on real data, their flat parameters kept every epoch.

Trajectory matching needs, for a student architecture, many "expert" training runs on the real
dataset: expert ``k`` is a vector of parameters ``θ_k[e]`` (the :func:`hpd_fast.params.flatten_params`
layout) at initialisation (``e = 0``) and after each of ``epochs`` epochs, i.e. a float32
tensor ``[epochs + 1, P]``.

Training follows the published MTT expert recipe: plain SGD (lr 0.01, momentum 0, weight decay
0), minibatches of 256, DSA augmentation on every batch, cross-entropy. Everything random is
derived from ``(seed, expert index)``: the initial weights (drawn inside
:func:`torch.random.fork_rng`, so the caller's global RNG state is left as it was), the
minibatch order and one augmentation seed per step (a private :class:`torch.Generator`). Expert
``k`` is therefore the same whatever other experts are trained, in which order, or after an
interruption.

On disk, a folder holds one safetensors file per expert, ``expert_00000.safetensors``, ...,
each with the tensors ``trajectory`` [epochs + 1, P] (float32) and ``train_loss`` [epochs] and
string metadata: the format and version, the expert index, its final test accuracy and a JSON
``config`` (model name and constructor arguments, dataset name / shape / fingerprint, training
settings, the parameter layout). Files are written atomically (temporary name, then rename), so
an interrupted run leaves only complete experts; calling :func:`train_experts` again with the
same ``out`` and settings keeps them and trains the rest.

Several experts can train at once through :func:`torch.func.vmap` over stacked parameters
(``vmap=True``; models without buffers only, e.g. the ConvNet with instance norm); both paths
give the same trajectories up to floating-point rounding. It is off by default: on the CPU it
measured slower than one expert at a time (``benchmarks/README.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpd_fast._checks import check_float, check_int
from hpd_fast._distributed import rank_and_size
from hpd_fast.augment import DSA
from hpd_fast.data.dataset import DistillData
from hpd_fast.models import MODEL_NAMES, get_model
from hpd_fast.params import Layout, flatten_params, load_flat_params_, param_layout

__all__ = ["FORMAT", "VERSION", "Experts", "expert_path", "load", "train_experts"]

FORMAT = "hpd_fast.experts"
VERSION = 1

#: Augmentation callable: ``augment(x [B, C, H, W], seed: int) -> x'``.
Augment = Callable[[Tensor, int], Tensor]

_FILE_RE = re.compile(r"^expert_(\d+)\.safetensors$")
_MAX_AUG_SEED = 2**31 - 1
# Experts trained together by one vmap call. Blocks have fixed boundaries (experts
# [g * size, (g + 1) * size)), so a resumed run retrains exactly the same blocks.
_DEFAULT_GROUP = 4


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from the parts (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _as_augment(augment: Any) -> tuple[Augment | None, Any]:
    """Resolve ``augment`` to a callable (or None) and a JSON description of it."""
    if augment is None or (isinstance(augment, str) and augment.strip().lower() in ("", "none")):
        return None, None
    if augment is DSA or (isinstance(augment, str) and augment.strip().lower() == "dsa"):
        augment = DSA()
    elif isinstance(augment, str):
        augment = DSA(strategy=augment)  # a strategy string such as "crop_scale_rotate"
    if isinstance(augment, DSA):
        desc = {"type": "DSA", **{k: v for k, v in vars(augment).items() if k != "families"}}
        return augment, desc
    if callable(augment):
        name = getattr(augment, "__qualname__", type(augment).__qualname__)
        return augment, {"type": "callable", "name": f"{type(augment).__module__}.{name}"}
    raise ValueError(
        "augment must be DSA (the class, an instance, 'dsa' or a strategy string), a callable "
        f"f(x, seed), or None, got {type(augment).__name__}"
    )


def _fingerprint(data: DistillData) -> str:
    """A cheap identity of the training split: shape, labels and a strided sample of images."""
    h = hashlib.sha256()
    x, y = data.train_images, data.train_labels
    h.update(repr((data.name, tuple(x.shape))).encode())
    h.update(y.detach().cpu().numpy().tobytes())
    stride = max(1, x.shape[0] // 512)
    h.update(x[::stride].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def expert_path(out: str | os.PathLike[str], index: int) -> Path:
    """File of expert ``index`` inside the folder ``out``: ``out/expert_00042.safetensors``."""
    return Path(out) / f"expert_{index:05d}.safetensors"


# --------------------------------------------------------------------------------------------
# the result object
# --------------------------------------------------------------------------------------------


class _LazyTrajectories(Sequence[Tensor]):
    """Trajectories read from their files on access (nothing kept in memory)."""

    def __init__(self, files: list[Path]) -> None:
        self._files = files

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]  # type: ignore[return-value]
        from safetensors import safe_open

        with safe_open(str(self._files[i]), framework="pt") as f:
            return f.get_tensor("trajectory")

    def rows(self, i: int, rows: Sequence[int]) -> list[Tensor]:
        """Only the given epochs of trajectory ``i`` (each [P]), without reading the rest."""
        from safetensors import safe_open

        with safe_open(str(self._files[i]), framework="pt") as f:
            sl = f.get_slice("trajectory")
            return [sl[r] for r in rows]

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))


class Experts:
    """A set of expert trajectories and everything needed to use them.

    Attributes:
        trajectories: one float32 tensor [epochs + 1, P] per expert (row e: parameters after
            e epochs; row 0: the initialisation). A list, or a lazily reading sequence for
            ``load(..., lazy=True)``.
        indices: the expert index of each trajectory (its seed is derived from it).
        test_accuracy: final test accuracy (percent) of each expert, or None when unknown.
        config: the full JSON-compatible configuration (see :attr:`model_config`,
            :attr:`training`, :attr:`dataset`).
        path: the folder they were read from / written to, or None.
    """

    def __init__(
        self,
        trajectories: Sequence[Tensor],
        config: Mapping[str, Any],
        *,
        indices: Sequence[int] | None = None,
        test_accuracy: Sequence[float | None] | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.trajectories = trajectories
        self.config: dict[str, Any] = json.loads(json.dumps(config))  # a private deep copy
        self.indices = list(range(len(trajectories)) if indices is None else indices)
        self.test_accuracy = (
            [None] * len(trajectories) if test_accuracy is None else list(test_accuracy)
        )
        self.path = None if path is None else Path(path)
        if len(self.indices) != len(trajectories) or len(self.test_accuracy) != len(trajectories):
            raise ValueError("indices and test_accuracy must have one entry per trajectory")

    # --------------------------------------------------------------------------- descriptions

    @property
    def model_config(self) -> dict[str, Any]:
        """``{"name", "channel", "num_classes", "im_size", "kwargs"}`` of the expert network."""
        return dict(self.config["model"])

    @property
    def training(self) -> dict[str, Any]:
        """Training settings: epochs, lr, batch_size, momentum, weight_decay, augment, seed."""
        return dict(self.config["training"])

    @property
    def dataset(self) -> dict[str, Any]:
        """The dataset they were trained on: name, num_train, channels, num_classes, im_size..."""
        return dict(self.config["dataset"])

    @property
    def dataset_name(self) -> str:
        return str(self.config["dataset"]["name"])

    @property
    def lr(self) -> float:
        """The experts' SGD learning rate (the usual initial value of the student's rate)."""
        return float(self.config["training"]["lr"])

    @property
    def epochs(self) -> int:
        """Training epochs per expert; each trajectory has ``epochs + 1`` rows."""
        return int(self.config["training"]["epochs"])

    @property
    def layout(self) -> Layout:
        """(name, shape) of every parameter, in flat-vector order."""
        return [(str(n), tuple(int(s) for s in shape)) for n, shape in self.config["layout"]]

    @property
    def num_params(self) -> int:
        """P, the length of one flat parameter vector."""
        return int(self.config["num_params"])

    def __len__(self) -> int:
        return len(self.trajectories)

    def __repr__(self) -> str:
        m = self.config["model"]
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (
            f"Experts({len(self)} x [{self.epochs + 1}, {self.num_params}], model={m['name']}, "
            f"dataset={self.dataset_name!r}{where})"
        )

    # ---------------------------------------------------------------------------- the student

    def make_student(self, device: torch.device | str | None = None) -> nn.Module:
        """A fresh network with the experts' architecture (weights: expert 0's initialisation
        when available; overwrite them with :func:`hpd_fast.params.load_flat_params_`)."""
        m = self.config["model"]
        net = get_model(
            m["name"], m["channel"], m["num_classes"], tuple(m["im_size"]), **m["kwargs"]
        )
        self.check_student(net)
        if len(self):
            load_flat_params_(net, self.params(0, 0))
        return net if device is None else net.to(device)

    def check_student(self, student: nn.Module | Layout) -> None:
        """Refuse a student whose parameter layout differs from the experts'.

        Args:
            student: a network, or a layout from :func:`hpd_fast.params.param_layout`.

        Raises:
            ValueError: saying what differs (parameter count, first differing name or shape,
                missing or extra parameters) and which model the experts were trained with.
        """
        theirs = self.layout
        mine = (
            param_layout(student)
            if isinstance(student, nn.Module)
            else [(str(n), tuple(int(s) for s in shape)) for n, shape in student]
        )
        if mine == theirs:
            return
        m = self.config["model"]
        p_mine = sum(math.prod(s) for _, s in mine)
        what = [
            f"student has {len(mine)} parameter tensors / P={p_mine}, "
            f"experts have {len(theirs)} / P={self.num_params}"
        ]
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if a != b:
                what.append(
                    f"first difference at tensor {i}: student {a[0]!r} {list(a[1])} vs experts "
                    f"{b[0]!r} {list(b[1])}"
                )
                break
        else:
            longer, who = (mine, "student") if len(mine) > len(theirs) else (theirs, "experts")
            extra = [n for n, _ in longer[min(len(mine), len(theirs)) :]]
            what.append(f"only the {who} have {extra}")
        raise ValueError(
            "student parameter layout does not match the expert trajectories: "
            + "; ".join(what)
            + f". The experts were trained with {m['name']} (channel={m['channel']}, "
            f"num_classes={m['num_classes']}, im_size={tuple(m['im_size'])}, "
            f"kwargs={m['kwargs']}); build the student with Experts.make_student() or train "
            "experts for this student."
        )

    # ---------------------------------------------------------------------------------- access

    def params(self, expert: int, epoch: int) -> Tensor:
        """Flat parameters [P] of expert number ``expert`` (position, not index) after ``epoch``."""
        return self.pair(expert, epoch, 0)[0]

    def pair(self, expert: int, start_epoch: int, expert_epochs: int) -> tuple[Tensor, Tensor]:
        """(θ_start, θ_target) = rows ``start_epoch`` and ``start_epoch + expert_epochs`` [P].

        ``expert`` is a position in ``trajectories`` (0 <= expert < len(self)).
        """
        expert = check_int("expert", expert, 0)
        if expert >= len(self):
            raise ValueError(f"expert must be < {len(self)} (the number of experts), got {expert}")
        start_epoch = check_int("start_epoch", start_epoch, 0)
        expert_epochs = check_int("expert_epochs", expert_epochs, 0)
        end = start_epoch + expert_epochs
        if end > self.epochs:
            raise ValueError(
                f"start_epoch + expert_epochs = {end} exceeds the experts' {self.epochs} epochs"
            )
        if isinstance(self.trajectories, _LazyTrajectories):
            a, b = self.trajectories.rows(expert, [start_epoch, end])
            return a, b
        t = self.trajectories[expert]
        return t[start_epoch], t[end]


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


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
        self.gen.manual_seed(_derive_seed(seed, index, "train"))

    def epoch(self, n: int, batch_size: int) -> list[tuple[Tensor, int]]:
        order = torch.randperm(n, generator=self.gen)
        return [
            (idx, int(torch.randint(0, _MAX_AUG_SEED, (), generator=self.gen)))
            for idx in order.split(batch_size)
        ]


def _init_net(
    name: str, data: DistillData, kwargs: Mapping[str, Any], seed: int, index: int
) -> nn.Module:
    """Expert ``index``'s initial network, on the CPU, from a forked (then restored) RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derive_seed(seed, index, "init"))
        return get_model(name, data.channels, data.num_classes, data.im_size, **kwargs)


def _batch(
    x: Tensor, y: Tensor, idx: Tensor, aug_seed: int, augment: Augment | None
) -> tuple[Tensor, Tensor]:
    idx = idx.to(x.device)
    xb, yb = x.index_select(0, idx), y.index_select(0, idx)
    if augment is not None:
        xb = augment(xb, aug_seed)
    return xb, yb


@torch.no_grad()
def _test_accuracy(net: nn.Module, data: DistillData, device: torch.device) -> float:
    was = net.training
    net.eval()
    correct, n = 0, data.test_images.shape[0]
    for a in range(0, n, 1024):
        xb = data.test_images[a : a + 1024].to(device)
        correct += int((net(xb).argmax(1) == data.test_labels[a : a + 1024].to(device)).sum())
    net.train(was)
    return 100.0 * correct / max(1, n)


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


def _save_expert(
    path: Path, traj: Tensor, losses: Tensor, config: Mapping[str, Any], index: int, test_acc: float
) -> None:
    """Write one expert atomically: a temporary file, then a rename."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "index": str(index),
        "test_accuracy": repr(float(test_acc)),
        "config": json.dumps(config, sort_keys=True),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {"trajectory": traj.contiguous(), "train_loss": losses.contiguous()},
        str(tmp),
        metadata=meta,
    )
    os.replace(tmp, path)


# Settings that must agree for stored experts to be reused (the rest is informational).
_COMPATIBLE_KEYS = ("model", "dataset", "training", "layout", "num_params")


def _config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two (nested) configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            if key == "layout":
                out.append(f"{prefix}{key} (parameter names/shapes)")
            else:
                out.append(f"{prefix}{key}: stored {va!r}, requested {vb!r}")
    return out


def train_experts(
    dataset: DistillData,
    model: str = "ConvNet",
    num_experts: int = 10,
    epochs: int = 20,
    lr: float = 0.01,
    batch_size: int = 256,
    augment: DSA | Augment | str | type[DSA] | None = DSA,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    vmap: bool = False,
    group_size: int = _DEFAULT_GROUP,
    device: torch.device | str | None = None,
    on_expert: Callable[[int, Path | None], None] | None = None,
    group: Any = None,
) -> Experts:
    """Train ``num_experts`` networks on the real training split and keep their trajectories.

    Args:
        dataset: the real data (:func:`hpd_fast.data.load`); all training images are used.
        model: a name of :data:`hpd_fast.models.MODEL_NAMES` ("ConvNet": the usual student).
        num_experts: experts K >= 1 (expert k is seeded from ``(seed, k)``).
        epochs: training epochs E >= 1 per expert; trajectories have E + 1 rows.
        lr, momentum, weight_decay: plain SGD (defaults 0.01, 0, 0 as in the published MTT
            expert code; no learning-rate decay).
        batch_size: minibatch size (the last batch of an epoch may be smaller).
        augment: ``DSA`` (default: the class, its default strategy, one family per batch, each
            image its own parameters), a DSA instance or strategy string, any deterministic
            callable ``f(x, seed)``, or None.
        seed: base seed; see the module docstring.
        out: folder for the safetensors files (created if needed). Experts already there with
            the same settings are kept and not retrained; different settings raise. None: keep
            everything in memory only.
        progress: tqdm bar over all remaining expert-epochs.
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
    aug, aug_desc = _as_augment(augment)
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
            "fingerprint": _fingerprint(dataset),
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
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(todo) * epochs, desc="experts", unit="epoch", disable=not progress or not todo
    )

    def finish(k: int, net: nn.Module, traj: Tensor, losses: Tensor) -> None:
        acc = _test_accuracy(net, dataset, dev)
        trajs[k], accs[k] = traj, acc
        path = None
        if out_dir is not None:
            path = expert_path(out_dir, k)
            _save_expert(path, traj, losses, config, k, acc)
        bar.set_postfix_str(f"expert {k}: test {acc:.1f}%")
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
                        finish(k, net, traj.clone(), loss.clone())
        else:
            for k in todo:
                net = _init_net(model, dataset, kwargs, seed, k).to(dev)
                traj, losses = _train_sequential(
                    net,
                    _Stream(seed, k),
                    x,
                    y,
                    tick=ticker(1),
                    **common,  # type: ignore[arg-type]
                )
                finish(k, net, traj, losses)

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


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not an expert trajectory file (format={meta.get('format')!r}, "
            f"expected {FORMAT!r}; write them with hpd_fast.experts.train_experts or "
            "`hpd-fast experts`)"
        )
    if int(meta.get("version", "0")) > VERSION:
        raise ValueError(
            f"{str(path)!r} has format version {meta['version']}, newer than this hpd_fast "
            f"reads ({VERSION}); upgrade hpd_fast"
        )
    if "trajectory" not in keys or "config" not in meta:
        raise ValueError(f"{str(path)!r} lacks the 'trajectory' tensor or its config")
    return meta


def _read_expert(
    path: Path, lazy: bool = False
) -> tuple[dict[str, Any], Tensor | None, float | None]:
    """(config, trajectory [E + 1, P] or None when lazy, test accuracy) of one file."""
    from safetensors import safe_open

    meta = _read_meta(path)
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} has a malformed config: {exc}") from None
    with safe_open(str(path), framework="pt") as f:
        shape = list(f.get_slice("trajectory").get_shape())
        traj = None if lazy else f.get_tensor("trajectory")
    want = [int(config["training"]["epochs"]) + 1, int(config["num_params"])]
    if shape != want:
        raise ValueError(
            f"{str(path)!r}: trajectory has shape {shape} but its config says {want} "
            "(epochs + 1, P)"
        )
    acc = meta.get("test_accuracy")
    return config, traj, (float(acc) if acc not in (None, "None") else None)


def load(path: str | os.PathLike[str], *, lazy: bool = False) -> Experts:
    """Read expert trajectories written by :func:`train_experts`.

    Args:
        path: a folder of ``expert_*.safetensors`` files (all are read, in index order), or
            one such file.
        lazy: keep only the file names and read trajectories on access
            (``experts.trajectories[i]`` reads one file; :meth:`Experts.pair` reads two rows).
            For expert sets larger than memory.

    Returns:
        :class:`Experts`; use :meth:`Experts.check_student` (or :meth:`Experts.make_student`)
        before matching a student against them.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without expert files.
        ValueError: a file that is not an expert trajectory file, or files made with
            different settings.
    """
    p = Path(path)
    if p.is_dir():
        found = sorted(
            (int(m.group(1)), p / name)
            for name in os.listdir(p)
            if (m := _FILE_RE.match(name)) is not None
        )
        if not found:
            raise FileNotFoundError(
                f"no expert trajectories in {str(p)!r} (expected expert_00000.safetensors, ... "
                "written by hpd_fast.experts.train_experts or `hpd-fast experts`)"
            )
    elif p.is_file():
        m = _FILE_RE.match(p.name)
        found = [(int(m.group(1)) if m else 0, p)]
    else:
        raise FileNotFoundError(
            f"no expert trajectories at {str(p)!r}: no such file or folder (train them with "
            "`hpd-fast experts --out PATH` or hpd_fast.experts.train_experts(..., out=PATH))"
        )
    config = None
    trajs: list[Tensor] = []
    accs: list[float | None] = []
    for _, file in found:
        cfg, traj, acc = _read_expert(file, lazy=lazy)
        if config is None:
            config = cfg
        else:
            diff = _config_diff(
                {k: config.get(k) for k in _COMPATIBLE_KEYS},
                {k: cfg.get(k) for k in _COMPATIBLE_KEYS},
            )
            if diff:
                raise ValueError(
                    f"{str(file)!r} was trained with different settings than "
                    f"{str(found[0][1])!r}: " + "; ".join(diff[:6])
                )
        if traj is not None:
            trajs.append(traj)
        accs.append(acc)
    assert config is not None
    files = [f for _, f in found]
    trajectories: Sequence[Tensor] = _LazyTrajectories(files) if lazy else trajs
    return Experts(
        trajectories,
        config,
        indices=[i for i, _ in found],
        test_accuracy=accs,
        path=p if p.is_dir() else p.parent,
    )
