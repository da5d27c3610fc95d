"""One aiohttp application on one address: bound, served until cancelled, released, the one way.

The owner API, the web app and the metrics endpoint each serve their own small
application; what they share is how it listens. Binding comes first and on its own
(`start`), so an address that cannot be listened on stops `run` at start with exit 2
(an `InputError` naming the configuration key), never a restart loop; serving is a
task the service cancels (`run`); the runner is released whatever happened. No access
log: a request is the application's to narrate, and a token in a URL must never reach
a log line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from firmware_py.errors import InputError

SiteOf = Callable[[web.AppRunner], web.BaseSite]


class HttpListener:
    """An application bound to one address (`where` names its configuration key and value in messages)."""

    def __init__(self, where: str, *, shutdown_timeout_s: float = 1.0) -> None:
        self.where = where
        self.shutdown_timeout_s = shutdown_timeout_s
        self.runner: web.AppRunner | None = None

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
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.shutdown_timeout_s)
        await runner.setup()
        try:
            await site_of(runner).start()
        except OSError as err:
            await runner.cleanup()
            raise InputError(f"{self.where}: {err.strerror or err}") from None
        self.runner = runner

    async def stop(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()


async def serve_until_cancelled(start: Callable[[], Awaitable[Any]], stop: Callable[[], Awaitable[Any]]) -> None:
    """`start`, then serve until the task is cancelled, then always `stop` (an integration's `run`)."""
    await start()
    try:
        await asyncio.Event().wait()
    finally:
        await stop()
