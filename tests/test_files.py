"""Files the gateway writes for people (reports, statements, the owner's settings): whole or not at all."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

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


def test_a_symlink_is_written_through_and_a_device_written_as_it_is(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("old")
    (tmp_path / "link.txt").symlink_to(real)
    write_atomically(tmp_path / "link.txt", "new")
    assert real.read_text() == "new" and (tmp_path / "link.txt").is_symlink()
    write_atomically("/dev/null", "anything")  # `--out /dev/stdout` is a device too: written, not replaced


def test_a_replaced_file_keeps_its_mode_and_a_new_one_follows_the_umask(tmp_path: Path) -> None:
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    kept.chmod(0o640)
    write_atomically(kept, "[]")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "[]"
    umask = os.umask(0o027)
    try:
        write_atomically(tmp_path / "new.json", "{}")
        write_atomically(tmp_path / "private.json", "{}", new_mode=0o600)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
