"""Owner controls: reserve, opt-out and departure, set over a local API.

The owner ranks above the aggregator (docs/architecture.md), so these settings travel to
the core through the gateway like any other input, are persisted so a restart
never forgets a raised reserve, and are journaled by the gateway on every change.
This module holds only the boundary the running gateway implements; the HTTP
server (`api`), the settings file (`store`) and the CLI (`commands`) import it.
"""

from __future__ import annotations

from typing import Any, Protocol

from firmware_py.core.telemetry import Telemetry
from firmware_py.core.types import OwnerSettings


class OwnerPort(Protocol):
    """The running gateway as the owner API sees it."""

    stopping: bool
    """The gateway is stopping: no change is made any more."""

    def owner_settings(self) -> OwnerSettings:
        """The settings the core is using now."""

    async def set_owner(self, settings: OwnerSettings) -> None:
        """Feed new settings to the core and journal them."""

    def telemetry(self) -> Telemetry:
        """The newest state, for `status`."""

    def status(self) -> dict[str, Any]:
        """The live state document (`firmware_py/status.py`), for `GET /api/status`."""

    def now(self) -> float:
        """The core's clock (monotonic in the real gateway; settings' instants are on it)."""


__all__ = ["OwnerPort"]
