"""The OpenADR 2.0b VEN against a real openleadr VTN on 127.0.0.1.

Most tests leave the core out: a scripted sink stands in for it, answering by a
fixed policy and recording everything the VEN handed over, so each test checks
what the VEN translated and what the VTN heard back. Where what the VEN says
depends on what the core serves (power through a modification, the request in
force), `CoreSink` puts the real pure core behind it, on a clock the test moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import io
import itertools
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from firmware_py.sim.ports import free_port
from hypothesis import given
from hypothesis import strategies as st
from openadr_vtn import LOAD_DISPATCH, SIMPLE, LoopbackVtn, make_tls_material
from openleadr import client as openleadr_client
from openleadr import messaging, objects
from ven_harness import CoreSink, Policy, accept, cap_at, opted_out, run, serving

from firmware_py import cli, narration
from firmware_py.assembly import notes
from firmware_py.config import Config, OpenAdrConfig
from firmware_py.core.controller import Controller, StepResult
from firmware_py.core.policy import Policy as CorePolicy
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchEnded,
    DispatchKind,
    DispatchRequest,
    InverterCommand,
    Mode,
    ReasonCode,
    Verdict,
)
from firmware_py.dispatch import Telemetry, openadr_events
from firmware_py.dispatch import openadr as openadr_module
from firmware_py.dispatch.openadr import OpenAdrVen
from firmware_py.dispatch.openadr_events import EventPlan, NotAddressed, request_ids, translate_event
from firmware_py.dispatch.start_delay import start_delay_s
from firmware_py.errors import InputError
from firmware_py.links import Link, LinkBook

RATING_W = 11_500.0
UTC = dt.timezone.utc

class ScriptedSink:
    """Stands in for the core: answers by `policy`, records every item it was given."""

    def __init__(self, policy: Policy = accept, mode: Mode = Mode.STANDBY) -> None:
        self.policy = policy
        self.mode = mode
        self.received: list[DispatchRequest | DispatchCancel] = []
        self.refusal: ReasonCode | None = None  # what the core's telemetry says blocks dispatch now
        self.improvable: frozenset[str] = frozenset()  # what it says a new revision would serve better
        self.served: dict[str, DispatchRequest] = {}  # accepted and not cancelled, the newest last
        self.bms_fresh = True  # False: the core has no fresh BMS data (just started, or the BMS went silent)

    async def submit(self, item: DispatchRequest | DispatchCancel) -> DispatchAnswer | None:
        self.received.append(item)
        if isinstance(item, DispatchCancel):
            self.served.pop(item.id, None)
            return None
        answer = self.policy(item)
        self.served.pop(item.id, None)  # a new revision is the newest request
        if answer.verdict is not Verdict.REJECTED:
            self.served[item.id] = item
        return answer

    def telemetry(self) -> Telemetry:
        # without fresh BMS data, as the core gives it: the last SoC it had, 0 Wh above the floor
        return Telemetry(at=self.now(), mode=self.mode, soc_pct=72.5 if self.bms_fresh else 69.5, floor_pct=40.0,
                         power_w=-1234.0, setpoint_w=0.0, available_wh=40_000.0 if self.bms_fresh else 0.0,
                         active_event_id=self.in_force(), refusal=self.refusal, improvable=tuple(self.improvable),
                         bms_fresh=self.bms_fresh)

    def in_force(self) -> str | None:
        """The request the core would serve, as a stand-in tells it: the newest one accepted in its window
        (the core's ranking by priority is the core's tests' business)."""
        now = self.now()
        return next((r.id for r in reversed(self.served.values()) if r.start <= now < r.end), None)

    def now(self) -> float:
        return time.time()

    def requests(self) -> list[DispatchRequest]:
        return [r for r in self.received if isinstance(r, DispatchRequest)]

    def cancels(self) -> list[DispatchCancel]:
        return [r for r in self.received if isinstance(r, DispatchCancel)]


@pytest.fixture(autouse=True)
def polls_every_50_ms(monkeypatch):
    """The loopback VTN asks for polls as fast as they come (PT0S); the VEN's floor of 0.5 s, which spares
    a real VTN, would only make each test wait for it."""
    monkeypatch.setattr(openadr_module, "MIN_POLL_S", 0.05)


def make_ven(vtn: LoopbackVtn, **changes: Any) -> OpenAdrVen:
    config = replace(OpenAdrConfig(enabled=True, vtn_url=vtn.url, ven_name=vtn.ven_name), **changes)
    return OpenAdrVen(config, RATING_W, retry_max_s=1.0)


def in_seconds(seconds: float) -> dt.datetime:
    return dt.datetime.now(UTC) + dt.timedelta(seconds=seconds)


async def registered(vtn: LoopbackVtn, ven: OpenAdrVen) -> None:
    await vtn.wait_for_registration()
    await vtn.wait_for(lambda: ven.registered)


@contextlib.asynccontextmanager
async def enrolled(sink: ScriptedSink | CoreSink, *, vtn_options: dict[str, Any] | None = None,
                   **ven_changes: Any) -> AsyncIterator[tuple[LoopbackVtn, OpenAdrVen]]:
    """A loopback VTN polled as fast as it likes, and the VEN registered with it, serving `sink`."""
    async with LoopbackVtn(poll_s=0, **(vtn_options or {})) as vtn:
        ven = make_ven(vtn, **ven_changes)
        async with serving(ven, sink):
            await registered(vtn, ven)
            yield vtn, ven


def test_registers_and_reports_telemetry_at_the_interval_the_vtn_asks() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(mode=Mode.DISCHARGE)
        sink.refusal = ReasonCode.OUTAGE
        async with enrolled(sink, vtn_options=dict(report_s=1)) as (vtn, ven):
            assert vtn.registrations[0]["ven_name"] == "truck-1"
            wanted = {"RealPower", "stateOfCharge", "availableEnergy", "gatewayState", "committedPower",
                      "dispatchBlocked"}
            await vtn.wait_for(lambda: wanted <= {r.measurement for r in vtn.reports})
        latest = {r.measurement: r.value for r in vtn.reports}
        assert latest["RealPower"] == -1234.0
        assert latest["stateOfCharge"] == 72.5
        assert latest["availableEnergy"] == 40_000.0
        assert latest["gatewayState"] == 2
        assert latest["committedPower"] == 0.0
        assert latest["dispatchBlocked"] == 4  # OUTAGE: why an event would not be followed now

    run(scenario)


def test_telemetry_without_fresh_bms_data_reports_no_state_of_charge_nor_available_energy() -> None:
    """Right after a restart, or with the BMS silent, the core knows neither the SoC nor the energy above
    the floor: the telemetry report gives nothing for them (not the last SoC the BMS sent, nor 0 Wh as if
    the pack were empty), and gives them again once the data is fresh."""
    async def scenario() -> None:
        sink = ScriptedSink()
        sink.bms_fresh = False
        async with enrolled(sink, vtn_options=dict(report_s=1)) as (vtn, ven):
            await vtn.wait_for(lambda: sum(r.measurement == "RealPower" for r in vtn.reports) >= 2)
            measured = {r.measurement for r in vtn.reports}
            assert {"RealPower", "gatewayState"} <= measured
            assert not {"stateOfCharge", "availableEnergy"} & measured
            sink.bms_fresh = True
            await vtn.wait_for(lambda: {"stateOfCharge", "availableEnergy"} <= {r.measurement for r in vtn.reports})
        latest = {r.measurement: r.value for r in vtn.reports}
        assert latest["stateOfCharge"] == 72.5 and latest["availableEnergy"] == 40_000.0

    run(scenario)


def test_an_unknown_ven_name_is_not_registered() -> None:
    async def scenario() -> None:
        async with LoopbackVtn(poll_s=0, ven_name="truck-1") as vtn:
            config = OpenAdrConfig(enabled=True, vtn_url=vtn.url, ven_name="someone-else")
            ven = OpenAdrVen(config, RATING_W, retry_max_s=0.5)
            async with serving(ven, ScriptedSink()) as task:
                await vtn.wait_for(lambda: len(vtn.refused_registrations) >= 2)  # it keeps retrying
                assert not task.done()
            assert not ven.registered
            assert set(vtn.refused_registrations) == {"someone-else"}

    run(scenario)


def test_load_dispatch_event_accepted_becomes_a_discharge_request() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            start = in_seconds(60)
            event_id = vtn.add_event(LOAD_DISPATCH, start, 600, 5.0)   # 5 kW
            assert await vtn.wait_for_response(event_id) == "optIn"
        [request] = sink.requests()
        assert request.id == event_id
        assert request.source == "openadr"
        assert request.kind is DispatchKind.DISCHARGE
        assert request.target_w == pytest.approx(5000.0)
        assert request.start == pytest.approx(start.timestamp(), abs=1e-3)
        assert request.end == pytest.approx(start.timestamp() + 600, abs=1e-3)
        assert request.revision == 0

    run(scenario)


def test_an_events_priority_crosses_the_wire_onto_its_request() -> None:
    """The core serves the highest-priority of one VTN's overlapping events: the VEN must hand it on."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            ranked = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 5.0, priority=2)
            unranked = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 3.0)
            for event_id in (ranked, unranked):
                assert await vtn.wait_for_response(event_id) == "optIn"
        assert {r.id: r.priority for r in sink.requests()} == {ranked: 2, unranked: None}

    run(scenario)


def test_a_randomised_start_crosses_the_wire_and_moves_the_request_by_this_vens_delay() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            start = in_seconds(60)
            event_id = vtn.add_event(LOAD_DISPATCH, start, 600, 5.0, startafter_s=300)
            assert await vtn.wait_for_response(event_id) == "optIn"
        [request] = sink.requests()
        delay = start_delay_s(vtn.ven_name, event_id, 300.0)
        assert request.start == pytest.approx(start.timestamp() + delay, abs=1e-3)
        assert request.end - request.start == pytest.approx(600, abs=1e-3)

    run(scenario)


def test_an_event_the_vtn_drops_as_completed_is_no_cancellation_of_its_randomised_tail() -> None:
    """A VTN stops distributing an event once its own schedule is over; this VEN, having started it a delay
    later, still runs it: the event missing from the distribution must not cut that tail short."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            start = in_seconds(60)
            late = vtn.add_event(LOAD_DISPATCH, start, 600, 5.0, startafter_s=1_800, event_id="late-start")
            assert await vtn.wait_for_response(late) == "optIn"
            delay = start_delay_s(vtn.ven_name, late, 1_800.0)
            assert delay > 60  # the tail outlasts the VTN's schedule by more than the clock is moved
            vtn_end, tail_start = start.timestamp() + 600, start.timestamp() + delay
            in_tail = max(vtn_end, tail_start) + 30  # the VTN's window is over, this VEN's is not
            sink.now = lambda: in_tail  # type: ignore[method-assign]
            vtn.withdraw_event(late)
            newer = vtn.add_event(LOAD_DISPATCH, in_seconds(3_600), 600, 4.0)
            assert await vtn.wait_for_response(newer) == "optIn"  # a distribution after the withdrawal
            assert ven.committed_w() == 5000.0  # the tail is still tracked: reported, asked again for
        assert sink.cancels() == [] and ven.implicit_cancellations == 0

    run(scenario)


def test_a_test_event_is_opted_in_and_nothing_reaches_the_core() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 5.0, test_event=True)
            assert await vtn.wait_for_response(event_id) == "optIn"
        assert sink.requests() == []

    run(scenario)


def test_several_intervals_become_one_request_each() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            start = in_seconds(30)
            event_id = vtn.add_event(LOAD_DISPATCH, start, [300, 600], [7.2, 0.0])
            assert await vtn.wait_for_response(event_id) == "optIn"
        first, second = sink.requests()
        assert (first.id, second.id) == (f"{event_id}#0", f"{event_id}#1")
        assert (first.kind, first.target_w) == (DispatchKind.DISCHARGE, pytest.approx(7200.0))
        assert (second.kind, second.target_w) == (DispatchKind.STOP, 0.0)
        assert second.start == pytest.approx(first.end)
        assert second.end == pytest.approx(start.timestamp() + 900, abs=1e-3)

    run(scenario)


def test_simple_level_maps_to_a_share_of_the_rating() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink, simple_levels_pct=[25.0, 50.0, 90.0]) as (vtn, ven):
            event_id = vtn.add_event(SIMPLE, in_seconds(30), 600, 2)
            assert await vtn.wait_for_response(event_id) == "optIn"
        [request] = sink.requests()
        assert request.target_w == pytest.approx(0.5 * RATING_W)

    run(scenario)


def test_capped_event_opts_in_and_reports_the_cap() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(cap_at(3000.0))
        async with enrolled(sink, vtn_options=dict(report_s=1)) as (vtn, ven):
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 9.0)   # running now
            assert await vtn.wait_for_response(event_id) == "optIn"
            await vtn.wait_for(lambda: any(r.measurement == "committedPower" and r.value == 3000.0
                                           for r in vtn.reports))
        outcome = ven.outcomes[-1]
        assert (outcome.event_id, outcome.opt, outcome.cap_w) == (event_id, "optIn", 3000.0)
        assert sink.requests()[0].target_w == pytest.approx(9000.0)

    run(scenario)


def test_event_refused_while_opted_out() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(opted_out)
        async with enrolled(sink) as (vtn, ven):
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(30), 600, 5.0)
            assert await vtn.wait_for_response(event_id) == "optOut"
        assert len(sink.requests()) == 1
        assert ven.outcomes[-1].answers[0].reason is ReasonCode.OPTED_OUT

    run(scenario)


def test_invalid_event_is_refused_without_reaching_the_core() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(30), 600, -4.0)
            assert await vtn.wait_for_response(event_id) == "optOut"
            # the link survives the bad event: the next one is served
            good_id = vtn.add_event(LOAD_DISPATCH, in_seconds(30), 600, 4.0)
            assert await vtn.wait_for_response(good_id) == "optIn"
        assert [r.id for r in sink.requests()] == [good_id]
        refusal = ven.outcomes[0].answers[0]
        assert refusal.reason is ReasonCode.INVALID and "-4000" in refusal.detail

    run(scenario)


def test_cancellation_mid_event_cancels_the_request() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            assert await vtn.wait_for_response(event_id, 0) == "optIn"
            vtn.cancel_event(event_id)
            assert await vtn.wait_for_response(event_id, 1) == "optIn"
        assert [(c.id, c.source) for c in sink.cancels()] == [(event_id, "openadr")]
        assert len(sink.requests()) == 1

    run(scenario)


def test_an_event_missing_from_a_later_complete_distribution_is_cancelled_with_that_reason() -> None:
    """OpenADR 2.0b implicit cancellation: the VTN stops distributing an event without cancelling it."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            gone = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            kept = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 3.0)
            assert await vtn.wait_for_response(gone) == "optIn" and await vtn.wait_for_response(kept) == "optIn"
            vtn.withdraw_event(gone)
            await vtn.wait_for(lambda: sink.cancels())
            newer = vtn.add_event(LOAD_DISPATCH, in_seconds(120), 600, 4.0)
            assert await vtn.wait_for_response(newer) == "optIn"
        [cancel] = sink.cancels()
        assert (cancel.id, cancel.source) == (gone, "openadr") and "implicitly cancelled" in cancel.reason
        assert [r.id for r in sink.requests()] == [gone, kept, newer]  # the one kept is not asked again
        assert ven.implicit_cancellations == 1 and "implicitly cancelled" in ven.outcomes[-2].detail

    run(scenario)


def test_an_event_listed_again_unchanged_after_its_implicit_cancellation_is_served_again() -> None:
    """The VTN's times are placed on the gateway's clock once, at reception. Placed again when the withdrawn
    event came back, a wall-to-monotonic conversion that is off by a microsecond (the production clock's is)
    made requests differ from the ones the core cancelled, and it refused them as DUPLICATE."""
    offsets = itertools.count()

    def drifting(moment: dt.datetime) -> float:
        return moment.timestamp() + next(offsets) * 1e-6  # each conversion a microsecond further off

    async def scenario() -> None:
        sink = CoreSink()
        async with LoopbackVtn(poll_s=0) as vtn:
            config = OpenAdrConfig(enabled=True, vtn_url=vtn.url, ven_name=vtn.ven_name)
            ven = OpenAdrVen(config, RATING_W, retry_max_s=1.0, to_gateway_time=drifting)
            async with serving(ven, sink):
                await registered(vtn, ven)
                event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(30), 600, 5.0)
                assert await vtn.wait_for_response(event_id) == "optIn"
                event = vtn._event(event_id)
                vtn.withdraw_event(event_id)
                await vtn.wait_for(lambda: ven.implicit_cancellations == 1)
                answered = len(vtn.responses)
                vtn.server.events[vtn.ven_id].append(event)  # listed again, same modificationNumber
                vtn._requeue(event)
                await vtn.wait_for(lambda: len(vtn.responses) > answered)
                assert vtn.responses[-1].opt_type == "optIn", ven.outcomes[-1].detail
        first, again = [r for r in sink.received if isinstance(r, DispatchRequest)]
        assert (again.id, again.start, again.end) == (first.id, first.start, first.end)

    run(scenario)


def test_a_complete_distribution_of_no_events_cancels_the_last_event_held() -> None:
    """A VTN withdrawing a VEN's only event sends an oadrDistributeEvent of no events (the 2.0b schema
    allows none); openleadr does not hand such a distribution on, and the event ran on, uncancelled."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            only = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            assert await vtn.wait_for_response(only) == "optIn"
            vtn.withdraw_event(only)
            await vtn.wait_for(lambda: sink.cancels())
        [cancel] = sink.cancels()
        assert (cancel.id, cancel.source) == (only, "openadr") and "implicitly cancelled" in cancel.reason
        assert ven.implicit_cancellations == 1

    run(scenario)


def test_an_event_refused_in_its_active_period_is_asked_again_once_the_core_would_serve_it() -> None:
    def no_data(request: DispatchRequest) -> DispatchAnswer:
        return DispatchAnswer(request.id, time.time(), Verdict.REJECTED, reason=ReasonCode.NO_DATA, detail="start")

    async def scenario() -> None:
        sink = ScriptedSink(no_data)
        async with enrolled(sink) as (vtn, ven):
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            assert await vtn.wait_for_response(event_id) == "optOut"
            sink.policy, sink.improvable = accept, frozenset({event_id})
            await vtn.wait_for(lambda: len(sink.requests()) == 2)
            sink.improvable = frozenset()
            await vtn.wait_for(lambda: ven.committed_w() == 5_000.0)
        first, again = sink.requests()
        assert (again.id, again.revision, again.target_w) == (first.id, first.revision + 1, first.target_w)
        assert ven.reasks == 1 and ven.outcomes[-1].opt == "optIn"
        assert ven.client.responded_events.get(event_id) in (None, "optIn")  # a redistribution says optIn

    run(scenario)


def test_committed_power_drops_when_the_core_ends_the_request_and_returns_when_it_is_asked_again() -> None:
    """The owner's opt-out ends an accepted event in the core: committedPower went on saying 5,000 W
    while the gateway served nothing."""
    before, after = Controller.start(CorePolicy()), Controller.start(CorePolicy())  # two owners: a change

    def ended(request_id: str) -> StepResult:
        return StepResult(before, InverterCommand(0.0, "test"),
                          [DispatchEnded(time.time(), request_id, "owner opted out")], None)

    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            assert await vtn.wait_for_response(event_id) == "optIn"
            assert ven.committed_w() == 5_000.0
            ven.notice_step(ended(event_id))
            assert ven.committed_w() == 0.0
            sink.improvable = frozenset({event_id})  # the opt-out revoked: the core would serve it again
            ven.notice_step(StepResult(after, InverterCommand(0.0, "test"), [], None))
            await vtn.wait_for(lambda: ven.committed_w() == 5_000.0)

    run(scenario)


def every_answer(vtn: LoopbackVtn) -> list[tuple[str, str]]:
    """(event id, opt) of every oadrCreatedEvent answer the VTN receives from now on: its `responses` keep only
    the first answer to each modification (openleadr calls an event's callback once)."""
    heard: list[tuple[str, str]] = []
    service = vtn.server.services["event_service"]
    created = service.handlers["oadrCreatedEvent"]

    async def tap(payload: dict[str, Any]) -> Any:
        heard.extend((r["event_id"], r["opt_type"]) for r in payload.get("event_responses", []))
        return await created(payload)

    service.handlers["oadrCreatedEvent"] = tap
    return heard


def test_an_event_whose_power_is_refused_is_opt_out_though_its_0_kw_interval_is_taken() -> None:
    """The core takes a 0 kW interval (a stop) whatever its state: 5 kW then 0 kW with the owner opted out was
    answered optIn for the stop alone, while the VEN reported the dispatch blocked. An event of stops only is
    served by stopping: optIn."""
    def as_the_core(request: DispatchRequest) -> DispatchAnswer:
        return accept(request) if request.kind is DispatchKind.STOP else opted_out(request)

    async def scenario() -> None:
        sink = ScriptedSink(as_the_core)
        async with enrolled(sink) as (vtn, ven):
            refused = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), [600, 600], [5.0, 0.0])
            stops = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 0.0)
            assert await vtn.wait_for_response(refused) == "optOut"
            assert await vtn.wait_for_response(stops) == "optIn"

    run(scenario)


def test_an_event_the_owners_opt_out_ended_is_answered_opt_out_and_opt_in_once_asked_again() -> None:
    """openleadr answers every later distribution of an event with the opt on record: after the owner's
    opt-out ended the event's only interval in the core, the VTN went on hearing optIn for it."""
    before, after = Controller.start(CorePolicy()), Controller.start(CorePolicy())  # two owners: a change

    def ended(request_id: str) -> StepResult:
        return StepResult(before, InverterCommand(0.0, "test"),
                          [DispatchEnded(time.time(), request_id, "owner opted out")], None)

    async def redistributed(vtn: LoopbackVtn, heard: list[tuple[str, str]], *event_ids: str) -> dict[str, str]:
        """What the VEN answers when the VTN distributes its events again (it does on each new event)."""
        del heard[:]
        vtn.add_event(LOAD_DISPATCH, in_seconds(3_600), 600, 3.0)
        await vtn.wait_for(lambda: set(event_ids) <= {event_id for event_id, _ in heard})
        return {event_id: opt for event_id, opt in heard if event_id in event_ids}

    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            heard = every_answer(vtn)
            one = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            two = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), [600, 600], [4.0, 4.0])
            stops = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), [600, 600], [4.0, 0.0])
            assert await vtn.wait_for_response(one) == await vtn.wait_for_response(two) == "optIn"
            assert await vtn.wait_for_response(stops) == "optIn"
            ven.notice_step(ended(one))
            ven.notice_step(ended(f"{two}#0"))  # its second interval is still served
            ven.notice_step(ended(f"{stops}#0"))  # its second interval, 0 kW, serves nothing
            assert await redistributed(vtn, heard, one, two, stops) == {one: "optOut", two: "optIn", stops: "optOut"}
            sink.improvable = frozenset({one})  # the opt-out revoked: the core would serve it again
            ven.notice_step(StepResult(after, InverterCommand(0.0, "test"), [], None))
            await vtn.wait_for(lambda: ven.reasks == 1)
            sink.improvable = frozenset()
            assert await redistributed(vtn, heard, one) == {one: "optIn"}

    run(scenario)


def test_modification_sends_a_new_revision_and_withdraws_dropped_intervals() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            start = in_seconds(60)
            event_id = vtn.add_event(LOAD_DISPATCH, start, 600, [5.0, 6.0])
            assert await vtn.wait_for_response(event_id, 0) == "optIn"
            number = vtn.modify_event(event_id, values=[6.0, 4.0])
            assert await vtn.wait_for_response(event_id, number) == "optIn"
            number = vtn.modify_event(event_id, values=[3.0], duration_s=900)
            assert await vtn.wait_for_response(event_id, number) == "optIn"
        requests = sink.requests()
        assert [(r.id, r.revision, r.target_w) for r in requests] == [
            (f"{event_id}#0", 0, 5000.0), (f"{event_id}#1", 0, 6000.0),
            (f"{event_id}#0", 1, 6000.0), (f"{event_id}#1", 1, 4000.0),
            (event_id, 2, 3000.0)]
        assert sorted(c.id for c in sink.cancels()) == [f"{event_id}#0", f"{event_id}#1"]
        assert sink.received.index(sink.cancels()[0]) > sink.received.index(requests[-1])  # no break between them
        assert requests[-1].end == pytest.approx(start.timestamp() + 900, abs=1e-3)

    run(scenario)


def test_a_modification_moving_a_running_interval_to_another_id_serves_it_on_without_a_break() -> None:
    """An event of one interval given a second moves the first from EVENT to EVENT#0: the VEN cancelled EVENT
    before asking for EVENT#0, so the gateway fell to 0 W and ramped up again, and the journal showed a
    cancellation the VTN never sent."""
    async def scenario() -> None:
        sink = CoreSink()
        async with enrolled(sink) as (vtn, ven):
            sink.observers.append(ven.notice_step)
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(-60), 600, 5.0)
            assert await vtn.wait_for_response(event_id) == "optIn"
            sink.run(60)
            assert sink.applied_w == 5_000.0
            before = len(sink.setpoints)
            number = vtn.modify_event(event_id, values=[5.0, 5.0], duration_s=600)  # the first interval unchanged
            assert await vtn.wait_for_response(event_id, number) == "optIn"
            sink.run(5)
            assert min(sink.setpoints[before:]) == 5_000.0 and sink.c.serving_id == f"{event_id}#0"
            assert ven.committed_w() == 5_000.0
        assert [type(i).__name__ for i in sink.received[-3:]] == ["DispatchRequest", "DispatchRequest",
                                                                  "DispatchCancel"]
        assert sink.ended(event_id).reason == f"cancelled by openadr: dropped by the event's modification {number}"
        assert sink.final(event_id).meter_wh > 80  # a minute at 5 kW: its energy stays its own, billed

    run(scenario)


def test_a_modification_that_ends_the_running_interval_ends_its_request() -> None:
    """A modification cut the running interval short, to an end already past: its id stayed in the event's list,
    so it was never counted as dropped, and the core went on discharging at its old power to its old end, with
    committedPower saying 0 W. It is now ended: nothing is served until the next interval begins."""
    async def scenario() -> None:
        sink = CoreSink()
        async with enrolled(sink) as (vtn, ven):
            sink.observers.append(ven.notice_step)
            start = in_seconds(-60)
            event_id = vtn.add_event(LOAD_DISPATCH, start, [600, 600], [5.0, 3.0])
            assert await vtn.wait_for_response(event_id) == "optIn"
            sink.run(5)
            assert sink.c.serving_id == f"{event_id}#0" and sink.applied_w == 5_000.0
            # the first interval over 30 s after its start, the second moved to begin in 5 minutes: nothing now
            number = vtn.modify_event(event_id, duration_s=[30, 300], starts=[start, in_seconds(300)])
            assert await vtn.wait_for_response(event_id, number) == "optIn"
            sink.run(5)
            assert sink.applied_w == 0.0 and sink.c.serving_id is None and ven.committed_w() == 0.0
        assert sink.ended(f"{event_id}#0").reason == \
            f"cancelled by openadr: ended by the event's modification {number}"

    run(scenario)


def test_committed_power_is_the_request_in_force_not_the_sum_of_overlapping_events() -> None:
    """Two overlapping events, 9 kW at priority 1 and 3 kW at priority 5: the core serves the first, and
    committedPower said 12,000 W."""
    async def scenario() -> None:
        sink = CoreSink()
        async with enrolled(sink, vtn_options=dict(report_s=1)) as (vtn, ven):
            sink.observers.append(ven.notice_step)
            high = vtn.add_event(LOAD_DISPATCH, in_seconds(-60), 600, 9.0, priority=1)
            low = vtn.add_event(LOAD_DISPATCH, in_seconds(-60), 600, 3.0, priority=5)
            assert await vtn.wait_for_response(high) == await vtn.wait_for_response(low) == "optIn"
            sink.run(1)
            assert sink.telemetry().active_event_id == high
            reported = len(vtn.reports)
            await vtn.wait_for(lambda: [r for r in vtn.reports[reported:] if r.measurement == "committedPower"])
            assert [r.value for r in vtn.reports[reported:] if r.measurement == "committedPower"] == [9_000.0]
            vtn.cancel_event(high)
            assert await vtn.wait_for_response(high, 1) == "optIn"
            sink.run(1)
            assert sink.telemetry().active_event_id == low and ven.committed_w() == 3_000.0
            await sink.submit(DispatchRequest("site-1", "sunspec", DispatchKind.DISCHARGE, 2_000.0, sink.t,
                                              sink.t + 600, received_at=sink.t))  # another source's, received last
            assert sink.telemetry().active_event_id == "site-1" and ven.committed_w() == 0.0

    run(scenario)


def test_vtn_going_away_keeps_the_accepted_window_and_polling_resumes(caplog) -> None:
    """The VTN link heals by itself: told once when lost, once when back, and served again."""
    links = LinkBook(time.monotonic)

    async def scenario() -> None:
        async with LoopbackVtn(poll_s=0) as vtn:
            config = OpenAdrConfig(enabled=True, vtn_url=vtn.url, ven_name=vtn.ven_name)
            ven = OpenAdrVen(config, RATING_W, retry_max_s=1.0, link=links.handle(Link.OPENADR))
            sink = ScriptedSink(accept)
            async with serving(ven, sink) as task:
                await registered(vtn, ven)
                event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
                assert await vtn.wait_for_response(event_id) == "optIn"
                window = (sink.requests()[0].start, sink.requests()[0].end)
                await vtn.stop()
                await vtn.wait_for(lambda: ven.failed_polls >= 3, timeout_s=8.0)
                assert not task.done()
                assert sink.cancels() == []
                assert not links.view(time.monotonic())["openadr"]["ok"]
                await vtn.start()
                later_id = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 2.0)
                assert await vtn.wait_for_response(later_id, timeout_s=8.0) == "optIn"
                assert links.view(time.monotonic())["openadr"]["ok"]
        first, second = sink.requests()
        assert (first.id, (first.start, first.end)) == (event_id, window)
        assert second.id == later_id
        assert sink.cancels() == []

    with caplog.at_level(logging.INFO, logger="firmware_py"):
        run(scenario)
    told = [r.getMessage() for r in caplog.records if r.name == "firmware_py.links"]
    assert [m.split(":")[0] for m in told] == ["link lost", "link recovered"], told
    assert "openadr" in told[0] and "unreachable" in told[0]


@pytest.mark.slow  # each waits out a VTN timeout (2-3 s)
@pytest.mark.parametrize("answer", ["empty", "trickle", "endless"])
def test_a_vtn_answering_nothing_or_a_byte_at_a_time_is_unreachable_and_the_ven_keeps_trying(monkeypatch,
                                                                                            answer) -> None:
    """An empty 200 used to end the VEN's task (openleadr gives None, which did not unpack); a VTN that
    sends a byte every few seconds was never timed out (openleadr bounds each read, not the exchange);
    one that sends without end was read into memory until it stopped (openleadr caps no answer)."""
    from aiohttp import web

    from firmware_py.dispatch import openadr, vtn_answers

    monkeypatch.setattr(openadr, "VTN_REQUEST_S", 5.0 if answer == "endless" else 0.3)  # endless: the cap ends it
    monkeypatch.setattr(vtn_answers, "MAX_ANSWER_BYTES", 64 * 1024)
    sent = [0]  # bytes an endless VTN got out before the VEN hung up

    async def vtn(request: web.Request) -> web.StreamResponse:
        await request.read()
        if answer == "empty":
            return web.Response(status=200, body=b"")
        response = web.StreamResponse(status=200)
        if answer == "endless":  # as fast as it can, chunked, never done
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                while sent[0] < 64 * 1024 * 1024:
                    await response.write(b"<" * 65_536)
                    sent[0] += 65_536
            return response
        response.content_length = 10_000
        await response.prepare(request)
        while True:
            await response.write(b" ")
            await asyncio.sleep(0.1)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", vtn)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        links = LinkBook(time.monotonic)
        config = OpenAdrConfig(enabled=True, vtn_url=f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b",
                               ven_name="truck-1")
        ven = OpenAdrVen(config, RATING_W, retry_max_s=0.2, link=links.handle(Link.OPENADR))
        try:
            async with serving(ven, ScriptedSink(accept)) as task:
                deadline = time.monotonic() + 10
                while ven.registration_attempts < 3:
                    assert not task.done(), task.exception()
                    assert time.monotonic() < deadline, "the VEN stopped trying"
                    await asyncio.sleep(0.05)
                assert not task.done() and not ven.registered
                assert not links.view(time.monotonic())["openadr"]["ok"]
                assert sent[0] < 3 * 8 * 1024 * 1024  # each answer dropped near the cap, not read to its end
        finally:
            await runner.cleanup()

    run(scenario)


@pytest.mark.slow  # about 7 s: it waits out real exchange timeouts against a listener that never answers
def test_reports_queued_while_the_vtn_link_stalls_keep_only_the_newest(monkeypatch, caplog) -> None:
    """A half-open link (the VTN's address accepts connections and never answers) held each report for a whole
    exchange timeout while new ones came every second: openleadr's queue grew without bound, and the stale
    backlog went to the VTN when the link healed."""
    monkeypatch.setattr(openadr_module, "VTN_REQUEST_S", 3.0)  # 30 s in service: reports (1 s) outpace the sends
    monkeypatch.setattr(openadr_module, "REPORTS_KEPT", 2)
    held: list[asyncio.StreamWriter] = []
    healed = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered, until the test ends
        await healed.wait()

    async def scenario() -> None:
        vtn = LoopbackVtn(poll_s=0, report_s=1)
        await vtn.start()
        ven = make_ven(vtn)
        async with serving(ven, ScriptedSink(accept)) as task:
            await registered(vtn, ven)
            await vtn.wait_for(lambda: vtn.reports)
            port = vtn._port
            await vtn.stop()
            stalled = await asyncio.start_server(stall, "127.0.0.1", port, reuse_address=True)
            try:
                queue = ven.client.pending_reports
                await vtn.wait_for(lambda: queue.qsize() > 2 or getattr(ven, "reports_dropped", 0) >= 2,
                                   timeout_s=20.0)
                assert queue.qsize() <= 2 and ven.reports_dropped >= 2
                assert not task.done()
            finally:
                healed.set()
                stalled.close()
                for writer in held:
                    writer.close()

    with caplog.at_level(logging.WARNING, logger="firmware_py"):
        run(scenario)
    told = [r.getMessage() for r in caplog.records if "reports are not reaching the VTN" in r.getMessage()]
    assert len(told) == 1, told


def test_a_vtn_listing_a_cancelled_event_again_costs_no_other_event_its_answer() -> None:
    """openleadr looked up its answer to an event it knew, and the answer went with the event's cancellation:
    the KeyError made it opt out of every event of the distribution, and a new one never reached the core."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            cancelled = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            assert await vtn.wait_for_response(cancelled) == "optIn"
            running = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 2.0)
            assert await vtn.wait_for_response(running) == "optIn"
            event = vtn._event(cancelled)
            vtn.cancel_event(cancelled)
            await vtn.wait_for(lambda: any(c.id == cancelled for c in sink.cancels()))
            await vtn.wait_for(lambda: event not in vtn.server.events[vtn.ven_id])
            vtn.server.events[vtn.ven_id].append(event)  # its confirmation lost, the VTN lists it again
            later = vtn.add_event(LOAD_DISPATCH, in_seconds(30), 600, 3.0)
            assert await vtn.wait_for_response(later) == "optIn"
            assert vtn.opt_for(running) == "optIn"
        assert [r.id for r in sink.requests()] == [cancelled, running, later]

    run(scenario)


def test_vtn_asking_to_register_again_gets_a_new_registration_and_no_duplicate_request() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            assert await vtn.wait_for_response(event_id) == "optIn"
            vtn.forget_registration()
            await vtn.wait_for(lambda: len(vtn.registrations) >= 2 and vtn.ven_id and ven.registered)
            later_id = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 2.0)
            assert await vtn.wait_for_response(later_id) == "optIn"
        assert [r.id for r in sink.requests()] == [event_id, later_id]
        assert sink.cancels() == []

    run(scenario)


def test_a_vtn_restored_without_the_ven_that_refuses_its_old_id_registers_it_as_a_new_ven() -> None:
    """A VTN that lost its VEN records may refuse a registration naming a VEN id it does not know (2.0b's
    452 Invalid ID); the VEN offered its old id at every attempt and stayed unregistered for good."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            register = vtn._on_create_party_registration
            offered: list[str | None] = []

            def strict(payload: dict[str, Any]) -> tuple[str, str] | bool:
                offered.append(payload.get("ven_id"))
                return False if payload.get("ven_id") not in (None, vtn.ven_id) else register(payload)

            vtn.server.add_handler("on_create_party_registration", strict)
            vtn.forget_registration()
            await vtn.wait_for(lambda: vtn.ven_id and ven.registered)
            later_id = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 2.0)
            assert await vtn.wait_for_response(later_id) == "optIn"
        assert offered == ["ven-truck-1", None]
        assert [r.id for r in sink.requests()] == [later_id]

    run(scenario)


def test_vtn_cancelling_the_registration_gets_a_new_registration_and_later_events_are_answered() -> None:
    """openleadr's answer to oadrCancelPartyRegistration set the report structures to None, and the VEN's
    next registration failed on them: its task ended until the service restarted it."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            poll = vtn.server.services["poll_service"]
            answer_poll = poll.handlers["oadrPoll"]
            cancelled: list[str] = []

            async def cancel_once(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
                if cancelled:
                    return await answer_poll(payload)
                cancelled.append(ven.client.registration_id)
                return "oadrCancelPartyRegistration", {"request_id": "cancel-1", "ven_id": vtn.ven_id,
                                                       "registration_id": cancelled[0]}

            poll.handlers["oadrPoll"] = cancel_once
            await vtn.wait_for(lambda: cancelled and ven.registration_attempts >= 2 and ven.registered)
            later_id = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 2.0)
            assert await vtn.wait_for_response(later_id) == "optIn"
            assert len(vtn.registrations) >= 2
            assert ven.client.reports and ven.client.pending_reports is not None  # reports offered still
        assert [r.id for r in sink.requests()] == [later_id]

    run(scenario)


def test_tls_and_signatures_registration_and_event(tmp_path: Any) -> None:
    tls = make_tls_material(tmp_path / "pki")

    async def scenario() -> None:
        async with LoopbackVtn(poll_s=0, tls=tls) as vtn:
            assert vtn.url.startswith("https://127.0.0.1:")
            ven = make_ven(vtn, cert=str(tls.ven_cert), key=str(tls.ven_key), ca_file=str(tls.ca_file),
                           vtn_fingerprint=tls.vtn_fingerprint)
            sink = ScriptedSink(accept)
            async with serving(ven, sink):
                await registered(vtn, ven)
                event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 5.0)
                assert await vtn.wait_for_response(event_id) == "optIn"
        assert vtn.registrations[0]["fingerprint"] == tls.ven_fingerprint
        assert [r.target_w for r in sink.requests()] == [5000.0]

    run(scenario)


def test_tls_vtn_with_the_wrong_fingerprint_is_ignored_and_the_log_says_why(tmp_path: Any) -> None:
    """With logging set up as `run` does, the link's one line said only "cannot register", as for a VTN
    that refuses this VEN: openleadr's words (the fingerprints) were held back with its chatter."""
    tls = make_tls_material(tmp_path / "pki")
    said = io.StringIO()
    narration.configure_logging(stream=said)

    async def scenario() -> None:
        async with LoopbackVtn(poll_s=0, tls=tls) as vtn:
            config = replace(OpenAdrConfig(enabled=True, vtn_url=vtn.url, ven_name=vtn.ven_name),
                             cert=str(tls.ven_cert), key=str(tls.ven_key), ca_file=str(tls.ca_file),
                             vtn_fingerprint=tls.ven_fingerprint)  # not the VTN's
            ven = OpenAdrVen(config, RATING_W, retry_max_s=1.0, link=LinkBook(time.monotonic).handle(Link.OPENADR))
            async with serving(ven, ScriptedSink(accept)) as task:
                await vtn.wait_for(lambda: ven.registration_attempts >= 2)
                assert not task.done()
        assert not ven.registered
        assert vtn.registrations == []   # the VTN's signed answers were refused before registering

    run(scenario)
    (lost,) = [line for line in said.getvalue().splitlines() if "link lost: openadr" in line]
    assert "cannot register with https://127.0.0.1:" in lost and "(The certificate fingerprint was incorrect" in lost
    assert "openleadr" not in said.getvalue().replace(lost, "")  # its own lines stay out of the log


def refused_link_line(tls: Any, cert: Path, key: Path) -> str:
    """The `link lost: openadr` line of a VEN showing `cert` to the mutual-TLS VTN of `tls`, which refuses it."""
    said = io.StringIO()
    narration.configure_logging(stream=said)

    async def scenario() -> None:
        async with LoopbackVtn(poll_s=0, tls=tls) as vtn:
            config = replace(OpenAdrConfig(enabled=True, vtn_url=vtn.url, ven_name=vtn.ven_name),
                             cert=str(cert), key=str(key), ca_file=str(tls.ca_file),
                             vtn_fingerprint=tls.vtn_fingerprint)
            ven = OpenAdrVen(config, RATING_W, retry_max_s=1.0, link=LinkBook(time.monotonic).handle(Link.OPENADR))
            async with serving(ven, ScriptedSink(accept)):
                await vtn.wait_for(lambda: ven.registration_attempts >= 1 and "link lost" in said.getvalue())
        assert vtn.registrations == []

    run(scenario)
    (lost,) = [line for line in said.getvalue().splitlines() if "link lost: openadr" in line]
    return lost


def test_an_expired_gateway_certificate_is_named_in_the_link_cause_and_pointed_out_at_the_start(tmp_path, capsys):
    """The VTN refuses the handshake of a VEN whose certificate expired, and the link said only "Connection
    reset by peer". Not refused at the start: dispatch is the aggregator's, the pack's protection is not."""
    tls = make_tls_material(tmp_path / "pki", ven_expired=True)
    lost = refused_link_line(tls, tls.ven_cert, tls.ven_key)
    assert "(dispatch.openadr.cert: the gateway's certificate expired on " in lost, lost
    config = tmp_path / "gateway.toml"
    config.write_text(f'[dispatch.openadr]\nenabled = true\nvtn_url = "https://127.0.0.1:9/OpenADR2/Simple/2.0b"\n'
                      f'cert = "{tls.ven_cert}"\nkey = "{tls.ven_key}"\nca_file = "{tls.ca_file}"\n')
    assert cli.main(["check-config", str(config)]) == 0
    err = capsys.readouterr().err
    assert f"note: dispatch.openadr.cert: {tls.ven_cert}: the certificate expired on " in err, err
    assert "the VTN refuses the gateway's connections" in err


def test_a_certificate_the_vtn_does_not_trust_is_suggested_as_the_cause_of_a_cut_connection(tmp_path):
    """A client certificate from a CA the VTN does not accept: the VTN ends the handshake and the link said
    only "Connection reset by peer" (or "Server disconnected")."""
    tls, stranger = make_tls_material(tmp_path / "pki"), make_tls_material(tmp_path / "other")
    lost = refused_link_line(tls, stranger.ven_cert, stranger.ven_key)
    assert "(a VTN that does not accept dispatch.openadr.cert ends the connection so: that the aggregator trusts " \
           "the CA that issued it)" in lost, lost


def test_a_private_key_every_user_may_read_is_named_at_the_start_and_a_group_one_is_not():
    """A TLS key left 0644 passed check-config without a word, while every token file must be private: any
    user of the gateway could pose as it to the VTN or to the owner's browser. Debian's way (0640, group
    ssl-cert) is no mistake. The keys are made in a folder every user may enter, outside pytest's own (0700)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="keys-"))
    tmp_path.chmod(0o711)
    try:
        _private_keys_noted(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _private_keys_noted(tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    config = replace(Config(), dispatch=replace(Config().dispatch, openadr=replace(
        OpenAdrConfig(enabled=True), cert=str(tls.ven_cert), key=str(tls.ven_key), ca_file=str(tls.ca_file))),
        web=replace(Config().web, enabled=True, tls_cert=str(tls.vtn_cert), tls_key=str(tls.vtn_key)))
    now = dt.datetime.now(dt.timezone.utc)
    tls.ven_key.chmod(0o644)
    tls.vtn_key.chmod(0o640)
    assert notes(config, now) == [f"dispatch.openadr.key: {tls.ven_key}: every user of the machine may read this "
                                  "private key (mode 0644) and so pose as the gateway; run "
                                  f"`chmod 600 {tls.ven_key}` (or 640, group ssl-cert)"]
    tls.ven_key.chmod(0o600)
    tls.vtn_key.chmod(0o606)
    (web,) = notes(config, now)
    assert web.startswith(f"web.tls_key: {tls.vtn_key}: every user of the machine may read this private key "
                          "(mode 0606)"), web
    tls.vtn_key.chmod(0o602)  # others may write it: no reading, no posing
    assert notes(config, now) == []
    tls.vtn_key.chmod(0o644)
    private = tmp_path / "private"
    private.mkdir(mode=0o710)  # a folder other users cannot enter (Debian's /etc/ssl/private)
    tls.vtn_key.rename(private / tls.vtn_key.name)
    closed = replace(config, web=replace(config.web, tls_key=str(private / tls.vtn_key.name)))
    assert notes(closed, now) == []


def test_a_certificate_not_valid_yet_or_valid_is_said_as_such_at_the_start(tmp_path):
    tls = make_tls_material(tmp_path)
    config = replace(Config(), dispatch=replace(Config().dispatch, openadr=replace(
        OpenAdrConfig(enabled=True), cert=str(tls.ven_cert), key=str(tls.ven_key), ca_file=str(tls.ca_file))))
    now = dt.datetime.now(dt.timezone.utc)
    assert not [n for n in notes(config, now) if "certificate" in n]
    (early,) = [n for n in notes(config, now - dt.timedelta(days=1)) if "certificate" in n]
    assert early.startswith(f"dispatch.openadr.cert: {tls.ven_cert}: the certificate is not valid until "), early
    assert early.endswith(f"check the gateway's clock (it reads {now - dt.timedelta(days=1):%Y-%m-%d %H:%M} UTC), "
                          "or use a certificate valid now") and "renew" not in early, early
    disabled = replace(config, dispatch=replace(config.dispatch, openadr=replace(config.dispatch.openadr,
                                                                               enabled=False)))
    assert not notes(disabled, now + dt.timedelta(days=3))
    web = replace(disabled, web=replace(disabled.web, enabled=True, tls_cert=str(tls.vtn_cert), tls_key=str(tls.vtn_key)))
    (late,) = notes(web, now + dt.timedelta(days=3))
    assert late.startswith(f"web.tls_cert: {tls.vtn_cert}: the certificate expired on ") and "browsers refuse" in late
    assert late.endswith("; renew it"), late


@pytest.mark.parametrize("changes, key", [
    ({"cert": "/x/ven.crt"}, "cert and key"),
    ({"cert": "/x/ven.crt", "key": "/x/ven.key", "vtn_url": "https://h/x"}, "ca_file"),
    ({"cert": "/x/ven.crt", "key": "/x/ven.key", "ca_file": "/x/ca.crt"}, "https"),
    ({"cert": "/x/ven.crt", "key": "/x/ven.key", "ca_file": "/x/ca.crt", "vtn_url": "https://h/x"},
     "cert and key: /x/ven.crt: does not exist"),
    ({"vtn_url": "ftp://h/x"}, "vtn_url"),
    ({"simple_levels_pct": [10.0, 200.0, 50.0]}, "simple_levels_pct"),
])
def test_config_mistakes_are_input_errors_naming_the_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(InputError, match=key):
        OpenAdrVen(replace(OpenAdrConfig(), **changes), RATING_W)


@pytest.mark.parametrize("files, told", [
    ({"cert": "garbage", "key": "garbage"}, "cert and key: {d}/garbage, {d}/garbage: not a PEM certificate"),
    ({"cert": "ven.crt", "key": "vtn.key"}, "cert and key: {d}/vtn.key: is not the private key of {d}/ven.crt (each "
                                            "loads, but they are not a pair: give the key made with this certificate)"),
    ({"cert": "ven.crt", "key": "rsa.key"}, "cert and key: {d}/rsa.key: is not the private key of {d}/ven.crt"),
    ({"cert": "ven.crt", "key": "encrypted.key"}, "cert and key: {d}/encrypted.key: the private key is encrypted"),
    ({"ca_file": "garbage"}, "ca_file: {d}/garbage: holds no certificate"),
    ({"ca_file": "fifo"}, "ca_file: {d}/fifo: the CA bundle must be a regular file, not a FIFO"),
])
def test_tls_files_that_cannot_serve_are_refused_at_the_start_naming_the_key(tmp_path, capsys, files, told):
    """`check-config` passed garbage for cert, key and ca_file (it only read them as text): `run` started,
    and openleadr failed at its first connection, its words held back from the log."""
    from cryptography.hazmat.primitives import serialization

    tls = make_tls_material(tmp_path)
    (tmp_path / "garbage").write_text("garbage\n")
    os.mkfifo(tmp_path / "fifo")
    key = serialization.load_pem_private_key(tls.ven_key.read_bytes(), None)
    (tmp_path / "encrypted.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    from cryptography.hazmat.primitives.asymmetric import rsa  # another type than the certificate's EC key:
    (tmp_path / "rsa.key").write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(  # OpenSSL says
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # no cert
    chosen = {"cert": tls.ven_cert.name, "key": tls.ven_key.name, "ca_file": tls.ca_file.name, **files}
    lines = "".join(f'{k} = "{v}"\n' for k, v in chosen.items())
    config = tmp_path / "gateway.toml"
    config.write_text(f'[dispatch.openadr]\nenabled = true\nvtn_url = "https://127.0.0.1:9/OpenADR2/Simple/2.0b"\n'
                      f"{lines}")
    assert cli.main(["check-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"dispatch.openadr: {told.format(d=tmp_path)}" in err and "Traceback" not in err, err
    config.write_text(config.read_text().replace(lines, "".join(
        f'{k} = "{v}"\n' for k, v in {"cert": "ven.crt", "key": "ven.key", "ca_file": "ca.crt"}.items())))
    assert cli.main(["check-config", str(config)]) == 0, capsys.readouterr().err


def test_a_ca_file_without_a_client_certificate_is_refused_as_openleadr_would_ignore_it(tmp_path, capsys):
    """openleadr checks the VTN against `ca_file` only with a client certificate: without one, the private
    CA was silently set aside for the system's CAs."""
    tls = make_tls_material(tmp_path)
    config = tmp_path / "gateway.toml"
    config.write_text(f'[dispatch.openadr]\nenabled = true\nvtn_url = "https://127.0.0.1:9/OpenADR2/Simple/2.0b"\n'
                      f'ca_file = "{tls.ca_file}"\n')
    assert cli.main(["check-config", str(config)]) == 2
    assert "dispatch.openadr: ca_file: used only with cert and key" in capsys.readouterr().err


def test_a_registration_probe_says_what_openleadr_heard_with_logging_set_up_as_the_service_does():
    """Commissioning's dispatch step (`probe_registration`) adds openleadr's own words to its answer;
    with logging as `run` and `commission` set it up, openleadr's logger was held above them, and an
    unreachable VTN was only "no answer". Its lines still stay out of the service's log."""
    said = io.StringIO()
    narration.configure_logging(stream=said)
    url = f"http://127.0.0.1:{free_port()}/OpenADR2/Simple/2.0b"
    problem = asyncio.run(OpenAdrVen(OpenAdrConfig(enabled=True, vtn_url=url), RATING_W).probe_registration())
    assert problem is not None and problem.startswith(f"no answer from the VTN at {url} (")
    assert "Cannot connect to host" in problem, problem
    assert said.getvalue() == "" and logging.getLogger("openleadr").level == narration.QUIETED["openleadr"]


def test_hearings_that_overlap_each_hear_and_openleadrs_level_comes_back_with_the_last():
    """Each put back the level it found: the first to end held openleadr above the second's warnings,
    and the second then left it lowered for good."""
    openleadr_log = logging.getLogger("openleadr")
    before = openleadr_log.level
    openleadr_log.setLevel(logging.CRITICAL)  # as the service holds it
    try:
        first, second = openadr_module._openleadr_heard(), openadr_module._openleadr_heard()
        first.__enter__()
        heard = second.__enter__()
        first.__exit__(None, None, None)
        openleadr_log.warning("the VTN said 401")
        second.__exit__(None, None, None)
        assert heard.said() == " (the VTN said 401)"
        assert openleadr_log.level == logging.CRITICAL
    finally:
        openleadr_log.setLevel(before)


# ---------------------------------------------------------------------- translation, no network

NOW = dt.datetime(2026, 7, 1, 18, 0, tzinfo=UTC)


def event(signals: Any, *, event_id: str = "ev-1", number: Any = 0, status: str = "far") -> dict[str, Any]:
    return {"event_descriptor": {"event_id": event_id, "modification_number": number, "event_status": status},
            "active_period": {"dtstart": NOW, "duration": dt.timedelta(hours=1)},
            "event_signals": signals}


def signal(name: str = LOAD_DISPATCH, payloads: Any = (5.0,), **extra: Any) -> dict[str, Any]:
    intervals = [{"duration": dt.timedelta(minutes=30), "signal_payload": p, "uid": i}
                 for i, p in enumerate(payloads)]
    return {"signal_name": name, "signal_type": "setpoint" if name == LOAD_DISPATCH else "level",
            "intervals": intervals, **extra}


def translate(payload: Any, now: dt.datetime = NOW - dt.timedelta(minutes=5)) -> EventPlan | DispatchAnswer:
    return translate_event(payload, rating_w=RATING_W, levels_pct=[33.0, 66.0, 100.0],
                           to_gateway_time=dt.datetime.timestamp, received_at=now.timestamp())


def test_translation_places_intervals_without_dtstart_after_the_active_period_start() -> None:
    plan = translate(event([signal(payloads=[5.0, 2.5])]))
    assert isinstance(plan, EventPlan)
    assert [(r.start, r.end, r.target_w) for r in plan.requests] == [
        (NOW.timestamp(), NOW.timestamp() + 1800, 5000.0),
        (NOW.timestamp() + 1800, NOW.timestamp() + 3600, 2500.0)]


def test_translation_prefers_load_dispatch_over_a_companion_simple_signal() -> None:
    plan = translate(event([signal(SIMPLE, [1]), signal(payloads=[4.0])]))
    assert isinstance(plan, EventPlan) and plan.requests[0].target_w == 4000.0


def test_translation_uses_the_measurement_scale() -> None:
    plan = translate(event([signal(payloads=[2500.0], measurement={"unit": "W", "scale": "none"})]))
    assert isinstance(plan, EventPlan) and plan.requests[0].target_w == 2500.0


def test_an_event_named_like_another_events_interval_gets_an_id_of_its_own() -> None:
    two = translate(event([signal(payloads=[5.0, 3.0])], event_id="peak"))
    named = translate(event([signal(payloads=[4.0])], event_id="peak#1"))
    assert isinstance(two, EventPlan) and isinstance(named, EventPlan)
    assert two.request_ids == ("peak#0", "peak#1") and named.request_ids == ("peak##1",)


@given(st.lists(st.tuples(st.text(alphabet="a#0", max_size=5), st.integers(1, 3)), max_size=6,
                unique_by=lambda pair: pair[0]))
def test_request_ids_of_different_events_never_meet(events: list[tuple[str, int]]) -> None:
    ids = [request_id for event_id, intervals in events for request_id in request_ids(event_id, intervals)]
    assert len(ids) == len(set(ids))


def test_translation_skips_ended_intervals_and_expires_when_none_is_left() -> None:
    plan = translate(event([signal(payloads=[5.0, 3.0])]), now=NOW + dt.timedelta(minutes=40))
    assert isinstance(plan, EventPlan)
    assert [r.id for r in plan.requests] == ["ev-1#1"] and plan.request_ids == ("ev-1#0", "ev-1#1")
    expired = translate(event([signal()]), now=NOW + dt.timedelta(hours=2))
    assert isinstance(expired, DispatchAnswer) and expired.reason is ReasonCode.EXPIRED


def test_translation_falls_back_to_the_simple_signal_when_load_dispatch_is_not_a_setpoint() -> None:
    """A delta LOAD_DISPATCH with a SIMPLE signal beside it was refused whole (opted out)."""
    plan = translate(event([signal(SIMPLE, [2]), signal(payloads=[-5.0], signal_type="delta")]))
    assert isinstance(plan, EventPlan) and plan.requests[0].target_w == pytest.approx(0.66 * RATING_W)


def test_a_test_event_is_acknowledged_and_never_acted_on() -> None:
    """OpenADR 2.0b: a test_event other than false is a test; it was served as a real 5 kW event."""
    payload = event([signal()])
    payload["event_descriptor"]["test_event"] = True
    plan = translate(payload)
    assert isinstance(plan, EventPlan) and plan.test and plan.requests == ()


def test_an_event_whose_last_interval_lasts_0_runs_until_it_is_cancelled() -> None:
    """OpenADR 2.0b: an overall duration of 0 means no defined end; it was refused INVALID."""
    payload = event([signal(payloads=[5.0, 2.0])])
    payload["event_signals"][0]["intervals"][-1]["duration"] = dt.timedelta(0)
    plan = translate(payload)
    assert isinstance(plan, EventPlan)
    assert [(r.end - r.start, r.target_w) for r in plan.requests] == [(1800.0, 5000.0), (math.inf, 2000.0)]
    assert plan.requests[-1].is_open_ended


@pytest.mark.parametrize("priority, carried", [(None, None), (0, None), (1, 1), (7, 7)])
def test_an_events_priority_is_carried_on_its_requests_and_0_is_none(priority: Any, carried: Any) -> None:
    """OpenADR 2.0b: the lower the number the higher the priority, and 0 means none (ranked last)."""
    payload = event([signal(payloads=[5.0, 2.5])])
    if priority is not None:
        payload["event_descriptor"]["priority"] = priority
    plan = translate(payload)
    assert isinstance(plan, EventPlan) and [r.priority for r in plan.requests] == [carried, carried]


def test_an_event_whose_start_is_randomised_starts_this_vens_delay_later_and_runs_its_whole_length() -> None:
    """2.0b tolerance `startafter`: the VTN spreads its VENs' starts; each moves the whole event."""
    payload = event([signal(payloads=[5.0, 2.5])])
    payload["active_period"]["tolerance"] = {"tolerate": {"startafter": dt.timedelta(minutes=10)}}
    plain = translate(event([signal(payloads=[5.0, 2.5])]))
    delay = start_delay_s("truck-1", "ev-1", 600.0)
    assert 0 < delay < 600
    spread = translate_event(payload, rating_w=RATING_W, levels_pct=[33.0, 66.0, 100.0], ven_name="truck-1",
                             to_gateway_time=dt.datetime.timestamp, received_at=NOW.timestamp() - 300)
    assert isinstance(plain, EventPlan) and isinstance(spread, EventPlan)
    assert [(r.start, r.end) for r in spread.requests] == [(r.start + delay, r.end + delay) for r in plain.requests]
    assert translate(payload) != translate_event(payload, rating_w=RATING_W, levels_pct=[33.0, 66.0, 100.0],
                                                 ven_name="truck-2", to_gateway_time=dt.datetime.timestamp,
                                                 received_at=NOW.timestamp() - 300)


def test_translation_of_a_cancelled_event_is_a_cancel_plan() -> None:
    plan = translate(event([], number=3, status="cancelled"))
    assert isinstance(plan, EventPlan) and plan.cancelled and plan.revision == 3


@pytest.mark.parametrize("payload, words", [
    (event([signal(payloads=[-1.0])]), "must be >= 0"),
    (event([signal(payloads=[1e9])]), "implausible"),
    (event([signal(payloads=[math.nan])]), "finite number"),
    (event([signal(payloads=["5"])]), "finite number"),
    (event([signal(SIMPLE, [4])]), "SIMPLE level"),
    (event([signal("ELECTRICITY_PRICE")]), "no LOAD_DISPATCH or SIMPLE"),
    (event([signal(signal_type="delta")]), "delta"),  # and no SIMPLE signal to fall back on
    (event([signal(payloads=[0.0, 5.0])]) | {"event_signals": [signal(payloads=[0.0, 5.0]) | {"intervals": [
        {"duration": dt.timedelta(0), "signal_payload": 5.0}, {"duration": dt.timedelta(minutes=5),
                                                                "signal_payload": 5.0}]}]}, "only the last"),
    (event([signal(measurement={"unit": "A", "scale": "k"})]), "unit must be W"),
    (event([signal(), signal()]), "ambiguous"),
    (event([]), "no event_signals"),
    (event([signal()], number=-1), "modification_number"),
    (event([signal()], number=True), "modification_number"),
    (event([signal()]) | {"active_period": {"dtstart": NOW, "tolerance": {"tolerate": {"startafter": "soon"}}}},
     "startafter must be a duration >= 0, got 'soon'"),
    (event([signal()]) | {"active_period": {"dtstart": NOW, "tolerance": {"tolerate": {
        "startafter": dt.timedelta(minutes=-1)}}}}, "startafter must be a duration >= 0"),
    (event([signal()]) | {"event_descriptor": {"event_id": "e", "modification_number": 0, "priority": -1}},
     "priority must be a whole number >= 0, got -1"),
    (event([signal()]) | {"event_descriptor": {"event_id": "e", "modification_number": 0, "priority": "high"}},
     "priority must be a whole number >= 0, got 'high'"),
    ({"event_descriptor": None}, "event_descriptor"),
    ("not an event", "event must be a structure"),
])
def test_translation_refuses_bad_payloads_clearly(payload: Any, words: str) -> None:
    answer = translate(payload)
    assert isinstance(answer, DispatchAnswer)
    assert (answer.verdict, answer.reason) == (Verdict.REJECTED, ReasonCode.INVALID)
    assert words in answer.detail


@given(kw=st.lists(st.floats(0, 10_000), min_size=1, max_size=4), minutes=st.integers(1, 600),
       scale=st.sampled_from([None, "k", "none", "M"]))
def test_valid_load_dispatch_maps_every_interval_to_its_watts(kw: list[float], minutes: int,
                                                            scale: str | None) -> None:
    factor = {None: 1e3, "k": 1e3, "none": 1.0, "M": 1e6}[scale]
    extra = {} if scale is None else {"measurement": {"unit": "W", "scale": scale}}
    payload = event([signal(payloads=[v * 1e3 / factor for v in kw], **extra)])
    for interval in payload["event_signals"][0]["intervals"]:
        interval["duration"] = dt.timedelta(minutes=minutes)
    plan = translate(payload)
    assert isinstance(plan, EventPlan)
    assert [r.target_w for r in plan.requests] == pytest.approx([v * 1e3 for v in kw])
    assert [r.end - r.start for r in plan.requests] == [minutes * 60.0] * len(kw)
    assert len({r.id for r in plan.requests}) == len(kw)


@given(level=st.sampled_from([0, 1, 2, 3, 1.0, 3.0]))
def test_simple_levels_map_through_the_configured_shares(level: float) -> None:
    plan = translate(event([signal(SIMPLE, [level])]))
    assert isinstance(plan, EventPlan)
    assert plan.requests[0].target_w == pytest.approx([0.0, 0.33, 0.66, 1.0][int(level)] * RATING_W)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                    st.datetimes(timezones=st.just(UTC)), st.datetimes(),
                    st.timedeltas(min_value=dt.timedelta(days=-10**5), max_value=dt.timedelta(days=10**5)))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=3)),
                      max_leaves=8)
payloads = st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=3),
                     st.integers(min_value=-10**400, max_value=10**400))
fuzzed_intervals = st.lists(st.fixed_dictionaries(
    {"signal_payload": payloads},
    optional={"duration": st.one_of(st.timedeltas(), values),
              "dtstart": st.one_of(st.datetimes(timezones=st.just(UTC)), values)}), max_size=4)
fuzzed_signals = st.lists(st.fixed_dictionaries(
    {"signal_name": st.sampled_from([LOAD_DISPATCH, "SIMPLE", "simple", "LOAD_CONTROL", "x-custom", ""]),
     "intervals": st.one_of(fuzzed_intervals, values)},
    optional={"signal_type": st.sampled_from(["setpoint", "delta", "level", "x-y"]),
              "measurement": st.one_of(st.fixed_dictionaries({"unit": st.sampled_from(["W", "kW", "A"]),
                                                               "scale": st.one_of(st.sampled_from(
                                                                   ["k", "M", "none", "T", "p", "q"]), values)}),
                                       values)}), max_size=3)
fuzzed_events = st.one_of(values, st.fixed_dictionaries(
    {"event_descriptor": st.one_of(values, st.fixed_dictionaries(
        {"event_id": st.one_of(st.text(min_size=1, max_size=8), values),
         "modification_number": st.one_of(st.integers(), values),
         "event_status": st.sampled_from(["far", "near", "active", "cancelled", "completed"])})),
     "event_signals": st.one_of(fuzzed_signals, values)},
    optional={"active_period": st.one_of(values, st.fixed_dictionaries(
        {"dtstart": st.one_of(st.datetimes(timezones=st.just(UTC)), values),
         "duration": st.one_of(st.timedeltas(), values)}))}))


@given(fuzzed_events)
def test_fuzzed_events_get_a_plan_or_a_clear_refusal_never_an_exception(payload: Any) -> None:
    result = translate(payload)
    if isinstance(result, DispatchAnswer):
        assert result.verdict is Verdict.REJECTED
        assert result.reason in (ReasonCode.INVALID, ReasonCode.EXPIRED)
        assert result.detail
    else:
        assert isinstance(result, EventPlan)
        for request in result.requests:
            assert request.source == "openadr"
            assert 0 <= request.target_w <= 10_000_000
            assert math.isfinite(request.start) and request.start < request.end
            assert (request.kind is DispatchKind.STOP) == (request.target_w == 0)


# ---------------------------------------------------------------------- what openleadr's own readers got wrong


@contextlib.asynccontextmanager
async def rewriting(vtn: LoopbackVtn, rewrite: Callable[[bytes], bytes]) -> AsyncIterator[str]:
    """A proxy on 127.0.0.1 between the VEN and `vtn` that edits each VTN answer with `rewrite`: the VEN reads
    exactly the XML a VTN could send (schema-valid), which openleadr's own VTN never writes. Yields its URL."""
    session = aiohttp.ClientSession()
    prefix = "/OpenADR2/Simple/2.0b"

    async def forward(request: web.Request) -> web.Response:
        async with session.post(vtn.url + request.path_qs[len(prefix):], data=await request.read(),
                                headers={"content-type": "application/xml"}) as answer:
            body, status = await answer.read(), answer.status
        return web.Response(body=rewrite(body), status=status, content_type="application/xml")

    app = web.Application()
    app.router.add_post("/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}{prefix}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()
        await session.close()


MARK = b".123457Z"  # the fraction of the one time a test has the proxy edit


def marked(seconds: float) -> dt.datetime:
    return in_seconds(seconds).replace(microsecond=123457)


def unmarked(seconds: float) -> dt.datetime:
    return in_seconds(seconds).replace(microsecond=0)


def test_a_time_without_its_z_is_utc_and_every_event_of_the_message_is_answered() -> None:
    """The 2.0b schema makes a date-time's Z optional; openleadr left a Z-less one text, and its status check of
    the event ended the VEN's task: no event of the message was answered, and after a restart the same again."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with LoopbackVtn(poll_s=0) as vtn, \
                rewriting(vtn, lambda body: body.replace(MARK, MARK[:-1])) as url:
            ven = make_ven(vtn, vtn_url=url)
            async with serving(ven, sink) as task:
                await registered(vtn, ven)
                start = marked(120)
                good = vtn.add_event(LOAD_DISPATCH, unmarked(60), 600, 3.0)
                naive = vtn.add_event(LOAD_DISPATCH, start, 600, 5.0)
                assert await vtn.wait_for_response(good) == "optIn"
                assert await vtn.wait_for_response(naive) == "optIn"
                assert not task.done()
        placed = {r.id: r.start for r in sink.requests()}
        assert placed[naive] == pytest.approx(start.timestamp(), abs=1e-3)  # read as UTC

    run(scenario)


def test_an_event_openleadr_cannot_place_in_time_costs_only_itself() -> None:
    """A start openleadr cannot read (a schema-valid negative year): the event is refused by name and answered
    optOut, once; the message's other events, and later messages, are answered as ever, and the VEN runs on."""
    def negative_year(body: bytes) -> bytes:
        return re.sub(rb">(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.123457Z)<", rb">-\1<", body)

    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with LoopbackVtn(poll_s=0) as vtn, rewriting(vtn, negative_year) as url:
            ven = make_ven(vtn, vtn_url=url)
            async with serving(ven, sink) as task:
                await registered(vtn, ven)
                good = vtn.add_event(LOAD_DISPATCH, unmarked(60), 600, 3.0)
                broken = vtn.add_event(LOAD_DISPATCH, marked(120), 600, 5.0)
                assert await vtn.wait_for_response(good) == "optIn"
                assert await vtn.wait_for_response(broken) == "optOut"
                later = vtn.add_event(LOAD_DISPATCH, unmarked(90), 600, 4.0)  # distributed with `broken` again
                assert await vtn.wait_for_response(later) == "optIn"
                assert not task.done()
        assert sorted(r.id for r in sink.requests()) == sorted([good, later])
        refused = [o for o in ven.outcomes if o.event_id == broken]
        assert len(refused) == 1 and refused[0].opt == "optOut"
        assert "dtstart" in refused[0].detail and "-" in refused[0].detail

    run(scenario)


def retarget(vtn: LoopbackVtn, event_id: str, **targets: str) -> None:
    """Address an event queued on the VTN to other targets (one of each type given)."""
    event = vtn._event(event_id)
    event.targets = [{kind: value} for kind, value in targets.items()]
    event.targets_by_type = {kind: [value] for kind, value in targets.items()}


def test_an_event_addressed_to_another_ven_or_resource_is_opted_out_and_an_earlier_revision_withdrawn() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            other_ven = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 5.0)
            retarget(vtn, other_ven, ven_id="SOMEONE-ELSES-VEN")
            other_resource = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 7.0)
            retarget(vtn, other_resource, resource_id="neighbours-battery")
            our_resource = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 2.0)
            retarget(vtn, our_resource, resource_id=vtn.ven_name)
            assert await vtn.wait_for_response(other_ven) == "optOut"
            assert await vtn.wait_for_response(other_resource) == "optOut"
            assert await vtn.wait_for_response(our_resource) == "optIn"
            held = vtn.add_event(LOAD_DISPATCH, in_seconds(60), 600, 3.0)
            assert await vtn.wait_for_response(held) == "optIn"
            retarget(vtn, held, ven_id="SOMEONE-ELSES-VEN")
            number = vtn.modify_event(held, values=4.0)
            assert await vtn.wait_for_response(held, number) == "optOut"
        assert [r.id for r in sink.requests()] == [our_resource, held]
        assert [c.id for c in sink.cancels()] == [held] and "SOMEONE-ELSES-VEN" in sink.cancels()[0].reason
        assert "SOMEONE-ELSES-VEN" in next(o.detail for o in ven.outcomes if o.event_id == other_ven)

    run(scenario)


@pytest.mark.parametrize(("targets", "addressed"), [
    (None, True), ([], True), ([{"ven_id": "me"}], True), ([{"ven_id": "other"}, {"ven_id": "me"}], True),
    ([{"resource_id": "truck"}], True), ([{"group_id": "g1"}], True), ([{"party_id": 42}], True),
    ([{"ven_id": "other"}], False), ([{"resource_id": "nb"}, {"group_id": "g1"}], False),
    ([{"ven_id": 12345}], False),
])
def test_targets_name_who_an_event_is_for(targets: Any, addressed: bool) -> None:
    payload = event([signal()])
    payload["targets"] = targets
    plan = translate_event(payload, rating_w=RATING_W, levels_pct=[33.0, 66.0, 100.0], ven_id="me",
                           ven_name="truck", to_gateway_time=dt.datetime.timestamp,
                           received_at=(NOW - dt.timedelta(minutes=5)).timestamp())
    assert isinstance(plan, EventPlan) if addressed else isinstance(plan, NotAddressed)


@pytest.mark.parametrize("targets", ["me", [["me"]], [{"ven_id": {"a": 1}}], [{"ven_id": ""}], [{}]])
def test_malformed_targets_are_refused_naming_targets(targets: Any) -> None:
    payload = event([signal()])
    payload["targets"] = targets
    plan = translate_event(payload, rating_w=RATING_W, levels_pct=[33.0, 66.0, 100.0], ven_id="me",
                           ven_name="truck", to_gateway_time=dt.datetime.timestamp,
                           received_at=(NOW - dt.timedelta(minutes=5)).timestamp())
    assert isinstance(plan, DispatchAnswer) and plan.reason is ReasonCode.INVALID and "targets" in plan.detail


def distributed(duration: str) -> EventPlan | DispatchAnswer:
    """One event as a VTN writes it, its one interval's duration written `duration`, read the way the VEN's
    client reads every VTN message (`openleadr.client.parse_message`) and translated."""
    start = NOW + dt.timedelta(minutes=10)
    sent = objects.Event(
        event_descriptor=objects.EventDescriptor(event_id="wk", modification_number=0, market_context="oadr://x",
                                                 event_status="far", created_date_time=NOW),
        event_signals=[objects.EventSignal(intervals=[objects.Interval(dtstart=start, duration=dt.timedelta(
            minutes=10), signal_payload=5.0)], signal_name=LOAD_DISPATCH, signal_type="setpoint", signal_id="s")],
        targets=[{"group_id": "everyone"}])
    xml = messaging.create_message("oadrDistributeEvent", request_id="r", vtn_id="VTN", events=[sent])
    xml = xml.replace(">PT10M<", f">{duration}<")  # the active period and the interval
    _, message = openleadr_client.parse_message(xml)
    return translate_event(message["events"][0], rating_w=RATING_W, levels_pct=[33.0, 66.0, 100.0],
                           to_gateway_time=dt.datetime.timestamp, received_at=NOW.timestamp())


@pytest.mark.parametrize(("text", "seconds"), [("P1W", 604_800.0), ("P2W", 1_209_600.0), ("1W", 604_800.0),
                                               ("PT10M", 600.0), ("P1DT1H", 90_000.0), ("PT0S", math.inf),
                                               ("P", math.inf)])
def test_a_duration_in_weeks_is_weeks_and_only_a_written_zero_is_open_ended(text: str, seconds: float) -> None:
    """openleadr read 'P1W' as 0 s, and a last interval of 0 runs until cancelled: a week's ask had no end.
    'P' is how openleadr's own VTN writes a 0."""
    plan = distributed(text)
    assert isinstance(plan, EventPlan), plan
    assert [r.end - r.start for r in plan.requests] == [seconds]


@pytest.mark.parametrize("text", ["PT1\u0660M", "\u0661W", "P\uff11D"])
def test_a_duration_or_date_time_written_with_other_digits_than_ascii_stays_text_to_be_refused(text: str) -> None:
    """The schema's digits are 0-9: 'PT1٠M' was read as 10 minutes."""
    assert openadr_events.parse_wire_duration(text) == text
    when = "\u0662\u0660\u0662\u0666-12-06T00:00:00Z"
    assert openadr_events.parse_wire_datetime(when) == when
    assert isinstance(openadr_events.parse_wire_datetime("2026-12-06T00:00:00Z"), dt.datetime)


def test_a_duration_read_as_0_from_a_nonzero_text_is_refused_not_open_ended() -> None:
    read = openadr_events.parse_wire_duration("PT0S")
    misread = openadr_events.WireDuration(0)
    misread.text = "P3W"  # as a reader that does not know weeks would leave it
    assert openadr_events.is_literal_zero(read) and not openadr_events.is_literal_zero(misread)
    payload = event([signal()])
    payload["event_signals"][0]["intervals"][0]["duration"] = misread
    plan = translate(payload)
    assert isinstance(plan, DispatchAnswer) and "P3W" in plan.detail


def test_a_cancellation_at_the_same_modification_number_reaches_the_core_at_once(caplog) -> None:
    """A VTN that marks a running event cancelled without bumping its modificationNumber: openleadr answered
    from its memo without calling the VEN's handler, the core was never told and the gateway went on serving."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            assert await vtn.wait_for_response(event_id, 0) == "optIn"
            event = vtn._event(event_id)
            event.event_descriptor.event_status = "cancelled"  # modification_number stays 0
            vtn._requeue(event)
            await vtn.wait_for(lambda: sink.cancels())
        assert [(c.id, c.source) for c in sink.cancels()] == [(event_id, "openadr")]
        assert event_id not in sink.served
        assert any("did not bump" in r.getMessage() and event_id in r.getMessage() for r in caplog.records)

    run(scenario)


def test_an_event_whose_active_period_overflows_the_date_range_costs_only_itself() -> None:
    """A start of 9999-12-31 lasting 2 days: openleadr's answer-building overflowed after the handlers ran,
    and the VEN answered optOut to every event of the message while the core kept serving the good one.
    (openleadr's VTN cannot even serialise such an event: the parsed message goes to the client as `_poll`
    would hand it.)"""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            good = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            assert await vtn.wait_for_response(good, 0) == "optIn"
            client = ven.client
            good_event = next(e for e in client.received_events if e["event_descriptor"]["event_id"] == good)
            bad_event = copy.deepcopy(good_event)
            far = dt.datetime(9999, 12, 31, tzinfo=dt.timezone.utc)
            bad_event["event_descriptor"]["event_id"] = "far-future"
            bad_event["active_period"].update(dtstart=far, duration=dt.timedelta(days=2))
            bad_event["event_signals"][0]["intervals"][0]["dtstart"] = far
            answered: list[tuple[str, str]] = []
            create = client._create_message

            def spy(kind: str, **kw: Any) -> Any:
                if kind == "oadrCreatedEvent":
                    answered.extend((r["event_id"], r["opt_type"]) for r in kw["event_responses"])
                return create(kind, **kw)

            client._create_message = spy
            await client._on_event({"events": [copy.deepcopy(good_event), bad_event], "vtn_id": vtn.vtn_id,
                                    "request_id": "req-1", "response": {}})
        assert (good, "optIn") in answered and ("far-future", "optOut") in answered
        assert (good, "optOut") not in answered and good in sink.served and not sink.cancels()
        refused = [o for o in ven.outcomes if o.event_id == "far-future"]
        assert len(refused) == 1 and "beyond the representable date range" in refused[0].detail

    run(scenario)


def test_a_message_answered_optout_for_a_failure_withdraws_what_its_handlers_submitted() -> None:
    """Whatever fails after the handlers ran (here openleadr building its answer) makes the VEN answer optOut
    to every event of the message: the core must not keep serving what the VTN was told is refused."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            client = ven.client
            create, failures = client._create_message, [RuntimeError("answer-building failed")]

            def failing_once(kind: str, **kw: Any) -> Any:
                if kind == "oadrCreatedEvent" and failures:
                    raise failures.pop()
                return create(kind, **kw)

            client._create_message = failing_once
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            assert await vtn.wait_for_response(event_id, 0) == "optOut"
        assert [r.id for r in sink.requests()][:1] == [event_id]
        assert sink.cancels()[0].id == event_id and "could not be handled" in sink.cancels()[0].reason
        assert any(o.event_id == event_id and o.opt == "optOut" for o in ven.outcomes)

    run(scenario)


def test_a_stale_malformed_copy_of_an_event_leaves_its_live_revision_served(caplog) -> None:
    """A distribution listing an event twice, its live revision 1 and a malformed revision 0: the stale copy's
    refusal cancelled the live revision (a stale valid copy was already ignored)."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven):
            event_id = vtn.add_event(LOAD_DISPATCH, in_seconds(-1), 600, 5.0)
            assert await vtn.wait_for_response(event_id, 0) == "optIn"
            number = vtn.modify_event(event_id, values=4.0)
            assert await vtn.wait_for_response(event_id, number) == "optIn"
            stale = copy.deepcopy(vtn._event(event_id))
            stale.event_descriptor.modification_number = 0
            stale.event_signals[0].intervals[0].signal_payload = -4.0
            vtn.server.events[vtn.ven_id].append(stale)
            vtn.server.events_updated[vtn.ven_id] = True
            await vtn.wait_for(lambda: sink.cancels() or any("stale invalid copy" in r.getMessage()
                                                            for r in caplog.records))
        assert not sink.cancels()
        assert sink.served[event_id].revision == number and sink.served[event_id].target_w == 4000.0

    run(scenario)
