"""Saving and loading :class:`ConvGenerator` weights, and the checkpoint shipped with the package.

On disk a generator is two files side by side: ``<name>.safetensors`` (the state dict; tensors
only, no pickle) and ``<name>.json`` (constructor arguments, dataset mean/std, training
settings). Nothing here unpickles.

The shipped digits checkpoint (``weights/digits_convgen.*``, 181 KB) was made with::

    import torch
    from hpd_fast.generators import train_generator
    from hpd_fast.generators.io import DIGITS_TRAINING, digits_train_split

    torch.set_num_threads(1)
    images, labels, mean, std = digits_train_split()
    train_generator(images, labels, 10, image_shape=(1, 8, 8), mean=mean, std=std,
                    **DIGITS_TRAINING, out="hpd_fast/generators/weights/digits_convgen")

i.e. on the training split of scikit-learn's 8x8 digits only (the ``hpd_fast.data`` digits
split: per class a ``numpy.random.RandomState(0)`` permutation, the first 20 % held out for
testing), normalised with the training mean/std: 1,760 steps, about 4.5 minutes of CPU time on
one thread. ``python -m hpd_fast.generators.io`` reruns exactly this (same machine, one thread,
same torch version give the same weights).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from hpd_fast.generators.convgen import ConvGenerator

__all__ = [
    "DIGITS_TRAINING",
    "digits_train_split",
    "load_generator",
    "pretrained",
    "save_generator",
]

_FORMAT = "hpd_fast.ConvGenerator"
_VERSION = 1

#: Keyword arguments of :func:`train_generator` used for the shipped digits checkpoint.
DIGITS_TRAINING: dict[str, Any] = {
    "epochs": 80,
    "batch_size": 64,
    "lr": 5e-4,
    "latent_dim": 32,
    "width": 32,
    "d_width": 32,
    "num_stages": 4,
    "cond_weight": 0.1,
    "diversity_weight": 0.2,
    "ema_decay": 0.999,
    "seed": 0,
}

_PRETRAINED = {"digits": "digits_convgen"}


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(weights, config) paths: ``x.safetensors`` and ``x.json`` for ``x`` or ``x.safetensors``;
    ``folder/generator.*`` for a folder (what ``hpd-fast generator train`` writes)."""
    p = Path(path)
    if p.is_dir():
        p = p / "generator"
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def save_generator(G: ConvGenerator, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``G``'s weights (safetensors, float32) and its JSON config next to each other.

    Args:
        G: a :class:`ConvGenerator` (its ``training_config`` attribute, if any, is stored).
        path: ``<name>`` or ``<name>.safetensors``; parent folders are created.

    Returns:
        (weights path, config path).
    """
    if not isinstance(G, ConvGenerator):
        raise ValueError(f"G must be a ConvGenerator, got {type(G).__name__}")
    weights, config = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in G.state_dict().items()}
    save_file(state, str(weights), metadata={"format": _FORMAT, "version": str(_VERSION)})
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "kwargs": G.config,
        "mean": G.mean.tolist(),
        "std": G.std.tolist(),
        "training": getattr(G, "training_config", None),
    }
    config.write_text(json.dumps(meta, indent=2) + "\n")
    return weights, config


def load_generator(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> ConvGenerator:
    """Read a generator written by :func:`save_generator` (safetensors + JSON; never pickle).

    Args:
        path: ``<name>``, ``<name>.safetensors``, ``<name>.json``, or a folder holding
            ``generator.*`` (as `hpd-fast generator train` writes).
        map_location: device for the weights.

    Returns:
        The :class:`ConvGenerator` in eval mode, ``training_config`` restored.
    """
    weights, config = _paths(path)
    for p in (weights, config):
        try:
            found = p.is_file()
        except PermissionError as e:  # a folder on the way cannot be searched
            raise PermissionError(f"cannot access generator file {str(p)!r}: {e}") from e
        if not found:
            raise FileNotFoundError(
                f"generator file {str(p)!r} not found (need both .safetensors and .json)"
            )
    meta = _read_config(config)
    try:
        G = ConvGenerator(**meta["kwargs"], mean=meta["mean"], std=meta["std"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(config)!r}: the generator it describes cannot be built: {e}") from e
    state = _read_weights(weights, map_location)
    try:
        G.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{str(weights)!r} does not hold the weights of the generator described by "
            f"{str(config)!r}: {e}"
        ) from e
    G.training_config = meta.get("training")
    return G.to(map_location).eval()


def _read_bytes(path: Path, what: str) -> bytes:
    """The file's bytes; a permission problem is reported as one, naming the file."""
    try:
        return path.read_bytes()
    except PermissionError as e:
        raise PermissionError(f"cannot read {what} {str(path)!r}: permission denied") from e
    except OSError as e:
        raise OSError(f"cannot read {what} {str(path)!r}: {e}") from e


def _read_config(config: Path) -> dict[str, Any]:
    """The JSON config next to the weights, checked; every error names the file."""
    text = _read_bytes(config, "generator config")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(config)!r} is not a valid JSON generator config: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{str(config)!r} is not a {_FORMAT} config (format={fmt!r})")
    missing = [k for k in ("kwargs", "mean", "std") if k not in meta]
    if missing:
        raise ValueError(f"{str(config)!r} lacks the key(s) {missing}")
    if not isinstance(meta["kwargs"], dict):
        raise ValueError(f"{str(config)!r}: 'kwargs' must be a JSON object")
    return meta


def _read_weights(weights: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """The safetensors state dict (no pickle); a truncated or malformed file names itself."""
    from safetensors import SafetensorError

    data = _read_bytes(weights, "generator weights")
    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file: {e}") from e
    return {k: v.to(map_location) for k, v in state.items()}


def pretrained(name: str = "digits") -> ConvGenerator:
    """The generator shipped with the package for dataset ``name`` (only "digits" so far).

    Loaded from package data; no network. Returns a :class:`ConvGenerator` (eval mode, CPU)
    producing [M, 1, 8, 8] images normalised like ``hpd_fast.data`` digits.
    """
    if name not in _PRETRAINED:
        raise ValueError(f"name must be one of {sorted(_PRETRAINED)}, got {name!r}")
    root = resources.files("hpd_fast.generators") / "weights"
    with resources.as_file(root / f"{_PRETRAINED[name]}.safetensors") as weights:
        return load_generator(weights)


def digits_train_split() -> tuple[torch.Tensor, torch.Tensor, tuple[float], tuple[float]]:
    """The training split of the embedded digits, as used for the shipped checkpoint.

    Returns:
        (images float32 [1438, 1, 8, 8] normalised, labels int64 [1438], mean, std).
    """
    try:
        from hpd_fast.data import load

        d = load("digits")
        return d.train_images, d.train_labels, d.mean, d.std
    except ImportError:  # the data package is optional here; same rule, written out
        from sklearn.datasets import load_digits as sk_load_digits

        raw = sk_load_digits()
        images = np.asarray(raw.images, dtype=np.float32) / 16.0
        labels = np.asarray(raw.target, dtype=np.int64)
        rng = np.random.RandomState(0)  # noqa: NPY002 - frozen legacy stream, on purpose
        train = []
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            perm = idx[rng.permutation(idx.size)]
            train.append(perm[round(0.2 * idx.size) :])
        train_idx = np.sort(np.concatenate(train))
        x = torch.from_numpy(images[train_idx]).unsqueeze(1)
        mean, std = (float(x.mean()),), (float(x.std()),)
        return (x - mean[0]) / std[0], torch.from_numpy(labels[train_idx]), mean, std


def _main() -> None:
    """Retrain the shipped digits checkpoint in place."""
    from hpd_fast.generators.train import train_generator

    torch.set_num_threads(1)  # the shipped weights were made on one thread
    images, labels, mean, std = digits_train_split()
    out = Path(__file__).with_name("weights") / _PRETRAINED["digits"]
    train_generator(
        images, labels, 10, image_shape=(1, 8, 8), mean=mean, std=std, **DIGITS_TRAINING, out=out
    )
    print(f"wrote {out}.safetensors and {out}.json")


if __name__ == "__main__":
    _main()
