"""The gateway's journal: durable, hash-chained records of dispatch, decisions, faults and energy."""

from firmware_py.journal.chain import Chain, ChainReport
from firmware_py.journal.kinds import RecordKind
from firmware_py.journal.store import Journal, JournalWriteError, Record
from firmware_py.journal.summary import EventSummary, TimelineEntry, event_summaries

__all__ = [
           "Chain",
           "ChainReport",
           "EventSummary",
           "Journal",
           "JournalWriteError",
           "Record",
           "RecordKind",
           "TimelineEntry",
           "event_summaries",
]
