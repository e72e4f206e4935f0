"""The ``hpd-fast`` command line: help, the distill pipeline end to end, config files, errors."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hpd_fast
from hpd_fast.cli import build_parser, main

SUBCOMMANDS = ("experts", "distill", "evaluate", "bench", "info", "generator")

# A tiny setting: 10 training images per class, width-4 experts, 2 generator stages, one
# iteration per stage, one short evaluation run.
TINY = [
    "--max-per-class", "10",
    "--num-experts", "2",
    "--expert-train-epochs", "3",
    "--model-kwargs", '{"width": 4}',
    "--last-stage", "2",
    "--syn-steps", "2",
    "--expert-epochs", "1",
    "--max-start-epoch", "2",
    "--crfd-models", "1",
    "--threads", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _keep_threads():
    """In-process commands may call torch.set_num_threads (--threads); undo it after each test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    """An untrained, very small ConvGenerator for 8x8 digits, saved like a real one."""
    from hpd_fast.generators import ConvGenerator, save_generator

    d = hpd_fast.data.load("digits")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        g = ConvGenerator(10, (1, 8, 8), latent_dim=4, width=4, mean=d.mean, std=d.std)
    path = tmp_path_factory.mktemp("gen") / "tiny"
    save_generator(g, path)
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("HPD_FAST_CACHE", None)
    return env


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpd_fast", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=timeout,
    )


# --------------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: hpd-fast {command}")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        for flag in action.option_strings:
            assert flag in text


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out


def test_distill_help_describes_the_main_job(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    for name in ("metrics.json", "stages.png", "grid_chosen.png", "tensors.safetensors"):
        assert name in out


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------


def test_distill_end_to_end(tmp_path, tiny_generator, capsys):
    """distill (experts trained into the cache, H-PD, evaluation) in a subprocess; then
    evaluate and experts in-process against what it wrote."""
    config = tmp_path / "run.toml"
    # Config keys in both spellings, a subcommand table, and a value the command line overrides.
    config.write_text(
        "iterations_per_stage = 1\nnum-eval = 1\n\n[distill]\neval_epochs = 2\nseed = 5\n"
        "[evaluate]\nepochs = 1\n"
    )
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    args = ["distill", "--generator", str(tiny_generator), "--out", str(out)]
    args += ["--cache-dir", str(cache), "--config", str(config), "--seed", "3", *TINY]
    proc = _run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr

    for name in (
        "tensors.safetensors",
        "summary.json",
        "grid_chosen.png",
        "grid_stage1.png",
        "grid_stage2.png",
        "overview.png",
        "stages.png",
        "metrics.json",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "random_real"):
        entry = m[key]["ConvNet"]
        assert 0.0 <= entry["mean"] <= 100.0 and entry["std"] >= 0.0 and len(entry["accs"]) == 1
    assert math.isclose(
        m["gain_over_random_real"]["ConvNet"],
        m["accuracy"]["ConvNet"]["mean"] - m["random_real"]["ConvNet"]["mean"],
    )
    assert set(m["crfd_per_stage"]) == {"1", "2"}
    assert all(math.isfinite(v) for v in m["crfd_per_stage"].values())
    assert str(m["chosen_stage"]) in m["crfd_per_stage"]
    assert m["crfd_per_stage"][str(m["chosen_stage"])] == min(m["crfd_per_stage"].values())
    assert m["time_s"]["total"] > 0 and m["peak_memory_mib"] > 0
    assert m["experts"]["num_experts"] == 2 and m["experts"]["epochs"] == 3
    # config file, then command line: seed 3 (flag) beats 5 (config); config values applied
    run_config = m["run_config"]
    assert run_config["seed"] == 3 and run_config["preset"] == "digits"
    assert run_config["hpd"]["iterations_per_stage"] == 1 and run_config["eval"]["epochs"] == 2
    assert run_config["hpd"]["mtt"]["syn_steps"] == 2 and run_config["experts"]["num_experts"] == 2
    assert m["hpd_config"]["iterations_per_stage"] == 1 and m["hpd_config"]["seed"] == 3
    assert m["evaluation"]["epochs"] == 2 and m["evaluation"]["num_eval"] == 1

    experts_dir = Path(m["experts"]["path"])
    assert experts_dir.parent == cache / "experts"
    # the experts, and the cache entry's lock file (held only while a process writes)
    assert sorted(p.name for p in experts_dir.iterdir() if p.name != ".lock") == [
        "expert_00000.safetensors",
        "expert_00001.safetensors",
    ]

    # a rerun with other settings refuses the finished checkpoint and says how to proceed
    rerun = [a for a in args if a != "--config" and a != str(config)]
    rc = main([*rerun, "--iterations-per-stage", "2", "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "checkpoint of a different run" in err and "--overwrite" in err

    # evaluate the saved set (in-process; the dataset name comes from the run)
    rc = main(["evaluate", str(out), "--config", str(config), "-q", "--threads", "1"])
    assert rc == 0
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["config"]["epochs"] == 1 and ev["config"]["num_eval"] == 1
    assert 0.0 <= ev["ConvNet"]["mean"] <= 100.0 and "random_real" in ev

    # `experts` with the distill settings finds the same cache folder: nothing retrained
    rc = main(
        ["experts", "--cache-dir", str(cache), "--epochs", "3", "--num-experts", "2",
         "--max-per-class", "10", "--model-kwargs", '{"width": 4}', "--seed", "3", "-q"]
    )  # fmt: skip
    assert rc == 0
    assert len([p for p in experts_dir.iterdir() if p.name != ".lock"]) == 2


# --------------------------------------------------------------------------------------------
# errors: a clear message, non-zero exit, no traceback
# --------------------------------------------------------------------------------------------


def test_unknown_dataset(tmp_path, capsys):
    rc = main(["distill", "--dataset", "nope", "--out", str(tmp_path / "o"), "-q"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "unknown dataset name 'nope'" in err and "digits" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["distill", "--ipc", "0"], "argument --ipc: must be an integer >= 1, got 0"),
        (
            ["distill", "--max-snapshots", "0"],
            "argument --max-snapshots: must be 'all' or an integer >= 1, got '0'",
        ),
        (["distill", "--ipc", "two"], "argument --ipc: must be an integer, got 'two'"),
        (["distill", "--algorithm", "xyz"], "argument --algorithm: invalid choice"),
        (["experts", "--num-experts", "0"], "argument --num-experts: must be an integer >= 1"),
        (["experts", "--epochs", "0"], "argument --epochs: must be an integer >= 1"),
        (["distill", "--model-kwargs", "[1]"], "must be a JSON object"),
        (["distill", "--config", "/nonexistent/cfg.toml"], "config file '/nonexistent/cfg.toml' not found"),
    ],
)  # fmt: skip
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.json", '{"ipc": 1,', "is not valid JSON"),
        ("bad.toml", "ipc = = 1", "is not valid TOML"),
        ("list.json", "[1, 2]", "must hold a JSON object"),
        ("unknown.json", '{"ipcs": 1}', "unknown key 'ipcs' for `hpd-fast distill`"),
        ("value.json", '{"ipc": 0}', "key 'ipc': must be an integer >= 1, got 0"),
        ("type.toml", "no_eval = 1", "key 'no_eval': must be true or false"),
        ("choice.toml", 'algorithm = "gan"', "key 'algorithm': invalid choice 'gan'"),
    ],
)
def test_bad_config_file(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--config", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_experts_file(tmp_path, tiny_generator, capsys):
    rc = main(
        ["distill", "--generator", str(tiny_generator), "--experts", str(tmp_path / "none"),
         "--out", str(tmp_path / "o"), "-q"]
    )  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert "no expert trajectories at" in err and str(tmp_path / "none") in err
    assert "Traceback" not in err


def test_missing_generator_and_run_dir(tmp_path, capsys):
    rc = main(["distill", "--generator", str(tmp_path / "g"), "--out", str(tmp_path / "o"), "-q"])
    assert rc == 1
    assert "generator file" in capsys.readouterr().err
    rc = main(["evaluate", str(tmp_path / "missing"), "-q"])
    assert rc == 2
    assert "is not a folder" in capsys.readouterr().err


def test_bench_lists_suites(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "experts" in out and "feature_distance" in out
    rc = main(["bench", "no_such_suite"])
    assert rc == 2
    assert "unknown benchmark suite" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "value"), [("all", None), ("ALL", None), ("8", 8)])
def test_max_snapshots_reaches_hpd(text, value):
    """``--max-snapshots all`` means every snapshot (None), a number that budget; without the
    option the configuration's default (32) reaches HPD."""
    from hpd_fast import cli
    from hpd_fast.distill import HPD

    def settings(argv):
        ns = build_parser().parse_args(argv)
        return cli._COMMANDS["distill"].resolve(ns, cli._COMMANDS)[0]

    cfg = settings(["distill", "--algorithm", "dm", "--max-snapshots", text])
    assert cfg.hpd.mtt.max_snapshots == value
    data = hpd_fast.data.load("digits", max_per_class=3)
    from hpd_fast.generators import pretrained

    hpd = HPD(pretrained("digits"), data, cfg.hpd)
    assert hpd.max_snapshots == value
    assert settings(["distill"]).hpd.mtt.max_snapshots == 32


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "hpd_fast", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=300)


def test_distill_under_torchrun(tmp_path, tiny_generator):
    """Two CPU processes (gloo): each trains one of the two experts and half of the evaluation
    networks, both run H-PD with every student batch split between them, the first writes the
    run once. `evaluate` shares its runs the same way; dm splits its classes."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["distill", "--generator", str(tiny_generator), "--out", str(out), "--cache-dir"]
    args += [str(cache), "--iterations-per-stage", "1", "--num-eval", "2", "--eval-epochs", "2"]
    args += TINY
    proc = _torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("distilled set:") == 1  # the first rank reports, the other not
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2 and m["experts"]["num_experts"] == 2
    assert len(m["accuracy"]["ConvNet"]["accs"]) == 2
    assert len(m["random_real"]["ConvNet"]["accs"]) == 2
    assert "over 2 processes" in proc.stderr
    assert (out / "tensors.safetensors").is_file() and (out / "checkpoint").is_dir()

    ev = ["evaluate", str(out), "--num-eval", "2", "--epochs", "2", "--out", str(tmp_path / "e")]
    proc = _torchrun([*ev, "--threads", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ConvNet:") == 1
    assert len(json.loads((tmp_path / "e").read_text())["ConvNet"]["accs"]) == 2

    dm = ["distill", "--generator", str(tiny_generator), "--out", str(tmp_path / "dm")]
    dm += ["--cache-dir", str(cache), "--algorithm", "dm", "--iterations-per-stage", "1"]
    proc = _torchrun([*dm, "--no-eval", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "H-PD dm over 2 processes" in proc.stderr
    assert json.loads((tmp_path / "dm" / "metrics.json").read_text())["processes"] == 2


def test_python_and_cli_write_the_same_folder(tmp_path, tiny_generator):
    """distill_run(config) from Python and `hpd-fast distill` with the same settings write the
    same files with the same numbers (the CLI only parses, calls and prints)."""
    from safetensors.torch import load_file

    from hpd_fast.config import preset
    from hpd_fast.run import distill_run

    cache = tmp_path / "cache"
    cfg = preset("digits")
    cfg.out = str(tmp_path / "api")
    cfg.generator.source = str(tiny_generator)
    cfg.data.max_per_class = 10
    cfg.experts.num_experts, cfg.experts.epochs = 2, 3
    cfg.experts.model_kwargs = {"width": 4}
    cfg.experts.cache_dir = str(cache)
    cfg.hpd.iterations_per_stage, cfg.hpd.last_stage = 1, 2
    cfg.hpd.mtt.syn_steps, cfg.hpd.mtt.expert_epochs, cfg.hpd.mtt.max_start_epoch = 2, 1, 2
    cfg.hpd.select.crfd_models = 1
    cfg.eval.num_eval, cfg.eval.epochs = 1, 2
    torch.set_num_threads(1)
    api = distill_run(cfg, device="cpu", progress=False)

    cli_out = tmp_path / "cli"
    args = ["distill", "--generator", str(tiny_generator), "--out", str(cli_out)]
    args += ["--cache-dir", str(cache), "--iterations-per-stage", "1", "--num-eval", "1"]
    args += ["--eval-epochs", "2", "--device", "cpu", "-q", *TINY]
    assert main(args) == 0

    def files(d: Path) -> set[str]:
        return {p.name for p in d.iterdir() if p.name != "checkpoint"}

    assert files(api.out) == files(cli_out)
    assert {"overview.png", "stages.png", "grid_chosen.png", "metrics.json"} <= files(cli_out)
    a, b = (
        load_file(str(api.out / "tensors.safetensors")),
        load_file(str(cli_out / "tensors.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((api.out / "metrics.json").read_text())
    mb = json.loads((cli_out / "metrics.json").read_text())
    assert ma["accuracy"] == mb["accuracy"] and ma["crfd_per_stage"] == mb["crfd_per_stage"]
    ra, rb = ma["run_config"], mb["run_config"]
    ra.pop("out"), rb.pop("out")
    assert ra == rb
