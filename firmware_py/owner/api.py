"""The owner's local HTTP/JSON API: loopback or a Unix socket, bearer token required.

Only someone on the gateway who can read the token file may change the
reserve, so the API never listens beyond loopback and refuses to start when
the token file is readable by anyone but its owner. Every accepted change is
saved before the core hears of it: if the save fails the change is refused,
so what the core runs on is always what a restart will load.

    GET    /status                       settings, telemetry, floor
    PUT|POST /reserve    {"pct": N}
    PUT|POST /opt-out    {"now": true} | {"event": ID} | {"until": ISO-8601 or epoch}
    DELETE /opt-out                      revoke every opt-out
    PUT|POST /departure  {"time": "HH:MM", "soc_pct": N}
    DELETE /departure
    PUT|POST /storm-watch {"floor_pct": N, "until": ISO-8601 or epoch}
    DELETE /storm-watch
    PUT|POST /price      {"threshold_per_kwh": N, "max_wh_per_day": N, "kind": "EXPORT_PRICE"|"PRICE",
                          "power_w": N|null}   price-responsive mode (kind and power_w optional:
                                         absent, each keeps the one set before)
    DELETE /price                        price-responsive mode off
    GET    /api/status                   the live state (`powershare-gw status`)

Every change goes through `desk.OwnerDesk`, the same one the web app uses.

Instants the owner gives or reads (opt-out until, departure, storm watch until, `now`) are wall time,
UTC epoch seconds; the core gets them on its monotonic base (`firmware_py/clocks.py`).
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from firmware_py.clocks import Clocks
from firmware_py.config import OwnerConfig
from firmware_py.core.types import OwnerSettings
from firmware_py.http_listener import (
    MAX_BODY_BYTES,
    TOO_LARGE,
    BodyUnread,
    HttpListener,
    body_of,
    raised_at,
    refusal_headers,
    serve_until_cancelled,
)
from firmware_py.owner import OwnerPort
from firmware_py.owner.access import Listen, ensure_token, parse_listen
from firmware_py.owner.changes import BadRequest, parse_body
from firmware_py.owner.desk import CONTROLS, Control, NotApplied, OwnerDesk
from firmware_py.owner.store import OwnerStore, encode
from firmware_py.quoting import printable

log = logging.getLogger(__name__)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_response(status: int, payload: dict[str, Any]) -> web.Response:
    return web.json_response(payload, status=status)


class OwnerApi:
    """Serves the owner API for one running gateway (`port`)."""

    def __init__(self, config: OwnerConfig, port: OwnerPort, store: OwnerStore | None = None,
                 tz: dt.tzinfo | None = None, clocks: Clocks | None = None) -> None:
        self.config = config
        self.port = port
        self.clocks = clocks or Clocks.simulated(port.now)  # the gateway's pair; a port's own clock for both
        self.store = store or OwnerStore(config.settings_file, config.reserve_pct)
        self.desk = OwnerDesk(port, self.store, self.clocks, tz)
        self.listen = parse_listen(config.api_listen)
        self._token = ""
        # No per-address bound: the API listens on loopback or a Unix socket, where every client shares one address.
        self.listener = HttpListener(f"owner.api_listen: cannot listen on {self.listen.describe()}", per_address=None)

    @property
    def address(self) -> str:
        """Where it actually listens (the real port when configured with port 0)."""
        if not self.listener.listening or self.listen.unix_path:
            return self.listen.describe()
        host, port = self.listener.bound[:2]
        return Listen(host=host, port=port).describe()

    async def start(self) -> None:
        """Bind and serve in the background; InputError for a bad token file or address."""
        if self.listener.listening:
            return
        self._token = ensure_token(self.config.token_file)
        app = web.Application(middlewares=[self._errors_and_auth], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/status", self._status)
        app.router.add_get("/api/status", self._live_status)
        for control in CONTROLS:
            app.router.add_route("PUT", f"/{control.path}", self._setter(control))
            app.router.add_route("POST", f"/{control.path}", self._setter(control))
            if control.clear is not None:
                app.router.add_route("DELETE", f"/{control.path}", self._clearer(control))
        await self.listener.start(app, self._site)
        if self.listen.unix_path:
            os.chmod(self.listen.unix_path, 0o600)

    def _site(self, runner: web.AppRunner) -> web.BaseSite:
        if self.listen.unix_path:
            return web.UnixSite(runner, self.listen.unix_path)
        return web.TCPSite(runner, self.listen.host, self.listen.port, reuse_address=True)

    async def stop(self) -> None:
        if not self.listener.listening:
            return
        await self.listener.stop()
        if self.listen.unix_path:
            try:
                os.unlink(self.listen.unix_path)
            except FileNotFoundError:
                pass

    async def run(self) -> None:
        """Serve until cancelled (a dispatch-source-like task for the runtime)."""
        await serve_until_cancelled(self.start, self.stop)

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """401 before anything else; every refusal as JSON {"error": ...}."""
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        offered = token.strip().encode("utf-8", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(offered, self._token.encode()):
            response = _json_response(401, {"error": "missing or wrong bearer token"})
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        try:
            return await handler(request)
        except (BadRequest, BodyUnread) as err:
            return _json_response(400, {"error": str(err)})
        except web.HTTPRequestEntityTooLarge:  # as the web app answers it
            return _json_response(413, {"error": TOO_LARGE})
        except web.HTTPException as err:
            return refusal_headers(err, _json_response(err.status, {"error": err.reason}))
        except Exception as err:  # a fault of the gateway's: one line, not aiohttp's plain 500 and traceback
            log.error("owner API: %s %s failed: %s", request.method, printable(request.path[:120]), raised_at(err))
            return _json_response(500, {"error": "internal error: the gateway's log has a line about it"})

    async def _status(self, request: web.Request) -> web.Response:
        telemetry = self.port.telemetry()
        return _json_response(200, {
            "now": self.clocks.wall(),
            "settings": encode(self.desk.settings()),
            "floor_pct": telemetry.floor_pct,
            "telemetry": asdict(telemetry),
        })

    async def _live_status(self, request: web.Request) -> web.Response:
        return _json_response(200, self.port.status())

    async def _body(self, request: web.Request) -> Any:
        return parse_body(await body_of(request.read()))  # too large: 413; not whole in time, undecodable: 400

    def _setter(self, control: Control) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            body = await self._body(request)
            return await self._answer(self.desk.set(control, body))
        return handle

    def _clearer(self, control: Control) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            return await self._answer(self.desk.clear(control))
        return handle

    async def _answer(self, change: Awaitable[OwnerSettings]) -> web.Response:
        """The new settings, or why the change was not made: 500 not saved, 503 stopping (BadRequest is
        the middleware's 400)."""
        try:
            settings = await change
        except NotApplied as err:
            return _json_response(err.status, {"error": str(err)})
        return _json_response(200, {"settings": encode(settings)})
