"""Answering requests: the journal's health as a core input, named answers, and describe()."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core_builders import POLICY, Run, bms, discharge, inverter, ready
from firmware_py.core import Controller, Mode, step
from firmware_py.core.answers import Judgement, invalid_reason, judge
from firmware_py.core.energy import still_open
from firmware_py.core.machine import JOURNAL_HOLD
from firmware_py.core.requests import ENDED_MEMORY
from firmware_py.core.telemetry import DerRatings, telemetry
from firmware_py.core.types import (
    BmsState,
    DispatchAnswer,
    DispatchCancel,
    DispatchEnded,
    DispatchKind,
    DispatchRequest,
    EventEnergy,
    InverterStatus,
    JournalHealth,
    ReasonCode,
    SiteLimit,
    Tick,
    Verdict,
    describe,
    is_finite_number,
)


def answer_of(result, request_id):
    answer = result.answer_for(request_id)
    assert answer is not None, f"{request_id} got no answer"
    return answer


def stop(id: str, t: float) -> DispatchRequest:
    return DispatchRequest(id, "test", DispatchKind.STOP, 0, t, t + 10, received_at=t)


# ---------------------------------------------------------------- journal health

JOURNAL_ROWS = [
    # (journal reports fed before the request, verdict, reason)
    ([], Verdict.ACCEPTED, None),
    ([JournalHealth(0.0, True)], Verdict.ACCEPTED, None),
    ([JournalHealth(0.0, False, "disk full")], Verdict.REJECTED, ReasonCode.JOURNAL),
    ([JournalHealth(0.0, False, "disk full"), JournalHealth(0.0, True)], Verdict.ACCEPTED, None),
    ([JournalHealth(0.0, True), JournalHealth(0.0, False, "locked")], Verdict.REJECTED, ReasonCode.JOURNAL),
]


@pytest.mark.parametrize("reports, verdict, reason", JOURNAL_ROWS)
def test_a_failing_journal_refuses_new_requests(reports, verdict, reason):
    r = step(ready(), [*reports, discharge("e1", 0.0, 0, 100, target=5_000)], 0.0)
    answer = answer_of(r, "e1")
    assert (answer.verdict, answer.reason) == (verdict, reason)


def test_the_journal_refusal_names_the_failure():
    c = step(ready(), [JournalHealth(0.0, False, "database is locked")], 0.0).controller
    answer = answer_of(step(c, [discharge("e1", 0.0, 0, 100)], 0.0), "e1")
    assert answer.detail == "journal unavailable: database is locked"
    assert ReasonCode.JOURNAL.value == "JOURNAL_UNAVAILABLE"


def test_the_controller_remembers_the_journal_until_it_recovers():
    c = step(ready(), [JournalHealth(0.0, False, "disk full")], 0.0).controller
    for t in (1.0, 2.0, 3.0):  # no new report: still failing
        c = step(c, [bms(t), inverter(t)], t).controller
        assert answer_of(step(c, [discharge(f"e{t}", t, t, 100)], t), f"e{t}").reason is ReasonCode.JOURNAL
    c = step(c, [bms(4.0), inverter(4.0), JournalHealth(4.0, True)], 4.0).controller
    assert answer_of(step(c, [discharge("later", 4.0, 4, 100)], 4.0), "later").verdict is Verdict.ACCEPTED


def test_a_failing_journal_holds_a_running_event_at_zero_and_it_resumes_when_the_journal_returns():
    """Energy the gateway cannot account for is not delivered: a running discharge drops to 0 W at once
    with the journal's reason, stays in force (not ended: its energy so far recorded, not closed), the same request
    again still gets its original answer, and power comes back once the journal writes again."""
    req = discharge("e1", 0.0, 0, 100, target=5_000)
    c = step(ready(), [req], 0.0).controller
    c = step(c, [bms(2.0), inverter(2.0)], 2.0).controller
    assert c.mode is Mode.DISCHARGE and c.setpoint_w > 0
    held = step(c, [bms(3.0), inverter(3.0), JournalHealth(3.0, False, "disk full")], 3.0)
    assert held.controller.mode is Mode.STANDBY
    assert held.command.setpoint_w == 0
    assert held.command.reason == f"{JOURNAL_HOLD}: disk full"
    assert not [e for e in held.events if isinstance(e, DispatchEnded) or (isinstance(e, EventEnergy) and e.final)]
    # only its energy so far, queued behind the journal: a restart bills the meter's gap after it
    assert [(e.request_id, e.final) for e in held.events if isinstance(e, EventEnergy)] == [("e1", False)]
    c = held.controller
    for t in (4.0, 5.0):  # still failing: still held, whatever else arrives
        r = step(c, [bms(t), inverter(t), Tick(t)], t)
        assert (r.controller.mode, r.command.setpoint_w, r.command.reason) == (Mode.STANDBY, 0, held.command.reason)
        c = r.controller
    again = step(c, [replace(req, received_at=5.0)], 5.0)
    assert answer_of(again, "e1").verdict is Verdict.ACCEPTED
    resumed = step(again.controller, [bms(6.0), inverter(6.0), JournalHealth(6.0, True)], 6.0)
    assert resumed.controller.mode is Mode.DISCHARGE and resumed.controller.serving_id == "e1"
    later = step(resumed.controller, [bms(7.0), inverter(7.0), Tick(7.0)], 7.0)
    assert later.command.setpoint_w > 0


def test_a_failing_journal_holds_a_running_charge_too():
    c = step(ready(soc=60.0), [DispatchRequest("c1", "test", DispatchKind.CHARGE, 3_000, 0, 100, received_at=0)],
             0.0).controller
    c = step(c, [bms(1.0, soc=60.0), inverter(1.0)], 1.0).controller
    assert c.mode is Mode.CHARGE and c.setpoint_w < 0
    held = step(c, [bms(2.0, soc=60.0), inverter(2.0), JournalHealth(2.0, False, "locked")], 2.0)
    assert (held.controller.mode, held.command.setpoint_w) == (Mode.STANDBY, 0)


def test_an_outage_outranks_the_journal_hold():
    """Backing up the home is never credited, so it needs no journal: it outranks the hold."""
    c = step(ready(), [discharge("e1", 0.0, 0, 100, target=5_000)], 0.0).controller
    c = step(c, [bms(1.0), inverter(1.0, grid_outage=True), JournalHealth(1.0, False, "disk full")], 1.0).controller
    assert c.mode is Mode.BACKUP and c.setpoint_w > 0


def test_a_stop_is_still_accepted_while_the_journal_fails():
    """A STOP only takes energy away, so it is honoured even when nothing new can be promised."""
    c = step(ready(), [discharge("e1", 0.0, 0, 100)], 0.0).controller
    r = step(c, [JournalHealth(1.0, False, "disk full"), stop("s", 1.0)], 1.0)
    assert answer_of(r, "s").verdict is Verdict.ACCEPTED
    assert [e.request_id for e in r.events if isinstance(e, DispatchEnded)] == ["e1"]


def test_faults_outrank_the_journal_and_the_journal_outranks_missing_data():
    c = step(Controller.start(POLICY), [JournalHealth(0.0, False, "disk full")], 0.0).controller
    assert answer_of(step(c, [discharge("e1", 0.0, 0, 100)], 0.0), "e1").reason is ReasonCode.JOURNAL
    c = step(ready(), [bms(1.0, bms_state=6), inverter(1.0), JournalHealth(1.0, False, "x")], 1.0).controller
    assert answer_of(step(c, [discharge("e2", 1.0, 1, 100)], 1.0), "e2").reason is ReasonCode.FAULT


@given(ok=st.booleans(), kind=st.sampled_from([DispatchKind.DISCHARGE, DispatchKind.CHARGE]),
       target=st.floats(100, 20_000))
def test_no_new_energy_is_promised_while_the_journal_fails(ok, kind, target):
    req = DispatchRequest("x", "agg", kind, target, 0.0, 600.0, received_at=0.0)
    answer = answer_of(step(ready(soc=60.0), [JournalHealth(0.0, ok, "io"), req], 0.0), "x")
    if not ok:
        assert answer.verdict is Verdict.REJECTED and answer.reason is ReasonCode.JOURNAL
        assert answer.detail.startswith("journal unavailable: ")
    else:
        assert answer.reason is not ReasonCode.JOURNAL


# ---------------------------------------------------------------- named answers


def test_a_refused_judgement_refuses_all_but_a_stop():
    j = Judgement.refused(5.0, ReasonCode.OUTAGE, "grid outage", POLICY.ramp_w_per_s)
    assert judge(discharge("d", 5.0, 0, 100), j) == DispatchAnswer.refused("d", 5.0, ReasonCode.OUTAGE,
                                                                            "grid outage")
    assert judge(stop("s", 5.0), j).verdict is Verdict.ACCEPTED


@pytest.mark.parametrize("answer, expected", [
    (DispatchAnswer.accepted("a", 0.0), (Verdict.ACCEPTED, None, None, "")),
    (DispatchAnswer.capped("a", 0.0, 4_200.0, "capped by power limit"),
     (Verdict.CAPPED, 4_200.0, None, "capped by power limit")),
    (DispatchAnswer.refused("a", 0.0, ReasonCode.OPTED_OUT, "the owner has opted out"),
     (Verdict.REJECTED, None, ReasonCode.OPTED_OUT, "the owner has opted out")),
])
def test_named_constructors(answer, expected):
    assert (answer.verdict, answer.cap_w, answer.reason, answer.detail) == expected


@pytest.mark.parametrize("answer, text", [
    (DispatchAnswer.accepted("a", 0.0), "accepted"),
    (DispatchAnswer.accepted("s", 0.0, detail="stop"), "accepted: stop"),
    (DispatchAnswer.capped("a", 0.0, 4_200.4, "capped by power limit"), "capped to 4200 W: capped by power limit"),
    (DispatchAnswer.refused("a", 0.0, ReasonCode.OPTED_OUT, "the owner has opted out"),
     "refused OPTED_OUT: the owner has opted out"),
    (DispatchAnswer.refused("a", 0.0, None, "no answer from the core"), "refused: no answer from the core"),
])
def test_describe_says_an_answer_one_way(answer, text):
    assert describe(answer) == text


# ---------------------------------------------------------------- finite numbers


@pytest.mark.parametrize("value, finite", [
    (0, True), (1.5, True), (-1e300, True), (True, False), (False, False), (math.nan, False),
    (math.inf, False), (-math.inf, False), ("5", False), (None, False), ([1], False),
])
def test_is_finite_number(value, finite):
    assert is_finite_number(value) is finite


def test_a_boolean_ramp_is_not_a_ramp():
    assert invalid_reason(discharge("e", 0.0, 0, 10, ramp_w_per_s=True)) is not None


# --- who may revise a request, and what a damaged copy does ---------------------------------------

def running(source: str = "agg-a") -> Controller:
    """A 5 kW discharge from `source` under way (id "e"), five seconds in."""
    c = step(ready(0.0), [discharge("e", 0.0, 0.0, 3_600, 5_000, source=source)], 0.0).controller
    for t in range(1, 6):
        c = step(c, [bms(float(t)), inverter(float(t))], float(t)).controller
    assert c.mode is Mode.DISCHARGE and c.serving_id == "e"
    return c


def test_another_source_cannot_take_over_an_event_by_its_id():
    c = running("agg-a")
    other = replace(discharge("e", 5.0, 5.0, 3_600, 3_000, source="agg-b"), kind=DispatchKind.CHARGE, revision=1)
    result = step(c, [other], 5.0)
    answer = result.answer_for("e")
    assert answer.verdict is Verdict.REJECTED and answer.reason is ReasonCode.DUPLICATE
    assert "agg-a" in answer.detail
    assert result.controller.mode is Mode.DISCHARGE and result.controller.serving_id == "e"
    assert result.controller.book.find("e").request.source == "agg-a"
    assert not [e for e in result.events if isinstance(e, DispatchEnded)]


def test_a_damaged_copy_of_a_running_request_is_refused_and_ends_nothing():
    c = running()
    original = c.book.find("e").request
    result = step(c, [replace(original, target_w=math.nan, received_at=5.0)], 5.0)
    answer = result.answer_for("e")
    assert answer.verdict is Verdict.REJECTED and answer.reason is ReasonCode.DUPLICATE
    assert result.controller.serving_id == "e" and result.controller.mode is Mode.DISCHARGE
    assert not [e for e in result.events if isinstance(e, DispatchEnded)]
    again = step(result.controller, [replace(original, received_at=6.0)], 6.0).answer_for("e")
    assert again.verdict is Verdict.ACCEPTED  # the original's answer is unchanged


def test_a_damaged_new_revision_is_refused_and_ends_the_event_it_revises():
    c = running()
    revised = replace(c.book.find("e").request, target_w=math.nan, revision=1, received_at=5.0)
    result = step(c, [revised], 5.0)
    assert result.answer_for("e").reason is ReasonCode.INVALID
    assert [e.request_id for e in result.events if isinstance(e, DispatchEnded)] == ["e"]


def test_a_stopped_request_is_remembered_while_its_window_is_open_however_many_end_meanwhile():
    """The book forgets ended requests beyond ENDED_MEMORY, those whose window has closed first: an unchanged
    copy of a stopped request whose window is still open must be known as ended, not be served anew."""
    c = step(ready(0.0), [discharge("x", 0.0, 0.0, 7_200, 5_000, source="vtn")], 0.0).controller
    stop = DispatchRequest("stop", "vtn", DispatchKind.STOP, 0, 1.0, 7_200, received_at=1.0)
    c = step(c, [bms(1.0), inverter(1.0), stop], 1.0).controller
    t = 1.0
    for n in range(ENDED_MEMORY + 10):  # short requests whose windows close: they end and are forgotten
        t += 0.1
        c = step(c, [bms(t), inverter(t), discharge(f"o{n}", t, 0.0, 1.0)], t).controller
    t += 0.1
    again = step(c, [bms(t), inverter(t), replace(c.book.find("x").request, received_at=t)], t)
    answered = again.answer_for("x")  # not accepted for nothing, nor judged anew: known to have ended
    assert (answered.verdict, answered.reason) == (Verdict.REJECTED, ReasonCode.DUPLICATE), answered
    assert "has ended" in answered.detail
    assert again.controller.serving_id is None and again.command.setpoint_w == 0
    assert len(again.controller.book.entries) <= ENDED_MEMORY + 3


def test_a_stop_whose_window_begins_later_stops_only_what_runs_when_it_begins():
    """An OpenADR event of levels 2, 1, 0 four hours ahead carries a STOP for its last interval: answered at
    once, it used to end at once the event running now and the event's own two earlier intervals."""
    run = Run(ready(0.0))
    run.feed(discharge("now", 0.0, 0.0, 7_200, 5_000, source="vtn"),
             discharge("other", 0.0, 0.0, 20_000, 1_000, source="site"))
    run.run(10)
    later = [discharge("ev#0", run.t, 14_400, 16_200, 3_000, source="vtn"),
             discharge("ev#1", run.t, 16_200, 18_000, 2_000, source="vtn"),
             DispatchRequest("ev#2", "vtn", DispatchKind.STOP, 0, 18_000, 19_800, received_at=run.t),
             discharge("after", run.t, 19_000, 19_700, 4_000, source="vtn")]
    answered = run.feed(*later)
    assert all(answered.answer_for(r.id).verdict is Verdict.ACCEPTED for r in later)
    assert run.ended("now") is None and run.c.serving_id == "now"
    run.run(14_400 - run.t + 1, dt=100)
    assert run.ended("now").reason == "window closed" and run.c.serving_id == "ev#0"
    run.run(18_000 - run.t - 50, dt=100)
    assert run.c.serving_id == "ev#1" and run.ended("ev#0").reason == "window closed"
    run.run(200, dt=100)  # the STOP's window opens: what runs of its source then is stopped, the rest stands
    assert run.ended("ev#1").reason == "window closed"  # it ended at 18,000 s, as the STOP began
    assert run.ended("other") is None and run.c.serving_id == "other"  # another source's event is not its to stop
    assert run.ended("after") is None and not run.c.book.find("after").ended  # begins later: a later instruction
    run.run(19_000 - run.t + 1, dt=100)
    assert run.c.serving_id == "after" and run.c.mode is Mode.DISCHARGE


def test_an_event_beginning_after_a_stops_window_began_stands_though_one_step_applies_both():
    """The step that applies a STOP comes when it comes (every 0.1 s here, later after a stall):
    what had not begun when the STOP's window began is a later instruction all the same."""
    run = Run(ready(0.0))
    run.feed(discharge("running", 0.0, 0.0, 3_600, 2_000, source="vtn"),
             DispatchRequest("stop", "vtn", DispatchKind.STOP, 0, 100.0, 100.05, received_at=0.0),
             discharge("next", 0.0, 100.05, 3_600, 3_000, source="vtn"))
    run.run(99.9, dt=0.1)
    run.run(0.2, dt=0.2)  # one step at 100.1: past both the STOP's start and the next event's
    assert run.ended("running").reason == "stopped by stop"
    assert run.ended("next") is None and run.c.serving_id == "next" and run.c.mode is Mode.DISCHARGE


def test_a_stop_answered_after_its_window_began_ends_what_runs_on_arrival():
    run = Run(ready(0.0))
    run.feed(discharge("early", 0.0, 0.0, 3_600, 2_000, source="vtn"),
             discharge("later", 0.0, 50.0, 3_600, 3_000, source="vtn"))
    run.run(60)
    run.feed(DispatchRequest("stop", "vtn", DispatchKind.STOP, 0, 10.0, 600.0, received_at=run.t))
    assert run.ended("early").reason == run.ended("later").reason == "stopped by stop"


@pytest.mark.parametrize("kind", [DispatchKind.STOP, DispatchKind.CHARGE])
def test_a_running_event_revised_to_another_kind_is_read_back_as_the_core_left_it(kind):
    """The journal holds the revision, the earlier event's end and final energy, then the revision's
    answer: read back, a STOP revision left nothing open (a restart billed the event again at 0 Wh),
    and a charge revision is the event's next account, with its request."""
    run = Run(ready(0.0))
    run.feed(discharge("e1", 0.0, start=0.0, end=3_600.0, target=5_000))
    run.run(120)
    revision = DispatchRequest("e1", "test", kind, 0 if kind is DispatchKind.STOP else 3_000, run.t, 3_600.0,
                               received_at=run.t, revision=1)
    assert run.feed(revision).answer_for("e1").verdict is Verdict.ACCEPTED
    run.run(5)
    assert run.final("e1").meter_wh > 0
    opened = still_open(run.records)
    if kind is DispatchKind.STOP:
        assert opened == {}
    else:
        assert opened["e1"].request == revision


def test_a_stop_ends_what_runs_of_its_source_when_its_window_begins():
    run = Run(ready(0.0))
    run.feed(discharge("e", 0.0, 0.0, 3_600, 5_000, source="vtn"),
             DispatchRequest("s", "vtn", DispatchKind.STOP, 0, 600, 1_200, received_at=0.0))
    run.run(599)
    assert run.ended("e") is None and run.c.mode is Mode.DISCHARGE
    run.run(2)
    assert run.ended("e").reason == "stopped by s" and run.c.serving_id is None
    assert run.final("e").meter_wh > 0 and run.final("s") is None  # a STOP has no account of its own
    assert not still_open(run.records)


@pytest.mark.parametrize("stop_priority, running_priority, stands", [
    (5, 1, True),  # an event ranked above the STOP is none of its business
    (5, None, False), (1, 5, False), (3, 3, False),  # ranked below it, or equal: stopped
    (None, 1, True), (None, None, False),  # a STOP of no priority ranks last; SunSpec's have none: unchanged
])
def test_a_stop_ends_only_what_of_its_source_does_not_outrank_it(stop_priority, running_priority, stands):
    """A lower-priority OpenADR event's 0 kW interval ended a higher-priority event of the same VTN for good:
    the event in force, by the source's own ranking, was stopped by an instruction that ranks below it."""
    run = Run(ready(0.0))
    run.feed(discharge("high", 0.0, 0.0, 3_600, 5_000, source="vtn", priority=running_priority))
    run.run(10)
    run.feed(DispatchRequest("low", "vtn", DispatchKind.STOP, 0, run.t, 600, received_at=run.t,
                             priority=stop_priority))
    run.run(700)  # past the STOP's window
    if stands:
        assert run.ended("high") is None and run.c.serving_id == "high" and run.c.mode is Mode.DISCHARGE
    else:
        assert run.ended("high").reason == "stopped by low" and run.c.serving_id is None


@pytest.mark.parametrize("stop_priority, refused_priority, spared", [
    (None, None, False), (1, 5, False),  # ranked below the STOP or unranked: withdrawn, as it would have been ended
    (5, 1, True),  # ranked above it: none of its business, served once the fault clears
])
def test_a_stop_withdraws_what_of_its_source_it_would_have_ended_but_was_refused_for_a_passing_reason(
        stop_priority, refused_priority, spared):
    """An event refused FAULT, then a STOP of its source over it: once the fault cleared it was `improvable`,
    its VEN asked again and it was served inside the STOP's window. Accepted, the STOP would have ended it."""
    hot = dict(max_temp_c=80.0)
    run = Run(ready(0.0))
    run.t = 1.0
    run.feed(bms(run.t, 80, **hot), inverter(run.t))
    event = discharge("a", run.t, 0.0, 3_600, 5_000, source="vtn", priority=refused_priority)
    assert run.feed(event).answer_for("a").reason is ReasonCode.FAULT
    run.t = 2.0
    run.feed(bms(run.t, 80, **hot), inverter(run.t),
             DispatchRequest("s", "vtn", DispatchKind.STOP, 0, 2.0, 1_800, received_at=2.0, priority=stop_priority))
    for _ in range(20):  # the fault clears, its hold-off passes
        run.t += 1.0
        run.feed(bms(run.t), inverter(run.t))
    assert run.c.mode is Mode.STANDBY
    assert (telemetry(run.c, run.t).improvable == ("a",)) is spared
    if spared:
        run.feed(replace(event, revision=1, received_at=run.t))
        run.run(5)
        assert run.c.serving_id == "a"
    else:
        resent = run.feed(replace(event, received_at=run.t))  # the same again: it keeps its answer, nothing runs
        assert resent.answer_for("a").verdict is Verdict.REJECTED
        run.run(5)
        assert run.c.serving_id is None and run.applied_w == 0


def test_a_revised_stop_has_no_account_either():
    """A new revision of a STOP already applied was taken for an account reopened: an EventEnergy for it."""
    run = Run(ready(0.0))
    run.feed(discharge("e", 0.0, 0.0, 3_600, 5_000, source="vtn"))
    run.run(60)
    stop = DispatchRequest("s", "vtn", DispatchKind.STOP, 0, 0.0, 1_200, received_at=run.t)
    run.feed(stop)
    run.run(5)
    revised = run.feed(replace(stop, revision=1, end=1_500, received_at=run.t))
    assert [type(e).__name__ for e in revised.events if getattr(e, "request_id", None) == "s"] == ["DispatchAnswer"]
    assert not [e for e in run.events if isinstance(e, EventEnergy) and e.request_id == "s"]


def test_a_stop_cancelled_before_its_window_stops_nothing_and_leaves_no_account():
    run = Run(ready(0.0))
    run.feed(discharge("e", 0.0, 0.0, 3_600, 5_000, source="vtn"),
             DispatchRequest("s", "vtn", DispatchKind.STOP, 0, 600, 1_200, received_at=0.0))
    run.run(10)
    run.feed(DispatchCancel("s", "vtn", run.t))
    assert run.ended("s") is not None and run.final("s") is None
    run.run(700, dt=10)
    assert run.ended("e") is None and run.c.serving_id == "e"


def test_a_cancelled_request_sent_again_unchanged_in_its_window_is_served_again():
    """A VEN that took an event missing from one listing for withdrawn cancels it; listed again, unchanged,
    it is sent again: it is judged anew and served, where it used to get its old "accepted" and no watts."""
    c = running("agg-a")
    original = c.book.find("e").request
    c = step(c, [bms(6.0), inverter(6.0), DispatchCancel("e", "agg-a", 6.0)], 6.0).controller
    assert c.serving_id is None
    again = step(c, [bms(7.0), inverter(7.0), replace(original, received_at=7.0)], 7.0)
    assert again.answer_for("e").verdict is Verdict.ACCEPTED and again.controller.serving_id == "e"
    c = again.controller
    for t in (8.0, 9.0):
        c = step(c, [bms(t), inverter(t)], t).controller
    assert c.mode is Mode.DISCHARGE and c.setpoint_w > 0


@pytest.mark.parametrize("ending,reason", [
    ("stopped", ReasonCode.DUPLICATE), ("opted out", ReasonCode.OPTED_OUT), ("window closed", ReasonCode.EXPIRED)])
def test_an_event_that_ended_sent_again_unchanged_is_refused_for_how_it_ended_and_stays_closed(ending, reason):
    """Its old "accepted" would opt a VEN in to nothing, and the journal would show the event open again, to be
    closed at the next stop with a final account of 0 Wh (what the statement then bills)."""
    original = discharge("e", 0.0, 0.0, 120, 5_000, source="agg-a")
    run = Run(ready(0.0))
    run.feed(original)
    run.run(30)
    if ending == "stopped":
        run.feed(DispatchRequest("stop", "agg-a", DispatchKind.STOP, 0, run.t, 3_600, received_at=run.t))
    elif ending == "opted out":
        run.feed(replace(run.c.owner, opt_out_until=math.inf, received_at=run.t))
    else:
        run.run(95)
    assert run.c.book.find("e").ended and not still_open(run.records)
    run.t += 1
    again = run.feed(bms(run.t), inverter(run.t, tot_wh_inj=run.meter_wh), replace(original, received_at=run.t))
    answered = again.answer_for("e")
    assert (answered.verdict, answered.reason) == (Verdict.REJECTED, reason), answered
    assert again.controller.serving_id is None and again.command.setpoint_w == 0
    assert not still_open(run.records)  # nothing for a stop or a restart to close at 0 Wh


def test_an_event_asked_again_after_a_cancel_carries_its_energy_into_what_a_stop_reads():
    """Served again with its energy carried on (`_asked_again`): the journal must say so at once, not at the
    next minute's report, or a stop in between closes the event at 0 Wh."""
    original = discharge("e", 0.0, 0.0, 3_600, 5_000, source="agg-a")
    run = Run(ready(0.0))
    run.feed(original)
    run.run(30)
    run.feed(DispatchCancel("e", "agg-a", run.t))
    served = run.c.book.find("e").meter_wh
    assert served > 30
    run.t += 1
    again = run.feed(bms(run.t), inverter(run.t, tot_wh_inj=run.meter_wh), replace(original, received_at=run.t))
    assert again.answer_for("e").verdict is Verdict.ACCEPTED and again.controller.serving_id == "e"
    (reopened,) = still_open(run.records).values()
    assert reopened.last is not None and reopened.last.meter_wh == pytest.approx(served, abs=1e-3)


def _refused_in_an_outage(revision_kind: DispatchKind, revisions: tuple[int, ...] = (1,)
                          ) -> tuple[Run, DispatchRequest, float]:
    """A discharge that delivered for 120 s, then revisions of `revision_kind` refused in an outage (the first
    ends the discharge; the book keeps its energy under each refusal), and the grid back: the run, the
    original and what it delivered."""
    original = discharge("e", 0.0, 0.0, 3_600, 6_000, source="vtn")
    run = Run(ready(0.0))
    run.feed(original)
    run.run(120)
    delivered = run.c.book.find("e").meter_wh
    run.t += 1
    run.feed(bms(run.t), inverter(run.t, tot_wh_inj=run.meter_wh, grid_outage=True))
    for revision in revisions:
        refused = run.feed(replace(original, kind=revision_kind, target_w=5_000, revision=revision, received_at=run.t))
        assert refused.answer_for("e").reason is ReasonCode.OUTAGE
        assert run.c.book.find("e").meter_wh == pytest.approx(delivered)
    run.t += 1
    run.feed(bms(run.t), inverter(run.t, tot_wh_inj=run.meter_wh))
    return run, original, delivered


def test_an_event_whose_revision_was_refused_continues_its_account_when_served_again():
    """A modification refused in an outage kept the event's energy in the book, but the standing setting's
    re-ask opened a new account at 0 Wh: the event's last record, what statements bill, left out what it had
    delivered before (and a second refused revision dropped the book's energy too)."""
    run, original, delivered = _refused_in_an_outage(DispatchKind.DISCHARGE, revisions=(1, 2))
    again = run.feed(replace(original, target_w=5_000, revision=3, received_at=run.t))
    assert again.answer_for("e").verdict is Verdict.ACCEPTED
    (reopened,) = still_open(run.records).values()  # what a stop or a restart would close it at
    assert reopened.last is not None and reopened.last.meter_wh == pytest.approx(delivered, abs=1e-3)
    run.run(60)
    run.feed(DispatchCancel("e", "vtn", run.t))
    assert run.final("e") is not None
    last = [e for e in run.events if isinstance(e, EventEnergy) and e.request_id == "e"][-1]
    assert last.final and last.meter_wh == pytest.approx(run.meter_wh, abs=1e-2)


def test_a_charge_served_after_its_refused_revision_opens_its_own_account():
    """A CHARGE revision refused, then served: the charge's account opened at the discharge's Wh (the refused
    revision booked the account as a charge), so the event's energy was journalled, and billed, twice."""
    run, original, delivered = _refused_in_an_outage(DispatchKind.CHARGE)
    assert delivered > 100
    served = run.feed(replace(original, kind=DispatchKind.CHARGE, target_w=3_000, revision=2, received_at=run.t))
    assert served.answer_for("e").verdict is not Verdict.REJECTED
    assert run.c.book.find("e").meter_wh == 0.0
    assert all(e.meter_wh == 0.0 for e in served.events if isinstance(e, EventEnergy) and e.request_id == "e")


def test_a_discharge_served_after_a_refused_charge_revision_continues_its_account():
    """A refused revision asking the other kind leaves the account a discharge's: the discharge served again
    continues it, as after a refused discharge revision, and its final record counts all it delivered."""
    run, original, delivered = _refused_in_an_outage(DispatchKind.CHARGE)
    again = run.feed(replace(original, target_w=5_000, revision=2, received_at=run.t))
    assert again.answer_for("e").verdict is Verdict.ACCEPTED
    assert run.c.book.find("e").meter_wh == pytest.approx(delivered)
    run.run(60)
    run.feed(DispatchCancel("e", "vtn", run.t))
    last = [e for e in run.events if isinstance(e, EventEnergy) and e.request_id == "e"][-1]
    assert last.final and last.meter_wh == pytest.approx(run.meter_wh, abs=1e-2)

# --- overlapping requests: which one is in force --------------------------------------------------

def in_force_after(requests: list[DispatchRequest], now: float = 10.0) -> str | None:
    """The id in force once `requests` are answered, each at its own received_at."""
    c = ready(0.0)
    for request in sorted(requests, key=lambda r: r.received_at):
        t = request.received_at
        c = step(c, [bms(t), inverter(t), request], t).controller
        assert c.book.find(request.id).accepted, request
    entry = c.book.in_force(now)
    return None if entry is None else entry.request.id


def test_of_one_sources_overlapping_requests_the_highest_priority_is_in_force_whatever_came_later():
    """OpenADR: the lower the priority number, the more the event matters; it wins over a newer one."""
    first = discharge("urgent", 1.0, 0.0, 3_600, 9_000, priority=1)
    later = discharge("routine", 2.0, 0.0, 3_600, 3_000, priority=5)
    assert in_force_after([first, later]) == "urgent"
    assert in_force_after([later, replace(first, received_at=3.0)]) == "urgent"


def test_a_request_without_priority_ranks_after_any_with_one_and_equals_go_to_the_newest():
    ranked = discharge("ranked", 1.0, 0.0, 3_600, priority=7)
    unranked = discharge("unranked", 2.0, 0.0, 3_600)
    assert in_force_after([ranked, unranked]) == "ranked"
    twin = discharge("twin", 3.0, 0.0, 3_600, priority=7)
    assert in_force_after([ranked, unranked, twin]) == "twin"
    assert in_force_after([unranked, discharge("newer", 4.0, 0.0, 3_600)]) == "newer"


def test_a_priority_orders_its_own_sources_requests_never_another_sources():
    """A site controller's setpoint and an aggregator's event are taken in the order they came,
    however the aggregator ranks its own events."""
    event = discharge("event", 1.0, 0.0, 3_600, priority=1, source="openadr")
    setpoint = discharge("setpoint", 2.0, 0.0, 3_600, 4_000, source="sunspec")
    assert in_force_after([event, setpoint]) == "setpoint"
    minor = discharge("minor", 3.0, 0.0, 3_600, priority=9, source="openadr")
    assert in_force_after([event, setpoint, minor]) == "setpoint"  # the aggregator's first is still `event`
    assert in_force_after([setpoint, replace(event, received_at=3.0)]) == "event"


def test_the_higher_priority_request_ends_and_the_other_resumes_in_its_window():
    urgent = discharge("urgent", 1.0, 0.0, 600, 9_000, priority=1)
    routine = discharge("routine", 2.0, 0.0, 3_600, 3_000, priority=5)
    assert in_force_after([urgent, routine], now=599.0) == "urgent"
    assert in_force_after([urgent, routine], now=600.0) == "routine"


def test_a_standing_settings_re_ask_keeps_its_place_behind_another_sources_later_event():
    """The gateway asking again for a standing setting (a new revision, received now, nothing new from
    its source) does not take the slot from an aggregator's event that came after the setting."""
    setpoint = discharge("setpoint", 1.0, 1.0, math.inf, 4_000, source="sunspec")
    event = discharge("event", 2.0, 0.0, 3_600, 3_000, source="openadr")
    reask = replace(setpoint, revision=1, start=3.0, received_at=3.0)  # as the DER server builds it
    assert in_force_after([setpoint, event, reask]) == "event"
    assert in_force_after([setpoint, event, reask, discharge("later", 4.0, 0.0, 3_600, source="sunspec")]) == "later"


def test_of_one_sources_equals_a_re_ask_keeps_its_place_and_a_modification_is_a_new_instruction():
    """Of equal priority, the event whose ask came last is in force: a revision asking the same (the
    gateway's re-ask) leaves the earlier event behind; a modification (another target) is the source's
    newest instruction, as is a new id; priority still goes first."""
    older = discharge("older", 1.0, 0.0, 3_600, 9_000, priority=3)
    newer = discharge("newer", 2.0, 0.0, 3_600, 3_000, priority=3)
    reask = replace(older, revision=1, received_at=3.0)
    assert in_force_after([older, newer, reask]) == "newer"
    assert in_force_after([older, newer, reask, discharge("newest", 4.0, 0.0, 3_600, priority=3)]) == "newest"
    assert in_force_after([older, newer, replace(reask, revision=2, target_w=5_000, received_at=4.0)]) == "older"
    assert in_force_after([older, newer, replace(reask, priority=1)]) == "older"


def test_a_start_moved_while_still_ahead_is_a_new_instruction_a_start_already_past_is_not():
    """What a request asks from now on decides whether a revision is a re-ask: moving a start that is still
    ahead is the source's new schedule; a re-ask of a setpoint that began (start = now) asks the same."""
    x = discharge("x", 1.0, 100.0, 3_600, 3_000)
    y = discharge("y", 2.0, 0.0, 3_600, 3_000, source="sunspec")
    assert in_force_after([x, y, replace(x, revision=1, start=3.0, received_at=3.0)], now=200.0) == "x"
    began = discharge("began", 1.0, 0.0, 3_600, 3_000)
    assert in_force_after([began, y, replace(began, revision=1, start=3.0, received_at=3.0)]) == "y"


def test_a_modification_refused_for_a_passing_reason_came_when_it_came_once_served():
    """A setpoint's new target refused during an outage, then asked again and served once the grid is back,
    ranks by when the modification came (after the other source's event), as if accepted at once."""
    run = Run(ready(0.0))
    setpoint = discharge("setpoint", 0.0, 0.0, 3_600, 4_000, source="sunspec")
    run.feed(setpoint)
    run.run(2)
    run.feed(discharge("event", run.t, 0.0, 3_600, 3_000, source="openadr"))
    run.run(2)
    run.feed(bms(run.t), inverter(run.t, tot_wh_inj=run.meter_wh, grid_outage=True))
    modified = replace(setpoint, revision=1, target_w=5_000, received_at=run.t)
    assert run.feed(modified).answer_for("setpoint").reason is ReasonCode.OUTAGE
    run.t += 2
    run.feed(bms(run.t), inverter(run.t, tot_wh_inj=run.meter_wh))
    assert run.feed(replace(modified, revision=2, received_at=run.t)).answer_for("setpoint").verdict is Verdict.ACCEPTED
    assert run.c.book.in_force(run.t).request.id == "setpoint"


@pytest.mark.parametrize("priority", [-1, 1.5, True, "1"])
def test_a_priority_that_is_no_whole_number_from_0_is_invalid(priority):
    result = step(ready(0.0), [discharge("e", 1.0, 0.0, 3_600, priority=priority)], 1.0)
    answer = result.answer_for("e")
    assert answer.reason is ReasonCode.INVALID and "priority" in answer.detail


@pytest.mark.parametrize("revision", [-1, 1.5, True, "1", None])
def test_a_revision_that_is_no_whole_number_from_0_is_invalid_and_never_booked(revision):
    """A booked revision that is no count broke the next step of its id (a TypeError, and no answer at all)."""
    run = Run(ready(0.0))
    answer = answer_of(run.feed(discharge("e", 0.0, 0.0, 3_600, revision=revision)), "e")
    assert answer.reason is ReasonCode.INVALID and "revision" in answer.detail
    assert run.c.book.find("e") is None
    run.run(1)
    assert answer_of(run.feed(discharge("e", run.t, 0.0, 3_600)), "e").verdict is Verdict.ACCEPTED


def test_a_clock_gone_back_believes_the_readings_stamped_on_it():
    """A replay or bench stepped out of order: what the core held is stamped after `now`. It is not fresh (its
    age is unknown), and the readings stamped on the new clock are taken, a BMS fault among them, at once."""
    run = Run(ready(0.0))
    run.feed(discharge("e", 0.0, 0.0, 3_600, 10_000))
    run.run(100)
    assert run.c.mode is Mode.DISCHARGE and run.applied_w > 0
    back = run.t - 60.0
    result = step(run.c, [bms(back, bms_state=BmsState.FAULT), inverter(back, measured_w=run.c.setpoint_w)], back)
    assert result.command.setpoint_w == 0 and result.controller.mode is Mode.FAULT
    silent = step(run.c, [Tick(back)], back)  # nothing stamped on the new clock yet: the held data is no news
    assert silent.command.setpoint_w == 0


SOC_FIELDS = frozenset({"soc_min_pct", "soc_ui_pct", "soc_max_pct", "soc_avg_pct"})


def test_a_snapshot_overtaken_on_its_way_never_makes_a_stale_field_fresh_again():
    """A frame path's snapshot worked out at 10.29 (SoC fresh) reaches the core after a tick's worked out at
    10.31 (SoC past its timeout), both stamped with the last frame believed: the core once took the older view
    and believed the silent SoC again for up to a tick. Refused by `as_of`; a new frame's snapshot is taken."""
    run = Run(ready(0.0))
    run.feed(discharge("e", 0.0, 0.0, 3_600, 10_000))
    run.run(100)
    assert run.c.mode is Mode.DISCHARGE and run.applied_w > 0
    t = run.t
    frame_path = bms(t + 0.29, as_of=t + 0.29)
    tick = bms(t + 0.29, as_of=t + 0.31, stale=SOC_FIELDS)
    c = step(run.c, [tick, inverter(t + 0.31, measured_w=run.c.setpoint_w)], t + 0.31).controller
    assert c.bms.believed("soc_min_pct") is None
    result = step(c, [frame_path], t + 0.311)
    assert result.controller.bms is tick and result.controller.bms.believed("soc_min_pct") is None
    assert result.command.setpoint_w == 0
    renewed = bms(t + 0.32, as_of=t + 0.32)  # a new SoC frame: fresh again
    assert step(result.controller, [renewed], t + 0.32).controller.bms is renewed
    same_instant = bms(t + 0.29, as_of=t + 0.31)  # worked out at the same instant (a bench step's frames)
    assert step(c, [same_instant], t + 0.311).controller.bms is same_instant
    unordered = bms(t + 0.29)  # a builder's or an old journal's: no `as_of`, judged by `received_at` alone
    assert step(c, [unordered], t + 0.311).controller.bms is unordered


def test_a_held_view_worked_out_after_now_does_not_hold_back_the_snapshots_on_the_new_clock():
    """As for `received_at`: a replay or bench stepped out of order, the held `as_of` is after `now`."""
    c = step(ready(0.0), [bms(50.0, as_of=100.0, stale=SOC_FIELDS)], 100.0).controller
    back = bms(50.0, as_of=60.0)
    assert step(c, [back], 60.0).controller.bms is back


@pytest.mark.parametrize("export_only, charge_cap", [(True, None), (False, 0.0)])
def test_an_export_limit_caps_discharge_only_and_a_site_limit_both_ways(export_only, charge_cap):
    """OpenADR 3's EXPORT_CAPACITY_LIMIT of 0 W (a midday surplus) refused every charge: charging imports,
    it exports nothing. A site controller's WMaxLimPct is the site's limit each way, as before."""
    c = step(ready(0.0), [SiteLimit(0.0, "src", 0.0, export_only=export_only)], 0.0).controller
    r = step(c, [bms(1.0), inverter(1.0), discharge("d", 1.0, 1.0, 600, 5_000),
                 DispatchRequest("c", "test", DispatchKind.CHARGE, 5_000, 1.0, 600, received_at=1.0)], 1.0)
    assert answer_of(r, "d").verdict is Verdict.REJECTED and "site limit" in answer_of(r, "d").detail
    charged = answer_of(r, "c")
    if charge_cap is None:
        assert charged.verdict is Verdict.ACCEPTED, charged
        assert step(r.controller, [bms(2.0), inverter(2.0)], 2.0).controller.mode is Mode.CHARGE
    else:
        assert charged.verdict is Verdict.REJECTED and "site limit" in charged.detail, charged


@pytest.mark.parametrize("kind, soc", [(DispatchKind.DISCHARGE, 80.0), (DispatchKind.CHARGE, 50.0)])
def test_an_ac_rating_below_the_storage_rates_caps_the_answer_and_the_command_both_ways(kind, soc):
    """A 7.6 kW AC inverter behind an 11.5 kW storage port: the core once took the storage rate alone,
    accepted 11.5 kW uncapped and commanded it, while the DER ratings it publishes said 7.6 kW."""
    def ac_limited(t: float) -> InverterStatus:
        return inverter(t, w_max_rtg=7_600, w_discha_max_rtg=11_500, w_cha_max_rtg=11_500)

    c = step(Controller.start(POLICY, now=0), [bms(0, soc), ac_limited(0)], 0).controller
    result = step(c, [bms(0.1, soc), ac_limited(0.1), discharge("d", 0.1, 0.1, 3_600.1, 11_500, kind=kind)], 0.1)
    answer = result.answer_for("d")
    assert answer is not None and answer.verdict is Verdict.CAPPED and answer.cap_w == 7_600
    assert "inverter" in answer.detail and "rating" in answer.detail
    c = result.controller
    for i in range(2, 80):  # past the ramp
        t = i * 0.1
        result = step(c, [bms(t, soc), ac_limited(t)], t)
        c = result.controller
    assert abs(result.command.setpoint_w) == 7_600
    ratings = DerRatings.of(POLICY, ac_limited(t))
    assert ratings.w_discha_max == ratings.w_cha_max == 7_600


def test_an_inverter_reporting_a_discharge_rating_of_0_w_is_never_commanded_to_discharge():
    """702 `WDisChaRteMaxRtg` = 0 W says the inverter cannot discharge (as `WChaRteMaxRtg` = 0 says it cannot
    charge): read as "not reported", the core took `WMaxRtg`'s 11.5 kW as its limit and commanded discharge.
    Not reported at all (None) still falls back to `WMaxRtg`."""
    def cannot_discharge(t: float) -> InverterStatus:
        return inverter(t, w_max_rtg=11_500, w_discha_max_rtg=0, w_cha_max_rtg=11_500)

    assert cannot_discharge(0).discharge_rating_w() == 0
    assert inverter(0, w_max_rtg=11_500, w_discha_max_rtg=None).discharge_rating_w() == 11_500
    c = step(Controller.start(POLICY, now=0), [bms(0, 80.0), cannot_discharge(0)], 0).controller
    result = step(c, [bms(0.1, 80.0), cannot_discharge(0.1), discharge("d", 0.1, 0.1, 3_600.1, 5_000)], 0.1)
    c = result.controller
    for i in range(2, 80):  # past any ramp
        t = i * 0.1
        result = step(c, [bms(t, 80.0), cannot_discharge(t)], t)
        c = result.controller
        assert result.command.setpoint_w <= 0, result.command
    assert DerRatings.of(POLICY, cannot_discharge(t)).w_discha_max == 0
