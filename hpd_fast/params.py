"""Flat parameter vectors for networks.

Trajectory matching keeps a student's parameters as one 1-D tensor θ of length P: expert
checkpoints are stored that way, a student step is ``θ - α g`` on the flat vector, and the
replay sweep differentiates through ``functional_forward(module, θ, x)``. The layout (names and
shapes) always follows ``module.named_parameters()`` order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "Layout",
    "check_replayable",
    "flatten_params",
    "functional_forward",
    "load_flat_params_",
    "num_params",
    "param_layout",
    "unflatten_params",
]

Layout = list[tuple[str, tuple[int, ...]]]


def param_layout(module: nn.Module) -> Layout:
    """(name, shape) of every parameter of ``module`` in ``named_parameters()`` order."""
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


def _layout_of(layout_or_module: nn.Module | Sequence[tuple[str, Sequence[int]]]) -> Layout:
    if isinstance(layout_or_module, nn.Module):
        return param_layout(layout_or_module)
    return [(str(name), tuple(int(s) for s in shape)) for name, shape in layout_or_module]


def num_params(layout_or_module: nn.Module | Sequence[tuple[str, Sequence[int]]]) -> int:
    """Total number of scalars P described by a layout or held by a module."""
    return sum(math.prod(shape) for _, shape in _layout_of(layout_or_module))


def flatten_params(module: nn.Module) -> torch.Tensor:
    """Concatenate the detached parameters of ``module`` into one new vector.

    Returns:
        Tensor [P] with the parameters' common dtype and device, in ``named_parameters()``
        order. It does not share memory with the parameters.

    Raises:
        ValueError: if ``module`` has no parameters, or its parameters mix dtypes or devices.
    """
    params = [p for _, p in module.named_parameters()]
    if not params:
        raise ValueError(f"module {type(module).__name__} has no parameters to flatten")
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise ValueError(f"module parameters have mixed dtypes {sorted(map(str, dtypes))}")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"module parameters are on several devices {sorted(map(str, devices))}")
    return torch.cat([p.detach().reshape(-1) for p in params])


def unflatten_params(
    flat: torch.Tensor, layout_or_module: nn.Module | Sequence[tuple[str, Sequence[int]]]
) -> dict[str, torch.Tensor]:
    """Split a flat vector into named tensors.

    Args:
        flat: Tensor [P], any dtype and device.
        layout_or_module: a layout from :func:`param_layout`, or the module itself.

    Returns:
        ``{name: view of flat reshaped to shape}`` in layout order. The values are views, so
        gradients of anything computed from them flow back to ``flat``.

    Raises:
        ValueError: if ``flat`` is not 1-D or its length differs from P.
    """
    layout = _layout_of(layout_or_module)
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        shape = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
        raise ValueError(f"flat must be a 1-D tensor, got {shape}")
    sizes = [math.prod(shape) for _, shape in layout]
    total = sum(sizes)
    if flat.numel() != total:
        raise ValueError(f"flat has {flat.numel()} elements but the layout needs {total}")
    chunks = torch.split(flat, sizes)
    return {name: c.view(shape) for (name, shape), c in zip(layout, chunks, strict=True)}


def load_flat_params_(module: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy ``flat`` (Tensor [P]) into the parameters of ``module`` in place, without autograd.

    Values are cast to each parameter's dtype and device. Returns ``module``.

    Raises:
        ValueError: if ``flat`` is not 1-D or its length differs from P.
    """
    pieces = unflatten_params(flat, module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(pieces[name])
    return module


def functional_forward(module: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run ``module(x)`` with its parameters taken from ``flat`` (Tensor [P]).

    Buffers (e.g. BatchNorm running statistics) come from the module itself. The result is
    differentiable with respect to both ``flat`` and ``x`` (also twice, for Hessian-vector
    products). The layout is recomputed on each call: walking ``named_parameters()`` costs far
    less than the forward pass, and stays correct if the module is modified.
    """
    return functional_call(module, unflatten_params(flat, module), (x,))


def check_replayable(module: nn.Module) -> None:
    """Refuse modules whose forward pass in training mode changes their buffers.

    A BatchNorm layer in training mode that tracks running statistics updates them on every
    forward, so a student step recomputed later (trajectory replay) would not see the same
    network state. Such layers are fine in eval mode or with ``track_running_stats=False``.

    Raises:
        ValueError: naming the offending submodules and how to fix them.
    """
    bad = [
        name or type(module).__name__
        for name, m in module.named_modules()
        if isinstance(m, _NormBase) and m.training and m.track_running_stats
    ]
    if bad:
        raise ValueError(
            "module is not replayable: BatchNorm layer(s) "
            f"{', '.join(bad)} are in training mode and update running statistics on every "
            "forward, so a recomputed student step would differ. Build the student with "
            'norm="instancenorm" (GroupNorm, no running statistics), call .eval() on the '
            "module, or construct the BatchNorm with track_running_stats=False."
        )
