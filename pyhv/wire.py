"""A component's saved state on the wire (live migration's STATE frame): the frozen dataclass
that holds the state declares its wire form once, and msgspec writes and reads it. Reading
refuses a field that is missing, unknown or of the wrong type (a bool is not a number; a page
range is [start, count]) with a message naming it; the component's restore() then checks the
values against the machine it restores into.

msgspec is imported here only when a state crosses (it is not on `pyhv run`'s boot path, where
these dataclasses are defined). Bytes travel as base64."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

_T = TypeVar("_T")


def to_wire(state: object) -> dict[str, Any]:
    """JSON-ready, field by field (nested states, tuples and page ranges as arrays)."""
    import msgspec

    return msgspec.to_builtins(state)  # type: ignore[no-any-return]


def from_wire(cls: type[_T], raw: object, what: str) -> _T:
    """`raw` read back as `cls`; ValueError naming `what` and the field that is wrong."""
    import msgspec

    if isinstance(raw, dict) and dataclasses.is_dataclass(cls):
        unknown = sorted(set(map(str, raw)) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{what}: unknown fields {unknown}")
    try:
        # str_keys: JSON keys are text; a dict[int, ...] field reads "17" as 17.
        return msgspec.convert(raw, cls, strict=True, str_keys=True)
    except msgspec.ValidationError as e:
        raise ValueError(f"{what}: {e}") from None
