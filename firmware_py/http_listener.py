"""One aiohttp application on one address: bound, served until cancelled, released, the one way.

The owner API, the web app and the metrics endpoint each serve their own small
application; what they share is how it listens. Binding comes first and on its own
(`start`), so an address that cannot be listened on stops `run` at start with exit 2
(an `InputError` naming the configuration key), never a restart loop; serving is a
task the service cancels (`run`); the runner is released whatever happened. No access
log: a request is the application's to narrate, and a token in a URL must never reach
a log line.

Connections are bounded, because a client that connects and says nothing would otherwise
be kept for ever (aiohttp waits for a first request without a deadline): each listener holds
at most `max_connections`, and at most `per_address` from one remote address (None: no such
bound, for the owner API, whose clients all come from loopback or a Unix socket). A connection
must send its first request within `first_request_s`, and one idle between requests is closed
after `idle_s`. When a bound is reached, the connection let go is the OLDEST that has not yet
sent a request (from the same address, for the per-address bound), and the newcomer only when
every other has: closing the newcomer let 64 half-sent header lines, re-opened every 10 s, lock
every other client (the owner's browser too) out for as long as the sender liked, while the
per-address bound keeps one device's sockets from pushing out another device's.
A body is read within `BODY_S` (`body_of`): aiohttp reads one without a deadline, so 64
half-sent bodies would hold every connection. A body is never inflated (`auto_decompress=False`):
aiohttp unpacked a `Content-Encoding: gzip` body on the event loop as it arrived, even for a
handler that never read it (a 401, /metrics), so 1 MiB sent stalled the gateway about 1 s; one
sent with a Content-Encoding is refused instead, when (and only if) the handler reads it. The
gateway's journal, CAN bus and Modbus link need file descriptors too.

Over HTTPS (`https_site`) a connection is counted from the moment it is accepted, while its TLS
handshake is still to come, and the handshake shares `first_request_s` with the first request:
aiohttp learns of a connection only once its handshake is done, and asyncio waits 60 s for one,
so sockets that never sent a TLS hello escaped both bounds (a hundred from one address were all
kept, each holding a file descriptor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import ssl
import time
import traceback
from asyncio import sslproto
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from firmware_py.errors import InputError
from firmware_py.quoting import printable
from firmware_py.tasks import seen_through

log = logging.getLogger(__name__)

SiteOf = Callable[[web.AppRunner], web.BaseSite]

MAX_CONNECTIONS = 64
PER_ADDRESS = 8
FIRST_REQUEST_S = 10.0
TLS_GOODBYE_S = 2.0
"""How long a TLS connection being closed waits for the client's own goodbye before its socket is closed
regardless (asyncio's default, 30 s, would let an evicted connection hold its descriptor that long)."""
IDLE_S = 30.0
BODY_S = 10.0
MAX_BODY_BYTES = 4096
"""Every listener's body bound (aiohttp's `client_max_size`); a larger body is answered 413 with `TOO_LARGE`."""
TOO_LARGE = f"request body larger than {MAX_BODY_BYTES} bytes"

T = TypeVar("T")


class BodyUnread(Exception):
    """A request body that did not arrive whole within `BODY_S`, or that could not be decoded
    (a broken `Content-Encoding` or multipart body): the client's fault, answered 400."""


CONNECTION_CLOSED = "Connection closed."
"""aiohttp's words (`StreamReader`) for a body read on a connection already lost."""


async def body_of(reading: Awaitable[T], deadline_s: float = BODY_S) -> T:
    """`reading` (`request.read()`, `.post()`, `.json()`) within `deadline_s`; BodyUnread otherwise.
    A body larger than the application's limit still raises aiohttp's own 413, for its handler."""
    try:
        async with asyncio.timeout(deadline_s):
            return await reading
    except TimeoutError:
        raise BodyUnread(f"the request body did not arrive within {deadline_s:.0f} s") from None
    except (RequestPayloadError, HttpProcessingError, ConnectionResetError) as err:
        raise BodyUnread(f"the request body could not be read: {_reason(err)}") from None
    except RuntimeError as err:
        # A client gone before aiohttp made its request the connection's current one: its body stream was
        # never told, and says so only as RuntimeError("Connection closed.") when read.
        if str(err) != CONNECTION_CLOSED:
            raise
        raise BodyUnread("the request body could not be read: the client closed the connection") from None


def _reason(error: BaseException) -> str:
    """What went wrong, in aiohttp's words up to the bytes it quotes: those may hold a token."""
    if isinstance(error, RequestPayloadError) and error.__cause__ is not None:
        error = error.__cause__  # the parser's own error says what was wrong with the body
    text = str(getattr(error, "message", "") or error)
    return printable(re.split(r"[:'\"]", text, maxsplit=1)[0].strip()[:120]) or type(error).__name__


REFUSED_BURST = 5
REFUSED_WINDOW_S = 60.0


class RefusedRequests(logging.Filter):
    """aiohttp logs a malformed request (a header over 8 KB, a bad request line, a body it cannot
    decode) as an ERROR with a traceback and the raw line; it has been answered with 400 already
    (by aiohttp, or by the handler through `body_of`): an INFO line of the gateway's own instead,
    and only the kind of fault (the raw line may carry a token, in a header or a URL). Rewritten
    in place, the line stayed aiohttp's, below the WARNING the service holds aiohttp's lines to.

    Anyone on the home network may send them (the web app listens there), so they are bounded as
    the DER server's refusals are: the first `REFUSED_BURST` of each `REFUSED_WINDOW_S` one line
    each, the rest counted in one line when the window ends. A thousand a second once cost a
    thousand lines a second, the gateway's storage worn for a stranger's loop.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.window_start, self.said, self.unsaid = -math.inf, 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (HttpProcessingError, RequestPayloadError)):
            self.refused(_reason(error))
            return False
        return True

    def refused(self, reason: str) -> None:
        now = self.clock()
        if now - self.window_start >= REFUSED_WINDOW_S:
            self.count_unsaid()
            self.window_start, self.said = now, 0
        if self.said < REFUSED_BURST:
            self.said += 1
            log.info("HTTP: refused a malformed request: %s", reason)
            return
        self.unsaid += 1
        if self.unsaid == 1:  # said when the window ends, even if no other request comes
            with contextlib.suppress(RuntimeError):  # no loop: said with the next refusal after the window
                asyncio.get_running_loop().call_later(self.window_start + REFUSED_WINDOW_S - now, self.count_unsaid)

    def count_unsaid(self) -> None:
        if self.unsaid:
            log.info("HTTP: refused %d more malformed request(s) in %.0f s, not logged one by one",
                     self.unsaid, REFUSED_WINDOW_S)
            self.unsaid = 0


REFUSED_REQUESTS = RefusedRequests()
logging.getLogger("aiohttp.server").addFilter(REFUSED_REQUESTS)


@dataclass
class _Connection:
    """One open connection as the bounds see it: aiohttp's `handler` of it, the `socket`'s own transport
    (under TLS the one the handshake runs on), the remote `host` (None: a Unix socket's peer); `asked`
    once it sent a request, `serving` how many it has in hand."""

    handler: RequestHandler
    socket: asyncio.BaseTransport
    host: Any
    asked: bool = False
    serving: int = 0

    @property
    def transport(self) -> asyncio.BaseTransport:
        """aiohttp's once it has the connection (under TLS, closing it ends the session with a TLS goodbye
        first, which a client's TLS library expects), the socket's while the handshake is still to come."""
        return self.handler.transport or self.socket

    def close(self) -> None:
        self.transport.close()


class HttpListener:
    """An application bound to one address (`where` names its configuration key and value in messages)."""

    def __init__(self, where: str, *, shutdown_timeout_s: float = 1.0, max_connections: int = MAX_CONNECTIONS,
                 per_address: int | None = PER_ADDRESS, first_request_s: float = FIRST_REQUEST_S,
                 idle_s: float = IDLE_S) -> None:
        self.where = where
        self.shutdown_timeout_s = shutdown_timeout_s
        self.max_connections, self.per_address = max_connections, per_address
        self.first_request_s, self.idle_s = first_request_s, idle_s
        self.runner: web.AppRunner | None = None
        self._open: dict[RequestHandler, _Connection] = {}  # by aiohttp's protocol, one per connection; oldest first

    @property
    def listening(self) -> bool:
        return self.runner is not None

    @property
    def bound(self) -> tuple[Any, ...]:
        """The address actually bound (host and the real port when configured with port 0)."""
        if self.runner is None:
            raise RuntimeError(f"{self.where}: not listening")
        return tuple(self.runner.addresses[0])

    async def start(self, app: web.Application, site_of: SiteOf) -> None:
        """Serve `app` on the site `site_of` makes; InputError when it cannot bind. Once: a second call does nothing."""
        if self.runner is not None:
            return
        app.middlewares.insert(0, self._noting_requests)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.shutdown_timeout_s,
                               keepalive_timeout=self.idle_s, auto_decompress=False)
        await runner.setup()
        self._bound_connections(runner.server)
        try:
            await site_of(runner).start()
        except OSError as err:
            await runner.cleanup()
            raise InputError(f"{self.where}: {err.strerror or err}") from None
        self.runner = runner

    def https_site(self, runner: web.AppRunner, host: str, port: int, context: ssl.SSLContext) -> web.BaseSite:
        """A site serving HTTPS on `host`:`port` whose connections are bounded from their accept."""
        return _HttpsSite(runner, self, host, port, context)

    def _bound_connections(self, server: web.Server) -> None:
        """Count every connection aiohttp makes (one accepted over HTTPS is counted already) and forget
        every one it loses."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            if handler not in self._open:
                self.admit(handler, transport)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            self.forget(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def admit(self, handler: RequestHandler, transport: asyncio.BaseTransport) -> None:
        """Keep at most `max_connections`, and `per_address` from one host, letting the oldest connection
        with no request in hand go first (one that has not asked yet, or one kept alive between requests:
        either way nobody waits on it, and clients open a new one); close one without a request after
        `first_request_s`."""
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else None
        self._open[handler] = _Connection(handler, transport, host)
        loop = asyncio.get_running_loop()
        victim = self._over_bound(host)
        if victim is not None:
            # Closed once aiohttp has set the connection up: closed inside its own connection_made,
            # its request task started on a connection already lost and failed an assertion.
            loop.call_soon(self._open.pop(victim).close)
        if victim is not handler:
            loop.call_later(self.first_request_s, self._unless_asked, handler)

    def forget(self, handler: RequestHandler) -> None:
        self._open.pop(handler, None)

    def _over_bound(self, host: Any) -> RequestHandler | None:
        """The connection to let go now that one from `host` was added, if a bound is passed: the oldest
        with no request in hand (the newest connection itself when every other is serving one), else None.
        Keeping the busy ones and any idle newcomer means idle sockets, however many, never lock a client
        out: it is turned away only while every connection is in the middle of a request."""
        if self.per_address is not None and host is not None:
            same = [h for h, c in self._open.items() if c.host == host]
            if len(same) > self.per_address:
                return self._oldest_idle(same)
        if len(self._open) > self.max_connections:
            return self._oldest_idle(list(self._open))
        return None

    def _oldest_idle(self, handlers: list[RequestHandler]) -> RequestHandler:
        """`handlers` are oldest first and end with the newest connection's, which has no request yet."""
        return next(h for h in handlers
                    if not self._open[h].serving and not self._open[h].transport.is_closing())

    def _unless_asked(self, handler: RequestHandler) -> None:
        connection = self._open.get(handler)
        if connection is not None and not connection.asked:
            del self._open[handler]
            connection.close()

    @web.middleware
    async def _noting_requests(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = self._open.get(request.protocol)
        _refuse_encoded_body(request)
        if connection is None:  # being let go, or lost
            return await handler(request)
        connection.asked = True
        connection.serving += 1
        try:
            return await handler(request)
        finally:
            connection.serving -= 1

    async def stop(self) -> None:
        """Close the listener and every connection, ending the requests still in hand (after at most
        `shutdown_timeout_s`), even when the stop is cancelled again meanwhile (`seen_through`)."""
        runner, self.runner = self.runner, None
        if runner is not None:
            await seen_through(runner.cleanup())
        for connection in self._open.values():  # those aiohttp never knew: handshakes not done
            connection.close()
        self._open.clear()


class _HttpsSite(web.BaseSite):
    """HTTPS on a TCP port, the TLS layer put on each connection by the listener (`_Handshake`), which
    counts it at once, rather than by asyncio's server (`ssl=`), which shows it to aiohttp only once the
    handshake is done."""

    def __init__(self, runner: web.AppRunner, listener: HttpListener, host: str, port: int,
                 context: ssl.SSLContext) -> None:
        super().__init__(runner, ssl_context=context)
        self.listener, self.host, self.port, self.context = listener, host, port, context

    @property
    def name(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Handshake(self.listener, server(), self.context), self.host, self.port,
            reuse_address=True, backlog=self._backlog)


class _Handshake(sslproto.SSLProtocol):
    """asyncio's TLS layer (what `create_server(ssl=...)` puts under each connection) for one of aiohttp's
    connections, told to the listener from the moment the socket is accepted until it is lost, and
    given `first_request_s` for its handshake."""

    def __init__(self, listener: HttpListener, handler: RequestHandler, context: ssl.SSLContext) -> None:
        super().__init__(asyncio.get_running_loop(), handler, context, None, server_side=True,
                         ssl_handshake_timeout=listener.first_request_s, ssl_shutdown_timeout=TLS_GOODBYE_S)
        self.listener, self.handler = listener, handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.listener.admit(self.handler, transport)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.listener.forget(self.handler)  # aiohttp is told too, if the handshake was done
        super().connection_lost(exc)


def _refuse_encoded_body(request: web.Request) -> None:
    """A body sent with a Content-Encoding fails when read (`body_of` answers 400), in every handler's
    own words: it is not inflated (see the module's docstring), and read as it came it would be taken
    for plain bytes (a JSON body or a login form that means something else)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        request.content.set_exception(RequestPayloadError("a body sent with a Content-Encoding is not accepted"))


def refusal_headers(error: web.HTTPException, response: web.Response) -> web.Response:
    """`response`, a JSON refusal in `error`'s place, with the headers of `error` a client acts on: a 405's
    `Allow`, which methods the path takes (RFC 9110)."""
    if "Allow" in error.headers:
        response.headers["Allow"] = error.headers["Allow"]
    return response


def raised_at(error: BaseException) -> str:
    """The exception's type and the line that raised it, for the one log line of a handler's own fault:
    its message is left out, for it may quote a request's bytes (a token)."""
    frames = traceback.extract_tb(error.__traceback__)
    return f"{type(error).__name__} at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames \
        else type(error).__name__


async def serve_until_cancelled(start: Callable[[], Awaitable[Any]], stop: Callable[[], Awaitable[Any]]) -> None:
    """`start`, then serve until the task is cancelled, then always `stop` (an integration's `run`)."""
    await start()
    try:
        await asyncio.Event().wait()
    finally:
        await stop()
