"""Every core step's inputs, in the journal, so any run can be replayed through the core.

The billing records say what the core decided; these say what it was told and
when, which is what a replay needs (`firmware_py.core.replay`). They are kept
small enough for a gateway that steps ten times a second for years:
- a BMS snapshot is kept as the core's view of it (the fields it decides on,
  their staleness and the receive time): voltage noise cannot change a decision;
- each value is stored only when it differs from the one before it in the batch;
- steps are journaled in batches (`BATCH_STEPS`, one record each, zlib-packed),
  so they ride the journal's own batched commits and hash chain.
A crash loses at most the unfinished batch, which only shortens a replay; the
billing records are written on their own, as before.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import typing
import zlib
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from typing import Any

from firmware_py.core import types as core
from firmware_py.core.faults import DECISION_BMS_FIELDS
from firmware_py.core.policy import Policy
from firmware_py.journal import codec
from firmware_py.journal.kinds import RecordKind
from firmware_py.version import software_version

STEPS_KIND = RecordKind.CORE_STEPS
START_KIND = RecordKind.CORE_START
BATCH_STEPS = 600
"""One minute of ticks in `run`: a record a minute, and at most a minute of steps lost in a crash."""

STEP_INPUTS: dict[str, type] = {cls.__name__: cls for cls in (
    core.BmsSnapshot, core.InverterStatus, core.DispatchRequest, core.DispatchCancel, core.OwnerSettings,
    core.InstallerReset, core.JournalHealth, core.Tick, core.Stall, core.SiteLimit, core.PriceInterval,
    core.CalendarDay)}
_BMS_KEPT = ("received_at", "as_of", *DECISION_BMS_FIELDS)
"""`as_of` too, so a replay refuses the overtaken snapshots the core refused (absent in older journals: None)."""

Step = tuple[float, tuple[Any, ...]]


class StepRecorder:
    """Collects the inputs of each step; hands out a journal payload per full batch.

    Each step is encoded and fed to the compressor as it is noted (some tens of microseconds),
    so no step pays for a whole batch: a batch of 600 encoded at once took about 7 ms, and the
    step that filled it (a fault, say) waited that long on its way to the inverter.
    """

    def __init__(self, batch_steps: int = BATCH_STEPS):
        self.batch_steps = batch_steps
        self._begin()

    def _begin(self) -> None:
        self._count = 0
        self._first = self._last = 0.0
        self._previous: dict[str, dict[str, Any]] = {}
        self._packer = zlib.compressobj(6)
        self._packed: list[bytes] = []

    def record(self, now: float, inputs: Sequence[Any]) -> dict[str, Any] | None:
        """Note one step; the batch's payload when this step filled it, else None."""
        seen = dict(self._previous)  # kept only once the row is encoded, so a refused value leaves no gap
        row = _ROWS.encode(_row(now, inputs, seen))
        self._previous = seen
        self._packed.append(self._packer.compress((("," if self._count else "[") + row).encode()))
        if not self._count:
            self._first = now
        self._count, self._last = self._count + 1, now
        return self.take() if self._count >= self.batch_steps else None

    def take(self) -> dict[str, Any] | None:
        """The payload of the steps noted so far (None if none), and start a new batch."""
        if not self._count:
            return None
        packed = b"".join([*self._packed, self._packer.compress(b"]"), self._packer.flush()])
        payload = {"from": self._first, "to": self._last, "count": self._count, "format": "json+zlib+base64",
                   "data": base64.b64encode(packed).decode("ascii")}
        self._begin()
        return payload


_ROWS = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _fields(item: Any) -> dict[str, Any]:
    """An input as JSON-ready fields; the two that arrive ten times a second without the generic walk."""
    kind = type(item)
    if kind is core.BmsSnapshot:
        fields = {name: getattr(item, name) for name in _BMS_KEPT}
        fields["stale"] = sorted(item.stale.intersection(DECISION_BMS_FIELDS))
        return fields
    if kind is core.Tick or kind is core.InverterStatus:
        return dict(item.__dict__)  # flat, finite scalars (the client refuses anything else)
    return codec.jsonable(item)


def _row(now: float, inputs: Iterable[Any], previous: dict[str, dict[str, Any]]) -> list[Any]:
    """One step as a batch row: its time, then each input as the fields that changed since the
    batch's last input of its kind (all of them for the first); `previous` is brought up to date."""
    row: list[Any] = [now]
    for item in inputs:
        kind = type(item).__name__
        fields = _fields(item)
        before = previous.get(kind, {})
        row.append([kind, {k: v for k, v in fields.items() if k not in before or before[k] != v}])
        previous[kind] = fields
    return row


def encode_batch(steps: Sequence[Step]) -> dict[str, Any]:
    """A self-contained batch: the first value of each kind in full, then only what changed."""
    recorder = StepRecorder(batch_steps=len(steps) + 1)
    for now, inputs in steps:
        recorder.record(now, inputs)
    payload = recorder.take()
    if payload is None:
        raise ValueError("a step batch needs at least one step")
    return payload


def decode_batch(payload: dict[str, Any]) -> list[Step]:
    """The steps of one batch, inputs rebuilt as the core's dataclasses; ValueError if damaged."""
    if payload.get("format") != "json+zlib+base64":
        raise ValueError(f"unknown step batch format {payload.get('format')!r}")
    try:
        rows = json.loads(zlib.decompress(base64.b64decode(payload["data"], validate=True)))
    except (KeyError, ValueError, zlib.error) as err:
        raise ValueError(f"damaged step batch: {err}") from None
    current: dict[str, dict[str, Any]] = {}
    steps: list[Step] = []
    for now, *items in rows:
        inputs = []
        for kind, changed in items:
            fields = {**current.get(kind, {}), **changed}
            current[kind] = fields
            inputs.append(_rebuild(kind, fields))
        steps.append((float(now), tuple(inputs)))
    return steps


def _rebuild(kind: str, fields: dict[str, Any]) -> Any:
    """The input back as its dataclass; the three that come every step without the generic restore."""
    cls = STEP_INPUTS.get(kind)
    if cls is None:
        raise ValueError(f"step batch: {kind!r} is not a core input")
    try:
        if cls is core.BmsSnapshot:
            return cls(**{**fields, "stale": frozenset(fields.get("stale", ()))})
        if cls is core.Tick or cls is core.InverterStatus:
            return cls(**fields)  # flat, finite scalars, as `_fields` wrote them
        hints = _hints(cls)
        return cls(**{f.name: codec.restore(hints[f.name], fields[f.name])
                      for f in dataclasses.fields(cls) if f.name in fields})
    except TypeError as err:
        raise ValueError(f"step batch: {kind} fields do not fit: {err}") from None


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def start_payload(policy: Any, owner: core.OwnerSettings, now: float) -> dict[str, Any]:
    """What the core started from: its policy, the owner's settings and the time; and the software
    that ran it, so every run in a journal names its release (journals before schema 3 lack it)."""
    return {"policy": codec.jsonable(policy), "owner": codec.jsonable(owner), "now": now,
            "software_version": software_version()}


def decode_start(payload: dict[str, Any]) -> tuple[Policy, core.OwnerSettings, float]:
    """The policy, owner settings and time a `START_KIND` record says the core started from."""
    hints = typing.get_type_hints(Policy)
    policy = Policy(**{name: tuple(value) if isinstance(value, list) else codec.restore(hints[name], value)
                       for name, value in payload["policy"].items()})
    owner = _rebuild("OwnerSettings", payload["owner"])
    return policy, owner, float(payload["now"])


def journaled_steps(records: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """From journal records: ("start", payload) for each core start, ("step", Step) for each step,
    ("gap", payload) where steps were not kept (`journal.backlog`). A run's replay ends at its gap:
    the steps after it, to the next start, follow steps nobody has, so none of them is given."""
    gapped = False
    for record in records:
        if record.kind == START_KIND:
            gapped = False
            yield "start", record.payload
        elif record.kind == RecordKind.JOURNAL_GAP and record.payload.get("steps"):
            gapped = True
            yield "gap", record.payload
        elif record.kind == STEPS_KIND and not gapped:
            for one in decode_batch(record.payload):
                yield "step", one
