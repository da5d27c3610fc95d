"""Child processes the tests wait on by what they say, never by sleeping or probing ports.

A child's output is read by a thread as it is written: each line is copied to a log file
(a chatty child never blocks on a full pipe) and wakes whoever waits for it. A process that
binds port 0 and prints the port it got needs no free-port guess, so parallel workers never
race for a port. The gateway says it is ready on $NOTIFY_SOCKET, like under systemd
(`firmware_py.sim.notify_socket`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

NOTABLE = re.compile(r" (CRITICAL|ERROR) |^Traceback|^\w+(Error|Exception): ")


class ChildOutput:
    """The lines a child prints (stdout and stderr together), as they come."""

    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.proc, self.log_path = proc, log_path
        self.lines: list[str] = []
        self.closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, name=f"output of {proc.pid}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        self.proc.stdout.close()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line matching `pattern` (already printed or the next one); fails with the
        output when the child ends its output (it exited) or `timeout` passes first."""
        regex, seen = re.compile(pattern), 0
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    break
                self._changed.wait(left)
        why = f"exited with {self.proc.wait(timeout=5)}" if self.closed else f"did not within {timeout} s"
        pytest.fail(f"waiting for a line matching {pattern!r}: the child {why}\n{self.text()}")

    def text(self) -> str:
        """The last 3,000 characters, after any error lines cut from before them: a flood of
        warnings at the end must not hide why the child failed."""
        with self._changed:
            whole = "".join(self.lines)
            if len(whole) <= 3000:
                return whole
            tail = whole[-3000:]
            notable = [line for line in self.lines if NOTABLE.search(line) and line not in tail][:20]
        return "".join(notable) + ("[...]\n" if notable else "") + tail

    def join(self, timeout: float = 5.0) -> None:
        """After the child exited: wait until everything it printed has been read."""
        self._thread.join(timeout)


def spawn(args: list[str], log_path: Path, **popen: object) -> tuple[subprocess.Popen, ChildOutput]:
    """Start `args` with its output piped to a ChildOutput (and so to `log_path`), with SIGHUP's default
    action: a suite run under `nohup` would pass its ignored SIGHUP on, and `run` keeps ignoring it then."""
    own = popen.pop("preexec_fn", None)

    def before_exec() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if callable(own):
            own()

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", preexec_fn=before_exec, **popen)  # type: ignore[call-overload]
    return proc, ChildOutput(proc, log_path)


# What the children print once they listen (python-can-remote logs the port it got).
CAN_SERVER_PORT = r"Connect using channel 'ws://localhost:(\d+)/'"
SIM_INVERTER_PORT = r"serving SunSpec models .* on 127\.0\.0\.1:(\d+)"
