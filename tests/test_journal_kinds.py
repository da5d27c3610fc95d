"""Record kinds: one enum in code, the same text on disk as before (old journals still read)."""

from __future__ import annotations

import sqlite3

import pytest

from firmware_py.core import types as t
from firmware_py.journal import Journal, RecordKind
from firmware_py.journal.codec import BY_KIND, JOURNALED


def test_every_journaled_class_has_its_kind_and_the_kind_is_its_name():
    assert set(BY_KIND.values()) == set(JOURNALED)
    assert all(kind.value == cls.__name__ for kind, cls in BY_KIND.items())


@pytest.mark.parametrize("kind, text", [
    (RecordKind.DISPATCH_ANSWER, "DispatchAnswer"), (RecordKind.EVENT_ENERGY, "EventEnergy"),
    (RecordKind.DISPATCH_ENDED, "DispatchEnded"), (RecordKind.TRANSITION, "Transition"),
    (RecordKind.SUNSPEC_WRITE_REFUSED, "SunSpecWriteRefused"), (RecordKind.BENCH_RUN, "BenchRun"),
])
def test_the_stored_text_never_changes(tmp_path, kind, text):
    path = tmp_path / "j.sqlite"
    with Journal.open(path) as journal:
        journal.append(kind, 1.0, {})
        (record,) = journal.records(kind=kind)
        assert record.kind is kind
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT kind FROM records").fetchone()[0] == text


def test_events_are_journaled_under_their_kind_and_unknown_kinds_stay_text(tmp_path):
    with Journal.open(tmp_path / "j.sqlite") as journal:
        journal.append_event(t.DispatchAnswer.accepted("e", 1.0))
        journal.append("SomethingNewer", 2.0, {})
        answer, other = journal.records()
        assert answer.kind is RecordKind.DISPATCH_ANSWER and answer.kind == "DispatchAnswer"
        assert other.kind == "SomethingNewer" and not isinstance(other.kind, RecordKind)
        assert journal.verify() == []


def test_of_names_the_kind_of_an_event():
    assert RecordKind.of(t.InstallerReset(0.0)) is RecordKind.INSTALLER_RESET
    with pytest.raises(ValueError):
        RecordKind.of(t.Tick(0.0))
