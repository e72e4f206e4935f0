"""``hpd-fast evaluate RUN_DIR``: train fresh networks on a saved set, report accuracy."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from hpd_fast.cli._options import CLIError, Command
from hpd_fast.cli._runtime import in_process_group, progress_of


def register(sub: Any) -> Command:
    cmd = Command(
        sub,
        "evaluate",
        "train fresh networks on a saved distilled set, report accuracy",
        "Train networks from scratch on a distilled set saved by `distill` and test them on "
        "the real test split (mean ± std), next to the same protocol on random real images. "
        "Writes <run>/evaluation.json.",
        sections=(("run", ""), ("data (default: the run's)", "data"), ("evaluation", "eval")),
        exclude=("preset", "out", "overwrite", "eval.enabled"),
    )
    p = cmd.parser
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="folder written by `hpd-fast distill` (holds tensors.safetensors)",
    )
    p.add_argument(
        "--stage",
        type=int,
        default=None,
        help="evaluate this stage's best images instead of the chosen set (default: the chosen set)",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="JSON file for the results (default: RUN_DIR/evaluation.json)",
    )
    p.set_defaults(func=run)
    return cmd


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpd_fast.run import evaluate_run

    cfg = args.settings
    if not Path(args.run_dir).is_dir():
        raise CLIError(
            f"{args.run_dir!r} is not a folder (expected the --out folder of `hpd-fast distill`)"
        )
    if args.out and Path(args.out).is_dir():
        raise CLIError(f"--out {args.out!r} is a folder; name a JSON file")
    data_given = any(p.startswith("data.") for p in args.given)
    if data_given and "data.dataset" not in args.given:
        cfg.data.dataset = ""  # the run's dataset, with the options given

    def body(device: torch.device, group: Any, rank: int) -> int:
        ev = evaluate_run(
            args.run_dir,
            cfg.eval,
            data_config=cfg.data if data_given else None,
            stage=args.stage,
            out=args.out,
            seed=cfg.seed,
            device=device,
            group=group,
            progress=progress_of(args.runtime),
        )
        if rank == 0:
            for m in cfg.eval.models:
                line = f"{m}: {ev[m]['mean']:.2f} ± {ev[m]['std']:.2f} %"
                if "random_real" in ev:
                    r = ev["random_real"][m]
                    line += f"   random real {r['mean']:.2f} ± {r['std']:.2f} %"
                print(line)
        return 0

    return in_process_group(args.runtime, body)
