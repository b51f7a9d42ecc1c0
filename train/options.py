"""Command-line options derived from a config dataclass, so that each option is described once, on its field.

``python -m train`` builds its parser from ``train.config.TrainConfig`` and ``python -m precompute``
from ``precompute.config.PrecomputeConfig``. A field is an option when its metadata has ``help``;
the metadata also names its ``group`` (the title of its ``--help`` section) and may give:

    flag          the option's name when it is not ``--field-name`` (``--set`` for ``overrides``)
    default_text  what ``[...]`` after the help shows, when the default is computed or needs words
    required      False for a field without a default that the command line may leave out
    choices, metavar, action    passed to ``argparse.add_argument``

By type: an int, float or str takes one value (choices also from ``limits[name]["choices"]``); a
bool that defaults to True is turned off by ``--no-NAME``, one that defaults to False is turned on
by ``--NAME``; a tuple of floats takes any number of values; a dict collects repeated ``KEY=VALUE``
texts that the caller parses. Every option's ``dest`` is its field's name, so parsed options (and
``train.recipes.explicit_dests``) speak in config keys. Nothing here imports torch: ``--help``
stays fast.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


def option_groups(parser: argparse.ArgumentParser, titles: Iterable[str]) -> dict[str, Any]:
    """One argument group per title, in ``--help`` order."""
    return {title: parser.add_argument_group(title) for title in titles}


def option_fields(config_cls: type) -> list[dataclasses.Field]:
    """The fields of ``config_cls`` that are command-line options (their metadata has ``help``)."""
    return [f for f in dataclasses.fields(config_cls) if "help" in f.metadata]


def add_config_options(groups: Mapping[str, Any], config_cls: type,
                       limits: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Adds an option per field of ``config_cls`` that has ``help``, to the group its metadata names."""
    hints = typing.get_type_hints(config_cls)
    limits = limits or {}
    for f in option_fields(config_cls):
        meta = dict(f.metadata)
        group, help_text = groups[meta.pop("group")], meta.pop("help")
        default_text = meta.pop("default_text", None)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        kind = _kind(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = None if f.default is dataclasses.MISSING else f.default
        options: dict[str, Any] = {"dest": f.name, **meta}
        if kind is bool:
            if "action" not in options:
                options["action"] = "store_false" if default else "store_true"
                if default:
                    flag = "--no-" + f.name.replace("_", "-")
            options["default"] = default
        elif kind is dict:
            options.update(action="append", default=[])
            options.setdefault("metavar", "KEY=VALUE")
        else:
            options.update(type=float if kind is tuple else kind, default=default)
            if kind is tuple:
                options["nargs"] = "*"
            if "choices" in limits.get(f.name, {}):
                options.setdefault("choices", tuple(limits[f.name]["choices"]))
            options.setdefault("required", not has_default)
        shown = default_text if default_text is not None else _shown(default, options)
        group.add_argument(flag, help=help_text + (f" [{shown}]" if shown else ""), **options)


def config_values(args: argparse.Namespace, config_cls: type) -> dict[str, Any]:
    """The config keywords of the parsed options: a tuple option given no values is None (its
    computed default); a dict option is still the list of its ``KEY=VALUE`` texts."""
    hints = typing.get_type_hints(config_cls)
    values = {}
    for f in option_fields(config_cls):
        value = getattr(args, f.name)
        if _kind(hints[f.name]) is tuple and isinstance(value, list):
            value = tuple(value) if value else None
        values[f.name] = value
    return values


def split_assignments(items: list[str], flag: str) -> dict[str, str]:
    """``["a.b=0.2", "c=x"]`` -> ``{"a.b": "0.2", "c": "x"}`` (the text; parse it by the key's rule).
    Raises ValueError for an item without ``=`` or without a key."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = text
    return out


def parse_assignments(items: list[str], flag: str) -> dict:
    """``["norm=bn", "trainable_layers=5"]`` -> ``{"norm": "bn", "trainable_layers": 5}`` (Python
    literals; true/false/none too; other text as a string). For ``--student-config``, whose keys
    ``DetectorConfig`` checks; method and trainer settings are parsed by their fields' rules."""
    out = {}
    for key, text in split_assignments(items, flag).items():
        text = text.strip()
        lowered = {"true": "True", "false": "False", "none": "None", "null": "None"}.get(text.lower(), text)
        try:
            value = ast.literal_eval(lowered)
        except (ValueError, SyntaxError):
            value = text  # a plain string
        out[key] = value
    return out


def _kind(hint: Any) -> type:
    """The type of a field's value: ``float | None`` -> float, ``tuple[float, ...]`` -> tuple."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def _shown(default: Any, options: Mapping[str, Any]) -> str:
    """The default as ``[...]`` shows it: none for a flag that switches a bool, yes/no for a
    ``--x/--no-x`` pair, none for an unset or empty default."""
    if isinstance(default, bool):
        return ("yes" if default else "no") if options["action"] is argparse.BooleanOptionalAction else ""
    if default is None or default == "" or default == ():
        return ""
    return f"{default:g}" if isinstance(default, float) else str(default)
