"""The I/O of commissioning: gathering the observations `judgement` decides on.

What is checked is what `run` would use: the configuration's CAN bus (opened as
`run` opens it, but passing every id, for the observation alone) and the gateway's
BMS reader, then the gateway's own assembly (`assembly.assemble`): its SunSpec
client, its core (the test discharge is a dispatch request like any aggregator's,
so the floor and every limit apply) and its integrations. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import can

from firmware_py.addresses import parse_host_port
from firmware_py.assembly import INTEGRATIONS, Assembly, section
from firmware_py.bms.bus import open_bus
from firmware_py.bms.reader import BmsReader
from firmware_py.commissioning.judgement import (
    EXTENDED_ID,
    LATE_S,
    NO_ANSWER,
    CanObservation,
    InverterObservation,
    MessageSpec,
    Reach,
    Sample,
    SignObservation,
    Timing,
)
from firmware_py.config import Config, InverterConfig
from firmware_py.core.types import (
    DispatchCancel,
    DispatchKind,
    DispatchRequest,
    Mode,
    Verdict,
    describe,
)
from firmware_py.errors import InputError
from firmware_py.inverter.client import InverterClient, LinkError, ModbusErrorCause
from firmware_py.quoting import printable
from firmware_py.service import Service
from firmware_py.statements.figures import COMMISSIONING_SOURCE
from firmware_py.tasks import unless_stopped

SOURCE = COMMISSIONING_SOURCE  # statements list its energy and never credit it
"""The source of the test discharge's request, in the journal and the logs."""
RECV_S = 0.05
FOREIGN_IDS_KEPT = 32
BASELINE_S = 1.0
"""How long the BMS current is sampled before the test discharge starts (its baseline)."""
SAMPLE_S = 0.1
SETTLE_S = 5.0
"""After the test: how long the inverter may take to read 0 W again."""
DISPATCH_TIMEOUT_S = 15.0


# ---------------------------------------------------------------------------------------------- CAN

def message_specs(reader: BmsReader) -> list[MessageSpec]:
    """Every message of the DBC that has a period (the BMS messages commissioning expects to see)."""
    specs = []
    for message in reader.db.messages:
        if not message.cycle_time:
            continue
        pages = {page for signal in message.signals for page in (signal.multiplexer_ids or ())}
        specs.append(MessageSpec(message.name, message.frame_id, message.cycle_time / 1000.0, max(1, len(pages))))
    return sorted(specs, key=lambda s: s.frame_id)


def open_unfiltered(config: Config) -> can.BusABC:
    """The configuration's CAN bus as `run` opens it (interface, channel, bitrate), but passing every id.

    The gateway's own bus passes only the BMS ids (filters in the driver, the kernel or
    the CAN server), so on it "no traffic" and "traffic, but not what the DBC describes"
    would look the same. Opened before the gateway is assembled, and closed after the
    window, so an adapter that takes one user at a time works too.
    """
    return open_bus(config.can.interface, config.can.channel, blame=f"{config.source}: can",
                    bitrate=config.can.bitrate)


def observe_can(bus: can.BusABC, reader: BmsReader, window_s: float, *, where: str, usable_capacity_wh: float,
                clock: Callable[[], float] = time.monotonic, stop: threading.Event | None = None) -> CanObservation:
    """Everything on `bus` (unfiltered: `open_unfiltered`) for `window_s`, fed to `reader`
    (blocking: run it in a thread)."""
    specs = {s.frame_id: s for s in message_specs(reader)}
    muxes = {fid: _multiplexer(reader, fid) for fid, s in specs.items() if s.pages > 1}
    by_id: dict[int, Timing] = {}
    by_page: dict[tuple[int, int], Timing] = {}
    accepted: Counter[int] = Counter()
    refused: dict[int, Counter[str]] = {}
    foreign: set[int] = set()
    frames = 0
    lost = ""
    last_at = clock()
    deadline = last_at + window_s
    while (left := deadline - clock()) > 0 and not (stop is not None and stop.is_set()):
        try:
            msg = bus.recv(timeout=min(RECV_S, left))
        except Exception as err:  # noqa: BLE001 - an adapter unplugged, a CAN server gone: each driver its own error
            lost = (f"{where}: receiving failed {window_s - left:.1f} s into the window, after {frames} frame(s): "
                    f"{err or type(err).__name__}")
            break
        if msg is None or msg.is_error_frame:
            continue
        frames += 1
        now, fid = clock(), msg.arbitration_id
        if fid not in specs or msg.is_extended_id:
            # A 29-bit id keeps its flag (0x132 as 29-bit is not the DBC's 0x132), and one with a DBC id's
            # number is kept past the limit: it is the finding when the BMS's ids arrive as 29-bit frames.
            key = fid | EXTENDED_ID if msg.is_extended_id else fid
            if len(foreign) < FOREIGN_IDS_KEPT or (msg.is_extended_id and fid in specs):
                foreign.add(key)
            continue
        last_at = now
        by_id[fid] = by_id[fid].seen(now) if fid in by_id else Timing(1, now, now)
        if (page := _page(muxes.get(fid), msg.data)) is not None:
            key = (fid, page)
            by_page[key] = by_page[key].seen(now) if key in by_page else Timing(1, now, now)
        before_ok, before_drops = reader.accepted, Counter(reader.dropped)
        reader.on_message(msg, now)
        if reader.accepted != before_ok:
            accepted[fid] += 1
        else:
            refused.setdefault(fid, Counter()).update(reader.dropped - before_drops)
    # As of the window's end (or the stop), not its last BMS frame: a BMS that fell silent part-way through
    # the window has its fields stale here, as the gateway would see them (not how late its own last look came),
    # less the lateness the message checks allow (`LATE_S`): one 10 ms frame held up 30 ms by a loaded gateway's
    # scheduling as the window closed failed a healthy bus's values, judged at that one instant.
    ended_at = min(clock(), deadline)
    snapshot = reader.snapshot(ended_at - LATE_S)
    values = {name: getattr(snapshot, name) for name in reader.fields}
    return CanObservation(where=where, dbc=reader.db_path.name, window_s=window_s, frames=frames,
                          foreign_ids=tuple(sorted(foreign)), by_id=by_id, by_page=by_page, accepted=dict(accepted),
                          refused={fid: dict(c) for fid, c in refused.items()}, last_refusal=reader.last_drop,
                          values=values, stale=snapshot.stale, mapped=reader.fields,
                          usable_capacity_wh=usable_capacity_wh, open_error=lost, ended_at=ended_at)


def _multiplexer(reader: BmsReader, frame_id: int) -> tuple[Any, str] | None:
    message = reader.db.get_message_by_frame_id(frame_id)
    names = [s.name for s in message.signals if s.is_multiplexer]
    return (message, names[0]) if names else None


def _page(mux: tuple[Any, str] | None, data: bytes | bytearray) -> int | None:
    """The multiplexer page a frame carries (None: not multiplexed, or undecodable)."""
    if mux is None:
        return None
    message, name = mux
    try:
        return int(message.decode(bytes(data), decode_choices=False)[name])
    except Exception:  # noqa: BLE001 - cantools raises several types for a frame that does not fit
        return None


# ---------------------------------------------------------------------------------------------- inverter

async def probe_inverter(client: InverterClient, settings: InverterConfig) -> InverterObservation:
    """Discover the inverter, read its state, then write the command block with the revert armed
    and WSet = 0 (the gateway's safe stop) and read it back."""
    base = _inverter_basics(settings)
    try:
        disc = await client.connect()
    except LinkError as err:
        return await diagnose_link_failure(settings, err, client.marker_at)
    status = await client.read_status(setpoint=True)
    found = dict(base=disc.base, models=dict(disc.models), common=dict(disc.common), ratings=dict(disc.ratings))
    if not status.comms_ok:
        return InverterObservation(**base, **found, status_error=status.error or "no answer")
    armed = await client.safe_stop()
    controls: dict[str, Any] = {}
    if armed:
        with contextlib.suppress(LinkError):
            controls = await client.read_controls()
    return InverterObservation(
        **base, **found, inv_state=int(status.inv_state), measured_w=status.measured_w,
        grid_connected=status.grid_connected, grid_outage=status.grid_outage, alarms=status.alarms,
        revert_ok=armed, revert_error="" if armed else (client.last_error or "not written"), controls=controls)


def _inverter_basics(settings: InverterConfig) -> dict[str, Any]:
    return dict(where=where_of(settings), transport=settings.transport, unit_id=settings.unit_id,
                revert_timeout_s=settings.revert_timeout_s, timeout_s=settings.timeout_s)


def link_failure(settings: InverterConfig, err: LinkError, marker_at: int | None,
                 not_modbus: str = "") -> InverterObservation:
    """A discovery that failed, as `judgement.link_detail` and `link_advice` diagnose it: commission's
    inverter step and `inverter probe` tell the same causes apart (address, unit id, not SunSpec, model chain)."""
    return InverterObservation(**_inverter_basics(settings), error=str(err),
                               error_kind=err.kind.value if err.kind else "", marker_at=marker_at,
                               not_modbus=not_modbus)


NOT_MODBUS_KINDS = frozenset({ModbusErrorCause.TIMEOUT, ModbusErrorCause.DISCONNECTED, ModbusErrorCause.TRANSPORT})
"""The failures pymodbus gives alike for a silent Modbus device and a peer that is not Modbus at all."""
QUOTED_BYTES = 32
"""How much of a non-Modbus answer the diagnosis quotes."""
ECHO_BYTES = 6
"""A reply this long that repeats the request is an echo: the request's length field (6) stands where a read's
reply has 7 (a byte count and the registers follow the function code), so no Modbus device answers that."""


async def diagnose_link_failure(settings: InverterConfig, err: LinkError, marker_at: int | None) -> InverterObservation:
    """`link_failure`, after asking the peer itself when pymodbus cannot tell a silent unit id from a peer
    that is not Modbus TCP (an inverter's web port closes on, or answers HTML to, a Modbus request)."""
    not_modbus = ""
    if settings.transport == "tcp" and marker_at is None and err.kind in NOT_MODBUS_KINDS:
        not_modbus = await not_modbus_tcp(settings.host, settings.port, settings.unit_id, settings.timeout_s)
    return link_failure(settings, err, marker_at, not_modbus)


async def not_modbus_tcp(host: str, port: int, unit_id: int, timeout_s: float) -> str:
    """How the peer at host:port shows it is not Modbus TCP ("it closed the connection", "it answered `...`"),
    or "" when it may be: it answered a Modbus TCP frame, stayed silent, or could not be reached.

    One raw connection, one read of the 'SunS' marker's registers (function 3, 40000+2). A peer still silent
    after `timeout_s` gets our end of the stream closed and `timeout_s` more: a line-based server (HTTP) answers
    only then. Closing after that is no evidence (a Modbus device may close a half-closed link); bytes that are
    not a Modbus TCP frame are."""
    tid = 0x5053
    request = tid.to_bytes(2, "big") + bytes([0, 0, 0, 6, unit_id & 0xFF, 3]) + (40000).to_bytes(2, "big") + b"\0\2"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s + 1.0)
    except (OSError, asyncio.TimeoutError):
        return ""
    try:
        writer.write(request)
        try:
            await writer.drain()
        except OSError:
            return "it closed the connection"
        for half_closed in (False, True):
            try:
                data = await asyncio.wait_for(reader.read(256), timeout_s)
            except asyncio.TimeoutError:
                if half_closed or not writer.can_write_eof():
                    return ""
                with contextlib.suppress(OSError):
                    writer.write_eof()
                continue
            except OSError:  # reset
                return "" if half_closed else "it closed the connection"
            if not data:
                return "" if half_closed else "it closed the connection"
            if len(data) >= ECHO_BYTES and request.startswith(data):
                return "it sent back the request it was sent, as an echo or loopback service does"
            if _modbus_tcp_frame(data, tid):
                return ""
            return f"it answered `{_quoted(data)}`"
        return ""
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), timeout_s)


def _modbus_tcp_frame(data: bytes, tid: int) -> bool:
    """The start of a Modbus TCP reply to our request: our transaction id, protocol id 0, a sane length."""
    if len(data) < 7:  # too short to tell: a device writing its reply in pieces
        return data == (tid.to_bytes(2, "big") + b"\0\0\0")[:len(data)]
    length = int.from_bytes(data[4:6], "big")
    return data[:2] == tid.to_bytes(2, "big") and data[2:4] == b"\0\0" and 2 <= length <= 254


def _quoted(data: bytes) -> str:
    """A short printable prefix of what the peer answered, control characters escaped."""
    text = printable(data[:QUOTED_BYTES].decode("latin-1"))
    return text + ("..." if len(data) > QUOTED_BYTES else "")


def where_of(s: InverterConfig) -> str:
    """The inverter's address as the client names it in its messages."""
    return f"RTU {s.serial_port} unit {s.unit_id}" if s.transport == "rtu" else f"{s.host}:{s.port} unit {s.unit_id}"


# ---------------------------------------------------------------------------------------------- sign test

async def sign_test(service: Service, target_w: float, seconds: float, stop: asyncio.Event) -> SignObservation:
    """A discharge of `target_w` for `seconds`, asked of the core like any aggregator's request.

    The service must be started. The request ends itself after `seconds` (the core
    ends its window); whatever happens, it is cancelled if still in force and the
    inverter is told WSet = 0 and read back before this returns.
    """
    gateway = service.gateway
    base = dict(target_w=target_w, seconds=seconds)
    if not await service.ready(stop):
        return SignObservation(**base, not_ready=gateway.controller.reason, interrupted=stop.is_set())
    before = await _samples(service, BASELINE_S, stop)
    if stop.is_set():  # stopped during the baseline: nothing is asked of the core after a stop
        return SignObservation(**base, before=tuple(before), interrupted=True)
    now = gateway.now()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    request = DispatchRequest(id=f"commission-{stamp}", source=SOURCE, kind=DispatchKind.DISCHARGE,
                              target_w=target_w, start=now, end=now + seconds, received_at=now)
    answer = None
    during: list[Sample] = []
    reason = ""
    try:
        answer = await gateway.submit(request)
        if answer is not None and answer.verdict is not Verdict.REJECTED:
            await _samples(service, seconds / 2, stop)
            during = await _samples(service, max(0.0, request.end - gateway.now()), stop, serving=request.id)
        reason = gateway.controller.reason
    finally:
        stopped, after_w, detail = await _back_to_zero(service, request)
    words = describe(answer) if answer is not None else NO_ANSWER
    refusal = answer.reason.value if answer is not None and answer.reason is not None \
        and answer.verdict is Verdict.REJECTED else ""
    voltage = gateway.controller.bms.pack_voltage_v if gateway.controller.bms is not None else None
    return SignObservation(**base, answer=words, refusal=refusal, before=tuple(before), during=tuple(during),
                           pack_voltage_v=voltage, reason=reason, interrupted=stop.is_set(), stopped=stopped, after_w=after_w,
                           stop_detail=detail)


async def _samples(service: Service, seconds: float, stop: asyncio.Event,
                   serving: str | None = None) -> list[Sample]:
    """What the running gateway holds every SAMPLE_S for `seconds` (sooner when `stop` is set); with
    `serving`, each look notes whether the core was discharging for that request (`Sample.cut`)."""
    gateway, out = service.gateway, []
    end = gateway.now() + seconds
    while gateway.now() < end and not stop.is_set():
        c = gateway.controller
        held = serving is None or (c.mode is Mode.DISCHARGE and c.serving_id == serving)
        out.append(Sample(gateway.now(), c.setpoint_w, c.inverter.measured_w if c.inverter else None,
                          c.bms.pack_current_a if c.bms else None, "" if held else f"{c.mode.value}: {c.reason}"))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), min(SAMPLE_S, max(0.0, end - gateway.now())))
    return out


async def _back_to_zero(service: Service, request: DispatchRequest) -> tuple[bool, float | None, str]:
    """End the test: cancel the request if still in force, WSet = 0 read back, the inverter measuring ~0 W."""
    gateway = service.gateway
    booked = gateway.controller.book.find(request.id)
    if booked is not None and booked.accepted and not booked.ended:
        await gateway.submit(DispatchCancel(request.id, SOURCE, gateway.now(), reason="commissioning: test over"))
    stopped = await gateway.inverter.safe_stop()
    detail = "WSet = 0 written and read back" if stopped else f"WSet = 0 not confirmed: {gateway.inverter.last_error}"
    after_w = None
    deadline = gateway.now() + SETTLE_S
    while gateway.now() < deadline:
        status = await gateway.poll_inverter()
        after_w = status.measured_w if status.comms_ok else None
        if after_w is not None and abs(after_w) < 1.0:
            break
        await asyncio.sleep(SAMPLE_S)
    return stopped, after_w, detail


# ---------------------------------------------------------------------------------------------- dispatch

async def probe_dispatch(assembly: Assembly, timeout_s: float = DISPATCH_TIMEOUT_S,
                         stop: asyncio.Event | None = None) -> list[Reach]:
    """Each enabled aggregator interface: the VTN registers this VEN; the SunSpec server listens and serves.

    Each probe may wait `timeout_s`: when `stop` is set meanwhile (Ctrl-C), the probe is cancelled and
    the interfaces not yet checked are not tried; the caller tells an interrupted step by `stop`."""
    reaches = []
    for name in INTEGRATIONS:
        if not name.startswith("dispatch.") or not section(assembly.config, name).enabled:
            continue
        if stop is not None and stop.is_set():
            break
        probe = DISPATCH_PROBES.get(name)
        if probe is None:
            reaches.append(Reach(name, "", None, "not checked by this version of commission"))
            continue
        try:
            reach = await _unless_stopped(asyncio.wait_for(probe(assembly, name), timeout_s), stop)
        except asyncio.TimeoutError:
            reach = Reach(name, _target(assembly, name), False, f"no outcome within {timeout_s:g} s")
        if reach is None:  # stopped
            break
        reaches.append(reach)
    return reaches


async def _unless_stopped(probe: Awaitable[Reach], stop: asyncio.Event | None) -> Reach | None:
    """The probe's outcome, or None as soon as `stop` is set (the probe then cancelled and ended)."""
    if stop is None:
        return await probe
    task = await unless_stopped(probe, stop)
    return None if task.cancelled() else task.result()


def _target(assembly: Assembly, name: str) -> str:
    settings = section(assembly.config, name)
    return getattr(settings, "vtn_url", "") or getattr(settings, "listen", "")


async def _openadr(assembly: Assembly, name: str) -> Reach:
    ven = assembly.integrations[name]
    settings = section(assembly.config, name)
    problem = await ven.probe_registration()
    if problem is None:
        return Reach(name, settings.vtn_url, True, f"the VTN registered VEN {settings.ven_name!r}")
    return Reach(name, settings.vtn_url, False, problem)


async def _sunspec_server(assembly: Assembly, name: str) -> Reach:
    """Start the gateway's DER server where configured, then discover it as an aggregator would."""
    server, settings = assembly.integrations[name], section(assembly.config, name)
    try:
        port = await server.start(assembly.gateway)
    except InputError as err:
        return Reach(name, settings.listen, False, "; ".join(err.problems))
    host, _ = parse_host_port(settings.listen, f"{name}.listen")
    local = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    client = InverterClient(InverterConfig(host=local, port=port, unit_id=settings.unit_id), time.monotonic)
    try:
        disc = await client.connect()
    except LinkError as err:
        return Reach(name, settings.listen, False, f"listening, but a SunSpec client there failed: {err}")
    finally:
        await client.close()
        await server.stop()
    models = ", ".join(str(m) for m in sorted(disc.models))
    return Reach(name, settings.listen, True, f"listening on {local}:{port}, unit {settings.unit_id}: "
                 f"a SunSpec client discovers models {models}")


STARTED_BY_DISPATCH_STEP = frozenset({"dispatch.sunspec_server"})
"""Interfaces whose listener the dispatch step starts for real (and reports on)."""


def taken_addresses(config: Config) -> list[tuple[str, str, str]]:
    """Each enabled interface's listen address another program already holds, as (key, address, why):
    `run` would exit 2 on it, so each is bound a moment here as `run` binds it (address reuse on, and IPv6
    sockets IPv6 only, as asyncio's servers have them). Port 0 (any free port) cannot be taken."""
    taken = []
    for name, kind in INTEGRATIONS.items():
        settings = section(config, name)
        if not kind.listen or not settings.enabled or name in STARTED_BY_DISPATCH_STEP:
            continue
        key, address = f"{name}.{kind.listen}", getattr(settings, kind.listen)
        if not address:  # optional (the OpenADR 3 callback: polling only)
            continue
        host, port = parse_host_port(address, key)
        why = _bind_refused(host, port) if port else None
        if why is not None:
            taken.append((key, address, why))
    return taken


def _bind_refused(host: str, port: int) -> str | None:
    """Why binding every address `host` stands for at `port` fails, or None when it can be bound."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return str(err)
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio's servers: "[::]" beside another's 0.0.0.0 is free
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as err:
                return err.strerror or str(err)
    return None


DISPATCH_PROBES = {"dispatch.openadr": _openadr, "dispatch.openadr3": _openadr,
                   "dispatch.sunspec_server": _sunspec_server}

