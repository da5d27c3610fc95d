"""Every HTTP listener of the gateway (owner API, web app, metrics, OpenADR 3 callbacks) bounds its
connections: clients that connect and say nothing cannot use up the gateway's file descriptors.

Real aiohttp on 127.0.0.1 and raw sockets; every wait is for the server closing a socket (EOF), bounded.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from firmware_py.http_listener import HttpListener

WAIT_S = 5.0


@asynccontextmanager
async def listening(**bounds: float) -> AsyncIterator[tuple[str, int]]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    listener = HttpListener("test.listen", **bounds)
    await listener.start(app, lambda runner: web.TCPSite(runner, "127.0.0.1", 0))
    try:
        yield listener.bound[:2]
    finally:
        await listener.stop()


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
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT_S)


def test_connections_beyond_the_bound_are_closed_at_once_and_the_others_served():
    async def main() -> None:
        async with listening(max_connections=4, first_request_s=60) as address:
            kept = [await connect(address) for _ in range(4)]
            beyond = [await connect(address) for _ in range(3)]
            try:
                assert [await closed_by_server(s) for s in beyond] == [True, True, True]
                assert (await get(kept[0])).startswith(b"HTTP/1.1 200")
            finally:
                for s in kept + beyond:
                    s.close()

    asyncio.run(main())


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
