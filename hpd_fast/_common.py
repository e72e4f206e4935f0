"""Small pieces shared by the library's modules: seeds, augmentation, test accuracy,
fingerprints, peak memory and progress reporting. Each exists here once.

Nothing here is public API; the public names stay where users import them from
(:func:`hpd_fast.distill.losses.derive_seed`, ``hpd_fast.distill.losses.Augment``).
"""

from __future__ import annotations

import hashlib
import logging
import resource
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hpd_fast.augment import DSA

if TYPE_CHECKING:
    from tqdm import tqdm

    from hpd_fast.data.dataset import DistillData

__all__ = [
    "MAX_AUG_SEED",
    "Augment",
    "data_fingerprint",
    "derive_seed",
    "logger",
    "maxrss_kib",
    "peak_memory_mib",
    "progress_bar",
    "reset_peak_memory",
    "resolve_augment",
    "status_kib",
    "tensor_fingerprint",
    "test_accuracy",
]

#: The library's logger: one plain line per finished unit of work when no bar is shown.
logger = logging.getLogger("hpd_fast")

#: Augmentation callable: ``augment(x [B, C, H, W], seed: int) -> [B, C, H', W']``.
Augment = Callable[[Tensor, int], Tensor]

#: Augmentation seeds are drawn in ``[0, MAX_AUG_SEED)`` so that any consumer (numpy, CUDA
#: RNGs) accepts them.
MAX_AUG_SEED = 2**31 - 1


# --------------------------------------------------------------------------------------------
# seeds and augmentation
# --------------------------------------------------------------------------------------------


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from ``parts`` (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def resolve_augment(augment: Any) -> tuple[Augment | None, Any]:
    """Resolve an ``augment`` argument to a callable ``f(x, seed)`` (or None) and a JSON
    description of it.

    Accepted: None, "" or "none" (no augmentation); the class :class:`~hpd_fast.augment.DSA`
    or "dsa" (``DSA()``, its default strategy); any other string (a DSA strategy such as
    "color_crop_cutout"); a DSA instance; any callable ``f(x, seed[, ...])``. Words are
    matched case-insensitively, ignoring surrounding blanks.

    Returns:
        ``(augment, description)``: description is None for no augmentation,
        ``{"type": "DSA", "strategy", "mode", ...}`` for DSA, and ``{"type": "callable",
        "name": "<module>.<qualname>"}`` for another callable.

    Raises:
        ValueError: anything else (naming its type).
    """
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


# --------------------------------------------------------------------------------------------
# test accuracy
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_accuracy(
    net: nn.Module, data: DistillData, device: torch.device, batch_size: int = 1024
) -> float:
    """Top-1 accuracy (percent) of ``net`` on ``data``'s test split, scored in eval mode
    ``batch_size`` images at a time; the network's train / eval mode is restored after."""
    was = net.training
    net.eval()
    correct, n = 0, data.test_images.shape[0]
    for start in range(0, n, batch_size):
        xb = data.test_images[start : start + batch_size].to(device, torch.float32)
        yb = data.test_labels[start : start + batch_size].to(device)
        correct += int((net(xb).argmax(1) == yb).sum())
    net.train(was)
    return 100.0 * correct / max(1, n)


test_accuracy.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


# --------------------------------------------------------------------------------------------
# fingerprints (stored in files: their formulas must not change)
# --------------------------------------------------------------------------------------------


def data_fingerprint(data: DistillData) -> str:
    """A cheap identity of a training split: name, shape, labels and a strided sample of
    images (stored in expert files as ``dataset.fingerprint``)."""
    h = hashlib.sha256()
    x, y = data.train_images, data.train_labels
    h.update(repr((data.name, tuple(x.shape))).encode())
    h.update(y.detach().cpu().numpy().tobytes())
    stride = max(1, x.shape[0] // 512)
    h.update(x[::stride].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_fingerprint(tensors: Sequence[Tensor]) -> str:
    """A cheap identity of some tensors: shapes, dtypes and a strided sample of their values
    (H-PD's record of its inputs)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        flat = t.reshape(-1)
        stride = max(1, flat.numel() // 4096)
        h.update(flat[::stride].to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------


def status_kib(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``...), or None where
    there is no such file or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def maxrss_kib() -> int:
    """``ru_maxrss`` of this process in kB (Linux reports kB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r


def peak_memory_mib() -> tuple[float, str]:
    """Peak resident memory of this process in MiB and where it was read: ``"VmHWM"`` (Linux
    /proc) or ``"ru_maxrss"`` (elsewhere; on Linux it also carries the peak of the process an
    ``exec`` replaced, hence the preference)."""
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024, "VmHWM"
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (r / 2**20 if sys.platform == "darwin" else r / 1024), "ru_maxrss"


def reset_peak_memory() -> bool:
    """Reset the ``VmHWM`` high-water mark to the current resident size (Linux >= 4.0).
    Returns False where that is not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------


def progress_bar(progress: bool | None, **kwargs: Any) -> tuple[tqdm, bool]:
    """A tqdm bar and whether to log one line per finished unit of work instead.

    ``progress``: True shows the bar; False shows nothing; None (the usual default) shows the
    bar only when stderr is a terminal (tqdm's ``disable=None``) and otherwise asks for plain
    lines through :data:`logger` (INFO). ``kwargs`` go to tqdm (``total``, ``desc``, ``unit``;
    ``disable=True`` turns both off).
    """
    from tqdm.auto import tqdm

    off = bool(kwargs.pop("disable", False))
    if off or progress is False:
        return tqdm(disable=True, **kwargs), False
    bar = tqdm(disable=None if progress is None else False, **kwargs)
    return bar, progress is None and bool(bar.disable)


def settings_diff(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    names: tuple[str, str] = ("stored", "requested"),
    prefix: str = "",
    summarised: tuple[str, ...] = ("layout",),
) -> list[str]:
    """Human-readable differences between two nested settings dicts, ``"key: <names[0]> a,
    <names[1]> b"`` per differing leaf; keys in ``summarised`` are named without values."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += settings_diff(va, vb, names, f"{prefix}{key}.", summarised)
        elif va != vb:
            if key in summarised:
                out.append(f"{prefix}{key} (parameter names/shapes)")
            else:
                out.append(f"{prefix}{key}: {names[0]} {va!r}, {names[1]} {vb!r}")
    return out
