"""The gateway object: the pure core's inputs and outputs, and nothing that owns time.

The same `Gateway` serves `powershare-gw run` and the bench simulator; only who
calls it differs. The service (`service.py`) calls it from asyncio timers and a
python-can Notifier on the real clock; the simulation calls the same methods on
a simulated clock. Built by `assembly.assemble`, never by hand.

Paths through it:
- BMS data → `on_snapshot` (from the Notifier thread, hopped to the loop) or
  `on_frames` (the bench's batch) → one core step → the command writer wakes;
  the reader hands out a snapshot only when a field the core decides on
  changed, so nothing else asks "did anything change?" before the step;
- `tick` (timeouts, ramps, windows) and `poll_inverter` (status in, energy accounted);
- dispatch sources and the owner API → `submit` / `set_owner` → core step (a published
  price, `PriceInterval`, is submitted like a request and answered the same way);
- the local date → a `CalendarDay` ahead of the first step and of the first step of
  each new date (looked at again hourly, and at the next tick after the wall clock stepped): the core
  counts the owner's daily price budget by it, and has no wall clock of its own; at a start and after
  a step it carries what the journal holds as spent that date, so no date's budget is granted twice;
- a stepped wall clock (a board without RTC that boots with a wrong date until NTP), seen
  by the next tick → the owner settings file read again and fed like an owner change: the owner's times
  (departure, storm watch, opt-out) were placed on the core's line with the wrong offset
  at start, and would stay shifted by the whole correction (and be saved so at the next change);
- `write_command` → the inverter client, which writes when the value differs from
  what the inverter holds or its revert timer needs a refresh (the one output check).
Journal records are queued by each step (`journal.backlog`, which bounds the
bulk while writes fail) and written in batches off the hot path, after the
command: a slow disk never delays a safe stop. After a write
the gateway keeps the journal in shape: it rotates the live segment past
`[journal] segment_mb` (carrying the open events' accounts, which the core
names) and prunes archives past `retain_days`.

Reaction time (for the metrics): when a BMS snapshot changes the setpoint, the
gateway keeps where that started (the snapshot's decode, on the frame path's own
timestamp) and, once the inverter client has written the command, tells the
`reaction_observers` how long it took; nothing more is added to the frame path.

Time: the core runs on the monotonic clock of `clocks` (`self.clock`); each journal
record also gets its instant on the wall clock, for people. Watching for stalls
(`watch_stalls`, on in `run`): when a step comes longer than the policy's
`stall_gap_s` after the one before, the gateway itself was paused; the step then
carries a `Stall`, and the core decides what that means (see `core/machine.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import can

from firmware_py import heap
from firmware_py.bms.reader import BmsReader
from firmware_py.clocks import Clocks, calendar_day
from firmware_py.config import Config
from firmware_py.core import Controller, Policy, StepResult, step, telemetry
from firmware_py.core.energy import close_after_restart, close_at_stop, open_events, still_open
from firmware_py.core.telemetry import Telemetry
from firmware_py.core.types import (
    BmsSnapshot,
    CalendarDay,
    DispatchAnswer,
    DispatchCancel,
    DispatchEnded,
    DispatchRequest,
    EventEnergy,
    Input,
    InstallerReset,
    InverterCommand,
    InverterStatus,
    JournalHealth,
    OwnerSettings,
    PriceInterval,
    SiteLimit,
    Stall,
    Tick,
    Verdict,
)
from firmware_py.errors import InputError
from firmware_py.inverter.client import InverterClient
from firmware_py.journal import Journal, JournalWriteError, RecordKind, codec
from firmware_py.journal.backlog import Backlog, is_gap
from firmware_py.journal.steps import (
    START_KIND,
    STEPS_KIND,
    StepRecorder,
    start_payload,
)
from firmware_py.journal.summary import event_summaries
from firmware_py.links import Link, LinkBook
from firmware_py.owner.store import OwnerStore, on_clock
from firmware_py.statements.earnings import EarningsBook, basis_of
from firmware_py.status import status_document

log = logging.getLogger(__name__)

TICK_S = 0.1
JOURNALED_INPUTS = (DispatchRequest, DispatchCancel, OwnerSettings, InstallerReset, Stall, SiteLimit, PriceInterval)
PRICE_LOOKBACK_S = 2 * 86_400.0
"""How far before today's start a price may have been published for an event that ran today."""
DAY_RECHECK_S = 3_600.0
"""How often the date is looked at again even before the next one is due (a stepped wall clock)."""
MAINTAIN_RETRY_S = 60.0
"""After a rotation that could not be done (a reader holds the file, the disk is full), wait this long."""
WRITE_CHUNK = 256
"""The most records (about; see `_chunks`) one journal transaction writes. A normal flush (every 0.2 s)
holds a handful: one transaction as ever. A backlog after a long failure (a site controller re-sending
meanwhile queues tens of thousands) goes in chunks: a few hundred records of a few hundred bytes each
make a WAL of some tens to a few hundred KB, which fits where a whole backlog's 4-5 MB did not, and
costs at most that much disk work when it fails; large enough that draining 100,000 records takes
some hundreds of commits, not one per record."""
PRUNE_EVERY_S = 3_600.0
WALL_STEP_S = 5.0
"""A change this large in the wall clock's offset from the monotonic one is a step (NTP's first sync, a
person setting the date), not drift: the owner's saved times are placed on the core's line again."""


class Gateway:
    """One gateway: core state, its inputs and outputs. Implements DispatchSink and OwnerPort."""

    def __init__(self, config: Config, clocks: Clocks, reader: BmsReader,
                 inverter: InverterClient, journal: Journal, owner: OwnerSettings | None = None,
                 owner_store: OwnerStore | None = None):
        self.config = config
        self.clocks = clocks
        self.clock = clocks.monotonic
        clock = self.clock
        self.reader = reader
        self.inverter = inverter
        self.journal = journal
        self.policy = Policy.from_config(config)
        now = clock()
        self.controller = Controller.start(self.policy, owner, now)
        self.command = InverterCommand(0.0, self.controller.reason)
        inverter.follow(lambda: self.command)  # a write that waited for the link writes the newest decision
        self.command_changed = asyncio.Event()
        self.observers: list[Callable[[StepResult], None]] = []
        self.steps = StepRecorder()
        self.backlog = Backlog()
        """What waits to be journaled (bounded while writes fail: see `journal.backlog`)."""
        self.backlog.add_note(START_KIND, now, start_payload(self.policy, self.controller.owner, now))
        self._maintain_after = now  # the gateway clock: when rotation and pruning are next looked at
        self._prune_after = now
        self.links = LinkBook(clock, self.note)
        self.watch_stalls = False
        self.stopping = False
        """Set by `begin_stop`: the inputs have ended, so the core is stepped no more (see there)."""
        self._stop_write_failed = False  # a journal write failed during the stop: no other is attempted
        self._damaged_seen: set[int] = set()  # damaged journal records already logged (see `_skip_damaged`)
        self.resync_wanted = asyncio.Event()
        """Set when a stall was seen: the service reads the inverter again at once."""
        self.reaction_observers: list[Callable[[float], None]] = []
        """Told, in seconds, how long a BMS snapshot that changed the setpoint took to reach the inverter."""
        self.perf_clock: Callable[[], float] = time.perf_counter
        """Real elapsed time for the reaction (the core's clock is simulated on the bench)."""
        self._reaction_from: float | None = None
        self._day_due = -math.inf  # the core clock: when the date is next looked at
        self._day_offset: float | None = None  # the wall clock's offset the date was last looked at with
        self._day_reread = False  # the journal gained spending the core never counted: read it at the next look
        self.owner_store = owner_store
        """Where `owner` was loaded from (None: given by a scenario), read again when the wall clock steps."""
        self._owner_offset = clocks.offset()  # the wall clock's offset the owner's times were placed with
        self.earnings = EarningsBook(*basis_of(config), clocks)
        """This month's earnings for the status (computed off the loop by the service's `earnings` task)."""

    # ------------------------------------------------------------------ core

    def feed(self, *inputs: Input) -> StepResult:
        """Step the core with `inputs` now; queue what must be journaled; wake the command writer.

        Stopping (`begin_stop`), nothing is stepped or journaled: the answer is the state as it stands.
        What still arrives then (a dispatch source's last words as it stops) is moot: the stop ends
        every open event itself; the owner's changes are refused before they get here (`OwnerDesk`)."""
        if self.stopping:
            log.debug("stopping: not stepped: %s", ", ".join(type(i).__name__ for i in inputs))
            return StepResult(self.controller, self.command, [])
        now = self.clock()
        if self.watch_stalls:
            inputs = self._noticing_stall(now, inputs)
        if now >= self._day_due:
            inputs = (self._calendar_day(now), *inputs)
        result = step(self.controller, inputs, now)
        batch = self.steps.record(now, inputs)
        if batch is not None:
            self.backlog.add_note(STEPS_KIND, now, batch)
        self.controller = result.controller
        self.command = result.command
        self.command_changed.set()  # the client alone judges whether the inverter needs a write
        self.backlog.extend(i for i in inputs if isinstance(i, JOURNALED_INPUTS))
        self.backlog.extend(result.events)
        for observer in self.observers:
            observer(result)
        return result

    def _noticing_stall(self, now: float, inputs: tuple[Input, ...]) -> tuple[Input, ...]:
        """`inputs`, led by a `Stall` when this step comes too long after the last one."""
        last = self.controller.last_step_at
        if last is None or now - last <= self.policy.stall_gap_s:
            return inputs
        gap = now - last
        log.warning("the gateway itself stalled for %.2f s (its process or machine paused): "
                    "holding 0 W until fresh BMS and inverter data; not counted as a vehicle fault", gap)
        self.resync_wanted.set()
        return (Stall(now, gap), *inputs)

    def _owner_if_wall_stepped(self) -> tuple[OwnerSettings, ...]:
        """Once the wall clock moved against the monotonic one since the owner's times were placed: the
        owner settings file on the core's line as of the corrected wall clock (the file holds what the owner
        asked for, in wall time). Otherwise none, as when the file cannot be read (the times then stay).
        Looked at by the tick, not on the frame path: a step of the wall clock is rare and a tick away."""
        if self.owner_store is None:
            return ()
        offset = self.clocks.offset()
        if abs(offset - self._owner_offset) <= WALL_STEP_S:
            return ()
        moved, self._owner_offset = offset - self._owner_offset, offset
        try:
            saved = self.owner_store.load(self.clocks.wall())
        except InputError as err:
            log.warning("the wall clock was corrected by %+.0f s, but the owner settings could not be read "
                        "again (%s): the owner's times stay where they were placed", moved, err)
            return ()
        log.warning("the wall clock was corrected by %+.0f s: the owner's times were placed again from %s",
                    moved, self.owner_store.path)
        return (on_clock(saved, self.clocks.to_core),)

    def _wall_stepped_since_day(self) -> bool:
        """Whether the wall clock stepped since the date was last looked at (never looked at: no)."""
        return self._day_offset is not None and abs(self.clocks.offset() - self._day_offset) > WALL_STEP_S

    def _day_due_if_wall_stepped(self, now: float) -> None:
        """A stepped wall clock makes the date due at once: on a board that booted with a wrong date,
        the budget must count by the corrected date (and what the journal holds for it) from the next
        step, not up to `DAY_RECHECK_S` later."""
        if self._wall_stepped_since_day():
            self._day_due = now

    def _calendar_day(self, now: float) -> CalendarDay:
        """Which date it is, for the core's daily price budget, and when to look again. What the journal
        holds as spent that date is read at a start and after a wall-clock step (the date the gateway
        counted by may have been wrong, so the core's count is not the date's); at a midnight roll-over
        nothing was spent yet on the new date, and the core's own count runs on."""
        date, began_wall, next_wall = calendar_day(self.clocks.to_wall(now))
        self._day_due = min(self.clocks.to_core(next_wall), now + DAY_RECHECK_S)
        read = self.controller.day is None or self._day_reread or self._wall_stepped_since_day()
        self._day_offset, self._day_reread = self.clocks.offset(), False
        return CalendarDay(now, date, self._price_spent_since(began_wall) if read else 0.0)

    def _price_spent_since(self, began_wall: float) -> float:
        """Price-driven energy the journal holds since `began_wall` (this date's start), so a restart
        does not grant the day's budget again: each price event's last energy record today, whole
        (an event that began before midnight counts whole: the budget errs toward less discharge).
        Read from the live journal segment, the window only."""
        try:
            ids = {r.payload.get("id") for r in self.journal.recent({RecordKind.PRICE_INTERVAL},
                                                                    began_wall - PRICE_LOOKBACK_S)}
            last: dict[str, float] = {}
            for record in self.journal.recent({RecordKind.EVENT_ENERGY}, began_wall):
                p = record.payload
                if p.get("request_id") in ids:
                    last[p["request_id"]] = max(float(p.get("meter_wh") or 0.0), float(p.get("integrated_wh") or 0.0))
        except (InputError, OSError, TypeError, ValueError) as err:
            log.warning("today's price-driven energy could not be read from the journal (%s): counting from 0", err)
            return 0.0
        return sum(last.values())

    def now(self) -> float:
        return self.clock()

    def begin_stop(self) -> None:
        """The service is stopping: its inputs (poll, tick, CAN) end and 0 W goes to the inverter outside the core.

        From here the core is not stepped (`feed` answers with the state as it stands) and no command
        but the safe stop's goes to the inverter (`write_command`): a step would judge the freshness
        of data the gateway no longer collects, and a stop slower than the inverter's or the BMS's timeout would journal a
        fault (and a transition to FAULT) that only the stop caused. Records still queue and are
        written; the open events are ended by `close_open_events`. After the first journal write that
        fails during the stop no other is attempted: each would wait the journal's busy timeout, and
        systemd kills the service `TimeoutStopSec` after SIGTERM (what stays queued is reported).
        """
        self.stopping = True

    # ------------------------------------------------------------------ inputs

    def on_frames(self, msgs: Iterable[can.Message]) -> StepResult | None:
        """Frames that arrived together: decode them all, then at most one step with the newest snapshot.

        The reader hands out a snapshot only when a field the core decides on changed,
        so a frame of voltage noise costs a decode and no step.
        """
        now, latest = self.clock(), None
        for msg in msgs:
            latest = self.reader.on_message(msg, now) or latest
        return self.on_snapshot(latest) if latest is not None else None

    def on_snapshot(self, snapshot: BmsSnapshot) -> StepResult | None:
        """New BMS data the core decides on (the reader has already judged that it is new).

        When it changes the setpoint, the reaction starts at the snapshot's decode: the
        step's `now` less its `received_at` is the hop from the frame path to this step.
        """
        if self.stopping:  # a frame decoded before the CAN intake ended: the core is stepped no more
            return None
        if not self.reaction_observers:  # nobody measures: the step alone
            return self.feed(snapshot)
        began, before = self.perf_clock(), self.command.setpoint_w
        result = self.feed(snapshot)
        if result.command.setpoint_w != before:
            self._reaction_from = began - max(0.0, (result.controller.last_step_at or 0.0) - snapshot.received_at)
        return result

    def tick(self) -> StepResult:
        """Time passing: freshness as of now (a silent bus turns stale here), ramps, windows."""
        now = self.clock()
        self._day_due_if_wall_stepped(now)
        return self.feed(*self._owner_if_wall_stepped(), self.reader.snapshot(now), Tick(now))

    async def poll_inverter(self) -> InverterStatus:
        status = await self.inverter.read_status()
        self.feed(status)
        if status.comms_ok:
            self.links.good(Link.INVERTER, status.received_at)
        else:
            self.links.lost(Link.INVERTER, status.error or "no answer")
        return status

    async def write_command(self) -> None:
        """Send the current command (the client writes only on change or when a refresh is due).
        Stopping, the safe stop alone commands the inverter: nothing may follow its 0 W."""
        if self.stopping:
            return
        self.command_changed.clear()
        began, self._reaction_from = self._reaction_from, None
        writes = self.inverter.writes
        await self.inverter.apply(self.command)
        if began is not None and self.inverter.writes != writes:
            elapsed = self.perf_clock() - began
            for observe in self.reaction_observers:
                observe(elapsed)

    # ------------------------------------------------------------------ DispatchSink

    async def submit(self, item: DispatchRequest | DispatchCancel | SiteLimit | PriceInterval) -> DispatchAnswer | None:
        result = self.feed(item)
        await self.write_command()
        return result.answer_for(item.id) if isinstance(item, (DispatchRequest, PriceInterval)) else None

    def telemetry(self) -> Telemetry:
        return telemetry(self.controller, self.clock())

    def status(self) -> dict[str, Any]:
        """The live state as `powershare-gw status` and `GET /api/status` show it."""
        now = self.clock()
        return status_document(telemetry(self.controller, now), self.links.view(now), self.clocks.to_wall(now),
                               self.earnings.latest())

    def note(self, kind: RecordKind, payload: dict) -> None:
        self.backlog.add_note(kind, self.clock(), payload)

    def journal_notes(self, kind: RecordKind, back_s: float) -> list[dict]:
        """Payloads of `kind` journaled in the last `back_s` seconds (archived segments too), oldest first;
        none when the journal cannot be read (logged): a source then errs toward doing again what it noted."""
        try:
            return [r.payload for r in self.journal.recent({kind}, self.clocks.wall() - back_s)]
        except (InputError, OSError, TypeError, ValueError) as err:
            log.warning("the journal's %s notes could not be read (%s)", kind, err)
            return []

    def journaled_wh(self, request_id: str) -> float:
        """Wh the journal credits `request_id` with so far (its accounts of every run, a crash's meter gap
        billed at the start), as `statement` does; 0 when the journal cannot be read (logged)."""
        try:
            return sum(s.meter_wh for s in event_summaries(self.journal, only=request_id))
        except (InputError, OSError, TypeError, ValueError) as err:
            log.warning("the journal's energy for %s could not be read (%s): reported from this run's meter only",
                        request_id, err)
            return 0.0

    # ------------------------------------------------------------------ OwnerPort

    def owner_settings(self) -> OwnerSettings:
        """The core's owner settings; placed again first if the wall clock stepped since the last step, so
        an owner change made right after an NTP step starts from the owner's times, not shifted ones."""
        if not self.stopping and (placed := self._owner_if_wall_stepped()):
            self.feed(*placed)
        return self.controller.owner

    async def set_owner(self, settings: OwnerSettings) -> None:
        self.feed(settings)
        await self.write_command()

    async def reset_lockout(self) -> bool:
        """An installer's reset (the one input that clears LOCKOUT); whether a lockout was cleared.
        Journaled like every input; the core decides what it clears."""
        locked = self.controller.faults.locked_out
        self.feed(InstallerReset(self.clock()))
        await self.write_command()
        return locked

    def sample(self) -> None:
        """Journal what the history chart draws: SoC, floor, setpoint and measured power now."""
        t = telemetry(self.controller, self.clock())
        self.note(RecordKind.SAMPLE, {"mode": t.mode.value, "soc_pct": t.soc_pct, "floor_pct": round(t.floor_pct, 3),
                                      "setpoint_w": round(t.setpoint_w, 1), "power_w": round(t.power_w, 1)})

    # ------------------------------------------------------------------ journal

    def flush_journal(self, *, final: bool = False) -> int:
        """Write what the steps queued, here and now (the bench's way): in chunks of at most about
        `WRITE_CHUNK` records, each one transaction (a normal flush holds a handful: one transaction).

        `final` also writes the unfinished batch of recorded steps (at a stop).
        """
        if final and (batch := self.steps.take()) is not None:
            self.backlog.add_note(STEPS_KIND, self.clock(), batch)
        written = 0
        while True:  # again when the write that recovered the journal queued the core's step for it
            pending = self.backlog.take()
            done, failure = self._write(pending)
            written += self._settle(pending, done, failure)
            if not self.backlog or failure is not None:  # all written, or it failed (the rest put back)
                return written

    async def flush_journal_async(self) -> int:
        """The same off the event loop: the queue is taken here, only the disk work moves to a thread.

        A write handed to the thread pool is seen through even when the task is cancelled (a stop):
        cancelled while it waited for a worker it would never run, and the records it took from the
        queue would be lost with nobody told. So the stop waits for it (bounded by the journal's busy
        timeout) and it is settled like any other; then the cancellation goes on.
        """
        pending = self.backlog.take()
        if not pending:
            return self._settle(pending, 0, None)
        write = asyncio.ensure_future(asyncio.to_thread(self._write, pending))
        try:
            done, failure = await asyncio.shield(write)
        except asyncio.CancelledError:
            while not write.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({write})
            self._settle(pending, *write.result())
            raise
        return self._settle(pending, done, failure)

    def _write(self, pending: list[Any]) -> tuple[int, JournalWriteError | None]:
        """Write `pending` in order, a chunk (`_chunks`) per transaction; how many were written, and the
        failure that stopped the rest (None: all written).

        One transaction for a whole backlog would need WAL space for all of it at once: after a full
        disk (a backlog of a long failure, tens of thousands of records) it would fail, roll back and be
        tried again every flush for ever, wearing the SD card and writing nothing. Chunk by chunk, a
        failing write costs at most one chunk of disk work and each success is progress (SQLite
        checkpoints the WAL after commits and reuses it), so the backlog drains as space allows. A cut
        between chunks leaves a prefix of the queue in the journal, as a crash mid-queue always could.
        """
        if not pending:
            return 0, None
        if self._stop_write_failed:
            return 0, JournalWriteError("not attempted: a journal write already failed during the stop")
        written = 0
        offset = self.clocks.offset()  # each record's instant for people, on the wall clock
        for chunk in _chunks(pending, WRITE_CHUNK):
            try:
                with self.journal.batch():
                    for item in chunk:
                        if isinstance(item, tuple):
                            kind, at, payload = item
                            self.journal.append(kind, at, payload, wall=at + offset)
                        else:
                            self.journal.append_event(item, wall=codec.event_time(item) + offset)
            except JournalWriteError as err:
                return written, err
            written += len(chunk)
        self._maintain()
        return written, None

    def _maintain(self) -> None:
        """Rotate the live segment once it passes `segment_mb`; prune archives past `retain_days`.

        Runs where the writes run (off the event loop), after a write that succeeded.
        A rotation that cannot be done now costs nothing but a retry later: the
        live segment simply grows meanwhile.
        """
        now, settings = self.clock(), self.config.journal
        if now < self._maintain_after:
            return
        try:
            if self.journal.size_bytes() >= settings.segment_mb * 1e6:
                archive = self.journal.rotate(now, self._carry(), self._run_in_progress(now))
                log.info("journal rotated: %s archived, %s continues the chain", archive.name, self.journal.path.name)
                self._prune_after = now
            if now >= self._prune_after:
                for pruned in self.journal.prune(now, settings.retain_days * 86_400):
                    log.info("journal segment %s pruned (older than %g days)", pruned.name, settings.retain_days)
                self._prune_after = now + PRUNE_EVERY_S
                heap.release_free_pages()  # the hourly upkeep of the process's memory too (see heap.py)
        except (JournalWriteError, OSError) as err:
            log.warning("journal upkeep postponed %.0f s: %s", MAINTAIN_RETRY_S, err)
            self._maintain_after = now + MAINTAIN_RETRY_S

    def _carry(self) -> list[tuple[str, dict[str, Any]]]:
        """What the next segment must hold for the events the core says are still open:
        each one's request, answer and last energy record, as journal payloads."""
        carry = []
        for event in still_open(self._event_life()).values():
            for item in (event.request, event.answer, event.last):
                if item is not None:
                    carry.append((str(RecordKind.of(item)), codec.jsonable(item)))
        return carry

    def _run_in_progress(self, now: float) -> dict[str, Any]:
        """This run as it stands, for the next segment's start: a gateway that runs for longer than
        `retain_days` outlives its `CoreStart`, and a statement of a month after the pruning would read
        its steps with no policy or owner settings (no floor) and with no request served until the next change."""
        c = self.controller  # one value: this runs in the journal's worker thread while the loop steps
        return {"start": start_payload(self.policy, c.owner, now), "serving": c.serving_id}

    def _settle(self, pending: list[Any], done: int, failure: JournalWriteError | None) -> int:
        """After a write of `pending` of which the first `done` were written: those count as written, the
        rest (on failure) is put back in front, in order (nothing is lost); how many were written.

        The journal's health is the core's input like any other: while it fails the
        core refuses new dispatch (energy that cannot be accounted must not be sold).
        It writes again only once everything taken was written: chunks written before a failing one are
        progress, not a recovery, so dispatch stays held while records of the failure are still queued,
        and a disk with room for part of the backlog does not toggle dispatch chunk by chunk.
        Only a change of health is fed, so a healthy journal costs no step.
        """
        failing = self.controller.journal_failing()
        written, rest = pending[:done], pending[done:]
        if written:
            self.backlog.written(written)
            self.earnings.journaled(sum(1 for item in written if _settles_an_event(item)),
                                    steps=any(isinstance(item, tuple) and item[0] == STEPS_KIND for item in written))
        if failure is None:
            if failing and not self.stopping:
                log.info("journal writes again%s", _dropped(pending))
                self.feed(JournalHealth(self.clock(), ok=True))
            return done
        self.backlog.put_back(rest)
        if self.stopping:  # no step (see `begin_stop`); no more writes either
            if not self._stop_write_failed:
                log.error("journal write failed during the stop; no more writes are attempted: %s", failure)
            self._stop_write_failed = True
            return done
        if not failing:
            log.error("journal write failed, refusing dispatch until it recovers: %s", failure)
            self.feed(JournalHealth(self.clock(), ok=False, detail=str(failure)))
        return done

    def close_open_events(self, meter_total_wh: float | None,
                          reason: str = "gateway restarted: event ended") -> list[str]:
        """End events the journal shows as running (after a crash, or at a stop), billing the meter's gap.

        Which events are open and what the gap bills are the core's rules
        (`core.energy`); this reads the journal for them and journals the result. An event this run's core
        holds closes from its live account (`close_at_stop`: the integral up to the stop, not the last report's).
        It reads the live segment only (a rotation carried the older open events
        into it), a page at a time: its cost does not grow with the journal.
        """
        still_open = open_events(self._event_life())
        now = self.clock()
        self.controller, live = close_at_stop(self.controller, still_open, meter_total_wh, now, reason)
        ended = {event.request_id for event in live if isinstance(event, DispatchEnded)}
        rest = {request_id: last for request_id, last in still_open.items() if request_id not in ended}
        self.backlog.extend(live)
        self.backlog.extend(close_after_restart(rest, None if ended else meter_total_wh, self.policy, now, reason))
        self.flush_journal()
        if still_open:  # their final records bill energy the core never saw: the day's spending read again
            self._day_reread, self._day_due = True, -math.inf
        return list(still_open)

    def unwritten(self) -> int:
        """How many records are queued and not yet in the journal (lost if the process ends now)."""
        return len(self.backlog)

    def _event_life(self) -> Iterator[Any]:
        """The live segment's requests, answers, energy and end records, decoded, after those a
        rotation carried in; a damaged one is logged and skipped."""
        for kind, payload in self.journal.carried():
            try:
                yield codec.decode_event(kind, payload)
            except ValueError as err:
                log.error("journal segment start: a carried %s record skipped: %s", kind, err)
        for record in self.journal.iter_records(EVENT_LIFE, damaged=self._skip_damaged):
            try:
                yield record.event()
            except ValueError as err:  # a damaged record is `report`'s to flag; it must not stop a start
                log.error("journal record %d skipped: %s", record.seq, err)

    def _skip_damaged(self, seq: int) -> None:
        """A record whose payload is not a JSON object (bit rot, a bad sector) is skipped by the start-up's
        read: one damaged row must not fail every start (systemd would restart the gateway for ever).
        Logged by seq only (the payload may be anything), once per process (the stop and each rotation
        read again); `report` and `check` flag it."""
        if seq not in self._damaged_seen:
            self._damaged_seen.add(seq)
            log.error("journal record %d skipped: its payload cannot be read (damaged); "
                      "`powershare-gw report` flags it", seq)


EVENT_LIFE = frozenset({RecordKind.DISPATCH_REQUEST, RecordKind.PRICE_INTERVAL, RecordKind.DISPATCH_ANSWER,
                        RecordKind.EVENT_ENERGY, RecordKind.DISPATCH_ENDED})
"""The record kinds that tell which events are open (and what a rotation carries for them)."""


def _chunks(pending: list[Any], size: int) -> Iterator[list[Any]]:
    """`pending` in order, in chunks of about `size`, each cut only between two steps' records.

    A step queues its journaled inputs, then the core's events (`feed`): a request and what the core
    said to it go in one transaction (`journal.summary` reads a request by the record after it). So a
    chunk ends only before a note or a journaled input that follows no journaled input; the core's
    events stay with the inputs before them (a chunk may grow past `size` by one step's records)."""
    start = 0
    for i in range(size, len(pending)):
        if i - start >= size and _starts_a_step(pending[i]) and not isinstance(pending[i - 1], JOURNALED_INPUTS):
            yield pending[start:i]
            start = i
    if start < len(pending):
        yield pending[start:]


def _starts_a_step(item: Any) -> bool:
    return isinstance(item, tuple) or isinstance(item, JOURNALED_INPUTS)


def _dropped(written: list[Any]) -> str:
    """What the failure cost, for the recovery's log line: the steps and samples its gaps count."""
    gaps = [item[2] for item in written if is_gap(item)]
    if not gaps:
        return ""
    steps, samples = sum(g["steps"] for g in gaps), sum(g["samples"] for g in gaps)
    return f" ({steps} core steps and {samples} history samples were not kept meanwhile: see JournalGap)"


def _settles_an_event(item: Any) -> bool:
    """Whether a queued journal item settles an event's account: its end, its final energy, or a refusal.

    What the month's earnings are computed again after (`statements.earnings`): not the periodic energy
    records of an event still running, so the journal is not read over and over while the truck serves one.
    """
    if isinstance(item, DispatchEnded):
        return True
    if isinstance(item, EventEnergy):
        return item.final
    return isinstance(item, DispatchAnswer) and item.verdict is Verdict.REJECTED
