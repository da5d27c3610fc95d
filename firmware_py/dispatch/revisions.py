"""What a new revision of an aggregator's event ends of what the gateway was asked before.

Both OpenADR VENs turn each interval of an event into a request under an id of its own, and list every
interval's id, ended or not, so that a revision which drops an interval cancels exactly that one. An
interval a revision keeps but ends before now (cut short) asks for nothing: its id is still listed, so it
is not dropped, yet the request asked for before would go on at its old power to its old end.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from firmware_py.core.types import DispatchRequest


def ended_by_revision(before: Mapping[str, DispatchRequest], listed: Collection[str],
                      asked: Iterable[DispatchRequest], now: float) -> tuple[str, ...]:
    """The ids of the requests asked for `before` that the revision still lists but asks nothing of, whose old
    window is still open at `now`: the ones to end."""
    still_asked = {r.id for r in asked}
    return tuple(sorted(rid for rid, r in before.items() if rid in listed and rid not in still_asked and r.end > now))
