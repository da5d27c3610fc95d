"""`powershare-gw bms record|decode` and `sim bms`, through the real command line."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import can
import cantools
import pytest

from firmware_py.bms import captures
from firmware_py.bms.commands import stop_on_signals
from firmware_py.cli import main
from firmware_py.config import bundled_dbc

DB = cantools.database.load_file(str(bundled_dbc("cybertruck_bms.dbc")))



@contextmanager
def sending(channel: str, send_round: Callable[[can.BusABC, int], None], period_s: float = 0.002) -> Iterator[None]:
    """A peer on the `virtual` channel calling `send_round(bus, n)` every `period_s` while the block runs;
    the channel is held open meanwhile, so it lives between the peer's bus and the command's."""
    stop = threading.Event()

    def send() -> None:
        with can.Bus(interface="virtual", channel=channel) as bus:
            n = 0
            while not stop.wait(period_s):
                send_round(bus, n)
                n += 1

    sender = threading.Thread(target=send)
    with can.Bus(interface="virtual", channel=channel):
        sender.start()
        try:
            yield
        finally:
            stop.set()
            sender.join(5)

def soc_frame(pct: float, t: float) -> can.Message:
    m = DB.get_message_by_name("BmsSoc")
    return can.Message(timestamp=t, arbitration_id=m.frame_id, is_extended_id=False,
                       data=m.encode({"SocMin": pct, "SocUi": pct, "SocMax": pct, "SocAvg": pct}))


def ranges(out: str) -> dict[str, tuple[float, float]]:
    found = {}
    for label, lo, hi in re.findall(r"^#\s+(\S.*?)\s+(-?[\d.]+) \.\.\s+(-?[\d.]+)", out, re.M):
        found[label.strip()] = (float(lo), float(hi))
    return found


def test_decode_the_real_charging_capture(tesla_capture, capsys):
    path = tesla_capture("charging-to-80.txt")
    assert main(["bms", "decode", str(path)]) == 0  # ELM text picks the Model 3 DBC by itself
    out = capsys.readouterr().out
    assert "tesla_model3_bms.dbc" in out
    r = ranges(out)
    assert r["SoC min"] == (81.4, 82.2)
    assert r["voltage"] == (394.9, 403.2)
    assert r["current"] == (-101.8, 1.9)
    assert r["nominal full pack"][0] == pytest.approx(72.62)
    assert re.search(r"\b\d+ lines skipped", out) and "wrong_length" in out


def test_decode_with_explicit_dbc_name(tesla_capture, capsys):
    path = tesla_capture("drive-80.txt")
    assert main(["bms", "decode", str(path), "--dbc", "tesla_model3_bms.dbc", "--every", "5"]) == 0
    assert ranges(capsys.readouterr().out)["voltage"] == (381.1, 400.9)


@pytest.mark.parametrize("content,message", [
    ("", "empty"),
    ("\n\n   \n", "empty"),
    ("zz\n13\nqq\n", "no BMS frame"),
    ("7E8041234\n123DEADBEEF\n", "no BMS frame"),
])
def test_empty_or_garbled_log_is_bad_input(tmp_path, capsys, content, message):
    path = tmp_path / "capture.txt"
    path.write_text(content)
    assert main(["bms", "decode", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_unknown_binary_format_and_unknown_dbc_are_bad_input(tmp_path, capsys):
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(range(256)) * 4)
    assert main(["bms", "decode", str(path)]) == 2
    assert "unknown log format" in capsys.readouterr().err
    elm = tmp_path / "c.txt"
    elm.write_text("2922E832C73CC14F70D\n")
    assert main(["bms", "decode", str(elm), "--dbc", "nosuch.dbc"]) == 2
    assert "nosuch.dbc" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".log", ".asc", ".csv", ".blf"])
def test_decode_python_can_logs(tmp_path, capsys, suffix):
    path = tmp_path / f"bms{suffix}"
    with can.Logger(str(path)) as log:
        for i in range(30):
            log(soc_frame(50 + i * 0.1, 1000.0 + i * 0.1))
        log(can.Message(timestamp=1003.5, arbitration_id=0x292, data=bytes(3), is_extended_id=False))
    assert main(["bms", "decode", str(path)]) == 0
    out = capsys.readouterr().out
    assert ranges(out)["SoC min"] == (50.0, 52.9)
    assert "30 BMS frames accepted, 1 dropped (wrong_length 1)" in out


def test_record_then_decode(tmp_path, capsys):
    channel = "test_bms_record"
    out = tmp_path / "rec.log"
    def send(bus: can.BusABC, _: int) -> None:
        bus.send(soc_frame(40 + (_ % 5) * 0.1, 0))
        bus.send(can.Message(arbitration_id=0x555, data=bytes(8), is_extended_id=False))

    with sending(channel, send, period_s=0.005):
        assert main(["bms", "record", "--can-interface", "virtual", "--can-channel", channel,
                     "--duration", "0.6", "--bms-only", str(out)]) == 0
    assert "recorded" in capsys.readouterr().out
    assert main(["bms", "decode", str(out)]) == 0
    text = capsys.readouterr().out
    assert ranges(text)["SoC min"][0] >= 40.0 and "0 dropped" in text


def test_record_bms_only_takes_an_installers_dbc_that_names_its_messages_its_own_way(tmp_path, capsys):
    """`--bms-only --dbc` read the DBC through the gateway's default mapping: a DBC `check-config` accepts with
    its own [vehicle.signals] (here BmsSoc is PackSoc) was refused, blaming entries the installer never wrote."""
    dbc = tmp_path / "my-truck.dbc"
    dbc.write_text(bundled_dbc("cybertruck_bms.dbc").read_text().replace("BmsSoc", "PackSoc"))
    channel, out = "test_bms_record_own_dbc", tmp_path / "rec.log"

    def send(bus: can.BusABC, _: int) -> None:
        bus.send(soc_frame(40.0, 0))
        bus.send(can.Message(arbitration_id=0x555, data=bytes(8), is_extended_id=False))

    with sending(channel, send, period_s=0.005):
        assert main(["bms", "record", "--can-interface", "virtual", "--can-channel", channel, "--duration", "0.3",
                     "--bms-only", "--dbc", str(dbc), str(out)]) == 0, capsys.readouterr().err
    with can.LogReader(str(out)) as log:
        ids = {msg.arbitration_id for msg in log}
    assert ids == {0x292}  # the DBC's message, and nothing the DBC lacks


def test_record_to_unknown_suffix_is_bad_input(tmp_path, capsys):
    assert main(["bms", "record", "--can-interface", "virtual", "--can-channel", "x",
                 "--duration", "0.1", str(tmp_path / "rec.xyz")]) == 2
    assert "rec.xyz" in capsys.readouterr().err


def test_a_recording_bms_decode_could_not_read_back_is_refused_before_the_bus_opens(tmp_path, capsys):
    assert main(["bms", "record", "--can-interface", "virtual", "--can-channel", "x",
                 "--duration", "0.1", str(tmp_path / "rec.txt")]) == 2
    assert "cannot read it back" in capsys.readouterr().err and not (tmp_path / "rec.txt").exists()


def test_a_bad_dbc_for_bms_only_is_said_before_the_bus_or_the_file_is_opened(tmp_path, capsys):
    assert main(["bms", "record", "--can-interface", "virtual", "--can-channel", "x", "--bms-only",
                 "--dbc", "bogus", "--duration", "0.1", str(tmp_path / "rec.asc")]) == 2
    assert "bogus" in capsys.readouterr().err and not (tmp_path / "rec.asc").exists()


def test_sim_bms_bad_scenario_is_bad_input(tmp_path, capsys):
    bad = tmp_path / "s.toml"
    bad.write_text("[vehicle]\ninitial_soc_pct = 140\n")
    assert main(["sim", "bms", "--can-interface", "virtual", "--can-channel", "x", "--scenario", str(bad)]) == 2
    assert "initial_soc_pct" in capsys.readouterr().err


def test_sim_bms_runs_for_its_duration_on_a_virtual_bus(capsys):
    assert main(["sim", "bms", "--can-interface", "virtual", "--can-channel", "test_sim_bms",
                 "--duration", "0.2", "--load-w", "5000"]) == 0
    out = capsys.readouterr().out
    sent = int(re.search(r"sent (\d+) frames", out).group(1))
    assert sent >= 20  # 0x132 alone is due every 10 ms


def test_sim_bms_silences_the_message_a_scenario_names(tmp_path, capsys):
    """The message a `message_silence` fault names was dropped on the way to the node: a valid
    scenario ended in a traceback."""
    scenario = tmp_path / "silence.toml"
    scenario.write_text('[run]\nduration_s = 1\n[[fault]]\nat_s = 0.05\nkind = "message_silence"\n'
                        'message = "BmsThermal"\nduration_s = 0.1\n')
    assert main(["sim", "bms", "--can-interface", "virtual", "--can-channel", "test_sim_bms_silence",
                 "--scenario", str(scenario), "--duration", "0.3"]) == 0
    assert "sent" in capsys.readouterr().out


def test_sim_bms_refuses_a_silence_the_other_dbc_lacks(tmp_path, capsys):
    """With --dbc another DBC, a `message_silence` naming a message only the bundled DBC has
    crashed mid-run with a traceback (exit 1); it is bad input, refused before the bus opens."""
    other = tmp_path / "other.dbc"
    other.write_text(bundled_dbc("cybertruck_bms.dbc").read_text().replace("BmsThermal", "PackThermal"))
    scenario = tmp_path / "silence.toml"
    scenario.write_text('[run]\nduration_s = 1\n[[fault]]\nat_s = 0\nkind = "message_silence"\n'
                        'message = "BmsThermal"\nduration_s = 0.1\n')
    assert main(["sim", "bms", "--can-interface", "virtual", "--can-channel", "test_sim_bms_other_dbc",
                 "--scenario", str(scenario), "--dbc", str(other), "--duration", "0.3"]) == 2
    captured = capsys.readouterr()
    assert f"{scenario}: fault[0].message: 'BmsThermal' is not a message other.dbc sends" in captured.err
    assert "PackThermal" in captured.err and "Traceback" not in captured.err
    assert "sent" not in captured.out  # refused before the node ran


def test_decode_takes_dbc_and_mapping_from_a_config(tesla_capture, tmp_path, capsys):
    path = tesla_capture("drive-80.txt")
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[vehicle]\ndbc = "tesla_model3_bms.dbc"\n[vehicle.signals]\nsoc_min_pct = "BmsSoc.SocAvg"\n')
    assert main(["bms", "decode", str(path), "--config", str(cfg)]) == 0
    assert "config" in capsys.readouterr().out
    cfg.write_text('[vehicle.signals]\nsoc_minimum = "BmsSoc.SocAvg"\n')
    assert main(["bms", "decode", str(path), "--config", str(cfg)]) == 2
    assert f"{cfg}: vehicle.signals.soc_minimum: unknown field" in capsys.readouterr().err


def test_recording_onto_a_full_disk_is_one_clear_error(tmp_path, capsys):
    channel = "test_bms_record_full"
    out = tmp_path / "rec.log"
    out.symlink_to("/dev/full")  # every write fails with "No space left on device"
    with sending(channel, lambda bus, _: bus.send(soc_frame(40.0, 0)), period_s=0.001):
        assert main(["bms", "record", "--can-interface", "virtual", "--can-channel", channel,
                     "--duration", "20", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "No space left on device" in err and "Traceback" not in err


def test_recording_to_mf4_without_asammdf_names_the_package(tmp_path, capsys, monkeypatch):
    """python-can's MF4 writer needs the optional asammdf: a clear exit 2, not a NotImplementedError traceback."""
    monkeypatch.setattr(can.io.mf4, "asammdf", None)  # as on a machine without it, whether or not this one has it
    out = tmp_path / "rec.mf4"
    assert main(["bms", "record", "--can-interface", "virtual", "--can-channel", "test_bms_mf4",
                 "--duration", "0.1", str(out)]) == 2
    err = capsys.readouterr().err
    assert "rec.mf4" in err and "asammdf" in err and "Traceback" not in err
    # before the bus is opened, as the documentation says: a bus that cannot be opened is not what is said
    assert main(["bms", "record", "--can-interface", "socketcan", "--can-channel", "nosuchcan9",
                 "--duration", "0.1", str(out)]) == 2
    err = capsys.readouterr().err
    assert "asammdf" in err and "nosuchcan9" not in err, err


@pytest.fixture
def sighup_handler():
    """A Python handler on SIGHUP for the test's length, so a SIGHUP that is not caught ends in it, not
    in the test runner's death; the handler records each call."""
    calls = []
    previous = signal.signal(signal.SIGHUP, lambda *_: calls.append("hup"))
    yield calls
    signal.signal(signal.SIGHUP, previous)


def test_a_recording_stopped_by_sighup_is_closed_and_readable(tmp_path, capsys, sighup_handler):
    """SIGHUP (the SSH session dropped, the terminal closed) stops `bms record` like Ctrl-C: the writer
    is stopped, so the .blf holds what was received instead of being left empty."""
    channel = "test_bms_record_hup"
    out = tmp_path / "rec.blf"

    the_tests = signal.getsignal(signal.SIGHUP)
    hung_up: list[int] = []

    def send_then_hang_up(bus: can.BusABC, n: int) -> None:
        bus.send(soc_frame(40.0, 0))
        if n >= 20 and not hung_up and signal.getsignal(signal.SIGHUP) is not the_tests:  # the recording's own
            hung_up.append(n)
            os.kill(os.getpid(), signal.SIGHUP)

    with sending(channel, send_then_hang_up):
        code = main(["bms", "record", "--can-interface", "virtual", "--can-channel", channel,
                     "--duration", "8", str(out)])
    assert code == 0 and hung_up, "the recording never took SIGHUP for its own"
    assert sighup_handler == []
    recorded = int(re.search(r"recorded (\d+) frames", capsys.readouterr().out).group(1))
    with can.LogReader(str(out)) as log:
        assert sum(1 for _ in log) == recorded > 0


def test_sighup_is_left_alone_under_nohup():
    """Started with SIGHUP ignored (`nohup`), a recording is meant to outlive its terminal: `run`'s rule."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_recording_to_trc_counts_only_the_frames_the_file_holds(tmp_path, capsys):
    """python-can's TRC writer cannot store error, remote or CAN FD frames: they are said, not counted."""
    channel = "test_bms_record_trc"
    out = tmp_path / "rec.trc"
    def send(bus: can.BusABC, _: int) -> None:
        bus.send(can.Message(arbitration_id=0x0, is_error_frame=True))
        bus.send(can.Message(arbitration_id=0x292, is_extended_id=False, is_remote_frame=True, dlc=8))
        bus.send(soc_frame(40.0, 0))

    with sending(channel, send):
        assert main(["bms", "record", "--can-interface", "virtual", "--can-channel", channel,
                     "--duration", "0.5", str(out)]) == 0
    text = capsys.readouterr().out
    recorded, dropped = map(int, re.search(r"recorded (\d+) frames .*; (\d+) error, remote or CAN FD frames "
                                           r"not recorded: \.trc cannot store them", text).groups())
    with can.LogReader(str(out)) as log:
        assert recorded == sum(1 for _ in log) > 0
    assert 2 * recorded - 2 <= dropped <= 2 * recorded + 2


def test_a_spaced_elm_capture_decodes(tmp_path, capsys):
    """The ELM327's factory default (ATS1) puts spaces between bytes: `292 33 A7 ...`."""
    path = tmp_path / "spaced.txt"
    frames = [soc_frame(50 + i * 0.1, 0) for i in range(30)]
    path.write_text("".join(f"{m.arbitration_id:03X} {m.data.hex(' ').upper()}\n" for m in frames))
    assert captures.parse_elm_line("132 3E 99 41 00 C1 40 FF 0F") == (0x132, bytes.fromhex("3E994100C140FF0F"))
    assert captures.parse_elm_line("132 3E 9 941") is None  # spaced, but not byte by byte: garbled
    assert main(["bms", "decode", "--dbc", "cybertruck_bms.dbc", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ELM327 text" in out and "30 BMS frames accepted" in out and ranges(out)["SoC min"] == (50.0, 52.9)


def test_sniffing_a_log_reads_its_head_not_the_whole_file(tmp_path, capsys, monkeypatch):
    """A capture can be gigabytes: telling its format must not read all of it into memory."""
    huge = tmp_path / "huge.log"
    with huge.open("wb") as f:
        f.truncate(8 << 30)  # 8 GiB, sparse: no disk used, but a whole read would need 8 GiB of memory
    assert len(captures.read_head(huge)) == 16_384

    def whole_read(self):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", whole_read)
    log = tmp_path / "rec.log"
    with can.Logger(str(log)) as writer:
        for i in range(30):
            writer(soc_frame(50 + i * 0.1, 1000 + i * 0.1))
    elm = tmp_path / "elm.txt"
    elm.write_text("132 3E 99 41 00 C1 40 FF 0F\n")
    assert not captures.is_elm_capture(log) and captures.is_elm_capture(elm)
    assert main(["bms", "decode", str(log)]) == 0
    assert "30 BMS frames accepted" in capsys.readouterr().out


def test_candump_screen_output_is_refused_with_how_to_record(tmp_path, capsys):
    """`candump can0 > x.log` (no -L) saves the screen format, which carries no timestamps."""
    path = tmp_path / "x.log"
    path.write_text("  can0  292   [8]  2B 4C 50 5C 50 F2 00 10\n  can0  132   [8]  3E 99 41 00 C1 40 FF 0F\n")
    assert main(["bms", "decode", str(path)]) == 2
    err = capsys.readouterr().err
    assert "candump's screen format" in err and "candump -L" in err and "Traceback" not in err


@pytest.mark.parametrize("existing", [b"date Mon Jan 1 00:00:00 2024\nbase hex timestamps absolute\n 0.1 1 132 Rx d 2 3E 99\n",
                                      None])
def test_a_bus_that_cannot_be_opened_leaves_the_file_as_it_was(tmp_path, capsys, existing):
    """The bus is opened before the file: an existing recording is not truncated, and no header-only file is left."""
    out = tmp_path / "precious.asc"
    if existing is not None:
        out.write_bytes(existing)
    assert main(["bms", "record", "--can-interface", "remote", "--can-channel", "ws://127.0.0.1:1/",
                 "--duration", "1", str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    if existing is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == existing


def test_decoding_a_folder_says_it_is_a_folder(tmp_path, capsys):
    assert main(["bms", "decode", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a log file" in err and "no such" not in err


def test_an_elm_capture_with_a_garbled_byte_near_its_start_is_decoded(tmp_path, capsys):
    """Format detection decodes with replacement as the reader does: one non-ASCII byte is a skipped line."""
    frames = [soc_frame(50 + i * 0.1, 0) for i in range(30)]
    path = tmp_path / "capture.txt"
    path.write_bytes(b"132 \xff9 0F\n" + "".join(f"{m.arbitration_id:03X}{m.data.hex().upper()}\n"
                                                  for m in frames).encode())
    assert main(["bms", "decode", "--dbc", "cybertruck_bms.dbc", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ELM327 text" in out and "30 BMS frames accepted" in out and " 1 lines skipped" in out


@pytest.mark.parametrize("name", ["rec.blf.gz", "rec.db.gz", "rec.mf4.gz", "rec.txt", "rec.gz"])
def test_a_record_format_that_is_refused_is_not_in_the_list_of_accepted_ones(tmp_path, capsys, name):
    """The list in the refusal is what record accepts: no .txt, no .blf.gz or .db.gz; and the docs say the same."""
    assert main(["bms", "record", "--can-interface", "virtual", "--can-channel", "test_bms_fmt",
                 "--duration", "0.1", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    listed = re.findall(r"\.\w+(?:\.gz)?", err.split(": use ")[-1])
    assert listed == [".asc", ".blf", ".csv", ".db", ".log", ".mf4", ".trc", ".asc.gz", ".csv.gz", ".log.gz", ".trc.gz"]
    assert not (tmp_path / name).exists()
    docs = (Path(__file__).parent.parent / "docs" / "command-line.md").read_text()
    assert "optionally `.gz`" not in docs and "`.asc.gz`, `.csv.gz`, `.log.gz`, `.trc.gz`" in docs


def test_every_gzipped_format_record_lists_is_written(tmp_path, capsys):
    for name in ["rec.asc.gz", "rec.csv.gz", "rec.log.gz", "rec.trc.gz"]:
        assert main(["bms", "record", "--can-interface", "virtual", "--can-channel", "test_bms_gz",
                     "--duration", "0.05", str(tmp_path / name)]) == 0, name


def test_an_elm_capture_is_read_as_a_stream_with_bounded_memory(tmp_path, capsys, monkeypatch):
    """Frames are yielded as read, the line period comes from a bounded prefix, skipped lines are counted
    with a few short examples kept, and a line without newline is never read whole."""
    frames = [soc_frame(50 + (i % 30) * 0.1, 0) for i in range(200)]
    frame_lines = [f"{m.arbitration_id:03X}{m.data.hex().upper()}\n" for m in frames]
    path = tmp_path / "capture.txt"
    path.write_text("".join(frame_lines) + ("Z" * 1000 + "\n") * 500 + "".join(frame_lines) + "132" + "A" * 300_000)
    seen: list[str] = []
    parse = captures.parse_elm_line
    monkeypatch.setattr(captures, "parse_elm_line", lambda text: seen.append(text) or parse(text))
    monkeypatch.setattr(captures, "PERIOD_PREFIX_FRAMES", 20)
    capture = captures.read_elm(path)
    assert len(seen) == 0  # opening reads nothing
    capture.line_period(lambda fid: 0.1 if fid == 0x132 else None)
    assert len(seen) <= 21  # the estimate reads a bounded prefix
    seen.clear()
    messages = capture.messages(0.001)
    next(messages)
    assert len(seen) == 1  # yielded as read, not after the whole file
    assert sum(1 for _ in messages) == 399 and capture.frame_count == 400
    assert capture.skipped == 501 and len(capture.examples) <= 3
    assert all(len(text) <= captures.EXAMPLE_CHARS for _, text in capture.examples)
    assert max(len(text) for text in seen) <= captures.MAX_LINE  # the 300 kB line was not read whole
    monkeypatch.undo()
    assert main(["bms", "decode", "--dbc", "cybertruck_bms.dbc", str(path)]) == 0
    assert "400 frames read" in capsys.readouterr().out


def test_a_bad_line_in_a_candump_log_is_counted_and_skipped_with_its_line_number(tmp_path, capsys):
    lines = [f"({i * 0.01:.6f}) can0 {m.arbitration_id:03X}#{m.data.hex().upper()}\n".encode()
             for i, m in enumerate(soc_frame(50 + i * 0.1, 0) for i in range(30))]
    path = tmp_path / "bad.log"
    path.write_bytes(b"".join(lines[:5]) + b"(garbage line\n" + b"".join(lines[5:10]) + b"(1.0) can0 132#ZZ\n"
                     + b"(1.1) can0 132#3E\xff9\n" + b"".join(lines[10:]))
    assert main(["bms", "decode", "--dbc", "cybertruck_bms.dbc", str(path)]) == 0
    out = capsys.readouterr().out
    assert "30 frames read" in out and "3 lines skipped (not whole frames, the first at line 6)" in out


def test_candump_screen_output_with_timestamps_is_refused(tmp_path, capsys):
    for stamp in ["(1700000000.123456)", "(000.012345)", "(2023-11-14 22:13:20.123456)"]:
        path = tmp_path / "x.log"
        path.write_text("".join(f"{stamp}  can0  132   [8]  57 9D 41 00 C1 40 FF 0F\n" for _ in range(20)))
        assert main(["bms", "decode", str(path)]) == 2
        assert "candump's screen format" in capsys.readouterr().err, stamp


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_an_elm_capture_reads_whatever_its_lines_end_with(tmp_path, end):
    """An ELM327 ends its lines with a bare carriage return: read as bytes split on LF alone, such a capture
    was one overlong line and decoded to nothing."""
    from firmware_py.bms.captures import read_elm

    capture = tmp_path / "elm.txt"
    capture.write_bytes(end.join(["132 01 02 03 04 05 06 07 08", "3D6 10 20 30 40 50 60 70 80"] * 50).encode() + b"\r")
    read = read_elm(capture)
    assert len(list(read.frames())) == 100 and read.skipped == 0


def test_a_capture_whose_timestamps_go_back_is_decoded_afresh_from_there(tmp_path, capsys):
    """Two logs joined end to end (or a logger whose clock was reset): after the jump back no row came until
    the old time was reached again, and a value fed only before the jump looked fresh all that while."""
    power = DB.get_message_by_name("BmsPowerAvailable")
    limits = power.encode({"MaxRegenPower": 50, "MaxDischargePower": 120})
    lines = [f"({1000 + i * 0.1:.6f}) can0 {power.frame_id:03X}#{limits.hex().upper()}\n" for i in range(30)]
    lines += [f"({t:.6f}) can0 {m.arbitration_id:03X}#{m.data.hex().upper()}\n"
              for t, m in ((t, soc_frame(50, t)) for t in (500 + i * 0.1 for i in range(100)))]
    path = tmp_path / "joined.log"
    path.write_text("".join(lines))
    assert main(["bms", "decode", "--dbc", "cybertruck_bms.dbc", str(path)]) == 0
    out = capsys.readouterr().out
    assert "# frame 31: the timestamps go back 502.900 s; decoded afresh from here" in out
    after = out.split("decoded afresh from here")[1].split("# ranges")[0].strip().splitlines()[1:]
    assert [row.split()[0] for row in after] == [f"{t:.2f}" for t in range(10)]  # a row a second from the jump
    assert all(row.split()[5] == "-" for row in after)  # the discharge limit fed before it is not shown as now's
