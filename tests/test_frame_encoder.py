"""The simulated BMS's planned frame encoder gives exactly the bytes cantools' own encode gives."""

from __future__ import annotations

import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_py.bms import signals
from firmware_py.bms.reader import load_dbc
from firmware_py.config import bundled_dbc
from firmware_py.sim.bms_node import EXTRA_SIGNALS
from firmware_py.sim.frame_encoder import page_encoders

BY_SIGNAL = {ref: name for name, ref in signals.DEFAULT_SIGNALS.items()} | EXTRA_SIGNALS
FIELDS = sorted(set(BY_SIGNAL.values()))

# One big-endian and one float signal: the kinds the bit layout leaves to cantools.
OTHER_KINDS_DBC = """VERSION ""
BU_: BMS
BO_ 100 Motorola: 8 BMS
 SG_ PackVoltage : 7|16@0+ (0.02,0) [0|1310.7] "V" BMS
 SG_ SmoothedCurrent : 23|16@0- (-0.1,0) [-3276.7|3276.8] "A" BMS
BO_ 101 Floats: 8 BMS
 SG_ SocMin : 0|32@1+ (1,0) [0|100] "%" BMS
SIG_VALTYPE_ 101 SocMin : 1;
"""


def _reference(message, page, values) -> bytes:
    """How the node encoded before the planned encoder: a signal dict through cantools."""
    data = {} if page is None else {next(s for s in message.signals if s.is_multiplexer).name: page}
    for sig in message.signals:
        if sig.is_multiplexer or (sig.multiplexer_ids and page not in sig.multiplexer_ids):
            continue
        name = BY_SIGNAL.get(f"{message.name}.{sig.name}")
        value = float(values.get(name, 0.0) if name else 0.0) / signals.UNIT_FACTORS.get(sig.unit or "", 1.0)
        lo = sig.minimum if sig.minimum is not None else value
        hi = sig.maximum if sig.maximum is not None else value
        data[sig.name] = min(hi, max(lo, value))
    return message.encode(data, strict=False)


def _pages(message):
    if not message.is_multiplexed():
        return [None]
    return sorted({i for s in message.signals for i in (s.multiplexer_ids or ())})


_ENCODERS: dict = {}


def _check_all(db, values) -> None:
    """Encoders kept across examples, each asked twice: a reused frame must be the right one too."""
    for message in db.messages:
        encoders = _ENCODERS.setdefault(id(message), page_encoders(message, BY_SIGNAL))
        assert len(encoders) == len(_pages(message))
        for encoder, page in zip(encoders, _pages(message)):
            expected = _reference(message, page, values)
            assert encoder.encode(values) == expected and encoder.encode(dict(values)) == expected, (message.name, page)


# Past every signal's range both ways (clamped), and the ordinary magnitudes of each field.
value = st.one_of(st.floats(-1e7, 1e7, allow_nan=False), st.integers(-10, 400_000), st.booleans())


@pytest.mark.parametrize("name", ["cybertruck_bms.dbc", "tesla_model3_bms.dbc"])
@settings(max_examples=300, deadline=None)
@given(values=st.fixed_dictionaries({}, optional={f: value for f in FIELDS}))
def test_bundled_dbcs_encode_exactly_as_cantools(name, values):
    _check_all(_db(name), values)


@settings(max_examples=100, deadline=None)
@given(values=st.fixed_dictionaries({}, optional={f: value for f in FIELDS}))
def test_big_endian_and_float_signals_are_left_to_cantools(values):
    _check_all(_other_kinds(), values)


_DBS: dict = {}


def _other_kinds():
    if "other" not in _DBS:
        _DBS["other"] = cantools.database.load_string(OTHER_KINDS_DBC, strict=True)
    return _DBS["other"]


def _db(name):
    if name not in _DBS:
        _DBS[name] = load_dbc(bundled_dbc(name))
    return _DBS[name]
