"""Fuzzing every door input comes in by: each input works or gets a clear refusal, nothing else.

CI runs the `ci` hypothesis profile; `HYPOTHESIS_PROFILE=long` runs at least 10,000 examples each
(the README records the last long run). Inputs are mutated from the bundled files, so most of them
are nearly valid, which is where parsers break.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import can
from hypothesis import given
from hypothesis import strategies as st

from firmware_py import config
from firmware_py.assembly import check
from firmware_py.bms.reader import BmsReader
from firmware_py.config import bundled_config, bundled_dbc
from firmware_py.core.types import BmsSnapshot, OwnerSettings
from firmware_py.errors import InputError
from firmware_py.owner import changes
from firmware_py.sim import scenario

NOW = 1_750_000_000.0
CONFIGS = [bundled_config(name).read_text() for name in ("example.toml", "bench.toml")]
SCENARIOS = [scenario.bundled(name).read_text() for name in scenario.bundled_names()]

toml_scalars = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.booleans(),
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.sampled_from(["inf", "-inf", "nan", "1e400", "1" + "0" * 400, "[]", "{}", '""', "[1, 2]",
                     "1979-05-27T07:32:00Z", "-0", "0x7fffffff"]),
)


@st.composite
def mutated(draw: st.DrawFn, texts: list[str]) -> str:
    """A bundled file with a few lines deleted, duplicated, re-valued or garbled."""
    lines = draw(st.sampled_from(texts)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        at = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["delete", "duplicate", "revalue", "garble", "truncate"]))
        line = lines[at]
        if how == "delete":
            del lines[at]
        elif how == "duplicate":
            lines.insert(at, line)
        elif how == "revalue" and "=" in line:
            lines[at] = f"{line.split('=', 1)[0]}= {draw(toml_scalars)}"
        elif how == "garble":
            lines[at] = line + draw(st.text(max_size=6))
        else:
            lines[at] = line[: draw(st.integers(0, len(line)))]
    return "\n".join(lines) + "\n"


@given(mutated(CONFIGS))
def test_a_mutated_configuration_is_valid_or_refused_clearly(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gateway.toml"
        path.write_text(text, encoding="utf-8")
        try:
            loaded = config.load(path)
            check(loaded)  # what run checks before it opens a link
        except InputError as err:
            assert err.problems and all(p.startswith(str(path)) for p in err.problems)


@given(mutated(SCENARIOS))
def test_a_mutated_scenario_is_valid_or_refused_clearly(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scenario.toml"
        path.write_text(text, encoding="utf-8")
        try:
            loaded = scenario.load(path)
        except InputError as err:
            assert err.problems and all(p.startswith(str(path)) for p in err.problems)
        else:
            assert 0 < loaded.run.duration_s <= scenario.MAX_RUN_S
            assert all(d.at_s < loaded.run.duration_s for d in loaded.dispatch)


READER = BmsReader(bundled_dbc("cybertruck_bms.dbc"), clock=lambda: 0.0)
BMS_IDS = sorted(READER.frame_ids)


@given(st.lists(st.tuples(
    st.one_of(st.sampled_from(BMS_IDS), st.integers(0, 0x7FF), st.integers(0, 0x1FFFFFFF)),
    st.booleans(), st.booleans(), st.booleans(), st.binary(max_size=64)), max_size=30))
def test_can_frames_of_any_id_length_and_payload_are_believed_or_counted(frames) -> None:
    reader = BmsReader(bundled_dbc("cybertruck_bms.dbc"), clock=lambda: 0.0)
    before = reader.accepted + sum(reader.dropped.values())
    considered = 0
    for i, (frame_id, extended, remote, error, data) in enumerate(frames):
        extended = extended or frame_id > 0x7FF
        msg = can.Message(arbitration_id=frame_id, is_extended_id=extended, is_remote_frame=remote and not error,
                          is_error_frame=error, data=b"" if remote and not error else data,
                          is_fd=len(data) > 8, check=False)
        # an extended frame with a BMS id's number is counted too (`extended_id`), as a drop
        considered += frame_id in READER.frame_ids and not (msg.is_remote_frame or error)
        snapshot = reader.on_message(msg, now=i * 0.01)
        assert snapshot is None or isinstance(snapshot, BmsSnapshot)
    assert reader.accepted + sum(reader.dropped.values()) - before == considered


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
owner_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"pct": json_values, "now": json_values, "event": json_values,
                                        "until": json_values, "time": json_values, "soc_pct": json_values}))
CURRENT = OwnerSettings(reserve_pct=40.0, received_at=NOW)


@given(st.sampled_from(["reserve", "opt-out", "departure"]), owner_bodies)
def test_owner_request_bodies_change_the_settings_within_bounds_or_are_refused(action: str, body: Any) -> None:
    change = {"reserve": lambda: changes.set_reserve(CURRENT, body, NOW),
              "opt-out": lambda: changes.opt_out(CURRENT, body, NOW, None),
              "departure": lambda: changes.set_departure(CURRENT, body, NOW, None)}[action]
    try:
        settings = change()
    except changes.BadRequest as err:
        assert str(err)
        return
    assert 0 <= settings.reserve_pct <= 100 and settings.received_at == NOW
    until, departure = settings.opt_out_until, settings.departure_at
    assert until is None or until == math.inf or NOW < until <= changes.days_ahead(NOW, changes.MAX_AHEAD_DAYS, None)
    assert departure is None or NOW < departure <= changes.days_ahead(NOW, changes.MAX_DEPARTURE_DAYS, None)
    assert all(event.isprintable() for event in settings.opt_out_events)
