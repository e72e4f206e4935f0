"""How a command runs: logging, threads, device, and the process group under torchrun."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from hpd_fast.cli._options import CLIError, Runtime

__all__ = ["in_process_group", "progress_of", "setup_logging", "setup_torch"]

_LOG = logging.getLogger("hpd_fast")


def setup_logging(runtime: Runtime) -> Callable[[], None]:
    """Messages of the ``hpd_fast`` logger to stderr as plain lines (none with ``--quiet``).
    Returns a function that puts the logger back as it was (commands also run in-process)."""
    logger = logging.getLogger("hpd_fast")
    before = (logger.level, logger.propagate)
    for h in list(logger.handlers):
        if getattr(h, "_hpd_fast_cli", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._hpd_fast_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if runtime.quiet else logging.INFO)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]

    return restore


def progress_of(runtime: Runtime) -> bool | None:
    """The library's ``progress``: False when quiet, else None (bars only on a terminal)."""
    return False if runtime.quiet else None


def _auto_threads() -> int | None:
    """1 on an oversubscribed CPU (load average >= cores), else None (torch's default)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    return 1 if cores > 1 and load >= cores else None


def setup_torch(runtime: Runtime) -> torch.device:
    """The device to run on, and torch's thread count (``--threads``)."""
    dev = runtime.device
    if dev is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(dev)
        except (RuntimeError, TypeError):
            raise CLIError(
                f"--device {dev!r} is not a torch device (e.g. cpu, cuda, cuda:0)"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {dev}: CUDA is not available in this torch build / machine")
    threads = runtime.threads
    if threads is None:
        threads = _auto_threads() if device.type == "cpu" else None
        if threads is not None:
            _LOG.info(
                "CPU busy (load %.1f on %d cores): using 1 torch thread (--threads N to choose)",
                os.getloadavg()[0],
                os.cpu_count(),
            )
    if threads:
        torch.set_num_threads(threads)
    return device


def _join_process_group(device: torch.device) -> tuple[Any, torch.device]:
    """Under torchrun (``WORLD_SIZE`` > 1): join the default process group (NCCL on CUDA, one
    device per process by ``LOCAL_RANK``; gloo on the CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None, device
    import datetime

    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Long timeout: ranks wait at a barrier for the slowest one's share of the experts.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6)
        )
    return dist.group.WORLD, device


def in_process_group(runtime: Runtime, body: Callable[[torch.device, Any, int], int]) -> int:
    """``body(device, group, rank)``: in the process group when run under torchrun (left at
    the end); ranks other than 0 are quiet."""
    restore = setup_logging(runtime)
    try:
        device = setup_torch(runtime)
        group, device = _join_process_group(device)
        if group is None:
            return body(device, None, 0)
        rank = torch.distributed.get_rank(group)
        if rank != 0:
            runtime.quiet = True  # one voice: the first rank logs, prints and writes
            restore()
            restore = setup_logging(runtime)
        try:
            return body(device, group, rank)
        finally:
            torch.distributed.destroy_process_group()
    finally:
        restore()
