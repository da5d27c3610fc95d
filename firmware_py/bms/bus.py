"""Opening a CAN bus: the one place a python-can interface is chosen by name.

`run`, the bench, `bms record` and `sim bms` all open their bus here, so an
interface that cannot be opened is always the same clear input error naming
what the operator gave (a config key or a flag), never a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

import can

from firmware_py.errors import InputError

# A bus that is software all the way down: python-can would apply acceptance filters in Python,
# frame by frame, in this process, which costs more than the reader's own id lookup. Every other
# interface gets the filters, applied before a frame reaches this process: by the kernel driver or
# the adapter's hardware, or, for `remote`, by the CAN server in its own process, so a frame the
# gateway does not want never crosses the socket.
SOFTWARE_BUSES = frozenset({"virtual"})
SEND_ONLY = [{"can_id": 0, "can_mask": 0x1FFFFFFF, "extended": True}]
"""Acceptance filters for a node that only sends (the simulated BMS): nothing it would ever be sent."""


class BusUnavailable(InputError):
    """The bus could not be opened now: the driver or the device said no (an adapter not yet
    enumerated or unplugged, `can0` down, a CAN server not running), not the configuration.

    Still an `InputError`, so a one-shot command fails at once with its clear message; the
    gateway's link instead starts without the bus and keeps trying, as it does for a bus that
    breaks later. An interface python-can does not know stays a plain `InputError`: no retry
    will ever fix that.
    """


def _transient(err: Exception) -> bool:
    """Whether opening may work later: an OS or python-can error, but not an unknown interface."""
    return isinstance(err, (OSError, can.CanError)) and not isinstance(err, can.CanInterfaceNotImplementedError)


def open_bus(interface: str, channel: str, *, blame: str, filters: list[dict[str, Any]] | None = None,
             **kwargs: Any) -> can.BusABC:
    """A python-can bus, with acceptance `filters` where its driver applies them.

    `blame` names what the operator gave (a config file and section, or the flags)
    so the message says what to fix.
    """
    if interface in SOFTWARE_BUSES:
        filters = None
    try:
        return can.Bus(interface=interface, channel=channel, can_filters=filters, **kwargs)
    except Exception as err:  # noqa: BLE001 - each interface raises its own types; all mean "cannot open"
        problem = f"{blame}: cannot open the {interface} bus {channel!r}: {err}"
        raise (BusUnavailable(problem) if _transient(err) else InputError(problem)) from None


def shutdown_quietly(bus: can.BusABC, log: logging.Logger) -> None:
    """Close a bus that may already be broken (its server gone, its adapter unplugged).

    Closing a dead bus is an expected part of healing the link, so its error is
    one log line, not a traceback, and never stops what comes after.
    """
    try:
        bus.shutdown()
    except Exception as err:  # noqa: BLE001 - each interface fails its own way on a dead link
        log.info("closing the broken CAN bus %r: %s", getattr(bus, "channel_info", bus), err or type(err).__name__)
        # An interface that failed before python-can's own part of closing ran would be closed again, with a
        # traceback, when the object is collected; that part only marks the bus closed and stops periodic sends.
        can.BusABC.shutdown(bus)
