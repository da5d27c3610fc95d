"""The owner's web app and its JSON API on `[web] listen` (docs/command-line.md), served by the gateway itself.

One aiohttp server: the page (hand-written HTML, CSS and JavaScript shipped in the
package, nothing fetched from anywhere at run time) and the API it calls. The API is
a thin adapter: reads come from the gateway's status document, the core's read
model and the journal; every change goes through the same `OwnerDesk` as the
loopback owner API, so it is validated by the same rules (`owner/changes.py`),
saved, fed to the core and journaled exactly like an `owner` command.

    GET  /                     the page; the login form without a session (GET /login: 303 to it)
    POST /login                form field `token` -> session cookie (HttpOnly, SameSite=Strict)
    POST /logout               ends the session
    GET  /api/session          the session's role and CSRF token
    GET  /api/status           the status document (`powershare-gw status`)
    GET  /api/settings         the owner's settings and what they imply
    GET  /api/departure-floor  ?at=ISO-8601|epoch&soc_pct=N: the floor that departure would make, before it is set
    GET  /api/history          the last 24 h from the journal, each event with its statement figures
    PUT  /api/reserve | opt-out | departure | storm-watch | price
    DELETE /api/opt-out | departure | storm-watch | price
    GET  /api/installer        (installer) configuration, links, fault latches
    POST /api/lockout-reset    (installer) the installer reset

Every /api request needs the session cookie or `Authorization: Bearer TOKEN`; every
change made with a session also needs its CSRF token in `X-CSRF-Token`. Without
them: 401. An owner asking for an installer's action: 403. A refused change: 400
with the reason. Bodies are at most 4 KiB (413 beyond); every GET answers HEAD too, and a
405 names the methods the path takes in `Allow`. Tokens never appear in a page, a log
line or the journal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from firmware_py.addresses import parse_host_port, parse_ip_listen
from firmware_py.certificates import load_chain
from firmware_py.config import Config
from firmware_py.core import floor as floors
from firmware_py.core.types import OwnerSettings
from firmware_py.errors import InputError
from firmware_py.files import regular_or_absent
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
from firmware_py.journal import codec
from firmware_py.owner.access import ensure_token, read_token
from firmware_py.owner.changes import BadRequest, parse_body
from firmware_py.owner.desk import CONTROLS, DEPARTURE, Control, NotApplied, OwnerDesk, Stopping
from firmware_py.owner.store import OwnerStore, encode
from firmware_py.quoting import printable
from firmware_py.web.history import HISTORY_S, read_history, with_figures
from firmware_py.web.installer import installer_view
from firmware_py.web.sessions import Clock, Keys, LoginThrottle, Role, Session, SessionBook

if TYPE_CHECKING:
    from firmware_py.gateway import Gateway

log = logging.getLogger(__name__)

COOKIE = "psgw_session"
CSRF_HEADER = "X-CSRF-Token"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
PAGES = ("index.html", "login.html")
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
"""On every response: the page runs only its own script, cannot be framed, and nothing is cached."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Caller:
    """Who made a request: the role, and the session when it came with one (a bearer token has none)."""

    role: Role
    session: Session | None


CallerHandler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


class Refused(Exception):
    """A request the API answers with `status` and a reason (401, 403, 429)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def check(config: Config, owner_uid: int | None = None) -> list[str]:
    """What `check-config` and `run` refuse before anything opens: the address, TLS files, the token file
    (one there already is read as the web app's start reads it: private to `owner_uid`, None: this user)."""
    web_config, problems = config.web, []
    try:
        parse_ip_listen(web_config.listen, "web.listen", "e.g. 0.0.0.0 for every interface, or the gateway's "
                        "LAN address")
    except InputError as err:
        problems += err.problems
    token_file = web_config.installer_token_file
    if problem := regular_or_absent(token_file, "installer token file"):
        problems.append(f"web.installer_token_file: {problem}")
    elif os.path.exists(token_file):  # absent: made at the first start
        try:
            read_token(token_file, check_private=True, owner_uid=owner_uid, what="installer token")
        except InputError as err:
            problems += [f"web.installer_token_file: {p}" for p in err.problems]
    try:
        tls_context(config)
    except InputError as err:
        problems += err.problems
    return problems


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context from `tls_cert` and `tls_key` (both set), or None (both empty: plain HTTP)."""
    cert, key = config.web.tls_cert, config.web.tls_key
    if not cert and not key:
        return None
    if not cert or not key:
        raise InputError("web.tls_cert, web.tls_key: set both (HTTPS) or neither (plain HTTP)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_chain(context, cert, key, "web.tls_cert, web.tls_key")
    return context


def _assets() -> dict[str, bytes]:
    """The page and its script and style, read once from the package."""
    folder = resources.files("firmware_py.web").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in (*PAGES, *ASSETS)}


def _json(status: int, payload: Any) -> web.Response:
    """JSON that a browser's parser takes: no NaN or Infinity (codec writes them as text)."""
    text = json.dumps(codec.jsonable(payload), allow_nan=False, separators=(",", ":"))
    return web.Response(status=status, text=text, content_type="application/json")


def _query_value(text: str | None) -> Any:
    """A query parameter as JSON reads it ("60" a number), else the text as it came: the change's rule
    then judges it as it would in a body. Only a single JSON value is read: a list or an object is kept
    as text (no rule takes one), because JSON's parser recurses into nested ones, and 2,000 '[' in a URL
    raised RecursionError, a 500 and a traceback in the log instead of the 400 any other bad value gets."""
    if text is None:
        return None
    if text.lstrip()[:1] in ("[", "{"):
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


class WebApp:
    """The web app for one running gateway: an integration in `assembly.INTEGRATIONS` (`[web]`)."""

    def __init__(self, config: Config, gateway: Gateway, *, clock: Clock | None = None,
                 store: OwnerStore | None = None) -> None:
        self.config = config
        self.gateway = gateway
        self.clocks = gateway.clocks
        self.host, self.port = parse_host_port(config.web.listen, "web.listen")
        store = store or OwnerStore(config.owner.settings_file, config.owner.reserve_pct)
        self.desk = OwnerDesk(gateway, store, gateway.clocks)
        clock = clock or gateway.clocks.monotonic
        self.sessions = SessionBook(clock)
        self.throttle = LoginThrottle(clock)
        self.tls = bool(config.web.tls_cert)
        self._keys: Keys | None = None
        self._assets: dict[str, bytes] = {}
        self.listener = HttpListener(f"web.listen: cannot listen on {config.web.listen}")
        self.history_reads = asyncio.Lock()
        """Held by each History read: one at a time, each in its worker thread, so requests at once wait
        their turn rather than each holding a day's read beside the others."""

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    async def start(self, sink: Any = None) -> int:
        """Read the tokens (the installer's created 0600 on first start) and bind; InputError when it cannot."""
        if self.listener.listening:
            return self.port
        owner = ensure_token(self.config.owner.token_file)
        installer = ensure_token(self.config.web.installer_token_file, what="installer token")
        self._keys = Keys(owner=owner, installer=installer)
        self._assets = _assets()
        tls = tls_context(self.config)
        await self.listener.start(self._application(), lambda runner: web.TCPSite(
            runner, self.host, self.port, reuse_address=True) if tls is None
            else self.listener.https_site(runner, self.host, self.port, tls))
        self.port = self.listener.bound[1]
        log.info("web app on %s (owner and installer logins)", self.url)
        return self.port

    async def run(self, sink: Any = None) -> None:
        """Serve until cancelled."""
        await serve_until_cancelled(self.start, self.stop)

    async def stop(self) -> None:
        await self.listener.stop()

    def _application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        add, get = app.router.add_route, app.router.add_get  # add_get answers HEAD too
        get("/", self._page)
        get("/login", self._to_page)
        add("POST", "/login", self._login)
        for name in ASSETS:
            get(f"/{name}", self._asset)
        known = self._known
        add("POST", "/logout", known(self._logout))
        get("/api/session", known(self._session))
        get("/api/status", known(self._status))
        get("/api/settings", known(self._settings))
        get("/api/departure-floor", known(self._departure_floor))
        get("/api/history", known(self._history))
        get("/api/installer", known(self._installer, Role.INSTALLER))
        add("POST", "/api/lockout-reset", known(self._lockout_reset, Role.INSTALLER))
        for control in CONTROLS:
            add("PUT", f"/api/{control.path}", known(self._setter(control)))
            if control.clear is not None:
                add("DELETE", f"/api/{control.path}", known(self._clearer(control)))
        return app

    def _known(self, handler: CallerHandler, role: Role = Role.OWNER) -> Handler:
        """`handler` for identified callers with at least `role` only: every /api route is built through here."""
        async def guarded(request: web.Request) -> web.StreamResponse:
            caller = self._identify(request)
            if role is Role.INSTALLER and caller.role is not Role.INSTALLER:
                raise Refused(403, "for the installer only: log in with the installer token")
            return await handler(request, caller)
        return guarded

    # --- who is asking ------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every refusal and every fault as JSON; every response with the security headers."""
        try:
            response = await handler(request)
        except Refused as err:
            response = _json(err.status, {"error": str(err)})
            if err.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="powershare-gw"'
        except (BadRequest, BodyUnread) as err:
            response = _json(400, {"error": str(err)})
        except NotApplied as err:
            response = _json(err.status, {"error": str(err)})
        except web.HTTPRequestEntityTooLarge:
            response = _json(413, {"error": TOO_LARGE})
        except web.HTTPException as err:
            if err.status < 400:
                raise
            response = refusal_headers(err, _json(err.status, {"error": err.reason}))
        except Exception as err:  # a fault of the gateway's: one line, not aiohttp's plain 500 and traceback
            log.error("web app: %s %s failed: %s", request.method, printable(request.path[:120]), raised_at(err))
            response = _json(500, {"error": "internal error: the gateway's log has a line about it"})
        response.headers.update(SECURITY_HEADERS)
        return response

    def _identify(self, request: web.Request) -> Caller:
        """The bearer token's role, or the session's (a change with a session also needs its CSRF token);
        Refused(401) otherwise."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            client = request.remote or "unknown"
            wait, when = self.throttle.attempt(client)
            if wait > 0:  # a wrong bearer token is a failed login like a wrong one in the form
                raise Refused(429, f"too many failed logins: try again in {wait:.0f} s")
            role = self._keys.role_of(token) if self._keys else None
            if role is None:
                raise Refused(401, "wrong bearer token")
            self.throttle.take_back(client, when)
            return Caller(role, None)
        session = self.sessions.find(request.cookies.get(COOKIE))
        if session is None:
            raise Refused(401, "log in first (or send Authorization: Bearer TOKEN)")
        if request.method not in ("GET", "HEAD") and not session.csrf_ok(request.headers.get(CSRF_HEADER)):
            raise Refused(401, f"missing or wrong CSRF token (send the session's token in {CSRF_HEADER})")
        return Caller(session.role, session)

    # --- pages and login ----------------------------------------------------------------------

    def _html(self, name: str, status: int = 200, message: str = "") -> web.Response:
        body = self._assets[name].decode()
        if message:  # only our own fixed texts: never anything a client sent
            body = body.replace("<!--message-->", f'<p class="error" id="login-error" role="alert">{message}</p>')
        return web.Response(status=status, text=body, content_type="text/html")

    async def _page(self, request: web.Request) -> web.Response:
        session = self.sessions.find(request.cookies.get(COOKIE))
        return self._html("index.html" if session is not None else "login.html")

    async def _to_page(self, request: web.Request) -> web.Response:
        """`/login` in the address bar (where a refused token left it, reloaded or bookmarked): the page."""
        response = web.HTTPSeeOther("/")
        response.headers.update(SECURITY_HEADERS)
        raise response

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.path.lstrip("/")
        return web.Response(body=self._assets[name], content_type=ASSETS[name])

    async def _login(self, request: web.Request) -> web.Response:
        client = request.remote or "unknown"
        wait, when = self.throttle.attempt(client)  # counted as failed before the body is awaited
        if wait > 0:
            response = self._html("login.html", 429, f"Too many failed logins: try again in {wait:.0f} s.")
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        try:
            form = await body_of(request.post())
        except (ValueError, LookupError):  # a body aiohttp cannot read as the form (an unknown charset, no boundary)
            form = {}  # no token offered: a failed login like any other, counted by the throttle
        except BodyUnread:  # no guess was made: not counted
            self.throttle.take_back(client, when)
            return self._html("login.html", 400, "The login form was not received whole: try again.")
        except BaseException:  # too large (aiohttp's 413) or the client gone: no guess made either
            self.throttle.take_back(client, when)
            raise
        offered = form.get("token")
        role = self._keys.role_of(offered) if isinstance(offered, str) and self._keys else None
        if role is None:
            log.warning("web: failed login from %s (%d within %.0f s)", printable(client),
                        self.throttle.failures(client), self.throttle.window_s)
            return self._html("login.html", 401, "That token is not valid.")
        self.throttle.take_back(client, when)
        self.throttle.succeeded(client)
        session = self.sessions.start(role)
        log.info("web: %s logged in from %s", role, printable(client))
        response = web.HTTPSeeOther("/")
        response.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", secure=self.tls, path="/")
        response.headers.update(SECURITY_HEADERS)
        raise response

    async def _logout(self, request: web.Request, caller: Caller) -> web.Response:
        """End the caller's session. A bearer token has none: saying it logged out (and deleting a cookie
        that came along) would leave a script, or the browser's session, believing in an end that never was."""
        session = caller.session
        if session is None:
            return _json(400, {"error": "a bearer token has no session to end: log out with the session cookie"})
        self.sessions.end(session.id)
        log.info("web: %s logged out", session.role)
        response = _json(200, {"logged_out": True})
        response.del_cookie(COOKIE, path="/")
        return response

    # --- reads --------------------------------------------------------------------------------

    async def _session(self, request: web.Request, caller: Caller) -> web.Response:
        session = caller.session
        return _json(200, {"role": str(caller.role), "csrf_token": session.csrf if session else None})

    async def _status(self, request: web.Request, caller: Caller) -> web.Response:
        return _json(200, self.gateway.status())

    async def _settings(self, request: web.Request, caller: Caller) -> web.Response:
        """The owner's settings (wall time) and what they imply now: the floor the departure asks for."""
        return _json(200, {"settings": encode(self.desk.settings()), "now": self.clocks.wall(),
                           "departure_floor": self._departure_floor_of(self.gateway.owner_settings()),
                           "can_charge": self.gateway.policy.max_charge_w > 0})

    async def _departure_floor(self, request: web.Request, caller: Caller) -> web.Response:
        """The floor a departure (`?at=ISO-8601&soc_pct=N`) would make, before the owner sets it: the page
        worked it out itself from the reserve and the departure alone and promised 57 % where the gateway,
        with a storm watch at 75 %, applied 77 %. Now it is the change's own rules (`OwnerDesk.preview`:
        refused the same) and the core's floor."""
        body = {"at": _query_value(request.query.get("at")), "soc_pct": _query_value(request.query.get("soc_pct"))}
        return _json(200, self._departure_floor_of(self.desk.preview(DEPARTURE, body)))

    def _departure_floor_of(self, owner: OwnerSettings) -> dict[str, float] | None:
        """The whole floor (reserve, hard minimum, storm watch, margin: `floor.floor_pct`) that `owner`'s
        departure makes now and at departure; None without a departure ahead."""
        policy, now, at = self.gateway.policy, self.gateway.now(), owner.departure_at
        if at is None or owner.departure_soc_pct is None or at <= now:
            return None
        return {"now_pct": round(floors.floor_pct(policy, owner, now), 2),
                "at_departure_pct": round(floors.floor_pct(policy, owner, at), 2)}

    async def _history(self, request: web.Request, caller: Caller) -> web.Response:
        """The day from the journal; each event with its statement figures (computed off the loop, when due)."""
        now = self.clocks.wall()
        earnings = self.gateway.earnings
        await earnings.refresh(now - HISTORY_S)
        journal = self.config.journal
        async with self.history_reads:
            doc = await asyncio.to_thread(read_history, journal.path, now, journal.sample_interval_s)
        return _json(200, with_figures(doc, *earnings.figures(now - HISTORY_S)))

    async def _installer(self, request: web.Request, caller: Caller) -> web.Response:
        now = self.gateway.now()
        return _json(200, installer_view(self.config, self.gateway.telemetry(), self.gateway.links.view(now),
                                         self.clocks.to_wall(now)))

    # --- changes ------------------------------------------------------------------------------

    async def _lockout_reset(self, request: web.Request, caller: Caller) -> web.Response:
        if self.gateway.stopping:
            raise Stopping("the lockout was not reset")
        cleared = await self.gateway.reset_lockout()
        log.info("web: installer reset (%s)", "lockout cleared" if cleared else "there was no lockout")
        return _json(200, {"cleared": cleared, "status": self.gateway.status()})

    def _setter(self, control: Control) -> CallerHandler:
        async def handle(request: web.Request, caller: Caller) -> web.Response:
            body = await self._body(request)
            return _json(200, {"settings": encode(await self.desk.set(control, body))})
        return handle

    def _clearer(self, control: Control) -> CallerHandler:
        async def handle(request: web.Request, caller: Caller) -> web.Response:
            return _json(200, {"settings": encode(await self.desk.clear(control))})
        return handle

    @staticmethod
    async def _body(request: web.Request) -> Any:
        return parse_body(await body_of(request.read()))  # too large: the guard's 413; not whole in time, undecodable: its 400
