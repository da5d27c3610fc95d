"""How core events and inputs become journal payloads, and back again.

A payload is canonical JSON (sorted keys, no spaces) because its exact text is
what the hash chain covers: the same record must always hash the same. JSON
has no infinity, and the core uses `math.inf` for "until revoked"/"open-ended",
so non-finite floats are stored as the strings "inf", "-inf" and "nan".
Decoding turns a record back into the dataclass it came from, so a run can be
replayed through the core from its journal (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from firmware_py.core import types as core
from firmware_py.core.types import is_finite_number
from firmware_py.journal.kinds import RecordKind

JOURNALED: tuple[type, ...] = (
    # what the core decided
    core.DispatchAnswer,
    core.Transition,
    core.FaultRaised,
    core.FaultCleared,
    core.DispatchEnded,
    core.EventEnergy,
    core.Resynced,
    core.ServingChanged,
    # what came in that shaped those decisions
    core.DispatchRequest,
    core.DispatchCancel,
    core.OwnerSettings,
    core.InstallerReset,
    core.Stall,
    core.SiteLimit,
    core.PriceInterval,
)
"""The dataclasses `Journal.append_event` accepts; kind = `RecordKind.of(event)`, the class name."""

BY_KIND: dict[RecordKind, type] = {RecordKind(cls.__name__): cls for cls in JOURNALED}

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


_PLAIN = frozenset({str, int, bool, type(None)})
"""Types written as they are. Exact types only: an IntEnum is an int, but is written as its value."""


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of `value`: enums as their values, sets as sorted lists, inf as "inf".

    Every journal record passes through here, in the writer thread that shares the interpreter
    with the control loop, so the common types are looked at first, by their exact type."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, float):
        if is_finite_number(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, str)):  # subclasses of int and str that are no enum
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: jsonable(getattr(value, name)) for name in _field_names(kind)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    raise TypeError(f"cannot journal a value of type {type(value).__name__}: {value!r}")


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


DAMAGED_VALUE = (TypeError, ValueError, AttributeError, OverflowError, KeyError, IndexError)
"""What reading a record whose values are not what its kind holds can raise (an edited or damaged journal):
readers that show records to people turn it into a problem of the journal, never a traceback."""


def unreadable(damage: Exception) -> str:
    """What a reader says of a record holding a value its kind cannot hold (one of `DAMAGED_VALUE`)."""
    return f"a record holds a value it cannot hold ({type(damage).__name__}: {damage})"


def number(value: Any) -> float | None:
    """A number read back from a payload ("inf" as written for math.inf); None when absent or unreadable,
    so a reader of old or damaged records gets a gap, not an exception."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def canonical(payload: Any) -> str:
    """The one text form of a payload: what is stored and what is hashed."""
    return text_of(jsonable(payload))


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)
"""Built once: `json.dumps` with options builds an encoder at every call, for every record."""


def text_of(plain: Any) -> str:
    """`canonical` for a value `jsonable` already made plain (not converted a second time)."""
    return _CANONICAL.encode(plain)


def event_time(event: Any) -> float:
    """Events carry `at`; inputs carry `received_at`: both are the core clock."""
    at = getattr(event, "at", None)
    return float(event.received_at if at is None else at)


def decode_event(kind: RecordKind | str, payload: dict[str, Any]) -> Any:
    """Rebuild the dataclass a record was made from (for replay); ValueError if it cannot be."""
    cls = BY_KIND.get(RecordKind.read(kind))
    if cls is None:
        raise ValueError(f"record kind {str(kind)!r} is not a core event or input")
    hints = typing.get_type_hints(cls)
    try:
        values = {f.name: restore(hints[f.name], payload[f.name])
                  for f in dataclasses.fields(cls) if f.name in payload}
        return cls(**values)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"record kind {str(kind)!r}: payload does not fit {cls.__name__}: {err}") from err


def restore(hint: Any, value: Any) -> Any:
    """Undo `jsonable` for one field, guided by its type hint."""
    if value is None:
        return None
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option)
        if origin is frozenset:
            return frozenset(value)
        if isinstance(option, type) and issubclass(option, Enum):
            return option(value)
        if option is float:
            return _NON_FINITE[value] if isinstance(value, str) else float(value)
    return value


EPOCH_THRESHOLD_S = 1e8
"""A time above this is UTC epoch seconds (`run`); below, seconds of simulated time (`sim`)."""


def time_text(at: float) -> str:
    """A record's time for people: a UTC date to the nearest second, or a bench run's seconds. An
    instant moved from the core's clock by a later record's offset lands a few ms either side of
    the second it was set on, so it is rounded, not cut. A time no calendar holds (an edited file)
    is shown as the number it is, never a traceback."""
    if at >= EPOCH_THRESHOLD_S:
        try:
            return datetime.fromtimestamp(round(at), UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        except (OverflowError, ValueError, OSError):
            return f"{at:g}"
    return f"{at:.1f} s"
