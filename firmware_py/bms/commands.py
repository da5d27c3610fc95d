"""`powershare-gw bms record|decode`: capture BMS traffic and read it back, for bench and installers."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import can

from firmware_py import config as config_mod
from firmware_py.arguments import number
from firmware_py.bms import captures
from firmware_py.bms.bus import open_bus, shutdown_quietly
from firmware_py.bms.reader import BmsReader, id_filters, standard_ids
from firmware_py.core.types import BmsSnapshot
from firmware_py.errors import InputError
from firmware_py.tasks import stop_signals

DEFAULT_DBC = "cybertruck_bms.dbc"
log = logging.getLogger(__name__)

CAN_FLAGS = "--can-interface {0.can_interface} --can-channel {0.can_channel}"
ELM_DBC = "tesla_model3_bms.dbc"
RANGE_FIELDS = (("soc_min_pct", "SoC min", "%", 1), ("pack_voltage_v", "voltage", "V", 1),
                ("pack_current_a", "current", "A", 1), ("max_discharge_w", "max discharge", "kW", 1e-3),
                ("max_charge_w", "max charge", "kW", 1e-3), ("nominal_full_wh", "nominal full pack", "kWh", 1e-3))

DECODE_HELP = f"""\
Decode a CAN log into BMS snapshots: a row every --every seconds of log time, the range of
the main values, and how many frames were dropped (by reason) and lines skipped.
LOG is any format python-can reads ({', '.join(sorted(can.io.player.MESSAGE_READERS))}) or an
ELM327 hex text capture (one frame per line, 'III' + data bytes, spaced or not), detected by content.
DBC choice: --dbc, else the config's [vehicle] dbc and signals (--config), else {DEFAULT_DBC}
for python-can logs but {ELM_DBC} for ELM text: ELM captures come from cars whose bus is
public (the Model 3 layout), while the Cybertruck bus is not public, so no real ELM capture of
it exists. ELM lines carry no time: times are estimated assuming the busiest BMS message kept
its DBC period, and freshness and SoC-jump checks run on that estimate.
A log in which no BMS frame decodes (empty, garbled, another vehicle) is bad input: exit 2."""


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM, SIGINT or SIGHUP, so long-running commands stop cleanly, not mid-write.

    SIGHUP is how a `bms record` over SSH usually ends (the session dropped, the terminal closed):
    its default action would kill the process before the writer's last flush. The rule is `run`'s,
    so SIGHUP is left alone when it was ignored at start (`nohup`)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in stop_signals()}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resolve_dbc(given: str | None, elm: bool) -> tuple[Path, str]:
    """The DBC to decode with, and a note saying why it was chosen."""
    if given is None:
        name = ELM_DBC if elm else DEFAULT_DBC
        why = "auto: ELM text capture, public Model 3 layout" if elm else "default"
        return config_mod.bundled_dbc(name), why
    path = Path(given)
    if path.exists():
        return path, "--dbc"
    bundled = config_mod.bundled_dbc(given)
    if not bundled.exists():
        raise InputError(f"--dbc {given}: neither a file nor a bundled DBC ({DEFAULT_DBC}, {ELM_DBC})")
    return bundled, "--dbc"


# -- decode -------------------------------------------------------------------

def _fmt(value: float | int | bool | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}"


ROW_HEAD = f"{'t_s':>8} {'soc_min%':>8} {'soc_ui%':>7} {'pack_V':>7} {'pack_A':>7} {'dis_kW':>7} " \
           f"{'chg_kW':>7} {'T_min':>6} {'T_max':>6} {'bms':>4} {'cont':>4}  stale"


def _row(t: float, s: BmsSnapshot) -> str:
    stale = ",".join(sorted(s.stale)) or "-"
    return (f"{t:8.2f} {_fmt(s.soc_min_pct):>8} {_fmt(s.soc_ui_pct):>7} {_fmt(s.pack_voltage_v):>7} "
            f"{_fmt(s.pack_current_a):>7} {_fmt(s.max_discharge_w, 1e-3):>7} {_fmt(s.max_charge_w, 1e-3):>7} "
            f"{_fmt(s.min_temp_c):>6} {_fmt(s.max_temp_c):>6} {_fmt(s.bms_state, digits=0):>4} "
            f"{_fmt(s.contactor_state, digits=0):>4}  {stale}")


class _Ranges:
    """Min and max of the main fields over every snapshot the reader produced."""

    def __init__(self) -> None:
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}

    def add(self, s: BmsSnapshot) -> None:
        for name, *_ in RANGE_FIELDS:
            value = getattr(s, name)
            if value is not None and name not in s.stale:
                self.lo[name] = min(self.lo.get(name, value), value)
                self.hi[name] = max(self.hi.get(name, value), value)

    def lines(self) -> list[str]:
        out = []
        for name, label, unit, scale in RANGE_FIELDS:
            if name in self.lo:
                digits = 2 if unit == "kWh" else 1
                out.append(f"#   {label:<18} {self.lo[name] * scale:9.{digits}f} .. "
                           f"{self.hi[name] * scale:9.{digits}f} {unit}")
        return out


BACKWARDS_S = 0.001
"""How far a capture's timestamp may go back before the rest is read as a new run of the log: frames merged
from two interfaces may be a little out of order; a clock that went back is not."""


def decode_messages(reader: BmsReader, messages: Iterable[can.Message], every_s: float,
                    source: Path) -> tuple[int, _Ranges, list[str]]:
    """Feed `messages` to `reader`; the frame count, value ranges and printable rows.

    Where the timestamps go back, a comment row says so and decoding starts afresh (`BmsReader.forget`),
    its rows' times from there: read on, no row came until the old time was reached again, and the
    fields fed before looked fresh all that while."""
    frames, ranges, rows = 0, _Ranges(), []
    start = next_row = latest = None
    try:
        for msg in messages:
            frames += 1
            if latest is not None and msg.timestamp < latest - BACKWARDS_S:
                rows.append(f"# frame {frames}: the timestamps go back {latest - msg.timestamp:.3f} s; "
                            "decoded afresh from here, its times from its first frame")
                reader.forget()
                start = latest = None
            if start is None:
                start = next_row = msg.timestamp
            latest = msg.timestamp if latest is None else max(latest, msg.timestamp)
            believed = reader.accepted
            reader.on_message(msg, now=msg.timestamp)
            if reader.accepted == believed:
                continue  # not BMS, or dropped (counted by the reader)
            snapshot = reader.snapshot(msg.timestamp)  # every value, not only the ones the core decides on
            ranges.add(snapshot)
            if msg.timestamp >= next_row:
                rows.append(_row(msg.timestamp - start, snapshot))
                next_row = msg.timestamp + every_s
    except Exception as err:  # a python-can reader meeting a corrupt record
        raise InputError(f"{source}: unreadable after {frames} frames: {err}") from None
    return frames, ranges, rows


def _decode(args: argparse.Namespace) -> int:
    path = Path(args.log)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a log file")
    if not path.is_file():
        raise InputError(f"{path}: no such log file")
    if not captures.read_head(path).strip():
        raise InputError(f"{path}: the log is empty")
    captures.refuse_candump_screen(path)
    elm = captures.is_elm_capture(path)
    mapping, source = None, "vehicle.signals"
    if args.config:
        cfg = config_mod.load(args.config)
        dbc, why = cfg.dbc_path(), f"config {cfg.source}"
        mapping, source = cfg.vehicle.signals, f"{cfg.source}: vehicle.signals"
    if args.dbc or not args.config:
        dbc, why = resolve_dbc(args.dbc, elm)
    reader = BmsReader(dbc, clock=lambda: 0.0, mapping=mapping, source=source)
    tally: captures.ElmCapture | captures.CandumpLog | None = None  # what counts the lines it skips
    if elm:
        tally = captures.read_elm(path)
        ids = reader.frame_ids
        line_s = tally.line_period(lambda fid: reader.period_s(fid) if fid in ids else None)
        messages: Iterable[can.Message] = tally.messages(line_s)
        kind = f"ELM327 text, no timestamps: {line_s * 1e3:.2f} ms per frame estimated"
    elif captures.is_candump_log(path):
        tally = captures.CandumpLog(path)
        messages = tally.messages()
        kind = f"python-can {path.suffix} log"
    else:
        messages = captures.read_python_can_log(path)
        kind = f"python-can {path.suffix} log"
    frames, ranges, rows = decode_messages(reader, messages, args.every, path)
    skipped, first_bad = (tally.skipped, tally.first_bad) if tally else (0, None)
    dropped = sum(reader.dropped.values())
    reasons = ", ".join(f"{r} {n}" for r, n in reader.dropped.most_common()) or "none"
    summary = (f"{frames} frames read, {reader.accepted} BMS frames accepted, {dropped} dropped "
               f"({reasons}), {skipped} lines skipped (not whole frames"
               + (f", the first at line {first_bad})" if first_bad else ")"))
    if reader.accepted == 0:
        raise InputError(f"{path}: no BMS frame could be decoded with {dbc.name}: {summary}")
    print(f"# {path.name} ({kind}), DBC {dbc.name} ({why})")
    print(ROW_HEAD)
    print("\n".join(rows))
    print("# ranges over the log:")
    print("\n".join(ranges.lines()))
    print(f"# {summary}")
    return 0


# -- record -------------------------------------------------------------------

def _record(args: argparse.Namespace) -> int:
    out = Path(args.file)
    _check_readable_back(out)
    # Every message of the DBC, not the gateway's default mapping: an installer's DBC names its messages its
    # own way (its [vehicle.signals] says which is which; record has no configuration). A bad --dbc is said
    # before the bus or the file is opened.
    filters = id_filters(standard_ids(resolve_dbc(args.dbc, elm=False)[0])) if args.bms_only else None
    bus = open_bus(args.can_interface, args.can_channel, blame=CAN_FLAGS.format(args))
    try:
        writer = _open_writer(out)  # after the bus: a bus that cannot be opened leaves FILE as it was
    except BaseException:
        shutdown_quietly(bus, log)
        raise
    frames, unstorable = 0, 0
    storable = _storable_in(out)
    if filters is not None:
        bus.set_filters(filters)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    failure: OSError | None = None
    lost: Exception | None = None
    try:
        with stop_on_signals() as stop:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                try:
                    msg = bus.recv(timeout=0.1)
                except Exception as err:  # noqa: BLE001 - an adapter unplugged, a CAN server gone: each its own error
                    lost = err
                    break
                if msg is None:
                    continue
                if storable(msg):
                    writer(msg)
                    frames += 1
                else:
                    unstorable += 1
    except OSError as err:  # the disk filled up (or went away) under the recording
        failure = err
    finally:
        shutdown_quietly(bus, log)
        try:
            writer.stop()
        except OSError as err:  # the last flush meets the same full disk
            failure = failure or err
    if failure is not None:
        raise InputError(f"{out}: cannot write after {frames} frames: {failure.strerror or failure}; "
                         "what was written before is kept")
    if lost is not None:
        raise InputError(f"{CAN_FLAGS.format(args)}: the bus failed after {frames} frames: "
                         f"{lost or type(lost).__name__}; the {frames} frames before it are kept in {out}")
    not_stored = f"; {unstorable} error, remote or CAN FD frames not recorded: {_format_suffix(out)} cannot store them" \
        if unstorable else ""
    print(f"# recorded {frames} frames to {out}{not_stored}")
    return 0


def _open_writer(out: Path) -> can.io.generic.MessageWriter:
    """python-can's writer for `out`; a start that fails leaves no file where there was none."""
    existed = out.exists() or out.is_symlink()
    try:
        return _python_can_writer(out)
    except BaseException:
        if not existed:
            out.unlink(missing_ok=True)
        raise


def _python_can_writer(out: Path) -> can.io.generic.MessageWriter:
    try:
        return can.Logger(str(out))
    except NotImplementedError as err:  # python-can's optional writers: .mf4 needs asammdf
        raise InputError(f"{out}: python-can cannot write {_format_suffix(out)} without an optional package: "
                         f"{_missing_package(out, err)}") from None
    except ValueError as err:
        raise InputError(f"{out}: {err} (bms record writes {record_formats_text()})") from None
    except OSError as err:
        raise InputError(f"{out}: cannot write: {err.strerror or err}") from None


def _missing_package(out: Path, err: NotImplementedError) -> str:
    """What to install. python-can names it for .mf4 ("The asammdf package was not found..."), but
    the package is named here too should a python-can release word it otherwise."""
    detail = str(err) or type(err).__name__
    if _format_suffix(out) == ".mf4" and "asammdf" not in detail:
        detail += " (.mf4 needs asammdf: pip install asammdf)"
    return detail


def _storable_in(out: Path) -> Callable[[can.Message], bool]:
    """Which frames the writer for `out` keeps. python-can's TRC writer skips error, remote and
    CAN FD frames (with a warning each), so counting them as recorded would overstate the file."""
    suffix = _format_suffix(out)
    if suffix == ".trc":
        return lambda msg: not (msg.is_error_frame or msg.is_remote_frame or msg.is_fd)
    return lambda msg: True


def _format_suffix(out: Path) -> str:
    """The suffix that picks python-can's writer: `.asc` for both `x.asc` and `x.asc.gz`."""
    return (out.suffixes[-2] if out.suffix == ".gz" and len(out.suffixes) > 1 else out.suffix).lower()


def _record_formats() -> tuple[list[str], list[str]]:
    """What `bms record` writes: the suffixes python-can both writes and reads back (for `bms decode`),
    and those of them it can also gzip (its text writers; .blf, .db and .mf4 cannot be)."""
    writers = can.io.logger.MESSAGE_WRITERS
    plain = sorted(set(writers) & set(can.io.player.MESSAGE_READERS))
    gzipped = [s for s in plain if issubclass(writers[s], can.io.generic.TextIOMessageWriter)]
    return plain, gzipped


def record_formats_text() -> str:
    """The accepted FILE suffixes in words, the one list the help and every refusal give."""
    plain, gzipped = _record_formats()
    return f"{', '.join(plain)}, or {', '.join(s + '.gz' for s in gzipped)}"


def _check_readable_back(out: Path) -> None:
    """A recording is for `bms decode` (or a replay) later: only formats python-can both writes and reads
    back, gzipped only where python-can can gzip them; said before the bus or the file is opened."""
    suffix = _format_suffix(out)
    plain, gzipped = _record_formats()
    gz = out.suffix.lower() == ".gz"
    if suffix in can.io.logger.MESSAGE_WRITERS and suffix not in can.io.player.MESSAGE_READERS:
        raise InputError(f"{out}: python-can writes {suffix} but cannot read it back, so bms decode could not: "
                         f"use {record_formats_text()}")
    if suffix not in plain or (gz and (suffix not in gzipped or len(out.suffixes) < 2)):
        what = f"{suffix}.gz" if gz and suffix != ".gz" else suffix or "no suffix"
        raise InputError(f"{out}: bms record cannot write {what}: use {record_formats_text()}")
    if suffix == ".mf4" and not _mf4_writable():  # found only once the bus was open, a bad bus said first
        raise InputError(f"{out}: python-can cannot write .mf4 without an optional package "
                         "(.mf4 needs asammdf: pip install asammdf)")


def _mf4_writable() -> bool:
    """Whether python-can's MF4 writer has its optional asammdf (python-can keeps None where it is missing)."""
    import can.io.mf4

    if hasattr(can.io.mf4, "asammdf"):
        return can.io.mf4.asammdf is not None
    return importlib.util.find_spec("asammdf") is not None


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bms record` and `bms decode`."""
    p = sub.add_parser("bms", help="record and decode BMS CAN traffic")
    p.set_defaults(handler=lambda args: p.print_help() or 0)
    parts = p.add_subparsers(dest="bms_command", metavar="ACTION")

    rec = parts.add_parser("record", help="record CAN traffic to a python-can log (format by suffix)",
                           description="Record CAN traffic until --duration or Ctrl-C/SIGTERM/SIGHUP (not "
                                       "SIGHUP under nohup). The "
                                       "writer is chosen by FILE's suffix: "
                                       + record_formats_text() + " (what python-can "
                                       "can read back for `bms decode`).")
    rec.add_argument("--can-interface", required=True, help="python-can interface (socketcan, virtual, remote, ...)")
    rec.add_argument("--can-channel", required=True, help="channel, e.g. can0 or ws://127.0.0.1:54701/")
    rec.add_argument("--duration", type=number(0, 30 * 86_400, above=True), default=None,
                     help="seconds to record (default: until stopped)")
    rec.add_argument("--bms-only", action="store_true", help="record only the BMS ids of the DBC")
    rec.add_argument("--dbc", default=None, help=f"DBC for --bms-only (bundled name or path; default {DEFAULT_DBC})")
    rec.add_argument("file", help="output log file")
    rec.set_defaults(handler=_record)

    dec = parts.add_parser("decode", help="print decoded BMS snapshots from a CAN log",
                           description=DECODE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    dec.add_argument("log", help="python-can log or ELM327 text capture")
    dec.add_argument("--dbc", default=None, help="bundled DBC name or path (see above for the default)")
    dec.add_argument("--config", default=None, help="take the DBC and signal mapping from this gateway config")
    dec.add_argument("--every", type=number(0, 86_400), default=1.0,
                     help="seconds of log time between printed rows (default 1)")
    dec.set_defaults(handler=_decode)
