"""ZCA whitening of a dataset, as trajectory matching (MTT) applies it to CIFAR.

MTT fits kornia's ``ZCAWhitening(eps=0.1)`` on the training images in [0, 1] pixel units (no
per-channel normalisation) and feeds the whitened images to every network: experts, the
distillation and the evaluation. This module does the same computation in plain torch::

    X      = training images in [0, 1], flattened to [N, D]      (D = C * H * W)
    mu     = mean of X over the N images                          [D]
    Sigma  = (X - mu)^T (X - mu) / (N - 1)                        [D, D]  (unbiased, as kornia)
    Sigma  = U diag(S) U^T                                        (eigh; S clamped at 0)
    W      = U diag(1 / sqrt(S + reg)) U^T                        the whitening matrix
    W^-1   = U diag(sqrt(S + reg)) U^T                            its inverse (for pictures)
    zca(x) = (x - mu) W                                           per flattened image

The transform is fitted once, in float64 on the CPU (so the whitened dataset is the same
bits on every machine and thread count: expert files and checkpoints record a fingerprint of
it), and stored as ``(mu, U, S, reg)``: one D x D matrix, from which both ``W`` and ``W^-1``
follow exactly. It is applied to images normalised like the dataset (``(x - mean) / std``
per channel): ``whiten`` first undoes that normalisation. For a generator it is a fixed,
differentiable layer after rendering.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["MAX_ZCA_DIM", "ZCA", "ZCA_REGULARIZATION"]

#: Regularisation added to the covariance's eigenvalues: MTT's ``ZCAWhitening(eps=0.1)``.
ZCA_REGULARIZATION = 0.1

#: Largest flattened image size D = C*H*W whitened (64x64 RGB): the transform is a D x D
#: matrix (float64 while fitting: 1.2 GB at this size, growing with D^2).
MAX_ZCA_DIM = 3 * 64 * 64

_CHUNK = 2048  # images per block of the covariance / whitening matmuls


def _stats(values: Sequence[float], c: int, dtype: torch.dtype, device) -> Tensor:
    return torch.tensor(list(values), dtype=dtype, device=device).view(1, c, 1, 1)


class ZCA:
    """A fitted ZCA whitening transform (see the module docstring for the formula).

    Build it with :meth:`fit`; :meth:`whiten` / :meth:`unwhiten` map dataset-normalised
    images ``[B, C, H, W]`` to whitened ones and back (both differentiable).

    Attributes:
        shape: ``(C, H, W)`` of the images it whitens.
        regularization: ``reg`` above.
        mean, std: the dataset's per-channel normalisation (undone before whitening).
        pixel_mean: ``mu`` [D] float64; eigvecs ``U`` [D, D] float64; eigvals ``S`` [D] float64.
        fingerprint: a short identity of the transform (settings and a sample of its values).
    """

    def __init__(
        self,
        pixel_mean: Tensor,
        eigvecs: Tensor,
        eigvals: Tensor,
        *,
        shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        regularization: float = ZCA_REGULARIZATION,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        d = math.prod(self.shape)
        if pixel_mean.shape != (d,) or eigvecs.shape != (d, d) or eigvals.shape != (d,):
            raise ValueError(
                f"ZCA tensors must be [D], [D, D], [D] with D = {d} for images {self.shape}; got "
                f"{tuple(pixel_mean.shape)}, {tuple(eigvecs.shape)}, {tuple(eigvals.shape)}"
            )
        if not (isinstance(regularization, (int, float)) and regularization > 0):
            raise ValueError(f"zca_regularization must be a number > 0, got {regularization!r}")
        self.regularization = float(regularization)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pixel_mean = pixel_mean.detach().to("cpu", torch.float64)
        self.eigvecs = eigvecs.detach().to("cpu", torch.float64)
        self.eigvals = eigvals.detach().to("cpu", torch.float64).clamp_min(0.0)
        self._cache: dict[tuple, Tensor] = {}
        h = hashlib.sha256(
            json.dumps(
                {"shape": self.shape, "reg": self.regularization, "mean": self.mean,
                 "std": self.std}, sort_keys=True
            ).encode()
        )  # fmt: skip
        for t in (self.pixel_mean, self.eigvals, self.matrix(torch.float64).diagonal()):
            h.update(t.to(torch.float32).numpy().tobytes())
        self.fingerprint = h.hexdigest()[:16]

    # ------------------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        images: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        regularization: float = ZCA_REGULARIZATION,
    ) -> ZCA:
        """Fit on training images ``[N, C, H, W]`` normalised with per-channel ``mean``/``std``.

        Raises:
            ValueError: fewer than 2 images, a non-positive ``regularization``, or images
                too large to whiten (``C*H*W`` above :data:`MAX_ZCA_DIM`; the message says why).
        """
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError("images must be a floating tensor [N, C, H, W]")
        n, c, h, w = images.shape
        d = c * h * w
        if d > MAX_ZCA_DIM:
            gib = d * d * 8 / 2**30
            raise ValueError(
                f"zca: whitening {c}x{h}x{w} images needs a {d} x {d} matrix ({gib:.1f} GiB in "
                f"float64 while fitting); ZCA is supported up to D = C*H*W = {MAX_ZCA_DIM} "
                "(64x64 RGB, as MTT uses it on CIFAR): lower --resolution or drop --zca"
            )
        if n < 2:
            raise ValueError(f"zca: fitting needs at least 2 training images, got {n}")
        if not (isinstance(regularization, (int, float)) and regularization > 0):
            raise ValueError(f"zca_regularization must be a number > 0, got {regularization!r}")
        x = images.detach().to("cpu")
        m = _stats(mean, c, torch.float64, "cpu")
        s = _stats(std, c, torch.float64, "cpu")
        mu = torch.zeros(d, dtype=torch.float64)
        for a in range(0, n, _CHUNK):
            mu += (x[a : a + _CHUNK].double() * s + m).reshape(-1, d).sum(0)
        mu /= n
        cov = torch.zeros(d, d, dtype=torch.float64)
        for a in range(0, n, _CHUNK):
            xc = (x[a : a + _CHUNK].double() * s + m).reshape(-1, d) - mu
            cov.addmm_(xc.T, xc)
        cov /= n - 1
        eigvals, eigvecs = torch.linalg.eigh(cov)
        return cls(
            mu, eigvecs, eigvals, shape=(c, h, w), mean=mean, std=std, regularization=regularization
        )

    # ---------------------------------------------------------------------------- matrices
    def matrix(self, dtype: torch.dtype = torch.float32, device=None, inverse: bool = False):
        """``W`` (or ``W^-1`` with ``inverse=True``) as a [D, D] tensor (cached)."""
        key = (dtype, str(device), inverse)
        if key not in self._cache:
            scale = (self.eigvals + self.regularization).pow(0.5 if inverse else -0.5)
            mat = (self.eigvecs * scale) @ self.eigvecs.T
            self._cache[key] = mat.to(device=device, dtype=dtype)
        return self._cache[key]

    def _check(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be [B, {', '.join(map(str, self.shape))}], got {got}")

    def whiten(self, x: Tensor) -> Tensor:
        """Dataset-normalised images ``[B, C, H, W]`` -> whitened images (same shape, dtype)."""
        self._check(x, "images")
        c = self.shape[0]
        pix = x * _stats(self.std, c, x.dtype, x.device) + _stats(self.mean, c, x.dtype, x.device)
        mu = self.pixel_mean.to(x.device, x.dtype)
        out = (pix.reshape(x.shape[0], -1) - mu) @ self.matrix(x.dtype, x.device)
        return out.reshape(x.shape)

    def unwhiten(self, x: Tensor) -> Tensor:
        """Whitened images ``[B, C, H, W]`` -> dataset-normalised images (inverse of whiten)."""
        self._check(x, "images")
        c = self.shape[0]
        mu = self.pixel_mean.to(x.device, x.dtype)
        pix = x.reshape(x.shape[0], -1) @ self.matrix(x.dtype, x.device, inverse=True) + mu
        pix = pix.reshape(x.shape)
        return (pix - _stats(self.mean, c, x.dtype, x.device)) / _stats(
            self.std, c, x.dtype, x.device
        )

    @torch.no_grad()
    def whiten_dataset(self, x: Tensor) -> Tensor:
        """:meth:`whiten` for a whole split, in float64 on the CPU, chunk by chunk (the
        same bits on every machine); returns float32 on the CPU."""
        self._check(x, "images")
        out = torch.empty(x.shape, dtype=torch.float32)
        for a in range(0, x.shape[0], _CHUNK):
            out[a : a + _CHUNK] = self.whiten(x[a : a + _CHUNK].to("cpu", torch.float64)).float()
        return out

    # ------------------------------------------------------------------------------- files
    def identity(self) -> dict[str, object]:
        """JSON-able description: regularisation and fingerprint (recorded by runs, experts)."""
        return {"regularization": self.regularization, "fingerprint": self.fingerprint}

    def state_tensors(self, prefix: str = "zca") -> dict[str, Tensor]:
        """The tensors that define it (for safetensors): ``prefix.pixel_mean`` [D],
        ``prefix.eigvecs`` [D, D], ``prefix.eigvals`` [D] (float64)."""
        return {
            f"{prefix}.pixel_mean": self.pixel_mean,
            f"{prefix}.eigvecs": self.eigvecs.contiguous(),
            f"{prefix}.eigvals": self.eigvals,
        }

    def state_meta(self) -> dict[str, object]:
        """The rest of its definition (JSON)."""
        return {
            "shape": list(self.shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "regularization": self.regularization,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_state(
        cls, tensors: Mapping[str, Tensor], meta: Mapping[str, object], prefix: str = "zca"
    ) -> ZCA:
        """Rebuild from :meth:`state_tensors` and :meth:`state_meta` (fingerprint checked)."""
        out = cls(
            tensors[f"{prefix}.pixel_mean"],
            tensors[f"{prefix}.eigvecs"],
            tensors[f"{prefix}.eigvals"],
            shape=meta["shape"],  # type: ignore[arg-type]
            mean=meta["mean"],  # type: ignore[arg-type]
            std=meta["std"],  # type: ignore[arg-type]
            regularization=float(meta["regularization"]),  # type: ignore[arg-type]
        )
        if meta.get("fingerprint") not in (None, out.fingerprint):
            raise ValueError("the stored ZCA transform does not match its recorded fingerprint")
        return out

    def __repr__(self) -> str:
        return (
            f"ZCA(shape={self.shape}, regularization={self.regularization}, "
            f"fingerprint={self.fingerprint!r})"
        )
