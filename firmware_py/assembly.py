"""The one assembly point: a gateway built from a configuration, the same way for everyone.

`powershare-gw run`, the bench simulator, the benchmarks and the commissioning
commands all get their parts here, so what the bench measures is what a
gateway in a garage runs. Assembling opens what the configuration names (the
journal and the CAN bus) and starts nothing: running is the service's job
(`service.py`), or the simulation's, which reads the same bus in lock-step.

Time comes in here too, once: the pair of clocks (`firmware_py/clocks.py`) that
every part shares, the monotonic one for the core and the wall one for people.

Dispatch sources come from `INTEGRATIONS`, keyed by their configuration
section the way python-can picks a transport by name: a new protocol adds one
entry here and a section to the config, and nothing in the gateway or the
service changes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import can
import serial

from firmware_py.addresses import host_problem, parse_host_port, parse_ip_listen
from firmware_py.bms.bus import open_bus
from firmware_py.bms.link import CanLink
from firmware_py.bms.reader import reader_from_config
from firmware_py.certificates import open_to_all, validity_problem
from firmware_py.clocks import Clock, Clocks, as_clocks
from firmware_py.config import Config, bundled_dbc_names
from firmware_py.core.types import OwnerSettings
from firmware_py.dispatch import DispatchSink
from firmware_py.errors import InputError, collect_problems
from firmware_py.files import regular_or_absent, unwritable, user_name
from firmware_py.gateway import Gateway
from firmware_py.inverter.client import InverterClient
from firmware_py.journal import Journal
from firmware_py.journal.files import part_of
from firmware_py.links import Link
from firmware_py.owner.access import UNIX_PREFIX, parse_listen, read_token
from firmware_py.owner.store import OwnerStore, on_clock
from firmware_py.quoting import shown


class Integration(Protocol):
    """Something the service keeps running beside the gateway (an aggregator protocol, the web app)."""

    async def run(self, sink: DispatchSink) -> None:
        """Serve until cancelled; a peer's bad input is answered, never raised."""


def _openadr(config: Config, gateway: Gateway) -> Integration:
    from firmware_py.dispatch.openadr import OpenAdrVen

    ven = OpenAdrVen(config.dispatch.openadr, rating_w=lambda: gateway.policy.max_discharge_w,
                     to_gateway_time=gateway.clocks.from_datetime, link=gateway.links.handle(Link.OPENADR))
    gateway.observers.append(ven.notice_step)  # a refused event is asked again as soon as the mode changes
    return ven


def _check_openadr(config: Config, owner_uid: int | None) -> list[str]:
    from firmware_py.dispatch.openadr import check

    return check(config.dispatch.openadr)


def _openadr3(config: Config, gateway: Gateway) -> Integration:
    from firmware_py.dispatch.openadr3 import OpenAdr3Ven

    ven = OpenAdr3Ven(config.dispatch.openadr3, rating_w=lambda: gateway.policy.max_discharge_w,
                      levels_pct=gateway.policy.simple_levels_pct, to_gateway_time=gateway.clocks.from_datetime,
                      link=gateway.links.handle(Link.OPENADR3), currency=config.program.currency)
    gateway.observers.append(ven.notice_step)  # meters its intervals; a refused event is asked again at once
    return ven


def _check_openadr3(config: Config, owner_uid: int | None) -> list[str]:
    from firmware_py.dispatch.openadr3 import check

    return check(config.dispatch.openadr3, simple_levels_pct=config.dispatch.openadr.simple_levels_pct,
                 owner_uid=owner_uid)


def _sunspec_server(config: Config, gateway: Gateway) -> Integration:
    from firmware_py.dispatch.sunspec_server import SunSpecDerServer

    # Ratings and meters from the gateway's telemetry; session ids stamped in wall time, unique across boots.
    server = SunSpecDerServer(config.dispatch.sunspec_server, id_clock=gateway.clocks.wall,
                              link=gateway.links.handle(Link.SUNSPEC_SERVER))
    gateway.observers.append(server.notice_step)  # a standing setting is asked again as soon as the mode changes
    return server


def _check_sunspec_server(config: Config, owner_uid: int | None) -> list[str]:
    from firmware_py.dispatch.sunspec_server import parse_allow_list

    served = config.dispatch.sunspec_server
    return collect_problems(lambda: parse_ip_listen(served.listen, "dispatch.sunspec_server.listen",
                                                    "127.0.0.1 for this machine only, the gateway's LAN address, "
                                                    "or 0.0.0.0 for every interface"),
                            lambda: parse_allow_list(list(served.allow_write_from)))


def _web(config: Config, gateway: Gateway) -> Integration:
    from firmware_py.web.server import WebApp

    return WebApp(config, gateway)


def _check_web(config: Config, owner_uid: int | None) -> list[str]:
    from firmware_py.web.server import check as check_web

    return check_web(config, owner_uid)


def _mqtt(config: Config, gateway: Gateway) -> Integration:
    from firmware_py.mqtt.bridge import MqttBridge

    return MqttBridge(config, gateway)


def _check_mqtt(config: Config, owner_uid: int | None) -> list[str]:
    from firmware_py.mqtt.bridge import check as check_mqtt

    return check_mqtt(config, owner_uid)


def _metrics(config: Config, gateway: Gateway) -> Integration:
    from firmware_py.metrics.server import MetricsServer

    return MetricsServer(config, gateway)


def _check_metrics(config: Config, owner_uid: int | None) -> list[str]:
    from firmware_py.metrics.server import check as check_metrics

    return check_metrics(config)


@dataclass(frozen=True)
class IntegrationKind:
    """How to build an integration from its config section, and what to check before anything opens."""

    build: Callable[[Config, Gateway], Integration]
    check: Callable[[Config, int | None], list[str]]
    """Its problems; the int is the user its private files must belong to (None: this process's)."""
    listen: str = ""
    """The section's key of the address a peer connects to (empty: it connects out, or not at all)."""


# Config section -> its integration. Each section has `enabled`; off unless true.
INTEGRATIONS: dict[str, IntegrationKind] = {
    "dispatch.openadr": IntegrationKind(_openadr, _check_openadr),
    "dispatch.openadr3": IntegrationKind(_openadr3, _check_openadr3, listen="callback_listen"),
    "dispatch.sunspec_server": IntegrationKind(_sunspec_server, _check_sunspec_server, listen="listen"),
    "web": IntegrationKind(_web, _check_web, listen="listen"),
    "mqtt": IntegrationKind(_mqtt, _check_mqtt),
    "metrics": IntegrationKind(_metrics, _check_metrics, listen="listen"),
}


def section(config: Config, name: str) -> Any:
    """The config section a dotted name points at ("dispatch.openadr" -> config.dispatch.openadr)."""
    node: Any = config
    for part in name.split("."):
        node = getattr(node, part)
    return node


def integration(name: str, config: Config, gateway: Gateway) -> Integration:
    """One integration built from its section, whether or not the config enables it (the bench asks)."""
    return INTEGRATIONS[name].build(config, gateway)


@dataclass
class Assembly:
    """Everything a running gateway is made of, opened and wired, not yet started."""

    config: Config
    gateway: Gateway
    store: OwnerStore
    can_link: CanLink
    integrations: dict[str, Integration]

    @property
    def bus(self) -> can.BusABC:
        """The CAN bus open now (the link may have reopened it since assembling)."""
        if self.can_link.bus is None:
            raise RuntimeError("the CAN bus is closed (being reopened, or the assembly was closed)")
        return self.can_link.bus

    def close(self) -> None:
        """Release what assembling opened (the service has stopped what it started)."""
        self.can_link.close()
        self.gateway.journal.close()


def check(config: Config, *, owner_uid: int | None = None) -> None:
    """Every check `assemble` needs passed before it opens anything; InputError listing each problem.

    `check-config` runs exactly this, so a file it calls valid is one `run` starts with:
    the DBC and the signal map, every listen address and allow list, the files the
    gateway keeps (journal, owner settings, token), each enabled integration's own.

    `owner_uid` is the user the private files (`owner.token_file`, `web.installer_token_file`, the OpenADR 3
    client secret) must belong to. None, the user this process runs as: what `run` and `commission` (which builds
    the gateway as `run` does) require, since `run` refuses a file another user owns. Only
    `check-config` run as root passes another: the user `run` will run as (`service_user`).
    """
    problems = _check_the_dbc(config) + collect_problems(lambda: parse_listen(config.owner.api_listen))
    owner = config.owner
    # path, its key, what, read, folder made, an existing file written again
    kept: tuple[tuple[str, str, str, Callable[[], object] | None, bool, bool], ...] = (
        (config.journal.path, "journal.path", "journal", partial(Journal.check_openable, config.journal.path),
         False, True),
        (owner.settings_file, "owner.settings_file", "owner settings file",
         OwnerStore(owner.settings_file, owner.reserve_pct).load, True, True),
        (owner.token_file, "owner.token_file", "owner API token file",
         partial(read_token, owner.token_file, check_private=True, owner_uid=owner_uid), False, False))
    for path, key, what, read, folder_made, kept_writing in kept:
        if problem := regular_or_absent(path, what, folder_made=folder_made):
            problems.append(f"{key}: {problem}")
        elif problem := unwritable(path, key, kept_writing=kept_writing):  # names its key itself
            problems.append(problem)
        elif read is not None and os.path.exists(path):  # read as `run` reads it (absent: made at its start)
            problems += _keyed(key, collect_problems(read))
    problems += _shared_files(config) + _inverter_link(config)
    if config.can.interface not in can.interfaces.VALID_INTERFACES:  # python-can's own and its plugins'
        problems.append(f"can.interface: python-can has no interface {config.can.interface!r} (it has "
                        f"{', '.join(sorted(can.interfaces.VALID_INTERFACES))})")
    timeout_s, poll_s = config.safety.inverter_timeout_s, config.inverter.poll_interval_s
    if timeout_s <= poll_s:  # every reading would be stale before the next: 0 W for ever
        problems.append(f"safety.inverter_timeout_s: {timeout_s:g} s is not above inverter.poll_interval_s "
                        f"({poll_s:g} s): each inverter reading would be too old before the next came")
    for name, kind in INTEGRATIONS.items():
        if section(config, name).enabled:
            problems += kind.check(config, owner_uid)
    if not problems:  # every address parses: none may be another's, nor the inverter's
        problems += _shared_listens(config) + _inverter_on_own_listen(config)
    if problems:
        raise in_file(config, problems)


def in_file(config: Config, problems: list[str]) -> InputError:
    """The problems said as every configuration problem is: the configuration file once, then the key."""
    prefix = f"{config.source}: "
    return InputError([p if p.startswith(prefix) else prefix + p for p in problems])


def service_user(config: Config) -> tuple[int, str] | None:
    """For `check-config` run as root: the user `run` will run as, and why it is taken to be that one.

    Root can read and write anything, so checking as root says little about the service, which runs
    as its own user (`sudo -u powershare ...` is the documented way to check for it). Root cannot be
    told which user that is, so it takes the owner of the journal's folder, the one folder that user
    must own to write the journal. None when not root, or when that folder is root's or missing: the
    checks are then for the user running `check-config`, as for `run`.
    """
    if os.geteuid() != 0:
        return None
    folder = Path(config.journal.path).parent
    try:
        uid = folder.stat().st_uid
    except OSError:
        return None
    if uid == 0:
        return None
    return uid, (f"run as root: owner.token_file, web.installer_token_file and dispatch.openadr3.client_secret_file were "
                 f"checked as files of "
                 f"user {user_name(uid)}, the owner of journal.path's folder {folder}, taken as the user `run` "
                 f"runs as (it refuses them if they are another user's); every other check was made for root: "
                 f"run check-config as the service's user (sudo -u {user_name(uid)} ...) to check it all for it")


def notes(config: Config, now: dt.datetime | None = None) -> list[str]:
    """What is valid but most likely not meant, for `check-config` and `run` to point out, not refuse.

    A listen address on port 0 takes whatever port is free at each start: right for a test, useless to
    the aggregator, the VTN, the owner or the monitoring that must be told where to connect. A certificate
    of the gateway's own outside its validity window (at `now`, the wall clock's by default) fails every
    connection it is shown on, and the peer seldom says why. A private key every user may read is not
    refused (the start would stop the pack's protection over a permission), but named.
    """
    now = now or dt.datetime.now(dt.UTC)
    said = [f"{key}: port 0 is a different free port at each start, which no peer can be told in advance"
            for key, address in _listens(config) if parse_host_port(address, key)[1] == 0]
    said += [f"{key}: {path}: the certificate {out.problem}: {consequence}; {out.remedy}"
             for key, path, consequence in _certificates(config) if (out := validity_problem(path, now)) is not None]
    return said + [f"{key}: {path}: every user of the machine may read this private key (mode {mode}) and so "
                   f"pose as the gateway; run `chmod 600 {path}` (or 640, group ssl-cert)"
                   for key, path in _private_keys(config) if (mode := open_to_all(path)) is not None]


def _private_keys(config: Config) -> list[tuple[str, str]]:
    """The private keys of the certificates the gateway shows its peers, each with its configuration key."""
    keys = []
    if config.web.enabled and config.web.tls_key:
        keys.append(("web.tls_key", config.web.tls_key))
    if config.dispatch.openadr.enabled and config.dispatch.openadr.key:
        keys.append(("dispatch.openadr.key", config.dispatch.openadr.key))
    if config.mqtt.enabled and config.mqtt.tls_key:
        keys.append(("mqtt.tls_key", config.mqtt.tls_key))
    return keys


def _certificates(config: Config) -> list[tuple[str, str, str]]:
    """The certificates the gateway shows its peers, each with its key and what it costs out of date."""
    shown = []
    if config.web.enabled and config.web.tls_cert:
        shown.append(("web.tls_cert", config.web.tls_cert, "browsers refuse the web app"))
    if config.dispatch.openadr.enabled and config.dispatch.openadr.cert:
        shown.append(("dispatch.openadr.cert", config.dispatch.openadr.cert,
                      "the VTN refuses the gateway's connections, and no event arrives"))
    if config.mqtt.enabled and config.mqtt.tls_cert:
        shown.append(("mqtt.tls_cert", config.mqtt.tls_cert,
                      "the broker refuses the gateway's connections, and Home Assistant shows it unavailable"))
    return shown


def _listens(config: Config) -> list[tuple[str, str]]:
    """Every TCP address the gateway will listen on, with its configuration key."""
    listens = [("owner.api_listen", config.owner.api_listen)]
    listens += [(f"{name}.{kind.listen}", getattr(section(config, name), kind.listen))
                for name, kind in INTEGRATIONS.items() if kind.listen and section(config, name).enabled]
    return [(key, address) for key, address in listens if address and not address.startswith(UNIX_PREFIX)]


def _shared_listens(config: Config) -> list[str]:
    """Two listeners on one address: the second could not bind, and `run` would stop there (under
    systemd, again at every restart). A wildcard host (0.0.0.0, ::) takes its port on every address
    of its own family (the gateway's IPv6 sockets are IPv6 only)."""
    problems, taken = [], []
    for key, address in _listens(config):
        host, port = parse_host_port(address, key)
        clash = next(((k, a) for k, a, h, p in taken if p == port != 0 and _same_place(h, host)), None)
        if clash is not None:
            problems.append(f"{key}: {address} and {clash[0]} ({clash[1]}) cannot both listen there: "
                            "give each listener its own port")
        taken.append((key, address, host, port))
    return problems


def _same_place(a: str, b: str) -> bool:
    """Whether listening on host `a` and on host `b` (one port) would take the same socket address."""
    if a == b:
        return True
    ips_a, ips_b = _ips(a), _ips(b)
    if ips_a is None or ips_b is None:  # a host name: only the same name is known to clash (no DNS here)
        return False
    return any(ip_a.version == ip_b.version and (ip_a == ip_b or ip_a.is_unspecified or ip_b.is_unspecified)
               for ip_a in ips_a for ip_b in ips_b)


def _ips(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses `host` stands for: "localhost" is loopback (both families, as a listener binds it);
    None for another host name, which `check` does not look up."""
    if host == "localhost":
        return [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return None


def _inverter_on_own_listen(config: Config) -> list[str]:
    """The inverter at one of the gateway's own listen addresses: `run` would discover its own server
    (the SunSpec DER server answers as an inverter would) and report healthy while controlling nothing.
    A wildcard listener is reached through loopback; another of its addresses may be a peer's, so only
    a loopback (or wildcard) inverter host is taken to dial it."""
    inverter = config.inverter
    if inverter.transport != "tcp":
        return []
    problems = []
    for key, address in _listens(config):
        host, port = parse_host_port(address, key)
        if port == inverter.port and _same_place(host, inverter.host) and (
                not _is_wildcard(host) or _is_local(inverter.host)):
            problems.append(f"inverter.host and inverter.port: {inverter.host}:{inverter.port} is the gateway's "
                            f"own {key} ({address}): give the inverter's address")
    return problems


def _is_wildcard(host: str) -> bool:
    return any(ip.is_unspecified for ip in _ips(host) or [])


def _is_local(host: str) -> bool:
    """Loopback or a wildcard: an address that, dialled, reaches this machine whatever its interfaces."""
    return any(ip.is_loopback or ip.is_unspecified for ip in _ips(host) or [])


WRITTEN_FILES = ("journal.path", "owner.settings_file", "owner.token_file", "web.installer_token_file")
"""The path keys of files the gateway writes: none may be any other path key's file."""


def _shared_files(config: Config) -> list[str]:
    """Two keys naming one file the gateway writes (or a journal's file): each would overwrite the
    other's content, or be read as the other (the owner's token as the installer's: installer role).
    Paths are compared as `same_file` compares them."""
    paths = _path_keys(config)
    problems = []
    for i, (key, path) in enumerate(paths):
        if key != "journal.path" and (what := journal_part(path, config.journal.path)):
            problems.append(f"{key}: {path} is {what} of the journal (journal.path = {config.journal.path}): "
                            "give each its own file")
            continue
        for other_key, other in paths[:i]:
            if (key in WRITTEN_FILES or other_key in WRITTEN_FILES) and other_key != "journal.path" and \
                    same_file(path, other):
                problems.append(f"{key}: {path} is also {other_key}'s file: give each its own file")
    return problems


def kept_file_named(path: str, config: Config) -> str | None:
    """Which file of `config` `path` names (None: none): the configuration file itself, one of the
    journal's files, or a path key's file. For a file about to be written (`commission --report`),
    which would replace it."""
    if same_file(path, config.source):
        return f"the configuration file {config.source}"
    if what := journal_part(path, config.journal.path):
        return f"{what} of the journal (journal.path = {config.journal.path})"
    return next((f"{key}'s file ({other})" for key, other in _path_keys(config) if same_file(path, other)), None)


def journal_part(path: str | Path, journal: str | Path) -> str | None:
    """Which of the files of the journal at `journal` `path` is (a segment, its anchors, keys, write-ahead
    log), or None; names compared as `same_file` compares them."""
    return part_of(Path(os.path.realpath(journal)), Path(os.path.realpath(path))) or (
        "the live segment" if _same_existing_file(path, journal) else None)


def same_file(a: str | Path, b: str | Path) -> bool:
    """One file by two names: the same path resolved (symlinks, relative parts) or, for files already
    there, the same file (a hard link)."""
    return os.path.realpath(a) == os.path.realpath(b) or _same_existing_file(a, b)


def _same_existing_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is not there yet
        return False


def _path_keys(config: Config) -> list[tuple[str, str]]:
    """Every set path key of the configuration (journal.path first), skipping disabled sections."""

    def walk(node: Any, prefix: str) -> list[tuple[str, str]]:
        if getattr(node, "enabled", True) is False:
            return []
        found = []
        for f in fields(node):
            value = getattr(node, f.name)
            if is_dataclass(value):
                found += walk(value, f"{prefix}{f.name}.")
            elif f.metadata.get("path") and value:
                found.append((f"{prefix}{f.name}", value))
        return found

    keys = walk(config, "")
    return sorted(keys, key=lambda kv: kv[0] != "journal.path")


def _inverter_link(config: Config) -> list[str]:
    """The inverter's address and the CAN channel: an empty one (or an RTU port no serial device or
    pyserial URL) is accepted by nothing, so `run` would sit at 0 W reporting the link lost for ever."""
    inverter, problems = config.inverter, []
    if not config.can.channel.strip():
        problems.append("can.channel: must not be empty (e.g. can0)")
    if inverter.transport == "tcp" and not inverter.host.strip():
        problems.append("inverter.host: must not be empty with transport = \"tcp\" (the inverter's IP address)")
    elif inverter.transport == "tcp" and (problem := host_problem(inverter.host)):
        problems.append(f"inverter.host: {shown(inverter.host)} is {problem}")
    if inverter.transport == "rtu" and (problem := _serial_port_problem(inverter.serial_port)):
        problems.append(f"inverter.serial_port: {problem}")
    return problems


def _serial_port_problem(port: str) -> str | None:
    """Why pyserial could not open `port` whatever the hardware (None: it may); the device is not opened."""
    if "://" in port:
        try:
            serial.serial_for_url(port, do_not_open=True)
        except (ValueError, serial.SerialException) as err:
            return f"{port!r}: {err} (pyserial knows {', '.join(_url_schemes())})"
        return None
    if not os.path.isabs(port):
        return (f"{port!r} is neither a device path (e.g. /dev/ttyUSB0) nor a pyserial URL "
                f"({', '.join(_url_schemes())})")
    return None


def _url_schemes() -> list[str]:
    """The URL schemes pyserial's own handlers know, to say what to write instead."""
    import serial.urlhandler

    folder = Path(serial.urlhandler.__file__).parent
    return sorted(f"{p.stem.removeprefix('protocol_')}://" for p in folder.glob("protocol_*.py"))


def _check_timeout_against_the_dbc(config: Config) -> None:
    """The DBC and its mapping read; and `bms_timeout_s` above the fastest mapped message's period: a
    snapshot is as old as the last frame believed, so a shorter timeout would find every gap stale."""
    reader = reader_from_config(config, lambda: 0.0)
    fastest = min((reader.period_s(frame_id) for frame_id in reader.frame_ids), default=0.0)
    if config.safety.bms_timeout_s <= fastest:
        raise InputError(f"safety.bms_timeout_s: {config.safety.bms_timeout_s:g} s is not above the fastest "
                         f"BMS message's period in the DBC ({fastest:g} s): the data would be too old "
                         "between every two frames")


def _open_journal(config: Config, clocks: Clocks) -> Journal:
    """The journal, a refusal naming the configuration file and its key, as `check`'s do: SQLite's "unable to
    open database file" named neither."""
    try:
        return Journal.open(config.journal.path, busy_timeout_s=config.journal.busy_timeout_s,
                            wall_clock=clocks.wall)
    except InputError as err:
        raise InputError([f"{config.source}: {p}" for p in _keyed("journal.path", err.problems)]) from err


def _keyed(key: str, problems: list[str]) -> list[str]:
    """Each problem naming `key` first: the installer fixes a key, not a file the reader opened."""
    return [p if p.startswith(f"{key}:") else f"{key}: {p}" for p in problems]


def _check_the_dbc(config: Config) -> list[str]:
    """The DBC's problems under `vehicle.dbc`: the reader names only the file it opened, which for a
    mistyped bundled name is a path in the package the installer never wrote."""
    problems = collect_problems(lambda: _check_timeout_against_the_dbc(config))
    dbc = str(config.dbc_path())
    given = Path(config.vehicle.dbc)
    missing = f"{dbc}: DBC file not found"
    if not given.is_absolute() and missing in problems:
        beside = Path(config.source).resolve().parent / given
        problems[problems.index(missing)] = (
            f"{config.vehicle.dbc!r} is neither a file beside the configuration ({beside}) nor a bundled DBC "
            f"(bundled: {', '.join(bundled_dbc_names())})")
    return [f"vehicle.dbc: {p}" if p.startswith((dbc, repr(config.vehicle.dbc))) else p for p in problems]


def assemble(config: Config, clocks: Clocks | Clock, *, owner: OwnerSettings | None = None) -> Assembly:
    """A gateway from `config`: reader, inverter client, journal, owner settings, bus, integrations.

    `clocks` is the gateway's pair of clocks (`Clocks.system()` in `run`); a bare clock
    serves as both (the bench's simulated time, a test's number). `owner` overrides the
    persisted owner settings (a scenario says its own), on the core's time base.
    """
    check(config)
    clocks = as_clocks(clocks)
    clock = clocks.monotonic
    store = OwnerStore(config.owner.settings_file, config.owner.reserve_pct)
    reader = reader_from_config(config, clock)
    journal = _open_journal(config, clocks)
    try:
        saved = owner if owner is not None else on_clock(store.load(clocks.wall()), clocks.to_core)
        gateway = Gateway(config, clocks, reader, InverterClient(config.inverter, clock), journal, saved,
                          owner_store=store if owner is None else None)

        def opener() -> can.BusABC:
            return open_bus(config.can.interface, config.can.channel, blame=f"{config.source}: can",
                            filters=reader.can_filters(), bitrate=config.can.bitrate)

        link = CanLink(opener, reader, clock, silence_s=gateway.policy.bms_timeout_s,
                       stall_gap_s=gateway.policy.stall_gap_s, link=gateway.links.handle(Link.BMS))
    except BaseException:
        journal.close()
        raise
    enabled = {name: integration(name, config, gateway) for name in INTEGRATIONS
               if section(config, name).enabled}
    return Assembly(config, gateway, store, link, enabled)
