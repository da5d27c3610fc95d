"""Frame encoding for the simulated BMS, planned once per DBC message page.

The node sends ~850,000 frames in a 5-hour bench run, and cantools' general
`Message.encode` (dict of signals in, checks, per-signal dispatch) costs ~10 us
a frame. Everything that does not depend on the values (which signals a page
carries, which snapshot field feeds each, unit factor, clamp range, bit
position) is worked out here once, from the DBC itself: nothing is typed by hand.

Per frame what remains is the arithmetic the node always did (unit factor,
clamp) and cantools' own `numeric_scaled_to_raw` for the quantisation, so the
raw values are exactly those cantools would encode. Packing those raw integers
into bytes is a shift-and-or for little-endian integer signals (the only kind
the bundled DBCs have); a message with any other kind of signal, or a raw value
that does not fit its bits, is packed by cantools itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from firmware_py.bms import signals


@dataclass(frozen=True)
class _Slot:
    """One signal of one page: where its value comes from and how it is bounded."""

    signal: Any  # cantools Signal
    source: str | None
    """Snapshot field that feeds it; None: the BMS sends 0 (a field the gateway does not map)."""
    unit_factor: float
    minimum: float | None
    maximum: float | None

    def raw(self, values: Mapping[str, Any]) -> int | float:
        """The quantised raw value: unit factor and clamp as the node always applied, then cantools' rounding."""
        value = values.get(self.source, 0.0) if self.source else 0.0
        value = float(value) / self.unit_factor
        lo = self.minimum if self.minimum is not None else value
        hi = self.maximum if self.maximum is not None else value
        return self.signal.conversion.numeric_scaled_to_raw(min(hi, max(lo, value)))


@dataclass(frozen=True)
class _Field:
    """Where a raw value sits in the frame read as one little-endian integer."""

    shift: int
    mask: int
    low: int
    high: int
    """The raw values that fit the signal's bits (two's complement for signed signals)."""


class PageEncoder:
    """Encodes one frame of one message: the whole message, or one multiplexer page of it."""

    def __init__(self, message: Any, mux: tuple[Any, int] | None, by_signal: Mapping[str, str]):
        self.message = message
        self.mux = mux
        carried = [s for s in message.signals if not s.is_multiplexer and
                   (not s.multiplexer_ids or mux is None or mux[1] in s.multiplexer_ids)]
        self.slots = tuple(_Slot(s, by_signal.get(f"{message.name}.{s.name}"),
                                 signals.UNIT_FACTORS.get(s.unit or "", 1.0), s.minimum, s.maximum)
                           for s in carried)
        framed = ([mux[0]] if mux else []) + carried
        self._names = tuple(s.name for s in framed)
        self._fields = _layout(framed)
        self._length = message.length
        self._last: tuple[list[Any] | None, bytes] = (None, b"")

    def encode(self, values: Mapping[str, Any]) -> bytes:
        """The frame carrying `values` (snapshot field -> value in snapshot units).

        The same inputs as last time give the same frame (most pages carry states and
        limits that rarely move), so that frame is reused without quantising again.
        """
        inputs = [values.get(slot.source, 0.0) if slot.source else 0.0 for slot in self.slots]
        if inputs != self._last[0]:
            self._last = (inputs, self._encode(values))
        return self._last[1]

    def _encode(self, values: Mapping[str, Any]) -> bytes:
        raws = [slot.raw(values) for slot in self.slots]
        if self.mux is not None:
            raws.insert(0, self.mux[0].conversion.numeric_scaled_to_raw(self.mux[1]))
        if self._fields is None:
            return self._cantools(raws)
        word = 0
        for raw, f in zip(raws, self._fields):
            if not f.low <= raw <= f.high:
                return self._cantools(raws)  # whatever cantools makes of a value too wide for its bits
            word |= (raw & f.mask) << f.shift
        return word.to_bytes(self._length, "little")

    def _cantools(self, raws: list[int | float]) -> bytes:
        return self.message.encode(dict(zip(self._names, raws)), scaling=False, strict=False)


def page_encoders(message: Any, by_signal: Mapping[str, str]) -> list[PageEncoder]:
    """One encoder per frame the message is sent as: one, or one per multiplexer page."""
    if not message.is_multiplexed():
        return [PageEncoder(message, None, by_signal)]
    mux = next(s for s in message.signals if s.is_multiplexer)
    pages = sorted({i for s in message.signals for i in (s.multiplexer_ids or ())})
    return [PageEncoder(message, (mux, page), by_signal) for page in pages]


def _layout(framed: list[Any]) -> tuple[_Field, ...] | None:
    """Bit positions of little-endian integer signals; None when any signal is of another kind."""
    fields = []
    for s in framed:
        if s.byte_order != "little_endian" or s.conversion.is_float:
            return None
        low, high = (-(1 << (s.length - 1)), (1 << (s.length - 1)) - 1) if s.is_signed else (0, (1 << s.length) - 1)
        fields.append(_Field(s.start, (1 << s.length) - 1, low, high))
    return tuple(fields)
