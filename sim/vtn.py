"""A real openleadr VTN on loopback, for the VEN's tests and for the bench.

It lives in `sim` (installed) rather than `tests` because the bench's OpenADR
aggregator (`sim.aggregators`) runs it at run time.

The VTN is openleadr's own `OpenADRServer`; this module only adds what a test
or a scenario needs around it: a free port on 127.0.0.1 bound before the server
starts (no port race), events built the way an aggregator sends them
(LOAD_DISPATCH in kW with a powerReal measurement, SIMPLE levels), modification
and cancellation, a record of every optIn/optOut and telemetry value received,
and the ability to go away and come back on the same port with its state kept
(a network outage, not a new VTN).

Usage::

    async with LoopbackVtn(ven_name="truck-1", poll_s=1) as vtn:
        config = OpenAdrConfig(enabled=True, vtn_url=vtn.url, ven_name="truck-1")
        ...
        event_id = vtn.add_event(LOAD_DISPATCH, start, 600, 5.0)     # 5 kW for 10 min
        opt = await vtn.wait_for_response(event_id)

openleadr keeps some VTN settings on the `VTNService` class (signing, lookup),
so only one LoopbackVtn should run per process at a time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from openleadr import OpenADRServer, enums, objects, utils

LOAD_DISPATCH = "LOAD_DISPATCH"
SIMPLE = "SIMPLE"

T = TypeVar("T")


@dataclass(frozen=True)
class TlsMaterial:
    """A throwaway CA and two leaf certificates (VTN, VEN), all PEM files on disk."""

    ca_file: Path
    vtn_cert: Path
    vtn_key: Path
    ven_cert: Path
    ven_key: Path

    @property
    def vtn_fingerprint(self) -> str:
        return utils.certificate_fingerprint(self.vtn_cert.read_text())

    @property
    def ven_fingerprint(self) -> str:
        return utils.certificate_fingerprint(self.ven_cert.read_text())


def make_tls_material(directory: Path, *, ven_expired: bool = False) -> TlsMaterial:
    """Generate a CA, a VTN certificate for 127.0.0.1/localhost and a VEN client certificate (one that
    expired yesterday with `ven_expired`, as a gateway's own left unrenewed).

    Made at test time with `cryptography` so no secret is ever committed and no
    network is needed.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

    def builder(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey,
                expired: bool = False) -> x509.CertificateBuilder:
        valid_until = now - dt.timedelta(days=1) if expired else now + dt.timedelta(days=2)
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(min(now - dt.timedelta(minutes=5), valid_until - dt.timedelta(days=2)))
                .not_valid_after(valid_until))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (builder("powershare test CA", "powershare test CA", ca_key)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    ca_file, _ = write("ca", ca_key, ca_cert)

    def leaf(stem: str, usage: x509.ObjectIdentifier, expired: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (builder(stem, "powershare test CA", key, expired)
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        return write(stem, key, cert)

    vtn_cert, vtn_key = leaf("vtn", ExtendedKeyUsageOID.SERVER_AUTH)
    ven_cert, ven_key = leaf("ven", ExtendedKeyUsageOID.CLIENT_AUTH, ven_expired)
    return TlsMaterial(ca_file, vtn_cert, vtn_key, ven_cert, ven_key)


@dataclass(frozen=True)
class OptResponse:
    """One oadrCreatedEvent answer as the VTN received it."""

    event_id: str
    opt_type: str
    modification_number: int


@dataclass(frozen=True)
class ReportValue:
    """One telemetry value as the VTN received it."""

    measurement: str
    at: dt.datetime
    value: float


@dataclass
class _Registered:
    ven_id: str
    ven_name: str
    registration_id: str
    fingerprint: str | None = None


@dataclass
class LoopbackVtn:
    """An openleadr VTN serving one named VEN on 127.0.0.1 (see the module docstring).

    `poll_s` and `report_s` are whole seconds: OpenADR durations carry no
    fractions. `poll_s=0` lets the VEN poll as fast as it allows itself
    (OpenAdrVen: 0.5 s), which keeps tests quick.
    """

    ven_name: str = "truck-1"
    poll_s: int = 1
    report_s: int = 1
    tls: TlsMaterial | None = None
    vtn_id: str = "POWERSHARE-TEST-VTN"
    responses: list[OptResponse] = field(default_factory=list)
    reports: list[ReportValue] = field(default_factory=list)
    registrations: list[dict[str, Any]] = field(default_factory=list)
    refused_registrations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ven: _Registered | None = None
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event() if _has_loop() else None
        tls = self.tls
        with warnings.catch_warnings():  # openleadr's own aiohttp usage warns; not ours to fix
            warnings.simplefilter("ignore")
            self.server = self._make_server(tls)
        self.server.add_handler("on_create_party_registration", self._on_create_party_registration)
        self.server.add_handler("on_register_report", self._on_register_report)
        events = self.server.services["event_service"]
        openleadr_request_event = events.request_event

        async def request_event(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            """A complete distribution, also of no events (openleadr answers none with oadrResponse): a VTN
            that withdraws a VEN's last event says so this way, as the 2.0b schema allows."""
            answer = await openleadr_request_event(payload)
            return ("oadrDistributeEvent", {"events": []}) if answer == ("oadrResponse", {}) else answer

        events.request_event = request_event

    def _make_server(self, tls: TlsMaterial | None) -> OpenADRServer:
        return OpenADRServer(
            vtn_id=self.vtn_id,
            http_host="127.0.0.1",
            http_port=0,
            requested_poll_freq=dt.timedelta(seconds=self.poll_s),
            cert=str(tls.vtn_cert) if tls else None,
            key=str(tls.vtn_key) if tls else None,
            http_cert=str(tls.vtn_cert) if tls else None,
            http_key=str(tls.vtn_key) if tls else None,
            http_ca_file=str(tls.ca_file) if tls else None,
            ven_lookup=self._ven_lookup,
            show_fingerprint=False,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """The vtn_url to give the VEN (https in TLS mode)."""
        if self._port is None:
            raise RuntimeError("the VTN is not started")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._port}{self.server.http_path_prefix}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def ven_id(self) -> str | None:
        """The venID issued to the VEN once it has registered."""
        return self._ven.ven_id if self._ven else None

    async def start(self) -> None:
        """Listen on 127.0.0.1: a free port the first time, the same port on a restart."""
        if self._runner is not None:
            return
        if self._changed is None:
            self._changed = asyncio.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port or 0))
        self._port = sock.getsockname()[1]
        runner = web.AppRunner(self.server.app, shutdown_timeout=1.0)
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=self.server.ssl_context).start()
        self._runner = runner

    async def stop(self) -> None:
        """Go away: stop listening and drop open connections; events and registration are kept."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def forget_registration(self) -> None:
        """Lose the VEN's registration (a VTN restored without its database): its next
        message is answered with oadrRequestReregistration. Queued events are kept."""
        self._ven = None

    async def close(self) -> None:
        """Shut down for good (idempotent)."""
        await self.stop()

    async def __aenter__(self) -> LoopbackVtn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ events

    def add_event(self, signal: str, start: dt.datetime, duration_s: float | Sequence[float],
                  values: float | Sequence[float], *, event_id: str | None = None,
                  signal_type: str | None = None, scale: str = "k",
                  unit: str = "W", response_required: str = "always", test_event: bool = False,
                  priority: int = 0, startafter_s: float = 0.0) -> str:
        """Queue an event for the VEN; returns its id.

        `values` gives one payload per interval (kW for LOAD_DISPATCH with the
        default scale, a level 0-3 for SIMPLE); `duration_s` is one duration
        for every interval or one per interval. Intervals follow each other
        from `start`. `priority`: 1 is the highest, 0 none (2.0b). `startafter_s`:
        the window each VEN spreads the event's start over (its tolerance).
        """
        ven_id = self._require_ven()
        event_id = event_id or utils.generate_id()
        event = objects.Event(
            event_descriptor=objects.EventDescriptor(
                event_id=event_id, modification_number=0,
                market_context="oadr://powershare.test/peak", event_status="far", test_event=test_event,
                priority=priority, created_date_time=dt.datetime.now(dt.timezone.utc)),
            event_signals=[self._signal(signal, start, duration_s, values, signal_type, scale, unit)],
            targets=[{"ven_id": ven_id}],
            response_required=response_required,
        )
        self.server.add_raw_event(ven_id=ven_id, event=event, callback=self._opt_callback(0))
        if startafter_s:  # after: openleadr lays the active period out again from the intervals
            event.active_period["tolerance"] = {"startafter": dt.timedelta(seconds=startafter_s)}
        return event_id

    def modify_event(self, event_id: str, *, start: dt.datetime | None = None,
                     duration_s: float | Sequence[float] | None = None,
                     values: float | Sequence[float] | None = None,
                     starts: Sequence[dt.datetime] | None = None) -> int:
        """Change an event's intervals; returns the new modificationNumber. `starts`: each interval's own
        start (a pause between two where one starts after the one before ends), else one after another."""
        event = self._event(event_id)
        old = event.event_signals[0]
        first = min(utils.getmember(i, "dtstart") for i in old.intervals)
        old_durations = [utils.getmember(i, "duration").total_seconds() for i in old.intervals]
        if values is None:
            values = [utils.getmember(i, "signal_payload") for i in old.intervals]
        if duration_s is None:
            count = len(values) if isinstance(values, Sequence) else 1
            duration_s = old_durations if count == len(old_durations) else old_durations[0]
        signal = self._signal(
            old.signal_name,
            start or first,
            duration_s,
            values,
            old.signal_type,
            old.measurement.scale if old.measurement else "none",
            old.measurement.unit if old.measurement else "W",
            starts,
        )
        event.event_signals = [signal]
        event.active_period = utils.get_active_period_from_intervals(signal.intervals, False)
        number = utils.increment_event_modification_number(event)
        event.event_descriptor.modification_date_time = dt.datetime.now(dt.timezone.utc)
        self._requeue(event)
        return number

    def cancel_event(self, event_id: str) -> None:
        """Mark the event cancelled; the VEN learns it on its next poll."""
        event = self._event(event_id)
        self.server.cancel_event(self._require_ven(), event_id)
        self._requeue(event)

    def withdraw_event(self, event_id: str) -> None:
        """Stop distributing the event without marking it cancelled: the next distribution lacks it,
        and the VEN must infer the cancellation (OpenADR 2.0b implicit cancellation)."""
        ven_id = self._require_ven()
        event = self._event(event_id)
        self.server.events[ven_id].remove(event)
        self.server.event_callbacks.pop(event_id, None)
        self.server.events_updated[ven_id] = True

    def add_raw_event(self, event: objects.Event | dict[str, Any]) -> None:
        """Queue an event exactly as given (for payloads add_event cannot express)."""
        number = utils.getmember(event, "event_descriptor.modification_number")
        self.server.add_raw_event(ven_id=self._require_ven(), event=event, callback=self._opt_callback(number))

    def opt_for(self, event_id: str, modification_number: int | None = None) -> str | None:
        """The newest opt received for the event (at that modificationNumber if given)."""
        for response in reversed(self.responses):
            if response.event_id == event_id and modification_number in (None, response.modification_number):
                return response.opt_type
        return None

    # ------------------------------------------------------------------ waiting

    async def wait_for(self, probe: Callable[[], T], timeout_s: float = 5.0) -> T:
        """Wait until `probe()` is truthy (re-checked on every VTN message); TimeoutError otherwise."""
        async def until() -> T:
            while not (result := probe()):
                assert self._changed is not None
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass
            return result

        return await asyncio.wait_for(until(), timeout_s)

    async def wait_for_response(self, event_id: str, modification_number: int | None = None,
                                timeout_s: float = 5.0) -> str:
        return await self.wait_for(lambda: self.opt_for(event_id, modification_number), timeout_s)

    async def wait_for_registration(self, timeout_s: float = 5.0) -> str:
        return await self.wait_for(lambda: self.ven_id, timeout_s)

    # ------------------------------------------------------------------ internals

    def _signal(self, signal: str, start: dt.datetime, duration_s: float | Sequence[float],
                values: float | Sequence[float], signal_type: str | None, scale: str,
                unit: str, starts: Sequence[dt.datetime] | None = None) -> objects.EventSignal:
        values = list(values) if isinstance(values, Sequence) else [values]
        durations = (list(duration_s) if isinstance(duration_s, Sequence)
                     else [duration_s] * len(values))
        if len(durations) != len(values):
            raise ValueError("one duration per value, or a single duration for all")
        intervals, at = [], start
        for uid, (value, seconds) in enumerate(zip(values, durations, strict=True)):
            length = dt.timedelta(seconds=seconds)
            at = starts[uid] if starts is not None else at
            intervals.append(objects.Interval(dtstart=at, duration=length, signal_payload=value, uid=uid))
            at += length
        if signal == LOAD_DISPATCH:
            measurement = objects.Measurement(
                name="powerReal", description="RealPower", unit=unit, scale=scale,
                power_attributes=objects.PowerAttributes(hertz=60, voltage=240, ac=True))
            kind = signal_type or enums.SIGNAL_TYPE.SETPOINT
        else:
            measurement, kind = None, signal_type or enums.SIGNAL_TYPE.LEVEL
        return objects.EventSignal(intervals=intervals, signal_name=signal, signal_type=kind,
                                   signal_id=utils.generate_id(), measurement=measurement,
                                   current_value=0.0)

    def _event(self, event_id: str) -> objects.Event:
        ven_id = self._require_ven()
        event = utils.find_by(self.server.events.get(ven_id, []), "event_descriptor.event_id", event_id)
        if event is None:
            raise KeyError(f"no event {event_id!r} queued for {ven_id}")
        return event

    def _requeue(self, event: objects.Event) -> None:
        """Make the next poll redistribute the events and keep listening for the new answer."""
        event_id = event.event_descriptor.event_id
        number = event.event_descriptor.modification_number
        self.server.event_callbacks[event_id] = (event, self._opt_callback(number))
        self.server.events_updated[self._require_ven()] = True

    def _require_ven(self) -> str:
        if self._ven is None:
            raise RuntimeError(f"VEN {self.ven_name!r} has not registered yet")
        return self._ven.ven_id

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _ven_lookup(self, ven_id: str) -> dict[str, Any]:
        ven = self._ven
        if ven is None or ven.ven_id != ven_id:
            return {}
        return {"ven_id": ven.ven_id, "ven_name": ven.ven_name,
                "registration_id": ven.registration_id, "fingerprint": ven.fingerprint}

    def _on_create_party_registration(self, payload: dict[str, Any]) -> tuple[str, str] | bool:
        self.registrations.append(payload)
        self._poke()
        name = payload.get("ven_name")
        if name != self.ven_name:
            self.refused_registrations.append(str(name))
            return False
        if self.tls is not None and payload.get("fingerprint") != self.tls.ven_fingerprint:
            self.refused_registrations.append(f"{name} (certificate fingerprint mismatch)")
            return False
        if self._ven is None:
            self._ven = _Registered(ven_id=f"ven-{name}", ven_name=name,
                                    registration_id=utils.generate_id(),
                                    fingerprint=self.tls.ven_fingerprint if self.tls else None)
        return self._ven.ven_id, self._ven.registration_id

    async def _on_register_report(self, ven_id: str, resource_id: str, measurement: str, unit: str,
                                  scale: str, min_sampling_interval: dt.timedelta,
                                  max_sampling_interval: dt.timedelta) -> tuple[Callable[..., None],
                                                                                dt.timedelta]:
        """Ask for every offered measurement at `report_s` (within what the VEN offers)."""
        wanted = dt.timedelta(seconds=self.report_s)
        interval = min(max(wanted, min_sampling_interval), max_sampling_interval)

        def collect(values: list[tuple[dt.datetime, float]]) -> None:
            for at, value in values:
                self.reports.append(ReportValue(measurement, at, value))
            self._poke()

        return collect, interval

    def _opt_callback(self, modification_number: int) -> Callable[..., None]:
        """openleadr's callback does not say which modification was answered, so bind it."""
        def on_opt(ven_id: str, event_id: str, opt_type: str) -> None:
            self.responses.append(OptResponse(event_id, opt_type, modification_number))
            self._poke()
        return on_opt


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
