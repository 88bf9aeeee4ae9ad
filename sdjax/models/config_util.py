"""Turning a diffusers/transformers ``config.json`` dict into one of our frozen configs."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict[str, Any], *, rename: dict[str, str] | None = None,
                     tuples: tuple[str, ...] = ()) -> T:
    """Pick the fields of dataclass ``cls`` out of ``d``; keys we do not model are ignored
    (configs carry bookkeeping like ``_class_name``), missing keys take the field default.
    ``rename`` maps config keys to field names; ``tuples`` lists list-valued fields."""
    rename = rename or {}
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        name = rename.get(key, key)
        if name in names and value is not None:
            kwargs[name] = tuple(value) if name in tuples and isinstance(value, list) else value
    return cls(**kwargs)
