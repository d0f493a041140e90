"""tick → command: publish a collect command when a source's slot is due.

Next fire times come from each source's cron schedule in its timezone (``_schedule``), kept in
a heap so thousands of sources cost one timer. Each slot's run id is deterministic
(``<source>@<UTC slot>``) and is the ``Nats-Msg-Id``: a second ticker (another replica, or this
one after a restart) publishing the same slot makes one run, not two.

At start-up, slots missed while no daemon ran are caught up (``_catchup``) in the background,
beside the ticking: catch-up takes the slots up to the start time, ticking the ones after it,
so no slot is both caught up and ticked.

A source with ``jitter_s`` fires each slot a fixed offset in ``[0, jitter_s)`` after it, derived
from the source's name alone (``jitter_offset``): many sources sharing a schedule spread out,
while every replica and restart computes the same offset. The run keeps the slot itself as
``scheduled_for`` and as its run id, so de-duplication works as without jitter.
"""

from __future__ import annotations

import hashlib
import heapq
from datetime import datetime, timedelta

import anyio
from anyio.abc import TaskStatus

from daemon import _metrics
from daemon._bus import Bus
from daemon._catchup import CatchupPlan, catch_up
from daemon._clock import Clock
from daemon._db import Database
from daemon._logging import get_logger
from daemon._queue import queue_run
from daemon._schedule import run_id_for
from daemon.errors import TransientError
from daemon.settings import Settings, SourceConfig

__all__ = ["Ticker", "jitter_offset"]

log = get_logger("ticker")

#: How soon a slot whose command the bus refused is tried again.
_RETRY_S = 2.0


def jitter_offset(source: SourceConfig) -> timedelta:
    """How long after each slot ``source`` fires: in ``[0, jitter_s)``, fixed by its name."""
    if not source.jitter_s:
        return timedelta(0)
    digest = hashlib.sha256(source.name.encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return timedelta(seconds=source.jitter_s * fraction)


class Ticker:
    """Publishes one command per due slot of every enabled source."""

    def __init__(
        self, bus: Bus, settings: Settings, clock: Clock, *, db: Database | None = None
    ) -> None:
        self._bus = bus
        self._settings = settings
        self._clock = clock
        #: Run history for start-up catch-up; without it there is no catch-up.
        self._db = db
        #: (when to act, source name, slot): ``when`` differs from the slot only on a retry.
        self._heap: list[tuple[datetime, str, datetime]] = []
        self.ticks = 0
        #: Set once start-up catch-up has queued and recorded all it will.
        self.caught_up = anyio.Event()
        #: What start-up catch-up did, per enabled source (filled when it is done).
        self.catchup: dict[str, CatchupPlan] = {}
        self._scope = anyio.CancelScope()
        #: Cancelled to wake the tick loop when the heap was re-planned (``reload``).
        self._sleep = anyio.CancelScope()
        self._planned = False
        #: Bumped by every ``reload``, so a tick in flight meanwhile does not plan twice.
        self._plans = 0

    def stop(self) -> None:
        """Publish nothing more."""
        self._scope.cancel()

    def reload(self, settings: Settings) -> None:
        """Use these sources from now on: re-plan added, re-timed and removed ones (SIGHUP)."""
        old, self._settings = self._settings, settings
        if not self._planned:
            return
        now = self._clock.now()
        enabled = {source.name: source for source in settings.sources if source.enabled}
        same = {
            name
            for name, source in enabled.items()
            if (previous := old.source(name)) is not None
            and previous.enabled
            and (previous.schedule, previous.timezone, previous.jitter_s)
            == (source.schedule, source.timezone, source.jitter_s)
        }
        heap = [entry for entry in self._heap if entry[1] in same]
        for name in enabled.keys() - same:
            slot = enabled[name].cron.next_after(now)
            heap.append((slot + jitter_offset(enabled[name]), name, slot))
        heapq.heapify(heap)
        self._heap = heap
        self._plans += 1
        self._sleep.cancel()

    def next_runs(self) -> dict[str, datetime]:
        """Each scheduled source's next fire time."""
        return {name: slot for _, name, slot in self._heap}

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
                    await self._clock.sleep_until(self._heap[0][0])
                else:
                    await anyio.sleep_forever()
            if self._sleep.cancelled_caught:
                continue  # re-planned: wait for the new first slot
            now = self._clock.now()
            while self._heap and self._heap[0][0] <= now:
                _, name, slot = heapq.heappop(self._heap)
                source = self._settings.source(name)
                if source is None or not source.enabled:
                    continue
                plans = self._plans
                queued = await self._tick(source, slot, now)
                if plans != self._plans and any(entry[1] == name for entry in self._heap):
                    continue  # re-planned while this slot was being queued
                if queued:
                    nxt = self._following(source, slot, now)
                    heapq.heappush(self._heap, (nxt + jitter_offset(source), name, nxt))
                else:
                    retry_at = now + timedelta(seconds=_RETRY_S)
                    heapq.heappush(self._heap, (retry_at, name, slot))

    @staticmethod
    def _following(source: SourceConfig, slot: datetime, now: datetime) -> datetime:
        """The next slot to wait for; slots that already passed while late are not replayed."""
        nxt = source.cron.next_after(slot)
        if nxt <= now:
            nxt = source.cron.next_after(now)
        return nxt

    async def _tick(self, source: SourceConfig, slot: datetime, now: datetime) -> bool:
        """Queue the slot's run; False when the bus refused it (retried shortly)."""
        run_id = run_id_for(source.name, slot)
        lateness_s = (now - slot - jitter_offset(source)).total_seconds()
        try:
            await queue_run(self._bus, source, slot, run_id=run_id, trigger="schedule", now=now)
        except TransientError as exc:
            # The bus is down: JetStream de-duplicates, so retrying this slot later is safe.
            log.error(
                "tick.publish_failed",
                extra={"source": source.name, "run_id": run_id, "error": str(exc)},
            )
            return False
        self.ticks += 1
        _metrics.record_lateness(source.name, lateness_s, trigger="schedule")
        log.info(
            "tick.queued",
            extra={"source": source.name, "run_id": run_id, "lateness_s": round(lateness_s, 3)},
        )
        return True
