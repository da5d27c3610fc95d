"""OpenADR 3 messages checked against an independent model of the specification.

The model is the `openadr3` package's (python-oa3): its raw pydantic models mirror
the JSON shapes of the specification field by field, and its entities parse the
wire formats (date-times, ISO 8601 durations) with pendulum, a parser that is not
ours. A message conforms when

- the raw model of its object type validates it (required fields, types), and
- every field it carries is one the model knows (a misspelt or invented field that
  both our sides agree on fails here), save the few OpenADR 3.0.1 fields the
  package's models (written for 3.1) leave out, listed in `SPEC_ONLY`, and
- the entity coerces (its date-times and durations parse).
"""

from __future__ import annotations

from typing import Any

from openadr3.entities import coerce
from openadr3.entities.models import Event
from openadr3.entities.raw import (
    RawBase,
    RawEvent,
    RawProgram,
    RawReport,
    RawSubscription,
    RawVen,
)

MODELS: dict[str, type[RawBase]] = {"EVENT": RawEvent, "PROGRAM": RawProgram, "REPORT": RawReport,
                                    "VEN": RawVen, "SUBSCRIPTION": RawSubscription}

# OpenADR 3.0.1 fields python-oa3 0.5.0 does not model: a 3.0.1 report names its program (programID is
# required there); 3.1 dropped it.
SPEC_ONLY = {("REPORT", "programID")}


def conforms(message: dict[str, Any], object_type: str | None = None) -> None:
    """AssertionError naming what is wrong unless `message` is a valid OpenADR 3 object of its type."""
    kind = object_type or message.get("objectType")
    assert kind in MODELS, f"unknown objectType {kind!r} in {message}"
    model = MODELS[kind].model_validate(message)
    known = model.model_dump(by_alias=True, exclude_unset=True)
    unknown = _unknown(message, known, kind)
    unknown = [path for path in unknown if (kind, path) not in SPEC_ONLY]
    assert not unknown, f"{kind} carries fields the specification's model does not know: {unknown}"
    coerce({**message, "objectType": message.get("objectType", kind)})


def resolved_windows(event: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(interval id, start, end) in UTC epoch seconds as the independent model lays the intervals out."""
    parsed = Event.from_raw(event)
    windows = []
    for interval in parsed.resolved_intervals():
        start, end = interval.interval_period.period
        windows.append((interval.id, start.timestamp(), end.timestamp()))
    return windows


def _unknown(message: Any, known: Any, path: str) -> list[str]:
    """Paths (relative to the object) of keys in `message` that the validated model dropped."""
    found: list[str] = []
    if isinstance(message, dict) and isinstance(known, dict):
        for key, value in message.items():
            here = key if path in MODELS else f"{path}.{key}"
            if key not in known:
                found.append(here)
            else:
                found += _unknown(value, known[key], here)
    elif isinstance(message, list) and isinstance(known, list):
        for n, (item, model_item) in enumerate(zip(message, known, strict=False)):
            found += _unknown(item, model_item, f"{path}[{n}]")
    return found
