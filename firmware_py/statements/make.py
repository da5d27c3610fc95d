"""A statement from a journal, and the check that one still follows from it (the I/O around the figures)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from firmware_py.errors import InputError
from firmware_py.journal.chain import Chain
from firmware_py.statements.document import Selection, as_printed, compose, month_of, parse_iso
from firmware_py.statements.figures import Period, ProgramTerms, window
from firmware_py.statements.reading import HeadBound, read_facts, select_summaries
from firmware_py.version import software_version

DEFAULT_CAPACITY_WH = 123_000.0
"""Only when the journal holds no core start (which names the capacity the gateway ran with)."""


class NoSuchEvent(InputError):
    """The one event a statement was asked for is not in the journal: bad input when making one (the
    --event option), a changed or other journal when verifying one."""

    def __init__(self, journal: object, event: str):
        super().__init__(f"{journal}: --event: no dispatch event with id {event!r} in this journal")
        self.event = event


@dataclass(frozen=True)
class Basis:
    """What a statement is computed from besides the journal: the terms and who made it."""

    terms: ProgramTerms
    gateway: dict[str, Any]
    fallback_capacity_wh: float = DEFAULT_CAPACITY_WH
    software_version: str = ""


def statement_from_journal(chain: Chain, selection: Selection, basis: Basis, head_seq: int,
                           head_hash: str) -> dict[str, Any]:
    """The unsigned statement of `selection`, from the journal's records up to `head_seq`."""
    source = HeadBound(chain, head_seq)
    summaries = select_summaries(source, selection.event)
    if selection.event is not None and not summaries:
        raise NoSuchEvent(chain.live, selection.event)
    journal_end = source.newest()[1]
    period = selection.period
    if period is None:
        period = Period(*window(summaries[0], journal_end)) if selection.event is not None else month_of(journal_end)
    period = as_printed(period)  # before any figure: what verify reads back from the statement is what counted
    facts = read_facts(source, period, summaries)
    capacity = facts.capacity_wh or basis.fallback_capacity_wh
    return compose(facts.summaries, facts.ledger, facts.energy, basis.terms, capacity,
                   Selection(selection.event, period), basis.gateway, head_hash, head_seq,
                   basis.software_version or software_version())


def recompute(chain: Chain, statement: dict[str, Any]) -> dict[str, Any]:
    """The statement the journal gives for the same period, terms and head (InputError if malformed)."""
    try:
        period = statement["period"]
        selection = Selection(period.get("event"), Period(parse_iso(period["from"], "period.from"),
                                                          parse_iso(period["to"], "period.to")))
        program = statement["program"]
        terms = ProgramTerms(str(program["name"]), str(program["currency"]), float(program["credit_per_kwh"]),
                             float(program["wear_cost_per_kwh"]))
        gateway = {k: v for k, v in statement["gateway"].items() if k != "usable_capacity_wh"}
        basis = Basis(terms, gateway, _capacity(statement["gateway"]["usable_capacity_wh"]),
                      str(statement["software_version"]))
        head_seq, head_hash = int(statement["journal_seq"]), str(statement["journal_head"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
        raise InputError(f"the statement lacks or garbles a field: {err}") from None
    return statement_from_journal(chain, selection, basis, head_seq, head_hash)


def _capacity(value: Any) -> float:
    """The statement's usable capacity, which throughput and cycles are of where the journal names none (no core
    start): a capacity only if a positive, finite number of Wh; anything else (0, negative, NaN, Infinity,
    a word) is a garbled field, as a gateway's configuration refuses it."""
    try:
        capacity = float(value)
    except (TypeError, ValueError, OverflowError):
        capacity = math.nan
    if isinstance(value, bool) or not math.isfinite(capacity) or capacity <= 0:
        raise ValueError(f"gateway.usable_capacity_wh: {value!r} is not a positive number of Wh")
    return capacity


def differences(stated: Any, computed: Any, where: str = "") -> list[str]:
    """Every figure that differs, named by its path ("events[peak-1].credit")."""
    if isinstance(stated, dict) and isinstance(computed, dict):
        found = []
        for key in sorted(set(stated) | set(computed)):
            found += differences(stated.get(key), computed.get(key), f"{where}.{key}" if where else key)
        return found
    if isinstance(stated, list) and isinstance(computed, list) and where.endswith("events"):
        ids_s = [e.get("id") if isinstance(e, dict) else None for e in stated]
        ids_c = [e.get("id") for e in computed]
        if ids_s != ids_c:
            return [f"{where}: the statement lists {ids_s}, the journal gives {ids_c}"]
        return [d for s, c in zip(stated, computed) for d in differences(s, c, f"{where}[{c.get('id')}]")]
    if stated != computed:
        return [f"{where}: the statement says {stated!r}, the journal gives {computed!r}"]
    return []
