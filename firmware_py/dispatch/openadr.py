"""OpenADR 2.0b VEN: an aggregator's VTN dispatching the gateway (docs/dispatch.md).

openleadr's `OpenADRClient` speaks the protocol (XML, signatures, TLS, reports);
this module decides what it says. Each event becomes dispatch requests for the
core (see `openadr_events`), and the core's answer becomes the optIn/optOut.

Why not `OpenADRClient.run()`: it gives up for good when the first registration
fails and polls at a fixed rate forever, so the VEN drives registration and
polling itself: retry with backoff while the VTN is unreachable, re-register
when the VTN asks. Losing the VTN changes nothing the core already accepted:
every request carries its own start and end, so the event neither stops early
nor runs over.

Implicit cancellation (OpenADR 2.0b): an oadrDistributeEvent carries every
event the VTN still holds for this VEN, so an event the VEN knows that is
missing from a later one was cancelled; openleadr does not act on that, so
`_Client._on_event` hands the VEN the ids of every distribution first, and the
VEN cancels what is missing, journaled with that reason.

Standing settings: an event in its active period that the core refused or
capped is asked for again (a new revision) as soon as the core's telemetry says
a new revision would be served better (the gateway became ready, a fault or an
outage ended, the owner revoked an opt-out...): checked every second and at once
when a gateway step changes what admits dispatch (`notice_step`). The opt the VTN last heard
stands until its next distribution, which is then answered with the new opt.

Relies on these openleadr 0.5.36 internals: `_poll` (dispatches whatever a poll
returned), `_on_event`, `received_events`, `responded_events`,
`_report_queue_worker`, `_event_cleanup`, `report_requests`, `_ensure_client_session`,
`_create_message` (the answer to oadrCancelPartyRegistration, and the optOut of a message that could not be
handled); `openleadr.client.parse_message` and `utils.parse_datetime`/`parse_duration` (a VTN's times and
durations read as 2.0b writes them: `_parse_message`);
and on aiohttp's `ClientSession._response_class` and `ClientResponse._body` (a VTN's answer read with a
cap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
from apscheduler.jobstores.base import JobLookupError
from openleadr import OpenADRClient, enums, objects, utils
from openleadr import client as openleadr_client

from firmware_py.certificates import check_ca_bundle, load_chain, validity_problem
from firmware_py.config import OpenAdrConfig
from firmware_py.core.controller import StepResult
from firmware_py.core.machine import OPTED_OUT_END
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchEnded,
    DispatchKind,
    DispatchRequest,
    Mode,
    ReasonCode,
    Verdict,
    describe,
    is_finite_number,
)
from firmware_py.dispatch import DispatchSink, Telemetry
from firmware_py.dispatch.openadr_events import (
    SOURCE,
    EventPlan,
    NotAddressed,
    parse_wire_datetime,
    parse_wire_duration,
    translate_event,
)
from firmware_py.dispatch.revisions import ended_by_revision
from firmware_py.dispatch.simple_levels import check_levels
from firmware_py.dispatch.standing import StandingLooks, StandingWatch
from firmware_py.dispatch.vtn_answers import AnswerTooLarge, read_capped
from firmware_py.errors import InputError, collect_problems
from firmware_py.files import read_text
from firmware_py.links import Backoff, LinkHandle, next_poll_in
from firmware_py.quoting import printable
from firmware_py.tasks import cancel_all

log = logging.getLogger(__name__)

OPT_IN = "optIn"
OPT_OUT = "optOut"

# Telemetry values are numbers in OpenADR, so the gateway's mode travels as a code.
# STARTUP (no data yet) reads as UNKNOWN_STATE_CODE; 5 stays reserved (it meant "opted out").
UNKNOWN_STATE_CODE = 0
STATE_CODES: Mapping[Mode, int] = {
    Mode.STARTUP: UNKNOWN_STATE_CODE,
    Mode.STANDBY: 1,
    Mode.DISCHARGE: 2,
    Mode.CHARGE: 3,
    Mode.BACKUP: 4,
    Mode.FAULT: 6,
    Mode.LOCKOUT: 7,
}

# OpenADR durations are whole seconds, so a VTN wanting sub-second polls sends PT0S;
# this is as fast as the VEN then polls (it never hammers a VTN in a tight loop).
MIN_POLL_S = 0.5

# The longest one exchange with the VTN may take, all told (openleadr bounds only each read).
VTN_REQUEST_S = 30.0

# First retry of a failed registration; the VTN's poll interval is not known yet.
REGISTRATION_RETRY_S = 1.0

# How often the VEN looks for refused or capped events the core would now serve better (and at once
# when the gateway's mode changes).
STANDING_CHECK_S = 1.0

# Reports waiting for the VTN, at most. They are telemetry: an aggregator steers on the newest values, and a backlog
# replayed when a stalled link heals is stale by then (at 1 s reports and a 30 s exchange timeout, the queue grew by
# about one a second for as long as the link stalled). 30 is that timeout's worth at 1 s; the oldest go first.
REPORTS_KEPT = 30

# Implicitly cancelled events whose requests are kept, should the VTN list one again unchanged (its withdrawal was
# a glitch): a VTN withdraws a handful of events at a time, and the oldest are the least likely to come back.
WITHDRAWN_KEPT = 32

IMPLICIT_CANCEL = "implicitly cancelled: missing from the VTN's complete oadrDistributeEvent"

# Why dispatch is not followed now, as the number the `dispatchBlocked` telemetry carries (0: nothing blocks).
BLOCKED_CODES: Mapping[ReasonCode, int] = {
    ReasonCode.NO_DATA: 1,
    ReasonCode.FAULT: 2,
    ReasonCode.LOCKOUT: 3,
    ReasonCode.OUTAGE: 4,
    ReasonCode.JOURNAL: 5,
    ReasonCode.ENTER_SERVICE: 6,
    ReasonCode.OPTED_OUT: 7,
}


@dataclass(frozen=True)
class EventOutcome:
    """What the VEN did with one event revision: for the log, the bench and the tests."""

    event_id: str
    revision: int
    opt: str
    answers: tuple[DispatchAnswer, ...] = ()
    detail: str = ""

    @property
    def cap_w(self) -> float | None:
        caps = [a.cap_w for a in self.answers if a.verdict is Verdict.CAPPED and a.cap_w is not None]
        return min(caps) if caps else None


@dataclass
class _Tracked:
    """An event the core has heard about: the revision it knows and the requests it holds.

    `asked` is the revision last submitted per request id: the event's modificationNumber,
    or higher once the VEN has asked again on its own (a standing setting)."""

    revision: int
    opt: str
    request_ids: tuple[str, ...]
    ends_at: float
    delay_s: float  # a randomised start: the VTN's own schedule ends this much earlier than ends_at
    windows: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # id -> start, end, committed W
    requests: dict[str, DispatchRequest] = field(default_factory=dict)  # id -> the request last submitted
    answers: dict[str, DispatchAnswer] = field(default_factory=dict)  # id -> its answer


class _CappedResponse(aiohttp.ClientResponse):
    """A VTN's answer, read with its cap (openleadr reads any size into memory)."""

    async def read(self) -> bytes:
        if self._body is None:  # kept, as aiohttp's own read keeps it, for a second read or text()
            try:
                self._body = await read_capped(self)
            except AnswerTooLarge as err:  # openleadr's own log of the failed exchange is quieted
                log.warning("OpenADR: %s: not read, the exchange failed", err)
                raise
        return self._body


class _ReportQueue(asyncio.Queue):  # type: ignore[type-arg]
    """openleadr's queue of reports for the VTN, keeping the newest `bound` (see `REPORTS_KEPT`): the oldest
    is dropped and counted, logged once per outage (until the queue has drained again)."""

    def __init__(self, bound: int) -> None:
        super().__init__()
        self.bound = bound
        self.dropped = 0  # over the VEN's life
        self._dropped_now = 0  # in this outage

    def put_nowait(self, item: Any) -> None:
        if self.qsize() >= self.bound:
            super().get_nowait()
            self.dropped += 1
            self._dropped_now += 1
            if self._dropped_now == 1:
                log.warning("OpenADR: reports are not reaching the VTN; keeping the newest %d, dropping older ones",
                            self.bound)
        super().put_nowait(item)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)  # never waits: full means the oldest goes

    def get_nowait(self) -> Any:
        item = super().get_nowait()
        if self._dropped_now and self.empty():
            log.info("OpenADR: the report backlog is sent; %d older reports were dropped", self._dropped_now)
            self._dropped_now = 0
        return item


_openleadr_parse_message = openleadr_client.parse_message


def _parse_message(data: Any) -> tuple[str, dict[str, Any]]:
    """openleadr's parse of a VTN's message, reading times and durations as 2.0b writes them: a date-time
    without its (optional) Z is UTC, where openleadr left it text that later ended the VEN's task; 'P1W'
    is a week, where openleadr read 0 s, and a last interval of 0 runs until cancelled. Synchronous, so
    the swap of openleadr's two readers is never seen by anything else."""
    saved = utils.parse_datetime, utils.parse_duration
    utils.parse_datetime, utils.parse_duration = parse_wire_datetime, parse_wire_duration
    try:
        return _openleadr_parse_message(data)
    finally:
        utils.parse_datetime, utils.parse_duration = saved


openleadr_client.parse_message = _parse_message  # the name openleadr's client reads every VTN message with


class _Client(OpenADRClient):
    """openleadr's client, telling its owner whether the last poll reached the VTN and which
    events each complete distribution holds (for implicit cancellation)."""

    poll_ok = False
    on_distribution: Callable[[list[Any]], Any] | None = None
    on_unplaceable: Callable[[Any, str], Any] | None = None  # an event refused before openleadr sees it, and why
    on_abandoned: Callable[[list[Any], str], Any] | None = None  # a message's events all answered optOut, and why

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pending_reports: _ReportQueue = _ReportQueue(REPORTS_KEPT)  # openleadr's grew without bound
        self._unplaceable: dict[tuple[str | None, int], None] = {}  # (event id, revision) refused, the oldest first

    async def _perform_request(self, service: str, message: Any) -> tuple[str | None, dict[str, Any]]:
        """openleadr's exchange with the VTN, bounded in time (a VTN that trickles its answer a byte at a time
        is never timed out by the session's per-read timeout) and always a pair (an empty answer gave None,
        and unpacking it ended the VEN's task): (None, {}) is the VTN not answering, as openleadr says it."""
        try:
            answered = await asyncio.wait_for(super()._perform_request(service, message), VTN_REQUEST_S)
        except asyncio.TimeoutError:
            log.debug("OpenADR: %s/%s took more than %.0f s", self.vtn_url, service, VTN_REQUEST_S)
            return None, {}
        return answered if isinstance(answered, tuple) else (None, {})

    async def _ensure_client_session(self) -> None:
        await super()._ensure_client_session()
        self.client_session._response_class = _CappedResponse  # every answer read with its cap

    async def poll(self) -> tuple[str | None, dict[str, Any]]:
        response_type, payload = await super().poll()
        self.poll_ok = response_type is not None
        await self._withdrawn_all(response_type, payload)
        return response_type, payload

    async def request_event(self, reply_limit: int | None = None) -> tuple[str | None, dict[str, Any]]:
        response_type, payload = await super().request_event(reply_limit)
        await self._withdrawn_all(response_type, payload)
        return response_type, payload

    async def _withdrawn_all(self, response_type: str | None, payload: Any) -> None:
        """A distribution of no events is complete too: the VTN holds none for this VEN, so every event
        the VEN holds was withdrawn. openleadr hands only distributions with events to `_on_event`."""
        if response_type == "oadrDistributeEvent" and not (isinstance(payload, dict) and payload.get("events")) \
                and self.on_distribution is not None:
            await self.on_distribution([])

    async def _on_event(self, message: dict[str, Any]) -> None:
        """One oadrDistributeEvent. Whatever fails in handling it costs only this message: logged once, each
        of its events answered optOut; an exception escaping here ended `_poll` and with it the VEN's task,
        and the VTN, sending the same message after the restart, ended it again."""
        try:
            await self._handle_events(message)
        except Exception as err:  # noqa: BLE001 - one message's fault must not end the VEN
            ids = [_event_id_of(e) for e in _events_of(message)]
            log.error("OpenADR: the VTN's event message (events %s) could not be handled, answering optOut to "
                      "each: %s: %s", ", ".join(map(str, ids)) or "none readable", type(err).__name__, err)
            log.debug("OpenADR: the failure in full", exc_info=True)
            await self._withdraw_abandoned(message, f"{type(err).__name__}: {err}")
            await self._opt_out_of_all(message)

    async def _withdraw_abandoned(self, message: dict[str, Any], why: str) -> None:
        """The VTN is about to hear optOut to every event of the message: the core must not serve them either
        (the message's handlers may have submitted some before the failure)."""
        if self.on_abandoned is None:
            return
        try:
            await self.on_abandoned(_events_of(message), why)
        except Exception as err:  # noqa: BLE001 - the VTN must still get its answer
            log.error("OpenADR: withdrawing the unhandled message's events failed: %s: %s", type(err).__name__, err)

    async def _opt_out_of_all(self, message: Any) -> None:
        """optOut to every event of a message that could not be handled (those with an id and a number)."""
        responses = [{"response_code": 200, "response_description": "OK", "opt_type": OPT_OUT,
                      "request_id": message.get("request_id"), "event_id": _event_id_of(e),
                      "modification_number": _revision_of(e)}
                     for e in _events_of(message) if _event_id_of(e) is not None and _revision_of(e) >= 0]
        if not responses:
            return
        try:
            for response in responses:
                self.forget_event(response["event_id"])  # the next copy is handled afresh
            answer = self._create_message("oadrCreatedEvent", ven_id=self.ven_id, event_responses=responses,
                                          response={"response_code": 200, "response_description": "OK",
                                                    "request_id": message.get("request_id")})
            await self._perform_request("EiEvent", answer)
        except Exception as err:  # noqa: BLE001 - the VTN then hears nothing of it, as of a lost message
            log.error("OpenADR: the optOut could not be sent either: %s: %s", type(err).__name__, err)

    async def _handle_events(self, message: dict[str, Any]) -> None:
        if self.on_distribution is not None:
            await self.on_distribution(message.get("events") or [])
        known = {utils.getmember(e, "event_descriptor.event_id"): e for e in self.received_events}
        for event in message.get("events") or []:
            event_id = utils.getmember(event, "event_descriptor.event_id")
            if event_id in known and event_id not in self.responded_events:
                # openleadr would look up its answer to an event it knows, and the answer went with the event's
                # cancellation: the KeyError made it opt out of every event in the distribution. Afresh, then.
                self.forget_event(event_id)
            elif event_id in known and _cancelled_in_place(known[event_id], event):
                # openleadr answers a known (id, modificationNumber) from its memo without calling the handler,
                # so the cancellation would never reach the core and the gateway would go on serving the event.
                log.warning("OpenADR: event %s is cancelled at the same modificationNumber %s (the VTN did not "
                            "bump it); cancelling it all the same", event_id, _revision_of(event))
                self.forget_event(event_id)
        unplaceable = [e for e in _events_of(message) if _unplaceable(e)]
        if unplaceable:  # openleadr would compute their status from text and fail on the whole message
            await self._refuse_unplaceable(message, unplaceable)
        events = [e for e in _events_of(message) if not _unplaceable(e)]
        if events:
            await super()._on_event({**message, "events": events})

    async def _refuse_unplaceable(self, message: dict[str, Any], events: list[Any]) -> None:
        """Events whose active period is not a time and a duration: the VEN refuses each by name (`on_unplaceable`,
        which withdraws what an earlier revision asked for), once per revision, and the VTN hears optOut; the
        message's other events are answered as usual."""
        for event in events:
            heard = (_event_id_of(event), _revision_of(event))
            if heard not in self._unplaceable:  # a copy of one refused already is only answered again
                _keep_newest(self._unplaceable, heard, None)
                if self.on_unplaceable is not None:
                    await self.on_unplaceable(event, _unplaceable(event) or "")
        await self._opt_out_of_all({**message, "events": events})

    def forget_event(self, event_id: str) -> None:
        """Drop openleadr's memory of an event, so a later copy of it is handled afresh."""
        utils.pop_by(self.received_events, "event_descriptor.event_id", event_id)
        self.responded_events.pop(event_id, None)

    async def on_cancel_party_registration(self, message: dict[str, Any]) -> None:
        """The VTN ended this VEN's registration (oadrCancelPartyRegistration). openleadr's own version sets the
        report structures to None and removes every scheduler job, and the next registration then failed on
        them and ended the VEN's task; here only the registration is forgotten, so the VEN's loop registers
        again (with backoff) and asks for its reports afresh, as after oadrRequestReregistration."""
        registration_id = message.get("registration_id")
        if self.registration_id is None or registration_id is None:
            return  # openleadr ignores these too: nothing registered, or no registration named
        ours = registration_id == self.registration_id
        response = {"response_code": 200 if ours else 452, "response_description": "OK" if ours else "ERROR",
                    "request_id": message.get("request_id")}
        answer = self._create_message("oadrCanceledPartyRegistration", response=response, ven_id=self.ven_id,
                                      registration_id=self.registration_id)
        await self._perform_request("EiRegisterParty", answer)
        if not ours:
            log.info("OpenADR: the VTN cancelled registration %s, not this VEN's (%s)",
                     registration_id, self.registration_id)
            return
        log.warning("OpenADR: the VTN cancelled this VEN's registration %s; registering again", registration_id)
        self.registration_id = None

    async def create_party_reregistration(self, registration_id: str | None = None) -> None:
        # openleadr's own version stops the client if the VTN does not answer at once;
        # forgetting the registration lets the VEN's loop register again, with backoff.
        log.info("OpenADR: the VTN asked the VEN to register again")
        self.registration_id = None


class OpenAdrVen:
    """The gateway's OpenADR 2.0b VEN, a `DispatchSource`.

    `rating_w` (a number or a callable read at each event) is what SIMPLE levels
    are shares of. `to_gateway_time` maps a VTN UTC datetime onto the sink's
    clock, at reception: `Clocks.from_datetime` in `run` (wall time to the core's
    monotonic base), a mapping for the simulator, where the sink clock is simulated.
    `link`, when given, is told when the VTN is lost and reached again.
    """

    def __init__(self, config: OpenAdrConfig, rating_w: Callable[[], float] | float, *,
                 to_gateway_time: Callable[[datetime], float] = datetime.timestamp,
                 source: str = SOURCE, retry_max_s: float = 30.0, report_min_s: float = 1.0,
                 state_codes: Mapping[Mode, int] = STATE_CODES, link: LinkHandle | None = None) -> None:
        if problems := check(config):
            raise InputError(problems)
        self._link = link
        self.config = config
        self._rating = rating_w if callable(rating_w) else (lambda: float(rating_w))
        self._to_gateway_time = to_gateway_time
        self._source = source
        self._retry_max_s = retry_max_s
        self._report_min_s = max(1.0, report_min_s)  # openleadr's cron reporting needs whole seconds
        self._state_codes = dict(state_codes)
        self._sink: DispatchSink | None = None
        self._events: dict[str, _Tracked] = {}
        self._withdrawn: dict[str, tuple[int, dict[str, DispatchRequest]]] = {}  # id -> revision, requests
        self.outcomes: deque[EventOutcome] = deque(maxlen=1000)
        self.registered = False
        self.registration_attempts = 0
        self.failed_polls = 0
        self.client: _Client | None = None
        self._told_ok: bool | None = None
        self._wake: asyncio.Event | None = None
        self._watch = StandingWatch()
        self.looks = StandingLooks()  # looks the steps asked for and those taken (a simulated clock waits on it)
        self.reasks = 0
        self.implicit_cancellations = 0

    @property
    def reports_dropped(self) -> int:
        """Reports dropped, the oldest first, while they could not reach the VTN (`REPORTS_KEPT`)."""
        return self.client.pending_reports.dropped if self.client is not None else 0

    def _certificate_hint(self, cause: str) -> str:
        """Why a VTN may be refusing the gateway's client certificate: a VTN that does not accept one ends the
        TLS handshake, and the VEN hears only that the connection was reset or closed. Its trust is a guess
        only until a registration went through: after one, the certificate was taken."""
        if out := validity_problem(self.config.cert, datetime.now(timezone.utc)):
            return f" (dispatch.openadr.cert: the gateway's certificate {out.problem}; the VTN refuses it)"
        if not self.registered and any(words in cause for words in CUT_OFF):
            return (" (a VTN that does not accept dispatch.openadr.cert ends the connection so: that the "
                    "aggregator trusts the CA that issued it)")
        return ""

    # ------------------------------------------------------------------ running

    async def run(self, sink: DispatchSink) -> None:
        """Register, poll and report until cancelled; a VTN outage only delays the next poll."""
        self._sink = sink
        client = self.client = self._make_client()
        reporter: asyncio.Task[None] | None = None
        backoff = Backoff(self._retry_max_s)
        self._wake = asyncio.Event()
        standing = asyncio.create_task(self._standing(sink), name="openadr-standing")
        try:
            loop = client.loop = asyncio.get_running_loop()
            client.scheduler.start()
            client.scheduler.add_job(client._event_cleanup, trigger="interval",
                                     seconds=client.events_clean_up_period)
            while True:
                if client.registration_id is None:
                    with _openleadr_heard() as heard:
                        self.registered = await self._register(client)
                    if not self.registered:
                        self._tell(False, f"cannot register with {self.config.vtn_url}{heard.said()}")
                        await asyncio.sleep(backoff.next(REGISTRATION_RETRY_S))
                        continue
                    self._tell(True)
                    backoff.reset()
                    if reporter is None and client.reports:
                        reporter = asyncio.create_task(client._report_queue_worker())
                began = loop.time()
                with _openleadr_heard() as heard:
                    await client._poll()
                self._forget_ended()
                if client.poll_ok:
                    if backoff.failures:
                        log.debug("OpenADR: VTN reachable again after %d failed polls", backoff.failures)
                    self._tell(True)
                    backoff.reset()
                    await asyncio.sleep(next_poll_in(began, loop.time(), self._poll_s(client)))
                else:
                    self.failed_polls += 1
                    self._tell(False, f"VTN {self.config.vtn_url} unreachable{heard.said()}; accepted events keep "
                                      "their windows")
                    await asyncio.sleep(backoff.next(self._poll_s(client)))
        finally:
            self.registered = False
            if client.scheduler.running:
                client.scheduler.shutdown(wait=False)
            try:
                await cancel_all([task for task in (standing, reporter) if task is not None])
            finally:
                if client.client_session is not None:
                    await client.client_session.close()

    def _tell(self, ok: bool, cause: str = "") -> None:
        """The VTN link's state, to the gateway's link book (which logs once per outage), else to the log."""
        if not ok and self.config.cert:
            cause += self._certificate_hint(cause)
        if self._link is not None:
            self._link.good() if ok else self._link.lost(cause)
        elif not ok and self._told_ok is not False:
            log.warning("OpenADR: %s; retrying with back-off", cause)
        elif ok and self._told_ok is False:
            log.info("OpenADR: VTN reachable again")
        self._told_ok = ok

    def _make_client(self) -> _Client:
        cfg = self.config
        client = _Client(ven_name=cfg.ven_name, vtn_url=cfg.vtn_url,
                         cert=cfg.cert or None, key=cfg.key or None, ca_file=cfg.ca_file or None,
                         vtn_fingerprint=cfg.vtn_fingerprint or None, show_fingerprint=False)
        if cfg.cert:
            log.info("OpenADR: this VEN's certificate fingerprint is %s",
                     utils.certificate_fingerprint(read_text(cfg.cert, "PEM file")))
        if cfg.cert and not cfg.vtn_fingerprint:
            log.warning("OpenADR: no vtn_fingerprint configured: VTN message signatures are not checked")
        client.add_handler("on_event", self._on_event)
        client.add_handler("on_update_event", self._on_event)
        client.on_distribution = self._implicit_cancellations
        client.on_unplaceable = self._unplaceable_event
        client.on_abandoned = self._abandoned
        self._add_reports(client)
        return client

    async def _register(self, client: _Client) -> bool:
        """One registration attempt, as openleadr's run() does it, minus giving up."""
        self.registration_attempts += 1
        for request in client.report_requests:  # a re-registration asks for reports afresh
            if request.get("job") is not None:
                with contextlib.suppress(JobLookupError):
                    request["job"].remove()
        client.report_requests.clear()
        response_type, payload = await client.query_registration()
        if response_type is None:
            return False
        request_id = (payload.get("response") or {}).get("request_id")
        await client.create_party_registration(ven_id=client.ven_id, request_id=request_id)
        if client.registration_id is None:
            log.debug("OpenADR: registration of %r (VEN id %r) refused or unanswered by %s",
                      self.config.ven_name, client.ven_id, self.config.vtn_url)
            client.ven_id = None  # a VTN restored without its VEN records refuses the old id: ask as a new VEN
            return False
        await client.register_reports(client.reports)
        await client.sync_events()
        return True

    async def probe_registration(self) -> str | None:
        """Register with the VTN once, as `run` does first, and nothing more: no polls, no events,
        no reports. None when the VTN registered this VEN, else why not (what openleadr logged
        included). Commissioning asks it; the running gateway registers again on its own."""
        client = self._make_client()
        try:
            with _openleadr_heard() as heard:
                response_type, payload = await client.query_registration()
                if response_type is None:
                    return f"no answer from the VTN at {self.config.vtn_url}{heard.said()}"
                request_id = (payload.get("response") or {}).get("request_id")
                await client.create_party_registration(ven_id=client.ven_id, request_id=request_id)
                if client.registration_id is None:
                    return (f"the VTN at {self.config.vtn_url} did not register VEN {self.config.ven_name!r}"
                            f"{heard.said()}")
                return None
        finally:
            if client.client_session is not None:
                await client.client_session.close()

    @staticmethod
    def _poll_s(client: _Client) -> float:
        """The VTN's requested poll interval, kept within [MIN_POLL_S, 24 h]."""
        frequency = client.poll_frequency if client.poll_frequency is not None else timedelta(seconds=10)
        return min(max(frequency.total_seconds(), MIN_POLL_S), 86_400.0)

    # ------------------------------------------------------------------ events

    async def _on_event(self, event: dict[str, Any]) -> str:
        """openleadr's on_event and on_update_event: returns optIn or optOut, never raises."""
        sink = self._sink
        assert sink is not None, "events arrive only while run() is serving"
        try:
            rating = float(self._rating())
        except Exception as err:  # a broken rating source must not cost the VTN an answer
            log.error("OpenADR: rating unavailable: %s", err)
            rating = math.nan
        plan = translate_event(event, rating_w=rating, levels_pct=self.config.simple_levels_pct,
                               to_gateway_time=self._to_gateway_time, received_at=sink.now(),
                               source=self._source, ven_name=self.config.ven_name,
                               ven_id=(self.client.ven_id or "") if self.client is not None else "")
        try:
            return await self._apply(sink, plan, event)
        except Exception:
            log.exception("OpenADR: the core failed on an event; opting out of it")
            return OPT_OUT

    async def _apply(self, sink: DispatchSink, plan: EventPlan | DispatchAnswer | NotAddressed, event: Any) -> str:
        if isinstance(plan, DispatchAnswer):
            return await self._refuse(sink, plan, event)
        if isinstance(plan, NotAddressed):
            return await self._not_ours(sink, plan)
        tracked = self._events.get(plan.event_id)
        withdrawn = self._withdrawn.pop(plan.event_id, None)
        if withdrawn is not None and withdrawn[0] == plan.revision and not plan.cancelled:
            plan = replace(plan, requests=self._as_first_heard(plan, withdrawn[1]))
        if plan.cancelled:
            await self._cancel(sink, plan.event_id, tracked.request_ids if tracked else ())
            self._events.pop(plan.event_id, None)
            self._record(EventOutcome(plan.event_id, plan.revision, OPT_IN, detail="cancelled"))
            return OPT_IN
        if tracked is not None and plan.revision <= tracked.revision:
            return tracked.opt  # a stale or repeated copy: the core already has this revision
        if plan.test:  # acknowledged as the VTN asks, and nothing served (what an earlier revision asked, withdrawn)
            if tracked is not None:
                await self._cancel(sink, plan.event_id, tracked.request_ids)
                self._events.pop(plan.event_id, None)
            self._record(EventOutcome(plan.event_id, plan.revision, OPT_IN, detail="a test event: not acted on"))
            return OPT_IN
        requests, dropped, ended = plan.requests, (), ()
        if tracked is not None:
            dropped = tuple(sorted(set(tracked.request_ids) - set(plan.request_ids)))
            ended = ended_by_revision(tracked.requests, plan.request_ids, requests, sink.now())
            # after the VEN's own re-asks the core may know a request at a higher revision than this
            requests = tuple(replace(r, revision=max(r.revision, tracked.requests[r.id].revision + 1))
                             if r.id in tracked.requests else r for r in requests)
        answers = tuple([await self._answer(sink, request) for request in requests])
        # Only now, so that an interval the modification moves to another id (EVENT to EVENT#0) is served on
        # under the new one, the newest in force, without falling to 0 W and ramping up again; the old id's
        # account closes with what it served, saying why (the VTN cancelled nothing).
        await self._cancel(sink, plan.event_id, dropped, f"dropped by the event's modification {plan.revision}")
        await self._cancel(sink, plan.event_id, ended, f"ended by the event's modification {plan.revision}")
        opt = _opt_of(requests, {a.request_id: a for a in answers})
        windows = {r.id: (r.start, r.end, _committed_w(r, a)) for r, a in zip(requests, answers, strict=True)
                   if a.verdict is not Verdict.REJECTED}
        ends_at = max(r.end for r in requests)
        self._events[plan.event_id] = _Tracked(plan.revision, opt, plan.request_ids, ends_at, plan.delay_s, windows,
                                               {r.id: r for r in requests}, {a.request_id: a for a in answers})
        outcome = EventOutcome(plan.event_id, plan.revision, opt, answers,
                               detail="; ".join(_describe(a) for a in answers))
        self._record(outcome)
        return opt

    @staticmethod
    def _as_first_heard(plan: EventPlan, earlier: Mapping[str, DispatchRequest]) -> tuple[DispatchRequest, ...]:
        """The requests an implicitly cancelled event listed again at the same revision made, with this
        reception's time. Its times were placed on the gateway's clock once, when it was first heard: placed
        again, a wall-to-monotonic conversion a microsecond off made requests differ from the ones the core
        cancelled, which it refuses (DUPLICATE: the id is used with other content)."""
        return tuple(replace(earlier[r.id], received_at=r.received_at) if r.id in earlier else r
                     for r in plan.requests)

    def _keep_withdrawn(self, event_id: str, tracked: _Tracked) -> None:
        """Remember an implicitly cancelled event's requests (`WITHDRAWN_KEPT` events at most, the oldest
        forgotten first), for `_as_first_heard`."""
        _keep_newest(self._withdrawn, event_id, (tracked.revision, dict(tracked.requests)))

    async def _answer(self, sink: DispatchSink, request: DispatchRequest) -> DispatchAnswer:
        answer = await sink.submit(request)
        if answer is None:  # the contract says every request is answered; treat silence as a no
            return DispatchAnswer.refused(request.id, sink.now(), None, "no answer from the core")
        return answer

    async def _refuse(self, sink: DispatchSink, refusal: DispatchAnswer, event: Any) -> str:
        """A bad (or expired) revision: opt out, and withdraw what an earlier revision asked for. A copy no
        newer than the revision held is stale: it withdraws nothing (a malformed old copy listed beside the
        live revision cancelled it), and is answered as the revision held was."""
        revision = _revision_of(event)
        held = self._events.get(refusal.request_id)
        if held is not None and revision <= held.revision:
            log.warning("OpenADR: ignoring a stale invalid copy of event %s (modificationNumber %s, revision %s "
                        "held): %s", refusal.request_id, revision, held.revision, _describe(refusal))
            return held.opt
        tracked = self._events.pop(refusal.request_id, None)
        if tracked is not None:
            await self._cancel(sink, refusal.request_id, tracked.request_ids)
        self._record(EventOutcome(refusal.request_id, revision, OPT_OUT, (refusal,), _describe(refusal)))
        return OPT_OUT

    async def _unplaceable_event(self, event: Any, why: str) -> None:
        """An event openleadr could not place in time (`_unplaceable`): refused INVALID, naming why."""
        sink = self._sink
        if sink is None:
            return
        refusal = DispatchAnswer.refused(_event_id_of(event) or "<unknown event>", sink.now(), ReasonCode.INVALID,
                                         why)
        try:
            await self._refuse(sink, refusal, event)
        except Exception:  # noqa: BLE001 - the core failing must not cost the VTN its answer
            log.exception("OpenADR: the core failed on withdrawing the unplaceable event %s", refusal.request_id)

    async def _abandoned(self, events: list[Any], why: str) -> None:
        """A message whose handling failed (`_Client._on_event`): each of its events is answered optOut, so what
        the VEN holds of them is withdrawn from the core, kept for `_as_first_heard` should the VTN send the
        same revision again (it is then handled afresh)."""
        sink = self._sink
        if sink is None:
            return
        reason = f"answered optOut: the VTN's message could not be handled ({why})"
        for event_id in {_event_id_of(e) for e in events} - {None}:
            tracked = self._events.pop(event_id, None)
            if tracked is None:
                continue
            self._keep_withdrawn(event_id, tracked)
            await self._cancel(sink, event_id, tracked.request_ids, reason)
            self._record(EventOutcome(event_id, tracked.revision, OPT_OUT, detail=reason))

    async def _not_ours(self, sink: DispatchSink, plan: NotAddressed) -> str:
        """Another VEN's (or resource's) event: optOut, and withdraw what an earlier revision of it asked for,
        as a cancellation does (a VTN re-targeting an event moves it away from this site)."""
        tracked = self._events.pop(plan.event_id, None)
        self._withdrawn.pop(plan.event_id, None)
        if tracked is not None:
            await self._cancel(sink, plan.event_id, tracked.request_ids, plan.detail)
        self._record(EventOutcome(plan.event_id, plan.revision, OPT_OUT, detail=plan.detail))
        return OPT_OUT

    async def _cancel(self, sink: DispatchSink, event_id: str, request_ids: tuple[str, ...],
                      reason: str = "") -> None:
        for request_id in request_ids:
            await sink.submit(DispatchCancel(id=request_id, source=self._source, received_at=sink.now(),
                                             reason=reason))

    async def _implicit_cancellations(self, events: list[Any]) -> None:
        """A complete distribution: every event the VEN holds that it lacks was cancelled (OpenADR 2.0b)."""
        sink = self._sink
        if sink is None:
            return
        present, now = {_event_id_of(e) for e in events}, sink.now()
        for event_id in [e for e in self._events if e not in present]:
            tracked = self._events[event_id]
            if tracked.ends_at - tracked.delay_s <= now:
                # Over on the VTN's schedule: it drops completed events, which is no cancellation. A randomised
                # start's tail is still this VEN's to run, report and ask again for, until `_forget_ended`.
                continue
            del self._events[event_id]
            self._keep_withdrawn(event_id, tracked)
            try:
                await self._cancel(sink, event_id, tracked.request_ids, IMPLICIT_CANCEL)
            except Exception:  # noqa: BLE001 - the core failing must not cost the VTN its poll
                log.exception("OpenADR: the core failed on the implicit cancellation of %s", event_id)
            if self.client is not None:
                self.client.forget_event(event_id)
            self.implicit_cancellations += 1
            self._record(EventOutcome(event_id, tracked.revision, tracked.opt, detail=IMPLICIT_CANCEL))

    # ------------------------------------------------------------------ standing settings

    def notice_step(self, result: StepResult) -> None:
        """A gateway observer: a request the core ended commits no power any more (`committedPower`:
        the owner's opt-out ends one, and asking again once it is revoked commits it anew); and a step
        that changed what admits dispatch may have cleared what refused or capped an event: look at once."""
        for event in result.events:
            if isinstance(event, DispatchEnded):
                self._ended(event)
        if self._watch.changed(result) and self._wake is not None and self._events:
            self.looks.ask()
            self._wake.set()

    def _ended(self, ended: DispatchEnded) -> None:
        """A request the core ended holds no window any more. One the owner's opt-out ended changes the
        event's opt too: openleadr answers every later distribution of the event with the opt on record, and
        an event the gateway no longer serves any interval of is optOut (asked again once the opt-out is
        revoked, it opts in anew: `_reask`)."""
        for event_id, tracked in self._events.items():
            if tracked.windows.pop(ended.request_id, None) is None or ended.reason != OPTED_OUT_END:
                continue
            # the intervals still served, begun or not; a 0 kW one (a STOP) serves nothing of the event
            asked = (tracked.requests.get(request_id) for request_id in tracked.windows)
            opt = OPT_IN if any(r is not None and r.kind is not DispatchKind.STOP for r in asked) else OPT_OUT
            if opt != tracked.opt:
                self._set_opt(event_id, tracked, opt)
                self._record(EventOutcome(event_id, tracked.revision, opt,
                                          detail=f"{ended.request_id}: ended by the owner's opt-out"))

    def _set_opt(self, event_id: str, tracked: _Tracked, opt: str) -> None:
        """The opt the VTN's next distribution of the event is answered with (openleadr's record of it)."""
        tracked.opt = opt
        if self.client is not None and event_id in self.client.responded_events:
            self.client.responded_events[event_id] = opt

    async def _standing(self, sink: DispatchSink) -> None:
        """Ask again for events in their active period the core would now serve better."""
        assert self._wake is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), STANDING_CHECK_S)
            self._wake.clear()
            covered = self.looks.begin()
            try:
                if self._events:
                    await self._reask(sink)
            except Exception:  # noqa: BLE001 - the next check tries again; the VTN link is unaffected
                log.exception("OpenADR: asking the core again failed")
            finally:
                self.looks.done(covered)

    async def _reask(self, sink: DispatchSink) -> None:
        better = sink.telemetry().improvable
        for event_id, tracked in list(self._events.items()):
            due = [r for rid, r in tracked.requests.items() if rid in better]
            for request in due:
                again = replace(request, revision=request.revision + 1, received_at=sink.now())
                answer = await self._answer(sink, again)
                tracked.requests[again.id], tracked.answers[again.id] = again, answer
                if answer.verdict is Verdict.REJECTED:
                    tracked.windows.pop(again.id, None)
                else:
                    tracked.windows[again.id] = (again.start, again.end, _committed_w(again, answer))
                self.reasks += 1
            if due:
                self._set_opt(event_id, tracked, _opt_of(tracked.requests.values(), tracked.answers))
                self._record(EventOutcome(event_id, tracked.revision, tracked.opt,
                                          tuple(tracked.answers[r.id] for r in due),
                                          "asked again: " + "; ".join(_describe(tracked.answers[r.id])
                                                                      for r in due)))

    def _record(self, outcome: EventOutcome) -> None:
        self.outcomes.append(outcome)
        level = logging.INFO if outcome.opt == OPT_IN else logging.WARNING
        log.log(level, "OpenADR event %s rev %d: %s (%s)", outcome.event_id, outcome.revision,
                outcome.opt, outcome.detail)

    def _forget_ended(self) -> None:
        """Drop events whose last window has closed, so a long run's memory stays flat."""
        if self._sink is None:
            return
        now = self._sink.now()
        for event_id in [e for e, t in self._events.items() if t.ends_at <= now]:
            del self._events[event_id]

    def committed_w(self, telemetry: Telemetry | None = None) -> float:
        """The W the gateway has committed to for the OpenADR request in force now (the cap if capped), 0 when
        no OpenADR request is. Of overlapping events the core serves one (the highest priority): their sum
        was never committed. `telemetry`: the core's, if the caller has it already."""
        if self._sink is None:
            return 0.0
        in_force = (telemetry or self._sink.telemetry()).active_event_id
        now = self._sink.now()
        windows = (t.windows[in_force] for t in self._events.values() if in_force in t.windows)
        return next((watts for start, end, watts in windows if start <= now < end), 0.0)

    # ------------------------------------------------------------------ reports

    def _add_reports(self, client: _Client) -> None:
        """Offer the telemetry an aggregator needs; the VTN picks the interval."""
        rate = objects.SamplingRate(min_period=timedelta(seconds=self._report_min_s),
                                    max_period=timedelta(hours=1), on_change=False)
        name = self.config.ven_name
        items: list[tuple[Callable[[], list[tuple[datetime, float]]], str, str | None]] = [
            (self._reading(lambda t: t.power_w), "REAL_POWER", "W"),
            (self._reading(lambda t: t.soc_now), "stateOfCharge", "%"),
            (self._reading(lambda t: t.available_wh_now), "availableEnergy", "Wh"),
            (self._reading(lambda t: self._state_code(t.mode)), "gatewayState", "code"),
            (self._reading(self.committed_w), "committedPower", "W"),
            (self._reading(lambda t: self.blocked_code(t)), "dispatchBlocked", "code"),
        ]
        for callback, measurement, unit in items:
            client.add_report(callback=callback, resource_id=name, measurement=measurement, unit=unit,
                              report_specifier_id=f"{name}-telemetry", r_id=f"{name}-{measurement}",
                              report_name=enums.REPORT_NAME.TELEMETRY_USAGE,
                              sampling_rate=rate, report_duration=timedelta(hours=1))

    def _reading(self, pick: Callable[[Any], float | None]) -> Callable[[], list[tuple[datetime, float]]]:
        """A report callback: the newest telemetry value, or nothing when it is unknown."""
        def read() -> list[tuple[datetime, float]]:
            if self._sink is None:
                return []
            try:
                value = pick(self._sink.telemetry())
            except Exception as err:
                log.error("OpenADR: telemetry unavailable for a report: %s", err)
                return []
            if not is_finite_number(value):
                return []
            return [(datetime.now(timezone.utc), float(value))]
        return read

    def _state_code(self, mode: Mode) -> int:
        return self._state_codes.get(mode, UNKNOWN_STATE_CODE)

    @staticmethod
    def blocked_code(t: Any) -> int:
        """Why dispatch is not followed now, as `BLOCKED_CODES` numbers it (0: nothing blocks)."""
        if t.refusal is not None:
            return BLOCKED_CODES.get(t.refusal, 0)
        return BLOCKED_CODES[ReasonCode.OPTED_OUT] if t.opted_out else 0


HEARD_KEPT, HEARD_CHARS = 4, 300
"""How much of what openleadr said goes into a cause: a link's cause is one line of the log and the status."""


class _Heard(logging.Handler):
    """openleadr's own warnings and errors during one exchange (it logs the cause instead of raising):
    a wrong fingerprint, a bad signature, a schema it refused, an HTTP error are only in its words."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < HEARD_KEPT:
            self.messages.append(printable(record.getMessage().strip())[:HEARD_CHARS])

    def said(self) -> str:
        return f" ({'; '.join(m for m in self.messages if m)})" if self.messages else ""


@contextlib.contextmanager
def _openleadr_heard() -> Iterator[_Heard]:
    """What openleadr says meanwhile, for the cause the gateway gives. The service holds openleadr's
    logger above its warnings (`narration.QUIETED`), so it is lowered meanwhile, and its lines are
    still kept from the log by the service's handler (`narration._quiet`)."""
    global _level_before_hearing
    heard, openleadr_log = _Heard(), logging.getLogger("openleadr")
    if not _hearing:  # the first of overlapping ones lowers it, the last puts it back
        _level_before_hearing = openleadr_log.level
        if not openleadr_log.isEnabledFor(logging.WARNING):
            openleadr_log.setLevel(logging.WARNING)
    _hearing.append(heard)
    openleadr_log.addHandler(heard)
    try:
        yield heard
    finally:
        openleadr_log.removeHandler(heard)
        _hearing.remove(heard)
        if not _hearing:
            openleadr_log.setLevel(_level_before_hearing)


_hearing: list[_Heard] = []
_level_before_hearing = logging.NOTSET


def _describe(answer: DispatchAnswer) -> str:
    return f"{answer.request_id}: {describe(answer)}"


def _opt_of(requests: Iterable[DispatchRequest], answers: Mapping[str, DispatchAnswer]) -> str:
    """optIn when at least one interval is served (with or without a cap), else optOut. A 0 kW interval (a STOP,
    which the core takes whatever its state) serves nothing of an event that asks for power in another: an
    event of 5 kW then 0 kW, its 5 kW refused (the owner opted out), was answered optIn for the stop alone.
    An event of stops only is served by stopping."""
    requests = list(requests)
    asking = [r for r in requests if r.kind is not DispatchKind.STOP] or requests
    return OPT_IN if any(answers[r.id].verdict in (Verdict.ACCEPTED, Verdict.CAPPED) for r in asking) else OPT_OUT


def _committed_w(request: DispatchRequest, answer: DispatchAnswer) -> float:
    return answer.cap_w if answer.verdict is Verdict.CAPPED and answer.cap_w is not None else request.target_w


def _event_id_of(event: Any) -> str | None:
    try:
        return event["event_descriptor"]["event_id"]
    except (TypeError, KeyError):
        return None


def _cancelled_in_place(known: Any, event: Any) -> bool:
    """Whether `event` cancels the `known` copy without a new modificationNumber: a VTN that changes only the
    status (which OpenADR 2.0b lets it do for far/near/active) still means the cancellation."""
    def status(e: Any) -> Any:
        return utils.getmember(e, "event_descriptor.event_status")
    return (status(event) == enums.EVENT_STATUS.CANCELLED and status(known) != enums.EVENT_STATUS.CANCELLED
            and _revision_of(event) == _revision_of(known))


def _unplaceable(event: Any) -> str | None:
    """Why openleadr cannot place the event in time (it reads its status from the active period's start and
    duration), or None when it can."""
    period = event.get("active_period") if isinstance(event, Mapping) else None
    if not isinstance(period, Mapping):
        return "active_period is missing"
    start, duration = period.get("dtstart"), period.get("duration")
    if not (isinstance(start, datetime) and start.tzinfo is not None):
        return f"active_period.dtstart must be a UTC date-time, got {start!r}"
    if not isinstance(duration, timedelta):
        return f"active_period.duration must be a duration, got {duration!r}"
    try:
        start + duration  # openleadr adds them to tell the event's status, and an overflow failed the message
    except OverflowError:
        return (f"active_period ends beyond the representable date range (dtstart {start.isoformat()} "
                f"+ duration {duration})")
    return None


def _keep_newest(kept: dict[Any, Any], key: Any, value: Any) -> None:
    """`kept[key] = value` as its newest entry, the oldest forgotten past `WITHDRAWN_KEPT`: what the VEN
    remembers of events it no longer runs (a VTN names a handful at a time; the oldest matter least)."""
    kept.pop(key, None)
    kept[key] = value
    while len(kept) > WITHDRAWN_KEPT:
        del kept[next(iter(kept))]


def _events_of(message: Any) -> list[Any]:
    events = message.get("events") if isinstance(message, Mapping) else None
    return events if isinstance(events, list) else []


def _revision_of(event: Any) -> int:
    try:
        number = event["event_descriptor"]["modification_number"]
        return number if isinstance(number, int) else -1
    except (TypeError, KeyError, IndexError):
        return -1


CUT_OFF = ("Connection reset by peer", "Server disconnected")
"""aiohttp's words for a TLS server that ended the connection during its handshake (TLS 1.2, 1.3)."""


def _pem_problems(config: OpenAdrConfig, key: str) -> list[str]:
    """Why the TLS files cannot serve (unreadable, no PEM, a key not the certificate's, encrypted), or
    nothing: checked here, since openleadr loads them only at its first connection, and says little."""
    checks = [lambda: check_ca_bundle(config.ca_file, f"{key}: ca_file")] if config.ca_file else []
    if config.cert and config.key:
        checks.append(lambda: load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), config.cert, config.key,
                                         f"{key}: cert and key"))
    return collect_problems(*checks)


def check(config: OpenAdrConfig) -> list[str]:
    """Settings the config schema cannot check alone, named the way check-config names keys."""
    key = "dispatch.openadr"
    problems = []
    if bool(config.cert) != bool(config.key):
        problems.append(f"{key}: cert and key: give both (mutual TLS and signing) or neither")
    if config.cert and not config.ca_file:
        problems.append(f"{key}: ca_file: required with cert, to check the VTN's certificate")
    if config.ca_file and not config.cert:
        problems.append(f"{key}: ca_file: used only with cert and key (mutual TLS); without them the VTN's "
                        "certificate is checked against the system's CAs: give cert and key, or remove ca_file")
    if config.cert and not config.vtn_url.startswith("https://"):
        problems.append(f"{key}: vtn_url: must be https:// when cert is set")
    if not config.vtn_url.startswith(("http://", "https://")):
        problems.append(f"{key}: vtn_url: must start with http:// or https://, got {config.vtn_url!r}")
    problems += _pem_problems(config, key)
    problems += check_levels(config.simple_levels_pct, f"{key}: simple_levels_pct")
    return problems
