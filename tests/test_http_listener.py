"""Every HTTP listener of the gateway (owner API, web app, metrics, OpenADR 3 callbacks) bounds its
connections: clients that connect and say nothing cannot use up the gateway's file descriptors.

Real aiohttp on 127.0.0.1 and raw sockets; every wait is for the server closing a socket (EOF), bounded.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import io
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import StreamReader, web

from firmware_py import narration
from firmware_py.http_listener import (
    REFUSED_BURST,
    REFUSED_WINDOW_S,
    BodyUnread,
    HttpListener,
    RefusedRequests,
    body_of,
    serve_until_cancelled,
)
from firmware_py.tasks import cancel_all

WAIT_S = 5.0
BODY_S = 0.2  # the test application's body deadline


class Hold:
    """Requests to `/hold` are told to `arrived` (in the handler: the request is in hand) and answered on `release`."""

    def __init__(self) -> None:
        self.arrived: asyncio.Queue[str] = asyncio.Queue()
        self.release = asyncio.Event()


def application(held: Hold | None = None) -> web.Application:
    """The test application: `/` says hello, `/echo` reads a body, `/hold` answers once `held` is released."""
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def hold(request: web.Request) -> web.Response:
        assert held is not None
        held.arrived.put_nowait(request.path)
        await held.release.wait()
        return web.Response(text="held")

    async def echo(request: web.Request) -> web.Response:
        try:
            body = await body_of(request.read(), deadline_s=BODY_S)
        except BodyUnread as err:
            return web.Response(status=400, text=str(err))
        return web.Response(text=f"{len(body)} bytes")

    async def unread(request: web.Request) -> web.Response:
        await request.content.wait_eof()  # the body arrived, and the handler never read it
        return web.Response(status=401, text=f"{request.content.total_bytes} bytes arrived")

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_post("/echo", echo)
    app.router.add_get("/hold", hold)
    app.router.add_post("/unread", unread)
    return app


def on_loopback(runner: web.AppRunner) -> web.BaseSite:
    return web.TCPSite(runner, "127.0.0.1", 0)


@asynccontextmanager
async def listening(held: Hold | None = None, **bounds: float) -> AsyncIterator[tuple[str, int]]:
    """The test application served on a port of its own."""
    listener = HttpListener("test.listen", **bounds)
    await listener.start(application(held), on_loopback)
    try:
        yield listener.bound[:2]
    finally:
        await listener.stop()


@asynccontextmanager
async def listening_https(folder: Path, **bounds: float) -> AsyncIterator[tuple[HttpListener, ssl.SSLContext]]:
    """The test application over HTTPS with a certificate made here, and a client context trusting it."""
    from test_web import self_signed

    cert, key = self_signed(folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = HttpListener("test.listen", **bounds)
    await listener.start(application(), lambda runner: listener.https_site(runner, "127.0.0.1", 0, context))
    try:
        yield listener, ssl.create_default_context(cafile=str(cert))
    finally:
        await listener.stop()


async def https_get(address: tuple[str, int], client: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*address, ssl=client), WAIT_S)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), WAIT_S)
    finally:
        writer.close()


async def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=WAIT_S)
    sock.setblocking(False)
    return sock


async def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed `sock` (EOF or reset) within WAIT_S; False if it is still open then."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 1), WAIT_S) == b""
    except ConnectionResetError:
        return True
    except asyncio.TimeoutError:
        return False


async def get(sock: socket.socket) -> bytes:
    return await send(sock, b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")


async def send(sock: socket.socket, raw: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, raw)
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT_S)


def test_connections_beyond_the_bound_close_the_oldest_silent_ones_at_once_and_the_others_are_served(caplog):
    async def main() -> None:
        async with listening(max_connections=4, per_address=None, first_request_s=60) as address:
            oldest = [await connect(address) for _ in range(3)]
            newest = [await connect(address) for _ in range(4)]
            try:
                assert [await closed_by_server(s) for s in oldest] == [True, True, True]
                for s in newest:
                    assert (await get(s)).startswith(b"HTTP/1.1 200")
            finally:
                for s in oldest + newest:
                    s.close()

    asyncio.run(main())
    gc.collect()  # a task that failed unseen is reported when it is collected
    assert "Task exception was never retrieved" not in caplog.text and "AssertionError" not in caplog.text


def test_a_body_that_does_not_arrive_in_time_is_refused_and_its_connection_let_go():
    """Headers, then part of the body, then nothing: aiohttp waited for the rest for ever, so 64 such
    clients held every connection and the owner got no page."""
    async def main() -> None:
        async with listening(first_request_s=60, idle_s=60) as address:
            sock = await connect(address)
            try:
                answer = await send(sock, b"POST /echo HTTP/1.1\r\nHost: g\r\nContent-Length: 100\r\n\r\ntoken=")
                assert answer.startswith(b"HTTP/1.1 400") and b"did not arrive within" in answer
            finally:
                sock.close()

    asyncio.run(main())


def test_a_body_that_cannot_be_decoded_is_refused_in_one_line_not_a_traceback(caplog):
    async def main() -> None:
        async with listening() as address:
            sock = await connect(address)
            try:
                answer = await send(sock, b"POST /echo HTTP/1.1\r\nHost: g\r\nContent-Encoding: gzip\r\n"
                                          b"Content-Length: 8\r\n\r\nnot gzip")
                assert answer.startswith(b"HTTP/1.1 400") and b"could not be read: a body sent with" in answer
            finally:
                sock.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_gzip_body_is_never_inflated_and_refused_as_400_when_read(caplog):
    """aiohttp inflated a `Content-Encoding: gzip` body on the event loop as it arrived, even for a handler
    that never read it: 1 MiB sent without a token stalled the gateway about 1 s. It now arrives as sent,
    and a handler reading it answers 400 (a gzipped JSON body is not taken for plain bytes either)."""
    packed = gzip.compress(b"0" * 1_000_000)

    def post(path: str) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: g\r\nContent-Encoding: gzip\r\n"
                f"Content-Length: {len(packed)}\r\n\r\n").encode() + packed

    async def main() -> None:
        async with listening() as address:
            for path, expected in (("/unread", b"HTTP/1.1 401"), ("/echo", b"HTTP/1.1 400")):
                sock = await connect(address)
                try:
                    answers[path] = await send(sock, post(path))
                    assert answers[path].startswith(expected), answers[path]
                finally:
                    sock.close()

    answers: dict[str, bytes] = {}
    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert f"{len(packed)} bytes arrived".encode() in answers["/unread"]
    assert b"could not be read: a body sent with a Content-Encoding is not accepted" in answers["/echo"]
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_malformed_request_is_logged_without_the_bytes_it_carried():
    """aiohttp's message quotes the raw header line: the bearer token reached the log with it. With
    logging set up as `run` does: the line, left aiohttp's, was below the level its lines are held to."""
    async def main() -> None:
        async with listening() as address:
            sock = await connect(address)
            try:
                answer = await send(sock, b"GET / HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer s3cret-t0ken\x01\r\n\r\n")
                assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
            finally:
                sock.close()

    said = io.StringIO()
    narration.configure_logging(stream=said)
    asyncio.run(main())
    assert "INFO firmware_py.http_listener: HTTP: refused a malformed request: Invalid header value char" \
        in said.getvalue()
    assert "s3cret-t0ken" not in said.getvalue() and "Traceback" not in said.getvalue()


def test_a_flood_of_malformed_requests_costs_a_few_log_lines_not_one_each(caplog):
    """Anyone on the home network reaches the web app: 1,000 malformed requests in 1.6 s once wrote
    1,000 log lines. The first few are said one by one, the rest counted when the minute ends."""
    async def main() -> None:
        async with listening() as address:
            for _ in range(3 * REFUSED_BURST):
                sock = await connect(address)
                try:
                    assert (await send(sock, b"GET /x y z\r\n\r\n")).startswith(b"HTTP/1.0 400")
                finally:
                    sock.close()

    caplog.set_level(logging.INFO, logger="firmware_py.http_listener")
    asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert said == ["HTTP: refused a malformed request: Bad status line"] * REFUSED_BURST


def test_the_refusals_not_said_one_by_one_are_counted_once_the_window_ends(caplog):
    clock = [0.0]
    refusals = RefusedRequests(clock=lambda: clock[0])
    caplog.set_level(logging.INFO, logger="firmware_py.http_listener")
    for _ in range(REFUSED_BURST + 3):
        refusals.refused("Bad status line")
    clock[0] = REFUSED_WINDOW_S
    refusals.refused("Invalid method")  # no event loop: the count is said with the next refusal
    assert [r.getMessage() for r in caplog.records] == ["HTTP: refused a malformed request: Bad status line"] * \
        REFUSED_BURST + ["HTTP: refused 3 more malformed request(s) in 60 s, not logged one by one",
                         "HTTP: refused a malformed request: Invalid method"]


def test_a_connection_without_a_request_is_closed_and_one_that_asked_is_kept():
    async def main() -> None:
        async with listening(first_request_s=0.2, idle_s=60) as address:
            silent, asking = await connect(address), await connect(address)
            try:
                assert (await get(asking)).startswith(b"HTTP/1.1 200")
                assert await closed_by_server(silent)
                assert (await get(asking)).startswith(b"HTTP/1.1 200")  # well past the first request's deadline
            finally:
                silent.close()
                asking.close()

    asyncio.run(main())


def test_half_sent_requests_filling_the_bound_do_not_lock_out_a_client_that_asks(caplog):
    """Connections that send half a header line and wait filled the bound, and every later connection
    (the owner's too) was closed at once: the oldest without a request now goes instead."""
    async def main() -> None:
        async with listening(max_connections=4, per_address=None, first_request_s=60, idle_s=60) as address:
            loop = asyncio.get_running_loop()
            stalled = [await connect(address) for _ in range(4)]
            for s in stalled:
                await loop.sock_sendall(s, b"GET / HTTP/1.1\r\nHost: g")
            newcomers = []
            try:
                for n in range(3):
                    newcomers.append(await connect(address))
                    assert await closed_by_server(stalled[n])  # the oldest half-sent one made room
                    assert (await get(newcomers[-1])).startswith(b"HTTP/1.1 200")
                assert not await closed_by_server_soon(stalled[3])
            finally:
                for s in stalled + newcomers:
                    s.close()

    asyncio.run(main())
    gc.collect()
    assert "Task exception was never retrieved" not in caplog.text and "AssertionError" not in caplog.text


def test_connections_kept_alive_between_requests_make_room_as_silent_ones_do():
    """Complete requests on every connection, then idle until the keep-alive ends, locked everyone else out
    as well as half-sent ones did: a connection with no request in hand is let go, oldest first."""
    async def main() -> None:
        async with listening(max_connections=2, per_address=None, first_request_s=60, idle_s=60) as address:
            asked = [await connect(address) for _ in range(2)]
            late = None
            try:
                for s in asked:
                    assert (await get(s)).startswith(b"HTTP/1.1 200")
                late = await connect(address)
                assert await closed_by_server(asked[0])
                assert (await get(late)).startswith(b"HTTP/1.1 200")
                assert (await get(asked[1])).startswith(b"HTTP/1.1 200")
            finally:
                for s in asked + ([late] if late else []):
                    s.close()

    asyncio.run(main())


def test_connections_in_the_middle_of_a_request_are_kept_and_the_newcomer_closed_when_all_are():
    async def main() -> None:
        held = Hold()
        async with listening(held, max_connections=2, per_address=None, first_request_s=60, idle_s=60) as address:
            loop = asyncio.get_running_loop()
            busy = [await connect(address) for _ in range(2)]
            late = None
            try:
                for s in busy:
                    await loop.sock_sendall(s, b"GET /hold HTTP/1.1\r\nHost: gateway\r\n\r\n")
                    await asyncio.wait_for(held.arrived.get(), WAIT_S)
                late = await connect(address)
                assert await closed_by_server(late)
                held.release.set()
                for s in busy:
                    assert (await asyncio.wait_for(loop.sock_recv(s, 4096), WAIT_S)).startswith(b"HTTP/1.1 200")
            finally:
                for s in busy + ([late] if late else []):
                    s.close()

    asyncio.run(main())


def test_one_address_holds_at_most_per_address_connections_its_oldest_idle_let_go_first():
    async def main() -> None:
        held = Hold()
        async with listening(held, max_connections=64, per_address=3, first_request_s=60, idle_s=60) as address:
            loop = asyncio.get_running_loop()
            first = [await connect(address) for _ in range(3)]
            fourth = None
            try:
                await loop.sock_sendall(first[0], b"GET /hold HTTP/1.1\r\nHost: gateway\r\n\r\n")
                await asyncio.wait_for(held.arrived.get(), WAIT_S)  # a request in hand: kept
                fourth = await connect(address)
                assert await closed_by_server(first[1])  # the oldest with none
                assert not await closed_by_server_soon(first[2])
                assert (await get(fourth)).startswith(b"HTTP/1.1 200")
                held.release.set()
                assert (await asyncio.wait_for(loop.sock_recv(first[0], 4096), WAIT_S)).startswith(b"HTTP/1.1 200")
            finally:
                for s in first + ([fourth] if fourth else []):
                    s.close()

    asyncio.run(main())


async def closed_by_server_soon(sock: socket.socket, within_s: float = 0.3) -> bool:
    """True if the server closed `sock` within `within_s` (a short wait, to see it is still open)."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 1), within_s) == b""
    except ConnectionResetError:
        return True
    except asyncio.TimeoutError:
        return False


def test_a_stop_cancelled_again_while_it_waits_still_ends_the_requests_in_hand():
    """A service's stop cancels its tasks again every `CANCEL_AGAIN_S` (0.5 s) until they end; the listener's
    graceful wait is 1 s. Cut short, aiohttp skipped ending the requests still in hand: a handler ran on, and
    answered, after the gateway had stopped. The request is now ended with the listener."""
    async def main() -> None:
        held = Hold()
        listener = HttpListener("test.listen", shutdown_timeout_s=1.0)
        serving = asyncio.create_task(serve_until_cancelled(lambda: listener.start(application(held), on_loopback),
                                                            listener.stop))
        async with asyncio.timeout(WAIT_S):
            while not listener.listening:
                await asyncio.sleep(0)
        sock = await connect(listener.bound[:2])
        try:
            await asyncio.get_running_loop().sock_sendall(sock, b"GET /hold HTTP/1.1\r\nHost: gateway\r\n\r\n")
            await asyncio.wait_for(held.arrived.get(), WAIT_S)
            await cancel_all([serving])
            assert await closed_by_server(sock)
        finally:
            held.release.set()
            sock.close()

    asyncio.run(main())


def test_a_body_whose_client_left_before_its_request_was_in_hand_is_unread_not_a_handler_failure():
    """Under a flood, a client can go between aiohttp parsing its request and making it the connection's
    current one: nothing then marks the body as lost, and reading it raises RuntimeError("Connection
    closed."), which the owner API logged as its own failure (ERROR, a 500). The handler here meets
    that state as aiohttp leaves it: the connection gone, a body stream on it told nothing."""
    outcome: asyncio.Queue[str] = asyncio.Queue()

    async def late(request: web.Request) -> web.Response:
        async with asyncio.timeout(WAIT_S):
            while request.transport is not None:  # the server has seen the client go
                await asyncio.sleep(0.01)
        body = StreamReader(request.protocol, 2**16, loop=asyncio.get_running_loop())
        try:
            await body_of(body.read(), deadline_s=BODY_S)
        except Exception as err:  # noqa: BLE001 - what the test reports
            outcome.put_nowait(f"{type(err).__name__}: {err}")
            raise
        outcome.put_nowait("read")
        return web.Response(text="read")

    async def main() -> str:
        app = web.Application()
        app.router.add_post("/late", late)
        listener = HttpListener("test.listen")
        await listener.start(app, on_loopback)
        try:
            sock = await connect(listener.bound[:2])
            await asyncio.get_running_loop().sock_sendall(
                sock, b"POST /late HTTP/1.1\r\nHost: g\r\nContent-Length: 100\r\n\r\npart")
            sock.close()
            return await asyncio.wait_for(outcome.get(), WAIT_S)
        finally:
            await listener.stop()

    assert asyncio.run(main()) == "BodyUnread: the request body could not be read: the client closed the connection"


def test_https_sockets_that_never_start_their_handshake_are_bounded_as_any_other(tmp_path):
    """aiohttp sees an HTTPS connection only once its TLS handshake is done, and asyncio waits 60 s for
    one: a hundred sockets from one address that never sent a hello were all kept. They are counted
    from the accept now, and a client that completes its handshake is counted once, not again."""
    async def main() -> None:
        async with listening_https(tmp_path, max_connections=64, per_address=3, first_request_s=60,
                                   idle_s=60) as (listener, client):
            address = listener.bound[:2]
            silent = [await connect(address) for _ in range(5)]
            try:
                assert [await closed_by_server(s) for s in silent[:2]] == [True, True]
                assert (await https_get(address, client)).startswith(b"HTTP/1.1 200")
                assert await closed_by_server(silent[2])  # the oldest silent one made room for the client
                assert [await closed_by_server_soon(s) for s in silent[3:]] == [False, False]
            finally:
                for s in silent:
                    s.close()

    asyncio.run(main())


def test_an_https_socket_silent_past_the_first_request_deadline_is_closed_and_a_stop_closes_the_rest(tmp_path):
    """The handshake shares the first request's deadline; a stop closes handshakes aiohttp never saw."""
    async def main() -> None:
        async with listening_https(tmp_path, first_request_s=0.2, idle_s=60) as (listener, client):
            address = listener.bound[:2]
            silent = await connect(address)
            try:
                assert await closed_by_server(silent)
                assert (await https_get(address, client)).startswith(b"HTTP/1.1 200")
            finally:
                silent.close()
        async with listening_https(tmp_path, first_request_s=60, idle_s=60) as (listener, client):
            silent = await connect(listener.bound[:2])
            try:
                assert not await closed_by_server_soon(silent)
                await listener.stop()
                assert await closed_by_server(silent)
            finally:
                silent.close()

    asyncio.run(main())


def test_an_https_connection_let_go_gets_a_tls_goodbye_not_a_cut_socket(tmp_path):
    """The listener closed the socket under a finished TLS session, and a strict client (OpenSSL 3's
    `s_client`, a reader refusing ragged EOFs) saw "unexpected eof": aiohttp's TLS transport is closed
    now, which sends the TLS goodbye (close_notify) first."""
    def read_until_closed(address: tuple[str, int], client: ssl.SSLContext) -> str:
        with client.wrap_socket(socket.create_connection(address, timeout=WAIT_S), server_hostname="127.0.0.1",
                                suppress_ragged_eofs=False) as tls:
            try:
                while tls.recv(4096):
                    pass
            except ssl.SSLError as err:
                return f"cut: {err.reason}"
            return "goodbye"

    async def main() -> None:
        async with listening_https(tmp_path, first_request_s=0.2, idle_s=60) as (listener, client):
            said = await asyncio.wait_for(asyncio.to_thread(read_until_closed, listener.bound[:2], client), WAIT_S)
            assert said == "goodbye"

    asyncio.run(main())
