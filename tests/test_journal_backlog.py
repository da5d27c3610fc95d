"""The journal's queue: every decision and input kept while writes fail; the bulk that grows with
time alone (core steps for replay, history samples) bounded, and what was dropped said in its place."""

from __future__ import annotations

from firmware_py.core.types import DispatchCancel
from firmware_py.journal import RecordKind
from firmware_py.journal.backlog import Backlog

STEPS, SAMPLE, GAP = RecordKind.CORE_STEPS, RecordKind.SAMPLE, RecordKind.JOURNAL_GAP


def batch(first: float, count: int = 10) -> dict:
    return {"from": first, "to": first + count - 1, "count": count, "format": "json+zlib+base64", "data": ""}


def kinds(items: list) -> list:
    return [item[0] if isinstance(item, tuple) else type(item).__name__ for item in items]


def test_past_its_bound_a_bulk_kind_is_dropped_and_one_gap_in_its_place_counts_it():
    backlog = Backlog({STEPS: 2, SAMPLE: 1})
    for n in range(5):
        backlog.add_note(STEPS, n * 10.0 + 9, batch(n * 10.0))
        backlog.add(DispatchCancel(f"r{n}", "test", received_at=n * 10.0))  # a decision's input: always kept
        backlog.add_note(SAMPLE, n * 10.0 + 5, {"soc_pct": 80 - n})
    items = backlog.take()
    assert kinds(items) == [STEPS, "DispatchCancel", SAMPLE, STEPS, "DispatchCancel", GAP, "DispatchCancel",
                            "DispatchCancel", "DispatchCancel"]
    (gap,) = [item[2] for item in items if isinstance(item, tuple) and item[0] == GAP]
    assert gap == {"from": 15.0, "to": 49.0, "step_batches": 3, "steps": 30, "samples": 4}


def test_a_failed_write_puts_everything_back_in_order_and_the_same_gap_counts_on():
    backlog = Backlog({STEPS: 1})
    backlog.add_note(STEPS, 9.0, batch(0.0))
    backlog.add_note(STEPS, 19.0, batch(10.0))  # dropped: the gap opens
    taken = backlog.take()
    backlog.add(DispatchCancel("meanwhile", "test", received_at=20.0))  # queued while the write was tried
    backlog.put_back(taken)  # it failed
    backlog.add_note(STEPS, 29.0, batch(20.0))  # still over the bound: counted in the same gap
    items = backlog.take()
    assert kinds(items) == [STEPS, GAP, "DispatchCancel"]
    assert items[1][2] == {"from": 10.0, "to": 29.0, "step_batches": 2, "steps": 20, "samples": 0}


def test_a_taken_gap_is_never_changed_in_the_writers_hands():
    backlog = Backlog({STEPS: 1})
    backlog.add_note(STEPS, 9.0, batch(0.0))
    backlog.add_note(STEPS, 19.0, batch(10.0))
    in_flight = backlog.take()
    before = dict(in_flight[1][2])
    backlog.add_note(STEPS, 29.0, batch(20.0))  # the one in flight still counts: dropped, in a new gap
    backlog.add_note(STEPS, 39.0, batch(30.0))
    assert in_flight[1][2] == before
    assert kinds(backlog.take()) == [GAP]


def test_once_written_the_bound_starts_afresh():
    backlog = Backlog({SAMPLE: 2})
    for at in range(3):
        backlog.add_note(SAMPLE, float(at), {})
    taken = backlog.take()
    assert len(taken) == 3  # two samples and a gap
    backlog.written(taken)
    for at in range(2):
        backlog.add_note(SAMPLE, 10.0 + at, {})
    assert kinds(backlog.take()) == [SAMPLE, SAMPLE]


def test_unbounded_notes_are_all_kept():
    backlog = Backlog({STEPS: 0})
    for n in range(100):
        backlog.add_note(RecordKind.LINK_LOST, float(n), {"link": "bms"})
    assert len(backlog) == 100


def test_taken_items_count_against_the_bound_until_written_and_a_failed_write_counts_them_once():
    """While a write waits (a locked journal waits its busy timeout), what arrives is counted on top of
    what is in flight; a failed write puts them back without counting them again. Else the bound never
    held across failed writes and the queue grew for as long as the failure lasted."""
    backlog = Backlog({SAMPLE: 2, STEPS: 1})
    backlog.add_note(SAMPLE, 0.0, {})
    for cycle in range(1, 101):  # a hundred failed writes, a sample and a batch arriving during each
        in_flight = backlog.take()
        backlog.add_note(SAMPLE, float(cycle), {})
        backlog.add_note(STEPS, cycle + 0.5, batch(float(cycle), count=1))
        backlog.add(DispatchCancel(f"r{cycle}", "test", received_at=float(cycle)))  # always kept
        backlog.put_back(in_flight)
    items = backlog.take()
    assert kinds(items).count(SAMPLE) == 2 and kinds(items).count(STEPS) == 1
    assert kinds(items).count("DispatchCancel") == 100
    (gap,) = [item[2] for item in items if isinstance(item, tuple) and item[0] == GAP]  # one, not one a write
    assert gap == {"from": 2.0, "to": 100.0, "step_batches": 99, "steps": 99, "samples": 99}
    backlog.written(items)  # it worked at last: the bound starts afresh
    backlog.add_note(SAMPLE, 200.0, {})
    assert kinds(backlog.take()) == [SAMPLE]
