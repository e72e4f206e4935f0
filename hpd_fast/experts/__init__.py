"""Expert trajectories: networks trained on real data, their flat parameters kept every epoch.

Trajectory matching needs, for a student architecture, many "expert" training runs on the real
dataset: expert ``k`` is a vector of parameters ``θ_k[e]`` (the :func:`hpd_fast.params.flatten_params`
layout) at initialisation (``e = 0``) and after each of ``epochs`` epochs, i.e. a float32
tensor ``[epochs + 1, P]``.

Modules:
    :mod:`~hpd_fast.experts.train`: :func:`train_experts` (the recipe, seeds, vmap).
    :mod:`~hpd_fast.experts.trajectories`: the :class:`Experts` object.
    :mod:`~hpd_fast.experts.format`: the files (:data:`FORMAT`, :func:`expert_path`,
    :func:`load`).
    :mod:`~hpd_fast.experts.cache`: the expert cache (:func:`cached_experts`,
    :func:`cache_path`, :func:`cache_root`).
    :mod:`~hpd_fast.experts.mtt_buffers`: the published code's ``replay_buffer_<k>.pt`` files
    (:func:`load_mtt`, :func:`import_mtt`).
    :mod:`~hpd_fast.experts.loading`: :func:`load` (``format="hpd_fast"`` or ``"mtt"``).
"""

from hpd_fast.experts.cache import cache_path, cache_root, cache_settings, cached_experts
from hpd_fast.experts.format import FORMAT, VERSION, expert_path
from hpd_fast.experts.loading import FORMATS, load
from hpd_fast.experts.mtt_buffers import PUBLISHED_MODELS, import_mtt, load_mtt
from hpd_fast.experts.train import train_experts
from hpd_fast.experts.trajectories import Experts

# Private helpers the tests reach as hpd_fast.experts._name (hpd_fast.experts.format,
# .train and .trajectories hold the rest).
from hpd_fast.experts.format import _read_expert  # noqa: F401  # isort: skip
from hpd_fast.experts.train import _init_net, _Stream, _vmap_probe  # noqa: F401  # isort: skip

__all__ = [
    "FORMAT",
    "FORMATS",
    "PUBLISHED_MODELS",
    "VERSION",
    "Experts",
    "cache_path",
    "cache_root",
    "cache_settings",
    "cached_experts",
    "expert_path",
    "import_mtt",
    "load",
    "load_mtt",
    "train_experts",
]
