"""The OpenADR 3 VEN against the bench OpenADR 3 VTN on 127.0.0.1, and its translation of events.

The core is not part of the protocol tests: a scripted sink stands in for it,
answering by a fixed policy and recording everything the VEN handed over, so each
test checks what the VEN translated and what the VTN heard back (the bench tests
in test_bench_aggregators.py run the same VEN against the real core). Every
message either side sent is checked against the `openadr3` package's model of
the specification (`openadr3_model.conforms`), not only against the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from firmware_py.sim.ports import free_port
from firmware_py.sim.vtn3 import BenchVtn3
from hypothesis import given
from hypothesis import strategies as st
from openadr3_model import conforms, resolved_windows
from ven_harness import CoreSink, Policy, accept, cap_at, opted_out, run, serving

from firmware_py.config import OpenAdr3Config, parse
from firmware_py.core.controller import Controller, StepResult
from firmware_py.core.policy import Policy as CorePolicy
from firmware_py.core.requests import Booked
from firmware_py.core.telemetry import DerRatings
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchKind,
    DispatchRequest,
    InverterCommand,
    Mode,
    PriceInterval,
    PriceKind,
    ReasonCode,
    SiteLimit,
    Verdict,
)
from firmware_py.dispatch import Telemetry, openadr3
from firmware_py.dispatch.openadr3 import OpenAdr3Ven, TokenRefused, TokenSource, VtnRefused, check, token_endpoint
from firmware_py.dispatch.openadr3_events import (
    EventPlan,
    NotAddressed,
    Past,
    iso_datetime,
    parse_datetime,
    parse_duration,
    price_id,
    translate_event,
)
from firmware_py.dispatch.start_delay import start_delay_s
from firmware_py.errors import InputError
from firmware_py.journal import RecordKind
from firmware_py.links import Link, LinkBook

T = TypeVar("T")
RATING_W = 11_500.0
UTC = dt.timezone.utc
SECRET = "s3cret-of-the-aggregator"

class ScriptedSink:
    """Stands in for the core: answers requests by `policy`, records everything it was given.

    Its clock is the wall clock shifted by `offset_s`, so a test can move to an interval's
    start or past its end without waiting."""

    def __init__(self, policy: Policy = accept, price_answer: DispatchAnswer | None = None) -> None:
        self.policy = policy
        self.price_answer = price_answer
        self.received: list[Any] = []
        self.offset_s = 0.0
        self.journal_wh: dict[str, float] = {}  # what the journal credits each request id (a restart's earlier run)
        self.notes: list[tuple[Any, dict]] = []  # what was journaled, kept across VENs as a journal is
        self.bms_fresh = True  # False: the core has no fresh BMS data (just started, or the BMS went silent)

    async def submit(self, item: Any) -> DispatchAnswer | None:
        self.received.append(item)
        if isinstance(item, DispatchRequest):
            return self.policy(item)
        if isinstance(item, PriceInterval):
            return self.price_answer
        return None

    def telemetry(self) -> Telemetry:
        if not self.bms_fresh:  # as the core gives it: the last SoC it had (or none), 0 Wh above the floor
            return Telemetry(at=self.now(), mode=Mode.STANDBY, soc_pct=69.5, floor_pct=40.0, power_w=0.0,
                             setpoint_w=0.0, available_wh=0.0, active_event_id=None,
                             ratings=DerRatings(11_500.0, 11_500.0, 11_500.0, 123_000.0), bms_fresh=False)
        return Telemetry(at=self.now(), mode=Mode.STANDBY, soc_pct=72.5, floor_pct=40.0, power_w=0.0,
                         setpoint_w=0.0, available_wh=40_000.0, active_event_id=None,
                         ratings=DerRatings(11_500.0, 11_500.0, 11_500.0, 123_000.0), bms_fresh=True)

    def now(self) -> float:
        return time.time() + self.offset_s

    def note(self, kind: Any, payload: dict) -> None:
        self.notes.append((kind, payload))

    def journal_notes(self, kind: Any, back_s: float) -> list[dict]:
        return [payload for noted, payload in self.notes if noted == kind]

    def journaled_wh(self, request_id: str) -> float:
        return self.journal_wh.get(request_id, 0.0)

    def of(self, kind: type[T]) -> list[T]:
        return [item for item in self.received if isinstance(item, kind)]


def make_ven(vtn: BenchVtn3, *, secret: str = SECRET, link: Any = None, **changes: Any) -> OpenAdr3Ven:
    config = OpenAdr3Config(enabled=True, vtn_url=vtn.url, client_id=vtn.client_id, ven_name="truck-1",
                            poll_interval_s=0.2)
    return OpenAdr3Ven(replace(config, **changes), rating_w=RATING_W, levels_pct=(25.0, 50.0, 90.0),
                       secret=secret, link=link)


@contextlib.asynccontextmanager
async def enrolled(sink: ScriptedSink, **ven_changes: Any) -> AsyncIterator[tuple[BenchVtn3, OpenAdr3Ven, str]]:
    """A VTN with one program, and the VEN registered and polling it."""
    async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
        program = vtn.add_program("summer-peak")
        ven = make_ven(vtn, **ven_changes)
        async with serving(ven, sink):
            await vtn.wait_for(lambda: ven.polls)
            yield vtn, ven, program
        assert_conforming(vtn)


def assert_conforming(vtn: BenchVtn3) -> None:
    """Everything the VTN served and the VEN sent, against the specification's model."""
    for served in vtn.served:
        conforms(served)
    for kind, message in vtn.received:
        conforms(message, kind)


def in_seconds(seconds: float) -> dt.datetime:
    return dt.datetime.now(UTC).replace(microsecond=0) + dt.timedelta(seconds=seconds)


# ---------------------------------------------------------------------- login and registration


def test_registers_once_and_reads_the_programs_it_is_enrolled_in() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            await vtn.wait_for(lambda: ven.polls >= 3)
            assert list(vtn.vens.values())[0]["venName"] == "truck-1"
            assert ven.ven_id == vtn.ven_id
            assert set(ven.programs) == {program}
            assert vtn.token_grants == 1  # one token serves every call until it expires
            assert [kind for kind, _ in vtn.received] == ["VEN"]
        # a restarted VEN finds its VEN object instead of creating a second one
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            vtn.vens["ven-9"] = {"id": "ven-9", "objectType": "VEN", "venName": "truck-1"}
            ven = make_ven(vtn)
            async with serving(ven, ScriptedSink()):
                await vtn.wait_for(lambda: ven.polls)
            assert ven.ven_id == "ven-9" and len(vtn.vens) == 1

    run(scenario)


def test_an_expired_token_is_renewed_without_losing_the_link() -> None:
    async def scenario() -> None:
        links = LinkBook(time.monotonic)
        sink = ScriptedSink()
        async with enrolled(sink, link=links.handle(Link.OPENADR3)) as (vtn, ven, _):
            polls = ven.polls
            vtn.expire_tokens()
            await vtn.wait_for(lambda: ven.polls >= polls + 2)
            assert vtn.token_grants == 2 and vtn.refused_tokens >= 1
            assert links.states[Link.OPENADR3].ok and links.states[Link.OPENADR3].lost_at is None

    run(scenario)


def test_the_token_is_renewed_before_it_expires() -> None:
    async def scenario() -> None:
        async with BenchVtn3(client_id="truck-1", secret=SECRET, token_life_s=100) as vtn:
            now = [0.0]
            tokens = TokenSource(f"{vtn.url}/auth/token", "truck-1", SECRET, clock=lambda: now[0])
            async with aiohttp.ClientSession() as session:
                first = await tokens.bearer(session)
                now[0] = 89.0  # inside its life, before the renewal margin (a tenth of 100 s)
                assert await tokens.bearer(session) == first
                now[0] = 91.0
                assert await tokens.bearer(session) != first
            assert vtn.token_grants == 2
            assert SECRET not in repr(tokens)

    run(scenario)


def test_a_refused_secret_is_a_lost_link_that_names_the_client_never_the_secret(caplog) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        links = LinkBook(time.monotonic)
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            ven = make_ven(vtn, secret="not-the-secret", link=links.handle(Link.OPENADR3))
            async with serving(ven, ScriptedSink()):
                await vtn.wait_for(lambda: vtn.refused_logins >= 1 and links.states[Link.OPENADR3].ok is False)
            cause = links.states[Link.OPENADR3].cause
            assert "refused client_id 'truck-1'" in cause and "invalid_client" in cause
            assert not vtn.vens and ven.polls == 0
        assert "not-the-secret" not in caplog.text and "not-the-secret" not in cause

        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            tokens = TokenSource(f"{vtn.url}/auth/token", "truck-1", "wrong")
            async with aiohttp.ClientSession() as session:
                with pytest.raises(TokenRefused, match="client_secret_file"):
                    await tokens.bearer(session)

    run(scenario)


class QuotingTokenVtn(BenchVtn3):
    """Its token endpoint refuses every secret with an `error` quoting it, a line break after."""

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        error = f"invalid_client: client_secret '{form['client_secret']}' is revoked\nINFO forged: all good"
        return web.json_response({"error": error}, status=401)


def test_a_token_endpoint_quoting_the_secret_it_refused_never_puts_it_nor_a_line_break_in_the_cause() -> None:
    async def scenario() -> None:
        async with QuotingTokenVtn(client_id="truck-1", secret=SECRET) as vtn:
            tokens = TokenSource(f"{vtn.url}/auth/token", "truck-1", "s3cret-of-the-aggregator")
            async with aiohttp.ClientSession() as session:
                with pytest.raises(TokenRefused) as refused:
                    await tokens.bearer(session)
        cause = str(refused.value)
        assert "s3cret" not in cause and "\n" not in cause, cause
        assert "invalid_client: client_secret '<withheld>' is revoked\\nINFO forged" in cause

    run(scenario)


class ScriptedTokenVtn(BenchVtn3):
    """Its token endpoint answers `token_body` as it is (a broken or hostile token answer)."""

    token_body = b""

    async def _token(self, request: web.Request) -> web.Response:
        await request.post()
        return web.Response(body=self.token_body, content_type="application/json")


@pytest.mark.parametrize("token_body, words", [
    (b'{"access_token": "tok\\r\\nX-Injected: 1", "expires_in": 3600}', "not a bearer token"),
    (b'{"access_token": "' + b"[" * 50 + b'", "expires_in": 3600}', "not a bearer token"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
], ids=["control characters", "not b64token characters", "deeply nested JSON"])
def test_a_token_answer_the_ven_cannot_use_is_a_lost_link_never_a_crash_nor_the_token_logged(
        caplog, token_body: bytes, words: str) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        links = LinkBook(time.monotonic)
        async with ScriptedTokenVtn(client_id="truck-1", secret=SECRET) as vtn:
            vtn.token_body = token_body
            ven = make_ven(vtn, link=links.handle(Link.OPENADR3))
            async with serving(ven, ScriptedSink()) as task:
                await vtn.wait_for(lambda: ven.failed_polls >= 2)
                assert not task.done()
            cause = links.states[Link.OPENADR3].cause
            assert links.states[Link.OPENADR3].ok is False and words in cause, cause
        assert "X-Injected" not in caplog.text and "[[[" not in caplog.text

    run(scenario)


def test_a_token_said_to_live_beyond_any_float_is_renewed_after_a_day() -> None:
    async def scenario() -> None:
        async with ScriptedTokenVtn(client_id="truck-1", secret=SECRET) as vtn:
            vtn.token_body = b'{"access_token": "tok-1", "expires_in": 1' + b"0" * 400 + b"}"
            now = [0.0]
            tokens = TokenSource(f"{vtn.url}/auth/token", "truck-1", SECRET, clock=lambda: now[0])
            async with aiohttp.ClientSession() as session:
                assert await tokens.bearer(session) == "tok-1"
                now[0] = 86_400.0
                vtn.token_body = b'{"access_token": "tok-2", "expires_in": 3600}'
                assert await tokens.bearer(session) == "tok-2"

    run(scenario)


class Collector:
    """Another server on 127.0.0.1, somewhere a redirect could send the VEN: it records what reaches it."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.port = free_port()

    async def _any(self, request: web.Request) -> web.Response:
        self.got.append((request.path, dict(request.headers), await request.read()))
        return web.json_response({"access_token": "stolen", "expires_in": 3600})

    async def __aenter__(self) -> Collector:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


class RedirectingVtn(BenchVtn3):
    """Answers `redirected` (a path: the token endpoint or the events) with a 307 to `elsewhere`."""

    redirected = "/auth/token"
    elsewhere = ""

    async def _token(self, request: web.Request) -> web.Response:
        if self.redirected == "/auth/token":
            raise web.HTTPTemporaryRedirect(f"{self.elsewhere}/steal?client=truck-1")
        return await super()._token(request)

    async def _get_events(self, request: web.Request) -> web.Response:
        if self.redirected == "/events":
            raise web.HTTPTemporaryRedirect(f"{self.elsewhere}/events")
        return await super()._get_events(request)


@pytest.mark.parametrize("redirected, words", [("/auth/token", "the client secret is not sent there"),
                                               ("/events", "GET /events: answered HTTP 307")])
def test_a_redirect_to_another_server_carries_neither_the_secret_nor_the_token_there(
        caplog, redirected: str, words: str) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        links = LinkBook(time.monotonic)
        async with Collector() as collector, RedirectingVtn(client_id="truck-1", secret=SECRET) as vtn:
            vtn.redirected, vtn.elsewhere = redirected, f"http://127.0.0.1:{collector.port}"
            vtn.add_program("summer-peak")
            ven = make_ven(vtn, link=links.handle(Link.OPENADR3))
            async with serving(ven, ScriptedSink()) as task:
                await vtn.wait_for(lambda: ven.failed_polls >= 2)
                assert not task.done()
            assert collector.got == []
            cause = links.states[Link.OPENADR3].cause
            assert words in cause and f"307, a redirect to http://127.0.0.1:{collector.port}:" in cause, cause
        assert SECRET not in caplog.text and "client=truck-1" not in caplog.text

    run(scenario)


def test_commissioning_probe_logs_in_registers_and_finds_the_programs() -> None:
    async def scenario() -> None:
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            assert "shows it no program" in await make_ven(vtn).probe_registration()
            vtn.add_program("summer-peak")
            assert await make_ven(vtn).probe_registration() is None
            assert [v["venName"] for v in vtn.vens.values()] == ["truck-1"]  # created once, then found
            problem = await make_ven(vtn, secret="wrong").probe_registration()
            assert "refused client_id 'truck-1'" in problem and "wrong" not in problem
        problem = await make_ven(vtn).probe_registration()  # the VTN is gone
        assert "cannot reach the VTN" in problem

    run(scenario)


# ---------------------------------------------------------------------- events and answers


def test_a_setpoint_event_accepted_becomes_a_discharge_request_and_the_answer_is_reported() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            start = in_seconds(60)
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", start, 600, 5.0, units="KW")
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            (request,) = sink.of(DispatchRequest)
            assert (request.id, request.source, request.kind, request.target_w) == (
                event_id, "openadr3", DispatchKind.DISCHARGE, 5000.0)
            assert request.start == start.timestamp() and request.end == start.timestamp() + 600
            assert vtn.answers_for(event_id) == ["accepted"]
            (report,) = vtn.reports_for(event_id)
            assert report["programID"] == program and report["clientName"] == "truck-1"
            await vtn.wait_for(lambda: ven.polls >= 4)
            assert len(sink.of(DispatchRequest)) == 1  # an unchanged event is not asked again

    run(scenario)


def test_a_negative_setpoint_asks_for_charge_and_zero_for_a_stop() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), [300, 300], [-3.5, 0.0])
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            first, second = sink.of(DispatchRequest)
            assert (first.id, first.kind, first.target_w) == (f"{event_id}#0", DispatchKind.CHARGE, 3500.0)
            assert (second.id, second.kind, second.target_w) == (f"{event_id}#1", DispatchKind.STOP, 0.0)
            assert second.start == first.end

    run(scenario)


def test_simple_levels_map_through_the_configured_shares() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "SIMPLE", in_seconds(60), 300, [1, 2, 3, 0])
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            assert [r.target_w for r in sink.of(DispatchRequest)] == [
                RATING_W * 0.25, RATING_W * 0.5, RATING_W * 0.9, 0.0]

    run(scenario)


def test_a_capped_event_reports_the_cap_and_its_reason() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(cap_at(4200.0))
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 11.5)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            assert vtn.answers_for(event_id) == ["capped"]
            assert vtn.reasons_for(event_id) == [["INSUFFICIENT_ENERGY", "capped by energy above the floor"]]
            caps = [p["values"] for r in vtn.reports_for(event_id) for res in r["resources"]
                    for i in res["intervals"] for p in i["payloads"] if p["type"] == "DISPATCH_CAP"]
            assert caps == [[4.2]]

    run(scenario)


def test_an_event_refused_while_opted_out_reports_opted_out() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(opted_out)
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            assert vtn.answers_for(event_id) == ["refused"]
            assert vtn.reasons_for(event_id)[0][0] == "OPTED_OUT"

    run(scenario)


def test_an_invalid_event_is_refused_clearly_and_the_others_still_served() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            broken = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)
            vtn.events[broken]["intervals"][0]["payloads"][0]["values"] = ["lots"]
            good = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 2.0)
            await vtn.wait_for(lambda: vtn.answers_for(broken) and vtn.answers_for(good))
            assert vtn.answers_for(broken) == ["refused"]
            code, detail = vtn.reasons_for(broken)[0]
            assert code == "INVALID" and "DISPATCH_SETPOINT must carry exactly one finite number" in detail
            assert [r.id for r in sink.of(DispatchRequest)] == [good]

    run(scenario)


def test_an_event_beyond_what_the_ven_holds_is_refused_with_why_not_left_unanswered(monkeypatch) -> None:
    monkeypatch.setattr("firmware_py.dispatch.openadr3.MAX_EVENTS", 1)

    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            held = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)
            await vtn.wait_for(lambda: vtn.answers_for(held))
            more = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 2.0)
            await vtn.wait_for(lambda: vtn.answers_for(more))
            assert vtn.answers_for(held) == ["accepted"] and vtn.answers_for(more) == ["refused"]
            assert vtn.reasons_for(more)[0] == ["INVALID", "the gateway holds 1 OpenADR 3 events already"]
            assert [r.id for r in sink.of(DispatchRequest)] == [held]
            vtn.delete_event(held)  # in one poll: what the deleted event held is free for the new one
            third = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 3.0)
            await vtn.wait_for(lambda: vtn.answers_for(third))
            assert vtn.answers_for(third) == ["accepted"] and vtn.answers_for(more) == ["refused"]
            assert [r.id for r in sink.of(DispatchRequest)] == [held, third]

    run(scenario)


def test_each_malformed_event_is_refused_once_not_on_every_poll() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            bad_units = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0, units="HP")
            no_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)
            del vtn.events[no_id]["id"]
            vtn.events["twice"] = vtn.events[bad_units]  # a second listing entry under another key, same id
            await vtn.wait_for(lambda: vtn.answers_for(bad_units) and len(ven.outcomes) >= 2)
            polls = ven.polls
            await vtn.wait_for(lambda: ven.polls >= polls + 3)
            assert vtn.answers_for(bad_units) == ["refused"]
            assert "DISPATCH_SETPOINT units must be one of KW, W, MW, got 'HP'" in vtn.reasons_for(bad_units)[0][1]
            assert sorted(o.answers[0].detail for o in ven.outcomes) == [
                "DISPATCH_SETPOINT units must be one of KW, W, MW, got 'HP'",
                "event id is missing or not a string of letters, digits, '_' or '-'"]
            assert not sink.received

    run(scenario)


def test_two_objects_under_one_event_id_one_stands_every_poll_and_is_warned_of_once(caplog) -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            good = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(600), 600, 5.0)
            bad = {**vtn.events[good], "intervals": [{"id": 0, "payloads": [{"type": "DISPATCH_SETPOINT",
                                                                             "values": ["5"]}]}]}
            vtn.events = {"first": bad, "second": vtn.events[good]}  # listed in this order, one id
            await vtn.wait_for(lambda: vtn.answers_for(good))
            polls = ven.polls
            await vtn.wait_for(lambda: ven.polls >= polls + 4)
            assert vtn.answers_for(good) == ["refused"]
            assert [o.revision for o in ven.outcomes] == [0]
            assert not sink.of(DispatchRequest) and not sink.of(DispatchCancel)
            assert [r.getMessage() for r in caplog.records if "two objects" in r.getMessage()] == [
                f"OpenADR 3: the VTN lists two objects under event id {good}: one is answered (the one answered "
                "already, else the first listed), the other ignored"]

    run(scenario)


def test_two_objects_under_one_id_listed_in_turn_first_never_take_turns_at_the_inverter() -> None:
    """A VTN that swaps two objects under one id between listings (no stable order): taking the first
    listed each time, each copy was the other's new revision, and the inverter swung between 5 and 2 kW
    on every poll while the log said one was ignored. The one answered already stands."""
    async def scenario() -> None:
        sink = CoreSink()
        async with enrolled(sink) as (vtn, ven, program):
            eid = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-60), 1800, 5.0)
            await vtn.wait_for(lambda: vtn.answers_for(eid))
            five = vtn.events[eid]
            two = copy.deepcopy(five)
            two["intervals"][0]["payloads"][0]["values"] = [2.0]
            sink.run(30)  # ramped up to 5 kW
            applied = []
            for listing in range(6):
                vtn.events = {"a": two, "b": five} if listing % 2 else {"a": five, "b": two}
                polls = ven.polls
                await vtn.wait_for(lambda polls=polls: ven.polls > polls)
                sink.run(2)
                applied.append(sink.applied_w)
            assert applied == [5_000.0] * 6
            assert vtn.answers_for(eid) == ["accepted"] and [o.revision for o in ven.outcomes] == [0]

    run(scenario)


@pytest.mark.parametrize("again", ["the same event", "another event under its id", "the core failing on it once"])
def test_an_event_revised_then_gone_from_a_listing_is_served_when_listed_again(again) -> None:
    """The VTN revised an event (the core held revision 1), then listed no events for a moment (restarting):
    the VEN cancelled it, and took it again at revision 0, which the core refused for good as a duplicate
    of its own ("id already used with other content"): 0 W for the rest of the event. A new event the VTN
    gave the same id was refused the same way. Listed again, it is a new revision, judged anew; also
    when the core fails on its first try (the next poll's try is a revision above the failed one's)."""
    async def scenario() -> None:
        sink = CoreSink()
        failing = [True] if again == "the core failing on it once" else []
        submit = sink.submit

        async def submit_failing_once(item):
            if failing and isinstance(item, DispatchRequest) and item.revision > 1:
                failing.clear()
                raise RuntimeError("the core failed")
            return await submit(item)
        sink.submit = submit_failing_once
        async with enrolled(sink) as (vtn, ven, program):
            eid = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-60), 1800, 5.0)
            await vtn.wait_for(lambda: vtn.answers_for(eid))
            sink.run(30)
            vtn.modify_event(eid, values=[4.0])
            await vtn.wait_for(lambda: len(vtn.answers_for(eid)) == 2)
            sink.run(10)
            assert (sink.c.serving_id, sink.applied_w) == (eid, 4_000.0)
            listed = vtn.events.pop(eid)
            await vtn.wait_for(lambda: sink.c.serving_id is None)
            sink.run(5)
            assert sink.applied_w == 0.0
            if again == "another event under its id":
                listed = copy.deepcopy(listed)
                listed["intervals"][0]["payloads"][0]["values"] = [3.0]
            vtn.events[eid] = listed
            await vtn.wait_for(lambda: len(vtn.answers_for(eid)) == 3)
            sink.run(10)
            assert vtn.answers_for(eid) == ["accepted"] * 3, vtn.reasons_for(eid)
            assert not failing  # the one failure happened
            served = 3_000.0 if again == "another event under its id" else 4_000.0
            assert (sink.c.serving_id, sink.applied_w) == (eid, served)

    run(scenario)


def test_events_over_before_the_ven_started_are_history_neither_answered_nor_taken_again(caplog) -> None:
    """A VTN keeps events until they are deleted: a gateway (re)started must not refuse each past one
    EXPIRED again, flooding the VTN, the log and its own report queue (where usage reports wait)."""
    caplog.set_level(logging.INFO, logger=openadr3.__name__)

    async def scenario() -> None:
        sink = ScriptedSink()
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            program = vtn.add_program("summer-peak")
            past = [vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-86_400 + 3_600 * n), 600, 5.0)
                    for n in range(3)]
            past.append(vtn.add_event(program, "PRICE", in_seconds(-7_200), 3_600, 0.3, units="KWH"))
            live = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 2.0)
            ven = make_ven(vtn)
            async with serving(ven, sink):
                await vtn.wait_for(lambda: vtn.answers_for(live))
                polls = ven.polls
                await vtn.wait_for(lambda: ven.polls >= polls + 3)
                assert vtn.answers_for(live) == ["accepted"]
                assert [vtn.reports_for(e) for e in past] == [[], [], [], []]
                assert ven.pending_reports == 0
                assert [o.event_id for o in ven.outcomes] == [live]
                assert sink.received == sink.of(DispatchRequest) and [r.id for r in sink.received] == [live]
                assert ven.history_passed == 4  # once each, not again on the polls after
            assert_conforming(vtn)

    run(scenario)
    ours = [r for r in caplog.records if r.name == openadr3.__name__]
    assert not [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in ours if "ended before the VEN started" in r.getMessage()] == [
        "OpenADR 3: 4 event(s) listed that ended before the VEN started: passed over, not answered"]


@contextlib.asynccontextmanager
async def serving_interval_0(vtn: BenchVtn3, sink: ScriptedSink, intervals: int, *, into_s: float,
                             meter_wh: float) -> AsyncIterator[tuple[OpenAdr3Ven, str]]:
    """The run before a restart: an event of `intervals` 5-minute intervals from 60 s on, reported after
    each, answered, and this run's VEN serving interval 0 with `meter_wh` `into_s` into it; (VEN, event id)."""
    program = vtn.add_program("summer-peak")
    event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 300, [5.0] * intervals,
                             report_every=1)
    ven = make_ven(vtn)
    async with serving(ven, sink):
        await vtn.wait_for(lambda: vtn.answers_for(event_id))
        sink.offset_s = 60 + into_s
        served(ven, f"{event_id}#0", meter_wh)
        yield ven, event_id


class ForbiddenByIdVtn(BenchVtn3):
    """Will not answer for one event by id (403)."""

    async def _get_event(self, request: web.Request) -> web.Response:
        return web.json_response({"title": "Forbidden", "status": 403}, status=403)


@pytest.mark.parametrize("page, vtn_class", [(50, BenchVtn3), (1, BenchVtn3), (1, ForbiddenByIdVtn)],
                         ids=["one page", "pages: asked by id", "pages: the VTN will not say"])
def test_an_event_the_vtn_deleted_while_the_gateway_was_down_gets_the_energy_the_journal_credits_it(
        monkeypatch, page: int, vtn_class: type[BenchVtn3]) -> None:
    """A gateway stopped mid-event (a power cut), the VTN deleting the event meanwhile (its clean-up after
    the event's end): the restarted VEN never saw the event again, so the 100 Wh the statement credits were
    never reported to the aggregator. Listed on pages, the VTN is asked for the event by id first: a 404
    says it is gone; a VTN that will not say has it taken as gone once two listings running lacked it."""
    monkeypatch.setattr(openadr3, "PAGE", page)

    async def scenario() -> None:
        sink = ScriptedSink()
        async with vtn_class(client_id="truck-1", secret=SECRET) as vtn:
            async with serving_interval_0(vtn, sink, 2, into_s=200, meter_wh=100.0) as (first, event_id):
                await vtn.wait_for(lambda: first.polls >= 2)
            other = vtn.add_event(vtn.add_program("winter-peak"), "DISPATCH_SETPOINT", in_seconds(7_200), 600, 3.0)
            vtn.delete_event(event_id)  # while the gateway is down
            sink.journal_wh = {f"{event_id}#0": 100.0}
            sink.offset_s = 60 + 700  # the event's schedule over
            for _ in range(2):  # restarted, then restarted again once the VTN took the report
                again = make_ven(vtn)
                async with serving(again, sink):
                    await vtn.wait_for(lambda ven=again: ven.polls >= 3 and vtn.answers_for(other))
                    await vtn.wait_for(lambda ven=again: ven.pending_reports == 0)
                assert [energy_reports_of(vtn, event_id, i) for i in (0, 1)] == [[100.0], [0.0]]
            assert_conforming(vtn)

    run(scenario)


def test_an_event_too_large_to_note_is_served_and_the_log_says_what_a_restart_would_miss(caplog) -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 300, 5.0, report_every=1)
            vtn.events[event_id]["eventName"] = "x" * openadr3.HELD_NOTE_MAX
            assert await vtn.wait_for(lambda: vtn.answers_for(event_id)) == ["accepted"]
        assert sink.journal_notes(RecordKind.OPENADR3_HELD, math.inf) == []
        assert f"event {event_id} is not noted in the journal" in caplog.text
        assert "its energy is not reported after the restart" in caplog.text

    run(scenario)


def test_a_restarted_ven_does_not_report_again_with_0_wh_the_intervals_that_ended_before_it_started() -> None:
    """A gateway restarted mid-event holds the event anew: intervals that ended before this run began
    were metered (and reported) by the run that served them; this one never saw their energy, and
    reporting them with 0 Wh would overwrite the VTN's 250 Wh. The event is answered again (the core
    decided its requests anew), for the intervals still to come."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            async with serving_interval_0(vtn, sink, 3, into_s=200, meter_wh=250.0) as (first, event_id):
                sink.offset_s = 60 + 310  # interval 0 over: reported
                await vtn.wait_for(lambda: delivered_per_interval(vtn, event_id))
            before = len(vtn.reports_for(event_id))
            again = make_ven(vtn)  # the gateway restarted: a new VEN, the same VTN, interval 1 running
            async with serving(again, sink):
                await vtn.wait_for(lambda: again.polls >= 3)
                again_answered = vtn.reports_for(event_id)[before:]
                assert [r["reportName"] for r in again_answered] == [f"{event_id} answer r0"]
                assert [i["id"] for i in again_answered[0]["resources"][0]["intervals"]] == [1, 2]
                sink.offset_s = 60 + 610  # interval 1 over: this run's to report
                await vtn.wait_for(lambda: len(delivered_per_interval(vtn, event_id)) == 2)
            assert delivered_per_interval(vtn, event_id) == {0: 250.0, 1: 0.0}
            assert_conforming(vtn)

    run(scenario)


async def cut_in_interval_1(vtn: BenchVtn3, sink: ScriptedSink) -> str:
    """The run before a power cut: interval 0 of a 3-interval event (5 minutes each from 60 s on) served
    with 250 Wh and its report taken, the power cut 100 s into interval 1, which the journal credits with
    120 Wh; the event's id."""
    async with serving_interval_0(vtn, sink, 3, into_s=200, meter_wh=250.0) as (_, event_id):
        sink.offset_s = 60 + 310
        await vtn.wait_for(lambda: delivered_per_interval(vtn, event_id))
        sink.offset_s = 60 + 400
    sink.journal_wh = {f"{event_id}#0": 250.0, f"{event_id}#1": 120.0}
    return event_id


def test_an_event_that_ended_while_the_gateway_was_down_gets_the_reports_its_run_never_sent() -> None:
    """A power cut mid-event, the gateway back after the event's end: the event is history now (not
    answered again), but the aggregator settles on energy reports the run that served it never sent.
    They are sent once, with what the journal credits each interval (the gap billed at the start); an
    interval the VTN took a report of before the cut is not sent again, nor is anything at a later start."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            event_id = await cut_in_interval_1(vtn, sink)
            sink.offset_s = 60 + 1_000  # back after the event's end
            before = len(vtn.reports_for(event_id))
            for _ in range(2):  # and a later start finds the reports taken
                again = make_ven(vtn)
                async with serving(again, sink):
                    await vtn.wait_for(lambda ven=again: ven.polls >= 3)
            sent = vtn.reports_for(event_id)[before:]
            assert [r["reportName"] for r in sent] == [f"{event_id} intervals 1-2"]  # once, in both starts
            assert delivered_per_interval(vtn, event_id) == {0: 250.0, 1: 120.0, 2: 0.0}
            assert_conforming(vtn)

    run(scenario)


def test_an_event_that_ends_between_the_start_and_the_first_listing_still_gets_its_missed_reports() -> None:
    """Back from a power cut 70 s before the event's end, the VTN out of reach for 100 s: the event is over
    by the first listing but not before the start, so it was refused EXPIRED and the earlier run's energy
    never reported. It is still answered EXPIRED (this run could not serve it), and its reports go once."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            event_id = await cut_in_interval_1(vtn, sink)
            sink.offset_s = 60 + 830  # back 70 s before the event's end
            before = len(vtn.reports_for(event_id))
            again = make_ven(vtn)
            first_listing = again._take

            async def late(*args: Any, **kwargs: Any) -> None:
                sink.offset_s = 60 + 930  # the first listing comes after the event's end
                again._take = first_listing
                await first_listing(*args, **kwargs)

            again._take = late
            async with serving(again, sink):
                await vtn.wait_for(lambda: again.polls >= 3)
                vtn.events[event_id] = {**vtn.events[event_id], "eventName": "renamed"}  # and changed after
                await vtn.wait_for(lambda: again.polls >= 7)
            sent = [r["reportName"] for r in vtn.reports_for(event_id)[before:]]
            assert sent == [f"{event_id} answer r0", f"{event_id} intervals 1-2", f"{event_id} answer r1"]
            assert delivered_per_interval(vtn, event_id) == {0: 250.0, 1: 120.0, 2: 0.0}

    run(scenario)


@pytest.mark.parametrize("listed_anew", ["changed", "unlisted then listed"])
def test_the_reports_an_event_over_before_the_start_missed_are_sent_once_however_often_it_is_listed_anew(
        listed_anew: str) -> None:
    """The VTN changing an event that is over (a new name), or leaving it out of a few listings, made the
    VEN take it again in the same run, and send its missed reports a second time: energy counted twice."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            event_id = await cut_in_interval_1(vtn, sink)
            sink.offset_s = 60 + 1_000
            before = len(vtn.reports_for(event_id))
            again = make_ven(vtn)
            async with serving(again, sink):
                await vtn.wait_for(lambda: len(vtn.reports_for(event_id)) == before + 1)
                event = vtn.events.pop(event_id)
                if listed_anew == "changed":
                    vtn.events[event_id] = {**event, "eventName": "renamed"}
                else:
                    polls = again.polls
                    await vtn.wait_for(lambda: again.polls >= polls + 3)
                    vtn.events[event_id] = event
                polls = again.polls
                await vtn.wait_for(lambda: again.polls >= polls + 4)
            assert [r["reportName"] for r in vtn.reports_for(event_id)[before:]] == [f"{event_id} intervals 1-2"]

    run(scenario)


def test_a_restarted_ven_reports_the_interval_running_at_the_restart_with_what_the_journal_credits_it() -> None:
    """A gateway killed mid-interval meters that interval again from 0 in its next run; the journal (and
    `statement`) credit it with what the earlier run delivered, and the crash's meter gap billed at the
    start. The VTN got only this run's 5 Wh: it must get the journal's figure, the one billed."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            async with serving_interval_0(vtn, sink, 2, into_s=100, meter_wh=100.0) as (_, event_id):
                pass  # then the process is killed, interval 0 running
            sink.journal_wh = {f"{event_id}#0": 120.0}  # its account, and the meter's gap billed at the start
            again = make_ven(vtn)
            async with serving(again, sink):
                await vtn.wait_for(lambda: again.polls >= 2)
                served(again, f"{event_id}#0", 5.0)  # the core's new account for the rest of the interval
                sink.offset_s = 60 + 310
                await vtn.wait_for(lambda: delivered_per_interval(vtn, event_id))
            assert delivered_per_interval(vtn, event_id) == {0: 125.0}
            assert_conforming(vtn)

    run(scenario)


@pytest.mark.parametrize(("before", "after", "journaled", "now_serving"), [
    (2, 1, {"#0": 120.0}, ""),  # interval 1 dropped while down: `EVENT#0` becomes `EVENT`
    (1, 2, {"": 120.0}, "#0"),  # a second interval added while down: `EVENT` becomes `EVENT#0`
    (2, 2, {"#0": 120.0, "#1": 30.0}, "#0"),  # kept: read once, and `EVENT#1` is interval 1's, not 0's
    (1, 1, {"": 120.0}, ""),  # kept `EVENT`: its own id and the bare one it could have had, read once
])
def test_a_restarted_ven_reports_the_running_interval_with_its_journaled_energy_when_a_revision_moved_its_id(
        before: int, after: int, journaled: dict[str, float], now_serving: str) -> None:
    """A revision made while the gateway was down may give the interval still running another request id;
    the earlier run's energy is journaled under the old one, and `statement` credits the interval with
    both: the VTN must get their sum, each id's energy once."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            async with serving_interval_0(vtn, sink, before, into_s=100, meter_wh=100.0) as (_, event_id):
                pass  # then the process is killed, interval 0 running
            event = vtn.events[event_id]
            first = event["intervals"][0]
            intervals = [{**first, "id": n, "payloads": copy.deepcopy(first["payloads"])} for n in range(after)]
            vtn.events[event_id] = {**event, "intervals": intervals}
            sink.journal_wh = {f"{event_id}{suffix}": wh for suffix, wh in journaled.items()}
            again = make_ven(vtn)
            async with serving(again, sink):
                await vtn.wait_for(lambda: again.polls >= 2)
                served(again, f"{event_id}{now_serving}", 5.0)  # the core's account under the new id
                sink.offset_s = 60 + 310
                await vtn.wait_for(lambda: delivered_per_interval(vtn, event_id))
            assert delivered_per_interval(vtn, event_id)[0] == 125.0
            assert_conforming(vtn)

    run(scenario)


def test_an_event_that_ended_after_the_ven_started_but_is_listed_late_is_still_refused_expired() -> None:
    """The aggregator must learn the VEN could not serve an event published (or seen) too late; only what
    was over before the VEN started, in the same listing, is history."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            sink.offset_s = 7_200.0  # two hours on: the VTN publishes late (or the VEN was cut off)
            late = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)  # over since the start
            old = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-3_600), 600, 5.0)  # over before it
            await vtn.wait_for(lambda: vtn.answers_for(late))
            polls = ven.polls
            await vtn.wait_for(lambda: ven.polls >= polls + 2)
            assert vtn.answers_for(late) == ["refused"]
            assert vtn.reasons_for(late) == [["EXPIRED", "every interval of the event has ended"]]
            assert vtn.reports_for(old) == [] and ven.history_passed == 1
            assert [o.event_id for o in ven.outcomes] == [late]
            assert not sink.received

    run(scenario)


@pytest.mark.parametrize("program_id", [["p"], {"id": "p"}, 7], ids=["list", "object", "number"])
def test_an_event_whose_program_id_is_not_a_string_is_refused_and_the_others_still_taken(program_id: Any) -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            program = vtn.add_program("summer-peak")
            odd = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)
            vtn.events[odd]["programID"] = program_id
            good = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 2.0)
            ven = make_ven(vtn)
            async with serving(ven, sink) as task:
                await vtn.wait_for(lambda: vtn.answers_for(good) and len(ven.outcomes) >= 2)
                assert not task.done() and ven.failed_polls == 0
            assert [r.id for r in sink.of(DispatchRequest)] == [good]
            (refused,) = [o for o in ven.outcomes if o.event_id == odd]
            assert refused.answers[0].detail == "programID is missing or not a string"

    run(scenario)


class ProgramCountingVtn(BenchVtn3):
    """Counts GET /programs."""

    program_gets = 0

    def _app(self) -> web.Application:
        app = super()._app()

        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "GET" and request.path.endswith("/programs"):
                self.program_gets += 1
            return await handler(request)

        app.middlewares.append(count)
        return app


def test_an_event_of_a_program_the_ven_is_not_enrolled_in_is_refused_once_and_programs_not_read_every_poll(
        caplog) -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with ProgramCountingVtn(client_id="truck-1", secret=SECRET) as vtn:
            vtn.add_program("summer-peak")
            vtn.add_raw_event({"id": "foreign", "objectType": "EVENT", "programID": "not-my-program",
                               "intervalPeriod": {"start": iso_datetime(in_seconds(600)), "duration": "PT600S"},
                               "intervals": [{"id": 0, "payloads": [{"type": "DISPATCH_SETPOINT", "values": [9.0]}]}]})
            ven = make_ven(vtn)
            async with serving(ven, sink):
                await vtn.wait_for(lambda: vtn.answers_for("foreign"), 10)
                polls = ven.polls
                await vtn.wait_for(lambda: ven.polls >= polls + 5, 10)
            assert vtn.answers_for("foreign") == ["refused"]
            assert vtn.reasons_for("foreign")[0][1] == "program not-my-program is not one this VEN is enrolled in"
            assert not sink.of(DispatchRequest)
            assert vtn.program_gets == 2  # at start, and once more for the program the event names
        assert caplog.text.count("program not-my-program is not one this VEN is enrolled in") == 1

    run(scenario)


def test_an_event_refused_for_its_program_is_answered_anew_once_the_ven_is_enrolled_in_it(monkeypatch) -> None:
    monkeypatch.setattr(openadr3, "PROGRAMS_RECHECK_S", 0.0)  # programs read again at every poll that needs it

    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            vtn.add_program("summer-peak")
            winter = vtn.add_program("winter-peak")
            enrolment = vtn.programs.pop(winter)  # not yet enrolled
            event_id = vtn.add_event(winter, "DISPATCH_SETPOINT", in_seconds(600), 600, 5.0)
            ven = make_ven(vtn)
            async with serving(ven, sink):
                assert await vtn.wait_for(lambda: vtn.answers_for(event_id), 10) == ["refused"]
                vtn.programs[winter] = enrolment
                await vtn.wait_for(lambda: len(vtn.answers_for(event_id)) == 2, 10)
            assert vtn.answers_for(event_id) == ["refused", "accepted"]
            (request,) = sink.of(DispatchRequest)
            assert request.target_w == 5_000.0

    run(scenario)


def test_a_subscription_listed_with_a_program_id_that_is_not_a_string_is_not_this_vens() -> None:
    async def scenario() -> None:
        port = free_port()
        async with BenchVtn3(client_id="truck-1", secret=SECRET, subscriptions=True) as vtn:
            program = vtn.add_program("summer-peak")
            ven = make_ven(vtn, poll_interval_s=600, callback_listen=f"127.0.0.1:{port}")
            operations = [{"objects": ["EVENT", "PROGRAM"], "operations": ["POST", "PUT", "DELETE"],
                           "callbackUrl": f"http://127.0.0.1:{port}/openadr3/notify",
                           "bearerToken": ven._callback_token}]
            vtn._subscriptions["odd"] = {"id": "odd", "objectType": "SUBSCRIPTION", "clientName": "truck-1",
                                         "programID": [program], "objectOperations": operations}
            async with serving(ven, ScriptedSink()) as task:
                await vtn.wait_for(lambda: ven.polls and ven.subscribed)
                assert not task.done() and ven.failed_polls == 0
            assert vtn.subscription_count == 2  # the odd one names no program: the VEN's own is made beside it

    run(scenario)


def test_an_event_targeted_at_other_vens_is_ignored_unanswered_and_logged_once(caplog) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        sink = ScriptedSink()
        # Not `enrolled`: its model of the specification is OpenADR 3.1's, whose targets are bare strings.
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn, serving(ven := make_ven(vtn), sink):
            program = vtn.add_program("summer-peak")
            theirs = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 9.0)
            vtn.events[theirs]["targets"] = [{"type": "VEN_NAME", "values": ["truck-2"]}]
            ours = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 2.0)
            vtn.events[ours]["targets"] = [{"type": "VEN_NAME", "values": ["truck-2", "truck-1"]},
                                           {"type": "GROUP", "values": ["north"]}]
            everyones = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 1.0)
            await vtn.wait_for(lambda: vtn.answers_for(ours) and vtn.answers_for(everyones))
            polls = ven.polls
            await vtn.wait_for(lambda: ven.polls >= polls + 3)
            assert sorted(r.id for r in sink.of(DispatchRequest)) == sorted([ours, everyones])
            assert vtn.answers_for(theirs) == [] and theirs not in [o.event_id for o in ven.outcomes]
            assert caplog.text.count(f"event {theirs} is addressed to 'truck-2', not 'truck-1': ignored") == 1

            vtn.modify_event(ours, values=3.0)  # a revision retargeting an event this VEN holds takes it back
            vtn.events[ours]["targets"] = [{"type": "VEN_NAME", "values": ["truck-2"]}]
            await vtn.wait_for(lambda: sink.of(DispatchCancel))
            assert [c.id for c in sink.of(DispatchCancel)] == [ours]

    run(scenario)


def test_modification_is_a_new_revision_and_withdraws_dropped_intervals() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 300, [5.0, 6.0])
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            vtn.modify_event(event_id, values=[7.0], duration_s=600)
            await vtn.wait_for(lambda: len(vtn.answers_for(event_id)) == 3)
            requests = sink.of(DispatchRequest)
            assert [(r.id, r.target_w, r.revision) for r in requests[2:]] == [(event_id, 7000.0, 1)]
            assert {c.id for c in sink.of(DispatchCancel)} == {f"{event_id}#0", f"{event_id}#1"}
            assert requests[-1].end - requests[-1].start == 600

    run(scenario)


def test_a_revision_that_trims_an_ended_interval_still_reports_each_interval_after_it() -> None:
    """A VTN may edit an active event in place, dropping an interval already over: what is reported is
    kept by interval id, so the next interval's energy is still reported (a count of intervals reported,
    carried into the shorter list, skipped it)."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            start = in_seconds(60)
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", start, 300, [5.0, 5.0, 5.0], report_every=1)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            sink.offset_s = 60 + 200
            served(ven, f"{event_id}#0", 100.0)
            sink.offset_s = 60 + 310
            await vtn.wait_for(lambda: delivered_per_interval(vtn, event_id))
            event = vtn.events[event_id]
            for i in event["intervals"]:  # each keeps its own period once interval 0 is gone
                i["intervalPeriod"] = {"start": iso_datetime(start + dt.timedelta(seconds=300 * i["id"])),
                                       "duration": "PT300S"}
            vtn.events[event_id] = {**event, "intervals": [i for i in event["intervals"] if i["id"] != 0]}
            await vtn.wait_for(lambda: len(vtn.answers_for(event_id)) == 5)
            sink.offset_s = 60 + 500
            served(ven, f"{event_id}#1", 200.0)
            sink.offset_s = 60 + 610  # interval 1 over
            await vtn.wait_for(lambda: len(delivered_per_interval(vtn, event_id)) == 2)
            assert delivered_per_interval(vtn, event_id) == {0: 100.0, 1: 200.0}
            sink.offset_s = 60 + 800
            served(ven, f"{event_id}#2", 300.0)
            sink.offset_s = 60 + 910
            await vtn.wait_for(lambda: len(delivered_per_interval(vtn, event_id)) == 3)
            assert delivered_per_interval(vtn, event_id) == {0: 100.0, 1: 200.0, 2: 300.0}

    run(scenario)


def test_a_revision_moving_a_running_interval_to_another_id_serves_it_on_without_a_break() -> None:
    """An event of one interval given a second moves the first from EVENT to EVENT#0: the VEN cancelled
    EVENT before asking for EVENT#0, so the gateway fell to 0 W and ramped up again."""
    async def scenario() -> None:
        sink = CoreSink()
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-60), 600, [5.0])
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            sink.run(60)
            assert sink.applied_w == 5_000.0
            before = len(sink.setpoints)
            vtn.modify_event(event_id, values=[5.0, 5.0])  # the first interval unchanged
            await vtn.wait_for(lambda: len(vtn.answers_for(event_id)) == 3)
            sink.run(5)
            assert min(sink.setpoints[before:]) == 5_000.0 and sink.c.serving_id == f"{event_id}#0"
        assert sink.ended(event_id).reason == "cancelled by openadr3: dropped by the event's new revision"

    run(scenario)


def test_a_revision_that_ends_the_running_interval_ends_its_request() -> None:
    """A revision cut the running interval short, to an end already past: its id stayed in the event's list, so
    it was never counted as dropped, and its request stayed in force to its old end beside the next interval's."""
    async def scenario() -> None:
        sink = CoreSink()
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-60), [600, 600], [5.0, 3.0])
            await vtn.wait_for(lambda: len(vtn.answers_for(event_id)) == 2)
            sink.run(5)
            assert sink.c.serving_id == f"{event_id}#0" and sink.applied_w == 5_000.0
            vtn.modify_event(event_id, duration_s=[30, 600])  # the first over 30 s after its start: the second now
            await vtn.wait_for(lambda: len(vtn.answers_for(event_id)) == 3)
            sink.run(5)
            assert sink.c.serving_id == f"{event_id}#1" and sink.applied_w == 3_000.0
        assert sink.ended(f"{event_id}#0").reason == "cancelled by openadr3: ended by the event's new revision"

    run(scenario)


def test_cancellation_deletes_the_event_and_cancels_its_request() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-30), 600, 5.0)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            vtn.delete_event(event_id)
            await vtn.wait_for(lambda: sink.of(DispatchCancel))
            (cancel,) = sink.of(DispatchCancel)
            assert cancel.id == event_id and "no longer lists" in cancel.reason

    run(scenario)


def test_an_event_the_vtn_deletes_once_its_schedule_is_over_is_no_cancellation_of_its_randomised_tail() -> None:
    """A VTN that cleans up ended events deletes one this VEN, having started it a delay later, still runs:
    the deletion of an event over on the VTN's schedule must not cut that tail short."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            start = in_seconds(60)
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", start, 600, 5.0, event_id="late-start")
            vtn.events[event_id]["intervalPeriod"]["randomizeStart"] = "PT30M"  # no await between: served so
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            (request,) = sink.of(DispatchRequest)
            delay = start_delay_s(ven.config.ven_name, event_id, 1_800.0)
            assert delay > 60 and request.start == pytest.approx(start.timestamp() + delay, abs=1e-3)
            sink.offset_s = start.timestamp() + 600 + 30 - time.time()  # over on the VTN's schedule only
            vtn.delete_event(event_id)
            later = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(7_200), 600, 4.0)
            await vtn.wait_for(lambda: vtn.answers_for(later))  # the listing without it has been read
            assert sink.of(DispatchCancel) == []

    run(scenario)


def test_the_randomised_tail_of_an_event_the_vtn_deleted_after_its_schedule_is_reported_as_it_ends() -> None:
    """The tail runs on after the VTN's clean-up, and so does its energy: the VEN dropped the event with
    its intervals marked reported (none had begun, so nothing was sent), and the aggregator never heard
    of the energy the core went on to deliver in the tail."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with enrolled(sink) as (vtn, ven, program):
            event_id = next(f"late-{n}" for n in range(1000)
                            if 700 < start_delay_s(ven.config.ven_name, f"late-{n}", 1_800.0) < 1_500)
            delay = start_delay_s(ven.config.ven_name, event_id, 1_800.0)
            start = in_seconds(60)
            vtn.add_event(program, "DISPATCH_SETPOINT", start, 300, [5.0, 5.0], event_id=event_id, report_every=1)
            vtn.events[event_id]["intervalPeriod"]["randomizeStart"] = "PT30M"  # no await between: served so
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            t0 = start.timestamp()
            sink.offset_s = t0 + 600 + 30 - time.time()  # over on the VTN's schedule, not yet begun here
            vtn.delete_event(event_id)
            polls = ven.polls
            await vtn.wait_for(lambda: ven.polls >= polls + 2)  # a listing without it has been read
            assert sink.of(DispatchCancel) == []
            sink.offset_s = t0 + delay + 150 - time.time()
            served(ven, f"{event_id}#0", 200.0)
            sink.offset_s = t0 + delay + 450 - time.time()  # interval 0 over: its report falls due
            served(ven, f"{event_id}#1", 210.0)
            await vtn.wait_for(lambda: delivered_per_interval(vtn, event_id).get(0) is not None)
            sink.offset_s = t0 + delay + 700 - time.time()  # the tail over
            served(ven, f"{event_id}#1", 210.0, serving=False)
            await vtn.wait_for(lambda: 1 in delivered_per_interval(vtn, event_id))
            assert [energy_reports_of(vtn, event_id, i) for i in (0, 1)] == [[200.0], [210.0]]

    run(scenario)


def test_a_price_event_deleted_at_the_vtn_is_taken_back_from_the_core() -> None:
    async def scenario() -> None:
        accepted = DispatchAnswer(request_id="", at=0.0, verdict=Verdict.ACCEPTED, detail="meets the threshold")
        sink = ScriptedSink(price_answer=accepted)
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "EXPORT_PRICE", in_seconds(-30), 3600, 0.55, units="KWH",
                                     currency="USD")
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            vtn.delete_event(event_id)
            await vtn.wait_for(lambda: sink.of(DispatchCancel))
            (cancel,) = sink.of(DispatchCancel)
            assert cancel.id == price_id(event_id, 0, PriceKind.EXPORT_PRICE) and "no longer lists" in cancel.reason

    run(scenario)


class BusyVtn(BenchVtn3):
    """Answers the next POST /reports with 429 Too Many Requests, `busy` times."""

    busy = 1

    async def _post_report(self, request: web.Request) -> web.Response:
        if self.busy > 0:
            self.busy -= 1
            return web.json_response({"title": "Too Many Requests", "status": 429}, status=429)
        return await super()._post_report(request)


def energy_reports_of(vtn: BenchVtn3, event_id: str, interval_id: int) -> list[float]:
    """Every DELIVERED_ENERGY the VTN took for one interval, in the order it took them."""
    return [p["values"][0] for r in vtn.reports_for(event_id) for i in r["resources"][0]["intervals"]
            if i["id"] == interval_id for p in i["payloads"] if p["type"] == "DELIVERED_ENERGY"]


def test_a_report_waiting_for_the_vtn_when_the_gateway_stopped_is_sent_after_the_restart_once() -> None:
    """The queue of reports is in memory: a gateway killed while the VTN was away lost interval 0's energy
    report, and the restarted one took every interval over before it started as reported. The restart
    reports it with the journal's energy; a later restart, the VTN having taken it, does not again."""
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with BusyVtn(client_id="truck-1", secret=SECRET) as vtn:
            vtn.busy = 0
            async with serving_interval_0(vtn, sink, 2, into_s=100, meter_wh=100.0) as (first, event_id):
                vtn.busy = 10_000  # the VTN will not take reports now
                sink.offset_s = 60 + 310  # interval 0 over: its report waits for the VTN
                await vtn.wait_for(lambda: first.pending_reports)
            vtn.busy = 0  # the gateway was killed; the VTN is back
            sink.journal_wh = {f"{event_id}#0": 100.0}
            for _ in range(2):  # restarted, then restarted again once the VTN took the report
                again = make_ven(vtn)
                async with serving(again, sink):
                    await vtn.wait_for(lambda ven=again: ven.polls >= 3)
                assert energy_reports_of(vtn, event_id, 0) == [100.0]
            assert_conforming(vtn)

    run(scenario)


def test_a_report_the_vtn_is_too_busy_to_take_is_sent_again_not_dropped() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with BusyVtn(client_id="truck-1", secret=SECRET) as vtn:
            program = vtn.add_program("summer-peak")
            ven = make_ven(vtn)
            async with serving(ven, sink):
                await vtn.wait_for(lambda: ven.polls)
                event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)
                assert await vtn.wait_for(lambda: vtn.answers_for(event_id), 10) == ["accepted"]
                assert vtn.busy == 0 and ven.pending_reports == 0

    run(scenario)


class PausedVtn(BenchVtn3):
    """Answers the next GET /events with `status` and a Retry-After of `retry_after`, `busy` times."""

    busy = 1
    status = 429
    retry_after = "7"

    async def _get_events(self, request: web.Request) -> web.Response:
        if self.busy > 0:
            self.busy -= 1
            return web.json_response({"title": "busy", "status": self.status}, status=self.status,
                                     headers={"Retry-After": self.retry_after})
        return await super()._get_events(request)


@pytest.mark.parametrize(("status", "header", "wait_s"), [
    (429, "7", 7.0),  # as long as the VTN asks
    (503, "3600", 60.0),  # never longer than the VEN's ceiling (retry_max_s)
    (429, "soon", 0.2),  # nothing readable: the back-off alone (the poll interval, at the first failure)
])
def test_a_vtn_that_says_not_now_is_asked_again_when_it_said(status: int, header: str, wait_s: float) -> None:
    async def scenario() -> None:
        async with PausedVtn(client_id="truck-1", secret=SECRET) as vtn:
            vtn.status, vtn.retry_after = status, header
            vtn.add_program("summer-peak")
            ven = make_ven(vtn)
            async with serving(ven, ScriptedSink()):
                await vtn.wait_for(lambda: ven.failed_polls, 10)
                assert ven.next_poll_in_s == pytest.approx(wait_s)
                assert ven.polls == 0 and vtn.busy == 0
                ven.wake()  # a notification: the VTN is talking again, asked at once
                await vtn.wait_for(lambda: ven.polls, 10)
                assert ven.next_poll_in_s <= 0.2

    run(scenario)


def test_a_report_falling_due_while_the_vtn_is_down_wakes_the_ven_once_not_at_every_step() -> None:
    """An interval ended while the VTN answered 503 with a Retry-After: its report fell due at every step
    of the core after it, and each woke the VEN out of its back-off, so it polled the VTN that had asked
    it to wait about 15 times a second until the VTN came back. The report still goes when it is back."""
    async def scenario() -> None:
        sink = CoreSink()
        async with PausedVtn(client_id="truck-1", secret=SECRET) as vtn:
            vtn.busy, vtn.status, vtn.retry_after = 0, 503, "30"
            program = vtn.add_program("summer-peak")
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-30), [60, 60], [5.0, 5.0],
                                     report_every=1)
            ven = make_ven(vtn)
            sink.observers.append(ven.notice_step)
            async with serving(ven, sink):
                await vtn.wait_for(lambda: vtn.answers_for(event_id))
                sink.run(10)
                vtn.busy = 10_000  # the VTN is down, and says so
                await vtn.wait_for(lambda: ven.failed_polls)
                woken = []
                real_wake = ven.wake
                ven.wake = lambda: (woken.append(sink.now()), real_wake())  # type: ignore[method-assign]
                sink.run(40)  # interval 0 ends 20 s in: its report falls due, and 20 steps follow
                assert len(woken) == 1
                assert ven.next_poll_in_s == pytest.approx(30.0)  # the back-off the VTN asked for stands
                vtn.busy = 0  # back
                real_wake()
                assert await vtn.wait_for(lambda: delivered_per_interval(vtn, event_id).get(0))
                assert len(energy_reports_of(vtn, event_id, 0)) == 1

    run(scenario)


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = dt.datetime(2026, 12, 5, 12, 0, tzinfo=UTC).timestamp()
    assert openadr3.retry_after_s("120", now) == 120.0
    assert openadr3.retry_after_s(" 0 ", now) == 0.0
    assert openadr3.retry_after_s("Sat, 05 Dec 2026 12:01:30 GMT", now) == 90.0
    assert openadr3.retry_after_s("Sat, 05 Dec 2026 11:00:00 GMT", now) == 0.0  # already past: no wait
    for unreadable in (None, "", "-5", "1.5", "soon", "Sat, 05 Dec 2026 12:01:30", "\u0661\u0662"):
        assert openadr3.retry_after_s(unreadable, now) is None, unreadable


def test_the_wait_after_busy_is_the_back_off_at_least_and_the_ceiling_at_most() -> None:
    assert openadr3.wait_after_busy(0.5, None, 60.0) == 0.5
    assert openadr3.wait_after_busy(0.5, 7.0, 60.0) == 7.0
    assert openadr3.wait_after_busy(8.0, 7.0, 60.0) == 8.0
    assert openadr3.wait_after_busy(0.5, 3_600.0, 60.0) == 60.0


class FailingVtn(BenchVtn3):
    """Fails every POST /reports for event `poison` with `failure` (a 500, a 200 that is not JSON, a 403)."""

    poison: str | None = None
    failure: Callable[[], web.Response] = staticmethod(lambda: web.Response(status=500))
    failed_reports = 0

    async def _post_report(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.poison is not None and body.get("eventID") == self.poison:
            self.failed_reports += 1
            return self.failure()
        return await super()._post_report(request)


FAILURES = {
    "500": lambda: web.json_response({"title": "Internal Server Error", "status": 500}, status=500),
    "200 not JSON": lambda: web.Response(status=200, text="<html>saved</html>", content_type="text/html"),
    "403": lambda: web.json_response({"title": "Forbidden", "status": 403}, status=403),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_report_the_vtn_keeps_failing_holds_back_no_other_fails_no_poll_and_is_given_up_after_a_day(
        failure: str, caplog) -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with FailingVtn(client_id="truck-1", secret=SECRET) as vtn:
            vtn.failure = FAILURES[failure]
            program = vtn.add_program("summer-peak")
            ven = make_ven(vtn)
            async with serving(ven, sink):
                await vtn.wait_for(lambda: ven.polls)
                vtn.poison = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(600), 600, 5.0)
                await vtn.wait_for(lambda: vtn.failed_reports, 10)
                healthy = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(3_600), 600, 3.0)
                assert await vtn.wait_for(lambda: vtn.answers_for(healthy), 10) == ["accepted"]
                await vtn.wait_for(lambda: vtn.failed_reports >= 8, 10)  # past the 5 tries it once had
                assert ven.pending_reports == 1 and ven.failed_polls == 0
                sink.offset_s = openadr3.MAX_REPORT_FAILING_S  # a day of failures later
                await vtn.wait_for(lambda: ven.pending_reports == 0, 10)
        assert "dropped: the VTN has failed it for 24 h" in caplog.text

    run(scenario)


@pytest.mark.parametrize("failure", ["500", "403"])
def test_an_energy_report_the_vtn_failed_for_minutes_reaches_it_once_it_is_well(failure: str) -> None:
    """Five 500s (2.5 minutes of a failing store at the default poll interval) dropped interval 0's energy
    report for good: the VTN, well again, never got the energy it settles on. So did one 403 (a VTN back
    from an outage before the operator restored this VEN's permissions), and the journal noted it taken."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with FailingVtn(client_id="truck-1", secret=SECRET) as vtn, \
                serving_interval_0(vtn, sink, 2, into_s=100, meter_wh=1234.0) as (ven, event_id):
            vtn.failure = FAILURES[failure]
            vtn.poison = event_id
            sink.offset_s = 370  # interval 0 is over: its report falls due, and the VTN fails it
            await vtn.wait_for(lambda: vtn.failed_reports >= 10, 10)
            vtn.poison = None
            await vtn.wait_for(lambda: ven.pending_reports == 0, 10)
            assert energy_reports_of(vtn, event_id, 0) == [1234.0]
            assert sink.journal_notes(RecordKind.OPENADR3_REPORTED, math.inf) == [
                {"event_id": event_id, "intervals": [0]}]

    run(scenario)


def test_a_report_the_vtn_refuses_for_good_is_journaled_with_its_refusal() -> None:
    """A 400 is the VTN's last word on a report: it is not sent again, after a restart either; the journal
    noted it exactly as a report taken, so nothing on record said the aggregator lacks that energy."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with FailingVtn(client_id="truck-1", secret=SECRET) as vtn, \
                serving_interval_0(vtn, sink, 2, into_s=100, meter_wh=1234.0) as (ven, event_id):
            vtn.failure = lambda: web.json_response({"title": "Bad Request", "status": 400,
                                                     "detail": "interval 0 is closed for reports"}, status=400)
            vtn.poison = event_id
            sink.offset_s = 370  # interval 0 is over: its report falls due, and the VTN refuses it
            await vtn.wait_for(lambda: sink.journal_notes(RecordKind.OPENADR3_REPORTED, math.inf), 10)
            (note,) = sink.journal_notes(RecordKind.OPENADR3_REPORTED, math.inf)
            assert note == {"event_id": event_id, "intervals": [0], "refused": (
                "POST /reports: the VTN answered HTTP 400: Bad Request - interval 0 is closed for reports")}
            assert ven.pending_reports == 0 and vtn.failed_reports == 1

    run(scenario)


class SlowVtn(BenchVtn3):
    """Stores each energy report, then answers only once `answer` is set: after the VEN has stopped waiting."""

    answer: asyncio.Event | None = None
    stored_unanswered = 0

    async def _post_report(self, request: web.Request) -> web.Response:
        response = await super()._post_report(request)
        if self.answer is not None and "intervals" in self.reports[-1]["reportName"]:
            self.stored_unanswered += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.answer.wait(), 30)
        return response


class LostReportVtn(SlowVtn):
    """Loses the first energy report it is sent (it timed out itself, and stored nothing), and cannot list
    reports: `listing` is what GET /reports answers."""

    listing: Callable[[], web.Response] = staticmethod(lambda: web.Response(status=501))

    async def _post_report(self, request: web.Request) -> web.Response:
        if self.answer is not None and not self.stored_unanswered and "intervals" in (await request.json())["reportName"]:
            self.stored_unanswered += 1
            await asyncio.wait_for(self.answer.wait(), 30)
            return web.Response(status=504)
        return await BenchVtn3._post_report(self, request)

    async def _get_reports(self, request: web.Request) -> web.Response:
        return self.listing()


@pytest.mark.parametrize("listing", [
    lambda: web.Response(status=501),  # failed, not refused: the report was counted failed and never sent again
    lambda: web.json_response({"reports": []}),  # no list: every poll failed, every report behind it held back
], ids=["501", "not a list"])
def test_a_report_without_an_answer_is_sent_again_when_the_vtn_cannot_list_reports(monkeypatch, caplog,
                                                                                    listing) -> None:
    monkeypatch.setattr(openadr3, "HTTP_TIMEOUT_S", 0.5)

    async def scenario() -> None:
        sink = ScriptedSink()
        async with LostReportVtn(client_id="truck-1", secret=SECRET) as vtn, \
                serving_interval_0(vtn, sink, 2, into_s=100, meter_wh=777.0) as (ven, event_id):
            vtn.listing = listing
            vtn.answer = asyncio.Event()
            sink.offset_s = 370
            await vtn.wait_for(lambda: ven.failed_polls, 10)
            vtn.answer.set()
            await vtn.wait_for(lambda: ven.pending_reports == 0, 10)
            assert energy_reports_of(vtn, event_id, 0) == [777.0]
            later = vtn.add_event(vtn.add_program("winter-peak"), "DISPATCH_SETPOINT", in_seconds(3_600), 600, 3.0)
            assert await vtn.wait_for(lambda: vtn.answers_for(later), 10) == ["accepted"]
        assert "the VTN cannot say whether it took it" in caplog.text

    run(scenario)


def test_an_energy_report_the_vtn_stored_and_answered_too_late_is_not_sent_twice(monkeypatch, caplog) -> None:
    """The VTN stored the report and answered after the VEN's timeout: the VEN logged "cannot reach the
    VTN" and sent it again, and the VTN held the interval's energy twice (777 + 777 Wh to bill)."""
    monkeypatch.setattr(openadr3, "HTTP_TIMEOUT_S", 0.5)

    async def scenario() -> None:
        sink = ScriptedSink()
        async with SlowVtn(client_id="truck-1", secret=SECRET) as vtn, \
                serving_interval_0(vtn, sink, 2, into_s=100, meter_wh=777.0) as (ven, event_id):
            vtn.answer = asyncio.Event()
            sink.offset_s = 370
            await vtn.wait_for(lambda: ven.failed_polls, 10)
            vtn.answer.set()
            await vtn.wait_for(lambda: ven.pending_reports == 0, 10)
            assert ven.polls > 1 and vtn.stored_unanswered == 1
            assert energy_reports_of(vtn, event_id, 0) == [777.0]
            assert sink.journal_notes(RecordKind.OPENADR3_REPORTED, math.inf) == [
                {"event_id": event_id, "intervals": [0]}]  # noted taken
        assert "POST /reports: no answer from the VTN" in caplog.text and "none within 0.5 s" in caplog.text

    run(scenario)


def revoked(vtn: BenchVtn3) -> web.Response:
    """The client's credentials re-issued: its tokens revoked, the old secret refused, this request 401."""
    vtn.expire_tokens()
    vtn.secret = "new-secret"
    return web.json_response({"title": "Unauthorized", "status": 401}, status=401)


class RotatingVtn(BenchVtn3):
    """Re-issues the client's credentials at the first POST /reports."""

    rotate = True

    async def _post_report(self, request: web.Request) -> web.Response:
        if self.rotate:
            self.rotate = False
            return revoked(self)
        return await super()._post_report(request)


def test_reports_wait_while_the_token_endpoint_refuses_the_secret_not_dropped(caplog) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        async with RotatingVtn(client_id="truck-1", secret=SECRET) as vtn:
            program = vtn.add_program("summer-peak")
            a = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(600), 600, 5.0)
            b = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(3600), 600, 3.0)
            ven = make_ven(vtn)
            async with serving(ven, ScriptedSink()):
                await vtn.wait_for(lambda: vtn.refused_logins and ven.failed_polls, 10)
                assert ven.pending_reports >= 1  # the credential was refused, not the reports
                vtn.secret = SECRET  # the installer fixes the secret
                await vtn.wait_for(lambda: vtn.answers_for(a) and vtn.answers_for(b), 15)
                assert vtn.answers_for(a) == ["accepted"] and vtn.answers_for(b) == ["accepted"]
                assert ven.pending_reports == 0
        assert "refused client_id 'truck-1'" in caplog.text and SECRET not in caplog.text

    run(scenario)


class SkewedVtn(BenchVtn3):
    """Answers 401 to POST /reports while `skewed`, though its token endpoint grants tokens (its token
    check out of step, as during a key rotation)."""

    skewed = True
    refused_reports = 0

    async def _post_report(self, request: web.Request) -> web.Response:
        if self.skewed:
            self.refused_reports += 1
            return web.json_response({"title": "Unauthorized", "status": 401, "detail": "token not yet valid"},
                                     status=401)
        return await super()._post_report(request)


class QuotingVtn(BenchVtn3):
    """Refuses every request past its token endpoint, quoting the credential it refused (as some servers do)."""

    status = 401

    def _app(self) -> web.Application:
        app = super()._app()
        self.quoted: list[str] = []

        @web.middleware
        async def quote(request: web.Request, handler: Any) -> web.StreamResponse:
            if "Authorization" not in request.headers:
                return await handler(request)
            self.quoted.append(request.headers["Authorization"].removeprefix("Bearer "))
            return web.json_response({"title": "Refused", "status": self.status,
                                      "detail": f"invalid token {request.headers['Authorization']}\x1b[2J"},
                                     status=self.status)

        app.middlewares.append(quote)
        return app


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_vtn_quoting_the_token_it_refused_never_puts_it_in_the_cause(status: int) -> None:
    """The problem's words go to the log, the journal's LinkLost record, `status` and commissioning's
    report: the bearer token went with them."""
    async def scenario() -> None:
        async with QuotingVtn(client_id="truck-1", secret=SECRET) as vtn:
            vtn.status = status
            vtn.add_program("summer-peak")
            problem = await make_ven(vtn).probe_registration()
            assert problem is not None and "invalid token Bearer <withheld>\\x1b[2J" in problem, problem
            assert vtn.quoted and not any(token in problem for token in vtn.quoted), problem

    run(scenario)


def test_reports_wait_while_the_vtn_refuses_even_a_fresh_token_and_go_once_it_takes_them() -> None:
    async def scenario() -> None:
        async with SkewedVtn(client_id="truck-1", secret=SECRET) as vtn:
            program = vtn.add_program("summer-peak")
            events = [vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(600 + 700 * n), 600, 5.0)
                      for n in range(3)]
            ven = make_ven(vtn)
            async with serving(ven, ScriptedSink()):
                await vtn.wait_for(lambda: ven.failed_polls >= 2, 10)
                assert ven.pending_reports == 3  # the token was refused, not the reports
                assert vtn.refused_reports <= 2 * ven.failed_polls + 2  # one report tried per poll, not each
                vtn.skewed = False
                await vtn.wait_for(lambda: all(vtn.answers_for(e) for e in events), 15)
                assert [vtn.answers_for(e) for e in events] == [["accepted"]] * 3
                assert ven.pending_reports == 0

    run(scenario)


class RacyVtn(BenchVtn3):
    """Deletes event old-0 when the VEN asks for the second page of events (armed once)."""

    armed = False

    async def _get_events(self, request: web.Request) -> web.Response:
        if self.armed and request.query.get("skip") == "50":
            self.armed = False
            self.delete_event("old-0")  # the aggregator deletes an event while the VEN pages
        return await super()._get_events(request)


def test_an_event_a_paging_race_hides_is_kept_and_one_deleted_is_cancelled() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with RacyVtn(client_id="truck-1", secret=SECRET) as vtn:
            program = vtn.add_program("day-ahead")
            for n in range(50):  # listed before the running event: it is the 51st, on the second page
                vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(86_400 + 3_600 * n), 600, 1.0,
                              event_id=f"old-{n}")
            running = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-60), 3_600, 5.0, event_id="running")
            ven = make_ven(vtn)
            async with serving(ven, sink):
                await vtn.wait_for(lambda: vtn.answers_for(running), 10)
                vtn.armed = True
                await vtn.wait_for(lambda: not vtn.armed, 10)
                await vtn.wait_for(lambda: [c for c in sink.of(DispatchCancel) if c.id == "old-0"], 10)
                polls = ven.polls
                await vtn.wait_for(lambda: ven.polls >= polls + 2, 10)
            assert "running" not in [c.id for c in sink.of(DispatchCancel)]  # on no page once, never deleted
            assert [r.revision for r in sink.of(DispatchRequest) if r.id == running] == [0]  # not taken anew
            assert vtn.single_event_gets >= 2  # asked about both: 'running' still there, 'old-0' a 404

    run(scenario)


class TightLippedVtn(RacyVtn):
    """A racy listing, and no answer for one event by id (403): the VEN must judge from listings alone."""

    async def _get_event(self, request: web.Request) -> web.Response:
        self.single_event_gets += 1
        return web.json_response({"title": "Forbidden", "status": 403}, status=403)


def test_where_the_vtn_will_not_say_an_event_missing_from_one_listing_is_kept_and_from_two_cancelled() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with TightLippedVtn(client_id="truck-1", secret=SECRET) as vtn:
            program = vtn.add_program("day-ahead")
            for n in range(50):  # listed before the running event: it is the 51st, on the second page
                vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(86_400 + 3_600 * n), 600, 1.0,
                              event_id=f"old-{n}")
            running = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-60), 3_600, 5.0, event_id="running")
            for n in range(10):  # listings keep two pages after two deletions
                vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(2 * 86_400 + 3_600 * n), 600, 1.0)
            ven = make_ven(vtn)
            async with serving(ven, sink):
                await vtn.wait_for(lambda: vtn.answers_for(running), 10)
                vtn.armed = True  # the paging race hides 'running' from one listing
                await vtn.wait_for(lambda: not vtn.armed, 10)
                await vtn.wait_for(lambda: [c for c in sink.of(DispatchCancel) if c.id == "old-0"], 10)
                polls = ven.polls
                await vtn.wait_for(lambda: ven.polls >= polls + 2, 10)
                assert "running" not in [c.id for c in sink.of(DispatchCancel)]  # missing from one listing: kept
                vtn.delete_event("old-1")  # on the first page: every later listing of several pages lacks it
                await vtn.wait_for(lambda: [c for c in sink.of(DispatchCancel) if c.id == "old-1"], 10)
            assert "running" not in [c.id for c in sink.of(DispatchCancel)]
            assert vtn.single_event_gets >= 3  # asked, and refused, each time

    run(scenario)


def test_a_listing_longer_than_the_ven_holds_is_read_in_part_never_thrown_away_nor_cancelling(
        monkeypatch, caplog) -> None:
    """A VTN keeps events until deleted: past the bound the VEN goes on with what it holds (events over
    and handled are read past, not held), sees new events, and cancels nothing for lacking."""
    monkeypatch.setattr(openadr3, "MAX_PAGES", 2)  # 100 events held at once (2,000 in the field)
    monkeypatch.setattr(openadr3, "MAX_SCAN_PAGES", 8)
    caplog.set_level(logging.INFO, logger=openadr3.__name__)

    async def scenario() -> None:
        sink = ScriptedSink()
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            program = vtn.add_program("day-ahead")
            held = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(3_600), 600, 5.0, event_id="held")
            for h in range(150):  # hourly prices the VTN has not purged: 151 events, past the 100 held
                vtn.add_event(program, "PRICE", in_seconds(-3_600 * (h + 2)), 3_600, 0.3)
            ven = make_ven(vtn)
            async with serving(ven, sink):
                await vtn.wait_for(lambda: vtn.answers_for(held), 10)
                fresh = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(7_200), 600, 3.0)
                assert await vtn.wait_for(lambda: vtn.answers_for(fresh), 10) == ["accepted"]
                assert ven.failed_polls == 0
        assert "held" not in [c.id for c in sink.of(DispatchCancel)]
        assert caplog.text.count("lists more events than the VEN reads") == 1

    run(scenario)


def test_the_vtn_going_away_neither_ends_nor_extends_the_event_and_polling_resumes() -> None:
    async def scenario() -> None:
        links = LinkBook(time.monotonic)
        sink = ScriptedSink()
        async with enrolled(sink, link=links.handle(Link.OPENADR3)) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-30), 600, 5.0)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            (request,) = sink.of(DispatchRequest)
            await vtn.stop()
            await vtn.wait_for(lambda: links.states[Link.OPENADR3].ok is False, 10)  # its polls fail now
            assert ven.failed_polls >= 1
            assert not sink.of(DispatchCancel)  # the accepted window stands
            gets = vtn.event_gets
            await vtn.start()
            await vtn.wait_for(lambda: vtn.event_gets > gets and links.states[Link.OPENADR3].ok, 10)
            assert sink.of(DispatchRequest) == [request]  # same window, not asked again, not extended
            assert not sink.of(DispatchCancel)

    run(scenario)


@pytest.mark.parametrize("lists", [True, False], ids=["VTN lists subscriptions", "VTN cannot list them"])
def test_subscription_notifications_poll_at_once(lists: bool) -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        port = free_port()
        async with BenchVtn3(client_id="truck-1", secret=SECRET, subscriptions=True, lists_subscriptions=lists) as vtn:
            program = vtn.add_program("summer-peak")
            ven = make_ven(vtn, poll_interval_s=600, callback_listen=f"127.0.0.1:{port}")
            async with serving(ven, sink):
                await vtn.wait_for(lambda: ven.polls and ven.subscribed)
                event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)
                await vtn.wait_for(lambda: vtn.answers_for(event_id))  # long before the 600 s poll
                assert vtn.notifications_sent >= 1
            assert_conforming(vtn)

    run(scenario)


class RevokingVtn(BenchVtn3):
    """Re-issues the client's credentials when the VEN first lists its subscriptions (armed once)."""

    armed = True

    async def _get_subscriptions(self, request: web.Request) -> web.Response:
        if self.armed:
            self.armed = False
            return revoked(self)
        return await super()._get_subscriptions(request)


def test_a_credential_refused_while_subscribing_is_a_failed_cycle_not_a_vtn_without_subscriptions(caplog) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        port = free_port()
        async with RevokingVtn(client_id="truck-1", secret=SECRET, subscriptions=True) as vtn:
            program = vtn.add_program("summer-peak")
            ven = make_ven(vtn, poll_interval_s=600, callback_listen=f"127.0.0.1:{port}")
            async with serving(ven, ScriptedSink()):
                await vtn.wait_for(lambda: vtn.refused_logins and ven.failed_polls, 10)
                assert vtn.subscription_count == 0 and not ven.subscribed
                vtn.secret = SECRET  # the installer fixes the secret
                ven.wake()
                await vtn.wait_for(lambda: vtn.subscription_count == 1 and ven.subscribed, 15)
                event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)
                await vtn.wait_for(lambda: vtn.answers_for(event_id))  # notified: long before the 600 s poll
        assert "takes no subscription" not in caplog.text and SECRET not in caplog.text

    run(scenario)


async def away_and_back(vtn: BenchVtn3, ven: OpenAdr3Ven, forget: Callable[[], object] | None) -> None:
    """The VTN stopped until a poll failed, `forget` what it loses (None: a network blip, it keeps all),
    started again and polled once more."""
    await vtn.stop()
    if forget is not None:
        forget()
    failed = ven.failed_polls
    ven.wake()
    await vtn.wait_for(lambda: ven.failed_polls > failed)
    await vtn.start()
    polls = ven.polls
    ven.wake()
    await vtn.wait_for(lambda: ven.polls > polls)


def test_a_subscription_the_vtn_lost_while_away_is_made_again_and_one_it_kept_is_not_doubled() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        port = free_port()
        async with BenchVtn3(client_id="truck-1", secret=SECRET, subscriptions=True) as vtn:
            program = vtn.add_program("summer-peak")
            ven = make_ven(vtn, poll_interval_s=600, callback_listen=f"127.0.0.1:{port}")
            async with serving(ven, sink):
                await vtn.wait_for(lambda: ven.polls and ven.subscribed)
                for lost in (False, True):  # a network blip (the VTN keeps it), then a VTN restored without it
                    await away_and_back(vtn, ven, vtn.forget_subscriptions if lost else None)
                    assert vtn.subscription_count == 1
                event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)
                await vtn.wait_for(lambda: vtn.answers_for(event_id))  # notified: long before the 600 s poll
            assert_conforming(vtn)

    run(scenario)


def test_a_ven_object_the_vtn_lost_while_away_is_made_again_and_one_it_kept_is_found_not_doubled() -> None:
    """A VTN restored without its VEN objects never saw this gateway again: the VEN kept the id of an object
    that no longer existed and registered only once, at its start."""
    async def scenario() -> None:
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            vtn.add_program("summer-peak")
            ven = make_ven(vtn, poll_interval_s=600)
            async with serving(ven, ScriptedSink()):
                await vtn.wait_for(lambda: ven.polls)
                for lost in (False, True):  # a network blip (the VTN keeps it), then a VTN restored without it
                    await away_and_back(vtn, ven, vtn.vens.clear if lost else None)
                    assert [v["venName"] for v in vtn.vens.values()] == [ven.config.ven_name]
                    assert ven.ven_id in vtn.vens
            assert_conforming(vtn)

    run(scenario)


def test_a_vtn_that_cannot_list_subscriptions_gets_one_per_program_however_often_programs_change() -> None:
    """Each PROGRAM notification made the VEN subscribe to every program again: copies piled up at a VTN
    that cannot list them, each notifying once more."""
    async def scenario() -> None:
        port = free_port()
        async with BenchVtn3(client_id="truck-1", secret=SECRET, subscriptions=True, lists_subscriptions=False) as vtn:
            vtn.add_program("summer-peak")
            ven = make_ven(vtn, poll_interval_s=600, callback_listen=f"127.0.0.1:{port}")
            async with serving(ven, ScriptedSink()):
                await vtn.wait_for(lambda: ven.polls and ven.subscribed)
                token = next(body for kind, body in vtn.received if kind == "SUBSCRIPTION")[
                    "objectOperations"][0]["bearerToken"]
                async with aiohttp.ClientSession() as session:
                    for _ in range(3):
                        polls = ven.polls
                        note = {"objectType": "PROGRAM", "operation": "PUT", "object": {"id": "x"}}
                        async with session.post(f"http://127.0.0.1:{port}/openadr3/notify", json=note,
                                                headers={"Authorization": f"Bearer {token}"}) as resp:
                            assert resp.status == 200
                        await vtn.wait_for(lambda polls=polls: ven.polls > polls)
                assert vtn.subscription_count == 1
                winter = vtn.add_program("winter-peak")  # a second program: its own subscription, and only that
                vtn.add_event(winter, "DISPATCH_SETPOINT", in_seconds(60), 600, 5.0)  # how the VEN hears of it
                # The poll that finds the program, then the one that subscribes to it: woken until it has.
                await vtn.wait_for(lambda: vtn.subscription_count >= 2 or ven.wake())
                polls = ven.polls
                ven.wake()
                await vtn.wait_for(lambda: ven.polls > polls)
                assert vtn.subscription_count == 2

    run(scenario)


def test_a_restarted_gateway_removes_the_subscription_its_earlier_run_left() -> None:
    """Each run has a callback token of its own: the last run's subscription notified an endpoint that
    refuses it, and one more piled up at every restart."""
    async def scenario() -> None:
        port = free_port()
        async with BenchVtn3(client_id="truck-1", secret=SECRET, subscriptions=True) as vtn:
            vtn.add_program("summer-peak")
            for _run in range(2):
                ven = make_ven(vtn, poll_interval_s=600, callback_listen=f"127.0.0.1:{port}")
                async with serving(ven, ScriptedSink()):
                    await vtn.wait_for(lambda ven=ven: ven.polls and ven.subscribed)
                    assert vtn.subscription_count == 1

    run(scenario)


def test_a_notification_without_the_bearer_token_is_refused() -> None:
    async def scenario() -> None:
        port = free_port()
        async with BenchVtn3(client_id="truck-1", secret=SECRET, subscriptions=True) as vtn:
            vtn.add_program("summer-peak")
            ven = make_ven(vtn, poll_interval_s=600, callback_listen=f"127.0.0.1:{port}")
            async with serving(ven, ScriptedSink()):
                await vtn.wait_for(lambda: ven.subscribed)
                url = f"http://127.0.0.1:{port}/openadr3/notify"
                async with aiohttp.ClientSession() as session:
                    async with session.post(url, json={"objectType": "EVENT"}) as resp:
                        assert resp.status == 401
                    token = vtn.received[-1][1]["objectOperations"][0]["bearerToken"]
                    async with session.post(url, data=b"{", headers={"Authorization": f"Bearer {token}"}) as resp:
                        assert resp.status == 400 and "not JSON" in (await resp.json())["detail"]

    run(scenario)


# ---------------------------------------------------------------------- export limits, prices, reports


def test_an_export_capacity_limit_holds_a_site_limit_for_its_interval_only() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            start = in_seconds(3600)
            event_id = vtn.add_event(program, "EXPORT_CAPACITY_LIMIT", start, 600, 3.0)
            await vtn.wait_for(lambda: vtn.answers_for(event_id) or ven.outcomes)
            assert not sink.of(SiteLimit)  # not yet: the interval starts in an hour
            sink.offset_s = 3600 + 10
            await vtn.wait_for(lambda: sink.of(SiteLimit), 5)
            assert sink.of(SiteLimit)[-1].limit_w == 3000.0 and sink.of(SiteLimit)[-1].source == "openadr3"
            assert sink.of(SiteLimit)[-1].export_only  # it caps discharge only
            sink.offset_s = 3600 + 700
            await vtn.wait_for(lambda: sink.of(SiteLimit)[-1].limit_w is None, 5)

    run(scenario)


def test_a_price_event_hands_price_intervals_to_the_gateway_and_reports_its_answer() -> None:
    async def scenario() -> None:
        answer = DispatchAnswer(request_id="", at=0.0, verdict=Verdict.ACCEPTED, detail="below the threshold")
        sink = ScriptedSink(price_answer=answer)
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "PRICE", in_seconds(60), 3600, [0.12, 0.48], units="KWH",
                                     currency="USD")
            await vtn.wait_for(lambda: len(sink.of(PriceInterval)) == 2)
            first, second = sink.of(PriceInterval)
            assert (first.id, first.kind, first.price_per_kwh, first.program) == (
                f"{event_id}#0:PRICE", PriceKind.PRICE, 0.12, "summer-peak")
            assert second.price_per_kwh == 0.48 and second.start == first.end
            assert not sink.of(DispatchRequest)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            assert vtn.answers_for(event_id) == ["accepted", "accepted"]  # one per price interval answered
            assert [r[1] for r in vtn.reasons_for(event_id)] == ["below the threshold"] * 2

    run(scenario)


def test_reports_follow_the_cadence_the_event_asks() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            start = in_seconds(60)
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", start, 300, [5.0, 5.0, 5.0], report_every=1)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            sink.offset_s = 60 + 310  # the first interval is over
            await vtn.wait_for(lambda: len(vtn.reports_for(event_id)) == 2)
            usage = vtn.reports_for(event_id)[1]
            (interval,) = usage["resources"][0]["intervals"]
            assert interval["id"] == 0 and interval["intervalPeriod"]["start"] == iso_datetime(start)
            kinds = {p["type"]: p["values"] for p in interval["payloads"]}
            # OpenADR 3's STORAGE_USABLE_CAPACITY is what the pack holds when full; what is left above
            # the floor (it was sent under that name) has a name of its own.
            assert kinds == {"DELIVERED_ENERGY": [0.0], "STORAGE_CHARGE_LEVEL": [72.5],
                             "STORAGE_USABLE_CAPACITY": [123000.0], "ENERGY_ABOVE_FLOOR": [40000.0]}
            sink.offset_s = 60 + 910  # all over: the last two, then nothing more
            await vtn.wait_for(lambda: len(vtn.reports_for(event_id)) == 4)
            polls = ven.polls
            await vtn.wait_for(lambda: ven.polls >= polls + 3)
            assert len(vtn.reports_for(event_id)) == 4

    run(scenario)


def test_a_report_without_fresh_bms_data_leaves_out_the_charge_level_and_the_energy_above_the_floor() -> None:
    """Right after start-up, or with the BMS silent, the core knows neither the SoC nor the energy above
    the floor (its 0 Wh means "nothing to act on", not "an empty pack"): the report leaves both out rather
    than telling the aggregator the pack can deliver nothing, or a SoC of some time ago."""
    async def scenario() -> None:
        sink = ScriptedSink()
        sink.bms_fresh = False
        async with enrolled(sink) as (vtn, ven, program):
            start = in_seconds(60)
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", start, 300, [5.0, 5.0], report_every=1)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            sink.offset_s = 60 + 310  # the first interval is over
            await vtn.wait_for(lambda: len(vtn.reports_for(event_id)) == 2)
            (interval,) = vtn.reports_for(event_id)[1]["resources"][0]["intervals"]
            kinds = {p["type"]: p["values"] for p in interval["payloads"]}
            assert kinds == {"DELIVERED_ENERGY": [0.0], "STORAGE_USABLE_CAPACITY": [123000.0]}
            sink.bms_fresh = True  # fresh data again: the next report has them
            sink.offset_s = 60 + 610
            await vtn.wait_for(lambda: len(vtn.reports_for(event_id)) == 3)
            (interval,) = vtn.reports_for(event_id)[2]["resources"][0]["intervals"]
            kinds = {p["type"]: p["values"] for p in interval["payloads"]}
            assert kinds["STORAGE_CHARGE_LEVEL"] == [72.5] and kinds["ENERGY_ABOVE_FLOOR"] == [40000.0]

    run(scenario)


def served(ven: OpenAdr3Ven, request_id: str, meter_wh: float, *, serving: bool = True) -> None:
    """What the gateway's observer hands the VEN after a step in which the core serves `request_id`
    with `meter_wh` on its account (a real controller, booked as the core books it); with `serving`
    False, the step that booked it and stopped serving it."""
    request = DispatchRequest(request_id, "openadr3", DispatchKind.DISCHARGE, 1.0, 0.0, 1.0, received_at=0.0)
    booked = Booked(request, DispatchAnswer.accepted(request_id, 0.0), meter_wh=meter_wh)
    c = Controller.start(CorePolicy())
    c = c.evolve(book=c.book.add(booked, 0.0), serving_id=request_id if serving else None)
    ven.notice_step(StepResult(c, InverterCommand(0.0, "test"), [], None))


def timed_intervals_event(event_id: str, program: str, periods: list[tuple[dt.datetime, int, float]],
                          **fields: Any) -> dict[str, Any]:
    """A raw event whose intervals each carry their own period, (start, seconds, kW) each, ids 0, 1, … in
    the order given, asking for its energy every interval."""
    intervals = [{"id": n, "intervalPeriod": {"start": iso_datetime(start), "duration": f"PT{seconds}S"},
                  "payloads": [{"type": "DISPATCH_SETPOINT", "values": [kw]}]}
                 for n, (start, seconds, kw) in enumerate(periods)]
    return {"id": event_id, "objectType": "EVENT", "programID": program, **fields, "intervals": intervals,
            "reportDescriptors": [{"payloadType": "DELIVERED_ENERGY", "frequency": 1}]}


def delivered_per_interval(vtn: BenchVtn3, event_id: str) -> dict[int, float]:
    return {i["id"]: p["values"][0] for r in vtn.reports_for(event_id) for i in r["resources"][0]["intervals"]
            for p in i["payloads"] if p["type"] == "DELIVERED_ENERGY"}


@pytest.mark.parametrize("core_meter_wh, reported_wh", [(80.0, 80.0), (None, 50.0)])
def test_an_event_a_listing_lacked_for_a_moment_reports_each_interval_once_with_all_its_energy(
        core_meter_wh: float | None, reported_wh: float) -> None:
    """One listing came back empty (a VTN restarting): the event was cancelled, its running interval reported
    with its energy so far, and the event taken anew when listed again; then every interval over was reported
    a second time from a reading started again at 0 (0 Wh for one that delivered), replacing the right figure
    at a VTN keeping the newest per interval. The running one ends with all its energy: the core carries the
    request's account on when it is asked again (50 Wh + 30 Wh), or holds 50 Wh if it does not serve it again."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 300, [5.0, 5.0, 5.0],
                                     report_every=1)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            sink.offset_s = 60 + 200
            served(ven, f"{event_id}#0", 100.0)
            sink.offset_s = 60 + 400  # interval 0 over, interval 1 running
            await vtn.wait_for(lambda: delivered_per_interval(vtn, event_id))
            served(ven, f"{event_id}#1", 50.0)
            listed = vtn.events.pop(event_id)
            await vtn.wait_for(lambda: 1 in delivered_per_interval(vtn, event_id))
            assert delivered_per_interval(vtn, event_id) == {0: 100.0, 1: 50.0}
            vtn.events[event_id] = listed
            await vtn.wait_for(lambda: any(r["reportName"].endswith("answer r1") for r in vtn.reports_for(event_id)))
            if core_meter_wh is not None:
                served(ven, f"{event_id}#1", core_meter_wh)  # the account the core carried on
            sink.offset_s = 60 + 610  # interval 1 over
            await vtn.wait_for(lambda: len([r for r in vtn.reports_for(event_id) if "intervals 1-1" in r["reportName"]])
                               == 2)
            assert delivered_per_interval(vtn, event_id) == {0: 100.0, 1: reported_wh}
            assert len([r for r in vtn.reports_for(event_id) if "intervals 0-0" in r["reportName"]]) == 1

    run(scenario)


class GarblingVtn(BenchVtn3):
    """Answers one listing of events with items none of which an event could be (armed once)."""

    armed = False

    async def _get_events(self, request: web.Request) -> web.Response:
        if self.armed:
            self.armed = False
            return web.json_response([1, "x", None, {"id": 7}])
        return await super()._get_events(request)


def test_a_listing_of_nothing_an_event_could_be_cancels_nothing() -> None:
    """A VTN answering `[1, "x", null, {"id": 7}]` for its events: each item was refused and every event held
    cancelled as no longer listed (0 W), then all taken anew at the next good listing."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with GarblingVtn(client_id="truck-1", secret=SECRET) as vtn:
            program = vtn.add_program("summer-peak")
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(-30), 600, 5.0)
            ven = make_ven(vtn)
            async with serving(ven, sink):
                await vtn.wait_for(lambda: vtn.answers_for(event_id))
                failed, vtn.armed = ven.failed_polls, True
                await vtn.wait_for(lambda: ven.failed_polls > failed)
                polls = ven.polls
                await vtn.wait_for(lambda: ven.polls > polls)
                assert sink.of(DispatchCancel) == [] and vtn.answers_for(event_id) == ["accepted"]

    run(scenario)


def test_intervals_listed_out_of_time_order_each_report_their_own_energy() -> None:
    """Each interval may carry its own start, in any order: the one that ends first is reported first,
    with its own energy, and the later one's energy is not lost."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            early, late = in_seconds(60), in_seconds(60 + 1200)
            vtn.add_raw_event(timed_intervals_event("ooo", program, [(late, 600, 5.0), (early, 600, 4.0)], priority=0))
            await vtn.wait_for(lambda: vtn.answers_for("ooo"))
            sink.offset_s = 60 + 300
            served(ven, "ooo#1", 100.0)  # the early interval (id 1) delivers 100 Wh
            sink.offset_s = 60 + 610  # id 1 is over, id 0 has not begun
            await vtn.wait_for(lambda: delivered_per_interval(vtn, "ooo"))
            assert delivered_per_interval(vtn, "ooo") == {1: 100.0}
            sink.offset_s = 60 + 1500
            served(ven, "ooo#0", 200.0)  # the late interval (id 0) delivers 200 Wh
            sink.offset_s = 60 + 1810  # every interval over
            await vtn.wait_for(lambda: len(delivered_per_interval(vtn, "ooo")) == 2)
            assert delivered_per_interval(vtn, "ooo") == {0: 200.0, 1: 100.0}

    run(scenario)


def test_an_interval_inside_another_is_reported_when_it_ends_and_the_outer_one_when_it_ends_with_all_its_energy(
) -> None:
    """Intervals may overlap (the core serves one request at a time and meters each): the inner one
    ending first is reported then, the outer one only once it has ended, each once, with all its energy."""
    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            outer, inner = in_seconds(60), in_seconds(300)
            vtn.add_raw_event(timed_intervals_event("ovl", program, [(outer, 1200, 5.0), (inner, 300, 3.0)]))
            await vtn.wait_for(lambda: vtn.answers_for("ovl"))
            served(ven, "ovl#1", 100.0)
            served(ven, "ovl#0", 400.0)
            sink.offset_s = 700  # the inner interval (id 1) is over, the outer (id 0) runs until +1260
            await vtn.wait_for(lambda: delivered_per_interval(vtn, "ovl"))
            assert delivered_per_interval(vtn, "ovl") == {1: 100.0}
            served(ven, "ovl#0", 1500.0)
            sink.offset_s = 1300  # every interval over
            await vtn.wait_for(lambda: len(delivered_per_interval(vtn, "ovl")) == 2)
            reported = [i["id"] for r in vtn.reports_for("ovl") for i in r["resources"][0]["intervals"]
                        if any(p["type"] == "DELIVERED_ENERGY" for p in i["payloads"])]
            assert reported == [1, 0] and delivered_per_interval(vtn, "ovl") == {0: 1500.0, 1: 100.0}

    run(scenario)


@pytest.mark.parametrize("case", ["charge", "price", "extended", "extended and back", "price of another kind",
                                  "refused revision", "stopped"])
def test_the_energy_report_carries_what_the_core_metered_for_the_interval(case: str) -> None:
    """Each of these reported DELIVERED_ENERGY 0 (or nothing): a charge's energy is negative, and the
    VEN kept the largest figure seen from 0; a price event is served under its price's id; an event
    given a second interval moves its first from EVENT to EVENT#0; and a revision the VEN refuses
    dropped the event without reporting what it had delivered. Taken back to one interval, the event's
    first id reopens in the core with its energy: counted once, not again from what was carried; and
    a price published again as the other kind is served under another id. Stopped (the floor reached
    before the window closed), the energy of the step that stopped it was left out: 1 to 3 Wh short."""
    async def scenario() -> dict[int, float]:
        sink = ScriptedSink(price_answer=DispatchAnswer(request_id="", at=0.0, verdict=Verdict.ACCEPTED))
        async with enrolled(sink) as (vtn, ven, program):
            start = in_seconds(-60)
            if case.startswith("price"):
                event_id = vtn.add_event(program, "EXPORT_PRICE", start, 300, [0.5], units="KWH", currency="USD",
                                         report_every=-1)
            else:
                event_id = vtn.add_event(program, "DISPATCH_SETPOINT", start, 300, [-5.0 if case == "charge" else 5.0],
                                         report_every=-1)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            served(ven, f"{event_id}#0:EXPORT_PRICE" if case.startswith("price") else event_id,
                   -413.0 if case == "charge" else 115.0)
            if case.startswith("extended"):
                vtn.modify_event(event_id, values=[5.0, 3.0])
                await vtn.wait_for(lambda: len(vtn.answers_for(event_id)) == 3)
                served(ven, f"{event_id}#0", 50.0)  # the core's new account for the interval's new id
                if case == "extended and back":
                    vtn.modify_event(event_id, values=[5.0], duration_s=300)
                    await vtn.wait_for(lambda: len(vtn.answers_for(event_id)) == 4)
                    served(ven, event_id, 135.0)  # its account reopened at 115 Wh, and 20 Wh more
            elif case == "price of another kind":
                for payload in (i["payloads"][0] for i in vtn.events[event_id]["intervals"]):
                    payload["type"] = "PRICE"
                for descriptor in vtn.events[event_id].get("payloadDescriptors") or []:
                    descriptor["payloadType"] = "PRICE"
                vtn.modify_event(event_id, values=[0.5])
                await vtn.wait_for(lambda: any(p.id.endswith(":PRICE") for p in sink.of(PriceInterval)))
                served(ven, f"{event_id}#0:PRICE", 50.0)
            elif case == "refused revision":
                vtn.modify_event(event_id, values=[5.0, "a typo"])
                await vtn.wait_for(lambda: "refused" in vtn.answers_for(event_id))
            elif case == "stopped":
                served(ven, event_id, 117.0, serving=False)
            sink.offset_s = 660  # every interval is over: the report falls due
            await vtn.wait_for(lambda: delivered_per_interval(vtn, event_id))
            return delivered_per_interval(vtn, event_id)

    expected = {"charge": {0: -413.0}, "price": {0: 115.0}, "extended": {0: 165.0, 1: 0.0},
                "extended and back": {0: 185.0}, "price of another kind": {0: 165.0}, "refused revision": {0: 115.0},
                "stopped": {0: 117.0}}
    assert run(scenario) == expected[case]


# ---------------------------------------------------------------------- translation (no I/O)

NOW = dt.datetime(2026, 7, 1, 15, 0, tzinfo=UTC)


def event(intervals: Any, **fields: Any) -> dict[str, Any]:
    found = {"id": "ev-1", "objectType": "EVENT", "programID": "prog-1",
             "intervalPeriod": {"start": iso_datetime(NOW), "duration": "PT10M"}, "intervals": intervals}
    found.update(fields)
    return found


def interval(n: int, kind: str = "DISPATCH_SETPOINT", value: Any = 5.0, **more: Any) -> dict[str, Any]:
    return {"id": n, "payloads": [{"type": kind, "values": [value]}], **more}


def translate(payload: Any, *, program: dict[str, Any] | None = None, revision: int = 0,
              now: dt.datetime = NOW - dt.timedelta(minutes=5), currency: str | None = None
              ) -> EventPlan | DispatchAnswer:
    return translate_event(payload, revision=revision, program=program, rating_w=RATING_W,
                           levels_pct=(33.0, 66.0, 100.0), to_gateway_time=dt.datetime.timestamp,
                           received_at=now.timestamp(), currency=currency)


def test_a_randomised_start_moves_every_interval_by_this_vens_delay_and_keeps_its_length() -> None:
    """OpenADR 3 `randomizeStart`: the VTN spreads its VENs' starts; PT0S is none."""
    def windows(**changes: Any) -> list[tuple[float, float]]:
        payload = event([interval(0), interval(1, value=2.0)])
        payload["intervalPeriod"] = {**payload["intervalPeriod"], **changes}
        plan = translate_event(payload, revision=0, program=None, rating_w=RATING_W, levels_pct=(33.0, 66.0, 100.0),
                               to_gateway_time=dt.datetime.timestamp, received_at=NOW.timestamp() - 300,
                               ven_name="truck-1")
        assert isinstance(plan, EventPlan), plan
        return [(r.start, r.end) for r in plan.requests]

    plain = windows()
    delay = start_delay_s("truck-1", "ev-1", 900.0)
    assert 0 < delay < 900 and windows(randomizeStart="PT0S") == plain
    moved = windows(randomizeStart="PT15M")  # to the microsecond: the windows are date-times first
    assert moved == [pytest.approx((start + delay, end + delay), abs=1e-5) for start, end in plain]
    # One interval's own window moves them all (one delay per event: moved apart, intervals could overlap
    # or end out of order), by a delay drawn over the widest window.
    payload = event([interval(0, intervalPeriod={"start": iso_datetime(NOW), "duration": "PT10M",
                                                 "randomizeStart": "PT15M"}), interval(1, value=2.0)])
    payload["intervalPeriod"]["randomizeStart"] = "PT5M"
    plan = translate(payload)
    delay = start_delay_s("", "ev-1", 900.0)
    assert isinstance(plan, EventPlan) and [(r.start, r.end) for r in plan.requests] == [
        pytest.approx((start + delay, end + delay), abs=1e-5) for start, end in plain]
    assert plan.scheduled_end == pytest.approx(plain[-1][1], abs=1e-5)


@pytest.mark.parametrize("priority", [None, 0, 3])
def test_an_events_priority_is_carried_on_its_requests(priority: Any) -> None:
    """OpenADR 3: 0 is the highest priority, null (the default) the lowest; the core ranks one VTN's
    overlapping events by it."""
    plan = translate(event([interval(0), interval(1, value=2.0)], priority=priority))
    assert isinstance(plan, EventPlan) and [r.priority for r in plan.requests] == [priority, priority]


def test_a_price_in_another_currency_than_the_program_pays_in_is_refused_naming_both() -> None:
    priced = event([interval(0, "EXPORT_PRICE", 0.31)],
                   payloadDescriptors=[{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "EXPORT_PRICE",
                                        "units": "KWH", "currency": "EUR"}])
    refused = translate(priced, currency="USD")
    assert isinstance(refused, DispatchAnswer) and refused.reason is ReasonCode.INVALID
    assert "'EUR'" in refused.detail and "'USD'" in refused.detail
    assert isinstance(translate(priced, currency="EUR"), EventPlan)


def test_prices_become_price_intervals_in_the_currency_per_kwh() -> None:
    program = {"id": "prog-1", "programName": "TOU summer", "objectType": "PROGRAM",
               "payloadDescriptors": [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "EXPORT_PRICE",
                                       "units": "MWH", "currency": "USD"}]}
    plan = translate(event([interval(0, "PRICE", 0.31), interval(1, "EXPORT_PRICE", 250.0)],
                           payloadDescriptors=[{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "PRICE",
                                                "units": "KWH", "currency": "USD"}]),
                     program=program, revision=3)
    assert isinstance(plan, EventPlan) and not plan.requests
    assert plan.prices == (
        PriceInterval("ev-1#0:PRICE", "openadr3", "TOU summer", PriceKind.PRICE, 0.31, NOW.timestamp(),
                      NOW.timestamp() + 600, (NOW - dt.timedelta(minutes=5)).timestamp(), 3),
        PriceInterval("ev-1#1:EXPORT_PRICE", "openadr3", "TOU summer", PriceKind.EXPORT_PRICE, 0.25, NOW.timestamp() + 600,
                      NOW.timestamp() + 1200, (NOW - dt.timedelta(minutes=5)).timestamp(), 3))


def test_prices_of_ended_intervals_are_dropped_and_an_all_past_price_event_expires() -> None:
    plan = translate(event([interval(0, "PRICE", 0.1), interval(1, "PRICE", 0.2)]),
                     now=NOW + dt.timedelta(minutes=15))
    assert isinstance(plan, EventPlan) and [p.id for p in plan.prices] == ["ev-1#1:PRICE"]
    expired = translate(event([interval(0, "PRICE", 0.1)]), now=NOW + dt.timedelta(hours=1))
    assert isinstance(expired, DispatchAnswer) and expired.reason is ReasonCode.EXPIRED


def test_an_event_over_before_history_before_is_past_and_one_over_after_it_expired() -> None:
    payload = event([interval(0), interval(1)])  # NOW to NOW + 20 min
    later = NOW + dt.timedelta(hours=1)
    ended = (NOW + dt.timedelta(minutes=20)).timestamp()

    def at(history: dt.datetime) -> Any:
        return translate_event(payload, revision=0, program=None, rating_w=RATING_W, levels_pct=(33.0, 66.0, 100.0),
                               to_gateway_time=dt.datetime.timestamp, received_at=later.timestamp(),
                               history_before=history.timestamp())

    past = at(NOW + dt.timedelta(minutes=30))
    assert isinstance(past, Past) and (past.event_id, past.ended_at) == ("ev-1", ended)
    assert past.plan is not None and [w.interval_id for w in past.plan.intervals] == [0, 1]  # for its last reports
    assert past.plan.requests == ()  # nothing of it is asked of the core
    expired = at(NOW + dt.timedelta(minutes=10))  # the VEN started while it ran
    assert isinstance(expired, DispatchAnswer) and expired.reason is ReasonCode.EXPIRED
    broken = translate_event(event([interval(0, value="lots")]), revision=0, program=None, rating_w=RATING_W,
                             levels_pct=(33.0, 66.0, 100.0), to_gateway_time=dt.datetime.timestamp,
                             received_at=later.timestamp(), history_before=later.timestamp())
    assert isinstance(broken, DispatchAnswer) and broken.reason is ReasonCode.INVALID  # malformed stays INVALID


def test_an_export_limit_caps_the_same_intervals_discharge_and_is_a_limit_window() -> None:
    plan = translate(event([{"id": 0, "payloads": [{"type": "DISPATCH_SETPOINT", "values": [9.0]},
                                                   {"type": "EXPORT_CAPACITY_LIMIT", "values": [4.0]}]}]))
    assert isinstance(plan, EventPlan)
    assert [r.target_w for r in plan.requests] == [4000.0]
    assert [(w.limit_w, w.start) for w in plan.limits] == [(4000.0, NOW.timestamp())]


def test_one_interval_asking_for_power_is_requested_under_the_event_id_and_only_that_window_carries_it() -> None:
    plan = translate(event([interval(0, "EXPORT_CAPACITY_LIMIT", 3.0), interval(1, value=2.0),
                            interval(2, "PRICE", 0.2)]))
    assert isinstance(plan, EventPlan)
    assert [r.id for r in plan.requests] == ["ev-1"] and plan.requests[0].start == NOW.timestamp() + 600
    assert [w.request_id for w in plan.intervals] == [None, "ev-1", None]


def test_intervals_take_their_own_period_or_the_events_start_plus_the_durations_before_them() -> None:
    later = NOW + dt.timedelta(hours=2)
    plan = translate(event([interval(0), interval(1, intervalPeriod={"duration": "PT30M"}),
                            interval(2, intervalPeriod={"start": iso_datetime(later)}), interval(3)]))
    assert isinstance(plan, EventPlan)
    t0 = NOW.timestamp()
    assert [(w.start - t0, w.end - t0) for w in plan.intervals] == [  # laid out by time, not as listed
        (0, 600), (600, 2400), (3000, 3600), (7200, 7800)]


def test_program_interval_period_and_descriptors_are_the_defaults() -> None:
    program = {"id": "prog-1", "programName": "p", "intervalPeriod": {"start": iso_datetime(NOW), "duration": "PT1H"},
               "payloadDescriptors": [{"payloadType": "DISPATCH_SETPOINT", "units": "W"}]}
    payload = event([interval(0, value=2500)])
    del payload["intervalPeriod"]
    plan = translate(payload, program=program)
    assert isinstance(plan, EventPlan)
    assert [(r.target_w, r.end - r.start) for r in plan.requests] == [(2500.0, 3600.0)]


def test_an_event_descriptor_without_units_or_currency_takes_the_programs_field_by_field() -> None:
    """`units` and `currency` are optional: an event repeating the program's descriptor without them
    still means the program's W (not the default kW: 5000 W, not 5 MW) and the program's currency."""
    program = {"id": "prog-1", "programName": "p",
               "payloadDescriptors": [{"payloadType": "DISPATCH_SETPOINT", "units": "W"},
                                      {"payloadType": "EXPORT_PRICE", "units": "MWH", "currency": "EUR"}]}
    bare = [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "DISPATCH_SETPOINT"},
            {"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "EXPORT_PRICE", "units": "KWH"}]
    plan = translate(event([interval(0, value=5000)], payloadDescriptors=bare), program=program)
    assert isinstance(plan, EventPlan) and [r.target_w for r in plan.requests] == [5000.0]
    refused = translate(event([interval(0, "EXPORT_PRICE", 0.31)], payloadDescriptors=bare), program=program,
                        currency="USD")
    assert isinstance(refused, DispatchAnswer) and "'EUR'" in refused.detail
    priced = translate(event([interval(0, "EXPORT_PRICE", 0.31)], payloadDescriptors=bare), program=program,
                       currency="EUR")
    assert isinstance(priced, EventPlan) and [p.price_per_kwh for p in priced.prices] == [0.31]


@pytest.mark.parametrize("span", ["P1Y", "P400D"])
def test_a_program_a_year_long_refuses_no_event_whose_intervals_carry_their_own_periods(span) -> None:
    """The program's intervalPeriod is its span, "could be years long": read only where an interval needs it."""
    program = {"id": "prog-1", "programName": "p", "intervalPeriod": {"start": iso_datetime(NOW), "duration": span}}
    payload = event([interval(0, value=2.5, intervalPeriod={"start": iso_datetime(NOW), "duration": "PT1H"})])
    del payload["intervalPeriod"]
    plan = translate(payload, program=program)
    assert isinstance(plan, EventPlan), plan
    assert [(r.target_w, r.end - r.start) for r in plan.requests] == [(2500.0, 3600.0)]


@pytest.mark.parametrize("payload, words", [
    ("not an event", "event must be an object"),
    (event([interval(0)], id="bad id!"), "event id is missing"),
    (event([interval(0)], programID=None), "programID is missing"),
    (event([]), "event has no intervals"),
    (event([interval(0), interval(0)]), "interval id 0 appears twice"),
    (event([interval(0, value=math.inf)]), "exactly one finite number"),
    (event([interval(0, value=True)]), "exactly one finite number"),
    (event([interval(0, value=20_000)]), "implausible"),
    (event([interval(0, "SIMPLE", 4)]), "SIMPLE level must be 0, 1, 2 or 3"),
    (event([interval(0, "EXPORT_CAPACITY_LIMIT", -1)]), "EXPORT_CAPACITY_LIMIT must be >= 0"),
    (event([interval(0, "GHG", 300)]), "no DISPATCH_SETPOINT, SIMPLE, EXPORT_CAPACITY_LIMIT, PRICE or EXPORT_PRICE"),
    (event([interval(0)], intervalPeriod={"start": "yesterday", "duration": "PT1H"}), "not an RFC 3339"),
    (event([interval(0)], intervalPeriod={"start": "2026-07-01T15:00:00", "duration": "PT1H"}), "UTC offset"),
    (event([interval(0)], intervalPeriod={"start": iso_datetime(NOW), "duration": "P1M"}), "calendar durations"),
    (event([interval(0)], intervalPeriod={"start": iso_datetime(NOW), "duration": "P9999Y"}), "calendar"),
    (event([interval(0)], intervalPeriod={"start": iso_datetime(NOW), "duration": "PT0S"}), "must be > 0"),
    (event([interval(0)], intervalPeriod={"start": iso_datetime(NOW)}), "has no duration"),
    (event([interval(0)], intervalPeriod={"start": "0001-01-01T00:00:00Z", "duration": "PT1H"}), "'now'"),
    (event([interval(0)], payloadDescriptors=[{"payloadType": "DISPATCH_SETPOINT", "units": "HP"}]), "units"),
    (event([{"id": 0, "payloads": [{"type": "PRICE", "values": [1]}, {"type": "PRICE", "values": [2]}]}]),
     "appears twice"),
    (event([interval(0)], reportDescriptors=[{"payloadType": "USAGE", "frequency": "often"}]), "frequency"),
    (event([interval(0)], priority=-1), "priority must be a whole number >= 0 or null, got -1"),
    (event([interval(0)], intervalPeriod={"start": iso_datetime(NOW), "duration": "PT1H", "randomizeStart": "soon"}),
     "intervalPeriod.randomizeStart"),
    (event([interval(0)], intervalPeriod={"start": iso_datetime(NOW), "duration": "PT1H", "randomizeStart": "P2Y"}),
     "randomizeStart"),
    (event([interval(0)], priority=1.5), "priority must be a whole number >= 0 or null, got 1.5"),
    (event([interval(0)], targets={"type": "VEN_NAME", "values": ["truck-1"]}), "targets must be a list"),
    (event([interval(0)], targets=[{"type": "VEN_NAME", "values": "truck-1"}]), "targets[0] must be an object"),
    (event([interval(0)], targets=[{"values": ["truck-1"]}]), "targets[0] must be an object with a string type"),
])
def test_bad_events_are_refused_clearly(payload: Any, words: str) -> None:
    answer = translate(payload)
    assert isinstance(answer, DispatchAnswer) and answer.verdict is Verdict.REJECTED
    assert answer.reason is ReasonCode.INVALID and words in answer.detail


@pytest.mark.parametrize("targets, ours", [
    (None, True),
    ([], True),
    ([{"type": "VEN_NAME", "values": ["truck-1"]}], True),
    ([{"type": "VEN_NAME", "values": ["truck-2"]}], False),
    ([{"type": "VEN_NAME", "values": []}], False),
    ([{"type": "VEN_NAME", "values": ["truck-1", "truck-2"]}, {"type": "VEN_NAME", "values": ["truck-2"]}], False),
    ([{"type": "GROUP", "values": ["north"]}], True),
    ([{"type": "RESOURCE_NAME", "values": ["pack-9"]}], False),  # no resource of this VEN's
    ([{"type": "RESOURCE_NAME", "values": ["truck-1"]}], True),  # the resource its reports name
    ([{"type": "GROUP", "values": ["north"]}, {"type": "VEN_NAME", "values": ["truck-3"]}], False),
    (["truck-2", "north"], True),  # OpenADR 3.1's form: the VTN matches them, the VEN cannot
])
def test_an_event_is_this_vens_unless_a_ven_name_target_leaves_it_out(targets: Any, ours: bool) -> None:
    payload = event([interval(0)], targets=targets)
    plan = translate_event(payload, revision=0, program=None, rating_w=RATING_W, levels_pct=(33.0, 66.0, 100.0),
                           to_gateway_time=dt.datetime.timestamp, received_at=(NOW - dt.timedelta(minutes=5)).timestamp(),
                           ven_name="truck-1")
    assert isinstance(plan, EventPlan if ours else NotAddressed), plan
    assert isinstance(translate(payload), EventPlan)  # a VEN without a name judges no target


@pytest.mark.parametrize("descriptor, every", [
    ({"numIntervals": 1, "frequency": -1}, 1),  # -1: "the same as numIntervals"
    ({"numIntervals": 2}, 2),  # frequency defaults to -1
    ({"frequency": -1}, 0),  # numIntervals defaults to -1: all of them, once at the end
    ({"numIntervals": 3, "frequency": 2}, 2),
])
def test_a_report_frequency_of_minus_one_follows_num_intervals(descriptor: dict[str, Any], every: int) -> None:
    plan = translate(event([interval(n) for n in range(4)],
                           reportDescriptors=[{"payloadType": "USAGE", **descriptor}]))
    assert isinstance(plan, EventPlan) and [a.every for a in plan.reports] == [every]


def test_a_report_descriptor_with_a_bad_num_intervals_is_refused_clearly() -> None:
    answer = translate(event([interval(0)], reportDescriptors=[{"payloadType": "USAGE", "numIntervals": "all"}]))
    assert isinstance(answer, DispatchAnswer) and answer.verdict is Verdict.REJECTED
    assert "numIntervals" in answer.detail


@given(st.lists(st.tuples(st.integers(1, 7200), st.one_of(st.none(), st.integers(-86_400, 86_400))),
                min_size=1, max_size=8),
       st.integers(60, 7200))
def test_intervals_are_laid_out_as_the_independent_model_lays_them_out(layout: list[tuple[int, int | None]],
                                                                     default_s: int) -> None:
    """Own durations and starts mixed with the event's defaults: the same windows as python-oa3's."""
    intervals = []
    for n, (seconds, start_shift) in enumerate(layout):
        period: dict[str, Any] = {"duration": f"PT{seconds}S"}
        if start_shift is not None:
            period["start"] = iso_datetime(NOW + dt.timedelta(seconds=start_shift))
        intervals.append(interval(n, intervalPeriod=period))
    payload = event(intervals, intervalPeriod={"start": iso_datetime(NOW), "duration": f"PT{default_s}S"})
    conforms(payload)
    plan = translate(payload, now=NOW - dt.timedelta(days=2))
    assert isinstance(plan, EventPlan)
    by_start = sorted(resolved_windows(payload), key=lambda w: w[1])  # laid out by time, ties as listed
    assert [(w.interval_id, w.start, w.end) for w in plan.intervals] == by_start


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=20)
PAYLOAD_TYPES = st.sampled_from(["DISPATCH_SETPOINT", "SIMPLE", "EXPORT_CAPACITY_LIMIT", "PRICE", "EXPORT_PRICE",
                                 "GHG"])
NEAR_VALID = st.builds(
    lambda ints, period, descriptors: event(ints, **({"intervalPeriod": period} if period is not None else {}),
                                            **({"payloadDescriptors": descriptors} if descriptors else {})),
    st.lists(st.fixed_dictionaries({"id": st.one_of(st.integers(-3, 3), JSON),
                                    "payloads": st.lists(st.fixed_dictionaries(
                                        {"type": st.one_of(PAYLOAD_TYPES, JSON),
                                         "values": st.one_of(st.lists(st.one_of(st.floats(), st.integers(), JSON),
                                                                      max_size=2), JSON)}), max_size=3)},
                                   optional={"intervalPeriod": JSON}), max_size=4),
    st.one_of(st.none(), JSON, st.fixed_dictionaries({"start": st.one_of(st.just(iso_datetime(NOW)), JSON),
                                                      "duration": st.one_of(st.sampled_from(
                                                          ["PT1H", "PT0S", "P1D", "PT0.5S", "P", "PT"]), JSON)})),
    st.one_of(st.none(), st.lists(st.fixed_dictionaries({"payloadType": PAYLOAD_TYPES,
                                                         "units": st.one_of(st.sampled_from(
                                                             ["KW", "W", "KWH", "MWH", "HP"]), JSON)}),
                                  max_size=2)))


@given(st.one_of(JSON, NEAR_VALID))
def test_fuzzed_events_get_a_plan_or_a_clear_refusal_never_an_exception(payload: Any) -> None:
    answer = translate(payload)
    if isinstance(answer, DispatchAnswer):
        assert answer.verdict is Verdict.REJECTED and answer.reason in (ReasonCode.INVALID, ReasonCode.EXPIRED)
        assert answer.detail and "Traceback" not in answer.detail
    else:
        assert isinstance(answer, EventPlan)
        for request in answer.requests:
            assert math.isfinite(request.target_w) and 0 <= request.target_w <= 10_000_000
            assert request.start < request.end
        for price in answer.prices:
            assert math.isfinite(price.price_per_kwh) and price.start < price.end


@pytest.mark.parametrize("text, seconds", [("PT1H", 3600), ("P1DT30M", 88_200), ("PT0.5S", 0.5), ("P1W", 604_800),
                                           ("PT90M", 5400)])
def test_iso_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["PT\u0663S", "PT\uff11H", "P\u0967D"])
def test_a_duration_written_with_other_digits_than_ascii_is_refused(text: str) -> None:
    """ISO 8601's digits are 0-9: 'PT٣S' (an Arabic-Indic three) was read as 3 s, a VTN's malformed
    duration taken as a length the VTN never wrote in the protocol's grammar."""
    with pytest.raises(ValueError, match="not an ISO 8601 duration"):
        parse_duration(text)


# ---------------------------------------------------------------------- configuration


def write_secret(tmp_path: Path, mode: int = 0o600, text: str = SECRET + "\n") -> Path:
    path = tmp_path / "openadr3.secret"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_config_section_is_read_with_its_defaults(tmp_path: Path) -> None:
    config = parse("[dispatch.openadr3]\nenabled = true\n", "gw.toml", tmp_path)
    section = config.dispatch.openadr3
    assert (section.vtn_url, section.token_url, section.client_id, section.ven_name, section.poll_interval_s) == (
        "http://127.0.0.1:8081/openadr3/3.0.1", "", "truck-1", "truck-1", 30)
    assert section.client_secret_file == str(tmp_path / "openadr3.secret")


@pytest.mark.parametrize("mode, changes, words", [
    (0o600, {"vtn_url": "ftp://vtn"}, "dispatch.openadr3.vtn_url: must be an http"),
    (0o600, {"token_url": "vtn/token"}, "dispatch.openadr3.token_url"),
    (0o600, {"client_id": " "}, "dispatch.openadr3.client_id: must not be empty"),
    (0o600, {"callback_listen": "nowhere"}, "dispatch.openadr3.callback_listen"),
    (0o644, {}, "accessible by group or others"),
    (None, {}, "no such file"),
])
def test_config_mistakes_name_the_key(tmp_path: Path, mode: int | None, changes: dict[str, Any], words: str) -> None:
    path = write_secret(tmp_path, mode) if mode is not None else tmp_path / "absent.secret"
    config = replace(OpenAdr3Config(enabled=True, client_secret_file=str(path)), **changes)
    problems = check(config)
    assert any(words in p for p in problems), problems
    assert not any(SECRET in p for p in problems)
    with pytest.raises(InputError):
        OpenAdr3Ven(config, rating_w=RATING_W)


def test_the_secret_is_read_from_its_file(tmp_path: Path) -> None:
    config = OpenAdr3Config(enabled=True, client_secret_file=str(write_secret(tmp_path)))
    assert check(config) == []
    ven = OpenAdr3Ven(config, rating_w=RATING_W)
    assert ven._secret == SECRET
    empty = OpenAdr3Config(enabled=True, client_secret_file=str(write_secret(tmp_path, text="\n")))
    assert any("is empty" in p for p in check(empty))


def test_check_config_names_the_secret_file_when_the_section_is_enabled(tmp_path: Path) -> None:
    from firmware_py import assembly

    secret = write_secret(tmp_path, 0o640)
    config = parse(f'[dispatch.openadr3]\nenabled = true\nclient_secret_file = "{secret}"\n', "gw.toml", tmp_path)
    with pytest.raises(InputError) as err:
        assembly.check(config)
    assert any("gw.toml: dispatch.openadr3.client_secret_file" in p and "chmod 600" in p for p in err.value.problems)
    os.chmod(secret, 0o600)
    assembly.check(config)  # nothing else to refuse


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: only root can give a file to another user "
                    "(uid 65534, nobody) to check that it is refused")
def test_a_secret_another_user_owns_is_refused_by_the_check_as_the_ven_refuses_it(tmp_path: Path) -> None:
    """Mode 0600 but nobody's: the VEN (`run`, this user) refuses it, so the check `check-config` and
    `commission` make must too, under the key; only for another user named (`check-config` as root
    for the service's user) is it that user's to own. No advice to delete a secret only the aggregator
    can issue again, and never the secret itself."""
    from firmware_py import assembly

    path = write_secret(tmp_path)
    os.chown(path, 65_534, 65_534)
    config = OpenAdr3Config(enabled=True, client_secret_file=str(path))
    (problem,) = check(config)
    assert problem.startswith(f"dispatch.openadr3.client_secret_file: {path}: ") and "belongs to user nobody" in problem
    assert f"chown root {path}" in problem and "Delete" not in problem and SECRET not in problem
    with pytest.raises(InputError) as err:
        OpenAdr3Ven(config, rating_w=RATING_W)
    assert err.value.problems == [problem]
    assert check(config, owner_uid=65_534) == []
    gw = parse(f'[dispatch.openadr3]\nenabled = true\nclient_secret_file = "{path}"\n', "gw.toml", tmp_path)
    with pytest.raises(InputError) as err:
        assembly.check(gw)  # `run`'s and `commission`'s, as `check-config`'s when not root
    assert f"gw.toml: dispatch.openadr3.client_secret_file: {path}: " in "\n".join(err.value.problems)


def test_assembly_builds_the_ven_on_the_gateways_clocks_link_and_levels(tmp_path: Path) -> None:
    from firmware_py.assembly import assemble
    from firmware_py.clocks import Clocks
    from firmware_py.config import Config
    from firmware_py.core.types import OwnerSettings

    base = Config()
    secret = write_secret(tmp_path)
    config = replace(base, can=replace(base.can, interface="virtual", channel=f"oadr3-{tmp_path}"),
                     journal=replace(base.journal, path=str(tmp_path / "j.sqlite")),
                     dispatch=replace(base.dispatch, openadr3=replace(base.dispatch.openadr3, enabled=True,
                                                                      client_secret_file=str(secret))))
    clocks = Clocks(monotonic=lambda: 100.0, wall=lambda: 1_000_100.0)
    built = assemble(config, clocks, owner=OwnerSettings(40, 0.0))
    try:
        ven = built.integrations["dispatch.openadr3"]
        assert isinstance(ven, OpenAdr3Ven) and ven.notice_step in built.gateway.observers
        assert Link.OPENADR3.value in built.gateway.links.view(100.0)
        # an event's wall-clock instant lands on the core's monotonic base
        assert ven._to_gateway_time(dt.datetime.fromtimestamp(1_000_160.0, UTC)) == 160.0
        assert ven._levels == built.gateway.policy.simple_levels_pct
    finally:
        built.close()


@pytest.mark.parametrize("base, named, expected", [
    ("https://vtn.example/openadr3", "https://auth.example/token", "https://auth.example/token"),
    ("http://127.0.0.1:8081/openadr3", "http://127.0.0.1:9000/token", "http://127.0.0.1:9000/token"),
    ("https://vtn.example/openadr3", None, "https://vtn.example/openadr3/auth/token"),
    ("https://vtn.example/openadr3", "ftp://x/token", "https://vtn.example/openadr3/auth/token"),
])
def test_the_client_secret_goes_to_the_token_endpoint_the_vtn_names_or_its_own(base, named, expected) -> None:
    assert token_endpoint(base, named) == expected


def test_a_vtn_on_https_naming_a_plain_http_token_endpoint_never_gets_the_secret_sent_in_clear() -> None:
    with pytest.raises(VtnRefused, match="plain HTTP for a VTN on HTTPS: the client secret is not sent there"):
        token_endpoint("https://vtn.example/openadr3", "http://vtn.example:8080/token")


class UnpagedVtn(BenchVtn3):
    """A VTN that ignores `skip` and `limit` and sends the whole listing each time."""

    def _page(self, request: web.Request, objects: list[Any]) -> web.Response:
        self.served.extend(objects)
        return web.json_response(objects)


def test_a_vtn_that_ignores_paging_with_a_whole_page_of_events_is_read_once_not_forty_times() -> None:
    async def scenario() -> None:
        sink = ScriptedSink(accept)
        async with UnpagedVtn(client_id="truck-1", secret=SECRET) as vtn:
            program = vtn.add_program("summer-peak")
            ids = [vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(600 + 700 * n), 600, 1.0)
                   for n in range(50)]  # exactly one page's worth
            ven = make_ven(vtn)
            async with serving(ven, sink):
                await vtn.wait_for(lambda: ven.polls >= 2)
                assert ven.failed_polls == 0
                assert {r.id for r in sink.of(DispatchRequest)} == set(ids)
                assert vtn.event_gets <= 2 * ven.polls  # the page again once, then it knows it had all

    run(scenario)


def test_an_event_period_takes_what_it_leaves_out_from_the_programs_field_by_field() -> None:
    """An event giving only its start left its duration to the program, and was refused INVALID ("no duration");
    one giving start and duration lost the program's randomizeStart: every VEN started in the same second."""
    program = {"id": "prog-1", "programName": "p",
               "intervalPeriod": {"start": iso_datetime(NOW), "duration": "PT1H", "randomizeStart": "PT30M"}}
    delay = start_delay_s("truck-1", "ev-1", 1800.0)
    for period, length in (({"start": iso_datetime(NOW)}, 3600.0), ({"start": iso_datetime(NOW), "duration": "PT10M"},
                                                                   600.0)):
        plan = translate_event(event([interval(0, value=2.5)], intervalPeriod=period), revision=0, program=program,
                               rating_w=RATING_W, levels_pct=(33.0, 66.0, 100.0), to_gateway_time=dt.datetime.timestamp,
                               received_at=NOW.timestamp() - 300, ven_name="truck-1")
        assert isinstance(plan, EventPlan), plan
        assert [(r.start, r.end) for r in plan.requests] == [
            pytest.approx((NOW.timestamp() + delay, NOW.timestamp() + delay + length), abs=1e-5)]


def test_an_event_for_another_resource_is_not_this_vens() -> None:
    """The gateway reports its one resource under its VEN name: an event a shared program addresses to the
    resource 'truck-2' was run by 'truck-1' as well."""
    def plan(*values: str, resources: tuple[str, ...] = ()) -> Any:
        targets = [{"type": "RESOURCE_NAME", "values": list(values)}]
        return translate_event(event([interval(0, value=2.5)], targets=targets), revision=0, program=None,
                               rating_w=RATING_W, levels_pct=(33.0, 66.0, 100.0), to_gateway_time=dt.datetime.timestamp,
                               received_at=NOW.timestamp() - 300, ven_name="truck-1", resources=resources)

    assert plan("truck-2") == NotAddressed("ev-1", ("truck-2",))
    assert isinstance(plan("truck-2", "truck-1"), EventPlan)
    assert isinstance(plan("pack-9", resources=("pack-9",)), EventPlan)  # one the VTN lists under this VEN


@pytest.mark.parametrize("text, seconds", [("PT1.5H", 5400.0), ("P0.5D", 43200.0), ("PT1H30.5M", 5430.0)])
def test_a_duration_may_carry_a_fraction_on_its_smallest_unit(text, seconds) -> None:
    assert parse_duration(text) == seconds


def test_a_fraction_on_a_unit_before_the_smallest_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="only the smallest unit"):
        parse_duration("PT1.5H30M")


def test_a_date_time_may_write_its_z_and_t_in_lower_case() -> None:
    assert parse_datetime("2026-07-01t15:00:00z") == NOW


def test_an_event_for_a_resource_the_vtn_lists_under_this_ven_is_taken_one_for_another_sites_is_not() -> None:
    async def scenario() -> None:
        sink = ScriptedSink()
        async with BenchVtn3(client_id="truck-1", secret=SECRET) as vtn:
            vtn.vens["ven-mine"] = {"id": "ven-mine", "objectType": "VEN", "venName": "truck-1",
                                    "resources": [{"resourceName": "pack-9"}, {"id": "odd"}]}
            program = vtn.add_program("summer-peak")
            mine = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 2.0)
            vtn.events[mine]["targets"] = [{"type": "RESOURCE_NAME", "values": ["pack-9"]}]
            theirs = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 600, 9.0)
            vtn.events[theirs]["targets"] = [{"type": "RESOURCE_NAME", "values": ["truck-2"]}]
            async with serving(ven := make_ven(vtn), sink):
                await vtn.wait_for(lambda: vtn.answers_for(mine))
                polls = ven.polls
                await vtn.wait_for(lambda: ven.polls >= polls + 2)
                assert [r.id for r in sink.of(DispatchRequest)] == [mine] and vtn.answers_for(theirs) == []

    run(scenario)


def test_intervals_that_ended_while_the_vtn_was_away_are_all_reported_none_crowded_out_of_the_queue(
        monkeypatch) -> None:
    """A VTN away for a whole event asked to be told after every interval: on its return every ended
    interval was queued as a report of its own at once, and all but the newest `MAX_PENDING_REPORTS` were
    dropped before one was sent (240 one-minute intervals: 40 never reported). Overdue, they go in one."""
    monkeypatch.setattr(openadr3, "MAX_PENDING_REPORTS", 3)

    async def scenario() -> None:
        sink = ScriptedSink()
        async with enrolled(sink) as (vtn, ven, program):
            event_id = vtn.add_event(program, "DISPATCH_SETPOINT", in_seconds(60), 300, [5.0] * 8, report_every=1)
            await vtn.wait_for(lambda: vtn.answers_for(event_id))
            await vtn.stop()
            sink.offset_s = 60 + 8 * 300 + 10  # the whole event over while it was away
            await vtn.wait_for(lambda: ven.failed_polls >= 1)
            await vtn.start()
            await vtn.wait_for(lambda: energy_reports_of(vtn, event_id, 7) and ven.pending_reports == 0)
            assert [energy_reports_of(vtn, event_id, i) for i in range(8)] == [[0.0]] * 8

    run(scenario)
