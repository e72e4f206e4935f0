"""Whole runs as library calls: what ``hpd-fast distill`` and ``hpd-fast evaluate`` do.

:func:`distill_run` takes a :class:`~hpd_fast.config.RunConfig` and does the whole job — the
dataset, the generator, the expert trajectories (trained into the cache when missing), H-PD,
the output folder (tensors, summary, figures) and the evaluation against random real images
(``metrics.json``) — so a Python user gets the folder a command-line user gets::

    from hpd_fast.config import preset
    from hpd_fast.run import distill_run

    out = distill_run(preset("digits"))  # the main job, as `hpd-fast distill`
    print(out.metrics["accuracy"]["ConvNet"])

:func:`evaluate_run` evaluates a saved folder (``evaluation.json``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpd_fast.config import (
    DataConfig,
    EvalConfig,
    GeneratorConfig,
    GeneratorTrainConfig,
    RunConfig,
    config_to_dict,
    preset,
)
from hpd_fast.data.dataset import DistillData

__all__ = [
    "RunOutput",
    "distill_run",
    "evaluate_run",
    "load_dataset",
    "load_generator",
    "peak_memory_mib",
    "versions",
]

_LOG = logging.getLogger("hpd_fast")
METRICS_FORMAT = "hpd_fast.metrics"


@dataclass
class RunOutput:
    """What :func:`distill_run` made: the folder, the chosen set and the metrics."""

    out: Path
    result: Any  # hpd_fast.distill.DistillResult
    metrics: dict[str, Any]
    experts: Any = None


def versions() -> dict[str, Any]:
    """Versions of this library, torch and Python, and the platform (for the record)."""
    import hpd_fast

    return {
        "hpd_fast": hpd_fast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def peak_memory_mib() -> tuple[float, str]:
    """Peak resident memory of this process in MiB and where it was read."""
    from hpd_fast._common import peak_memory_mib as peak

    return peak()


def load_dataset(config: DataConfig) -> DistillData:
    """The dataset a :class:`~hpd_fast.config.DataConfig` names (local files only)."""
    from hpd_fast.data import load

    _LOG.info("loading dataset %r%s", config.dataset, f" from {config.root}" if config.root else "")
    return load(
        config.dataset,
        config.root,
        resolution=config.resolution,
        max_per_class=config.max_per_class,
        zca=config.zca,
        zca_regularization=config.zca_regularization,
    )


def load_generator(
    config: GeneratorConfig,
    data: DistillData,
    device: torch.device | str,
    *,
    train: GeneratorTrainConfig | None = None,
    data_config: DataConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    group: Any = None,
):
    """The staged generator a :class:`~hpd_fast.config.GeneratorConfig` names, on ``device``.

    ``source="auto"``: the generator shipped for the dataset when there is one for its image
    size, else a ConvGenerator trained with ``train`` (default
    :class:`~hpd_fast.config.GeneratorTrainConfig`) and cached
    (:func:`hpd_fast.generators.cached_generator`; ``data_config`` and ``cache_dir`` as for
    the expert cache; ``progress`` and ``group`` as for :func:`distill_run`).

    Raises:
        ValueError / FileNotFoundError: naming the file or the option (``--generator``,
            ``--allow-pickle``, ``--resolution``) when it cannot be loaded or trained; settings
            a generator cannot be trained with are refused before training starts.
    """
    from hpd_fast import generators as G

    spec = config.source
    if spec == "pixels":  # the images themselves (the dataset's space: whitened with --zca)
        return G.pixels(data, init=config.pixel_init).to(device).eval()
    if spec == "auto":
        gen = None
        try:
            shipped = G.pretrained(data.name)
        except (ValueError, FileNotFoundError):
            shipped = None
        if shipped is not None and tuple(shipped.image_shape) == (data.channels, *data.im_size):
            _LOG.info("generator: the one shipped for %s", data.name)
            gen = shipped
        else:
            gen = G.cached_generator(
                data,
                train,
                data_config,
                cache_dir=cache_dir,
                device=device,
                progress=progress,
                group=group,
            )
    elif spec == "pretrained":
        try:
            gen = G.pretrained(data.name)
        except ValueError:
            raise ValueError(
                f"no pretrained generator ships for dataset {data.name!r} (only digits): pass "
                "--generator auto (trains one for the dataset once and caches it; or train it "
                "first with `hpd-fast generator train`), or --generator PATH (a ConvGenerator "
                "saved with hpd_fast.generators.save_generator, or a StyleGAN network pickle "
                "with --allow-pickle)"
            ) from None
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"the shipped generator weights are missing: {exc}") from None
    elif spec.endswith(".pkl"):
        net = G.load_stylegan_pickle(spec, allow_pickle=config.allow_pickle)
        gen = G.from_stylegan(
            net, num_classes=data.num_classes, mean=data.mean, std=data.std, **config.kwargs
        )
    else:
        gen = G.load_generator(spec)
    return gen.to(device).eval()


# The files a run writes into its folder (--overwrite removes them, and only them).
RUN_FILES = ("metrics.json", "evaluation.json")
CHECKPOINT_DIR = "checkpoint"


def _run_files(out: Path) -> list[Path]:
    """Every file and folder of a previous run in ``out`` (results, metrics, evaluation,
    checkpoint, and their temporary names); nothing else of the folder."""
    from hpd_fast.distill.result import _is_result_file

    found = []
    for p in out.iterdir():
        base = p.name[: -len(".tmp")] if p.name.endswith(".tmp") else p.name
        if p.name == CHECKPOINT_DIR or base in RUN_FILES or _is_result_file(p.name):
            found.append(p)
    return found


def _check_up_front(cfg: RunConfig) -> None:
    """What can be refused before any long work starts."""
    from hpd_fast.models import MODEL_NAMES

    out = cfg.out_dir()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a folder")
    for parent in out.parents:  # the first existing ancestor must be a writable folder
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"out: {str(out)!r} cannot be created: {str(parent)!r} is a file")
            break
    unknown = [n for n in (cfg.eval.models if cfg.eval.enabled else []) if n not in MODEL_NAMES]
    if unknown:
        raise ValueError(
            f"eval.models: unknown model(s) {unknown}; valid: {', '.join(MODEL_NAMES)}"
        )
    for where, name in (
        ("experts.model", cfg.experts.model),
        ("hpd.match.model", cfg.hpd.match.model),
        ("hpd.select.crfd_model", cfg.hpd.select.crfd_model),
    ):
        if name not in MODEL_NAMES:
            raise ValueError(f"{where}: unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")


def _check_networks(cfg: RunConfig, data: DistillData) -> None:
    """Build every network of the run once, with its keyword arguments, for this data: a bad
    ``model_kwargs`` is refused before the experts are trained, naming the option."""
    from hpd_fast.models import get_model

    nets = []
    if cfg.hpd.algorithm == "mtt" and not cfg.experts.path:
        nets.append(
            ("experts.model / experts.model_kwargs", cfg.experts.model, cfg.experts.model_kwargs)
        )
    if cfg.hpd.algorithm in ("dm", "dc"):
        m = cfg.hpd.match
        nets.append(("hpd.match.model / hpd.match.model_kwargs", m.model, m.model_kwargs))
    if cfg.hpd.select.method == "crfd":
        s = cfg.hpd.select
        nets.append(
            ("hpd.select.crfd_model / crfd_model_kwargs", s.crfd_model, s.crfd_model_kwargs)
        )
    if cfg.eval.enabled:
        nets += [("eval.models", name, {}) for name in cfg.eval.models]
    for where, name, kwargs in nets:
        try:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
                get_model(name, data.channels, data.num_classes, data.im_size, **dict(kwargs or {}))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"{where}: {name} with {dict(kwargs or {})} cannot be built for images "
                f"{[data.channels, *data.im_size]} and {data.num_classes} classes: {exc}"
            ) from None


def _check_generator(generator: Any, data: DistillData) -> None:
    """The generator must render the dataset's images (before any expert is trained)."""
    want = (data.channels, *data.im_size)
    have = tuple(getattr(generator, "image_shape", want))
    if have != want:
        raise ValueError(
            f"generator: it renders images of shape {list(have)}, but dataset {data.name!r} has "
            f"{list(want)} (--resolution {want[-1]} does not match the generator: pass "
            f"--resolution {have[-1]} or a generator for this resolution)"
        )
    if getattr(generator, "num_classes", data.num_classes) != data.num_classes:
        raise ValueError(
            f"generator: it has {generator.num_classes} classes, but dataset {data.name!r} has "
            f"{data.num_classes}"
        )


def _prepare_out(cfg: RunConfig, group: Any) -> Any:
    """Lock the output folder (the first rank), apply ``overwrite``, refuse a finished run.

    Returns the held :class:`~hpd_fast._files.FolderLock` (None on the other ranks).
    """
    from hpd_fast._distributed import rank_and_size
    from hpd_fast._files import FolderLock, FolderLockedError, describe_os_error

    out = cfg.out_dir()
    rank, _ = rank_and_size(group)
    lock = None
    error: str | None = None
    if rank == 0:
        try:
            lock = FolderLock(out, f"hpd-fast distill ({cfg.hpd.algorithm}, IPC {cfg.hpd.ipc})")
            lock.acquire()
            ckpt = out / CHECKPOINT_DIR / "checkpoint.safetensors"
            previous = _run_files(out)
            if cfg.overwrite:
                for p in previous:
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink(missing_ok=True)
            elif not ckpt.is_file() and any(
                (out / n).exists() for n in ("summary.json", "tensors.safetensors", "metrics.json")
            ):
                raise FileExistsError(
                    f"out: {str(out)!r} holds a finished run without a checkpoint to resume "
                    "from; pass --overwrite (overwrite=True) to replace it, or choose another "
                    "--out"
                )
        except FolderLockedError as exc:
            error = f"out: {exc}"
        except (FileExistsError, ValueError) as exc:
            error = str(exc)
        except OSError as exc:
            error = describe_os_error(exc, exc.filename or out, "out: cannot write the folder")
        if error is not None and lock is not None:
            lock.release()
            lock = None
    if group is not None:  # every rank learns whether the first one may write
        box = [error]
        torch.distributed.broadcast_object_list(
            box, src=torch.distributed.get_global_rank(group, 0), group=group
        )
        error = box[0]
    if error is not None:
        raise OutputFolderError(error)
    return lock


class OutputFolderError(ValueError):
    """The output folder cannot be used: another process writes it, it holds a finished run
    (without ``overwrite``), or it cannot be written (the message says which)."""


def _experts_info(experts: Any, seconds: float) -> dict[str, Any]:
    accs = [a for a in experts.test_accuracy if a is not None]
    return {
        "path": str(experts.path),
        "num_experts": len(experts),
        "epochs": experts.epochs,
        "model": experts.model_config,
        "mean_test_accuracy": sum(accs) / len(accs) if accs else None,
        "seconds": seconds,
    }


def _accuracy_summary(ev: dict[str, Any]) -> tuple[dict, dict, dict]:
    models = ev["config"]["models"]
    syn = {m: {k: ev[m][k] for k in ("mean", "std", "accs")} for m in models}
    real = {}
    gain = {}
    if "random_real" in ev:
        real = {m: {k: ev["random_real"][m][k] for k in ("mean", "std", "accs")} for m in models}
        gain = {m: syn[m]["mean"] - real[m]["mean"] for m in models}
    return syn, real, gain


def eval_kwargs(config: EvalConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`hpd_fast.evaluate` for an evaluation config."""
    return {
        "models": list(config.models),
        "num_eval": config.num_eval,
        "epochs": config.epochs,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "augment": config.augment,
        "baseline": None if config.baseline == "none" else config.baseline,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary name (fsync), then rename it into place."""
    from hpd_fast._files import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _drop_stale_evaluation(out: Path, run_id: str | None) -> None:
    """An ``evaluation.json`` of another result than the one now in ``out`` is removed."""
    path = out / "evaluation.json"
    try:
        old = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        old = None
    if path.exists() and old != run_id:
        path.unlink(missing_ok=True)


def _check_json_target(target: Path) -> None:
    """``evaluate --out``: a file that can be written (checked before any training)."""
    if target.is_dir() or str(target).endswith(os.sep):
        raise IsADirectoryError(f"out: {str(target)!r} is a folder; name a JSON file")
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            f"out: the folder {str(parent)!r} of {str(target)!r} does not exist"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"out: the folder {str(parent)!r} is not writable")


def distill_run(
    config: RunConfig | None = None,
    *,
    device: torch.device | str | None = None,
    group: Any = None,
    progress: bool | None = None,
) -> RunOutput:
    """The whole distillation job of ``config`` (default: the digits preset, the main job).

    Writes ``config.out_dir()``: ``tensors.safetensors``, ``summary.json``, the image grids,
    ``overview.png``, ``stages.png``, ``metrics.json`` (accuracy against random real images,
    CRFD per stage, timings, peak memory, the resolved configuration, versions) and
    ``checkpoint/`` (a rerun with the same settings resumes or reuses it).

    Args:
        config: the run (:class:`~hpd_fast.config.RunConfig`); None: ``preset("digits")``.
        device: where to compute (default: CUDA when available, else the CPU).
        group: a ``torch.distributed`` process group: experts and evaluation runs are shared
            out, H-PD runs over the group; only the first rank writes.
        progress: None: bars on a terminal, log lines (logger ``hpd_fast``) otherwise; True:
            bars; False: quiet.

    Raises:
        ValueError: bad settings (naming them) before any long work starts; a checkpoint of a
            different run in ``out/checkpoint`` (pass ``overwrite=True``).
    """

    cfg = copy.deepcopy(config) if config is not None else preset("digits")
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"config must be a hpd_fast.config.RunConfig, got {type(cfg).__name__}")
    cfg.hpd = cfg.hpd.resolved(cfg.generator.source)
    _check_up_front(cfg)
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    data = load_dataset(cfg.data)
    _check_networks(cfg, data)
    generator = load_generator(
        cfg.generator,
        data,
        dev,
        train=cfg.generator_train,
        data_config=cfg.data,
        cache_dir=cfg.experts.cache_dir,
        progress=progress,
        group=group,
    )
    _check_generator(generator, data)
    lock = _prepare_out(cfg, group)
    try:
        return _distill(cfg, data, generator, dev, group, progress, t_start, timings)
    finally:
        if lock is not None:
            lock.release()


def _distill(
    cfg: RunConfig,
    data: DistillData,
    generator: Any,
    dev: torch.device,
    group: Any,
    progress: bool | None,
    t_start: float,
    timings: dict[str, float],
) -> RunOutput:
    from hpd_fast import evaluate
    from hpd_fast._distributed import rank_and_size
    from hpd_fast.distill.hpd import HPD
    from hpd_fast.distill.state import CheckpointMismatchError
    from hpd_fast.experts.cache import cached_experts

    rank, world = rank_and_size(group)
    out = cfg.out_dir()
    timings["setup"] = time.perf_counter() - t_start

    experts = None
    experts_info = None
    if cfg.hpd.algorithm == "mtt":
        t0 = time.perf_counter()
        experts = cached_experts(
            data,
            cfg.experts,
            seed=cfg.seed,
            data_config=cfg.data,
            device=dev,
            group=group,
            progress=progress,
        )
        if experts.dataset_name != data.name:
            raise ValueError(
                f"experts: {str(cfg.experts.path)!r} were trained on {experts.dataset_name!r}, "
                f"but the dataset is {data.name!r}"
            )
        timings["experts"] = time.perf_counter() - t0
        experts_info = _experts_info(experts, timings["experts"])
        _LOG.info(
            "%d experts x %d epochs (%s, P=%d) in %s",
            len(experts),
            experts.epochs,
            experts.model_config["name"],
            experts.num_params,
            experts.path,
        )

    ckpt = out / CHECKPOINT_DIR
    hpd = HPD(
        generator,
        data.to(dev),
        cfg.hpd,
        experts=experts,
        seed=cfg.seed,
        checkpoint_dir=ckpt,
        group=group,
    )
    how = cfg.hpd.algorithm
    if how == "mtt":
        how += f" ({cfg.hpd.mtt.mode})"
    if group is not None:
        how += f" over {world} processes"
    _LOG.info(
        "H-PD %s, IPC %d, stages %d..%d, %d iterations each",
        how,
        cfg.hpd.ipc,
        hpd.first_stage,
        hpd.last_stage,
        hpd.iterations_per_stage,
    )
    t0 = time.perf_counter()
    try:
        result = hpd.fit(progress=progress)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(
            f"{exc}, or start afresh with --overwrite (overwrite=True)"
        ) from None
    timings["distill"] = time.perf_counter() - t0
    result.run_config = config_to_dict(cfg)

    t0 = time.perf_counter()
    if rank == 0:
        # metrics.json belongs to the result beside it: the previous one goes before the
        # result is replaced, and the new one carries the new result's run id.
        (out / "metrics.json").unlink(missing_ok=True)
        result.save(out)
        _drop_stale_evaluation(out, result.run_id)
    timings["outputs"] = time.perf_counter() - t0

    crfd = {str(k): v.get("score") for k, v in sorted(result.stage_best.items())}
    final_loss: dict[str, Any] = {}
    for k in sorted(result.stage_best):
        vals = [e["loss"] for e in result.losses if e["stage"] == k]
        final_loss[str(k)] = {"mean": sum(vals) / len(vals), "last": vals[-1]} if vals else None
    metrics: dict[str, Any] = {
        "format": METRICS_FORMAT,
        "run_id": result.run_id,
        "dataset": data.name,
        "ipc": cfg.hpd.ipc,
        "algorithm": cfg.hpd.algorithm,
        "mode": cfg.hpd.mtt.mode if cfg.hpd.algorithm == "mtt" else None,
        "generator": cfg.generator.source,
        "chosen_stage": result.stage,
        "chosen_iteration": result.iteration,
        "crfd_per_stage": crfd,
        "loss_per_stage": final_loss,
    }
    if cfg.eval.enabled:
        t0 = time.perf_counter()
        ev = evaluate(
            result.images,
            result.labels,
            data,
            **eval_kwargs(cfg.eval),
            seed=cfg.seed,
            progress=progress,
            device=dev,
            group=group,
        )
        timings["evaluate"] = time.perf_counter() - t0
        syn, real, gain = _accuracy_summary(ev)
        metrics.update(accuracy=syn, random_real=real, gain_over_random_real=gain)
        metrics["evaluation"] = {k: v for k, v in ev["config"].items() if k != "seconds"}
    timings["total"] = time.perf_counter() - t_start
    peak, source = peak_memory_mib()
    metrics.update(
        time_s=timings,
        peak_memory_mib=peak,
        peak_memory_source=source,
        experts=experts_info,
        hpd_config=result.config,
        hpd_timings=result.timings,
        device=str(dev),
        processes=world,
        threads=torch.get_num_threads(),
        loadavg_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        cpu_count=os.cpu_count(),
        versions=versions(),
        run_config=config_to_dict(cfg),
    )
    if rank == 0:
        write_json(out / "metrics.json", metrics)
    return RunOutput(out=out, result=result, metrics=metrics, experts=experts)


def evaluate_run(
    run_dir: str | os.PathLike[str],
    config: EvalConfig | None = None,
    *,
    data_config: DataConfig | None = None,
    stage: int | None = None,
    out: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    group: Any = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Evaluate the set saved in ``run_dir`` and write ``evaluation.json`` (or ``out``).

    Args:
        run_dir: a folder written by :func:`distill_run` / :meth:`DistillResult.save`.
        config: the protocol (:class:`~hpd_fast.config.EvalConfig`; default: its defaults).
        data_config: the dataset (default: the one the run was made from, at its resolution).
        stage: evaluate this stage's best images instead of the chosen set.
        out: the JSON file to write (default ``run_dir/evaluation.json``); not a folder.

    Returns:
        The :func:`hpd_fast.evaluate` results plus ``"run"``, ``"set"`` and ``"versions"``.
    """
    from hpd_fast import evaluate
    from hpd_fast._distributed import rank_and_size
    from hpd_fast.distill.result import DistillResult

    run = Path(run_dir)
    if not run.is_dir():
        raise NotADirectoryError(
            f"{str(run)!r} is not a folder (expected the output folder of `hpd-fast distill`)"
        )
    if out is not None and str(out).endswith(("/", os.sep)):
        raise IsADirectoryError(f"out: {str(out)!r} is a folder; name a JSON file")
    target = Path(out) if out is not None else run / "evaluation.json"
    _check_json_target(target)
    cfg = copy.deepcopy(config) if config is not None else EvalConfig()
    result = DistillResult.load(run)
    dcfg = copy.deepcopy(data_config) if data_config is not None else DataConfig(dataset="")
    if not dcfg.dataset:
        dcfg.dataset = result.config.get("dataset", {}).get("name", "")
        if not dcfg.dataset:
            raise ValueError(f"{str(run)!r} does not say which dataset it was made from: pass it")
    if dcfg.resolution is None and dcfg.dataset.lower() != "digits":
        if result.images.shape[-1] != result.images.shape[-2]:
            raise ValueError("non-square images: pass the resolution")
        dcfg.resolution = int(result.images.shape[-1])
    if data_config is None and result.zca is not None:  # the run's whitening, refitted
        dcfg.zca, dcfg.zca_regularization = True, result.zca.regularization
        rc_data = (result.run_config or {}).get("data", {})
        dcfg.root = dcfg.root or rc_data.get("root")
        dcfg.max_per_class = dcfg.max_per_class or rc_data.get("max_per_class")
    data = load_dataset(dcfg)
    made = result.zca.fingerprint if result.zca is not None else None
    have = data.zca.fingerprint if data.zca is not None else None
    if made != have:
        raise ValueError(
            f"zca: the set in {str(run)!r} holds "
            f"{'ZCA-whitened images (transform ' + made + ')' if made else 'un-whitened images'}"
            f", but the dataset was loaded "
            f"{'with ZCA transform ' + have if have else 'without ZCA whitening'}: evaluate it "
            "on the data it was distilled from (the same --zca, --root, --max-per-class)"
        )
    if stage is None:
        images, what = result.images, f"chosen set (stage {result.stage})"
    else:
        if stage not in result.stage_images:
            raise ValueError(f"stage {stage}: the run has stages {sorted(result.stage_images)}")
        images, what = result.stage_images[stage], f"stage {stage}"
    _LOG.info("evaluating the %s of %s: %d images", what, run, images.shape[0])
    labels = result.labels if stage is None else result.stage_labels.get(stage, result.labels)
    ev = evaluate(
        images,
        labels,
        data,
        **eval_kwargs(cfg),
        seed=seed,
        progress=progress,
        device=device,
        group=group,
    )
    payload = {
        "run": str(run),
        "run_id": result.run_id,
        "set": what,
        **ev,
        "versions": versions(),
    }
    if rank_and_size(group)[0] == 0:
        write_json(target, payload)
        _LOG.info("wrote %s", target)
    return payload
