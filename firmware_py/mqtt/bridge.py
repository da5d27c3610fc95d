"""The `[mqtt]` integration: the gateway's state to a broker, owner commands from it.

One integration (`assembly.INTEGRATIONS`), run by the service as its own task, apart
from the control path, which it never waits on and which never waits on it:

- **pacing** (`pace_once`, every `PACE_S`): the state document is built from the
  gateway's read model and queued when it changed or `publish_interval_s` passed;
  nothing is added to the gateway's steps;
- **the outbox**: bounded; when the broker is slow or gone, the oldest queued state
  publications are dropped (the newest state is what a retained topic is for), and
  command results wait (a few, also bounded) for the next connection;
- **sessions**: connect (TLS and username/password when configured, the last will
  `offline` retained on P/availability), announce `online`, publish the Home
  Assistant discovery configurations and the state (and an empty retained configuration
  for each entity announced before and gone now: a link turned off, or every one with
  discovery off), subscribe to P/set/+; when the broker goes away, reconnect with
  back-off (0.5 s doubling to 30 s; started afresh only after a session of `STEADY_S`, so two gateways
  with one client id, each connection taking the other's over, retry ever slower, with one warning)
  and do it all again. Home Assistant announcing
  itself (`homeassistant/status`, or `<discovery_prefix>/status`, = online) gets the
  configurations and the state again;
- **commands** go through `OwnerDesk` (validation, save, core, journal), are rate
  limited, and each gets one result on P/result. A command the broker replays at connect (retained) is
  refused and cleared from the broker (an empty retained message on its topic): applied at every
  reconnect, it would undo later changes. (Under MQTT 3.1.1 a retained command published while the
  gateway is connected reaches it without the retain flag and is applied; the replay clears it.)
  That clear comes back to the gateway (subscribed to P/set/+), without the retain flag: each clear
  is counted per topic as it is published, and that many empty messages on its topic are swallowed
  (the counts forgotten when the session ends: a new one gets no echoes of the old one's clears).
  Any other empty message on a command topic is a bad command, refused ("empty payload") through the
  same rate limit; an empty retained one (a retained message cleared) asks nothing and gets no answer.
- **a flood** beyond the client's incoming queue is discarded by aiomqtt, which logs one warning per
  message: `Discards` lets the first through and counts the rest, reported once the flood is over.

The link book shows the broker as the `mqtt` link (status, metrics). The password
is read from `password_file` when connecting and is never logged or published.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import socket
import ssl
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import aiomqtt

from firmware_py.addresses import host_problem, parse_host_port
from firmware_py.certificates import check_ca_bundle, load_chain, validity_problem
from firmware_py.config import Config, MqttConfig
from firmware_py.core.tally import Tally, tallied
from firmware_py.errors import InputError, collect_problems
from firmware_py.journal import codec
from firmware_py.links import Link
from firmware_py.mqtt import commands
from firmware_py.mqtt.discovery import configurations, retired
from firmware_py.mqtt.state import Pacer, state_document
from firmware_py.mqtt.topics import Topics, node_id, prefix_problem
from firmware_py.owner.access import read_secret
from firmware_py.owner.changes import BadRequest
from firmware_py.owner.desk import NotApplied, OwnerDesk
from firmware_py.owner.store import OwnerStore
from firmware_py.quoting import printable, shown
from firmware_py.tasks import cancel_all, seen_through
from firmware_py.version import software_version

if TYPE_CHECKING:
    from firmware_py.gateway import Gateway

log = logging.getLogger(__name__)

PACE_S = 0.5
"""How often the state is looked at: a change reaches the broker within this (and `MIN_GAP_S`)."""
STATE_QUEUE = 16
"""State publications kept while the broker is away; older ones are dropped first."""
RESULT_QUEUE = 32
"""Command results kept while the broker is away (a command can only arrive while connected)."""
PUBLISH_TIMEOUT_S = 10.0
"""A publication the broker has not taken by then ends the session: the broker is stalled."""
INCOMING_QUEUE = 100
"""Messages received and not yet handled; a flood beyond it is discarded by the client."""
DISCARDED = "Message queue is full. Discarding message."
"""What aiomqtt 2.5 logs (its `_on_message`) for each message a full incoming queue discards."""
SOCKET_FAILED = "failed to receive on socket: "
"""How paho 2.2 logs (ERROR) a connection that failed under it (its `_loop_rc_handle`): the only word of why
a connect ended before the broker's answer, which aiomqtt waits out and reports as "Operation timed out"."""
TIMED_OUT = "Operation timed out"
CLIENT_LOG = logging.getLogger("mqtt")
"""The logger aiomqtt and paho are given; `Discards` and `SocketFailures` filter it."""
STOP_S = 0.25
"""At a stop: how long `offline` and the goodbye may take (the service's safe stop waits for this task)."""
STEADY_S = 10.0
"""A session this long proved itself: the back-off starts afresh after it (a broker restart is met in
0.5 s). A shorter one was most likely taken over (the broker drops the older of two connections with one
client id) or ended by the broker at once: reconnecting at the shortest back-off would flap for ever."""
TAKEN_OVER = 3
"""Short sessions in a row after which the one warning that the client id may be in use elsewhere is logged."""
QOS = 1
HA_BIRTH_TOPIC = "homeassistant/status"  # Home Assistant's, whatever its discovery prefix


def check(config: Config, owner_uid: int | None = None) -> list[str]:
    """What `check-config` and `run` refuse before anything opens: the broker address, the prefixes,
    the password file (readable by `owner_uid` alone, the user the gateway runs as) and the TLS CA
    file (a usable PEM bundle)."""
    mqtt, problems = config.mqtt, []
    try:
        host, port = parse_host_port(mqtt.broker, "mqtt.broker")
        if port == 0:
            problems.append(f"mqtt.broker: {mqtt.broker!r}: port 0 is no broker's port (1 to 65535; 1883 is MQTT's)")
        if why := host_problem(host):
            problems.append(f"mqtt.broker: {shown(host)} is {why}")
    except InputError as err:
        problems += err.problems
    for key, prefix in (("mqtt.topic_prefix", mqtt.topic_prefix), ("mqtt.discovery_prefix", mqtt.discovery_prefix)):
        if problem := prefix_problem(prefix, key):
            problems.append(problem)
    for key, text in (("mqtt.client_id", mqtt.client_id), ("mqtt.username", mqtt.username)):
        if problem := string_problem(text, key):
            problems.append(problem)
    if mqtt.password_file and not mqtt.username:
        problems.append("mqtt.password_file: set mqtt.username too (a password goes with a username)")
    return problems + collect_problems(lambda: password(mqtt, owner_uid=owner_uid), lambda: tls_context(mqtt))


MQTT_STRING_BYTES = 65_535
"""The longest string an MQTT packet carries (a 16-bit length): paho fails to pack a longer one with a
traceback, at every connection attempt."""


def string_problem(text: str, key: str) -> str | None:
    """Why `text` cannot go in an MQTT CONNECT as `key` (value not shown: it may be long or a credential)."""
    if "\0" in text:
        return f"{key}: contains a NUL character, which MQTT does not allow in a string"
    if (size := len(text.encode("utf-8"))) > MQTT_STRING_BYTES:
        return f"{key}: {size} bytes in UTF-8; MQTT carries at most {MQTT_STRING_BYTES:,}"
    return None


def password(mqtt: MqttConfig, *, owner_uid: int | None = None) -> str | None:
    """The broker password from `password_file` (its first line), or None without one; InputError
    naming the file when it cannot be read or others may read it (the rules of every secret the
    gateway holds, `read_secret`). The password itself never appears in a message."""
    if not mqtt.password_file:
        return None
    try:
        return read_secret(mqtt.password_file, "MQTT password", owner_uid=owner_uid)
    except FileNotFoundError:
        raise InputError(f"mqtt.password_file: {mqtt.password_file}: no such file "
                         "(put the broker password on its first line, mode 0600)") from None
    except InputError as err:
        raise InputError([f"mqtt.password_file: {p}" for p in err.problems]) from None


def uses_tls(mqtt: MqttConfig) -> bool:
    """Whether the broker is reached over TLS: `tls`, or a `tls_ca_file` or a client certificate (which
    only TLS can use)."""
    return mqtt.tls or bool(mqtt.tls_ca_file or mqtt.tls_cert or mqtt.tls_key)


def tls_context(mqtt: MqttConfig) -> ssl.SSLContext | None:
    """TLS to the broker, checking its certificate and name, and showing the gateway's own certificate
    where one is given; None: plain TCP. Built at every connection, so a renewed certificate is taken
    without a restart."""
    if not uses_tls(mqtt):
        return None
    context = (check_ca_bundle(mqtt.tls_ca_file, "mqtt.tls_ca_file") if mqtt.tls_ca_file
               else ssl.create_default_context())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if bool(mqtt.tls_cert) != bool(mqtt.tls_key):
        raise InputError("mqtt.tls_cert, mqtt.tls_key: set both (a client certificate and its key) or neither")
    if mqtt.tls_cert:
        load_chain(context, mqtt.tls_cert, mqtt.tls_key, "mqtt.tls_cert, mqtt.tls_key")
    return context


class Kind(StrEnum):
    """What a publication is: how the outbox treats it, and what `published` counts."""

    STATE = "state"
    RESULT = "result"
    DISCOVERY = "discovery"
    AVAILABILITY = "availability"
    CLEARED = "cleared"  # an empty retained message: a replayed command taken off the broker


@dataclass(frozen=True)
class Outgoing:
    """One publication waiting in the outbox (a state or a result)."""

    topic: str
    payload: bytes
    retain: bool
    kind: Kind
    applied: bool = False  # a result saying a change was made: the last a full queue gives up


class Outbox:
    """What waits for the broker: the newest states (the oldest dropped first) and command results."""

    def __init__(self, states: int = STATE_QUEUE, results: int = RESULT_QUEUE) -> None:
        self._states: deque[Outgoing] = deque(maxlen=states)
        self._results: deque[Outgoing] = deque(maxlen=results)
        self._ready = asyncio.Event()
        self.dropped: Counter[Kind] = Counter()

    def put(self, item: Outgoing) -> None:
        """Queue `item` at once, never waiting: a full queue drops its oldest, and of results the oldest
        refusal first (a burst of bad commands must not cost the owner the word that a change was made)."""
        if self._room_for(item):
            (self._results if item.kind is Kind.RESULT else self._states).append(item)
            self._ready.set()

    def put_back(self, item: Outgoing) -> None:
        """A result the broker did not take goes first next time (a state is simply published anew), by
        the same rule as `put`: a full queue's newest result is no less owed than the one put back."""
        if item.kind is Kind.RESULT and self._room_for(item):
            self._results.appendleft(item)
            self._ready.set()

    def _room_for(self, item: Outgoing) -> bool:
        """Make room for `item` in its full queue (its oldest state, or oldest refusal, counted as dropped);
        False when `item` itself is the one to go: a refusal, every queued result saying a change was made."""
        queue = self._results if item.kind is Kind.RESULT else self._states
        if len(queue) < queue.maxlen:
            return True
        if not self.dropped[item.kind]:
            log.warning("MQTT: the %s queue is full (%d): the oldest %s are dropped", item.kind.value,
                        queue.maxlen, "refusals" if item.kind is Kind.RESULT else "states")
        self.dropped[item.kind] += 1
        refusal = next((old for old in queue if not old.applied), None) if item.kind is Kind.RESULT else None
        if refusal is not None:
            queue.remove(refusal)
        elif item.kind is Kind.RESULT and not item.applied:
            return False
        else:  # a state, or every result says a change was made: the oldest goes
            queue.popleft()
        return True

    def forget_states(self) -> None:
        """Drop the states queued so far: a new session publishes the state as it is now, and older
        ones sent after it would only show the owner the past (the link still down, old figures)."""
        self._states.clear()

    async def get(self) -> Outgoing:
        """The next publication: results first (someone waits for them), then states, oldest first."""
        while not (self._results or self._states):
            self._ready.clear()
            await self._ready.wait()
        return self._results.popleft() if self._results else self._states.popleft()

    def take_result(self) -> Outgoing | None:
        """The oldest queued result, at once (None: none is owed): a stop's last words (`_say_offline`)."""
        return self._results.popleft() if self._results else None

    def __len__(self) -> int:
        return len(self._states) + len(self._results)


class SocketFailures(logging.Filter):
    """paho's last word on a failed socket (`SOCKET_FAILED`), kept for the link's cause: a broker that
    ended the connection while it was being made (a TLS alert, a reset) was reported by aiomqtt only as
    a timeout 10 s later. Nothing is filtered out."""

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and (text := record.getMessage()).startswith(SOCKET_FAILED):
            self.last = text.removeprefix(SOCKET_FAILED)
        return True


CUT_UNDER_TLS = ("EOF OCCURRED IN VIOLATION OF PROTOCOL", "UNEXPECTED_EOF", "CONNECTION RESET BY PEER")
"""How a socket failure reads when the broker cut a TLS connection without a word the client could read."""

WAY_THAT_WORKS = ("the gateway sends none: give it one (mqtt.tls_cert, mqtt.tls_key), or let the broker accept "
                  "mqtt.username with mqtt.password_file over TLS")

TRUST_IT = "let it trust the CA that issued the certificate"

REFUSED_BECAUSE = {
    "UNKNOWN_CA": TRUST_IT,
    "UNSUPPORTED_CERTIFICATE": "it is made for another use: give one for client authentication "
                               "(extended key usage clientAuth)",
    "CERTIFICATE_REVOKED": "it is revoked; use a newly issued one",
}
"""What to do about the gateway's certificate, by the alert a broker refused it with; any other: its log says."""


def connect_failure(err: BaseException, socket_failure: str | None, mqtt: MqttConfig) -> str:
    """The link's cause for a session that never began: `err`, or what failed under it when aiomqtt could
    only time out, with what the broker most likely judged (`certificate_hint`)."""
    if socket_failure is None or not isinstance(err, aiomqtt.MqttError) or str(err) != TIMED_OUT:
        return _cause(err)
    return (f"the broker ended the connection before accepting it: {_cause(Exception(socket_failure))}"
            f"{certificate_hint(socket_failure.upper(), mqtt)}")


def certificate_hint(failure: str, mqtt: MqttConfig) -> str:
    """Why a broker ended a TLS connection before its CONNACK, where its client certificate is the likely
    reason: the gateway's is missing, out of date, not trusted or not a client's. A broker says so in a TLS
    alert, which can be lost: under TLS 1.3 the client's handshake ends before the broker judges its
    certificate, the CONNECT the client then sends reaches a socket the broker has closed, and the reset this
    draws can discard the alert unread; so a TLS connection cut without a word points at the certificate too."""
    alert = "ALERT" in failure and any(word in failure for word in ("CERTIFICATE", "UNKNOWN_CA"))
    cut = uses_tls(mqtt) and any(words in failure for words in CUT_UNDER_TLS)
    if not mqtt.tls_cert:
        if "CERTIFICATE_REQUIRED" in failure:
            return f" (the broker requires a client certificate, and {WAY_THAT_WORKS})"
        return (f" (a broker that requires a client certificate ends the connection this way, and {WAY_THAT_WORKS})"
                if cut else "")
    if not (alert or cut):
        return ""
    if out := validity_problem(mqtt.tls_cert, dt.datetime.now(dt.UTC)):
        return f" (mqtt.tls_cert: the gateway's certificate {out.problem}, and the broker refuses it; {out.remedy})"
    if alert:
        remedy = next((what for word, what in REFUSED_BECAUSE.items() if word in failure), "the broker's log says why")
        return f" (the broker refused the gateway's certificate, mqtt.tls_cert: {remedy})"
    return (" (a broker that does not trust the gateway's certificate, mqtt.tls_cert, ends the connection this "
            f"way: {TRUST_IT})")


class Discards(logging.Filter):
    """aiomqtt's "queue is full" warning, once per flood: it logs one per discarded message, so anyone who
    may publish on the broker would set the gateway's log rate (and journald's rate limit would then drop
    real fault lines). The first of a flood passes; the rest are counted and reported by `over`."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0  # discarded in this flood, the first one (logged) included
        self._looked = 0  # the count at the last `over`

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != DISCARDED:
            return True
        self.count += 1
        return self.count == 1

    def over(self, *, ending: bool = False) -> int:
        """How many a flood discarded, once it is over (none discarded since the last look, or `ending`:
        the session ends), the count then starting again; 0 while a flood goes on, or without one."""
        count, looked, self._looked = self.count, self._looked, self.count
        if not count or (count != looked and not ending):
            return 0
        self.count = self._looked = 0
        return count


class MqttBridge:
    """The MQTT integration for one running gateway (`[mqtt]`)."""

    def __init__(self, config: Config, gateway: Gateway, *, store: OwnerStore | None = None,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 30.0) -> None:
        self.config, self.settings, self.gateway = config, config.mqtt, gateway
        self.topics = Topics(config.mqtt.topic_prefix)
        store = store or OwnerStore(config.owner.settings_file, config.owner.reserve_pct)
        self.desk = OwnerDesk(gateway, store, gateway.clocks)
        self.link = gateway.links.handle(Link.MQTT)
        self.host, self.port = parse_host_port(config.mqtt.broker, "mqtt.broker")
        self.pacer = Pacer(config.mqtt.publish_interval_s)
        self.outbox = Outbox()
        self.gate = commands.CommandGate(gateway.clock)
        # Home Assistant's "online" is answered with every discovery config and the state again: unauthenticated
        # anyone on the broker may send it, so at most twice at once, then once in 30 s (the configs are retained).
        self.announcing = commands.CommandGate(gateway.clock, burst=2, per_s=1 / 30)
        self.discards = Discards()
        self.socket_failures = SocketFailures()
        self._handed: Outgoing | None = None  # a result handed to this session's client when its send was cancelled
        self.tally = Tally()
        self.version = software_version()
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.published: Counter[Kind] = Counter()
        """Publications the broker took, by kind (state, result, discovery, availability)."""
        self.connected = asyncio.Event()
        """Set while a session with the broker is up."""
        self.unreachable = asyncio.Event()
        """Set while the broker is out of reach (the last attempt or session failed)."""
        self.retry_in_s = 0.0  # the back-off before the next attempt, since the last failure
        self._wake = asyncio.Event()
        self._was_connected = False
        self._began: float | None = None  # when this session's broker accepted it (gateway clock); None: not yet
        self._short_sessions = 0  # sessions in a row that ended before `STEADY_S`
        self._warned_taken_over = False  # the warning is logged once per run of short sessions
        self._clears: Counter[str] = Counter()  # this session's clears whose echo has not come back, by topic

    @property
    def client_id(self) -> str:
        return self.settings.client_id or f"powershare-gw-{node_id(self.settings.topic_prefix)}"

    # --- the integration -------------------------------------------------------------------

    async def run(self, sink: Any = None) -> None:
        """Until cancelled: pace the state, and keep a session with the broker.

        What a broker or a network can do ends a session and is retried; anything else
        is a bug, raised to the service, which logs it and starts the integration again.
        """
        try:
            await _first_failure(self._pace(), self._stay_connected())
        finally:
            self.connected.clear()

    async def _stay_connected(self) -> None:
        """Sessions one after another, with back-off (0.5 s doubling to 30 s) after each failure. A
        session ends only by failing; one that lasted `STEADY_S` starts the back-off afresh, so a broker
        restart after days of service is met in 0.5 s, not in the 30 s earlier outages had grown to."""
        backoff = 0.0
        while True:
            self._began, self.socket_failures.last, self._handed = None, None, None
            try:
                await self._session()
            except (aiomqtt.MqttError, OSError, ssl.SSLError, InputError) as err:
                self.connected.clear()
                self.unreachable.set()
                self.link.lost(connect_failure(err, self.socket_failures.last, self.settings)
                               if self._began is None
                               else _cause(err))
                lasted = None if self._began is None else self.gateway.clock() - self._began
                backoff = self._next_backoff(backoff, lasted)
                self.retry_in_s = backoff
            await asyncio.sleep(backoff)

    def _next_backoff(self, backoff: float, lasted_s: float | None) -> float:
        """The wait before the next attempt: the shortest after a session of `STEADY_S` (`lasted_s`, on the
        gateway's monotonic clock), else doubled, up to `backoff_max_s`. A session the broker accepted and
        ended sooner is counted (`_taken_over`): an instant reconnect would only take the session back."""
        if lasted_s is not None and lasted_s >= STEADY_S:
            self._short_sessions, self._warned_taken_over = 0, False
            return self.backoff_min_s
        if lasted_s is not None:
            self._taken_over(lasted_s)
        return min(max(backoff * 2, self.backoff_min_s), self.backoff_max_s)

    def _taken_over(self, lasted_s: float) -> None:
        """Count a short session; after `TAKEN_OVER` in a row, warn once (not per cycle) of the likely cause."""
        self._short_sessions += 1
        if self._short_sessions < TAKEN_OVER or self._warned_taken_over:
            return
        self._warned_taken_over = True
        log.warning("MQTT: %d sessions in a row as client id %r ended within %.0f s of connecting (the last "
                    "after %.1f s): the broker may be handing the session to another client using this client "
                    "id (another gateway with the same mqtt.client_id or topic_prefix?); retrying with back-off "
                    "up to %g s", self._short_sessions, self.client_id, STEADY_S, lasted_s, self.backoff_max_s)

    async def _pace(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PACE_S)
            urgent = self._wake.is_set()
            self._wake.clear()
            self.pace_once(urgent=urgent)
            self._report_discards()

    def pace_once(self, *, urgent: bool = False) -> bool:
        """Look at the gateway now; queue the state when it is due (`Pacer.due`). True when queued."""
        gateway, now = self.gateway, self.gateway.now()
        self.tally = tallied(self.tally, gateway.controller)
        doc = state_document(gateway.status(), gateway.owner_settings(), self.tally, gateway.clocks, now)
        if not self.pacer.due(doc, now, urgent=urgent):
            return False
        self.pacer.sent(doc, now)
        self.outbox.put(Outgoing(self.topics.state, _encode(doc), retain=True, kind=Kind.STATE))
        return True

    def _report_discards(self, *, ending: bool = False) -> None:
        """The one line a flood gets besides its first warning: how many messages it cost."""
        if count := self.discards.over(ending=ending):
            log.warning("MQTT: %d incoming messages were discarded, the client's queue (%d) being full: "
                        "something on the broker publishes faster than the gateway reads", count, INCOMING_QUEUE)

    # --- one session ------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        return aiomqtt.Client(
            self.host, self.port, identifier=self.client_id, username=s.username or None, password=password(s),
            will=aiomqtt.Will(self.topics.availability, b"offline", qos=QOS, retain=True),
            keepalive=s.keepalive_s, tls_context=tls_context(s), timeout=PUBLISH_TIMEOUT_S,
            max_queued_incoming_messages=INCOMING_QUEUE, logger=CLIENT_LOG,
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),))  # a result is one small packet: now

    async def _session(self) -> None:
        """Connect, announce, and serve until the broker goes away (MqttError) or the task is cancelled;
        aiomqtt's discard warnings filtered meanwhile, and a flood still uncounted reported at the end."""
        CLIENT_LOG.addFilter(self.discards)
        CLIENT_LOG.addFilter(self.socket_failures)
        try:
            await self._serve()
        finally:
            self._clears.clear()  # the echoes of this session's clears will not come to the next one
            CLIENT_LOG.removeFilter(self.discards)
            CLIENT_LOG.removeFilter(self.socket_failures)
            self._report_discards(ending=True)

    async def _serve(self) -> None:
        async with _connection(self._client()) as client:
            self._began = self.gateway.clock()
            self.unreachable.clear()
            self.link.good()
            try:
                await client.subscribe(self.topics.commands, qos=QOS)
                if self.settings.discovery:
                    for topic in self._birth_topics():
                        await client.subscribe(topic, qos=QOS)
                await self._announce(client)
                self.connected.set()
                log.log(logging.DEBUG if self._was_connected else logging.INFO, "mqtt: connected to %s as %s; "
                        "state on %s", self.settings.broker, self.client_id, self.topics.state)
                self._was_connected = True
                await _first_failure(self._send(client), self._receive(client))
            except asyncio.CancelledError:
                await self._say_offline(client)
                raise

    async def _announce(self, client: aiomqtt.Client) -> None:
        """`online`, the discovery configurations, and the state at once (whatever the pacer last sent)."""
        await self._publish(client, self.topics.availability, b"online", retain=True, kind=Kind.AVAILABILITY)
        await self._discover(client)
        self.pacer.forget()
        self.outbox.forget_states()
        self.pace_once()

    async def _discover(self, client: aiomqtt.Client) -> None:
        for topic in retired(self.config):
            await self._publish(client, topic, b"", retain=True, kind=Kind.DISCOVERY)
        if not self.settings.discovery:
            return
        for topic, payload in configurations(self.config, self.version):
            await self._publish(client, topic, _encode(payload), retain=True, kind=Kind.DISCOVERY)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """A clean stop sends no will: publish the results still owed, then say `offline` ourselves, and
        leave within `STOP_S` whatever the broker does (the service's safe stop waits for this task to end)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._last_words(client), STOP_S)
        client.timeout = STOP_S  # the goodbye (DISCONNECT) waits no longer either

    async def _last_words(self, client: aiomqtt.Client) -> None:
        """The queued results, a refusal for each command received and not yet read, then `offline`. A command
        the stop caught mid-write is seen through and its result queued after `_send` was ended: without this,
        a change saved and made was never answered. A result whose publication the stop cut short is already
        with the client, on this connection, and is not sent twice. A command still in the client's queue was
        taken from the broker (acknowledged) and would never be answered: it is refused, not applied, as the
        gateway is going.

        All of them are handed to the client at once, in order, and only then awaited: one at a time, each
        waited for its PUBACK, and a broker some 300 ms away used up `STOP_S` before `offline` was handed over;
        the clean DISCONNECT that followed dropped the will, and `online` stayed retained."""
        owed = []
        while (item := self.outbox.take_result()) is not None:
            if item is not self._handed:
                owed.append(item)
        while len(client.messages):
            if (refusal := self._unread(await anext(client.messages))) is not None:
                owed.append(refusal)
        await asyncio.gather(*(self._send_one(client, item) for item in owed),
                             client.publish(self.topics.availability, b"offline", qos=QOS, retain=True))

    def _unread(self, message: aiomqtt.Message) -> Outgoing | None:
        """The refusal of a command a stop leaves unread; None for what asks nothing (see `_receive`)."""
        if message.retain or not message.payload or not message.topic.matches(self.topics.commands):
            return None
        return self._result(str(message.topic).rpartition("/")[2], False,
                            "not applied: the gateway is stopping; send it again once its availability says online")

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool, kind: Kind) -> None:
        await client.publish(topic, payload, qos=QOS, retain=retain, timeout=PUBLISH_TIMEOUT_S)
        self.published[kind] += 1
        self.link.good()

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            await self._send_one(client, await self.outbox.get())

    async def _send_one(self, client: aiomqtt.Client, item: Outgoing) -> None:
        """Publish `item`; a result the broker did not take is put back for the next session. One cancelled
        is with the client already (aiomqtt hands it over before its first wait) and goes out on this
        connection if it lasts (`_handed`: a stop's last words do not send it again)."""
        try:
            await self._publish(client, item.topic, item.payload, retain=item.retain, kind=item.kind)
        except BaseException as err:
            if isinstance(err, asyncio.CancelledError):
                self._handed = item
            self.outbox.put_back(item)
            raise

    def _birth_topics(self) -> set[str]:
        """Where Home Assistant says `online`: `homeassistant/status` whatever the discovery prefix (its
        birth topic does not follow one), and `<discovery_prefix>/status` for one set up to match it."""
        return {HA_BIRTH_TOPIC, f"{self.settings.discovery_prefix}/status"}

    async def _receive(self, client: aiomqtt.Client) -> None:
        births = self._birth_topics()
        async for message in client.messages:
            topic = str(message.topic)
            payload = _bytes(message.payload)
            if topic in births:
                if payload.strip() == b"online" and self.announcing.admit():  # Home Assistant (re)started
                    await self._announce(client)
                continue
            if not payload and self._clears[topic]:  # the echo of our own clear (below): nothing was asked
                self._clears[topic] -= 1
                continue
            if not payload and message.retain:  # a retained message cleared: nothing was asked
                continue
            if message.retain:  # replayed at connect: refused, and taken off the broker so it is refused once
                self.outbox.put(self._retained(topic))
                self._clears[topic] += 1  # counted first: its echo may be on its way before the PUBACK
                await self._publish(client, topic, b"", retain=True, kind=Kind.CLEARED)
                continue
            await seen_through(self._answer(topic, payload))

    # --- commands ---------------------------------------------------------------------------

    def _retained(self, topic: str) -> Outgoing:
        """The refusal of a command the broker replayed at connect (the caller clears it from the broker)."""
        return self._result(topic.rpartition("/")[2], False, "a retained command is not applied (it would be "
                            "applied again at every reconnect) and has been cleared from the broker; publish "
                            "commands without the retain flag")

    async def _answer(self, topic: str, payload: bytes) -> None:
        """Apply one command and queue its result, to its end even when the session is torn down meanwhile
        (`seen_through`): the owner desk may already have saved the change and fed it to the core, and a
        command cut short there was made but never answered, not even after the reconnect."""
        self.outbox.put(await self._command(topic, payload))

    async def _command(self, topic: str, payload: bytes) -> Outgoing:
        """Apply one command through the owner desk; its result, whatever the payload."""
        command = self.topics.command_of(topic)
        name = topic.rpartition("/")[2]
        if not self.gate.admit():  # every command counts, an unknown one too
            return self._result(name, False, self.gate.refusal())
        if command is None:
            return self._result(name, False, f"unknown command {printable(name)!r}; the commands are "
                                             f"{', '.join(c.value for c in commands.Command)}")
        try:
            change = commands.read(command, payload, self.settings, self.gateway.clocks.wall())
            control = change.control
            settings = await (self.desk.clear(control) if change.clear else self.desk.set(control, change.body))
        except (BadRequest, NotApplied) as err:
            log.info("mqtt: %s refused: %s", command, printable(str(err)))
            return self._result(name, False, str(err))
        self._wake.set()  # the state changed: publish it at once
        return self._result(name, True, commands.done(change, settings))

    def _result(self, name: str, ok: bool, reason: str) -> Outgoing:
        doc = commands.result(printable(name)[:64], ok, reason, self.gateway.clocks.wall())
        return Outgoing(self.topics.result, _encode(doc), retain=False, kind=Kind.RESULT, applied=ok)


@contextlib.asynccontextmanager
async def _connection(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Client]:
    """`async with client`, except that a connect that fails (no CONNACK in time, a refusal, a cancel)
    closes its socket. aiomqtt gives such a client up with its socket open and its reader still on the
    loop until the broker's keep-alive ends it: against a broker that accepts connections and never
    answers, every attempt would leave one more. Closing it through paho runs aiomqtt's own clean-up."""
    try:
        await client.__aenter__()
    except BaseException:
        with contextlib.suppress(Exception):
            client._client._sock_close()  # paho's own close, which calls aiomqtt's on_socket_close
        raise
    try:
        yield client
    finally:
        await client.__aexit__(None, None, None)


async def _first_failure(*work: Any) -> None:
    """Run coroutines together until one ends; raise what it raised (the others are ended).

    Waited for with `asyncio.wait`, which never loses a cancellation: cancelling the caller
    always reaches here, and every part has stopped before this returns.
    """
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_all(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: a part that failed while the others were ended is not reported twice
    for task in done:
        task.result()


def _encode(doc: dict[str, Any]) -> bytes:
    """JSON a strict parser takes (no NaN or Infinity), compact."""
    return json.dumps(codec.jsonable(doc), allow_nan=False, separators=(",", ":")).encode()


def _bytes(payload: Any) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()


def _cause(err: BaseException) -> str:
    """One line for the link book: what went wrong with the broker, never a credential."""
    text = str(err) or type(err).__name__
    return f"{printable(text)[:200]}"
