"""tick → command: publish a collect command when a source's slot is due.

Next fire times come from each source's cron schedule in its timezone (``daemon.schedule``), kept in
a heap so thousands of sources cost one timer. Each slot's run id is deterministic
(``<source>@<UTC slot>``) and is the ``Nats-Msg-Id``: a second ticker (another replica, or this
one after a restart) publishing the same slot makes one run, not two.

Runs due at the same instant go out as one burst. A little before the instant (``_lead_s``,
at least ``PREPARE_AHEAD_S``) the ticker takes them off the heap and prepares each
(``_queue.prepare_run``: run id, command, subject, root and producer spans started at the
instant, headers carrying the trace context); at the instant it only stamps and encodes each
command and publishes them all with their acks in flight together (``_queue.queue_burst``),
never before the instant. Only then are the next slots computed and pushed. A run the bus
refused (no ack in time, a JetStream error) is tried again ``_RETRY_S`` later, alone or in
that instant's burst: JetStream de-duplicates by run id, so a retry never makes a second run.
A re-plan (``reload``) while a burst waits for its instant puts its runs back on the heap.

Logs: one ``tick.burst`` info line per burst (runs queued and refused, lateness p50 and max;
source and run id when the burst is one run), ``tick.queued`` per run at debug level only,
and one ``tick.publish_failed`` error line per burst that had refusals. The lateness
histogram (``coleta.schedule.lateness``) is recorded for every run: lateness is the time its
command was handed to the bus minus its slot (plus jitter), and that hand-over time is the
command's ``requested_at``.

At start-up, slots missed while no daemon ran are caught up (``_catchup``) in the background,
beside the ticking: catch-up takes the slots up to the start time, ticking the ones after it,
so no slot is both caught up and ticked.

A source with ``jitter_s`` fires each slot a fixed offset in ``[0, jitter_s)`` after it, derived
from the source's name alone (``jitter_offset``): many sources sharing a schedule spread out,
while every replica and restart computes the same offset. The run keeps the slot itself as
``scheduled_for`` and as its run id, so de-duplication works as without jitter.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import heapq
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import anyio
from anyio.abc import TaskStatus

from daemon.errors import TransientError, classify
from daemon.ids import run_id_for
from daemon.platform import metrics
from daemon.platform.bus import Bus
from daemon.platform.clock import Clock
from daemon.platform.db import Database
from daemon.platform.logs import get_logger
from daemon.settings import Settings, SourceConfig
from daemon.ticker._catchup import CatchupPlan, catch_up
from daemon.ticker._queue import PreparedRun, Queued, prepare_run, queue_burst

__all__ = ["PREPARE_AHEAD_S", "Ticker", "jitter_offset"]

log = get_logger("ticker")

#: How soon a slot whose command the bus refused is tried again.
_RETRY_S = 2.0
#: Runs due at an instant are prepared at least this long before it (longer when preparing the
#: last burst took more than half of it: ~30 us a run, so 1 s covers ~15,000 runs at once).
PREPARE_AHEAD_S = 1.0
#: From this many runs a burst's objects are kept out of the collector's sight (``_gc_paused``).
_FREEZE_FROM = 1000
#: A burst's summary names its runs' sources only up to this many.
_NAMED = 10

#: (when to act, source name, slot): ``when`` is the slot plus jitter, or later on a retry.
_Entry = tuple[datetime, str, datetime]


def jitter_offset(source: SourceConfig) -> timedelta:
    """How long after each slot ``source`` fires: in ``[0, jitter_s)``, fixed by its name."""
    return _offset(source.name, source.jitter_s) if source.jitter_s else timedelta(0)


@functools.lru_cache(maxsize=65536)
def _offset(name: str, jitter_s: float) -> timedelta:
    digest = hashlib.sha256(name.encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return timedelta(seconds=jitter_s * fraction)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (the previous setting comes back after).

    For preparing a burst (no awaits inside): a prepared run holds ~25 objects the collector
    tracks (its spans most of them), and preparing 10,000 set off three full collections of
    80-110 ms each. A large burst is then frozen (``gc.freeze``) until it is out and planned:
    a full collection over its objects paused the loop 150 ms mid-burst, and a young one right
    after a paused preparation, 90 ms. Refcounting still frees everything as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _enabled(settings: Settings) -> dict[str, SourceConfig]:
    return {source.name: source for source in settings.sources if source.enabled}


class Ticker:
    """Publishes one command per due slot of every enabled source."""

    def __init__(
        self, bus: Bus, settings: Settings, clock: Clock, *, db: Database | None = None
    ) -> None:
        self._bus = bus
        self._settings = settings
        self._sources = _enabled(settings)
        self._clock = clock
        #: Run history for start-up catch-up; without it there is no catch-up.
        self._db = db
        self._heap: list[_Entry] = []
        #: The next burst's runs, off the heap: prepared and waiting for their instant, or
        #: being published (``_publishing``).
        self._due: list[PreparedRun] = []
        self._publishing = False
        #: How long before an instant its runs are prepared.
        self._lead_s = PREPARE_AHEAD_S
        self.ticks = 0
        #: Set once start-up catch-up has queued and recorded all it will.
        self.caught_up = anyio.Event()
        #: What start-up catch-up did, per enabled source (filled when it is done).
        self.catchup: dict[str, CatchupPlan] = {}
        self._scope = anyio.CancelScope()
        #: Cancelled to wake the tick loop when the heap was re-planned (``reload``).
        self._sleep = anyio.CancelScope()
        self._planned = False
        #: Bumped by every ``reload``, so a burst in flight meanwhile does not plan twice.
        self._plans = 0

    def stop(self) -> None:
        """Publish nothing more."""
        self._scope.cancel()

    def reload(self, settings: Settings) -> None:
        """Use these sources from now on: re-plan added, re-timed and removed ones (SIGHUP)."""
        old, self._settings = self._settings, settings
        self._sources = enabled = _enabled(settings)
        if not self._planned:
            return
        now = self._clock.now()
        same = {
            name
            for name, source in enabled.items()
            if (previous := old.source(name)) is not None
            and previous.enabled
            and (previous.schedule, previous.timezone, previous.jitter_s)
            == (source.schedule, source.timezone, source.jitter_s)
        }
        planned = list(self._heap)
        if not self._publishing:
            # A burst still waiting for its instant is dropped (the loop wakes) and re-planned.
            planned += [(run.due, run.source, run.command.scheduled_for) for run in self._due]
            self._due = []
        heap = [entry for entry in planned if entry[1] in same]
        for name in enabled.keys() - same:
            slot = enabled[name].cron.next_after(now)
            heap.append((slot + jitter_offset(enabled[name]), name, slot))
        heapq.heapify(heap)
        self._heap = heap
        self._plans += 1
        self._sleep.cancel()

    def next_runs(self) -> dict[str, datetime]:
        """Each scheduled source's next fire time."""
        runs = {run.source: run.command.scheduled_for for run in self._due}
        runs.update((name, slot) for _, name, slot in self._heap)
        return runs

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            await self._run(task_status)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        now = self._clock.now()
        enabled = [source for source in self._settings.sources if source.enabled]
        self._heap = []
        for configured in enabled:
            slot = configured.cron.next_after(now)
            self._heap.append((slot + jitter_offset(configured), configured.name, slot))
        heapq.heapify(self._heap)
        self._planned = True
        async with anyio.create_task_group() as tg:
            # The same ``now`` as the heap: catch-up owns slots <= now, ticking those after.
            tg.start_soon(self._catch_up, enabled, now, name="ticker-catchup")
            task_status.started()
            await self._tick_forever()

    async def _catch_up(self, sources: list[SourceConfig], now: datetime) -> None:
        if self._db is not None and sources:
            self.catchup = await catch_up(self._bus, self._db, sources, now)
        self.caught_up.set()

    async def _tick_forever(self) -> None:
        while True:
            with anyio.CancelScope() as self._sleep:
                if self._heap:
                    lead = timedelta(seconds=self._lead_s)
                    await self._clock.sleep_until(self._heap[0][0] - lead)
                else:
                    await anyio.sleep_forever()
            if self._sleep.cancelled_caught:
                continue  # re-planned: wait for the new first slot
            with _gc_paused():
                instant = self._prepare()
                frozen = len(self._due) >= _FREEZE_FROM
                if frozen:
                    gc.freeze()
            due = list(self._due)
            try:
                await self._burst(instant)
            except Exception as exc:
                # A bug must not stop the schedule: the instant's runs are tried again (the
                # bus de-duplicates their run ids), and the ticker goes on.
                log.exception("tick.crashed", extra={"error": str(classify(exc)), "runs": len(due)})
                retry = self._clock.now() + timedelta(seconds=_RETRY_S)
                for run in due:
                    heapq.heappush(self._heap, (retry, run.source, run.command.scheduled_for))
            finally:
                if frozen:
                    gc.unfreeze()

    async def _burst(self, instant: datetime) -> None:
        """Publish the prepared runs at ``instant``, then plan their next slots."""
        if not self._due:
            return  # only removed or disabled sources were due
        with anyio.CancelScope() as self._sleep:
            await self._clock.sleep_until(instant)
        if self._sleep.cancelled_caught:
            return  # re-planned while waiting: the heap has these runs again
        plans = self._plans
        queued = await self._publish()
        self._plan_next(queued, replanned=plans != self._plans)

    def _prepare(self) -> datetime:
        """Take the next instant's runs off the heap and prepare them; the instant."""
        started = time.perf_counter()
        instant = max(self._heap[0][0], self._clock.now())  # late: everything due by now
        due: list[PreparedRun] = []
        while self._heap and self._heap[0][0] <= instant:
            when, name, slot = heapq.heappop(self._heap)
            source = self._sources.get(name)
            if source is None:
                continue
            run_id = run_id_for(name, slot)
            due.append(
                prepare_run(self._bus, source, slot, run_id=run_id, trigger="schedule", due=when)
            )
        self._due = due
        self._lead_s = max(PREPARE_AHEAD_S, 2 * (time.perf_counter() - started))
        return instant

    async def _publish(self) -> list[Queued]:
        """Publish the prepared burst."""
        self._publishing = True
        try:
            return await queue_burst(self._bus, self._due, self._clock.now)
        finally:
            self._publishing = False
            self._due = []

    def _plan_next(self, queued: list[Queued], *, replanned: bool) -> None:
        """Push each run's next slot (or its retry), count and log the burst."""
        now = self._clock.now()
        # Re-planned meanwhile: the sources ``reload`` put on the heap are planned already.
        planned = {entry[1] for entry in self._heap} if replanned else set()
        lateness: list[float] = []
        refused: list[Queued] = []
        debug = log.isEnabledFor(logging.DEBUG)
        for result in queued:
            run = result.run
            name, slot = run.source, run.command.scheduled_for
            source = self._sources.get(name)
            if isinstance(result.outcome, TransientError):
                # The bus refused it: JetStream de-duplicates, so retrying this slot is safe.
                refused.append(result)
                if source is not None and name not in planned:
                    retry = (now + timedelta(seconds=_RETRY_S), name, slot)
                    heapq.heappush(self._heap, retry)
                continue
            self.ticks += 1
            offset = jitter_offset(source) if source is not None else timedelta(0)
            late = (result.sent_at - slot - offset).total_seconds()
            lateness.append(late)
            metrics.record_lateness(name, late, trigger="schedule")
            if debug:
                log.debug(
                    "tick.queued",
                    extra={"source": name, "run_id": run.run_id, "lateness_s": round(late, 3)},
                )
            if source is not None and name not in planned:
                nxt = self._following(source, slot, now)
                heapq.heappush(self._heap, (nxt + offset, name, nxt))
        self._log_burst(queued, lateness, refused)

    @staticmethod
    def _log_burst(queued: list[Queued], lateness: list[float], refused: list[Queued]) -> None:
        summary: dict[str, object] = {"queued": len(lateness), "refused": len(refused)}
        if lateness:
            ordered = sorted(lateness)
            summary["lateness_p50_s"] = round(ordered[len(ordered) // 2], 3)
            summary["lateness_max_s"] = round(ordered[-1], 3)
        if len(queued) == 1:
            summary["source"], summary["run_id"] = queued[0].run.source, queued[0].run.run_id
        log.info("tick.burst", extra=summary)
        if refused:
            first = refused[0]
            log.error(
                "tick.publish_failed",
                extra={
                    "refused": len(refused),
                    "sources": [result.run.source for result in refused[:_NAMED]],
                    "run_id": first.run.run_id,
                    "error": str(first.outcome),
                    "retry_in_s": _RETRY_S,
                },
            )

    @staticmethod
    def _following(source: SourceConfig, slot: datetime, now: datetime) -> datetime:
        """The next slot to wait for; slots that already passed while late are not replayed."""
        nxt = source.cron.next_after(slot)
        if nxt <= now:
            nxt = source.cron.next_after(now)
        return nxt
