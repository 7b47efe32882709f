"""A command line generated from a config dataclass: one flag per field, defaults in one place."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any


def dataclass_parser(config_cls: type, description: str) -> argparse.ArgumentParser:
    """argparse parser with one flag per field of ``config_cls``; unset flags are absent from the result.

    bool fields get --flag/--no-flag, tuple fields take several values, the rest their annotated type.
    """
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = f"default: {field.default!r}"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, type=typing.get_args(kind)[0], nargs="+", help=help_text)
        else:
            parser.add_argument(flag, type=kind, help=help_text)
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
    (``--stop-at``) resumes to its end unless told otherwise."""
    base = None
    if given.get("resume"):
        given = {"stop_at": 0, **given} if "stop_at" in {f.name for f in dataclasses.fields(config_cls)} \
            else given
        base = config_from_args(config_cls, load_config(given["resume"]))
    return config_from_args(config_cls, given, base)
