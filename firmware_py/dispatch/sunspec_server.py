"""The gateway's SunSpec DER server: the truck and inverter as one DER on Modbus TCP (docs/dispatch.md).

A local energy manager or utility SCADA reads models 1, 701, 702, 704, 713 (and
the end model) and dispatches by writing 704. Nothing written reaches hardware:
`sunspec_der` turns the controls into what they ask for, and this module hands
every change to the core through `DispatchSink.submit`, so the floor and every
limit apply exactly as for OpenADR.

How writes become requests (choices documented here because clients see them):
- One *session* per continuous setpoint: the first non-zero setpoint opens a
  request `sunspec-<epoch>-<n>` (epoch seconds of `id_clock`: the wall clock in
  `run`, so ids stay unique across restarts); each later change of what is
  asked (WSet, WSetMod, WSetPct, a revert) is the same id at revision + 1, so the
  journal reads as one dispatch that was modified. `WSetEna = 0` (or a zero
  setpoint) sends `DispatchCancel` and closes the session.
- A setpoint is a *standing setting*: open-ended (`end = inf`) in the core, so
  it is followed up to every limit and the floor's envelope ends it, never
  budgeted over a window it does not have. The revert function (`WSetEnaRvrt =
  1`, `WSetRvrtTms > 0`) is a keep-alive, not a window: this server runs it as a
  real DER does (`WSet` takes `WSetRvrt` when no refresh came in time) and then
  revises or cancels the request. A keep-alive that changes nothing asks nothing.
- Standing also means asked again: when the core's telemetry says a new revision
  would now be answered better than the session's refusal or cap (the gateway
  became ready, a fault cleared, the outage or enter-service delay ended, the
  owner revoked an opt-out, a lockout was reset, a limit rose), the server
  re-submits without the client writing again. It looks on every tick, every
  Modbus access, and at once when a gateway step changes what admits dispatch
  (`notice_step`, `standing.StandingWatch`).
- WMaxLimPct (when WMaxLimPctEna = 1) is the site's limit: it goes to the core as
  a `SiteLimit` and caps every source's requests (OpenADR and scheduled ones as
  much as this server's), with its own revert function.
- Stopping (or a restart after a failure) cancels the session and lifts the
  limit: an open-ended request must not outlive the server that stands for it.
- The core's answer never turns a valid write into a Modbus exception: the
  registers keep what was written (the client's intent) and model 701 shows the
  effect: W is the measured power, ThrotSrc has DERATED (core cap or refusal)
  and/or MAX_W (WMaxLimPct), ThrotPct the share of WMaxRtg withheld, InvSt
  THROTTLED while running below the setpoint, and MnAlrmInfo the reason text
  ("refused OPTED_OUT: ...", "capped to 3000 W: ...").
- Refused writes: read-only, unsupported or unknown registers and partial
  multi-register writes -> ILLEGAL_ADDRESS; values out of range -> ILLEGAL_VALUE;
  a client outside `allow_write_from` -> ILLEGAL_FUNCTION; any other unit id than
  the configured one -> GATEWAY_NO_RESPONSE.

Hardening (anyone on the LAN can reach the port):
- Only functions 3, 6 and 16 are served; everything else, and every malformed
  request, gets a well-formed exception (`modbus_frames`). The server frames
  and decodes requests itself rather than through pymodbus' decoder, which
  serves diagnostics, server id, file records and answers what it cannot decode
  with a malformed exception.
- Every refusal (request or connection) goes to one `RefusalLedger`: the first
  of a (client, cause) is journaled and logged at once, the rest are counted
  and summarised once a minute, so a flood costs the journal a bounded number
  of records whatever the packet rate, and every refusal is still counted.
- Connections are capped in total, per client and for clients that can only
  read; idle connections and half-sent requests are closed (`connections`), so
  descriptors are left for the owner API and the rest of the gateway.

The client address: pymodbus' SimDevice `action` hook is not told who asked, so
each `Connection` (`modbus_listener`: a pymodbus request handler whose byte
stream `modbus_frames` splits) hands its requests to `SunSpecDerServer.answer`, which puts the
client in a context variable for the action to read and collects why the
action refused, if it did.

Ratings and energy meters come from the gateway's telemetry (the DER's ratings,
and the inverter's own TotWhInj/TotWhAbs: what bills are paid on). Tests may fix
`ratings` or pass a `meter`; before the inverter has reported any meter the
server integrates telemetry power at each tick and read.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import ipaddress
import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any, NamedTuple

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_py.addresses import parse_host_port
from firmware_py.config import SunSpecServerConfig
from firmware_py.core.controller import StepResult
from firmware_py.core.telemetry import Telemetry
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchRequest,
    SiteLimit,
    Verdict,
)
from firmware_py.dispatch import DispatchSink
from firmware_py.dispatch.connections import (
    REQUEST_TIMEOUT_S,
    Admission,
    ConnectionLimits,
    ConnectionTable,
    Overdue,
    descriptor_budget,
)
from firmware_py.dispatch.modbus_frames import Frame, Refused, decode_request
from firmware_py.dispatch.modbus_listener import Connection, Listener
from firmware_py.dispatch.refusals import (
    FIRST_KIND,
    SUMMARY_INTERVAL_S,
    Cause,
    Refusal,
    RefusalLedger,
)
from firmware_py.dispatch.standing import StandingWatch
from firmware_py.dispatch.sunspec_der import (
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
NOTE_KIND = FIRST_KIND
# Why each exception was sent, when the action did not say (a safety net: every exception is counted).
CAUSE_OF_EXCEPTION = {ExcCodes.ILLEGAL_FUNCTION: Cause.UNSUPPORTED_FUNCTION, ExcCodes.ILLEGAL_ADDRESS: Cause.BAD_ADDRESS,
                      ExcCodes.ILLEGAL_VALUE: Cause.BAD_VALUE, ExcCodes.DEVICE_FAILURE: Cause.CORE_ERROR,
                      ExcCodes.GATEWAY_NO_RESPONSE: Cause.OTHER_UNIT}
REFUSAL_CAUSES = {ExcCodes.ILLEGAL_FUNCTION: Cause.NOT_ALLOWED, ExcCodes.ILLEGAL_ADDRESS: Cause.BAD_ADDRESS,
                  ExcCodes.ILLEGAL_VALUE: Cause.BAD_VALUE}


@dataclass
class _Asking:
    """The request being answered: who asked, and why the action refused it (if it did)."""

    client: str
    cause: Cause | None = None
    reason: str | None = None
    trace: str | None = None

    def refuse(self, cause: Cause, reason: str, trace: str | None = None) -> None:
        self.cause, self.reason, self.trace = cause, reason, trace


_ASKING: contextvars.ContextVar[_Asking | None] = contextvars.ContextVar("sunspec_asking", default=None)


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


class SunSpecDerServer:
    """DispatchSource serving the gateway as one SunSpec DER; see the module docstring."""

    def __init__(self, config: SunSpecServerConfig, ratings: DerRatings | None = None, *,
                 meter: Callable[[], tuple[float, float]] | None = None, serial: str = "PSGW-0001",
                 base: int = DEFAULT_BASE, tick_s: float = 0.5,
                 monotonic: Callable[[], float] = time.monotonic,
                 summary_interval_s: float = SUMMARY_INTERVAL_S,
                 id_clock: Callable[[], float] | None = None, link: LinkHandle | None = None) -> None:
        """`monotonic` times connections and refusal summaries (real time even in the bench's
        simulated time: a peer's idleness is wall-clock); tests pass a number they move.
        `id_clock` stamps session ids (the wall clock in `run`: unique across boots; None: the
        sink's clock, a simulation's); `link` is told the server serves."""
        self.config = config
        self._id_clock = id_clock  # None: the sink's clock (a simulation's)
        self._link = link
        self.host, self.port = parse_host_port(config.listen, "dispatch.sunspec_server.listen")
        self.allowed = parse_allow_list(list(config.allow_write_from))
        self._ratings = ratings  # fixed (tests); None: the gateway's own, from its telemetry
        self._meter = meter
        self.serial, self.tick_s = serial, tick_s
        self.map = layout(base)
        self.addresses = self.map.addresses()
        self.map_end = self.map.end()  # one past the end model (computing it encodes the whole map: once)
        self.controls = DerControls()
        self.session: _Session | None = None
        self.status: DispatchStatus | None = None
        self.site_limit_w: float | None = None  # the limit last handed to the core (None: none)
        self.reasks = 0  # standing settings asked for again without a write
        self._wake: asyncio.Event | None = None
        self._watch = StandingWatch()
        self._sfs = scale_factors(ratings) if ratings is not None else {}  # fixed again at `start`
        self._sessions = 0
        self._integrated = [0.0, 0.0]
        self._last_sample: tuple[float, float] | None = None
        self._sink: DispatchSink | None = None
        self._server: Listener | None = None
        self._lock: asyncio.Lock | None = None
        self.monotonic = monotonic
        self.limits = ConnectionLimits(total=config.max_connections, per_client=config.max_connections_per_client,
                                       idle_timeout_s=config.idle_timeout_s, request_timeout_s=REQUEST_TIMEOUT_S)
        self.connections = ConnectionTable(self.limits)
        self.refusals = RefusalLedger(self._journal, monotonic, interval_s=summary_interval_s)
        self.closed_idle = 0
        try:
            self._version = metadata.version("powershare-gw")[:16]
        except metadata.PackageNotFoundError:
            self._version = "dev"

    # --- lifecycle ---------------------------------------------------------------
    async def run(self, sink: DispatchSink) -> None:
        """Serve until cancelled; revert timers, standing settings asked again, connection
        timeouts and refusal summaries run on each tick (and at once when `notice_step` wakes it).

        Already listening (the service binds first, so a bad address stops start-up
        with a clear error instead of a restart loop) it serves on that socket.
        """
        if self._server is None:
            await self.start(sink)
        assert self._wake is not None
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.tick_s)
                self._wake.clear()
                await self.tick()
        finally:
            await self.stop()

    def notice_step(self, result: StepResult) -> None:
        """A gateway observer: wake the server when a step changed what admits dispatch while its
        setting is not served in full, so it is asked again at once (the gateway became ready, a
        fault or an outage ended, the owner revoked an opt-out, a lockout was reset) rather than at
        the next tick."""
        moved = self._watch.changed(result)
        if self._wake is None or self.session is None or not moved:
            return
        served = self.status is not None and self.status.answer is not None \
            and self.status.answer.verdict is Verdict.ACCEPTED and result.controller.serving_id == self.session.id
        if not served:
            self._wake.set()

    async def start(self, sink: DispatchSink | None = None) -> int:
        """Listen on the configured address only; return the bound port."""
        if sink is not None:
            self._sink = sink
        if self._sink is None:
            raise RuntimeError("SunSpecDerServer.start needs a sink")
        self._sfs = scale_factors(self._ratings_now())
        self._lock = asyncio.Lock()  # made here: a Lock belongs to the loop that serves
        self._wake = asyncio.Event()
        self._fit_descriptor_budget()
        # The whole address space, so every access reaches the action (and every refusal the ledger).
        device = SimDevice(id=self.config.unit_id, action=self._action,
                           simdata=[SimData(0, count=65_536, values=0, datatype=DataType.REGISTERS)])
        self._server = Listener(self, [device], address=(self.host, self.port))
        try:
            await self._server.serve_forever(background=True)
        except (OSError, RuntimeError) as err:
            self._server = None
            why = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise InputError(f"dispatch.sunspec_server.listen: cannot listen on {self.config.listen}: {why}") from None
        sockets = getattr(self._server.transport, "sockets", None)
        self.port = sockets[0].getsockname()[1] if sockets else self.port
        log.info("SunSpec DER server on %s:%s, unit %s (at most %d connections, %d per client)", self.host,
                 self.port, self.config.unit_id, self.limits.total, self.limits.per_client)
        if self._link is not None:
            self._link.up()  # listening, no client served yet: up, with no last good data (null age)
        return self.port

    def _fit_descriptor_budget(self) -> None:
        """Lower the connection cap when the process may not open that many descriptors (say so)."""
        total = descriptor_budget(self.config.max_connections)
        if total < self.config.max_connections:
            log.warning("dispatch.sunspec_server.max_connections: %d lowered to %d: the process may open too few "
                        "files (raise LimitNOFILE)", self.config.max_connections, total)
        self.limits = replace(self.limits, total=total)
        self.connections = ConnectionTable(self.limits)

    async def stop(self) -> None:
        """Close the listener and every connection, withdraw the setting and the limit this server
        stands for, then journal every refusal still only counted."""
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
        await self._withdraw()
        self.refusals.flush()

    async def _withdraw(self) -> None:
        """Cancel the session and lift the site limit: nothing open-ended outlives the server."""
        sink, session = self._sink, self.session
        self.session = self.status = None
        if sink is None:
            return
        try:
            if session is not None:
                await sink.submit(DispatchCancel(id=session.id, source=SOURCE, received_at=sink.now(),
                                                 reason="the DER server stopped"))
            if self.site_limit_w is not None:
                self.site_limit_w = None
                await sink.submit(SiteLimit(sink.now(), SOURCE, None))
        except Exception:  # noqa: BLE001 - stopping must finish; the gateway's own stop makes it safe
            log.exception("SunSpec DER server: could not withdraw its setting at the stop")

    async def tick(self) -> None:
        """Time passing: overdue connections close, refusal summaries are due, revert functions
        fire, a standing setting the core would now serve better is asked for again, and the core
        is told what the registers ask where it holds otherwise (see `_core_behind`)."""
        self._close_overdue()
        self.refusals.tick()
        if self._lock is None:
            return
        async with self._lock:
            await self._tick_locked()

    # --- connections -----------------------------------------------------------------
    def admit(self, connection: Connection) -> bool:
        """Whether a new connection may stay; a refused one is counted (and closed by the caller)."""
        client = connection.client
        verdict = self.connections.admit(connection, client, writer=self._allowed(client), now=self.monotonic())
        if verdict is Admission.ADMITTED:
            return True
        limits = self.limits
        reason = {Admission.SERVER_FULL: f"the server holds its limit of {limits.total} connections",
                  Admission.CLIENT_FULL: f"this client holds its limit of {limits.per_client} connections",
                  Admission.READERS_FULL: f"clients outside allow_write_from hold their limit of "
                                          f"{limits.total - limits.writers_reserved} connections"}[verdict]
        self.refusals.record(Refusal(client, Cause.TOO_MANY_CONNECTIONS, reason))
        return False

    def _close_overdue(self) -> None:
        for connection, why in self.connections.overdue(self.monotonic()):
            assert isinstance(connection, Connection)
            if why is Overdue.STALLED:
                self.refusals.record(Refusal(connection.client, Cause.STALLED_REQUEST,
                                             f"a request unfinished (or replies unread) for "
                                             f"{self.limits.request_timeout_s:.0f} s: connection closed"))
            else:
                self.closed_idle += 1
                log.debug("SunSpec DER server: closed %s's connection, idle for %.0f s", connection.client,
                          self.limits.idle_timeout_s)
            connection.drop()

    def framing_error(self, client: str, reason: str) -> None:
        """A byte stream that is not Modbus TCP: counted; the connection closes."""
        self.refusals.record(Refusal(client, Cause.MALFORMED, f"{reason}: connection closed"))

    # --- requests ------------------------------------------------------------------------
    async def answer(self, frame: Frame, client: str) -> ModbusPDU:
        """The reply to one framed request from `client`; every refusal is counted on the way."""
        request = decode_request(frame.pdu)
        if frame.unit != self.config.unit_id:
            response, refusal = self._refuse_request(
                request, client, ExcCodes.GATEWAY_NO_RESPONSE, Cause.OTHER_UNIT,
                f"unit id {frame.unit} is not this DER's ({self.config.unit_id})")
        elif isinstance(request, Refused):
            response, refusal = self._refuse_request(request, client, request.exception, request.cause,
                                                     request.reason)
        else:
            response, refusal = await self._execute(request, frame.unit, client)
        if refusal is not None:
            self.refusals.record(refusal)
        response.transaction_id, response.dev_id = frame.transaction, frame.unit
        return response

    def _refuse_request(self, request: ModbusPDU | Refused, client: str, code: ExcCodes, cause: Cause,
                        reason: str) -> tuple[ModbusPDU, Refusal]:
        if isinstance(request, Refused):
            function, register, count = request.function, request.address, request.count
        else:
            function, register, count = request.function_code, request.address, request.count
        return (ExceptionResponse(function, code),
                Refusal(client, cause, reason, function, register, count, code.name))

    async def _execute(self, request: ModbusPDU, unit: int, client: str) -> tuple[ModbusPDU, Refusal | None]:
        """Run a served request against the datastore (and so the action), as `client`."""
        if self._server is None:  # stopping: nothing to refuse, nobody to tell
            return ExceptionResponse(request.function_code, ExcCodes.DEVICE_FAILURE), None
        asking = _Asking(client)
        token = _ASKING.set(asking)
        try:
            response = await request.datastore_update(self._server.context, unit)
        except Exception as err:  # noqa: BLE001 - ours, not the client's: a clear exception, counted and logged once
            asking.refuse(Cause.CORE_ERROR, f"server error: {err}", traceback.format_exc())
            response = ExceptionResponse(request.function_code, ExcCodes.DEVICE_FAILURE)
        finally:
            _ASKING.reset(token)
        if not isinstance(response, ExceptionResponse):
            return response, None
        code = ExcCodes(response.exception_code)
        cause = asking.cause or CAUSE_OF_EXCEPTION.get(code, Cause.MALFORMED)
        return response, Refusal(client, cause, asking.reason or "refused by the Modbus layer",
                                 request.function_code, request.address, request.count, code.name, asking.trace)

    def _journal(self, kind: RecordKind, payload: dict[str, Any]) -> None:
        self._require_sink().note(kind, payload)

    # --- the Modbus hook -----------------------------------------------------------
    async def _action(self, function_code: int, start: int, address: int, count: int,
                      registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
        assert self._lock is not None  # start() made it before listening
        if self._link is not None:
            self._link.good()  # a client is being served: the server's last good data is now
        asking = _ASKING.get() or _Asking("unknown")
        async with self._lock:
            t = await self._tick_locked()
            if values is None:
                if not (self.map.base <= address and address + count <= self.map_end):
                    asking.refuse(Cause.BAD_ADDRESS, self._describe_read(address, count))
                    return ExcCodes.ILLEGAL_ADDRESS
                self._refresh(t, start, registers, address, count)
                return None
            return await self._write(asking, address, list(values), t)

    async def _write(self, asking: _Asking, address: int, values: list[Any], t: Telemetry) -> ExcCodes | None:
        try:
            if not self._allowed(asking.client):
                raise _Refusal(ExcCodes.ILLEGAL_FUNCTION, f"client {asking.client} is not in allow_write_from")
            at = self.addresses.get(DER_CONTROL_AC, -1)
            ctl = ModelDef.load(DER_CONTROL_AC)
            if not (at + 2 <= address and address + len(values) <= at + ctl.size):
                raise _Refusal(ExcCodes.ILLEGAL_ADDRESS, self._describe_target(address, len(values)))
            try:
                written = self.controls.check_write(address - at, [int(v) for v in values], self._ratings_of(t),
                                                    self._sfs[704])
            except WriteRefused as refused:
                code = ExcCodes.ILLEGAL_VALUE if refused.code == "value" else ExcCodes.ILLEGAL_ADDRESS
                raise _Refusal(code, refused.reason) from None
        except _Refusal as refusal:
            asking.refuse(REFUSAL_CAUSES[refusal.code], refusal.reason)
            return refusal.code
        sink = self._require_sink()
        saved = self._save()
        self.controls.apply(written, sink.now())
        # Writing the setpoint again after a refusal asks the core again.
        refused = self.status is not None and self.status.allowed_w() == 0
        retry = refused and bool(self.controls.wset_timer.refreshers & written.keys())
        try:
            await self._reconcile(sink, self._ratings_of(t), force=retry)
        except Exception as err:  # noqa: BLE001 - the core failing is ours, not the client's: say so, count it
            self._restore(saved)  # refused whole: the registers and the session stay as they were
            asking.refuse(Cause.CORE_ERROR, f"core error: {err}", traceback.format_exc())
            return ExcCodes.DEVICE_FAILURE
        return None

    def _save(self) -> _Saved:
        """What a write may change here, so a write the core fails on can be undone whole."""
        return _Saved(copy.deepcopy(self.controls), self.session, self.status)

    def _restore(self, saved: _Saved) -> None:
        """Put back what `_save` kept (controls, revert timers, session, status). Not `site_limit_w`:
        it is what the core holds, so a limit the core took before the failure is undone by the
        next reconcile rather than left standing unseen."""
        self.controls, self.session, self.status = saved

    def _describe_read(self, address: int, count: int) -> str:
        if self.map.base <= address < self.map_end:
            return f"{count} registers at {address} run past the SunSpec map (ends at {self.map_end - 1})"
        return f"register {address} is not in the SunSpec map ({self.map.base}..{self.map_end - 1})"

    def _describe_target(self, address: int, count: int) -> str:
        for model_id, at in self.addresses.items():
            mdef = ModelDef.load(model_id)
            if at <= address < at + mdef.size:
                if address + count > at + mdef.size:
                    return f"{count} registers at {address} run past model {model_id}"
                names = [p.name for p in mdef.points_in(address - at, count)]
                return f"model {model_id} {', '.join(names)}: read-only or not supported"
        if self.map.base <= address < self.map_end:
            return f"register {address} is the SunSpec header or end model (read-only)"
        return f"register {address} is not in the SunSpec map ({self.map.base}..{self.map_end - 1})"

    def _allowed(self, peer: str) -> bool:
        try:
            ip = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allowed)

    # --- reads -----------------------------------------------------------------------
    def _refresh(self, t: Telemetry, start: int, registers: list[int], address: int, count: int) -> None:
        """Fill the registers a read of `count` at `address` covers, from one telemetry read (`t`,
        the action's: one read model for every model of this read).

        Only the models the read overlaps are built: a poll of model 701 need not encode the
        other four (reads are open to anyone who can connect, so each costs the loop little).
        """
        now = t.at
        r, meter = self._ratings_of(t), self._meter_of(t)

        def put(at: int, regs: list[int]) -> None:
            registers[at - start:at - start + len(regs)] = regs

        put(self.map.base, list(SUNS_MARKER))
        for model_id, at in self.addresses.items():
            mdef = ModelDef.load(model_id)
            if at < address + count and address < at + mdef.size:
                values = model_values(model_id, t=t, r=r, sfs=self._sfs, controls=self.controls, status=self.status,
                                      meter=meter, unit_id=self.config.unit_id, serial=self.serial,
                                      version=self._version, now=now)
                put(at, encode_safely(mdef, values))
        put(self.map_end - 2, [END_MODEL_ID, 0])

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
    async def _tick_locked(self) -> Telemetry:
        """Expire the controls and ask again what the core would now serve better; the telemetry
        the caller goes on with (one read model per request: it was read three times a write)."""
        sink = self._require_sink()
        now = sink.now()
        self.controls.expire(now)  # a revert changes what is asked: the core is told below
        t = sink.telemetry()
        ratings = self._ratings_of(t)
        reask = self.session is not None and self.session.id in t.improvable
        if reask or self._core_behind(ratings):
            if reask:
                self.reasks += 1
                log.info("SunSpec setpoint %s: what held it back has cleared; asking the core again",
                         self.session.id if self.session else "?")
            await self._reconcile(sink, ratings, force=reask)
            t = sink.telemetry()  # what the core made of it
        if self._meter is None:
            self._sample(t)
        return t

    def _core_behind(self, ratings: DerRatings) -> bool:
        """Whether the core holds other than what the registers ask for at these ratings.

        Compared at every tick, not only when something happens here: a revert that fired while
        the core failed to take its cancel, or a `WMaxRtg` that changed under a percent limit or
        setpoint, leaves the core behind with no write or timer left to tell it."""
        if self.controls.site_limit_w(ratings) != self.site_limit_w:
            return True
        wanted, s = self.controls.wanted(ratings), self.session
        if wanted is None or s is None:
            return (wanted is None) != (s is None)
        return not wanted.asks_as(s.wanted)

    async def _reconcile(self, sink: DispatchSink, ratings: DerRatings, *, force: bool = False) -> None:
        """Hand the core the site limit and what the controls ask for, where they changed."""
        limit = self.controls.site_limit_w(ratings)
        if limit != self.site_limit_w:
            log.info("SunSpec WMaxLimPct: %s for every source's requests",
                     "site limit lifted" if limit is None else f"site limit {limit:.0f} W")
            await sink.submit(SiteLimit(sink.now(), SOURCE, limit))
            self.site_limit_w = limit  # only once the core has it: a failed submit is asked again
        wanted = self.controls.wanted(ratings)
        s = self.session
        if wanted is None:
            if s is not None:
                await sink.submit(DispatchCancel(id=s.id, source=SOURCE, received_at=sink.now()))
            self.session = self.status = None
            return
        same = s is not None and wanted.asks_as(s.wanted)
        if same and not force:
            if s is not None:
                self.session = replace(s, wanted=wanted)  # a keep-alive: the revert deadline moved
            return
        now = sink.now()
        if s is None:
            self._sessions += 1
            stamp = self._id_clock() if self._id_clock is not None else now
            s = _Session(f"{SOURCE}-{int(stamp)}-{self._sessions}", -1, wanted, now)
        # Open-ended: a standing setpoint has no window to budget; the floor's envelope ends it.
        request = DispatchRequest(id=s.id, source=SOURCE, kind=wanted.kind, target_w=round(wanted.target_w, 1),
                                  start=now, end=math.inf, received_at=now, revision=s.revision + 1)
        answer = await sink.submit(request)  # may raise: then the session stays as it was
        self.session = _Session(s.id, request.revision, wanted, now)
        self.status = DispatchStatus(wanted, answer if isinstance(answer, DispatchAnswer) else None, request.id)
        if answer is None or answer.verdict is Verdict.REJECTED:
            log.debug("SunSpec setpoint %s refused by the core: %s", request.id, self.status.text())


class _Saved(NamedTuple):
    """The server state a write changes, as it was before the write."""

    controls: DerControls
    session: _Session | None
    status: DispatchStatus | None


class _Refusal(Exception):
    def __init__(self, code: ExcCodes, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


__all__ = ["DerRatings", "SunSpecDerServer", "parse_allow_list"]
