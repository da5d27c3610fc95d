"""Turns BMS CAN frames into `BmsSnapshot`s, refusing whatever cannot be believed.

Real Tesla BMS frames carry no checksum or counter (docs/can.md), so every
defence is here: the length must match the DBC, the multiplexer page must be
known, enumerations must be in their value table, values must be physically
possible, SoC may not jump faster than a pack can charge, and each field goes
stale 3 periods after its message was last believed. A bad frame is counted by
reason and dropped; nothing a bus can send raises.

The bus is mostly not BMS traffic (90 % on the benchmark bus), so the very
first thing `on_message` does is one dict lookup by arbitration id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can
import cantools
from cantools.database.errors import DecodeError

from firmware_py.bms import signals
from firmware_py.core.faults import DECISION_BMS_FIELDS
from firmware_py.core.types import BmsSnapshot, is_finite_number
from firmware_py.errors import InputError
from firmware_py.files import read_text
from firmware_py.quoting import shown_text

log = logging.getLogger(__name__)

TIMEOUT_PERIODS = 3
ERROR_PAUSE_S = 0.05  # after a receive error, before the Notifier tries again


@dataclass(frozen=True)
class _Binding:
    """One snapshot field fed by one signal of one message."""

    field: str
    signal: str
    factor: float
    choices: frozenset[float] | None
    """The value table's codes as decoded (scaled) values, which is what `_parse` checks."""
    bounds: tuple[float, float] | None


@dataclass(frozen=True)
class _Frame:
    """A BMS message the reader listens to, with everything decoding it needs cached."""

    message: Any  # cantools Message
    timeout_s: float
    bindings: tuple[_Binding, ...]
    rate_limited: bool = False
    """True when it feeds an SoC field, whose rate of change is checked (most frames feed none)."""

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(b.field for b in self.bindings)


def load_dbc(path: Path) -> Any:
    """Load a DBC strictly; any problem is the installer's input error, named by file."""
    try:
        text = read_text(path, "DBC")
    except FileNotFoundError:
        raise InputError(f"{path}: DBC file not found") from None
    try:
        return cantools.database.load_string(text, database_format="dbc", strict=True)
    except Exception as err:  # cantools raises many parser types; all mean "bad DBC"
        raise InputError(f"{path}: not a valid DBC: {shown_text(str(err), 200)}") from None


def id_filters(frame_ids: Iterable[int]) -> list[dict[str, Any]]:
    """Acceptance filters for 11-bit `frame_ids`, and for 29-bit ids of the same numbers (see `can_filters`)."""
    return [{"can_id": fid, "can_mask": mask, "extended": extended} for extended, mask in
            ((False, 0x7FF), (True, 0x1FFF_FFFF)) for fid in sorted(frame_ids)]


def standard_ids(path: Path) -> list[int]:
    """The 11-bit ids of every message of the DBC at `path` (InputError when it has none, or is no DBC)."""
    ids = sorted(m.frame_id for m in load_dbc(path).messages if not m.is_extended_frame)
    if not ids:
        raise InputError(f"{path}: the DBC has no message with an 11-bit id, which a BMS's are")
    return ids


def _binding(db: Any, name: str, ref: str, source: str) -> tuple[Any, _Binding]:
    msg_name, _, sig_name = ref.partition(".")
    try:
        message = db.get_message_by_name(msg_name)
    except KeyError:
        raise InputError(f"{source}.{name}: message {msg_name!r} is not in the DBC") from None
    try:
        signal = message.get_signal_by_name(sig_name)
    except KeyError:
        raise InputError(f"{source}.{name}: signal {sig_name!r} is not in message {msg_name}") from None
    choices = _scaled_choices(signal)
    if name == "hvil_ok":
        factor, bounds = 1.0, None
    else:
        factor, bounds = signals.UNIT_FACTORS.get(signal.unit or "", 1.0), signals.PLAUSIBLE.get(name)
    return message, _Binding(name, sig_name, factor, choices, bounds)


def _scaled_choices(signal: Any) -> frozenset[float] | None:
    """The value table's keys scaled as `decode` scales a value, or None without a table.

    cantools keys `choices` by raw value while `_parse` sees the scaled one: with a
    DBC whose offset shifts the vehicle's codes onto the gateway's (docs/can.md), raw
    keys would refuse a defined state for ever and believe an undefined one.
    """
    if not signal.choices:
        return None
    return frozenset(signal.conversion.raw_to_scaled(int(k), decode_choices=False) for k in signal.choices)


def _frames(db: Any, table: Mapping[str, str], source: str, dbc: Path) -> dict[int, _Frame]:
    grouped: dict[int, tuple[Any, list[_Binding]]] = {}
    problems: list[str] = []  # every entry's, at once: an installer fitting a vehicle fixes them together
    for name, ref in table.items():
        if name not in signals.SNAPSHOT_FIELDS:
            problems.append(f"{source}.{name}: unknown field (expected one of: {', '.join(signals.SNAPSHOT_FIELDS)})")
        elif ref.count(".") != 1:
            problems.append(f"{source}.{name}: {ref!r} is not 'MESSAGE.SIGNAL'")
        else:
            try:
                message, binding = _binding(db, name, ref, source)
            except InputError as err:
                problems += err.problems
                continue
            grouped.setdefault(message.frame_id, (message, []))[1].append(binding)
    # Frames, filters and the id lookup are all 11-bit: a 29-bit message would pass every check here
    # and then never be read. Said now rather than found as a truck that is never usable.
    problems += [f"{dbc}: message {message.name} (0x{message.frame_id:X}) has a 29-bit id: not supported"
                 for message, _ in grouped.values() if message.is_extended_frame]
    problems += [f"{source}: message {message.name} has no GenMsgCycleTime in the DBC, so its freshness cannot "
                 "be judged" for message, _ in grouped.values() if message.cycle_time is None]
    problems += [f"{dbc}: message {message.name}: GenMsgCycleTime {message.cycle_time!r} is not a period in "
                 "milliseconds above 0, so its freshness cannot be judged"
                 for message, _ in grouped.values()
                 if message.cycle_time is not None and not (is_finite_number(message.cycle_time)
                                                            and message.cycle_time > 0)]
    if problems:
        raise InputError(problems)
    frames = {}
    for frame_id, (message, bindings) in grouped.items():
        timeout = TIMEOUT_PERIODS * message.cycle_time / 1000.0
        rate_limited = any(b.field in signals.RATE_LIMITED for b in bindings)
        frames[frame_id] = _Frame(message, timeout, tuple(bindings), rate_limited)
    return frames


class BmsReader:
    """Decodes BMS frames into snapshots; thread-safe (a Notifier thread feeds it).

    `clock` gives the receive time when `on_message` is not told one; replay passes
    the log's own timestamps instead, so freshness is judged on the log's time.
    """

    def __init__(self, db_path: Path, clock: Callable[[], float],
                 mapping: Mapping[str, str] | None = None, *, source: str = "vehicle.signals"):
        self.db_path = Path(db_path)
        self.db = load_dbc(self.db_path)
        self._clock = clock
        self._frames = _frames(self.db, signals.merged(mapping), source, self.db_path)
        self._timeout = {b.field: f.timeout_s for f in self._frames.values() for b in f.bindings}
        self._values: dict[str, Any] = {}
        self._times: dict[str, float] = {}
        self._soc_trends: dict[str, tuple[float, float]] = {}  # SoC field -> (trend level, when), `_soc_jump`
        self._rejected: set[str] = set()
        self._believed_at: float | None = None
        """When the last frame was believed: a snapshot's `received_at`, so the core's `bms_timeout_s`
        judges how old the BMS data is (a tick's snapshot stamped `now` would always look new)."""
        self._last_key: tuple | None = None
        self._parsed: dict[int, tuple[bytes, dict[str, Any]]] = {}
        """Per frame id, the last payload that parsed and its values: most frames repeat the last one."""
        self._late: set[str] = set()
        self._late_now = float("nan")  # the instant `_late` is for (none yet)
        self._lock = threading.Lock()
        self.dropped: Counter[str] = Counter()
        self.accepted = 0
        self.last_drop: str = ""

    def forget(self) -> None:
        """Believe nothing decoded so far; the counts stay. For a capture whose time went back (logs joined
        end to end, a logger whose clock was reset): what was believed before is of another time, and
        judged against the earlier timestamps after it, it would look fresh until they caught up."""
        with self._lock:
            self._values.clear()
            self._times.clear()
            self._soc_trends.clear()
            self._rejected.clear()
            self._believed_at, self._last_key = None, None
            self._late, self._late_now = set(), float("nan")

    # -- the bus side -------------------------------------------------------

    def can_filters(self) -> list[dict[str, Any]]:
        """Kernel/driver acceptance filters: only the BMS ids reach user space, as 11-bit ids to be read and as
        29-bit ids of the same number to be counted (`extended_id`: another node's message, an id clash an
        installer must be able to see)."""
        return id_filters(self._frames)

    @property
    def frame_ids(self) -> frozenset[int]:
        return frozenset(self._frames)

    @property
    def fields(self) -> tuple[str, ...]:
        """The snapshot fields this reader fills (the mapping's, less those unmapped)."""
        return tuple(self._timeout)

    def frame_counts(self) -> tuple[int, dict[str, int]]:
        """Frames accepted, and dropped by reason, read together (the Notifier thread may be counting)."""
        with self._lock:
            return self.accepted, dict(self.dropped)

    def period_s(self, frame_id: int) -> float:
        """The DBC period of a BMS message (replay uses it to estimate capture time)."""
        return self._frames[frame_id].timeout_s / TIMEOUT_PERIODS

    def on_message(self, msg: can.Message, now: float | None = None) -> BmsSnapshot | None:
        """A new snapshot when `msg` was believed and changed something the core decides on, else None.

        This is the frame path's one "did anything change?": a snapshot is handed
        out only when a decision field or the set of stale fields differs from the
        last snapshot handed out (here or by `snapshot`), so the gateway steps its
        core for every snapshot it receives and for nothing else.
        """
        frame = self._frames.get(msg.arbitration_id)
        if frame is None or msg.is_remote_frame or msg.is_error_frame:
            return None
        with self._lock:
            if msg.is_extended_id:  # a 29-bit id sharing a BMS id's number: another message, counted not read
                return self._drop("extended_id", frame, (), f"29-bit id 0x{msg.arbitration_id:X}")
            # Read under the lock: a tick's `snapshot` in between would otherwise stamp a later time first,
            # and this snapshot, older than the one the core holds, would not be believed.
            now = self._clock() if now is None else now
            values = self._decode(frame, msg.data, msg.dlc, now)
            if values is not None:
                self.accepted += 1
                self._believed_at = now
                self._values.update(values)
                self._touch(values, now)
                if self._rejected:
                    self._rejected.difference_update(values)
            # A refused frame counts too: the fields it would have fed are stale now, and a critical
            # one among them must reach the core at once, not at the next tick.
            stale = self._stale_at(now)
            key = self._decision_key(stale)
            if key == self._last_key:
                return None
            self._last_key = key
            return self._snapshot(now, stale)

    def snapshot(self, now: float) -> BmsSnapshot:
        """What is believed as of `now`, with fields past their timeout listed as stale."""
        with self._lock:
            stale = self._stale_at(now)
            self._last_key = self._decision_key(stale)
            return self._snapshot(now, stale)

    def _snapshot(self, now: float, stale: frozenset[str]) -> BmsSnapshot:
        """Stamped with when the data was last believed (its age) and `as_of=now`, when `stale` was worked
        out: a frame path's snapshot overtaken by a tick's on its way to the core shares the tick's
        `received_at`, and only `as_of` tells the core that its view of staleness is the older one."""
        received_at = now if self._believed_at is None else self._believed_at
        return BmsSnapshot(received_at=received_at, stale=stale, as_of=now, **self._values)

    def _decision_key(self, stale: frozenset[str]) -> tuple:
        return tuple(self._values.get(name) for name in DECISION_BMS_FIELDS) + (stale,)

    # -- decoding and plausibility -----------------------------------------

    def _decode(self, frame: _Frame, data: bytes | bytearray, dlc: int, now: float) -> dict[str, Any] | None:
        payload = bytes(data)
        if dlc != len(payload):  # a frame is as long as its DLC says: bytes past it were never sent
            return self._drop("wrong_length", frame, frame.fields, f"DLC {dlc} with {len(payload)} data bytes")
        last = self._parsed.get(frame.message.frame_id)
        if last is not None and last[0] == payload:
            values = last[1]  # the same bytes parse to the same values: only the time-dependent check remains
        else:
            parsed = _parse(frame, payload)
            if isinstance(parsed, _Refusal):
                return self._drop(parsed.reason, frame, parsed.suspect, parsed.detail)
            self._parsed[frame.message.frame_id] = (payload, parsed)
            values = parsed
        jump = self._soc_jump(values, now) if frame.rate_limited else ""
        if jump:
            return self._drop("soc_jump", frame, tuple(values), jump)
        return values

    def _soc_jump(self, values: Mapping[str, Any], now: float) -> str:
        """A SoC may stray from its trend by the slack (quantisation, estimator noise), and the trend
        may move no faster than the fastest believable rate toward each accepted value. Measured from
        the last value alone, the slack was granted again on every frame: at 10 Hz a SoC walked at
        6 %/s in 0.5 % steps."""
        moved: dict[str, tuple[float, float]] = {}
        for name in signals.RATE_LIMITED.intersection(values):
            trend = self._soc_trends.get(name)
            if trend is None:
                moved[name] = (values[name], now)
                continue
            level, at = trend
            reach = signals.MAX_SOC_RATE_PCT_PER_S * max(0.0, now - at)
            # The rounding margin: decoded tenths (0.1 × raw) are not exact, and a move of exactly the
            # slack must pass whatever SoC it starts from.
            if abs(values[name] - level) > reach + signals.SOC_JUMP_SLACK_PCT + 1e-9:
                return f"{name} {self._values.get(name, level):g} -> {values[name]:g}"
            moved[name] = (level + max(-reach, min(reach, values[name] - level)), now)
        self._soc_trends.update(moved)
        return ""

    def _drop(self, reason: str, frame: _Frame, suspect: tuple[str, ...], detail: str) -> None:
        """Count a refused frame; the fields it would have fed are not believed until a good one."""
        self.dropped[reason] += 1
        self.last_drop = f"{frame.message.name} (0x{frame.message.frame_id:X}): {reason}: {detail}"
        self._rejected.update(n for n in suspect if n in self._values)
        log.debug("dropped %s", self.last_drop)
        return None

    def _touch(self, names: Mapping[str, Any], now: float) -> None:
        """Note the fields `names` as believed at `now`; a field just believed is not late at `now`."""
        for name in names:
            self._times[name] = now
        if now == self._late_now:
            self._late.difference_update(names)

    def _stale_at(self, now: float) -> frozenset[str]:
        """Fields past their timeout at `now`, or refused since their last good frame.

        The late ones are worked out once per instant: the frames of one bench step
        (and its tick) share `now`, and between them only `_touch` changes the answer.
        """
        if now != self._late_now:
            self._late = {n for n, t in self._times.items() if now - t > self._timeout[n]}
            self._late_now = now
        return frozenset(self._late | self._rejected)


@dataclass(frozen=True)
class _Refusal:
    """Why a payload cannot be believed whatever the time: `_drop`'s arguments."""

    reason: str
    suspect: tuple[str, ...]
    detail: str


def _parse(frame: _Frame, data: bytes) -> dict[str, Any] | _Refusal:
    """A payload's field values, or why it is refused: a function of the bytes alone."""
    message = frame.message
    if len(data) != message.length:
        return _Refusal("wrong_length", frame.fields, f"{len(data)} bytes, DBC says {message.length}")
    try:
        decoded = message.decode(data, decode_choices=False)
    except DecodeError as err:
        if message.is_multiplexed():
            return _Refusal("unknown_mux_page", (), str(err))
        return _Refusal("undecodable", frame.fields, str(err))
    present = [b for b in frame.bindings if b.signal in decoded]
    names = tuple(b.field for b in present)
    values: dict[str, Any] = {}
    for b in present:
        raw = decoded[b.signal]
        if not is_finite_number(raw):  # an IEEE float signal of an installer's DBC can carry NaN or infinity
            return _Refusal("out_of_range", names, f"{b.signal}={raw}")
        if b.choices is not None and raw not in b.choices:
            return _Refusal("not_in_value_table", names, f"{b.signal}={raw}")
        if b.field == "hvil_ok":
            values[b.field] = int(raw) == signals.HVIL_OK_VALUE
            continue
        value = int(raw) if b.field in signals.INTEGER_FIELDS else float(raw) * b.factor
        if b.bounds is not None and not b.bounds[0] <= value <= b.bounds[1]:
            return _Refusal("out_of_range", names, f"{b.field}={value:g}")
        values[b.field] = value
    return values


class BmsListener(can.Listener):
    """Feeds a reader from a python-can Notifier and hands each new snapshot on."""

    def __init__(self, reader: BmsReader, on_snapshot: Callable[[BmsSnapshot], None]):
        self.reader = reader
        self.on_snapshot = on_snapshot
        self.errors = 0
        self._last_error = ""

    def on_message_received(self, msg: can.Message) -> None:
        snapshot = self.reader.on_message(msg)
        if snapshot is not None:
            self.on_snapshot(snapshot)

    def on_error(self, exc: Exception) -> None:
        """A receive error is handled here, so a Notifier without a loop keeps its thread alive.

        (A Notifier given an event loop re-raises and its thread dies: the runtime
        therefore runs it without one.) Logged once per distinct error, and a short
        pause keeps a bus that fails every call from spinning a core; the BMS
        timeouts make the silence visible to the core meanwhile.
        """
        self.errors += 1
        if str(exc) != self._last_error:
            log.warning("CAN receive error (retrying): %s", exc)
            self._last_error = str(exc)
        time.sleep(ERROR_PAUSE_S)


def reader_from_config(config: Any, clock: Callable[[], float]) -> BmsReader:
    """The reader an installed gateway uses: the config's DBC and signal overrides."""
    return BmsReader(config.dbc_path(), clock, config.vehicle.signals,
                     source=f"{config.source}: vehicle.signals")
