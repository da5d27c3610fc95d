"""The web app's server and JSON API (issue 14): a real aiohttp server on 127.0.0.1 in front of a real gateway.

The gateway runs in lock-step (`lockstep.Rig`: the simulated pack and BMS on a
virtual CAN bus, the simulated inverter over Modbus TCP, the journal in SQLite),
built by `assemble` with `[web] enabled`, so the web app is the integration `run`
starts. A real HTTP client logs in, keeps the cookie and sends what a browser or a
script would. Time is the rig's: the login throttle and sessions run on its
monotonic clock, so nothing here waits on the real one. The browser itself is
driven in `test_web_browser.py`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import logging
import os
import sqlite3
import stat
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from lockstep import Rig

from firmware_py import cli
from firmware_py.config import Config
from firmware_py.core import Mode
from firmware_py.core.types import DispatchKind, DispatchRequest, PriceInterval, PriceKind, Verdict
from firmware_py.errors import InputError
from firmware_py.journal import Journal, RecordKind
from firmware_py.narration import Narrator
from firmware_py.web import server
from firmware_py.web.history import MAX_POINTS, read_history
from firmware_py.web.installer import REDACTED, redacted
from firmware_py.web.server import COOKIE, CSRF_HEADER, WebApp, check
from firmware_py.web.sessions import LoginThrottle


def web_enabled(tmp: Path, **web: Any):
    def configure(config: Config) -> Config:
        settings = {"enabled": True, "listen": "127.0.0.1:0", "installer_token_file": str(tmp / "installer.token"),
                    **web}
        return replace(config, web=replace(config.web, **settings))
    return configure


class Client:
    """One HTTP client with its own cookie jar: a browser tab, or a script with a bearer token."""

    def __init__(self, app: WebApp, session: aiohttp.ClientSession, ssl: Any = None) -> None:
        self.app, self.http, self.ssl = app, session, ssl
        self.csrf: str | None = None

    async def call(self, method: str, path: str, body: Any = None, *, csrf: bool = True,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        sent = dict(headers or {})
        if csrf and self.csrf:
            sent[CSRF_HEADER] = self.csrf
        async with self.http.request(method, self.app.url.rstrip("/") + path, headers=sent, ssl=self.ssl,
                                     data=None if body is None else json.dumps(body),
                                     allow_redirects=False) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    async def login(self, token: str) -> aiohttp.ClientResponse:
        async with self.http.post(self.app.url + "login", data={"token": token}, allow_redirects=False,
                                  ssl=self.ssl) as response:
            await response.read()
            if response.status == 303:
                status, session = await self.call("GET", "/api/session")
                assert status == 200, session
                self.csrf = session["csrf_token"]
            return response


@asynccontextmanager
async def serving(tmp: Path, soc_pct: float = 80.0, *, bms_heard: bool = True,
                  **web: Any) -> AsyncIterator[tuple[Rig, WebApp, dict[str, str]]]:
    """The web app on a lockstep rig run 2 s (its BMS silent from the start unless `bms_heard`)."""
    async with Rig(tmp, soc_pct=soc_pct, configure=web_enabled(tmp, **web)) as rig:
        rig.bms_on = bms_heard
        app = rig.assembly.integrations["web"]
        assert isinstance(app, WebApp)
        await app.start(rig.gateway)
        try:
            await rig.run(2.0)
            tokens = {"owner": (tmp / "owner.token").read_text().strip(),
                      "installer": (tmp / "installer.token").read_text().strip()}
            yield rig, app, tokens
        finally:
            await app.stop()


@asynccontextmanager
async def client(app: WebApp, ssl: Any = None) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield Client(app, http, ssl)


def until_iso(rig: Rig, hours: float) -> str:
    return dt.datetime.fromtimestamp(rig.time.wall() + hours * 3600, dt.UTC).isoformat()


def journal_kinds(path: Path) -> list[str]:
    with Journal.open(path, readonly=True) as journal:
        return [str(r.kind) for r in journal.records()]


# ------------------------------------------------------------------ login, sessions, CSRF, roles


def test_login_gives_an_http_only_strict_cookie_and_every_refusal_is_401(tmp_path, caplog):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            status, page = await browser.call("GET", "/")
            assert status == 200 and 'name="token"' in page and "soc" not in page  # the login form, no data
            assert (await browser.call("GET", "/api/status"))[0] == 401
            refused = await browser.login("f" * 64)
            assert refused.status == 401 and COOKIE not in refused.cookies
            response = await browser.login(tokens["owner"])
            assert response.status == 303 and response.headers["Location"] == "/"
            cookie = response.cookies[COOKIE]
            assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
            assert not cookie["secure"]  # plain HTTP here; TLS below
            status, page = await browser.call("GET", "/")
            assert status == 200 and 'src="/app.js"' in page and tokens["owner"] not in page
            status, doc = await browser.call("GET", "/api/status")
            assert status == 200 and 70 < doc["soc_pct"] <= 80 and doc["mode"] == "STANDBY"
            for field in ("mode", "reason", "soc_pct", "floor_pct", "reserve_pct", "setpoint_w", "power_w",
                          "event", "faults", "links", "storm_watch"):
                assert field in doc
            assert (await browser.call("POST", "/logout"))[0] == 200
            assert (await browser.call("GET", "/api/status"))[0] == 401
            assert 'name="token"' in (await browser.call("GET", "/"))[1]

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    tokens = [(tmp_path / name).read_text().strip() for name in ("owner.token", "installer.token")]
    assert not any(token in caplog.text for token in tokens), "a token reached a log line"
    assert "web: failed login from 127.0.0.1" in caplog.text and "web: owner logged in" in caplog.text
    with Journal.open(tmp_path / "journal.sqlite", readonly=True) as journal:
        stored = "".join(json.dumps(r.payload) for r in journal.records())
    assert not any(token in stored for token in tokens), "a token reached the journal"


def test_a_change_needs_the_sessions_csrf_token_or_a_bearer_token(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser, client(app) as script:
            await browser.login(tokens["owner"])
            status, answer = await browser.call("PUT", "/api/reserve", {"pct": 60}, csrf=False)
            assert status == 401 and "CSRF" in answer["error"]
            status, answer = await browser.call("PUT", "/api/reserve", {"pct": 60}, csrf=False,
                                                headers={CSRF_HEADER: "not-the-token"})
            assert status == 401
            assert rig.gateway.owner_settings().reserve_pct == 40  # nothing changed
            status, answer = await browser.call("PUT", "/api/reserve", {"pct": 60})
            assert status == 200 and answer["settings"]["reserve_pct"] == 60
            status, doc = await browser.call("GET", "/api/status")
            assert doc["reserve_pct"] == 60 and doc["floor_pct"] == 62  # the floor moved with it
            # A script: bearer token, no cookie, no CSRF token.
            bearer = {"Authorization": f"Bearer {tokens['owner']}"}
            assert (await script.call("PUT", "/api/reserve", {"pct": 45}, headers=bearer))[0] == 200
            assert rig.gateway.owner_settings().reserve_pct == 45
            # Logging out ends a session: a bearer token has none, and the browser's session it came with stays.
            status, answer = await browser.call("POST", "/logout", headers=bearer)
            assert status == 400 and "no session" in answer["error"]
            assert (await browser.call("GET", "/api/status"))[0] == 200
            wrong = {"Authorization": "Bearer " + "0" * 64}
            assert (await script.call("GET", "/api/status", headers=wrong))[0] == 401
            assert (await script.call("PUT", "/api/reserve", {"pct": 50}))[0] == 401
            status, answer = await browser.call("PUT", "/api/reserve", {"pct": 140})
            assert status == 400 and answer["error"] == "pct: 140 is out of range (0 to 100)"  # owner's rule, word for word
            await rig.run(0.5)

    asyncio.run(main())
    assert journal_kinds(tmp_path / "journal.sqlite").count("OwnerSettings") == 2
    out = cli_report(tmp_path)
    assert [c["text"] for c in out["owner_changes"]] == ["owner settings: reserve 60 %", "owner settings: reserve 45 %"]


def cli_report(tmp_path: Path) -> dict:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli.main(["report", "--journal", str(tmp_path / "journal.sqlite"), "--format", "json"]) == 0
    return json.loads(buffer.getvalue())


def test_the_installer_sees_the_installer_view_and_the_owner_does_not(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as owner, client(app) as installer:
            await owner.login(tokens["owner"])
            await installer.login(tokens["installer"])
            assert (await owner.call("GET", "/api/session"))[1]["role"] == "owner"
            assert (await owner.call("GET", "/api/installer"))[0] == 403
            assert (await owner.call("POST", "/api/lockout-reset"))[0] == 403
            status, view = await installer.call("GET", "/api/installer")
            assert status == 200 and view["config"]["web"]["enabled"] is True
            assert view["links"]["inverter"]["where"].startswith("Modbus TCP 127.0.0.1:")
            assert view["latches"] == [] and view["lockout"]["locked_out"] is False
            assert tokens["owner"] not in json.dumps(view) and tokens["installer"] not in json.dumps(view)
            assert (await installer.call("PUT", "/api/reserve", {"pct": 50}))[0] == 200  # everything the owner may

    asyncio.run(main())
    mode = stat.S_IMODE(os.stat(tmp_path / "installer.token").st_mode)
    assert mode == 0o600


def test_failed_logins_are_throttled_on_the_gateway_clock(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as guesser:
            for _ in range(app.throttle.per_client):
                assert (await guesser.login("wrong")).status == 401
            throttled = await guesser.login(tokens["owner"])  # even the right token waits its turn
            assert throttled.status == 429 and 1 <= int(throttled.headers["Retry-After"]) <= 60
            rig.time.mono += app.throttle.window_s + 0.1  # the window passes on the injected clock
            assert (await guesser.login(tokens["owner"])).status == 303

    asyncio.run(main())


@pytest.mark.parametrize("content_type, body", [
    ("application/x-www-form-urlencoded; charset=bogus-xx", b"token=abc"),
    ("multipart/form-data; boundary=zz", b"not multipart at all"),
], ids=["unknown charset", "no multipart boundary"])
def test_a_login_form_that_cannot_be_read_is_a_failed_login_not_a_server_error(tmp_path, caplog, content_type, body):
    async def main() -> None:
        async with serving(tmp_path) as (_, app, _tokens), client(app) as sender:
            async with sender.http.post(app.url + "login", data=body, headers={"Content-Type": content_type},
                                        allow_redirects=False) as response:
                page = await response.text()
                assert response.status == 401 and "That token is not valid." in page
                assert response.headers["X-Content-Type-Options"] == "nosniff"

    asyncio.run(main())
    assert "web: failed login from 127.0.0.1 (1 within" in caplog.text  # counted by the throttle
    assert "Error handling request" not in caplog.text and "Traceback" not in caplog.text


def test_a_body_that_cannot_be_decoded_is_a_400_not_a_server_error(tmp_path, caplog):
    """A body declared gzip that is not: aiohttp's decoding error escaped as a 500 with a traceback,
    at the login form (anyone on the network) and at the API."""
    async def main() -> None:
        async with serving(tmp_path) as (_, app, tokens), client(app) as sender:
            garbled = {"Content-Encoding": "gzip"}
            async with sender.http.post(app.url + "login", data=b"token=abc", allow_redirects=False,
                                        headers={**garbled, "Content-Type": "application/x-www-form-urlencoded"}
                                        ) as response:
                assert response.status == 400 and "not received whole" in await response.text()
            async with sender.http.put(app.url + "api/reserve", data=b'{"pct": 50}',
                                       headers={**garbled, "Authorization": f"Bearer {tokens['owner']}"}) as response:
                assert response.status == 400
                assert "could not be read" in (await response.json())["error"]

    asyncio.run(main())
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text


def test_wrong_bearer_tokens_are_throttled_like_failed_logins(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as script:
            for _ in range(app.throttle.per_client):
                status, _ = await script.call("GET", "/api/status", headers={"Authorization": "Bearer wrong"})
                assert status == 401
            status, answer = await script.call("GET", "/api/status",
                                               headers={"Authorization": f"Bearer {tokens['owner']}"})
            assert status == 429 and "too many failed logins" in answer["error"]
            rig.time.mono += app.throttle.window_s + 0.1
            status, _ = await script.call("GET", "/api/status", headers={"Authorization": f"Bearer {tokens['owner']}"})
            assert status == 200

    asyncio.run(main())


async def guesses_at_once(app: WebApp, addresses: list[str], each: int) -> list[int]:
    """`each` wrong form logins from every address, sent as a guesser would race them: every request's
    headers first, and its body only once every handler has checked the throttle; their statuses."""
    checked, checks = asyncio.Event(), [0]
    wait_s = app.throttle.wait_s

    def counting(client: str) -> float:
        checks[0] += 1
        if checks[0] == len(addresses) * each:
            checked.set()
        return wait_s(client)

    app.throttle.wait_s = counting  # type: ignore[method-assign]
    sent = []
    for n, address in enumerate(a for a in addresses for _ in range(each)):
        reader, writer = await asyncio.open_connection(app.host, app.port, local_addr=(address, 0))
        guess = b"token=%064x" % n
        writer.write(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(guess))
        sent.append((reader, writer, guess))
    await asyncio.wait_for(checked.wait(), 10)
    statuses = []
    for reader, writer, guess in sent:
        writer.write(guess)
        statuses.append(int((await asyncio.wait_for(reader.readline(), 10)).split()[1]))
        writer.close()
    return statuses


def test_form_logins_racing_their_bodies_are_counted_when_checked_not_when_read(tmp_path):
    """The throttle was checked when the headers came and counted only once the body had: eight
    requests holding their bodies back all passed the check, and eight guesses were judged."""
    async def main() -> None:
        async with serving(tmp_path) as (_, app, _tokens):
            statuses = await guesses_at_once(app, ["127.0.0.1"], each=8)
            assert statuses.count(401) == app.throttle.per_client and statuses.count(429) == 3
            assert app.throttle.failures("127.0.0.1") == app.throttle.per_client

    asyncio.run(main())


def test_form_logins_racing_from_many_addresses_meet_the_total(tmp_path):
    """Eight addresses racing eight guesses each had 64 judged against a total of 30."""
    async def main() -> None:
        async with serving(tmp_path) as (_, app, _tokens):
            addresses = [f"127.0.0.{n}" for n in range(1, 9)]
            statuses = await guesses_at_once(app, addresses, each=8)
            # past the total an address that never failed may still try once (the owner's case): 30 + 2
            assert statuses.count(401) == app.throttle.total + 2 and statuses.count(429) == 64 - 32

    asyncio.run(main())


def test_a_login_that_makes_no_guess_or_the_right_one_leaves_no_failure(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (_, app, tokens), client(app) as sender:
            async with sender.http.post(app.url + "login", data=b"token=abc", allow_redirects=False,
                                        headers={"Content-Encoding": "gzip",
                                                 "Content-Type": "application/x-www-form-urlencoded"}) as response:
                assert response.status == 400  # the body could not be read: no guess was made
            status, _ = await sender.call("GET", "/api/status", headers={"Authorization": f"Bearer {tokens['owner']}"})
            assert status == 200
            assert (await sender.login(tokens["owner"])).status == 303
            assert app.throttle.failures("127.0.0.1") == 0 and app.throttle.wait_s("127.0.0.9") == 0
            assert len(app.throttle._all) == 0  # nor in the total

    asyncio.run(main())


def test_guessers_past_the_total_wait_and_an_address_that_never_failed_does_not():
    now = [0.0]
    throttle = LoginThrottle(lambda: now[0], per_client=5, total=30)
    for n in range(6):
        for _ in range(5):
            throttle.failed(f"10.0.0.{n}")
    throttle.failed("10.0.0.7")
    assert throttle.wait_s("10.0.0.99") == 0  # the owner, who has not failed
    assert throttle.wait_s("10.0.0.7") > 0 and throttle.wait_s("10.0.0.0") > 0


def test_guessers_spread_over_more_addresses_than_are_tracked_still_meet_the_total():
    """With 257 addresses failing 4 times each, the oldest's record was dropped and it looked new:
    1,028 guesses a minute went through against a total of 30."""
    now = [0.0]
    throttle = LoginThrottle(lambda: now[0], per_client=5, total=30, max_clients=256)
    let_through = []
    for _round in range(4):
        let_through.append(0)
        for n in range(257):
            client = f"10.0.{n // 256}.{n % 256}"
            if throttle.wait_s(client) == 0:
                let_through[-1] += 1
                throttle.failed(client)
    assert let_through == [257, 0, 0, 0]  # an address that never failed may try once (the owner's case)
    now[0] += throttle.window_s + 1  # a minute later, with no more guesses, the owner is not held
    assert throttle.wait_s("10.0.9.9") == 0


def test_sessions_end_when_idle_too_long(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            await browser.login(tokens["owner"])
            assert (await browser.call("GET", "/api/status"))[0] == 200
            rig.time.mono += app.sessions.idle_s + 1
            assert (await browser.call("GET", "/api/status"))[0] == 401

    asyncio.run(main())


# ------------------------------------------------------------------ the controls reach the core


def test_price_mode_from_the_api_discharges_for_a_published_price_and_turns_off(tmp_path):
    async def main() -> None:
        async with serving(tmp_path, soc_pct=80.0) as (rig, app, tokens), client(app) as browser:
            await rig.run(0.1)
            await browser.login(tokens["owner"])
            status, answer = await browser.call("PUT", "/api/price", {"threshold_per_kwh": 0.3})
            assert status == 400 and "max_wh_per_day: missing" in answer["error"]
            status, answer = await browser.call("PUT", "/api/price", {"threshold_per_kwh": 0.3,
                                                                       "max_wh_per_day": 4000})
            assert status == 200 and answer["settings"]["price_threshold_per_kwh"] == 0.3
            assert answer["settings"]["price_kind"] == "EXPORT_PRICE"
            now = rig.gateway.now()
            price = PriceInterval("tou/1", "oadr3", "tou", PriceKind.EXPORT_PRICE, 0.45, now, now + 900, now)
            assert (await rig.gateway.submit(price)).verdict is Verdict.ACCEPTED
            await rig.run(3.0)
            status, doc = await browser.call("GET", "/api/status")
            assert doc["mode"] == "DISCHARGE" and doc["event"]["id"] == "tou/1" and doc["setpoint_w"] > 0
            assert doc["price_mode"]["threshold_per_kwh"] == 0.3 and doc["price_mode"]["max_wh_per_day"] == 4000
            assert (await browser.call("DELETE", "/api/price"))[0] == 200
            await rig.run(1.0)
            status, doc = await browser.call("GET", "/api/status")
            assert doc["price_mode"] is None and doc["mode"] == "STANDBY" and doc["setpoint_w"] == 0

    asyncio.run(main())


def test_storm_watch_from_the_api_refuses_dispatch_charges_the_truck_and_is_journaled(tmp_path, caplog):
    async def main() -> None:
        async with serving(tmp_path, soc_pct=60.0) as (rig, app, tokens), client(app) as browser:
            rig.gateway.observers.append(Narrator(rig.gateway.clocks))  # as `run` attaches it
            await rig.run(0.1)  # it has seen the settings before the change
            await browser.login(tokens["owner"])
            status, answer = await browser.call("PUT", "/api/storm-watch", {"floor_pct": 70, "until": "tomorrow"})
            assert status == 400 and "until: 'tomorrow' is not an ISO-8601 time" in answer["error"]
            status, answer = await browser.call("PUT", "/api/storm-watch",
                                                {"floor_pct": 70, "until": until_iso(rig, 6)})
            assert status == 200 and answer["settings"]["storm_watch_floor_pct"] == 70
            await rig.run(3.0)
            status, doc = await browser.call("GET", "/api/status")
            assert doc["storm_watch"]["floor_pct"] == 70 and doc["storm_watch"]["until"].endswith("Z")
            assert doc["mode"] == "CHARGE" and doc["setpoint_w"] < 0 and doc["floor_pct"] == 72
            now = rig.gateway.now()
            request = DispatchRequest("peak", "test", DispatchKind.DISCHARGE, 5_000, now, now + 600, now)
            refused = await rig.gateway.submit(request)
            assert refused.verdict is Verdict.REJECTED and refused.reason.value == "STORM_WATCH"
            assert (await browser.call("DELETE", "/api/storm-watch"))[0] == 200
            await rig.run(1.0)
            status, doc = await browser.call("GET", "/api/status")
            assert doc["storm_watch"] is None and doc["mode"] == "STANDBY"

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if r.name == "firmware_py.gateway.narration"]
    assert "owner settings changed: reserve 40 %, storm watch 70 % until 2025-06-01 18:00:02Z" in said
    assert "mode STANDBY -> CHARGE: storm watch: charging toward 70 %" in said
    assert any(line.startswith("dispatch peak from test") and "refused STORM_WATCH" in line for line in said)
    texts = [c["text"] for c in cli_report(tmp_path)["owner_changes"]]
    assert len(texts) == 2 and "storm watch 70 % until 2025-06-01 18:00:02Z" in texts[0]
    assert texts[1] == "owner settings: reserve 40 %"


def test_opt_out_from_the_api_ends_the_event_being_served(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            await browser.login(tokens["owner"])
            now = rig.gateway.now()
            await rig.gateway.submit(DispatchRequest("peak", "test", DispatchKind.DISCHARGE, 4_000, now, now + 600, now))
            await rig.run(3.0)
            status, doc = await browser.call("GET", "/api/status")
            assert doc["event"]["id"] == "peak" and doc["mode"] == "DISCHARGE"
            assert (await browser.call("PUT", "/api/opt-out", {"now": True}))[0] == 200
            await rig.run(0.5)
            status, doc = await browser.call("GET", "/api/status")
            assert doc["event"] is None and doc["mode"] == "STANDBY" and doc["setpoint_w"] == 0
            status, answer = await browser.call("PUT", "/api/departure", {"time": "07:30", "soc_pct": 90})
            assert status == 200
            status, settings = await browser.call("GET", "/api/settings")
            assert settings["settings"]["opt_out_until"] == "until_revoked"
            assert settings["departure_floor"]["at_departure_pct"] == 92
            assert 42 <= settings["departure_floor"]["now_pct"] < 92
            for path in ("/api/opt-out", "/api/departure"):
                assert (await browser.call("DELETE", path))[0] == 200
            assert (await browser.call("DELETE", "/api/reserve"))[0] == 405

    asyncio.run(main())


def test_the_settings_leave_out_what_has_ended(tmp_path):
    """A storm watch, departure and timed opt-out past their time were still in `GET /api/settings`
    (the core no longer counted them, but kept them until the next change): the page showed the storm
    watch "On" and the departure as planned, hours after both had ended."""
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            await browser.login(tokens["owner"])
            soon = until_iso(rig, 10 / 3600)
            for path, body in (("/api/storm-watch", {"floor_pct": 30, "until": soon}),
                               ("/api/departure", {"at": soon, "soc_pct": 50}), ("/api/opt-out", {"until": soon})):
                assert (await browser.call("PUT", path, body))[0] == 200
            status, doc = await browser.call("GET", "/api/settings")
            s = doc["settings"]
            assert (s["storm_watch_floor_pct"], s["departure_soc_pct"]) == (30, 50) and s["opt_out_until"] > doc["now"]
            await rig.run(11.0)
            status, doc = await browser.call("GET", "/api/settings")
            assert status == 200 and doc["departure_floor"] is None
            s = doc["settings"]
            assert [s[k] for k in ("storm_watch_floor_pct", "storm_watch_until", "departure_at", "departure_soc_pct",
                                   "opt_out_until")] == [None] * 5
            assert s["reserve_pct"] == 40  # what has not ended stays
            assert (await browser.call("GET", "/api/status"))[1]["storm_watch"] is None  # as the core counts it

    asyncio.run(main())


def test_the_departure_preview_is_the_floor_the_gateway_then_applies(tmp_path):
    """The page worked the preview out itself from the reserve and the departure alone: with a storm watch
    at 75 % it promised a floor of 57 % where the gateway applied 77 %, and it left out the hard minimum."""
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            await browser.login(tokens["owner"])
            policy = rig.gateway.policy

            async def preview(at: str, soc_pct: object) -> tuple[int, dict]:
                return await browser.call("GET", "/api/departure-floor?" + urlencode({"at": at, "soc_pct": soc_pct}))

            storm = {"floor_pct": 75, "until": until_iso(rig, 6)}
            assert (await browser.call("PUT", "/api/storm-watch", storm))[0] == 200
            leave = until_iso(rig, 3)
            status, shown = await preview(leave, 60)
            assert status == 200 and shown == {"now_pct": 75 + policy.soc_margin_pct, "at_departure_pct": 77}
            assert (await browser.call("PUT", "/api/departure", {"at": leave, "soc_pct": 60}))[0] == 200
            status, settings = await browser.call("GET", "/api/settings")
            assert settings["departure_floor"] == shown
            await rig.run(0.5)
            assert (await browser.call("GET", "/api/status"))[1]["floor_pct"] == shown["now_pct"]  # as promised
            # No reserve and no storm watch: the hard minimum still holds.
            assert (await browser.call("DELETE", "/api/storm-watch"))[0] == 200
            assert (await browser.call("PUT", "/api/reserve", {"pct": 0}))[0] == 200
            status, shown = await preview(until_iso(rig, 20), 1)
            assert shown["now_pct"] == shown["at_departure_pct"] == policy.hard_min_soc_pct + policy.soc_margin_pct
            # Refused as setting it would be, and nothing set.
            assert await preview(until_iso(rig, -1), 60) == (400, {"error": f"at: '{until_iso(rig, -1)}' is not "
                                                                            "in the future"})
            assert (await preview(leave, "lots"))[1] == {"error": "soc_pct: expected a number 0 to 100, got 'lots'"}
            # An epoch `at`, which PUT /api/departure takes, is taken here too (it was refused as not a time).
            epoch = rig.time.wall() + 3 * 3600
            status, by_epoch = await preview(f"{epoch:.0f}", 60)
            assert status == 200 and by_epoch == (await preview(until_iso(rig, 3), 60))[1], by_epoch
            assert rig.gateway.owner_settings().departure_soc_pct == 60

    asyncio.run(main())


def test_a_deeply_nested_query_value_is_refused_with_a_reason_not_a_500(tmp_path, caplog):
    """2,000 '[' in ?at= made JSON's parser recurse: aiohttp's plain 500 and a RecursionError traceback."""
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            auth = {"Authorization": f"Bearer {tokens['owner']}"}
            for at in ("[" * 2000, "{" * 2000, "[1]"):
                query = urlencode({"at": at, "soc_pct": 80})
                status, answer = await browser.call("GET", f"/api/departure-floor?{query}", headers=auth)
                assert status == 400 and answer["error"].startswith("at: "), (status, str(answer)[:200])

    asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_unexpected_fault_in_a_handler_is_a_json_500_with_the_security_headers_and_one_log_line(tmp_path, caplog):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            def broken(control: Any, body: Any) -> Any:
                raise RuntimeError("quoting s3cret-t0ken")

            app.desk.preview = broken  # type: ignore[method-assign]
            query = urlencode({"at": until_iso(rig, 3), "soc_pct": 60})
            async with browser.http.get(f"{app.url}api/departure-floor?{query}",
                                        headers={"Authorization": f"Bearer {tokens['owner']}"}) as response:
                assert response.status == 500 and response.content_type == "application/json"
                assert "error" in await response.json()
                assert response.headers["X-Frame-Options"] == "DENY" and response.headers["Cache-Control"] == "no-store"
                assert "Content-Security-Policy" in response.headers
            # The app goes on serving.
            assert (await browser.call("GET", "/api/status", headers={"Authorization": f"Bearer {tokens['owner']}"}))[0] == 200

    asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    assert "RuntimeError" in errors[0].getMessage() and "/api/departure-floor" in errors[0].getMessage()
    assert "s3cret-t0ken" not in caplog.text and "Traceback" not in caplog.text


def test_history_comes_from_the_journal(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            await browser.login(tokens["owner"])
            now = rig.gateway.now()
            await rig.gateway.submit(DispatchRequest("peak", "test", DispatchKind.DISCHARGE, 4_000, now, now + 20, now))
            for _ in range(30):
                await rig.run(1.0)
                rig.gateway.sample()  # what the service's sample task does every sample_interval_s
            rig.gateway.flush_journal()
            status, doc = await browser.call("GET", "/api/history")
            assert status == 200 and doc["to"] - doc["from"] == 24 * 3600
            samples = doc["samples"]
            assert len(samples) == 30 and all(len(row) == 5 for row in samples)
            assert max(row[3] for row in samples) == 4_000 and max(row[4] for row in samples) > 3_000
            assert all(row[2] == 42 for row in samples)  # the floor
            assert [(e["id"], e["answer"], e["final"]) for e in doc["events"]] == [("peak", "accepted", True)]
            assert doc["events"][0]["delivered_wh"] > 0

    asyncio.run(main())


def test_the_history_marks_a_hole_where_samples_are_missing_rather_than_joining_across_it(tmp_path):
    """A stop, or a journal failure long enough that samples were not kept: no line across what nobody measured."""
    with Journal.open(tmp_path / "journal.sqlite") as journal:
        for minute in (0, 1, 2, 30, 31):  # a sample a minute, then none for 28 minutes
            journal.append(RecordKind.SAMPLE, minute * 60.0, {"mode": "STANDBY", "soc_pct": 80 - minute,
                           "floor_pct": 40, "setpoint_w": 0, "power_w": 0}, wall=1e9 + minute * 60.0)
    doc = read_history(tmp_path / "journal.sqlite", 1e9 + 32 * 60.0, interval_s=60.0)
    assert [row[0] - 1e9 for row in doc["samples"]] == [0, 60, 120, 960, 1800, 1860]
    assert doc["samples"][3][1:] == [None, None, None, None] and doc["samples"][4][1] == 50
    assert all(None not in row for i, row in enumerate(doc["samples"]) if i != 3)
    joined = read_history(tmp_path / "journal.sqlite", 1e9 + 32 * 60.0, interval_s=600.0)  # 10 minutes apart: none
    assert len(joined["samples"]) == 5


def journal_of_samples(path: Path, minutes: range, interval_s: float = 60.0) -> None:
    """A journal of STANDBY samples `interval_s` apart (wall 1e9 + t), as the gateway's sample task keeps them."""
    with Journal.open(path) as journal, journal.batch():
        for n in minutes:
            journal.append(RecordKind.SAMPLE, n * interval_s, {"mode": "STANDBY", "soc_pct": 80, "floor_pct": 40,
                           "setpoint_w": 0, "power_w": 0}, wall=1e9 + n * interval_s)


def damage(path: Path, seq: int) -> None:
    """Tear record `seq`'s payload on disk (a bad sector), past the journal's own no-update trigger."""
    with sqlite3.connect(path) as db:
        triggers = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
        for name, _ in triggers:
            db.execute(f"DROP TRIGGER {name}")
        db.execute("UPDATE records SET payload = '{\"soc_pct\": 8' WHERE seq = ?", (seq,))
        for _, sql in triggers:
            db.execute(sql)
    sqlite3.connect(path).close()


def test_one_damaged_record_leaves_the_rest_of_the_history_shown_and_is_logged_by_seq(tmp_path, caplog):
    """One torn row in the day made every History request a 500 until it left the window, a day later."""
    path = tmp_path / "journal.sqlite"
    journal_of_samples(path, range(5))
    seq = 3
    damage(path, seq)
    with caplog.at_level(logging.WARNING):
        doc = read_history(path, 1e9 + 5 * 60.0, interval_s=60.0)
    assert [row[0] - 1e9 for row in doc["samples"]] == [0, 60, 180, 240]  # the minute-2 sample, record 3, skipped
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"record {seq}" in warned[0], warned


def test_a_days_history_at_a_sample_a_second_holds_the_points_sent_not_the_days_samples(tmp_path):
    """At sample_interval_s = 1 a day is 86,400 samples: all were read in as records to send one in 58 (about
    100 MB a request). Now they are thinned as read: what is held is bounded by the points sent."""
    path = tmp_path / "journal.sqlite"
    journal_of_samples(path, range(30_000), interval_s=1.0)
    tracemalloc.start()
    try:
        doc = read_history(path, 1e9 + 30_000.0, interval_s=1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak  # 30,000 records kept came to about 25 MB
    samples = doc["samples"]
    assert MAX_POINTS // 2 < len(samples) <= MAX_POINTS and samples[-1][0] == 1e9 + 29_999  # the newest shown
    step = samples[1][0] - samples[0][0]
    assert all(b[0] - a[0] == step and None not in b for a, b in itertools.pairwise(samples))  # even, no holes


def test_history_requests_read_the_journal_one_at_a_time(tmp_path, monkeypatch):
    """Each read ran in its own worker thread with no limit: four at once took four times the memory."""
    reads: list[bool] = []

    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            await browser.login(tokens["owner"])

            def read(*args: Any, **kwargs: Any) -> dict[str, Any]:
                reads.append(app.history_reads.locked())  # held by this read until it is done
                return read_history(*args, **kwargs)

            monkeypatch.setattr(server, "read_history", read)
            answers = await asyncio.gather(*(browser.call("GET", "/api/history") for _ in range(3)))
            assert [status for status, _ in answers] == [200] * 3
            assert not app.history_reads.locked()

    asyncio.run(main())
    assert reads == [True] * 3


def test_an_event_announced_before_the_window_that_ran_in_it_is_shown(tmp_path):
    """Day-ahead events are normal (OpenADR): one announced and answered before the day, delivering in it, was
    left out of History. Scaled: a 60 s window, the event announced 30 s ahead, running 60 s."""
    async def main() -> float:
        async with serving(tmp_path) as (rig, _, _):
            now = rig.gateway.now()
            await rig.gateway.submit(DispatchRequest("day-ahead", "test", DispatchKind.DISCHARGE, 4_000,
                                                     now + 30, now + 90, now))
            await rig.run(100.0, step_s=0.2)  # the request is 100 s old, the delivery 70 s to 10 s ago
            rig.gateway.flush_journal()
            return rig.time.wall()

    now_wall = asyncio.run(main())
    doc = read_history(tmp_path / "journal.sqlite", now_wall, interval_s=60.0, span_s=60.0)
    assert [(e["id"], e["answer"], e["final"]) for e in doc["events"]] == [("day-ahead", "accepted", True)]
    assert doc["events"][0]["delivered_wh"] > 0


def test_the_history_shows_each_events_figures_as_its_statement_does(tmp_path, capsys):
    def enrolled(config: Config) -> Config:
        config = web_enabled(tmp_path)(config)
        return replace(config, program=replace(config.program, credit_per_kwh=50.0, wear_cost_per_kwh=2.0))

    async def main() -> dict:
        async with Rig(tmp_path, configure=enrolled) as rig:
            app = rig.assembly.integrations["web"]
            await app.start(rig.gateway)
            try:
                await rig.run(2.0)
                async with client(app) as browser:
                    await browser.login((tmp_path / "owner.token").read_text().strip())
                    now = rig.gateway.now()
                    await rig.gateway.submit(DispatchRequest("peak", "test", DispatchKind.DISCHARGE, 4_000, now,
                                                             now + 20, now))
                    await rig.run(25.0)
                    rig.gateway.flush_journal(final=True)  # with the steps' batch, as `run` writes it each minute
                    status, doc = await browser.call("GET", "/api/history")  # computes the month: it is due
                    assert status == 200
                    status, again = await browser.call("GET", "/api/status")
                    assert again["earnings"]["credit"] == doc["events"][0]["figures"]["credit"]
                    return doc
            finally:
                await app.stop()

    doc = asyncio.run(main())
    assert cli.main(["statement", "--journal", str(tmp_path / "journal.sqlite"), "--event", "peak",
                     "--format", "json"]) == 0
    (line,) = json.loads(capsys.readouterr().out)["events"]
    (event,) = doc["events"]
    figures = event["figures"]
    assert doc["currency"] == "USD" and figures["status"] == "ended" and figures["credit"] > 0.5
    assert figures["credit"] == round(figures["credited_wh"] / 1000 * 50.0, 2)
    assert figures["net"] == round(figures["credit"] - figures["wear_cost"], 2)
    for name in ("delivered_wh", "integrated_wh", "avg_w", "peak_w", "soc_start_pct", "soc_end_pct", "soc_min_pct",
                 "floor_pct", "throughput_wh", "equivalent_cycles", "credited_wh"):  # terms-free: same as --event's
        assert figures[name] == line[name], name
    assert event["delivered_wh"] == round(figures["delivered_wh"], 1)


def test_the_installer_resets_a_lockout_and_the_reset_is_journaled(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as installer:
            await installer.login(tokens["installer"])
            for _ in range(rig.config.safety.lockout_faults):
                rig.node.inject("bms_fault", until=rig.time.mono + 0.5)
                await rig.run(3.0)  # raised, then cleared after the 2 s hold-off
            assert rig.gateway.controller.mode is Mode.LOCKOUT
            status, view = await installer.call("GET", "/api/installer")
            assert view["lockout"]["locked_out"] is True
            rig.gateway.stopping = True  # as `begin_stop` leaves it: the safe stop alone commands the inverter
            status, answer = await installer.call("POST", "/api/lockout-reset")
            assert status == 503 and answer["error"].startswith("the gateway is stopping: the lockout was not reset")
            assert rig.gateway.controller.mode is Mode.LOCKOUT
            rig.gateway.stopping = False
            status, answer = await installer.call("POST", "/api/lockout-reset")
            assert status == 200 and answer["cleared"] is True and answer["status"]["mode"] == "STANDBY"
            await rig.run(0.5)

    asyncio.run(main())
    assert "InstallerReset" in journal_kinds(tmp_path / "journal.sqlite")
    assert "installer reset (clears a lockout)" in [c["text"] for c in cli_report(tmp_path)["owner_changes"]]


# ------------------------------------------------------------------ serving, TLS, checks


def test_the_page_and_its_assets_are_served_with_a_strict_policy(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), aiohttp.ClientSession() as http:
            for path, kind in (("/", "text/html"), ("/app.js", "text/javascript"), ("/app.css", "text/css")):
                async with http.get(app.url.rstrip("/") + path) as response:
                    assert response.status == 200 and response.content_type == kind
                    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
                    assert response.headers["X-Frame-Options"] == "DENY"
            async with http.put(app.url + "api/reserve", data=b'{"pct": 5' + b"0" * 5000 + b"}",
                                headers={"Authorization": f"Bearer {tokens['owner']}"}) as response:
                assert response.status == 413 and "larger than 4096 bytes" in (await response.json())["error"]

    asyncio.run(main())


def test_a_405_says_which_methods_the_path_takes(tmp_path):
    """A 405 came without `Allow` (the JSON error built a new response and dropped aiohttp's headers)."""
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            bearer = {"Authorization": f"Bearer {tokens['owner']}"}
            base = app.url.rstrip("/")
            for method, path, allowed in (("POST", "/api/reserve", {"PUT"}), ("DELETE", "/api/reserve", {"PUT"}),
                                          ("PUT", "/api/status", {"GET", "HEAD"})):
                async with browser.http.request(method, base + path, headers=bearer, data=b"{}") as response:
                    assert response.status == 405, (method, path)
                    assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed, (method, path)
                    assert response.headers["X-Frame-Options"] == "DENY"

    asyncio.run(main())


def test_head_is_answered_wherever_get_is(tmp_path):
    """HEAD on the page and on every GET resource was 405."""
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            bearer = {"Authorization": f"Bearer {tokens['owner']}"}
            base = app.url.rstrip("/")
            for path, headers in (("/", {}), ("/app.js", {}), ("/api/status", bearer), ("/api/settings", bearer)):
                async with browser.http.head(base + path, headers=headers) as response:
                    assert response.status == 200, path
            async with browser.http.head(base + "/api/status") as response:
                assert response.status == 401  # HEAD is no way around the login

    asyncio.run(main())


def test_get_login_in_the_address_bar_goes_to_the_page(tmp_path):
    """`/login` in the address bar (where a wrong token leaves it: reloaded, bookmarked) gave raw JSON 405."""
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens), client(app) as browser:
            base = app.url.rstrip("/")
            async with browser.http.get(base + "/login", allow_redirects=False) as response:
                assert response.status == 303 and response.headers["Location"] == "/"
                assert response.headers["X-Frame-Options"] == "DENY"
            async with browser.http.get(base + "/login") as response:
                assert response.status == 200 and 'name="token"' in await response.text()

    asyncio.run(main())


def test_https_with_the_configured_certificate_and_a_secure_cookie(tmp_path):
    import ssl

    cert, key = self_signed(tmp_path)

    async def main() -> None:
        async with serving(tmp_path, tls_cert=str(cert), tls_key=str(key)) as (rig, app, tokens):
            context = ssl.create_default_context(cafile=str(cert))
            assert app.url.startswith("https://127.0.0.1:")
            async with client(app, ssl=context) as browser:
                response = await browser.login(tokens["owner"])
                assert response.status == 303 and response.cookies[COOKIE]["secure"]
                assert (await browser.call("GET", "/api/status"))[0] == 200

    asyncio.run(main())


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (cryptography comes with openleadr)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "web.crt", folder / "web.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_a_taken_port_is_input_error_not_a_restart_loop(tmp_path):
    async def main() -> None:
        async with serving(tmp_path) as (rig, app, tokens):
            other = WebApp(replace(rig.config, web=replace(rig.config.web, listen=f"127.0.0.1:{app.port}")),
                           rig.gateway)
            with pytest.raises(InputError, match=r"web.listen: cannot listen on 127.0.0.1:\d+: "):
                await other.start()

    asyncio.run(main())


@pytest.mark.parametrize("web, message", [
    ({"listen": "everywhere"}, "web.listen: expected HOST:PORT"),
    ({"listen": "gateway.local:8080"}, "web.listen: 'gateway.local' is not an IP address"),
    ({"tls_cert": "web.crt"}, "web.tls_cert, web.tls_key: set both (HTTPS) or neither"),
    ({"tls_cert": "missing.crt", "tls_key": "missing.key"}, "web.tls_cert, web.tls_key: "),
    ({"tls_cert": "gateway.toml", "tls_key": "gateway.toml"}, "not a PEM certificate and its private key"),
    ({"installer_token_file": "."}, "web.installer_token_file: "),
])
def test_check_config_runs_the_web_apps_checks(tmp_path, capsys, web, message):
    lines = "\n".join(f'{key} = "{value}"' for key, value in {"enabled": "true", **web}.items())
    config = tmp_path / "gateway.toml"
    config.write_text(f"[web]\n{lines}\n".replace('"true"', "true"))
    assert cli.main(["check-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_check_accepts_the_defaults_and_a_good_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    base = Config()
    assert check(replace(base, web=replace(base.web, enabled=True))) == []
    assert check(replace(base, web=replace(base.web, tls_cert=str(cert), tls_key=str(key)))) == []


def test_secrets_are_hidden_from_the_installer_view_but_paths_are_shown():
    shown = redacted({"mqtt": {"password": "hunter2", "password_file": "/etc/pw", "username": "u"},
                      "api_token": "abc", "client_secret": "", "ok": 1,
                      "openadr3": {"token_url": "https://vtn.example/oauth/token"}})
    assert shown == {"mqtt": {"password": REDACTED, "password_file": "/etc/pw", "username": "u"},
                     "api_token": REDACTED, "client_secret": "", "ok": 1,
                     "openadr3": {"token_url": "https://vtn.example/oauth/token"}}  # an address, never a secret
