"""hpd_fast.config: one source of every setting; presets; config files; the CLI generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from hpd_fast import config as C
from hpd_fast.cli import build_parser
from hpd_fast.cli._options import CLIError


def _distill_command():
    from hpd_fast import cli

    build_parser()
    return cli._COMMANDS


def test_every_setting_has_help_and_a_flag_per_command():
    cmds = _distill_command()
    distill = cmds["distill"]
    for path, f, _ in C.leaves(C.RunConfig):
        assert f.metadata.get("help"), path
        if f.metadata.get("cli", True):
            assert path in distill.options, f"{path} has no distill option"
    # flags are unique within a command (a duplicate would raise at build time) and every
    # option of experts/evaluate is a setting of RunConfig or of the runtime
    for cmd in cmds.values():
        for path in cmd.options:
            assert path.startswith("runtime.") or path in {p for p, _, _ in C.leaves(C.RunConfig)}


def test_help_shows_every_default_as_a_value(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("experts", "distill", "evaluate", "generator"):
        for action in sub.choices[name]._actions:
            if action.option_strings and action.dest not in ("help", "config"):
                assert "(default: " in action.help, (name, action.option_strings)
                assert "H-PD's" not in action.help
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "--help"])
    text = capsys.readouterr().out
    # the main job's numbers appear as numbers, with the other presets' values next to them
    flat = " ".join(text.split())
    assert "--num-experts N number of expert networks (default: 5 (digits preset)" in flat
    assert "mtt 20, dm 30, dc 30 (digits)" in flat


def test_presets_are_named_configs_and_fresh_copies():
    d = C.preset("digits")
    assert (d.experts.num_experts, d.experts.epochs, d.hpd.mtt.syn_steps) == (5, 8, 10)
    assert d.hpd.resolved().iterations_per_stage == 20
    d.experts.num_experts = 99
    assert C.preset("digits").experts.num_experts == 5
    assert C.preset("auto", "cifar10").preset == "hpd-cifar"
    assert C.preset("auto", "imagenette").preset == "hpd-imagenet"
    assert C.preset("auto", "imagefolder").preset == "default"
    pub = C.preset("hpd-cifar").hpd.resolved()
    assert (pub.iterations_per_stage, pub.lr_w, pub.lr_f) == (100, 10.0, 10000.0)
    assert (pub.mtt.syn_steps, pub.mtt.expert_epochs, pub.mtt.max_start_epoch) == (20, 3, 5)
    with pytest.raises(C.ConfigError, match="preset must be auto or one of"):
        C.preset("nope")


def test_resolved_fills_only_what_is_unset():
    h = C.HPDConfig(algorithm="dm", lr_w=0.5)
    r = h.resolved()
    assert r.lr_w == 0.5 and r.lr_f == C.DIGITS_PER_ALGORITHM["dm"]["lr_f"]
    assert h.lr_f is None  # a copy


def test_nested_mapping_and_unknown_keys():
    cfg = C.config_from_dict(
        C.RunConfig,
        {"data": {"dataset": "digits"}, "hpd": {"ipc": 3, "mtt": {"max_snapshots": "all"}}},
    )
    assert cfg.preset == "digits" and cfg.hpd.ipc == 3 and cfg.hpd.mtt.max_snapshots is None
    assert cfg.experts.num_experts == 5  # the digits preset under the file
    with pytest.raises(C.ConfigError, match=r"unknown key 'hpd\.ipcs'"):
        C.config_from_dict(C.RunConfig, {"hpd": {"ipcs": 3}})
    with pytest.raises(C.ConfigError, match=r"key 'hpd\.ipc': must be an integer >= 1, got 0"):
        C.config_from_dict(C.RunConfig, {"hpd": {"ipc": 0}})
    with pytest.raises(C.ConfigError, match=r"'hpd\.mtt' must be a table"):
        C.config_from_dict(C.RunConfig, {"hpd": {"mtt": 3}})
    with pytest.raises(C.ConfigError, match="invalid choice 'gan'"):
        C.config_from_dict(C.RunConfig, {"hpd": {"algorithm": "gan"}})


def test_with_overrides_names_bad_settings():
    base = C.HPDConfig()
    got = C.with_overrides(base, {"syn_steps": 4, "select": "last", "mtt_mode": "first_order"})
    assert (got.mtt.syn_steps, got.select.method, got.mtt.mode) == (4, "last", "first_order")
    assert base.mtt.syn_steps == 20  # unchanged
    with pytest.raises(C.ConfigError, match="unknown setting 'syn_step'"):
        C.with_overrides(base, {"syn_step": 4})
    with pytest.raises(C.ConfigError, match="lr_f: must be a finite number >= 0"):
        C.with_overrides(base, {"lr_f": -1.0})
    with pytest.raises(C.ConfigError, match="augment must be"):
        C.with_overrides(base, {"augment": 3})


def test_saved_configuration_repeats_the_run(tmp_path):
    cfg = C.preset("digits")
    cfg.hpd.ipc = 2
    cfg.hpd.mtt.max_snapshots = None
    cfg.eval.models = ["ConvNet", "AlexNet"]
    metrics = {"format": "hpd_fast.metrics", "run_config": C.config_to_dict(cfg), "other": 1}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    back = C.load_config(path)
    assert back == cfg


def test_toml_file_into_the_dataclasses(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'preset = "digits"\nseed = 4\n[hpd]\nalgorithm = "dm"\n[hpd.match]\nbatch_real = 7\n'
        '[hpd.per_algorithm.dm]\nlr_w = 0.5\n[eval]\nmodels = ["ConvNet", "VGG11"]\n'
    )
    cfg = C.load_config(path)
    assert cfg.seed == 4 and cfg.hpd.algorithm == "dm" and cfg.hpd.match.batch_real == 7
    assert cfg.hpd.resolved().lr_w == 0.5 and cfg.eval.models == ["ConvNet", "VGG11"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[hpd.per_algorithm.kip]\nlr_w = 1\n")
    with pytest.raises(C.ConfigError, match="'kip' must be one of"):
        C.load_config(bad)


def _resolve(argv):
    from hpd_fast import cli

    parser = build_parser()
    ns = parser.parse_args(argv)
    return cli._COMMANDS[ns.command].resolve(ns, cli._COMMANDS)


def test_cli_precedence_preset_file_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "iterations_per_stage = 3\nnum-eval = 2\n[hpd.mtt]\nsyn_steps = 7\n[distill]\nseed = 5\n"
    )
    cfg, runtime, given = _resolve(["distill", "--config", str(path), "--seed", "1", "-q"])
    assert cfg.preset == "digits" and cfg.experts.num_experts == 5  # preset
    assert cfg.hpd.iterations_per_stage == 3 and cfg.eval.num_eval == 2  # flat file keys
    assert cfg.hpd.mtt.syn_steps == 7  # nested file keys
    assert cfg.seed == 1  # the command line wins
    assert runtime.quiet is True
    assert {"seed", "hpd.mtt.syn_steps", "eval.num_eval"} <= given
    # the preset follows the dataset unless one is named
    cfg, _, _ = _resolve(["distill", "--dataset", "cifar10"])
    assert cfg.preset == "hpd-cifar" and cfg.experts.num_experts == 100
    cfg, _, _ = _resolve(["distill", "--dataset", "cifar10", "--preset", "digits"])
    assert cfg.experts.num_experts == 5 and cfg.data.dataset == "cifar10"


def test_cli_file_errors_name_the_key(tmp_path):
    cases = [
        ('{"ipcs": 1}', "unknown key 'ipcs' for `hpd-fast distill`"),
        ('{"ipc": 0}', "key 'ipc': must be an integer >= 1, got 0"),
        ('{"no_eval": 1}', "key 'no_eval': must be true or false"),
        ('{"algorithm": "gan"}', "key 'algorithm': invalid choice 'gan'"),
        ('{"hpd": {"ipc": "x"}}', "key 'hpd.ipc': must be an integer"),
    ]
    from hpd_fast import cli

    for text, message in cases:
        path = tmp_path / "c.json"
        path.write_text(text)
        parser = build_parser()
        ns = parser.parse_args(["distill", "--config", str(path)])
        with pytest.raises((CLIError, C.ConfigError), match=message.replace("(", r"\(")):
            cli._COMMANDS["distill"].resolve(ns, cli._COMMANDS)


def test_no_eval_in_a_file_and_on_the_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"no_eval": true}')
    cfg, _, _ = _resolve(["distill", "--config", str(path)])
    assert cfg.eval.enabled is False
    cfg, _, _ = _resolve(["distill", "--config", str(path), "--eval"])
    assert cfg.eval.enabled is True
    cfg, _, _ = _resolve(["distill", "--no-eval"])
    assert cfg.eval.enabled is False


def test_defaults_are_the_dataclass_defaults():
    """The API's defaults are the config's: train_experts, evaluate and HPD read them there."""
    import inspect

    import hpd_fast

    ex = C.ExpertConfig()
    sig = inspect.signature(hpd_fast.train_experts)
    for name in ("num_experts", "epochs", "lr", "batch_size", "momentum", "weight_decay"):
        assert sig.parameters[name].default == getattr(ex, name), name
    ev = C.EvalConfig()
    sig = inspect.signature(hpd_fast.evaluate)
    for name in ("num_eval", "epochs", "lr", "batch_size", "momentum", "weight_decay"):
        assert sig.parameters[name].default == getattr(ev, name), name
    assert dataclasses.is_dataclass(C.HPDConfig)
