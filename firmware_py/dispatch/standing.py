"""When an interface holding a standing setting should look again: a gateway step changed what admits dispatch.

A standing setting (the DER server's setpoint, an OpenADR event in its active
period) that the core refused or capped is asked for again once the core says a
new revision would be served better (`Telemetry.improvable`). Asking the core
that costs a judgement per held request, so interfaces do not ask on every step:
they ask on their own tick, and at once when a step changed something that
decides admission (the mode, the command's reason, the owner's settings, a site
limit, the journal's health, the latched faults, and what refuses any request at
the moment: the core's own `refusal`, so a grid outage ending or the inverter's
enter-service delay running out wakes them too, though neither changes a setting).
This watch tells them which steps those are, from the step's result alone (a
gateway observer sees nothing else).
"""

from __future__ import annotations

import asyncio
from typing import Any

from firmware_py.core.answers import refusal
from firmware_py.core.controller import StepResult


class StandingWatch:
    """Remembers what admitted dispatch at the last step seen; `changed` says when that moved."""

    def __init__(self) -> None:
        self._last: tuple[Any, ...] | None = None

    def changed(self, result: StepResult) -> bool:
        """True when this step changed what admits dispatch since the last step seen."""
        c = result.controller
        key = (c.mode, c.reason, id(c.owner), c.site_limits, id(c.journal), c.faults.kinds, c.faults.locked_out,
               c.resyncing, _refused(result))
        moved = key != self._last
        self._last = key
        return moved


def _refused(result: StepResult) -> Any:
    """What the core says refuses every request as of the step (its reason code), None when nothing does."""
    c = result.controller
    if c.last_step_at is None:
        return None
    why = refusal(c, c.last_step_at)
    return None if why is None else why[0]


class StandingLooks:
    """The looks at standing settings the gateway's steps asked of an interface, and how many it has taken.

    An interface's standing task takes them on its own time; a bench that runs the gateway on a simulated
    clock waits for `settled` before moving the clock on, so a re-ask lands at the simulated moment that
    called for it rather than whenever the wall clock lets the task run."""

    def __init__(self) -> None:
        self.asked = 0
        self.taken = 0
        self._settled = asyncio.Event()
        self._settled.set()

    @property
    def pending(self) -> bool:
        return self.taken < self.asked

    def ask(self) -> None:
        """A step called for a look (the interface wakes its standing task alongside)."""
        self.asked += 1
        self._settled.clear()

    def begin(self) -> int:
        """The standing task starts a look: it covers every ask so far (hand the value to `done`)."""
        return self.asked

    def done(self, covered: int) -> None:
        self.taken = max(self.taken, covered)
        if not self.pending:
            self._settled.set()

    async def settled(self) -> None:
        """Until every look asked so far has been taken."""
        while self.pending:
            await self._settled.wait()
