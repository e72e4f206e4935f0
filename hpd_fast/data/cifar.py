"""CIFAR-10 and CIFAR-100 from the local "python version" archives (nothing is downloaded)."""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch

from hpd_fast.data._common import check_resolution, isdir_checked, normalize_, resize
from hpd_fast.data.dataset import DistillData

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "load_cifar"]

# The constants used throughout the dataset-distillation literature (DC/DSA/DM, MTT, GLaD).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4866, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_SPECS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "names_key": b"label_names",
        "num_classes": 10,
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
    },
    "cifar100": {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "names_key": b"fine_label_names",
        "num_classes": 100,
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
    },
}


def _find_folder(root: str | os.PathLike[str], spec: dict[str, Any]) -> str:
    """The archive folder: ``root`` itself or ``root/<folder>``."""
    root = os.fspath(root)
    first = spec["train"][0]
    for cand in (root, os.path.join(root, spec["folder"])):
        path = os.path.join(cand, first)
        try:
            os.stat(path)
        except PermissionError as e:  # not "missing": say what cannot be read
            raise PermissionError(f"cannot access {path!r}: permission denied") from e
        except OSError:
            continue
        if os.path.isfile(path):
            return cand
    raise FileNotFoundError(
        f"expected {spec['folder']}/{first} under {root!r} (the python version of "
        f"{spec['title']}; root may also be the {spec['folder']} folder itself); nothing is "
        "downloaded"
    )


# --------------------------------------------------------------------------------------------
# Reading the archives without executing anything from them
# --------------------------------------------------------------------------------------------
#
# The official python-version archives are pickles (protocol 2, written by Python 2) of dicts
# holding bytes/str keys, lists of ints, lists of bytes and one uint8 numpy array. Unpickling an
# array calls ``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`` and restores
# its state, with its dtype built by ``numpy.dtype('u1', 0, 1)`` (newer NumPy writes
# ``numpy._core.multiarray._reconstruct``; Python 3 at protocol <= 2 writes bytes as
# ``_codecs.encode(str, 'latin1')``). Those are the only globals admitted, and none of them is
# the real function: each returns an inert placeholder that records its arguments and state.
# After unpickling, the placeholders are turned into arrays with ``numpy.frombuffer`` for plain
# numeric dtypes only. No object from the file is ever called, and nothing else can be named:
# any other global (``os.system``, ``builtins.eval``, ...) is refused before it is looked up.


class _Global:
    """An admitted global: inert, immutable (no attributes, BUILD refused)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a global's state cannot be set in a CIFAR archive")


class _ArrayType(_Global):
    """Stands for ``numpy.ndarray`` (an instance, not a type: NEWOBJ cannot build it)."""

    __slots__ = ()


class _ArrayStub:
    """An array recorded by ``_reconstruct(ndarray, shape, typecode)`` + BUILD(state)."""

    __slots__ = ("args", "state")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DTypeStub:
    """A dtype recorded by ``dtype(code, align, copy)`` + BUILD(state)."""

    __slots__ = ("args", "state")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Reconstruct(_Global):
    """Stands for ``numpy.core.multiarray._reconstruct``: records its arguments."""

    __slots__ = ()

    def __call__(self, *args: Any) -> _ArrayStub:
        return _ArrayStub(args)


class _DType(_Global):
    """Stands for ``numpy.dtype``: records its arguments."""

    __slots__ = ()

    def __call__(self, *args: Any) -> _DTypeStub:
        return _DTypeStub(args)


class _Latin1Encode(_Global):
    """``_codecs.encode`` as Python 3 pickles bytes at protocol <= 2: ``(str, 'latin1')`` only."""

    __slots__ = ()

    def __call__(self, *args: Any) -> bytes:
        if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("_codecs.encode is only admitted as encode(str, 'latin1')")
        return args[0].encode("latin-1")


_NDARRAY = _ArrayType()

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _Reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _Reconstruct(),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType(),
    ("_codecs", "encode"): _Latin1Encode(),
}

# Plain numeric dtypes an array in the archive may have (no objects, records or sub-arrays).
_ARRAY_KINDS = "biuf"


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals of :data:`_ALLOWED_GLOBALS`; no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"it references {module}.{name}, which a CIFAR archive does not hold (only "
                "dicts, lists, bytes, str, ints and numeric numpy arrays are read; nothing in "
                "the file is executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not admitted in a CIFAR archive")


def _text(v: Any) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v if isinstance(v, str) else ""


def _make_dtype(d: Any) -> np.dtype:
    if not isinstance(d, _DTypeStub) or not d.args:
        raise ValueError(f"an array's dtype is {type(d).__name__}, not a numpy dtype")
    code = _text(d.args[0])
    try:
        dt = np.dtype(code)
    except TypeError:
        raise ValueError(f"unsupported array dtype code {d.args[0]!r}") from None
    if dt.kind not in _ARRAY_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise ValueError(f"unsupported array dtype {d.args[0]!r} (only numeric dtypes are read)")
    st = d.state
    if st is not None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(st, tuple) or len(st) < 8 or any(x is not None for x in st[2:5]):
            raise ValueError(f"unsupported dtype state {st!r}")
        order = _text(st[1])
        if order not in ("<", ">", "|", "="):
            raise ValueError(f"unsupported dtype byte order {st[1]!r}")
        if order in "<>":
            dt = dt.newbyteorder(order)
    return dt


def _make_array(a: _ArrayStub) -> np.ndarray:
    if len(a.args) < 1 or a.args[0] is not _NDARRAY:
        raise ValueError("an array reconstruction names something other than numpy.ndarray")
    st = a.state
    # (version, shape, dtype, is_fortran, raw bytes)
    if not isinstance(st, tuple) or len(st) != 5:
        raise ValueError("an array without its state")
    _, shape, dtype, fortran, raw = st
    dt = _make_dtype(dtype)
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"an array with shape {shape!r}")
    if not isinstance(raw, bytes):
        raise ValueError(f"an array whose data is {type(raw).__name__}, not raw bytes")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) != count * dt.itemsize:
        raise ValueError(
            f"an array of shape {list(shape)} {dt} holds {len(raw)} bytes, expected "
            f"{count * dt.itemsize}"
        )
    arr = np.frombuffer(raw, dtype=dt, count=count)
    return arr.reshape(shape, order="F" if fortran else "C").copy()


def _materialize(obj: Any, depth: int = 0) -> Any:
    """Replace the placeholders in the unpickled tree by numpy arrays (containers rebuilt)."""
    if depth > 8:
        raise ValueError("nested deeper than a CIFAR archive")
    if isinstance(obj, _ArrayStub):
        return _make_array(obj)
    if isinstance(obj, (_DTypeStub, _Global)):
        raise ValueError("a bare numpy dtype, type or function where data was expected")
    if isinstance(obj, dict):
        return {_materialize(k, depth + 1): _materialize(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, depth + 1) for v in obj)
    return obj


def _open_file(path: str, what: str):  # noqa: ANN202 (a binary file object)
    """``open(path, "rb")``, with errors that say which file and why."""
    try:
        return open(path, "rb")  # noqa: SIM115 (the caller closes it)
    except PermissionError as e:
        raise PermissionError(f"cannot read {what} {path!r}: permission denied") from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"expected {what} {path!r}; nothing is downloaded") from e
    except IsADirectoryError as e:
        raise IsADirectoryError(f"{what} {path!r} is a directory, not a file") from e
    except OSError as e:
        raise OSError(f"cannot read {what} {path!r}: {e}") from e


def _unpickle(path: str, title: str) -> dict[Any, Any]:
    """One archive file as a dict, read by :class:`_CifarUnpickler` (nothing is executed)."""
    with _open_file(path, f"{title} file") as f:
        try:
            obj = _materialize(_CifarUnpickler(f, encoding="bytes").load())
        except Exception as e:  # unpickling raises many types on corrupt or hostile input
            raise ValueError(f"{path!r} is not a readable {title} pickle: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} should hold a dict, holds {type(obj).__name__}")
    # Archives written by Python 3 may use str keys; accept both.
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def _read_batches(
    folder: str, files: list[str], spec: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 3, 32, 32] and int64 labels [N] from the listed batch files."""
    xs, ys = [], []
    for name in files:
        path = os.path.join(folder, name)
        d = _unpickle(path, spec["title"])
        if b"data" not in d or spec["label_key"] not in d:
            raise ValueError(
                f"{path!r} lacks key b'data' or {spec['label_key']!r} (keys: {sorted(d)[:6]})"
            )
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[spec["label_key"]], dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path!r}: b'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}"
            )
        if labels.shape[0] != data.shape[0]:
            raise ValueError(f"{path!r}: {data.shape[0]} images but {labels.shape[0]} labels")
        k = spec["num_classes"]
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"{path!r}: labels must lie in [0, {k})")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _to_float(x: np.ndarray, resolution: int | None) -> torch.Tensor:
    t = torch.from_numpy(x).to(torch.float32).div_(255.0)
    return resize(t, resolution).contiguous()


def load_cifar(
    name: str, root: str | os.PathLike[str] | None, resolution: int | None = None
) -> DistillData:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels) from ``root``.

    ``root`` is the folder of the python-version archive (``cifar-10-batches-py`` with
    ``data_batch_1..5``, ``test_batch``, ``batches.meta``; ``cifar-100-python`` with ``train``,
    ``test``, ``meta``) or its parent. Pixels are scaled to [0, 1] and normalized with the fixed
    constants of the distillation literature (:data:`CIFAR10_MEAN`/``_STD``,
    :data:`CIFAR100_MEAN`/``_STD``), not statistics of the files.

    Args:
        resolution: None keeps 32x32; otherwise images are resized (bilinear, antialiased).

    Returns:
        DistillData with float32 images [N, 3, r, r] (50,000 train / 10,000 test for the full
        archives).

    Raises:
        FileNotFoundError: root missing or a file absent (the message says what was expected).
        PermissionError: a file or folder that cannot be read (named).
        ValueError: a file that is not a CIFAR pickle of the expected layout, including one
            that references anything but plain data and numeric numpy arrays (the files are
            read by a restricted unpickler: nothing in them is executed), or an empty split.
    """
    spec = _SPECS[name]
    resolution = check_resolution(resolution)
    if root is None:
        raise ValueError(
            f"root is required for {name!r}: the folder holding {spec['folder']}/ (the python "
            f"version of {spec['title']}); nothing is downloaded"
        )
    if not isdir_checked(root):
        raise FileNotFoundError(
            f"root {os.fspath(root)!r} for {name!r} is not a directory; expected it to hold "
            f"{spec['folder']}/ (the python version of {spec['title']}); nothing is downloaded"
        )
    folder = _find_folder(root, spec)
    x_train, y_train = _read_batches(folder, spec["train"], spec)
    x_test, y_test = _read_batches(folder, spec["test"], spec)
    meta_path = os.path.join(folder, spec["meta"])
    meta = _unpickle(meta_path, spec["title"])
    names = meta.get(spec["names_key"])
    if names is None or len(names) != spec["num_classes"]:
        raise ValueError(
            f"{meta_path!r}: expected {spec['num_classes']} names under {spec['names_key']!r}"
        )
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    mean, std = spec["mean"], spec["std"]
    return DistillData(
        name=name,
        train_images=normalize_(_to_float(x_train, resolution), mean, std),
        train_labels=torch.from_numpy(y_train),
        test_images=normalize_(_to_float(x_test, resolution), mean, std),
        test_labels=torch.from_numpy(y_test),
        class_names=class_names,
        mean=mean,
        std=std,
    )
