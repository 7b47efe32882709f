"""A command line generated from a config dataclass: one flag per field, defaults in one place."""

from __future__ import annotations

import argparse
import dataclasses
import typing


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
