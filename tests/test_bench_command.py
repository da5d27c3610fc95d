"""`powershare-gw bench` runs its benchmarks end to end and writes the figures under their promised names.

Speed is what the benchmarks measure, never what a test asserts: these tests run each
real-time benchmark with a handful of samples and check only that it completed,
measured what it says, and wrote the JSON a CI job or an installer's script reads.
"""

from __future__ import annotations

import json

import pytest

from firmware_py.cli import main
from firmware_py.sim import bench

@pytest.mark.slow  # real-time rigs and a separate-process gateway: seconds each
def test_reaction_dispatch_and_start_write_their_headline_figures(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "reaction", "dispatch", "start", "--samples", "5", "--json", str(out)]) == 0
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


def test_bad_samples_exit_2(capsys):
    assert main(["bench", "--only", "reaction", "--samples", "0"]) == 2
    assert "--samples" in capsys.readouterr().err


def test_headline_names_cover_every_benchmark():
    assert set(bench.BENCHMARKS) == {"reaction", "dispatch", "openadr", "bus", "sim", "start", "soak"}
    empty = bench.summary({})
    assert {"reaction_ms", "dispatch_ms", "bus_cpu_pct", "sim_speed_x", "start_s", "rss_mb", "machine"} <= set(empty)
