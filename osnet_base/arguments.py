"""Command-line flags generated from a settings dataclass, so a tool's flags, defaults and types are the
dataclass's own and a new field cannot be forgotten by the CLI (train.py's and osnet-loadtest's)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _flag_type(hint: object) -> tuple[type, bool]:
    """(the value's type, whether None is allowed) of a field's resolved annotation."""
    arguments = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in arguments:
        (inner,) = [argument for argument in arguments if argument is not type(None)]
        return inner, True
    return hint, False


def add_dataclass_arguments(
    group: argparse._ActionsContainer, settings: type, *, exclude: typing.Collection[str] = (),
    help: typing.Mapping[str, str] | None = None, prefix: str = "",
) -> None:
    """One `--<prefix>field-name` per field of `settings` not in `exclude`, typed and defaulted as the
    field is (a prefix keeps them apart from the flags of a tool they are passed beside)."""
    hints = typing.get_type_hints(settings)
    for field in dataclasses.fields(settings):
        if field.name in exclude:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            raise TypeError(f"{settings.__name__}.{field.name} has no default: exclude it and add its flag by hand")
        kind, _ = _flag_type(hints[field.name])
        flag = f"--{prefix}{field.name.replace('_', '-')}"
        text = f"{(help or {}).get(field.name, '')} (default: {default})".strip()
        if kind is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            group.add_argument(flag, dest=field.name, type=kind, default=default, help=text)


def dataclass_from_arguments(settings: type, args: argparse.Namespace, **values: object):
    """`settings` built from the parsed flags `add_dataclass_arguments` added, and `values` for the rest."""
    names = {field.name for field in dataclasses.fields(settings)} - set(values)
    return settings(**{name: getattr(args, name) for name in names if hasattr(args, name)}, **values)
