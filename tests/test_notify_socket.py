"""The parent's end of $NOTIFY_SOCKET: READY=1 is the event, a child's exit is seen within a look."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from firmware_py.sim.notify_socket import NotifySocket, NotReady

SEND_READY = ("import os, socket\n"
              "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
              "s.sendto(b'READY=1', '\\0' + os.environ['NOTIFY_SOCKET'][1:])\n")


def child(code: str, notify: NotifySocket) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "NOTIFY_SOCKET": notify.name})


def test_a_ready_sent_just_before_the_child_exits_still_counts():
    with NotifySocket() as notify:
        proc = child(SEND_READY + "raise SystemExit(3)", notify)
        proc.wait(timeout=30)  # gone before the parent looks: the datagram waits in the socket
        notify.wait_ready(proc, timeout=5)


def test_a_child_that_exits_without_ready_is_said_with_its_exit_code_before_the_deadline():
    with NotifySocket() as notify:
        proc = child("raise SystemExit(2)", notify)
        with pytest.raises(NotReady, match="^exited with 2$"):
            notify.wait_ready(proc, timeout=60)


def test_a_silent_child_is_said_at_the_deadline():
    with NotifySocket() as notify:
        proc = child("import time; time.sleep(30)", notify)
        try:
            with pytest.raises(NotReady, match="^sent no READY=1 within 0.5 s$"):
                notify.wait_ready(proc, timeout=0.5)
        finally:
            proc.kill()
            proc.wait()
