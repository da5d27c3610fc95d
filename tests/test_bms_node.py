"""The simulated BMS node on a real (virtual) python-can bus, read back by the real reader."""

from __future__ import annotations

import itertools
from collections import Counter

import can
import pytest

from firmware_py.bms import BmsReader
from firmware_py.config import bundled_dbc
from firmware_py.core.types import BmsState, ContactorState, PackContactor
from firmware_py.sim.battery import Battery
from firmware_py.sim.bms_node import FAULT_KINDS, BmsNode

DBC = bundled_dbc("cybertruck_bms.dbc")
_channels = itertools.count()


class Bench:
    """Pack + node on one end of a virtual bus, the gateway's reader on the other, simulated time."""

    def __init__(self, soc_pct: float = 60.0):
        channel = f"test_bms_node_{next(_channels)}"
        self.tx = can.Bus(interface="virtual", channel=channel)
        self.rx = can.Bus(interface="virtual", channel=channel)
        self.battery = Battery(soc_pct=soc_pct)
        self.node = BmsNode(self.battery, self.tx, DBC)
        self.reader = BmsReader(DBC, clock=lambda: self.t)
        self.t = 0.0
        self.ids: Counter[int] = Counter()

    def run(self, seconds: float, power_w: float = 0.0, dt: float = 0.01) -> None:
        for _ in range(round(seconds / dt)):
            self.battery.step(dt, power_w)
            self.node.emit_due(self.t)
            while (msg := self.rx.recv(0)) is not None:
                self.ids[msg.arbitration_id] += 1
                self.reader.on_message(msg, now=self.t)
            self.t += dt

    def snapshot(self):
        return self.reader.snapshot(self.t)

    def close(self):
        self.tx.shutdown()
        self.rx.shutdown()


@pytest.fixture
def bench():
    b = Bench()
    yield b
    b.close()


def test_every_message_at_its_period(bench):
    bench.run(2.0)
    # 2 s: 10 ms -> 200, 100 ms -> 20, 500 ms -> 4, 1 s -> 2 (x2 pages where multiplexed)
    assert bench.ids == {0x132: 200, 0x292: 20, 0x252: 20, 0x212: 20, 0x312: 4,
                         0x352: 4, 0x332: 2, 0x20A: 2, 0x3D2: 2}
    assert not bench.reader.dropped


def test_decoded_values_match_the_pack_model(bench):
    bench.run(1.05, power_w=11_500)
    s, b = bench.snapshot(), bench.battery
    assert s.stale == frozenset()
    assert s.pack_voltage_v == pytest.approx(b.pack_voltage_v, abs=0.05)
    assert s.pack_current_a == pytest.approx(b.pack_current_a, abs=0.15) and s.pack_current_a > 0
    assert s.soc_min_pct <= b.true_soc_pct and s.soc_min_pct == pytest.approx(b.soc_min_pct, abs=0.15)
    assert s.max_discharge_w == pytest.approx(b.max_discharge_w, abs=10)
    assert s.max_charge_w == pytest.approx(b.max_charge_w, abs=10)
    assert s.min_temp_c == pytest.approx(b.min_temp_c, abs=0.3)
    assert s.nominal_full_wh == pytest.approx(b.nominal_full_wh, abs=20)
    assert s.energy_buffer_wh == pytest.approx(b.energy_buffer_wh, abs=10)
    assert s.brick_v_max == pytest.approx(b.brick_v_max, abs=0.003)
    assert s.lifetime_discharge_wh == pytest.approx(b.lifetime_discharge_wh, abs=1.5)
    assert s.bms_state == BmsState.SUPPORT and s.hvil_ok and s.energy_path_closed()
    assert s.pack_contactor_pos == PackContactor.ECONOMIZED


def test_standby_without_flow_and_charge_while_charging(bench):
    bench.run(0.3)
    assert bench.snapshot().bms_state == BmsState.STANDBY
    bench.run(0.3, power_w=-7_000)
    assert bench.snapshot().bms_state == BmsState.CHARGE and bench.snapshot().pack_current_a < 0


def test_can_silence_makes_everything_stale_then_recovers(bench):
    bench.run(0.5)
    bench.node.inject("can_silence", until=bench.t + 3.5)
    bench.run(3.2)
    assert {"soc_min_pct", "bms_state", "pack_voltage_v", "lifetime_charge_wh"} <= bench.snapshot().stale
    bench.run(1.2)
    assert bench.snapshot().stale == frozenset()


@pytest.mark.parametrize("kind,check", [
    ("bms_fault", lambda s: s.bms_state == BmsState.FAULT and not s.energy_path_closed()),
    ("dcl_zero", lambda s: s.max_discharge_w == 0 and s.energy_path_closed()),
    ("contactor_open", lambda s: s.contactor_state == ContactorState.OPEN
     and s.pack_contactor_neg == PackContactor.OPEN and not s.energy_path_closed()),
    ("over_temp", lambda s: s.max_temp_c >= 60 and s.max_discharge_w == 0 and s.max_charge_w == 0),
])
def test_state_faults_reach_the_reader_and_clear(bench, kind, check):
    bench.run(1.0, power_w=5_000)
    bench.node.inject(kind, until=bench.t + 1.5)
    bench.run(1.2, power_w=5_000)
    assert check(bench.snapshot())
    bench.run(1.5, power_w=5_000)
    assert not check(bench.snapshot()) and bench.snapshot().energy_path_closed()


def test_contactor_open_stops_the_pack_itself(bench):
    bench.node.inject("contactor_open")
    assert bench.battery.step(1.0, 10_000) == 0
    bench.node.clear("contactor_open")
    assert bench.battery.step(1.0, 10_000) == 10_000


def test_soc_jump_is_refused_by_the_reader(bench):
    bench.run(1.0)
    before = bench.snapshot().soc_min_pct
    bench.node.inject("soc_jump", until=bench.t + 1.0)
    bench.run(0.5)
    s = bench.snapshot()
    assert bench.reader.dropped["soc_jump"] > 0
    assert s.soc_min_pct == pytest.approx(before, abs=0.2) and "soc_min_pct" in s.stale


def test_wrong_length_frames_are_all_dropped(bench):
    bench.run(0.5)
    bench.node.inject("wrong_length", until=bench.t + 0.5)
    bench.run(0.5)
    assert bench.reader.dropped["wrong_length"] >= 50
    assert set(bench.reader.dropped) == {"wrong_length"}


def test_garbled_frames_never_raise_and_are_mostly_caught(bench):
    bench.run(1.0)
    bench.node.inject("garbled", until=bench.t + 1.0)
    bench.run(1.0)
    assert sum(bench.reader.dropped.values()) > 0
    s = bench.snapshot()
    assert s.soc_min_pct is None or 0 <= s.soc_min_pct <= 100


def test_unknown_fault_names_the_valid_kinds(bench):
    with pytest.raises(ValueError, match="can_silence.*wrong_length"):
        bench.node.inject("meteor")
    assert len(FAULT_KINDS) == 9  # the fault matrix added message_silence


def test_falling_behind_sends_one_frame_per_message_not_a_burst(bench):
    assert bench.node.emit_due(0.0) == 10  # 9 messages, 0x352 with two pages
    assert bench.node.emit_due(0.005) == 0
    assert bench.node.emit_due(100.0) == 10
    assert bench.node.emit_due(100.01) == 1  # only the 10 ms message is due again


def test_received_frames_are_ordinary_messages_with_the_encoded_bytes(bench):
    """The node hands the bus immutable payloads (cheap to copy); receivers still get python-can's bytearray."""
    status = bench.node.db.get_message_by_frame_id(0x212)
    expected = bench.node.encode(status, bench.node.field_values())[0]
    bench.node.emit_due(0.0)
    received = {}
    while (msg := bench.rx.recv(0)) is not None:
        received[msg.arbitration_id] = msg
    msg = received[0x212]
    assert isinstance(msg.data, bytearray) and bytes(msg.data) == expected
    assert msg.dlc == status.length and not msg.is_extended_id and msg.is_rx


def _garbled_frames(tmp_path, *seed_args: str, count: int = 12) -> list[bytes]:
    """The first frames `sim bms` sends for a scenario with `[run] seed = 7` garbling every frame
    from the start, read off the same virtual bus."""
    from firmware_py.cli import main

    scenario = tmp_path / "seed7.toml"
    scenario.write_text('[run]\nduration_s = 60\nseed = 7\n[[fault]]\nat_s = 0\nkind = "garbled"\nduration_s = 30\n')
    channel = f"test_bms_node_{next(_channels)}"
    with can.Bus(interface="virtual", channel=channel) as rx:
        assert main(["sim", "bms", "--can-interface", "virtual", "--can-channel", channel,
                     "--scenario", str(scenario), "--duration", "0.05", *seed_args]) == 0
        frames = []
        while len(frames) < count and (msg := rx.recv(0)) is not None:
            frames.append(bytes(msg.data))
    assert len(frames) == count
    return frames


def test_sim_bms_takes_the_scenarios_seed_unless_told_otherwise(tmp_path):
    """Like `sim`, `sim bms --scenario` seeds its noise and garbled frames from `[run] seed`: it took
    --seed's default of 0, so the same scenario garbled its frames differently in the two."""
    from_scenario = _garbled_frames(tmp_path)
    assert from_scenario == _garbled_frames(tmp_path, "--seed", "7")
    assert from_scenario != _garbled_frames(tmp_path, "--seed", "0")  # --seed still wins
