"""`powershare-gw bench` runs its benchmarks end to end and writes the figures under their promised names.

Speed is what the benchmarks measure, never what a test asserts: these tests run each
real-time benchmark with a handful of samples and check only that it completed,
measured what it says, and wrote the JSON a CI job or an installer's script reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from firmware_py.cli import main
from firmware_py.sim import bench, process_bench, scenario
from firmware_py.sim.measuring import BenchmarkFailed

@pytest.mark.slow  # real-time rigs and a separate-process gateway: seconds each
def test_reaction_dispatch_and_start_write_their_headline_figures(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "reaction", "dispatch", "start", "--samples", "5", "--steady-seconds", "0.5",
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for layout in ("reaction_ms", "reaction_one_process_ms"):
        for name in ("idle", "loaded", "floor"):
            assert set(figures[layout][name]) == {"p50", "p99", "max"}
            assert 0 < figures[layout][name]["p50"] <= figures[layout][name]["max"]
    # The load really ran beside the samples, in its own processes.
    assert min(figures["details"]["reaction_loaded"]["load"].values()) > 0
    assert 0 < figures["dispatch_ms"]["p50"] <= figures["dispatch_ms"]["max"]
    assert figures["start_s"] > 0 and figures["rss_mb"] > 0 and figures["fds"] > 0
    assert figures["details"]["processes"]["ready_with_fresh_data"] is True
    loaded = figures["details"]["reaction_loaded"]["what"]
    assert "DER server read" in loaded and "status API" in loaded
    assert {"cpu", "cores", "python", "pymodbus"} <= set(figures["machine"])
    assert figures["sim_speed_x"] is None and figures["bus_cpu_pct"] is None  # not asked for


def test_a_gateway_that_exits_while_starting_is_said_with_its_exit_and_its_own_words(tmp_path):
    """The bench waited its whole 30 s bound for READY from a gateway long gone, then said only TimeoutError."""
    async def start() -> None:
        hardware = process_bench.Hardware(tmp_path)
        try:
            await hardware.start_gateway('[inverter]\nport = "not a number"\n')
        finally:
            hardware.stop()

    with pytest.raises(BenchmarkFailed) as failed:
        asyncio.run(start())
    assert "the gateway exited with 2" in str(failed.value)
    assert "inverter.port: expected an integer, got 'not a number'" in str(failed.value)


def test_a_benchmark_that_cannot_measure_says_why_in_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    """A peer that never came up was a traceback from `bench`; no bound at all leaves no time to come up."""
    monkeypatch.setattr(process_bench, "START_S", 0.0)
    assert main(["bench", "--only", "start", "--json", str(tmp_path / "bench.json")]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: benchmark: the CAN server never listened on 127.0.0.1:"), err
    assert "Traceback" not in err and "bench" not in out and not (tmp_path / "bench.json").exists()


def test_a_bench_vtn_that_never_sees_its_ven_is_the_benchmark_failing_not_a_bare_timeout():
    """The OpenADR benchmarks wait on the bench VTNs, whose waits end in a TimeoutError with nothing said."""
    async def never() -> None:
        await asyncio.wait_for(asyncio.Event().wait(), 0.01)

    with pytest.raises(BenchmarkFailed, match="timed out waiting for the VEN registering with the VTN"):
        asyncio.run(bench.peer_up(never(), "the VEN registering with the VTN"))


def test_bad_samples_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--only", "reaction", "--samples", "0"])
    assert exited.value.code == 2 and "argument --samples" in capsys.readouterr().err


def test_a_bad_scenario_or_json_path_is_said_before_any_benchmark_runs(tmp_path, capsys):
    """Both were found only after the benchmarks before them had run (minutes, with the defaults)."""
    assert main(["bench", "--only", "bus", "sim", "--bus-seconds", "3", "--scenario", "no-such-scenario"]) == 2
    out, err = capsys.readouterr()
    assert "no-such-scenario" in err and "bench" not in out  # no table: nothing was measured
    assert main(["bench", "--only", "bus", "--bus-seconds", "3", "--json", str(tmp_path / "nodir" / "b.json")]) == 2
    out, err = capsys.readouterr()
    assert "folder" in err and "does not exist" in err and "bench" not in out


def test_a_bundled_scenario_is_found_by_its_bare_name_as_sim_finds_it():
    """`bench --scenario grid-return` looked for a file of that name in the package folder."""
    assert scenario.find("grid-return") == scenario.find("grid-return.toml") == scenario.bundled("grid-return.toml")
    assert scenario.find(None) == scenario.bundled()


def test_headline_names_cover_every_benchmark():
    assert set(bench.BENCHMARKS) == {"reaction", "dispatch", "openadr", "bus", "sim", "start", "soak"}
    empty = bench.summary({})
    assert {"reaction_ms", "dispatch_ms", "bus_cpu_pct", "sim_speed_x", "start_s", "rss_mb", "machine"} <= set(empty)


@pytest.mark.slow  # half an hour simulated: seconds
def test_a_short_soak_reports_its_memory_by_hour_and_its_accounting(tmp_path, capsys):
    """The soak with one fault in it (the first comes at 31 minutes): the figures it is read for are
    there, and the bench leaves logging as it found it (its own log file is closed by then)."""
    root = logging.getLogger()
    before = root.handlers[:], root.level
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "soak", "--soak-hours", "0.55", "--json", str(out)]) == 0
    assert (root.handlers, root.level) == before
    logging.getLogger("firmware_py").warning("a line after the bench")
    soak = json.loads(out.read_text())["details"]["soak"]
    assert soak["faults"] == 1 and soak["faults_made_safe"] == 1
    assert len(soak["rss_mb_by_hour"]) == 1 and soak["rss_mb_by_hour"][0] > 0
    assert soak["floor_violations"] == 0 and soak["min_soc_pct"] >= soak["reserve_pct"]
    assert soak["delivered_wh"] > 0 and abs(soak["drift_pct"]) < 0.1
    assert "Logging error" not in capsys.readouterr().err


def _children(pid: int) -> set[int]:
    """The live children of `pid`, from /proc (no ps or pgrep needed)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that has gone (reaped by init soon)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # a real `bench --only start`: its peers and gateway start in a few seconds
def test_sigterm_stops_every_started_process_and_removes_the_temporary_folder(tmp_path):
    """SIGTERM ended the parent alone: CAN server, simulated inverter and BMS, mosquitto and the gateway
    ran on as orphans, and the folder with the installer token stayed. It now unwinds as Ctrl-C does."""
    root = Path(__file__).resolve().parents[1]
    temp = Path(tempfile.mkdtemp(prefix="sigterm-"))  # short: the bench's Unix sockets live under it (108 bytes)
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(root)}
    parent = subprocess.Popen([sys.executable, "-m", "firmware_py", "bench", "--only", "start",
                               "--steady-seconds", "60"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kids: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(temp.glob("*/processes/gateway.log")):
            assert parent.poll() is None, parent.stderr.read().decode()
            time.sleep(0.2)
        kids = _children(parent.pid)
        assert len(kids) >= 3, "the peers and the gateway should be running"
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(k) for k in kids):
            time.sleep(0.2)
        assert not [k for k in kids if _alive(k)]
        assert list(temp.iterdir()) == []
    finally:
        for pid in {parent.pid, *kids, *_children(parent.pid)}:  # none left behind, even when it failed
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def test_the_table_shows_a_faults_time_as_the_summary_has_it(capsys):
    """A fault at 10.1 s with 0.25 s steps is injected at 10.25 s: the summary said 10.25, the table "10 s"."""
    from types import SimpleNamespace

    from firmware_py.sim.sim_command import _report
    from firmware_py.sim.simulation import Outcome

    summary = {"sim_s": 60.0, "wall_s": 0.5, "speed_x": 120.0, "delivered_wh": {}, "answer_details": {},
               "min_soc_pct": 80.0, "final_soc_pct": 80.0, "floor_violations": 0, "final_state": "STANDBY",
               "faults": [{"kind": "bms_fault", "at_s": 10.25, "detected_after_s": 0.1, "safe_after_s": 0.2}]}
    _report(Outcome(summary, []), SimpleNamespace(name="odd"))
    assert "fault bms_fault at 10.25 s" in capsys.readouterr().out

