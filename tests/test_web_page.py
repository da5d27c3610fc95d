"""The page's own behaviour in a real Chromium, in front of a lock-step gateway (test_web.py's `serving`).

Where test_web_browser.py tells the whole story against the separate-process bench, these look at one
thing each, with the gateway's clocks in the test's hands: `Live` advances the rig by the real time
elapsed (so the status `at` moves as a running gateway's does, which the page's staleness check needs),
can pause it (a gateway whose figures stop moving on) and the test may step its wall clock (NTP). The
browser runs in a worker thread so the loop keeps serving; every wait is bounded and waits on what the
page shows or on the page's own requests, none on the wall clock alone.

Chromium missing: skipped, or a failure with CI_REQUIRE_BROWSER=1 (test_web_browser.browser_or_skip).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from test_web import serving
from test_web_browser import CHROMEDRIVER, CHROMIUM, OWNER_TZ, WAIT_S, browser_or_skip

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a Chromium per test: the full suite, not the fast tier


class Live:
    """Advance the rig by the real time elapsed, in 0.1 s steps, unless paused."""

    def __init__(self, rig) -> None:
        self.rig, self.paused, self.task = rig, False, None

    async def _loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            steps = round((now - last) / 0.1)
            if self.paused:
                last = now
            elif steps:
                last += steps * 0.1
                await self.rig.run(steps * 0.1)

    async def __aenter__(self) -> Live:
        self.task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Browser:
    """Chromium on the page, every call made from a worker thread (`await b.call(fn)`)."""

    def __init__(self, base: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        self.profile = tempfile.TemporaryDirectory(prefix="psgw-chromium-")
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-extensions", "--window-size=1000,900", f"--user-data-dir={self.profile.name}"):
            options.add_argument(flag)
        self.d = webdriver.Chrome(service=Service(CHROMEDRIVER, env={**os.environ, "TZ": OWNER_TZ}), options=options)
        self.d.set_page_load_timeout(WAIT_S)
        self.d.set_script_timeout(WAIT_S)
        self.base = base

    def close(self) -> None:
        self.d.quit()
        self.profile.cleanup()

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def text(self, element_id: str) -> str:
        return self.js("const e = document.getElementById(arguments[0]); return e ? e.textContent : '';", element_id)

    def until(self, condition, what: str, timeout_s: float = WAIT_S):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.d, timeout_s, poll_frequency=0.1).until(lambda d: condition())
        except TimeoutException:
            pytest.fail(f"{what}: not within {timeout_s} s (#updated {self.text('updated')!r}, "
                        f"#message {self.text('message')!r})")

    def log_in(self, token: str, live: bool = True) -> None:
        self.d.get(self.base)
        self.d.find_element("id", "token").send_keys(token)
        self.d.find_element("id", "login-button").click()
        if live:
            self.until(lambda: self.text("updated").startswith("Live"), "the page live")

    def view(self, name: str) -> None:
        self.js("location.hash = arguments[0];", name)
        self.until(lambda: self.js("return document.body.dataset.view") == name, f"the {name} view")


@contextlib.asynccontextmanager
async def page(tmp: Path, history_s: float = 0):
    """The gateway (`history_s` of it run first), its clocks then advancing with real time, and Chromium;
    yields (rig, app, tokens, live, browser)."""
    browser_or_skip()
    async with serving(tmp) as (rig, app, tokens):
        await rig.run(history_s)
        async with Live(rig) as live:
            browser = await asyncio.to_thread(Browser, app.url)
            try:
                yield rig, app, tokens, live, browser
            finally:
                await asyncio.to_thread(browser.close)


def on(browser: Browser, method: str, *args):
    """A browser call from a worker thread, so the gateway keeps answering meanwhile."""
    return asyncio.to_thread(getattr(browser, method), *args)


async def api(app, token: str, method: str, path: str, body: object = None) -> dict:
    async with aiohttp.ClientSession() as http, http.request(
            method, app.url + path.lstrip("/"), json=body, headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200, await response.text()
        return await response.json()


COUNT_STATUS_POLLS = """
    window.polls = 0;
    const real = window.fetch;
    window.fetch = (path, options) => { if (path === "/api/status") window.polls++; return real(path, options); };"""


# ------------------------------------------------------------------ the gateway's clock steps back


def test_the_page_stays_live_with_fresh_figures_after_the_gateways_clock_steps_back(tmp_path):
    """NTP steps the gateway's wall clock back 10 minutes: every answer was dropped as 'overtaken' (its `at`
    earlier than the last one shown) and the page said "Live" over figures frozen for those 10 minutes."""
    async def main() -> None:
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            assert b.text("reserve") == "40.0 %"
            rig.time.step_wall(-600)
            await api(app, tokens["owner"], "PUT", "/api/reserve", {"pct": 66})
            await on(b, "until", lambda: b.text("reserve") == "66.0 %" and b.text("updated").startswith("Live"),
                     "the new reserve, live, after the step back")

    asyncio.run(main())


def test_an_answer_overtaken_by_a_later_one_is_not_shown(tmp_path):
    """The order of answers is the page's own questions', not the gateway's time: an older answer that comes
    late (its reserve 40 %) does not replace a newer one already shown (66 %)."""
    async def main() -> None:
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            b.js("""
                window.shown = []; window.late = "waiting";
                new MutationObserver(() => shown.push(document.getElementById("reserve").textContent))
                  .observe(document.getElementById("reserve"), { childList: true, characterData: true, subtree: true });
                const real = window.fetch;
                window.fetch = (path, options) => {
                  if (path !== "/api/status" || late !== "waiting") return real(path, options);
                  late = "held";
                  return real(path, options).then((r) => r.json()).then((s) => new Promise((done) => {
                    window.release = () => { late = "released"; done(new Response(JSON.stringify(s))); };
                  }));
                };""")
            await on(b, "until", lambda: b.js("return late") == "held", "an answer held back")
            await api(app, tokens["owner"], "PUT", "/api/reserve", {"pct": 66})
            await on(b, "until", lambda: b.text("reserve") == "66.0 %", "the newer answer shown")
            b.js(COUNT_STATUS_POLLS + "release();")
            await on(b, "until", lambda: b.js("return polls") >= 2, "two polls after the late answer")
            assert b.js("return shown").count("40.0 %") == 0 and b.text("reserve") == "66.0 %"

    asyncio.run(main())


# ------------------------------------------------------------------ departure time across a DST change


PIN_DATE = """
    const RealDate = Date, pinned = Date.parse(arguments[0]);
    window.Date = class extends RealDate {
      constructor(...a) { super(...(a.length ? a : [pinned])); }
      static now() { return pinned; }
    };
    try { return localIso(nextDeparture(arguments[1])); } finally { window.Date = RealDate; }"""


DEPARTURES = [
    # The day clocks spring forward (New York, 2026-03-08 02:00 -> 03:00), after the change: tomorrow's 02:30
    # was today's 02:30 (03:30, the hour skipped) moved a day on, 03:30 tomorrow: an hour late.
    ("2026-03-08T04:00:00-04:00", "02:30", "2026-03-09T02:30-04:00"),
    ("2026-03-08T04:00:00-04:00", "02:00", "2026-03-09T02:00-04:00"),
    # The day they fall back (2026-11-01 02:00 -> 01:00): tomorrow's 07:00 is in standard time.
    ("2026-10-31T20:00:00-04:00", "07:00", "2026-11-01T07:00-05:00"),
    ("2026-11-01T08:00:00-05:00", "07:00", "2026-11-02T07:00-05:00"),
    ("2026-03-10T04:00:00-04:00", "02:30", "2026-03-11T02:30-04:00"),  # an ordinary day
    ("2026-03-10T04:00:00-04:00", "18:15", "2026-03-10T18:15-04:00"),  # later today
]


def test_the_next_departure_is_that_time_on_its_own_day_across_a_clock_change(tmp_path):
    """The page's next HH:MM (the owner's clock, New York) with the browser's `now` pinned."""
    async def main() -> None:
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            sent = [(now, hhmm, b.js(PIN_DATE, now, hhmm)) for now, hhmm, _ in DEPARTURES]
            assert sent == [(now, hhmm, want) for now, hhmm, want in DEPARTURES]

    asyncio.run(main())


def test_the_time_to_the_floor_carries_60_minutes_into_the_hour(tmp_path):
    """7.996 h to the floor read "7 h 60 min"; 59.97 minutes, "60 min"."""
    async def main() -> None:
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            shown = b.js("return [7.9961, 0.9995, 1.5, 0.25].map(duration)")
            assert shown == ["8 h 0 min", "1 h 0 min", "1 h 30 min", "15 min"]

    asyncio.run(main())


# ------------------------------------------------------------------ a gateway that does not answer at first


def test_the_page_asks_again_when_the_gateway_does_not_answer_while_it_loads(tmp_path):
    """The first GET /api/session past its 15 s limit left the page dead for good: no status poll, no
    forms. Here the first two time out (a script run before the page's own makes them so, rather than
    waiting 15 s each): the page says so, asks again, then works."""
    async def main() -> None:
        async with page(tmp_path) as (rig, app, tokens, live, b):
            b.d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
                window.sessionAsks = 0;
                const real = window.fetch;
                window.fetch = (path, options) => path === "/api/session" && ++sessionAsks <= 2
                  ? Promise.reject(new DOMException("signal timed out", "TimeoutError")) : real(path, options);"""})
            await on(b, "log_in", tokens["owner"], False)
            await on(b, "until", lambda: b.text("message") == "Cannot reach the gateway: no answer within 15 s."
                     and b.text("updated") == "Not live.", "the page saying it cannot reach the gateway")
            assert b.js("return document.body.dataset.gateway") == "lost"
            await on(b, "until", lambda: b.text("updated").startswith("Live"), "the page live once it answers")
            assert b.js("return sessionAsks") == 3 and b.text("soc").endswith("%")
            assert not b.d.find_element("id", "message").is_displayed()
            await on(b, "view", "controls")  # and its forms work
            submit_reserve(b, "55")
            await on(b, "until", lambda: b.text("message") == "Reserve set.", "the reserve set from the page")

    asyncio.run(main())


# ------------------------------------------------------------------ not live: legible, announced once


def contrast(foreground: str, background: str) -> float:
    """WCAG contrast of two computed CSS colours ("rgb(r, g, b)")."""
    def luminance(colour: str) -> float:
        channels = [int(v) / 255 for v in colour[colour.index("(") + 1:colour.index(")")].split(",")[:3]]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    hi, lo = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


SHOWN = """
    const el = document.querySelector(arguments[0]);
    let opacity = 1;
    for (let e = el; e; e = e.parentElement) opacity *= Number(getComputedStyle(e).opacity);
    return [getComputedStyle(el).color, getComputedStyle(el.closest(".card")).backgroundColor, opacity];"""


def test_not_live_fades_the_figures_not_the_warning_and_announces_it_once(tmp_path):
    """The whole card was faded, the words "Not live" with it (2.2:1); and #message (role=status) was
    rewritten on every poll with a new number, which a screen reader reads out every 2 s."""
    async def main() -> None:
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            b.js(COUNT_STATUS_POLLS + """
                window.announced = [];
                new MutationObserver(() => announced.push(document.getElementById("message").textContent))
                  .observe(document.getElementById("message"),
                           { childList: true, characterData: true, subtree: true, attributes: true });""")
            live.paused = True  # the gateway's figures stop moving on
            await on(b, "until", lambda: b.js("return document.body.dataset.gateway") == "lost", "not live")
            polls = b.js("return polls")
            await on(b, "until", lambda: b.js("return polls") >= polls + 2, "two more polls")
            assert b.js("return announced") == ["Cannot reach the gateway: its answers are old."]
            colour, background, opacity = b.js(SHOWN, "#updated")
            assert opacity == 1 and contrast(colour, background) >= 4.5, (colour, background, opacity)
            assert b.text("updated").startswith("Not live: figures as of ")
            assert b.js(SHOWN, "#soc")[2] < 1 and b.js(SHOWN, "#gauge")[2] < 1  # the figures are faded
            # The gateway stops answering at all: another kind of message, said once.
            b.js("""const real = window.fetch;
                    window.fetch = (path, options) => path === "/api/status"
                      ? (polls++, Promise.reject(new TypeError("Failed to fetch"))) : real(path, options);""")
            polls = b.js("return polls")
            await on(b, "until", lambda: b.js("return polls") >= polls + 2, "two polls unanswered")
            assert b.js("return announced").count("Cannot reach the gateway: Failed to fetch.") == 1

    asyncio.run(main())


def test_the_soc_of_a_silent_bms_is_shown_as_its_last_reading(tmp_path):
    """With the truck's BMS silent, the page went on showing its last SoC as the SoC of now."""
    async def main() -> None:
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            assert b.text("soc").endswith("%") and b.text("power").endswith("W")
            rig.bms_on = False
            await on(b, "until", lambda: b.text("soc").endswith("% (last reading)"), "the SoC a last reading")
            assert b.text("power").endswith("W")  # the inverter still answers: its power is of now
            rig.bms_on = True
            await on(b, "until", lambda: b.text("soc").endswith("%"), "the SoC of now again")

    asyncio.run(main())


def test_a_soc_never_read_is_unknown_for_want_of_data_not_a_last_reading(tmp_path):
    """A gateway started while the truck's BMS is silent has no SoC at all: the page said
    "unknown (last reading)", a last reading there never was."""
    async def main() -> None:
        browser_or_skip()
        async with serving(tmp_path, bms_heard=False) as (rig, app, tokens), Live(rig):
            b = await asyncio.to_thread(Browser, app.url)
            try:
                await on(b, "log_in", tokens["owner"])
                await on(b, "until", lambda: b.text("soc") == "unknown (no data from the truck yet)",
                         "the SoC unknown for want of data")
                rig.bms_on = True
                await on(b, "until", lambda: b.text("soc").endswith("%"), "the SoC of now")
            finally:
                await asyncio.to_thread(b.close)

    asyncio.run(main())


def bms_age(b: Browser) -> float:
    """The age of the BMS link's last good data, as the installer view shows it."""
    line = b.js("return [...document.querySelectorAll('#installer-links li')]"
                ".find((li) => li.textContent.startsWith('bms:')).textContent")
    return float(line.split("last good ")[1].split(" s ago")[0])


def test_the_installer_view_follows_the_links_while_open_and_says_when_it_is_not_live(tmp_path):
    """The installer view was read only when it opened: with the truck's BMS silent it went on showing
    "bms: ok" and no latch under a page that said "Live"; and nothing on it said when it was not live."""
    async def main() -> None:
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["installer"])
            await on(b, "view", "installer")
            await on(b, "until", lambda: bms_age(b) < 1 and b.text("latches") == "none", "the BMS link fresh")
            rig.bms_on = False  # the truck's BMS stops sending
            await on(b, "until", lambda: bms_age(b) >= 3 and b.text("latches").startswith("bms_stale since")
                     and b.text("installer-updated").startswith("Live"), "the BMS data old and latched stale, live")
            live.paused = True  # the gateway's figures stop moving on
            await on(b, "until", lambda: b.text("installer-updated").startswith("Not live: figures as of "),
                     "the installer view saying it is not live")
            assert b.js(SHOWN, "#installer-links")[2] < 1 and b.js(SHOWN, "#latches")[2] < 1  # faded
            colour, background, opacity = b.js(SHOWN, "#installer-updated")
            assert opacity == 1 and contrast(colour, background) >= 4.5, (colour, background, opacity)

    asyncio.run(main())


def test_link_ok_text_is_dark_enough_to_read(tmp_path):
    """"ok" in the links was the gauge's green, #2da44e: 3.2:1 on white, under the 4.5:1 text needs."""
    async def main() -> None:
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            await on(b, "until", lambda: b.js("return document.querySelector('#links li.ok') !== null"), "a link ok")
            colour, background, opacity = b.js(SHOWN, "#links li.ok")
            assert opacity == 1 and contrast(colour, background) >= 4.5, (colour, background)

    asyncio.run(main())


# ------------------------------------------------------------------ history on a phone


def test_the_history_charts_labels_are_readable_on_a_phone(tmp_path):
    """11 px labels in a 600-wide drawing shown 309 px wide on a 360 px phone came out 6 px tall."""
    async def main() -> None:
        async with page(tmp_path, history_s=120) as (rig, app, tokens, live, b):  # two minutes to draw
            b.d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True})
            await on(b, "log_in", tokens["owner"])
            await on(b, "view", "history")
            for chart in ("chart-soc", "chart-power"):
                svg, labels = b.js("""
                    const svg = document.getElementById(arguments[0]), box = (e) => e.getBoundingClientRect();
                    return [[box(svg).left, box(svg).right],
                            [...svg.querySelectorAll("text")].map((t) => [t.textContent, box(t).left, box(t).right,
                                                                           box(t).height, t.getAttribute("y")])];""",
                                   chart)
                assert labels and all(height >= 11 for _, _, _, height, _ in labels), (chart, labels)
                assert all(svg[0] - 0.5 <= left and right <= svg[1] + 0.5 for _, left, right, _, _ in labels), chart
                times = sorted((left, right) for _, left, right, _, y in labels if y == labels[-1][4])
                assert len(times) >= 2 and all(a[1] < b[0] for a, b in itertools.pairwise(times)), (chart, times)
            assert b.js("return document.documentElement.scrollWidth") <= 360

    asyncio.run(main())


def test_the_history_charts_leave_a_hole_where_the_gateway_kept_no_samples(tmp_path):
    """A row of nulls (the server's mark: stopped, or samples not kept while the journal failed) ends a line;
    a lone sample between holes is a dot; the note counts samples, not marks, and names the gap."""
    async def main() -> None:
        async with page(tmp_path, history_s=120) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            b.js("""
                const real = window.fetch;
                window.fetch = (path, options) => path !== "/api/history" ? real(path, options) : real(path, options)
                  .then((r) => r.json()).then((doc) => {
                    const t = doc.to, row = (at, soc) => [at, soc, 40, 0, 0], hole = (at) => [at, null, null, null, null];
                    const samples = [row(t - 600, 80), row(t - 540, 79), hole(t - 400), row(t - 300, 77), hole(t - 200),
                                     row(t - 120, 75), row(t - 60, 74)];
                    return new Response(JSON.stringify({ ...doc, samples }));
                  });""")
            await on(b, "view", "history")
            await on(b, "until", lambda: "samples from the journal" in b.text("history-note"), "the history drawn")
            drawn = b.js("""return [...document.querySelectorAll('#chart-soc [data-series="soc"]')].map((e) =>
                                [e.tagName, e.tagName === "polyline" ? e.getAttribute("points").split(" ").length : 1]);""")
            assert drawn == [["polyline", 2], ["circle", 1], ["polyline", 2]]
            assert b.text("history-note").startswith("5 samples from the journal (2 gaps where the gateway kept none)")

    asyncio.run(main())


# ------------------------------------------------------------------ price form and a power limit set elsewhere


def test_the_price_form_keeps_a_power_limit_set_elsewhere(tmp_path):
    """The page sent back the power_w it had read (none), undoing a 3000 W limit set since by a script."""
    async def main() -> None:
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            await on(b, "view", "controls")
            limit = {"threshold_per_kwh": 0.3, "max_wh_per_day": 10_000, "power_w": 3000}
            assert (await api(app, tokens["owner"], "PUT", "/api/price", limit))["settings"]["price_power_w"] == 3000
            for field, value in (("price-threshold", "0.35"), ("price-max", "10")):
                b.d.find_element("id", field).clear()
                b.d.find_element("id", field).send_keys(value)
            b.d.find_element("css selector", '#price-form button[type="submit"]').click()
            await on(b, "until", lambda: b.text("message") == "Price mode on.", "price mode set from the page")
            settings = (await api(app, tokens["owner"], "GET", "/api/settings"))["settings"]
            assert (settings["price_threshold_per_kwh"], settings["price_power_w"]) == (0.35, 3000)

    asyncio.run(main())


# ------------------------------------------------------------------ Controls follow changes made elsewhere

def field(b: Browser, element_id: str) -> str:
    return b.js("const e = document.getElementById(arguments[0]); return e ? e.value : null;", element_id)


def submit_reserve(b: Browser, pct: str) -> None:
    """What an owner does on Controls: type a reserve over the one shown, and set it."""
    box = b.d.find_element("id", "reserve-pct")
    box.clear()
    box.send_keys(pct)
    b.d.find_element("css selector", '#reserve-form button[type="submit"]').click()


def test_controls_show_a_change_made_elsewhere_and_mark_a_field_being_edited(tmp_path):
    # Settings were read only when Controls opened: a reserve changed with MQTT, the `owner` command or the
    # API while it was open never showed, and the owner was offered the old one as current.
    async def main():
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            await on(b, "view", "controls")
            assert field(b, "reserve-pct") == "40"
            await api(app, tokens["owner"], "PUT", "/api/reserve", {"pct": 66})
            await on(b, "until", lambda: field(b, "reserve-pct") == "66", "the reserve changed elsewhere shown")
            # The owner is typing a reserve: a change elsewhere is marked, never written over the owner's text.
            box = b.d.find_element("id", "reserve-pct")
            box.clear()
            box.send_keys("50")
            await api(app, tokens["owner"], "PUT", "/api/reserve", {"pct": 77})
            await on(b, "until", lambda: b.text("reserve-pct-elsewhere") == "Changed elsewhere: now 77.",
                     "the change elsewhere marked")
            assert field(b, "reserve-pct") == "50"
            b.d.find_element("css selector", '#reserve-form button[type="submit"]').click()
            await on(b, "until", lambda: b.text("message") == "Reserve set.", "the owner's reserve set")
            await on(b, "until", lambda: not b.text("reserve-pct-elsewhere"), "the mark gone once saved")

    asyncio.run(main())


def test_a_price_form_shown_before_a_change_elsewhere_does_not_undo_it(tmp_path):
    # The form sends every field it shows: one shown before the daily limit was lowered elsewhere set it back.
    async def main():
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            await api(app, tokens["owner"], "PUT", "/api/price", {"threshold_per_kwh": 0.3, "max_wh_per_day": 10_000})
            await on(b, "view", "controls")
            assert b.text("price-state").endswith("up to 10 kWh a day.")
            await api(app, tokens["owner"], "PUT", "/api/price", {"threshold_per_kwh": 0.3, "max_wh_per_day": 2_000})
            await on(b, "until", lambda: b.text("price-state").endswith("up to 2 kWh a day.") and
                     field(b, "price-max") == "2", "the lowered daily limit shown")
            box = b.d.find_element("id", "price-threshold")
            box.clear()
            box.send_keys("0.4")
            b.d.find_element("css selector", '#price-form button[type="submit"]').click()
            await on(b, "until", lambda: b.text("message") == "Price mode on.", "price mode set")
            settings = (await api(app, tokens["owner"], "GET", "/api/settings"))["settings"]
            assert (settings["price_threshold_per_kwh"], settings["price_max_wh_per_day"]) == (0.4, 2_000)

    asyncio.run(main())


RECORD_MESSAGES = """
    window.said = [];
    new MutationObserver(() => window.said.push(document.getElementById("message").textContent))
      .observe(document.getElementById("message"), { childList: true, characterData: true, subtree: true });"""


def test_not_confirmed_is_taken_back_once_the_settings_show_the_change_made(tmp_path):
    # "Not confirmed" was never tagged, so nothing took it back: it stayed while the page showed the change made.
    async def main():
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            await on(b, "view", "controls")
            b.js(RECORD_MESSAGES)
            # The change reaches the gateway, its answer is lost: the page's own limit fires (at once here).
            b.js("""const real = window.fetch;
                    window.fetch = (p, o) => p === "/api/reserve" ? real(p, o).then(() => {
                      throw new DOMException("signal timed out", "TimeoutError"); }) : real(p, o);""")
            submit_reserve(b, "70")
            await on(b, "until", lambda: b.text("message") == "Reserve set. (the gateway's settings show it made.)",
                     "the change confirmed by the settings")
            assert any(text.startswith("Not confirmed") for text in b.js("return window.said")), b.js("return window.said")

    asyncio.run(main())


def test_a_change_unanswered_while_the_gateway_is_out_of_reach_stays_said_until_the_settings_tell(tmp_path):
    # The next failed poll wrote "Cannot reach the gateway" over "Not confirmed", the poll once back cleared
    # that, and the reserve typed (never made) stood in its field as if saved, the page saying nothing.
    async def main():
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            await on(b, "view", "controls")
            before = (await api(app, tokens["owner"], "GET", "/api/settings"))["settings"]["reserve_pct"]
            b.js("""window.down = true; window.polls = 0;
                    const real = window.fetch;
                    window.fetch = (p, o) => {
                      if (p === "/api/status") window.polls += 1;
                      return window.down ? Promise.reject(new TypeError("Failed to fetch")) : real(p, o);
                    };""")
            await on(b, "until", lambda: b.js("return document.body.dataset.gateway") == "lost", "the page not live")
            submit_reserve(b, "60")
            await on(b, "until", lambda: b.text("message").startswith("Not confirmed: Failed to fetch"), "unanswered")
            polls = b.js("return window.polls")
            await on(b, "until", lambda: b.js("return window.polls") >= polls + 2, "two polls failing after it")
            assert b.text("message").startswith("Not confirmed: Failed to fetch"), b.text("message")
            b.js("window.down = false;")
            await on(b, "until", lambda: b.text("message").startswith(
                "Not confirmed: the gateway's settings do not show the change"), "the settings read again")
            assert b.js("return document.body.dataset.gateway") == "live" and field(b, "reserve-pct") == "60"
            assert (await api(app, tokens["owner"], "GET", "/api/settings"))["settings"]["reserve_pct"] == before

    asyncio.run(main())


# ------------------------------------------------------------------ a session ending mid-edit

def test_a_session_ending_mid_edit_keeps_the_page_says_so_and_brings_the_typing_back(tmp_path):
    # The status poll's 401 (a restart of the gateway ends every session) jumped to the login page: no word
    # why, and the storm watch being typed was gone.
    async def main():
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            await on(b, "view", "controls")
            b.d.find_element("id", "storm-floor").send_keys("85")
            app.sessions._open.clear()  # what a restart does to every session
            await on(b, "until", lambda: b.text("message").startswith("Your session ended (did the gateway restart?)"),
                     "the session's end said")
            assert "nothing you had not saved was changed" in b.text("message")
            assert field(b, "storm-floor") == "85" and b.d.current_url.endswith("#controls")
            # A change submitted now says it was not made.
            submit_reserve(b, "70")
            await on(b, "until", lambda: "the reserve change was not made" in b.text("message"), "the change refused")
            await asyncio.to_thread(b.d.find_element("id", "log-in-again").click)  # a page load: off the loop
            await on(b, "until", lambda: b.d.find_elements("id", "token"), "the login form")
            b.d.find_element("id", "token").send_keys(tokens["owner"])
            await asyncio.to_thread(b.d.find_element("id", "login-button").click)
            await on(b, "until", lambda: b.js("return document.body.dataset.view") == "controls", "back on Controls")
            await on(b, "until", lambda: field(b, "storm-floor") == "85" and field(b, "reserve-pct") == "70",
                     "the unsaved typing back")
            assert b.text("message") == "Logged in again: what you had typed is back, not saved yet."
            assert "owner" not in b.js("return JSON.stringify(sessionStorage)").lower()  # nothing kept, no token

    asyncio.run(main())


# ------------------------------------------------------------------ the gauge's labels

GAUGE_LABELS = """return [...document.querySelectorAll('#gauge text')].map((t) => { const r = t.getBoundingClientRect();
  return [t.textContent, r.left, r.right, r.top, r.bottom]; });"""


def test_gauge_labels_neither_overlap_nor_leave_the_gauge(tmp_path):
    # Storm watch 30 and reserve 40 were both drawn below the gauge over one another; a label at 0 % was
    # centred on the edge and cut in half.
    async def main():
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            until = dt.datetime.fromtimestamp(rig.time.wall() + 86400, dt.UTC).isoformat()
            await api(app, tokens["owner"], "PUT", "/api/storm-watch", {"floor_pct": 30, "until": until})
            await on(b, "until", lambda: b.text("storm-status").startswith("Storm watch: keeping 30"), "storm watch 30")
            for reserve in (40, 0):
                await api(app, tokens["owner"], "PUT", "/api/reserve", {"pct": reserve})
                await on(b, "until", lambda: b.text("reserve") == f"{reserve}.0 %", f"reserve {reserve}")  # noqa: B023
                labels = b.js(GAUGE_LABELS)
                clash = [(a[0], c[0]) for i, a in enumerate(labels) for c in labels[i + 1:]
                         if a[1] < c[2] and c[1] < a[2] and a[3] < c[4] and c[3] < a[4]]
                assert clash == [], f"gauge labels drawn over one another: {clash} ({labels})"
            box = b.js("const r = document.getElementById('gauge').getBoundingClientRect(); "
                       "return [r.left, r.right, r.top, r.bottom];")
            cut = [t for t in labels if t[1] < box[0] - 0.5 or t[2] > box[1] + 0.5 or t[3] < box[2] - 0.5
                   or t[4] > box[3] + 0.5]
            assert cut == [], f"labels outside the gauge's {box} (clipped): {cut}"
            # Storm watch is in the legend too (it had a mark on the gauge but no key).
            assert b.js("const e = document.getElementById('legend-storm'); return e ? !e.hidden : null") is True
            assert b.text("storm-watch-pct") == "30.0 %"

    asyncio.run(main())


def test_the_departure_preview_stays_while_the_settings_are_read_again(tmp_path):
    # Controls read the settings with every poll: the floor of the departure set (none here) must not
    # replace the preview of the one the owner is typing.
    async def main():
        async with page(tmp_path) as (rig, app, tokens, live, b):
            await on(b, "log_in", tokens["owner"])
            await on(b, "view", "controls")
            b.js("""window.reads = 0; const real = window.fetch;
                    window.fetch = (p, o) => { if (p === "/api/settings") window.reads++; return real(p, o); };""")
            b.js("const e = document.getElementById('departure-time'); e.value = '07:30';"
                 "e.dispatchEvent(new Event('input'));")
            b.d.find_element("id", "departure-soc").send_keys("80")
            b.js("window.reads = 0;")
            await on(b, "until", lambda: b.text("departure-floor"), "the preview")
            preview = b.text("departure-floor")  # the floor, or why not (the rig's clock is not the browser's)
            await on(b, "until", lambda: b.js("return window.reads") >= 2, "two more reads of the settings")
            assert b.text("departure-floor") == preview
            # "080" is 80 to the field and to Save; the preview once sent the text, which the gateway refused
            b.js("""window.asked = []; const real = window.fetch;
                    window.fetch = (p, o) => { if (p.startsWith("/api/departure-floor")) window.asked.push(p);
                                               return real(p, o); };""")
            b.d.find_element("id", "departure-soc").clear()
            b.d.find_element("id", "departure-soc").send_keys("080")
            await on(b, "until", lambda: len(b.js("return window.asked")) == 3, "a preview per key")
            assert b.js("return window.asked")[-1].endswith("&soc_pct=80")

    asyncio.run(main())
