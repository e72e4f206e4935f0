"""Expert buffers of the published trajectory-matching code (MTT, TESLA, DATM, GLaD, H-PD).

The published ``buffer.py`` (GeorgeCazenavette/mtt-distillation) trains experts and saves them
``save_interval`` (10) at a time with ``torch.save(trajectories, ".../replay_buffer_<k>.pt")``
into ``<buffer_path>/<Dataset>[_NO_ZCA]/<Model>/`` (ImageNet subsets:
``<buffer_path>/ImageNet/<subset>/<res>/<Model>/``). Each file holds::

    trajectories: list over experts
        timestamps: list over epochs (element 0: the initialisation, then one per epoch)
            [p.detach().cpu() for p in teacher_net.parameters()]   # a list of tensors

and the distillation code flattens one epoch as ``torch.cat([p.reshape(-1) for p in params])``
-- the :func:`hpd_fast.params.flatten_params` layout when the student's ``parameters()`` come in
the same order with the same shapes. For the published ``ConvNet`` (width 128, depth 3,
``GroupNorm(C, C)`` "instancenorm", ReLU, 2x2 average pooling, one Linear) they do: per block
``conv.weight [128, C_in, 3, 3]``, ``conv.bias [128]``, ``norm.weight [128]``,
``norm.bias [128]``, then ``classifier.weight [K, 128 * h * w]``, ``classifier.bias [K]`` -- the
order and shapes of :class:`hpd_fast.models.ConvNet` of the same depth (its names differ:
``features.<i>.0.weight`` ...; only order and shapes are stored in the buffers).

Files are read with ``torch.load(..., weights_only=True)``: nothing in them is executed (a
pickle that names any callable other than tensor rebuilding is refused). Every tensor is checked
against the student before anything is converted.

Public functions: :func:`load_mtt` (into memory) and :func:`import_mtt` (into a folder of
hpd_fast expert files, one buffer file at a time), :func:`buffer_files`,
:func:`describe_buffer_folder`, :data:`PUBLISHED_MODELS`.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hpd_fast._checks import check_int
from hpd_fast.config import ExpertConfig
from hpd_fast.experts.format import FORMAT, VERSION, _save_expert, expert_path
from hpd_fast.experts.trajectories import Experts
from hpd_fast.models import MODEL_NAMES, get_model
from hpd_fast.params import Layout, param_layout

__all__ = [
    "DATASET_GEOMETRY",
    "PUBLISHED_DATASETS",
    "PUBLISHED_MODELS",
    "BufferSource",
    "buffer_files",
    "describe_buffer_folder",
    "import_mtt",
    "load_mtt",
]

#: The experts' training settings recorded for imported buffers, by default those of
#: :class:`hpd_fast.config.ExpertConfig` (the published MTT recipe).
_DEFAULTS = ExpertConfig()

_LOG = logging.getLogger("hpd_fast")

_FILE_RE = re.compile(r"^replay_buffer_(\d+)\.pt$")

#: Published network names -> (hpd_fast model name, constructor arguments). The published
#: ``get_network`` builds them with width 128, depth 3, ReLU, instance norm
#: (``GroupNorm(C, C)``) and average pooling unless the name says otherwise. Its "ConvNetLN"
#: (``nn.LayerNorm([C, H, W])``) has no hpd_fast counterpart and is not listed.
PUBLISHED_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "ConvNet": ("ConvNetD3", {}),
    **{f"ConvNetD{d}": (f"ConvNetD{d}", {}) for d in range(1, 9)},
    **{f"ConvNetW{w}": ("ConvNetD3", {"width": w}) for w in (32, 64, 128, 256)},
    "ConvNetAS": ("ConvNetD3", {"act": "sigmoid"}),
    "ConvNetAR": ("ConvNetD3", {"act": "relu"}),
    "ConvNetAL": ("ConvNetD3", {"act": "leakyrelu"}),
    "ConvNetNN": ("ConvNetD3", {"norm": "none"}),
    "ConvNetBN": ("ConvNetD3", {"norm": "batchnorm"}),
    "ConvNetIN": ("ConvNetD3", {"norm": "instancenorm"}),
    "ConvNetGN": ("ConvNetD3", {"norm": "groupnorm"}),
    "ConvNetNP": ("ConvNetD3", {"pooling": "none"}),
    "ConvNetMP": ("ConvNetD3", {"pooling": "maxpooling"}),
    "ConvNetAP": ("ConvNetD3", {"pooling": "avgpooling"}),
}

#: hpd_fast dataset name -> (channels, classes, side in pixels) of the images the experts saw.
#: None: not fixed by the name (image folders; the classes are then read from the buffers).
DATASET_GEOMETRY: dict[str, tuple[int, int | None, int]] = {
    "digits": (1, 10, 8),
    "cifar10": (3, 10, 32),
    "cifar100": (3, 100, 32),
    "tinyimagenet": (3, 200, 64),
    "imagefolder": (3, None, 128),
    **{
        s: (3, 10, 128)
        for s in (
            "imagenette",
            "imagewoof",
            "imagemeow",
            "imagesquawk",
            "imagefruit",
            "imageyellow",
            "imagenet-a",
            "imagenet-b",
            "imagenet-c",
            "imagenet-d",
            "imagenet-e",
        )
    },
}

#: Dataset folder names of the published ``buffer.py`` -> hpd_fast dataset names.
PUBLISHED_DATASETS: dict[str, str] = {
    "CIFAR10": "cifar10",
    "CIFAR100": "cifar100",
    "Tiny": "tinyimagenet",
}


@dataclass
class BufferSource:
    """What a folder of published buffers is: read from its path, or given.

    Attributes:
        dataset: hpd_fast dataset name (e.g. "cifar10"), or None when the path does not say.
        model: the published network name (e.g. "ConvNet", "ConvNetD4"), or None.
        resolution: image side (ImageNet subsets: the ``<res>`` folder), or None.
        zca: True for ``CIFAR10`` / ``CIFAR100`` folders without ``_NO_ZCA`` (experts trained on
            ZCA-whitened images), False with it, None when unknown.
    """

    dataset: str | None = None
    model: str | None = None
    resolution: int | None = None
    zca: bool | None = None


def describe_buffer_folder(path: str | os.PathLike[str]) -> BufferSource:
    """Dataset, network, resolution and ZCA of a published buffer folder, from its path.

    ``.../CIFAR10_NO_ZCA/ConvNet`` -> cifar10, ConvNet, zca False; ``.../Tiny/ConvNetD4`` ->
    tinyimagenet, ConvNetD4; ``.../ImageNet/imagenette/128/ConvNetD5`` -> imagenette, 128 px.
    Parts that do not match are left None.
    """
    p = Path(path)
    if p.is_file() or p.suffix == ".pt":
        p = p.parent
    parts = p.resolve().parts if p.exists() else p.parts
    out = BufferSource()
    if not parts:
        return out
    if parts[-1] in PUBLISHED_MODELS or parts[-1] in MODEL_NAMES:
        out.model = parts[-1]
    if len(parts) >= 2:
        folder = parts[-2]
        base = folder.removesuffix("_NO_ZCA")
        if base in PUBLISHED_DATASETS:
            out.dataset = PUBLISHED_DATASETS[base]
            if base.startswith("CIFAR"):
                out.zca = not folder.endswith("_NO_ZCA")
        elif (
            len(parts) >= 4
            and parts[-4] == "ImageNet"
            and parts[-2].isdigit()
            and parts[-3].lower() in DATASET_GEOMETRY
        ):
            out.dataset = parts[-3].lower()
            out.resolution = int(parts[-2])
    return out


def buffer_files(path: str | os.PathLike[str]) -> list[Path]:
    """The buffer files at ``path``: one ``.pt`` file, or a folder's ``replay_buffer_<k>.pt``
    files in the order of ``k`` (the published code's order of the experts).

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without buffer files.
        PermissionError: the folder cannot be listed.
    """
    p = Path(path)
    try:
        is_dir, is_file = p.is_dir(), p.is_file()
    except PermissionError as e:
        raise PermissionError(f"cannot access {str(p)!r}: permission denied") from e
    if is_file:
        return [p]
    if not is_dir:
        raise FileNotFoundError(f"no expert buffers at {str(p)!r}: no such file or folder")
    try:
        names = os.listdir(p)
    except PermissionError as e:
        raise PermissionError(f"cannot list folder {str(p)!r}: permission denied") from e
    found = sorted((int(m.group(1)), p / n) for n in names if (m := _FILE_RE.match(n)))
    if not found:
        raise FileNotFoundError(
            f"no expert buffers in {str(p)!r}: expected replay_buffer_0.pt, replay_buffer_1.pt, "
            "... as written by the published MTT buffer.py"
        )
    return [f for _, f in found]


# ----------------------------------------------------------------------------- the student


@dataclass
class _Student:
    name: str  # hpd_fast model name
    kwargs: dict[str, Any]
    published: str  # the name as given
    channel: int
    num_classes: int
    im_size: tuple[int, int]
    layout: Layout

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.layout)

    def describe(self) -> str:
        kw = f", {self.kwargs}" if self.kwargs else ""
        return (
            f"{self.published} (hpd_fast {self.name}{kw}; {self.channel} x {self.im_size[0]} x "
            f"{self.im_size[1]} images, {self.num_classes} classes)"
        )


def _student(
    model: str,
    model_kwargs: Mapping[str, Any] | None,
    channel: int,
    num_classes: int,
    im_size: tuple[int, int],
) -> _Student:
    if model in PUBLISHED_MODELS:
        name, kwargs = PUBLISHED_MODELS[model]
        kwargs = {**kwargs, **dict(model_kwargs or {})}
    elif model in MODEL_NAMES:
        name, kwargs = model, dict(model_kwargs or {})
    else:
        raise ValueError(
            f"model: unknown network {model!r}; published names: {', '.join(PUBLISHED_MODELS)}; "
            f"or an hpd_fast name: {', '.join(MODEL_NAMES)}"
        )
    # Only the structure is needed; do not consume the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        net = get_model(name, channel, num_classes, im_size, **kwargs)
    return _Student(name, kwargs, model, channel, num_classes, im_size, param_layout(net))


# ------------------------------------------------------------------------------ reading


def _read_buffer(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with errors naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise PermissionError(f"cannot read expert buffer {str(path)!r}: permission denied") from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"expert buffer {str(path)!r} disappeared: {e}") from e
    except pickle.UnpicklingError as e:
        # weights_only refuses any global that is not a tensor/container rebuild function.
        # Keep only torch's reason (the GLOBAL it refused), not its advice to load unsafely.
        lines = [ln.strip() for ln in str(e).splitlines()]
        why = next((ln for ln in lines if "global" in ln.lower()), "it names a callable")
        raise ValueError(
            f"{str(path)!r} is not a plain tensor file (refused by torch.load(weights_only=True),"
            f" nothing in it was run): {why}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, TypeError, AttributeError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{str(path)!r} is not a readable torch.save file: {msg}") from None


def _kind(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor {list(x.shape)}"
    return type(x).__name__


def _flatten_epoch(
    where: str, params: Any, student: _Student, found: Sequence[int] | None = None
) -> Tensor:
    """One epoch's parameter list -> flat float32 [P], checked against the student."""
    layout = student.layout
    if not isinstance(params, (list, tuple)):
        raise ValueError(
            f"{where}: expected a list of parameter tensors, found {_kind(params)} (the published "
            "buffer.py saves [p.detach().cpu() for p in net.parameters()] per epoch)"
        )
    if len(params) != len(layout):
        shapes = [tuple(p.shape) if isinstance(p, Tensor) else None for p in params]
        first = next(
            (i for i, (a, (_, b)) in enumerate(zip(shapes, layout)) if a != b),
            min(len(params), len(layout)),
        )
        if first < min(len(params), len(layout)):
            detail = (
                f"first difference at parameter {first}: {_kind(params[first])} where the "
                f"student has {layout[first][0]} {list(layout[first][1])}"
            )
        elif len(params) < len(layout):
            detail = f"missing at the end: {[f'{n} {list(s)}' for n, s in layout[first:]][:4]}"
        else:
            detail = f"extra at the end: {[_kind(p) for p in params[first:]][:4]}"
        raise ValueError(
            f"{where}: {len(params)} parameter tensors, but the student "
            f"{student.describe()} has {len(layout)}; {detail}"
        )
    for i, (p, (name, shape)) in enumerate(zip(params, layout)):
        if not isinstance(p, Tensor):
            raise ValueError(
                f"{where}, parameter {i} ({name}): expected a tensor, found {_kind(p)}"
            )
        if tuple(p.shape) != shape:
            raise ValueError(
                f"{where}, parameter {i}: shape {list(p.shape)}, but the student "
                f"{student.describe()} has {name} {list(shape)} there"
            )
        if p.dtype != torch.float32:
            raise ValueError(
                f"{where}, parameter {i} ({name}): dtype {p.dtype}, expected torch.float32"
            )
        if p.layout != torch.strided or p.is_quantized:
            raise ValueError(f"{where}, parameter {i} ({name}): not a dense tensor")
        if not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(f"{where}, parameter {i} ({name}): {bad} non-finite value(s)")
    return torch.cat([p.reshape(-1) for p in params])


def _trajectories(
    path: Path, student: _Student, min_epochs: int, epochs: int | None
) -> Iterator[Tensor]:
    """The trajectories of one buffer file as float32 [E + 1, P], checked (see module)."""
    obj = _read_buffer(path)
    where = repr(str(path))
    if not isinstance(obj, (list, tuple)):
        raise ValueError(
            f"{where}: expected a list of expert trajectories (the published buffer.py format), "
            f"found {_kind(obj)}"
        )
    if not obj:
        raise ValueError(f"{where}: holds no expert trajectories (an empty list)")
    for t, traj in enumerate(obj):
        here = f"{where}, trajectory {t}"
        if not isinstance(traj, (list, tuple)):
            raise ValueError(
                f"{here}: expected a list over epochs of parameter lists, found {_kind(traj)}"
            )
        if len(traj) < min_epochs + 1:
            raise ValueError(
                f"{here}: {len(traj)} parameter sets (the initialisation and {len(traj) - 1} "
                f"epochs), but matching needs at least expert_epochs + 1 = {min_epochs + 1}"
            )
        if epochs is not None and len(traj) != epochs + 1:
            raise ValueError(
                f"{here}: {len(traj) - 1} epochs, but the trajectories before it have {epochs}"
            )
        epochs = len(traj) - 1
        rows = [_flatten_epoch(f"{here}, epoch {e}", ps, student) for e, ps in enumerate(traj)]
        yield torch.stack(rows)
    del obj


def _resolve(
    files: Sequence[Path],
    dataset: str | None,
    model: str | None,
    model_kwargs: Mapping[str, Any] | None,
    resolution: int | None,
    num_classes: int | None,
    path: Path,
) -> tuple[str, _Student, BufferSource]:
    src = describe_buffer_folder(path)
    dataset = dataset or src.dataset
    if dataset is None:
        raise ValueError(
            f"dataset: cannot tell from {str(path)!r} which dataset the experts were trained on "
            f"(published folders: {', '.join(PUBLISHED_DATASETS)}, ImageNet/<subset>/<res>); "
            f"give it (hpd_fast names: {', '.join(DATASET_GEOMETRY)})"
        )
    key = dataset.strip().lower()
    if key not in DATASET_GEOMETRY:
        raise ValueError(
            f"dataset: unknown dataset {dataset!r}; valid: {', '.join(DATASET_GEOMETRY)}"
        )
    channel, classes, side = DATASET_GEOMETRY[key]
    side = check_int("resolution", resolution, 1) if resolution is not None else side
    if resolution is None and src.resolution is not None and src.dataset == key:
        side = src.resolution
    if num_classes is not None:
        classes = check_int("num_classes", num_classes, 1)
    if classes is None:
        classes = _classes_from_buffer(files[0])
    model = model or src.model or "ConvNet"
    student = _student(model, model_kwargs, channel, classes, (side, side))
    return key, student, src


def _classes_from_buffer(path: Path) -> int:
    """The number of classes of an image-folder buffer: the length of the last bias."""
    obj = _read_buffer(path)
    try:
        last = obj[0][0][-1]
        if isinstance(last, Tensor) and last.dim() == 1:
            return int(last.shape[0])
    except (IndexError, KeyError, TypeError):
        pass
    raise ValueError(
        f"{str(path)!r}: cannot read the number of classes from the last parameter; give "
        "num_classes"
    )


def _config(
    dataset: str,
    student: _Student,
    epochs: int,
    source: BufferSource,
    files: Sequence[Path],
    lr: float,
    batch_size: int,
    augment: str | None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "name": student.name,
            "channel": student.channel,
            "num_classes": student.num_classes,
            "im_size": list(student.im_size),
            "kwargs": dict(student.kwargs),
        },
        "dataset": {
            "name": dataset,
            "num_train": None,
            "channels": student.channel,
            "num_classes": student.num_classes,
            "im_size": list(student.im_size),
            "mean": None,
            "std": None,
            "fingerprint": None,
            "zca": source.zca,
        },
        "training": {
            "epochs": int(epochs),
            "lr": float(lr),
            "batch_size": int(batch_size),
            "momentum": 0.0,
            "weight_decay": 0.0,
            "augment": "none" if augment is None else str(augment),
            "seed": None,
        },
        "layout": [[n, list(s)] for n, s in student.layout],
        "num_params": student.num_params,
        "source": {
            "format": "mtt",
            "model": student.published,
            "files": [f.name for f in files],
        },
    }


def _warn_zca(source: BufferSource, dataset: str) -> None:
    if source.zca:
        _LOG.warning(
            "the %s experts were trained on ZCA-whitened images (no _NO_ZCA in the folder "
            "name); hpd_fast's loader normalises by mean/std only, so matching them sees "
            "differently preprocessed real images",
            dataset,
        )


def load_mtt(
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    resolution: int | None = None,
    num_classes: int | None = None,
    expert_epochs: int = 1,
    lr: float = _DEFAULTS.lr,
    batch_size: int = _DEFAULTS.batch_size,
    augment: str | None = _DEFAULTS.augment,
) -> Experts:
    """Read the published code's expert buffers into memory, checked against the student.

    Args:
        path: a folder of ``replay_buffer_<k>.pt`` files (all read, in the order of k; the
            experts are numbered 0, 1, ... across them) or one ``.pt`` file.
        dataset: hpd_fast dataset name of the experts' data (its geometry -- channels, classes,
            side -- fixes the student). Default: read from the published folder name
            (``CIFAR10[_NO_ZCA]``, ``CIFAR100[_NO_ZCA]``, ``Tiny``, ``ImageNet/<subset>/<res>``).
        model: the published network name (:data:`PUBLISHED_MODELS`: "ConvNet" is depth 3 at
            every resolution, "ConvNetD4" ...) or an hpd_fast model name. Default: the folder
            name when it is one, else "ConvNet".
        model_kwargs: extra constructor arguments of the hpd_fast network.
        resolution: image side when it differs from the dataset's usual one.
        num_classes: classes, when the dataset name does not fix them ("imagefolder"; default:
            the length of the last parameter).
        expert_epochs: every trajectory must hold at least ``expert_epochs + 1`` parameter
            sets (the initialisation and ``expert_epochs`` epochs).
        lr, batch_size, augment: the experts' training settings, recorded in the config (the
            buffers do not store them; the defaults are the published ones).

    Returns:
        :class:`Experts` with float32 trajectories [E + 1, P] in memory (a CIFAR-10 ConvNet
        buffer of 10 experts x 50 epochs is about 650 MB; use :func:`import_mtt` to convert
        large sets one file at a time), ``test_accuracy`` None.

    Raises:
        ValueError: naming the file, trajectory, epoch and parameter of the first mismatch
            (count, shape, dtype other than float32, non-finite values, too few epochs,
            trajectories of different lengths), a file that is not a plain tensor file, or
            unknown dataset / model names.
        FileNotFoundError, PermissionError: naming the path.
    """
    p = Path(path)
    files = buffer_files(p)
    expert_epochs = check_int("expert_epochs", expert_epochs, 1)
    key, student, source = _resolve(files, dataset, model, model_kwargs, resolution, num_classes, p)
    _warn_zca(source, key)
    trajs: list[Tensor] = []
    for f in files:
        epochs = trajs[0].shape[0] - 1 if trajs else None
        trajs.extend(_trajectories(f, student, expert_epochs, epochs))
    config = _config(key, student, trajs[0].shape[0] - 1, source, files, lr, batch_size, augment)
    return Experts(trajs, config, path=p if p.is_dir() else p.parent)


def import_mtt(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    resolution: int | None = None,
    num_classes: int | None = None,
    expert_epochs: int = 1,
    lr: float = _DEFAULTS.lr,
    batch_size: int = _DEFAULTS.batch_size,
    augment: str | None = _DEFAULTS.augment,
) -> Path:
    """Convert the published code's expert buffers into a folder of hpd_fast expert files.

    Arguments as :func:`load_mtt`; ``out`` is the new folder (``expert_00000.safetensors``, ...,
    readable with :func:`hpd_fast.experts.load` and ``hpd-fast distill --experts OUT``). One
    buffer file is held in memory at a time. The folder is built beside ``out`` under a
    temporary name and renamed when every file has passed the checks, so a failed import
    leaves nothing at ``out``. The files' ``train_loss`` and ``test_accuracy`` are NaN (the
    buffers do not hold them).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: as :func:`load_mtt`; ``out`` exists and is not an empty folder.
    """
    src = Path(path)
    dst = Path(out)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(
            f"out: {str(dst)!r} already exists and is not an empty folder; choose a new folder"
        )
    files = buffer_files(src)
    expert_epochs = check_int("expert_epochs", expert_epochs, 1)
    key, student, source = _resolve(
        files, dataset, model, model_kwargs, resolution, num_classes, src
    )
    _warn_zca(source, key)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.importing-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        epochs: int | None = None
        config: dict[str, Any] | None = None
        k = 0
        for f in files:
            for traj in _trajectories(f, student, expert_epochs, epochs):
                if config is None:
                    epochs = traj.shape[0] - 1
                    config = _config(key, student, epochs, source, files, lr, batch_size, augment)
                losses = torch.full((traj.shape[0] - 1,), float("nan"))
                _save_expert(expert_path(tmp, k), traj, losses, config, k, float("nan"))
                k += 1
            _LOG.info("%s: %d experts so far", f.name, k)
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
