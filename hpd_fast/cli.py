"""The ``hpd-fast`` command line (also ``python -m hpd_fast``).

Subcommands:

- ``experts``   train (or complete) and cache expert trajectories on a real dataset;
- ``distill``   H-PD distillation end to end: experts if missing, the distillation, evaluation
                against random real images, and an output folder with the synthetic set,
                image grids, a plot and ``metrics.json``. With no arguments it runs the main
                job on the embedded digits;
- ``evaluate``  train fresh networks on a saved distilled set and report test accuracy;
- ``bench``     run the benchmark suites under ``benchmarks/`` and print their tables;
- ``info``      version, and which kernel backends are built (and why not).

Every option of ``experts``, ``distill``, ``evaluate`` and ``bench`` can also come from
``--config FILE`` (JSON or TOML): keys are option names (``iterations_per_stage`` or
``iterations-per-stage``), optionally inside a table named after the subcommand; options given
on the command line win over the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import hpd_fast

__all__ = ["build_parser", "main"]

PROG = "hpd-fast"

# ----------------------------------------------------------------------------------------------
# Defaults of the main job (``hpd-fast distill`` with no arguments): digits, IPC 1, MTT (exact).
# Chosen so that the whole job (experts included) stays well within 10 minutes on a 2-core CPU.
# ----------------------------------------------------------------------------------------------
MAIN_NUM_EXPERTS = 5
MAIN_EXPERT_TRAIN_EPOCHS = 8  # >= expert_epochs (3) + max start epoch (5) of H-PD's defaults
MAIN_MTT_ITERATIONS = 20  # per stage, 4 stages; about 1 minute of H-PD on 2 busy cores
MAIN_SYN_STEPS = 10
EVAL_EPOCHS = 300
EVAL_NUM = 5


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


# ----------------------------------------------------------------------------------------------
# argument types
# ----------------------------------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(str(text), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object like '{{\"width\": 64}}', got {text!r}"
        )
    return value


def _name_list(text: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("must name at least one item (comma separated)")
    return names


_POS = _int_at_least(1)
_NONNEG = _int_at_least(0)


def _word_or_positive(word: str) -> Callable[[str], int | str]:
    """An argument type: ``word`` (any case) or an integer ``>= 1``."""

    def parse(text: str) -> int | str:
        if str(text).strip().lower() == word:
            return word
        try:
            return _POS(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"must be '{word}' or an integer >= 1, got {text!r}"
            ) from None

    parse.__name__ = f"{word}|int>=1"
    return parse


_threads = _word_or_positive("auto")
_snapshot_budget = _word_or_positive("all")


# ----------------------------------------------------------------------------------------------
# a subcommand whose options can also come from a config file
# ----------------------------------------------------------------------------------------------


class _Command:
    """A subparser that remembers each option's default and type, so that a config file can
    fill what the command line leaves out (options are registered with a SUPPRESS default:
    only explicitly given ones appear in the parsed namespace)."""

    def __init__(self, sub: Any, name: str, help: str, description: str) -> None:
        self.name = name
        self.parser = sub.add_parser(
            name,
            help=help,
            description=textwrap.fill(description, 90),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.defaults: dict[str, Any] = {}
        self.actions: dict[str, argparse.Action] = {}
        self.group = self.parser

    def section(self, title: str) -> None:
        self.group = self.parser.add_argument_group(title)

    def opt(
        self, *flags: str, default: Any = None, help: str, show_default: bool = True, **kw: Any
    ) -> None:
        if show_default and default is not None and kw.get("action") not in ("store_true",):
            shown = ",".join(default) if isinstance(default, list) else default
            help = f"{help} (default: {shown})"
        if kw.get("type") in (_POS, _NONNEG) and "metavar" not in kw:
            kw["metavar"] = "N"
        elif kw.get("type") in (_positive_float, _nonneg_float) and "metavar" not in kw:
            kw["metavar"] = "X"
        action = self.group.add_argument(*flags, default=argparse.SUPPRESS, help=help, **kw)
        self.defaults[action.dest] = (
            False if kw.get("action") == "store_true" and default is None else default
        )
        self.actions[action.dest] = action

    def add_common(self, *, device: bool = True, seed: bool = True) -> None:
        self.section("general")
        self.opt(
            "--config",
            metavar="FILE",
            show_default=False,
            help="JSON or TOML file whose keys set options (names as the long options, "
            "'-' or '_'; optionally in a table named after the subcommand); options on the "
            "command line win",
        )
        self.opt("--quiet", "-q", action="store_true", help="no progress bars or progress messages")
        if seed:
            self.opt("--seed", type=_NONNEG, default=0, help="seed of everything random")
        if device:
            self.opt(
                "--device",
                default=None,
                show_default=False,
                help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: cuda when "
                "available, else cpu)",
            )
            self.opt(
                "--threads",
                type=_threads,
                default="auto",
                metavar="N|auto",
                help="CPU threads for torch (torch.set_num_threads). auto: 1 when the CPU is "
                "oversubscribed (1-minute load average >= number of cores: extra threads then "
                "mostly wait for each other, measured 3-6x slower on 2 busy cores), else torch's "
                "default",
            )


def _read_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file {path!r} not found")
    text = p.read_bytes()
    suffix = p.suffix.lower()
    errors = []
    if suffix in (".json", ""):
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise CLIError(f"config file {path!r} must hold a JSON object at the top level")
            return data
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            errors.append(f"not valid JSON ({exc})")
    if suffix in (".toml", ""):
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise CLIError(
                    "TOML config files need Python >= 3.11 (or `pip install tomli`)"
                ) from None
        try:
            return tomllib.loads(text.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            errors.append(f"not valid TOML ({exc})")
    if not errors:
        raise CLIError(f"config file {path!r}: unknown extension {suffix!r} (use .json or .toml)")
    raise CLIError(f"config file {path!r} is " + "; ".join(errors))


def _config_value(cmd: _Command, dest: str, value: Any, path: str) -> Any:
    """Check / convert one config value with the option's own parser."""
    action = cmd.actions[dest]
    where = f"config file {path!r}, key {dest!r}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise CLIError(f"{where}: must be true or false, got {value!r}")
        return value
    if action.nargs in ("*", "+") and isinstance(value, list):
        items = value
    else:
        items = [value]
    out = []
    for item in items:
        if (
            action.type is not None
            and not (action.type is _json_object and isinstance(item, dict))
            and not (action.type is _name_list and isinstance(item, list))
        ):
            if isinstance(item, (bool, dict, list)):
                raise CLIError(f"{where}: unexpected value {item!r}")
            try:
                item = action.type(str(item))
            except argparse.ArgumentTypeError as exc:
                raise CLIError(f"{where}: {exc}") from None
        elif action.type is _name_list and isinstance(item, list):
            item = [str(x) for x in item]
        if action.choices is not None and item not in action.choices:
            raise CLIError(
                f"{where}: invalid choice {item!r} (choose from {', '.join(map(str, action.choices))})"
            )
        out.append(item)
    return out if action.nargs in ("*", "+") else out[0]


def _config_names(cmd: _Command) -> dict[str, str]:
    """Config keys of ``cmd`` -> option dest: the dest and every long option name."""
    names = {d: d for d in cmd.defaults}
    for d, action in cmd.actions.items():
        for flag in action.option_strings:
            if flag.startswith("--"):
                names[flag[2:].replace("-", "_")] = d
    return names


def _resolve(cmd: _Command, ns: argparse.Namespace) -> argparse.Namespace:
    """defaults < config file < command line."""
    explicit = {k: v for k, v in vars(ns).items() if k in cmd.defaults}
    merged = dict(cmd.defaults)
    cfg_path = explicit.get("config")
    if cfg_path:
        data = _read_config(cfg_path)
        section = data.get(cmd.name) if isinstance(data.get(cmd.name), dict) else {}
        others = set(_COMMANDS) - {cmd.name}
        flat = {k: v for k, v in data.items() if not (isinstance(v, dict) and k in _COMMANDS)}
        flat.update(section)
        names = _config_names(cmd)
        elsewhere = set().union(*(_config_names(c) for c in _COMMANDS.values() if c is not cmd))
        for key, value in flat.items():
            norm = str(key).replace("-", "_")
            dest = names.get(norm, "")
            if dest in ("config", ""):
                # A top-level key for another subcommand is fine (one file for the pipeline).
                if key not in section and (norm in elsewhere or key in others):
                    continue
                valid = ", ".join(sorted(k for k, d in names.items() if d != "config"))
                raise CLIError(
                    f"config file {cfg_path!r}: unknown key {key!r} for `{PROG} {cmd.name}` "
                    f"(valid keys: {valid})"
                )
            merged[dest] = _config_value(cmd, dest, value, cfg_path)
    merged.update(explicit)
    out = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in cmd.defaults})
    for k, v in merged.items():
        setattr(out, k, v)
    return out


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _auto_threads() -> int | None:
    """1 on an oversubscribed CPU (load average >= cores), else None (torch's default)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    return 1 if cores > 1 and load >= cores else None


def _setup_torch(args: argparse.Namespace) -> torch.device:
    dev = getattr(args, "device", None)
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
    threads = getattr(args, "threads", None)
    if threads == "auto":
        threads = _auto_threads() if device.type == "cpu" else None
        if threads is not None:
            _log(
                args,
                f"CPU busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): using "
                "1 torch thread (--threads N to choose)",
            )
    if threads:
        torch.set_num_threads(threads)
    return device


def _load_dataset(args: argparse.Namespace) -> hpd_fast.DistillData:
    _log(args, f"loading dataset {args.dataset!r}" + (f" from {args.root}" if args.root else ""))
    return hpd_fast.data.load(
        args.dataset, args.root, resolution=args.resolution, max_per_class=args.max_per_class
    )


def _cache_dir(args: argparse.Namespace) -> Path:
    if args.cache_dir:
        return Path(args.cache_dir).expanduser()
    env = os.environ.get("HPD_FAST_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hpd_fast"


def _expert_settings(args: argparse.Namespace, data: hpd_fast.DistillData) -> dict[str, Any]:
    """What decides the content of a set of experts (the cache key); num_experts excluded:
    asking for more experts later extends the same folder."""
    return {
        "dataset": data.name,
        "root": str(Path(args.root).resolve()) if args.root else None,
        "resolution": list(data.im_size),
        "max_per_class": args.max_per_class,
        "model": args.model,
        "model_kwargs": args.model_kwargs or {},
        "epochs": args.expert_train_epochs,
        "lr": args.expert_lr,
        "batch_size": args.expert_batch_size,
        "augment": args.augment,
        "seed": args.seed,
    }


def _expert_cache_path(args: argparse.Namespace, data: hpd_fast.DistillData) -> Path:
    settings = _expert_settings(args, data)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    h, w = data.im_size
    name = f"{data.name}-{h}x{w}-{args.model}-e{args.expert_train_epochs}-{digest}"
    return _cache_dir(args) / "experts" / name


def _augment_arg(text: str) -> Any:
    return None if text.lower() == "none" else text


def _peak_memory_mib() -> tuple[float, str]:
    """Peak resident memory of this process (VmHWM where /proc has it, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "VmHWM"
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (r / 2**20 if sys.platform == "darwin" else r / 1024), "ru_maxrss"


def _versions() -> dict[str, Any]:
    return {
        "hpd_fast": hpd_fast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _train_or_load_experts(
    args: argparse.Namespace,
    data: hpd_fast.DistillData,
    device: torch.device,
    out: Path,
    group: Any = None,
) -> Any:
    from hpd_fast import experts as E

    vmap = args.vmap == "on"
    _log(args, f"expert trajectories: {out}")
    return E.train_experts(
        data,
        args.model,
        num_experts=args.num_experts,
        epochs=args.expert_train_epochs,
        lr=args.expert_lr,
        batch_size=args.expert_batch_size,
        augment=_augment_arg(args.augment),
        seed=args.seed,
        out=out,
        progress=not args.quiet,
        model_kwargs=args.model_kwargs,
        vmap=vmap,
        group_size=args.group_size,
        device=device,
        group=group,
    )


def _print_experts(ex: Any) -> None:
    accs = [a for a in ex.test_accuracy if a is not None]
    acc = f", test accuracy {sum(accs) / len(accs):.1f}% (mean)" if accs else ""
    print(
        f"{len(ex)} experts x {ex.epochs} epochs ({ex.model_config['name']}, P={ex.num_params})"
        f"{acc} in {ex.path}"
    )


# ----------------------------------------------------------------------------------------------
# experts
# ----------------------------------------------------------------------------------------------


def _dataset_options(cmd: _Command, default: str | None = "digits") -> None:
    from hpd_fast.data import DATASET_NAMES

    cmd.section("data")
    cmd.opt(
        "--dataset",
        default=default,
        show_default=default is not None,
        help=f"dataset name: {', '.join(DATASET_NAMES)}",
    )
    cmd.opt(
        "--root",
        metavar="DIR",
        default=None,
        show_default=False,
        help="local folder of the dataset (CIFAR archives, image folders); not used for "
        "digits. Nothing is downloaded",
    )
    cmd.opt(
        "--resolution",
        type=_POS,
        default=None,
        show_default=False,
        help="square image side (default: native: 8 for digits, 32 for CIFAR, 128 for "
        "image folders)",
    )
    cmd.opt(
        "--max-per-class",
        type=_POS,
        default=None,
        show_default=False,
        help="use at most this many training images per class",
    )


def _expert_options(cmd: _Command, *, train_epochs_flag: str) -> None:
    from hpd_fast.models import MODEL_NAMES

    cmd.opt(
        "--model",
        default="ConvNet",
        choices=MODEL_NAMES,
        metavar="NAME",
        help=f"expert / student network: {', '.join(MODEL_NAMES)}",
    )
    cmd.opt(
        "--model-kwargs",
        type=_json_object,
        default=None,
        metavar="JSON",
        show_default=False,
        help="constructor arguments of the network as JSON, e.g. '{\"width\": 64}'",
    )
    cmd.opt("--num-experts", type=_POS, default=MAIN_NUM_EXPERTS, help="number of expert networks")
    cmd.opt(
        train_epochs_flag,
        dest="expert_train_epochs",
        type=_POS,
        default=MAIN_EXPERT_TRAIN_EPOCHS,
        help="training epochs of each expert",
    )
    cmd.opt("--expert-lr", type=_positive_float, default=0.01, help="experts' SGD learning rate")
    cmd.opt("--expert-batch-size", type=_POS, default=256, help="experts' minibatch size")
    cmd.opt(
        "--augment",
        default="dsa",
        help="augmentation while training: dsa, none, or a DSA strategy such as "
        "color_crop_cutout_flip_scale_rotate",
    )
    cmd.opt(
        "--cache-dir",
        metavar="DIR",
        default=None,
        show_default=False,
        help="cache folder; experts go to <cache-dir>/experts/<dataset>-<size>-<model>-"
        "e<epochs>-<hash> (default: $HPD_FAST_CACHE, else $XDG_CACHE_HOME/hpd_fast or "
        "~/.cache/hpd_fast)",
    )
    cmd.opt(
        "--vmap",
        choices=("on", "off"),
        default="off",
        help="train --group-size experts at once with torch.func.vmap (models without buffers; "
        "on the CPU it is slower and needs more memory, see benchmarks/README.md)",
    )
    cmd.opt("--group-size", type=_POS, default=4, help="experts per vmap call")


def _cmd_experts(args: argparse.Namespace) -> int:
    return _in_process_group(args, _experts)


def _experts(args: argparse.Namespace, device: torch.device, group: Any, rank: int) -> int:
    data = _load_dataset(args)
    out = Path(args.out) if args.out else _expert_cache_path(args, data)
    t0 = time.perf_counter()
    ex = _train_or_load_experts(args, data, device, out, group)
    if rank == 0:
        _print_experts(ex)
    _log(args, f"done in {time.perf_counter() - t0:.1f} s")
    return 0


# ----------------------------------------------------------------------------------------------
# distill
# ----------------------------------------------------------------------------------------------


def _load_generator(args: argparse.Namespace, data: hpd_fast.DistillData, device: torch.device):
    from hpd_fast import generators as G

    spec = args.generator
    if spec == "pretrained":
        try:
            gen = G.pretrained(data.name)
        except ValueError:
            raise CLIError(
                f"no pretrained generator ships for dataset {data.name!r} (only digits): pass "
                "--generator PATH (a ConvGenerator saved with hpd_fast.generators.save_generator, "
                "or a StyleGAN network pickle with --allow-pickle)"
            ) from None
        except FileNotFoundError as exc:
            raise CLIError(f"the shipped generator weights are missing: {exc}") from None
    elif spec.endswith(".pkl"):
        net = G.load_stylegan_pickle(spec, allow_pickle=args.allow_pickle)
        gen = G.from_stylegan(
            net,
            num_classes=data.num_classes,
            mean=data.mean,
            std=data.std,
            **(args.generator_kwargs or {}),
        )
    else:
        gen = G.load_generator(spec)
    return gen.to(device).eval()


def _distill_options(cmd: _Command) -> None:
    from hpd_fast.distill.snapshots import DEFAULT_MAX_SNAPSHOTS
    from hpd_fast.distill.trajectory import MODES

    cmd.section("distillation")
    cmd.opt("--ipc", type=_POS, default=1, help="images per class")
    cmd.opt(
        "--algorithm",
        choices=("mtt", "dm", "dc"),
        default="mtt",
        help="distillation loss: mtt (trajectory matching), dm (distribution matching), "
        "dc (gradient matching)",
    )
    cmd.opt(
        "--mode",
        choices=MODES,
        default="exact",
        help="trajectory-matching gradient: exact (constant memory), first_order (the "
        "published H-PD/GLaD approximation) or unrolled (full autograd graph)",
    )
    cmd.opt(
        "--generator",
        default="pretrained",
        metavar="PATH",
        help="'pretrained' (the generator shipped for the dataset), a ConvGenerator file "
        "(.safetensors + .json from hpd_fast.generators.save_generator), or a StyleGAN "
        "network pickle (.pkl; needs --allow-pickle and the official code importable)",
    )
    cmd.opt(
        "--allow-pickle",
        action="store_true",
        help="allow unpickling a StyleGAN .pkl (runs code from the file: trusted files only)",
    )
    cmd.opt(
        "--generator-kwargs",
        type=_json_object,
        default=None,
        metavar="JSON",
        show_default=False,
        help="extra arguments of hpd_fast.generators.from_stylegan, e.g. "
        "'{\"truncation_psi\": 0.7}'",
    )
    cmd.opt(
        "--iterations-per-stage",
        type=_POS,
        default=None,
        show_default=False,
        help=f"optimiser steps per generator stage (default: {MAIN_MTT_ITERATIONS} for mtt; "
        "H-PD's default for dm and dc)",
    )
    cmd.opt(
        "--last-stage",
        type=_POS,
        default=None,
        show_default=False,
        help="deepest generator stage to optimise (default: the last)",
    )
    cmd.opt(
        "--lr-w",
        type=_nonneg_float,
        default=None,
        show_default=False,
        help="learning rate of the latent code w (default: per algorithm)",
    )
    cmd.opt(
        "--lr-f",
        type=_nonneg_float,
        default=None,
        show_default=False,
        help="learning rate of the feature latents f (default: per algorithm)",
    )
    cmd.opt(
        "--select",
        choices=("crfd", "eval", "last"),
        default="crfd",
        help="how the stage/iterate is chosen: crfd (class-relevant feature distance), eval "
        "(train networks per candidate; slow) or last",
    )
    cmd.opt(
        "--crfd-models",
        type=_POS,
        default=None,
        show_default=False,
        help="random networks averaged in the CRFD score (default: H-PD's)",
    )
    cmd.opt(
        "--select-every",
        type=_POS,
        default=None,
        show_default=False,
        help="score the iterate every N iterations (default: H-PD's)",
    )
    cmd.opt(
        "--chunk-size",
        type=_POS,
        default=None,
        show_default=False,
        help="images re-rendered per backward chunk (default: H-PD's)",
    )

    cmd.section("trajectory matching (--algorithm mtt)")
    cmd.opt(
        "--experts",
        metavar="PATH",
        default=None,
        show_default=False,
        help="existing expert trajectories (a folder from `hpd-fast experts`); default: "
        "train them into the cache if missing (settings below)",
    )
    _expert_options(cmd, train_epochs_flag="--expert-train-epochs")
    cmd.opt(
        "--syn-steps",
        type=_POS,
        default=MAIN_SYN_STEPS,
        help="student steps per iteration",
    )
    cmd.opt(
        "--expert-epochs",
        type=_POS,
        default=None,
        show_default=False,
        help="expert epochs the student must match (default: H-PD's)",
    )
    cmd.opt(
        "--max-start-epoch",
        type=_POS,
        default=None,
        show_default=False,
        help="start epochs are drawn from [0, N) (default: H-PD's)",
    )
    cmd.opt(
        "--max-snapshots",
        type=_snapshot_budget,
        default=None,
        show_default=False,
        help="exact/first_order modes: the most student snapshots stored at once; longer "
        "trajectories rebuild the rest in the backward sweep (same gradients); 'all' stores "
        f"every one (default {DEFAULT_MAX_SNAPSHOTS})",
    )
    cmd.opt(
        "--batch-syn",
        type=_POS,
        default=None,
        show_default=False,
        help="student minibatch (default: all synthetic images)",
    )
    cmd.opt(
        "--lr-lr",
        type=_nonneg_float,
        default=None,
        show_default=False,
        help="learning rate of the learnable student rate (default: H-PD's)",
    )

    cmd.section("evaluation")
    cmd.opt(
        "--eval-models",
        type=_name_list,
        default=["ConvNet"],
        metavar="NAMES",
        help="comma-separated networks trained on the distilled set, e.g. "
        "ConvNet,ResNet18,VGG11,AlexNet",
    )
    cmd.opt("--num-eval", type=_POS, default=EVAL_NUM, help="networks trained per architecture")
    cmd.opt("--eval-epochs", type=_POS, default=EVAL_EPOCHS, help="training epochs per network")
    cmd.opt("--eval-lr", type=_positive_float, default=0.01, help="peak learning rate")
    cmd.opt("--no-eval", action="store_true", help="skip the evaluation")

    cmd.section("output")
    cmd.opt(
        "--out",
        metavar="DIR",
        default=None,
        show_default=False,
        help="output folder (default: runs/<dataset>-ipc<ipc>-<algorithm>)",
    )
    cmd.opt(
        "--overwrite",
        action="store_true",
        help="discard an existing H-PD checkpoint in the output folder (otherwise a run with "
        "the same settings resumes from it)",
    )


def _hpd_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Options passed to HPD only when given (HPD's own defaults otherwise)."""
    names = {
        "iterations_per_stage": "iterations_per_stage",
        "last_stage": "last_stage",
        "lr_w": "lr_w",
        "lr_f": "lr_f",
        "select_every": "select_every",
        "crfd_models": "crfd_models",
        "chunk_size": "chunk_size",
    }
    if args.algorithm == "mtt":
        names.update(
            syn_steps="syn_steps",
            expert_epochs="expert_epochs",
            max_start_epoch="max_start_epoch",
            batch_syn="batch_syn",
            lr_lr="lr_lr",
            max_snapshots="max_snapshots",
        )
    out = {hpd: getattr(args, cli) for cli, hpd in names.items() if getattr(args, cli) is not None}
    if args.algorithm == "mtt":
        out.setdefault("iterations_per_stage", MAIN_MTT_ITERATIONS)
        if out.get("max_snapshots") == "all":
            out["max_snapshots"] = None
    return out


def _stage_plot(result: Any, path: Path) -> None:
    """Loss per iteration (all stages) and CRFD per stage, side by side."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_score = fig.subplots(1, 2)
    stages = sorted({e["stage"] for e in result.losses} | set(result.stage_best))
    colors = matplotlib.colormaps["viridis"]
    n = max(1, len(stages))
    per_stage = max((e["iteration"] for e in result.losses), default=0)
    for i, k in enumerate(stages):
        pts = [(e["iteration"], e["loss"]) for e in result.losses if e["stage"] == k]
        if pts:
            x = [(k - 1) * per_stage + it for it, _ in pts]
            ax_loss.plot(x, [v for _, v in pts], color=colors(i / n), lw=1, label=f"stage {k}")
    for k in stages[1:]:
        ax_loss.axvline((k - 1) * per_stage + 0.5, color="0.8", lw=0.8)
    ax_loss.set_xlabel("iteration (all stages)")
    ax_loss.set_ylabel("distillation loss")
    ax_loss.set_title("loss", fontsize=10)
    if stages:
        ax_loss.legend(fontsize=7)

    best = {k: v.get("score") for k, v in result.stage_best.items() if v.get("score") is not None}
    if best:
        ks = sorted(best)
        for j, k in enumerate(ks):  # the best score of each stage as a bar-wide line
            chosen = k == result.stage
            ax_score.hlines(
                best[k],
                j - 0.4,
                j + 0.4,
                colors="tab:red" if chosen else "0.5",
                lw=3 if chosen else 2,
            )
        ax_score.set_xticks(range(len(ks)), [str(k) for k in ks])
        for i, k in enumerate(stages):
            hist = result.history_of(k)
            if hist:
                xs = [ks.index(k) + (it / max(1, per_stage) - 0.5) * 0.8 for it, _ in hist]
                ax_score.plot(xs, [s for _, s in hist], "o-", ms=2, lw=0.8, color=colors(i / n))
        scores = [sc for k in stages for _, sc in result.history_of(k)] or list(best.values())
        lo, hi = min(scores), max(scores)
        pad = 0.15 * (hi - lo) or 0.05 * abs(hi) or 1.0
        ax_score.set_ylim(lo - pad, hi + pad)  # the differences matter, not the distance to 0
        ax_score.set_xlabel("stage (bar: best iterate, red: chosen; dots: scored iterates)")
        ax_score.set_ylabel("CRFD (lower is better)")
    else:
        ax_score.text(0.5, 0.5, "no scores (select=last)", ha="center", va="center")
    ax_score.set_title("class-relevant feature distance", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def _overview(
    result: Any,
    real: torch.Tensor,
    real_labels: torch.Tensor,
    path: Path,
    class_names: Sequence[str],
) -> None:
    """One figure: random real images, the best images of every stage, the chosen set.

    Columns are classes (the first image of each class when ipc > 1)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    def firsts(images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor | None]:
        return [
            images[(labels == c).nonzero().flatten()[0]] if bool((labels == c).any()) else None
            for c in range(len(class_names))
        ]

    rows = [("random real", firsts(result.denormalized(real), real_labels))]
    for k in sorted(result.stage_images):
        rows.append(
            (f"stage {k}", firsts(result.denormalized(result.stage_images[k]), result.labels))
        )
    rows.append((f"chosen (stage {result.stage})", firsts(result.denormalized(), result.labels)))
    ncols = len(class_names)
    fig = Figure(figsize=(1.5 + 0.8 * ncols, 0.85 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c, img in enumerate(imgs):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if img is not None:
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(img[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0:
                ax.set_title(str(class_names[c]), fontsize=8)
    fig.subplots_adjust(left=0.13, right=0.99, top=0.9, bottom=0.02, wspace=0.05, hspace=0.1)
    fig.savefig(str(path), dpi=100)


def _accuracy_summary(ev: dict[str, Any]) -> tuple[dict, dict, dict]:
    models = ev["config"]["models"]
    syn = {m: {k: ev[m][k] for k in ("mean", "std", "accs")} for m in models}
    real = {m: {k: ev["random_real"][m][k] for k in ("mean", "std", "accs")} for m in models}
    gain = {m: syn[m]["mean"] - real[m]["mean"] for m in models}
    return syn, real, gain


def _join_process_group(args: argparse.Namespace, device: torch.device) -> tuple[Any, torch.device]:
    """Under torchrun (``WORLD_SIZE`` > 1): join the default process group (NCCL on CUDA, one
    device per process by ``LOCAL_RANK``; gloo on the CPU). Returns ``(group or None, device)``.
    ``distill`` runs its H-PD loop over the group; experts and evaluation runs are shared out.
    """
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


def _in_process_group(
    args: argparse.Namespace, body: Callable[[argparse.Namespace, torch.device, Any, int], int]
) -> int:
    """``body(args, device, group, rank)``, in the process group when run under torchrun
    (left at the end); ranks other than 0 are quiet."""
    device = _setup_torch(args)
    group, device = _join_process_group(args, device)
    if group is None:
        return body(args, device, None, 0)
    rank = torch.distributed.get_rank(group)
    if rank != 0:
        args.quiet = True  # one voice: the first rank logs, prints and writes
    try:
        return body(args, device, group, rank)
    finally:
        torch.distributed.destroy_process_group()


def _cmd_distill(args: argparse.Namespace) -> int:
    return _in_process_group(args, _distill)


def _distill(args: argparse.Namespace, device: torch.device, group: Any, rank: int) -> int:
    """The distill command on ``device``; with a process group every rank trains its share of
    the experts, runs H-PD and trains its share of the evaluation networks, and ``rank`` 0
    alone writes."""
    from hpd_fast import experts as E
    from hpd_fast.distill.hpd import HPD

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    data = _load_dataset(args)
    out = Path(args.out or f"runs/{data.name}-ipc{args.ipc}-{args.algorithm}")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a folder")
    generator = _load_generator(args, data, device)
    timings["setup"] = time.perf_counter() - t_start

    experts = None
    experts_info: dict[str, Any] | None = None
    if args.algorithm == "mtt":
        t0 = time.perf_counter()
        if args.experts:
            experts = E.load(args.experts)
            _log(args, f"expert trajectories: {args.experts}")
            if experts.dataset_name != data.name:
                raise CLIError(
                    f"--experts {args.experts!r} were trained on {experts.dataset_name!r}, but "
                    f"the dataset is {data.name!r}"
                )
        else:
            # Over a process group each rank trains its share of the experts.
            experts = _train_or_load_experts(
                args, data, device, _expert_cache_path(args, data), group
            )
        timings["experts"] = time.perf_counter() - t0
        accs = [a for a in experts.test_accuracy if a is not None]
        experts_info = {
            "path": str(experts.path),
            "num_experts": len(experts),
            "epochs": experts.epochs,
            "model": experts.model_config,
            "mean_test_accuracy": sum(accs) / len(accs) if accs else None,
            "seconds": timings["experts"],
        }
        if not args.quiet:
            _print_experts(experts)

    ckpt = out / "checkpoint"
    if args.overwrite and ckpt.exists() and rank == 0:
        shutil.rmtree(ckpt)
    if group is not None:  # the others read the checkpoint folder only after it is gone
        torch.distributed.barrier(group)
    hpd = HPD(
        generator,
        data.to(device),
        ipc=args.ipc,
        algorithm=args.algorithm,
        experts=experts,
        mtt_mode=args.mode,
        select=args.select,
        checkpoint_dir=ckpt,
        seed=args.seed,
        group=group,
        **_hpd_kwargs(args),
    )
    how = f"{args.algorithm} ({args.mode})" if args.algorithm == "mtt" else args.algorithm
    if group is not None:
        how += f" over {torch.distributed.get_world_size(group)} processes"
    _log(
        args,
        f"H-PD {how}, IPC {args.ipc}, stages 1..{hpd.last_stage}, "
        f"{hpd.iterations_per_stage} iterations each",
    )
    t0 = time.perf_counter()
    try:
        result = hpd.fit(progress=not args.quiet)
    except ValueError as exc:
        if "checkpoint of a different run" in str(exc):
            raise CLIError(f"{exc}; or pass --overwrite to start afresh") from None
        raise
    timings["distill"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if rank == 0:
        result.save(out)
        _stage_plot(result, out / "stages.png")
        real_x, real_y = data.random_real(args.ipc, args.seed)
        _overview(result, real_x, real_y, out / "overview.png", data.class_names)

    timings["outputs"] = time.perf_counter() - t0
    crfd = {str(k): v.get("score") for k, v in sorted(result.stage_best.items())}
    final_loss: dict[str, Any] = {}
    for k in sorted(result.stage_best):
        vals = [e["loss"] for e in result.losses if e["stage"] == k]
        final_loss[str(k)] = {"mean": sum(vals) / len(vals), "last": vals[-1]} if vals else None
    metrics: dict[str, Any] = {
        "dataset": data.name,
        "ipc": args.ipc,
        "algorithm": args.algorithm,
        "mode": args.mode if args.algorithm == "mtt" else None,
        "generator": args.generator,
        "chosen_stage": result.stage,
        "chosen_iteration": result.iteration,
        "crfd_per_stage": crfd,
        "loss_per_stage": final_loss,
    }
    if not args.no_eval:
        t0 = time.perf_counter()
        ev = hpd_fast.evaluate(
            result.images,
            result.labels,
            data,
            models=args.eval_models,
            num_eval=args.num_eval,
            epochs=args.eval_epochs,
            lr=args.eval_lr,
            seed=args.seed,
            baseline="random_real",
            progress=not args.quiet,
            device=device,
            group=group,
        )
        timings["evaluate"] = time.perf_counter() - t0
        syn, real, gain = _accuracy_summary(ev)
        metrics.update(
            accuracy=syn,
            random_real=real,
            gain_over_random_real=gain,
            evaluation={k: v for k, v in ev["config"].items() if k != "seconds"},
        )
    timings["total"] = time.perf_counter() - t_start
    if rank != 0:
        return 0
    peak, source = _peak_memory_mib()
    metrics.update(
        time_s=timings,
        peak_memory_mib=peak,
        peak_memory_source=source,
        experts=experts_info,
        hpd_config=result.config,
        hpd_timings=result.timings,
        device=str(device),
        processes=1 if group is None else torch.distributed.get_world_size(group),
        threads=torch.get_num_threads(),
        loadavg_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        cpu_count=os.cpu_count(),
        versions=_versions(),
        command=vars_for_json(args),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    print(f"distilled set: {out}  (chosen stage {result.stage}, iterate {result.iteration})")
    for k, v in crfd.items():
        mark = "  <- chosen" if int(k) == result.stage else ""
        if int(k) > min(result.stage_best) and result.stage_best[int(k)].get("iteration") == 0:
            # The stage starts from the previous stage's best images; none of its iterates
            # scored lower, so its best is that start (same images, same score).
            mark += "  (no iterate beat the stage's start)"
        print(f"  stage {k}: CRFD {v:.4g}{mark}" if v is not None else f"  stage {k}: not scored")
    if "accuracy" in metrics:
        for m in args.eval_models:
            s, r = metrics["accuracy"][m], metrics["random_real"][m]
            print(
                f"  {m}: {s['mean']:.1f} ± {s['std']:.1f} %   random real {r['mean']:.1f} ± "
                f"{r['std']:.1f} %   ({metrics['gain_over_random_real'][m]:+.1f} points)"
            )
    print(f"  time {timings['total']:.0f} s, peak memory {peak:.0f} MiB")
    return 0


def vars_for_json(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved options, JSON-safe (for metrics.json)."""
    return {
        k: v
        for k, v in vars(args).items()
        if k not in ("func", "command")
        and isinstance(v, (str, int, float, bool, list, dict, type(None)))
    }


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


def _cmd_evaluate(args: argparse.Namespace) -> int:
    return _in_process_group(args, _evaluate)


def _evaluate(args: argparse.Namespace, device: torch.device, group: Any, rank: int) -> int:
    from hpd_fast.distill.result import DistillResult

    run = Path(args.run_dir)
    if not run.is_dir():
        raise CLIError(
            f"{str(run)!r} is not a folder (expected the --out folder of `{PROG} distill`)"
        )
    result = DistillResult.load(run)
    cfg_data = result.config.get("dataset", {})
    if args.dataset is None:
        args.dataset = cfg_data.get("name")
        if not args.dataset:
            raise CLIError(
                f"{str(run)!r} does not say which dataset it was made from: pass --dataset"
            )
    if args.resolution is None and result.images.shape[-1] != result.images.shape[-2]:
        raise CLIError("non-square images: pass --resolution")
    if args.resolution is None and args.dataset.lower() != "digits":
        args.resolution = int(result.images.shape[-1])
    data = _load_dataset(args)
    if args.stage is None:
        images, what = result.images, f"chosen set (stage {result.stage})"
    else:
        if args.stage not in result.stage_images:
            raise CLIError(
                f"--stage {args.stage}: the run has stages {sorted(result.stage_images)}"
            )
        images, what = result.stage_images[args.stage], f"stage {args.stage}"
    _log(args, f"evaluating the {what} of {run}: {images.shape[0]} images")
    ev = hpd_fast.evaluate(
        images,
        result.labels,
        data,
        models=args.models,
        num_eval=args.num_eval,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        augment=args.augment,
        seed=args.seed,
        baseline=None if args.baseline == "none" else args.baseline,
        progress=not args.quiet,
        device=device,
        group=group,
    )
    if rank != 0:
        return 0
    out = Path(args.out) if args.out else run / "evaluation.json"
    payload = {"run": str(run), "set": what, **ev, "versions": _versions()}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    for m in args.models:
        line = f"{m}: {ev[m]['mean']:.2f} ± {ev[m]['std']:.2f} %"
        if "random_real" in ev:
            r = ev["random_real"][m]
            line += f"   random real {r['mean']:.2f} ± {r['std']:.2f} %"
        print(line)
    _log(args, f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------


def _bench_dir() -> Path:
    return Path(hpd_fast.__file__).resolve().parent.parent / "benchmarks"


def _suites(bench: Path) -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(bench.glob("bench_*.py"))}


def _readme_sections(bench: Path, keys: Sequence[str]) -> list[tuple[str, str]]:
    readme = bench / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    out = []
    for key in keys:
        m = re.search(
            rf"<!-- BEGIN {re.escape(key)} -->\n(.*?)<!-- END {re.escape(key)} -->", text, re.S
        )
        if m:
            out.append((key, m.group(1).strip()))
    return out


def _cmd_bench(args: argparse.Namespace) -> int:
    bench = _bench_dir()
    if not bench.is_dir():
        raise CLIError(
            f"no benchmarks folder at {str(bench)!r}: `{PROG} bench` runs from a source checkout "
            "(pip install -e .)"
        )
    suites = _suites(bench)
    if args.list:
        for name, path in suites.items():
            doc = (
                path.read_text().split('"""')[1].strip().splitlines()[0]
                if '"""' in path.read_text()
                else ""
            )
            print(f"{name:<20} {doc}")
        return 0
    chosen = args.suites or list(suites)
    unknown = [s for s in chosen if s not in suites]
    if unknown:
        raise CLIError(f"unknown benchmark suite(s) {unknown}; available: {', '.join(suites)}")
    cmd = [sys.executable, "-m", "pytest", *[str(suites[s]) for s in chosen], "-q"]
    if args.device:
        cmd += ["--bench-device", args.device]
    if args.threads:
        cmd += ["--bench-threads", str(args.threads)]
    cmd += list(args.pytest_args or [])
    _log(args, "running: " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=bench.parent)
    sections = _readme_sections(bench, chosen)
    if sections:
        print("\n" + "=" * 30 + " tables (benchmarks/README.md) " + "=" * 30)
        for key, body in sections:
            print(f"\n## {key}\n\n{body}")
    return proc.returncode


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------

_COMMANDS: dict[str, _Command] = {}

_DISTILL_EPILOG = f"""\
With no arguments this is the main job: the embedded digits, IPC 1, the shipped pretrained
generator, {MAIN_NUM_EXPERTS} experts x {MAIN_EXPERT_TRAIN_EPOCHS} epochs (trained once and cached), H-PD with
trajectory matching (exact gradient; {MAIN_MTT_ITERATIONS} iterations per stage, {MAIN_SYN_STEPS} student steps),
evaluation of {EVAL_NUM} ConvNets ({EVAL_EPOCHS} epochs) against {EVAL_NUM} trained on random real
images, and the folder runs/digits-ipc1-mtt/ with:

  tensors.safetensors   the chosen images, labels and latents, and every stage's best iterate
  summary.json          chosen stage/iterate, CRFD history, losses, timings, settings
  grid_chosen.png       the chosen set, one row per class
  grid_stage<k>.png     the best images of stage k
  overview.png          random real images, each stage's best, and the chosen set
  stages.png            loss per iteration and CRFD per stage
  metrics.json          accuracy (mean ± std) vs random real, CRFD per stage, chosen stage,
                        time, peak memory
  checkpoint/           H-PD checkpoint (a rerun with the same settings resumes from it)

examples:
  {PROG} distill
  {PROG} distill --ipc 10 --algorithm dm --out runs/dm10
  {PROG} distill --dataset cifar10 --root ~/data --generator G.pkl --allow-pickle --ipc 1
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hpd-fast`` (subcommands: experts, distill, evaluate, bench,
    info)."""
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

    # experts
    cmd = _Command(
        sub,
        "experts",
        "train and cache expert trajectories (for trajectory matching)",
        "Train expert networks on the real training split and save their parameters "
        "after every epoch (safetensors, one file per expert). Interrupted runs resume: "
        "finished experts are kept.",
    )
    _dataset_options(cmd)
    cmd.section("experts")
    _expert_options(cmd, train_epochs_flag="--epochs")
    cmd.opt(
        "--out",
        metavar="DIR",
        default=None,
        show_default=False,
        help="output folder (default: the cache folder that `distill` looks in)",
    )
    cmd.add_common()
    cmd.parser.set_defaults(func=_cmd_experts)
    _COMMANDS["experts"] = cmd

    # distill
    cmd = _Command(
        sub,
        "distill",
        "distill a dataset with H-PD, evaluate it, save everything",
        "H-PD (hierarchical parameterization distillation): optimise generator latents "
        "stage by stage, choose the stage by CRFD, evaluate against random real images.",
    )
    cmd.parser.epilog = _DISTILL_EPILOG
    _dataset_options(cmd)
    _distill_options(cmd)
    cmd.add_common()
    cmd.parser.set_defaults(func=_cmd_distill)
    _COMMANDS["distill"] = cmd

    # evaluate
    cmd = _Command(
        sub,
        "evaluate",
        "train fresh networks on a saved distilled set, report accuracy",
        "Train networks from scratch on a distilled set saved by `distill` and test them "
        "on the real test split (mean ± std), next to the same protocol on random real "
        "images. Writes <run>/evaluation.json.",
    )
    cmd.parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="folder written by `hpd-fast distill` (holds tensors.safetensors)",
    )
    _dataset_options(cmd, default=None)
    cmd.actions["dataset"].help = "dataset name (default: the one the run was made from)"
    cmd.section("evaluation")
    cmd.opt(
        "--models",
        type=_name_list,
        default=["ConvNet"],
        metavar="NAMES",
        help="comma-separated networks: ConvNet, ResNet18, VGG11, AlexNet, ConvNetD<k>",
    )
    cmd.opt(
        "--stage",
        type=_POS,
        default=None,
        show_default=False,
        help="evaluate this stage's best images instead of the chosen set",
    )
    cmd.opt("--num-eval", type=_POS, default=EVAL_NUM, help="networks trained per architecture")
    cmd.opt("--epochs", type=_POS, default=EVAL_EPOCHS, help="training epochs per network")
    cmd.opt(
        "--lr",
        type=_positive_float,
        default=0.01,
        help="peak learning rate (SGD, momentum 0.9, warm-up then cosine)",
    )
    cmd.opt("--batch-size", type=_POS, default=256, help="minibatch size")
    cmd.opt("--augment", default="dsa", help="dsa, none, or a DSA strategy string")
    cmd.opt(
        "--baseline",
        choices=("random_real", "none"),
        default="random_real",
        help="also train on IPC random real images per class",
    )
    cmd.opt(
        "--out",
        metavar="FILE",
        default=None,
        show_default=False,
        help="JSON file for the results (default: RUN_DIR/evaluation.json)",
    )
    cmd.add_common()
    cmd.parser.set_defaults(func=_cmd_evaluate)
    _COMMANDS["evaluate"] = cmd

    # bench
    cmd = _Command(
        sub,
        "bench",
        "run the benchmark suites and print their tables",
        "Run the pytest-benchmark suites in benchmarks/ (from a source checkout), which "
        "write benchmarks/results/*.json and the tables of benchmarks/README.md, then "
        "print those tables.",
    )
    cmd.parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help="suites to run, e.g. feature_distance experts (default: all)",
    )
    cmd.section("benchmarks")
    cmd.opt("--list", action="store_true", help="list the suites and exit")
    cmd.opt(
        "--device",
        default=None,
        show_default=False,
        help="auto (CPU, plus CUDA when visible), cpu, cuda, or a comma list",
    )
    cmd.opt(
        "--threads",
        type=_POS,
        default=None,
        show_default=False,
        help="torch threads during the run (results go to a -<N>t file)",
    )
    cmd.opt(
        "--pytest-args",
        nargs=argparse.REMAINDER,
        default=None,
        show_default=False,
        help="everything after this flag goes to pytest, e.g. --pytest-args -k cpu",
    )
    cmd.add_common(device=False, seed=False)
    cmd.parser.set_defaults(func=_cmd_bench)
    _COMMANDS["bench"] = cmd

    # info
    info = sub.add_parser(
        "info",
        help="version, and which kernel backends are built (and why not)",
        description="Print the version, torch build and kernel backends.",
    )
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hpd-fast``; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    cmd = _COMMANDS.get(ns.command)
    try:
        args = _resolve(cmd, ns) if cmd is not None else ns
    except CLIError as exc:
        cmd.parser.error(str(exc))  # usage + message, exit 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if ns.traceback:
            raise
        kind = (
            ""
            if isinstance(exc, (CLIError, ValueError, FileNotFoundError, NotADirectoryError))
            else f"{type(exc).__name__}: "
        )
        print(f"{PROG} {ns.command}: error: {kind}{exc}", file=sys.stderr)
        if kind:
            print(
                f"(run `{PROG} --traceback {ns.command} ...` for the full traceback)",
                file=sys.stderr,
            )
        return 2 if isinstance(exc, CLIError) else 1


if __name__ == "__main__":
    sys.exit(main())
