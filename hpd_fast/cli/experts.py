"""``hpd-fast experts``: train (or complete) expert trajectories, into the cache by default."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

from hpd_fast.cli._options import Command
from hpd_fast.cli._runtime import in_process_group, progress_of

_LOG = logging.getLogger("hpd_fast")


def register(sub: Any) -> Command:
    cmd = Command(
        sub,
        "experts",
        "train and cache expert trajectories (for trajectory matching)",
        "Train expert networks on the real training split and save their parameters after "
        "every epoch (safetensors, one file per expert). Interrupted runs resume: finished "
        "experts are kept.",
        sections=(("run", ""), ("data", "data"), ("experts", "experts")),
        exclude=("out", "overwrite", "experts.path"),
    )
    cmd.parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output folder (default: the cache folder that `distill` looks in)",
    )
    cmd.parser.set_defaults(func=run)
    return cmd


def run(args: argparse.Namespace) -> int:
    from hpd_fast.experts.cache import cached_experts
    from hpd_fast.run import load_dataset

    cfg = args.settings
    if args.out:
        cfg.experts.path = None

    def body(device: torch.device, group: Any, rank: int) -> int:
        t0 = time.perf_counter()
        data = load_dataset(cfg.data)
        ex = cached_experts(
            data,
            cfg.experts,
            seed=cfg.seed,
            data_config=cfg.data,
            out=args.out,
            device=device,
            group=group,
            progress=progress_of(args.runtime),
        )
        if rank == 0:
            accs = [a for a in ex.test_accuracy if a is not None]
            acc = f", test accuracy {sum(accs) / len(accs):.1f}% (mean)" if accs else ""
            print(
                f"{len(ex)} experts x {ex.epochs} epochs ({ex.model_config['name']}, "
                f"P={ex.num_params}){acc} in {ex.path}"
            )
        _LOG.info("done in %.1f s", time.perf_counter() - t0)
        return 0

    return in_process_group(args.runtime, body)
