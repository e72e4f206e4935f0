"""Segmented-mean squared distance: the reduction behind CRFD and the Distribution Matching loss.

For features of several network layers, labels assigning every sample to a segment (a class, or
candidate x class when several candidate sets are scored at once) and per-segment targets:

    d_s = sum_layers || mean_{i: labels_i = s} features[i] - targets[s] ||^2

One fused pass per layer reads every feature element once, in its own dtype, and accumulates in
fp32 (fp64 for fp64 inputs); nothing of size N x D is written. Backends: ``reference`` (pure
PyTorch, :func:`class_mean_distance_ref`), ``cpp``, ``cuda`` and ``triton``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hpd_fast import _backend

__all__ = [
    "class_mean_distance",
    "class_mean_distance_ref",
    "class_means",
    "ClassMeanAccumulator",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TensorOrList = Tensor | Sequence[Tensor]


# --------------------------------------------------------------------------------------------
# Input checking (shared by every public function here)
# --------------------------------------------------------------------------------------------


def _as_layers(x: TensorOrList, name: str) -> tuple[list[Tensor], bool]:
    if isinstance(x, Tensor):
        return [x], True
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name} is an empty list; give at least one tensor")
        for i, t in enumerate(x):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        return list(x), False
    raise TypeError(f"{name} must be a tensor or a list/tuple of tensors, got {type(x).__name__}")


def _check_float(t: Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64"
        )


def _check_labels(labels: Tensor, n: int, device: torch.device) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but features have N = {n} rows")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but features are on {device}")
    return labels.long()


def _check_label_range(labels: Tensor, num_segments: int) -> None:
    # Data-dependent: skipped while torch.compile traces. The kernels check it themselves: the
    # C++ CPU kernels raise, the CUDA kernels fail a device-side assert, the Triton forward fails
    # in scatter_add_ and its backward never reads out of bounds.
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_segments:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels contains {bad}, outside [0, num_segments={num_segments})")


def _flatten_features(features: list[Tensor]) -> tuple[list[Tensor], int, torch.device]:
    first = features[0]
    if first.dim() < 1:
        raise ValueError("features[0] must have a batch dimension [N, ...]")
    n, device = first.shape[0], first.device
    flat = []
    for i, f in enumerate(features):
        _check_float(f, f"features[{i}]")
        if f.dim() < 1 or f.shape[0] != n:
            raise ValueError(
                f"features[{i}] has shape {tuple(f.shape)}; every layer needs the same N = {n}"
            )
        if f.device != device:
            raise ValueError(f"features[{i}] is on {f.device} but features[0] is on {device}")
        flat.append(f.reshape(n, math.prod(f.shape[1:])))
    return flat, n, device


def _prepare(features, labels, targets, num_segments):
    feats, single = _as_layers(features, "features")
    tgts, single_t = _as_layers(targets, "targets")
    if len(tgts) != len(feats):
        raise ValueError(f"features has {len(feats)} layers but targets has {len(tgts)}")
    feats, n, device = _flatten_features(feats)
    labels = _check_labels(labels, n, device)
    s = tgts[0].shape[0] if tgts[0].dim() >= 1 else -1
    if num_segments is not None:
        if not isinstance(num_segments, int) or isinstance(num_segments, bool) or num_segments < 0:
            raise ValueError(f"num_segments must be a non-negative int, got {num_segments!r}")
        if s != num_segments:
            raise ValueError(f"targets has {s} rows but num_segments = {num_segments}")
    flat_t = []
    for i, (f, t) in enumerate(zip(feats, tgts)):
        _check_float(t, f"targets[{i}]")
        if t.device != device:
            raise ValueError(f"targets[{i}] is on {t.device} but features are on {device}")
        if t.dim() < 1 or t.shape[0] != s or t[0].numel() != f.shape[1]:
            raise ValueError(
                f"targets[{i}] has shape {tuple(t.shape)}; expected [{s}, {f.shape[1]}] "
                f"(one row per segment, matching features[{i}] flattened from dim 1)"
            )
        flat_t.append(t.reshape(s, -1))
    _check_label_range(labels, s)
    wide = any(t.dtype == torch.float64 for t in feats + flat_t)
    acc = torch.float64 if wide else torch.float32
    if wide:
        feats = [f.to(acc) for f in feats]
    flat_t = [t.to(acc) for t in flat_t]
    return feats, labels, flat_t, s


# --------------------------------------------------------------------------------------------
# Reference implementation (the oracle)
# --------------------------------------------------------------------------------------------


def _segment_sums(x: Tensor, labels: Tensor, s: int, acc: torch.dtype) -> Tensor:
    return torch.zeros(s, x.shape[1], dtype=acc, device=x.device).index_add_(0, labels, x.to(acc))


def _segment_counts(labels: Tensor, s: int, acc: torch.dtype) -> Tensor:
    ones = torch.ones(labels.shape[0], dtype=acc, device=labels.device)
    return torch.zeros(s, dtype=acc, device=labels.device).index_add_(0, labels, ones)


def _ref_impl(feats: list[Tensor], labels: Tensor, tgts: list[Tensor], s: int) -> Tensor:
    acc = tgts[0].dtype
    counts = _segment_counts(labels, s, acc)
    present = (counts > 0).to(acc).unsqueeze(1)
    inv = 1.0 / counts.clamp(min=1).unsqueeze(1)
    dist = torch.zeros(s, dtype=acc, device=labels.device)
    for f, t in zip(feats, tgts):
        diff = (_segment_sums(f, labels, s, acc) * inv - t) * present
        dist = dist + diff.square().sum(1)
    return dist


def class_mean_distance_ref(
    features: TensorOrList,
    labels: Tensor,
    targets: TensorOrList,
    *,
    num_segments: int | None = None,
    reduction: str = "sum",
) -> Tensor:
    """Pure-PyTorch :func:`class_mean_distance` (index_add_ then one distance); the oracle."""
    _check_reduction(reduction)
    feats, labels, tgts, s = _prepare(features, labels, targets, num_segments)
    dist = _ref_impl(feats, labels, tgts, s)
    return dist.sum() if reduction == "sum" else dist


# --------------------------------------------------------------------------------------------
# Kernel-backed implementations: torch.library registration, fake kernels, autograd
# --------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    features, labels, targets = inputs
    _, diff, counts = output
    ctx.save_for_backward(labels, diff, counts)
    # Unused outputs (diff, counts) then arrive as None instead of zero tensors to add.
    ctx.set_materialize_grads(False)
    ctx.layer_dtypes = [f.dtype for f in features]
    ctx.layer_cols = [f.shape[1] for f in features]


def _make_backward(backward_op):
    def backward(ctx, grad_dist, grad_diff, grad_counts):
        labels, diff, counts = ctx.saved_tensors
        # counts is integer-valued (no gradient). diff = mean - target is an output too: its
        # gradient only arrives in higher-order differentiation, where it must not be dropped.
        if grad_dist is None:
            grad_dist = torch.zeros_like(counts)
        inv = 1.0 / counts.clamp(min=1)
        starts = [0, *itertools.accumulate(ctx.layer_cols)][:-1]
        grad_features = grad_targets = None
        if ctx.needs_input_grad[0]:
            scale = 2.0 * grad_dist * inv
            grad_features = []
            for c0, d, dt in zip(starts, ctx.layer_cols, ctx.layer_dtypes):
                g = backward_op(scale, diff.narrow(1, c0, d), labels, dt)
                if grad_diff is not None:
                    extra = (grad_diff.narrow(1, c0, d) * inv.unsqueeze(1)).index_select(0, labels)
                    g = g + extra.to(dt)
                grad_features.append(g)
        if ctx.needs_input_grad[2]:
            g = -2.0 * grad_dist.unsqueeze(1) * diff
            if grad_diff is not None:
                g = g - grad_diff * (counts > 0).to(diff.dtype).unsqueeze(1)
            grad_targets = [g.narrow(1, c0, d) for c0, d in zip(starts, ctx.layer_cols)]
        return grad_features, None, grad_targets

    return backward


def _backward_setup_context(ctx, inputs, output) -> None:
    scale, diff, labels, _ = inputs
    ctx.save_for_backward(scale, diff, labels)


def _backward_backward(ctx, grad_out):
    # out[i, j] = scale[s_i] * diff[s_i, j]: its own VJP, in PyTorch (second order is rare).
    scale, diff, labels = ctx.saved_tensors
    seg = torch.zeros_like(diff).index_add_(0, labels, grad_out.to(diff.dtype))
    grad_scale = (seg * diff).sum(1) if ctx.needs_input_grad[0] else None
    grad_diff = seg * scale.unsqueeze(1) if ctx.needs_input_grad[1] else None
    return grad_scale, grad_diff, None, None


def _fake_forward(features, labels, targets):
    s = targets[0].shape[0]
    cols = sum(f.shape[1] for f in features)
    acc = targets[0].dtype
    return (
        targets[0].new_empty((s,), dtype=acc),
        targets[0].new_empty((s, cols), dtype=acc),
        targets[0].new_empty((s,), dtype=acc),
    )


def _fake_backward(scale, diff, labels, dtype):
    return diff.new_empty((labels.shape[0], diff.shape[1]), dtype=dtype)


_REGISTERED: dict[str, bool] = {}


def _register_cpp() -> bool:
    """Attach fake kernels and autograd to the C++ operators (once, after hpd_fast._C loads)."""
    if "cpp" not in _REGISTERED:
        ok = _backend.cpp_loaded()
        if ok:
            torch.library.register_fake("hpd_fast::class_mean_distance")(_fake_forward)
            torch.library.register_fake("hpd_fast::class_mean_distance_backward")(_fake_backward)
            torch.library.register_autograd(
                "hpd_fast::class_mean_distance",
                _make_backward(torch.ops.hpd_fast.class_mean_distance_backward),
                setup_context=_setup_context,
            )
            torch.library.register_autograd(
                "hpd_fast::class_mean_distance_backward",
                _backward_backward,
                setup_context=_backward_setup_context,
            )
        _REGISTERED["cpp"] = ok
    return _REGISTERED["cpp"]


def _triton_ops():
    """The Triton operators (defined on first use, so importing hpd_fast never imports triton)."""
    if "triton" not in _REGISTERED:
        from hpd_fast.ops import _class_mean_distance_triton  # noqa: F401

        torch.library.register_autograd(
            "hpd_fast::class_mean_distance_triton",
            _make_backward(torch.ops.hpd_fast.class_mean_distance_backward_triton),
            setup_context=_setup_context,
        )
        torch.library.register_autograd(
            "hpd_fast::class_mean_distance_backward_triton",
            _backward_backward,
            setup_context=_backward_setup_context,
        )
        _REGISTERED["triton"] = True
    return torch.ops.hpd_fast.class_mean_distance_triton


def _kernel_forward(backend: str, feats, labels, tgts) -> Tensor:
    if backend == "triton":
        op = torch.ops.hpd_fast.class_mean_distance_triton
    else:
        op = torch.ops.hpd_fast.class_mean_distance
    dist, _, _ = op(feats, labels, tgts)
    return dist


# Operators are registered when this module is imported (as torch's own libraries do), so that
# torch.compile never meets a first-use import. Triton is imported only where it can run.
_register_cpp()
if _backend.backend_info()["triton"]["available"]:
    _triton_ops()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")


def class_mean_distance(
    features: TensorOrList,
    labels: Tensor,
    targets: TensorOrList,
    *,
    num_segments: int | None = None,
    reduction: str = "sum",
    backend: str | None = None,
) -> Tensor:
    """Squared distance between per-segment feature means and per-segment targets.

    ``d_s = sum_l || mean_{i: labels_i = s} features[l][i] - targets[l][s] ||^2``

    Args:
        features: ``[N, ...]`` or a list of such tensors, one per network layer (each flattened
            from dim 1 to ``[N, D_l]``); float16, bfloat16, float32 or float64; any strides.
        labels: integer ``[N]`` with values in ``[0, S)``: the segment of every row (a class, or
            ``candidate * num_classes + class`` to score several candidate sets at once).
        targets: ``[S, D]`` (or ``[S, ...]`` matching the features' trailing shape), or a list
            matching ``features`` layer by layer.
        num_segments: ``S``; optional, checked against ``targets`` when given.
        reduction: ``"sum"`` returns a scalar, ``"none"`` returns ``d`` of shape ``[S]``.
        backend: ``None`` (fastest available), ``"reference"``, ``"cpp"``, ``"cuda"`` or
            ``"triton"``.

    Returns:
        float32 (float64 when any input is float64): a scalar or ``[S]``. A segment with no
        member contributes 0, and its target gets no gradient.

    Differentiable with respect to ``features`` and ``targets``.
    """
    _check_reduction(reduction)
    feats, labels, tgts, s = _prepare(features, labels, targets, num_segments)
    chosen = _backend.select_backend("class_mean_distance", labels.device, backend)
    if chosen == "reference":
        dist = _ref_impl(feats, labels, tgts, s)
    else:
        dist = _kernel_forward(chosen, feats, labels, tgts)
    return dist.sum() if reduction == "sum" else dist


def _segment_means(
    feats: list[Tensor], labels: Tensor, s: int, acc: torch.dtype, backend: str | None
) -> tuple[list[Tensor], Tensor]:
    """Per-segment means ``[S, D_l]`` of every layer and the counts ``[S]``, in ``acc``.

    Through the library's own bucketed kernels (the op with zero targets: its ``diff`` output
    is the mean), whose sums run in a fixed order: the same numbers run after run on every
    device, where ``index_add_`` would add with float atomics on CUDA. ``index_add_`` is left
    to the reference backend (CPU without the C++ build, or a func transform).
    """
    device = labels.device
    chosen = "reference"
    if s > 0 and not _backend.under_func_transform():
        chosen = _backend.select_backend("class_mean_distance", device, backend)
    if chosen == "reference":
        counts = _segment_counts(labels, s, acc)
        inv = 1.0 / counts.clamp(min=1).unsqueeze(1)
        return [_segment_sums(f, labels, s, acc) * inv for f in feats], counts
    if chosen == "triton":
        op = _triton_ops()
    else:
        op = torch.ops.hpd_fast.class_mean_distance
    feats = [f if f.dtype == acc or acc == torch.float32 else f.to(acc) for f in feats]
    zeros = [torch.zeros(s, f.shape[1], dtype=acc, device=device) for f in feats]
    _, diff, counts = op(feats, labels, zeros)
    cols = [0, *itertools.accumulate(f.shape[1] for f in feats)]
    return [diff[:, a:b] for a, b in itertools.pairwise(cols)], counts


def class_means(
    features: Tensor, labels: Tensor, num_segments: int, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Per-segment means of ``features`` ``[N, ...]`` -> (``[S, ...]`` means, ``[S]`` counts).

    Accumulates in fp32 (fp64 for fp64 input) in a fixed order (deterministic on the GPU too);
    an empty segment has mean 0 and count 0. Differentiable with respect to ``features``.
    ``backend`` as in :func:`class_mean_distance`.
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    feats, n, device = _flatten_features([features])
    labels = _check_labels(labels, n, device)
    if not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be a non-negative int, got {num_segments!r}")
    _check_label_range(labels, num_segments)
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    (means,), counts = _segment_means(feats, labels, num_segments, acc, backend)
    return means.reshape(num_segments, *features.shape[1:]), counts


class ClassMeanAccumulator:
    """Streaming per-segment means over a data loader, without keeping the features.

    >>> acc = ClassMeanAccumulator(num_classes)
    >>> for x, y in loader:
    ...     acc.update([net_block(x) for net_block in blocks], y)
    >>> targets = acc.means()          # list of [S, D_l], ready for class_mean_distance

    ``update`` accepts one tensor or a list of layers (the same number every call); sums are kept
    in float64 so long streams lose no precision. ``counts`` is ``[S]`` (float64). Each batch
    is reduced by the library's fixed-order kernels (``backend`` as in
    :func:`class_mean_distance`), so the means are the same run after run, on the GPU too.
    """

    def __init__(self, num_segments: int, *, backend: str | None = None) -> None:
        if not isinstance(num_segments, int) or isinstance(num_segments, bool) or num_segments < 1:
            raise ValueError(f"num_segments must be a positive int, got {num_segments!r}")
        self.num_segments = num_segments
        self.backend = backend
        self._sums: list[Tensor] | None = None
        self._shapes: list[torch.Size] | None = None
        self._single = True
        self.counts: Tensor | None = None

    @torch.no_grad()
    def update(self, features: TensorOrList, labels: Tensor) -> None:
        """Add a batch: ``features`` ``[B, ...]`` (or a list of layers), ``labels`` ``[B]``."""
        layers, single = _as_layers(features, "features")
        feats, n, device = _flatten_features(layers)
        labels = _check_labels(labels, n, device)
        _check_label_range(labels, self.num_segments)
        s = self.num_segments
        if self._sums is None:
            self._single = single
            self._shapes = [f.shape[1:] for f in layers]
            self._sums = [
                torch.zeros(s, f.shape[1], dtype=torch.float64, device=device) for f in feats
            ]
            self.counts = torch.zeros(s, dtype=torch.float64, device=device)
        if len(feats) != len(self._sums):
            raise ValueError(
                f"features has {len(feats)} layers but earlier updates had {len(self._sums)}"
            )
        for i, (f, total) in enumerate(zip(feats, self._sums)):  # validate every layer first
            if f.shape[1] != total.shape[1] or f.device != total.device:
                raise ValueError(
                    f"features[{i}] has {f.shape[1]} values per row on {f.device}; earlier "
                    f"updates had {total.shape[1]} on {total.device}"
                )
        wide = [f.to(torch.float64) for f in feats]
        means, counts = _segment_means(wide, labels, s, torch.float64, self.backend)
        for m, total in zip(means, self._sums):  # then change state (all or nothing)
            total.addcmul_(m, counts.unsqueeze(1))  # batch sums: mean * count, in fp64
        self.counts.add_(counts)

    def means(self, dtype: torch.dtype = torch.float32) -> Tensor | list[Tensor]:
        """Per-segment means, ``[S, ...]`` per layer (a list when updates gave lists).

        Segments never seen have mean 0; check ``counts`` if that matters.
        """
        if self._sums is None:
            raise RuntimeError("ClassMeanAccumulator.means() called before any update()")
        inv = 1.0 / self.counts.clamp(min=1).unsqueeze(1)
        out = [
            (total * inv).to(dtype).reshape(self.num_segments, *shape)
            for total, shape in zip(self._sums, self._shapes)
        ]
        return out[0] if self._single else out
