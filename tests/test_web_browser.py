"""The web app in a real browser (issue 14, item 3): Debian's Chromium, headless, through chromedriver.

The gateway runs as `powershare-gw run` with `[web]` enabled, between the simulated BMS
(python-can-remote on 127.0.0.1) and the simulated inverter, each its own process
(`test_bench_processes.Bench`); a SunSpec client dispatches an event through the
gateway's DER server. The browser does what an owner does: logs in, reads the SoC,
raises the reserve and sees the floor move, opts out and sees the event end, turns
on storm watch, reads the history, logs out; then the installer logs in. On the way,
a page without a session, a change without its CSRF token and a wrong token are refused, and the
gateway stops answering for a while (SIGSTOP): the page says so, and takes it back when it answers.

One bench and one browser for the whole story (one test: with xdist's work stealing,
tests of a module may run on both workers, each of which would start its own).
Every wait is bounded (`WebDriverWait`), none is a sleep. With WEB_SCREENSHOTS=DIR the
main pages are saved there as PNGs (the README's come from `WEB_SCREENSHOTS=docs/screenshots`).

Chromium missing: skipped with the reason, except where CI_REQUIRE_BROWSER=1 (CI), where
that is a failure: `.ci/run` installs it.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_bench_processes import (
    START_S,
    Bench,
    bench as bench,  # noqa: F401 - the process bench fixture, used by `gateway` below
    dispatch_through_gateway,
    sunspec_device,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 20.0
OWNER_TZ = "America/New_York"
SOC_PCT = 70.0  # the bench's simulated BMS (test_bench_processes.SOC_PCT)


def browser_or_skip() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if not missing:
        return
    why = (f"{' and '.join(missing)} not installed: `apt-get install -y chromium chromium-driver` "
           "(Debian's packages; .ci/run installs them)")
    if os.environ.get("CI_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CI_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why)


@pytest.fixture
def gateway(bench: Bench) -> Iterator[Bench]:  # noqa: F811 - the imported fixture is this one's argument
    """The bench's gateway with the web app (and a history sample every second) on a free loopback port."""
    from test_bench_processes import free_port

    bench.ports["web"] = free_port()
    bench.config.write_text(bench.config.read_text() + f"""
[web]
enabled = true
listen = "127.0.0.1:{bench.ports['web']}"
installer_token_file = "installer.token"
""")
    text = bench.config.read_text().replace('[journal]\npath = "journal.sqlite"\n',
                                            '[journal]\npath = "journal.sqlite"\nsample_interval_s = 1\n')
    bench.config.write_text(text)
    bench.start_gateway()
    bench.outputs["gateway"].wait_for_line(rf"web app on http://127\.0\.0\.1:{bench.ports['web']}/", START_S)
    yield bench


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[object]:
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", "--window-size=1000,900",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    # The owner in New York, the gateway (this machine) in its own zone: the page works in the owner's.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, env={**os.environ, "TZ": OWNER_TZ}), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


# --- what the owner does, in words the test reads --------------------------------------------------


class Page:
    """The browser on the gateway's page: bounded waits on what the page shows."""

    def __init__(self, driver, base: str, shots: Path | None) -> None:
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.base, self.shots = driver, base, shots
        self.wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1,
                                  ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))

    def el(self, element_id: str):
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.el(element_id).text

    def content(self, element_id: str) -> str:
        """The element's text, shown or not (`text` is empty for an element in a hidden view)."""
        return self.d.execute_script("return document.getElementById(arguments[0]).textContent;", element_id)

    def until_text(self, element_id: str, predicate, what: str) -> str:
        """The element's text once `predicate` holds for it (fails after WAIT_S with what it showed)."""
        from selenium.common.exceptions import TimeoutException

        try:
            return self.wait.until(lambda d: (t := self.text(element_id)) and predicate(t) and t)
        except TimeoutException:
            pytest.fail(f"{what}: #{element_id} shows {self.text(element_id)!r} after {WAIT_S} s")

    def until(self, condition, what: str):
        from selenium.common.exceptions import TimeoutException

        try:
            return self.wait.until(lambda d: condition())
        except TimeoutException:
            pytest.fail(f"{what}: not within {WAIT_S} s")

    def open(self, view: str = "") -> None:
        self.d.get(self.base + (f"#{view}" if view else ""))

    def view(self, name: str) -> None:
        from selenium.webdriver.common.by import By

        self.d.find_element(By.CSS_SELECTOR, f'nav a[data-view="{name}"]').click()
        self.until(lambda: self.d.execute_script("return document.body.dataset.view") == name, f"the {name} view")

    def fill(self, element_id: str, value: str) -> None:
        field = self.el(element_id)
        field.clear()
        field.send_keys(value)

    def set_datetime(self, element_id: str, local_value: str) -> None:
        self.d.execute_script("document.getElementById(arguments[0]).value = arguments[1];", element_id, local_value)

    def submit(self, form_id: str) -> None:
        from selenium.webdriver.common.by import By

        self.el(form_id).find_element(By.CSS_SELECTOR, 'button[type="submit"]').click()

    def login(self, token: str) -> None:
        self.fill("token", token)
        self.el("login-button").click()

    def fetch(self, method: str, path: str, headers: dict[str, str], body: object = None) -> int:
        """A request from the page's own origin, with its cookies: what a script on the page could send."""
        return self.d.execute_async_script("""
            const [method, path, headers, body, done] = arguments;
            fetch(path, {method, headers, credentials: "same-origin",
                         body: body === null ? undefined : JSON.stringify(body)})
              .then(r => done(r.status), e => done(String(e)));""", method, path, headers, body)

    def shot(self, name: str, width: int = 1000, height: int = 900) -> None:
        """A small PNG of the page now (palette-reduced), when screenshots were asked for."""
        if self.shots is None:
            return
        from PIL import Image

        self.d.set_window_size(width, height)
        png = self.d.get_screenshot_as_png()
        self.d.set_window_size(1000, 900)
        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128)
        self.shots.mkdir(parents=True, exist_ok=True)
        image.save(self.shots / f"{name}.png", optimize=True)


def test_an_owner_and_an_installer_use_the_page_in_chromium(gateway: Bench, chromium):
    bench = gateway
    shots = Path(os.environ["WEB_SCREENSHOTS"]).resolve() if os.environ.get("WEB_SCREENSHOTS") else None
    page = Page(chromium, f"http://127.0.0.1:{bench.ports['web']}/", shots)
    owner_token = (bench.tmp / "owner.token").read_text().strip()
    installer_token = (bench.tmp / "installer.token").read_text().strip()

    # Without a session: the login form, no data; the API refuses; a wrong token is refused.
    page.open()
    assert page.el("login") and not page.d.find_elements("id", "soc")
    assert page.fetch("GET", "/api/status", {}) == 401
    page.login("0" * 64)
    page.until_text("login-error", lambda t: t == "That token is not valid.", "the refusal of a wrong token")
    page.shot("login", 420, 640)

    # The owner logs in and reads the SoC.
    page.login(owner_token)
    soc = page.until_text("soc", lambda t: t.endswith("%"), "the SoC")
    assert SOC_PCT - 2 <= float(soc.split()[0]) <= SOC_PCT
    page.until_text("mode", lambda t: t == "Ready, not moving energy", "STANDBY in plain words")
    assert page.text("floor") == "42.0 %" and page.text("reserve") == "40.0 %"
    assert "Truck (BMS): ok" in page.text("links") and "Inverter: ok" in page.text("links")
    page.until_text("updated", lambda t: t.startswith("Live, as of "), "the figures shown live")

    # The gateway stops answering (stopped like a hung process: connections accepted, never answered). The
    # page showed its last figures as live for ever; now it says so and greys them within a few seconds,
    # and takes the warning back once fresh figures arrive.
    bench.procs["gateway"].send_signal(signal.SIGSTOP)
    try:
        page.until_text("message", lambda t: t == "Cannot reach the gateway: no answer within 5 s.", "the gateway lost")
        assert page.d.execute_script("return document.body.dataset.gateway") == "lost"
        assert page.text("updated").startswith("Not live: figures as of ")
    finally:
        bench.procs["gateway"].send_signal(signal.SIGCONT)
    page.until(lambda: not page.el("message").is_displayed(), "the warning taken back")
    page.until_text("updated", lambda t: t.startswith("Live, as of "), "live figures again")
    assert page.d.execute_script("return document.body.dataset.gateway") == "live"
    # Answers that come but stop moving on (as from a cache between the page and the gateway): the same.
    page.d.execute_script("""
        const real = window.fetch, frozen = state.status.at;
        window.realFetch = real;
        window.fetch = (path, options) => path !== "/api/status" ? real(path, options) : real(path, options)
          .then((r) => r.json()).then((s) => new Response(JSON.stringify({ ...s, at: frozen })));""")
    page.until_text("message", lambda t: t == "Cannot reach the gateway: its answers are old.", "old answers")
    assert page.text("updated").startswith("Not live: ")
    page.d.execute_script("window.fetch = window.realFetch;")
    page.until(lambda: not page.el("message").is_displayed(), "the warning taken back")

    # An aggregator's event, through the gateway's SunSpec DER server: the page shows it served.
    der = sunspec_device(bench.ports["der"])
    try:
        dispatch_through_gateway(der, 4_000)
    finally:
        der.close()
    page.until_text("event", lambda t: ": accepted" in t, "the event being served")
    page.until_text("time-to-floor", lambda t: t.endswith("kW") or t.endswith(" W"), "the time to the floor")
    page.shot("now")
    page.shot("now-phone", 400, 1100)

    # Raise the reserve: the floor moves.
    page.view("controls")
    page.fill("reserve-pct", "60")
    page.submit("reserve-form")
    page.until_text("message", lambda t: t == "Reserve set.", "the reserve confirmed")
    page.view("now")
    page.until_text("floor", lambda t: t == "62.0 %", "the floor at the new reserve")

    # A change without its CSRF token (the cookie alone) is refused, and changes nothing.
    assert page.fetch("PUT", "/api/reserve", {"Content-Type": "application/json"}, {"pct": 10}) == 401
    assert page.text("reserve") == "60.0 %"

    # Opt out: the event ends.
    page.view("controls")
    page.submit("opt-out-form")  # "now, until I opt back in" is the first choice
    page.until_text("message", lambda t: t == "Opted out.", "the opt-out confirmed")
    page.view("now")
    page.until_text("event", lambda t: t == "No grid event being served.", "the event ended")
    page.until_text("mode", lambda t: t == "Ready, not moving energy", "back in STANDBY")

    # A storm watch and a departure that end in a few seconds: Controls shows them, then shows them ended
    # (set by a script with the session's CSRF token, as the page's time fields take whole minutes only).
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6)).isoformat()
    csrf = {"Content-Type": "application/json", "X-CSRF-Token": page.d.execute_script("return state.csrf")}
    assert page.fetch("PUT", "/api/storm-watch", csrf, {"floor_pct": 30, "until": soon}) == 200
    assert page.fetch("PUT", "/api/departure", csrf, {"at": soon, "soc_pct": 50}) == 200
    page.view("controls")
    page.until_text("storm-state", lambda t: t.startswith("On: keeping 30 %"), "the short storm watch on")
    assert page.text("departure-state").startswith("Leaving ")
    page.until_text("storm-state", lambda t: t == "Off.", "the storm watch ended at its time")
    page.until_text("departure-state", lambda t: t == "No departure set.", "the departure ended at its time")
    page.view("now")

    # A refused change says why, in the owner's own time (it quoted '2020-01-01T15:00:00.000Z', UTC, for the
    # 10:00 typed in New York), and stays for the owner to read while fresh figures arrive.
    page.view("controls")
    page.fill("storm-floor", "75")
    page.set_datetime("storm-until", "2020-01-01T10:00")
    page.submit("storm-form")
    refusal = page.until_text("message", lambda t: t.startswith("Refused: until: "), "the refusal of a past time")
    assert refusal == "Refused: until: '2020-01-01T10:00-05:00' is not in the future"
    updated = page.content("updated")
    page.until(lambda: page.content("updated") != updated, "a fresh status")
    assert page.text("message") == refusal
    page.d.execute_script("document.getElementById('storm-until').value = localInput(new Date(Date.now() + 864e5));")

    # Storm watch: keep 75 % (above the SoC) until tomorrow; the truck charges toward it.
    page.view("controls")
    page.fill("storm-floor", "75")
    page.submit("storm-form")
    page.until_text("message", lambda t: t == "Storm watch on.", "the storm watch confirmed")
    page.until_text("storm-state", lambda t: t.startswith("On: keeping 75 %"), "the storm watch in the controls")
    # The departure's preview is the floor the gateway applies, storm watch included (it said 62 %).
    in_3_h = page.d.execute_script("const d = new Date(Date.now() + 3 * 3.6e6); return d.toTimeString().slice(0, 5);")
    page.d.execute_script("const e = document.getElementById('departure-time'); e.value = arguments[0];"
                          "e.dispatchEvent(new Event('input'));", in_3_h)
    page.fill("departure-soc", "60")
    page.until_text("departure-floor", lambda t: t == "That makes the floor 77.0 % now and 77.0 % at departure.",
                    "the departure's preview")
    page.shot("controls", 1000, 1500)
    page.view("now")
    page.until_text("storm-status", lambda t: t.startswith("Storm watch: keeping 75 % until"), "the storm watch")
    page.until_text("mode", lambda t: t == "Charging the truck", "charging toward the storm watch")
    page.until_text("reason", lambda t: "storm watch: charging toward 75 %" in t, "why it charges")

    # Price mode: on with a threshold and a daily amount, then off again.
    page.view("controls")
    page.fill("price-threshold", "0.3")
    page.fill("price-max", "10")
    page.submit("price-form")
    page.until_text("message", lambda t: t == "Price mode on.", "price mode confirmed")
    page.until_text("price-state", lambda t: t == "On: discharging while the export price is at least 0.3 per kWh, "
                    "up to 10 kWh a day.", "price mode in the controls")
    page.el("price-clear").click()
    page.until_text("message", lambda t: t == "Price mode off.", "price mode off confirmed")
    page.until_text("price-state", lambda t: t == "Off.", "price mode off in the controls")

    # History: the day's curves from the journal, and the event with its answer and its credit.
    page.view("history")
    page.until(lambda: page.d.find_elements("css selector", '#chart-soc polyline[data-series="soc"]'),
               "the SoC curve")
    assert "accepted" in page.text("events")
    events = page.text("events")  # the event's credit as its statement computes it, once the gateway has
    assert "Credit" in events and ("USD (net" in events or "not computed yet" in events)  # (at most a minute)
    page.shot("history", 1000, 1250)
    # On a phone (360 px) the events fit the screen, a long event id too: the table was wider than the
    # phone, its Answer, Delivered, Credit and Window off-screen.
    page.d.execute_script("""
        const real = window.fetch;
        window.fetch = (path, options) => path !== "/api/history" ? real(path, options) : real(path, options)
          .then((r) => r.json()).then((doc) => new Response(JSON.stringify({ ...doc, events: doc.events.map(
            (e) => ({ ...e, id: "urn:uuid:6f1c1a4e-9b7d-4c1e-8f43-2f0d9a5b7c31/interval-0" })) })));""")
    page.d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True})
    try:
        page.view("now")
        page.view("history")
        page.until_text("events", lambda t: "urn:uuid:" in t, "the event with a long id")
        width, card, cells = page.d.execute_script("""
            const table = document.getElementById("events");
            return [document.documentElement.scrollWidth, table.parentElement.getBoundingClientRect().right,
                    [...table.tBodies[0].rows[0].cells].map((c) => [c.textContent, c.getBoundingClientRect().right])];""")
        assert width <= 360, f"the page is {width} px wide on a 360 px phone"
        assert [text for text, right in cells if right > card] == [], "cells beyond the card's edge"
    finally:
        page.d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    page.view("now")  # the month's earnings, computed when the gateway started and after events since
    page.until_text("earnings", lambda t: " USD for " in t and "net" in t, "this month's earnings")

    # Log out: the login form again, and the API refuses the old cookie.
    page.el("logout").click()
    page.until(lambda: page.d.find_elements("id", "login"), "the login form after logging out")
    assert page.fetch("GET", "/api/status", {}) == 401

    # The installer: the installer view with the configuration and the fault latches.
    page.login(installer_token)
    page.until(lambda: page.el("nav-installer").is_displayed(), "the installer's tab")
    page.view("installer")
    page.until_text("config", lambda t: '"web"' in t, "the effective configuration")
    assert owner_token not in page.d.page_source and installer_token not in page.d.page_source
    assert page.text("latches") == "none"
    page.shot("installer", 1000, 1100)

    # Everything the page changed is in the journal, and `report` says so.
    assert bench.stop("gateway") == 0
    out = subprocess.run([sys.executable, "-m", "firmware_py", "report", "--journal", str(bench.journal),
                          "--format", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    changes = [c["text"] for c in json.loads(out.stdout)["owner_changes"]]
    assert any(t.startswith("owner settings: reserve 60 %") for t in changes), changes
    assert any("opted out until revoked" in t for t in changes), changes
    assert any("storm watch 75 % until" in t for t in changes), changes
    assert any("price mode EXPORT_PRICE >= 0.3 per kWh, up to 10000 Wh a day" in t for t in changes), changes
