"""``hpd-fast experts``: train (or complete) expert trajectories, into the cache by default;
``hpd-fast experts import DIR --format mtt --out DIR2``: convert the published code's buffers."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

from hpd_fast.cli._options import PROG, CLIError, Command
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
        epilog=_EPILOG,
    )
    cmd.parser.add_argument(
        "action",
        nargs="?",
        choices=ACTIONS,
        default="train",
        help="train (the default: `hpd-fast experts [options]` trains) or import (convert "
        "existing trajectories: `hpd-fast experts import DIR --format mtt --out DIR2`)",
    )
    cmd.parser.add_argument(
        "source",
        nargs="?",
        metavar="DIR",
        default=None,
        help="import: the folder of replay_buffer_<k>.pt files (or one such file)",
    )
    cmd.parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output folder; train: the experts' folder, import: a new folder for the "
        "converted experts, required (default: train: the cache folder that `distill` looks "
        "in)",
    )
    cmd.parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="import: the format of DIR; mtt = the published MTT/TESLA/DATM/GLaD/H-PD buffer.py "
        "files, read with torch.load(weights_only=True) (nothing in them runs). --dataset "
        "(default: from the folder name, e.g. CIFAR10_NO_ZCA -> cifar10), --model (the "
        "published network name; default: the folder name, else ConvNet = depth 3), "
        "--model-kwargs, --resolution, --expert-lr, --expert-batch-size and --augment describe "
        "them",
    )
    cmd.parser.set_defaults(func=run)
    return cmd


ACTIONS = ("train", "import")
FORMATS = ("mtt",)

_EPILOG = """\
examples:
  hpd-fast experts --dataset cifar10 --root ~/data --num-experts 100 --epochs 50
  hpd-fast experts import buffers/CIFAR10_NO_ZCA/ConvNet --format mtt --out experts/cifar10
  hpd-fast distill --dataset cifar10 --root ~/data --experts experts/cifar10 ...
"""


def run(args: argparse.Namespace) -> int:
    if args.action == "import":
        return run_import(args)
    if args.source is not None or args.format is not None:
        what = f"DIR {args.source!r}" if args.source is not None else "--format"
        raise CLIError(f"{what} is for `{PROG} experts import`; training takes neither")
    return run_train(args)


def run_import(args: argparse.Namespace) -> int:
    """``hpd-fast experts import DIR --format mtt --out DIR2``."""
    from hpd_fast.experts import import_mtt, load

    if args.source is None:
        raise CLIError(f"`{PROG} experts import` needs DIR, the folder of buffers to convert")
    if args.format is None:
        raise CLIError(f"`{PROG} experts import` needs --format ({', '.join(FORMATS)})")
    if args.out is None:
        raise CLIError(f"`{PROG} experts import` needs --out DIR2 (a new folder)")
    cfg, given = args.settings, args.given
    t0 = time.perf_counter()
    out = import_mtt(
        args.source,
        args.out,
        dataset=cfg.data.dataset if "data.dataset" in given else None,
        model=cfg.experts.model if "experts.model" in given else None,
        model_kwargs=cfg.experts.model_kwargs,
        resolution=cfg.data.resolution if "data.resolution" in given else None,
        expert_epochs=cfg.hpd.mtt.expert_epochs,
        lr=cfg.experts.lr,
        batch_size=cfg.experts.batch_size,
        augment=cfg.experts.augment,
    )
    ex = load(out, lazy=True)
    src = ex.config.get("source", {})
    print(
        f"imported {len(ex)} experts x {ex.epochs} epochs ({src.get('model')} = hpd_fast "
        f"{ex.model_config['name']}, P={ex.num_params}, dataset {ex.dataset_name}) from "
        f"{args.source} into {out}; use them with `{PROG} distill --dataset {ex.dataset_name} "
        f"--experts {out} ...`"
    )
    _LOG.info("done in %.1f s", time.perf_counter() - t0)
    return 0


def run_train(args: argparse.Namespace) -> int:
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
