"""Who may hold a connection to the DER server, and for how long.

Every connection costs the gateway a file descriptor, and the owner API, the
journal, the CAN socket and the inverter link need theirs from the same budget.
Before these limits 1,100 idle connections used up the 1,024 descriptors and
the owner could no longer opt out or raise the reserve. So:

- at most `total` connections at once, at most `per_client` from one address,
  and clients outside `allow_write_from` (who can only read) at most
  `total - writers_reserved` of them, so a LAN full of readers cannot lock the
  site controller out;
- a connection with no complete request for `idle_timeout_s` is closed;
- a request left half-sent (or replies left unread, which stops the server
  reading that connection) for `request_timeout_s` is closed too: a slow
  trickle cannot hold a connection without ever finishing a request;
- the cap never exceeds what the process's descriptor limit leaves after
  `RESERVED_DESCRIPTORS` for everything else (see `descriptor_budget`).

Pure bookkeeping on an injected clock: the server asks `admit` when a
connection arrives and `overdue` on its tick, and closes what it is told.
"""

from __future__ import annotations

import resource
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum

REQUEST_TIMEOUT_S = 5.0
RESERVED_DESCRIPTORS = 128  # owner API, journal, CAN, inverter, OpenADR, logs: never taken by DER clients


class Admission(Enum):
    """The answer to a new connection."""

    ADMITTED = "admitted"
    SERVER_FULL = "server_full"
    CLIENT_FULL = "client_full"
    READERS_FULL = "readers_full"


class Overdue(Enum):
    """Why a connection is closed by the server."""

    IDLE = "idle"
    STALLED = "stalled"


@dataclass(frozen=True)
class ConnectionLimits:
    total: int = 32
    per_client: int = 4
    idle_timeout_s: float = 60.0
    request_timeout_s: float = REQUEST_TIMEOUT_S

    @property
    def writers_reserved(self) -> int:
        """Slots only allow-listed clients may take: a quarter of the total, at least one when there are two."""
        return max(1 if self.total > 1 else 0, self.total // 4)


@dataclass
class _Held:
    client: str
    writer: bool
    last_request: float  # the last complete request (or the connection's start)
    pending_since: float | None = None  # bytes received and not yet answered, since
    unread: bool = False  # its replies are not being read: the server has stopped answering it


class ConnectionTable:
    """The connections held now, by a key the server chooses (its connection object)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._held: dict[Hashable, _Held] = {}
        self._per_client: Counter[str] = Counter()
        self._readers = 0

    def __len__(self) -> int:
        return len(self._held)

    def admit(self, key: Hashable, client: str, *, writer: bool, now: float) -> Admission:
        """Hold `key` if every cap allows it; otherwise say which cap refused it (nothing is held)."""
        limits = self.limits
        if len(self._held) >= limits.total:
            return Admission.SERVER_FULL
        if self._per_client[client] >= limits.per_client:
            return Admission.CLIENT_FULL
        if not writer and self._readers >= limits.total - limits.writers_reserved:
            return Admission.READERS_FULL
        self._held[key] = _Held(client, writer, now)
        self._per_client[client] += 1
        self._readers += 0 if writer else 1
        return Admission.ADMITTED

    def release(self, key: Hashable) -> None:
        """Forget `key` (idempotent: a connection may be reported closed more than once)."""
        held = self._held.pop(key, None)
        if held is None:
            return
        self._per_client[held.client] -= 1
        if self._per_client[held.client] <= 0:
            del self._per_client[held.client]
        self._readers -= 0 if held.writer else 1

    def received(self, key: Hashable, now: float) -> None:
        """Bytes arrived that are not answered yet: the request timeout runs from the first of them."""
        held = self._held.get(key)
        if held is not None and held.pending_since is None:
            held.pending_since = now

    def answered(self, key: Hashable, now: float, *, pending: bool) -> None:
        """A request was answered; `pending` when more bytes are already waiting (their timeout starts now)."""
        held = self._held.get(key)
        if held is not None:
            held.last_request = now
            held.pending_since = now if pending else None

    def overdue(self, now: float) -> list[tuple[Hashable, Overdue]]:
        """The connections to close now, and why."""
        limits, out = self.limits, []
        for key, held in self._held.items():
            if held.pending_since is not None:
                if now - held.pending_since >= limits.request_timeout_s:
                    out.append((key, Overdue.STALLED))
            elif now - held.last_request >= limits.idle_timeout_s:
                out.append((key, Overdue.IDLE))
        return out

    def replies_unread(self, key: Hashable, unread: bool) -> None:
        """The client stopped (or resumed) reading its replies; the request timeout keeps running."""
        held = self._held.get(key)
        if held is not None:
            held.unread = unread

    def waiting(self) -> int:
        """How many connections hold bytes not answered yet (a request arriving, or stalled)."""
        return sum(held.pending_since is not None for held in self._held.values())

    def not_reading(self) -> int:
        """How many connections are not reading their replies (the server stopped answering them)."""
        return sum(held.unread for held in self._held.values())


def descriptor_budget(wanted: int, soft_limit: int | None = None) -> int:
    """The connection cap the process's descriptor limit allows: `wanted`, or fewer when the
    limit (RLIMIT_NOFILE's soft value unless given) leaves less than that after the reserve."""
    if soft_limit is None:
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft_limit - RESERVED_DESCRIPTORS))
