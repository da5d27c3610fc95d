"""Who may use the web app: tokens to roles, sessions with their CSRF tokens, and login throttling.

The owner logs in with the owner API's token (`[owner] token_file`), the installer
with the installer token (`[web] installer_token_file`); each login opens a
session held only in memory (a restart logs everyone out) and named by a random
id in an HttpOnly, SameSite=Strict cookie. Each session has its own CSRF token,
which the page sends back in a header on every change: a cookie the browser adds
by itself is never enough to change anything.

Failed logins are throttled per client address and in total, on the monotonic
clock (injected, so tests need no waiting): a 256-bit token cannot be guessed, but
guesses must not cost the gateway a log line or a comparison each without bound.
Nothing here logs or returns a token.
"""

from __future__ import annotations

import hmac
import math
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

Clock = Callable[[], float]

SESSION_IDLE_S = 12 * 3600.0
"""A session unused this long ends (a phone left logged in overnight, not for a week)."""
SESSION_LIFETIME_S = 7 * 86_400.0
"""A session ends this long after its login, however much it is used."""
MAX_SESSIONS = 32
"""Sessions held at once; a login beyond them ends the least recently used."""
LOGIN_WINDOW_S = 60.0
MAX_FAILURES_PER_CLIENT = 5
"""Failed logins one address may make within the window before it must wait."""
MAX_FAILURES_TOTAL = 30
"""Failed logins all addresses together may make within the window (a spread-out guesser): beyond it, every
address that has failed itself waits, and one that has not (the owner) may still log in."""
MAX_TRACKED_CLIENTS = 256


class Role(StrEnum):
    """What a session or a bearer token may do: the installer everything the owner may, and more."""

    OWNER = "owner"
    INSTALLER = "installer"


@dataclass(frozen=True)
class Keys:
    """The two tokens, compared in constant time; never shown, never logged."""

    owner: str
    installer: str

    def role_of(self, offered: str) -> Role | None:
        """The role `offered` is the token of, or None. Both are always compared (no timing hint)."""
        given = offered.strip().encode("utf-8", "replace")
        as_owner = hmac.compare_digest(given, self.owner.encode())
        as_installer = hmac.compare_digest(given, self.installer.encode())
        return Role.INSTALLER if as_installer else Role.OWNER if as_owner else None


@dataclass
class Session:
    """One login. `id` goes in the cookie, `csrf` in the page's change requests."""

    id: str
    role: Role
    csrf: str
    started_at: float
    seen_at: float

    def csrf_ok(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode("utf-8", "replace"), self.csrf.encode())


class SessionBook:
    """The sessions open now, least recently used first; bounded in count and in time."""

    def __init__(self, clock: Clock, *, idle_s: float = SESSION_IDLE_S, lifetime_s: float = SESSION_LIFETIME_S,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self.clock = clock
        self.idle_s, self.lifetime_s, self.max_sessions = idle_s, lifetime_s, max_sessions
        self._open: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def start(self, role: Role) -> Session:
        """A new session for `role` (the least recently used one ends if the book is full)."""
        now = self.clock()
        while len(self._open) >= self.max_sessions:
            self._open.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), role, secrets.token_urlsafe(32), now, now)
        self._open[session.id] = session
        return session

    def find(self, session_id: str | None) -> Session | None:
        """The live session with this id (marked as used now), or None: unknown, idle too long or too old."""
        if not session_id:
            return None
        session = self._open.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if now - session.seen_at > self.idle_s or now - session.started_at > self.lifetime_s:
            del self._open[session_id]
            return None
        session.seen_at = now
        self._open.move_to_end(session_id)
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._open.pop(session_id, None)


class LoginThrottle:
    """Failed logins within the last `window_s`, per client address and in total.

    `wait_s(client)` says how long a client must wait before its next attempt
    (0: it may try now). Successes forget a client's failures. Past the total, only
    clients that failed themselves wait, so guessers cannot lock the owner out; but
    once more clients have failed than are tracked, one without a record may be a
    guesser whose record was dropped, so then every client waits for the total.
    """

    def __init__(self, clock: Clock, *, window_s: float = LOGIN_WINDOW_S,
                 per_client: int = MAX_FAILURES_PER_CLIENT, total: int = MAX_FAILURES_TOTAL,
                 max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self.clock = clock
        self.window_s, self.per_client, self.total, self.max_clients = window_s, per_client, total, max_clients
        self._by_client: OrderedDict[str, deque[float]] = OrderedDict()
        self._all: deque[float] = deque()
        self._dropped_at = -math.inf  # when a client's record last went for want of room

    def wait_s(self, client: str) -> float:
        now = self.clock()
        self._forget_before(now - self.window_s)
        waits = [0.0]
        mine = self._by_client.get(client)
        if mine is not None and len(mine) >= self.per_client:
            waits.append(mine[0] + self.window_s - now)
        untold = now - self._dropped_at < self.window_s  # a client with no record may have had one
        if (mine or untold) and len(self._all) >= self.total:
            waits.append(self._all[0] + self.window_s - now)
        return max(waits)

    def failed(self, client: str) -> int:
        """Count a failure; how many this client has made within the window."""
        now = self.clock()
        mine = self._by_client.setdefault(client, deque())
        self._by_client.move_to_end(client)
        mine.append(now)
        self._all.append(now)
        while len(self._by_client) > self.max_clients:  # the oldest client's count goes; the total keeps it
            self._by_client.popitem(last=False)
            self._dropped_at = now
        return len(mine)

    def attempt(self, client: str) -> tuple[float, float]:
        """(wait, when): `wait_s(client)`, and when that is 0 the attempt is counted as a failure at `when`
        already. Checked and counted with no await between, so requests still sending their bodies cannot
        all pass one check before any is counted; `take_back(client, when)` an attempt that did not fail."""
        wait = self.wait_s(client)
        if wait > 0:
            return wait, math.nan
        self.failed(client)
        return 0.0, self._all[-1]

    def take_back(self, client: str, when: float) -> None:
        """Uncount an `attempt` counted at `when` that was no failed guess (the right token, or no body read)."""
        mine = self._by_client.get(client)
        if mine is not None and when in mine:
            mine.remove(when)
            if not mine:
                del self._by_client[client]
        if when in self._all:
            self._all.remove(when)

    def failures(self, client: str) -> int:
        """How many failures `client` has within the window, its attempts still being judged included."""
        return len(self._by_client.get(client, ()))

    def succeeded(self, client: str) -> None:
        self._by_client.pop(client, None)

    def _forget_before(self, cutoff: float) -> None:
        while self._all and self._all[0] <= cutoff:
            self._all.popleft()
        for client in [c for c, times in self._by_client.items() if times and times[-1] <= cutoff]:
            del self._by_client[client]
        for times in self._by_client.values():
            while times and times[0] <= cutoff:
                times.popleft()
