"""Adapter for StyleGAN2-ADA / StyleGAN3 / StyleGAN-XL generators loaded with their own code.

The user imports the official code (``dnnlib``, ``torch_utils``) and loads a network; this
module only drives its attributes. Required: ``G.mapping(z, c, truncation_psi=...)`` returning
ws [M, num_ws, w_dim], ``G.z_dim``, ``G.c_dim``, ``G.img_resolution``, ``G.img_channels``,
``G.synthesis`` of one of two layouts:

**Layer-based (StyleGAN3, StyleGAN-XL)** — ``synthesis.input`` and ``synthesis.layer_names``
(the last name is the ToRGB layer), ``num_ws == len(layer_names) + 1``:

    stage 1:   f_1 = synthesis.input(ws[:, 0])
    stage k+1: f_{k+1} = getattr(synthesis, layer_names[k-1])(f_k, ws[:, k], **kw)
    head:      getattr(synthesis, layer_names[-1])(f_K, ws[:, K], **kw) * output_scale

so ``num_stages = len(layer_names)`` (input + every layer but ToRGB). Stage 1 is the
Fourier-feature input, which H-PD never optimises: H-PD's layer k is stage k + 1
(``first_stage=2``); docs/stylegan_layers.md tables the stages of each generator.

**Block-based (StyleGAN2-ADA)** — ``synthesis.block_resolutions`` and blocks ``b4, b8, ...``
with ``num_conv``/``num_torgb``; block i reads ``ws[:, o_i : o_i + num_conv_i + num_torgb_i]``
with ``o_{i+1} = o_i + num_conv_i`` (the official split). A block maps ``(x, img)`` to
``(x, img)``; the feature is both packed along channels, ``f = cat([x, img], 1)`` (img is
absent before the first ToRGB in the "orig"/"resnet" architectures). Stages are all blocks but
the last, which is the head: ``num_stages = len(block_resolutions) - 1``.

The latent ``w`` is the full per-layer w+ code [M, num_ws, w_dim] (optimised as a whole);
latents are computed in the dtype of the mapping output and features are cast back to it after
every stage, so fp16 layers of the official code still give float32 latents.
``synthesis_kwargs`` (default ``{"noise_mode": "const"}``) are passed to every layer/block call;
constant noise keeps rendering deterministic, which the memory-lean render requires.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpd_fast.generators.base import StagedGenerator

__all__ = ["OFFICIAL_CODE", "StyleGANGenerator", "from_stylegan", "load_stylegan_pickle"]


def _attr(obj: Any, name: str, what: str) -> Any:
    if not hasattr(obj, name):
        raise ValueError(f"G must provide {what}.{name} (a StyleGAN2/3/XL generator), it does not")
    return getattr(obj, name)


class StyleGANGenerator(StagedGenerator):
    """:class:`StagedGenerator` over a StyleGAN2/3/XL generator ``G`` (see the module docstring).

    Args:
        G: the generator module (kept as the submodule ``G``; ``.to()`` moves it).
        num_classes: number of dataset classes. Default: ``len(class_map)`` if given, else
            ``G.c_dim`` for conditional generators; required for unconditional ones (labels
            are then only validated, not used).
        class_map: for a conditional G, the generator class of each dataset class (e.g. the
            ImageNet index of each class of an ImageNet subset). Default: identity.
        truncation_psi, truncation_cutoff: passed to ``G.mapping`` when sampling latents.
        mean, std: data normalisation (see :class:`StagedGenerator`).
        synthesis_kwargs: extra keyword arguments of every layer/block call.
        output_range: raw output range of G (StyleGAN: (-1, 1)).
    """

    def __init__(
        self,
        G: nn.Module,
        *,
        num_classes: int | None = None,
        class_map: Sequence[int] | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        synthesis_kwargs: dict[str, Any] | None = None,
        output_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        syn = _attr(G, "synthesis", "G")
        _attr(G, "mapping", "G")
        z_dim = int(_attr(G, "z_dim", "G"))
        c_dim = int(_attr(G, "c_dim", "G"))
        res = int(_attr(G, "img_resolution", "G"))
        channels = int(_attr(G, "img_channels", "G"))
        num_ws = int(getattr(G, "num_ws", None) or _attr(syn, "num_ws", "G.synthesis"))

        if hasattr(syn, "input") and hasattr(syn, "layer_names"):
            layout = "layers"
            names = [str(n) for n in syn.layer_names]
            if len(names) < 1:
                raise ValueError("G.synthesis.layer_names is empty: the generator has no stages")
            if num_ws != len(names) + 1:
                raise ValueError(
                    f"G.num_ws ({num_ws}) must equal len(G.synthesis.layer_names) + 1"
                    f" ({len(names) + 1}): one w for the input layer and one per layer"
                )
            for n in names:
                _attr(syn, n, "G.synthesis")
            num_stages = len(names)
            blocks: list[str] = []
            offsets: list[tuple[int, int]] = []
            has_img: list[bool] = []
        elif hasattr(syn, "block_resolutions"):
            layout = "blocks"
            names = []
            blocks = [f"b{r}" for r in syn.block_resolutions]
            if len(blocks) < 2:
                raise ValueError(
                    "G.synthesis has fewer than two blocks: the last block is the image head, so"
                    " the generator has no stages"
                )
            offsets, has_img, o, img = [], [], 0, False
            for b in blocks:
                block = _attr(syn, b, "G.synthesis")
                n_conv, n_rgb = int(block.num_conv), int(block.num_torgb)
                offsets.append((o, n_conv + n_rgb))
                o += n_conv
                img = img or n_rgb > 0
                has_img.append(img)
            if offsets[-1][0] + offsets[-1][1] != num_ws:
                raise ValueError(
                    f"G.num_ws ({num_ws}) does not match the blocks' num_conv/num_torgb"
                    f" ({offsets[-1][0] + offsets[-1][1]})"
                )
            num_stages = len(blocks) - 1
        else:
            raise ValueError(
                "G.synthesis must have `input` and `layer_names` (StyleGAN3/XL) or"
                " `block_resolutions` with b<res> blocks (StyleGAN2-ADA)"
            )

        if class_map is not None:
            if c_dim == 0:
                raise ValueError("class_map needs a conditional generator (G.c_dim > 0)")
            cmap = [int(c) for c in class_map]
            if not cmap or min(cmap) < 0 or max(cmap) >= c_dim:
                raise ValueError(f"class_map entries must lie in [0, {c_dim}) (G.c_dim)")
            if num_classes is not None and num_classes != len(cmap):
                raise ValueError(
                    f"num_classes ({num_classes}) must equal len(class_map) ({len(cmap)})"
                )
            num_classes = len(cmap)
        elif c_dim > 0:
            if num_classes is not None and num_classes != c_dim:
                raise ValueError(
                    f"num_classes ({num_classes}) differs from G.c_dim ({c_dim}); pass class_map"
                    " to say which generator class each dataset class uses"
                )
            num_classes = c_dim
            cmap = list(range(c_dim))
        else:
            if num_classes is None:
                raise ValueError(
                    "num_classes is required for an unconditional generator (G.c_dim == 0)"
                )
            cmap = []

        super().__init__(
            num_stages=num_stages,
            num_classes=num_classes,
            image_shape=(channels, res, res),
            latent_dim=int(getattr(G, "w_dim", None) or _attr(syn, "w_dim", "G.synthesis")),
            mean=mean,
            std=std,
            output_range=output_range,
        )
        self.G = G
        self.layout = layout
        self.z_dim, self.c_dim, self.num_ws = z_dim, c_dim, num_ws
        self.truncation_psi = float(truncation_psi)
        self.truncation_cutoff = truncation_cutoff
        self.synthesis_kwargs = (
            {"noise_mode": "const"} if synthesis_kwargs is None else dict(synthesis_kwargs)
        )
        self._names, self._blocks, self._offsets, self._has_img = names, blocks, offsets, has_img
        self.register_buffer("class_map", torch.tensor(cmap, dtype=torch.long), persistent=False)
        self._adopt_device()

    # ------------------------------------------------------------------ latents
    def _sample_w(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        ref = next(self.G.parameters(), self.mean)
        z = torch.randn(labels.shape[0], self.z_dim, generator=gen)
        z = z.to(device=labels.device, dtype=ref.dtype)
        if self.c_dim > 0:
            c = F.one_hot(self.class_map[labels], self.c_dim).to(z.dtype)
        else:
            c = z.new_zeros(labels.shape[0], 0)
        kw: dict[str, Any] = {"truncation_psi": self.truncation_psi}
        if self.truncation_cutoff is not None:
            kw["truncation_cutoff"] = self.truncation_cutoff
        return self.G.mapping(z, c, **kw)

    # ------------------------------------------------------------------ blocks
    def _unpack(self, f: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._has_img[stage - 1]:
            return f, None
        c = self.image_shape[0]
        return f[:, :-c], f[:, -c:]

    def _block(self, i: int, w: torch.Tensor, x: Any, img: Any) -> tuple[torch.Tensor, Any]:
        o, n = self._offsets[i]
        block = getattr(self.G.synthesis, self._blocks[i])
        return block(x, img, w[:, o : o + n], **self.synthesis_kwargs)

    def _pack(self, x: torch.Tensor, img: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype) if img is None else torch.cat([x.to(dtype), img.to(dtype)], dim=1)

    # ------------------------------------------------------------------ stages
    def _layer(self, i: int) -> nn.Module:
        return getattr(self.G.synthesis, self._names[i])

    def _first_stage(self, w: torch.Tensor) -> torch.Tensor:
        if self.layout == "layers":
            return self.G.synthesis.input(w[:, 0]).to(w.dtype)
        return self._pack(*self._block(0, w, None, None), w.dtype)

    def _advance(self, w: torch.Tensor, f: torch.Tensor, stage: int) -> torch.Tensor:
        if self.layout == "layers":
            return self._layer(stage - 1)(f, w[:, stage], **self.synthesis_kwargs).to(w.dtype)
        return self._pack(*self._block(stage, w, *self._unpack(f, stage)), w.dtype)

    def _head(self, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        k = self.num_stages
        if self.layout == "layers":
            # ToRGB is the last layer (index K - 1) and reads ws[:, K].
            x = self._layer(k - 1)(f, w[:, k], **self.synthesis_kwargs)
            scale = float(getattr(self.G.synthesis, "output_scale", 1.0))
            return (x * scale if scale != 1 else x).to(w.dtype)
        _, img = self._block(k, w, *self._unpack(f, k))
        return img.to(w.dtype)


def from_stylegan(
    G: nn.Module,
    *,
    num_classes: int | None = None,
    class_map: Sequence[int] | None = None,
    truncation_psi: float = 1.0,
    truncation_cutoff: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    synthesis_kwargs: dict[str, Any] | None = None,
) -> StyleGANGenerator:
    """Wrap a loaded StyleGAN2/3/XL generator; arguments as :class:`StyleGANGenerator`."""
    return StyleGANGenerator(
        G,
        num_classes=num_classes,
        class_map=class_map,
        truncation_psi=truncation_psi,
        truncation_cutoff=truncation_cutoff,
        mean=mean,
        std=std,
        synthesis_kwargs=synthesis_kwargs,
    )


#: Where each generation's official code lives; its folder must be importable (``dnnlib``,
#: ``torch_utils`` and, for StyleGAN-XL, ``pg_modules`` at its top level).
OFFICIAL_CODE = {
    "StyleGAN-XL": "https://github.com/autonomousvision/stylegan-xl",
    "StyleGAN3": "https://github.com/NVlabs/stylegan3",
    "StyleGAN2-ADA": "https://github.com/NVlabs/stylegan2-ada-pytorch",
}


def _code_hint(path: Path) -> str:
    """Which official repository a pickle needs, guessed from names in its bytes (the
    persistence mechanism stores module names and source text; nothing is unpickled)."""
    try:
        with path.open("rb") as fh:
            blob = fh.read(64 << 20)  # the embedded source sits near the start
    except OSError:
        blob = b""
    if b"pg_modules" in blob or b"networks_stylegan3_resetting" in blob:
        which = ["StyleGAN-XL"]
    elif b"networks_stylegan3" in blob:
        which = ["StyleGAN3"]
    else:
        which = list(OFFICIAL_CODE)
    repos = " or ".join(f"{w} ({OFFICIAL_CODE[w]})" for w in which)
    return (
        f"the official code of {repos} must be importable: clone it and put its folder on the "
        "module path (`export PYTHONPATH=/path/to/stylegan-xl`, or "
        "sys.path.insert(0, '/path/to/stylegan-xl') before loading), so that its dnnlib, "
        "torch_utils (and training, pg_modules) packages import"
    )


def load_stylegan_pickle(
    path: str | os.PathLike[str], *, key: str | None = "G_ema", allow_pickle: bool = False
) -> Any:
    """Load a local StyleGAN network pickle (``network-snapshot-*.pkl``).

    Unpickling runs arbitrary code from the file, so it must be enabled explicitly with
    ``allow_pickle=True`` (``--allow-pickle``); only load files you trust. The official code
    that wrote the pickle (:data:`OFFICIAL_CODE`: its ``dnnlib``, ``torch_utils``, ...) must be
    importable, e.g. ``PYTHONPATH=/path/to/stylegan-xl``. Only local files are read (no URLs).

    Args:
        path: local file path.
        key: entry of the pickled dict to return ("G_ema" for the official snapshots); None
            returns the whole unpickled object.
        allow_pickle: must be True.

    Returns:
        The network (``eval()`` and ``requires_grad_(False)`` applied), or the unpickled object
        when ``key`` is None.

    Raises:
        ValueError: without ``allow_pickle=True``; a URL; a file that is not a readable pickle
            (text, empty, truncated) or whose ``key`` entry is missing or not a network --
            naming the file.
        ModuleNotFoundError: the official code is not importable (naming the repository and
            how to make it importable).
        FileNotFoundError, PermissionError: naming the file.
    """
    if allow_pickle is not True:
        raise ValueError(
            f"{str(path)!r} is a network pickle: loading it unpickles the file, which can run "
            "arbitrary code. Pass --allow-pickle on the command line (allow_pickle=True in "
            "Python, generator.allow_pickle = true in a config file) to confirm you trust it"
        )
    if isinstance(path, str) and "://" in path:
        raise ValueError(f"path must be a local file, got the URL {path!r} (nothing is downloaded)")
    p = Path(path)
    try:
        found = p.is_file()
    except PermissionError as e:  # a folder on the way cannot be searched
        raise PermissionError(f"cannot access network pickle {str(p)!r}: {e}") from e
    if not found:
        raise FileNotFoundError(f"no such network pickle: {str(p)!r}")
    try:
        fh = p.open("rb")
    except PermissionError as e:
        raise PermissionError(f"cannot read network pickle {str(p)!r}: permission denied") from e
    except OSError as e:
        raise OSError(f"cannot read network pickle {str(p)!r}: {e}") from e
    with fh:
        try:
            obj = pickle.load(fh)  # noqa: S301 - explicit opt-in above
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"{str(p)!r} needs the module {e.name!r}: {_code_hint(p)}",
                name=e.name,
            ) from e
        except (
            EOFError,
            pickle.UnpicklingError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            ImportError,
            RuntimeError,
            OverflowError,
            MemoryError,
        ) as e:
            msg = str(e).strip() or type(e).__name__
            if isinstance(e, EOFError):
                msg = "the file is empty or truncated"
            raise ValueError(f"{str(p)!r} is not a readable network pickle: {msg}") from e
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"key {key!r} not found in {str(p)!r} (it holds {keys})")
        obj = obj[key]
        if not isinstance(obj, nn.Module):
            raise ValueError(
                f"{key!r} in {str(p)!r} is a {type(obj).__name__}, not a network "
                "(torch.nn.Module): not a StyleGAN network snapshot"
            )
    if isinstance(obj, nn.Module):
        obj.eval().requires_grad_(False)
    return obj
