"""Settings declared once, as dataclass fields whose defaults, help and bounds make the parser and the checks:

    steps: int = arg(200_000, "total optimizer steps", min=1, group="optimisation")

gives ``--steps`` and makes ``TrainConfig(steps=0)`` a ConfigError; a bool gives ``--name`` / ``--no-name``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import operator
import sys
import textwrap
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar


class ConfigError(ValueError):
    """Settings that cannot work: out of range, unknown choices, or flags that contradict each other."""


BOUNDS = {"min": (operator.ge, ">="), "max": (operator.le, "<="), "gt": (operator.gt, ">"), "lt": (operator.lt, "<")}


def arg(default: Any, help: str, *, choices: Collection[Any] | None = None, group: str | None = None, **kw: Any) -> Any:
    """A config field; ``choices`` may be a registry; ``group`` starts a --help section; the rest go to argparse."""
    bounds = {k: v for k in BOUNDS if (v := kw.pop(k, None)) is not None}
    metadata = dict(help=help, choices=choices, group=group, bounds=bounds, argparse=kw)
    return field(default=default, metadata=metadata)


@dataclass(kw_only=True)
class Config:
    """Base of every config: checks each field against its choices and bounds when the config is made."""

    # {field: (selector field, registry)}: the field holds the settings given of registry[selector's value] as a dict
    nested: ClassVar[dict[str, tuple[str, dict[str, type[Config]]]]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(value, list):  # argparse gives lists for several values
                value = tuple(value)
                setattr(self, f.name, value)
            if value is None or not f.metadata:
                continue
            if hints[f.name] in (int, int | None) and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{flag} must be an integer, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{flag} must be finite, got {value}")
            choices = f.metadata["choices"]
            if choices is not None and value not in choices:
                raise ConfigError(f"unknown {f.name} {value!r}; choose from {', '.join(map(str, choices))}")
            for key, bound in f.metadata["bounds"].items():
                compare, sign = BOUNDS[key]
                if not compare(value, bound):
                    raise ConfigError(f"{flag} must be {sign} {bound}, got {value!r}")
        for name, (key, registry) in self.nested.items():
            given = {k: tuple(v) if isinstance(v, list) else v for k, v in (getattr(self, name) or {}).items()}
            chosen = registry[getattr(self, key)]
            if unknown := sorted(set(given) - {f.name for f in fields(chosen)}):
                raise ConfigError(f"{key} {getattr(self, key)!r} has no setting {', '.join(unknown)}")
            chosen(**given)  # its own checks; the settings stay as given (train.py records them resolved)
            setattr(self, name, given)


def settings(cfg: Config) -> dict[str, Any]:
    """A config's fields as a dict (nested settings stay dicts)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


C = TypeVar("C", bound=Config)


def fill_unset(cfg: C, values: dict[str, Any]) -> C:
    """cfg with its unset settings (None fields, nested settings not given) filled from values (train.py's --recipe)."""
    top = {k: v for k, v in values.items() if k in {f.name for f in fields(cfg)} and getattr(cfg, k) is None}
    for name, (key, registry) in cfg.nested.items():
        given, own = getattr(cfg, name), {f.name for f in fields(registry[getattr(cfg, key)])}
        top[name] = {**{k: v for k, v in values.items() if k in own and given.get(k) is None}, **given}
    return dataclasses.replace(cfg, **top)


def build_parser(cls: type[Config], prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_fields(parser, cls)
    return parser


def add_fields(parser: argparse.ArgumentParser, cls: type[Config], title: str | None = None) -> None:
    """One flag per field of cls; with a title, all of them in one titled section of --help."""
    hints = typing.get_type_hints(cls)
    group: Any = parser.add_argument_group(title) if title else parser
    for f in fields(cls):
        if not (meta := f.metadata):
            continue
        if meta["group"] and not title:
            group = parser.add_argument_group(meta["group"])
        kind = hints[f.name]
        kwargs: dict[str, Any] = dict(help=meta["help"], choices=meta["choices"], default=f.default, **meta["argparse"])
        if f.default is not None and kind is not bool:  # every field has a default: arg() gives one
            kwargs["help"] += " (default %(default)s)"
        if kind in (bool, bool | None):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            item, *rest = typing.get_args(kind)
            kwargs.setdefault("nargs", "+" if rest == [Ellipsis] else len(rest) + 1)
            kwargs["type"] = item
        else:
            kwargs["type"] = next(t for t in (int, float, str) if kind in (t, t | None))
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def parse(
    cls: type[C],
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    presets: dict[str, dict[str, Any]] | None = None,
) -> C:
    """Flags -> cls, in two passes: a nested class's selector and ``--preset`` (which flags override) first."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset")
    defaults = (presets or {}).get(first.parse_known_args(argv)[0].preset, {})
    picked = {}
    for name, (key, registry) in cls.nested.items():
        default = defaults.get(key, next(f.default for f in fields(cls) if f.name == key))
        first.add_argument("--" + key.replace("_", "-"), dest=key, default=default)
        value = getattr(first.parse_known_args(argv)[0], key)
        if value in registry:  # an unknown value is left to the full parser's error
            picked[name] = registry[value], f"--{key.replace('_', '-')} {value} (each has its own flags)"
    parser = build_parser(cls, prog, description)
    for chosen, title in picked.values():
        add_fields(parser, chosen, title)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="named settings; explicit flags override them")
        parser.set_defaults(**defaults)
    args = vars(parser.parse_args(argv))
    args.pop("preset", None)
    for name, (chosen, _) in picked.items():  # the values that differ from the class's defaults
        values = {f.name: args.pop(f.name) for f in fields(chosen) if f.name in args}
        args[name] = {k: v for f in fields(chosen) if (k := f.name) in values and (v := values[k]) != f.default}
    return cls(**args)


def flag_values(cfg: Config) -> list[str]:
    """The command line that ``parse`` turns back into cfg (the fields that differ from their defaults)."""
    values = [(f, getattr(cfg, f.name)) for f in fields(cfg) if f.metadata]
    for name, (key, registry) in cfg.nested.items():
        given = getattr(cfg, name)
        values += [(f, given[f.name]) for f in fields(registry[getattr(cfg, key)]) if f.metadata and f.name in given]
    out = []
    for f, value in values:
        if value == f.default or value is None:
            continue
        name = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(name if value else "--no-" + name[2:])
        elif isinstance(value, tuple | list):
            out += [name, *map(str, value)]
        else:
            out += [name, str(value)]
    return out


def short_reason(e: Exception, width: int = 300) -> str:
    """An exception as a short reason in a one-line error: its type and first line, cut at a word."""
    return textwrap.shorten(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}", width)


def script_exit(prog: str, error: Exception) -> SystemExit:
    """Print a known error as one line; the SystemExit to raise: 2 for bad input (ValueError), 1 for an OSError."""
    line = "error: " + " ".join(str(error).split())
    print(f"{prog}: {line}", file=sys.stderr)
    done = SystemExit(2 if isinstance(error, ValueError) else 1)
    done.args = (line,)
    return done
