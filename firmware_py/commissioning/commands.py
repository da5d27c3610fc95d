"""`powershare-gw commission --config FILE [--report FILE] [--allow-test-discharge]`.

The steps run in order, each printed as soon as it is judged, on one assembly of
the gateway (as `run` builds it): the configuration; the CAN bus and the BMS; the
inverter; with `--allow-test-discharge`, a small discharge through the core to
catch a swapped power sign before a peak event does; each enabled aggregator
interface. A step that needs an earlier one to pass is skipped when it failed.
Exit 0 when every check that ran passed, 1 when one failed, 2 for bad input (the
configuration itself, an option, the report path, a gateway already running).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from firmware_py import config as config_module
from firmware_py.assembly import Assembly, assemble, check, kept_file_named, same_file
from firmware_py.bms.bus import shutdown_quietly
from firmware_py.bms.reader import reader_from_config
from firmware_py.clocks import Clocks
from firmware_py.commissioning import judgement, probes
from firmware_py.commissioning.report import (
    Check,
    Outcome,
    Report,
    Step,
    failed,
    interrupted,
    skipped,
    step_lines,
    verdict_line,
)
from firmware_py.config import Config
from firmware_py.core.answers import MIN_USEFUL_W
from firmware_py.errors import InputError
from firmware_py.files import cannot_make_beside, write_atomically
from firmware_py.journal.lock import JournalLock, holder_named
from firmware_py.narration import configure_logging
from firmware_py.service import RunOptions, Service, lock_configured_journal
from firmware_py.tasks import take_stop_signals
from firmware_py.version import software_version

log = logging.getLogger(__name__)

DEFAULT_DISCHARGE_W = 500.0
DEFAULT_DISCHARGE_S = 10.0
DEFAULT_CAN_S = 5.0
MAX_DISCHARGE_S = 60.0
MAX_CAN_S = 120.0
MAX_DISCHARGE_W = 100_000.0

DESCRIPTION = """\
A guided check of an installation, ending in a pass/fail report (on the terminal, and as JSON
with --report). It builds the gateway as `run` does, so stop the gateway service first.
Steps: the configuration; CAN traffic on the configured interface, every BMS message of the
DBC at its period (+-50 %), plausible values, contactor and BMS state; the inverter's SunSpec
discovery, ratings and revert function (written and read back); with --allow-test-discharge,
a small discharge through the gateway's core (never below the owner's floor, bounded in time,
ending at 0 W) to check that the inverter's measured power is positive and the BMS current
shows a discharge; each enabled aggregator interface reachable. Every failed check says what
is wrong and what to check. Exit 0 passed, 1 a check failed, 2 bad input."""


class Console:
    """Prints each step of the report as it completes (a guided check, not a wait for the end)."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def say(self, text: str) -> None:
        """A terminal gone (an SSH session dropped: EIO; a closed pipe) must not cut the clean-up short:
        the inverter still goes to 0 W and the report file is still written, so the rest goes nowhere."""
        try:
            print(text, flush=True)
        except OSError:
            _silence_stdout()

    def step(self, step: Step, checks: list[Check]) -> None:
        """A step's checks; a step told again (the bus lost after its window) prints only what is new."""
        again = bool(self.report.of(step))
        self.report.add(checks)
        self.say("\n".join(step_lines(self.report, step, checks if again else None)))


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so neither later lines nor the flush at exit fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _commission(args: argparse.Namespace) -> int:
    _check_options(args)
    report_path = Path(args.report) if args.report else None
    if report_path is not None:
        _check_writable(report_path)
    configure_logging(args.verbose)
    if not args.verbose:  # the report is the output; the gateway's narration only when asked for
        logging.getLogger().setLevel(logging.WARNING)
    report = Report(config=str(args.config), at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    software_version=software_version())
    console = Console(report)
    if report_path is not None:  # even a configuration that does not load is not to be replaced by the report
        _check_not_kept(report_path, Path(args.config))
    try:
        config = config_module.load(args.config)
        if report_path is not None:
            _check_not_kept(report_path, config)
        check(config)
    except _ReportReplaces:
        raise
    except InputError as err:
        console.say(f"powershare-gw commission: {args.config} at {report.at}")
        console.step(Step.CONFIG, judgement.judge_config(str(args.config), err.problems))
        _skip_the_rest(console, "needs a configuration that passes its checks")
        _finish(console, report_path)
        raise
    _check_window(config, args.can_seconds)
    lock = _lock_journal(config)  # before the bus, the inverter or the journal is opened; held to the end
    try:
        _refuse_if_running(config)
        console.say(f"powershare-gw commission: {args.config} at {report.at}")
        console.step(Step.CONFIG, [*judgement.judge_config(config.source, []),
                                   *judgement.judge_listeners(probes.taken_addresses(config))])
        try:
            asyncio.run(_steps(config, args, console))
        except BaseException as err:
            _ended_early(console, err)
            raise
        finally:
            _finish(console, report_path)
    finally:
        lock.close()
    return 0 if report.passed else 1


def _lock_journal(config: Config) -> JournalLock:
    """The journal's lock (`journal/lock.py`): a gateway holding it (running, or still starting, before
    its owner API listens) would have its setpoint and its journal taken over."""
    def in_use(pid: int | None) -> str:
        return (f"{config.source}: journal.path: journal {config.journal.path} is in use by a gateway"
                f"{holder_named(pid)}: stop it first (`sudo systemctl stop powershare-gw`), commission, "
                "then start it again")

    return lock_configured_journal(config, in_use)


def _ended_early(console: Console, err: BaseException) -> None:
    """A failed check in the first step that has none: a run that stopped part-way never reads (or is
    kept) as passed on the checks it got to."""
    if all(console.report.of(s) for s in Step) and not console.report.passed:
        return  # every step told, a failure among them (`_not_assembled`): nothing to add
    step = next((s for s in Step if not console.report.of(s)), Step.DISPATCH)
    why = "; ".join(err.problems) if isinstance(err, InputError) else f"{type(err).__name__}: {err}"
    console.step(step, [failed(step, "commissioning ended early", why or type(err).__name__,
                               "fix what it names and commission again: the steps after this one did not run")])


def _check_options(args: argparse.Namespace) -> None:
    """Each option in its range, the message stating both limits the check applies (it said "0 to 120 s"
    of a 0 it refused, and never named the 100 kW ceiling)."""
    ranges = (("--discharge-w", args.discharge_w, MAX_DISCHARGE_W, "W", f" (default {DEFAULT_DISCHARGE_W:g} W)"),
              ("--discharge-seconds", args.discharge_seconds, MAX_DISCHARGE_S, "s", ""),
              ("--can-seconds", args.can_seconds, MAX_CAN_S, "s", ""))
    problems = [f"{option}: expected above 0 and at most {most:g} {unit}{default}, got {value:g}"
                for option, value, most, unit, default in ranges if not 0 < value <= most]
    if 0 < args.discharge_w < MIN_USEFUL_W:
        problems.append(f"--discharge-w: expected at least {MIN_USEFUL_W:g} W (the core refuses a discharge it "
                        f"could serve only below that, and the test would blame the pack), got {args.discharge_w:g}")
    if problems:
        raise InputError(problems)


def _check_writable(path: Path) -> None:
    """Refuse a report path that cannot be written before anything runs: found after the run, it cost
    the whole run (the test discharge included). A file is tried in the folder, as the report is written
    (a temporary file beside it, then renamed): root passes os.access where it still cannot create one."""
    if path.is_dir():
        raise InputError(f"--report {path}: is a folder; give a file name")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise InputError(f"--report {path}: cannot write: folder {folder} does not exist")
    if path.exists() and not path.is_file():  # a device such as /dev/stdout is written to as it is
        if not os.access(path, os.W_OK):
            raise InputError(f"--report {path}: cannot write: permission denied")
        return
    if (refused := cannot_make_beside(path)) is not None:
        raise InputError(f"--report {path}: cannot write in folder {folder}: {refused}")


class _ReportReplaces(InputError):
    """--report names a file the gateway keeps: refused before anything runs, no report written."""


def _check_not_kept(path: Path, config: Config | Path) -> None:
    """Refuse a report path that is the configuration file or any file the configuration names (the
    journal and its side files, tokens, settings, secrets, certificates): the report is written over
    whatever file is there, and that record would be lost."""
    if isinstance(config, Path):
        what = f"the configuration file {config}" if same_file(path, config) else None
    else:
        what = kept_file_named(str(path), config)
    if what is not None:
        raise _ReportReplaces(f"--report {path}: is {what}: the report would replace it; give another file name")


WINDOW_PERIODS = 3
"""The CAN window holds at least this many periods of the slowest message: enough to time each page."""


def _check_window(config: Config, window_s: float) -> None:
    specs = probes.message_specs(reader_from_config(config, time.monotonic))
    slowest = max(specs, key=lambda s: s.period_s, default=None)
    if slowest is not None and window_s < WINDOW_PERIODS * slowest.period_s:
        raise InputError(f"--can-seconds {window_s:g}: too short to time the DBC's slowest message ({slowest.label}, "
                         f"every {slowest.period_s * 1e3:g} ms): give at least {WINDOW_PERIODS * slowest.period_s:g} s")


RECOGNISE_S = 1.0
"""How long what listens on the owner API's address is given to answer GET /api/status."""


def _refuse_if_running(config: Config) -> None:
    """Two gateways on one inverter would fight over its setpoint: commissioning needs the service stopped.

    Anything listening where this configuration's owner API listens is refused: the commissioning's
    own gateway needs that address. It is called a gateway unless it answers as none does (as
    `powershare-gw status` tells): a gateway still starting (no answer yet), or one whose token file
    is elsewhere, is a gateway; told "a gateway is running" of `python -m http.server`, the installer
    looked for a service that was not there.
    """
    from firmware_py.owner.access import parse_listen

    where = parse_listen(config.owner.api_listen)
    if not _listened_on(where.unix_path, where.host, where.port):
        return
    if _answers_as_no_gateway(config):
        raise InputError(f"{config.source}: owner.api_listen: something other than a gateway listens on "
                         f"{where.describe()}; the commissioning's gateway needs that address free: find the "
                         "program (`sudo ss -ltnp` lists each listening port's process) and stop it, or give "
                         "owner.api_listen another address")
    raise InputError(f"{config.source}: a gateway is running with this configuration (its owner API answers on "
                     f"{where.describe()}): stop it first "
                     "(`sudo systemctl stop powershare-gw`), commission, then start it again")


def _listened_on(unix_path: str, host: str, port: int) -> bool:
    """Whether a connection to the address is accepted (a socket bound and listening there)."""
    family, address = ((socket.AF_UNIX, unix_path) if unix_path
                       else (socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port)))
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


PROBE_TOKEN = "commissioning-asks-who-listens"
"""Sent instead of the owner's token, which a fresh gateway has not made yet: a gateway refuses it (401)."""


def _answers_as_no_gateway(config: Config) -> bool:
    """True when what listens answered GET /api/status, and not as a gateway does (the test `status`
    makes); no answer, or a gateway's refusal of the probe's token, is a gateway's."""
    from firmware_py.owner.commands import NotAnOwnerApi, Unavailable
    from firmware_py.status import fetch_status

    try:
        fetch_status(config.owner, answer_s=RECOGNISE_S, token=PROBE_TOKEN)
    except NotAnOwnerApi:
        return True
    except (Unavailable, InputError):
        pass
    return False


def _finish(console: Console, path: Path | None) -> None:
    console.say(verdict_line(console.report))
    if path is None:
        return
    try:
        write_atomically(path, json.dumps(console.report.as_dict(), indent=2) + "\n")
    except OSError as err:
        raise InputError(f"--report {path}: cannot write: {err.strerror or err}") from None
    console.say(f"report: {path}")


async def _steps(config: Config, args: argparse.Namespace, console: Console) -> None:
    """CAN, inverter, sign test and dispatch on one assembly; whatever happens, the inverter ends at 0 W
    and everything assembling opened is closed."""
    stop, stop_thread = asyncio.Event(), threading.Event()

    def stopping() -> None:
        stop.set()
        stop_thread.set()

    take_stop_signals(stopping)  # SIGHUP too: the installer's SSH session dropped, unless run under nohup
    where = f"{config.can.interface} {config.can.channel}"
    reader = reader_from_config(config, time.monotonic)
    try:
        bus = probes.open_unfiltered(config)
    except InputError as err:
        await _without_bus(config, console, where, args.can_seconds, err)
        return
    console.say(f"-- listening to {where} for {args.can_seconds:g} s ...")
    try:
        can_obs = await asyncio.to_thread(probes.observe_can, bus, reader, args.can_seconds, where=where,
                                          usable_capacity_wh=config.vehicle.usable_capacity_wh, stop=stop_thread)
    finally:
        shutdown_quietly(bus, log)
    if _interrupted(console, stop, Step.CAN):
        return
    console.step(Step.CAN, judgement.judge_can(can_obs, probes.message_specs(reader)))
    try:
        assembly = assemble(config, Clocks.system())
    except InputError as err:  # the bus, just open, cannot be opened again (an adapter gone since)
        if not any(p.startswith(f"{config.source}: can") for p in err.problems):
            _not_assembled(console, err)
            raise
        await _without_bus(config, console, where, args.can_seconds, err, judged=True)
        return
    if assembly.can_link.bus is None:  # gone since: the gateway would wait for it, commissioning cannot
        assembly.close()
        await _without_bus(config, console, where, args.can_seconds, InputError(assembly.can_link.open_error),
                           judged=True)
        return
    service: Service | None = None
    try:
        console.say(f"-- asking the inverter at {probes.where_of(config.inverter)} ...")
        inverter = await probes.probe_inverter(assembly.gateway.inverter, config.inverter)
        console.step(Step.INVERTER, judgement.judge_inverter(inverter))
        if _interrupted(console, stop, Step.SIGN):
            return
        service = await _sign_test(assembly, args, console, stop)
        if _interrupted(console, stop, Step.DISPATCH, judged_by=Step.SIGN):
            return
        console.say("-- asking the aggregator interfaces ...")
        reaches = await probes.probe_dispatch(assembly, stop=stop)
        if _interrupted(console, stop, Step.DISPATCH):  # an interface cut short is no pass
            return
        console.step(Step.DISPATCH, judgement.judge_dispatch(reaches))
    finally:
        if service is not None:
            await service.stop()  # its safe stop (WSet = 0), then it closes the assembly
        else:
            await assembly.gateway.inverter.close()
            assembly.close()


def _not_assembled(console: Console, err: InputError) -> None:
    """A configuration problem found only when building the gateway (a file changed since the
    configuration step, say): a failure of the configuration, never of the step that was next, and
    every step that needs the gateway shown as not run."""
    console.step(Step.CONFIG, [failed(Step.CONFIG, "gateway assembled", problem, "fix the key named, then "
                                      "commission again (`powershare-gw check-config FILE` lists every problem)")
                               for problem in err.problems])
    _skip_the_rest(console, "needs the gateway, which could not be built from the configuration")


def _skip_the_rest(console: Console, why: str) -> None:
    """Every step not told yet, shown as not run and why: the summary counts what was never checked."""
    for step in Step:
        if not console.report.of(step):
            console.step(step, [skipped(step, step.title, why)])


def _interrupted(console: Console, stop: asyncio.Event, step: Step, judged_by: Step | None = None) -> bool:
    """A stop signal (`tasks.stop_signals`): nothing more is tried (the caller's clean-up still takes the
    inverter to 0 W) and the steps not reached are shown as not run, on the terminal as in the report (the
    terminal left them out and counted "0 skipped" where the report had them skipped). `step` (under way,
    or next) fails as interrupted, unless `judged_by` ran and so judged the signal itself (the sign test
    does): an interrupted run never reads as passed, nor fails twice for one signal."""
    if not stop.is_set():
        return False
    if judged_by is None or console.report.step_outcome(judged_by) is Outcome.SKIPPED:
        console.step(step, [interrupted(step)])
    _skip_the_rest(console, "not run: commissioning was stopped by a signal")
    return True


async def _sign_test(assembly: Assembly, args: argparse.Namespace, console: Console,
                     stop: asyncio.Event) -> Service | None:
    """The test discharge on the running gateway, with no aggregator connected (nothing else may
    dispatch meanwhile). Returns the service it started, for the caller to stop."""
    report = console.report
    if not args.allow_test_discharge:
        console.step(Step.SIGN, [skipped(Step.SIGN, "test discharge", "not asked for (--allow-test-discharge)")])
        return None
    if any(report.step_outcome(s) is Outcome.FAIL for s in (Step.CAN, Step.INVERTER)):
        console.step(Step.SIGN, [skipped(Step.SIGN, "test discharge", "needs the CAN and inverter checks to pass")])
        return None
    console.say(f"-- test discharge: {args.discharge_w:g} W for {args.discharge_seconds:g} s through the core ...")
    service = Service(assembly, RunOptions(owner_api=False, integrations=False))
    await service.start()
    observed = await probes.sign_test(service, args.discharge_w, args.discharge_seconds, stop)
    console.step(Step.SIGN, judgement.judge_sign(observed))
    return service


async def _without_bus(config: Config, console: Console, where: str, window_s: float, err: InputError, *,
                       judged: bool = False) -> None:
    """The CAN bus cannot be opened, so the gateway cannot be assembled: the inverter is still asked,
    with the gateway's client on its own; what needs the gateway is skipped."""
    from firmware_py.inverter.client import InverterClient

    problems = "; ".join(err.problems)
    if judged:  # observed, then gone when the gateway opened it
        problems = f"{problems} (when opened again for the gateway, after the observation)"
    console.step(Step.CAN, judgement.judge_can(judgement.CanObservation(
        where, config.vehicle.dbc, window_s, open_error=problems), []))
    client = InverterClient(config.inverter, time.monotonic)
    try:
        console.step(Step.INVERTER, judgement.judge_inverter(await probes.probe_inverter(client, config.inverter)))
    finally:
        await client.close()
    console.step(Step.SIGN, [skipped(Step.SIGN, "test discharge", f"needs the CAN bus: {problems}")])
    console.step(Step.DISPATCH, [skipped(Step.DISPATCH, "aggregator interfaces", "needs the CAN bus open "
                                         "(the gateway they serve cannot be assembled without it)")])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("commission", help="check an installation step by step and report pass/fail",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the gateway's TOML configuration")
    p.add_argument("--report", default=None, metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--allow-test-discharge", action="store_true",
                   help="run the sign self-test: a small discharge through the gateway's core")
    p.add_argument("--discharge-w", type=float, default=DEFAULT_DISCHARGE_W,
                   help=f"the test discharge's power (default {DEFAULT_DISCHARGE_W:g} W; the core caps it and "
                        "refuses it at or below the floor)")
    p.add_argument("--discharge-seconds", type=float, default=DEFAULT_DISCHARGE_S,
                   help=f"how long the test discharge lasts (default {DEFAULT_DISCHARGE_S:g} s)")
    p.add_argument("--can-seconds", type=float, default=DEFAULT_CAN_S,
                   help=f"how long the CAN bus is observed (default {DEFAULT_CAN_S:g} s; at least {WINDOW_PERIODS} "
                        "periods of the slowest BMS message)")
    p.add_argument("-v", "--verbose", action="store_true", help="the gateway's own log lines too (stderr)")
    p.set_defaults(handler=_commission)
