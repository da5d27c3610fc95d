"""The parent's end of systemd's $NOTIFY_SOCKET, for a `powershare-gw run` we start ourselves.

The gateway says READY=1 there once it has fresh data, as under systemd: the process bench
times its start by it and the tests wait on it instead of sleeping or probing ports. A child
that exits first (a taken port, a bad key) is seen within a look, not at the deadline.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time

EXIT_LOOK_S = 0.2
"""Between looks at whether the child exited while READY=1 is awaited: start-up's failures end it at once."""


class NotReady(RuntimeError):
    """The child exited, or stayed silent past the deadline, instead of sending READY=1."""


class NotifySocket:
    """A datagram socket in the abstract namespace (nothing on disk), unique to this parent."""

    def __init__(self) -> None:
        self.name = f"@powershare-notify-{secrets.token_hex(8)}"
        """The value for the child's NOTIFY_SOCKET."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.name[1:])

    def wait_ready(self, proc: subprocess.Popen, timeout: float) -> None:
        """Return once `proc` sends READY=1; raise NotReady saying why it did not.

        The child's exit is looked at after each look at the socket, so a READY sent just
        before an exit still counts."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self._sock.settimeout(min(left, EXIT_LOOK_S))
            try:
                if b"READY=1" in self._sock.recv(256):
                    return
            except TimeoutError:
                pass
            if proc.poll() is not None:
                raise NotReady(f"exited with {proc.returncode}")
        raise NotReady(f"sent no READY=1 within {timeout:g} s")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
