"""``hpd_fast.experts.load``: expert trajectories in hpd_fast's format or the published one."""

from __future__ import annotations

import os
from typing import Any

from hpd_fast.experts import format as _format
from hpd_fast.experts.mtt_buffers import load_mtt
from hpd_fast.experts.trajectories import Experts

__all__ = ["FORMATS", "load"]

#: ``format=`` values of :func:`load`.
FORMATS = ("hpd_fast", "mtt")


def load(
    path: str | os.PathLike[str], *, lazy: bool = False, format: str = "hpd_fast", **options: Any
) -> Experts:
    """Read expert trajectories.

    Args:
        path: a folder or one file.
        lazy: (``format="hpd_fast"`` only) read trajectories on access; see
            :func:`hpd_fast.experts.format.load`.
        format: "hpd_fast" (``expert_*.safetensors`` written by ``train_experts`` /
            ``hpd-fast experts``; :func:`hpd_fast.experts.format.load`) or "mtt" (the
            ``replay_buffer_<k>.pt`` files of the published MTT / TESLA / DATM / GLaD / H-PD
            code, read without executing anything; :func:`hpd_fast.experts.mtt_buffers.load_mtt`,
            whose keyword arguments -- dataset, model, expert_epochs, ... -- go in ``options``).

    Raises:
        ValueError: an unknown ``format``, options the format does not take, or (from the
            readers) files that fail their checks, naming the file.
    """
    if format == "hpd_fast":
        if options:
            raise ValueError(
                f"format='hpd_fast' takes no options besides lazy, got {sorted(options)} (the "
                "files record their own settings)"
            )
        return _format.load(path, lazy=lazy)
    if format == "mtt":
        if lazy:
            raise ValueError(
                "lazy=True reads hpd_fast's format only; convert the buffers once with "
                "hpd_fast.experts.import_mtt (or `hpd-fast experts import DIR --format mtt "
                "--out DIR2`) and load that folder lazily"
            )
        return load_mtt(path, **options)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
