"""Run one command as this process's only child and report its peak memory (and when it said what).

`python tests/peak_rss.py [--until REGEX] [--timeout S] -- COMMAND...` prints one JSON line:
`exit`, `peak_rss_mb` (the child's peak resident set, from `getrusage(RUSAGE_CHILDREN)`),
`until_s` (when the child printed a line matching REGEX) and `stop_s` (from then until it
exited, after a SIGTERM sent at that line). The measurement runs in a process of its own
because RUSAGE_CHILDREN is the largest of all children ever waited for: in the test process
it would include every other test's children. Times are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import select
import signal
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--until", help="send SIGTERM once the child prints a line matching this")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    output, until_s, stop_s = b"", None, None
    deadline = started + args.timeout
    pattern = re.compile(args.until.encode()) if args.until else None
    while True:
        ready, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
        chunk = child.stdout.read1(65536) if ready else b""  # type: ignore[union-attr]
        if not ready:
            child.kill()
            output += b"\n(peak_rss: timed out)\n"
            break
        if not chunk:
            break
        output += chunk
        if pattern is not None and until_s is None and pattern.search(output):
            until_s = time.monotonic() - started
            child.send_signal(signal.SIGTERM)
    code = child.wait()
    if until_s is not None:
        stop_s = time.monotonic() - started - until_s
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"exit": code, "peak_rss_mb": round(peak_mb, 1), "until_s": until_s, "stop_s": stop_s,
                      "output": output.decode(errors="replace")[-4000:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
