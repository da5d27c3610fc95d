"""A pure model of an 800 V-class truck pack, stepped by the caller's dt.

No clock and no I/O: the bench runs it hundreds of times faster than real time
and a test can run it backwards from any state. Fidelity is what the gateway
can observe on the BMS frames: terminal voltage sagging under load, limits
that shrink near empty/full and at temperature extremes, an SoC estimate that
is noisy but whose conservative minimum never overstates the truth.
"""

from __future__ import annotations

import bisect
import math
import random

SERIES_CELLS = 216  # 216 s x ~3.7 V nominal = the 800 V class

OCV_CURVE: tuple[tuple[float, float], ...] = (
    (0, 3.00), (5, 3.35), (10, 3.45), (20, 3.55), (30, 3.62), (40, 3.68),
    (50, 3.74), (60, 3.82), (70, 3.90), (80, 3.98), (90, 4.07), (100, 4.18),
)
"""Cell open-circuit voltage vs SoC (%), an NMC-like shape."""
_OCV_SOCS = tuple(soc for soc, _ in OCV_CURVE)  # the curve's x axis, for bisect (read several times a step)

R_PACK_25C_OHM = 0.08
PEAK_DISCHARGE_W = 350_000.0
PEAK_CHARGE_W = 250_000.0
HEAT_CAPACITY_J_PER_K = 800_000.0  # ~800 kg of pack at ~1 kJ/(kg K)
COOLING_W_PER_K = 60.0
SOC_MARGIN_PCT = 0.5  # how far below its estimate a BMS puts the conservative SoC
SOC_NOISE_PCT = 0.05  # 1 sigma of the estimator's error
SOC_NOISE_CLIP_PCT = 0.2
BUFFER_FRACTION = 0.04  # energy below "0 %" kept to protect the cells


def cell_ocv(soc_pct: float) -> float:
    """Interpolated cell open-circuit voltage; SoC is clamped to 0..100."""
    soc = min(100.0, max(0.0, soc_pct))
    i = min(max(bisect.bisect_right(_OCV_SOCS, soc), 1), len(OCV_CURVE) - 1)
    (x0, y0), (x1, y1) = OCV_CURVE[i - 1], OCV_CURVE[i]
    return y0 + (y1 - y0) * (soc - x0) / (x1 - x0)


def _ramp(x: float, x0: float, x1: float) -> float:
    """0 at x0, 1 at x1, linear between (x0 > x1 gives a falling ramp)."""
    if x0 == x1:
        return 1.0
    return min(1.0, max(0.0, (x - x0) / (x1 - x0)))


def temperature_derate(temp_c: float, charging: bool) -> float:
    """Share of peak power the BMS allows at this cell temperature.

    Lithium plating makes cold charging the tightest limit; heat limits both ways.
    """
    cold = _ramp(temp_c, 0.0, 15.0) if charging else _ramp(temp_c, -30.0, 5.0)
    hot = _ramp(temp_c, 60.0, 45.0)
    return min(cold, hot)


def soc_derate(soc_pct: float, charging: bool) -> float:
    """Share of peak power allowed at this SoC: discharge fades near empty, charge tapers near full."""
    if charging:
        return _ramp(soc_pct, 100.0, 80.0)
    return _ramp(soc_pct, 1.0, 10.0)


class Battery:
    """The pack. `step` moves it forward; everything else only observes it."""

    def __init__(self, capacity_wh: float = 123_000, soc_pct: float = 80, ambient_c: float = 25,
                 seed: int = 0, temp_c: float | None = None,
                 lifetime_discharge_wh: float = 0.0, lifetime_charge_wh: float = 0.0):
        if capacity_wh <= 0:
            raise ValueError(f"capacity_wh must be positive, got {capacity_wh}")
        self.capacity_wh = float(capacity_wh)
        self.ambient_c = float(ambient_c)
        self.temp_c = float(ambient_c if temp_c is None else temp_c)
        self.contactors_closed = True
        self.lifetime_discharge_wh = float(lifetime_discharge_wh)
        self.lifetime_charge_wh = float(lifetime_charge_wh)
        self._soc = min(100.0, max(0.0, float(soc_pct)))
        self._current_a = 0.0
        self._rng = random.Random(seed)
        self._noise = 0.0
        # Single-entry memos keyed on the state they derive from: a bench step reads the
        # OCV and the power limits several times between two changes of that state.
        self._ocv_memo: tuple[float | None, float] = (None, 0.0)
        self._limits_memo: tuple[tuple[float, float] | None, tuple[float, float]] = (None, (0.0, 0.0))

    # -- physics ----------------------------------------------------------

    @property
    def resistance_ohm(self) -> float:
        """Pack resistance, rising as the cells get cold."""
        return R_PACK_25C_OHM * (1.0 + 0.03 * max(0.0, 25.0 - self.temp_c))

    @property
    def ocv_v(self) -> float:
        if self._ocv_memo[0] != self._soc:
            self._ocv_memo = (self._soc, SERIES_CELLS * cell_ocv(self._soc))
        return self._ocv_memo[1]

    def _current_for(self, power_w: float) -> float:
        """Current drawing `power_w` at the terminals: P = (OCV - I R) I."""
        ocv, r = self.ocv_v, self.resistance_ohm
        disc = ocv * ocv - 4.0 * r * power_w
        return (ocv - math.sqrt(max(0.0, disc))) / (2.0 * r)

    def step(self, dt_s: float, dc_power_w: float) -> float:
        """Advance `dt_s` while the inverter asks for `dc_power_w` (positive = discharge).

        Returns what the pack actually delivered: the request clamped to the BMS
        limits, or 0 with the contactors open.
        """
        if dt_s < 0:
            raise ValueError(f"dt_s must not be negative, got {dt_s}")
        power = self._clamp(dc_power_w)
        current = self._current_for(power)
        self._current_a = current
        chemical_wh = self.ocv_v * current * dt_s / 3600.0
        self._soc = min(100.0, max(0.0, self._soc - 100.0 * chemical_wh / self.capacity_wh))
        heat_w = current * current * self.resistance_ohm
        self.temp_c += (heat_w - COOLING_W_PER_K * (self.temp_c - self.ambient_c)) * dt_s / HEAT_CAPACITY_J_PER_K
        if power > 0:
            self.lifetime_discharge_wh += power * dt_s / 3600.0
        else:
            self.lifetime_charge_wh += -power * dt_s / 3600.0
        if dt_s > 0:
            self._noise = max(-SOC_NOISE_CLIP_PCT, min(SOC_NOISE_CLIP_PCT, self._rng.gauss(0.0, SOC_NOISE_PCT)))
        return power

    def _clamp(self, power_w: float) -> float:
        if not self.contactors_closed:
            return 0.0
        if power_w >= 0:
            return min(power_w, self.max_discharge_w)
        return max(power_w, -self.max_charge_w)

    # -- what a BMS would report -----------------------------------------

    @property
    def true_soc_pct(self) -> float:
        return self._soc

    @property
    def soc_avg_pct(self) -> float:
        """The BMS estimate: the truth plus bounded estimator noise."""
        return min(100.0, max(0.0, self._soc + self._noise))

    @property
    def soc_min_pct(self) -> float:
        """Conservative SoC: below the estimate by a margin wider than any noise, so never above truth."""
        return max(0.0, min(self._soc, self.soc_avg_pct - SOC_MARGIN_PCT))

    @property
    def soc_max_pct(self) -> float:
        return min(100.0, self.soc_avg_pct + SOC_MARGIN_PCT)

    @property
    def soc_ui_pct(self) -> float:
        return self.soc_avg_pct

    @property
    def max_discharge_w(self) -> float:
        return self._limits()[0]

    @property
    def max_charge_w(self) -> float:
        return self._limits()[1]

    def _limits(self) -> tuple[float, float]:
        """(discharge, charge) limits in W for the present SoC and temperature."""
        key = (self._soc, self.temp_c)
        if self._limits_memo[0] != key:
            self._limits_memo = (key, (
                PEAK_DISCHARGE_W * soc_derate(self._soc, False) * temperature_derate(self.temp_c, False),
                PEAK_CHARGE_W * soc_derate(self._soc, True) * temperature_derate(self.temp_c, True)))
        return self._limits_memo[1]

    @property
    def pack_current_a(self) -> float:
        """Positive = discharge; 0 with the contactors open."""
        return self._current_a

    @property
    def pack_voltage_v(self) -> float:
        """Terminal voltage: OCV less the drop across the pack resistance."""
        return self.ocv_v - self._current_a * self.resistance_ohm

    @property
    def temp_spread_c(self) -> float:
        """Cells near the coolant inlet run cooler; the spread grows with current."""
        return 0.5 + 0.005 * abs(self._current_a)

    @property
    def min_temp_c(self) -> float:
        return self.temp_c - self.temp_spread_c

    @property
    def max_temp_c(self) -> float:
        return self.temp_c + self.temp_spread_c

    @property
    def brick_v_min(self) -> float:
        return self.pack_voltage_v / SERIES_CELLS - 0.005

    @property
    def brick_v_max(self) -> float:
        return self.pack_voltage_v / SERIES_CELLS + 0.005

    @property
    def nominal_full_wh(self) -> float:
        return self.capacity_wh * (1.0 + BUFFER_FRACTION)

    @property
    def energy_buffer_wh(self) -> float:
        return self.capacity_wh * BUFFER_FRACTION

    @property
    def nominal_remaining_wh(self) -> float:
        return self.capacity_wh * self._soc / 100.0 + self.energy_buffer_wh

    @property
    def expected_remaining_wh(self) -> float:
        """Usable energy left by the conservative estimate."""
        return self.capacity_wh * self.soc_min_pct / 100.0
