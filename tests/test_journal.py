"""The journal on real SQLite files: durable, append-only, and tamper-evident."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from journal_edits import tamper

from firmware_py.core import types as t
from firmware_py.errors import InputError
from firmware_py.journal import Journal, JournalWriteError, codec, event_summaries
from firmware_py.journal.store import record_hash

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite"


def on_one_clock(journal: Journal, item) -> None:
    """Journal `item` as a bench does: one simulated clock, so its wall time is its core time."""
    journal.append_event(item, wall=codec.event_time(item))


def peak_event(journal: Journal) -> None:
    """A discharge event as the core would journal it, with one fault inside its window."""
    for item in (
        t.OwnerSettings(reserve_pct=40, received_at=0.0),
        t.DispatchRequest("peak-1", "scenario", t.DispatchKind.DISCHARGE, 11500, 120, 14520, 60),
        t.DispatchAnswer("peak-1", 60, t.Verdict.ACCEPTED),
        t.FaultRaised(100, "can_silence", "before the window"),
        t.Transition(120, "IDLE", "DISCHARGING", "dispatch: peak-1"),
        t.EventEnergy(3000, "peak-1", 9000, 9010),
        t.FaultRaised(3600, "bms_fault", "BMS state FAULT"),
        t.FaultCleared(3605, "bms_fault"),
        t.DispatchEnded(14520, "peak-1", "window closed"),
        t.EventEnergy(14520, "peak-1", 45000, 45100, final=True),
        t.Transition(14520, "DISCHARGING", "IDLE", "event ended"),
        t.FaultRaised(20000, "over_temp", "after the window"),
    ):
        on_one_clock(journal, item)


def verify(path: Path) -> list[str]:
    with Journal.open(path, readonly=True) as journal:
        return journal.verify()


def test_appended_records_read_back_in_order(path):
    with Journal.open(path, wall_clock=lambda: 1_700_000_000.0) as journal:
        assert journal.append("note", 5, {"text": "hello", "n": [1, 2.5]}) == 1
        peak_event(journal)
        records = journal.records()
        assert [r.seq for r in records] == list(range(1, 14))
        assert records[0].kind == "note" and records[0].payload == {"text": "hello", "n": [1, 2.5]}
        assert records[0].at == 5.0 and records[0].wall == 1_700_000_000.0
        assert [r.payload["kind"] for r in journal.records(kind="FaultRaised")] == [
            "can_silence", "bms_fault", "over_temp"]
        assert [r.seq for r in journal.records(since_seq=11)] == [12, 13]
        assert journal.verify() == []


def test_events_and_inputs_round_trip_through_the_journal(path):
    items = [
        t.DispatchRequest("e", "openadr", t.DispatchKind.CHARGE, -3000, 10, math.inf, 5, ramp_w_per_s=100, revision=2),
        t.OwnerSettings(35, 1.0, opt_out_until=math.inf, opt_out_events=frozenset({"a", "b"})),
        t.DispatchAnswer("e", 6, t.Verdict.CAPPED, cap_w=2000, reason=t.ReasonCode.INSUFFICIENT_ENERGY),
        t.DispatchCancel("e", "openadr", 7), t.InstallerReset(8), t.Transition(9, t.Mode.STANDBY, t.Mode.CHARGE, "why"),
        t.FaultCleared(10, t.FaultKind.BMS_STALE), t.DispatchEnded(11, "e", "cancelled"),
        t.EventEnergy(11, "e", 12.5, 12.0, final=True), t.FaultRaised(12, t.FaultKind.OVER_TEMP, "y"),
    ]
    with Journal.open(path) as journal:
        for item in items:
            journal.append_event(item)
        assert [r.event() for r in journal.records()] == items
        assert journal.records()[0].payload["end"] == "inf"  # JSON has no infinity


class Watts(float):
    """A float by subclass (as a library's number type may be): written as a float."""


def test_payload_text_is_the_same_for_every_kind_of_value():
    """The canonical text is what the hash chain covers: enums as their values (an IntEnum too, though
    it is an int), bools as bools, non-finite floats as text, sets sorted, nested dataclasses as dicts."""
    payload = {"verdict": t.Verdict.ACCEPTED, "state": t.BmsState.FAULT, "ok": True, "none": None, "n": 3,
               "w": 1.5, "end": math.inf, "low": -math.inf, "gap": math.nan, "set": frozenset({"b", "a"}),
               "list": (1, 2.5), "request": t.DispatchCancel("e1", "test", 5.0), 7: "key",
               "sub": Watts(2.5), "sub_end": Watts(math.inf)}
    assert codec.canonical(payload) == (
        '{"7":"key","end":"inf","gap":"nan","list":[1,2.5],"low":"-inf","n":3,"none":null,"ok":true,'
        '"request":{"id":"e1","reason":"","received_at":5.0,"source":"test"},"set":["a","b"],'
        f'"state":{int(t.BmsState.FAULT)},"sub":2.5,"sub_end":"inf","verdict":"{t.Verdict.ACCEPTED.value}",'
        '"w":1.5}')


def test_an_event_is_stored_as_the_text_the_chain_has_always_covered(path):
    """Written once to a journal, read back as stored: the exact text earlier releases wrote, with the
    fields added since (`priority`) in their place; a record written before a field existed reads back
    with the field's default."""
    request = t.DispatchRequest("e1", "test", t.DispatchKind.DISCHARGE, 5_000.0, 0.0, math.inf, received_at=0.0)
    with Journal.open(path) as journal:
        journal.append_event(request)
    with sqlite3.connect(path) as conn:
        (text,) = conn.execute("SELECT payload FROM records WHERE kind = 'DispatchRequest'").fetchone()
    assert text == ('{"end":"inf","id":"e1","kind":"discharge","priority":null,"ramp_w_per_s":null,'
                    '"received_at":0.0,"revision":0,"source":"test","start":0.0,"target_w":5000.0}')
    earlier = json.loads(text.replace('"priority":null,', ""))
    assert codec.decode_event("DispatchRequest", earlier) == request


def test_only_core_events_and_inputs_are_accepted(path):
    with Journal.open(path) as journal:
        with pytest.raises(TypeError, match="BmsSnapshot"):
            journal.append_event(t.BmsSnapshot(received_at=1.0))
        with pytest.raises(ValueError, match="finite"):
            journal.append("note", math.nan, {})
        assert len(journal) == 0


def test_reopening_continues_the_chain(path):
    with Journal.open(path) as journal:
        journal.append("a", 1, {})
    with Journal.open(path) as journal:
        assert journal.append("b", 2, {}) == 2
        assert journal.records()[1].prev_hash == journal.records()[0].hash
        assert journal.verify() == []


def test_a_batch_is_one_transaction_and_vanishes_whole_when_it_fails(path):
    with Journal.open(path) as journal:
        journal.append("before", 1, {})
        with journal.batch():
            for i in range(100):
                journal.append("tick", 2 + i, {"i": i})
        with pytest.raises(RuntimeError), journal.batch():
            journal.append("lost", 200, {})
            raise RuntimeError("the caller failed mid-batch")
        assert journal.append("after", 201, {}) == 102
        assert [r.kind for r in journal.records()][-2:] == ["tick", "after"]
        assert journal.verify() == []


def test_records_cannot_be_changed_through_sqlite_by_accident(path):
    with Journal.open(path) as journal:
        journal.append("a", 1, {"v": 1})
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE records SET payload = '{}'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM records")
    conn.close()


def test_a_failed_write_raises_and_loses_nothing_already_committed(path):
    with Journal.open(path, busy_timeout_s=0.05) as journal:
        journal.append("committed", 1, {})
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the write cannot land
        with pytest.raises(JournalWriteError, match="journal write failed"):
            journal.append("refused", 2, {})
        blocker.execute("ROLLBACK")
        blocker.close()
        assert journal.append("next", 3, {}) == 2
        assert [r.kind for r in journal.records()] == ["committed", "next"]
        assert journal.verify() == []


def test_readonly_journal_refuses_writes(path):
    Journal.open(path).close()
    with Journal.open(path, readonly=True) as journal, pytest.raises(JournalWriteError):
        journal.append("x", 1, {})


# -- tamper evidence --------------------------------------------------------------------------

def test_intact_chain_has_no_problems(path):
    with Journal.open(path) as journal:
        peak_event(journal)
    assert verify(path) == []


def test_edited_payload_is_detected(path):
    with Journal.open(path) as journal:
        peak_event(journal)
    tamper(path, ("UPDATE records SET payload = replace(payload, '45000', '90000') WHERE seq = 10", ()))
    problems = verify(path)
    assert problems == ["record 10: contents do not match its hash (edited)"]


def test_edited_time_is_detected(path):
    with Journal.open(path) as journal:
        peak_event(journal)
    tamper(path, ("UPDATE records SET at = at + 1 WHERE seq = 5", ()))
    assert "record 5: contents do not match its hash (edited)" in verify(path)


def test_deleted_middle_row_is_detected(path):
    with Journal.open(path) as journal:
        peak_event(journal)
    tamper(path, ("DELETE FROM records WHERE seq = 7", ()))
    problems = verify(path)
    assert "records 7..7: missing (deleted)" in problems
    assert any(p.startswith("record 8: does not chain") for p in problems)


def test_deleted_last_row_is_detected_by_the_head(path):
    with Journal.open(path) as journal:
        peak_event(journal)
    tamper(path, ("DELETE FROM records WHERE seq = 12", ()))
    assert verify(path) == ["records 12..12: missing at the end (deleted)"]


def test_deleted_last_row_with_head_seq_rolled_back_is_detected(path):
    with Journal.open(path) as journal:
        peak_event(journal)
    tamper(path, ("DELETE FROM records WHERE seq = 12", ()), ("UPDATE head SET seq = 11", ()))
    assert verify(path) == ["record 11: does not match the chain head (edited or replaced)"]


def test_inserted_middle_row_is_detected_even_with_a_valid_own_hash(path):
    with Journal.open(path) as journal:
        peak_event(journal)
        third = journal.records()[2]
    # make room at seq 4 and forge a well-formed record chained to record 3
    shifts = [("UPDATE records SET seq = seq + 1 WHERE seq = ?", (seq,)) for seq in range(12, 3, -1)]
    payload = '{"at":130.0,"from_state":"IDLE","reason":"forged","to_state":"DISCHARGING"}'
    forged = record_hash(third.hash, 4, 130.0, 0.0, "Transition", payload)
    tamper(path, *shifts, ("INSERT INTO records VALUES (4, 130.0, 0.0, 'Transition', ?, ?, ?)",
                           (payload, third.hash, forged)))
    problems = verify(path)
    assert any(p.startswith("record 5: does not chain") for p in problems)
    assert "records 13..13: added after the chain head (inserted)" in problems


def test_appended_forged_row_without_the_head_is_detected(path):
    with Journal.open(path) as journal:
        journal.append("a", 1, {})
        last = journal.records()[-1]
    forged = record_hash(last.hash, 2, 2.0, 0.0, "note", "{}")
    tamper(path, ("INSERT INTO records VALUES (2, 2.0, 0.0, 'note', '{}', ?, ?)", (last.hash, forged)))
    assert verify(path) == ["records 2..2: added after the chain head (inserted)"]


# -- opening the wrong thing ------------------------------------------------------------------

def test_missing_file_is_bad_input_when_reading(path):
    with pytest.raises(InputError, match="no such journal file"):
        Journal.open(path, readonly=True)


def test_non_sqlite_file_is_bad_input(path):
    path.write_text("seq,at\n1,2\n" * 200)
    with pytest.raises(InputError, match="not a powershare-gw journal.*not an SQLite database"):
        Journal.open(path)
    assert path.read_text().startswith("seq,at")  # not overwritten


def test_foreign_sqlite_schema_is_bad_input(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE readings (t REAL, v REAL)")
    conn.commit()
    conn.close()
    with pytest.raises(InputError, match="foreign SQLite schema; tables: readings"):
        Journal.open(path)


def test_directory_that_does_not_exist_is_bad_input(tmp_path):
    with pytest.raises(InputError, match="cannot open journal"):
        Journal.open(tmp_path / "no" / "such" / "dir" / "j.sqlite")


# -- durability -------------------------------------------------------------------------------

APPENDER = textwrap.dedent("""
    import sys
    from firmware_py.journal import Journal
    journal = Journal.open(sys.argv[1])
    for i in range(1_000_000):
        if i % 3:
            print(journal.append("tick", float(i), {"i": i, "pad": "x" * 200}), flush=True)
        else:  # batches too: a kill mid-batch must drop the whole batch, nothing else
            with journal.batch():
                seqs = [journal.append("tick", float(i), {"i": i, "j": j}) for j in range(20)]
            print(*seqs, sep="\\n", flush=True)
""")


def test_committed_records_survive_kill_9(path):
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(path)], stdout=subprocess.PIPE,
                            cwd=ROOT, bufsize=0, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        output = _read_until(proc, lines=500, limit_s=30)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    output += proc.stdout.read()
    printed = [int(x) for x in output.split(b"\n")[:-1]]  # a partial last line is not a report
    assert proc.returncode == -signal.SIGKILL
    assert len(printed) >= 500
    with Journal.open(path) as journal:
        stored = {r.seq for r in journal.records()}
        assert set(printed) <= stored
        assert journal.verify() == []
        assert journal.append("after restart", 0.0, {}) == max(stored) + 1


def _read_until(proc: subprocess.Popen, lines: int, limit_s: float) -> bytes:
    """The child's output up to `lines` lines, never blocking past `limit_s`."""
    data, deadline = b"", time.monotonic() + limit_s
    while data.count(b"\n") < lines:
        ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            pytest.fail(f"the appender reported only {data.count(10)} records in {limit_s} s")
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            pytest.fail(f"the appender exited early with code {proc.poll()}")
        data += chunk
    return data


# -- per-event summaries ----------------------------------------------------------------------

def test_event_summary_carries_request_answer_energy_and_window_timeline(path):
    with Journal.open(path) as journal:
        peak_event(journal)
        (summary,) = event_summaries(journal)
    assert (summary.request_id, summary.source, summary.kind, summary.target_w) == (
        "peak-1", "scenario", "discharge", 11500)
    assert (summary.start, summary.end, summary.verdict) == (120, 14520, "accepted")
    assert (summary.meter_wh, summary.integrated_wh, summary.final) == (45000, 45100, True)
    assert summary.discrepancy_pct == pytest.approx(-100 / 450)
    assert (summary.ended_at, summary.ended_reason) == (14520, "window closed")
    texts = [e.text for e in summary.timeline]
    assert "fault raised: bms_fault (BMS state FAULT)" in texts
    assert "IDLE -> DISCHARGING: dispatch: peak-1" in texts
    assert not any("before the window" in x or "after the window" in x for x in texts)
    assert [e.at for e in summary.timeline] == sorted(e.at for e in summary.timeline)


def test_rejected_and_capped_events_and_a_stalled_meter(path):
    with Journal.open(path) as journal:
        on_one_clock(journal, t.DispatchRequest("a", "sunspec", t.DispatchKind.DISCHARGE, 11500, 0, 100, 0))
        on_one_clock(journal, t.DispatchAnswer("a", 0, t.Verdict.CAPPED, cap_w=6000))
        on_one_clock(journal, t.DispatchAnswer("a", 1, t.Verdict.ACCEPTED, reason=t.ReasonCode.DUPLICATE))
        on_one_clock(journal, t.FaultRaised(50, "modbus_timeout", ""))
        on_one_clock(journal, t.EventEnergy(100, "a", 0.0, 150.0, final=True))
        on_one_clock(journal, t.DispatchRequest("b", "sunspec", t.DispatchKind.DISCHARGE, 5000, 10, 90, 1))
        on_one_clock(journal, t.DispatchAnswer("b", 1, t.Verdict.REJECTED, reason=t.ReasonCode.OPTED_OUT))
        a, b = event_summaries(journal)
    assert (a.verdict, a.cap_w, a.discrepancy_pct) == ("accepted_capped", 6000, None)
    assert "fault raised: modbus_timeout" in [e.text for e in a.timeline]
    assert (b.verdict, b.reason, b.meter_wh) == ("rejected", "OPTED_OUT", 0.0)
    assert {e.kind for e in b.timeline} == {"DispatchRequest", "DispatchAnswer"}  # never ran


def test_a_later_revision_replaces_the_request(path):
    with Journal.open(path) as journal:
        on_one_clock(journal, t.DispatchRequest("r", "openadr", t.DispatchKind.DISCHARGE, 4000, 0, 100, 0))
        on_one_clock(journal, t.DispatchRequest("r", "openadr", t.DispatchKind.DISCHARGE, 7000, 0, 200, 5, revision=1))
        (summary,) = event_summaries(journal)
    assert (summary.target_w, summary.end, summary.revision) == (7000, 200, 1)


def test_verify_reports_a_column_rewritten_with_the_wrong_type(tmp_path):
    path = tmp_path / "typed.sqlite"
    with Journal.open(path) as journal:
        for n in range(3):
            journal.append("Note", float(n), {"n": n})
    tamper(path, ("UPDATE records SET payload = CAST(payload AS BLOB) WHERE seq = 2", ()))
    with Journal.open(path, readonly=True) as journal:
        problems = journal.verify()
    assert any("record 2" in p and "wrong type" in p for p in problems)


def test_the_writer_keeps_a_small_page_cache(path):
    """SQLite's 2 MiB default would grow the gateway's resident memory with the journal (the soak)."""
    from firmware_py.journal.store import WRITER_CACHE_KIB

    with Journal.open(path) as journal:
        assert journal._read("PRAGMA cache_size") == [(-WRITER_CACHE_KIB,)]


def test_step_batches_roll_over_at_their_size_and_store_the_rows_of_the_format_replays_read():
    """Steps are encoded as they come; the stored text stays the one JSON array of rows that
    journals written before held: each kind in full first in a batch, then only what changed."""
    import base64
    import zlib

    from firmware_py.journal.steps import StepRecorder, decode_batch

    recorder = StepRecorder(batch_steps=3)
    steps = [(1.0, (t.Tick(1.0),)), (1.5, (t.JournalHealth(1.5, True, ""),)), (2.0, (t.Tick(2.0),)),
             (2.5, (t.Tick(2.5),))]
    handed = [recorder.record(now, inputs) for now, inputs in steps]
    assert handed[:2] == [None, None] and handed[3] is None
    first = handed[2]
    assert (first["from"], first["to"], first["count"], first["format"]) == (1.0, 2.0, 3, "json+zlib+base64")
    assert zlib.decompress(base64.b64decode(first["data"])).decode() == (
        '[[1.0,["Tick",{"received_at":1.0}]],[1.5,["JournalHealth",{"received_at":1.5,"ok":true,"detail":""}]],'
        '[2.0,["Tick",{"received_at":2.0}]]]')
    assert decode_batch(first) == steps[:3]
    rest = recorder.take()  # a new batch starts over: the first Tick in full again
    assert (rest["from"], rest["count"]) == (2.5, 1) and decode_batch(rest) == steps[3:]
    assert recorder.take() is None


def test_a_bms_snapshots_as_of_is_journaled_and_a_batch_written_before_it_replays_without_one():
    """The core refuses a snapshot overtaken on its way by `as_of`: a replay must see it to refuse the same.
    A batch journaled before `as_of` existed rebuilds its snapshots with None (judged by `received_at`)."""
    import base64
    import zlib

    from firmware_py.journal.steps import decode_batch, encode_batch

    snapshot = t.BmsSnapshot(received_at=1.0, soc_min_pct=60.0, stale=frozenset({"soc_min_pct"}), as_of=1.25)
    [(now, (back,))] = decode_batch(encode_batch([(1.3, (snapshot,))]))
    assert (now, back.as_of, back.received_at, back.stale) == (1.3, 1.25, 1.0, snapshot.stale)
    old = '[[1.3,["BmsSnapshot",{"received_at":1.0,"soc_min_pct":60.0,"stale":["soc_min_pct"]}]]]'
    payload = {"format": "json+zlib+base64", "data": base64.b64encode(zlib.compress(old.encode())).decode()}
    [(_, (rebuilt,))] = decode_batch(payload)
    assert rebuilt.as_of is None and rebuilt.soc_min_pct == 60.0 and rebuilt.stale == {"soc_min_pct"}
