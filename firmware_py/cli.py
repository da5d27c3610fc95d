"""The `powershare-gw` command line (docs/command-line.md).

Each subsystem registers its own subcommands; this module only builds the
parser and turns outcomes into the contract's exit codes: 0 ok, 1 a check
failed, 2 bad input (with a message on stderr naming file, key and reason).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from firmware_py.errors import InputError
from firmware_py.heap import collection_paused
from firmware_py.narration import configure_command_logging
from firmware_py.quoting import printable
from firmware_py.tasks import stop_signals_noted
from firmware_py.version import software_version

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_OUTPUT_CLOSED = 128 + 13
"""What a shell reports for a command that SIGPIPE ended: the output's reader left first."""
EXIT_INTERRUPTED = 128 + 2
"""What a shell reports for a command Ctrl-C ended (a stop signal, for the batch commands): not 1, which
says the run finished and a check failed."""


COMMANDS: dict[str, str] = {
    "check-config": "firmware_py.service",
    "run": "firmware_py.service",
    "status": "firmware_py.status",
    "bms": "firmware_py.bms.commands",
    "inverter": "firmware_py.inverter.commands",
    "report": "firmware_py.journal.commands",
    "owner": "firmware_py.owner.commands",
    "sim": "firmware_py.sim.sim_command",
    "bench": "firmware_py.sim.bench",
    "statement": "firmware_py.statements.commands",
    "bundle": "firmware_py.bundle",
    "commission": "firmware_py.commissioning.commands",
}
"""Each command and the module that registers it (its `register(sub)`), in the order help lists them.

Only the named command's module is imported: `run` on a small board then never loads the
simulator, the benchmarks or the statement tools (about 1.5 MB of RSS and their import time).
Help, `--version`, an option before the command and a command that is not known load them all."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone, or for every command when it is None or not one of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="powershare-gw",
        description="Vehicle-to-home gateway: BMS over CAN, inverter over SunSpec Modbus, grid dispatch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {software_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


NOTES_STOP_SIGNALS = ("run", "commission")
"""The commands that take the stop signals over for a safe stop: until they do, one is noted, not fatal."""


def quiet_foreign_import_warnings() -> None:
    """signxml (OpenADR 2.0b's XML signatures, through openleadr) names DSA keys in its type hints, and
    the cryptography package warns when it is imported that DSA is deprecated: two lines of another
    project's source on stderr at every start, which an installer reads as a fault. The gateway signs
    nothing with DSA; every other warning stays."""
    warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"signxml(\.|$)")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_foreign_import_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    noting = argv[0] in NOTES_STOP_SIGNALS if argv else False
    with stop_signals_noted() if noting else contextlib.nullcontext():
        return _main(argv)


def _main(argv: list[str]) -> int:
    with collection_paused():  # the command's modules are imported here
        parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_OK
    configure_command_logging()
    try:
        code = int(handler(args))
        sys.stdout.flush()  # here, so a reader that left is met below rather than as Python exits
        return code
    except InputError as err:
        for problem in err.problems:
            print(f"error: {printable(problem)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{argv[0]}: stopped before it finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of the output went away (`report --format json | head`): nothing to say, and no
        # 1, which would read as a failed check. Python's own flush at exit must not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OUTPUT_CLOSED
