"""The gateway's SunSpec DER server: a real pymodbus server, real clients (pysunspec2's and pymodbus').

The core is stood in for by `ScriptedSink`, which records every item it is
handed and answers by a scripted policy (the core has its own tests); its
clock is a plain number the tests move, so revert timers run without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pymodbus.client import AsyncModbusTcpClient, ModbusTcpClient
from core_builders import Run, ready
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from firmware_py.config import SunSpecServerConfig
from firmware_py.core.answers import invalid_reason
from firmware_py.core.policy import Policy
from firmware_py.core.telemetry import telemetry
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchKind,
    DispatchRequest,
    InverterStatus,
    Mode,
    OwnerSettings,
    ReasonCode,
    SiteLimit,
    Verdict,
)
from firmware_py.dispatch import Telemetry
from firmware_py.dispatch.refusals import Cause
from firmware_py.dispatch.sunspec_der import CONTROL_DEFAULTS, DispatchStatus, Wanted, _measure
from firmware_py.dispatch.sunspec_server import NOTE_KIND, DerRatings, SunSpecDerServer
from firmware_py.errors import InputError
from firmware_py.inverter.sunspec import ModelDef
from firmware_py.tasks import cancel_all

RATINGS = DerRatings(w_max=11_500, w_cha_max=11_500, w_discha_max=11_500, wh_rtg=123_000)
CTL = ModelDef.load(704)
M701 = ModelDef.load(701)
ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE = 1, 2, 3
T0 = 1_700_000_000.0

Answering = Callable[[DispatchRequest], DispatchAnswer]


def accept(r: DispatchRequest) -> DispatchAnswer:
    return DispatchAnswer(r.id, T0, Verdict.ACCEPTED)


def cap_at(watts: float) -> Answering:
    def policy(r: DispatchRequest) -> DispatchAnswer:
        if r.target_w <= watts:
            return accept(r)
        return DispatchAnswer(r.id, T0, Verdict.CAPPED, cap_w=watts, detail="capped by energy above the floor")
    return policy


def opted_out(r: DispatchRequest) -> DispatchAnswer:
    return DispatchAnswer(r.id, T0, Verdict.REJECTED, reason=ReasonCode.OPTED_OUT,
                          detail="the owner has opted out")


class ScriptedSink:
    """Stands in for the core: answers by `policy`, records requests, cancels, site limits and notes.

    `refusal` and `improvable` stand for what the core's telemetry says blocks dispatch now and
    which requests it would now serve better; the site limit in force is the lowest one received."""

    def __init__(self, policy: Answering = accept) -> None:
        self.policy = policy
        self.t = T0
        self.mode, self.power_w, self.soc_pct, self.available_wh = Mode.STANDBY, 0.0, 72.5, 40_000.0
        self.bms_fresh = True
        self.received: list[DispatchRequest | DispatchCancel | SiteLimit] = []
        self.notes: list[tuple[str, dict]] = []
        self.refusal: tuple[ReasonCode, str] | None = None
        self.improvable: tuple[str, ...] = ()
        self.serving: str | None = None  # the request served, as the core's telemetry names it

    async def submit(self, item: DispatchRequest | DispatchCancel | SiteLimit) -> DispatchAnswer | None:
        self.received.append(item)
        if isinstance(item, DispatchCancel) and item.id == self.serving:
            self.serving = None
        if not isinstance(item, DispatchRequest):
            return None
        answer = self.policy(item)
        if answer is not None and answer.verdict is not Verdict.REJECTED:
            self.serving = item.id
        elif self.serving == item.id:
            self.serving = None
        return answer

    def telemetry(self) -> Telemetry:
        limits = {item.source: item.limit_w for item in self.received if isinstance(item, SiteLimit)}
        site = min([RATINGS.w_max, *(v for v in limits.values() if v is not None)])
        return Telemetry(at=self.t, mode=self.mode, soc_pct=self.soc_pct, floor_pct=40.0, power_w=self.power_w,
                         setpoint_w=self.power_w, available_wh=self.available_wh, active_event_id=self.serving,
                         refusal=self.refusal[0] if self.refusal else None,
                         refusal_detail=self.refusal[1] if self.refusal else "", improvable=tuple(self.improvable),
                         site_limit_w=site, site_charge_limit_w=site, bms_fresh=self.bms_fresh)

    def now(self) -> float:
        return self.t

    def note(self, kind: str, payload: dict) -> None:
        self.notes.append((kind, payload))

    def requests(self) -> list[DispatchRequest]:
        return [r for r in self.received if isinstance(r, DispatchRequest)]

    def cancels(self) -> list[DispatchCancel]:
        return [r for r in self.received if isinstance(r, DispatchCancel)]

    def limits(self) -> list[SiteLimit]:
        return [r for r in self.received if isinstance(r, SiteLimit)]


def config(**changes: Any) -> SunSpecServerConfig:
    return replace(SunSpecServerConfig(enabled=True, listen="127.0.0.1:0"), **changes)


def run(coro: Any, timeout_s: float = 15.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@contextlib.asynccontextmanager
async def serving(sink: ScriptedSink, cfg: SunSpecServerConfig | None = None, ratings: DerRatings | None = RATINGS,
                  **kwargs: Any) -> AsyncIterator[tuple[SunSpecDerServer, AsyncModbusTcpClient]]:
    server = SunSpecDerServer(cfg or config(), ratings, **kwargs)
    port = await server.start(sink)
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    await client.connect()
    try:
        yield server, client
    finally:
        client.close()
        await server.stop()


def ctl_regs(**values: Any) -> tuple[int, list[int]]:
    """(model offset, registers) of contiguous 704 points, in engineering units (every 704 sf is 0)."""
    points = sorted((CTL.point(n) for n in values), key=lambda p: p.offset)
    regs: list[int] = []
    for p in points:
        assert p.offset == points[0].offset + len(regs), "points must be contiguous"
        regs += CTL.encode_point(p.name, values[p.name])
    return points[0].offset, regs


async def write(server: SunSpecDerServer, client: AsyncModbusTcpClient, **values: Any) -> Any:
    offset, regs = ctl_regs(**values)
    return await client.write_registers(server.addresses[704] + offset, regs, device_id=1)


async def read_model(server: SunSpecDerServer, client: AsyncModbusTcpClient, model_id: int) -> dict[str, Any]:
    mdef, regs = ModelDef.load(model_id), []
    for at in range(0, mdef.size, 100):  # a read carries at most 125 registers
        reply = await client.read_holding_registers(server.addresses[model_id] + at,
                                                    count=min(100, mdef.size - at), device_id=1)
        assert not reply.isError(), reply
        regs += reply.registers
    return mdef.decode(regs)


# --- pysunspec2: an independent SunSpec + Modbus implementation -------------------------
def _scan_and_dispatch(port: int) -> dict[str, Any]:
    dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2)
    try:
        dev.scan()
        m = {mid: dev.models[mid][0] for mid in (1, 701, 702, 704, 713)}
        out = {
            "ids": sorted(k for k in dev.models if isinstance(k, int)),
            "Mn": m[1].Mn.value, "SN": m[1].SN.value, "DA": m[1].DA.value,
            "W": m[701].W.cvalue, "InvSt": m[701].InvSt.value, "ConnSt": m[701].ConnSt.value,
            "TotWhInj": m[701].TotWhInj.cvalue, "TotWhAbs": m[701].TotWhAbs.cvalue,
            "WMaxRtg": m[702].WMaxRtg.cvalue, "WChaRteMaxRtg": m[702].WChaRteMaxRtg.cvalue,
            "WDisChaRteMaxRtg": m[702].WDisChaRteMaxRtg.cvalue, "WSetEna_before": m[704].WSetEna.value,
            "WHRtg": m[713].WHRtg.cvalue, "WHAvail": m[713].WHAvail.cvalue, "SoC": m[713].SoC.cvalue,
        }
        ctl = m[704]
        ctl.WSetEnaRvrt.value = 1
        ctl.WSetRvrtTms.value = 30
        ctl.write()  # the revert function armed first: the setpoint below is one request
        ctl.WSetMod.value = 1
        ctl.WSet.cvalue = 4_000
        ctl.WSetEna.value = 1
        ctl.write()
        ctl.WSet.cvalue = -3_000
        ctl.write()
        ctl.read()
        out["WSet_after"], out["WSetRvrtRem"] = ctl.WSet.cvalue, ctl.WSetRvrtRem.value
        return out
    finally:
        dev.close()


def test_pysunspec2_scans_reads_live_models_and_dispatches_through_the_core():
    sink = ScriptedSink()
    sink.mode, sink.power_w = Mode.DISCHARGE, 5_000.0

    async def main() -> dict[str, Any]:
        server = SunSpecDerServer(config(), RATINGS, meter=lambda: (1_234.0, 56.0), serial="TRUCK-42")
        port = await server.start(sink)
        try:
            return await asyncio.to_thread(_scan_and_dispatch, port)
        finally:
            await server.stop()

    got = run(main())
    assert got["ids"] == [1, 701, 702, 704, 713]
    assert (got["Mn"], got["SN"], got["DA"]) == ("powershare-gw", "TRUCK-42", 1)
    assert got["W"] == 5_000 and got["InvSt"] == 3 and got["ConnSt"] == 1
    assert (got["TotWhInj"], got["TotWhAbs"]) == (1_234, 56)
    assert got["WMaxRtg"] == got["WChaRteMaxRtg"] == got["WDisChaRteMaxRtg"] == 11_500
    assert got["WHRtg"] == 123_000 and got["WHAvail"] == 40_000 and got["SoC"] == pytest.approx(72.5)
    assert got["WSetEna_before"] == 0
    discharge, charge = sink.requests()
    assert (discharge.source, discharge.kind, discharge.target_w) == ("sunspec", DispatchKind.DISCHARGE, 4_000)
    assert (discharge.start, discharge.end, discharge.received_at) == (T0, math.inf, T0)  # a standing setpoint
    assert (charge.id, charge.revision, charge.kind, charge.target_w) == (discharge.id, 1, DispatchKind.CHARGE, 3_000)
    assert charge.is_open_ended
    assert got["WSet_after"] == -3_000 and got["WSetRvrtRem"] == 30  # a WSet write refreshes the revert timer
    assert sink.notes == []
    assert sink.cancels() == [DispatchCancel(discharge.id, "sunspec", T0, "the DER server stopped")]


# --- pymodbus client: the meaning of each write ---------------------------------------------
def test_without_fresh_bms_data_the_storage_model_reads_no_soc_and_no_energy_rather_than_the_last_ones():
    """The BMS silent, the core's SoC is the last the BMS sent and its available energy 0 Wh: 713 gave
    them as readings of now (`Sta` OK), a site controller told the pack was empty at a stale SoC."""
    sink = ScriptedSink()

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with serving(sink) as (server, client):
            sink.bms_fresh, sink.available_wh = False, 0.0
            await server.tick()
            silent = await read_model(server, client, 713)
            sink.bms_fresh, sink.available_wh = True, 40_000.0
            await server.tick()
            return silent, await read_model(server, client, 713)

    silent, heard = run(main())
    assert (silent["SoC"], silent["WHAvail"], silent["Sta"]) == (None, None, 1)
    assert (heard["SoC"], heard["WHAvail"], heard["Sta"]) == (pytest.approx(72.5), 40_000, 0)


def test_an_unarmed_setpoint_is_one_open_ended_request_until_wsetena_zero_cancels_it():
    sink = ScriptedSink()

    async def main() -> dict[str, Any]:
        async with serving(sink) as (server, client):
            assert not (await write(server, client, WSetEna=1, WSetMod=1, WSet=6_000)).isError()
            for _ in range(3):  # hours pass: nothing to renew, nothing to budget
                sink.t += 3_600
                await server.tick()
            assert not (await write(server, client, WSetEna=0)).isError()
            return await read_model(server, client, 704)

    ctl = run(main())
    [first] = sink.requests()
    assert (first.kind, first.target_w, first.start, first.end) == (DispatchKind.DISCHARGE, 6_000, T0, math.inf)
    assert sink.cancels() == [DispatchCancel(id=first.id, source="sunspec", received_at=T0 + 3 * 3_600)]
    assert ctl["WSetEna"] == 0 and ctl["WSet"] == 6_000


def test_revert_timer_refreshed_by_writes_then_expiring_ends_the_request():
    sink = ScriptedSink()

    async def main() -> list[dict[str, Any]]:
        async with serving(sink) as (server, client):
            await write(server, client, WSetEnaRvrt=1, WSetRvrtTms=10)
            await write(server, client, WSetEna=1, WSetMod=1, WSet=5_000)
            sink.t += 6
            await write(server, client, WSet=5_000)  # the energy manager's heartbeat
            sink.t += 4
            during = await read_model(server, client, 704)
            sink.t += 7  # 11 s after the last write: the DER reverts
            after = await read_model(server, client, 704)
            await server.tick()
            return [during, after]

    during, after = run(main())
    [first] = sink.requests()  # the keep-alive changed nothing asked: no new revision
    assert (first.start, first.end) == (T0, math.inf)
    assert during["WSetRvrtRem"] == 6 and during["WSet"] == 5_000
    assert after["WSet"] == 0 and after["WSetRvrtRem"] == 0  # WSet = WSetRvrt, as a DER does
    assert sink.cancels() == [DispatchCancel(first.id, "sunspec", T0 + 17)]  # the revert ends the request


def test_wmaxlimpct_is_a_site_limit_for_the_core_and_shows_as_max_w_throttling():
    sink = ScriptedSink()
    sink.mode, sink.power_w = Mode.DISCHARGE, 5_750.0

    async def main() -> dict[str, Any]:
        async with serving(sink) as (server, client):
            await write(server, client, WMaxLimPctEna=1, WMaxLimPct=50)
            await write(server, client, WSetEna=1, WSetMod=1, WSet=8_000)
            capped = await read_model(server, client, 701)
            await write(server, client, WMaxLimPct=100)
            await write(server, client, WMaxLimPctEna=0)
            return capped

    capped = run(main())
    [request] = sink.requests()  # the setpoint as asked: the core applies the limit to every source
    assert request.target_w == 8_000
    assert [(s.source, s.limit_w) for s in sink.limits()] == [("sunspec", 5_750), ("sunspec", 11_500),
                                                                ("sunspec", None)]
    assert capped["ThrotSrc"] == 1 << M701.point("ThrotSrc").symbol("MAX_W")
    assert capped["ThrotPct"] == round(100 * 2_250 / 11_500) and capped["InvSt"] == 4  # THROTTLED
    assert capped["MnAlrmInfo"] == "site limit 5750 W"


def test_percent_mode_asks_for_a_share_of_the_rating():
    sink = ScriptedSink()

    async def main() -> None:
        async with serving(sink) as (server, client):
            await write(server, client, WSetPct=-50)
            await write(server, client, WSetEna=1, WSetMod=0)

    run(main())
    [request] = sink.requests()
    assert (request.kind, request.target_w) == (DispatchKind.CHARGE, 5_750)


class RatedSink(ScriptedSink):
    """A core whose telemetry carries the DER ratings, which the test changes (the inverter
    reporting its own after discovery or a reconnect)."""

    def __init__(self) -> None:
        super().__init__()
        self.ratings = RATINGS

    def telemetry(self) -> Telemetry:
        return replace(super().telemetry(), ratings=self.ratings)


def test_percent_settings_follow_a_rating_that_changes_after_they_were_written():
    """`WMaxLimPct` and `WSetPct` are shares of `WMaxRtg`: when the rating drops, the core is told
    the watts the registers now say, without a write (it kept 50 % of the old 11.5 kW)."""
    sink = RatedSink()

    async def main() -> tuple[dict, dict, list[float | None]]:
        async with serving(sink, ratings=None) as (server, client):
            await write(server, client, WMaxLimPctEna=1, WMaxLimPct=50)
            await write(server, client, WSetPct=40)
            await write(server, client, WSetEna=1, WSetMod=0)
            sink.ratings = replace(RATINGS, w_max=7_600, w_cha_max=7_600, w_discha_max=7_600)
            sink.t += 1
            await server.tick()
            sink.t += 1
            await server.tick()  # nothing more changed: nothing more asked
            limits = [s.limit_w for s in sink.limits()]  # before the stop lifts it
            return await read_model(server, client, 702), await read_model(server, client, 704), limits

    rtg, ctl, limits = run(main())
    assert rtg["WMaxRtg"] == 7_600 and ctl["WMaxLimPct"] == 50 and ctl["WSetPct"] == 40
    assert limits == [5_750, 3_800]
    first, revised = sink.requests()
    assert (first.target_w, revised.target_w) == (4_600, 3_040)
    assert (revised.id, revised.revision) == (first.id, first.revision + 1)


def test_ratings_are_the_gateway_limits_lowered_by_the_inverter_once_it_reports():
    policy = Policy(max_discharge_w=11_500, max_charge_w=9_600, usable_capacity_wh=123_000)
    assert DerRatings.of(policy, None) == DerRatings(11_500, 9_600, 11_500, 123_000)
    inverter = InverterStatus(received_at=T0, w_max_rtg=10_000, w_cha_max_rtg=7_000, w_discha_max_rtg=None)
    assert DerRatings.of(policy, inverter) == DerRatings(10_000, 7_000, 10_000, 123_000)
    silent = replace(inverter, comms_ok=False, error="timeout")
    assert DerRatings.of(policy, silent) == DerRatings.of(policy, None)


def test_an_inverter_that_cannot_charge_makes_a_der_that_cannot_charge():
    """A WChaRteMaxRtg of 0 is "cannot charge" to the core (`can_charge`): the DER advertised the
    policy's 9,600 W instead, and took charge setpoints the core then refused."""
    policy = Policy(max_discharge_w=11_500, max_charge_w=9_600, usable_capacity_wh=123_000)
    inverter = InverterStatus(received_at=T0, w_max_rtg=11_500, w_cha_max_rtg=0, w_discha_max_rtg=11_500)
    assert DerRatings.of(policy, inverter).w_cha_max == 0


def test_an_export_limit_holds_back_no_charge_setpoint_in_what_the_der_reports():
    """An OpenADR 3 export limit of 0 W caps discharge only: the core charged at 5 kW while model 701
    said the charge setpoint was held to 0 W by the site limit (ThrotSrc MAX_W, ThrotPct 43)."""
    run = Run(ready(0.0, soc=50.0), soc=50.0)
    run.feed(SiteLimit(0.0, "openadr3", 0.0, export_only=True))
    answered = run.feed(DispatchRequest("wset", "sunspec", DispatchKind.CHARGE, 5_000, 0.0, 3_600, received_at=0.0))
    run.run(30)
    t = telemetry(run.c, run.t)
    assert run.c.mode is Mode.CHARGE and run.c.setpoint_w == -5_000
    charge = DispatchStatus(Wanted(DispatchKind.CHARGE, 5_000.0, None), answered.answer_for("wset"))
    assert charge.followed(t) == (5_000.0, None)
    measured = _measure(t, t.ratings, charge, (0.0, 0.0))
    assert (measured["ThrotPct"], measured["ThrotSrc"]) == (0, 0)
    discharge = DispatchStatus(Wanted(DispatchKind.DISCHARGE, 5_000.0, None), DispatchAnswer.accepted("d", 0.0))
    assert discharge.followed(t) == (0.0, "site limit 0 W")  # the export it does hold back


def test_core_refusal_keeps_the_write_but_shows_the_reason():
    sink = ScriptedSink(policy=opted_out)

    async def main() -> tuple[Any, dict, dict]:
        async with serving(sink) as (server, client):
            reply = await write(server, client, WSetEna=1, WSetMod=1, WSet=-4_000)
            return reply, await read_model(server, client, 704), await read_model(server, client, 701)

    reply, ctl, measure = run(main())
    assert not reply.isError()
    assert ctl["WSetEna"] == 1 and ctl["WSet"] == -4_000
    assert measure["W"] == 0 and measure["InvSt"] == 7  # STANDBY: nothing flows
    assert measure["ThrotSrc"] == 1 << M701.point("ThrotSrc").symbol("DERATED")
    assert measure["ThrotPct"] == round(100 * 4_000 / 11_500)
    assert measure["MnAlrmInfo"].startswith("refused OPTED_OUT")
    assert [r.kind for r in sink.requests()] == [DispatchKind.CHARGE]


def test_core_cap_is_reflected():
    sink = ScriptedSink(policy=cap_at(3_000))

    async def main() -> dict:
        async with serving(sink) as (server, client):
            await write(server, client, WSetEna=1, WSetMod=1, WSet=9_000)
            return await read_model(server, client, 701)

    measure = run(main())
    assert measure["MnAlrmInfo"].startswith("capped to 3000 W")
    assert measure["ThrotPct"] == round(100 * 6_000 / 11_500)


def test_write_outside_the_allow_list_is_refused_and_journaled():
    sink = ScriptedSink()

    async def main() -> tuple[Any, dict]:
        async with serving(sink, config(allow_write_from=["10.0.0.0/8", "192.168.1.7"])) as (server, client):
            reply = await write(server, client, WSetEna=1, WSetMod=1, WSet=5_000)
            return reply, await read_model(server, client, 704)  # reads stay open

    reply, ctl = run(main())
    assert reply.isError() and reply.exception_code == ILLEGAL_FUNCTION
    assert ctl["WSetEna"] == 0 and ctl["WSet"] == 0
    assert sink.received == []
    [(kind, note)] = sink.notes
    assert kind == NOTE_KIND and note["client"] == "127.0.0.1" and "allow_write_from" in note["reason"]


REFUSALS = [
    ("read-only 701 W", lambda a: (a[701] + M701.offset("W"), [100]), ILLEGAL_ADDRESS),
    ("partial WSet (1 of 2 registers)", lambda a: (a[704] + CTL.offset("WSet") + 1, [5]), ILLEGAL_ADDRESS),
    ("unsupported PFWInjEna", lambda a: (a[704] + CTL.offset("PFWInjEna"), [1]), ILLEGAL_ADDRESS),
    ("SunS marker", lambda a: (40_000, [0]), ILLEGAL_ADDRESS),
    ("outside the map", lambda a: (1_000, [0, 0]), ILLEGAL_ADDRESS),
    ("across 704 and 713", lambda a: (a[713] - 1, [0, 0]), ILLEGAL_ADDRESS),
    ("WSetMod not a symbol", lambda a: (a[704] + CTL.offset("WSetMod"), [7]), ILLEGAL_VALUE),
    ("WSet beyond the rating", lambda a: (a[704] + CTL.offset("WSet"), CTL.encode_point("WSet", 20_000)),
     ILLEGAL_VALUE),
    ("WMaxLimPct over 100 %", lambda a: (a[704] + CTL.offset("WMaxLimPct"), [101]), ILLEGAL_VALUE),
    ("WSetRvrtTms 'not implemented'", lambda a: (a[704] + CTL.offset("WSetRvrtTms"), [0xFFFF, 0xFFFF]),
     ILLEGAL_VALUE),
]


@pytest.mark.parametrize("what, target, code", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_writes_get_a_modbus_exception_and_a_journal_entry(what, target, code):
    sink = ScriptedSink()

    async def main() -> tuple[Any, int]:
        async with serving(sink) as (server, client):
            address, regs = target(server.addresses)
            reply = await client.write_registers(address, regs, device_id=1)
            return reply, address

    reply, address = run(main())
    assert reply.isError() and reply.exception_code == code, what
    [(kind, note)] = sink.notes
    assert kind == NOTE_KIND and note["register"] == address and note["client"] == "127.0.0.1" and note["reason"]
    assert sink.received == []


@pytest.mark.parametrize("point, beyond_value, within_value, rating", [
    ("WSet", -5_000, -3_000, 3_000.0),
    ("WSetRvrt", -5_000, -3_000, 3_000.0),
    ("WSetPct", -50, -26, 3_000.0),  # 50 % of 11,500 W is a 5,750 W charge; 26 % is 2,990 W
    ("WSetPctRvrt", -50, -26, 3_000.0),
    ("WSet", -100, 0, 0.0),  # a DER that cannot charge takes no charge at all
    ("WSetPct", -1, 0, 0.0),
])
def test_a_charge_setpoint_beyond_the_advertised_charge_rating_is_refused(point, beyond_value, within_value, rating):
    """Model 702 says WChaRteMaxRtg: a charge beyond it is as illegal as a setpoint beyond WMaxRtg,
    whether asked in watts or as a share of WMaxRtg. Before, the share was not checked, and a
    rating of 0 was taken for no limit."""
    sink = ScriptedSink()

    async def main() -> tuple[Any, Any]:
        async with serving(sink, ratings=replace(RATINGS, w_cha_max=rating)) as (server, client):
            address = server.addresses[704] + CTL.offset(point)
            beyond = await client.write_registers(address, CTL.encode_point(point, beyond_value), device_id=1)
            within = await client.write_registers(address, CTL.encode_point(point, within_value), device_id=1)
            return beyond, within

    beyond, within = run(main())
    assert beyond.isError() and beyond.exception_code == ILLEGAL_VALUE
    assert not within.isError()
    assert f"beyond the charge rating {rating:.0f} W" in sink.notes[0][1]["reason"]


def test_other_unit_ids_get_a_clear_exception_and_are_counted():
    sink = ScriptedSink()

    async def main() -> tuple[Any, Any]:
        async with serving(sink) as (server, client):
            address = server.addresses[704] + CTL.offset("WSetEna")
            wrote = await client.write_registers(address, [1], device_id=7)
            read = await client.read_holding_registers(40_000, count=2, device_id=7)
            return wrote, read

    wrote, read = run(main())
    assert wrote.isError() and read.isError() and wrote.exception_code == read.exception_code == 0x0B
    (first_kind, first), (summary_kind, summary) = sink.notes  # the second refusal is counted, summarised at the stop
    assert first_kind == NOTE_KIND and first["cause"] == "other_unit" and "unit id 7" in first["reason"]
    assert (first["function"], first["register"]) == (16, 40_000 + 299)
    assert summary_kind == "SunSpecRefusals" and (summary["cause"], summary["count"]) == ("other_unit", 1)
    assert sink.received == []


def test_a_write_whose_byte_count_disagrees_is_refused_with_illegal_value_and_journaled():
    """A frame pymodbus would have refused before the server's hook ran is answered and journaled by the server."""
    sink = ScriptedSink()

    async def main() -> bytes:
        async with serving(sink) as (server, _client):
            address = server.addresses[704] + CTL.offset("WSetEna")
            pdu = struct.pack(">BHHB", 16, address, 2, 2) + struct.pack(">H", 1)  # says 2 registers, sends 1
            frame = struct.pack(">HHHB", 7, 0, len(pdu) + 1, 1) + pdu
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(frame)
            await writer.drain()
            reply = await asyncio.wait_for(reader.readexactly(9), 5)
            writer.close()
            return reply

    reply = run(main())
    assert reply == struct.pack(">HHHBBB", 7, 0, 3, 1, 0x90, ILLEGAL_VALUE)
    [(kind, note)] = sink.notes
    assert kind == NOTE_KIND and note["function"] == 16 and note["exception"] == "ILLEGAL_VALUE"
    assert note["cause"] == "malformed"


class ObservedDerServer(SunSpecDerServer):
    """The DER server, telling the test when `run` has bound its port and when a tick of its run
    loop has finished: events to wait on, rather than polling its state on a timer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.listening = asyncio.Event()
        self.ticked = asyncio.Event()

    async def start(self, sink=None) -> int:
        port = await super().start(sink)
        self.listening.set()
        return port

    async def tick(self) -> None:
        await super().tick()
        self.ticked.set()

    async def next_tick(self) -> None:
        """Until a tick that began after this call has finished."""
        self.ticked.clear()
        await self.ticked.wait()  # may be a tick already under way when called: that one saw the old clock
        self.ticked.clear()
        await self.ticked.wait()


def test_run_serves_ticks_revert_timers_and_closes_when_cancelled():
    sink = ScriptedSink()

    async def main() -> tuple[float, bool]:
        server = ObservedDerServer(config(), RATINGS, tick_s=0.01)
        task = asyncio.create_task(server.run(sink))
        await server.listening.wait()  # bounded by run()'s timeout
        client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0)
        await client.connect()
        await write(server, client, WSetEnaRvrt=1, WSetRvrtTms=5)
        await write(server, client, WSetEna=1, WSetMod=1, WSet=3_000)
        client.close()
        sink.t += 6
        await server.next_tick()  # no client reads: the run loop's tick reverts WSet
        wset = server.controls.values["WSet"]
        await cancel_all([task])
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        except OSError:
            return wset, True
        writer.close()
        return wset, False

    wset, closed = run(main())
    assert wset == 0 and closed
    [request] = sink.requests()
    assert request.is_open_ended and sink.cancels() == [DispatchCancel(request.id, "sunspec", T0 + 6)]


def test_config_errors_name_the_key():
    with pytest.raises(InputError, match="allow_write_from"):
        SunSpecDerServer(config(allow_write_from=["not-an-ip"]), RATINGS)
    with pytest.raises(InputError, match="listen"):
        SunSpecDerServer(config(listen="localhost"), RATINGS)


# --- fuzzing: whatever is written, a clear answer, a journal entry, well-formed requests ------
@pytest.fixture(scope="module")
def threaded() -> Iterator[tuple[SunSpecDerServer, ScriptedSink, ModbusTcpClient]]:
    """One server on its own loop thread, so hypothesis can drive it with a synchronous client."""
    answers = [accept, cap_at(2_000), opted_out]
    sink = ScriptedSink(policy=lambda r: answers[r.revision % 3](r))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = SunSpecDerServer(config(), RATINGS)
    port = asyncio.run_coroutine_threadsafe(server.start(sink), loop).result(5)
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert client.connect()
    try:
        yield server, sink, client
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _valid_point_write(at_704: int) -> st.SearchStrategy[tuple[str, int, list[int]]]:
    ranges = {"WSet": (-12_000, 12_000), "WSetRvrt": (-12_000, 12_000), "WMaxLimPct": (0, 110),
              "WMaxLimPctRvrt": (0, 110), "WSetPct": (-110, 110), "WSetPctRvrt": (-110, 110),
              "WSetRvrtTms": (0, 40), "WMaxLimPctRvrtTms": (0, 40)}

    def build(name: str, data: st.DataObject) -> tuple[str, int, list[int]]:
        lo, hi = ranges.get(name, (0, 2))
        value = data.draw(st.integers(lo, hi))
        return "regs", at_704 + CTL.offset(name), CTL.encode_point(name, value)

    return st.tuples(st.sampled_from(sorted(CONTROL_DEFAULTS)), st.data()).map(lambda t: build(*t))


@st.composite
def operations(draw: st.DrawFn, addresses: dict[int, int], end: int) -> tuple[str, int, list[int]]:
    at = addresses[704]
    address = draw(st.one_of(st.integers(39_990, end + 10), st.integers(at - 2, at + CTL.size + 2),
                             st.integers(0, 65_535)))
    word = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 1, 2, 100, 101, 0x7FFF, 0x8000, 0xFFFF]))
    setpoint = st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(-12_000, 12_000)).map(
        lambda v: ("regs", at + ctl_regs(WSetEna=v[0], WSetMod=v[1], WSet=v[2])[0],
                   ctl_regs(WSetEna=v[0], WSetMod=v[1], WSet=v[2])[1]))
    return draw(st.one_of(
        setpoint,
        _valid_point_write(at),
        st.tuples(st.just("regs"), st.just(address), st.lists(word, min_size=1, max_size=12)),
        st.tuples(st.just("reg"), st.just(address), st.lists(word, min_size=1, max_size=1)),
        st.tuples(st.just("coil"), st.just(address), st.lists(st.integers(0, 1), min_size=1, max_size=1)),
        st.tuples(st.just("mask"), st.just(address), st.lists(word, min_size=2, max_size=2)),
    ))


def _send(client: ModbusTcpClient, op: str, address: int, values: list[int]) -> Any:
    if op == "regs":
        return client.write_registers(address, values[: 65_536 - address], device_id=1)
    if op == "reg":
        return client.write_register(address, values[0], device_id=1)
    if op == "coil":
        return client.write_coil(address, bool(values[0]), device_id=1)
    return client.mask_write_register(address=address, and_mask=values[0], or_mask=values[1], device_id=1)


def test_fuzzed_writes_get_an_answer_a_journal_entry_and_only_well_formed_requests(threaded):
    server, sink, client = threaded
    addresses, end = dict(server.addresses), server.map.end()
    revisions: dict[str, int] = {}

    at = addresses[704]
    start, regs = ctl_regs(WSetEna=1, WSetMod=1, WSet=5_000)
    both = [("regs", at + start, regs), ("reg", 0, [1])]  # one served, one refused, whatever else is drawn

    @settings(max_examples=150, deadline=None)
    @given(ops=st.lists(operations(addresses, end), min_size=1, max_size=4), dt=st.floats(0, 20))
    @example(ops=both, dt=1.0)
    def check(ops: list[tuple[str, int, list[int]]], dt: float) -> None:
        sink.t += dt
        for op, address, values in ops:
            refusals, seen = server.refusals.totals.total(), len(sink.received)
            reply = _send(client, op, address, values)
            if reply.isError():
                assert reply.exception_code in (ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE), reply
                assert server.refusals.totals.total() == refusals + 1, (op, address, values)
            else:
                assert server.refusals.totals.total() == refusals, (op, address, values)
            for item in sink.received[seen:]:
                if isinstance(item, DispatchRequest):
                    assert invalid_reason(item) is None, item
                    assert item.source == "sunspec" and 0 < item.target_w <= RATINGS.w_max
                    assert item.start == item.received_at == sink.t
                    assert item.revision > revisions.get(item.id, -1)
                    revisions[item.id] = item.revision
                elif isinstance(item, SiteLimit):
                    assert item.source == "sunspec"
                    assert item.limit_w is None or 0 <= item.limit_w <= RATINGS.w_max
                else:
                    assert item.id in revisions
        header = client.read_holding_registers(40_000, count=4, device_id=1)
        assert not header.isError() and header.registers[:2] == [0x5375, 0x6E53]  # still serving

    check()
    assert sink.notes and sink.requests()  # the fuzzing reached both outcomes
    assert all(kind in (NOTE_KIND, "SunSpecRefusals") and note["client"] == "127.0.0.1" and note["reason"]
               for kind, note in sink.notes)
    # One record per (client, cause) at once, the rest counted: fewer records than refusals, none lost.
    assert len(sink.notes) <= 2 * len(Cause) < server.refusals.totals.total()


class HeldSink(ScriptedSink):
    """A core that takes its time: `submit` waits until the test lets it answer."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def submit(self, item: DispatchRequest | DispatchCancel) -> DispatchAnswer | None:
        self.entered.set()
        await self.release.wait()
        return await super().submit(item)


def test_a_client_that_disconnects_mid_request_costs_nothing(caplog):
    """Half a frame, then a write whose client is gone before the answer: the server and its next
    client do not notice, and nothing is logged as an error (issue 10: a link heals, here at no cost)."""
    from firmware_py.links import Link, LinkBook

    sink = HeldSink()
    links = LinkBook(lambda: sink.t)

    async def main() -> dict[str, Any]:
        async with serving(sink, link=links.handle(Link.SUNSPEC_SERVER)) as (server, client):
            _, half = await asyncio.open_connection("127.0.0.1", server.port)
            half.write(struct.pack(">HHH", 1, 0, 6))  # an MBAP header and no more
            await half.drain()
            half.close()
            await write(server, client, WSetMod=1, WSet=4_000)  # not enabled yet: nothing asked of the core
            address = server.addresses[704] + CTL.offset("WSetEna")
            pdu = struct.pack(">BHHB", 16, address, 1, 2) + struct.pack(">H", 1)  # WSetEna = 1
            _, gone = await asyncio.open_connection("127.0.0.1", server.port)
            gone.write(struct.pack(">HHHB", 9, 0, len(pdu) + 1, 1) + pdu)
            await gone.drain()
            await asyncio.wait_for(sink.entered.wait(), 5)  # the server is inside the request now
            gone.transport.abort()  # the client vanishes mid-request
            sink.release.set()
            return await read_model(server, client, 704)  # the next client is served as ever

    with caplog.at_level(logging.WARNING):
        controls = run(main())
    assert controls["WSetEna"] == 1  # the write that lost its client still took effect
    assert [r.target_w for r in sink.requests()] == [4_000]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert links.view(sink.t)["sunspec_server"]["ok"]


def test_a_server_no_client_has_asked_is_up_with_no_last_good_data():
    """Listening is not data: until a client is served the link's age is null (docs: "null: none yet")."""
    from firmware_py.links import Link, LinkBook

    sink = HeldSink()
    links = LinkBook(lambda: sink.t)

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with serving(sink, link=links.handle(Link.SUNSPEC_SERVER)) as (server, client):
            before = links.view(sink.t)["sunspec_server"]
            await read_model(server, client, 704)
            return before, links.view(sink.t)["sunspec_server"]

    before, after = run(main())
    assert before == {"ok": True, "age_s": None}
    assert after["ok"] and after["age_s"] is not None


# --- standing settings: asked again when what refused them has cleared ---------------------------
def no_data(r: DispatchRequest) -> DispatchAnswer:
    return DispatchAnswer(r.id, T0, Verdict.REJECTED, reason=ReasonCode.NO_DATA,
                          detail="no fresh BMS or inverter data")


def test_a_refused_setting_shows_why_and_is_asked_again_once_the_core_would_serve_it():
    sink = ScriptedSink(policy=no_data)
    sink.refusal = (ReasonCode.NO_DATA, "no fresh BMS or inverter data")

    async def main() -> tuple[dict, dict, int]:
        async with serving(sink) as (server, client):
            await write(server, client, WSetEna=1, WSetMod=1, WSet=6_000)
            refused = await read_model(server, client, 701)
            await server.tick()  # nothing has cleared: nothing asked
            sink.policy, sink.refusal = accept, None
            sink.improvable = frozenset({server.session.id})  # the core: a new revision would be served
            await server.tick()
            sink.improvable = frozenset()
            return refused, await read_model(server, client, 701), server.reasks

    refused, served, reasks = run(main())
    first, again = sink.requests()
    assert (again.id, again.revision, again.target_w, again.received_at) == (first.id, 1, 6_000, T0)
    assert reasks == 1
    assert refused["MnAlrmInfo"] == "NO_DATA: no fresh BMS or inverter data"
    assert refused["ThrotSrc"] == 1 << M701.point("ThrotSrc").symbol("DERATED")
    assert refused["ThrotPct"] == round(100 * 6_000 / 11_500)
    assert served["MnAlrmInfo"] is None and served["ThrotSrc"] == 0 and served["ThrotPct"] == 0


def test_a_mode_change_wakes_the_server_at_once_while_its_setting_is_refused():
    """`notice_step` (a gateway observer) wakes the run loop: no waiting for the next tick."""
    from firmware_py.core.controller import Controller, StepResult
    from firmware_py.core.types import InverterCommand, Transition

    sink = ScriptedSink(policy=no_data)

    async def main() -> int:
        server = ObservedDerServer(config(), RATINGS, tick_s=3_600.0)  # the tick alone would never come
        task = asyncio.create_task(server.run(sink))
        await server.listening.wait()
        client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=2, retries=0)
        await client.connect()
        await write(server, client, WSetEna=1, WSetMod=1, WSet=6_000)
        client.close()
        sink.policy, sink.improvable = accept, frozenset({server.session.id})
        ready = StepResult(controller=Controller.start(Policy(), now=T0).evolve(mode=Mode.STANDBY),
                           command=InverterCommand(0.0, "ready"),
                           events=[Transition(T0, Mode.STARTUP, Mode.STANDBY, "BMS and inverter data ready")])
        server.notice_step(ready)
        await server.ticked.wait()
        await cancel_all([task])
        return len(sink.requests())

    assert run(main()) == 2


def test_stopping_withdraws_the_setting_and_the_site_limit():
    sink = ScriptedSink()

    async def main() -> str:
        async with serving(sink) as (server, client):
            await write(server, client, WMaxLimPctEna=1, WMaxLimPct=40)
            await write(server, client, WSetEna=1, WSetMod=1, WSet=5_000)
            return server.session.id

    session = run(main())
    assert sink.cancels() == [DispatchCancel(session, "sunspec", T0, "the DER server stopped")]
    assert [s.limit_w for s in sink.limits()] == [4_600, None]


class CountingSink(ScriptedSink):
    """A ScriptedSink that counts how often the server reads the gateway's state, which carries the
    ratings (as the gateway's does: a server given none takes them from there)."""

    def __init__(self) -> None:
        super().__init__()
        self.telemetry_reads = 0

    def telemetry(self) -> Telemetry:
        self.telemetry_reads += 1
        return replace(super().telemetry(), ratings=RATINGS)


def test_each_request_reads_the_gateways_state_once():
    """One read model per Modbus request, writes included: the telemetry is the costliest thing a
    request asks of the gateway (what refuses dispatch, the envelope, what it would serve better),
    and each write on a dispatch's way to the inverter once read it three times."""
    sink = CountingSink()

    async def main() -> list[int]:
        async with serving(sink, ratings=None) as (server, client):
            counts = []
            for request in (lambda: write(server, client, WSetEna=1, WSetMod=1, WSet=6_000),
                            lambda: write(server, client, WSet=5_000),
                            lambda: client.read_holding_registers(server.addresses[701], count=50, device_id=1)):
                before = sink.telemetry_reads
                assert not (await request()).isError()
                counts.append(sink.telemetry_reads - before)
            return counts

    assert run(main()) == [1, 1, 1]
    assert [r.target_w for r in sink.requests()] == [6_000, 5_000]


# --- a setting another request displaced; a write the core failed on ---------------------------
def _with_der_server(c: Any) -> Any:
    s = replace(c.dispatch.sunspec_server, enabled=True, listen="127.0.0.1:0")
    return replace(c, dispatch=replace(c.dispatch, sunspec_server=s))


@contextlib.asynccontextmanager
async def der_on_a_gateway(tmp_path) -> AsyncIterator[tuple[Any, SunSpecDerServer, AsyncModbusTcpClient]]:
    """The DER server on a lockstep gateway (the real core), a client connected, 5 s run:
    (rig, server, client)."""
    from lockstep import Rig

    async with Rig(tmp_path, configure=_with_der_server) as rig:
        server = rig.assembly.integrations["dispatch.sunspec_server"]
        port = await server.start(rig.gateway)
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        await client.connect()
        try:
            await rig.run(5)
            yield rig, server, client
        finally:
            client.close()
            await server.stop()


def test_a_setpoint_another_request_displaced_reads_as_throttled_naming_it(tmp_path):
    """The core serves an OpenADR request accepted after the SunSpec setpoint: the stored answer
    (ACCEPTED) must not make 701 read as if the setpoint were followed in full."""
    async def main() -> tuple[dict, dict, str | None, float]:
        async with der_on_a_gateway(tmp_path) as (rig, server, client):
            assert not (await write(server, client, WSetMod=1, WSet=5_000)).isError()
            assert not (await write(server, client, WSetEna=1)).isError()
            await rig.run(10)
            alone = await read_model(server, client, 701)
            now = rig.time.mono
            other = DispatchRequest("adr-1", "openadr", DispatchKind.DISCHARGE, 1_500, now, now + 600, now)
            assert (await rig.gateway.submit(other)).verdict is Verdict.ACCEPTED
            await rig.run(10)
            return (alone, await read_model(server, client, 701), rig.gateway.telemetry().active_event_id,
                    (await read_model(server, client, 702))["WMaxRtg"])

    alone, displaced, serving_id, w_max_rtg = run(main(), 60)
    assert alone["W"] == 5_000 and alone["ThrotSrc"] == 0 and alone["MnAlrmInfo"] is None
    assert serving_id == "adr-1" and displaced["W"] == 1_500
    assert displaced["InvSt"] == M701.point("InvSt").symbol("THROTTLED")
    assert displaced["ThrotSrc"] == 1 << M701.point("ThrotSrc").symbol("DERATED")
    # (requested - followed now) / WMaxRtg: the 1500 W flowing is what of the setpoint is followed
    assert displaced["ThrotPct"] == round(100 * (5_000 - 1_500) / w_max_rtg)
    assert displaced["MnAlrmInfo"] == "another request in force: adr-1"


def test_a_setpoint_the_core_stopped_serving_at_the_floor_reads_as_held_back_naming_the_floor(tmp_path):
    """The owner raises the reserve above the SoC: the core serves nothing (STANDBY, no request
    served), and the stored answer (ACCEPTED) must not make 701 read as followed in full."""
    async def main() -> tuple[dict, dict, Any, float]:
        async with der_on_a_gateway(tmp_path) as (rig, server, client):
            assert not (await write(server, client, WSetEna=1, WSetMod=1, WSet=4_000)).isError()
            await rig.run(10)
            served = await read_model(server, client, 701)
            rig.gateway.feed(OwnerSettings(95, rig.time.mono))  # the floor above the SoC
            await rig.run(10)
            return (served, await read_model(server, client, 701), rig.gateway.telemetry(),
                    (await read_model(server, client, 702))["WMaxRtg"])

    served, floored, t, w_max_rtg = run(main(), 60)
    assert served["W"] == 4_000 and served["ThrotSrc"] == 0 and served["MnAlrmInfo"] is None
    assert t.active_event_id is None and t.power_w == 0 and "floor" in t.reason
    assert floored["ThrotSrc"] & 1 << M701.point("ThrotSrc").symbol("DERATED")
    assert floored["ThrotPct"] == round(100 * 4_000 / w_max_rtg) > 0
    assert floored["MnAlrmInfo"] == f"not served now: {t.reason}"[:64]
    assert "floor" in floored["MnAlrmInfo"]


class FailingSink(ScriptedSink):
    """A core whose submit raises (a journal write failing) until `failing` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = True

    async def submit(self, item: DispatchRequest | DispatchCancel | SiteLimit) -> DispatchAnswer | None:
        if self.failing:
            self.received.append(item)
            raise RuntimeError("journal write failed")
        return await super().submit(item)


def test_a_write_the_core_fails_on_is_refused_whole_and_asked_again_when_written_again():
    """Exception 4 means nothing changed: 704 reads back as before, and the same write later is a
    new setpoint for the core, not a keep-alive of one it never took."""
    sink = FailingSink()

    async def main() -> tuple[Any, dict, dict, Any, dict]:
        async with serving(sink) as (server, client):
            before = await read_model(server, client, 704)
            failed = await write(server, client, WSetEna=1, WSetMod=1, WSet=5_000)
            after = await read_model(server, client, 704)
            sink.failing = False
            again = await write(server, client, WSetEna=1, WSetMod=1, WSet=5_000)
            return failed, before, after, again, await read_model(server, client, 704)

    failed, before, after, again, taken = run(main())
    assert failed.isError() and failed.exception_code == 4  # DEVICE_FAILURE
    assert {k: after[k] for k in CONTROL_DEFAULTS} == {k: before[k] for k in CONTROL_DEFAULTS}
    assert after["WSetEna"] == 0 and after["WSet"] == 0
    assert not again.isError() and taken["WSetEna"] == 1 and taken["WSet"] == 5_000
    submitted = sink.requests()
    assert len(submitted) == 2 and submitted[-1].target_w == 5_000  # asked again, not taken as "the same"


class CancelFailingOnceSink(ScriptedSink):
    """A core whose submit raises on the first cancel only (a journal write failing once)."""

    def __init__(self) -> None:
        super().__init__()
        self.cancel_fails = True

    async def submit(self, item: DispatchRequest | DispatchCancel | SiteLimit) -> DispatchAnswer | None:
        if isinstance(item, DispatchCancel) and self.cancel_fails:
            self.cancel_fails = False
            raise RuntimeError("journal write failed")
        return await super().submit(item)


def test_a_revert_whose_cancel_the_core_fails_on_is_cancelled_at_the_next_tick():
    """The revert fired and 704 reads `WSet` 0, so the request must end even when the core failed
    on the cancel once: the open-ended 5 kW request ran on with nothing left to cancel it."""
    sink = CancelFailingOnceSink()

    async def main() -> tuple[Any, dict]:
        async with serving(sink) as (server, client):
            await write(server, client, WSetEnaRvrt=1, WSetRvrtTms=10)
            await write(server, client, WSetEna=1, WSetMod=1, WSet=5_000)
            sink.t += 11  # the revert fires in this read, and the core fails on its cancel
            failed = await client.read_holding_registers(server.addresses[704], count=10, device_id=1)
            sink.t += 1
            await server.tick()
            sink.t += 1
            await server.tick()  # cancelled once, not at every tick
            return failed, await read_model(server, client, 704), sink.cancels()  # before the stop's

    failed, after, cancels = run(main())
    assert failed.isError() and failed.exception_code == 4  # DEVICE_FAILURE
    assert after["WSet"] == 0 and after["WSetRvrtRem"] == 0
    [request] = sink.requests()
    assert cancels == [DispatchCancel(request.id, "sunspec", T0 + 12)]
