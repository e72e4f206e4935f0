"""Distribution-matching (DM) and gradient-matching (DC) losses.

Both compare a synthetic set with real data class by class through a randomly initialised
network, with *one augmentation seed per class shared by the real and the synthetic batch* (the
same transformation is applied to both, so the comparison is not blurred by augmentation noise).

DM (Zhao & Bilen, WACV 2023)::

    L_DM = sum_c sum_l || mean_{x in R_c} phi_l(A_c(x)) - mean_{s in S_c} phi_l(A_c(s)) ||^2

computed with the fused segmented-mean distance :func:`hpd_fast.class_mean_distance`
(segment = class); the real side is a constant.

DC (Zhao et al., ICLR 2021)::

    L_DC = sum_c D(grad_theta CE(net(A_c(S_c)), c), grad_theta CE(net(A_c(R_c)), c))
    D(G_syn, G_real) = sum_layers sum_{output channels o} (1 - cos(G_syn[o], G_real[o]))

where each parameter gradient is viewed as ``[out_channels, -1]`` (a conv kernel
``[O, I, kh, kw]`` gives ``O`` rows of ``I * kh * kw``; a linear weight ``[O, I]`` gives ``O``
rows). One-dimensional parameters (biases, normalisation affine parameters) are left out by
default, as in the published metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpd_fast._common import Augment, derive_seed
from hpd_fast.models import get_model
from hpd_fast.ops.class_mean_distance import class_mean_distance

__all__ = [
    "Augment",
    "FeatureFn",
    "dc_loss",
    "derive_seed",
    "dm_loss",
    "gradient_match_distance",
    "layer_features",
    "random_network",
]

#: ``features(x [B, C, H, W]) -> [B, ...]`` or a list of such tensors (one per layer).
FeatureFn = Callable[[Tensor], Tensor | Sequence[Tensor]]

_COS_EPS = 1e-6  # added to the norm product, as in the published metric


# --------------------------------------------------------------------------------------------
# seeds and random networks
# --------------------------------------------------------------------------------------------


def random_network(
    name: str,
    channel: int,
    num_classes: int,
    im_size: tuple[int, int],
    seed: int,
    device: torch.device | str | None = None,
    **kw: Any,
) -> nn.Module:
    """A freshly initialised ``get_model(name, ...)`` whose weights depend only on ``seed``.

    Built on the CPU inside ``torch.random.fork_rng`` (the caller's global RNG state is left
    exactly as it was), then moved to ``device``; parameters do not require grad.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = get_model(name, channel, num_classes, im_size, **kw)
    return net.to(device).requires_grad_(False)


def layer_features(net: nn.Module) -> FeatureFn:
    """``x -> [block outputs]`` when ``net`` has ``block_outputs`` (ConvNet), else ``[embed(x)]``."""
    if hasattr(net, "block_outputs"):
        return net.block_outputs
    if hasattr(net, "embed"):
        return lambda x: [net.embed(x)]
    raise ValueError(f"{type(net).__name__} has neither block_outputs nor embed")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_set(images: Tensor, labels: Tensor, name: str, num_classes: int) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{name}_images must be a floating tensor [N, C, H, W]")
    if (
        not isinstance(labels, Tensor)
        or labels.dim() != 1
        or labels.dtype != torch.int64
        or labels.shape[0] != images.shape[0]
    ):
        raise ValueError(
            f"{name}_labels must be an int64 tensor [N] with one label per image "
            f"(N = {images.shape[0]})"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}_labels must lie in [0, {num_classes})")


def _class_seeds(seeds: Sequence[int] | None, num_classes: int, augment: Augment | None):
    if augment is None:
        return None
    if seeds is None or len(seeds) != num_classes:
        raise ValueError(
            f"seeds must give one augmentation seed per class ({num_classes}) when augment is set"
        )
    return [int(s) for s in seeds]


def _augment_by_class(
    images: Tensor, labels: Tensor, num_classes: int, augment: Augment | None, seeds
) -> tuple[Tensor, Tensor]:
    """Augment each class's rows with that class's seed; returns (images, labels) class-sorted."""
    xs, ys = [], []
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        x = images.index_select(0, idx)
        if augment is not None:
            x = augment(x, seeds[c])
        xs.append(x)
        ys.append(labels.index_select(0, idx))
    return torch.cat(xs), torch.cat(ys)


def _as_list(feats: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [feats] if isinstance(feats, Tensor) else list(feats)


# --------------------------------------------------------------------------------------------
# DM
# --------------------------------------------------------------------------------------------


def dm_loss(
    features: FeatureFn,
    real_images: Tensor,
    real_labels: Tensor,
    syn_images: Tensor,
    syn_labels: Tensor,
    num_classes: int,
    *,
    augment: Augment | None = None,
    seeds: Sequence[int] | None = None,
    backend: str | None = None,
) -> Tensor:
    """Distribution-matching loss between a real batch and a synthetic set.

    ``sum_c sum_l || mean phi_l(A_c(real_c)) - mean phi_l(A_c(syn_c)) ||^2`` where ``A_c`` is
    ``augment(., seeds[c])`` (use a siamese augmentation so that every image of the class gets
    the same transformation). Classes without synthetic images contribute 0; every class that
    has synthetic images must have real ones. The real means are computed class by class
    without a graph; the synthetic set goes through ``features`` in one pass and the distance
    is the fused :func:`hpd_fast.class_mean_distance` (segment = class).

    Args:
        features: the embedding ``phi``: ``x [B, C, H, W] -> [B, ...]`` or a list of layer
            outputs (e.g. ``ConvNet.embed`` or ``ConvNet.block_outputs``). Called once on the
            real batch (without a graph) and once on the synthetic set.
        real_images: float ``[N, C, H, W]``; real_labels: int64 ``[N]`` in ``[0, K)``.
        syn_images: float ``[M, C, H, W]`` (gradients flow to it); syn_labels: int64 ``[M]``.
        num_classes: ``K``.
        augment: optional ``augment(x, seed)``; seeds: ``K`` ints, one per class.
        backend: forwarded to :func:`hpd_fast.class_mean_distance`.

    Returns:
        0-dim float32 tensor (float64 for float64 features).
    """
    _check_set(real_images, real_labels, "real", num_classes)
    _check_set(syn_images, syn_labels, "syn", num_classes)
    seeds = _class_seeds(seeds, num_classes, augment)
    present_real = torch.bincount(real_labels, minlength=num_classes) > 0
    present_syn = torch.bincount(syn_labels, minlength=num_classes) > 0
    missing = (present_syn & ~present_real).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"real_labels has no image of class(es) {missing} present in syn_labels")

    # Real side: one class at a time without a graph (peak memory of one class batch), only
    # for the classes that have synthetic images; other targets stay 0 and are not used.
    targets: list[Tensor] | None = None
    with torch.no_grad():
        for c in present_syn.nonzero().flatten().tolist():
            x = real_images[real_labels == c]
            if augment is not None:
                x = augment(x, seeds[c])
            feats = _as_list(features(x))
            if targets is None:
                acc = [torch.float64 if f.dtype == torch.float64 else torch.float32 for f in feats]
                targets = [
                    f.new_zeros((num_classes, *f.shape[1:]), dtype=a) for f, a in zip(feats, acc)
                ]
            for t, f in zip(targets, feats):
                t[c] = f.to(t.dtype).mean(0)
    if targets is None:  # no synthetic image at all
        return syn_images.new_zeros(())
    xs, ys = _augment_by_class(syn_images, syn_labels, num_classes, augment, seeds)
    syn_feats = _as_list(features(xs))
    if len(syn_feats) != len(targets):
        raise ValueError("features returned a different number of layers for real and syn data")
    return class_mean_distance(
        syn_feats, ys, targets, num_segments=num_classes, reduction="sum", backend=backend
    )


# --------------------------------------------------------------------------------------------
# DC
# --------------------------------------------------------------------------------------------


def gradient_match_distance(
    grads_syn: Sequence[Tensor], grads_real: Sequence[Tensor], *, include_1d: bool = False
) -> Tensor:
    """Layer-wise gradient distance ``sum_layers sum_o (1 - cos(g_syn[o], g_real[o]))``.

    Args:
        grads_syn, grads_real: matching lists of parameter gradients (same shapes).
            Each is viewed as ``[shape[0], -1]`` (one row per output channel) and the cosine is
            ``<a, b> / (|a| |b| + 1e-6)``.
        include_1d: also match 1-D gradients (biases, norm parameters) as one row each. The
            published metric skips them (default).

    Returns:
        0-dim tensor in the gradients' dtype (differentiable in both).
    """
    if len(grads_syn) != len(grads_real):
        raise ValueError(
            f"grads_syn has {len(grads_syn)} tensors but grads_real has {len(grads_real)}"
        )
    total = None
    for i, (gs, gr) in enumerate(zip(grads_syn, grads_real)):
        if gs.shape != gr.shape:
            raise ValueError(f"gradient {i}: shapes {tuple(gs.shape)} and {tuple(gr.shape)} differ")
        if gs.dim() == 1:
            if not include_1d:
                continue
            gs, gr = gs.unsqueeze(0), gr.unsqueeze(0)
        a, b = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + _COS_EPS)
        d = (1.0 - cos).sum()
        total = d if total is None else total + d
    if total is None:
        ref = grads_syn[0] if len(grads_syn) else torch.zeros(())
        return ref.new_zeros(())
    return total


def dc_loss(
    net: nn.Module,
    real_images: Tensor,
    real_labels: Tensor,
    syn_images: Tensor,
    syn_labels: Tensor,
    num_classes: int,
    *,
    augment: Augment | None = None,
    seeds: Sequence[int] | None = None,
    include_1d: bool = False,
) -> Tensor:
    """Gradient-matching loss, summed over the classes present in ``syn_labels``.

    For each class ``c``: ``g_real = grad_theta CE(net(A_c(real_c)), c)`` (a constant) and
    ``g_syn = grad_theta CE(net(A_c(syn_c)), c)`` (with a graph, so that the loss is
    differentiable in ``syn_images``); the class term is
    :func:`gradient_match_distance` ``(g_syn, g_real)``. ``A_c = augment(., seeds[c])``.

    The gradients are taken with respect to ``net``'s parameters through ``torch.autograd.grad``
    (nothing is accumulated into their ``.grad``). Backpropagating the returned loss does reach
    the parameters, so call ``torch.autograd.backward(loss, inputs=[...])`` to restrict it.

    Args:
        net: classifier ``x [B, C, H, W] -> logits [B, K]``; must not update buffers in a way
            that matters (use GroupNorm/"instancenorm" or eval-mode BatchNorm).
        real_images, real_labels, syn_images, syn_labels, num_classes: as in :func:`dm_loss`.
        augment, seeds: as in :func:`dm_loss`.
        include_1d: see :func:`gradient_match_distance`.

    Returns:
        0-dim tensor.
    """
    _check_set(real_images, real_labels, "real", num_classes)
    _check_set(syn_images, syn_labels, "syn", num_classes)
    seeds = _class_seeds(seeds, num_classes, augment)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError("net has no parameters that require grad")
    total = None
    for c in range(num_classes):
        s_idx = (syn_labels == c).nonzero().squeeze(1)
        if s_idx.numel() == 0:
            continue
        r_idx = (real_labels == c).nonzero().squeeze(1)
        if r_idx.numel() == 0:
            raise ValueError(f"real_labels has no image of class {c} present in syn_labels")
        xr = real_images.index_select(0, r_idx)
        xs = syn_images.index_select(0, s_idx)
        if augment is not None:
            xr, xs = augment(xr, seeds[c]), augment(xs, seeds[c])
        yr = real_labels.index_select(0, r_idx)
        ys = syn_labels.index_select(0, s_idx)
        g_real = torch.autograd.grad(F.cross_entropy(net(xr.detach()), yr), params)
        g_real = [g.detach() for g in g_real]
        g_syn = torch.autograd.grad(F.cross_entropy(net(xs), ys), params, create_graph=True)
        d = gradient_match_distance(g_syn, g_real, include_1d=include_1d)
        total = d if total is None else total + d
    if total is None:
        return syn_images.new_zeros(())
    return total
