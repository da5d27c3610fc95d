"""Recorded CAN traffic: python-can logs of any format, and ELM327 text captures.

An ELM327 adapter in monitor mode prints one frame per line as hex (`III` then
the data bytes, separated by spaces unless told ATS0) with no timestamps, and truncates or garbles some lines. Those
lines are counted and skipped, never fatal, and times are estimated: frames are
assumed evenly spaced so that the busiest BMS message kept its DBC period.
"""

from __future__ import annotations

import io
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import can

from firmware_py.errors import InputError

ELM_SNIFF_LINES = 50
SNIFF_BYTES = 16_384
_HEX = frozenset(string.hexdigits)
MAX_CLASSIC_DATA = 8


PERIOD_PREFIX_FRAMES = 100_000  # the line period is estimated from this many frames at most
MAX_LINE = 256  # an ELM line is at most 3 + 2 * 8 hex digits and 8 spaces; longer is garbled
SKIPPED_EXAMPLES = 3
EXAMPLE_CHARS = 60


@dataclass
class ElmCapture:
    """An ELM text capture read as a stream: frames are yielded as read, never held all at once.

    `skipped` counts the lines that were not whole frames; `examples` keeps the first few of them
    (line number, text cut to EXAMPLE_CHARS); `frame_count` counts the frames `messages` yielded.
    """

    path: Path
    skipped: int = 0
    examples: list[tuple[int, str]] = field(default_factory=list)
    frame_count: int = 0

    def frames(self, limit: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(id, data) of each whole frame, at most `limit`; counts the skipped lines on a full pass."""
        counting = limit is None
        if counting:
            self.skipped, self.examples = 0, []
        taken = 0
        for number, text in _capped_lines(self.path):
            if limit is not None and taken >= limit:
                return
            frame = parse_elm_line(text)
            if frame is None:
                if counting:
                    self.skipped += 1
                    if len(self.examples) < SKIPPED_EXAMPLES:
                        self.examples.append((number, text[:EXAMPLE_CHARS]))
                continue
            taken += 1
            yield frame

    @property
    def first_bad(self) -> int | None:
        """The line number of the first line skipped (None: none)."""
        return self.examples[0][0] if self.examples else None

    def messages(self, line_period_s: float) -> Iterator[can.Message]:
        self.frame_count = 0
        for index, (frame_id, data) in enumerate(self.frames()):
            self.frame_count = index + 1
            yield can.Message(timestamp=index * line_period_s, arbitration_id=frame_id,
                              data=data, is_extended_id=False)

    def line_period(self, period_of: Callable[[int], float | None]) -> float:
        """Seconds between frames, so that the most frequent known id kept its period.

        Estimated over the first PERIOD_PREFIX_FRAMES frames (a bounded read, whatever the file's
        size). `period_of(frame_id)` gives a DBC period or None for ids the DBC does not know.
        Falls back to 1 ms per frame when no known id is present.
        """
        counts: dict[int, int] = {}
        total = 0
        for frame_id, _ in self.frames(limit=PERIOD_PREFIX_FRAMES):
            total += 1
            if period_of(frame_id) is not None:
                counts[frame_id] = counts.get(frame_id, 0) + 1
        if not counts or not total:
            return 0.001
        busiest = max(counts, key=counts.__getitem__)
        return float(period_of(busiest)) * counts[busiest] / total


def _capped_lines(path: Path, cap: int = MAX_LINE) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of each non-empty line, read at most `cap` characters at a time: a
    longer line (no newline for megabytes) yields its first `cap` and the rest is passed over. Lines end
    as an ELM327 ends them (a bare carriage return) or as a file does (LF, CRLF): universal newlines."""
    with _open_binary(path) as raw, io.TextIOWrapper(raw, encoding="ascii", errors="replace", newline=None) as file:
        number = 0
        while True:
            line = file.readline(cap)
            if not line:
                return
            number += 1
            rest = line
            while rest and not rest.endswith("\n"):  # an overlong line's tail, a chunk at a time
                rest = file.readline(1 << 16)
            text = line.strip()
            if text:
                yield number, text


def parse_elm_line(text: str) -> tuple[int, bytes] | None:
    """(id, data) for a whole 11-bit frame line, None for a truncated or garbled one.

    Both of the ELM327's forms: bare (`1323E99`, ATS0) and spaced (`132 3E 99`, the factory
    default ATS1). A spaced line must be spaced throughout: a 3-digit id, then 2-digit bytes.
    """
    tokens = text.split()
    if len(tokens) > 1:
        if len(tokens[0]) != 3 or any(len(t) != 2 for t in tokens[1:]):
            return None
        text = "".join(tokens)
    if len(text) < 3 or not _HEX.issuperset(text) or (len(text) - 3) % 2:
        return None
    data = bytes.fromhex(text[3:])
    if len(data) > MAX_CLASSIC_DATA:
        return None
    return int(text[:3], 16), data


def read_elm(path: Path) -> ElmCapture:
    """The capture at `path`, to be read as a stream (checked readable now)."""
    _open_binary(path).close()
    return ElmCapture(path)


def _open_binary(path: Path):
    try:
        return path.open("rb")
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None


def read_head(path: Path, size: int = SNIFF_BYTES) -> bytes:
    """The first `size` bytes of `path`: enough to tell its format, without reading a
    multi-gigabyte capture into memory."""
    try:
        with path.open("rb") as file:
            return file.read(size)
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None


_TEXT_CONTROLS = frozenset(b"\t\n\r\f\v")


def _head_lines(path: Path) -> list[str] | None:
    """The first non-empty lines of `path`, None when its head is not text.

    Decoded with replacement, as the ELM reader reads: a few garbled bytes (a capture's noise)
    leave it text, and their lines are counted and skipped later. A head with more than 1 byte in
    20 outside printable ASCII is binary."""
    head = read_head(path)
    odd = sum(1 for b in head if b > 0x7E or (b < 0x20 and b not in _TEXT_CONTROLS))
    if odd * 20 > len(head):
        return None
    text = head.decode("ascii", errors="replace")
    return [s.strip() for s in text.splitlines() if s.strip()][:ELM_SNIFF_LINES]


def is_elm_text(path: Path) -> bool:
    """True when the first non-empty lines are mostly hex, bare or spaced (what an ELM327 prints).

    python-can's own text formats (candump .log, .asc, .csv, .trc) all carry
    timestamps, separators or headers, so they never look like this.
    """
    lines = _head_lines(path)
    if not lines:
        return False
    hexish = sum(1 for s in lines if _HEX.issuperset(s.replace(" ", "")))
    return hexish >= 0.8 * len(lines)


# candump's screen format, with or without a timestamp (-ta, -tA, -tz, -td: `(1700000000.123456)  can0  132  [8]  ...`,
# `(2023-11-14 22:13:20.123456)  can0 ...`)
_CANDUMP_SCREEN = re.compile(r"^(?:\([^)]*\)\s+)?\S+\s+[0-9A-Fa-f]{3,8}\s+\[\d+\]")


def refuse_candump_screen(path: Path) -> None:
    """`candump can0 > x.log` saves candump's screen format (`can0  132   [8]  3E 99 ...`),
    which python-can's .log reader fails on with a bare "too many values to unpack"."""
    lines = _head_lines(path)
    if lines and sum(1 for s in lines if _CANDUMP_SCREEN.match(s)) >= 0.8 * len(lines):
        raise InputError(f"{path}: looks like candump's screen format (`candump can0 > file`), which "
                         "carries no timestamps and no reader takes: record with `candump -L can0 > file.log` "
                         "or `powershare-gw bms record`")


def is_elm_capture(path: Path) -> bool:
    """Whether to read `path` as ELM327 text rather than with python-can.

    Bare-hex content wins over the suffix (a capture saved as .log is still ELM);
    otherwise a suffix python-can reads goes to python-can, and any other text
    file is taken as an ELM capture so its garbled lines are counted, not refused.
    """
    if is_elm_text(path):
        return True
    if _python_can_suffix(path):
        return False
    if _head_lines(path) is None:
        raise InputError(f"{path}: unknown log format (python-can reads "
                         f"{', '.join(sorted(can.io.player.MESSAGE_READERS))}; "
                         "or give an ELM327 hex text capture)")
    return True


def _python_can_suffix(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in can.io.player.MESSAGE_READERS


@dataclass
class CandumpLog:
    """A candump -L `.log` (optionally .gz) read line by line with python-can's own parser, so that a
    truncated or garbled line is counted and skipped (`skipped`, `first_bad` its line number), not fatal."""

    path: Path
    skipped: int = 0
    first_bad: int | None = None

    def messages(self) -> Iterator[can.Message]:
        import gzip
        import io

        self.skipped, self.first_bad = 0, None
        try:
            raw = gzip.open(self.path, "rb") if self.path.suffix.lower() == ".gz" else self.path.open("rb")
        except OSError as err:
            raise InputError(f"{self.path}: cannot read: {err.strerror or err}") from None
        parser = can.io.canutils.CanutilsLogReader(io.StringIO(""))
        with raw, io.TextIOWrapper(raw, encoding="ascii", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                parser.file = io.StringIO(line)
                try:
                    parsed = list(parser)
                except Exception:  # noqa: BLE001 - python-can's parser says a bad line with whatever it met
                    self.skipped += 1
                    self.first_bad = self.first_bad or number
                    continue
                yield from parsed


def is_candump_log(path: Path) -> bool:
    return _format_suffix_of(path) == ".log"


def _format_suffix_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def read_python_can_log(path: Path) -> Iterator[can.Message]:
    """Messages of any log format python-can reads, chosen by the file's suffix."""
    try:
        reader = can.LogReader(str(path))
    except ValueError as err:
        readable = ", ".join(sorted(can.io.player.MESSAGE_READERS))
        raise InputError(f"{path}: {err} (python-can reads {readable}; "
                         "or give an ELM327 hex text capture)") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    with reader:
        yield from reader
