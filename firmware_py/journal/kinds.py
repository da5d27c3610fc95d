"""The kinds of journal record: one name each, compared as members, stored as their text.

The stored text is what old journals hold and what the hash chain covers, so a
member's value never changes: core events and inputs are their class names,
notes name what they record.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class RecordKind(StrEnum):
    # what the core decided
    DISPATCH_ANSWER = "DispatchAnswer"
    TRANSITION = "Transition"
    FAULT_RAISED = "FaultRaised"
    FAULT_CLEARED = "FaultCleared"
    DISPATCH_ENDED = "DispatchEnded"
    EVENT_ENERGY = "EventEnergy"
    RESYNCED = "Resynced"
    SERVING_CHANGED = "ServingChanged"
    # what came in that shaped those decisions
    DISPATCH_REQUEST = "DispatchRequest"
    DISPATCH_CANCEL = "DispatchCancel"
    OWNER_SETTINGS = "OwnerSettings"
    INSTALLER_RESET = "InstallerReset"
    STALL = "Stall"
    SITE_LIMIT = "SiteLimit"
    PRICE_INTERVAL = "PriceInterval"  # a published price (answered like a request: DispatchAnswer, same id)
    # for replay: where the core started and the inputs of its steps, in batches
    CORE_START = "CoreStart"
    CORE_STEPS = "CoreSteps"
    # the journal's own housekeeping: where a segment begins (after a rotation), which were pruned,
    # when the file's schema was upgraded
    SEGMENT_START = "SegmentStart"
    SEGMENT_PRUNED = "SegmentPruned"
    SCHEMA_UPGRADED = "SchemaUpgraded"  # a file of an older schema was brought to this one (from, to, software)
    JOURNAL_GAP = "JournalGap"  # while writes failed, core steps and samples past their bound were not kept
    # notes: what a source refused before it became a request, links lost and back, run markers
    SUNSPEC_WRITE_REFUSED = "SunSpecWriteRefused"  # the first DER server refusal of a client and cause
    SUNSPEC_REFUSALS = "SunSpecRefusals"  # how many more of them, once per interval
    OPENADR3_REPORTED = "OpenAdr3Reported"  # the VTN took (or refused for good) an energy report: event, intervals
    OPENADR3_HELD = "OpenAdr3Held"  # an event the VEN took up, as the VTN listed it: reported after a restart
    LINK_LOST = "LinkLost"
    LINK_RECOVERED = "LinkRecovered"
    SAMPLE = "Sample"  # SoC, floor, setpoint and measured power now and then, for the history chart
    BENCH_RUN = "BenchRun"
    BENCH_LOAD = "BenchLoad"

    @classmethod
    def of(cls, event: Any) -> RecordKind:
        """The kind a core event or input is journaled as (ValueError for anything else)."""
        return cls(type(event).__name__)

    @classmethod
    def read(cls, text: str) -> RecordKind | str:
        """A stored kind as a member, or the text itself for a kind this gateway does not know."""
        try:
            return cls(text)
        except ValueError:
            return text
