"""``hpd-fast generator train``: train the library's ConvGenerator for a dataset (into a folder,
or into the cache that ``hpd-fast distill --generator auto`` reads)."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

from hpd_fast.cli._options import PROG, CLIError, Command
from hpd_fast.cli._runtime import in_process_group, progress_of
from hpd_fast.config import RunConfig, leaves

_LOG = logging.getLogger("hpd_fast")

ACTIONS = ("train",)

_EPILOG = """\
The folder holds generator.safetensors + generator.json (the weights and their description),
samples.png (8 samples per class) and, while training runs, checkpoint.safetensors: an
interrupted run resumes from it with the same result. A finished folder of the same settings
is reused.

examples:
  hpd-fast generator train --dataset imagefolder --root ~/data/flowers --resolution 32
  hpd-fast generator train --dataset imagefolder --root DIR --resolution 16 --out gens/flowers
  hpd-fast distill --dataset imagefolder --root DIR --resolution 16 --generator gens/flowers
  hpd-fast distill --dataset imagefolder --root DIR --resolution 16 --generator auto
"""


def register(sub: Any) -> Command:
    cache_only = tuple(
        p for p, _, _ in leaves(RunConfig) if p.startswith("experts.") and p != "experts.cache_dir"
    )
    cmd = Command(
        sub,
        "generator",
        "train a ConvGenerator for a dataset (for --generator auto or PATH)",
        "Train the library's small class-conditional ConvGenerator as a GAN on the training "
        "split of a dataset, with progress, resumable from its checkpoint; saved as "
        ".safetensors + .json with a grid of samples. Without --out it goes to the cache "
        "that `hpd-fast distill --generator auto` reads.",
        sections=(
            ("run", ""),
            ("data", "data"),
            ("generator training", "generator_train"),
            ("cache", "experts"),
        ),
        exclude=("seed", "out", "overwrite", *cache_only),
        epilog=_EPILOG,
    )
    cmd.parser.add_argument(
        "action",
        choices=ACTIONS,
        help="train: train a generator (`hpd-fast generator train [options]`)",
    )
    cmd.parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output folder (default: the cache folder that `distill --generator auto` reads, "
        "<cache-dir>/generators/<dataset>-<h>x<w>-<hash>)",
    )
    cmd.parser.add_argument(
        "--overwrite",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="replace a generator or checkpoint of other settings in --out instead of refusing "
        "(default: off)",
    )
    cmd.parser.set_defaults(func=run)
    return cmd


def run(args: argparse.Namespace) -> int:
    if args.action != "train":  # pragma: no cover - argparse refuses other words
        raise CLIError(f"unknown action {args.action!r}")
    from hpd_fast.generators.fit import (
        GENERATOR_NAME,
        SAMPLES_NAME,
        cache_path,
        cached_generator,
        check_trainable,
        train_for_dataset,
    )
    from hpd_fast.run import load_dataset

    cfg = args.settings

    def body(device: torch.device, group: Any, rank: int) -> int:
        t0 = time.perf_counter()
        data = load_dataset(cfg.data)
        check_trainable(data, cfg.generator_train)
        progress = progress_of(args.runtime)
        if args.out:
            if rank != 0:
                return 0
            G = train_for_dataset(
                data,
                cfg.generator_train,
                args.out,
                data_config=cfg.data,
                device=device,
                progress=progress,
                overwrite=args.overwrite,
            )
            out, use = args.out, args.out
        else:
            G = cached_generator(
                data,
                cfg.generator_train,
                cfg.data,
                cache_dir=cfg.experts.cache_dir,
                device=device,
                progress=progress,
                group=group,
            )
            out, use = (
                cache_path(data, cfg.generator_train, cfg.data, cfg.experts.cache_dir),
                "auto",
            )
        if rank == 0:
            where = f" --root {cfg.data.root}" if cfg.data.root else ""
            res = f" --resolution {cfg.data.resolution}" if cfg.data.resolution else ""
            print(
                f"generator for {data.name} ({G.num_stages} stages, images "
                f"{list(G.image_shape)}, {G.training_config.get('steps')} steps) in {out}: "
                f"{GENERATOR_NAME}.safetensors, {GENERATOR_NAME}.json, {SAMPLES_NAME}; use it "
                f"with `{PROG} distill --dataset {cfg.data.dataset}{where}{res} --generator {use}`"
            )
        _LOG.info("done in %.1f s", time.perf_counter() - t0)
        return 0

    return in_process_group(args.runtime, body)
