"""The shape every fedmodal settings dataclass shares: built from a dict, refusing unknown keys.

Each method keeps its defaults once, in dataclasses that derive from `Settings`; job configs,
the recipes in `fedmodal.jobs`, the command line and the benchmarks build them with
`from_dict`, so a typo in a job config is an error that names the key instead of a silently
ignored value, and a default changed in the dataclass changes everywhere.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

S = TypeVar("S", bound="Settings")


class Settings:
    """Mixin for `@dataclass` settings: `from_dict`, `to_dict`, `with_values`, `field_names`."""

    settings_name = ""  # how errors name these settings (default: the class name)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls: type[S], values: Mapping[str, Any] | None = None, where: str = "") -> S:
        """Build from a dict (lists become tuples where a field is a tuple), refusing unknown keys.

        Args:
            values: field values; missing fields take their defaults.
            where: where the values come from, for the error (e.g. "the modalitybank controller").
        """
        values = dict(values or {})
        known = cls.field_names()
        unknown = sorted(set(values) - set(known))
        if unknown:
            place = f" in {where}" if where else ""
            raise ValueError(
                f"unknown {cls.settings_name or cls.__name__} settings {unknown}{place}; known: {sorted(known)}"
            )
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            if isinstance(value, list) and "tuple" in str(hints.get(name, "")):
                values[name] = tuple(value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: every field, tuples as lists."""
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}

    def with_values(self: S, **values: Any) -> S:
        """A copy with some fields changed (checked like `from_dict`)."""
        return type(self).from_dict({**self.to_dict(), **values})


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def parse_value(text: str) -> Any:
    """A command-line value: JSON where it parses (numbers, true/false, lists), else the string."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
