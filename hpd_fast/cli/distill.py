"""``hpd-fast distill``: the whole job (experts, H-PD, outputs, evaluation) of a RunConfig."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from hpd_fast.cli._options import PROG, Command
from hpd_fast.cli._runtime import in_process_group, progress_of
from hpd_fast.config import RunConfig, preset

SECTIONS = (
    ("run", ""),
    ("data", "data"),
    ("generator", "generator"),
    ("generator training (--generator auto)", "generator_train"),
    ("H-PD", "hpd"),
    ("trajectory matching (--algorithm mtt)", "hpd.mtt"),
    ("experts (--algorithm mtt)", "experts"),
    ("distribution / gradient matching (--algorithm dm|dc)", "hpd.match"),
    ("selection of the stage and iterate", "hpd.select"),
    ("evaluation", "eval"),
)


def _epilog() -> str:
    d = preset("digits")
    h = d.hpd.resolved()
    return f"""\
With no arguments this is the main job (the digits preset): the embedded digits, IPC 1, the
shipped pretrained generator, {d.experts.num_experts} experts x {d.experts.epochs} epochs (trained once and cached), H-PD
with trajectory matching (exact gradient; {h.iterations_per_stage} iterations per stage, {h.mtt.syn_steps} student steps),
evaluation of {d.eval.num_eval} ConvNets ({d.eval.epochs} epochs) against {d.eval.num_eval} trained on random real images, and the
folder runs/digits-ipc1-mtt/ with:

  tensors.safetensors   the chosen images, labels and latents, and every stage's best iterate
  summary.json          chosen stage/iterate, CRFD history, losses, timings, settings
  grid_chosen.png       the chosen set, one row per class
  grid_stage<k>.png     the best images of stage k
  overview.png          random real images, each stage's best, and the chosen set
  stages.png            loss per iteration and CRFD per stage
  metrics.json          accuracy (mean ± std) vs random real, CRFD per stage, chosen stage,
                        time, peak memory, the resolved configuration (--config metrics.json
                        repeats the run)
  checkpoint/           H-PD checkpoint (a rerun with the same settings resumes from it)

The same run from Python: hpd_fast.run.distill_run(hpd_fast.config.preset("digits")).

examples:
  {PROG} distill
  {PROG} distill --ipc 10 --algorithm dm --out runs/dm10
  {PROG} distill --dataset cifar10 --root ~/data --generator G.pkl --allow-pickle --ipc 1
  torchrun --standalone --nproc-per-node=4 -m hpd_fast distill --ipc 10 --device cuda
"""


def register(sub: Any) -> Command:
    cmd = Command(
        sub,
        "distill",
        "distill a dataset with H-PD, evaluate it, save everything",
        "H-PD (hierarchical parameterization distillation): optimise generator latents stage "
        "by stage, choose the stage by CRFD, evaluate against random real images.",
        sections=SECTIONS,
        epilog=_epilog(),
    )
    cmd.parser.set_defaults(func=run)
    return cmd


def _report(out: Any) -> None:
    result, metrics = out.result, out.metrics
    print(f"distilled set: {out.out}  (chosen stage {result.stage}, iterate {result.iteration})")
    first = min(result.stage_best)
    for k, v in metrics["crfd_per_stage"].items():
        mark = "  <- chosen" if int(k) == result.stage else ""
        if int(k) > first and result.stage_best[int(k)].get("iteration") == 0:
            # The stage starts from the previous stage's best images; none of its iterates
            # scored lower, so its best is that start (same images, same score).
            mark += "  (no iterate beat the stage's start)"
        print(f"  stage {k}: CRFD {v:.4g}{mark}" if v is not None else f"  stage {k}: not scored")
    for m, s in metrics.get("accuracy", {}).items():
        line = f"  {m}: {s['mean']:.1f} ± {s['std']:.1f} %"
        r = metrics.get("random_real", {}).get(m)
        if r is not None:
            gain = metrics["gain_over_random_real"][m]
            line += f"   random real {r['mean']:.1f} ± {r['std']:.1f} %   ({gain:+.1f} points)"
        print(line)
    t = metrics["time_s"]["total"]
    print(f"  time {t:.0f} s, peak memory {metrics['peak_memory_mib']:.0f} MiB")


def run(args: argparse.Namespace) -> int:
    cfg: RunConfig = args.settings
    from hpd_fast.run import distill_run

    def body(device: torch.device, group: Any, rank: int) -> int:
        out = distill_run(cfg, device=device, group=group, progress=progress_of(args.runtime))
        if rank == 0:
            _report(out)
        return 0

    return in_process_group(args.runtime, body)
