"""Memory-lean rendering of generator latents.

In GAN-prior distillation the generator is frozen and only the latents ``(w, f)`` are learned.
Keeping the generator's autograd graph for every synthetic image costs memory proportional to
the number of images; :func:`render` instead renders without a graph and, in the backward pass,
re-renders ``chunk_size`` images at a time with a graph to push the incoming image gradient to
``w`` and ``f``. Peak generator activation memory is that of one chunk; the price is one extra
forward pass of the generator per backward.
"""

from __future__ import annotations

import operator

import torch

from hpd_fast.generators.base import StagedGenerator

__all__ = ["render"]


def _rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows a:b of a batch-M tensor, or the whole tensor when it is shared (batch 1)."""
    return t if t.shape[0] == 1 else t[a:b]


class _LeanRender(torch.autograd.Function):
    """images = generator.render(w, f, stage), recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, w, f, generator, stage, chunk_size, m):  # type: ignore[override]
        ctx.generator, ctx.stage, ctx.chunk_size, ctx.m = generator, stage, chunk_size, m
        ctx.save_for_backward(w, f)
        out = None
        with torch.no_grad():
            for a in range(0, m, chunk_size):
                b = min(a + chunk_size, m)
                img = generator.render(_rows(w, a, b), _rows(f, a, b), stage)
                if out is None:  # allocate once; no torch.cat copy of all images
                    out = img.new_empty((m, *img.shape[1:]))
                out[a:b] = img
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        w, f = ctx.saved_tensors
        need_w, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_w = torch.zeros_like(w) if need_w else None
        grad_f = torch.zeros_like(f) if need_f else None
        m, cs = ctx.m, ctx.chunk_size
        used = [False, False]  # a latent the images do not depend on gets None, as in autograd
        for a in range(0, m, cs):
            b = min(a + cs, m)
            with torch.enable_grad():
                wc = _rows(w, a, b).detach().requires_grad_(need_w)
                fc = _rows(f, a, b).detach().requires_grad_(need_f)
                img = ctx.generator.render(wc, fc, ctx.stage)
                inputs = [t for t, need in ((wc, need_w), (fc, need_f)) if need]
                # autograd.grad (not backward) so frozen generator weights gain no .grad
                grads = torch.autograd.grad(img, inputs, grad_out[a:b], allow_unused=True)
            grads = list(grads)
            for i, (need, acc, src) in enumerate(((need_w, grad_w, w), (need_f, grad_f, f))):
                if not need:
                    continue
                g = grads.pop(0)
                if g is None:
                    continue
                used[i] = True
                if src.shape[0] == 1:
                    acc += g  # shared latent: sum over every chunk
                else:
                    acc[a:b] += g
        grad_w = grad_w if used[0] else None
        grad_f = grad_f if used[1] else None
        return grad_w, grad_f, None, None, None, None


def render(
    generator: StagedGenerator,
    w: torch.Tensor,
    f: torch.Tensor,
    stage: int,
    chunk_size: int | None = 10,
) -> torch.Tensor:
    """Render images from latents at ``stage``, keeping at most one chunk's graph in backward.

    Args:
        generator: a :class:`~hpd_fast.generators.StagedGenerator` (treated as frozen: with
            ``chunk_size`` set its parameters receive no gradient).
        w: [M or 1, *generator.w_shape] floating; a batch of 1 is one code shared by all M
            images, and its gradient is the sum over the images.
        f: [M or 1, *generator.feature_shape(stage)] floating, the feature after ``stage``.
        stage: 1 <= stage <= generator.num_stages.
        chunk_size: images re-rendered per backward chunk (also the forward chunk). None keeps
            the ordinary autograd graph of the whole batch (faster when memory allows; then
            the generator's parameters do receive gradients).

    Returns:
        images [M, C, H, W] in the generator's dtype, normalised like the real data. The result
        is differentiable once with respect to ``w`` and ``f`` (no double backward when
        ``chunk_size`` is set); the gradients equal plain autograd's.

    Raises:
        ValueError: bad stage, shapes, or chunk_size.
    """
    if not isinstance(generator, StagedGenerator):
        raise ValueError(f"generator must be a StagedGenerator, got {type(generator).__name__}")
    w_b, _ = generator.check_latents(w, f, stage)
    if chunk_size is None:
        return generator.render(w, f, stage)
    try:
        chunk_size = operator.index(chunk_size)
    except TypeError:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}") from None
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    return _LeanRender.apply(w, f, generator, stage, chunk_size, w_b.shape[0])
