"""The fixed limits the core enforces, taken once from the configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """Every number the core's safety decisions depend on.

    `command_horizon_s` is how long a setpoint may stay in force with nobody
    refreshing it: the inverter's own revert timer. Discharge near the floor is
    limited so that even a gateway that dies right now cannot push the pack
    below the floor before the inverter reverts to 0 W.
    """

    usable_capacity_wh: float = 123_000
    reserve_pct: float = 40
    hard_min_soc_pct: float = 10
    soc_margin_pct: float = 2
    backup_floor_pct: float = 20
    bms_timeout_s: float = 0.5
    inverter_timeout_s: float = 3.0
    ramp_w_per_s: float = 2_000
    fault_holdoff_s: float = 30
    lockout_faults: int = 3
    lockout_window_s: float = 3_600
    max_discharge_w: float = 11_500
    max_charge_w: float = 11_500
    command_horizon_s: float = 10
    max_temp_c: float = 60
    min_temp_c: float = -25
    """At or below it: `under_temp`. The coldest 0x312 can carry (0.25 °C a count from −25 °C), so a colder
    pack reads −25 °C too: a limit below it (once −30 °C) could never be reached."""
    departure_charge_w: float = 7_600
    dc_efficiency: float = 0.95
    energy_report_interval_s: float = 60
    simple_levels_pct: tuple[float, ...] = (33.0, 66.0, 100.0)
    stall_gap_s: float = 0.25
    """A gap between two steps longer than this is the gateway's own stall: the 100 ms BMS
    messages go stale after 0.3 s, so a longer pause could make them look faulted."""
    resync_grace_s: float = 10.0
    """After a stall, how long fresh data may take before stale data is a fault again."""

    @classmethod
    def from_config(cls, config) -> "Policy":  # config: firmware_py.config.Config (not imported: core stays pure)
        s = config.safety
        return cls(
            usable_capacity_wh=config.vehicle.usable_capacity_wh,
            reserve_pct=config.owner.reserve_pct,
            hard_min_soc_pct=s.hard_min_soc_pct,
            soc_margin_pct=s.soc_margin_pct,
            backup_floor_pct=s.backup_floor_pct,
            bms_timeout_s=s.bms_timeout_s,
            inverter_timeout_s=s.inverter_timeout_s,
            ramp_w_per_s=s.ramp_w_per_s,
            fault_holdoff_s=s.fault_holdoff_s,
            lockout_faults=s.lockout_faults,
            lockout_window_s=s.lockout_window_s,
            max_discharge_w=s.max_discharge_w,
            max_charge_w=s.max_charge_w,
            command_horizon_s=config.inverter.revert_timeout_s,
            departure_charge_w=config.owner.departure_charge_w,
            simple_levels_pct=tuple(config.dispatch.openadr.simple_levels_pct),
        )
