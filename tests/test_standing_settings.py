"""Issue 12's "done when" for standing settings, through the real parts.

The gateway is assembled as `run` assembles it (lock-step rig: the simulated pack and BMS node
on a virtual CAN bus, the simulated inverter served by pymodbus, the journal in SQLite) with its
SunSpec DER server running as in `run`; a site controller is pysunspec2 over Modbus TCP on
127.0.0.1. Time is the rig's injected clock: a setting written once while the gateway is still
starting is refused (NO_DATA), shown as such in model 701, and served within one second of the
gateway becoming ready, without the controller writing again; the same after the owner revokes
an opt-out.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from typing import Any

import pytest
from lockstep import Rig
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from firmware_py.core.types import DispatchAnswer, ReasonCode, Transition, Verdict
from firmware_py.dispatch.sunspec_server import SunSpecDerServer
from firmware_py.journal import Journal, RecordKind
from firmware_py.tasks import cancel_all

SETPOINT_W = 6_000


def with_der_server(config):
    served = replace(config.dispatch.sunspec_server, enabled=True, listen="127.0.0.1:0")
    return replace(config, dispatch=replace(config.dispatch, sunspec_server=served))


def controller_writes_once(port: int) -> dict[str, Any]:
    """pysunspec2 as a site controller: WSetMod = WATTS, WSet, WSetEna = 1 in one write, then 701."""
    dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2)
    try:
        dev.scan()
        ctl = dev.models[704][0]
        ctl.WSetMod.value = 1
        ctl.WSet.cvalue = SETPOINT_W
        ctl.WSetEna.value = 1
        ctl.write()
        return read_701(dev)
    finally:
        dev.close()


def read_701(dev: SunSpecModbusClientDeviceTCP | None = None, port: int = 0) -> dict[str, Any]:
    own = dev is None
    if own:
        dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2)
        dev.scan()
    try:
        m = dev.models[701][0]
        m.read()
        return {"MnAlrmInfo": m.MnAlrmInfo.value, "ThrotSrc": m.ThrotSrc.value, "ThrotPct": m.ThrotPct.value,
                "InvSt": m.InvSt.value, "W": m.W.cvalue}
    finally:
        if own:
            dev.close()


class Observed:
    """Waits for the DER server's run loop to finish a tick (an event, not a timer)."""

    def __init__(self, server: SunSpecDerServer) -> None:
        self.ticked = asyncio.Event()
        tick = server.tick

        async def observed_tick() -> None:
            await tick()
            self.ticked.set()

        server.tick = observed_tick  # type: ignore[method-assign]


async def step_until(rig: Rig, woken: Observed, server: SunSpecDerServer, done, limit_s: float) -> float:
    """Step the rig (0.1 s) until `done()`; after each step let a woken server finish its tick."""
    start = rig.time.mono
    while not done():
        assert rig.time.mono - start < limit_s, f"not within {limit_s} s"
        woken.ticked.clear()
        await rig.step()
        if server._wake is not None and server._wake.is_set():
            await asyncio.wait_for(woken.ticked.wait(), 5)
    return rig.time.mono


def test_a_setting_written_while_the_gateway_starts_is_served_within_a_second_of_ready(tmp_path):
    async def main() -> dict[str, Any]:
        async with Rig(tmp_path, configure=with_der_server) as rig:
            server = rig.assembly.integrations["dispatch.sunspec_server"]
            assert isinstance(server, SunSpecDerServer)
            woken = Observed(server)
            port = await server.start(rig.gateway)
            task = asyncio.create_task(server.run(rig.gateway))
            try:
                rig.bms_on = False  # the gateway is starting: no BMS data yet
                await rig.run(0.5)
                refused_701 = await asyncio.to_thread(controller_writes_once, port)
                refused = server.status.answer
                await rig.run(2.0)  # still starting: nothing has cleared, nothing is asked again
                asked_while_starting = server.reasks

                rig.bms_on = True
                ready_at = await step_until(rig, woken, server, lambda: rig.events(Transition) and any(
                    t.to_state.value == "STANDBY" for t in rig.events(Transition)), 5.0)
                served_at = await step_until(rig, woken, server, lambda: rig.model.wset_w > 0, 5.0)
                await step_until(rig, woken, server, lambda: rig.model.wset_w >= SETPOINT_W, 10.0)
                await rig.run(1.0)
                served_701 = await asyncio.to_thread(read_701, None, port)

                # The owner opts out: the setting ends; revoked, it is served again without a write.
                owner = rig.gateway.owner_settings()
                await rig.gateway.set_owner(replace(owner, opt_out_until=math.inf, received_at=rig.time.mono))
                await rig.run(1.0)
                stopped_w = rig.model.wset_w
                revoked_at = rig.time.mono
                await rig.gateway.set_owner(replace(owner, opt_out_until=None, received_at=rig.time.mono))
                if server._wake is not None and server._wake.is_set():
                    await asyncio.wait_for(woken.ticked.wait(), 5)
                resumed_at = await step_until(rig, woken, server, lambda: rig.model.wset_w > 0, 5.0)
            finally:
                await cancel_all([task])
            answers = rig.events(DispatchAnswer)
            return {"refused_701": refused_701, "refused": refused, "asked_while_starting": asked_while_starting,
                    "ready_at": ready_at, "served_at": served_at, "served_701": served_701, "answers": answers,
                    "stopped_w": stopped_w, "revoked_at": revoked_at, "resumed_at": resumed_at,
                    "reasks": server.reasks}

    got = asyncio.run(asyncio.wait_for(main(), 60))
    assert (got["refused"].verdict, got["refused"].reason) == (Verdict.REJECTED, ReasonCode.NO_DATA)
    assert got["refused_701"]["MnAlrmInfo"].startswith("NO_DATA") and got["refused_701"]["InvSt"] == 2  # STARTING
    assert got["refused_701"]["ThrotPct"] == round(100 * SETPOINT_W / 11_500)
    assert got["asked_while_starting"] == 0
    # Served within one second of becoming ready, the controller having written once.
    assert got["served_at"] - got["ready_at"] <= 1.0
    first_accept = next(a for a in got["answers"] if a.verdict is Verdict.ACCEPTED)
    assert first_accept.at - got["ready_at"] <= 1.0
    assert got["served_701"]["MnAlrmInfo"] is None and got["served_701"]["ThrotSrc"] == 0
    assert got["served_701"]["W"] == pytest.approx(SETPOINT_W, rel=0.01)
    # The owner's opt-out stopped it; revoking it served the same setting again within a second.
    assert got["stopped_w"] == 0 and got["resumed_at"] - got["revoked_at"] <= 1.0
    assert got["reasks"] == 2
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        revisions = [r.payload["revision"] for r in journal.records(RecordKind.DISPATCH_REQUEST)]
        verdicts = [r.payload["verdict"] for r in journal.records(RecordKind.DISPATCH_ANSWER)]
    assert revisions == [0, 1, 2] and verdicts == ["rejected", "accepted", "accepted"]
