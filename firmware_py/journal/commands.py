"""`powershare-gw report`: per-event energy and timeline from a journal, and its chain check.

The journal is read as one chain over all its segments (`chain.Chain`), a page at
a time: its memory does not grow with the journal's length. The check covers the
hash chain of every segment, the links between segments, and the signed anchors
beside them (a tail cut back shows there).

Exit codes (docs/command-line.md): 0 the chain is intact, 1 it is broken (the report is
still printed, so an operator sees what the damaged journal claims), 2 the file
is missing or not a journal, or `--event` names no event in it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace

from firmware_py.errors import InputError
from firmware_py.journal import codec
from firmware_py.journal.chain import Chain, ChainReport
from firmware_py.journal.codec import time_text
from firmware_py.journal.owner_log import OWNER_KINDS, OwnerChange, owner_changes
from firmware_py.journal.runs import KINDS as RUN_KINDS
from firmware_py.journal.runs import Run, Upgrade, runs_and_upgrades, software_line
from firmware_py.journal.summary import EventSummary, event_summaries
from firmware_py.quoting import printable

CSV_COLUMNS = ("request_id", "source", "kind", "target_w", "revision", "start", "end", "verdict", "cap_w",
               "reason", "ended_at", "ended_reason", "meter_wh", "integrated_wh", "final", "discrepancy_pct")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="per-event delivered energy and timeline from a journal; verifies its hash chain")
    p.add_argument("--journal", required=True, metavar="FILE", help="the journal SQLite file")
    p.add_argument("--event", metavar="ID", help="only this dispatch event (request id)")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text",
                   help="text (default) for people; json or csv for machines")
    p.set_defaults(handler=report)


Software = tuple[list[Run], list[Upgrade]]
Printer = Callable[[list[EventSummary], ChainReport, list[OwnerChange], Software], None]


def report(args: argparse.Namespace) -> int:
    """Print the report in the chosen format; 1 when the chain is broken or a record cannot be read."""
    chain = Chain(args.journal)
    verdict = chain.check()
    printer = {"text": _print_text, "json": _print_json, "csv": _print_csv}[args.format]
    try:
        events = event_summaries(chain, only=args.event)
        # One event's report: its timeline already holds the changes made while it ran.
        changes = [] if args.event is not None else owner_changes(chain.iter_records(OWNER_KINDS))
        software = runs_and_upgrades(chain.iter_records(RUN_KINDS))
    except InputError:
        if not verdict.problems:
            raise
        events, changes, software = [], [], ([], [])  # the damage the check reported also hides them: exit 1
    except codec.DAMAGED_VALUE as damage:
        return _unreadable(printer, verdict, damage)
    if args.event is not None and not events and not verdict.problems:  # damage may hide it: exit 1 below
        raise InputError(f"{args.journal}: --event: no dispatch event with id {args.event!r} in this journal")
    try:
        with _held_output() as (out, err):
            printer(events, verdict, changes, software)
    except codec.DAMAGED_VALUE as damage:
        return _unreadable(printer, verdict, damage)
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())
    return 1 if verdict.problems else 0


def _unreadable(printer: Printer, verdict: ChainReport, damage: Exception) -> int:
    """The report of a journal with a value an edit left that no record of its kind holds: the chain's
    verdict with that problem added, no events (exit 1)."""
    problem = f"{codec.unreadable(damage)}; events not shown"
    printer([], replace(verdict, problems=[*verdict.problems, problem]), [], ([], []))
    return 1


@contextlib.contextmanager
def _held_output() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Standard output and error held back until the whole report is made (so a damaged record found
    half-way through leaves no half report)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def chain_line(count: int, problems: list[str]) -> str:
    if not problems:
        return f"chain: intact ({count} records)"
    noun = "problem" if len(problems) == 1 else "problems"
    return f"chain: BROKEN ({count} records, {len(problems)} {noun})"


def anchor_lines(verdict: ChainReport) -> list[str]:
    """Where the chain was last anchored and by which key; which segments it spans."""
    lines = []
    if len(verdict.segments) > 1 or verdict.pruned_through:
        files = ", ".join(s.file for s in verdict.segments)
        pruned = f"; segments 1..{verdict.pruned_through} pruned by retention" if verdict.pruned_through else ""
        lines.append(f"segments: {len(verdict.segments)} ({files}){pruned}")
    newest = verdict.newest_anchor
    if newest is None:
        lines.append("anchor: none (a journal written before anchors, or an empty one)")
    else:
        how = "verified with the key file" if verdict.key_checked else \
            "verified with the anchors' own key (key file not readable here)"
        when = f"{newest.why}, {_time(newest.wall)}"
        lines.append(f"anchor: newest at record {newest.seq} ({when}), key {newest.key[:16]}…, {how}")
    return lines


def _print_text(events: list[EventSummary], verdict: ChainReport, changes: list[OwnerChange],
                software: Software) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text is never parsed as markup: ids and texts came from aggregators.

    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160, highlight=False)
    table = Table(title="Dispatch events", title_justify="left")
    for name, justify in (("event", "left"), ("source", "left"), ("kind", "left"), ("target W", "right"),
                          ("answer", "left"), ("start", "right"), ("end", "right"), ("meter Wh", "right"),
                          ("integrated Wh", "right"), ("diff %", "right"), ("final", "left")):
        table.add_column(name, justify=justify)
    for e in events:
        table.add_row(printable(e.request_id), printable(e.source or "-"), printable(e.kind or "-"),
                      _num(e.target_w, 0), printable(_answer(e)),
                      _time(e.start), _time(e.closed_at),
                      f"{e.meter_wh:.1f}", f"{e.integrated_wh:.1f}", _num(e.discrepancy_pct, 2),
                      "yes" if e.final else "no")
    console.print(table, markup=False)
    for e in events:
        timeline = Table(title=Text(f"Timeline: {printable(e.request_id)}"), title_justify="left")
        timeline.add_column("at", justify="right")
        timeline.add_column("seq", justify="right")
        timeline.add_column("record")
        timeline.add_column("what")
        for entry in e.timeline:
            timeline.add_row(_time(entry.at), str(entry.seq), entry.kind, printable(entry.text))
        console.print(timeline, markup=False)
    if changes:
        table = Table(title="Owner and installer changes", title_justify="left")
        for name, justify in (("at", "right"), ("seq", "right"), ("what", "left")):
            table.add_column(name, justify=justify)
        for change in changes:
            table.add_row(_time(change.at), str(change.seq), printable(change.text))
        console.print(table, markup=False)
    if (line := software_line(*software)) is not None:
        console.print(printable(line), markup=False, soft_wrap=True)
    for line in anchor_lines(verdict):
        console.print(line, markup=False, soft_wrap=True)
    console.print(chain_line(verdict.records, verdict.problems), markup=False)
    for problem in verdict.problems:
        console.print(f"  - {printable(problem)}", markup=False)


def _print_json(events: list[EventSummary], verdict: ChainReport, changes: list[OwnerChange],
                software: Software) -> None:
    newest = verdict.newest_anchor
    document = {
        "chain": {"intact": not verdict.problems, "records": verdict.records, "problems": verdict.problems},
        "journal": {  # what the chain check walked (beside the contract's "chain", never inside it)
            "head": {"seq": verdict.head_seq, "hash": verdict.head_hash},
            "segments": [{"number": s.number, "file": s.file, "records": s.records, "first_seq": s.first_seq,
                          "last_seq": s.last_seq, "anchor_lines": s.anchor_lines} for s in verdict.segments],
            "pruned_through_segment": verdict.pruned_through,
            "anchor": None if newest is None else {**newest.body(), "key_checked": verdict.key_checked},
            "runs": [asdict(run) for run in software[0]],
            "schema_upgrades": [asdict(upgrade) for upgrade in software[1]],
        },
        "events": [asdict(e) for e in events],
        "owner_changes": [asdict(c) for c in changes],
    }
    json.dump(codec.jsonable(document), sys.stdout, indent=2)
    sys.stdout.write("\n")


def _print_csv(events: list[EventSummary], verdict: ChainReport, changes: list[OwnerChange],
               software: Software) -> None:
    """One row per event (the owner's changes are in the text and JSON reports); the chain verdict goes to
    stderr so the CSV stays pure data."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for e in events:
        row = codec.jsonable({name: getattr(e, name) for name in CSV_COLUMNS})
        writer.writerow(_csv_cell(row[name]) for name in CSV_COLUMNS)
    for line in anchor_lines(verdict):
        print(line, file=sys.stderr)
    print(chain_line(verdict.records, verdict.problems), file=sys.stderr)
    for problem in verdict.problems:
        print(f"  - {problem}", file=sys.stderr)


def _csv_cell(value: object) -> object:
    """Empty for none, lower-case booleans as in the JSON output."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _answer(e: EventSummary) -> str:
    if e.verdict is None:
        return "-"
    text = e.verdict
    if e.cap_w is not None:
        text += f" {e.cap_w:.0f} W"
    return text + (f" {e.reason}" if e.reason else "")


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _time(at: float | None) -> str:
    if at is None:
        return "-"
    if at == float("inf"):
        return "open"
    return time_text(at)
