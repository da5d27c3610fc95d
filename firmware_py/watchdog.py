"""The systemd watchdog: a ping vouches that the gateway controls, not merely that its loop turns.

A ping sent by a task of its own proves only that the event loop runs. A task
that hangs inside an await (a library waiting on a peer for ever, a lock never
released) leaves the loop free, and the watchdog would be fed while the inverter
is no longer commanded or the BMS no longer read. So each task the control path
rests on reports every round it finishes, and the ping is withheld while any of
them has finished none for longer than its healthy round can take plus
`HUNG_AFTER_S`. systemd then restarts the gateway; the inverter's revert timer
has taken it to 0 W meanwhile.

Every round of those tasks is bounded far below that: a step is synchronous, a
Modbus exchange gives up after `[inverter] timeout_s`, a CAN reopen after
`OPEN_TIMEOUT_S`, a journal write after `[journal] busy_timeout_s`. A slow round
therefore never withholds a ping; only one that does not end does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from firmware_py.clocks import Clock

log = logging.getLogger(__name__)

HUNG_AFTER_S = 30.0
"""How long past its longest healthy round a task may go without finishing one before it counts as hung."""


@dataclass
class _Task:
    longest_round_s: float
    finished_at: float


class Watchdog:
    """Which control tasks finish their rounds, and a ping to systemd only while all of them do."""

    def __init__(self, clock: Clock, notify: Callable[[str], None], hung_after_s: float = HUNG_AFTER_S) -> None:
        self.clock, self.notify, self.hung_after_s = clock, notify, hung_after_s
        self._tasks: dict[str, _Task] = {}
        self._withheld_for: tuple[str, ...] = ()

    def expect(self, name: str, longest_round_s: float) -> Callable[[], None]:
        """Watch task `name`, whose healthy round (its wait included) takes at most `longest_round_s`.
        Returns what the task calls each time it finishes a round."""
        task = self._tasks[name] = _Task(longest_round_s, self.clock())

        def finished() -> None:
            task.finished_at = self.clock()
        return finished

    def hung(self) -> dict[str, float]:
        """The watched tasks that finished no round for too long, with how long it has been."""
        now = self.clock()
        return {name: now - task.finished_at for name, task in self._tasks.items()
                if now - task.finished_at > task.longest_round_s + self.hung_after_s}

    def ping(self) -> bool:
        """WATCHDOG=1 if every watched task is alive. Says once when a ping is first withheld, and for which
        tasks, and once when pings resume (a round that ends after all was slow, not hung)."""
        hung = self.hung()
        names = tuple(sorted(hung))
        if names != self._withheld_for:
            if names:
                log.critical("watchdog: no ping while %s; systemd restarts the gateway unless it ends a round",
                             ", ".join(f"{name} has finished no round for {hung[name]:.0f} s" for name in names))
            else:
                log.warning("watchdog: every task finishes its rounds again; pings resume")
            self._withheld_for = names
        if names:
            return False
        self.notify("WATCHDOG=1")
        return True
