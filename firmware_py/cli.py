"""The `powershare-gw` command line (docs/command-line.md).

Each subsystem registers its own subcommands; this module only builds the
parser and turns outcomes into the contract's exit codes: 0 ok, 1 a check
failed, 2 bad input (with a message on stderr naming file, key and reason).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from firmware_py.errors import InputError
from firmware_py.quoting import printable
from firmware_py.version import software_version

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    from firmware_py import bundle, service, status
    from firmware_py.bms import commands as bms_commands
    from firmware_py.commissioning import commands as commissioning_commands
    from firmware_py.inverter import commands as inverter_commands
    from firmware_py.journal import commands as journal_commands
    from firmware_py.owner import commands as owner_commands
    from firmware_py.sim import bench, sim_command
    from firmware_py.statements import commands as statement_commands

    parser = argparse.ArgumentParser(
        prog="powershare-gw",
        description="Vehicle-to-home gateway: BMS over CAN, inverter over SunSpec Modbus, grid dispatch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {software_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (service, status, bms_commands, inverter_commands, journal_commands, owner_commands,
                   sim_command, bench, statement_commands, bundle, commissioning_commands):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_OK
    try:
        return int(handler(args))
    except InputError as err:
        for problem in err.problems:
            print(f"error: {printable(problem)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_CHECK_FAILED
