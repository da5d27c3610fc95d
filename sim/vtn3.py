"""A bench OpenADR 3 VTN on loopback, for the VEN's tests and for the bench.

An aiohttp server on 127.0.0.1 serving the OpenADR 3.0.1 endpoints a VEN uses:
`GET /auth/server` and `POST /auth/token` (OAuth2 client credentials), `/vens`,
`/programs`, `/events`, `/reports` and, when `subscriptions` is on,
`/subscriptions` with notifications posted to the subscriber's callback. It
lives in `sim` (installed) because the bench's `openadr3` aggregator runs it.

Bounded: request bodies up to 1 MB, at most `MAX_OBJECTS` events, VENs and
subscriptions, the newest `MAX_RECORDS` reports and messages kept. What it
serves and what it receives is recorded (`served`, `received`) so the tests can
check both sides against an independent model of the specification.

Around the protocol it offers what a test or a scenario needs: programs and
events built the way an aggregator sends them (`add_event` with one payload
type and one value per interval), modification and deletion (OpenADR 3's
cancellation), token expiry on demand, a refused secret, and going away and
coming back on the same port with its state kept (a network outage, not a new VTN).

Usage::

    async with BenchVtn3(client_id="truck-1", secret="s3cret") as vtn:
        program = vtn.add_program("summer-peak")
        event_id = vtn.add_event(program, "DISPATCH_SETPOINT", start, 600, 5.0)   # 5 kW for 10 min
        await vtn.wait_for(lambda: vtn.answers_for(event_id))
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import secrets
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from firmware_py.dispatch.openadr3_events import (
    iso_datetime,
    iso_duration,
    parse_duration,
)

T = TypeVar("T")

MAX_OBJECTS = 1_000
MAX_RECORDS = 10_000
TOKEN_LIFE_S = 3_600
PREFIX = "/openadr3/3.0.1"


@dataclass
class BenchVtn3:
    """An OpenADR 3 VTN for one client on 127.0.0.1 (see the module docstring)."""

    client_id: str = "truck-1"
    secret: str = "bench-secret"
    token_life_s: int = TOKEN_LIFE_S
    subscriptions: bool = False
    lists_subscriptions: bool = True  # False: takes subscriptions but cannot list them (GET answers 405)
    vens: dict[str, dict[str, Any]] = field(default_factory=dict)
    programs: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_RECORDS))
    served: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_RECORDS))
    received: deque[tuple[str, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=MAX_RECORDS))
    token_grants: int = 0
    refused_logins: int = 0
    refused_tokens: int = 0
    event_gets: int = 0
    single_event_gets: int = 0
    notifications_sent: int = 0

    def __post_init__(self) -> None:
        self._tokens: dict[str, float] = {}  # token -> expiry (loop time)
        self._subscriptions: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """The vtn_url to give the VEN."""
        if self._port is None:
            raise RuntimeError("the VTN is not started")
        return f"http://127.0.0.1:{self._port}{PREFIX}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Listen on 127.0.0.1: a free port the first time, the same port on a restart."""
        if self._runner is not None:
            return
        self._changed = self._changed or asyncio.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port or 0))
        self._port = sock.getsockname()[1]
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner

    async def stop(self) -> None:
        """Go away: stop listening and drop open connections; programs, events and VENs are kept."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def close(self) -> None:
        await self.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> BenchVtn3:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def expire_tokens(self) -> None:
        """Every token issued so far expires now (the VEN's next call is answered 401)."""
        self._tokens.clear()

    # ------------------------------------------------------------------ programs and events

    def add_program(self, name: str, *, payload_descriptors: Sequence[dict[str, Any]] | None = None,
                    interval_period: dict[str, Any] | None = None) -> str:
        """A program the client is enrolled in; returns its id."""
        program_id = self._new_id("program")
        program: dict[str, Any] = {"id": program_id, **self._stamps(), "objectType": "PROGRAM", "programName": name}
        if payload_descriptors:
            program["payloadDescriptors"] = [dict(d) for d in payload_descriptors]
        if interval_period:
            program["intervalPeriod"] = dict(interval_period)
        self.programs[program_id] = program
        self._notify("PROGRAM", "POST", program)
        return program_id

    def add_event(self, program_id: str, payload_type: str, start: dt.datetime, duration_s: float | Sequence[float],
                  values: float | Sequence[float], *, event_id: str | None = None, units: str | None = None,
                  currency: str | None = None, report_every: int | None = None,
                  extra: Sequence[tuple[str, float]] = (), priority: int | None = 0) -> str:
        """An event with one payload per interval (`values`, kW for DISPATCH_SETPOINT); returns its id.

        `duration_s` is one duration for every interval or one per interval; intervals follow each other
        from `start`. `report_every` asks for reports every that many intervals (-1: at the end).
        `extra` adds (payload type, value) to every interval (an EXPORT_CAPACITY_LIMIT beside a setpoint).
        `priority`: 0 is the highest, None (null) the lowest."""
        event_id = event_id or self._new_id("event")
        event = {"id": event_id, **self._stamps(), "objectType": "EVENT", "programID": program_id,
                 "eventName": event_id, "priority": priority}
        self._lay_out(event, payload_type, start, duration_s, values, units, currency, report_every, extra)
        return self.add_raw_event(event)

    def add_raw_event(self, event: dict[str, Any]) -> str:
        """Serve an event exactly as given (payloads `add_event` cannot express, broken ones)."""
        if len(self.events) >= MAX_OBJECTS:
            raise RuntimeError(f"the bench VTN holds {MAX_OBJECTS} events already")
        event_id = str(event.get("id") or self._new_id("event"))
        self.events[event_id] = event
        self._notify("EVENT", "POST", event)
        return event_id

    def modify_event(self, event_id: str, *, start: dt.datetime | None = None,
                     duration_s: float | Sequence[float] | None = None,
                     values: float | Sequence[float] | None = None) -> None:
        """Change an event's intervals (what is not given is kept); the VEN sees a new modificationDateTime."""
        event = self.events[event_id]
        old = event["intervals"]
        payload_type = old[0]["payloads"][0]["type"]
        first = dt.datetime.fromisoformat(event["intervalPeriod"]["start"])
        durations = [parse_duration(i["intervalPeriod"]["duration"]) if "intervalPeriod" in i else
                     parse_duration(event["intervalPeriod"]["duration"]) for i in old]
        values = values if values is not None else [i["payloads"][0]["values"][0] for i in old]
        count = len(values) if isinstance(values, Sequence) else 1
        duration_s = duration_s if duration_s is not None else (durations if count == len(durations)
                                                                 else durations[0])
        descriptor = (event.get("payloadDescriptors") or [{}])[0]
        every = (event.get("reportDescriptors") or [{}])[0].get("frequency")
        self._lay_out(event, payload_type, start or first, duration_s, values, descriptor.get("units"),
                      descriptor.get("currency"), every, ())
        event["modificationDateTime"] = self._stamps()["modificationDateTime"]
        self._notify("EVENT", "PUT", event)

    def delete_event(self, event_id: str) -> None:
        """Cancel the event the OpenADR 3 way: it is deleted, and the VEN's next listing lacks it."""
        event = self.events.pop(event_id)
        self._notify("EVENT", "DELETE", event)

    # ------------------------------------------------------------------ what the VEN said

    @property
    def ven_id(self) -> str | None:
        return next(iter(self.vens), None)

    def reports_for(self, event_id: str) -> list[dict[str, Any]]:
        return [r for r in self.reports if r.get("eventID") == event_id]

    def answers_for(self, event_id: str) -> list[str]:
        """Every answer word (accepted / capped / refused) the VEN reported for the event, in order."""
        return [p["values"][0] for r in self.reports_for(event_id) for i in _intervals(r) for p in i["payloads"]
                if p["type"] == "DISPATCH_ANSWER"]

    def reasons_for(self, event_id: str) -> list[list[Any]]:
        return [p["values"] for r in self.reports_for(event_id) for i in _intervals(r) for p in i["payloads"]
                if p["type"] == "DISPATCH_REASON"]

    def delivered_wh(self, event_id: str) -> float:
        """The delivered energy the VEN reported for the event, summed over its intervals (newest per interval)."""
        per_interval: dict[int, float] = {}
        for report in self.reports_for(event_id):
            for interval in _intervals(report):
                for payload in interval["payloads"]:
                    if payload["type"] == "DELIVERED_ENERGY":
                        per_interval[interval["id"]] = float(payload["values"][0])
        return sum(per_interval.values())

    async def wait_for(self, probe: Callable[[], T], timeout_s: float = 5.0) -> T:
        """Wait until `probe()` is truthy (re-checked on every request the VTN serves); TimeoutError otherwise."""
        async def until() -> T:
            while not (result := probe()):
                assert self._changed is not None
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.2)
            return result

        self._changed = self._changed or asyncio.Event()
        return await asyncio.wait_for(until(), timeout_s)

    # ------------------------------------------------------------------ the server

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024, middlewares=[self._poke])
        app.router.add_get(f"{PREFIX}/auth/server", self._auth_server)
        app.router.add_post(f"{PREFIX}/auth/token", self._token)
        app.router.add_get(f"{PREFIX}/vens", self._authorized(self._get_vens))
        app.router.add_post(f"{PREFIX}/vens", self._authorized(self._post_ven))
        app.router.add_get(f"{PREFIX}/programs", self._authorized(self._listing(self.programs)))
        app.router.add_get(f"{PREFIX}/events", self._authorized(self._get_events))
        app.router.add_get(f"{PREFIX}/events/{{id}}", self._authorized(self._get_event))
        app.router.add_post(f"{PREFIX}/reports", self._authorized(self._post_report))
        app.router.add_get(f"{PREFIX}/reports", self._authorized(self._get_reports))
        if self.subscriptions:
            app.router.add_post(f"{PREFIX}/subscriptions", self._authorized(self._post_subscription))
            if self.lists_subscriptions:
                app.router.add_get(f"{PREFIX}/subscriptions", self._authorized(self._get_subscriptions))
            app.router.add_delete(f"{PREFIX}/subscriptions/{{id}}", self._authorized(self._delete_subscription))
        return app

    @web.middleware
    async def _poke(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            if self._changed is not None:
                self._changed.set()

    async def _auth_server(self, request: web.Request) -> web.Response:
        return web.json_response({"tokenURL": f"{self.url}/auth/token"})

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if form.get("client_id") != self.client_id or not secrets.compare_digest(
                str(form.get("client_secret", "")), self.secret):
            self.refused_logins += 1
            return web.json_response({"error": "invalid_client"}, status=401)
        token = secrets.token_urlsafe(24)
        if len(self._tokens) >= MAX_OBJECTS:
            self._tokens.pop(next(iter(self._tokens)))
        self._tokens[token] = asyncio.get_running_loop().time() + self.token_life_s
        self.token_grants += 1
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": self.token_life_s})

    def _authorized(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def check(request: web.Request) -> web.StreamResponse:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            expiry = self._tokens.get(token) if scheme == "Bearer" else None
            if expiry is None or asyncio.get_running_loop().time() >= expiry:
                self.refused_tokens += 1
                return _problem(401, "Unauthorized", "no valid bearer token")
            return await handler(request)
        return check

    async def _get_vens(self, request: web.Request) -> web.Response:
        return self._page(request, list(self.vens.values()))

    async def _post_ven(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if body is None or not isinstance(body.get("venName"), str):
            return _problem(400, "Bad Request", "a VEN needs a venName")
        self.received.append(("VEN", body))
        if any(v["venName"] == body["venName"] for v in self.vens.values()):
            return _problem(409, "Conflict", f"VEN {body['venName']!r} exists")
        if len(self.vens) >= MAX_OBJECTS:
            return _problem(507, "Insufficient Storage", "too many VENs")
        ven = {"id": self._new_id("ven"), **self._stamps(), "objectType": "VEN", "venName": body["venName"]}
        self.vens[ven["id"]] = ven
        self.served.append(ven)
        return web.json_response(ven, status=201)

    def _listing(self, objects: dict[str, dict[str, Any]]) -> Callable[[web.Request], Any]:
        async def get(request: web.Request) -> web.Response:
            return self._page(request, list(objects.values()))
        return get

    async def _get_events(self, request: web.Request) -> web.Response:
        self.event_gets += 1
        wanted = request.query.get("programID")
        return self._page(request, [e for e in self.events.values() if wanted in (None, e.get("programID"))])

    async def _get_event(self, request: web.Request) -> web.Response:
        """One event by id (the VEN asks when an event is missing from a listing of several pages)."""
        self.single_event_gets += 1
        event = self.events.get(request.match_info["id"])
        if event is None:
            return _problem(404, "Not Found", f"no event {request.match_info['id']}")
        return web.json_response(event)

    async def _post_report(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if body is None or not isinstance(body.get("eventID"), str) or not isinstance(body.get("resources"), list):
            return _problem(400, "Bad Request", "a report needs eventID and resources")
        self.received.append(("REPORT", body))
        report = {"id": self._new_id("report"), **self._stamps(), **body}
        self.reports.append(report)
        return web.json_response(report, status=201)

    async def _get_reports(self, request: web.Request) -> web.Response:
        """The reports kept, of the program, event and client asked for (OpenADR 3's search of reports)."""
        wanted = {key: request.query[key] for key in ("programID", "eventID", "clientName") if key in request.query}
        return self._page(request, [r for r in self.reports if all(r.get(k) == v for k, v in wanted.items())])

    async def _post_subscription(self, request: web.Request) -> web.Response:
        body = await _body(request)
        problem = _subscription_problem(body)
        if problem:
            return _problem(400, "Bad Request", problem)
        self.received.append(("SUBSCRIPTION", body))
        if len(self._subscriptions) >= MAX_OBJECTS:
            return _problem(507, "Insufficient Storage", "too many subscriptions")
        subscription = {"id": self._new_id("subscription"), **self._stamps(), **body}
        self._subscriptions[subscription["id"]] = subscription
        return web.json_response(subscription, status=201)

    async def _get_subscriptions(self, request: web.Request) -> web.Response:
        wanted = request.query.get("clientName")
        return self._page(request, [s for s in self._subscriptions.values() if wanted in (None, s.get("clientName"))])

    async def _delete_subscription(self, request: web.Request) -> web.Response:
        subscription = self._subscriptions.pop(request.match_info["id"], None)
        if subscription is None:
            return _problem(404, "Not Found", "no such subscription")
        return web.json_response(subscription)

    def forget_subscriptions(self) -> None:
        """As a VTN restored without its subscriptions: nobody is notified until they subscribe again."""
        self._subscriptions.clear()

    @property
    def subscription_count(self) -> int:
        return len(self._subscriptions)

    def _page(self, request: web.Request, objects: list[dict[str, Any]]) -> web.Response:
        try:
            skip = max(0, int(request.query.get("skip", 0)))
            limit = min(50, max(1, int(request.query.get("limit", 50))))
        except ValueError:
            return _problem(400, "Bad Request", "skip and limit are whole numbers")
        page = objects[skip:skip + limit]
        self.served.extend(page)
        return web.json_response(page)

    def _notify(self, object_type: str, operation: str, obj: dict[str, Any]) -> None:
        """Post a notification to every subscriber of this object type (in the background, bounded by time)."""
        if not self._subscriptions or self._runner is None:
            return
        program_id = obj.get("id") if object_type == "PROGRAM" else obj.get("programID")
        for subscription in list(self._subscriptions.values()):
            if subscription.get("programID") != program_id:
                continue
            for op in subscription.get("objectOperations", []):
                if object_type in op.get("objects", []) and operation in op.get("operations", []):
                    note = {"objectType": object_type, "operation": operation, "object": obj}
                    asyncio.get_running_loop().create_task(self._post_note(op, note))

    async def _post_note(self, op: dict[str, Any], note: dict[str, Any]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        headers = {"Authorization": f"Bearer {op['bearerToken']}"} if op.get("bearerToken") else {}
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
            async with self._session.post(op["callbackUrl"], json=note, headers=headers) as resp:
                if resp.status < 300:
                    self.notifications_sent += 1

    # ------------------------------------------------------------------ building objects

    def _lay_out(self, event: dict[str, Any], payload_type: str, start: dt.datetime,
                 duration_s: float | Sequence[float], values: float | Sequence[float], units: str | None,
                 currency: str | None, report_every: int | None, extra: Sequence[tuple[str, float]]) -> None:
        values = list(values) if isinstance(values, Sequence) else [values]
        durations = list(duration_s) if isinstance(duration_s, Sequence) else [duration_s] * len(values)
        if len(durations) != len(values):
            raise ValueError("one duration per value, or a single duration for all")
        uniform = len(set(durations)) == 1
        event["intervalPeriod"] = {"start": iso_datetime(start), "duration": iso_duration(durations[0])}
        intervals = []
        for n, (value, seconds) in enumerate(zip(values, durations, strict=True)):
            interval: dict[str, Any] = {"id": n, "payloads": [{"type": payload_type, "values": [value]}]}
            interval["payloads"] += [{"type": kind, "values": [extra_value]} for kind, extra_value in extra]
            if not uniform:
                interval["intervalPeriod"] = {"duration": iso_duration(seconds)}
            intervals.append(interval)
        event["intervals"] = intervals
        descriptor: dict[str, Any] = {"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": payload_type}
        if units:
            descriptor["units"] = units
        if currency:
            descriptor["currency"] = currency
        event["payloadDescriptors"] = [descriptor]
        if report_every is not None:
            event["reportDescriptors"] = [{"payloadType": "DELIVERED_ENERGY", "readingType": "DIRECT_READ",
                                           "units": "WH", "frequency": report_every, "repeat": 1}]

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    @staticmethod
    def _stamps() -> dict[str, str]:
        now = iso_datetime(dt.datetime.now(dt.timezone.utc))
        return {"createdDateTime": now, "modificationDateTime": now}


def _intervals(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for r in report.get("resources", []) for i in r.get("intervals", [])]


async def _body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


SUBSCRIBABLE = ("GET", "POST", "PUT", "DELETE")
"""OpenADR 3.0.1's operations, for a subscription and a notification alike (3.1 renames them: refused here)."""


def _subscription_problem(body: dict[str, Any] | None) -> str:
    """What OpenADR 3.0.1's subscription schema refuses in `body` ("" when it conforms)."""
    if body is None:
        return "a subscription is a JSON object"
    missing = [key for key in ("clientName", "programID", "objectOperations") if not body.get(key)]
    if missing:
        return f"a subscription needs {', '.join(missing)}"
    for op in body["objectOperations"] if isinstance(body["objectOperations"], list) else [None]:
        if not isinstance(op, dict) or not isinstance(op.get("operations"), list) or not op.get("callbackUrl"):
            return "each objectOperations entry needs objects, operations and callbackUrl"
        wrong = [o for o in op["operations"] if o not in SUBSCRIBABLE]
        if wrong:
            return f"operations {wrong!r}: each one of {', '.join(SUBSCRIBABLE)}"
    return ""


def _problem(status: int, title: str, detail: str) -> web.Response:
    """An OpenADR 3 problem object (RFC 7807)."""
    return web.json_response({"type": "about:blank", "title": title, "status": status, "detail": detail},
                             status=status)
