"""Where dispatch requests come from: aggregator protocols and the owner.

Every source speaks to the gateway through the same two calls, so the core's
one arbiter decides for all of them and no source can bypass a limit.
"""

from __future__ import annotations

from typing import Protocol

from firmware_py.core.telemetry import Telemetry
from firmware_py.core.types import DispatchAnswer, DispatchCancel, DispatchRequest, PriceInterval, SiteLimit
from firmware_py.journal.kinds import RecordKind

__all__ = ["DispatchSink", "DispatchSource", "Telemetry"]


class DispatchSink(Protocol):
    """The gateway as seen by a dispatch source."""

    async def submit(self, item: DispatchRequest | DispatchCancel | SiteLimit | PriceInterval) -> DispatchAnswer | None:
        """Hand a request or a published price (answered), a cancel or a site limit (None) to the core."""

    def telemetry(self) -> Telemetry:
        """The newest state, for reports and SunSpec reads."""

    def now(self) -> float:
        """The gateway clock that request start/end times are on."""

    def note(self, kind: RecordKind, payload: dict) -> None:
        """Journal something a source refused before it became a request (a bad write, a bad event)."""

    def journal_notes(self, kind: RecordKind, back_s: float) -> list[dict]:
        """The payloads of the notes of `kind` journaled in the last `back_s` seconds, oldest first: what a
        source noted before a restart (the reports its VTN took)."""

    def journaled_wh(self, request_id: str) -> float:
        """Wh the journal credits a request (or price) id with so far, as the statement bills it: a source
        restarted mid-event reports what the run before it delivered too."""


class DispatchSource(Protocol):
    """One way requests arrive (OpenADR VEN, SunSpec server, scripted scenario)."""

    async def run(self, sink: DispatchSink) -> None:
        """Serve until cancelled; never raises for a peer's bad input."""
