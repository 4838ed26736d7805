"""Command-line flags generated from configuration dataclasses (``core.config.option`` fields).

Each field becomes ``--field-name`` (or its ``metadata["flag"]``) with the field's help text, its
default, its type read from the annotation (``bool`` fields take ``--x / --no-x``; a field that may be
None also takes the value ``none``) and its ``metadata["choices"]``. ``dest`` is ``prefix + name`` so
two configs may share a parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["add_config_flags", "config_values"]

_TYPES = {"int": int, "float": float, "str": str}
#: what the flag of a numeric field that may be None holds after ``--flag none`` (None means "not given")
_NONE = object()


def _kind(annotation: Any) -> Any:
    parts = [part.strip() for part in str(annotation).split("|")]
    kind = _TYPES.get(parts[0], str)
    if kind is str or "None" not in parts[1:]:
        return kind

    def parse(text: str) -> Any:
        return _NONE if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__          # argparse names the type in its error
    return parse


def add_config_flags(parser: argparse.ArgumentParser | Any, cls: type, names: Iterable[str] | None = None, *,
                     prefix: str = "", shown_defaults: Mapping[str, Any] | None = None, unset: bool = False) -> None:
    """Add a flag per field of ``cls`` (those in ``names``, in field order).

    ``shown_defaults`` replaces the defaults named in the help; ``unset=True`` leaves every flag's
    value None unless given (for settings that apply only with some other flag, e.g. sparsellm's).
    """
    wanted = None if names is None else set(names)
    for item in dataclasses.fields(cls):
        if wanted is not None and item.name not in wanted:
            continue
        flag = item.metadata.get("flag", "--" + item.name.replace("_", "-"))
        default = (shown_defaults or {}).get(item.name, item.default)
        shown = ",".join(default) if isinstance(default, tuple) else default
        text = f"{item.metadata['help']} (default {shown})".replace("%", "%%")
        value = None if unset else item.default
        if str(item.type).split("|")[0].strip() == "bool":
            parser.add_argument(flag, dest=prefix + item.name, action=argparse.BooleanOptionalAction, default=value,
                                help=text)
        else:
            parser.add_argument(flag, dest=prefix + item.name, type=_kind(item.type), default=value, help=text,
                                choices=item.metadata.get("choices"),
                                metavar=None if item.metadata.get("choices") else flag.lstrip("-").replace("-", "_").upper())


def config_values(args: argparse.Namespace, cls: type, names: Iterable[str] | None = None, *,
                  prefix: str = "") -> dict[str, Any]:
    """The values of ``cls``'s flags in ``args`` that are set (not None), by field name."""
    wanted = None if names is None else set(names)
    values = {}
    for item in dataclasses.fields(cls):
        value = getattr(args, prefix + item.name, None)
        if (wanted is None or item.name in wanted) and value is not None:
            values[item.name] = None if value is _NONE else value
    return values
