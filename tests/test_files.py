"""Files the gateway writes for people (reports, statements, the owner's settings): whole or not at all."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from firmware_py.files import write_atomically


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG), as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))


def test_a_write_that_fails_part_way_leaves_the_previous_file_whole_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text('{"passed": true}\n')
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from firmware_py.files import write_atomically; "
                               "write_atomically(sys.argv[1], 'x' * 10_000)", str(target)],
        capture_output=True, text=True, timeout=60, preexec_fn=_limit_file_size)
    assert child.returncode != 0 and "File too large" in child.stderr
    assert target.read_text() == '{"passed": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_symlink_is_written_through_and_a_device_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("old")
    (tmp_path / "link.txt").symlink_to(real)
    write_atomically(tmp_path / "link.txt", "new")
    assert real.read_text() == "new" and (tmp_path / "link.txt").is_symlink()
    with pytest.raises(OSError, match="it is a device, not a regular file"):
        write_atomically("/dev/null", "anything")
