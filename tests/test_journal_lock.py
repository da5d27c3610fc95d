"""One process per journal (`firmware_py/journal/lock.py`): a second `run` on a journal another
gateway writes is refused before it opens anything.

A second `run` with the same configuration opened the same journal (SQLite's write-ahead log let it),
ended the first's open event as "left open by the last run", failed on the owner API's address, and on
its way out wrote WSet = 0 to the inverter the first was discharging through.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from children import SIM_INVERTER_PORT, spawn
from firmware_py.sim.ports import free_port

from firmware_py.errors import InputError
from firmware_py.journal import Journal, RecordKind
from firmware_py.journal.files import lock_path
from firmware_py.journal.lock import holder_named, lock_journal

START_S = 25.0
POLL_S = 0.05


def _in_use(pid: int | None) -> str:
    return f"in use{holder_named(pid)}"


def test_a_held_journal_is_refused_naming_the_holder_and_released_when_closed(tmp_path: Path):
    journal = tmp_path / "j.sqlite"
    lock = lock_journal(journal, _in_use)
    try:
        assert lock_path(journal).read_text() == f"{os.getpid()}\n"
        with pytest.raises(InputError, match=rf"^in use \(pid {os.getpid()}\)$"):
            lock_journal(journal, _in_use)  # a second open file: refused, even in this process
    finally:
        lock.close()
    lock_journal(journal, _in_use).close()  # released: taken again


def test_a_holder_that_wrote_no_pid_is_refused_without_one(tmp_path: Path):
    journal = tmp_path / "j.sqlite"
    fd = os.open(lock_path(journal), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(InputError, match=r"^in use$"):
            lock_journal(journal, _in_use)
    finally:
        os.close(fd)


def test_a_lock_file_this_user_cannot_write_still_locks(tmp_path: Path, monkeypatch):
    """A lock file another user made (a gateway once run by hand as root) refused the service's user its
    read-write open: flock needs only a read one. Root may write anything, so the refusal is the OS's
    answer played by `os.open` here; the lock taken is real."""
    journal = tmp_path / "j.sqlite"
    lock_path(journal).write_text("")
    real_open = os.open

    def refusing_writes(path, flags, *args):
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_writes)
    lock = lock_journal(journal, _in_use)
    try:
        with pytest.raises(InputError, match=r"^in use$"):  # held: no pid could be written
            lock_journal(journal, _in_use)
    finally:
        lock.close()


def test_a_removed_lock_file_is_made_again_and_locked_so_a_second_gateway_is_still_refused(tmp_path: Path, caplog):
    """`rm journal.sqlite*` under a running gateway took its lock file: a second gateway found none, made
    one, locked it and wrote beside the first. `keep` (every second in `run`) puts it back, locked."""
    journal = tmp_path / "j.sqlite"
    lock = lock_journal(journal, _in_use)
    try:
        lock.keep()  # nothing to do: one stat
        lock_path(journal).unlink()
        with caplog.at_level(logging.WARNING, logger="firmware_py.journal.lock"):
            lock.keep()
            lock.keep()
        assert lock_path(journal).read_text() == f"{os.getpid()}\n"
        with pytest.raises(InputError, match=rf"^in use \(pid {os.getpid()}\)$"):
            lock_journal(journal, _in_use)
        assert [r.getMessage() for r in caplog.records] == [
            f"{lock_path(journal)}: the journal's lock file was removed while the gateway ran: made again and locked"]
    finally:
        lock.close()
    lock_journal(journal, _in_use).close()  # the lock made again is the one let go
    lock_path(journal).unlink()
    lock.keep()  # closed: takes nothing back
    lock.close()
    assert not lock_path(journal).exists()


def test_a_lock_taken_by_another_process_while_the_file_was_gone_is_named_once(tmp_path: Path, caplog):
    journal = tmp_path / "j.sqlite"
    lock = lock_journal(journal, _in_use)
    try:
        lock_path(journal).unlink()
        other = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock_path(journal))],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline() == "locked\n"
            with caplog.at_level(logging.WARNING, logger="firmware_py.journal.lock"):
                lock.keep()
                lock.keep()
        finally:
            other.communicate("", timeout=10)
    finally:
        lock.close()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and f"another process (pid {other.pid}) has locked a new one" in said[0]


_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _core_starts(journal: Path) -> int:
    with Journal.open(journal, readonly=True) as j:
        return sum(1 for _ in j.iter_records([RecordKind.CORE_START]))


def _holder_written(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _until(what: str, predicate, proc: subprocess.Popen, timeout: float = START_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the first gateway exited ({proc.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_S)


@pytest.mark.slow  # three processes (an inverter, two gateways); the lock itself is tested above in the fast tier
def test_a_second_run_on_the_same_journal_exits_2_and_touches_neither_journal_nor_inverter(tmp_path: Path):
    owner_port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        inverter, inverter_out = spawn([sys.executable, "-m", "firmware_py", "sim", "inverter", "--listen",
                                        "127.0.0.1:0", "--setpoint-log", str(tmp_path / "wset.log")],
                                       tmp_path / "inverter.log", cwd=tmp_path)
        procs.append(inverter)
        port = int(inverter_out.wait_for_line(SIM_INVERTER_PORT, START_S).group(1))
        config = tmp_path / "gateway.toml"
        config.write_text(f"""\
[can]
interface = "virtual"
channel = "journal-lock-{os.getpid()}"
[inverter]
port = {port}
[owner]
api_listen = "127.0.0.1:{owner_port}"
token_file = "owner.token"
settings_file = "owner-settings.json"
[journal]
path = "journal.sqlite"
""")
        first, first_out = spawn([sys.executable, "-m", "firmware_py", "run", "--config", str(config)],
                                 tmp_path / "first.log", cwd=tmp_path)
        procs.append(first)
        journal = tmp_path / "journal.sqlite"
        _until("its owner API", lambda: _listening(owner_port), first)
        _until("its start in the journal", lambda: journal.exists() and _core_starts(journal) == 1, first)
        writes_before = (tmp_path / "wset.log").read_text() if (tmp_path / "wset.log").exists() else ""

        second = subprocess.run([sys.executable, "-m", "firmware_py", "run", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, cwd=tmp_path)

        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == (
            f"error: {config}: journal.path: journal {journal} is in use by another gateway (pid {first.pid}); "
            "one gateway per journal: stop the other (`sudo systemctl stop powershare-gw`) or give this one its "
            "own journal.path")
        assert first.poll() is None, first_out.text()
        assert _core_starts(journal) == 1  # no second start: nor an end of the first's events
        writes_after = (tmp_path / "wset.log").read_text() if (tmp_path / "wset.log").exists() else ""
        # The first (in STARTUP: no BMS on its bus) may refresh its own setpoint; the second's safe stop
        # (WSet = 0 written and read back) is not among the writes.
        assert writes_after.startswith(writes_before)
        assert "WSet" not in second.stderr

        for doomed in tmp_path.glob("journal.sqlite*"):  # `rm journal.sqlite*` under the first: its lock comes back
            doomed.unlink()
        _until("its lock file made again", lambda: _holder_written(lock_path(journal)) == first.pid, first)
        again = subprocess.run([sys.executable, "-m", "firmware_py", "run", "--config", str(config)],
                               capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert again.returncode == 2 and f"is in use by another gateway (pid {first.pid})" in again.stderr
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
