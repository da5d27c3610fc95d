"""OpenADR 3 VEN: an aggregator's VTN dispatching the gateway over REST/JSON (docs/dispatch.md).

The VEN is a client of the VTN's OpenADR 3.0.1 API, authenticated by OAuth2
client credentials (the secret read from a private file, never logged):

1. a token from the token endpoint (the configured one, else the one the VTN
   names at `/auth/server`), renewed before it expires and again whenever the
   VTN answers 401;
2. its VEN object (`/vens`, created once under `ven_name`) and the programs it
   is enrolled in (`/programs`: those the VTN shows this client);
3. the events (`/events`) every poll interval, and at once when the VTN notifies
   a change (a subscription posting to the gateway's callback, when configured);
4. each new or modified event goes through `openadr3_events.translate_event` to the
   core: requests (answered), prices (for the price-responsive mode), export limits
   (held as this source's site limit while their interval runs); an event that had
   ended before the VEN started is history (the VTN keeps events until they are
   deleted): passed over, unanswered, with one summary line in the log, where
   one that ended since but was never seen is still refused `EXPIRED`;
5. reports back (`/reports`): the answer to every revision at once, and the
   delivered energy per interval, SoC and energy above the floor at the cadence
   the event's report descriptors ask.

OpenADR 3 has no modification number and no explicit cancellation: a changed
event is a new revision, and an event that disappears from a complete listing
was cancelled (deleted at the VTN). Losing the VTN changes nothing the core
already accepted: every request carries its own window, so it neither ends early
nor runs over; an event is only cancelled when a listing the VTN did answer
lacks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp import web

from firmware_py.addresses import parse_host_port
from firmware_py.config import OpenAdr3Config
from firmware_py.core.controller import StepResult
from firmware_py.core.requests import ENDED_MEMORY_MAX
from firmware_py.core.types import (
    DispatchAnswer,
    DispatchCancel,
    DispatchRequest,
    PriceInterval,
    PriceKind,
    ReasonCode,
    SiteLimit,
    Verdict,
    describe,
)
from firmware_py.dispatch import DispatchSink
from firmware_py.dispatch.openadr3_events import (
    OBJECT_ID,
    SOURCE,
    UNKNOWN_EVENT,
    EventPlan,
    IntervalWindow,
    NotAddressed,
    Past,
    event_id_of,
    iso_datetime,
    iso_duration,
    price_id,
    program_id_of,
    translate_event,
)
from firmware_py.dispatch.revisions import ended_by_revision
from firmware_py.dispatch.simple_levels import DEFAULT_LEVELS_PCT, check_levels
from firmware_py.dispatch.standing import StandingLooks, StandingWatch
from firmware_py.dispatch.vtn_answers import AnswerTooLarge, read_capped
from firmware_py.errors import InputError
from firmware_py.http_listener import BodyUnread, HttpListener, body_of
from firmware_py.journal.kinds import RecordKind
from firmware_py.links import Backoff, LinkHandle, next_poll_in
from firmware_py.owner.access import read_secret
from firmware_py.quoting import printable, without_query
from firmware_py.tasks import cancel_all

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 10.0
PAGE = 50  # objects asked per page of a listing
MAX_PAGES = 40  # ... and at most this many pages (2,000 objects) of a listing held at once
MAX_SCAN_PAGES = 400
"""Pages of events read per poll at most (20,000 events): the VTN keeps events until they are deleted,
so an hourly program passes 2,000 in under three months; events already handled and not held are
read past without being kept, so only `MAX_PAGES` pages are ever held in memory."""
MAX_EVENTS = 500  # events tracked at once
GIVEN_MEMORY = 2 * ENDED_MEMORY_MAX  # event ids whose highest revision is remembered: more than the core keeps
MAX_PENDING_REPORTS = 200  # reports waiting for the VTN to come back; the oldest go first
MAX_REPORT_FAILING_S = 86_400.0
"""How long (gateway clock, from the first failure) a report the VTN fails (5xx, an answer it cannot read)
is sent again before it is given up: a VTN whose store is down for minutes or hours must still get the
energy it settles on, and one that fails a report for good must not be asked forever. Meanwhile it goes
behind the others, so it holds none back."""
TAKEN_LOOKBACK_S = 7 * 86_400.0
"""How far back the journal is read at a start for the energy reports the VTN took: an event held again
then is at most this long (a VTN keeps events until deleted, but one over before the start is history)."""
RENEW_MARGIN_S = 30.0  # a token is renewed this long (or a tenth of its life) before it expires
DEFAULT_TOKEN_LIFE_S = 300.0  # when the token endpoint does not say (expires_in)
MAX_TOKEN_LIFE_S = 86_400.0  # a token said to live longer is renewed after a day all the same
B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
"""RFC 6750's b64token: all a bearer token may be, so it goes into the Authorization header as it came."""
STANDING_CHECK_S = 1.0
SUBSCRIPTION_CHECK_S = 600.0  # how often the VEN looks that the VTN still holds its subscription
PROGRAMS_RECHECK_S = 300.0  # how often GET /programs is read again while an event names a program not in it
NOTIFY_PATH = "/openadr3/notify"
HELD_NOTE_MAX = 128 * 1024
"""Characters of an event and its program noted when the VEN takes it up (`OPENADR3_HELD`): a day of 5-minute
intervals is about 20,000 (the bench VTN's). A larger one is not noted (logged): it is not reported after a
restart that finds it deleted."""
UNLISTED_GONE = 2
"""Listings of several pages running that may lack an event before it counts as deleted, where the VTN
will not answer for the event itself: a paging race hides an event from one listing, not from two."""
SUBSCRIBED_OPERATIONS = ("POST", "PUT", "DELETE")  # OpenADR 3.0.1's words: GET, POST, PUT, DELETE

# Report payload types the gateway writes (private ones where OpenADR 3 has no standard name).
DELIVERED_ENERGY = "DELIVERED_ENERGY"  # Wh out of the inverter in the interval (the event's meter)
CHARGE_LEVEL = "STORAGE_CHARGE_LEVEL"  # SoC %, as of the report
USABLE_CAPACITY = "STORAGE_USABLE_CAPACITY"  # Wh the pack holds when full (OpenADR 3's meaning)
ABOVE_FLOOR = "ENERGY_ABOVE_FLOOR"  # Wh the gateway may still deliver before the floor, as of the report
ANSWER = "DISPATCH_ANSWER"  # accepted | capped | refused
ANSWER_REASON = "DISPATCH_REASON"  # [reason code or "", the detail in words]
ANSWER_CAP = "DISPATCH_CAP"  # kW, when capped
UNITS = {DELIVERED_ENERGY: "WH", CHARGE_LEVEL: "PERCENT", USABLE_CAPACITY: "WH", ABOVE_FLOOR: "WH",
         ANSWER_CAP: "KW"}
VERDICT_WORDS = {Verdict.ACCEPTED: "accepted", Verdict.CAPPED: "capped", Verdict.REJECTED: "refused"}


class VtnError(Exception):
    """The VTN could not be reached, or answered something the VEN cannot use; the message says which."""


class VtnRefused(VtnError):
    """The VTN refused the request (a 4xx): this request, not the link, so the VEN goes on without it."""


class VtnNotFound(VtnRefused):
    """The VTN answered 404: the object asked for is not there (an event it deleted)."""


class VtnForbidden(VtnRefused):
    """The VTN answered 403: this VEN may not do this now. Its permissions are the operator's to set, and
    they may still be being set up or restored (a VTN brought back from a backup), so a report so refused
    waits as a failed one does rather than being given up at once."""


class VtnFailed(VtnError):
    """The VTN answered this request, and failed it (a 5xx, or a 2xx the VEN cannot read): the VTN is
    there, so what fails may be this request alone; a report so failed goes to the back of the queue."""


class VtnSilent(VtnError):
    """The request went out and no answer came back (none in time, or the connection dropped): the VTN
    may have acted on it, so a report so sent is looked for at the VTN before it is sent again."""


class VtnBusy(VtnError):
    """The VTN said "not now" (408, 429 or 503): the link, not this request, so the poll fails and what
    was to be sent waits. `retry_after_s` is how long its Retry-After asked the VEN to wait (None: it
    did not say, or said nothing readable)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


BUSY_STATUSES = frozenset({408, 429, 503})


def retry_after_s(header: str | None, now_wall: float) -> float | None:
    """A Retry-After header's wait in seconds (RFC 9110: a whole number of seconds, or an HTTP date,
    `now_wall` being the wall clock it is counted from); None for no header or one that is neither.
    A date already past is no wait (0)."""
    if header is None:
        return None
    text = header.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110's dates are GMT; a date without a zone is not one of them
        return None
    return max(0.0, when.timestamp() - now_wall)


def wait_after_busy(backoff_s: float, asked_s: float | None, ceiling_s: float) -> float:
    """How long to wait after the VTN said "not now": at least the back-off, as long as it asked (its
    Retry-After), but never longer than the VEN's own ceiling: a VTN asking for an hour would
    otherwise keep a resource that may be dispatched any minute from hearing of its events."""
    return max(backoff_s, min(asked_s or 0.0, ceiling_s))


class TokenRefused(VtnError):
    """The token endpoint refused the client id or secret: no request was refused by the VTN itself, so
    it is not a `VtnRefused`: the cycle fails as with an unreachable VTN, and what was to be sent (a
    report, a subscription) waits for the credential to be fixed instead of being given up."""


@dataclass(frozen=True)
class EventOutcome:
    """What the VEN did with one event revision: for the log, the bench and the tests."""

    event_id: str
    revision: int
    answers: tuple[DispatchAnswer, ...] = ()
    detail: str = ""
    prices: tuple[PriceInterval, ...] = ()


@dataclass
class _Tracked:
    """An event the core has heard about, at the revision it knows."""

    plan: EventPlan
    requests: dict[str, DispatchRequest] = field(default_factory=dict)
    answers: dict[str, DispatchAnswer] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)
    """Ids of the intervals whose usage is reported (or is not this run's to report): ids, not a count,
    as a revision may drop an interval that ended (the next would be skipped) or add one."""
    carried_wh: dict[str, tuple[int, float]] = field(default_factory=dict)  # an id no longer asked for ->
    # (its interval's id, the Wh served under it)
    before_wh: dict[int, float] = field(default_factory=dict)
    """Interval id -> Wh the journal credits it with from the runs before this one (a restart mid-interval):
    this run's meter starts again from 0, and the aggregator settles on the journal's figure."""

    def unreported(self) -> list[IntervalWindow]:
        """The intervals whose usage is still to be reported, in the order it falls due (`_by_end`)."""
        return [w for w in _by_end(self.plan) if w.interval_id not in self.reported]


@dataclass(frozen=True)
class _Lacked:
    """What was reported of an event cancelled because a listing lacked it, kept until its scheduled end
    in case the VTN lists it again (a listing that came back empty for a moment, an event deleted and made
    again under its id): its `finished` intervals (over when it went: reported with all their energy) are
    not reported again, and those it was in the middle of carry on from the energy reported for them, so the
    report the VTN keeps for an interval holds all of it: `before_wh`, the part no meter of the core holds
    (earlier runs', ids a revision dropped), and `metered`, the core's meter of their request ids then. The
    core carries a request's account on when it is asked for again, so the VEN's reading resumes from it,
    never added to it (and stays at it if the core does not serve the request again)."""

    finished: frozenset[int]
    before_wh: dict[int, float]
    metered: dict[str, float]
    until: float


@dataclass
class _PendingReport:
    """A report waiting for the VTN; since when (gateway clock) the VTN fails it (5xx, an unreadable
    answer), if it does; and whether it was sent once without an answer (the VTN may hold it already)."""

    report: dict[str, Any]
    failing_since: float | None = None
    maybe_taken: bool = False


@dataclass
class _Listing:
    """What one (paged) listing held: the objects kept, the ids of those only noted present (settled:
    nothing more to do with them), the pages it took, and whether it reached its end."""

    objects: list[Any] = field(default_factory=list)
    settled: set[str] = field(default_factory=set)
    pages: int = 0
    complete: bool = True

    def take(self, page: list[Any], settled: Callable[[Any], str | None], room: int) -> None:
        """A page's objects: settled ones by id only, the others held while there is room."""
        for obj in page:
            if (settled_id := settled(obj)) is not None:
                self.settled.add(settled_id)
            elif len(self.objects) < room:
                self.objects.append(obj)
            else:
                self.complete = False


def token_endpoint(base: str, named: Any) -> str:
    """Where the client secret goes: the token endpoint the VTN at `base` names at /auth/server, else its own
    /auth/token. Never plain HTTP for a VTN on HTTPS (the secret would travel in clear): VtnRefused."""
    if not isinstance(named, str) or not named.startswith(("http://", "https://")):
        return f"{base}/auth/token"
    if base.startswith("https://") and not named.startswith("https://"):
        raise VtnRefused(f"GET /auth/server names the token endpoint {named}, plain HTTP for a VTN on HTTPS: the "
                         "client secret is not sent there (set [dispatch.openadr3] token_url to choose it)")
    return named


class TokenSource:
    """OAuth2 client credentials: one bearer token, fetched when missing and renewed before it expires.

    `clock` is a monotonic clock (the token's life is real time, whatever clock the core runs on).
    """

    def __init__(self, token_url: str, client_id: str, secret: str, clock: Callable[[], float] = time.monotonic):
        self.token_url = token_url
        self.shown_url = without_query(token_url)  # as messages name it: a provider's query may be a credential
        self.client_id = client_id
        self._secret = secret
        self._clock = clock
        self._token: str | None = None
        self._renew_at = -math.inf
        self.fetches = 0

    def __repr__(self) -> str:  # never the secret, never the token
        return f"TokenSource({self.shown_url!r}, client_id={self.client_id!r})"

    def drop(self) -> None:
        """Forget the token (the VTN said 401): the next request fetches a new one."""
        self._token = None

    async def bearer(self, session: aiohttp.ClientSession) -> str:
        if self._token is None or self._clock() >= self._renew_at:
            await self._fetch(session)
        assert self._token is not None
        return self._token

    async def _fetch(self, session: aiohttp.ClientSession) -> None:
        self.fetches += 1
        form = {"grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self._secret}
        try:  # never redirected: a redirect would carry the secret to wherever the answer points
            async with session.post(self.token_url, data=form, allow_redirects=False) as resp:
                body = await _body(resp)
                status = resp.status
                _refuse_redirect(resp, f"the token endpoint {self.shown_url}", "the client secret is not sent there")
                asked_s = retry_after_s(resp.headers.get("Retry-After"), time.time())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            raise VtnError(f"cannot reach the token endpoint {self.shown_url}: {_why(err)}") from None
        if status in BUSY_STATUSES:
            raise VtnBusy(f"the token endpoint {self.shown_url} answered HTTP {status} (busy)", asked_s)
        if status in (400, 401, 403):
            try:
                answer = _json(body, "")
            except VtnError:
                answer = None
            code = answer.get("error") if isinstance(answer, dict) else None
            code = _shown(code, [self._secret]) if isinstance(code, str) else ""  # it may quote the secret refused
            raise TokenRefused(f"the token endpoint {self.shown_url} refused client_id {self.client_id!r} "
                             f"(HTTP {status}{f', {code}' if code else ''}): check the client id "
                             "and the secret in client_secret_file")
        answer = _json(body, f"the token endpoint {self.shown_url}") if status == 200 else None
        if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
            raise VtnError(f"the token endpoint {self.shown_url} answered HTTP {status} without an access_token")
        if not B64TOKEN.fullmatch(answer["access_token"]):  # the token itself is a credential: never in the message
            raise VtnError(f"the token endpoint {self.shown_url} answered an access_token that is not a bearer "
                           "token (RFC 6750 allows letters, digits and -._~+/ then '=' padding)")
        life_s = token_life_s(answer.get("expires_in"))
        self._token = answer["access_token"]
        self._renew_at = self._clock() + life_s - min(RENEW_MARGIN_S, life_s / 10)


def token_life_s(expires_in: Any) -> float:
    """How long to take a token to live: its `expires_in` seconds, at most `MAX_TOKEN_LIFE_S` (a huge or
    infinite figure is a broken answer, not a token to keep for ever); `DEFAULT_TOKEN_LIFE_S` when it says
    none that is a number above 0 (the field is optional in OAuth2)."""
    if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or not expires_in > 0:
        return DEFAULT_TOKEN_LIFE_S
    return float(min(expires_in, MAX_TOKEN_LIFE_S))  # compared before float(): 10**400 has no float


class OpenAdr3Ven:
    """The gateway's OpenADR 3 VEN, a `DispatchSource` (see the module docstring).

    `rating_w` (a number or a callable read at each event) is what SIMPLE levels are shares
    of (`levels_pct`). `to_gateway_time` maps a VTN UTC datetime onto the sink's clock at
    reception (`Clocks.from_datetime` in `run`). `link`, when given, is told when the VTN is
    lost and reached again. `secret` overrides `client_secret_file` (the bench's own VTN).
    """

    def __init__(self, config: OpenAdr3Config, rating_w: Callable[[], float] | float, *,
                 levels_pct: Sequence[float] = DEFAULT_LEVELS_PCT,
                 to_gateway_time: Callable[[datetime], float] = datetime.timestamp,
                 source: str = SOURCE, link: LinkHandle | None = None, retry_max_s: float = 60.0,
                 secret: str | None = None, currency: str | None = None) -> None:
        if problems := check(config, secret_given=secret is not None, simple_levels_pct=levels_pct):
            raise InputError(problems)
        self.config = config
        self._rating = rating_w if callable(rating_w) else (lambda: float(rating_w))
        self._levels = tuple(levels_pct)
        self._to_gateway_time = to_gateway_time
        self._source = source
        self._currency = currency  # the owner's program's: prices in another are refused
        self._link = link
        self._retry_max_s = retry_max_s
        self._secret = secret if secret is not None else read_secret(config.client_secret_file,
                                                                     "OpenADR 3 client secret")
        self.base = config.vtn_url.rstrip("/")
        self.tokens: TokenSource | None = None
        self.ven_id: str | None = None
        self.resources: tuple[str, ...] = ()  # the resource names the VTN lists in this VEN's object: targets
        self.programs: dict[str, dict[str, Any]] = {}
        self._not_enrolled: set[str] = set()  # program ids events name that a re-read of programs still lacked
        self._programs_due = 0.0  # monotonic: when GET /programs may be read again for an unknown program
        self.subscribed = False
        self._subscription_due = math.inf  # when the VTN's copy of the subscription is next looked at
        self._subscribed_programs: set[str] = set()
        """Programs this VEN holds a subscription for, as far as it knows: what a VTN that cannot list
        subscriptions holds (asking again for each would pile up copies, each notifying once more)."""
        self.outcomes: deque[EventOutcome] = deque(maxlen=1000)
        self.failed_polls = 0
        self.next_poll_in_s = math.nan  # the wait before the next poll, as last chosen (NaN: none chosen yet)
        self.polls = 0
        self.reasks = 0
        self._sink: DispatchSink | None = None
        self._events: dict[str, _Tracked] = {}
        self._tails: dict[str, _Tracked] = {}  # events the VTN deleted once its own schedule was over whose
        # randomised tail the core still serves: no longer held, reported as their intervals end
        self._unlisted: dict[str, int] = {}  # held events missing from listings running, the VTN not saying why
        self._seen: dict[str, tuple[str, int]] = {}  # event id -> (its content's hash, revision) as last handled
        self._given: dict[str, int] = {}  # event id -> the highest revision the core was given under it, its own
        # or a re-ask's (least recently given first, at most GIVEN_MEMORY): the core may hold it (`_next_revision`)
        self._listing_cut = False  # the last listing of events was cut short (warned once)
        self._not_addressed: set[str] = set()  # events listed for other VENs only, logged once each
        self._duplicated: set[str] = set()  # event ids listed under two objects, warned of once each
        self._started = -math.inf  # when `run` began (sink clock): events over by then are history, unanswered
        self._taken: dict[str, set[int]] = {}  # event id -> intervals whose energy report a run before this one
        # saw the VTN take (or refuse for good), from the journal
        self._missed_sent: set[str] = set()  # events over before they were held whose missed reports went
        self._held_before: dict[str, tuple[Any, Any]] = {}  # event id -> (event, program) as listed to a run
        # before this one (its note), until a listing says whether the VTN still has it
        self._unlisted_before: dict[str, int] = {}  # of those, the listings running that lacked it, the VTN not
        # saying why
        self.history_passed = 0  # events passed over as history (`Past`), in all
        self._metered: dict[str, float] = {}  # request id -> Wh delivered (the core's meter, seen each step)
        self._lacked: dict[str, _Lacked] = {}  # event id -> what was reported of it when a listing lacked it
        self._pending: deque[_PendingReport] = deque()
        self._limit_applied: float | None = None
        self._told_ok: bool | None = None
        self._wake: asyncio.Event | None = None
        self._standing_wake: asyncio.Event | None = None
        self._watch = StandingWatch()
        self.looks = StandingLooks()  # looks the steps asked for and those taken (a simulated clock waits on it)
        self._callback_token = secrets.token_hex(16)
        self.next_report_at = math.inf  # when the next cadence report falls due (gateway clock)

    # ------------------------------------------------------------------ running

    async def run(self, sink: DispatchSink) -> None:
        """Log in, register, poll, answer and report until cancelled; a VTN outage only delays the next poll."""
        self._sink = sink
        if self._started == -math.inf:
            self._started = sink.now()
            self._taken = _taken_reports(sink.journal_notes(RecordKind.OPENADR3_REPORTED, TAKEN_LOOKBACK_S))
            self._held_before = _held_notes(sink.journal_notes(RecordKind.OPENADR3_HELD, TAKEN_LOOKBACK_S))
        self._wake, self._standing_wake = asyncio.Event(), asyncio.Event()
        backoff = Backoff(self._retry_max_s)
        callback = await self._start_callback()
        standing = asyncio.create_task(self._standing(sink), name="openadr3-standing")
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                loop = asyncio.get_running_loop()
                while True:
                    began = loop.time()
                    try:
                        await self._cycle(session, sink)
                        self._tell(True)
                        backoff.reset()
                        delay = next_poll_in(began, loop.time(), self.config.poll_interval_s)
                    except VtnError as err:
                        self.failed_polls += 1
                        self.subscribed = False  # a VTN back from an outage may have lost it: looked at again
                        self.ven_id = None  # ... and this VEN's object: found by name, or made again
                        self._subscribed_programs.clear()
                        self._tell(False, f"{err}; accepted events keep their windows")
                        delay = backoff.next(self.config.poll_interval_s)
                        if isinstance(err, VtnBusy):
                            delay = wait_after_busy(delay, err.retry_after_s, self._retry_max_s)
                    self.next_poll_in_s = delay
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            try:
                await cancel_all([standing])
            finally:
                if callback is not None:
                    await callback.stop()

    async def probe_registration(self) -> str | None:
        """Log in, find or create this VEN's object and read its programs, as `run` does first, and
        nothing more: no events, no reports. None when all of it worked, else why not. Commissioning
        asks it; the running gateway does it again on its own."""
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                self.tokens = TokenSource(await self._token_url(session), self.config.client_id, self._secret)
                await self._register(session)
                await self._load_programs(session)
        except VtnError as err:
            return str(err)
        if not self.programs:
            return f"VEN {self.config.ven_name!r} is registered, but the VTN shows it no program to take part in"
        return None

    def wake(self) -> None:
        """Poll now (a notification arrived, or a report fell due)."""
        if self._wake is not None:
            self._wake.set()

    async def _cycle(self, session: aiohttp.ClientSession, sink: DispatchSink) -> None:
        if self.tokens is None:
            self.tokens = TokenSource(await self._token_url(session), self.config.client_id, self._secret)
        if self.ven_id is None:
            await self._register(session)
        if not self.programs:
            await self._load_programs(session)
        if self.config.callback_listen and (not self.subscribed or time.monotonic() >= self._subscription_due):
            await self._subscribe(session)
        listing = await self._list_pages(session, "events", settled=self._settled)
        events = listing.objects
        listed = {event_id_of(e) for e in events} | listing.settled
        kept = await self._kept(session, listing, listed)
        self.polls += 1
        await self._check_programs(session, events)
        await self._take(sink, events, kept, listing.settled)
        await self._deleted_while_down(session, sink, listing, listed)
        await self._send_reports(session, sink)
        await self._hold_limit(sink)

    def _tell(self, ok: bool, cause: str = "") -> None:
        """The VTN link's state, to the gateway's link book (which logs once per outage), else to the log."""
        if self._link is not None:
            self._link.good() if ok else self._link.lost(cause)
        elif not ok and self._told_ok is not False:
            log.warning("OpenADR 3: %s; retrying with back-off", cause)
        elif ok and self._told_ok is False:
            log.info("OpenADR 3: VTN reachable again")
        self._told_ok = ok

    # ------------------------------------------------------------------ HTTP

    async def _token_url(self, session: aiohttp.ClientSession) -> str:
        """The configured token endpoint, else the one the VTN names (`GET /auth/server`), else `/auth/token`."""
        if self.config.token_url:
            return self.config.token_url
        try:
            async with session.get(f"{self.base}/auth/server", allow_redirects=False) as resp:
                body, status = await _body(resp), resp.status
                _refuse_redirect(resp, "GET /auth/server", "the token endpoint is not asked of another server")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            raise VtnError(f"cannot reach the VTN {self.base}: {_why(err)}") from None
        info = _json(body, "GET /auth/server") if status == 200 else None
        return token_endpoint(self.base, info.get("tokenURL") if isinstance(info, dict) else None)

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str, *,
                    params: dict[str, Any] | None = None, body: Any = None) -> Any:
        """One authenticated request; a 401 fetches a new token and tries once more. A fresh token
        refused too is the credential refused (TokenRefused, as from the token endpoint), not the
        request: the cycle fails and backs off, and a report waits rather than being dropped."""
        assert self.tokens is not None
        for attempt in (1, 2):
            token = await self.tokens.bearer(session)
            try:
                async with session.request(method, f"{self.base}/{path}", params=params, json=body,
                                           headers={"Authorization": f"Bearer {token}"},
                                           allow_redirects=False) as resp:  # the token stays with the VTN
                    raw, status = await _body(resp), resp.status
                    _refuse_redirect(resp, f"{method} /{path}", "the bearer token is not sent there")
                    asked_s = retry_after_s(resp.headers.get("Retry-After"), time.time())
            except aiohttp.ClientConnectorError as err:  # no connection: nothing was sent
                raise VtnError(f"cannot reach the VTN {self.base}: {_why(err)}") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
                raise VtnSilent(f"{method} /{path}: no answer from the VTN {self.base}: "
                                f"{_unanswered_why(err)}") from None
            if status == 401:
                self.tokens.drop()
                if attempt == 2:  # the credential, not this request: what was to be sent waits
                    raise TokenRefused(f"{method} /{path}: the VTN refused a fresh token (HTTP 401): "
                                       f"{_problem(raw, (token, self._secret))}")
                log.debug("OpenADR 3: %s /%s: token refused (expired?); fetching a new one", method, path)
                continue
            if status in BUSY_STATUSES:  # "not now" (too slow, too many requests, unavailable): sent again later
                later = "later" if asked_s is None else f"later (it asked for {min(asked_s, 1e9):.0f} s)"
                raise VtnBusy(f"{method} /{path}: the VTN answered HTTP {status} (busy): trying again {later}",
                              asked_s)
            if status == 403:
                raise VtnForbidden(f"{method} /{path}: the VTN answered HTTP 403: "
                                   f"{_problem(raw, (token, self._secret))}")
            if status == 404:
                raise VtnNotFound(f"{method} /{path}: the VTN answered HTTP 404: "
                                  f"{_problem(raw, (token, self._secret))}")
            if 400 <= status < 500:
                raise VtnRefused(f"{method} /{path}: the VTN answered HTTP {status}: "
                                 f"{_problem(raw, (token, self._secret))}")
            if status >= 500:
                raise VtnFailed(f"{method} /{path}: the VTN answered HTTP {status}")
            if status >= 300:
                raise VtnError(f"{method} /{path}: the VTN answered HTTP {status}")
            try:
                return _json(raw, f"{method} /{path}") if raw else None
            except VtnError as err:
                raise VtnFailed(str(err)) from None
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _list(self, session: aiohttp.ClientSession, path: str, **params: Any) -> list[Any]:
        """A whole listing, page by page (bounded): one too long for the bound is no listing (VtnError)."""
        listing = await self._list_pages(session, path, **params)
        if not listing.complete:
            raise VtnFailed(f"GET /{path} lists more than {len(listing.objects)} objects: not a listing the VEN "
                            "can hold")
        return listing.objects

    async def _list_pages(self, session: aiohttp.ClientSession, path: str, *,
                          settled: Callable[[Any], str | None] = lambda _: None, **params: Any) -> _Listing:
        """A listing, page by page: pages read apart are no snapshot (an object deleted on an earlier page
        shifts a later one past the page it would have been on), so the number of pages is returned too.
        An object `settled` names an id for is only noted present, not held (it needs nothing more);
        past `MAX_PAGES` pages of objects held, or `MAX_SCAN_PAGES` read, the listing is cut short
        (`complete` False) rather than thrown away: the VEN goes on with what it holds."""
        listing = _Listing()
        previous: list[Any] | None = None
        for page in range(MAX_SCAN_PAGES):
            got = await self._call(session, "GET", path, params={**params, "skip": page * PAGE, "limit": PAGE})
            if not isinstance(got, list):
                raise VtnFailed(f"GET /{path} did not answer a list")
            if got and all(event_id_of(item) == UNKNOWN_EVENT for item in got):
                # nothing in it an object could be answered by: a VTN answering garbage, whose listing would
                # cancel every event held
                raise VtnFailed(f"GET /{path} listed {len(got)} item(s), none an object with a usable id")
            if got == previous:  # a VTN that ignores `skip` sends its first page again: that was all of it
                return listing
            listing.pages = page + 1
            listing.take(got, settled, MAX_PAGES * PAGE)
            if len(got) != PAGE:  # the last page (or a VTN that ignores paging and sent everything)
                return listing
            if len(listing.objects) >= MAX_PAGES * PAGE:
                break
            previous = got
        listing.complete = False
        return listing

    def _settled(self, event: Any) -> str | None:
        """The id of a listed event that needs nothing more (handled at this very content and not held:
        over, refused, history, or another VEN's), so a long listing holds only the events that may matter.
        One refused for a program the VEN is not enrolled in is not settled: it names the program to look
        for again, and is answered anew once the VEN is enrolled in it."""
        event_id = event_id_of(event)
        seen = self._seen.get(event_id)
        if event_id in self._events or seen is None or seen[0] != _content_key(event):
            return None
        return None if program_id_of(event) in self._not_enrolled else event_id

    async def _kept(self, session: aiohttp.ClientSession, listing: _Listing, listed: set[str]) -> set[str]:
        """Events to hold on to though the listing does not carry them in full: the settled ones, and
        every held event a listing cut short lacks (it may lie past the cut: never cancelled on that),
        else those a listing of several pages lacks and the VTN may still have."""
        self._note_cut(listing)
        if not listing.complete:
            return listing.settled | {e for e in self._events if e not in listed}
        return listing.settled | (await self._still_there(session, listed) if listing.pages > 1 else set())

    def _note_cut(self, listing: _Listing) -> None:
        """A warning when listings begin to be cut short, a note when they are whole again: once per
        change, not every poll (an hourly program keeps a VTN's listing long for months)."""
        if listing.complete != self._listing_cut:
            return  # as the last listing was
        self._listing_cut = not listing.complete
        if listing.complete:
            log.info("OpenADR 3: the VTN's event listing is whole again")
            return
        log.warning("OpenADR 3: the VTN lists more events than the VEN reads (%d pages, %d events held); "
                    "going on with those: an event past them is not seen, and none held is cancelled "
                    "for lacking (the aggregator should delete events that are over)",
                    listing.pages, len(listing.objects))

    async def _still_there(self, session: aiohttp.ClientSession, listed: set[str]) -> set[str]:
        """The held events a listing of several pages lacks that the VTN may still have: only a 404 for
        the event itself says the VTN deleted it; the listing may have missed it in a paging race."""
        self._unlisted = {e: n for e, n in self._unlisted.items() if e not in listed and e in self._events}
        kept: set[str] = set()
        for event_id in [e for e in self._events if e not in listed]:
            try:
                await self._call(session, "GET", f"events/{event_id}")
            except VtnNotFound:
                continue  # deleted at the VTN: cancelled by _take
            except VtnRefused as err:  # not confirmed gone: kept, unless it is missing listing after listing
                misses = self._unlisted[event_id] = self._unlisted.get(event_id, 0) + 1
                if misses >= UNLISTED_GONE:
                    log.info("OpenADR 3: event %s is on no page of %d listings running and the VTN would not say "
                             "if it is gone (%s): taken as deleted", event_id, misses, err)
                    continue
                log.info("OpenADR 3: event %s is on no page of the listing; the VTN would not say if it is "
                         "gone (%s): kept until the next listing", event_id, err)
            else:
                log.info("OpenADR 3: event %s is on no page of the listing but the VTN still has it: kept",
                         event_id)
            kept.add(event_id)
        return kept

    # ------------------------------------------------------------------ registration

    async def _register(self, session: aiohttp.ClientSession) -> None:
        """This VEN's object at the VTN: the one named `ven_name`, created when there is none."""
        name = self.config.ven_name
        mine = [v for v in await self._list(session, "vens") if isinstance(v, dict) and v.get("venName") == name]
        if not mine:
            created = await self._call(session, "POST", "vens", body={"objectType": "VEN", "venName": name})
            mine = [created] if isinstance(created, dict) else []
        ven_id = mine[0].get("id") if mine else None
        if not isinstance(ven_id, str) or not ven_id:
            raise VtnError(f"the VTN gave VEN {name!r} no id")
        self.ven_id = ven_id
        listed = mine[0].get("resources")
        names = (r.get("resourceName") for r in (listed if isinstance(listed, list) else []) if isinstance(r, dict))
        self.resources = tuple(sorted({name for name in names if isinstance(name, str)}))
        log.info("OpenADR 3: registered as VEN %r (id %s) at %s", name, ven_id, self.base)

    async def _load_programs(self, session: aiohttp.ClientSession) -> None:
        programs = {p["id"]: p for p in await self._list(session, "programs")
                    if isinstance(p, dict) and isinstance(p.get("id"), str)}
        if programs.keys() != self.programs.keys():
            names = ", ".join(str(p.get("programName", pid)) for pid, p in programs.items()) or "none"
            log.info("OpenADR 3: enrolled in %d program(s): %s", len(programs), names)
        if programs.keys() - self._subscribed_programs:
            self.subscribed = False  # a new program's changes are subscribed to at the next cycle
        self.programs = programs

    async def _check_programs(self, session: aiohttp.ClientSession, events: list[Any]) -> None:
        """Programs read again when an event names one not among them (enrolled in it since?): at once
        for a program not looked for yet, else at most every `PROGRAMS_RECHECK_S` (not every poll while
        the event stays listed). One the re-read still lacks is noted, so its events are refused."""
        named = {p for e in events if (p := program_id_of(e)) is not None}
        unknown = named - self.programs.keys()
        if not unknown or (unknown <= self._not_enrolled and time.monotonic() < self._programs_due):
            self._not_enrolled &= named
            return
        self._programs_due = time.monotonic() + PROGRAMS_RECHECK_S
        await self._load_programs(session)
        enrolled_since = self._not_enrolled & self.programs.keys()
        self._not_enrolled = named - self.programs.keys()
        for event in events:  # refused for their program: answered anew now that the VEN is enrolled in it
            if program_id_of(event) in enrolled_since:
                self._take_again(event_id_of(event))

    def _take_again(self, event_id: str) -> None:
        """The next listing takes the event as if changed (a higher revision), though its content is not."""
        if (seen := self._seen.get(event_id)) is not None:
            self._seen[event_id] = ("", seen[1])  # no content's key is empty

    async def _subscribe(self, session: aiohttp.ClientSession) -> None:
        """Ask the VTN to post event changes to the gateway, one subscription per program enrolled in
        (OpenADR 3.0.1 names the program of each), unless it holds it already (a VTN that restarted
        without it, or lost it, is asked again: after an outage, and every `SUBSCRIPTION_CHECK_S`).
        A VTN without subscriptions is polled only."""
        self._subscription_due = time.monotonic() + SUBSCRIPTION_CHECK_S
        url = self.config.callback_url or f"http://{self.config.callback_listen}{NOTIFY_PATH}"
        operations = [{"objects": ["EVENT", "PROGRAM"], "operations": list(SUBSCRIBED_OPERATIONS),
                       "callbackUrl": url, "bearerToken": self._callback_token}]
        try:
            held = [sub for sub in await self._list(session, "subscriptions", clientName=self.config.ven_name)
                    if isinstance(sub, dict)]
            self._subscribed_programs = {program_id for sub in held if sub.get("objectOperations") == operations
                                         and (program_id := program_id_of(sub)) is not None}
            await self._unsubscribe_stale(session, [sub for sub in held if sub.get("objectOperations") != operations])
        except VtnRefused:  # a VTN that cannot list them: what this VEN subscribed to, not looked at again
            self._subscription_due = math.inf
        try:
            for program_id in sorted(self.programs.keys() - self._subscribed_programs):
                await self._call(session, "POST", "subscriptions", body={
                    "objectType": "SUBSCRIPTION", "clientName": self.config.ven_name, "programID": program_id,
                    "objectOperations": operations})
                self._subscribed_programs.add(program_id)
                log.info("OpenADR 3: subscribed to the changes of program %s at %s", program_id, url)
        except VtnRefused as err:
            log.info("OpenADR 3: the VTN takes no subscription (%s): polling every %g s only",
                     err, self.config.poll_interval_s)
        self.subscribed = True

    async def _unsubscribe_stale(self, session: aiohttp.ClientSession, stale: list[dict[str, Any]]) -> None:
        """This VEN's subscriptions from an earlier run (another callback token or address): each would
        notify an endpoint that refuses it, for as long as the VTN keeps it. A VTN that will not delete
        one keeps it; nothing else depends on it."""
        for sub in stale:
            if not (isinstance(sub.get("id"), str) and OBJECT_ID.fullmatch(sub["id"])):
                continue
            try:
                await self._call(session, "DELETE", f"subscriptions/{sub['id']}")
                log.info("OpenADR 3: removed subscription %s of an earlier run", sub["id"])
            except VtnRefused as err:
                log.info("OpenADR 3: the VTN keeps subscription %s of an earlier run (%s)", sub["id"], err)

    async def _start_callback(self) -> HttpListener | None:
        """The gateway's endpoint for the VTN's notifications: any valid one wakes the poller."""
        if not self.config.callback_listen:
            return None
        host, port = parse_host_port(self.config.callback_listen, "dispatch.openadr3.callback_listen")
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post(NOTIFY_PATH, self._on_notification)
        listener = HttpListener(f"dispatch.openadr3.callback_listen: cannot listen on {self.config.callback_listen}")
        await listener.start(app, lambda runner: web.TCPSite(runner, host, port))
        return listener

    async def _on_notification(self, request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                   f"Bearer {self._callback_token}".encode()):
            return web.json_response({"title": "Unauthorized", "status": 401}, status=401)
        try:
            note = await body_of(request.json())
        except (ValueError, UnicodeDecodeError, RecursionError, BodyUnread) as err:
            detail = str(err) if isinstance(err, BodyUnread) else "the notification is not JSON the VEN can read"
            return web.json_response({"title": "Bad Request", "status": 400, "detail": detail}, status=400)
        if not (isinstance(note, dict) and isinstance(note.get("objectType"), str)
                and isinstance(note.get("operation"), str) and isinstance(note.get("object"), dict)):
            return web.json_response({"title": "Bad Request", "status": 400,
                                      "detail": "a notification has objectType, operation and object"}, status=400)
        if note["objectType"] == "PROGRAM":
            self.programs = {}  # reloaded on the poll this wakes
        self.wake()
        return web.Response(status=200)

    # ------------------------------------------------------------------ events

    async def _take(self, sink: DispatchSink, events: list[Any],
                    kept: set[str] | frozenset[str] = frozenset(),
                    settled: set[str] | frozenset[str] = frozenset()) -> None:
        """A complete listing: missing events cancelled first (so what they held is free for new
        ones), then new and changed events to the core. `kept`: events the listing missed that the VTN
        did not confirm gone (a paging race), neither cancelled nor forgotten. `settled`: events the
        listing noted by id only (handled at that content): a second object under one of those ids is
        a duplicate as much as one under a held id, else the two copies would take turns every poll."""
        present = {event_id_of(e) for e in events} | kept
        now = sink.now()
        self._lacked = {e: u for e, u in self._lacked.items() if u.until > now}
        for event_id in present & self._tails.keys():  # listed again: held again, a revision as any other
            self._events[event_id] = self._tails.pop(event_id)
        for event_id in [e for e in self._events if e not in present]:
            tracked = self._events.pop(event_id)
            if tracked.plan.scheduled_end <= now:  # a VTN's clean-up: no cancellation of a randomised tail
                self._tails[event_id] = tracked
                continue
            self._note_lacked(tracked, now)
            self._report_begun(sink, tracked)
            self._forget(_asked(tracked.plan))
            await self._withdraw(sink, tracked, "cancelled: the VTN no longer lists the event")
            self._record(EventOutcome(event_id, tracked.plan.revision, detail="cancelled at the VTN"))
        history = self.history_passed
        for event_id, (key, event) in self._one_per_id(events, settled).items():
            present.add(event_id)
            seen = self._seen.get(event_id)
            if seen is not None and seen[0] == key:
                continue  # handled already (held, refused, or over)
            revision = self._next_revision(event_id)
            self._gave(event_id, revision)
            try:
                await self._on_event(sink, event, revision)
            except Exception:  # noqa: BLE001 - the core failing on one event must not cost the others
                log.exception("OpenADR 3: the core failed on event %s; it is taken again on the next poll", event_id)
                continue
            self._seen[event_id] = (key, revision)
        for event_id in [e for e in self._seen if e not in present]:
            del self._seen[event_id]  # gone from the VTN: listed again, the next revision (`_next_revision`)
        self._not_addressed &= present
        self._duplicated &= present
        if passed := self.history_passed - history:  # seen now, so once per event: one line, not one each
            log.info("OpenADR 3: %d event(s) listed that ended before the VEN started: passed over, not answered",
                     passed)

    def _note_lacked(self, tracked: _Tracked, now: float) -> None:
        """Keep what is reported of an event a listing lacks (`_Lacked`), before it is reported and forgotten."""
        plan = tracked.plan
        if plan.scheduled_end <= now or len(self._lacked) >= MAX_EVENTS:
            return
        running = [w for w in plan.intervals if w.start < now < w.end]
        self._lacked[plan.event_id] = _Lacked(
            frozenset(w.interval_id for w in plan.intervals if w.end <= now),
            {w.interval_id: _unmetered_wh(tracked, w) for w in running},
            {i: self._metered[i] for w in running for i in _served_ids(plan, w) if i in self._metered},
            plan.scheduled_end)

    def _one_per_id(self, events: list[Any], settled: set[str] | frozenset[str]) -> dict[str, tuple[str, Any]]:
        """Each event id listed, in listing order, with its content's key and the one object answered for it.
        Of two objects under one id the one handled already stands (else the first listed), whatever the
        order a listing gives them: taking the first listed each time, the copies took turns as each
        other's revision when a VTN swapped them, and the inverter swung between their powers every poll."""
        chosen: dict[str, tuple[str, Any]] = {}
        for event in events:
            key = _content_key(event)
            event_id = event_id_of(event)
            if event_id == UNKNOWN_EVENT:  # refused once per content, not once per poll
                event_id = f"{UNKNOWN_EVENT}-{key[:16]}"
            if event_id in settled or event_id in chosen:
                self._warn_duplicate(event_id)
                seen = self._seen.get(event_id)
                if event_id in chosen and seen is not None and seen[0] == key:
                    chosen[event_id] = (key, event)
                continue
            chosen[event_id] = (key, event)
        return chosen

    def _next_revision(self, event_id: str) -> int:
        """One more than the highest revision the core was given under `event_id`: its own, a re-ask's, or
        one a failure cut short; so also for an id that left the listings and is back (the same event, or
        a new one under its id). At a lower or equal one, the core refused it for good as a duplicate of
        its own ("id already used with other content") and the inverter stayed at 0 W."""
        return self._given.get(event_id, -1) + 1

    def _gave(self, event_id: str, revision: int) -> None:
        """Note a revision given to the core under `event_id` (before it is given: one the core failed on
        may be held all the same), for as many ids as the core remembers ended requests, twice over."""
        self._given[event_id] = max(revision, self._given.pop(event_id, -1))  # moved to the newest end
        while len(self._given) > GIVEN_MEMORY:
            del self._given[next(iter(self._given))]

    def _warn_duplicate(self, event_id: str) -> None:
        """One warning per duplicated id while it stays listed (not one per poll): the aggregator's
        VTN lists two objects under one event id, and only one is answered."""
        if event_id not in self._duplicated:
            self._duplicated.add(event_id)
            log.warning("OpenADR 3: the VTN lists two objects under event id %s: one is answered (the one "
                        "answered already, else the first listed), the other ignored", event_id)

    def _translator(self, event: Any, revision: int, program: Mapping[str, Any] | None,
                    now: float) -> Callable[..., EventPlan | DispatchAnswer | NotAddressed | Past]:
        """`translate_event` for `event` as this VEN reads it now; what is left to give is `history_before`."""
        try:
            rating = float(self._rating())
        except Exception as err:  # noqa: BLE001 - a broken rating source must not cost the VTN an answer
            log.error("OpenADR 3: rating unavailable: %s", err)
            rating = math.nan
        return partial(translate_event, event, revision=revision, program=program, rating_w=rating,
                       levels_pct=self._levels, to_gateway_time=self._to_gateway_time, received_at=now,
                       source=self._source, currency=self._currency, ven_name=self.config.ven_name,
                       resources=self.resources)

    async def _on_event(self, sink: DispatchSink, event: Any, revision: int) -> None:
        program = self.programs.get(program_id_of(event) or "")
        tracked = self._events.get(event_id_of(event))
        # Only an event not held can be history: one held that a revision ends is dropped as ever (below).
        translate = self._translator(event, revision, program, sink.now())
        plan = translate(history_before=self._started if tracked is None else -math.inf)
        if isinstance(plan, NotAddressed):
            await self._not_for_this_ven(sink, plan, revision)
            return
        self._not_addressed.discard(plan.request_id if isinstance(plan, DispatchAnswer) else plan.event_id)
        if isinstance(plan, Past):  # over before the VEN started: marked seen by `_take`, summed up there
            self.history_passed += 1
            self._report_missed(sink, plan)
            return
        if isinstance(plan, DispatchAnswer):
            if tracked is not None:
                await self._drop(sink, plan.request_id, "the event's new revision is refused")
            self._record(EventOutcome(plan.request_id, revision, (plan,), _describe(plan)))
            if (program_id := program_id_of(event)) is not None and plan.request_id != UNKNOWN_EVENT:
                self._queue_answer(program_id, plan.request_id, revision, (), {plan.request_id: plan})
            if plan.reason is ReasonCode.EXPIRED and tracked is None:
                # over between this start and the first listing that held it (the VTN out of reach after a
                # power cut): an earlier run may have served it, as for one over before the start
                if isinstance(past := translate(history_before=math.inf), Past):
                    self._report_missed(sink, past)
            return
        requests = plan.requests
        carried_wh: dict[str, tuple[int, float]] = {}
        dropped: set[str] = set()
        ended: tuple[str, ...] = ()
        if tracked is not None:
            dropped = _asked(tracked.plan) - _asked(plan)
            ended = ended_by_revision(tracked.requests, plan.request_ids, requests, sink.now())
            carried_wh = self._carry(tracked, plan)
            self._forget(dropped)
            # after the VEN's own re-asks the core may know a request at a higher revision than this
            requests = tuple(replace(r, revision=max(r.revision, tracked.requests[r.id].revision + 1))
                             if r.id in tracked.requests else r for r in requests)
        if plan.program_id in self._not_enrolled:
            if tracked is not None:
                await self._drop(sink, plan.event_id, "the event's new revision names a program not enrolled in")
            self._refuse_whole(plan, revision, sink.now(),
                               f"program {plan.program_id} is not one this VEN is enrolled in")
            return
        if len(self._events) >= MAX_EVENTS and tracked is None:
            self._refuse_whole(plan, revision, sink.now(), f"the gateway holds {MAX_EVENTS} OpenADR 3 events already")
            return
        lacked = self._lacked.pop(plan.event_id, None) if tracked is None else None
        if lacked is not None:
            self._metered.update(lacked.metered)
        answers = {}
        for request in requests:
            self._metered.setdefault(request.id, 0.0)
            answers[request.id] = await self._answer(sink, request)
        price_answers: dict[str, DispatchAnswer] = {}
        for price in plan.prices:
            self._metered.setdefault(price.id, 0.0)  # the core serves a price it discharges for by its id
            answer = await sink.submit(price)
            if isinstance(answer, DispatchAnswer):
                price_answers[price.id] = answer
        # Only now, so that an interval the revision moves to another id (EVENT to EVENT#0) is served on
        # under the new one, the newest in force, without falling to 0 W and ramping up again.
        await self._cancel(sink, tuple(sorted(dropped)), "dropped by the event's new revision")
        await self._cancel(sink, ended, "ended by the event's new revision")
        if tracked is not None:
            reported, before_wh = tracked.reported, tracked.before_wh
        else:
            reported = self._before_start(plan) | (lacked.finished if lacked else frozenset())
            before_wh = {**self._journaled(sink, plan, reported), **(lacked.before_wh if lacked else {})}
        self._events[plan.event_id] = _Tracked(plan, {r.id: r for r in requests}, answers, reported=reported,
                                               carried_wh=carried_wh, before_wh=before_wh)
        if plan.reports:  # so a run after a restart reports it even if the VTN deleted it meanwhile
            self._note_held(sink, event, program)
        everything = tuple(answers.values()) + tuple(price_answers.values())
        detail = "; ".join(_describe(a) for a in everything) or ", ".join(
            filter(None, (f"{len(plan.prices)} price(s)" if plan.prices else "",
                          f"{len(plan.limits)} export limit(s)" if plan.limits else "")))
        self._record(EventOutcome(plan.event_id, revision, everything, detail, plan.prices))
        self._queue_answer(plan.program_id, plan.event_id, revision, plan.intervals,
                           {**answers, **price_answers})
        await self._hold_limit(sink)

    def _refuse_whole(self, plan: EventPlan, revision: int, now: float, detail: str) -> None:
        """An event the VEN cannot take is still answered, each request and price refused with why:
        the contract gives every request one answer, and the aggregator can ask again later."""
        ids = [r.id for r in plan.requests] + [p.id for p in plan.prices] or [plan.event_id]
        answers = {i: DispatchAnswer.refused(i, now, ReasonCode.INVALID, detail) for i in ids}
        self._record(EventOutcome(plan.event_id, revision, tuple(answers.values()), detail, plan.prices))
        self._queue_answer(plan.program_id, plan.event_id, revision, plan.intervals, answers)

    def _carry(self, tracked: _Tracked, plan: EventPlan) -> dict[str, tuple[int, float]]:
        """The energy served under ids a revision no longer asks for stays its interval's (an event of
        one interval, `EVENT`, given a second becomes `EVENT#0`, `EVENT#1`; a price of another kind
        takes another id). An id asked for again takes its energy back: the core carries its account on."""
        carried = dict(tracked.carried_wh)
        asked = _asked(plan)
        for window in tracked.plan.intervals:
            for served in _served_ids(tracked.plan, window):
                if served not in asked and served in self._metered:
                    carried[served] = (window.interval_id, self._metered[served])
        for served in asked & carried.keys():
            self._metered[served] = carried.pop(served)[1]
        return carried

    def _forget(self, request_ids: Iterable[str]) -> None:
        """The requests' delivered energy is no longer reported: the event ended or took them back."""
        for request_id in request_ids:
            self._metered.pop(request_id, None)

    async def _answer(self, sink: DispatchSink, request: DispatchRequest) -> DispatchAnswer:
        answer = await sink.submit(request)
        if answer is None:  # the contract says every request is answered; treat silence as a no
            return DispatchAnswer.refused(request.id, sink.now(), None, "no answer from the core")
        return answer

    async def _not_for_this_ven(self, sink: DispatchSink, plan: NotAddressed, revision: int) -> None:
        """Another VEN's event: not answered, logged once per event id; one this VEN held (a revision
        that retargets it) is taken back as a deleted one is."""
        if plan.event_id in self._events:
            await self._drop(sink, plan.event_id, "the event's new revision is addressed to other VENs")
            self._record(EventOutcome(plan.event_id, revision, detail="retargeted to other VENs at the VTN"))
        if plan.event_id not in self._not_addressed:
            self._not_addressed.add(plan.event_id)
            names = ", ".join(repr(n) for n in plan.names[:5]) + (", ..." if len(plan.names) > 5 else "")
            log.info("OpenADR 3: event %s is addressed to %s, not %r: ignored", plan.event_id,
                     names or "(none)", self.config.ven_name)

    async def _drop(self, sink: DispatchSink, event_id: str, reason: str) -> None:
        """Stop holding an event: what it delivered so far is still reported, as for a deleted event."""
        tracked = self._events.pop(event_id)
        self._report_begun(sink, tracked)
        self._forget(_asked(tracked.plan))
        await self._withdraw(sink, tracked, reason)

    async def _withdraw(self, sink: DispatchSink, tracked: _Tracked, reason: str) -> None:
        """Take back what an event asked for: its requests and prices not yet over, its export limits.
        A price the core is discharging for stops with it: the VTN no longer publishes it."""
        now = sink.now()
        live = [r.id for r in tracked.requests.values() if r.end > now] + \
            [p.id for p in tracked.plan.prices if p.end > now]
        await self._cancel(sink, tuple(live), reason)
        await self._hold_limit(sink)

    async def _cancel(self, sink: DispatchSink, request_ids: tuple[str, ...], reason: str) -> None:
        for request_id in request_ids:
            await sink.submit(DispatchCancel(id=request_id, source=self._source, received_at=sink.now(),
                                             reason=reason))

    # ------------------------------------------------------------------ export limits, standing settings

    def limit_in_force(self, now: float) -> float | None:
        """The lowest export limit (W) of every held event whose interval runs now; None: no limit."""
        limits = [w.limit_w for t in self._events.values() for w in t.plan.limits if w.start <= now < w.end]
        return min(limits) if limits else None

    async def _hold_limit(self, sink: DispatchSink) -> None:
        """The core's site limit for this source follows the export limit in force (set, changed, lifted)."""
        wanted = self.limit_in_force(sink.now())
        if wanted == self._limit_applied:
            return
        await sink.submit(SiteLimit(received_at=sink.now(), source=self._source, limit_w=wanted,
                                   export_only=True))
        self._limit_applied = wanted
        log.info("OpenADR 3: export limit %s", "lifted" if wanted is None else f"{wanted:.0f} W")

    def notice_step(self, result: StepResult) -> None:
        """A gateway observer: meter this VEN's requests, and look again at once when something
        that admits dispatch changed, an export limit's interval began or ended, or a report fell due.
        Every one of them is metered, not only the one served: the step that books the last reading of
        a request is often the one that stops serving it (the floor reached, the window closed)."""
        c = result.controller
        for booked in c.book.entries:  # a charge's energy is negative: the larger in size is kept
            metered = self._metered.get(request_id := booked.request.id)
            if metered is not None and abs(booked.meter_wh) > abs(metered):
                self._metered[request_id] = booked.meter_wh
        if self._standing_wake is None or not (self._events or self._tails or self._limit_applied is not None):
            return
        now = self._sink.now() if self._sink is not None else 0.0
        if self._watch.changed(result) or self.limit_in_force(now) != self._limit_applied:
            self.looks.ask()
            self._standing_wake.set()
        if now >= self.next_report_at:  # once: the poll it wakes works the next one out (`_queue_cadence`);
            self.next_report_at = math.inf  # woken at every step, a VTN that was down drew 15 polls a second
            self.wake()

    async def _standing(self, sink: DispatchSink) -> None:
        assert self._standing_wake is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._standing_wake.wait(), STANDING_CHECK_S)
            self._standing_wake.clear()
            covered = self.looks.begin()
            try:
                await self._hold_limit(sink)
                if self._events:
                    await self._reask(sink)
            except Exception:  # noqa: BLE001 - the next check tries again; the VTN link is unaffected
                log.exception("OpenADR 3: asking the core again failed")
            finally:
                self.looks.done(covered)

    async def _reask(self, sink: DispatchSink) -> None:
        """Ask again for requests the core would now serve better (a refusal or cap that no longer holds)."""
        better = sink.telemetry().improvable
        for tracked in list(self._events.values()):
            due = [r for rid, r in tracked.requests.items() if rid in better]
            for request in due:
                again = replace(request, revision=request.revision + 1, received_at=sink.now())
                self._gave(tracked.plan.event_id, again.revision)
                tracked.requests[again.id], tracked.answers[again.id] = again, await self._answer(sink, again)
                self.reasks += 1
            if due:
                answers = {r.id: tracked.answers[r.id] for r in due}
                self._record(EventOutcome(tracked.plan.event_id, tracked.plan.revision, tuple(answers.values()),
                                          "asked again: " + "; ".join(_describe(a) for a in answers.values())))
                self._queue_answer(tracked.plan.program_id, tracked.plan.event_id, tracked.plan.revision,
                                   tracked.plan.intervals, answers)
                self.wake()

    # ------------------------------------------------------------------ reports

    def _queue_answer(self, program_id: str, event_id: str, revision: int, windows: tuple[IntervalWindow, ...],
                      answers: dict[str, DispatchAnswer]) -> None:
        """The answer to one revision: per interval that carries a request, or for the event as a whole."""
        intervals = []
        for window in windows:
            answer = answers.get(window.request_id or "") or _price_answer(answers, event_id, window.interval_id)
            if answer is not None:
                intervals.append(_interval(window, _answer_payloads(answer)))
        if not intervals and answers:  # refused whole (a bad event), or nothing per interval
            answer = next(iter(answers.values()))
            intervals.append({"id": 0, "payloads": _answer_payloads(answer)})
        if intervals:
            self._queue(program_id, event_id, f"{event_id} answer r{revision}", intervals,
                        (ANSWER, ANSWER_REASON, ANSWER_CAP))

    def _queue(self, program_id: str, event_id: str, name: str, intervals: list[dict[str, Any]],
               types: Sequence[str]) -> None:
        report = {"objectType": "REPORT", "programID": program_id, "eventID": event_id,
                  "clientName": self.config.ven_name, "reportName": name,
                  "payloadDescriptors": [_descriptor(t) for t in types],
                  "resources": [{"resourceName": self.config.ven_name, "intervals": intervals}]}
        if len(self._pending) >= MAX_PENDING_REPORTS:
            dropped = self._pending.popleft()
            log.warning("OpenADR 3: report %r dropped: %d reports wait for the VTN already",
                        dropped.report["reportName"], MAX_PENDING_REPORTS)
        self._pending.append(_PendingReport(report))

    def _queue_cadence(self, sink: DispatchSink) -> None:
        """The reports an event's descriptors ask for whose intervals have ended; drop events that are over."""
        now = sink.now()
        self.next_report_at = math.inf
        for held in (self._events, self._tails):
            for event_id, tracked in list(held.items()):
                plan = tracked.plan
                every = min((a.every for a in plan.reports if a.every > 0), default=0) if plan.reports else None
                if every is not None:
                    self._report_due(sink, tracked, max(every or len(plan.intervals), 1), now)
                if all(w.end <= now for w in plan.intervals):
                    del held[event_id]
                    self._forget(_asked(plan))

    def _report_due(self, sink: DispatchSink, tracked: _Tracked, step: int, now: float) -> None:
        """Report the ended intervals not reported yet, `step` at a time (the rest once all have ended),
        and note when the next report falls due: when `step` more unreported intervals have ended."""
        unreported = tracked.unreported()
        ended = [w for w in unreported if w.end <= now]
        all_ended = len(ended) == len(unreported)
        # Overdue (the VTN was out of reach, or the gateway down): in as few larger reports as the queue has
        # room for, late as they are, not a report per `step` that would crowd the oldest out before one was sent.
        size = max(step, math.ceil(len(ended) / max(1, MAX_PENDING_REPORTS - len(self._pending))))
        while len(ended) >= size or (all_ended and ended):
            batch, ended = ended[:size], ended[size:]
            self._queue_usage(sink, tracked, batch)
            tracked.reported.update(w.interval_id for w in batch)
        waiting = tracked.unreported()
        if waiting:
            self.next_report_at = min(self.next_report_at, waiting[min(step, len(waiting)) - 1].end)

    def _before_start(self, plan: EventPlan) -> set[int]:
        """An event first held: its intervals that ended before this VEN started and whose energy report
        the journal says the VTN took count as reported. The others (a report waiting for the VTN when
        the gateway stopped: the queue is in memory only) are reported now, with the journal's energy."""
        taken = self._taken.get(plan.event_id, set())
        return {w.interval_id for w in plan.intervals if w.end <= self._started and w.interval_id in taken}

    def _report_missed(self, sink: DispatchSink, past: Past, why: str = "ended while the gateway was down") -> None:
        """An event that ended while the gateway was down (a power cut mid-event): the run that served it
        never sent its last energy reports. When the journal credits its unreported intervals with energy,
        every one of them begun is reported once, with the journal's figures, as for an event deleted
        mid-event. Only events over within `TAKEN_LOOKBACK_S`: the notes of reports taken reach no further."""
        plan = past.plan
        if plan is None or not plan.reports or past.ended_at < self._started - TAKEN_LOOKBACK_S \
                or plan.event_id in self._missed_sent:  # listed anew (changed, back after a gap): sent already
            return
        reported = self._before_start(plan)
        if journaled := self._journaled(sink, plan, reported):
            log.info("OpenADR 3: event %s %s: its energy is reported from the journal", plan.event_id, why)
            self._report_begun(sink, _Tracked(plan, reported=reported, before_wh=journaled))
            self._missed_sent.add(plan.event_id)

    def _note_held(self, sink: DispatchSink, event: Any, program: Mapping[str, Any] | None) -> None:
        """Journal an event taken up, with its program, as the VTN listed them: as JSON text, so nothing in
        them (a field nested deeper than the journal's encoder goes) can cost the journal a write."""
        try:
            text = json.dumps({"event": event, "program": program}, separators=(",", ":"))
        except (ValueError, TypeError, RecursionError):
            text = ""
        if not text or len(text) > HELD_NOTE_MAX:
            log.warning("OpenADR 3: event %s is not noted in the journal (%s): if the VTN deletes it while the "
                        "gateway is down, its energy is not reported after the restart", event_id_of(event),
                        f"{len(text)} bytes as JSON" if text else "not JSON the VEN can write")
            return
        sink.note(RecordKind.OPENADR3_HELD, {"event_id": event_id_of(event), "listed": text})

    async def _deleted_while_down(self, session: aiohttp.ClientSession, sink: DispatchSink, listing: _Listing,
                                  listed: set[str]) -> None:
        """Events a run before this one held (its notes in the journal) that the VTN deleted while the gateway
        was down: what the journal credits them with is reported once, as for an event over before the start
        (`_report_missed`). Only a whole listing can lack one; one of several pages is asked for it by id, as
        for a held event (`_still_there`): a 404 says deleted, a VTN that will not say is asked again until
        `UNLISTED_GONE` listings running lacked it. Each is settled once, then forgotten."""
        if not self._held_before or not listing.complete:
            return
        for event_id in [e for e in self._held_before if e in listed or e in self._events]:
            del self._held_before[event_id]  # the VTN has it: taken up again, or history, as any event listed
            self._unlisted_before.pop(event_id, None)
        for event_id in list(self._held_before):
            if listing.pages > 1:
                try:
                    await self._call(session, "GET", f"events/{event_id}")
                except VtnNotFound:
                    pass
                except VtnRefused:
                    misses = self._unlisted_before[event_id] = self._unlisted_before.get(event_id, 0) + 1
                    if misses < UNLISTED_GONE:
                        continue
                else:  # a paging race: the next listings carry it
                    del self._held_before[event_id]
                    self._unlisted_before.pop(event_id, None)
                    continue
            event, program = self._held_before.pop(event_id)
            self._unlisted_before.pop(event_id, None)
            past = self._translator(event, 0, program, sink.now())(history_before=math.inf)
            if isinstance(past, Past):
                self._report_missed(sink, past, "held before the gateway stopped, is no longer at the VTN")

    def _journaled(self, sink: DispatchSink, plan: EventPlan, reported: set[int]) -> dict[int, float]:
        """An event first held: the energy the journal credits its intervals begun before this VEN started
        and not reported with (an earlier run's account, and the meter's gap a crash left, billed at the
        start). The core meters them again from 0 in this run, so their reports add this, to agree with the
        statement. Only those still to report are read: each is a pass over the journal's live segment.

        A revision made while the gateway was down may have moved an interval to another request id (an
        event of one interval, `EVENT`, given a second becomes `EVENT#0`, `EVENT#1`, and back): the earlier
        run's energy is journaled under the old id, so each interval also reads the ids another revision
        could have given it, `EVENT#N` (N its interval id) and, for the first interval asking power (else
        the first interval), the bare `EVENT` (an event of one interval: the journal does not say where its
        window was, and a revision adding or dropping intervals keeps the first one asking power). An id
        the plan asks for under another interval is not read again for this one: nothing counts twice."""
        found: dict[int, float] = {}
        asked = set(plan.request_ids)
        powered = [w for w in plan.intervals if w.request_id is not None] or list(plan.intervals)
        bare_owner = powered[0].interval_id if powered else None
        for window in plan.intervals:
            if window.start < self._started and window.interval_id not in reported:
                own = _served_ids(plan, window)
                others = [f"{plan.event_id}#{window.interval_id}"]
                if window.interval_id == bare_owner:
                    others.append(plan.event_id)
                ids = list(own) + [i for i in others if i not in own and i not in asked]
                wh = sum(sink.journaled_wh(served) for served in dict.fromkeys(ids))
                if wh:
                    found[window.interval_id] = wh
        return found

    def _queue_usage(self, sink: DispatchSink, tracked: _Tracked, windows: Sequence[IntervalWindow]) -> None:
        plan = tracked.plan
        t = sink.telemetry()
        intervals = []
        for n, window in enumerate(windows):
            delivered = self._delivered_wh(tracked, window)
            payloads: list[dict[str, Any]] = [{"type": DELIVERED_ENERGY, "values": [round(delivered, 3)]}]
            if n == len(windows) - 1:  # the state as of the report, on its last interval
                if t.soc_now is not None:  # unknown (no fresh BMS data) is left out
                    payloads.append({"type": CHARGE_LEVEL, "values": [round(t.soc_now, 2)]})
                if t.ratings is not None:
                    payloads.append({"type": USABLE_CAPACITY, "values": [round(t.ratings.wh_rtg, 1)]})
                if t.available_wh_now is not None:
                    payloads.append({"type": ABOVE_FLOOR, "values": [round(t.available_wh_now, 1)]})
            intervals.append(_interval(window, payloads))
        first, last = windows[0].interval_id, windows[-1].interval_id
        self._queue(plan.program_id, plan.event_id, f"{plan.event_id} intervals {first}-{last}", intervals,
                    (DELIVERED_ENERGY, CHARGE_LEVEL, USABLE_CAPACITY, ABOVE_FLOOR))

    def _delivered_wh(self, tracked: _Tracked, window: IntervalWindow) -> float:
        """The energy delivered in an interval: what no meter of the core holds, and what the core metered
        under the ids serving it now."""
        return _unmetered_wh(tracked, window) + sum(self._metered.get(served, 0.0)
                                                    for served in _served_ids(tracked.plan, window))

    def _report_begun(self, sink: DispatchSink, tracked: _Tracked) -> None:
        """An event cancelled at the VTN still has its usage reported, as its descriptors asked: every
        interval begun and not reported yet, with the energy delivered in it (the aggregator settles
        on it, cancelled or not)."""
        now = sink.now()
        unreported = tracked.unreported()
        begun = [w for w in unreported if w.start < now]
        if tracked.plan.reports and begun:
            self._queue_usage(sink, tracked, begun)
        tracked.reported.update(w.interval_id for w in unreported)  # no longer held: nothing more is due

    async def _send_reports(self, session: aiohttp.ClientSession, sink: DispatchSink) -> None:
        """Each report waiting, once, oldest first. One the VTN fails goes to the back, so it holds back
        no other and fails no poll; an unreachable or busy VTN (VtnError) stops the batch for the back-off.
        One sent before without an answer is looked for first: the VTN that stored it and answered too
        late would otherwise hold its energy twice, and an aggregator adding up reports bill it twice."""
        self._queue_cadence(sink)
        for _ in range(len(self._pending)):
            pending = self._pending[0]
            refused = None
            try:
                if not (pending.maybe_taken and await self._vtn_holds(session, pending.report)):
                    await self._call(session, "POST", "reports", body=pending.report)
            except (VtnFailed, VtnForbidden) as err:
                self._pending.popleft()
                self._failed(pending, err, sink.now())
                continue
            except VtnRefused as err:  # the VTN will never take this one: do not block the others
                log.warning("OpenADR 3: report %r refused: %s", pending.report["reportName"], err)
                refused = str(err)
            except VtnSilent:
                pending.maybe_taken = True
                raise
            self._pending.popleft()
            _note_taken(sink, pending.report, refused)

    async def _vtn_holds(self, session: aiohttp.ClientSession, report: dict[str, Any]) -> bool:
        """Whether the VTN lists `report` (its name, resources and values) among this VEN's for its event. A
        VTN that will not list reports (4xx), fails the listing (5xx) or lists what the VEN cannot read cannot
        say: the report is sent again, a warning logged. Unreachable or busy, the batch stops as for a POST."""
        try:
            held = await self._list(session, "reports", programID=report["programID"], eventID=report["eventID"],
                                    clientName=report["clientName"])
        except (VtnRefused, VtnFailed) as err:
            log.warning("OpenADR 3: report %r went without an answer, and the VTN cannot say whether it took it "
                        "(%s): sent again, so the VTN may hold it twice", report["reportName"], err)
            return False
        content = _report_content(report)
        return any(isinstance(r, dict) and _report_content(r) == content for r in held)

    def _failed(self, pending: _PendingReport, err: VtnFailed | VtnForbidden, now: float) -> None:
        """A report the VTN failed or forbade: sent again after the others, given up once it has failed it
        for `MAX_REPORT_FAILING_S`."""
        name = pending.report["reportName"]
        if pending.failing_since is None:
            pending.failing_since = now
        elif now - pending.failing_since >= MAX_REPORT_FAILING_S:
            log.warning("OpenADR 3: report %r dropped: the VTN has failed it for %.0f h (%s)", name,
                        (now - pending.failing_since) / 3600, err)
            return
        log.info("OpenADR 3: report %r failed at the VTN (%s): sent again after the others", name, err)
        self._pending.append(pending)

    @property
    def pending_reports(self) -> int:
        """Reports made and not yet taken by the VTN."""
        return len(self._pending)

    def _record(self, outcome: EventOutcome) -> None:
        self.outcomes.append(outcome)
        # A request refused is the aggregator's trouble; a price not followed is the owner's mode at work.
        prices = {p.id for p in outcome.prices}
        to_requests = [a for a in outcome.answers if a.request_id not in prices]
        refused = to_requests and all(a.verdict is Verdict.REJECTED for a in to_requests)
        log.log(logging.WARNING if refused else logging.INFO, "OpenADR 3 event %s rev %d: %s",
                outcome.event_id, outcome.revision, outcome.detail)


def _note_taken(sink: DispatchSink, report: dict[str, Any], refused: str | None = None) -> None:
    """Journal that the VTN is done with an energy report (taken, or refused for good, with the VTN's words:
    the energy it settles on is then missing there, and the journal says so), so a run after a restart
    neither sends it again nor takes it as lost; answers are not noted (each run answers anew)."""
    if not any(d["payloadType"] == DELIVERED_ENERGY for d in report["payloadDescriptors"]):
        return
    intervals = [i["id"] for r in report["resources"] for i in r["intervals"]]
    note: dict[str, Any] = {"event_id": report["eventID"], "intervals": intervals}
    if refused is not None:
        note["refused"] = refused
    sink.note(RecordKind.OPENADR3_REPORTED, note)


def _held_notes(notes: Iterable[dict[str, Any]]) -> dict[str, tuple[Any, Any]]:
    """Event id -> (event, program) of the newest `OPENADR3_HELD` note of it (one not of that form skipped)."""
    held: dict[str, tuple[Any, Any]] = {}
    for note in notes:
        try:
            listed = json.loads(note["listed"])
            event, program = listed["event"], listed["program"]
        except (KeyError, TypeError, ValueError, RecursionError):
            continue
        if event_id_of(event) == note.get("event_id") != UNKNOWN_EVENT:
            held.pop(event_id := event_id_of(event), None)  # the newest last
            held[event_id] = (event, program)
    return held


def _unmetered_wh(tracked: _Tracked, window: IntervalWindow) -> float:
    """An interval's energy no meter of the core holds now: earlier runs' (`before_wh`), and what was served
    under ids a revision dropped (`carried_wh`)."""
    carried = sum(wh for interval_id, wh in tracked.carried_wh.values() if interval_id == window.interval_id)
    return tracked.before_wh.get(window.interval_id, 0.0) + carried


def _taken_reports(notes: Iterable[dict[str, Any]]) -> dict[str, set[int]]:
    """Event id -> interval ids, from the journal's `OPENADR3_REPORTED` notes (one not of that form skipped)."""
    taken: dict[str, set[int]] = {}
    for note in notes:
        event_id, intervals = note.get("event_id"), note.get("intervals")
        if isinstance(event_id, str) and isinstance(intervals, list):
            taken.setdefault(event_id, set()).update(i for i in intervals if isinstance(i, int))
    return taken


def _by_end(plan: EventPlan) -> list[IntervalWindow]:
    """An event's intervals in the order they end, the order their usage falls due. Intervals may
    overlap (one inside another: the core serves one request at a time, by priority, and meters each
    on its own), so the order they start in is not it: an interval is reported once it has ended,
    with all its energy."""
    return sorted(plan.intervals, key=lambda w: (w.end, w.start))


def _interval(window: IntervalWindow, payloads: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": window.interval_id, "intervalPeriod": {"start": iso_datetime(window.wall_start),
                                                         "duration": iso_duration(window.duration_s)},
            "payloads": payloads}


def _answer_payloads(answer: DispatchAnswer) -> list[dict[str, Any]]:
    payloads: list[dict[str, Any]] = [
        {"type": ANSWER, "values": [VERDICT_WORDS[answer.verdict]]},
        {"type": ANSWER_REASON, "values": [answer.reason.value if answer.reason else "", answer.detail]},
    ]
    if answer.verdict is Verdict.CAPPED and answer.cap_w is not None:
        payloads.append({"type": ANSWER_CAP, "values": [round(answer.cap_w / 1000.0, 3)]})
    return payloads


def _descriptor(payload_type: str) -> dict[str, Any]:
    found = {"objectType": "REPORT_PAYLOAD_DESCRIPTOR", "payloadType": payload_type, "readingType": "DIRECT_READ"}
    if payload_type in UNITS:
        found["units"] = UNITS[payload_type]
    return found


def _describe(answer: DispatchAnswer) -> str:
    return f"{answer.request_id}: {describe(answer)}"


async def _body(resp: aiohttp.ClientResponse) -> bytes:
    """The response body, with its cap (a VTN cannot make the gateway hold gigabytes)."""
    try:
        return await read_capped(resp)
    except AnswerTooLarge as err:
        raise VtnError(str(err)) from None


def _refuse_redirect(resp: aiohttp.ClientResponse, what: str, consequence: str) -> None:
    """A 3xx with a Location is a VtnError naming the status and where it points (its origin only: a
    Location may carry a query with anything in it); the request is not followed there."""
    location = resp.headers.get("Location")
    if 300 <= resp.status < 400 and location is not None:
        try:
            target = urlsplit(urljoin(str(resp.url), location))
            origin = f"{target.scheme}://{target.netloc.rpartition('@')[2]}" if target.netloc else "no server"
        except ValueError:  # "http://[bad": no address at all
            origin = "an address that is not a URL"
        raise VtnError(f"{what}: answered HTTP {resp.status}, a redirect to {origin}: {consequence} "
                       "(configure the address it moved to)")


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        raise VtnError(f"{what}: the answer is not JSON") from None
    except RecursionError:
        raise VtnError(f"{what}: the answer is JSON nested too deeply to read") from None


def _problem(raw: bytes, secrets: Iterable[str]) -> str:
    """What an error answer says (an OpenADR 3 problem object's title and detail), short, printable, and
    without `secrets`: a VTN may quote the credential it refused ("invalid token Bearer eyJ..."), and the
    words go to the log, the journal's LinkLost record, `status` and commissioning's report."""
    try:
        problem = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "no details"
    if isinstance(problem, dict):
        words = " - ".join(str(problem[k]) for k in ("title", "detail") if isinstance(problem.get(k), str))
        return _shown(words, secrets) or "no details"
    return "no details"


def _shown(words: str, secrets: Iterable[str]) -> str:
    """A peer's words as they may be logged: short, printable (no forged log lines), `secrets` withheld."""
    for secret in secrets:
        if secret:
            words = words.replace(secret, "<withheld>")
    return printable(words)[:300]


def _why(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _unanswered_why(err: BaseException) -> str:
    """A request sent and not answered: a timeout says how long was waited, not its bare type name."""
    if isinstance(err, asyncio.TimeoutError) and not str(err):
        return f"none within {HTTP_TIMEOUT_S:g} s"
    return _why(err)


def _report_content(report: dict[str, Any]) -> Any:
    """What makes two reports the same one: its name and, per resource, each interval's id and payloads
    (a VTN adds its own fields, such as `id` and `createdDateTime`, to what it stores). A VTN's listing is
    read as it comes: what is not a list of objects is no content (None), never an error."""
    def objects(value: Any) -> list[dict[str, Any]]:
        return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []

    def payloads(interval: dict[str, Any]) -> list[tuple[Any, Any]]:
        return [(p.get("type"), p.get("values")) for p in objects(interval.get("payloads"))]

    return (report.get("reportName"), [(r.get("resourceName"), [(i.get("id"), payloads(i))
                                                                 for i in objects(r.get("intervals"))])
                                       for r in objects(report.get("resources"))])


def check(config: OpenAdr3Config, *, secret_given: bool = False,
          simple_levels_pct: Sequence[object] = DEFAULT_LEVELS_PCT, owner_uid: int | None = None) -> list[str]:
    """Settings the config schema cannot check alone, named the way check-config names keys; the SIMPLE
    levels too, which this VEN shares with OpenADR 2.0b's section (checked here whether that one is on or not).

    `owner_uid` is the user the client secret file must belong to: None, the user this process runs as,
    which is the one the VEN reads it as (`assembly.check` explains when `check-config` says another)."""
    key = "dispatch.openadr3"
    problems = check_levels(simple_levels_pct, "dispatch.openadr.simple_levels_pct")
    for name in ("vtn_url", "token_url", "callback_url"):  # token_url and callback_url: "" means derived
        url = getattr(config, name)
        if (url or name == "vtn_url") and (not url.startswith(("http://", "https://")) or not urlsplit(url).hostname):
            problems.append(f"{key}.{name}: must be an http:// or https:// URL, got {without_query(url)!r}")
    for name in ("client_id", "ven_name"):
        if not getattr(config, name).strip():
            problems.append(f"{key}.{name}: must not be empty")
    if config.callback_listen:
        try:
            parse_host_port(config.callback_listen, f"{key}.callback_listen")
        except InputError as err:
            problems += err.problems
    if not secret_given:
        try:
            read_secret(config.client_secret_file, "OpenADR 3 client secret", owner_uid=owner_uid)
        except FileNotFoundError:
            problems.append(f"{key}.client_secret_file: {config.client_secret_file}: no such file "
                            "(put the client secret the aggregator issued on its first line, mode 0600)")
        except InputError as err:
            problems += [f"{key}.client_secret_file: {p}" for p in err.problems]
    return problems


def _price_answer(answers: dict[str, DispatchAnswer], event_id: str, interval_id: int) -> DispatchAnswer | None:
    """The answer to an interval's prices: the one the owner's mode followed (served), else the first."""
    found = [a for kind in PriceKind if (a := answers.get(price_id(event_id, interval_id, kind))) is not None]
    return next((a for a in found if a.verdict is not Verdict.REJECTED), found[0] if found else None)


def _served_ids(plan: EventPlan, window: IntervalWindow) -> tuple[str, ...]:
    """The ids the core may serve an interval by: its request's, else its prices' (each kind)."""
    if window.request_id is not None:
        return (window.request_id,)
    return tuple(price_id(plan.event_id, window.interval_id, kind) for kind in PriceKind)


def _content_key(event: Any) -> str:
    """An event's content, hashed: a listed event at the content last handled needs nothing more."""
    return hashlib.sha256(json.dumps(event, sort_keys=True, default=str).encode()).hexdigest()


def _asked(plan: EventPlan) -> set[str]:
    """Every id an event's revision put to the core: its intervals' requests and its prices."""
    return set(plan.request_ids) | {p.id for p in plan.prices}
