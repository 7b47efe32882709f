"""A command line generated from a config dataclass: one flag per field, defaults in one place.

Each field is declared with ``option(default, help, ...)``, which keeps its help text, the values it
accepts (``choices``) and its bounds (``ge``/``gt``/``le``/``lt``; a bound may name another field, as in
``le="steps"``) beside the default. The same declaration drives ``--help``, the parser's checks (a bad value
ends in a usage error naming the flag, exit code 2, no traceback) and ``check_fields`` for configs built in
code (a ``ConfigError``, which is a ``ValueError``).
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
import sys
import typing
from collections.abc import Callable, Iterable
from typing import Any

_BOUNDS = {"ge": (operator.ge, "≥"), "gt": (operator.gt, ">"), "le": (operator.le, "≤"),
           "lt": (operator.lt, "<")}


def option(default: Any, help: str, *, choices: Iterable | None = None, section: str | None = None,
           ge: Any = None, gt: Any = None, le: Any = None, lt: Any = None) -> Any:
    """A dataclass field with its CLI help and the values it accepts.

    choices: the allowed values (of each element, for a tuple field). ge/gt/le/lt: bounds, a number or the
    name of another field (checked on the whole config). section: starts a group of flags in ``--help``.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"help": help, "choices": None if choices is None else tuple(choices), "bounds": bounds,
                "section": section}
    return dataclasses.field(default=default, metadata=metadata)


class ConfigError(ValueError):
    """A config value outside what its field accepts; ``field`` names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def usage_message(self) -> str:
        return f"argument {flag_name(self.field)}: {self.message}"


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _problem(value: Any, meta: typing.Mapping, config: Any = None) -> str | None:
    """Why ``value`` is not accepted by a field with metadata ``meta`` (None if it is). Bounds that name
    another field are checked only when the whole ``config`` is given."""
    for v in value if isinstance(value, tuple) else (value,):
        choices = meta.get("choices")
        if choices is not None and v not in choices:
            return f"invalid choice: {v!r} (choose from {', '.join(map(str, choices))})"
        for name, bound in meta.get("bounds", {}).items():
            compare, symbol = _BOUNDS[name]
            label = f"{bound!r}"
            if isinstance(bound, str):
                if config is None:
                    continue
                label, bound = f"{flag_name(bound)} ({getattr(config, bound)!r})", getattr(config, bound)
            if not compare(v, bound):
                return f"must be {symbol} {label}; got {v!r}"
    return None


def check_fields(config: Any) -> None:
    """Raise ConfigError for the first field of the dataclass instance ``config`` outside its option()
    (each element of a tuple field is checked; whether a tuple may be empty is the config's business)."""
    for field in dataclasses.fields(config):
        problem = _problem(getattr(config, field.name), field.metadata, config)
        if problem:
            raise ConfigError(field.name, problem)


def checked(kind: type, **bounds: Any) -> Callable[[str], Any]:
    """argparse ``type=`` that converts to ``kind`` and enforces numeric ``bounds`` (ge/gt/le/lt)."""
    meta = {"bounds": {k: v for k, v in bounds.items() if not isinstance(v, str)}}

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        problem = _problem(value, meta)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert


def _shown(action: argparse.Action, value: Any) -> str | None:
    """How --help shows a default: as typed on the command line; None for an empty string."""
    if isinstance(value, bool):
        return action.option_strings[value is False]  # --flag / --no-flag
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return None if value == "" else str(value)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout; appends each flag's default (the dataclass's, or set_defaults')."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default if action.default is not argparse.SUPPRESS \
            else getattr(action, "config_default", argparse.SUPPRESS)
        shown = None if default is argparse.SUPPRESS or action.dest == "help" else _shown(action, default)
        return text if shown is None else f"{text} (default: {shown.replace('%', '%%')})"


class ConfigParser(argparse.ArgumentParser):
    """argparse parser of a config dataclass: after parsing, the flags given together with the defaults
    (the checkpoint's config when resuming is checked later, by ``config_with_resume``) must form a valid
    config, else a usage error naming the flag."""

    def __init__(self, config_cls: type, **kwargs: Any):
        super().__init__(**kwargs)
        self.config_cls = config_cls

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        given = vars(namespace)
        if not given.get("resume"):
            fields = {f.name for f in dataclasses.fields(self.config_cls)}
            try:
                check_fields(config_from_args(self.config_cls, {k: given[k] for k in given if k in fields}))
            except ConfigError as e:
                self.error(e.usage_message())
        return namespace, rest


def entry_point_prog() -> str | None:
    """``python -m reference_trainers.toy.toy2d`` when this process was started as that module (what
    Python 3.14's argparse shows by itself), else None: argparse's default, the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    return f"python -m {name}" if name.startswith("reference_trainers.") else None


def dataclass_parser(config_cls: type, description: str, prog: str | None = None,
                     skip: Iterable[str] = (), usage: str = "%(prog)s [options]") -> ConfigParser:
    """argparse parser with one flag per field of ``config_cls`` (but ``skip``); unset flags are absent
    from the result.

    bool fields get --flag/--no-flag, tuple fields take several values, the rest their annotated type;
    help, choices and bounds come from each field's ``option()`` metadata.
    """
    parser = ConfigParser(config_cls, prog=prog or entry_point_prog(), usage=usage, description=description,
                          argument_default=argparse.SUPPRESS, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(config_cls)
    group: Any = parser  # the parser, or the argument group of the latest section
    for field in dataclasses.fields(config_cls):
        meta = field.metadata
        if meta.get("section"):
            group = parser.add_argument_group(meta["section"])
        if field.name in skip:
            continue
        kind = hints[field.name]
        help_text = meta.get("help", "").replace("%", "%%")
        if kind is bool:
            action = group.add_argument(flag_name(field.name), action=argparse.BooleanOptionalAction,
                                        help=help_text)
        else:
            tuple_field = typing.get_origin(kind) is tuple
            element = typing.get_args(kind)[0] if tuple_field else kind
            action = group.add_argument(flag_name(field.name), nargs="+" if tuple_field else None,
                                        type=checked(element, **meta.get("bounds", {})),
                                        choices=meta.get("choices"),
                                        help=help_text)
        action.config_default = field.default
    return parser


def config_from_args(config_cls: type, given: dict, base: Any = None) -> Any:
    """``base`` (default ``config_cls()``) with the fields in ``given`` replaced; lists become tuples."""
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    return dataclasses.replace(base or config_cls(), **given)


def parse_config(config_cls: type, argv: list[str] | None, description: str = "") -> Any:
    """Defaults <- CLI flags (without --resume handling)."""
    return config_from_args(config_cls, vars(dataclass_parser(config_cls, description).parse_args(argv)))


def config_with_resume(config_cls: type, given: dict, load_config: Callable[[str], dict]) -> Any:
    """The run's config from parsed flags ``given``: when ``--resume PATH`` is among them, the checkpoint's
    config (``load_config(PATH)``) is the base and only the flags given now override it; an interrupted run
    (``--stop-at``) resumes to its end unless told otherwise. A resumed config made invalid by the flags
    given now is a usage error (exit code 2), as at parse time."""
    if not given.get("resume"):
        return config_from_args(config_cls, given)
    if "stop_at" in {f.name for f in dataclasses.fields(config_cls)}:
        given = {"stop_at": 0, **given}
    base = config_from_args(config_cls, load_config(given["resume"]))
    try:
        config = config_from_args(config_cls, given, base)
        check_fields(config)
        return config
    except ConfigError as e:
        argparse.ArgumentParser(prog=entry_point_prog()).error(e.usage_message())
