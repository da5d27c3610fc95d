"""When an interface holding a standing setting should look again: a gateway step changed what admits dispatch.

A standing setting (the DER server's setpoint, an OpenADR event in its active
period) that the core refused or capped is asked for again once the core says a
new revision would be served better (`Telemetry.improvable`). Asking the core
that costs a judgement per held request, so interfaces do not ask on every step:
they ask on their own tick, and at once when a step changed something that
decides admission (the mode, the command's reason, the owner's settings, a site
limit, the journal's health, the latched faults). This watch tells them which
steps those are, from the step's result alone (a gateway observer sees nothing else).
"""

from __future__ import annotations

from typing import Any

from firmware_py.core.controller import StepResult


class StandingWatch:
    """Remembers what admitted dispatch at the last step seen; `changed` says when that moved."""

    def __init__(self) -> None:
        self._last: tuple[Any, ...] | None = None

    def changed(self, result: StepResult) -> bool:
        """True when this step changed what admits dispatch since the last step seen."""
        c = result.controller
        key = (c.mode, c.reason, id(c.owner), c.site_limits, id(c.journal), c.faults.kinds, c.faults.locked_out,
               c.resyncing)
        moved = key != self._last
        self._last = key
        return moved
