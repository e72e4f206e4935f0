"""Which kernel implementations exist in this installation, and which one an op call uses.

Every fused op has four implementations: ``reference`` (pure PyTorch, the test oracle), ``cpp``
(C++ CPU kernels in ``hpd_fast._C``), ``cuda`` (CUDA C++ kernels in the same extension, when it
was built against a CUDA torch with a toolkit) and ``triton``. Nothing here fails at import: a
missing backend is reported by :func:`backend_info` with the reason, and calls fall back.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import warnings

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")

REBUILD_HINT = (
    "rebuild on a machine with CUDA torch and a CUDA toolkit: "
    "HPD_FAST_FORCE_CUDA=1 pip install --no-build-isolation -e ."
)

# An op every build of the extension registers; used to ask the dispatcher what was compiled.
_PROBE_OP = "hpd_fast::class_mean_distance"


def _cpp_status() -> tuple[bool, str]:
    if os.environ.get("HPD_FAST_DISABLE_CPP", "") == "1":
        return False, "disabled at run time by HPD_FAST_DISABLE_CPP=1"
    try:
        importlib.import_module("hpd_fast._C")
    except ImportError as exc:
        return False, (
            f"hpd_fast._C is not built ({exc}); install with "
            "`pip install --no-build-isolation -e .` (HPD_FAST_NO_CPP=1 skips it on purpose)"
        )
    return True, "C++ CPU kernels (hpd_fast._C, at::parallel_for)"


def _cuda_status() -> tuple[bool, str]:
    ok, why = _status("cpp")
    if not ok:
        return False, why
    if not torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE_OP, "CUDA"):
        return False, f"hpd_fast._C was built without CUDA kernels; {REBUILD_HINT}"
    if not torch.cuda.is_available():
        return False, "CUDA kernels are built but no CUDA device is visible"
    return True, f"CUDA C++ kernels (torch CUDA {torch.version.cuda})"


def _triton_status() -> tuple[bool, str]:
    # Found without importing triton: importing hpd_fast on a CPU machine never imports it.
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    version = importlib.metadata.version("triton")
    if torch.cuda.is_available():
        return True, f"Triton {version}, compiled for the GPU"
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        return True, f"Triton {version} through the interpreter on CPU (slow; for tests)"
    return False, (
        f"Triton {version} is installed but no GPU is visible "
        "(set TRITON_INTERPRET=1 before importing hpd_fast to run the kernels on CPU)"
    )


_PROBES = {
    "reference": lambda: (True, "pure PyTorch (always available; the test oracle)"),
    "cpp": _cpp_status,
    "cuda": _cuda_status,
    "triton": _triton_status,
}
# Filled once per process. A plain dict (not lru_cache) so torch.compile reads it as constants.
_STATUS: dict[str, tuple[bool, str]] = {}


def _status(name: str) -> tuple[bool, str]:
    if name not in _STATUS:
        if name not in _PROBES:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
        _STATUS[name] = _PROBES[name]()
    return _STATUS[name]


def backend_info() -> dict[str, dict[str, object]]:
    """What this installation can run.

    Returns:
        ``{name: {"available": bool, "detail": str}}`` for ``reference``, ``cpp``, ``cuda`` and
        ``triton``; ``detail`` says what the backend is, or why it is missing.
    """
    return {name: dict(zip(("available", "detail"), _status(name))) for name in BACKENDS}


def cpp_loaded() -> bool:
    """Whether ``hpd_fast._C`` is loaded (its operators registered with torch)."""
    return _status("cpp")[0]


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def check_device(op: str, backend: str, device_type: str) -> None:
    """Raise ``ValueError`` when ``backend`` cannot run on tensors of ``device_type`` on this
    machine (whether the backend is installed is :func:`backend_info`'s business)."""
    if backend == "cpp" and device_type != "cpu":
        raise ValueError(f"{op}: backend='cpp' runs on CPU tensors, got {device_type} tensors")
    if backend == "cuda" and device_type != "cuda":
        raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got {device_type} tensors")
    if backend == "triton" and device_type not in ("cuda", "cpu"):
        raise ValueError(f"{op}: backend='triton' runs on CUDA (or interpreted CPU) tensors")
    if backend == "triton" and device_type == "cpu" and torch.cuda.is_available():
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors on a machine with a GPU")


def runnable_pairs() -> list[tuple[str, str]]:
    """Every (device type, backend) pair a forced ``backend=`` accepts on this machine: the
    combinations tests and benchmarks parametrise over. Triton runs on CPU tensors (through
    the interpreter) only where no GPU is visible; ``reference`` runs everywhere."""
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    out = []
    for device in devices:
        for backend in BACKENDS:
            try:
                check_device("", backend, device)
            except ValueError:
                continue
            if _status(backend)[0]:
                out.append((device, backend))
    return out


def select_backend(op: str, device: torch.device, backend: str | None) -> str:
    """The backend that runs ``op`` on ``device``.

    ``backend=None`` picks the fastest available: ``cuda`` then ``triton`` for CUDA tensors (with
    a one-time warning when the CUDA kernels are missing), ``cpp`` for CPU tensors, else
    ``reference``. A forced backend that cannot run here raises ``RuntimeError`` saying why.
    """
    if backend is not None:
        if backend not in _PROBES:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        check_device(op, backend, device.type)
        ok, why = _status(backend)
        if not ok:
            raise RuntimeError(f"{op}: backend={backend!r} is not available: {why}")
        return backend
    if device.type == "cuda":
        if _status("cuda")[0]:
            return "cuda"
        fallback = "triton" if _status("triton")[0] else "reference"
        _warn_once(
            f"hpd_fast: {_status('cuda')[1]}. Falling back to the {fallback} implementation "
            f"for CUDA tensors ({REBUILD_HINT})."
        )
        return fallback
    if device.type == "cpu" and _status("cpp")[0]:
        return "cpp"
    return "reference"


def under_func_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is active.

    Autograd registered through torch.library, and custom autograd functions without vmap
    rules, are invisible to those transforms: ops that rely on them run a plain-PyTorch path
    there. torch.compile traces the kernels (no transform), so this is False while compiling.
    """
    if torch.compiler.is_compiling():
        return False
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None
