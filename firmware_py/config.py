"""The gateway's configuration: one TOML file, typed, frozen, checked whole.

The schema is the dataclasses below (loaded by `firmware_py.schema`, which
reports every problem at once). Relative paths are resolved against the config
file's own directory; nothing is merged from the environment or home folder.

The file says which format it is written in (`version`, top level). A release
that changes the format raises `FORMAT_VERSION` and either reads the older
versions as they are or refuses them naming each key to change; a file newer
than this release is refused on its version alone (its other keys would only
show up as "unknown" and hide the one thing to do: upgrade).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from firmware_py.errors import InputError
from firmware_py.files import read_text
from firmware_py.schema import absolute_path, given_by_loader, load_table, parse_toml, spec
from firmware_py.version import software_version

FORMAT_VERSION = 1
"""The configuration format this release writes and reads. Files from before `version` existed are version 1."""


@dataclass(frozen=True)
class VehicleConfig:
    dbc: str = spec("cybertruck_bms.dbc", doc="bundled DBC name or a path")
    usable_capacity_wh: float = spec(123_000, lo=1_000, hi=300_000)
    signals: dict[str, str] = spec({}, entry="'MESSAGE.SIGNAL'", doc="BmsSnapshot field -> 'MESSAGE.SIGNAL' overrides")


@dataclass(frozen=True)
class CanConfig:
    interface: str = spec("socketcan")
    channel: str = spec("can0")
    bitrate: int = spec(500_000, lo=10_000, hi=1_000_000)


@dataclass(frozen=True)
class InverterConfig:
    transport: str = spec("tcp", choices=("tcp", "rtu"))
    host: str = spec("127.0.0.1")
    port: int = spec(502, lo=1, hi=65_535)
    unit_id: int = spec(1, lo=1, hi=247)
    serial_port: str = spec("/dev/ttyUSB0")
    baudrate: int = spec(19_200, lo=1_200, hi=921_600)
    revert_timeout_s: float = spec(10, lo=2, hi=3_600)
    timeout_s: float = spec(1.0, lo=0.05, hi=30)
    poll_interval_s: float = spec(1.0, lo=0.05, hi=60)


@dataclass(frozen=True)
class OwnerConfig:
    reserve_pct: float = spec(40, lo=0, hi=100)
    departure_charge_w: float = spec(7_600, lo=500, hi=100_000,
                                      doc="charging power assumed when planning for departure")
    api_listen: str = spec("127.0.0.1:8765")
    token_file: str = spec("owner.token", path=True, private=True)
    settings_file: str = spec("owner-settings.json", path=True)


@dataclass(frozen=True)
class SafetyConfig:
    hard_min_soc_pct: float = spec(10, lo=5, hi=50)
    soc_margin_pct: float = spec(2, lo=0, hi=10)
    backup_floor_pct: float = spec(20, lo=5, hi=100)
    bms_timeout_s: float = spec(0.5, lo=0.25, hi=10, doc="at least two runtime ticks (0.1 s)")
    inverter_timeout_s: float = spec(3.0, lo=0.1, hi=60)
    ramp_w_per_s: float = spec(2_000, lo=10, hi=100_000)
    fault_holdoff_s: float = spec(30, lo=0, hi=3_600)
    lockout_faults: int = spec(3, lo=1, hi=100)
    lockout_window_s: float = spec(3_600, lo=1, hi=604_800)
    max_discharge_w: float = spec(11_500, lo=0, hi=1_000_000)
    max_charge_w: float = spec(11_500, lo=0, hi=1_000_000)


@dataclass(frozen=True)
class SunSpecServerConfig:
    enabled: bool = spec(False)
    listen: str = spec("127.0.0.1:1502")
    unit_id: int = spec(1, lo=1, hi=247)
    allow_write_from: list[str] = spec(["127.0.0.1"])
    max_connections: int = spec(32, lo=1, hi=256, doc="connections held at once, all clients together")
    max_connections_per_client: int = spec(4, lo=1, hi=256, doc="connections held at once from one address")
    idle_timeout_s: float = spec(60.0, lo=1, hi=86_400, doc="a connection with no request this long is closed")


@dataclass(frozen=True)
class OpenAdrConfig:
    enabled: bool = spec(False)
    vtn_url: str = spec("http://127.0.0.1:8080/OpenADR2/Simple/2.0b")
    ven_name: str = spec("truck-1")
    simple_levels_pct: list[float] = spec([33.0, 66.0, 100.0])
    cert: str = spec("", path=True)
    key: str = spec("", path=True)
    ca_file: str = spec("", path=True)
    vtn_fingerprint: str = spec("")


@dataclass(frozen=True)
class OpenAdr3Config:
    """The OpenADR 3 VEN (docs/dispatch.md); SIMPLE levels use `[dispatch.openadr] simple_levels_pct`."""

    enabled: bool = spec(False)
    vtn_url: str = spec("http://127.0.0.1:8081/openadr3/3.0.1", doc="the VTN's base URL (programs, events, ...)")
    token_url: str = spec("", query=True, doc="the OAuth2 token endpoint; empty: the one the VTN names at /auth/server")
    client_id: str = spec("truck-1", doc="the OAuth2 client id the aggregator issued")
    client_secret_file: str = spec("openadr3.secret", path=True, private=True,
                                   doc="a 0600 file holding the OAuth2 client secret (never logged)")
    ven_name: str = spec("truck-1", doc="the VEN's name at the VTN (one VEN object per gateway)")
    poll_interval_s: float = spec(30, lo=0.2, hi=3_600, doc="how often events are fetched (at once on a "
                                                             "subscription's notification)")
    callback_listen: str = spec("", doc="HOST:PORT for the VTN's notifications (subscriptions); empty: poll only")
    callback_url: str = spec("", doc="the URL the VTN posts notifications to; empty: http://callback_listen/"
                                     "openadr3/notify")


@dataclass(frozen=True)
class DispatchConfig:
    sunspec_server: SunSpecServerConfig = field(default_factory=SunSpecServerConfig)
    openadr: OpenAdrConfig = field(default_factory=OpenAdrConfig)
    openadr3: OpenAdr3Config = field(default_factory=OpenAdr3Config)


@dataclass(frozen=True)
class JournalConfig:
    path: str = spec("journal.sqlite", path=True)
    busy_timeout_s: float = spec(2.0, lo=0.01, hi=3, doc="how long a write waits for a lock before it fails "
                                 "(then dispatch is refused until the journal writes again)",
                                 bound_why="a stop waits for a journal write, after the tasks' ending (1 s), the safe "
                                 "stop (7 s) and the final meter reading (3 s), and systemd kills the gateway 15 s after SIGTERM")
    sample_interval_s: float = spec(60.0, lo=1, hi=3_600, doc="seconds between the SoC, floor, setpoint and "
                                    "power samples journaled for the web app's history chart")
    segment_mb: float = spec(64, lo=1, hi=4_096, doc="the live file is archived and a new segment started "
                             "once it is this large (MB); start-up reads the live segment only")
    retain_days: float = spec(400, lo=1, hi=36_500, doc="archived segments whose newest record is older than "
                              "this are deleted (the deletion is recorded in the chain)")


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = spec(False)
    listen: str = spec("0.0.0.0:8080", doc="HOST:PORT of the owner's web app and its JSON API")
    installer_token_file: str = spec("installer.token", path=True, private=True,
                                     doc="the installer role's token; created 0600 on first start")
    tls_cert: str = spec("", path=True, doc="PEM certificate (chain); with tls_key, HTTPS; both empty: HTTP")
    tls_key: str = spec("", path=True, doc="PEM private key of tls_cert")


@dataclass(frozen=True)
class ProgramConfig:
    """The owner's enrolment terms (docs/configuration.md, [program]): what `statement` credits and charges."""

    name: str = spec("", doc="the program's name, printed on statements")
    currency: str = spec("USD", form=("[A-Z]{3}", "an ISO 4217 code, three capital letters (e.g. USD)"),
                         doc="ISO 4217 code of the amounts")
    credit_per_kwh: float = spec(0.0, lo=0, hi=100, doc="bill credit per kWh delivered in grid events")
    wear_cost_per_kwh: float = spec(0.0, lo=0, hi=100, doc="battery wear cost per kWh out of the pack")


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = spec(False)
    broker: str = spec("127.0.0.1:1883", doc="HOST:PORT of the MQTT broker (8883 is the usual port with TLS)")
    username: str = spec("", doc="empty: connect without a username")
    password_file: str = spec("", path=True, private=True,
                              doc="a file holding the broker password (mode 0600; read at every connection, "
                                  "never logged)")
    tls: bool = spec(False, doc="TLS to the broker, checked against the system's CAs (or tls_ca_file)")
    tls_ca_file: str = spec("", path=True, doc="PEM CA bundle the broker's certificate must chain to; "
                                               "set: TLS on")
    tls_cert: str = spec("", path=True, doc="PEM client certificate (chain) for a broker that requires one; "
                                            "with tls_key; set: TLS on")
    tls_key: str = spec("", path=True, doc="PEM private key of tls_cert (unencrypted, mode 0600)")
    client_id: str = spec("", doc="the MQTT client id; empty: derived from topic_prefix")
    topic_prefix: str = spec("powershare-gw/truck-1", doc="P in P/state, P/availability, P/set/..., P/result")
    discovery: bool = spec(True, doc="publish Home Assistant discovery configurations")
    discovery_prefix: str = spec("homeassistant", doc="Home Assistant's discovery prefix")
    publish_interval_s: float = spec(10, lo=1, hi=3_600, doc="P/state at least this often, and on every change")
    keepalive_s: int = spec(30, lo=5, hi=3_600, doc="MQTT keep-alive: the broker publishes the will this long "
                                                   "(times 1.5) after the gateway went silent")
    storm_watch_pct: float = spec(80, lo=0, hi=100, doc="the floor a bare ON on P/set/storm_watch asks for "
                                                        "(the Home Assistant switch)")
    storm_watch_hours: float = spec(24, lo=1, hi=336, doc="... and for how long")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = spec(False)
    listen: str = spec("127.0.0.1:9108", doc="HOST:PORT of the Prometheus endpoint /metrics")


@dataclass(frozen=True)
class Config:
    version: int = spec(FORMAT_VERSION, lo=1, hi=FORMAT_VERSION,
                        doc="the format the file is written in; absent: 1 (files older than the key)")
    vehicle: VehicleConfig = field(default_factory=VehicleConfig)
    can: CanConfig = field(default_factory=CanConfig)
    inverter: InverterConfig = field(default_factory=InverterConfig)
    owner: OwnerConfig = field(default_factory=OwnerConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    web: WebConfig = field(default_factory=WebConfig)
    program: ProgramConfig = field(default_factory=ProgramConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = given_by_loader("<defaults>")

    def dbc_path(self) -> Path:
        """The DBC file: a path (relative to the config file's folder, like every path), else a bundled name."""
        given = Path(self.vehicle.dbc)
        if given.is_absolute():
            return given
        beside = Path(self.source).parent / given
        if Path(self.source).is_file() and beside.exists():
            return beside
        return bundled_dbc(self.vehicle.dbc)


def _bundled(kind: str, name: str) -> Path:
    """A wheel carries dbc/ and config/ as firmware_py.bundled.*; a checkout has them at its top."""
    try:
        root = resources.files(f"firmware_py.bundled.{kind}")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / kind / name
    return Path(str(root.joinpath(name)))


def bundled_dbc(name: str) -> Path:
    return _bundled("dbc", name)


def bundled_dbc_names() -> list[str]:
    """The DBC files shipped with the gateway, by the names `vehicle.dbc` takes (listed when one is mistyped)."""
    return sorted(p.name for p in bundled_dbc("x.dbc").parent.glob("*.dbc"))


def bundled_config(name: str) -> Path:
    return _bundled("config", name)


def _default_paths(config: Config, base: Path) -> Config:
    """Resolve defaulted path fields too, so every path in a Config is absolute."""

    def resolve(obj: Any) -> Any:
        changes = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                changes[f.name] = resolve(value)
            elif f.metadata.get("path") and value and not Path(value).is_absolute():
                changes[f.name] = absolute_path(base, value, private=f.metadata.get("private", False))
        return replace(obj, **changes)

    return resolve(config)


def parse(text: str, source: str, base: Path) -> Config:
    """Parse TOML text into a Config; raises InputError listing every problem."""
    table = parse_toml(text, source)
    _check_format(table, source)
    problems: list[str] = []
    config = load_table(Config, table, "", base, problems)
    if problems:
        raise InputError([f"{source}: {p}" for p in problems])
    config = _default_paths(config, base)
    return replace(config, source=source)


def _check_format(table: dict[str, Any], source: str) -> None:
    """Refuse a file written for a newer format before looking at anything else in it."""
    version = table.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise InputError(f"{source}: version: {version} is a newer configuration format than powershare-gw "
                         f"{software_version()} reads (version {FORMAT_VERSION}): install the release the file "
                         f"was written for, or rewrite the file for version {FORMAT_VERSION} "
                         f"(docs/configuration.md) and set version = {FORMAT_VERSION}")


def load(path: str | Path) -> Config:
    """Load and check a config file's keys and values (docs/configuration.md).

    What needs more than the file (the DBC, addresses, certificates) is checked
    by `assembly.check`, which both `run` and `check-config` go through.
    """
    path = Path(path)
    try:
        text = read_text(path, "configuration")
    except FileNotFoundError:
        raise InputError(f"{path}: cannot read the configuration: no such file") from None
    return parse(text, str(path), path.resolve().parent)


def as_dict(config: Config) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k != "source"}




