"""Which simulated aggregator a scenario talks through, and the two protocol ones.

- `scripted` hands requests straight to the gateway's dispatch interface.
- `openadr` runs a real openleadr VTN on loopback and the gateway's own VEN
  (`OpenAdrVen`) against it: each scenario dispatch becomes a LOAD_DISPATCH
  event, the VEN's optIn/optOut is what the VTN hears back.
- `openadr3` runs the bench OpenADR 3 VTN (`sim.vtn3`) on loopback and the
  gateway's own OpenADR 3 VEN (`OpenAdr3Ven`) against it: each scenario
  dispatch becomes a DISPATCH_SETPOINT event (kW), and the answer is the one the
  VEN reports back to the VTN.
- `sunspec` serves the gateway's own SunSpec DER server (built exactly as
  `powershare-gw run` builds it) and dispatches through it with a Modbus TCP
  client acting as a site controller writing model 704.

Two clocks meet here: the bench's is simulated (`bench.t`, seconds from 0,
paused while an aggregator call is awaited), openleadr's is the wall clock. The
OpenADR side maps them with one fixed origin `t0` (the real UTC time at start):
an event at simulated second `s` is sent with dtstart `t0 + s`, and the VEN maps
back with `dt - t0`. Waiting for the VEN is real-time waiting, bounded by
`reply_timeout_s`; simulated time does not move meanwhile, so the answer lands at
the scenario's `at_s` exactly.

The SunSpec side needs no mapping: the DER server reads the gateway clock, and
this module's `step(t)` drives the server's revert timers and the controller's
own schedule (start, keep-alive, end) on the simulated clock.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from firmware_py.sim.vtn import LOAD_DISPATCH, LoopbackVtn
from firmware_py.sim.vtn3 import BenchVtn3
from pymodbus.client import AsyncModbusTcpClient

from firmware_py.assembly import integration
from firmware_py.config import OpenAdr3Config, OpenAdrConfig
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchKind,
    DispatchRequest,
    PriceInterval,
    Verdict,
)
from firmware_py.dispatch import Telemetry
from firmware_py.dispatch.openadr_events import request_ids
from firmware_py.dispatch.sunspec_server import SunSpecDerServer
from firmware_py.errors import InputError
from firmware_py.gateway import Gateway
from firmware_py.inverter.sunspec import DER_CONTROL_AC, ModelDef, WSetEna, WSetMod
from firmware_py.tasks import cancel_all

log = logging.getLogger(__name__)

KINDS = ("scripted", "openadr", "openadr3", "sunspec")


class Aggregator(Protocol):
    """How the scenario's dispatch reaches the gateway (scripted, OpenADR or SunSpec)."""

    async def start(self, gateway: Gateway) -> None: ...

    async def send(self, request: DispatchRequest) -> DispatchAnswer | None: ...

    async def cancel(self, event_id: str) -> None: ...

    async def step(self, t: float) -> None:
        """Called once per bench step after physics: protocol timers that run on the simulated clock."""

    async def stop(self) -> None: ...


class ScriptedAggregator:
    """Hands requests straight to the gateway's dispatch interface."""

    async def start(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def send(self, request: DispatchRequest) -> DispatchAnswer | None:
        return await self.gateway.submit(request)

    async def cancel(self, event_id: str) -> None:
        await self.gateway.submit(DispatchCancel(event_id, "scenario", self.gateway.now()))

    async def step(self, t: float) -> None:
        pass

    async def stop(self) -> None:
        pass

def for_scenario(scenario: Any) -> Aggregator:
    """The aggregator the scenario's `[aggregator] kind` names (checked against what it can carry)."""
    kind = scenario.aggregator.kind
    if kind == "scripted":
        return ScriptedAggregator()
    if kind == "openadr":  # charges refused when the scenario was loaded
        return OpenAdrAggregator()
    if kind == "openadr3":
        return OpenAdr3Aggregator()
    if kind == "sunspec":
        revert_s = scenario.aggregator.revert_s
        return SunSpecAggregator(revert_s=revert_s, refresh_s=revert_s / 3 if revert_s else 0.0)
    raise InputError(f"scenario {scenario.name}: aggregator.kind = {kind!r} is not one of {', '.join(KINDS)}")


async def wait_on(vtn: Any, probe: Any, what: str, timeout_s: float) -> bool:
    """Real-time wait (simulated time is paused), re-checked on every message the VTN takes; False,
    logged, on timeout: the bench goes on and the scenario's checks say what did not happen."""
    try:
        await vtn.wait_for(probe, timeout_s)
        return True
    except asyncio.TimeoutError:
        log.error("bench: gave up waiting %.0f s for %s", timeout_s, what)
        return False


class _Recorder:
    """The gateway as a DispatchSink, remembering what reached it so the aggregator can wait for it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.answers: dict[str, DispatchAnswer | None] = {}
        self.cancelled: set[str] = set()

    async def submit(self, item: Any) -> DispatchAnswer | None:
        answer = await self.gateway.submit(item)
        if isinstance(item, (DispatchRequest, PriceInterval)):
            self.answers[item.id] = answer
        elif isinstance(item, DispatchCancel):
            self.cancelled.add(item.id)
        return answer

    def telemetry(self) -> Telemetry:
        return self.gateway.telemetry()

    def now(self) -> float:
        return self.gateway.now()

    def note(self, kind: str, payload: dict) -> None:
        self.gateway.note(kind, payload)

    def journal_notes(self, kind: Any, back_s: float) -> list[dict]:
        return self.gateway.journal_notes(kind, back_s)

    def journaled_wh(self, request_id: str) -> float:
        return self.gateway.journaled_wh(request_id)


# ---------------------------------------------------------------------- OpenADR


class _VenAggregator:
    """What both OpenADR aggregators share: a bench VTN, the gateway's real VEN as a task, one clock
    origin `t0` the two meet on, and real-time waits while simulated time is paused."""

    vtn: Any = None
    ven: Any = None

    def __init__(self, ven_name: str, reply_timeout_s: float) -> None:
        self.ven_name = ven_name
        self.reply_timeout_s = reply_timeout_s
        self.t0 = datetime.now(timezone.utc)
        self._task: asyncio.Task[None] | None = None

    def to_bench_time(self, at: datetime) -> float:
        return (at - self.t0).total_seconds()

    def _check_ven(self, what: str) -> None:
        """Log, once, a VEN task that ended by itself (a bug: it never raises for a peer's input)."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            error = self._task.exception()
            self._task = None
            log.error("%s stopped: %s", what, error)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None
        if self.vtn is not None:
            await self.vtn.close()

    async def _settle(self, what: str) -> bool:
        """Wait (real time, simulated time paused) for the looks at standing events a gateway step asked
        of the VEN: a re-ask lands at the simulated moment that called for it, not when the wall clock
        lets the VEN's own tick run. False, logged, on timeout, as for answers."""
        if self._task is None or not self.ven.looks.pending:
            return True
        try:
            await asyncio.wait_for(self.ven.looks.settled(), self.reply_timeout_s)
            return True
        except asyncio.TimeoutError:
            log.error("bench: gave up waiting %.0f s for %s", self.reply_timeout_s, what)
            return False

    async def _wait(self, probe: Any, what: str) -> bool:
        assert self.vtn is not None
        return await wait_on(self.vtn, probe, what, self.reply_timeout_s)


class OpenAdrAggregator(_VenAggregator):
    """A real openleadr VTN on 127.0.0.1 dispatching the gateway's real VEN (see the module docstring)."""

    def __init__(self, ven_name: str = "bench-truck", reply_timeout_s: float = 20.0) -> None:
        super().__init__(ven_name, reply_timeout_s)
        self.vtn: LoopbackVtn | None = None
        self._openleadr_level: int | None = None
        self.request_ids: dict[str, str] = {}  # the VEN's request id -> the scenario's dispatch id

    async def start(self, gateway: Gateway) -> None:
        from firmware_py.dispatch.openadr import OpenAdrVen

        self._quiet_openleadr()
        self.sink = _Recorder(gateway)
        self.t0 = datetime.now(timezone.utc) - timedelta(seconds=gateway.now())
        self.vtn = LoopbackVtn(ven_name=self.ven_name, poll_s=0)
        await self.vtn.start()
        config = OpenAdrConfig(enabled=True, vtn_url=self.vtn.url, ven_name=self.ven_name)
        self.ven = OpenAdrVen(config, rating_w=lambda: gateway.policy.max_discharge_w,
                              to_gateway_time=self.to_bench_time)
        gateway.observers.append(self.ven.notice_step)
        self._task = asyncio.create_task(self.ven.run(self.sink), name="bench-openadr-ven")
        await self._wait(lambda: self.vtn.ven_id and self.ven.registered, "the VEN to register with the VTN")

    def at(self, bench_s: float) -> datetime:
        return self.t0 + timedelta(seconds=bench_s)

    async def send(self, request: DispatchRequest) -> DispatchAnswer | None:
        """One LOAD_DISPATCH event (kW) for the request's window; the core's answer once the VTN has the opt."""

        assert self.vtn is not None
        if self.vtn.ven_id is None:
            log.error("bench: OpenADR event %s not sent: the VEN never registered with the VTN", request.id)
            return None
        self.vtn.add_event(LOAD_DISPATCH, self.at(request.start), request.end - request.start,
                           request.target_w / 1000.0, event_id=request.id)
        (rid,) = request_ids(request.id, 1)  # what the VEN names the event's one interval
        self.request_ids[rid] = request.id
        done = await self._wait(lambda: rid in self.sink.answers and self.vtn.opt_for(request.id),
                                f"the answer to OpenADR event {request.id}")
        return self.sink.answers.get(rid) if done else None

    async def cancel(self, event_id: str) -> None:
        assert self.vtn is not None
        if self.vtn.ven_id is None:
            return
        (rid,) = request_ids(event_id, 1)
        self.sink.cancelled.discard(rid)
        self.vtn.cancel_event(event_id)
        await self._wait(lambda: rid in self.sink.cancelled, f"the cancellation of OpenADR event {event_id}")

    async def step(self, t: float) -> None:
        """A look at standing events the last gateway step called for is taken at this simulated time."""
        self._check_ven("OpenADR VEN")
        await self._settle("the VEN to ask again for its standing events")

    async def stop(self) -> None:
        await super().stop()
        if self._openleadr_level is not None:
            logging.getLogger("openleadr").setLevel(self._openleadr_level)

    def _quiet_openleadr(self) -> None:
        """openleadr's client pins its logger at INFO (a line per poll and report): while the bench runs
        those lines are not even made. (What is left, `sim` shows as `run` does: none of openleadr's lines,
        the gateway tells each VTN outage itself.)"""
        logger = logging.getLogger("openleadr")
        self._openleadr_level = logger.level
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


# ---------------------------------------------------------------------- OpenADR 3


class OpenAdr3Aggregator(_VenAggregator):
    """The bench OpenADR 3 VTN on 127.0.0.1 dispatching the gateway's real OpenADR 3 VEN.

    The clocks meet as for OpenADR 2.0b (the module docstring): one fixed origin `t0`.
    The VEN polls as fast as the VTN allows (`poll_s`), with the simulated clock paused
    while the bench waits for its answer, so the answer lands at the scenario's `at_s`."""

    def __init__(self, ven_name: str = "bench-truck", reply_timeout_s: float = 20.0, poll_s: float = 0.2) -> None:
        super().__init__(ven_name, reply_timeout_s)
        self.poll_s = poll_s
        self.vtn: BenchVtn3 | None = None
        self.program_id = ""

    async def start(self, gateway: Gateway) -> None:
        from firmware_py.dispatch.openadr3 import OpenAdr3Ven

        self.sink = _Recorder(gateway)
        self.t0 = datetime.now(timezone.utc) - timedelta(seconds=gateway.now())
        self.vtn = BenchVtn3(client_id=self.ven_name, secret="bench-secret")
        await self.vtn.start()
        self.program_id = self.vtn.add_program("bench-peak")
        config = OpenAdr3Config(enabled=True, vtn_url=self.vtn.url, client_id=self.ven_name,
                                ven_name=self.ven_name, poll_interval_s=self.poll_s)
        self.ven = OpenAdr3Ven(config, rating_w=lambda: gateway.policy.max_discharge_w,
                               levels_pct=gateway.policy.simple_levels_pct, to_gateway_time=self.to_bench_time,
                               secret=self.vtn.secret)
        gateway.observers.append(self.ven.notice_step)
        self._task = asyncio.create_task(self.ven.run(self.sink), name="bench-openadr3-ven")
        await self._wait(lambda: self.vtn.ven_id and self.ven.polls, "the VEN to register with the VTN")

    async def send(self, request: DispatchRequest) -> DispatchAnswer | None:
        """One DISPATCH_SETPOINT event (kW) for the request's window; the core's answer once the VTN has it."""
        assert self.vtn is not None
        watts = request.target_w if request.kind is DispatchKind.DISCHARGE else \
            -request.target_w if request.kind is DispatchKind.CHARGE else 0.0
        self.vtn.add_event(self.program_id, "DISPATCH_SETPOINT", self.t0 + timedelta(seconds=request.start),
                           request.end - request.start, watts / 1000.0, event_id=request.id, units="KW",
                           report_every=-1)
        self.ven.wake()
        done = await self._wait(lambda: request.id in self.sink.answers and self.vtn.answers_for(request.id),
                                f"the answer to OpenADR 3 event {request.id}")
        return self.sink.answers.get(request.id) if done else None

    async def cancel(self, event_id: str) -> None:
        assert self.vtn is not None
        if event_id not in self.vtn.events:
            return
        self.sink.cancelled.discard(event_id)
        self.vtn.delete_event(event_id)
        self.ven.wake()
        await self._wait(lambda: event_id in self.sink.cancelled, f"the cancellation of OpenADR 3 event {event_id}")

    async def step(self, t: float) -> None:
        """A look at standing events the last gateway step called for is taken, and a report that fell due
        reaches the VTN, at its simulated time (the clock waits for both)."""
        self._check_ven("OpenADR 3 VEN")
        await self._settle("the VEN to ask again for its standing events")
        if self._task is not None and (t >= self.ven.next_report_at or self.ven.pending_reports):
            self.ven.wake()
            await self._wait(lambda: t < self.ven.next_report_at and not self.ven.pending_reports,
                             "the VEN's reports to reach the VTN")


# ---------------------------------------------------------------------- SunSpec

CTL = ModelDef.load(DER_CONTROL_AC)
WSET_ENA, WSET_MOD_WATTS = WSetEna.ENABLED, WSetMod.WATTS


@dataclass
class _Setpoint:
    """One scenario dispatch as the site controller carries it out."""

    request: DispatchRequest
    started: bool = False
    ended: bool = False
    refreshed_at: float = 0.0
    answer: DispatchAnswer | None = None
    session_id: str | None = None


class SunSpecAggregator:
    """A site controller writing model 704 of the gateway's SunSpec DER server over Modbus TCP.

    At the request's start it writes WSetEna = 1, WSetMod = WATTS, WSet and an
    armed revert timer (`revert_s`); it re-writes WSetRvrtTms every `refresh_s`
    of simulated time, as a controller's keep-alive, so the timer never fires
    while the event runs; at the end it writes WSetEna = 0. With `revert_s = 0`
    the setpoint is written without the revert function: an open-ended standing
    setting, with no keep-alive.

    The DER server names its requests `sunspec-<epoch>-<n>`: `request_ids`
    maps each to the scenario's dispatch id, and `answers` holds the core's
    answer to each dispatch's first write (keyed by the scenario id).
    """

    def __init__(self, revert_s: int = 60, refresh_s: float = 20.0, unit_id: int = 1) -> None:
        if revert_s and not 0 < refresh_s < revert_s:
            raise ValueError("the keep-alive must come before the revert timer fires")
        self.revert_s, self.refresh_s, self.unit_id = revert_s, refresh_s, unit_id
        self.setpoints: list[_Setpoint] = []
        self.request_ids: dict[str, str] = {}
        self.answers: dict[str, DispatchAnswer | None] = {}
        self.server: SunSpecDerServer | None = None
        self.client: AsyncModbusTcpClient | None = None
        self.sfs: dict[str, int | None] = {}

    async def start(self, gateway: Gateway) -> None:
        cfg = gateway.config.dispatch
        served = replace(cfg, sunspec_server=replace(cfg.sunspec_server, enabled=True, listen="127.0.0.1:0",
                                                     unit_id=self.unit_id, allow_write_from=["127.0.0.1"]))
        server = integration("dispatch.sunspec_server", replace(gateway.config, dispatch=served), gateway)
        assert isinstance(server, SunSpecDerServer)
        self.server = server
        self.gateway = gateway
        port = await self.server.start(gateway)
        self.client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
        if not await self.client.connect():
            raise RuntimeError(f"bench: cannot connect to the SunSpec DER server on 127.0.0.1:{port}")
        reply = await self.client.read_holding_registers(self.server.addresses[704], count=CTL.size,
                                                         device_id=self.unit_id)
        raw = CTL.decode(reply.registers, scaled=False)
        self.sfs = {name: raw[name] for name, p in CTL.points.items() if p.type == "sunssf"}

    async def send(self, request: DispatchRequest) -> DispatchAnswer | None:
        """Schedule the setpoint; if its start has come, write it now and return the core's answer."""
        setpoint = _Setpoint(request)
        self.setpoints.append(setpoint)
        self.answers[request.id] = None
        if self.gateway.now() + 1e-9 >= request.start:
            await self._begin(setpoint)
        return setpoint.answer

    async def cancel(self, event_id: str) -> None:
        for setpoint in self.setpoints:
            if setpoint.request.id == event_id and not setpoint.ended:
                if setpoint.started:
                    await self._write(WSetEna=0)
                setpoint.ended = True

    async def step(self, t: float) -> None:
        assert self.server is not None
        await self.server.tick()
        for setpoint in self.setpoints:
            if setpoint.ended:
                continue
            if t + 1e-9 >= setpoint.request.end:
                if setpoint.started:
                    await self._write(WSetEna=0)
                setpoint.ended = True
            elif not setpoint.started and t + 1e-9 >= setpoint.request.start:
                await self._begin(setpoint)
            elif setpoint.started and self.revert_s and t >= setpoint.refreshed_at + self.refresh_s:
                await self._write(WSetRvrtTms=self.revert_s)
                setpoint.refreshed_at = t
                self._note_session(setpoint)

    async def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            await self.server.stop()

    async def _begin(self, setpoint: _Setpoint) -> None:
        r = setpoint.request
        watts = round(r.target_w if r.kind is DispatchKind.DISCHARGE else -r.target_w)
        armed = WSET_ENA if self.revert_s else WSetEna.DISABLED
        await self._write(WSetEna=WSET_ENA, WSetMod=WSET_MOD_WATTS, WSet=watts, WSetRvrt=0, WSetPct=0,
                          WSetPctRvrt=0, WSetEnaRvrt=armed, WSetRvrtTms=self.revert_s)
        setpoint.started, setpoint.refreshed_at = True, self.gateway.now()
        assert self.server is not None
        status = self.server.status
        setpoint.answer = status.answer if status is not None else DispatchAnswer(
            r.id, self.gateway.now(), Verdict.REJECTED, detail="the DER server sent no request")
        self.answers[r.id] = setpoint.answer
        self._note_session(setpoint)

    def _note_session(self, setpoint: _Setpoint) -> None:
        """Remember which DER-server request carries this dispatch (a revert or refusal may open another)."""
        session = self.server.session if self.server is not None else None
        if session is not None and session.id != setpoint.session_id:
            setpoint.session_id = session.id
            self.request_ids[session.id] = setpoint.request.id

    async def _write(self, **values: Any) -> None:
        """Contiguous 704 points in one write, in engineering units scaled by the server's own factors."""
        assert self.client is not None and self.server is not None
        points = sorted((CTL.point(name) for name in values), key=lambda p: p.offset)
        regs: list[int] = []
        for p in points:
            if p.offset != points[0].offset + len(regs):
                raise ValueError(f"704 points written together must be contiguous: {list(values)}")
            regs += CTL.encode_point(p.name, values[p.name], self.sfs)
        reply = await self.client.write_registers(self.server.addresses[704] + points[0].offset, regs,
                                                  device_id=self.unit_id)
        if reply.isError():
            log.error("bench: the DER server refused the write of %s: %s", values, reply)
