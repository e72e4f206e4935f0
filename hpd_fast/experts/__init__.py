"""Expert trajectories (see :mod:`hpd_fast.experts.train`)."""

from hpd_fast.experts.train import *  # noqa: F403
from hpd_fast.experts.train import __all__  # noqa: F401
from hpd_fast.experts.train import _init_net, _read_expert, _Stream, _vmap_probe  # noqa: F401
