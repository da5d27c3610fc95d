"""Commissioning's judgement, without I/O: observations in, checks out (issue 16, item 1).

Each failing case asserts the check that fails and the words an installer needs
(what is wrong, what to check); each passing case asserts nothing else fails. The
separate-process runs against the bench are in `test_commission_bench.py`.
"""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
from firmware_py.sim.inverter import InverterModel
from test_core_purity import FORBIDDEN, imported_roots

from firmware_py import commissioning
from firmware_py.commissioning.judgement import (
    EXTENDED_ID,
    CanObservation,
    InverterObservation,
    LinkTrouble,
    MessageSpec,
    Reach,
    Sample,
    SignObservation,
    Timing,
    judge_can,
    judge_config,
    judge_dispatch,
    judge_inverter,
    judge_sign,
    link_trouble,
)
from firmware_py.commissioning.report import (
    Outcome,
    Report,
    Step,
    step_lines,
    verdict_line,
)
from firmware_py.core.types import (
    BmsState,
    ContactorState,
    InverterState,
    PackContactor,
)

# --- CAN ------------------------------------------------------------------------------------------

SPECS = [MessageSpec("HvBattAmpVolt", 0x132, 0.010), MessageSpec("BmsSoc", 0x292, 0.100),
         MessageSpec("BmsEnergyStatus", 0x352, 1.000, pages=2)]
WINDOW_S = 5.0
VALUES = {"soc_min_pct": 69.5, "soc_avg_pct": 70.0, "soc_max_pct": 70.5, "pack_voltage_v": 842.4,
          "pack_current_a": 0.0, "nominal_full_wh": 127_920.0, "nominal_remaining_wh": 91_020.0,
          "min_temp_c": 24.5, "max_temp_c": 25.5, "bms_state": BmsState.STANDBY,
          "contactor_state": ContactorState.CLOSED, "pack_contactor_neg": PackContactor.ECONOMIZED,
          "pack_contactor_pos": PackContactor.ECONOMIZED, "hvil_ok": True}


def every(period_s: float, count: int, start: float = 0.0) -> Timing:
    return Timing(count, start, start + period_s * (count - 1))


def healthy_can(**changes) -> CanObservation:
    """What a healthy bus shows in 5 s: each message at its period, every frame believed."""
    by_id = {0x132: every(0.010, 500), 0x292: every(0.100, 50), 0x352: Timing(10, 0.0, 4.001)}
    by_page = {(0x352, 0): every(1.0, 5), (0x352, 1): every(1.0, 5, 0.001)}
    obs = CanObservation(where="socketcan can0", dbc="cybertruck_bms.dbc", window_s=WINDOW_S, frames=600,
                         foreign_ids=(0x3E9,), by_id=by_id, by_page=by_page,
                         accepted={0x132: 500, 0x292: 50, 0x352: 10}, values=dict(VALUES),
                         mapped=tuple(VALUES), usable_capacity_wh=123_000.0, ended_at=WINDOW_S)
    return replace(obs, **changes)


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def failures(checks) -> list:
    return [c for c in checks if c.outcome is Outcome.FAIL]


def test_a_healthy_bus_passes_every_can_check():
    checks = judge_can(healthy_can(), SPECS)
    assert failures(checks) == []
    names = by_name(checks)
    assert names["HvBattAmpVolt (0x132)"].detail == "every 10 ms (DBC: 10 ms)"
    assert names["BmsEnergyStatus (0x352)"].detail == "every 1000 ms (DBC: 1000 ms)"
    assert "discharge allowed now" in names["contactors and BMS state"].detail


def test_a_message_that_stops_part_way_through_the_window_fails_though_its_mean_gap_is_right():
    """Seen twice in the first second of a 5 s window, then never: the mean gap between its first and last
    frame was its period, so it passed as 'every 1000 ms'; now it fails as stopped, saying how long it was silent."""
    by_id = dict(healthy_can().by_id)
    by_id[0x352] = Timing(2, 0.0, 1.0)  # every 1 s, for one second
    by_page = {(0x352, 0): Timing(1, 0.0, 0.0), (0x352, 1): Timing(1, 1.0, 1.0)}
    check = by_name(judge_can(healthy_can(by_id=by_id, by_page=by_page), SPECS))["BmsEnergyStatus (0x352)"]
    assert check.outcome is Outcome.FAIL
    assert check.detail == "stopped: 2 frame(s), then silent for the last 4.0 s of the window (the DBC says every 1000 ms)"
    # the same frames in a window ending one period after the last: at its period, as before
    ended_soon = healthy_can(by_id=by_id, by_page=by_page, ended_at=2.0)
    assert by_name(judge_can(ended_soon, SPECS))["BmsEnergyStatus (0x352)"].outcome is Outcome.PASS
    # a fast message silent for a second: stopped too
    by_id[0x132] = every(0.010, 400)  # last at 3.99 s of 5 s
    assert by_name(judge_can(healthy_can(by_id=by_id), SPECS))["HvBattAmpVolt (0x132)"].detail.startswith(
        "stopped: 400 frame(s), then silent for the last 1.0 s")


def test_a_fast_messages_last_frame_a_little_late_at_the_windows_end_is_not_a_stop():
    """A 10 ms message's last frame 20 ms before the window's end (a loaded bench: 299 frames in 3 s) failed
    a healthy bus as "stopped ... silent for the last 0.0 s"."""
    timing = every(0.010, 299)
    obs = healthy_can(by_id={**healthy_can().by_id, 0x132: timing}, ended_at=timing.last + 0.020)
    assert by_name(judge_can(obs, SPECS))["HvBattAmpVolt (0x132)"].outcome is Outcome.PASS


def test_no_traffic_fails_at_once_and_points_at_wiring_termination_and_bitrate():
    checks = judge_can(CanObservation("socketcan can0", "cybertruck_bms.dbc", WINDOW_S), SPECS)
    assert len(checks) == 1 and checks[0].name == "traffic" and checks[0].outcome is Outcome.FAIL
    assert checks[0].detail == "no CAN traffic on socketcan can0 in 5 s"
    for words in ("wiring", "termination", "bitrate", "[can] interface and channel"):
        assert words in checks[0].advice


def test_a_bus_that_cannot_be_opened_says_so():
    (check,) = judge_can(CanObservation("socketcan can0", "x.dbc", WINDOW_S, open_error="cannot open can0"), SPECS)
    assert check.name == "bus" and check.outcome is Outcome.FAIL and "ip link show" in check.advice


def test_traffic_without_any_message_of_the_dbc_is_the_wrong_dbc():
    obs = healthy_can(by_id={}, by_page={}, accepted={}, foreign_ids=(0x132, 0x292))
    checks = judge_can(obs, [replace(s, frame_id=s.frame_id + 0x400) for s in SPECS])
    (wrong,) = failures(checks)
    assert wrong.name == "BMS messages of cybertruck_bms.dbc"
    assert "none of its 3 messages (0x532, 0x692, 0x752)" in wrong.detail and "0x132, 0x292" in wrong.detail
    assert "another vehicle" in wrong.advice and "[vehicle] dbc" in wrong.advice


def test_bms_ids_arriving_as_29_bit_frames_are_shown_as_29_bit_and_said_to_be_so():
    """The BMS's ids as extended frames read 'none of its messages (0x132, ...) on the bus, which carries
    0x132, ...': the same list twice, and nothing said the frames were 29-bit."""
    obs = healthy_can(by_id={}, by_page={}, accepted={}, foreign_ids=(0x3E9, *(s.frame_id | EXTENDED_ID
                                                                             for s in SPECS)))
    (wrong,) = failures(judge_can(obs, SPECS))
    assert wrong.detail == (
        "none of its 3 messages (0x132, 0x292, 0x352) on the bus, which carries 0x3E9, 0x00000132 (29-bit), "
        "0x00000292 (29-bit), 0x00000352 (29-bit); 0x132, 0x292, 0x352 arrive as 29-bit (extended) frames; "
        "the DBC defines them as 11-bit")
    assert "CAN profile / DBC" in wrong.advice


def test_one_message_seen_only_as_a_29_bit_frame_says_so():
    obs = healthy_can(by_id={k: v for k, v in healthy_can().by_id.items() if k != 0x292},
                      foreign_ids=(0x3E9, 0x292 | EXTENDED_ID))
    (missing,) = failures(judge_can(obs, SPECS))
    assert missing.name == "BmsSoc (0x292)"
    assert missing.detail == ("not seen as an 11-bit frame in 5 s: 0x292 arrives as a 29-bit (extended) frame; "
                              "the DBC defines it as 11-bit")
    assert "CAN profile / DBC" in missing.advice


def test_a_missing_message_fails_by_name():
    obs = healthy_can(by_id={k: v for k, v in healthy_can().by_id.items() if k != 0x292})
    (missing,) = failures(judge_can(obs, SPECS))
    assert missing.name == "BmsSoc (0x292)" and missing.detail.startswith("not seen in 5 s")


@pytest.mark.parametrize(("period_s", "ok"), [(0.051, True), (0.149, True), (0.049, False), (0.151, False)])
def test_a_period_is_judged_within_half_of_the_dbcs(period_s, ok):
    timing = every(period_s, 20)  # the window ends one period after its last frame: not stopped
    obs = healthy_can(by_id={**healthy_can().by_id, 0x292: timing}, ended_at=timing.last + period_s)
    check = by_name(judge_can(obs, SPECS))["BmsSoc (0x292)"]
    assert (check.outcome is Outcome.PASS) is ok, check
    if not ok:
        assert "the DBC says 100 ms (±50 %)" in check.detail and "termination" in check.advice


def test_a_multiplexed_message_may_cycle_its_pages_one_per_period():
    obs = healthy_can(by_id={**healthy_can().by_id, 0x352: every(1.0, 5)},
                      by_page={(0x352, 0): every(2.0, 3), (0x352, 1): every(2.0, 2, 1.0)})
    assert by_name(judge_can(obs, SPECS))["BmsEnergyStatus (0x352)"].outcome is Outcome.PASS


def test_frames_that_never_decode_fail_the_message_and_the_decoding():
    obs = healthy_can(accepted={0x132: 0, 0x292: 50, 0x352: 10}, refused={0x132: {"wrong_length": 500}},
                      last_refusal="HvBattAmpVolt (0x132): wrong_length: 6 bytes, DBC says 8")
    checks = by_name(judge_can(obs, SPECS))
    assert checks["HvBattAmpVolt (0x132)"].detail == "500 frames, none decodable (wrong_length 500)"
    assert "layout does not fit" in checks["HvBattAmpVolt (0x132)"].advice
    assert checks["decoded frames"].outcome is Outcome.FAIL and "500 of 560" in checks["decoded frames"].detail


def test_unknown_multiplexer_pages_are_no_fault_of_the_dbc():
    obs = healthy_can(refused={0x352: {"unknown_mux_page": 40}})
    assert failures(judge_can(obs, SPECS)) == []


def test_a_message_refused_only_for_unknown_multiplexer_pages_says_so_when_none_decodes():
    """Every byte 0xFF: each frame's page is one the DBC does not define. Tolerated when some frames decode,
    it is the reason when none does; it was filtered out and the check read 'none decodable (none)'."""
    obs = healthy_can(accepted={0x132: 500, 0x292: 50}, refused={0x352: {"unknown_mux_page": 10}})
    check = by_name(judge_can(obs, SPECS))["BmsEnergyStatus (0x352)"]
    assert check.outcome is Outcome.FAIL
    assert check.detail == "10 frames, none decodable (unknown_mux_page 10)"
    assert "multiplexer page the DBC does not define" in check.advice
    obs = healthy_can(accepted={0x132: 500, 0x292: 50}, refused={0x352: {"unknown_mux_page": 6, "wrong_length": 4}})
    assert by_name(judge_can(obs, SPECS))["BmsEnergyStatus (0x352)"].detail == (
        "10 frames, none decodable (unknown_mux_page 6, wrong_length 4)")


def test_values_not_believed_at_the_end_are_named():
    obs = healthy_can(stale=frozenset({"soc_min_pct"}))
    (check,) = failures(judge_can(obs, SPECS))
    assert check.name == "values" and "soc_min_pct" in check.detail


@pytest.mark.parametrize(("changes", "words"), [
    ({"soc_min_pct": 75.0}, "not in order"),
    ({"nominal_remaining_wh": 20_000.0}, "but the average SoC is 70 %"),
    ({"nominal_full_wh": 60_000.0, "nominal_remaining_wh": 42_000.0}, "usable_capacity_wh is 123.0 kWh"),
    ({"min_temp_c": 30.0}, "pack temperature min 30 above max 25.5"),
])
def test_values_that_disagree_with_each_other_fail(changes, words):
    obs = healthy_can(values={**VALUES, **changes})
    (check,) = failures(judge_can(obs, SPECS))
    assert check.name == "values" and words in check.detail and "[vehicle] dbc" in check.advice


def test_open_contactors_are_reported_and_said_to_block_discharge():
    obs = healthy_can(values={**VALUES, "contactor_state": ContactorState.OPEN,
                              "pack_contactor_pos": PackContactor.OPEN})
    check = by_name(judge_can(obs, SPECS))["contactors and BMS state"]
    assert check.outcome is Outcome.PASS  # reported: the wiring and the DBC are right
    assert "discharge NOT allowed now (contactors OPEN, pack contactors not pulled in)" in check.detail


@pytest.mark.parametrize("changes, words", [
    ({"bms_state": BmsState.FAULT}, "the truck reports BMS FAULT"),
    ({"bms_state": BmsState.WELD}, "the truck reports BMS WELD"),
    ({"pack_contactor_neg": PackContactor.WELDED}, "the truck reports a welded contactor"),
    ({"contactor_state": ContactorState.WELDED}, "the truck reports a welded contactor"),
])
def test_a_truck_reporting_a_pack_fault_is_not_signed_off(changes, words):
    """A latched BMS fault or a welded contactor is a fault in the core (0 W for every dispatch): reporting
    it under PASS let `commission` end 'COMMISSIONING PASSED', exit 0, on a truck that cannot deliver."""
    check = by_name(judge_can(healthy_can(values={**VALUES, **changes}), SPECS))["contactors and BMS state"]
    assert check.outcome is Outcome.FAIL and words in check.detail and "cleared on the truck" in check.advice


def test_contactor_state_not_reported_fails():
    obs = healthy_can(values={**VALUES, "contactor_state": None})
    assert by_name(judge_can(obs, SPECS))["contactors and BMS state"].outcome is Outcome.FAIL


# --- inverter --------------------------------------------------------------------------------------

def found_inverter(**changes) -> InverterObservation:
    obs = InverterObservation(
        where="127.0.0.1:502 unit 1", transport="tcp", unit_id=1, revert_timeout_s=10, base=40000,
        models={1: (40002, 66), 701: (40070, 153), 702: (40225, 50), 704: (40296, 65)},
        common={"Mn": "Maker", "Md": "Bidi 11.5", "SN": "S1", "Vr": "1.0"},
        ratings={"WMaxRtg": 11_500.0, "WDisChaRteMaxRtg": 11_500.0, "WChaRteMaxRtg": 11_500.0},
        inv_state=int(InverterState.STANDBY), measured_w=0.0, revert_ok=True,
        controls={"WSetEna": 1, "WSet": 0.0, "WSetRvrt": 0.0, "WSetEnaRvrt": 1, "WSetRvrtTms": 10})
    return replace(obs, **changes)


def test_a_found_inverter_passes():
    checks = judge_inverter(found_inverter())
    assert failures(checks) == []
    assert by_name(checks)["revert function"].detail == ("WSetEnaRvrt 1, WSetRvrt 0 W, WSetRvrtTms 10 s written "
                                                         "and read back (WSet 0 W)")


def test_an_unreachable_inverter_points_at_host_port_and_network():
    obs = InverterObservation("10.0.0.9:502 unit 1", "tcp", 1, 10, error="cannot connect to 10.0.0.9:502 unit 1",
                              error_kind="connect")
    (check,) = judge_inverter(obs)
    assert link_trouble(obs) is LinkTrouble.UNREACHABLE
    assert check.outcome is Outcome.FAIL and "[inverter] host and port" in check.advice


@pytest.mark.parametrize("error, kind", [
    ("not a SunSpec device (40000: reading 40000+2: Modbus exception 4 (device failure); 0: ...)", "bad_reply"),
    ("reading 40000+2: no reply within 1.0 s", "timeout"),
    ("reading 40000+2: Modbus exception 11 (gateway target failed to respond)", "exception"),
])
def test_a_device_that_answers_but_not_for_this_unit_id_is_a_unit_id_problem(error, kind):
    obs = InverterObservation("127.0.0.1:502 unit 2", "tcp", 2, 10, error=error, error_kind=kind)
    (check,) = judge_inverter(obs)
    assert link_trouble(obs) is LinkTrouble.UNIT_ID
    assert check.advice.startswith("[inverter] unit_id (2)")


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_nothing_answering_in_time_names_the_unit_id_and_the_timeout(transport):
    obs = InverterObservation("127.0.0.1:502 unit 2", transport, 2, 10, error="reading 40000+2: no reply within 0.3 s",
                              error_kind="timeout", timeout_s=0.3)
    (check,) = judge_inverter(obs)
    assert "nothing answered for unit id 2 within 0.3 s" in check.detail and "a Modbus device answers" not in check.detail
    assert check.advice.startswith("[inverter] unit_id (2)") and "[inverter] timeout_s (0.3 s)" in check.advice


@pytest.mark.parametrize("kind", ["timeout", "exception"])
def test_a_failure_after_the_sunspec_marker_is_the_model_chains_not_the_unit_ids(kind):
    obs = InverterObservation("127.0.0.1:502 unit 1", "tcp", 1, 10, error="reading 40225+52: Modbus exception 2",
                              error_kind=kind, marker_at=40000, timeout_s=0.3)
    (check,) = judge_inverter(obs)
    assert link_trouble(obs) is LinkTrouble.MODEL_CHAIN and "unit_id" not in check.advice
    assert ("[inverter] timeout_s (0.3 s)" in check.advice) is (kind == "timeout")


def test_a_modbus_device_without_sunspec_is_said_to_be_another_device():
    obs = InverterObservation("127.0.0.1:502 unit 1", "tcp", 1, 10, error_kind="bad_reply",
                              error="not a SunSpec device (40000: no 'SunS' marker; 0: no 'SunS' marker)")
    (check,) = judge_inverter(obs)
    assert link_trouble(obs) is LinkTrouble.NOT_SUNSPEC and "not a meter or datalogger" in check.advice


def test_a_discharge_rating_not_reported_falls_back_to_the_ac_rating():
    """Only a reported 0 W is "cannot discharge": a `WDisChaRteMaxRtg` not implemented is judged by `WMaxRtg`."""
    checks = judge_inverter(found_inverter(ratings={"WMaxRtg": 11_500.0, "WDisChaRteMaxRtg": None}))
    assert failures(checks) == []


def test_rtu_advice_names_the_line():
    obs = InverterObservation("RTU /dev/ttyUSB0 unit 1", "rtu", 1, 10, error="no reply", error_kind="timeout")
    (check,) = judge_inverter(obs)
    assert "baudrate" in check.advice and "A/B" in check.advice


@pytest.mark.parametrize(("changes", "name", "words"), [
    ({"models": {1: (0, 0), 701: (0, 0), 704: (0, 0)}}, "models", "no model 702"),
    ({"ratings": {"WMaxRtg": None, "WDisChaRteMaxRtg": None}}, "ratings", "no discharge rating"),
    ({"ratings": {"WMaxRtg": 11_500.0, "WDisChaRteMaxRtg": 0.0, "WChaRteMaxRtg": 11_500.0}}, "ratings",
     "WDisChaRteMaxRtg 0 W: the inverter reports it cannot discharge, so it cannot serve the truck's energy"),
    ({"inv_state": int(InverterState.FAULT), "alarms": 8}, "state", "FAULT"),
    ({"grid_outage": True, "grid_connected": False}, "state", "grid outage"),
    ({"revert_ok": False, "revert_error": "704 read-back differs"}, "revert function", "not accepted"),
    ({"controls": {"WSet": 0.0, "WSetRvrt": 0.0, "WSetEnaRvrt": 0, "WSetRvrtTms": 10}}, "revert function",
     "read back WSetEnaRvrt 0"),
    ({"controls": {}}, "revert function", "not read back"),  # it said "written and read back"
])
def test_inverter_failures(changes, name, words):
    (check,) = failures(judge_inverter(found_inverter(**changes)))
    assert check.name == name and words in check.detail and check.advice


# --- sign self-test ---------------------------------------------------------------------------------

def signed(watts: float, current_a: float, **changes) -> SignObservation:
    """A 500 W test on an 842 V pack; `watts` the inverter's W and `current_a` the BMS current during it."""
    before = tuple(Sample(t / 10, 0.0, 0.0, 0.0) for t in range(10))
    during = tuple(Sample(6 + t / 10, 500.0, watts, current_a) for t in range(40))
    obs = SignObservation(500.0, 10.0, answer="accepted", before=before, during=during, pack_voltage_v=842.0,
                          stopped=True, after_w=0.0)
    return replace(obs, **changes)


def test_the_right_signs_pass():
    checks = judge_sign(signed(500.0, 0.6))
    assert failures(checks) == []
    assert [c.name for c in checks] == ["test discharge", "inverter measured power", "BMS current", "back to 0 W"]


@pytest.mark.parametrize(("watts", "current", "name", "words"), [
    (-500.0, 0.6, "inverter measured power", "reports its power with the opposite sign"),
    (-500.0, -0.6, "inverter measured power", "did the opposite of its command"),
    (0.0, 0.0, "inverter measured power", "moved no power"),
    (500.0, -0.6, "BMS current", "the BMS shows a charge"),
    (500.0, 0.0, "BMS current", "no discharge shown"),
])
def test_a_wrong_sign_is_caught_with_its_cause(watts, current, name, words):
    checks = by_name(judge_sign(signed(watts, current)))
    assert checks[name].outcome is Outcome.FAIL and words in checks[name].detail and checks[name].advice


def test_a_swapped_inverter_sign_still_confirms_the_discharge_on_the_bms():
    checks = by_name(judge_sign(signed(-500.0, 0.6)))
    assert checks["BMS current"].outcome is Outcome.PASS
    assert "CT is fitted backwards" in checks["inverter measured power"].advice


@pytest.mark.parametrize(("volts", "current", "ok"), [
    (842.0, 0.6, True), (842.0, 0.7, True),  # losses and the current's resolution
    (421.0, 0.6, False),  # the Model 3 layout's voltage scale on an 800 V pack: half the power out of the pack
    (842.0, 1.2, False),  # a current scaled twice over
])
def test_a_pack_power_that_disagrees_with_the_inverter_is_a_dbc_scale(volts, current, ok):
    check = by_name(judge_sign(signed(500.0, current, pack_voltage_v=volts)))["BMS current"]
    assert (check.outcome is Outcome.PASS) is ok
    if not ok:
        assert "W out of the pack for 500 W at the inverter" in check.detail and "scale" in check.advice


def test_a_current_change_below_the_bms_resolution_is_no_discharge():
    checks = by_name(judge_sign(signed(500.0, 0.05, pack_voltage_v=None)))
    assert checks["BMS current"].outcome is Outcome.FAIL


def test_a_refused_test_says_why_and_still_confirms_0_w():
    checks = judge_sign(signed(0.0, 0.0, refusal="INSUFFICIENT_ENERGY", answer="refused INSUFFICIENT_ENERGY: ...",
                               during=()))
    assert [c.outcome for c in checks] == [Outcome.FAIL, Outcome.PASS]
    assert "below the floor" in checks[0].advice


def test_a_test_the_core_held_at_0_w_says_why():
    obs = signed(0.0, 0.0, during=tuple(Sample(6 + t / 10, 0.0, 0.0, 0.0) for t in range(40)),
                 reason="clamped: contactors open")
    check = by_name(judge_sign(obs))["sign"]
    assert check.outcome is Outcome.FAIL and "(clamped: contactors open)" in check.detail
    assert "open contactors" in check.advice


def test_a_test_the_core_stopped_serving_part_way_judges_no_sign():
    """The inverter lost mid-test: the core faulted and withdrew the command, and the readings left (a few
    watts, the BMS current's last value) passed the inverter's sign and blamed the DBC's scale."""
    during = tuple(Sample(6 + t / 10, 500.0 if t < 10 else 0.0, 500.0 if t < 10 else 12.0, 0.6,
                          "" if t < 10 else "FAULT: fault latched: inverter_comms") for t in range(40))
    checks = by_name(judge_sign(signed(12.0, 0.6, during=during)))
    assert set(checks) == {"test discharge", "sign", "back to 0 W"}
    assert checks["sign"].outcome is Outcome.FAIL
    assert "did not hold" in checks["sign"].detail and "(FAULT: fault latched: inverter_comms)" in checks["sign"].detail
    assert "run again" in checks["sign"].advice


def test_a_gateway_that_never_got_ready_fails_the_test():
    (check,) = judge_sign(SignObservation(500.0, 10.0, not_ready="stale: bms"))
    assert check.outcome is Outcome.FAIL and "stale: bms" in check.detail


@pytest.mark.parametrize("observation", [SignObservation(500.0, 10.0, interrupted=True),
                                         SignObservation(500.0, 10.0, not_ready="starting", interrupted=True)],
                         ids=["in the baseline", "while waiting to be ready"])
def test_a_signal_before_the_test_discharge_is_asked_for_fails_it_as_interrupted_not_as_a_cause(observation):
    """A Ctrl-C in the baseline still asked the core for the discharge (and passed it); one while the
    gateway got ready was told as "the gateway never became ready", blaming the CAN and inverter checks."""
    (check,) = judge_sign(observation)
    assert (check.outcome, check.name) == (Outcome.FAIL, "interrupted")
    assert "before the test discharge was asked for" in check.detail and check.advice == "run again"


@pytest.mark.parametrize("changes", [{"stopped": False, "stop_detail": "WSet = 0 not confirmed: timeout"},
                                     {"after_w": 480.0}, {"after_w": None}])
def test_an_end_not_confirmed_at_0_w_fails(changes):
    check = by_name(judge_sign(signed(500.0, 0.6, **changes)))["back to 0 W"]
    assert check.outcome is Outcome.FAIL and "revert timer" in check.advice


@pytest.mark.parametrize("target_w, after_w", [(20_000.0, 1_900.0), (20_000.0, -900.0), (500.0, -60.0)])
def test_back_to_0_w_means_0_w_whatever_the_tests_power(target_w, after_w):
    """The tolerance was a tenth of the test's power: 1.9 kW still flowing after a 20 kW test passed."""
    check = by_name(judge_sign(signed(target_w, target_w / 500.0 * 0.6, target_w=target_w, after_w=after_w)))[
        "back to 0 W"]
    assert check.outcome is Outcome.FAIL


# --- dispatch, config, the report ---------------------------------------------------------------------

def test_dispatch_interfaces():
    assert [c.outcome for c in judge_dispatch([])] == [Outcome.SKIPPED]
    checks = judge_dispatch([Reach("dispatch.openadr", "http://vtn", False, "no answer from the VTN"),
                             Reach("dispatch.sunspec_server", "127.0.0.1:1502", True, "listening"),
                             Reach("dispatch.openadr3", "", None, "not checked")])
    assert [c.outcome for c in checks] == [Outcome.FAIL, Outcome.PASS, Outcome.SKIPPED]
    assert "vtn_url" in checks[0].advice and checks[0].name == "dispatch.openadr (http://vtn)"


def test_the_report_passes_only_when_nothing_failed_and_renders_both_forms():
    report = Report("gateway.toml", "2026-12-02T15:00:00Z", "0.1.0")
    report.add(judge_config("gateway.toml", []))
    report.add(judge_can(healthy_can(), SPECS))
    report.add(judge_dispatch([]))
    assert report.passed and report.step_outcome(Step.SIGN) is Outcome.SKIPPED
    assert verdict_line(report).startswith("COMMISSIONING PASSED")
    report.add(judge_inverter(found_inverter(inv_state=int(InverterState.FAULT))))
    assert not report.passed and report.step_outcome(Step.INVERTER) is Outcome.FAIL
    doc = json.loads(json.dumps(report.as_dict()))
    assert doc["passed"] is False and doc["failed_checks"] == 1
    assert [s["step"] for s in doc["steps"]] == ["config", "can", "inverter", "sign_test", "dispatch"]
    inverter = doc["steps"][2]
    assert inverter["outcome"] == "fail" and any(c["advice"] for c in inverter["checks"])
    lines = step_lines(report, Step.INVERTER)
    assert lines[0] == "== inverter (SunSpec Modbus): FAIL" and any(ln.startswith("        check: ") for ln in lines)
    # a step's later findings (the bus lost after its window) are headed as such, not as the step again
    lost = judge_inverter(found_inverter(alarms=8))
    report.add(lost)
    assert step_lines(report, Step.INVERTER, lost)[0] == "== inverter (SunSpec Modbus), later: FAIL"


def test_config_problems_each_become_a_failed_check():
    checks = judge_config("bad.toml", ["bad.toml: owner.resrve: unknown key", "bad.toml: can.bitrate: 5 is out of range"])
    assert [c.outcome for c in checks] == [Outcome.FAIL, Outcome.FAIL] and "check-config" in checks[0].advice


# --- the simulated inverter's swapped sign ---------------------------------------------------------------

def test_the_simulated_inverter_can_report_its_power_with_the_wrong_sign():
    model = InverterModel(reversed_w=True)
    model.write("WSetEna", 1)
    model.write("WSet", 500.0)
    dc = model.advance(1.0, 1.0, 100_000.0, 100_000.0)
    assert dc > 0 and model.ac_power_w == 500.0  # the power flows as commanded ...
    assert model.values(701)["W"] == -500.0  # ... and is reported reversed
    assert InverterModel().values(701)["W"] == 0.0


# --- purity ------------------------------------------------------------------------------------------------

def test_the_judgement_and_the_report_touch_no_io():
    """What decides imports no clock, bus, socket or disk (the core's purity rule), and of the
    project only the core's types, the report and quoting."""
    folder = Path(commissioning.__file__).parent
    for name in ("judgement.py", "report.py"):
        path = folder / name
        assert imported_roots(path) & FORBIDDEN == set(), name
        project = {node.module for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("firmware_py")}
        assert project <= {"firmware_py.core.types", "firmware_py.commissioning.report", "firmware_py.quoting"}, name


def test_an_inverter_measuring_far_more_than_commanded_fails_even_without_the_pack_voltage():
    """Without a mapped pack voltage the pack-versus-inverter check cannot run: a reading ten times the
    command (a CT ratio, a scale factor) passed every check."""
    checks = by_name(judge_sign(signed(5_000.0, 0.2, pack_voltage_v=None)))
    assert checks["inverter measured power"].outcome is Outcome.FAIL
    assert "far more than commanded" in checks["inverter measured power"].detail


def test_a_test_discharge_the_core_gave_no_answer_to_fails():
    (test, end) = judge_sign(signed(500.0, 0.6, answer="no answer"))
    assert test.outcome is Outcome.FAIL and "no answer" in test.detail and end.name == "back to 0 W"

