"""``hpd-fast info``: version, torch build, and which kernel backends are built (and why not)."""

from __future__ import annotations

import argparse
import platform
from typing import Any

import torch


def register(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="version, and which kernel backends are built (and why not)",
        description="Print the version, torch build and kernel backends.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import hpd_fast

    print(f"hpd_fast {hpd_fast.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    print(f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    print("backends:")
    for name, info in hpd_fast.backend_info().items():
        mark = "yes" if info["available"] else "no "
        print(f"  {name:<10} {mark}  {info['detail']}")
    return 0
