"""`powershare-gw owner ...`: the owner's controls, through the running gateway's API.

The CLI never edits the settings file itself: only the gateway may change what
the core runs on, so a change made here takes effect at once and is journaled
like any other, or is refused with the gateway's reason.
Exit codes: 0 done; 2 bad input (ours or the gateway's 400) or no gateway to ask (not running,
another address, the token missing or not accepted), as `status`; 1 the gateway answered but
could not make the change (it could not save the settings), or a change was sent but no answer
came in time: it may well have been made (saved and in the core, the inverter write pending),
so the owner is sent to `owner status`, never told there is no gateway.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import io
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from firmware_py import config
from firmware_py.config import OwnerConfig
from firmware_py.core.types import is_finite_number
from firmware_py.errors import InputError
from firmware_py.files import user_text
from firmware_py.narration import LAST_READING, percent
from firmware_py.owner.access import Listen, parse_listen, read_token
from firmware_py.owner.peer import peer_uid
from firmware_py.owner.store import UNTIL_REVOKED
from firmware_py.quoting import printable

CONNECT_TIMEOUT_S = 5.0
"""Connecting, and a read's answer (`GET`): the API answers those without waiting on anything."""
INVERTER_EXCHANGES = 8
"""How many inverter exchanges a change may wait on before the API answers: `Gateway.set_owner` awaits
the command's write, which queues for the Modbus link behind a poll in progress (a reconnect, its reads)
and then writes, reads back and, on a mismatch, writes 0 W; each exchange bounded by `[inverter] timeout_s`
plus at most 1 s (`InverterClient`)."""
MAX_ANSWER_BYTES = 1 << 20
"""The largest answer read: the API's are a few kB; a peer declaring 100 GB made `status` die of a MemoryError."""


def answer_wait_s(inverter_timeout_s: float) -> float:
    """How long a change waits for its answer: comfortably longer than the API can take to give it, so a
    slow inverter link does not leave the owner unsure whether the change was made."""
    return CONNECT_TIMEOUT_S + INVERTER_EXCHANGES * (inverter_timeout_s + 1.0)


class Unavailable(Exception):
    """The gateway did not do what was asked: it answered with an error (exit 1), or `Unreachable`."""


class Unreachable(Unavailable):
    """No gateway to ask: not running, not reachable, or the token not accepted (exit 2, as `status`)."""


class NotAnOwnerApi(Unreachable):
    """Something answered, but not as a gateway's owner API does: another program holds its address."""


class NoAnswer(Unavailable):
    """A change was sent but no answer came (exit 1, as a change the gateway could not make): it may have been saved and applied, so the owner
    is told to look (`owner status`), not that no gateway is there."""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket: http.client only lacks the connect."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _connection(listen: Listen) -> http.client.HTTPConnection:
    if listen.unix_path:
        return _UnixConnection(listen.unix_path, CONNECT_TIMEOUT_S)
    return http.client.HTTPConnection(listen.host, listen.port, timeout=CONNECT_TIMEOUT_S)


class _DeadlineReader(io.RawIOBase):
    """The answer's bytes, each read given only the time left until `until` (on `clock`): a socket timeout
    bounds one read, so a peer dripping a byte at a time kept `status` waiting for ever."""

    def __init__(self, sock: socket.socket, until: float, clock: Callable[[], float], answer_s: float) -> None:
        super().__init__()
        self.sock, self.until, self.clock, self.answer_s = sock, until, clock, answer_s
        self.raw = sock.makefile("rb", buffering=0)  # keeps the socket open while the answer is read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = self.until - self.clock()
        if left <= 0:
            raise TimeoutError(f"no whole answer within {self.answer_s:g} s")
        self.sock.settimeout(left)
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()


class _DeadlineSocket:
    """The connection's socket, its answer read through a `_DeadlineReader` (http.client reads through
    `makefile`)."""

    def __init__(self, sock: socket.socket, until: float, clock: Callable[[], float], answer_s: float) -> None:
        self._sock, self._deadline = sock, (until, clock, answer_s)

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, *self._deadline))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _bounded_read(response: http.client.HTTPResponse, listen: Listen) -> bytes:
    """The answer's body, at most MAX_ANSWER_BYTES: a longer one is no owner API's (Unreachable)."""
    raw = b""
    while len(raw) <= MAX_ANSWER_BYTES and (chunk := response.read(MAX_ANSWER_BYTES + 1 - len(raw))):
        raw += chunk
    if len(raw) > MAX_ANSWER_BYTES:
        raise NotAnOwnerApi(f"what answers on {listen.describe()} is not a powershare-gw owner API "
                          f"(its answer is longer than {MAX_ANSWER_BYTES // (1 << 20)} MiB)")
    return raw


def _exchange(conn: http.client.HTTPConnection, listen: Listen, method: str, path: str, body: str | None,
              headers: dict[str, str], answer_s: float,
              clock: Callable[[], float] = time.monotonic) -> tuple[int, bytes]:
    """Send one request and read its whole answer within `answer_s`. Failing before the request is sent,
    there is no gateway to ask (Unreachable); a change that was sent and then got no answer may have been
    made (NoAnswer)."""
    try:
        conn.request(method, path, body=body, headers=headers)
    except (OSError, http.client.HTTPException) as err:
        raise Unreachable(f"no gateway answering on {listen.describe()} ({err})") from None
    try:
        if conn.sock is not None:
            conn.sock = _DeadlineSocket(conn.sock, clock() + answer_s, clock, answer_s)  # type: ignore[assignment]
        response = conn.getresponse()
        return response.status, _bounded_read(response, listen)
    except (OSError, http.client.HTTPException) as err:
        if method == "GET":
            raise Unreachable(f"no gateway answering on {listen.describe()} ({err})") from None
        raise NoAnswer(f"the gateway on {listen.describe()} did not answer within {answer_s:g} s ({err}); "
                       "the change may have been made: check `powershare-gw owner status`") from None


def _check_listener(conn: http.client.HTTPConnection, listen: Listen, gateway_uid: int, token_file: str) -> None:
    """Connect, and refuse to send the token to a listener another user runs: while the gateway is stopped or
    restarting, any local user may listen on its address (NotAnOwnerApi). A listener on another machine, or
    on one without /proc, cannot be asked and is trusted as before."""
    try:
        conn.connect()
    except OSError as err:
        raise Unreachable(f"no gateway answering on {listen.describe()} ({err})") from None
    uid = peer_uid(conn.sock) if conn.sock is not None else None
    if uid is not None and uid != gateway_uid:
        conn.close()
        raise NotAnOwnerApi(f"what listens on {listen.describe()} runs as {user_text(uid)}, not as the gateway's "
                            f"{user_text(gateway_uid)} (who owns {token_file}): the token is not sent to it; "
                            "is the gateway running? (`systemctl status powershare-gw`)")


def call(owner: OwnerConfig, method: str, path: str, body: dict[str, Any] | None = None,
         wants: tuple[str, ...] = ("settings",), answer_s: float = CONNECT_TIMEOUT_S,
         clock: Callable[[], float] = time.monotonic, token: str | None = None) -> dict[str, Any]:
    """One API request; the decoded JSON answer (an object holding the keys `wants`), InputError for a
    400, Unavailable otherwise: Unreachable when what answered is not a gateway's owner API (or no whole
    answer of at most MAX_ANSWER_BYTES came within `answer_s`), NoAnswer when a change (any method but
    GET) was sent and its whole answer did not come within `answer_s`. It sends the owner's token (from
    `token_file`) unless given `token`: commissioning asks who listens before any token file exists."""
    listen = parse_listen(owner.api_listen)
    gateway_uid = None
    if token is None:
        try:
            token = read_token(owner.token_file)
            gateway_uid = os.stat(owner.token_file).st_uid  # the gateway made it: its user owns it
        except FileNotFoundError:
            raise Unreachable(f"no gateway answering on {listen.describe()}: its token file {owner.token_file} "
                              "does not exist (has the gateway been started with this config?)") from None
    conn = _connection(listen)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        if gateway_uid is not None:
            _check_listener(conn, listen, gateway_uid, owner.token_file)
        status, raw = _exchange(conn, listen, method, path, None if body is None else json.dumps(body), headers,
                                answer_s, clock)
    finally:
        conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {"error": raw.decode("utf-8", "replace").strip()}
    if status == 200:
        missing = [key for key in wants if key not in answer] if isinstance(answer, dict) else ["a JSON object"]
        if missing:
            raise NotAnOwnerApi(f"what answers on {listen.describe()} is not a powershare-gw owner API "
                              f"(its answer to {path} lacks {', '.join(missing)}): is api_listen the gateway's own?")
        return answer
    if status == 404:
        raise NotAnOwnerApi(f"what answers on {listen.describe()} has no {path}: not a powershare-gw owner API "
                          "(is api_listen the gateway's own?)")
    error = answer.get("error", f"HTTP {status}") if isinstance(answer, dict) else f"HTTP {status}"
    if status == 400:
        raise InputError(f"owner {path.strip('/')}: the gateway refused: {error}")
    if status == 401:
        raise Unreachable(f"unauthorized: the gateway on {listen.describe()} did not accept the token in "
                          f"{owner.token_file} (is it the gateway's own config?)")
    raise Unavailable(f"the gateway on {listen.describe()} answered {status}: {error}")


def _when(epoch: float) -> str:
    """Local date and time; a time no calendar can show is printed as the number it is."""
    try:
        return dt.datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    except (OverflowError, ValueError, OSError):
        return f"{epoch:g} s after the epoch"




def describe_opt_out(settings: dict[str, Any], now: float) -> str:
    until, events = settings.get("opt_out_until"), settings.get("opt_out_events") or []
    parts = []
    if until == UNTIL_REVOKED:
        parts.append("opted out until revoked")
    elif until is not None and until > now:
        parts.append(f"opted out until {_when(until)}")
    if events:
        parts.append("opted out of event(s) " + ", ".join(events))
    return "; ".join(parts) or "not opted out"


def describe_departure(settings: dict[str, Any], now: float) -> str:
    at = settings.get("departure_at")
    if at is None or at <= now:
        return "none"
    return f"{_when(at)}, {percent(settings.get('departure_soc_pct'))} wanted"


def describe_storm_watch(settings: dict[str, Any], now: float) -> str:
    floor, until = settings.get("storm_watch_floor_pct"), settings.get("storm_watch_until")
    if floor is None or until is None or until <= now:
        return "off"
    return f"keeping {percent(floor)} for an outage until {_when(until)}"


def describe_price_mode(settings: dict[str, Any]) -> str:
    threshold = settings.get("price_threshold_per_kwh")
    if threshold is None or not settings.get("price_max_wh_per_day"):
        return "off"
    power = settings.get("price_power_w")
    at = "as much power as the limits allow" if power is None else f"{power:,.0f} W"
    return (f"discharging while {settings.get('price_kind')} >= {threshold:g} per kWh, at {at}, "
            f"up to {settings['price_max_wh_per_day']:,.0f} Wh a day")


def describe_status(answer: dict[str, Any]) -> list[str]:
    """The owner API's status for people; a figure of a source with no fresh data is its last reading, said so
    (as `status` says it), and power after a failed poll what was last read, not the 0 W readers of now get."""
    settings, tel, now = answer["settings"], answer["telemetry"], answer["now"]
    soc_stale = LAST_READING if tel.get("bms_fresh") is False and tel.get("soc_pct") is not None else ""
    power = tel.get("power_w", 0)
    power_stale = ""
    if tel.get("inverter_fresh") is False:
        power, power_stale = tel.get("last_power_w", power), LAST_READING
    return [
        f"reserve:      {percent(settings['reserve_pct'])} (floor now {percent(answer['floor_pct'])})",
        f"SoC:          {percent(tel.get('soc_pct'))}{soc_stale}, {tel.get('available_wh', 0):,.0f} Wh available "
        "above the floor",
        f"state:        {tel.get('mode')}, power {power:,.0f} W{power_stale} "
        f"(setpoint {tel.get('setpoint_w', 0):,.0f} W)",
        f"opt-out:      {describe_opt_out(settings, now)}",
        f"departure:    {describe_departure(settings, now)}",
        f"storm watch:  {describe_storm_watch(settings, now)}",
        f"price mode:   {describe_price_mode(settings)}"
        + (f" ({tel.get('price_day_wh', 0):,.0f} Wh today)" if settings.get("price_threshold_per_kwh") is not None
           else ""),
        f"active event: {tel.get('active_event_id') or 'none'}",
    ]


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"owner {what}: expected a number, got {text!r}") from None
    if not is_finite_number(value):
        raise InputError(f"owner {what}: expected a finite number, got {text!r}")
    return value


def _status(owner: OwnerConfig, args: argparse.Namespace) -> list[str]:
    return describe_status(call(owner, "GET", "/status", wants=("settings", "telemetry", "now")))


def _reserve(owner: OwnerConfig, args: argparse.Namespace) -> list[str]:
    body = {"pct": _number(args.pct, "reserve")}
    settings = call(owner, "PUT", "/reserve", body, answer_s=args.answer_s)["settings"]
    return [f"reserve set to {percent(settings['reserve_pct'])}"]


def _opt_out(owner: OwnerConfig, args: argparse.Namespace) -> list[str]:
    mode, value = args.mode, args.value
    if (value is None) != (mode in ("now", "off")):
        usage = {"now": "opt-out now", "off": "opt-out off", "event": "opt-out event ID",
                 "until": "opt-out until ISO-8601-TIME"}[mode]
        raise InputError(f"owner opt-out: usage: {usage}")
    if mode == "off":
        settings = call(owner, "DELETE", "/opt-out", answer_s=args.answer_s)["settings"]
    else:
        body: dict[str, Any] = {"now": True} if mode == "now" else {"event": value}
        if mode == "until":
            try:
                body = {"until": float(value)}
            except ValueError:
                body = {"until": value}
        settings = call(owner, "PUT", "/opt-out", body, answer_s=args.answer_s)["settings"]
    return [describe_opt_out(settings, settings["received_at"])]


def _departure(owner: OwnerConfig, args: argparse.Namespace) -> list[str]:
    if args.time == "off":
        if args.soc is not None:
            raise InputError("owner departure: usage: departure off (no SoC)")
        settings = call(owner, "DELETE", "/departure", answer_s=args.answer_s)["settings"]
    else:
        if args.soc is None:
            raise InputError("owner departure: usage: departure HH:MM SOC_PCT (e.g. departure 07:30 80)")
        body = {"time": args.time, "soc_pct": _number(args.soc, "departure SOC")}
        settings = call(owner, "PUT", "/departure", body, answer_s=args.answer_s)["settings"]
    return [f"departure: {describe_departure(settings, settings['received_at'])}"]


def _storm_watch(owner: OwnerConfig, args: argparse.Namespace) -> list[str]:
    if args.floor == "off":
        if args.until is not None:
            raise InputError("owner storm-watch: usage: storm-watch off (no time)")
        settings = call(owner, "DELETE", "/storm-watch", answer_s=args.answer_s)["settings"]
    else:
        if args.until is None:
            raise InputError("owner storm-watch: usage: storm-watch FLOOR_PCT UNTIL (e.g. storm-watch 80 "
                             "2025-07-01T18:00)")
        try:
            until: Any = float(args.until)
        except ValueError:
            until = args.until
        body = {"floor_pct": _number(args.floor, "storm-watch FLOOR_PCT"), "until": until}
        settings = call(owner, "PUT", "/storm-watch", body, answer_s=args.answer_s)["settings"]
    return [f"storm watch: {describe_storm_watch(settings, settings['received_at'])}"]


def _price(owner: OwnerConfig, args: argparse.Namespace) -> list[str]:
    if args.threshold == "off":
        if args.max_wh is not None or args.kind is not None or args.power_w is not None:
            raise InputError("owner price: usage: price off (nothing more)")
        settings = call(owner, "DELETE", "/price", answer_s=args.answer_s)["settings"]
    else:
        if args.max_wh is None:
            raise InputError("owner price: usage: price THRESHOLD_PER_KWH MAX_WH_PER_DAY [--kind EXPORT_PRICE|PRICE] "
                             "[--power-w W] (e.g. price 0.30 10000)")
        body: dict[str, Any] = {"threshold_per_kwh": _number(args.threshold, "price THRESHOLD_PER_KWH"),
                                "max_wh_per_day": _number(args.max_wh, "price MAX_WH_PER_DAY")}
        if args.kind is not None:
            body["kind"] = args.kind
        if args.power_w == "max":  # no limit of its own; left out, the limit set before is kept
            body["power_w"] = None
        elif args.power_w is not None:
            body["power_w"] = _number(args.power_w, "price --power-w")
        settings = call(owner, "PUT", "/price", body, answer_s=args.answer_s)["settings"]
    return [f"price mode: {describe_price_mode(settings)}"]


def _owner(args: argparse.Namespace) -> int:
    action = getattr(args, "owner_action_handler", None)
    if args.config is None:
        raise InputError("owner: --config FILE is required (the running gateway's configuration)")
    if action is None:
        raise InputError("owner: give an action: status, reserve, opt-out, departure, storm-watch or price")
    loaded = config.load(args.config)
    args.answer_s = answer_wait_s(loaded.inverter.timeout_s)
    try:
        lines = action(loaded.owner, args)
    except Unreachable as err:
        raise InputError(f"owner: {err}") from None
    except Unavailable as err:
        print(f"error: owner: {printable(str(err))}", file=sys.stderr)
        return 1
    print("\n".join(printable(line) for line in lines))  # ids and errors come from aggregators and peers
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `owner status|reserve|opt-out|departure|storm-watch|price`."""
    p = sub.add_parser("owner", help="the owner's controls: reserve, opt-out, departure, storm watch, price mode "
                                     "(via the running gateway)")
    p.add_argument("--config", help="the gateway's TOML configuration ([owner] api_listen and token_file)")
    p.set_defaults(handler=_owner)
    actions = p.add_subparsers(dest="owner_action", metavar="ACTION")

    def action(name: str, fn: Any, help_text: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help_text)
        a.add_argument("--config", default=argparse.SUPPRESS, help="as above, also accepted here")
        a.set_defaults(owner_action_handler=fn)
        return a

    action("status", _status, "reserve, floor, SoC, state, opt-out, departure, storm watch and the active event")
    reserve = action("reserve", _reserve, "set the reserve: the SoC %% the truck always keeps for driving")
    reserve.add_argument("pct", help="percent, 0 to 100")
    opt = action("opt-out", _opt_out, "stop serving the grid: now (until revoked), one event, until a time; off")
    opt.add_argument("mode", choices=("now", "event", "until", "off"))
    opt.add_argument("value", nargs="?", help="the event id (event) or an ISO-8601 time or epoch seconds (until)")
    dep = action("departure", _departure, "be charged to SOC %% by the next HH:MM (local time); or off")
    dep.add_argument("time", help="HH:MM, or off")
    dep.add_argument("soc", nargs="?", help="the SoC %% wanted at departure")
    storm = action("storm-watch", _storm_watch, "keep FLOOR_PCT %% for an expected outage until a time "
                                                "(dispatch refused below it; charges toward it where the "
                                                "inverter can); or off")
    storm.add_argument("floor", metavar="FLOOR_PCT", help="the SoC %% to keep, 0 to 100; or off")
    storm.add_argument("until", nargs="?", metavar="UNTIL",
                       help="ISO-8601 (without an offset: the gateway's local time) or epoch seconds; "
                            "at most 14 days ahead")
    price = action("price", _price, "price-responsive mode: discharge while a published price is at or above "
                                    "THRESHOLD_PER_KWH, up to MAX_WH_PER_DAY a day (always above the reserve, "
                                    "departure and storm watch); or off")
    price.add_argument("threshold", metavar="THRESHOLD_PER_KWH",
                       help="in the program's currency per kWh (e.g. 0.30); or off")
    price.add_argument("max_wh", nargs="?", metavar="MAX_WH_PER_DAY", help="the most price-driven energy a day, Wh")
    price.add_argument("--kind", choices=("EXPORT_PRICE", "PRICE"),
                       help="which published price counts (default EXPORT_PRICE, what export is paid; "
                            "PRICE: what the home's import costs)")
    price.add_argument("--power-w", dest="power_w", help="the discharge power in W, or max: as much as every limit allows (default: as set before; max at first)")
