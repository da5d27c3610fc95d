"""`powershare-gw statement` and `statement verify` (docs/command-line.md).

A thin adapter: options in, the journal read by `make`, the figures by
`figures`/`document`, signed by `evidence`, rendered here.

Exit codes: 0 made / verified; 1 the journal's chain is broken (no statement is
made from it), or verification found a changed figure, a changed journal or a
wrong key; 2 bad input (a missing or unreadable file, a bad option).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from firmware_py import config as config_module
from firmware_py.config import Config
from firmware_py.errors import InputError
from firmware_py.files import write_atomically
from firmware_py.journal import codec
from firmware_py.journal.chain import Chain
from firmware_py.journal.files import statement_key_path
from firmware_py.quoting import printable
from firmware_py.statements import evidence
from firmware_py.statements.document import Selection, month_period, range_period
from firmware_py.statements.earnings import basis_of
from firmware_py.statements.figures import ProgramTerms, iso
from firmware_py.statements.make import Basis, NoSuchEvent, differences, recompute, statement_from_journal
from firmware_py.statements.reading import HeadBound

CSV_COLUMNS = ("id", "source", "kind", "window_from", "window_to", "answer", "cap_w", "reason", "status",
               "delivered_wh", "integrated_wh", "avg_w", "peak_w", "soc_start_pct", "soc_end_pct", "soc_min_pct",
               "floor_pct", "throughput_wh", "equivalent_cycles", "outage_wh", "credited_wh", "credit",
               "wear_cost", "net", "notes")
EXIT_OK, EXIT_FAILED = 0, 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("statement", help="a signed bill-credit statement from the journal; `statement verify FILE`",
                       description="A signed bill-credit statement per event, month or date range "
                                   "(docs/command-line.md). `powershare-gw statement verify FILE [--journal FILE]` "
                                   "checks one.")
    p.add_argument("--journal", metavar="FILE", help="the journal SQLite file (default: [journal] path of --config)")
    p.add_argument("--config", metavar="FILE", help="the gateway's configuration: [program] terms and the journal")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--month", metavar="YYYY-MM", help="a calendar month, UTC (default: the newest record's)")
    which.add_argument("--event", metavar="ID", help="one dispatch event (request id)")
    which.add_argument("--from", dest="start", metavar="DATE", help="from this date or ISO time (with --to)")
    p.add_argument("--to", dest="end", metavar="DATE", help="to this date (included) or ISO time (excluded)")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text")
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    p.set_defaults(handler=make_statement)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    v = actions.add_parser("verify", help="check a JSON statement's signature and, with --journal, every figure")
    v.add_argument("statement", metavar="FILE", help="the JSON statement")
    v.add_argument("--journal", metavar="FILE", help="recompute every figure from this journal")
    v.add_argument("--public-key", metavar="HEX", help="the gateway's statement key as pinned from an earlier "
                                                       "statement: the statement must be signed by it")
    v.set_defaults(handler=verify_statement)


# ---------------------------------------------------------------- making


def make_statement(args: argparse.Namespace) -> int:
    config = _config_of(args)
    journal, basis = _basis_from(args, config)
    if args.out is not None:
        _refuse_kept(Path(args.out), journal, config)
    chain = Chain(journal)
    verdict = chain.check()
    if verdict.problems:
        print(f"error: {journal}: the journal's chain is broken; a statement made from it would not hold up:",
              file=sys.stderr)
        for problem in verdict.problems:
            print(f"  - {printable(problem)}", file=sys.stderr)
        return EXIT_FAILED
    selection = _selection(args, time.time())  # a bad option is bad input (exit 2), never a damaged journal
    if verdict.pruned_through and selection.period is not None:
        _refuse_pruned(chain, selection.period.start)
    key = evidence.load_or_create_key(statement_key_path(journal))
    try:
        unsigned = statement_from_journal(chain, selection, basis, verdict.head_seq, verdict.head_hash)
    except codec.DAMAGED_VALUE as damage:
        print(f"error: {journal}: {codec.unreadable(damage)}; a statement made from it would not hold up",
              file=sys.stderr)
        return EXIT_FAILED
    signed = evidence.sign(unsigned, key)
    text = {"json": render_json, "csv": render_csv, "text": render_text}[args.format](signed)
    _write(text, args.out)
    return EXIT_OK


def _refuse_kept(out: Path, journal: Path, config: Config | None) -> None:
    """--out naming a file the gateway keeps is refused before anything is written: the statement would
    replace the journal it proves, or the key that signs it (`statement --out j.sqlite`, a tab too few)."""
    from firmware_py.assembly import journal_part, kept_file_named

    part = journal_part(out, journal)
    what = None if part is None else f"{part} of the journal {journal}"
    if what is None and config is not None:
        what = kept_file_named(str(out), config)
    if what is not None:
        raise InputError(f"--out {out}: is {what}: the statement would replace it; give another file name")


def _config_of(args: argparse.Namespace) -> Config | None:
    return config_module.load(args.config) if args.config else None


def _basis_from(args: argparse.Namespace, config: Config | None) -> tuple[Path, Basis]:
    if config is not None:
        return basis_of(config, args.journal)
    if not args.journal:
        raise InputError("statement: give --journal FILE (or --config FILE naming one)")
    journal = Path(args.journal)
    return journal, Basis(ProgramTerms(), {"name": None, "journal": journal.name})


def _selection(args: argparse.Namespace, now: float) -> Selection:
    """The events asked for; a period that has not begun at `now` (wall time) is refused: signed, its
    statement would say that nothing happened in a month no one has lived yet (a year typed wrong)."""
    if (args.start is None) != (args.end is None):
        raise InputError("statement: --from and --to go together")
    if args.event is not None:
        return Selection(event=args.event)
    if args.month is not None:
        option, period = f"--month {args.month}", month_period(args.month)
    elif args.start is not None:
        option, period = f"--from {args.start}", range_period(args.start, args.end)
    else:
        return Selection()
    if period.start > now:
        raise InputError(f"statement: {printable(option)}: begins {iso(period.start)}, after now ({iso(int(now))}): "
                         "nothing has happened in it yet")
    return Selection(period=period)


def _refuse_pruned(chain: Chain, start: float) -> None:
    """A period reaching back before what the retention policy left: signed, its statement would say that
    nothing (or less) happened, of records deleted as the policy meant them to be."""
    oldest = chain.oldest_held()
    if oldest is not None and start < oldest.wall:
        raise InputError(f"statement: the period begins {iso(start)}, before the oldest record the journal still "
                         f"holds ({iso(oldest.wall)}): the records before it were pruned by the journal's retention "
                         "policy ([journal] retain_days), so a statement of it would leave out what they held")


def _write(text: str, out: str | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    try:
        write_atomically(out, text)
    except OSError as err:
        raise InputError(f"{out}: cannot write the statement: {err.strerror or err}") from None


# ---------------------------------------------------------------- verifying


def verify_statement(args: argparse.Namespace) -> int:
    statement = _read_statement(Path(args.statement))
    signer = _expected_signer(args)
    problems = []
    bad_signature = evidence.signature_problem(statement)
    if bad_signature:
        problems.append(bad_signature)
    problems += _signer_problems(statement, signer, args.journal)
    if args.journal:
        problems += _journal_problems(Path(args.journal), statement)
    if problems:
        print(f"{args.statement}: FAILED verification", file=sys.stderr)
        for problem in problems:
            print(f"  - {printable(problem)}", file=sys.stderr)
        return EXIT_FAILED
    scope = "signature good and every figure follows from the journal" if args.journal else \
        "signature good (give --journal FILE to check the figures against the journal too)"
    whose = f" ({signer[1]})" if signer else \
        " (the key the statement names: give --public-key HEX to check it is the gateway's)"
    print(f"{args.statement}: verified: {scope}; signed by {statement['public_key'][:16]}…{whose}, "
          f"journal head {str(statement.get('journal_head'))[:16]}… (record {statement.get('journal_seq')})")
    return EXIT_OK


def _expected_signer(args: argparse.Namespace) -> tuple[str, str] | None:
    """The key the statement must be signed by, and what it is: the one pinned on the command line,
    else the one beside the journal when it is readable here (its public half: the file need not be
    private to the verifier, only to the gateway that signs with it)."""
    if args.public_key is not None:
        pinned = args.public_key.strip().lower()
        if len(pinned) != 64 or any(ch not in "0123456789abcdef" for ch in pinned):
            raise InputError(f"--public-key: expected the 64 hex digits of an Ed25519 public key (a statement's "
                             f"public_key), got {args.public_key!r}")
        return pinned, "the pinned key"
    if args.journal:
        beside = statement_key_path(Path(args.journal))
        found = evidence.readable_public_key(beside)
        if found is not None:
            return found, f"this gateway's statement key, {beside.name}"
    return None


def _signer_problems(statement: dict[str, Any], signer: tuple[str, str] | None, journal: str | None) -> list[str]:
    """Whose signature it is: anyone can sign a statement with a key of their own, so figures that follow from
    a journal prove nothing about the rates and credits unless the key is the gateway's."""
    if signer is None:
        if not journal:
            return []  # the signature alone was asked for, and the output says whose key it names
        where = statement_key_path(Path(journal)).name
        return [f"the signing key was not checked: {where} is not readable here; give --public-key HEX (the "
                "gateway's statement key, pinned from a statement you trust)"]
    key, what = signer
    named = str(statement.get("public_key", ""))
    if named.lower() != key:
        return [f"signed by key {named[:16]}…, not by {what} {key[:16]}…"]
    return []


def _read_statement(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise InputError(f"{path}: no such statement file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the statement: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path}: not a JSON statement (make one with --format json): {err}") from None
    except RecursionError:
        document = None
    if document is None or _depth(document) > MAX_DEPTH:
        raise InputError(f"{path}: not a JSON statement (nested deeper than any statement is)")
    if not isinstance(document, dict) or "signature" not in document or "public_key" not in document:
        raise InputError(f"{path}: not a signed statement (no signature or public_key)")
    if malformed := _malformed(document):
        raise InputError([f"{path}: a malformed statement: {m}" for m in malformed])
    return document


_SHAPE: dict[str, tuple[type, str]] = {"journal_seq": (int, "a whole number"), "journal_head": (str, "text"),
                                       "currency": (str, "text"), "events": (list, "a list"),
                                       "totals": (dict, "an object"), "period": (dict, "an object")}
_FIGURE_ENDS = ("_wh", "_w", "_pct", "credit", "wear_cost", "net", "_cycles")


def _malformed(statement: dict[str, Any]) -> list[str]:
    """Fields of the wrong type, named: such a file is bad input (exit 2), not a changed figure (exit 1),
    and its `journal_seq` must not be read as a record the journal lacks ("cut back")."""
    def kind(value: Any) -> str:
        return "null" if value is None else type(value).__name__
    problems = [f"{key} is {printable(repr(value)[:40])} ({kind(value)}), not {wanted}"
                for key, (of_type, wanted) in _SHAPE.items()
                if key in statement and (not isinstance(value := statement[key], of_type) or isinstance(value, bool))]
    if isinstance(seq := statement.get("journal_seq"), int) and seq < 0:
        problems.append(f"journal_seq is {seq}: a record number is 0 or more")
    for n, event in enumerate(statement.get("events") if isinstance(statement.get("events"), list) else []):
        if not isinstance(event, dict):
            problems.append(f"events[{n}] is {kind(event)}, not an object")
            continue
        problems += [f"events[{n}].{key} is {printable(repr(value)[:40])} ({kind(value)}), not a number"
                     for key, value in event.items() if key.endswith(_FIGURE_ENDS) and value is not None
                     and (isinstance(value, bool) or not isinstance(value, (int, float)))]
    return problems


MAX_DEPTH = 8
"""A statement nests 4 deep (statement, events, an event, its window); checking one nested deeper
would only exhaust the stack."""


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)]
    return depth - 1


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is refused: a reader would see one value, the check another."""
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"the key {key!r} is given twice in one object")
        document[key] = value
    return document


def _journal_problems(journal: Path, statement: dict[str, Any]) -> list[str]:
    chain = Chain(journal)
    verdict = chain.check()
    problems = [f"journal: {p}" for p in verdict.problems]
    seq = statement.get("journal_seq")
    if not isinstance(seq, int) or seq > verdict.head_seq:
        return [*problems, f"journal_seq {seq!r}: the journal holds records up to {verdict.head_seq} only "
                           "(cut back, or another journal)"]
    if verdict.pruned_through and (oldest := chain.oldest_held()) is not None and seq < oldest.seq:
        return [*problems, f"journal_seq {seq}: the last record the statement was made from was pruned by the "
                           f"journal's retention policy (the oldest held is record {oldest.seq}): its figures "
                           "cannot be checked against this journal any more"]
    unsigned = {k: v for k, v in statement.items() if k not in ("signature", "public_key")}
    try:
        computed = recompute(chain, unsigned)
    except codec.DAMAGED_VALUE as damage:
        return [*problems, f"journal: {codec.unreadable(damage)}: its figures cannot be recomputed"]
    except NoSuchEvent as missing:  # the statement's own event: this is another journal, or a changed one
        return [*problems, *_head_problems(chain, statement, seq),
                f"events: the journal holds no event {missing.event!r}"]
    except InputError as unreadable:  # (NoSuchEvent is one: caught first) a record the check found damaged
        if not problems:
            raise
        return [*problems, f"journal: {unreadable}: its figures cannot be recomputed"]
    return [*problems, *_head_problems(chain, statement, seq), *differences(unsigned, computed)]


def _head_problems(chain: Chain, statement: dict[str, Any], seq: int) -> list[str]:
    """Whether the journal's record `seq` is the one the statement was made up to."""
    actual_head = HeadBound(chain, seq).head_hash()
    if actual_head != statement.get("journal_head"):
        return [f"journal_head: record {seq} of the journal has hash {str(actual_head)[:16]}…, the "
                f"statement names {str(statement.get('journal_head'))[:16]}… (the journal was changed)"]
    return []


# ---------------------------------------------------------------- rendering


def render_json(statement: dict[str, Any]) -> str:
    return json.dumps(statement, indent=2, allow_nan=False) + "\n"


def render_csv(statement: dict[str, Any]) -> str:
    """One row per event, then a TOTAL row and an OUTAGE row (never credited)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for e in statement["events"]:
        row = {**e, "window_from": e["window"]["from"], "window_to": e["window"]["to"], "notes": "; ".join(e["notes"])}
        writer.writerow(_cell(row.get(name)) for name in CSV_COLUMNS)
    t = statement["totals"]
    writer.writerow(["TOTAL", "", "", statement["period"]["from"], statement["period"]["to"], "", "", "", "",
                     t["delivered_wh"], "", "", "", "", "", "", "", t["throughput_wh"], t["equivalent_cycles"], "",
                     t["credited_wh"], t["credit"], t["wear_cost"], t["net"], statement["currency"]])
    writer.writerow(["OUTAGE_BACKUP", "", "", "", "", "", "", "", "", statement["outage_backup_wh"], "", "", "", "",
                     "", "", "", "", "", statement["outage_backup_wh"], 0.0, 0.0, "", "", "never credited"])
    return out.getvalue()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""A spreadsheet runs a text cell beginning so as a formula (an event id is the aggregator's text)."""


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value  # shown as text, as OWASP advises for CSV
    return value


def render_text(statement: dict[str, Any]) -> str:
    """A statement a person reads: a block per event, then the totals and the evidence."""
    cur = statement["currency"]
    program = statement["program"]
    lines = [f"Bill-credit statement  {statement['period']['from']} .. {statement['period']['to']}",
             f"program: {program['name'] or '(none configured)'}  credit {program['credit_per_kwh']} {cur}/kWh, "
             f"wear {program['wear_cost_per_kwh']} {cur}/kWh",
             f"gateway: {statement['gateway'].get('name') or '-'}  journal {statement['gateway'].get('journal')}  "
             f"usable capacity {statement['gateway']['usable_capacity_wh']:.0f} Wh", ""]
    if not statement["events"]:
        lines += ["no dispatch events in this period", ""]
    for e in statement["events"]:
        lines += _event_text(e, cur)
    t = statement["totals"]
    lines += [f"TOTAL  {t['events']} events ({t['events_served']} served)  delivered {t['delivered_wh']:.1f} Wh  "
              f"credited {t['credited_wh']:.1f} Wh  throughput {t['throughput_wh']:.1f} Wh "
              f"({t['equivalent_cycles']:.4f} cycles)",
              f"       credit {t['credit']:.2f} {cur}  wear {t['wear_cost']:.2f} {cur}  net {t['net']:.2f} {cur}",
              f"OUTAGE BACKUP  {statement['outage_backup_wh']:.1f} Wh served to the home during grid outages "
              "(never credited)", *[f"note  {note}" for note in statement.get("notes", [])], "",
              f"journal head {statement['journal_head']} (record {statement['journal_seq']})",
              f"signed by {statement['public_key']}",
              f"signature {statement['signature']}",
              "check it: powershare-gw statement verify FILE.json --journal JOURNAL (make FILE.json with --format json)"]
    return "\n".join(printable(line) for line in lines) + "\n"


def _event_text(e: dict[str, Any], cur: str) -> list[str]:
    answer = e["answer"] or "no answer"
    if e["cap_w"] is not None:
        answer += f" (cap {e['cap_w']:.0f} W)"
    if e["reason"]:
        answer += f" {e['reason']}"
    lines = [f"event {e['id']}  [{e['status']}]  from {e['source']}: {e['kind']} {_fmt(e['target_w'], 'W', 0)}  "
             f"answer {answer}",
             f"  window   {e['window']['from']} .. {e['window']['to']}",
             f"  energy   delivered {e['delivered_wh']:.1f} Wh (meter), integrated {e['integrated_wh']:.1f} Wh, "
             f"difference {e['delivered_wh'] - e['integrated_wh']:+.1f} Wh; avg {e['avg_w']:.0f} W, "
             f"peak {_fmt(e['peak_w'], 'W', 0)}",
             f"  battery  SoC {_fmt(e['soc_start_pct'], '%')} -> {_fmt(e['soc_end_pct'], '%')}, "
             f"min {_fmt(e['soc_min_pct'], '%')} (floor {_fmt(e['floor_pct'], '%')}); throughput "
             f"{e['throughput_wh']:.1f} Wh = {e['equivalent_cycles']:.4f} equivalent full cycles",
             f"  money    credited {e['credited_wh']:.1f} Wh -> credit {e['credit']:.2f} {cur}, "
             f"wear {e['wear_cost']:.2f} {cur}, net {e['net']:.2f} {cur}"]
    if e["outage_wh"] > 0:
        lines.append(f"  outage   {e['outage_wh']:.1f} Wh during a grid outage: not credited")
    lines += [f"  note     {note}" for note in e["notes"]]
    return [*lines, ""]


def _fmt(value: float | None, unit: str, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} {unit}".replace(" %", " %")
