"""Where every owner change is made, whoever asks: the loopback owner API, the web app, a script.

One path for all of them, so a change means the same and is checked the same
wherever it comes from: the rule is `changes` (pure), worked out on the wall
clock (the owner's times, the settings file's); the result is saved before the
core hears of it (if the save fails, nothing changes, so what the core runs on
is always what a restart loads); then it goes to the core on its own clock, and
the gateway journals it like every input.

The read-modify-save-feed runs without yielding to the event loop until the core
has the new settings, so two servers with a desk each over the same gateway cannot
lose each other's changes; the lock only keeps one desk's changes in order.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from firmware_py.clocks import Clocks
from firmware_py.core.types import OwnerSettings
from firmware_py.owner import OwnerPort, changes
from firmware_py.owner.store import OwnerStore, on_clock

Change = Callable[[OwnerSettings, float], OwnerSettings]


class NotApplied(Exception):
    """A change that was not made, nothing changed (the message says why); `status` is its HTTP answer."""

    status = 500


class SaveFailed(NotApplied):
    """The settings file could not be written."""


class Stopping(NotApplied):
    """The gateway is stopping: a change now would be lost with the process, or worse, command the
    inverter after its safe stop. Refused before anything is saved; the owner asks again once it runs."""

    status = 503

    def __init__(self, what: str = "nothing changed") -> None:
        super().__init__(f"the gateway is stopping: {what}; ask again once it runs")


@dataclass(frozen=True)
class Control:
    """One owner control as the APIs serve it: its path, and how a body sets it or clearing it does."""

    path: str
    set: Callable[[Any, dt.tzinfo | None], Change]
    clear: Change | None = None


def _with_body(rule: Callable[..., OwnerSettings], zoned: bool) -> Callable[[Any, dt.tzinfo | None], Change]:
    if zoned:
        return lambda body, tz: lambda s, now: rule(s, body, now, tz)
    return lambda body, tz: lambda s, now: rule(s, body, now)


CONTROLS: tuple[Control, ...] = (
    Control("reserve", _with_body(changes.set_reserve, zoned=False)),
    Control("opt-out", _with_body(changes.opt_out, zoned=True), changes.revoke_opt_out),
    Control("departure", _with_body(changes.set_departure, zoned=True), changes.clear_departure),
    Control("storm-watch", _with_body(changes.set_storm_watch, zoned=True), changes.clear_storm_watch),
    Control("price", _with_body(changes.set_price_mode, zoned=False), changes.clear_price_mode),
)
"""Every owner control, in the order the owner command and the docs list them."""
DEPARTURE = next(control for control in CONTROLS if control.path == "departure")


class OwnerDesk:
    """Applies owner changes to one running gateway (`port`), persisting them in `store`."""

    def __init__(self, port: OwnerPort, store: OwnerStore, clocks: Clocks | None = None,
                 tz: dt.tzinfo | None = None) -> None:
        self.port = port
        self.store = store
        self.clocks = clocks or Clocks.simulated(port.now)  # the gateway's pair; a port's own clock for both
        self.tz = tz
        self._lock = asyncio.Lock()

    def settings(self) -> OwnerSettings:
        """The settings the core uses now, with wall-clock instants (as the file and the owner hold them),
        without what has ended: the core stops counting a storm watch, departure or opt-out at its time,
        but keeps it until the next change, and a reader (the web page's Controls, `owner status`)
        should not show it as still on."""
        return changes.pruned(on_clock(self.port.owner_settings(), self.clocks.to_wall), self.clocks.wall())

    def preview(self, control: Control, body: Any) -> OwnerSettings:
        """The settings `control` would make from `body` now, on the core's clock, checked by the same
        rules as `set` (BadRequest) but neither saved nor applied: what the page shows before the owner
        commits to a change (the departure's floor)."""
        return on_clock(control.set(body, self.tz)(self.settings(), self.clocks.wall()), self.clocks.to_core)

    async def apply(self, change: Change) -> OwnerSettings:
        """Make one change; the new settings on the wall clock. BadRequest (with the owner's reason)
        when the change is refused, NotApplied when it could not be made now (not saved, the gateway
        stopping): either way nothing changed."""
        async with self._lock:
            if self.port.stopping:
                raise Stopping()
            settings = change(self.settings(), self.clocks.wall())
            try:
                self.store.save(settings)
            except OSError as err:
                raise SaveFailed(f"{self.store.path}: could not save the owner settings "
                                 f"({err.strerror or err}); nothing changed") from None
            await self.port.set_owner(on_clock(settings, self.clocks.to_core))
        return settings

    async def set(self, control: Control, body: Any) -> OwnerSettings:
        return await self.apply(control.set(body, self.tz))

    async def clear(self, control: Control) -> OwnerSettings:
        if control.clear is None:
            raise changes.BadRequest(f"{control.path} cannot be cleared, only set")
        return await self.apply(control.clear)
