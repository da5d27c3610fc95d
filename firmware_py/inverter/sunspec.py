"""SunSpec models as data: layouts come from pysunspec2's JSON, never typed by hand.

One `ModelDef` per model id, loaded from `sunspec2/models/json/model_<id>.json`,
flattens the model's fixed part into points at register offsets (offset 0 is
the model's `ID` register). It encodes engineering values to registers and
decodes registers back, applying scale factors and the "not implemented"
sentinels, so a client and a server (the simulated inverter, the gateway's own
SunSpec DER server) share exactly one codec. `SunSpecMap` lays out a whole
device: 'SunS', the model chain and the end model.

Word order is SunSpec's: big-endian registers, most significant word first.
Repeating groups (count 0 or a point name) are not part of the fixed block and
are left out; the models this gateway uses (1, 701, 702, 703, 704, 713) have none.
"""

from __future__ import annotations

import bisect
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cache, cached_property
from importlib import resources
from typing import Any

SUNS_MARKER = (0x5375, 0x6E53)  # 'SunS'
END_MODEL_ID = 0xFFFF
BASE_ADDRESSES = (40000, 0, 50000)  # where a client looks for 'SunS', most common first
DEFAULT_BASE = BASE_ADDRESSES[0]  # where our servers (the DER server, the simulated inverter) put it

# The models this gateway speaks, by SunSpec model id.
COMMON = 1
DER_MEASURE_AC = 701
DER_CAPACITY = 702
DER_ENTER_SERVICE = 703
DER_CONTROL_AC = 704
DER_STORAGE = 713
MODELS = (COMMON, DER_MEASURE_AC, DER_CAPACITY, DER_CONTROL_AC, DER_STORAGE)
"""What the gateway's own DER server serves; an inverter may have more (the simulated one adds 703)."""

# register count, struct code, "not implemented" raw value (SunSpec spec)
_INTS: dict[str, tuple[int, str, int]] = {
    "int16": (1, "h", -0x8000),
    "sunssf": (1, "h", -0x8000),
    "uint16": (1, "H", 0xFFFF),
    "enum16": (1, "H", 0xFFFF),
    "bitfield16": (1, "H", 0xFFFF),
    "count": (1, "H", 0),
    "acc16": (1, "H", 0),
    "int32": (2, "i", -0x80000000),
    "uint32": (2, "I", 0xFFFFFFFF),
    "enum32": (2, "I", 0xFFFFFFFF),
    "bitfield32": (2, "I", 0xFFFFFFFF),
    "acc32": (2, "I", 0),
    "ipaddr": (2, "I", 0),
    "int64": (4, "q", -0x8000000000000000),
    "uint64": (4, "Q", 0xFFFFFFFFFFFFFFFF),
    "acc64": (4, "Q", 0),
}
_FLOATS = {"float32": (2, "f"), "float64": (4, "d")}
_SENTINEL_FREE = {"count", "acc16", "acc32", "acc64", "ipaddr"}
"""Types whose "not implemented" value (0) is also a legal reading: never decoded as None."""


class SunSpecError(ValueError):
    """A register block that does not fit its model definition."""


@dataclass(frozen=True)
class Point:
    """One point of a model's fixed block; `offset` counts from the model's ID register."""

    name: str
    type: str
    offset: int
    size: int
    sf: str | int | None = None
    access: str = "R"
    symbols: Mapping[str, int] = field(default_factory=dict)
    units: str | None = None

    @property
    def writable(self) -> bool:
        return self.access == "RW"

    def symbol(self, name: str) -> int:
        """The value of enum symbol (or bit number of bitfield symbol) `name`."""
        try:
            return self.symbols[name]
        except KeyError:
            raise SunSpecError(f"point {self.name} has no symbol {name!r}") from None

    def to_raw(self, regs: Sequence[int]) -> int | float | str | None:
        """The point's raw value from its registers, None when "not implemented"."""
        if self.type == "string":
            data = b"".join(r.to_bytes(2, "big") for r in regs)
            text = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            return text or None
        if self.type == "pad":
            return 0
        if self.type == "eui48" or self.type == "ipv6addr":
            return b"".join((r & 0xFFFF).to_bytes(2, "big") for r in regs).hex()
        packer, words = self._packers
        value = packer.unpack(words.pack(*[r & 0xFFFF for r in regs]))[0]
        if self.type in _FLOATS:
            return None if math.isnan(value) else value
        if value == _INTS[self.type][2] and self.type not in _SENTINEL_FREE:
            return None
        return value

    def from_raw(self, value: int | float | str | None) -> list[int]:
        """The point's registers for a raw value; None encodes "not implemented"."""
        if self.type == "string":
            data = (value or "").encode("utf-8")[: self.size * 2].ljust(self.size * 2, b"\0")
            return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
        if self.type in ("pad", "eui48", "ipv6addr"):
            return [0] * self.size
        packer, words = self._packers
        if self.type in _FLOATS:
            return list(words.unpack(packer.pack(math.nan if value is None else float(value))))
        raw = _INTS[self.type][2] if value is None else int(value)
        try:
            return list(words.unpack(packer.pack(raw)))
        except struct.error:
            raise SunSpecError(f"point {self.name} ({self.type}): {raw} does not fit") from None

    @cached_property
    def _packers(self) -> tuple[struct.Struct, struct.Struct]:
        """(value packer, big-endian register splitter) of a numeric point.

        Built once per point: a simulated inverter encodes its live points on every poll.
        """
        count, code = _FLOATS[self.type] if self.type in _FLOATS else _INTS[self.type][:2]
        return struct.Struct(">" + code), struct.Struct(">" + "H" * count)


def _models_dir():
    return resources.files("sunspec2").joinpath("models", "json")


@cache
def _load_json(model_id: int) -> dict[str, Any]:
    path = _models_dir().joinpath(f"model_{model_id}.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SunSpecError(f"no SunSpec definition for model {model_id} in pysunspec2") from None


@dataclass(frozen=True)
class ModelDef:
    """A SunSpec model's fixed block: points by name at offsets, and its codec."""

    id: int
    name: str
    points: Mapping[str, Point]
    length: int
    """Register count after ID and L: the value of the model's L point."""

    @classmethod
    @cache
    def load(cls, model_id: int) -> ModelDef:
        doc = _load_json(model_id)
        points: dict[str, Point] = {}
        end = _flatten(doc["group"], "", 0, points)
        return cls(id=model_id, name=doc["group"]["name"], points=points, length=end - 2)

    @property
    def size(self) -> int:
        """Registers including ID and L."""
        return self.length + 2

    @property
    def shortest_length(self) -> int:
        """The least L a device may report: the definition less its trailing padding. SunSpec accepts
        model 1 with L = 65, its Pad left out, as many inverters (from before the Pad) still report it."""
        length = self.length
        for point in sorted(self.points.values(), key=lambda p: p.offset, reverse=True):
            if point.type != "pad":
                break
            length -= point.size
        return length

    def point(self, name: str) -> Point:
        try:
            return self.points[name]
        except KeyError:
            raise SunSpecError(f"model {self.id} has no point {name!r}") from None

    def offset(self, name: str) -> int:
        return self.point(name).offset

    def span(self, first: str, last: str) -> tuple[int, int]:
        """(offset, count) of the registers from point `first` to point `last` inclusive."""
        start, stop = self.point(first), self.point(last)
        return start.offset, stop.offset + stop.size - start.offset

    def scale(self, point: Point, sfs: Mapping[str, int | None]) -> int:
        """The power of ten for `point`: a fixed sf, a named sf point's value, or 0."""
        if point.sf is None:
            return 0
        if isinstance(point.sf, int):
            return point.sf
        sf = sfs.get(point.sf)
        return 0 if sf is None else int(sf)

    def decode(self, regs: Sequence[int], start: int = 0, *, scaled: bool = True,
               sfs: Mapping[str, int | None] | None = None) -> dict[str, Any]:
        """Values of every point wholly inside `regs` (which begin at model offset `start`).

        Scale factors come from `sfs` when given (read once per connection),
        else from the sf points inside `regs`. A "not implemented" point is None.
        """
        raw: dict[str, Any] = {}
        stop = start + len(regs)
        for p in self._ordered[bisect.bisect_left(self._offsets, start):]:
            if p.offset >= stop:
                break
            if p.offset + p.size <= stop:
                raw[p.name] = p.to_raw(regs[p.offset - start:p.offset - start + p.size])
        if not scaled:
            return raw
        factors = dict(raw) if sfs is None else {**raw, **sfs}
        out = {}
        for name, value in raw.items():
            p = self.points[name]
            if p.sf is not None and isinstance(value, (int, float)):
                sf = self.scale(p, factors)
                value = value * 10.0 ** sf if sf else value  # sf 0 keeps 64-bit meters exact
            out[name] = value
        return out

    def encode(self, values: Mapping[str, Any], *, scaled: bool = True) -> list[int]:
        """The whole model block (ID and L included) for `values`; absent points are "not implemented".

        With `scaled`, values are engineering units and are divided by their
        scale factor (itself taken from `values`); sf points default to 0.
        """
        return self.encode_span(values, 0, self.size, scaled=scaled)

    def encode_span(self, values: Mapping[str, Any], start: int, count: int, *,
                    scaled: bool = True) -> list[int]:
        """Registers [start, start + count) of the block `encode` would give, encoding only the points there.

        A server answering a poll of a few registers need not encode the whole
        model (701 has 72 points); a point cut by the span's edge is encoded
        whole and only its registers inside the span are kept.
        """
        regs = [0] * count
        sfs = {n: values.get(n, 0) for n in self._sf_names}
        stop = start + count
        for p in self.points.values():
            if p.offset >= stop or p.offset + p.size <= start:
                continue
            if p.name == "ID":
                value: Any = self.id
            elif p.name == "L":
                value = self.length
            elif p.type == "sunssf":
                value = sfs[p.name]
            else:
                value = values.get(p.name)
            words = self._encode_point(p, value, sfs if scaled else None)
            lo = p.offset - start
            if lo >= 0 and lo + p.size <= count:
                regs[lo:lo + p.size] = words
            else:
                for i, word in enumerate(words):
                    if 0 <= lo + i < count:
                        regs[lo + i] = word
        return regs

    @cached_property
    def _ordered(self) -> tuple[Point, ...]:
        """Points by offset: a poll decodes a few registers of a model, found by bisecting `_offsets`."""
        return tuple(sorted(self.points.values(), key=lambda p: p.offset))

    @cached_property
    def _offsets(self) -> tuple[int, ...]:
        return tuple(p.offset for p in self._ordered)

    @cached_property
    def _sf_names(self) -> tuple[str, ...]:
        return tuple(n for n, p in self.points.items() if p.type == "sunssf")

    def encode_point(self, name: str, value: Any, sfs: Mapping[str, int | None] | None = None) -> list[int]:
        """One point's registers; with `sfs`, `value` is in engineering units."""
        return self._encode_point(self.point(name), value, sfs)

    def _encode_point(self, p: Point, value: Any, sfs: Mapping[str, int | None] | None) -> list[int]:
        if sfs is not None and p.sf is not None and isinstance(value, (int, float)):
            sf = self.scale(p, sfs)
            value = round(value / 10.0 ** sf) if sf else round(value)
        return p.from_raw(value)

    def points_in(self, start: int, count: int) -> list[Point]:
        """Points overlapping model offsets [start, start + count)."""
        return [p for p in self.points.values() if p.offset < start + count and p.offset + p.size > start]


def _flatten(group: Mapping[str, Any], prefix: str, offset: int, out: dict[str, Point]) -> int:
    """Add `group`'s points (and fixed sub-groups, names dotted) to `out`; return the next offset."""
    for spec in group.get("points", []):
        sf = spec.get("sf")
        if isinstance(sf, str) and sf.lstrip("-").isdigit():
            sf = int(sf)
        symbols = {s["name"]: int(s["value"]) for s in spec.get("symbols", [])}
        name = prefix + spec["name"]
        out[name] = Point(name=name, type=spec["type"], offset=offset, size=int(spec["size"]),
                          sf=prefix + sf if isinstance(sf, str) and prefix + sf in out else sf,
                          access=spec.get("access", "R"), symbols=symbols, units=spec.get("units"))
        offset += int(spec["size"])
    for sub in group.get("groups", []):
        count = sub.get("count", 1)
        if count is None:
            count = 1
        if not isinstance(count, int) or count == 0:
            break  # repeating group: not part of the fixed block
        for i in range(count):
            label = sub["name"] if count == 1 else f"{sub['name']}[{i}]"
            offset = _flatten(sub, f"{prefix}{label}.", offset, out)
    return offset


@dataclass
class SunSpecMap:
    """A device's register map: 'SunS' at `base`, then each model, then the end model."""

    base: int = 40000
    models: list[tuple[ModelDef, dict[str, Any]]] = field(default_factory=list)

    def add(self, model_id: int, values: Mapping[str, Any]) -> SunSpecMap:
        self.models.append((ModelDef.load(model_id), dict(values)))
        return self

    def addresses(self) -> dict[int, int]:
        """Model id -> address of its ID register."""
        out, addr = {}, self.base + 2
        for model, _ in self.models:
            out.setdefault(model.id, addr)
            addr += model.size
        return out

    def address(self, model_id: int, point: str) -> int:
        return self.addresses()[model_id] + ModelDef.load(model_id).offset(point)

    def registers(self) -> list[int]:
        regs = list(SUNS_MARKER)
        for model, values in self.models:
            regs += model.encode(values)
        return regs + [END_MODEL_ID, 0]

    def end(self) -> int:
        """One past the last register."""
        return self.base + len(self.registers())


def walk_chain(headers: Iterable[tuple[int, int, int]]) -> dict[int, tuple[int, int]]:
    """Model id -> (address, L) from (address, id, L) headers, checking known models' lengths."""
    found: dict[int, tuple[int, int]] = {}
    for addr, model_id, length in headers:
        try:
            model = ModelDef.load(model_id)
        except SunSpecError:
            model = None
        if model is not None and length < model.shortest_length:
            raise SunSpecError(f"model {model_id} at {addr} has L={length}, its definition needs "
                               f"{model.shortest_length}")
        found.setdefault(model_id, (addr, length))
    return found


# ---------------------------------------------------------------------- enum and bitfield symbols
# Taken from pysunspec2's JSON like the layouts, so no module types a SunSpec number by hand.


def _symbols(model_id: int, point: str, name: str) -> type[IntEnum]:
    """An IntEnum of one point's symbols: values for enums, bit numbers for bitfields."""
    return IntEnum(name, dict(ModelDef.load(model_id).point(point).symbols))


InvSt = _symbols(DER_MEASURE_AC, "InvSt", "InvSt")
ConnSt = _symbols(DER_MEASURE_AC, "ConnSt", "ConnSt")
AlrmBit = _symbols(DER_MEASURE_AC, "Alrm", "AlrmBit")
ThrotSrcBit = _symbols(DER_MEASURE_AC, "ThrotSrc", "ThrotSrcBit")
CtrlModesBit = _symbols(DER_CAPACITY, "CtrlModes", "CtrlModesBit")
WSetMod = _symbols(DER_CONTROL_AC, "WSetMod", "WSetMod")
WSetEna = _symbols(DER_CONTROL_AC, "WSetEna", "WSetEna")  # also WSetEnaRvrt, WMaxLimPctEna(Rvrt)
