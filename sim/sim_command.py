"""`powershare-gw sim`: the whole bench in one command, and its parts run alone.

With no arguments it runs the bundled default scenario and writes
`summary.json` and `plot.png` to the current directory. Exit codes per
docs/command-line.md: 0 when every `[expect]` check passed, 1 when one failed, 2 when
the scenario (or an output path) is bad.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from firmware_py.arguments import number
from firmware_py.errors import InputError
from firmware_py.files import cannot_make_beside, replacing, write_atomically
from firmware_py.quoting import printable
from firmware_py.tasks import run_stoppable


def register(sub: argparse._SubParsersAction) -> None:
    from firmware_py.sim import bms_node, inverter

    p = sub.add_parser("sim", help="run the whole bench simulator (or one of its parts)",
                       description="Run a scenario on the simulated bench: pack + BMS on CAN, inverter on "
                                   "Modbus TCP, the real gateway runtime and journal, a scripted aggregator.")
    p.add_argument("--scenario", help="scenario TOML (default: the bundled summer-peak.toml); "
                                      "a bare name picks a bundled one, see --list")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=number(0, 1e6, above=True),
                      help="run at this many times real time (default: as fast as possible)")
    pace.add_argument("--realtime", action="store_true", help="run in real time (same as --speed 1)")
    p.add_argument("--trace", type=Path, help="write the JSON Lines trace here")
    p.add_argument("--summary", type=Path, help="write the JSON summary here")
    p.add_argument("--plot", type=Path, help="draw SoC, floor and power to this PNG (needs the [plot] extra)")
    p.add_argument("--journal", type=Path, help="the run's journal (default: bench-journal.sqlite here)")
    p.add_argument("--list", action="store_true", help="list the bundled scenarios and exit")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve the simulated gateway's Prometheus metrics at "
                                                          "http://HOST:PORT/metrics while it runs (e.g. "
                                                          "127.0.0.1:9108, with --realtime)")
    p.set_defaults(handler=_sim)
    parts = p.add_subparsers(dest="sim_part", metavar="PART")
    bms_node.register(parts)
    inverter.register(parts)


def _sim(args: argparse.Namespace) -> int:
    from firmware_py.sim import scenario

    if args.list:
        for name in scenario.bundled_names():
            print(name.removesuffix(".toml"))  # as `--scenario` takes it and the docs name it
        return 0
    default_run = args.scenario is None  # the newcomer's run: summary and plot land here
    summary_path = args.summary or (Path("summary.json") if default_run else None)
    plot_path = args.plot or (Path("plot.png") if default_run else None)
    scenario_path = scenario.find(args.scenario)
    loaded = scenario.load(scenario_path)
    check_outputs({"--summary": summary_path, "--plot": plot_path, "--trace": args.trace,
                    "--journal": args.journal or DEFAULT_JOURNAL}, plot_path, read={"--scenario": scenario_path})
    speed = 1.0 if args.realtime else args.speed
    outcome, series = run_stoppable(_run(loaded, args, speed))  # SIGTERM too unwinds it: no partial trace left
    _report(outcome, loaded)
    if summary_path:
        _write(summary_path, json.dumps({**outcome.summary, "checks": [
            {"check": name, "ok": ok, "detail": detail} for name, ok, detail in outcome.checks]}, indent=2) + "\n")
    if plot_path:
        from firmware_py.sim.plot import draw

        draw(series, outcome.summary["faults"], f"{loaded.name}: delivered "
             f"{sum(outcome.summary['delivered_wh'].values()) / 1000:.1f} kWh", plot_path)
    for path, what in ((summary_path, "summary"), (plot_path, "plot"), (args.trace, "trace")):
        if path:
            print(f"{what}: {path}")
    print(f"journal: {outcome.summary['journal']}  (verify: powershare-gw report --journal "
          f"{outcome.summary['journal']})")
    return 0 if outcome.passed else 1


PLOT_FORMATS = (".png", ".svg", ".pdf")
DEFAULT_JOURNAL = Path("bench-journal.sqlite")


def check_outputs(outputs: dict[str, Path | None], plot_path: Path | None = None,
                  read: dict[str, Path] | None = None) -> None:
    """Every file the run will write is writable where asked, each its own, none a file it reads (`read`: the
    scenario) or one of the journal's own (its anchors, key, lock), and the journal's place free for a bench
    journal: checked before an hour-long run (and before any file is opened), not after. `--summary my.toml`
    replaced the hand-written scenario with JSON; `--summary j.sqlite.anchors`, the journal's anchors."""
    from firmware_py.sim.simulation import check_bench_journal, lock_bench_journal

    from firmware_py.journal.files import lock_path, part_of

    problems, taken = [], {path.resolve(): option for option, path in (read or {}).items()}
    journal = outputs.get("--journal")
    for option, path in outputs.items():
        if path is None:
            continue
        kept = part_of(journal.resolve(), path.resolve()) if journal is not None and option != "--journal" else None
        if path.is_dir():
            problems.append(f"{path}: is a folder; give a file name")
        elif not path.resolve().parent.is_dir():
            problems.append(f"{path}: cannot write: folder {path.resolve().parent} does not exist")
        elif path.resolve() in taken:
            problems.append(f"{path}: given to both {taken[path.resolve()]} and {option}; give each its own file")
        elif kept is not None:
            problems.append(f"{path}: given to {option} is {kept} of the journal {journal}; give another file")
        elif (refused := cannot_make_beside(path)) is not None:
            problems.append(f"{path}: cannot write: {refused}")
        taken.setdefault(path.resolve(), option)
    if outputs.get("--journal") is not None and not problems:
        try:
            # In use by another run: say so, not "not a bench journal" of a journal that run is making. Only
            # a lock file already there can be held; none is made for a journal refused next.
            if lock_path(outputs["--journal"]).exists():
                lock_bench_journal(outputs["--journal"]).close()
            check_bench_journal(outputs["--journal"])
        except InputError as err:
            problems += err.problems
    if plot_path is not None:
        if plot_path.suffix.lower() not in PLOT_FORMATS:
            problems.append(f"{plot_path}: --plot draws {', '.join(PLOT_FORMATS)} files, "
                            f"not {plot_path.suffix or 'a file without a suffix'}")
        if importlib.util.find_spec("matplotlib") is None:
            problems.append(f"{plot_path}: cannot draw the plot: matplotlib is not installed "
                            "(pip install 'powershare-gw[plot]')")
    if problems:
        raise InputError(problems)


async def _run(loaded, args: argparse.Namespace, speed: float | None):
    from firmware_py.sim.aggregators import for_scenario
    from firmware_py.sim.progress import Progress
    from firmware_py.journal import JournalWriteError
    from firmware_py.sim.simulation import Simulation, SimulationOptions

    journal = args.journal or DEFAULT_JOURNAL
    progress = None if args.quiet or not sys.stderr.isatty() else Progress(loaded)
    try:
        with _output(args.trace) as trace:
            options = SimulationOptions(speed=speed, trace=trace, journal_path=journal.resolve(),
                                        on_progress=progress.update if progress else None,
                                        aggregator=for_scenario(loaded), metrics_listen=args.metrics)
            try:
                outcome = await Simulation(loaded, options).run()
            except JournalWriteError as err:  # the journal's disk or file, not the scenario: exit 2, one line
                raise InputError(f"{journal}: cannot write the journal: {err}") from None
    finally:
        if progress:
            progress.close()
    return outcome, options.series


def _report(outcome, loaded) -> None:
    from firmware_py.sim.simulation import seconds_or_never
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def plain(text: object) -> str:
        """Event ids and answers came from an aggregator: inert on the terminal, never markup."""
        return escape(printable(str(text)))

    s = outcome.summary
    table = Table(title=f"scenario {plain(loaded.name)}: {s['sim_s'] / 3600:.2f} h simulated in {s['wall_s']:.1f} s "
                        f"({s['speed_x']}x)")
    table.add_column("what")
    table.add_column("value")
    for event_id, wh in s["delivered_wh"].items():
        detail = s["answer_details"].get(event_id) or {}
        table.add_row(plain(f"event {event_id}"), plain(f"{wh / 1000:.2f} kWh delivered "
                                                         f"({detail.get('text', 'no answer')})"))
    for event_id, detail in s["answer_details"].items():
        if detail and event_id not in s["delivered_wh"]:
            table.add_row(plain(f"event {event_id}"), plain(detail["text"]))
    table.add_row("SoC", f"min {s['min_soc_pct']:.2f} %, final {s['final_soc_pct']:.2f} %")
    table.add_row("floor violations", str(s["floor_violations"]))
    for f in s["faults"]:
        seen = "never detected" if f["detected_after_s"] is None else \
            f"detected after {f['detected_after_s']} s, safe after {seconds_or_never(f['safe_after_s'])}"
        table.add_row(f"fault {f['kind']} at {f['at_s']:g} s", seen)  # the summary's figure, not a third one
    table.add_row("final state", s["final_state"])
    for name, ok, detail in outcome.checks:
        table.add_row(plain(f"check: {name}"), f"[{'green' if ok else 'red'}]{'pass' if ok else 'FAIL'}[/] {plain(detail)}")
    Console().print(table)


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[TextIO | None]:
    """The trace, written beside `path` and put in place only when the run ends well: opened before
    the bench is built, it emptied a file given by mistake even when the run then failed to start
    (a metrics port in use), and a failed run left a partial trace. A failure of the run itself
    passes through as it is; only opening or placing the file is said to be this file's."""
    if path is None:
        yield None
        return
    run_failed = False
    try:
        with replacing(path) as out:
            try:
                yield out
            except BaseException:
                run_failed = True
                raise
    except OSError as err:
        if run_failed:
            raise
        raise InputError(f"{path}: cannot write: {err.strerror or err}") from None


def _write(path: Path, text: str) -> None:
    try:
        write_atomically(path, text)
    except OSError as err:
        raise InputError(f"{path}: cannot write: {err.strerror or err}") from None
