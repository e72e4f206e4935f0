"""The ``hpd-fast`` command line (also ``python -m hpd_fast``).

One module per command — ``experts``, ``distill``, ``evaluate``, ``generator``, ``bench``,
``info`` — each of which parses, calls one library function and prints. The options of
``experts``, ``distill``, ``evaluate`` and ``generator`` are generated from
:mod:`hpd_fast.config` (one source of every setting, its default and its help); ``--config FILE`` reads a JSON or TOML file into the same dataclasses.
"""

from __future__ import annotations

import argparse
import sys

from hpd_fast.cli import bench, distill, evaluate, experts, generator, info
from hpd_fast.cli._options import PROG, CLIError, Command

__all__ = ["CLIError", "build_parser", "main"]

_COMMANDS: dict[str, Command] = {}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hpd-fast``."""
    import hpd_fast

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fast, exact, memory-lean GAN-prior dataset distillation (H-PD). "
        f"Run `{PROG} distill` for the main job, `{PROG} <command> --help` for the options. "
        "Under torchrun (`torchrun --nproc-per-node=N -m hpd_fast distill ...`) experts, "
        "distill and evaluate share their work over the N processes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {hpd_fast.__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full Python traceback when a command fails",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _COMMANDS.clear()
    for module in (experts, distill, evaluate, generator):
        cmd = module.register(sub)
        _COMMANDS[cmd.name] = cmd
    bench.register(sub)
    info.register(sub)
    return parser


def _known_error(exc: Exception) -> bool:
    return isinstance(
        exc,
        (
            CLIError,
            ValueError,
            FileNotFoundError,
            NotADirectoryError,
            IsADirectoryError,
            PermissionError,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hpd-fast``; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    cmd = _COMMANDS.get(ns.command)
    if cmd is not None:
        try:
            ns.settings, ns.runtime, ns.given = cmd.resolve(ns, _COMMANDS)
        except CLIError as exc:
            cmd.parser.error(str(exc))  # usage + message, exit 2
    try:
        return int(ns.func(ns) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if ns.traceback:
            raise
        kind = "" if _known_error(exc) else f"{type(exc).__name__}: "
        print(f"{PROG} {ns.command}: error: {kind}{exc}", file=sys.stderr)
        if kind:
            print(
                f"(run `{PROG} --traceback {ns.command} ...` for the full traceback)",
                file=sys.stderr,
            )
        from hpd_fast.distill.state import CheckpointMismatchError

        return 2 if isinstance(exc, (CLIError, CheckpointMismatchError)) else 1


if __name__ == "__main__":
    sys.exit(main())
