"""The ``hpd-fast`` command line (also ``python -m hpd_fast``)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import hpd_fast


def _cmd_info(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpd-fast",
        description="Fast, exact, memory-lean GAN-prior dataset distillation (H-PD).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, and which kernel backends are built (and why not)")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
