"""Command-line options generated from the configuration dataclasses, and config files.

Every option of ``experts``, ``distill`` and ``evaluate`` is a field of
:class:`hpd_fast.config.RunConfig` (or of :class:`Runtime`): its flag, type, default and help
come from the field. Precedence: the preset (``--preset``, default chosen by dataset) < the
config file (``--config``) < the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import textwrap
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hpd_fast.config import (
    PRESETS,
    ConfigError,
    RunConfig,
    apply_overrides,
    check_value,
    leaves,
    preset,
    read_file,
    saved_config,
    setting,
)

__all__ = ["CLIError", "Command", "PROG", "Runtime"]

PROG = "hpd-fast"
COMMAND_NAMES = ("experts", "distill", "evaluate", "bench", "info", "generator")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


@dataclass
class Runtime:
    """How a command runs (not part of the run's settings)."""

    quiet: bool = setting(False, "no progress bars or progress messages", short="-q")
    device: str | None = setting(
        None,
        "torch device to run on, e.g. cpu, cuda, cuda:1",
        shown="cuda when available, else cpu",
    )
    threads: int | None = setting(
        None,
        "CPU threads for torch (torch.set_num_threads). auto: 1 when the CPU is oversubscribed "
        "(1-minute load average >= number of cores: extra threads then mostly wait for each "
        "other, measured 3-6x slower on 2 busy cores), else torch's default",
        minimum=1,
        none="auto",
        shown="auto",
        metavar="N|auto",
    )


def _show(value: Any, meta: Mapping[str, Any]) -> str:
    if value is None:
        return str(meta.get("shown", meta.get("none", "none")))
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    return str(value)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


@functools.lru_cache(maxsize=1)
def _preset_configs() -> dict[str, RunConfig]:
    """Every preset, built once (read only: help texts are made from them)."""
    return {name: make() for name, make in PRESETS.items()}


def _default_text(path: str, meta: Mapping[str, Any]) -> str:
    """Every default as a value: the presets' values, grouped when they agree."""
    configs = _preset_configs()
    if meta.get("per_algorithm"):
        key = path.rsplit(".", 1)[-1]
        groups: dict[str, list[str]] = {}
        for name, cfg in configs.items():
            table = cfg.hpd.per_algorithm
            text = ", ".join(f"{a} {table[a][key]:g}" for a in table)
            groups.setdefault(text, []).append(name)
        if len(groups) == 1:
            return f"per algorithm: {next(iter(groups))}"
        return "per algorithm: " + "; ".join(f"{t} ({', '.join(n)})" for t, n in groups.items())
    if path == "preset":
        return "auto"
    if not path or path.split(".")[0] not in {f.name for f in dataclasses.fields(RunConfig)}:
        return ""
    groups = {}
    for name, cfg in configs.items():
        groups.setdefault(_show(_get(cfg, path), meta), []).append(name)
    main = _show(_get(configs["digits"], path), meta)
    if len(groups) == 1:
        return main
    rest = "; ".join(f"{t} with {', '.join(n)}" for t, n in groups.items() if t != main)
    return f"{main} (digits preset); {rest}"


def _parser_for(flag: str, f: dataclasses.Field, tp: Any) -> Callable[[str], Any]:
    """An argparse type: the text, converted and checked like a config value."""
    meta = f.metadata
    inner = tp
    origin = typing.get_origin(tp)
    if origin is not None and type(None) in typing.get_args(tp):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
    base = typing.get_origin(inner) or inner

    def parse(text: str) -> Any:
        none = meta.get("none")
        if none is not None and str(text).strip().lower() == none:
            return None
        try:
            if base is int:
                value: Any = int(str(text), 10)
            elif base is float:
                value = float(text)
            elif base is dict:
                value = json.loads(text)
                if not isinstance(value, dict):
                    raise ValueError
            else:
                value = text
        except (ValueError, json.JSONDecodeError):
            kind = {int: "an integer", float: "a number", dict: "a JSON object"}.get(base, "text")
            hint = " like '{\"width\": 64}'" if base is dict else ""
            msg = f"must be {kind}{hint}, got {text!r}"
            if none is not None:
                msg = f"must be '{none}' or {kind}, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        try:
            return check_value(f, tp, value, flag)
        except ConfigError as exc:
            msg = str(exc).split(": ", 1)[-1]
            if none is not None:
                msg = f"must be '{none}' or {msg.removeprefix('must be ')}"
                msg = msg.replace(f"got {value}", f"got {text!r}")
            raise argparse.ArgumentTypeError(msg) from None

    parse.__name__ = flag
    return parse


@dataclass
class Option:
    dest: str  # dotted path in RunConfig, or "runtime.<name>"
    flag: str
    field: dataclasses.Field
    type: Any


class Command:
    """A subcommand whose options are generated from dataclass fields."""

    def __init__(
        self,
        sub: Any,
        name: str,
        help: str,
        description: str,
        *,
        sections: Sequence[tuple[str, str]],
        exclude: Sequence[str] = (),
        epilog: str | None = None,
    ) -> None:
        self.name = name
        self.parser = sub.add_parser(
            name,
            help=help,
            description=textwrap.fill(description, 90),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.options: dict[str, Option] = {}
        self.flags: dict[str, Option] = {}
        fields = {path: (f, tp) for path, f, tp in leaves(RunConfig)}
        for title, prefix in sections:
            group = self.parser.add_argument_group(title)
            for path, (f, tp) in fields.items():
                if f.metadata.get("cli", True) is False or path in exclude:
                    continue
                head = path.rsplit(".", 1)[0] if "." in path else ""
                if head != prefix:
                    continue
                self._add(group, path, f, tp)
        group = self.parser.add_argument_group("general")
        group.add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help="JSON or TOML file of settings: nested tables as in hpd_fast.config.RunConfig "
            "([hpd], [hpd.mtt], [eval], ...), or flat option names ('-' or '_'), optionally in "
            "a table named after the command; a run's metrics.json or summary.json repeats "
            "that run. Options on the command line win",
        )
        for rf in dataclasses.fields(Runtime):
            self._add(group, f"runtime.{rf.name}", rf, typing.get_type_hints(Runtime)[rf.name])

    def _add(self, group: Any, path: str, f: dataclasses.Field, tp: Any) -> None:
        meta = f.metadata
        flag = meta.get("flags", {}).get(self.name) or meta.get("flag")
        flag = flag or "--" + path.rsplit(".", 1)[-1].replace("_", "-")
        if flag in self.flags:
            raise RuntimeError(f"{self.name}: option {flag} defined twice")  # a bug, not input
        default = _default_text(path, meta) if not path.startswith("runtime.") else None
        if default is None:
            default = _show(f.default if f.default is not dataclasses.MISSING else None, meta)
        help_text = f"{meta['help']} (default: {default})" if default != "" else meta["help"]
        flags = [flag] + ([meta["short"]] if "short" in meta else [])
        kw: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS, "help": help_text}
        base = tp
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _parser_for(flag, f, tp)
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
                kw["metavar"] = "{" + ",".join(meta["choices"]) + "}"
            elif "metavar" in meta:
                kw["metavar"] = meta["metavar"]
            else:
                inner = typing.get_args(tp)[0] if typing.get_args(tp) else tp
                kw["metavar"] = {int: "N", float: "X"}.get(
                    inner, "JSON" if typing.get_origin(tp) is dict or tp is dict else "VALUE"
                )
        group.add_argument(*flags, **kw)
        opt = Option(path, flag, f, tp)
        self.options[path] = opt
        self.flags[flag] = opt

    # ---------------------------------------------------------------------- resolution
    def file_settings(self, path: str, others: Mapping[str, Command]) -> dict[str, Any]:
        """A config file as nested settings for this command (unknown keys refused)."""
        where = f"config file {path!r}"
        data = dict(saved_config(read_file(path)))
        nested: dict[str, Any] = {}
        flat: dict[str, Any] = {}
        sections = {f.name for f in dataclasses.fields(RunConfig)}
        for key, value in data.items():
            if key in COMMAND_NAMES and isinstance(value, Mapping):
                if key == self.name:
                    flat.update(value)
                continue
            if key in sections and (
                isinstance(value, Mapping) or key in ("preset", "seed", "out", "overwrite")
            ):
                if isinstance(value, Mapping):
                    nested.setdefault(key, {}).update(value)
                else:
                    flat[key] = value
                continue
            flat[key] = value
        by_name = {o.flag[2:].replace("-", "_"): o for o in self.options.values()}
        elsewhere = {
            n for c in others.values() if c is not self for n in
            (o.flag[2:].replace("-", "_") for o in c.options.values())
        }  # fmt: skip
        for key, value in flat.items():
            norm = str(key).replace("-", "_")
            negate = False
            opt = by_name.get(norm)
            if opt is None and norm.startswith("no_") and norm[3:] in by_name:
                opt, negate = by_name[norm[3:]], True
                if opt.type is not bool:
                    opt = None
            if opt is None:
                if norm in elsewhere or norm in ("config",):
                    continue  # another command's option: one file may serve the pipeline
                valid = ", ".join(sorted(by_name))
                raise CLIError(
                    f"{where}: unknown key {key!r} for `{PROG} {self.name}` (valid keys: {valid})"
                )
            try:
                v = check_value(opt.field, opt.type, value, f"{where}, key {key!r}")
            except ConfigError as exc:
                raise CLIError(str(exc)) from None
            if negate:
                v = not v
            cur = nested
            *parents, leaf = opt.dest.split(".")
            for p in parents:
                cur = cur.setdefault(p, {})
            cur[leaf] = v
        return nested

    def resolve(
        self, ns: argparse.Namespace, others: Mapping[str, Command]
    ) -> tuple[RunConfig, Runtime, set[str]]:
        """``(settings, runtime, names set explicitly)``: preset < file < command line."""
        explicit = {p: getattr(ns, p) for p in self.options if hasattr(ns, p)}
        file_map: dict[str, Any] = {}
        path = getattr(ns, "config", None)
        if path:
            try:
                file_map = self.file_settings(path, others)
            except ConfigError as exc:
                raise CLIError(str(exc)) from None
        name = explicit.get("preset", file_map.get("preset", "auto"))
        dataset = explicit.get("data.dataset", (file_map.get("data") or {}).get("dataset"))
        try:
            cfg = preset(name, dataset)
            runtime_map = file_map.pop("runtime", {})
            apply_overrides(cfg, file_map, f"config file {path!r}")
        except ConfigError as exc:
            raise CLIError(str(exc)) from None
        runtime = Runtime()
        given = set(_paths(file_map))
        for key, value in runtime_map.items():
            setattr(runtime, key, value)
            given.add(f"runtime.{key}")
        for p, value in explicit.items():
            if p.startswith("runtime."):
                setattr(runtime, p.split(".", 1)[1], value)
            else:
                _set(cfg, p, value)
            given.add(p)
        return cfg, runtime, given


def _paths(nested: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in nested.items():
        if isinstance(v, Mapping) and k not in (
            "kwargs",
            "model_kwargs",
            "per_algorithm",
            "pixel_per_algorithm",
        ):
            out += _paths(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out
