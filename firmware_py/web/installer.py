"""The installer's view: the effective configuration without secrets, the links, the fault latches.

Read-only documents built from the configuration, the core's read model
(`Telemetry`, with each latch's hold-off) and the link book. The configuration
holds paths to secrets (token files, keys), never a secret itself; any key whose
name says it is a secret is blanked all the same, so a later key cannot leak
through this view by accident.
"""

from __future__ import annotations

from typing import Any

from firmware_py.clocks import utc_text
from firmware_py.config import Config, as_dict
from firmware_py.core.telemetry import Telemetry
from firmware_py.quoting import without_query

SECRET_WORDS = ("password", "secret", "token")
"""A key naming one of these holds a secret, unless it names a file (`..._file`) or an address (`..._url`,
which the configuration refuses with credentials in it, and whose query is hidden): paths and addresses are shown."""
SHOWN_SUFFIXES = ("_file", "_url")
REDACTED = "(hidden)"


def redacted(value: Any, key: str = "") -> Any:
    """`value` with every secret-named leaf replaced by `REDACTED`."""
    if isinstance(value, dict):
        return {k: redacted(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v, key) for v in value]
    name = key.lower()
    if name.endswith("_url") and isinstance(value, str):
        return without_query(value)
    if any(word in name for word in SECRET_WORDS) and not name.endswith(SHOWN_SUFFIXES) and value not in ("", None):
        return REDACTED
    return value


def installer_view(config: Config, t: Telemetry, links: dict[str, dict[str, Any]], wall_now: float) -> dict[str, Any]:
    """What the installer page shows: configuration, links (with where they point), latches, lockout."""
    policy_holdoff = config.safety.fault_holdoff_s
    return {
        "config": redacted(as_dict(config)),
        "config_file": config.source,
        "links": _links(config, links),
        "latches": [{"kind": str(latch.kind), "since": utc_text(wall_now + (latch.raised_at - t.at)),
                     "detail": latch.detail, "clears_in_s": None if latch.clears_in_s is None
                     else round(latch.clears_in_s, 1)} for latch in t.latches],
        "holdoff_s": policy_holdoff,
        "lockout": {"locked_out": "lockout" in [str(f) for f in t.faults], "faults_in_window": t.lockout_count,
                    "limit": config.safety.lockout_faults, "window_s": config.safety.lockout_window_s},
        "mode": t.mode.value,
        "reason": t.reason,
    }


def _links(config: Config, links: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    where = {
        "bms": f"CAN {config.can.interface} {config.can.channel}",
        "inverter": (f"Modbus TCP {config.inverter.host}:{config.inverter.port}, unit {config.inverter.unit_id}"
                     if config.inverter.transport == "tcp"
                     else f"Modbus RTU {config.inverter.serial_port} at {config.inverter.baudrate} Bd, "
                          f"unit {config.inverter.unit_id}"),
        "openadr": f"VTN {config.dispatch.openadr.vtn_url}",
        "openadr3": f"VTN {config.dispatch.openadr3.vtn_url}",
        "sunspec_server": f"listening on {config.dispatch.sunspec_server.listen}",
    }
    return {name: {**state, "where": where.get(name, "")} for name, state in links.items()}
