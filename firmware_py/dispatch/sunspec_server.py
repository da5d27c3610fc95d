"""The gateway's SunSpec DER server: the truck and inverter as one DER on Modbus TCP (docs/dispatch.md).

A local energy manager or utility SCADA reads models 1, 701, 702, 704, 713 (and
the end model) and dispatches by writing 704. Nothing written reaches hardware:
`sunspec_der` turns the controls into what they ask for, and this module hands
every change to the core through `DispatchSink.submit`, so the floor and every
limit apply exactly as for OpenADR.

How writes become requests (choices documented here because clients see them):
- One *session* per continuous setpoint: the first non-zero setpoint opens a
  request `sunspec-<epoch>-<n>` (epoch seconds of `id_clock`: the wall clock in
  `run`, so ids stay unique across restarts); each later change (WSet, WSetMod, WSetPct,
  WMaxLimPct, a revert refresh) is the same id at revision + 1, so the journal
  reads as one dispatch that was modified. `WSetEna = 0` (or a zero setpoint,
  or WMaxLimPct = 0) sends `DispatchCancel` and closes the session.
- End time: with the revert function armed (`WSetEnaRvrt = 1`, `WSetRvrtTms > 0`)
  the request ends at the last WSet/WSetEna write + WSetRvrtTms, and every such
  write re-submits it with the new end. The core ends the request at `end`
  itself; the server then shows `WSet = WSetRvrt` as a real DER does (a
  non-zero WSetRvrt opens a new open-ended session). Unarmed, the setpoint holds
  "until WSetEna = 0", but the core refuses an infinite end and would budget a
  24 h end against the floor (capping a 11.5 kW request to a trickle), so the
  request covers `open_horizon_s` (15 min) and is renewed (a new revision) when
  half of it has passed, re-checking the energy budget each time.
- WMaxLimPct (when WMaxLimPctEna = 1) caps this server's requests at that share
  of WMaxRtg, with its own revert function.
- The core's answer never turns a valid write into a Modbus exception: the
  registers keep what was written (the client's intent) and model 701 shows the
  effect: W is the measured power, ThrotSrc has DERATED (core cap or refusal)
  and/or MAX_W (WMaxLimPct), ThrotPct the share of WMaxRtg withheld, InvSt
  THROTTLED while running below the setpoint, and MnAlrmInfo the reason text
  ("refused OPTED_OUT: ...", "capped to 3000 W: ...").
- Refused writes: read-only, unsupported or unknown registers and partial
  multi-register writes -> ILLEGAL_ADDRESS; values out of range -> ILLEGAL_VALUE;
  a client outside `allow_write_from` -> ILLEGAL_FUNCTION. Each is journaled via
  `sink.note("SunSpecWriteRefused", ...)`, including the ones pymodbus refuses
  before the server sees them (bad counts, undecodable write frames);
  any other unit id than the configured one gets GATEWAY_NO_RESPONSE.

The client address: pymodbus' SimDevice `action` hook is not told who asked, so
`_Listener` (a ModbusTcpServer) makes connections with `_Connection`, a request
handler that stores the peer of its transport in a context variable for the
task that serves each request; the action runs inside that task and reads it.

Ratings and energy meters come from the gateway's telemetry (the DER's ratings,
and the inverter's own TotWhInj/TotWhAbs: what bills are paid on). Tests may fix
`ratings` or pass a `meter`; before the inverter has reported any meter the
server integrates telemetry power at each tick and read.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_py.addresses import parse_host_port
from firmware_py.config import SunSpecServerConfig
from firmware_py.core.telemetry import Telemetry
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchRequest,
    Verdict,
)
from firmware_py.dispatch import DispatchSink
from firmware_py.dispatch.sunspec_der import (  # noqa: F401  (DerRatings re-exported)
    DerControls,
    DerRatings,
    DispatchStatus,
    Wanted,
    WriteRefused,
    encode_safely,
    layout,
    model_values,
    scale_factors,
)
from firmware_py.errors import InputError
from firmware_py.inverter.sunspec import (
    DEFAULT_BASE,
    DER_CONTROL_AC,
    END_MODEL_ID,
    SUNS_MARKER,
    ModelDef,
)
from firmware_py.journal.kinds import RecordKind
from firmware_py.links import LinkHandle

log = logging.getLogger(__name__)

SOURCE = "sunspec"
NOTE_KIND = RecordKind.SUNSPEC_WRITE_REFUSED
WRITE_CODES = frozenset({5, 6, 15, 16, 22, 23})
REGISTER_WRITES = frozenset({6, 16, 22, 23})
_PEER: contextvars.ContextVar[str | None] = contextvars.ContextVar("sunspec_peer", default=None)
_NOTED: contextvars.ContextVar[bool] = contextvars.ContextVar("sunspec_noted", default=False)


def parse_allow_list(entries: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses or networks ('192.168.1.0/24') allowed to write."""
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise InputError(f"dispatch.sunspec_server.allow_write_from: {entry!r} is not an IP address "
                             "or network") from None
    return tuple(out)


@dataclass
class _Session:
    """The request in force for the current setpoint."""

    id: str
    revision: int
    wanted: Wanted
    submitted_at: float
    open_ended: bool


class SunSpecDerServer:
    """DispatchSource serving the gateway as one SunSpec DER; see the module docstring."""

    def __init__(self, config: SunSpecServerConfig, ratings: DerRatings | None = None, *,
                 meter: Callable[[], tuple[float, float]] | None = None, serial: str = "PSGW-0001",
                 base: int = DEFAULT_BASE, open_horizon_s: float = 900.0, tick_s: float = 0.5,
                 id_clock: Callable[[], float] | None = None, link: LinkHandle | None = None) -> None:
        self.config = config
        self._id_clock = id_clock  # None: the sink's clock (a simulation's)
        self._link = link
        self.host, self.port = parse_host_port(config.listen, "dispatch.sunspec_server.listen")
        self.allowed = parse_allow_list(list(config.allow_write_from))
        self._ratings = ratings  # fixed (tests); None: the gateway's own, from its telemetry
        self._meter = meter
        self.serial, self.open_horizon_s, self.tick_s = serial, open_horizon_s, tick_s
        self.map = layout(base)
        self.addresses = self.map.addresses()
        self.controls = DerControls()
        self.session: _Session | None = None
        self.status: DispatchStatus | None = None
        self._sfs = scale_factors(ratings) if ratings is not None else {}  # fixed again at `start`
        self._sessions = 0
        self._integrated = [0.0, 0.0]
        self._last_sample: tuple[float, float] | None = None
        self._sink: DispatchSink | None = None
        self._server: _Listener | None = None
        self._lock: asyncio.Lock | None = None
        try:
            self._version = metadata.version("powershare-gw")[:16]
        except metadata.PackageNotFoundError:
            self._version = "dev"

    # --- lifecycle ---------------------------------------------------------------
    async def run(self, sink: DispatchSink) -> None:
        """Serve until cancelled; revert timers and open-ended renewals run on each tick.

        Already listening (the service binds first, so a bad address stops start-up
        with a clear error instead of a restart loop) it serves on that socket.
        """
        if self._server is None:
            await self.start(sink)
        try:
            while True:
                await asyncio.sleep(self.tick_s)
                await self.tick()
        finally:
            await self.stop()

    async def start(self, sink: DispatchSink | None = None) -> int:
        """Listen on the configured address only; return the bound port."""
        if sink is not None:
            self._sink = sink
        if self._sink is None:
            raise RuntimeError("SunSpecDerServer.start needs a sink")
        self._sfs = scale_factors(self._ratings_now())
        self._lock = asyncio.Lock()  # made here: a Lock belongs to the loop that serves
        # The whole address space, so every access reaches the action (and every refusal the journal).
        def space() -> list[SimData]:
            return [SimData(0, count=65_536, values=0, datatype=DataType.REGISTERS)]

        devices = [SimDevice(id=self.config.unit_id, simdata=space(), action=self._action),
                   SimDevice(id=0, simdata=space(), action=self._other_unit)]  # pymodbus' fallback id
        self._server = _Listener(self, devices, address=(self.host, self.port))
        try:
            await self._server.serve_forever(background=True)
        except (OSError, RuntimeError) as err:
            self._server = None
            raise InputError(f"dispatch.sunspec_server.listen: cannot listen on {self.config.listen}: {err}") from None
        sockets = getattr(self._server.transport, "sockets", None)
        self.port = sockets[0].getsockname()[1] if sockets else self.port
        log.info("SunSpec DER server on %s:%s, unit %s", self.host, self.port, self.config.unit_id)
        if self._link is not None:
            self._link.good()
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def tick(self) -> None:
        """Time passing: revert functions fire and open-ended requests are renewed."""
        if self._lock is None:
            return
        async with self._lock:
            await self._tick_locked()

    # --- the Modbus hook -----------------------------------------------------------
    async def _action(self, function_code: int, start: int, address: int, count: int,
                      registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
        assert self._lock is not None  # start() made it before listening
        if self._link is not None:
            self._link.good()  # a client is being served: the server's last good data is now
        async with self._lock:
            await self._tick_locked()
            if values is None:
                if not (self.map.base <= address and address + count <= self.map.end()):
                    return ExcCodes.ILLEGAL_ADDRESS
                self._refresh(start, registers)
                return None
            return await self._write(function_code, address, list(values))

    async def _other_unit(self, function_code: int, start: int, address: int, count: int,
                          registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes:
        """Any unit id but ours: a clear exception instead of pymodbus' internal error."""
        if values is not None:
            self._note(_PEER.get() or "unknown", function_code, address, len(values), ExcCodes.GATEWAY_NO_RESPONSE,
                       f"unit id is not this DER's ({self.config.unit_id})")
            _NOTED.set(True)
        return ExcCodes.GATEWAY_NO_RESPONSE

    async def _write(self, function_code: int, address: int, values: list[Any]) -> ExcCodes | None:
        peer = _PEER.get() or "unknown"
        try:
            if not self._allowed(peer):
                raise _Refusal(ExcCodes.ILLEGAL_FUNCTION, f"client {peer} is not in allow_write_from")
            if function_code not in REGISTER_WRITES:
                raise _Refusal(ExcCodes.ILLEGAL_FUNCTION, f"function {function_code}: coils are not implemented")
            at = self.addresses.get(DER_CONTROL_AC, -1)
            ctl = ModelDef.load(DER_CONTROL_AC)
            if not (at + 2 <= address and address + len(values) <= at + ctl.size):
                raise _Refusal(ExcCodes.ILLEGAL_ADDRESS, self._describe_target(address, len(values)))
            try:
                written = self.controls.check_write(address - at, [int(v) for v in values],
                                                    self._ratings_now(), self._sfs[704])
            except WriteRefused as refused:
                code = ExcCodes.ILLEGAL_VALUE if refused.code == "value" else ExcCodes.ILLEGAL_ADDRESS
                raise _Refusal(code, refused.reason) from None
        except _Refusal as refusal:
            self._note(peer, function_code, address, len(values), refusal.code, refusal.reason)
            _NOTED.set(True)
            return refusal.code
        sink = self._require_sink()
        self.controls.apply(written, sink.now())
        # Writing the setpoint again after a refusal asks the core again (an armed revert
        # timer re-submits anyway, because the end moves).
        refused = self.status is not None and self.status.allowed_w() == 0
        retry = refused and bool(self.controls.wset_timer.refreshers & written.keys())
        try:
            await self._reconcile(sink, force=retry)
        except Exception as err:  # the core failing is ours, not the client's: say so, journal it
            log.exception("SunSpec write could not be handed to the core")
            self._note(peer, function_code, address, len(values), ExcCodes.DEVICE_FAILURE, f"core error: {err}")
            _NOTED.set(True)
            return ExcCodes.DEVICE_FAILURE
        return None

    def _describe_target(self, address: int, count: int) -> str:
        for model_id, at in self.addresses.items():
            mdef = ModelDef.load(model_id)
            if at <= address < at + mdef.size:
                if address + count > at + mdef.size:
                    return f"{count} registers at {address} run past model {model_id}"
                names = [p.name for p in mdef.points_in(address - at, count)]
                return f"model {model_id} {', '.join(names)}: read-only or not supported"
        if self.map.base <= address < self.map.end():
            return f"register {address} is the SunSpec header or end model (read-only)"
        return f"register {address} is not in the SunSpec map ({self.map.base}..{self.map.end() - 1})"

    def _note(self, peer: str, function_code: int, address: int | None, count: int | None,
              code: ExcCodes | int, reason: str) -> None:
        name = code.name if isinstance(code, ExcCodes) else str(code)
        payload = {"client": peer, "function": function_code, "register": address, "count": count,
                   "exception": name, "reason": reason}
        log.warning("SunSpec write refused: %s", payload)
        try:
            self._require_sink().note(NOTE_KIND, payload)
        except Exception:  # a journal failure must not take the server down
            log.exception("could not journal a refused SunSpec write")

    def note_foreign_refusal(self, peer: str, function_code: int, exception_code: int, address: int | None) -> None:
        """A write pymodbus refused before the action ran (bad count, unknown unit): journal it too."""
        try:
            code: ExcCodes | int = ExcCodes(exception_code)
        except ValueError:
            code = exception_code
        self._note(peer, function_code, address, None, code, "refused by the Modbus layer")

    def _allowed(self, peer: str) -> bool:
        try:
            ip = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allowed)

    # --- reads -----------------------------------------------------------------------
    def _refresh(self, start: int, registers: list[int]) -> None:
        regs = self._map_registers()
        registers[self.map.base - start:self.map.base - start + len(regs)] = regs

    def _map_registers(self) -> list[int]:
        sink = self._require_sink()
        t, now = sink.telemetry(), sink.now()  # one read model for every model of this read
        self._sample(t)
        r, meter = self._ratings_of(t), self._meter_of(t)
        regs = list(SUNS_MARKER)
        for model_id in self.addresses:
            values = model_values(model_id, t=t, r=r, sfs=self._sfs, controls=self.controls, status=self.status,
                                  meter=meter, unit_id=self.config.unit_id, serial=self.serial,
                                  version=self._version, now=now)
            regs += encode_safely(ModelDef.load(model_id), values)
        return regs + [END_MODEL_ID, 0]

    def _meter_of(self, t: Telemetry) -> tuple[float, float]:
        """The meter given, else the inverter's own meters when the gateway has them, else power integrated here."""
        if self._meter is not None:
            return self._meter()
        if t.inverter_meters_wh is not None:
            return t.inverter_meters_wh
        return self._integrated[0], self._integrated[1]

    def _sample(self, t: Telemetry) -> None:
        """Integrate telemetry power while there is no meter (trapezoid between samples)."""
        if self._meter is not None or t.inverter_meters_wh is not None:
            return
        sample = (t.at, t.power_w)
        if self._last_sample is not None and sample[0] > self._last_sample[0]:
            hours = (sample[0] - self._last_sample[0]) / 3600
            mean = (sample[1] + self._last_sample[1]) / 2
            self._integrated[0 if mean > 0 else 1] += abs(mean) * hours
        self._last_sample = sample

    def _ratings_now(self) -> DerRatings:
        return self._ratings if self._ratings is not None else self._ratings_of(self._require_sink().telemetry())

    def _ratings_of(self, t: Telemetry) -> DerRatings:
        """The fixed ratings given, else the gateway's own as the telemetry says."""
        if self._ratings is not None:
            return self._ratings
        if t.ratings is None:
            raise RuntimeError("the gateway's telemetry carries no DER ratings")
        return t.ratings

    def _require_sink(self) -> DispatchSink:
        if self._sink is None:
            raise RuntimeError("SunSpecDerServer has no sink yet")
        return self._sink

    # --- requests -----------------------------------------------------------------------
    async def _tick_locked(self) -> None:
        sink = self._sink
        if sink is None:
            return
        now = sink.now()
        fired = self.controls.expire(now)
        if "WSet" in fired and self.session is not None:
            self.session = self.status = None  # the core ends the request at its end by itself
        renew = self.session is not None and self.session.open_ended and \
            now >= self.session.submitted_at + self.open_horizon_s / 2
        if fired or renew:
            await self._reconcile(sink, force=renew)
        if self._meter is None:
            self._sample(sink.telemetry())

    async def _reconcile(self, sink: DispatchSink, *, force: bool = False) -> None:
        """Hand the core what the controls ask for, if it differs from the request in force."""
        wanted = self.controls.wanted(self._ratings_now())
        s = self.session
        if wanted is None:
            if s is not None:
                await sink.submit(DispatchCancel(id=s.id, source=SOURCE, received_at=sink.now()))
            self.session = self.status = None
            return
        same = s is not None and (s.wanted.kind, s.wanted.target_w, s.wanted.end) == \
            (wanted.kind, wanted.target_w, wanted.end)
        if same and not force:
            return
        now = sink.now()
        if s is None:
            self._sessions += 1
            stamp = self._id_clock() if self._id_clock is not None else now
            s = _Session(f"{SOURCE}-{int(stamp)}-{self._sessions}", -1, wanted, now, True)
        end = wanted.end if wanted.end is not None else now + self.open_horizon_s
        request = DispatchRequest(id=s.id, source=SOURCE, kind=wanted.kind, target_w=round(wanted.target_w, 1),
                                  start=now, end=max(end, now + 1.0), received_at=now, revision=s.revision + 1)
        self.session = _Session(s.id, request.revision, wanted, now, wanted.end is None)
        answer = await sink.submit(request)
        self.status = DispatchStatus(wanted, answer if isinstance(answer, DispatchAnswer) else None)
        if answer is None or answer.verdict is Verdict.REJECTED:
            log.debug("SunSpec setpoint %s refused by the core: %s", request.id, self.status.text())


class _Refusal(Exception):
    def __init__(self, code: ExcCodes, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class _Connection(ServerRequestHandler):
    """One client connection: makes its peer address visible to the action for each request."""

    def _peer(self) -> str:
        transport = getattr(self, "transport", None)
        name = transport.get_extra_info("peername") if transport is not None else None
        return str(name[0]) if name else "unknown"

    async def handle_request(self) -> None:
        _PEER.set(self._peer())
        _NOTED.set(False)
        await super().handle_request()

    def server_send(self, pdu: Any, addr: Any) -> None:
        if isinstance(pdu, ExceptionResponse) and (pdu.function_code & 0x7F) in WRITE_CODES and not _NOTED.get():
            address = getattr(self.last_pdu, "address", None) if self.last_pdu is not None else None
            self.server.gate.note_foreign_refusal(self._peer(), pdu.function_code & 0x7F, pdu.exception_code,
                                                  address)
        super().server_send(pdu, addr)


class _Listener(ModbusTcpServer):
    """ModbusTcpServer whose connections know their peer (see `_Connection`)."""

    def __init__(self, gate: SunSpecDerServer, devices: list[SimDevice], address: tuple[str, int]) -> None:
        super().__init__(devices, address=address, ignore_missing_devices=False)
        self.gate = gate

    def callback_new_connection(self) -> _Connection:
        return _Connection(self, self.trace_packet, self.trace_pdu, self.trace_connect)


__all__ = ["DerRatings", "SunSpecDerServer", "parse_allow_list"]
