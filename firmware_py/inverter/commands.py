"""`powershare-gw inverter probe`: what the gateway's client sees, for installers."""

from __future__ import annotations

import argparse
import asyncio
import time

from firmware_py import config
from firmware_py.errors import InputError


def _fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "not implemented"
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{value} {unit}".strip()


def _es(value: object) -> str:
    """703 `ES` for an installer: 'NOT permitted' only when the inverter says so (0); a point it does not
    implement says nothing about whether it may enter service."""
    if value is None:
        return "ES not implemented"
    return "permitted" if value else "NOT permitted"


async def _probe(settings: config.InverterConfig) -> list[str]:
    from firmware_py.commissioning.judgement import link_advice, link_detail
    from firmware_py.commissioning.probes import diagnose_link_failure
    from firmware_py.core.types import InverterState
    from firmware_py.inverter.client import InverterClient, LinkError

    client = InverterClient(settings, time.monotonic)  # back-off and receive times: the monotonic clock
    try:
        disc = await client.connect()
    except LinkError as err:  # told apart as commission tells it: address, unit id, not SunSpec, model chain
        failure = await diagnose_link_failure(settings, err, client.marker_at)
        raise InputError(f"inverter: {link_detail(failure)}; check {link_advice(failure)}") from None
    try:
        status = await client.read_status(setpoint=True)
    finally:
        await client.close()
    c, r = disc.common, disc.ratings
    lines = [
        f"SunSpec device at base {disc.base}: {_fmt(c.get('Mn'))} {_fmt(c.get('Md'))} "
        f"serial {_fmt(c.get('SN'))} version {_fmt(c.get('Vr'))}",
        "models: " + ", ".join(f"{m} @{at} (L={length})" for m, (at, length) in disc.models.items()),
        f"ratings: WMaxRtg {_fmt(r.get('WMaxRtg'), 'W')}, WDisChaRteMaxRtg {_fmt(r.get('WDisChaRteMaxRtg'), 'W')}, "
        f"WChaRteMaxRtg {_fmt(r.get('WChaRteMaxRtg'), 'W')}, VNomRtg {_fmt(r.get('VNomRtg'), 'V')}",
    ]
    if disc.storage is not None:
        s = disc.storage
        lines.append(f"storage (713): WHRtg {_fmt(s.get('WHRtg'), 'Wh')}, SoC {_fmt(s.get('SoC'), '%')}")
    if disc.enter_service is not None:
        e = disc.enter_service
        lines.append(f"enter service (703): {_es(e.get('ES'))}, "
                     f"delay ESDlyTms {_fmt(e.get('ESDlyTms'), 's')}, ramp ESRmpTms {_fmt(e.get('ESRmpTms'), 's')}")
    if not status.comms_ok:
        lines.append(f"state: unreadable: {status.error}")
        return lines
    lines.append(
        f"state: {InverterState(status.inv_state).name}, W {_fmt(status.measured_w, 'W')}, "
        f"WSet {_fmt(status.wset_w, 'W')}, grid {'connected' if status.grid_connected else 'DISCONNECTED'}"
        f"{', GRID OUTAGE' if status.grid_outage else ''}"
        f"{f', entering service in {status.enter_service_s:.0f} s' if status.enter_service_s else ''}, "
        f"alarms 0x{status.alarms:08x}, "
        f"TotWhInj {_fmt(status.tot_wh_inj, 'Wh')}, TotWhAbs {_fmt(status.tot_wh_abs, 'Wh')}")
    return lines


def _probe_cmd(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    for line in asyncio.run(_probe(cfg.inverter)):
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `inverter probe`."""
    p = sub.add_parser("inverter", help="the inverter link (SunSpec Modbus)")
    p.set_defaults(handler=lambda args: p.print_help() or 0)
    actions = p.add_subparsers(dest="inverter_action", metavar="ACTION")
    probe = actions.add_parser("probe", help="connect, discover the SunSpec models and print ratings and state")
    probe.add_argument("--config", required=True, help="the gateway's TOML configuration ([inverter] section)")
    probe.set_defaults(handler=_probe_cmd)
