"""Command-line flags generated from the config dataclasses, and back.

A config field declared with `splitserve.config.option(...)` is a flag: its name
(--field-name unless the option names one), type (the default's, unless the option gives
a parser), default, choices and help all come from the dataclass, so a default lives in
exactly one place. Three uses:

    add_flags(group, TransferConfig)          # argparse flags for the option fields
    values(TransferConfig, args)              # {field: value} parsed from them
    argv(TransferConfig, config_or_values)    # flags that reproduce non-defaults (children)

A bool becomes --x / --no-x; a tuple of strings is written comma-separated.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, Iterator

from splitserve.config import defaults


def _options(cls, only: tuple[str, ...] | None = None) -> Iterator[tuple[Any, dict]]:
    for f in fields(cls):
        if "help" in f.metadata and (only is None or f.name in only):
            yield f, f.metadata


def flag_name(f, meta: dict) -> str:
    return meta["flag"] or "--" + f.name.replace("_", "-")


def _dest(f, meta: dict) -> str:
    return flag_name(f, meta)[2:].replace("-", "_")


def _comma_tuple(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_flags(group, cls, only: tuple[str, ...] | None = None) -> None:
    """Flags for the option fields of `cls` (those named in `only`, if given)."""
    d = defaults(cls)
    for f, meta in _options(cls, only):
        default = d[f.name]
        # None defaults are explained in the help text itself.
        suffix = "" if default in (None, ()) else " (default: %(default)s)"
        kw: dict[str, Any] = {"default": default, "help": meta["help"] + suffix,
                              "dest": _dest(f, meta)}
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif meta["type"] is not None:
            kw["type"] = meta["type"]
        elif isinstance(default, tuple):
            kw["type"] = _comma_tuple
        elif default is not None:
            kw["type"] = type(default)
        group.add_argument(flag_name(f, meta), **kw)


def values(cls, args: argparse.Namespace, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The option fields' values from parsed flags, keyed by field name."""
    return {f.name: getattr(args, _dest(f, meta)) for f, meta in _options(cls, only)}


def argv(cls, source: Any, only: tuple[str, ...] | None = None) -> list[str]:
    """Flags reproducing the non-default option values of `source` (a config instance or
    a {field: value} dict), for a child process. Options marked child=False are left out."""
    d = defaults(cls)
    out: list[str] = []
    for f, meta in _options(cls, only):
        if not meta["child"]:
            continue
        value = source[f.name] if isinstance(source, dict) else getattr(source, f.name)
        if value == d[f.name]:
            continue
        name = flag_name(f, meta)
        if isinstance(value, bool):
            out.append(name if value else "--no-" + name[2:])
        elif isinstance(value, tuple):
            out += [name, ",".join(value)]
        else:
            out += [name, str(value)]
    return out
