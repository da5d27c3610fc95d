"""When a randomised event starts.

OpenADR lets a VTN spread the start of an event over a window (2.0b's tolerance `startafter`,
3's `randomizeStart`), so that the thousands of VENs it dispatches do not all step onto the grid
in the same second. Each VEN starts the event a delay within that window later, and runs it for
its whole length.

The delay is drawn from the VEN's name and the event's id rather than from a random generator:
the same event read again (every poll, after a restart, at a new revision) keeps its delay, so
its windows never move under a request the core has already answered; two gateways draw
differently; and a test can say which delay it expects.
"""

from __future__ import annotations

import hashlib


def start_delay_s(ven_name: str, event_id: str, window_s: float) -> float:
    """A delay in [0, `window_s`), the same for the same VEN and event, spread evenly across VENs."""
    if not window_s > 0:
        return 0.0
    digest = hashlib.sha256(f"{ven_name}\x1f{event_id}".encode()).digest()
    return window_s * int.from_bytes(digest[:8], "big") / 2**64
