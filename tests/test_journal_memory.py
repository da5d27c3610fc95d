"""A million-record journal costs a restart, a stop and a report no more memory than a small one.

The hardening issue's flood left a 652k-record journal; restarting on it peaked at 1.22 GB
(an out-of-memory restart loop on a small board: no backup power). Here the gateway
(`powershare-gw run`, its own process) starts on a journal of a million records with an
event the flood left open, ends that event, and stops; then `report` reads it all. Each
process's peak resident memory is measured by `peak_rss.py` (getrusage of its only
child). Memory is asserted; time is only printed (README, "Performance").
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import big_journal
import pytest

from firmware_py.journal import Chain, RecordKind

HERE = Path(__file__).resolve().parent
RECORDS = 1_000_000
LIMIT_MB = 80.0


def measured(args: list[str], until: str | None = None, timeout: float = 300.0) -> dict:
    extra = ["--until", until] if until else []
    done = subprocess.run([sys.executable, str(HERE / "peak_rss.py"), "--timeout", str(timeout), *extra, "--", *args],
                          capture_output=True, text=True, timeout=timeout + 60, check=True)
    return json.loads(done.stdout)


def gateway_config(tmp_path: Path, journal: Path) -> Path:
    with socket.socket() as sock:  # a port nobody listens on: the inverter is unreachable, start-up goes on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[can]
interface = "virtual"
channel = "memory-{tmp_path.name}"
[inverter]
port = {port}
timeout_s = 0.2
[owner]
api_listen = "127.0.0.1:0"
[journal]
path = "{journal}"
""")
    return config


@pytest.mark.slow
def test_restart_stop_and_report_on_a_million_records_stay_under_80_mb(tmp_path):
    journal = tmp_path / "journal.sqlite"
    big_journal.build(journal, RECORDS)
    exe = str(Path(sys.executable).with_name("powershare-gw"))

    run = measured([exe, "run", "--config", str(gateway_config(tmp_path, journal))],
                   until="ended events left open by the last run")
    print(f"\nrestart on {RECORDS:,} records: open event ended after {run['until_s']:.2f} s, "
          f"stopped {run['stop_s']:.2f} s later, peak RSS {run['peak_rss_mb']} MB")
    assert run["exit"] == 0, run["output"]
    assert "flooded-peak" in run["output"]
    assert run["peak_rss_mb"] < LIMIT_MB, run["output"]

    ended = [r.payload["request_id"] for r in Chain(journal).iter_records([RecordKind.DISPATCH_ENDED])]
    assert ended == ["flooded-peak"]

    report = measured([exe, "report", "--journal", str(journal), "--format", "json"])
    print(f"report on {RECORDS:,} records: peak RSS {report['peak_rss_mb']} MB")
    assert report["exit"] == 0, report["output"]
    assert report["peak_rss_mb"] < LIMIT_MB, report["output"]
