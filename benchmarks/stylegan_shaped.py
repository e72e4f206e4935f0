"""A generator with StyleGAN-XL's geometry, built without any weights file.

:func:`make_stylegan_shaped` builds a small network ``G`` whose interface and tensor shapes are
those of a StyleGAN-XL generator loaded with its official code (``G.mapping(z, c,
truncation_psi=...)`` -> ws ``[M, num_ws, w_dim]``, ``G.synthesis.input``,
``G.synthesis.layer_names`` with ToRGB last, ``num_ws == len(layer_names) + 1``,
``G.synthesis.output_scale``) and wraps it with the library's own adapter,
:func:`hpd_fast.generators.from_stylegan`. Every synthesis layer produces a feature map of the
official size and channel count; the computation inside is deliberately cheap (a style
modulation, a low-rank plus per-channel channel mix, a leaky ReLU, a per-sample RMS
normalisation and a bilinear resize) but deterministic and differentiable, which is all the memory and
time measurements of the distillation loop need. With ``channel_max`` / ``channel_base``
reduced it renders quickly on a CPU; at full width it is still constructible and its shapes are
probed (one sample rendered) in a few seconds on two CPU cores.

Where the numbers come from
---------------------------

*autonomousvision/stylegan-xl*, ``training/networks_stylegan3_resetting.py``:

- ``SynthesisNetwork.get_layer_specs`` (the 16 px stem): ``num_layers + 1`` layers ``L0`` ..
  ``L<num_layers>`` (the last is ToRGB). Cutoffs and minimum stopbands grow geometrically from
  ``first_cutoff = 2`` / ``first_stopband = 2**2.1`` to ``res / 2`` / ``res / 2 * 2**0.3``
  (``last_stopband_rel``) with the exponent ``min(i / (num_layers - num_critical), 1)``,
  ``num_critical = 2``; sampling rate ``2 ** ceil(log2(min(2 * stopband, res)))``; half width
  ``max(stopband, rate / 2) - cutoff``; spatial size ``rate + 2 * margin_size`` with
  ``margin_size = 10`` except for the last two layers, which have the image size; channels
  ``rint(min((channel_base / 2) / cutoff, channel_max))``, the last one ``img_channels``. The
  input (``SynthesisInput``) has the first layer's channel count and size; layer ``i`` reads
  layer ``i - 1``'s output (layer 0 reads the input). ``num_ws = num_layers + 2``; layer
  ``i`` is named ``L{i}_{size}_{channels}``; layers with ``i >= num_layers - num_critical`` are
  critically sampled; ``output_scale = 0.25``; ``conv_kernel = 3`` (1 for ToRGB).
- ``SuperresGenerator`` (each super-resolution stage): the stem's trailing critically sampled
  layers are removed (the last two layers and ToRGB); with ``stem_len = len(layer_names) + 1``
  it appends ``head_layers + 1`` layers named ``L{idx + stem_len}_...`` (so one index is
  skipped: a 128 px generator goes from ``L8`` to ``L10``); ``num_ws = stem_len +
  head_layers + 1``. ``compute_superres_filterparams`` starts the head's progression at the
  last kept layer (its cutoff, and its cutoff plus half width as stopband), keeps that layer's
  sampling rate and channel count for the head's first layer, and otherwise applies the same
  rules at the doubled resolution (``head_layers - 2`` steps, ``num_critical = 2``).
- ``MappingNetwork``: two fully connected layers (``num_layers = 2``), the class embedding
  projected to ``z_dim`` and concatenated with the normalised ``z``; ws are the one w repeated
  ``num_ws`` times, with per-class truncation towards ``w_avg``.

*autonomousvision/stylegan-xl*, ``train.py``: ``--cfg=stylegan3-t`` uses
``training.networks_stylegan3_resetting.Generator`` with ``channel_base`` and ``channel_max``
doubled ("increase for StyleGAN-XL") from the ``--cbase 32768`` / ``--cmax 512`` defaults, so
65536 and 1024 (the defaults here); ``w_dim = 512``, ``z_dim = 64``, mapping depth 2,
``--syn_layers`` (stem layers, default 14), ``--head_layers 7`` and ``--up_factor 2`` for the
super-resolution stages. The README trains the stem at 16 px and adds one super-resolution
stage per resolution doubling. Issue autonomousvision/stylegan-xl#84 shows a stem built this
way with layers ``L0_36_1024`` ... ``L10_16_3`` (``--syn_layers 10``), confirming the doubled
channel counts, and quotes the paper (Sec. 3.2): "We start progressive growing at a resolution
of 16^2 using 11 layers. Every time the resolution increases, we cut off 2 layers and add 7 new
ones." Hence ``syn_layers = 11`` for the ImageNet models (the default here; the StyleSAN-XL
README, which resumes from ``imagenet128.pkl``, also passes ``--syn_layers 11``).

H-PD (*ndhg1213/H-PD*, ``shared_args.py``: ``--res`` default 128; built on
*GeorgeCazenavette/glad*, ``glad_utils.load_sgxl``: ``imagenet{res}.pkl`` from the StyleGAN-XL
release) distils ImageNet with the 128 px StyleGAN-XL ImageNet model. By the rules above that
generator has 27 synthesis layers (26 plus ToRGB, ``L0`` .. ``L8``, ``L10`` .. ``L27``), so
``num_ws = 28``; the input and layers ``L0`` .. ``L10`` are 1024 x 36 x 36. The layer count
rests on ``syn_layers = 11`` (the paper's "11 layers"); the released pickle itself was not
inspected here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpd_fast.generators import StyleGANGenerator, from_stylegan

__all__ = [
    "STYLEGAN_XL",
    "ShapedStyleGAN",
    "hpd_stage_shapes",
    "make_stylegan_shaped",
    "official_parameter_count",
    "stylegan_xl_input",
    "stylegan_xl_layers",
]

#: StyleGAN-XL's fixed hyper-parameters (sources: the module docstring).
STYLEGAN_XL: dict[str, Any] = {
    "channel_base": 65536,  # train.py: --cbase 32768, doubled for stylegan3-t
    "channel_max": 1024,  # train.py: --cmax 512, doubled for stylegan3-t
    "w_dim": 512,
    "z_dim": 64,
    "mapping_layers": 2,
    "syn_layers": 11,  # the paper's 16 px stem ("11 layers")
    "head_layers": 7,  # layers added per super-resolution stage
    "stem_resolution": 16,
    "num_critical": 2,
    "margin_size": 10,
    "first_cutoff": 2.0,
    "first_stopband": 2**2.1,
    "last_stopband_rel": 2**0.3,
    "output_scale": 0.25,
    "conv_kernel": 3,
}


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def _progression(
    first_cutoff: float,
    first_stopband: float,
    resolution: int,
    steps: int,
    count: int,
    last_stopband_rel: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cutoffs, stopbands and sampling rates of ``count`` layers growing over ``steps``."""
    last_cutoff = resolution / 2
    last_stopband = last_cutoff * last_stopband_rel
    t = np.minimum(np.arange(count) / steps, 1.0)
    cutoffs = first_cutoff * (last_cutoff / first_cutoff) ** t
    stopbands = first_stopband * (last_stopband / first_stopband) ** t
    rates = np.exp2(np.ceil(np.log2(np.minimum(2 * stopbands, resolution))))
    return cutoffs, stopbands, rates


def _channels(cutoffs: np.ndarray, channel_base: int, channel_max: int) -> np.ndarray:
    return np.rint(np.minimum((channel_base / 2) / cutoffs, channel_max))


def _check_pow2(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def _specs(
    first: int,
    size: np.ndarray,
    ch: np.ndarray,
    rate: np.ndarray,
    cut: np.ndarray,
    half: np.ndarray,
    num_critical: int,
    resolution: int,
) -> list[dict]:
    """One dict per layer of a run of layers numbered from ``first`` (the last is ToRGB, the
    ``num_critical`` before it critically sampled)."""
    n = len(size) - 1
    return [
        {
            "index": i + first,
            "size": int(size[i]),
            "channels": int(ch[i]),
            "sampling_rate": float(rate[i]),
            "cutoff": float(cut[i]),
            "half_width": float(half[i]),
            "critical": i >= n - num_critical,
            "torgb": i == n,
            "resolution": resolution,
        }
        for i in range(n + 1)
    ]


def _geometry(
    resolution: int,
    channel_base: int,
    channel_max: int,
    img_channels: int,
    syn_layers: int,
    head_layers: int,
    stem_resolution: int,
    margin_size: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The synthesis input and layers (see the module docstring for the rules)."""
    _check_pow2("stem_resolution", stem_resolution, 4)
    _check_pow2("resolution", resolution, stem_resolution)
    num_critical = STYLEGAN_XL["num_critical"]
    for name, v, low in (
        ("syn_layers", syn_layers, num_critical + 1),
        ("head_layers", head_layers, num_critical + 1),
        ("channel_base", channel_base, 1),
        ("channel_max", channel_max, 1),
        ("img_channels", img_channels, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    rel = STYLEGAN_XL["last_stopband_rel"]

    # The stem: SynthesisNetwork at stem_resolution with syn_layers layers (+ ToRGB).
    n = syn_layers
    cut, stop, rate = _progression(
        STYLEGAN_XL["first_cutoff"],
        STYLEGAN_XL["first_stopband"],
        stem_resolution,
        n - num_critical,
        n + 1,
        rel,
    )
    half = np.maximum(stop, rate / 2) - cut
    size = rate + 2 * margin_size
    size[-2:] = stem_resolution
    ch = _channels(cut, channel_base, channel_max)
    ch[-1] = img_channels
    specs = _specs(0, size, ch, rate, cut, half, num_critical, stem_resolution)
    inp = {
        "size": int(size[0]),
        "channels": int(ch[0]),
        "sampling_rate": float(rate[0]),
        "cutoff": float(cut[0]),
    }

    # Super-resolution stages, one per doubling (SuperresGenerator, up_factor 2).
    res = stem_resolution
    h = head_layers
    while res < resolution:
        res *= 2
        while specs and specs[-1]["critical"]:
            specs.pop()
        stem_len = len(specs) + 1
        last = specs[-1]
        cut, stop, rate = _progression(
            last["cutoff"], last["half_width"] + last["cutoff"], res, h - num_critical, h + 1, rel
        )
        rate[0] = last["sampling_rate"]
        half = np.maximum(stop, rate / 2) - cut
        size = rate + 2 * margin_size
        size[-2:] = res
        ch = _channels(cut, channel_base, channel_max)
        ch[0] = last["channels"]
        ch[-1] = img_channels
        specs += _specs(stem_len, size, ch, rate, cut, half, num_critical, res)

    layers = []
    prev_size, prev_ch = inp["size"], inp["channels"]
    for pos, s in enumerate(specs):
        layers.append(
            {
                "name": f"L{s['index']}_{s['size']}_{s['channels']}",
                "index": s["index"],
                "position": pos,
                "size": s["size"],
                "channels": s["channels"],
                "in_size": prev_size,
                "in_channels": prev_ch,
                "sampling_rate": s["sampling_rate"],
                "cutoff": s["cutoff"],
                "half_width": s["half_width"],
                "critical": s["critical"],
                "torgb": s["torgb"],
                "w_index": pos + 1,
                # the hpd_fast stage whose f this layer produces (ToRGB: the image head)
                "stage": None if s["torgb"] else pos + 2,
            }
        )
        prev_size, prev_ch = s["size"], s["channels"]
    return inp, layers


def stylegan_xl_layers(
    resolution: int = 128,
    channel_base: int = STYLEGAN_XL["channel_base"],
    channel_max: int = STYLEGAN_XL["channel_max"],
    *,
    img_channels: int = 3,
    syn_layers: int = STYLEGAN_XL["syn_layers"],
    head_layers: int = STYLEGAN_XL["head_layers"],
    stem_resolution: int = STYLEGAN_XL["stem_resolution"],
    margin_size: int = STYLEGAN_XL["margin_size"],
) -> list[dict[str, Any]]:
    """The synthesis layers of a StyleGAN-XL generator at ``resolution`` (ToRGB last).

    Built as StyleGAN-XL grows it: a ``stem_resolution`` stem of ``syn_layers`` layers, then one
    super-resolution stage of ``head_layers`` layers per doubling of the resolution.

    Returns:
        One dict per layer, in execution order: ``name`` (``"L<i>_<size>_<channels>"``, the
        official attribute name), ``index`` (the ``<i>``; one index is skipped per
        super-resolution stage, as in the official code), ``position`` (0-based place in
        ``layer_names``), ``size`` and ``channels`` of its output, ``in_size`` and
        ``in_channels`` of its input, ``sampling_rate``, ``cutoff``, ``half_width``,
        ``critical`` (critically sampled), ``torgb``, ``w_index`` (the row of ws it reads) and
        ``stage`` (the hpd_fast stage whose feature it produces: ``position + 2``; None for
        ToRGB, the image head).
    """
    return _geometry(
        resolution,
        channel_base,
        channel_max,
        img_channels,
        syn_layers,
        head_layers,
        stem_resolution,
        margin_size,
    )[1]


def stylegan_xl_input(
    resolution: int = 128,
    channel_base: int = STYLEGAN_XL["channel_base"],
    channel_max: int = STYLEGAN_XL["channel_max"],
    **kwargs: Any,
) -> dict[str, Any]:
    """The Fourier-feature input of the same generator: ``size``, ``channels``,
    ``sampling_rate`` and ``cutoff`` (its bandwidth). Keyword arguments as
    :func:`stylegan_xl_layers`."""
    kw = {
        "img_channels": 3,
        "syn_layers": STYLEGAN_XL["syn_layers"],
        "head_layers": STYLEGAN_XL["head_layers"],
        "stem_resolution": STYLEGAN_XL["stem_resolution"],
        "margin_size": STYLEGAN_XL["margin_size"],
        **kwargs,
    }
    return _geometry(resolution, channel_base, channel_max, **kw)[0]


def hpd_stage_shapes(
    layers: list[dict[str, Any]], w_dim: int = STYLEGAN_XL["w_dim"]
) -> tuple[tuple[int, ...], list[tuple[int, int, int]]]:
    """``(w_shape, [feature_shape(1), ..., feature_shape(K)])`` that the wrapped generator has:
    w is the full w+ code ``(num_ws, w_dim)``; stage 1 is the input, stage ``k >= 2`` the output
    of ``layers[k - 2]``; ``K = len(layers)`` (ToRGB is the head)."""
    first = layers[0]
    feats = [(first["in_channels"], first["in_size"], first["in_size"])]
    feats += [(lay["channels"], lay["size"], lay["size"]) for lay in layers[:-1]]
    return (len(layers) + 1, w_dim), feats


def official_parameter_count(
    layers: list[dict[str, Any]],
    *,
    w_dim: int = STYLEGAN_XL["w_dim"],
    z_dim: int = STYLEGAN_XL["z_dim"],
    c_dim: int = 1000,
    embed_dim: int | None = None,
    conv_kernel: int = STYLEGAN_XL["conv_kernel"],
) -> dict[str, int]:
    """Parameters of the official network with these layers, counted from its constructors.

    ``SynthesisInput``: ``affine`` (w_dim -> 4, with bias) and a ``C0 x C0`` weight. Each
    ``SynthesisLayer``: ``affine`` (w_dim -> in_channels, with bias), a ``[out, in, k, k]``
    weight (``k = conv_kernel``, 1 for ToRGB) and a bias. ``MappingNetwork``: ``embed_proj``
    (embed_dim -> z_dim), ``fc0`` (2 z_dim -> w_dim), ``fc1`` (w_dim -> w_dim), all with bias,
    plus the class embedding table ``c_dim x embed_dim`` loaded from
    ``in_embeddings/tf_efficientnet_lite0.pkl`` (counted only when ``embed_dim`` is given; its
    width is not checked here). Buffers (filters, ``w_avg``, magnitude EMAs) are not counted.
    """
    c0 = layers[0]["in_channels"]
    synthesis = (w_dim * 4 + 4) + c0 * c0
    for lay in layers:
        k = 1 if lay["torgb"] else conv_kernel
        cin, cout = lay["in_channels"], lay["channels"]
        synthesis += (w_dim * cin + cin) + cout * cin * k * k + cout
    mapping = (2 * z_dim * w_dim + w_dim) + (w_dim * w_dim + w_dim)
    if embed_dim is not None:
        mapping += embed_dim * z_dim + z_dim + c_dim * embed_dim
    return {"synthesis": synthesis, "mapping": mapping, "total": synthesis + mapping}


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * math.sqrt(2.0)


def _normalize(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x * (x.square().mean(dim=dims, keepdim=True) + 1e-8).rsqrt()


class _Param:
    """Deterministic parameter initialisation from one private generator."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(int(seed))

    def randn(self, *shape: int, std: float = 1.0) -> nn.Parameter:
        return nn.Parameter(torch.randn(*shape, generator=self.gen) * std)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen)


class _Mapping(nn.Module):
    """z [M, z_dim], one-hot c [M, c_dim] -> ws [M, num_ws, w_dim] (two FC layers)."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, p: _Param) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.embed = p.randn(z_dim, c_dim, std=1.0)  # class c -> its column (an embedding)
        self.fc0_w = p.randn(w_dim, 2 * z_dim, std=1 / math.sqrt(2 * z_dim))
        self.fc0_b = nn.Parameter(torch.zeros(w_dim))
        self.fc1_w = p.randn(w_dim, w_dim, std=1 / math.sqrt(w_dim))
        self.fc1_b = nn.Parameter(torch.zeros(w_dim))
        with torch.no_grad():  # per-class centre for truncation: the w of z = 0
            eye = torch.eye(c_dim)
            self.register_buffer("w_avg", self._w(torch.zeros(c_dim, z_dim), eye))

    def _w(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = _normalize(z.to(self.embed.dtype), (1,))
        y = _normalize(_lrelu(c.to(self.embed.dtype) @ self.embed.t()), (1,))
        h = _lrelu(F.linear(torch.cat([x, y], 1), self.fc0_w, self.fc0_b))
        return _lrelu(F.linear(h, self.fc1_w, self.fc1_b))

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        update_emas: bool = False,
    ) -> torch.Tensor:
        del update_emas
        w = self._w(z, c)
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cut = self.num_ws if truncation_cutoff is None else int(truncation_cutoff)
            centre = self.w_avg[c.argmax(1)].unsqueeze(1)
            ws[:, :cut] = centre.lerp(ws[:, :cut], truncation_psi)
        return ws


class _Input(nn.Module):
    """Fourier features [M, C, S, S], shifted by a translation read from w (cf. SynthesisInput)."""

    def __init__(self, w_dim: int, spec: dict[str, Any], p: _Param) -> None:
        super().__init__()
        c, s = spec["channels"], spec["size"]
        self.channels, self.size = c, s
        self.sampling_rate, self.bandwidth = spec["sampling_rate"], spec["cutoff"]
        freqs = torch.randn(c, 2, generator=p.gen)
        radii = freqs.square().sum(1, keepdim=True).sqrt()
        freqs = freqs / (radii * radii.square().exp().pow(0.25)) * self.bandwidth
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", p.rand(c) - 0.5)
        half = 0.5 * s / self.sampling_rate  # the image spans [-half, half] in both axes
        axis = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 * half - half
        gy, gx = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("grid", torch.stack([gx, gy], -1).reshape(s * s, 2))
        self.affine = p.randn(2, w_dim, std=0.1 / math.sqrt(w_dim))
        self.weight = p.randn(c, c, std=1 / math.sqrt(c))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        t = w.to(self.affine.dtype) @ self.affine.t()  # [M, 2] translation
        phase = self.grid @ self.freqs.t()  # [S*S, C]
        shift = t @ self.freqs.t() + self.phases  # [M, C]
        x = torch.sin(2 * math.pi * (phase.unsqueeze(0) + shift.unsqueeze(1)))  # [M, S*S, C]
        x = x @ self.weight.t()
        m = w.shape[0]
        return x.transpose(1, 2).reshape(m, self.channels, self.size, self.size).contiguous()


class _Layer(nn.Module):
    """[M, Cin, Sin, Sin], w [M, w_dim] -> [M, Cout, S, S]: a style ``s = 1 + A(w)`` (rank 8)
    modulates the input channels; the channel mix is a rank-``r`` product plus a copy of input
    channel ``j mod Cin`` into output channel ``j`` with a learned gain; then, except for ToRGB,
    a leaky ReLU and a per-sample RMS normalisation; last a bilinear resize to ``S``."""

    def __init__(self, w_dim: int, spec: dict[str, Any], rank: int, p: _Param) -> None:
        super().__init__()
        cin, cout = spec["in_channels"], spec["channels"]
        self.in_channels, self.out_channels = cin, cout
        self.size, self.is_torgb = spec["size"], bool(spec["torgb"])
        r = max(1, min(rank, cin, cout))
        self.style_in = p.randn(w_dim, 8, std=1 / math.sqrt(w_dim))
        self.style_out = p.randn(8, cin, std=0.1 / math.sqrt(8))
        self.down = p.randn(r, cin, std=1 / math.sqrt(cin))
        self.up = p.randn(cout, r, std=1 / math.sqrt(2 * r))
        self.gain = nn.Parameter(torch.full((cout,), 1 / math.sqrt(2)))
        self.register_buffer("source", torch.arange(cout) % cin, persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, **_: Any) -> torch.Tensor:
        m, cin, h, wd = x.shape
        dt = self.down.dtype
        styles = 1 + (w.to(dt) @ self.style_in) @ self.style_out  # [M, Cin]
        flat = x.to(dt).reshape(m, cin, h * wd)
        # rank-r path with the styles folded into the (small) per-sample down projection
        low = torch.bmm(self.down.unsqueeze(0) * styles.unsqueeze(1), flat)  # [M, r, HW]
        # per-channel path: y[:, j] = x[:, j mod Cin] * s[:, j mod Cin] * gain[j]
        if self.out_channels == cin:
            y = flat * (styles * self.gain).unsqueeze(2)
        else:
            y = flat.index_select(1, self.source)
            y = y * (styles.index_select(1, self.source) * self.gain).unsqueeze(2)
        y = y.baddbmm_(self.up.expand(m, -1, -1), low).reshape(m, self.out_channels, h, wd)
        if not self.is_torgb:  # at the input size: cheaper before an upsampling resize
            y = F.leaky_relu_(y, 0.2)
            rms = torch.linalg.vector_norm(y, dim=(1, 2, 3), keepdim=True)
            y = y * (math.sqrt(y[0].numel()) / (rms + 1e-8))
        if h != self.size or wd != self.size:
            y = F.interpolate(y, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return y


class _Synthesis(nn.Module):
    """``input`` plus the layers, as attributes named after ``layer_names``."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        inp: dict[str, Any],
        layers: list[dict[str, Any]],
        rank: int,
        p: _Param,
    ) -> None:
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.num_ws = len(layers) + 1
        self.output_scale = STYLEGAN_XL["output_scale"]
        self.input = _Input(w_dim, inp, p)
        self.layer_names: list[str] = []
        for spec in layers:
            setattr(self, spec["name"], _Layer(w_dim, spec, rank, p))
            self.layer_names.append(spec["name"])

    def forward(self, ws: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        rows = ws.unbind(1)
        x = self.input(rows[0])
        for name, w in zip(self.layer_names, rows[1:]):
            x = getattr(self, name)(x, w, **kwargs)
        return x * self.output_scale


class ShapedStyleGAN(nn.Module):
    """The bare network (the official ``G`` interface); :func:`make_stylegan_shaped` wraps it.

    Attributes:
        z_dim, c_dim, w_dim, num_ws, img_resolution, img_channels, mapping, synthesis, and
        ``layers`` (:func:`stylegan_xl_layers`' dicts) / ``input_spec``.
    """

    def __init__(
        self,
        c_dim: int,
        resolution: int = 128,
        *,
        channel_base: int = STYLEGAN_XL["channel_base"],
        channel_max: int = STYLEGAN_XL["channel_max"],
        w_dim: int = STYLEGAN_XL["w_dim"],
        z_dim: int = STYLEGAN_XL["z_dim"],
        img_channels: int = 3,
        syn_layers: int = STYLEGAN_XL["syn_layers"],
        head_layers: int = STYLEGAN_XL["head_layers"],
        stem_resolution: int = STYLEGAN_XL["stem_resolution"],
        rank: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, v in (("c_dim", c_dim), ("w_dim", w_dim), ("z_dim", z_dim), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        inp, layers = _geometry(
            resolution,
            channel_base,
            channel_max,
            img_channels,
            syn_layers,
            head_layers,
            stem_resolution,
            STYLEGAN_XL["margin_size"],
        )
        self.input_spec, self.layers = inp, layers
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = resolution, img_channels
        self.num_ws = len(layers) + 1
        p = _Param(seed)
        self.mapping = _Mapping(z_dim, c_dim, w_dim, self.num_ws, p)
        self.synthesis = _Synthesis(w_dim, resolution, img_channels, inp, layers, rank, p)

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, **kwargs)


def make_stylegan_shaped(
    num_classes: int,
    resolution: int = 128,
    *,
    channel_max: int = STYLEGAN_XL["channel_max"],
    channel_base: int = STYLEGAN_XL["channel_base"],
    w_dim: int = STYLEGAN_XL["w_dim"],
    z_dim: int = STYLEGAN_XL["z_dim"],
    device: torch.device | str = "cpu",
    seed: int = 0,
    c_dim: int | None = None,
    syn_layers: int = STYLEGAN_XL["syn_layers"],
    head_layers: int = STYLEGAN_XL["head_layers"],
    stem_resolution: int = STYLEGAN_XL["stem_resolution"],
    rank: int = 16,
    mean: float | list[float] | None = None,
    std: float | list[float] | None = None,
) -> StyleGANGenerator:
    """A StyleGAN-XL-shaped generator wrapped by :func:`hpd_fast.generators.from_stylegan`.

    Args:
        num_classes: dataset classes.
        resolution: image size (a power of two >= ``stem_resolution``).
        channel_max, channel_base: StyleGAN-XL's width rule (defaults: the official 1024 and
            65536); smaller values give a network that renders fast on a CPU, e.g.
            ``make_stylegan_shaped(10, 32, channel_max=16, channel_base=256)``.
        w_dim, z_dim: latent sizes (official: 512 and 64).
        device: where the network lives.
        seed: fixes every parameter (no global RNG is used).
        c_dim: the generator's class count (default ``num_classes``; a larger one, like
            ImageNet's 1000 for a subset, maps dataset class i to generator class i).
        syn_layers, head_layers, stem_resolution: the growth schedule (official: 11, 7, 16).
        rank: rank of the channel mix (its cost per pixel is ``rank * (Cin + Cout)``).
        mean, std: data normalisation passed to the adapter.

    Returns:
        A :class:`hpd_fast.generators.StyleGANGenerator`: ``num_stages == len(layers)``,
        ``w_shape == (len(layers) + 1, w_dim)``, ``feature_shape(k)`` as
        :func:`hpd_stage_shapes`.
    """
    cdim = num_classes if c_dim is None else int(c_dim)
    if cdim < num_classes:
        raise ValueError(f"c_dim ({cdim}) must be >= num_classes ({num_classes})")
    G = ShapedStyleGAN(
        cdim,
        resolution,
        channel_base=channel_base,
        channel_max=channel_max,
        w_dim=w_dim,
        z_dim=z_dim,
        syn_layers=syn_layers,
        head_layers=head_layers,
        stem_resolution=stem_resolution,
        rank=rank,
        seed=seed,
    )
    G = G.to(device).eval().requires_grad_(False)
    class_map = list(range(num_classes)) if cdim != num_classes else None
    return from_stylegan(G, num_classes=num_classes, class_map=class_map, mean=mean, std=std)


def _main() -> None:  # pragma: no cover - a look at the geometry
    import argparse

    ap = argparse.ArgumentParser(description="StyleGAN-XL synthesis layers at a resolution")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--channel-base", type=int, default=STYLEGAN_XL["channel_base"])
    ap.add_argument("--channel-max", type=int, default=STYLEGAN_XL["channel_max"])
    a = ap.parse_args()
    inp = stylegan_xl_input(a.resolution, a.channel_base, a.channel_max)
    layers = stylegan_xl_layers(a.resolution, a.channel_base, a.channel_max)
    print(f"input: {inp['channels']} x {inp['size']} x {inp['size']}, stage 1")
    for lay in layers:
        stage = "head" if lay["stage"] is None else f"stage {lay['stage']}"
        print(
            f"{lay['name']:>14}  {lay['channels']:>5} x {lay['size']:>3} x {lay['size']:<3}"
            f"  rate {lay['sampling_rate']:>5g}  cutoff {lay['cutoff']:8.3f}"
            f"{'  critical' if lay['critical'] else ''}  {stage}"
        )
    print(f"num_ws = {len(layers) + 1}")


if __name__ == "__main__":  # pragma: no cover
    _main()
